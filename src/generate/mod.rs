//! The generation loop: prefill the prompt, then sample one token at a time until an
//! end-of-generation token, the token limit, a full context, the caller, or an interrupt says
//! stop. Token ids go to a callback; this module never sees stdout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

use crate::constrain::mask::Mask;
use crate::event::FinishReason;
use crate::model::{Model, Segment, State, logits_vec};
use crate::sample::Sampler;
use crate::speculate::{Counts, Propose};

mod logprobs;
mod prefill;
mod speculation;
pub use logprobs::ChosenLogprob;
use prefill::prefill_unless_interrupted;
pub use prefill::{
    AfterBatch, PREFILL_CHUNK, cache_reserve, prefill, prefill_batches, prefill_then, resume_limit,
};
use speculation::Speculation;

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
    /// Under a constraint, whether the answer matches it whole.
    pub complete: Option<bool>,
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

/// What [`Sequence::choose`] made of a step's logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The next token: now in the history, fed at the next pass.
    Token(u32),
    /// The sequence ends here (the length limit, or an end-of-generation token, which is not
    /// passed on).
    Done(FinishReason),
}

/// One sequence being generated: its KV state, sampler, limits and history, and the rules that
/// end it, written once for the one-prompt [`Generator`] and the batched `--each-line` engine,
/// so that a line ends exactly where it would alone.
///
/// A driver owns the forward passes. Each step it asks [`Sequence::stop_reason`]; if nothing
/// stops the sequence, it feeds [`Sequence::unfed`] (the prompt's rest at first, then the token
/// chosen last) into the state, alone ([`Sequence::feed`]) or in a batch with other sequences
/// ([`Sequence::segment`]), and hands the logits to [`Sequence::choose`].
///
/// Two extensions have one place each:
/// - a logit mask (a grammar, a schema: [`Mask`]) applies to the logits at the top of `choose`,
///   before the sampler sees them, and takes the chosen token; the tokens it then forces join
///   the history at once ([`Sequence::forced`]), so the next pass feeds them all together;
/// - speculative decoding appends k proposed tokens to the history (so that `unfed` carries
///   them), feeds them in one pass keeping every row's logits, finds the j proposals the target
///   accepts, [`Sequence::rewind`]s to the history before the first rejected one (the state
///   keeps the keys and values of the accepted ones), and `choose`s the next token from the
///   logits of the row after the last accepted one.
pub struct Sequence {
    state: State,
    sampler: Sampler,
    limits: Limits,
    /// The prompt and every token chosen so far (the repeat penalty looks back over it). The
    /// state holds the keys and values of a prefix of it; the rest is [`Sequence::unfed`].
    history: Vec<u32>,
    prompt_len: usize,
    generated: usize,
    /// The constraint on the answer, if any.
    mask: Option<Mask>,
    /// How many tokens the mask forced after the last chosen one (the end of the history).
    forced: usize,
    /// `--logprobs`: how many alternatives to report, and the log-probabilities of the tokens
    /// chosen (not forced) and not yet taken, oldest first.
    logprobs: Option<usize>,
    chosen_logprobs: std::collections::VecDeque<ChosenLogprob>,
    /// With `--logprobs` and a constraint, the model's logits where its answer starts (the
    /// first token of every `--choice` is scored on them).
    answer_logits: Option<Vec<f32>>,
}

