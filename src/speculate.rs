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

    /// How many kinds of proposal it makes (see [`Propose::kind`]).
    fn kinds(&self) -> usize {
        1
    }

    /// The kind of the last proposal, below [`Propose::kinds`]: proposals of one kind are
    /// accepted about as often as each other (a prompt lookup's longer matches more often
    /// than its shorter ones), so the generator learns how many of each pay.
    fn kind(&self) -> usize {
        0
    }

    /// Whether proposing costs nothing to speak of, so that the generator can ask for the most
    /// and check only as many as pay (else it asks for that many).
    fn free(&self) -> bool {
        false
    }

    /// Gets ready to propose after `history` (a draft model computes the prompt), so that
    /// what [`Propose::propose`] costs is what each proposal costs.
    fn catch_up(&mut self, _history: &[u32]) -> Result<()> {
        Ok(())
    }
}

/// Proposals copied from earlier in the text: the tokens that followed the last earlier
/// occurrence of the history's last n tokens (n from [`PromptLookup::NGRAM_MAX`] down to
/// [`PromptLookup::NGRAM_MIN`]), preferring an occurrence with as many tokens after it as were
/// asked for. How many of them are checked is the generator's call: it weighs how often
/// proposals are accepted against what a pass of each size costs on this machine.
///
/// Where an answer copies its input and then departs from it (a typo fixed, a word
/// translated), the tokens just written occur nowhere before, so no n-gram matches for a step
/// or two. So the lookup remembers where in the text the last proposal was rejected, and looks
/// for the history's last token alone a few tokens either side of it: the copy resumes there.
///
/// Each proposal's kind ([`Propose::kind`]) is the length of its match (1 for a resumed copy):
/// the generator learns how often each is accepted and checks only as many as pay, so in a
/// free-form answer, where short matches are chance, they soon stop being checked.
pub struct PromptLookup {
    /// Where in the history the last proposal was copied from.
    from: Option<usize>,
    /// The last proposal's kind: its match's length.
    kind: usize,
    /// Where the copy was left: the history position of the first proposal the model did not
    /// accept.
    left_at: Option<usize>,
}

impl PromptLookup {
    pub const NGRAM_MAX: usize = 4;
    pub const NGRAM_MIN: usize = 2;
    /// How far back a match is looked for: the search is linear, and a long context's far
    /// past rarely predicts the next tokens better than its recent one.
    const WINDOW: usize = 16 << 10;
    /// How far from where a copy was left its resumption is looked for: a few words' tokens.
    const NEAR: usize = 12;

    pub fn new() -> Self {
        Self { from: None, kind: 0, left_at: None }
    }

    /// The start of what to copy and the match's length: after the most recent occurrence of
    /// the history's last n tokens (the longest n that occurs) with at least `want` tokens
    /// after it, else after the oldest (going back, the tokens after an occurrence only grow).
    fn matched(history: &[u32], base: usize, want: usize) -> Option<(usize, usize)> {
        let h = &history[base..];
        for n in (Self::NGRAM_MIN..=Self::NGRAM_MAX).rev() {
            if h.len() <= n {
                continue;
            }
            let tail = &h[h.len() - n..];
            let mut oldest = None;
            for start in (0..h.len() - n).rev().filter(|&i| &h[i..i + n] == tail).map(|i| i + n) {
                if h.len() - start >= want {
                    return Some((base + start, n));
                }
                oldest = Some(start);
            }
            if let Some(start) = oldest {
                return Some((base + start, n));
            }
        }
        None
    }

    /// The start of what to copy where the last copy was left: after the history's last token,
    /// found within [`PromptLookup::NEAR`] tokens of that place (the nearest occurrence).
    fn resumed(&self, history: &[u32]) -> Option<usize> {
        let (at, &last) = (self.left_at?, history.last()?);
        let end = history.len() - 1;
        let lo = at.saturating_sub(Self::NEAR);
        let hi = (at + Self::NEAR).min(end);
        (lo..hi).filter(|&i| history[i] == last).min_by_key(|&i| i.abs_diff(at)).map(|i| i + 1)
    }
}

