//! The generation loop: prefill the prompt, then sample one token at a time until an
//! end-of-generation token, the token limit, a full context, the caller, or an interrupt says
//! stop. Token ids go to a callback; this module never sees stdout.

use std::ops::ControlFlow;
use std::sync::Arc;
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

/// The KV cache positions to reserve for a prompt of `prompt_len` tokens: the prompt and the
/// first 1,024 tokens of the answer (all of it when `-n` is smaller). Beyond that the
/// cache grows as the answer does.
pub fn cache_reserve(prompt_len: usize, max_tokens: Option<usize>) -> usize {
    prompt_len + max_tokens.unwrap_or(RESERVE_AHEAD).min(RESERVE_AHEAD)
}

/// Limits and signals for one generation.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Stop after this many tokens.
    pub max_tokens: Option<usize>,
    /// Token ids that end generation (never passed on).
    pub end_of_generation: Vec<u32>,
    /// Set by Ctrl-C (or whoever cancels); checked before each prefill batch and after every
    /// token.
    pub interrupted: Arc<AtomicBool>,
}

/// Feeds `prompt` in batches of up to [`PREFILL_CHUNK`] tokens and returns the logits after
/// the last one.
pub fn prefill(model: &Model, state: &mut State, prompt: &[u32]) -> Result<Vec<f32>> {
    let never = AtomicBool::new(false);
    prefill_unless_interrupted(model, state, prompt, &never)?.ok_or_else(|| anyhow!("interrupted"))
}

/// Like [`prefill`], but checks `interrupted` before each batch (a long prompt takes seconds)
/// and returns `None` if it was set.
pub fn prefill_unless_interrupted(
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

/// One step of a [`Generator`].
#[derive(Debug, Clone)]
pub enum Step {
    /// The prompt has been processed (the first step, unless interrupted during it).
    Prefilled,
    /// A new token, chosen the moment its logits were ready.
    Token(u32),
    /// The end, with why and the timings (the last step).
    Done(Generation),
}

/// Generation as an iterator of [`Step`]s: prefill on the first call, then one token per
/// call, then [`Step::Done`]. A caller that stops pulling simply stops the generation, which
/// is how stop strings and closed pipes end it.
pub struct Generator<'m> {
    model: &'m Model,
    state: State,
    sampler: Sampler,
    limits: Limits,
    /// The prompt and every token chosen so far (the repeat penalty looks back over it).
    history: Vec<u32>,
    prompt_tokens: usize,
    /// The next token's logits; `None` before prefill.
    logits: Option<Vec<f32>>,
    generated: usize,
    start: Instant,
    prefill: Duration,
    /// When the first token was chosen (decode speed counts the tokens after it).
    decode_start: Option<Instant>,
    done: bool,
}

impl<'m> Generator<'m> {
    /// A generator for `prompt` on `state`, which holds nothing or the keys and values of a
    /// prefix of `prompt` (a shared or cached prefix): the rest of the prompt is fed. Fails at
    /// once if the prompt cannot fit.
    pub fn new(
        model: &'m Model,
        state: State,
        sampler: Sampler,
        prompt: Vec<u32>,
        limits: Limits,
    ) -> Result<Self> {
        if state.len() >= prompt.len() {
            bail!("internal error: the state already holds the whole prompt");
        }
        if prompt.len() >= state.max_len() {
            bail!(
                "the prompt is {} tokens and the context holds {}: shorten the prompt or raise --ctx-size",
                prompt.len(),
                state.max_len()
            );
        }
        Ok(Self {
            model,
            state,
            sampler,
            limits,
            prompt_tokens: prompt.len(),
            history: prompt,
            logits: None,
            generated: 0,
            start: Instant::now(),
            prefill: Duration::ZERO,
            decode_start: None,
            done: false,
        })
    }

    /// The prompt's length in tokens.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// The sequence's state: the prompt's keys and values, then the answer's.
    pub fn state(&self) -> &State {
        &self.state
    }