impl Sequence {
    /// A sequence for `prompt` on `state`, which holds nothing or the keys and values of a
    /// prefix of `prompt` (a shared or cached prefix): the rest of the prompt is fed first.
    /// Fails at once if the prompt cannot fit.
    pub fn new(state: State, sampler: Sampler, prompt: Vec<u32>, limits: Limits) -> Result<Self> {
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
            state,
            sampler,
            limits,
            prompt_len: prompt.len(),
            history: prompt,
            generated: 0,
            mask: None,
            forced: 0,
            logprobs: None,
            chosen_logprobs: Default::default(),
            answer_logits: None,
        })
    }

    /// Constrains the answer with `mask`.
    pub fn with_mask(mut self, mask: Option<Mask>) -> Self {
        self.mask = mask;
        self
    }

    /// Under a constraint, whether the answer so far matches it whole.
    pub fn complete(&mut self) -> Option<bool> {
        self.mask.as_mut().map(Mask::complete)
    }

    /// Why the constraint's engine failed, if it did (the sequence then ended).
    pub fn constraint_error(&self) -> Option<&str> {
        self.mask.as_ref().and_then(Mask::error)
    }

    /// The tokens the constraint forced after the token [`Sequence::choose`] chose last: they
    /// follow it in the history, unfed.
    pub fn forced(&self) -> &[u32] {
        &self.history[self.history.len() - self.forced..]
    }

    /// The prompt's length in tokens.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// How many tokens have been chosen (end-of-generation tokens are not counted).
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// The sequence's state: the prompt's keys and values, then the answer's.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Whether part of the prompt is still to be fed.
    pub fn in_prompt(&self) -> bool {
        self.state.len() < self.prompt_len
    }

    /// The tokens the next pass feeds: what the state does not hold yet.
    pub fn unfed(&self) -> &[u32] {
        &self.history[self.state.len()..]
    }

    /// Sizes the cache for the prompt and the first tokens of the answer at once (all of it
    /// when -n is small); beyond that it grows as the answer does, so a six-token answer with a
    /// large or absent -n never holds a whole context's worth of cache.
    pub fn reserve(&mut self, model: &Model) -> Result<()> {
        model.reserve(&mut self.state, cache_reserve(self.prompt_len, self.limits.max_tokens))
    }

    /// Feeds [`Sequence::unfed`] alone (in [`prefill_batches`]) and returns the logits
    /// after it; `None` when interrupted before a batch.
    pub fn feed(&mut self, model: &Model) -> Result<Option<Vec<f32>>> {
        self.feed_then(model, &mut |_, _| {})
    }

    /// [`Sequence::feed`], calling `after` with the tokens fed so far and the state after
    /// each batch.
    pub fn feed_then(&mut self, model: &Model, after: &mut AfterBatch<'_>) -> Result<Option<Vec<f32>>> {
        let from = self.state.len();
        let history = &self.history;
        let mut after = |state: &State| after(&history[..state.len()], state);
        prefill_unless_interrupted(
            model,
            &mut self.state,
            &history[from..],
            &self.limits.interrupted,
            &mut after,
        )
    }

    /// This sequence's part of a batched pass ([`Model::forward_batch`]): its state and
    /// [`Sequence::unfed`].
    pub fn segment(&mut self) -> Segment<'_> {
        let from = self.state.len();
        Segment { state: &mut self.state, tokens: &self.history[from..] }
    }

    /// Why the sequence must end before the next pass, if it must: an interrupt, a
    /// constraint's answer that is finished (nothing more can follow: an end of generation),
    /// the length limit, or a full context, checked in that order.
    pub fn stop_reason(&self) -> Option<FinishReason> {
        if self.limits.interrupted.load(Ordering::Relaxed) {
            Some(FinishReason::Interrupted)
        } else if self.mask.as_ref().is_some_and(Mask::finished) {
            Some(FinishReason::Eos)
        } else if self.length_reached() {
            Some(FinishReason::Length)
        } else if self.state.len() >= self.state.max_len() {
            Some(FinishReason::ContextFull)
        } else {
            None
        }
    }

    fn length_reached(&self) -> bool {
        self.limits.max_tokens.is_some_and(|n| self.generated >= n)
    }

    /// Chooses the next token from the logits of the last pass: the length limit (`-n 0` ends
    /// before the first token), then the constraint's mask, the sampler and the
    /// end-of-generation check; then the tokens the constraint forces, within the limits.
    /// A constraint whose engine fails ends the sequence ([`Sequence::constraint_error`]).
    pub fn choose(&mut self, logits: &mut [f32]) -> Choice {
        self.choose_checking(logits, None)
    }

    /// [`Sequence::choose`] where `proposal` was proposed for this token: the sampler checks it
    /// ([`Sampler::sample_checking`]), so the choice has the distribution `choose` gives it.
    fn choose_checking(&mut self, logits: &mut [f32], proposal: Option<u32>) -> Choice {
        self.forced = 0;
        if self.length_reached() {
            return Choice::Done(FinishReason::Length);
        }
        if self.mask.as_ref().is_some_and(Mask::finished) {
            return Choice::Done(FinishReason::Eos);
        }
        // The model's own distribution, before the constraint's and the sampler's changes, when
        // it is reported (as vLLM reports it by default).
        let raw = self.logprobs.map(|n| (crate::sample::Logprobs::new(logits, n), logits.to_vec()));
        if let (Some((_, raw)), Some(mask)) = (&raw, &self.mask)
            && mask.answer_tokens() == Some(0)
        {
            self.answer_logits = Some(raw.clone());
        }
        if let Some(mask) = &mut self.mask
            && mask.apply(logits).is_err()
        {
            return Choice::Done(FinishReason::Eos);
        }
        let token = self.sampler.sample_checking(logits, &self.history, proposal);
        if self.limits.end_of_generation.contains(&token) {
            return Choice::Done(FinishReason::Eos);
        }
        if let Some(mask) = &mut self.mask
            && mask.accept(token).is_err()
        {
            return Choice::Done(FinishReason::Eos);
        }
        self.history.push(token);
        if let Some((lp, raw)) = raw {
            self.chosen_logprobs.push_back(ChosenLogprob {
                index: self.generated,
                token,
                logprob: lp.of(&raw, token),
                top: lp.top().iter().map(|&t| (t, lp.of(&raw, t))).collect(),
            });
        }
        self.generated += 1;
        if let Some(mask) = &mut self.mask {
            // Forced tokens stay within -n and the context (the history is at most the
            // context: the pass that feeds it must fit).
            let by_length = self.limits.max_tokens.map_or(usize::MAX, |n| n.saturating_sub(self.generated));
            let room = by_length.min(self.state.max_len().saturating_sub(self.history.len()));
            let forced = mask.forced(room).unwrap_or_default();
            self.forced = forced.len();
            self.generated += forced.len();
            self.history.extend(forced);
        }
        Choice::Token(token)
    }

    /// A speculative step: feeds the unfed tokens (the last choice, and any tokens a constraint
    /// forced after it) and `proposals` after them in one pass, keeping the logits of the last
    /// unfed row and every proposal's, and chooses from each of those rows in turn, as
    /// [`Sequence::choose`] would after feeding that row alone, while the choice agrees with the
    /// proposal that follows.
    /// Returns the choices (the accepted proposals, then the model's own next token, or the end)
    /// and how many proposals were accepted; `None` when interrupted. The keys and values of
    /// rejected proposals are rolled back. Every row is computed exactly as a decoded token is
    /// (the pass stays below the batched kernels' row minimum), so with a greedy sampler the
    /// choices are those of plain decoding, and with sampling each choice has the distribution
    /// plain decoding gives it (the sampler checks the proposal: [`Sampler::sample_checking`]).
    ///
    /// Under a constraint, each row's choice is masked as plain decoding masks it. Tokens the
    /// constraint forces after a choice are taken as proposals that must follow: where the
    /// proposals go on with all of them, their rows are kept and the choosing goes on after
    /// them (they are among the choices). Where not, the pass ends at that choice: the rows of
    /// the forced tokens the proposals agreed with are kept (if the choice was proposed), and
    /// the rest of them are fed by the next pass ([`Sequence::forced`] hands them all out).
    pub fn speculate(&mut self, model: &Model, proposals: &[u32]) -> Result<Option<(Vec<Choice>, usize)>> {
        if self.limits.interrupted.load(Ordering::Relaxed) {
            return Ok(None);
        }
        // The unfed tokens: the last choice, and the tokens a constraint forced after it
        // when an earlier pass did not feed them. Their rows but the last need no logits.
        let from = self.state.len();
        let n = self.history.len() - from;
        if n == 0 || from < self.prompt_len || n + proposals.len() > crate::weights::decode_rows_max() {
            bail!("internal error: a speculative pass needs an unfed choice and a few proposals");
        }
        let mut fed = self.history[from..].to_vec();
        fed.extend_from_slice(proposals);
        let logits = model.forward_last(&mut self.state, &fed, proposals.len() + 1)?;
        let logits = logits_vec(&logits.flatten_all()?)?;
        let vocab = logits.len() / (proposals.len() + 1);
        let mut choices = Vec::with_capacity(fed.len());
        let mut accepted = 0;
        // How many tokens at the end of the history the next pass feeds: the last choice and
        // the tokens forced after it, unless the pass fed some of them.
        let mut unfed = 1;
        // Row i's logits come after proposal i - 1 (row 0's after the unfed token).
        let mut i = 0;
        while i <= proposals.len() {
            let mut row = logits[i * vocab..][..vocab].to_vec();
            let choice = self.choose_checking(&mut row, proposals.get(i).copied());
            choices.push(choice);
            unfed = 1 + self.forced;
            match (choice, proposals.get(i)) {
                (Choice::Token(t), Some(&p)) if t == p => accepted += 1,
                _ => break,
            }
            if self.forced > 0 {
                // The chosen token was proposed, so the pass fed it; so too the proposals
                // after it that agree with the forced tokens, whose rows stand.
                let forced = &self.history[self.history.len() - self.forced..];
                let agree = forced.iter().zip(&proposals[i + 1..]).take_while(|(f, p)| f == p).count();
                accepted += agree;
                if agree < forced.len() {
                    unfed = forced.len() - agree;
                    break;
                }
                // All of them: choosing goes on after the last (they are among the choices).
                choices.extend(forced.iter().map(|&t| Choice::Token(t)));
                i += forced.len();
                self.forced = 0;
            }
            i += 1;
        }
        self.state.truncate(self.history.len() - unfed)?;
        Ok(Some((choices, accepted)))
    }

    /// Forgets the chosen tokens after the first `len` of the history and the keys and values
    /// past them (rejected proposals), so the next pass feeds from there. Never cuts into the
    /// prompt.
    pub fn rewind(&mut self, len: usize) -> Result<()> {
        let len = len.clamp(self.prompt_len, self.history.len());
        self.state.truncate(len)?;
        if let Some(mask) = &mut self.mask {
            mask.rewind(self.history.len() - len);
        }
        self.forced = 0;
        self.generated -= self.history.len() - len;
        let generated = self.generated;
        self.chosen_logprobs.retain(|c| c.index < generated);
        self.history.truncate(len);
        Ok(())
    }
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
    seq: Sequence,
    /// Speculative decoding, when on.
    speculation: Option<Speculation<'m>>,
    /// Choices a speculative pass made that are not handed out yet.
    pending: std::collections::VecDeque<Choice>,
    /// The next token's logits; `None` before prefill.
    logits: Option<Vec<f32>>,
    start: Instant,
    prefill: Duration,
    /// When the first token was chosen (decode speed counts the tokens after it).
    decode_start: Option<Instant>,
    /// Tokens a constraint forced after the last chosen one, not yet handed out.
    forced: std::collections::VecDeque<u32>,
    /// Called after each prefill batch ([`Generator::after_each_batch`]).
    after_batch: Option<Box<AfterBatch<'m>>>,
    done: bool,
}