impl Default for PromptLookup {
    fn default() -> Self {
        Self::new()
    }
}

impl Propose for PromptLookup {
    fn propose(&mut self, history: &[u32], max: usize) -> Result<Vec<u32>> {
        self.from = None;
        if max == 0 {
            return Ok(Vec::new());
        }
        let base = history.len().saturating_sub(Self::WINDOW);
        let found = Self::matched(history, base, max).or_else(|| Some((self.resumed(history)?, 1)));
        let Some((start, n)) = found else {
            return Ok(Vec::new());
        };
        (self.from, self.kind) = (Some(start), n);
        Ok(history[start..(start + max).min(history.len())].to_vec())
    }

    fn kinds(&self) -> usize {
        Self::NGRAM_MAX + 1
    }

    fn kind(&self) -> usize {
        self.kind
    }

    fn free(&self) -> bool {
        true
    }

    fn feedback(&mut self, proposed: usize, accepted: usize) {
        if proposed > 0 {
            self.left_at = if accepted < proposed { self.from.map(|f| f + accepted) } else { None };
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
    fn lookup_proposes_what_followed_the_longest_recent_match() {
        let mut l = PromptLookup::new();
        // "5 6" occurred before, followed by 7 8 9.
        let h = [1, 5, 6, 7, 8, 9, 2, 3, 5, 6];
        assert_eq!(l.propose(&h, 4).expect("propose"), [7, 8, 9, 2]);
        assert_eq!(l.propose(&h, 2).expect("propose"), [7, 8], "at most max");
        // A longer match wins over a more recent shorter one: "4 5 6" → 1.
        let h = [4, 5, 6, 1, 9, 5, 6, 2, 4, 5, 6];
        assert_eq!(l.propose(&h, 1).expect("propose"), [1]);
        assert!(l.propose(&[1, 2, 3, 4], 4).expect("propose").is_empty(), "no match, nothing");
        // The most recent occurrence with as many tokens after it as asked for.
        let h = [5, 6, 1, 2, 3, 4, 9, 5, 6, 7, 5, 6];
        assert_eq!(l.propose(&h, 3).expect("propose"), [7, 5, 6]);
        assert_eq!(l.propose(&h, 4).expect("propose"), [1, 2, 3, 4]);
        assert_eq!(l.kind(), 2, "the match's length");
        assert_eq!(l.propose(&[7, 1, 2, 3, 9, 1, 2, 3], 1).expect("propose"), [9]);
        assert_eq!(l.kind(), 3);
    }

    #[test]
    fn lookup_resumes_a_copy_where_the_answer_left_it() {
        let mut l = PromptLookup::new();
        // The text 10 11 … 16, then its copy: 10 11 12.
        let mut h = vec![10, 11, 12, 13, 14, 15, 16, 99, 10, 11, 12];
        assert_eq!(l.propose(&h, 4).expect("propose"), [13, 14, 15, 16]);
        // 13 accepted, then the answer writes 50 where the text has 14: nothing matches "13 50".
        l.feedback(4, 1);
        h.extend([13, 50]);
        assert!(l.propose(&h, 4).expect("propose").is_empty());
        // Then 15: the text's 15 is next to where the copy was left, and the copy goes on.
        h.push(15);
        assert_eq!(l.propose(&h, 4).expect("propose"), [16, 99, 10, 11]);
        assert_eq!(l.kind(), 1, "a resumed copy");
        // A token found nowhere near it resumes nothing.
        h.push(77);
        assert!(l.propose(&h, 4).expect("propose").is_empty());
        // All accepted: nothing is left to resume.
        h.extend([10, 11, 12]);
        assert_eq!(l.propose(&h, 2).expect("propose"), [13, 50]);
        l.feedback(2, 2);
        assert_eq!(l.left_at, None);
    }
}
