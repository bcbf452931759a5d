//! `--each-line` on the local engine: up to `--parallel` lines decoded together, one forward
//! pass per step over all of them, each line a [`Sequence`] of its own, with the prefix the
//! lines share computed once.

use std::collections::VecDeque;
use std::sync::mpsc::Sender;
use std::time::Instant;

use anyhow::{Result, bail};

use super::{Loaded, Local, TokenEvents};
use crate::backend::{Answers, Event, Finish, Lines, Request, Stamped};
use crate::event::FinishReason;
use crate::generate::{Choice, Limits, Sequence, cache_reserve, prefill_then};
use crate::kernels;
use crate::model::{Model, Segment, State, logits_vec};
use crate::prompt_cache::common_prefix;
use crate::sample::Sampler;
use crate::tokenizer::Tokenizer;
use crate::weights;

/// How many lines `--each-line` decodes at once by default on the local engine: one decode
/// step of several sequences reads the weights once, where as many steps read them as many
/// times. On AVX-512 VNNI CPUs, the many-row kernel's width ([`kernels::decode_lanes`], 15):
/// a step of 15 sequences costs little more than one of 8 (Gemma 3 270M, 2 threads,
/// `benches/batch_decode` at 5c6c832: 303 to 312 tok/s at 8, 373 to 412 at 15, 246 to 266 at
/// 16, which takes two passes); elsewhere 8.
pub fn default_parallel() -> usize {
    kernels::decode_lanes().unwrap_or(8)
}

/// A new line's prompt (after the shared prefix) of at most this many tokens rides along with
/// the next decode step instead of taking a pass of its own.
const RIDE_ALONG_MAX: usize = 16;

/// A shared prompt prefix shorter than this is fed with each line instead of being copied.
const MIN_SHARED_PREFIX: usize = 8;

/// One line being answered in a batch: its [`Sequence`] (which holds the stop rules, so a
/// line ends where it would alone) and where its events go.
struct Seq {
    seq: Sequence,
    tx: Sender<Stamped>,
    events: TokenEvents,
    /// Whether the line has ended (or nobody wants the rest).
    done: bool,
    /// [`Local::choice_answers`].
    choices: Option<Vec<(String, Vec<u32>)>>,
}

impl Seq {
    /// Sends an event; `false` when the writer no longer wants this line.
    fn send(&self, event: Result<Event>) -> bool {
        self.tx.send((Instant::now(), event)).is_ok()
    }

    /// Sends the events of a token or of the end; `false` when the writer no longer wants
    /// this line.
    fn send_all(&self, events: VecDeque<Event>) -> bool {
        events.into_iter().all(|event| self.send(Ok(event)))
    }

    fn finish(&mut self, reason: FinishReason, model: &Model) {
        self.done = true;
        let mut tail = VecDeque::new();
        self.events.finish(&mut tail);
        if let Some(choices) = &self.choices
            && reason != FinishReason::Interrupted
            && let Some(scores) =
                super::choice_scores(choices, self.seq.answer_logprobs(model, &super::tokens_of(choices)))
        {
            tail.push_back(scores);
        }
        self.send_all(tail);
        let complete = self.seq.complete();
        self.send(Ok(Event::Finish(Finish {
            reason,
            prompt_tokens: Some(self.seq.prompt_len()),
            generated_tokens: Some(self.seq.generated()),
            complete,
        })));
    }

    /// Chooses the next token from `logits` and sends it, or ends the line. The limits are
    /// checked at once after the token, so the line's end is sent with its last token.
    fn advance(&mut self, logits: &mut [f32], model: &Model, tokenizer: &Tokenizer) {
        let first = self.seq.generated();
        let token = match self.seq.choose(logits) {
            Choice::Token(token) => token,
            Choice::Done(reason) => match self.seq.constraint_error() {
                Some(e) => {
                    self.done = true;
                    self.send(Err(anyhow::anyhow!("{e}")));
                    return;
                }
                None => return self.finish(reason, model),
            },
        };
        let mut events = VecDeque::new();
        let forced = self.seq.forced().to_vec();
        for (index, token) in (first..).zip(std::iter::once(token).chain(forced)) {
            if let Some(c) = self.seq.take_logprob(index) {
                events.push_back(Event::Logprob(super::token_logprob(tokenizer, &c)));
            }
            self.events.token(tokenizer, token, &mut events);
        }
        if !self.send_all(events) {
            self.done = true;
        } else if let Some(reason) = self.seq.stop_reason() {
            self.finish(reason, model);
        }
    }
}

/// The prompt prefix the lines share: its tokens and a state that holds their keys and values.
struct Shared {
    tokens: Vec<u32>,
    state: State,
}