impl<'m> Generator<'m> {
    /// A generator for `prompt` on `state` (see [`Sequence::new`]).
    pub fn new(
        model: &'m Model,
        state: State,
        sampler: Sampler,
        prompt: Vec<u32>,
        limits: Limits,
    ) -> Result<Self> {
        Ok(Self {
            model,
            seq: Sequence::new(state, sampler, prompt, limits)?,
            speculation: None,
            pending: std::collections::VecDeque::new(),
            logits: None,
            start: Instant::now(),
            prefill: Duration::ZERO,
            decode_start: None,
            forced: Default::default(),
            after_batch: None,
            done: false,
        })
    }

    /// Calls `after` after each batch of the prompt's prefill (see [`AfterBatch`]).
    pub fn after_each_batch(mut self, after: Box<AfterBatch<'m>>) -> Self {
        self.after_batch = Some(after);
        self
    }

    /// Constrains the answer with `mask` (see [`Sequence::with_mask`]). Speculation goes on
    /// under it: proposals are cut where the mask refuses one, and forced tokens join a pass's
    /// choices where the proposals agree with them ([`Sequence::speculate`]).
    pub fn with_mask(mut self, mask: Option<Mask>) -> Self {
        self.seq = self.seq.with_mask(mask);
        self
    }

    /// Speculates with `proposer`, up to `max` proposals a pass (at most what a pass computes
    /// exactly: the row kernels' limit less the token fed anyway). With a greedy sampler the
    /// output is the same; with sampling it has the same distribution but not the same draws
    /// for a seed, so there it speculates only when `sampled` says so (the user asked).
    pub fn with_speculation(mut self, proposer: Box<dyn Propose + 'm>, max: usize, sampled: bool) -> Self {
        let max = max.min(crate::weights::decode_rows_max() - 1);
        let allowed = self.seq.sampler.is_greedy() || sampled;
        if allowed && max > 0 {
            self.speculation = Some(Speculation::new(proposer, max));
        }
        self
    }

