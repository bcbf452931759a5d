//! Feeding a prompt: its batches, how much of it may come ready-made, the cache room it
//! reserves, and the prefill loop (interruptible, with a call after each batch).

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, anyhow, bail};

use crate::model::{Model, State, logits_vec};

/// The longest batch fed to the model at once during prefill. Bounds the activations' memory
/// on long prompts while keeping matmuls batched: at 256 rows the batched kernels run as fast
/// as at 512, and a 1,024-token prompt peaks 15 MiB lower.
pub const PREFILL_CHUNK: usize = 256;

/// A prompt's batches: at most [`PREFILL_CHUNK`] tokens each, as even as can be, so that no
/// batch of a prompt long enough for the batched kernels falls below their row minimum (a
/// 270-token prompt is 135 + 135, not 256 + 14). For the int8 formats a row's result does not
/// depend on its batch at all (the batched kernels sum as the decode kernels do); for the
/// formats whose batches go through the float GEMM it does, and with this split every row of
/// such a prompt goes through the GEMM however the prompt is cut into passes (see
/// [`resume_limit`]).
pub fn prefill_batches(prompt: &[u32]) -> impl Iterator<Item = &[u32]> {
    let n = prompt.len().div_ceil(PREFILL_CHUNK).max(1);
    let (base, extra) = (prompt.len() / n, prompt.len() % n);
    let mut rest = prompt;
    (0..n).map(move |i| {
        let (batch, tail) = rest.split_at(base + usize::from(i < extra));
        rest = tail;
        batch
    })
}

/// The longest prefix of a `len`-token prompt that a run may take ready-made (from the prompt
/// cache, a shared prefix) and still compute the rest bit for bit as a run that feeds the whole
/// prompt: the rest keeps at least one token (its logits are needed) and, when the whole prompt
/// is long enough for the batched kernels, at least their row minimum, so the rest goes through
/// them as it would in the whole run.
pub fn resume_limit(len: usize) -> usize {
    let rows = crate::weights::batch_rows_min();
    if len >= rows { len - rows } else { len.saturating_sub(1) }
}

/// How many answer tokens the KV cache is sized for before generation starts.
const RESERVE_AHEAD: usize = 1024;

/// The KV cache positions to reserve for a prompt of `prompt_len` tokens: the prompt and the
/// first 1,024 tokens of the answer (all of it when `-n` is smaller). Beyond that the
/// cache grows as the answer does.
pub fn cache_reserve(prompt_len: usize, max_tokens: Option<usize>) -> usize {
    prompt_len + max_tokens.unwrap_or(RESERVE_AHEAD).min(RESERVE_AHEAD)
}

/// What a prefill calls after each batch, with the tokens the state holds (from the first)
/// and the state: the prompt cache stores a long prompt's chunks of a model with rings while
/// they are still held.
pub type AfterBatch<'a> = dyn FnMut(&[u32], &State) + 'a;

/// Feeds `prompt` in [`prefill_batches`] and returns the logits after the last one.
pub fn prefill(model: &Model, state: &mut State, prompt: &[u32]) -> Result<Vec<f32>> {
    let never = AtomicBool::new(false);
    prefill_unless_interrupted(model, state, prompt, &never, &mut |_| {})?
        .ok_or_else(|| anyhow!("interrupted"))
}

/// [`prefill`] of the rest of `tokens` (the state holds their first positions), calling
/// `after` after each batch.
pub fn prefill_then(
    model: &Model,
    state: &mut State,
    tokens: &[u32],
    after: &mut AfterBatch<'_>,
) -> Result<Vec<f32>> {
    let never = AtomicBool::new(false);
    let from = state.len().min(tokens.len());
    let mut after = |state: &State| after(&tokens[..state.len().min(tokens.len())], state);
    prefill_unless_interrupted(model, state, &tokens[from..], &never, &mut after)?
        .ok_or_else(|| anyhow!("interrupted"))
}

/// Like [`prefill`], but checks `interrupted` before each batch (a long prompt takes seconds)
/// and returns `None` if it was set.
pub(super) fn prefill_unless_interrupted(
    model: &Model,
    state: &mut State,
    prompt: &[u32],
    interrupted: &AtomicBool,
    after: &mut dyn FnMut(&State),
) -> Result<Option<Vec<f32>>> {
    if prompt.is_empty() {
        bail!("the prompt has no tokens");
    }
    let chunks: Vec<&[u32]> = prefill_batches(prompt).collect();
    let Some((last, first)) = chunks.split_last() else {
        bail!("the prompt has no tokens");
    };
    // Only the last chunk's logits are needed: the others just fill the cache, which spares
    // an output matmul over the whole vocabulary per chunk.
    for chunk in first {
        if interrupted.load(Ordering::Relaxed) {
            return Ok(None);
        }
        model.feed(state, chunk)?;
        after(state);
    }
    if interrupted.load(Ordering::Relaxed) {
        return Ok(None);
    }
    let logits = logits_vec(&model.forward(state, last)?)?;
    after(state);
    Ok(Some(logits))
}