impl Local {
    /// `--each-line` on the local engine: up to `parallel` lines are decoded together, one
    /// forward pass per step over all of them, each with its own state, sampler and limits.
    /// The prefix the lines share (template opening, system prompt, instruction) is computed
    /// once and copied; the rest of a new line's prompt rides along with the next step when it
    /// is short, else it is processed alone when the line starts.
    ///
    /// Below [`weights::decode_rows_max`] + 1 rows (32 with AVX-512 VNNI, else 16) the matmul
    /// kernels compute every row exactly as for a single row, and a step never takes more, so
    /// each line's answer is bit for bit the same whatever `parallel` is, and the same seed
    /// gives the same output. (`parallel` is capped at that many lines.)
    pub(super) fn answer_batched(&self, lines: &Lines, answers: &Answers, parallel: usize) -> Result<()> {
        // Each active line takes at least one row of a step, and a step stays within the rows
        // the decode kernels compute exactly as alone (see `step`).
        let parallel = parallel.clamp(1, weights::decode_rows_max());
        let mut active: Vec<Seq> = Vec::new();
        let mut input_open = true;
        let mut first_prompt: Option<Vec<u32>> = None;
        let mut shared: Option<Shared> = None;
        loop {
            // Take new lines while there is room: waiting for one only when idle, so that
            // `tail -f | streamgen --each-line` answers each line as it comes.
            while input_open && active.len() < parallel {
                let next = if active.is_empty() {
                    lines.next(answers).ok_or(false)
                } else {
                    lines.try_next(answers)
                };
                let (request, tx) = match next {
                    Ok(next) => next,
                    Err(more) => {
                        input_open = more;
                        break;
                    }
                };
                // An empty line: its dropped channel is answered with an empty line.
                let Some(request) = request else { continue };
                match self.start_line(request, tx.clone(), &mut first_prompt, &mut shared) {
                    Ok(Some(seq)) => active.push(seq),
                    Ok(None) => {}
                    Err(e) => {
                        let _ = tx.send((Instant::now(), Err(e)));
                    }
                }
            }
            if active.is_empty() {
                if input_open {
                    continue;
                }
                return Ok(());
            }
            if let Err(e) = self.step(&mut active) {
                // Every line in the batch fails with it; the one being written reports it.
                for seq in &active {
                    seq.send(Err(anyhow::anyhow!("{e:#}")));
                }
                return Err(e);
            }
            active.retain(|s| !s.done);
        }
    }

    /// Starts a line: its prompt is processed (after the shared prefix, copied in when there
    /// is one) and its first token chosen. `None` when the line ended at once.
    fn start_line(
        &self,
        request: Request,
        tx: Sender<Stamped>,
        first_prompt: &mut Option<Vec<u32>>,
        shared: &mut Option<Shared>,
    ) -> Result<Option<Seq>> {
        let Loaded { model, tokenizer, .. } = &self.loaded;
        let (text, tokens) = self.prompt(&request)?;
        let ctx = self.context_size();
        if tokens.is_empty() || tokens.len() >= ctx {
            bail!(
                "the prompt is {} tokens and the context holds {ctx}: shorten the prompt or raise --ctx-size",
                tokens.len()
            );
        }
        let reserve = cache_reserve(tokens.len(), request.max_tokens);
        // The second line decides what is shared: the prefix it has in common with the first.
        // It is computed once, and every later line starts from a copy of it. (The first line
        // is computed whole, before any sharing, whatever `parallel` is.)
        if shared.is_none()
            && let Some(first) = first_prompt.as_deref()
        {
            let n = common_prefix(first, &tokens).min(tokens.len() - 1);
            if n >= MIN_SHARED_PREFIX {
                // Looked up as a prompt of its own: what is not cached is fed in one pass of
                // the batched kernels, as a whole run would compute it (see `resume_limit`).
                let mut state = self.state_for(&tokens[..n], n)?;
                let start = state.len();
                if start < n {
                    // Stored as it is fed when rings would lose its first chunks by the end.
                    let cache = self.prompt_cache.as_ref().filter(|_| model.has_rings());
                    prefill_then(model, &mut state, &tokens[..n], &mut |fed, state| {
                        if let Some(cache) = cache {
                            cache.store_during(model, fed, state);
                        }
                    })?;
                }
                if let Some(cache) = &self.prompt_cache {
                    cache.store(model, &tokens[..n], &state);
                }
                *shared = Some(Shared { tokens: tokens[..n].to_vec(), state });
            }
        }
        first_prompt.get_or_insert_with(|| tokens.clone());
        let reuse = shared
            .as_ref()
            .map(|s| (common_prefix(&s.tokens, &tokens).min(tokens.len() - 1), &s.state))
            // (A model's rings may have moved past a shorter prefix of the shared state.)
            .filter(|&(n, from)| n >= MIN_SHARED_PREFIX && from.can_truncate(n));
        let state = match reuse {
            Some((n, from)) => model.fork(from, n, ctx, reserve)?,
            None => self.state_for(&tokens, reserve)?,
        };
        let reused = state.len();
        let limits = Limits {
            max_tokens: request.max_tokens,
            end_of_generation: if request.ignore_eos {
                Vec::new()
            } else {
                tokenizer.end_of_generation_ids().to_vec()
            },
            interrupted: request.cancel.clone(),
        };
        let sampler = Sampler::new(request.sampling.clone());
        let mask = self.mask(&request, &text, true)?;
        let mut seq = Seq {
            seq: Sequence::new(state, sampler, tokens, limits)?
                .with_mask(mask)
                .with_logprobs(request.logprobs),
            tx,
            events: self.token_events(&request, &text),
            done: false,
            choices: self.choice_answers(&request),
        };
        let prompt = Event::Prompt { tokens: seq.seq.prompt_len(), reused };
        if seq.seq.unfed().len() <= RIDE_ALONG_MAX {
            // Fed with the next step (see `step`).
            return Ok(seq.send(Ok(prompt)).then_some(seq));
        }
        let Some(mut logits) = seq.seq.feed(model)? else {
            let finish = Finish {
                reason: FinishReason::Interrupted,
                prompt_tokens: None,
                generated_tokens: None,
                complete: None,
            };
            let _ = seq.tx.send((Instant::now(), Ok(Event::Finish(finish))));
            return Ok(None);
        };
        if !seq.send(Ok(prompt)) {
            return Ok(None);
        }
        seq.advance(&mut logits, model, tokenizer);
        Ok((!seq.done).then_some(seq))
    }