    /// Reports each chosen token's log-probability and its `n` most likely alternatives
    /// ([`Generator::take_logprob`]).
    pub fn with_logprobs(mut self, n: Option<usize>) -> Self {
        self.seq = self.seq.with_logprobs(n);
        self
    }

    /// [`Sequence::take_logprob`].
    pub fn take_logprob(&mut self, index: usize) -> Option<ChosenLogprob> {
        self.seq.take_logprob(index)
    }

    /// [`Sequence::answer_logprobs`].
    pub fn answer_logprobs(&self, answers: &[Vec<u32>]) -> Result<Option<Vec<f64>>> {
        self.seq.answer_logprobs(self.model, answers)
    }

    /// Tokens proposed and accepted so far.
    pub fn speculation_counts(&self) -> Option<Counts> {
        self.speculation.as_ref().map(|s| s.counts)
    }

    /// The prompt's length in tokens.
    pub fn prompt_tokens(&self) -> usize {
        self.seq.prompt_len()
    }

    /// The sequence's state: the prompt's keys and values, then the answer's.
    pub fn state(&self) -> &State {
        self.seq.state()
    }

    /// The next choice after the token handed out last: proposals checked in one pass when
    /// there are any (their choices queue up), else one pass for one token. `None` when
    /// interrupted.
    fn next_choice(&mut self) -> Result<Option<Choice>> {
        // The unfed tokens: the last choice, and the tokens a constraint forced after it that
        // no pass has fed; proposals ride in the same pass, within the decode kernels' rows.
        let unfed = self.seq.unfed().len();
        if let Some(spec) = &mut self.speculation
            && unfed < crate::weights::decode_rows_max()
        {
            let seq = &mut self.seq;
            // Room for the proposals: the length limit (the last token comes from the model),
            // the context and the pass's rows.
            let left = seq.limits.max_tokens.map_or(usize::MAX, |n| n.saturating_sub(seq.generated()));
            let room = seq.state.max_len().saturating_sub(seq.history.len() + 1);
            let rows = crate::weights::decode_rows_max() - unfed;
            let max = spec.max.min(left.saturating_sub(1)).min(room).min(rows);
            // A draft model's time to propose counts (not its catching up with the prompt,
            // paid once).
            spec.proposer.catch_up(&seq.history)?;
            let t = Instant::now();
            let mask = &mut seq.mask;
            let allowed = |p: &[u32]| mask.as_mut().map_or(p.len(), |m| m.allowed_prefix(p));
            let proposals = spec.propose(&seq.history, max, allowed)?;
            if !proposals.is_empty() {
                let Some((choices, accepted)) = self.seq.speculate(self.model, &proposals)? else {
                    return Ok(None);
                };
                if unfed == 1 {
                    spec.costs.record(proposals.len() + 1, t.elapsed().as_secs_f64());
                }
                spec.costs.record_acceptance(spec.proposer.kind(), proposals.len(), accepted);
                spec.proposer.feedback(proposals.len(), accepted);
                spec.counts.proposed += proposals.len();
                spec.counts.accepted += accepted;
                self.pending.extend(choices);
                return Ok(self.pending.pop_front());
            }
        }
        let t = Instant::now();
        let rows = self.seq.unfed().len();
        let Some(logits) = self.seq.feed(self.model)? else {
            return Ok(None);
        };
        if let Some(spec) = &mut self.speculation
            && rows == 1
        {
            spec.costs.record(1, t.elapsed().as_secs_f64());
        }
        let logits = self.logits.insert(logits);
        Ok(Some(self.seq.choose(logits)))
    }