    fn finish(&mut self, finish: FinishReason) -> Step {
        self.done = true;
        let decode = match self.decode_start {
            Some(t) if self.generated > 1 => t.elapsed(),
            _ => Duration::ZERO,
        };
        Step::Done(Generation {
            finish,
            prompt_tokens: self.prompt_tokens,
            generated_tokens: self.generated,
            prefill: if self.logits.is_some() { self.prefill } else { self.start.elapsed() },
            decode,
        })
    }

    fn step(&mut self) -> Result<Step> {
        let Some(logits) = self.logits.as_mut() else {
            // The cache for the prompt and the first tokens of the answer at once (all of it
            // when -n is small); beyond that it grows as the answer does, so a six-token answer
            // with a large or absent -n never holds a whole context's worth of cache.
            let needed = cache_reserve(self.history.len(), self.limits.max_tokens);
            self.model.reserve(&mut self.state, needed)?;
            let start = self.state.len();
            let prefilled = prefill_unless_interrupted(
                self.model,
                &mut self.state,
                &self.history[start..],
                &self.limits.interrupted,
            )?;
            let Some(logits) = prefilled else {
                return Ok(self.finish(FinishReason::Interrupted));
            };
            self.logits = Some(logits);
            self.prefill = self.start.elapsed();
            return Ok(Step::Prefilled);
        };
        if self.generated > 0 {
            // The previous token was handed out; check the limits before computing the next.
            if self.limits.interrupted.load(Ordering::Relaxed) {
                return Ok(self.finish(FinishReason::Interrupted));
            }
            if self.limits.max_tokens.is_some_and(|n| self.generated >= n) {
                return Ok(self.finish(FinishReason::Length));
            }
            if self.state.len() >= self.state.max_len() {
                return Ok(self.finish(FinishReason::ContextFull));
            }
            let last = self.history[self.history.len() - 1];
            *logits = logits_vec(&self.model.forward(&mut self.state, &[last])?)?;
        } else if self.limits.max_tokens == Some(0) {
            return Ok(self.finish(FinishReason::Length));
        }
        let token = self.sampler.sample(logits, &self.history);
        if self.limits.end_of_generation.contains(&token) {
            return Ok(self.finish(FinishReason::Eos));
        }
        self.history.push(token);
        self.generated += 1;
        self.decode_start.get_or_insert_with(Instant::now);
        Ok(Step::Token(token))
    }
}

impl Iterator for Generator<'_> {
    type Item = Result<Step>;

    fn next(&mut self) -> Option<Result<Step>> {
        if self.done {
            return None;
        }
        let step = self.step();
        if step.is_err() {
            self.done = true;
        }
        Some(step)
    }
}

/// Generates after `prompt`, calling `on_token` with each new token id as soon as it is chosen.
/// The callback returns `Break` to stop (its reason is reported as [`FinishReason::Stop`]).
pub fn generate(
    model: &Model,
    state: State,
    sampler: Sampler,
    prompt: &[u32],
    limits: Limits,
    mut on_token: impl FnMut(u32) -> Result<ControlFlow<()>>,
) -> Result<Generation> {
    let start = Instant::now();
    let mut prefill = Duration::ZERO;
    let mut generated = 0;
    let mut first_token: Option<Instant> = None;
    for step in Generator::new(model, state, sampler, prompt.to_vec(), limits)? {
        match step? {
            Step::Prefilled => prefill = start.elapsed(),
            Step::Token(token) => {
                generated += 1;
                first_token.get_or_insert_with(Instant::now);
                if on_token(token)?.is_break() {
                    return Ok(Generation {
                        finish: FinishReason::Stop,
                        prompt_tokens: prompt.len(),
                        generated_tokens: generated,
                        prefill,
                        decode: first_token.filter(|_| generated > 1).map_or(Duration::ZERO, |t| t.elapsed()),
                    });
                }
            }
            Step::Done(generation) => return Ok(generation),
        }
    }
    bail!("generation ended without a result")
}
