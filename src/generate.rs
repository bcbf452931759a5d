//! The generation loop: prefill the prompt, then sample one token at a time until an
//! end-of-generation token, the token limit, a full context, the caller, or an interrupt says
//! stop. Token ids go to a callback; this module never sees stdout.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

use crate::model::{Model, State, logits_vec};
use crate::sample::Sampler;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Eos,
    /// `-n/--max-tokens` was reached.
    Length,
    /// The context (KV cache) is full.
    ContextFull,
    /// The callback asked to stop (a stop string, or the reader closed the pipe).
    Stop,
    /// Ctrl-C.
    Interrupted,
}

impl FinishReason {
    /// The name used in stats and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::Length | Self::ContextFull => "length",
            Self::Stop => "stop",
            Self::Interrupted => "interrupted",
        }
    }
}

/// What happened, with timings.
#[derive(Debug, Clone)]
pub struct Generation {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Time to process the prompt (until the first token's logits are ready).
    pub prefill: Duration,
    /// Time spent producing the tokens after the first one.
    pub decode: Duration,
}

/// The longest batch fed to the model at once during prefill. Bounds the activations' memory
/// on long prompts while keeping matmuls batched: at 256 rows the batched kernels run as fast
/// as at 512, and a 1,024-token prompt peaks 15 MiB lower.
pub const PREFILL_CHUNK: usize = 256;

/// How many answer tokens the KV cache is sized for before generation starts.
const RESERVE_AHEAD: usize = 1024;

/// Limits and signals for one generation.
pub struct Limits<'a> {
    /// Stop after this many tokens.
    pub max_tokens: Option<usize>,
    /// Token ids that end generation (never passed to the callback).
    pub end_of_generation: &'a [u32],
    /// Set by the Ctrl-C handler; checked after every token.
    pub interrupted: &'a AtomicBool,
}

/// Feeds `prompt` in batches of up to [`PREFILL_CHUNK`] tokens and returns the logits after
/// the last one.
pub fn prefill(model: &Model, state: &mut State, prompt: &[u32]) -> Result<Vec<f32>> {
    let never = AtomicBool::new(false);
    prefill_unless_interrupted(model, state, prompt, &never)?.ok_or_else(|| anyhow!("interrupted"))
}

/// Like [`prefill`], but checks `interrupted` before each batch (a long prompt takes seconds)
/// and returns `None` if it was set.
fn prefill_unless_interrupted(
    model: &Model,
    state: &mut State,
    prompt: &[u32],
    interrupted: &AtomicBool,
) -> Result<Option<Vec<f32>>> {
    let chunks: Vec<&[u32]> = prompt.chunks(PREFILL_CHUNK).collect();
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
    }
    if interrupted.load(Ordering::Relaxed) {
        return Ok(None);
    }
    Ok(Some(logits_vec(&model.forward(state, last)?)?))
}

/// Generates after `prompt`, calling `on_token` with each new token id as soon as it is chosen.
/// The callback returns `Break` to stop (its reason is reported as [`FinishReason::Stop`]).
pub fn generate(
    model: &Model,
    state: &mut State,
    sampler: &mut Sampler,
    prompt: &[u32],
    limits: &Limits<'_>,
    mut on_token: impl FnMut(u32) -> Result<ControlFlow<()>>,
) -> Result<Generation> {
    let start = Instant::now();
    if prompt.len() >= state.max_len() {
        bail!(
            "the prompt is {} tokens and the context holds {}: shorten the prompt or raise --ctx-size",
            prompt.len(),
            state.max_len()
        );
    }
    // The cache for the prompt and the first tokens of the answer at once (all of it when -n
    // is small); beyond that it grows as the answer does, so a six-token answer with a large
    // or absent -n never holds a whole context's worth of cache.
    let ahead = limits.max_tokens.unwrap_or(RESERVE_AHEAD).min(RESERVE_AHEAD);
    model.reserve(state, state.len() + prompt.len() + ahead)?;
    let Some(mut logits) = prefill_unless_interrupted(model, state, prompt, limits.interrupted)? else {
        return Ok(Generation {
            finish: FinishReason::Interrupted,
            prompt_tokens: prompt.len(),
            generated_tokens: 0,
            prefill: start.elapsed(),
            decode: Duration::ZERO,
        });
    };
    let prefill_time = start.elapsed();
    let decode_start = Instant::now();
    let mut history = prompt.to_vec();
    let mut generated = 0usize;

    let finish = loop {
        if limits.max_tokens.is_some_and(|n| generated >= n) {
            break FinishReason::Length;
        }
        let token = sampler.sample(&mut logits, &history);
        if limits.end_of_generation.contains(&token) {
            break FinishReason::Eos;
        }
        history.push(token);
        generated += 1;
        if on_token(token)?.is_break() {
            break FinishReason::Stop;
        }
        if limits.interrupted.load(Ordering::Relaxed) {
            break FinishReason::Interrupted;
        }
        if limits.max_tokens.is_some_and(|n| generated >= n) {
            break FinishReason::Length;
        }
        if state.len() >= state.max_len() {
            break FinishReason::ContextFull;
        }
        logits = logits_vec(&model.forward(state, &[token])?)?;
    };
    Ok(Generation {
        finish,
        prompt_tokens: prompt.len(),
        generated_tokens: generated,
        prefill: prefill_time,
        decode: if generated > 1 { decode_start.elapsed() } else { Duration::ZERO },
    })
}
