//! `--logprobs` on a [`Sequence`]: the log-probabilities of the tokens it chooses, and of whole
//! answers teacher-forced after its prompt (`--choice`'s scores).

use anyhow::Result;

use super::Sequence;
use crate::constrain::mask::Mask;
use crate::model::{Model, logits_vec};

/// A chosen token's log-probability under the model's logits at its place, and the most
/// likely tokens there with theirs (see [`crate::sample::Logprobs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ChosenLogprob {
    /// The token's place among the generated tokens (0 for the first).
    pub index: usize,
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl Sequence {
    /// Reports each chosen token's log-probability under the model and its `n` most likely
    /// alternatives ([`Sequence::take_logprob`]).
    pub fn with_logprobs(mut self, n: Option<usize>) -> Self {
        self.logprobs = n;
        self
    }

    /// The log-probabilities of the generated token at `index` (0 for the first), when it was
    /// chosen (a token a constraint forced has none); taken once, in order.
    pub fn take_logprob(&mut self, index: usize) -> Option<ChosenLogprob> {
        let queue = &mut self.chosen_logprobs;
        while queue.front().is_some_and(|c| c.index < index) {
            queue.pop_front();
        }
        queue.front().is_some_and(|c| c.index == index).then(|| queue.pop_front()).flatten()
    }

    /// The log-probability under the model of each of `answers` (token sequences) as this
    /// sequence's constrained answer: each fed, teacher-forced, after the tokens before the
    /// answer (the prompt, and a reasoning model's thinking), on a copy of the state. `None`
    /// without a constraint, or while the model is still thinking.
    pub fn answer_logprobs(&self, model: &Model, answers: &[Vec<u32>]) -> Result<Option<Vec<f64>>> {
        let Some(answer) = self.mask.as_ref().and_then(Mask::answer_tokens) else { return Ok(None) };
        let Some(first) = &self.answer_logits else { return Ok(None) };
        let start = self.history.len() - answer;
        let of = |row: &[f32], t: u32| f64::from(crate::sample::Logprobs::new(row, 0).of(row, t));
        let mut scores = Vec::with_capacity(answers.len());
        for tokens in answers {
            let Some((&head, _)) = tokens.split_first() else {
                scores.push(0.0);
                continue;
            };
            // The first token on the logits its answer was chosen from, so the chosen token's
            // logprob and its choice's score agree exactly; the rest fed after it.
            let mut score = of(first, head);
            if let Some((_, fed)) = tokens.split_last()
                && !fed.is_empty()
            {
                let mut state = model.fork(&self.state, start, start + fed.len(), 0)?;
                let logits = logits_vec(&model.forward_all(&mut state, fed)?.flatten_all()?)?;
                let vocab = logits.len() / fed.len();
                score +=
                    logits.chunks_exact(vocab).zip(&tokens[1..]).map(|(row, &t)| of(row, t)).sum::<f64>();
            }
            scores.push(score);
        }
        Ok(Some(scores))
    }
}