    fn finish(&mut self, finish: FinishReason) -> Step {
        self.done = true;
        let generated = self.seq.generated();
        let decode = match self.decode_start {
            Some(t) if generated > 1 => t.elapsed(),
            _ => Duration::ZERO,
        };
        Step::Done(Generation {
            finish,
            prompt_tokens: self.seq.prompt_len(),
            generated_tokens: generated,
            prefill: if self.logits.is_some() { self.prefill } else { self.start.elapsed() },
            decode,
            complete: self.seq.complete(),
        })
    }

    fn step(&mut self) -> Result<Step> {
        if self.logits.is_none() {
            self.seq.reserve(self.model)?;
            let fed = match &mut self.after_batch {
                Some(after) => self.seq.feed_then(self.model, after)?,
                None => self.seq.feed(self.model)?,
            };
            let Some(logits) = fed else {
                return Ok(self.finish(FinishReason::Interrupted));
            };
            self.logits = Some(logits);
            self.prefill = self.start.elapsed();
            return Ok(Step::Prefilled);
        }
        if let Some(token) = self.forced.pop_front() {
            return Ok(Step::Token(token));
        }
        let choice = if self.seq.generated() > 0 || !self.pending.is_empty() {
            // The previous token was handed out; check the limits before the next (a choice a
            // speculative pass made is already computed, but an interrupt still stops here).
            if self.seq.limits.interrupted.load(Ordering::Relaxed) {
                return Ok(self.finish(FinishReason::Interrupted));
            }
            match self.pending.pop_front() {
                Some(choice) => choice,
                None => {
                    if let Some(reason) = self.seq.stop_reason() {
                        return Ok(self.finish(reason));
                    }
                    match self.next_choice()? {
                        Some(choice) => choice,
                        None => return Ok(self.finish(FinishReason::Interrupted)),
                    }
                }
            }
        } else {
            let logits = self.logits.as_mut().ok_or_else(|| anyhow!("internal error: no logits"))?;
            self.seq.choose(logits)
        };
        match choice {
            Choice::Token(token) => {
                self.decode_start.get_or_insert_with(Instant::now);
                // The tokens forced after the last choice (a speculative pass's choices carry
                // the ones its proposals went on with).
                if self.pending.is_empty() {
                    self.forced.extend(self.seq.forced());
                }
                Ok(Step::Token(token))
            }
            Choice::Done(reason) => match self.seq.constraint_error() {
                Some(e) => Err(anyhow!("{e}")),
                None => Ok(self.finish(reason)),
            },
        }
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

#[cfg(test)]
mod tests;
