//! Speculative decoding: proposals for the next few tokens, checked by the model in one pass.
//!
//! Decoding reads every weight once per pass, and a pass of up to the decode kernels' row
//! limit costs little more than a pass of one row, so checking k proposed tokens costs about
//! what one step costs. Proposals come from the text so far ([`PromptLookup`]: an answer that
//! copies its input, as edits, conversions and translations of code do, repeats spans of the
//! prompt) or from a small model of the same vocabulary ([`Draft`]). The check is exact: every
//! row of a verification pass is computed as one decoded token is (the row kernels and the
//! decode attention, see `Model::hidden_segments`), and the next token is chosen from each row
//! by the same sampler, so greedy output is byte for byte the output without speculation. With
//! sampling, the sampler checks each proposal by speculative sampling's acceptance rule
//! (`Sampler::sample_checking`), so each token keeps exactly the model's distribution.
//!
//! The prompt lookup follows "prompt lookup decoding" (Apoorv Saxena, 2023) and llama.cpp's
//! `lookup` example: the longest recent n-gram that occurred before, and what followed it.

use anyhow::{Result, bail};

use crate::model::{Model, State, logits_vec};
use crate::tokenizer::Tokenizer;

/// Counts for `--json` and `--stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Tokens proposed and checked.
    pub proposed: usize,
    /// Of those, accepted.
    pub accepted: usize,
}

/// Where proposals come from.
pub trait Propose: Send {
    /// Up to `max` tokens likely to follow `history` (the prompt and the answer so far).
    fn propose(&mut self, history: &[u32], max: usize) -> Result<Vec<u32>>;

    /// How many of the last proposals the model accepted.
    fn feedback(&mut self, proposed: usize, accepted: usize);

    /// Gets ready to propose after `history` (a draft model computes the prompt), so that
    /// what [`Propose::propose`] costs is what each proposal costs.
    fn catch_up(&mut self, _history: &[u32]) -> Result<()> {
        Ok(())
    }
}

/// Proposals copied from earlier in the text: the tokens that followed the last earlier
/// occurrence of the history's last n tokens (n from [`PromptLookup::NGRAM_MAX`] down to
/// [`PromptLookup::NGRAM_MIN`]).
///
/// It backs off where it does not pay: how many tokens it proposes follows how many were
/// accepted last time (all accepted: two more; otherwise one more than were accepted), and
/// after rejections in a row it pauses for a growing number of steps, so a free-form answer
/// pays for a check now and then, not at every step.
pub struct PromptLookup {
    /// Tokens to propose next time.
    want: usize,
    /// Steps to skip before proposing again.
    pause: usize,
    /// Proposals rejected outright in a row.
    misses: u32,
}

impl PromptLookup {
    pub const NGRAM_MAX: usize = 4;
    pub const NGRAM_MIN: usize = 2;
    /// How far back a match is looked for: the search is linear, and a long context's far
    /// past rarely predicts the next tokens better than its recent one.
    const WINDOW: usize = 16 << 10;

    pub fn new() -> Self {
        Self { want: 4, pause: 0, misses: 0 }
    }
}

impl Default for PromptLookup {
    fn default() -> Self {
        Self::new()
    }
}

impl Propose for PromptLookup {
    fn propose(&mut self, history: &[u32], max: usize) -> Result<Vec<u32>> {
        if self.pause > 0 {
            self.pause -= 1;
            return Ok(Vec::new());
        }
        let want = self.want.min(max);
        if want == 0 {
            return Ok(Vec::new());
        }
        let h = &history[history.len().saturating_sub(Self::WINDOW)..];
        for n in (Self::NGRAM_MIN..=Self::NGRAM_MAX).rev() {
            if h.len() <= n {
                continue;
            }
            let tail = &h[h.len() - n..];
            // The most recent earlier occurrence with something after it.
            if let Some(at) = (0..h.len() - n).rev().find(|&i| &h[i..i + n] == tail) {
                let next = &h[at + n..];
                return Ok(next[..want.min(next.len())].to_vec());
            }
        }
        Ok(Vec::new())
    }

    fn feedback(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        if accepted == proposed {
            self.want = (self.want + 2).min(64);
            self.misses = 0;
        } else {
            self.want = (accepted + 1).max(2);
        }
        if accepted == 0 {
            self.misses += 1;
            // 1, 2, 4 … 32 steps without proposing after 1, 2, 3 … misses in a row.
            self.pause = 1 << (self.misses - 1).min(5);
        } else {
            self.misses = 0;
        }
    }
}

/// Proposals from a small model of the same vocabulary, greedy: its own state follows the
/// history (what it has seen and the target has not accepted is rolled back), and it decodes
/// up to `max` tokens ahead at each step.
pub struct Draft<'m> {
    model: &'m Model,
    state: State,
    /// The tokens `state` holds the keys and values of.
    seen: Vec<u32>,
}