    /// One decode step of the active lines: each feeds what it has not fed yet (its last
    /// token, or a short prompt riding along), all in one pass of at most
    /// [`weights::decode_rows_max`] rows, the rows the decode kernels compute exactly as alone.
    /// A prompt that does not fit is processed alone first, with the same result, and its first
    /// token joins the pass if a row is left, else the next one. (Without that bound a pass
    /// could reach the batched kernels' row count, whose sums differ from the decode kernels':
    /// on a CPU without AVX-512 VNNI, 15 rows of riding prompts and one prompt processed alone
    /// made 16, and a sampled line's answer changed with `--parallel`.)
    fn step(&self, active: &mut [Seq]) -> Result<()> {
        let Loaded { model, tokenizer, .. } = &self.loaded;
        if active.iter().any(|s| s.seq.stop_reason() == Some(FinishReason::Interrupted)) {
            for seq in active.iter_mut() {
                seq.finish(FinishReason::Interrupted, model);
            }
            return Ok(());
        }
        let budget = weights::decode_rows_max();
        // Lines feeding one token first: `answer_batched` keeps at most `budget` lines active.
        // Several tokens (a prompt riding along, tokens a constraint forced) take as many rows.
        let several = |s: &Seq| s.seq.in_prompt() || s.seq.unfed().len() > 1;
        let mut rows = active.iter().filter(|s| !several(s)).count();
        let mut joins = vec![true; active.len()];
        for (seq, joins) in active.iter_mut().zip(&mut joins).filter(|(s, _)| several(s)) {
            let len = seq.seq.unfed().len();
            if rows + len <= budget {
                rows += len;
                continue;
            }
            let Some(mut logits) = seq.seq.feed(model)? else {
                seq.finish(FinishReason::Interrupted, model);
                continue;
            };
            seq.advance(&mut logits, model, tokenizer);
            // Its next tokens: the one chosen, and any a constraint forced after it.
            let next = seq.seq.unfed().len();
            if rows + next <= budget {
                rows += next;
            } else {
                *joins = false;
            }
        }
        let fed: Vec<bool> = active.iter().zip(&joins).map(|(s, &j)| j && !s.done).collect();
        let logits = {
            let mut segments: Vec<Segment<'_>> =
                active.iter_mut().zip(&fed).filter(|(_, f)| **f).map(|(s, _)| s.seq.segment()).collect();
            if segments.is_empty() {
                return Ok(());
            }
            model.forward_batch(&mut segments)?
        };
        for (row, seq) in active.iter_mut().zip(&fed).filter(|(_, f)| **f).map(|(s, _)| s).enumerate() {
            let mut row_logits = logits_vec(&logits.get(row)?)?;
            seq.advance(&mut row_logits, model, tokenizer);
        }
        Ok(())
    }
}