impl<'m> Draft<'m> {
    /// A draft over `model` for sequences of up to `max_len` tokens.
    pub fn new(model: &'m Model, max_len: usize) -> Result<Self> {
        Ok(Self { model, state: model.new_state(max_len)?, seen: Vec::new() })
    }
}

impl Draft<'_> {
    /// Goes back to the first `keep` tokens seen, or to none when the draft's rings have
    /// moved past them; returns how many it kept.
    fn rewind(&mut self, keep: usize) -> Result<usize> {
        let keep = if self.state.can_truncate(keep) {
            keep
        } else {
            self.state = self.model.new_state(self.state.max_len())?;
            0
        };
        self.state.truncate(keep)?;
        self.seen.truncate(keep);
        Ok(keep)
    }
}

impl Propose for Draft<'_> {
    fn propose(&mut self, history: &[u32], max: usize) -> Result<Vec<u32>> {
        let keep =
            crate::prompt_cache::common_prefix(&self.seen, history).min(history.len().saturating_sub(1));
        let keep = self.rewind(keep)?;
        let room = self.state.max_len().saturating_sub(history.len());
        let max = max.min(room);
        if max == 0 || history.is_empty() {
            return Ok(Vec::new());
        }
        let mut logits = crate::generate::prefill(self.model, &mut self.state, &history[keep..])?;
        self.seen.extend_from_slice(&history[keep..]);
        let mut out = Vec::with_capacity(max);
        loop {
            let token = crate::sample::argmax(&logits);
            out.push(token);
            if out.len() == max {
                return Ok(out);
            }
            logits = logits_vec(&self.model.forward(&mut self.state, &[token])?)?;
            self.seen.push(token);
        }
    }

    fn feedback(&mut self, _proposed: usize, _accepted: usize) {}

    fn catch_up(&mut self, history: &[u32]) -> Result<()> {
        // All but the last token, whose logits `propose` needs.
        let Some(upto) = history.len().checked_sub(1) else { return Ok(()) };
        let keep = self.rewind(crate::prompt_cache::common_prefix(&self.seen, &history[..upto]))?;
        if upto > keep && upto < self.state.max_len() {
            for batch in crate::generate::prefill_batches(&history[keep..upto]) {
                self.model.feed(&mut self.state, batch)?;
            }
            self.seen.extend_from_slice(&history[keep..upto]);
        }
        Ok(())
    }
}

/// Refuses a draft model whose vocabulary is not the target's token for token: its proposals
/// would be other tokens' ids.
pub fn check_vocabulary(target: &Tokenizer, draft: &Tokenizer) -> Result<()> {
    if target.vocab_size() != draft.vocab_size() {
        bail!(
            "the draft model's vocabulary has {} tokens and the model's {}: a draft must share the model's vocabulary",
            draft.vocab_size(),
            target.vocab_size()
        );
    }
    if let Some(id) =
        (0..target.vocab_size() as u32).find(|&id| target.token_bytes(id) != draft.token_bytes(id))
    {
        bail!(
            "the draft model's token {id} is {:?} and the model's {:?}: a draft must share the model's vocabulary",
            String::from_utf8_lossy(draft.token_bytes(id)),
            String::from_utf8_lossy(target.token_bytes(id))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_proposes_what_followed_the_longest_recent_match_and_backs_off() {
        let mut l = PromptLookup::new();
        // "5 6" occurred before, followed by 7 8 9.
        let h = [1, 5, 6, 7, 8, 9, 2, 3, 5, 6];
        assert_eq!(l.propose(&h, 8).expect("propose"), [7, 8, 9, 2]);
        assert_eq!(l.propose(&h, 2).expect("propose"), [7, 8], "at most max");
        // A longer match wins over a more recent shorter one: "4 5 6" → 1.
        let h = [4, 5, 6, 1, 9, 5, 6, 2, 4, 5, 6];
        assert_eq!(l.propose(&h, 1).expect("propose"), [1]);
        assert!(l.propose(&[1, 2, 3, 4], 4).expect("propose").is_empty(), "no match, nothing");
        // All accepted: more next time; none: a pause that grows.
        l.feedback(4, 4);
        assert_eq!(l.want, 6);
        l.feedback(6, 0);
        assert_eq!((l.want, l.pause), (2, 1));
        assert!(l.propose(&[5, 6, 7, 5, 6], 4).expect("propose").is_empty(), "paused");
        assert_eq!(l.propose(&[5, 6, 7, 5, 6], 4).expect("propose"), [7, 5]);
        l.feedback(2, 0);
        assert_eq!(l.pause, 2);
        l.feedback(2, 1);
        assert_eq!((l.want, l.misses), (2, 0));
    }
}
