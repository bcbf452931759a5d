//! Constrained decoding in the generation loop: our vocabulary as llguidance sees it
//! ([`Grammars`], one per model), and the per-sequence [`Mask`] that [`crate::generate::Sequence`]
//! applies to the logits before the sampler and advances with every chosen token.
//!
//! The vocabulary is built from our tokenizer's own token bytes, the bytes the decoder prints.
//! A token that prints nothing but has a name (a control token: `<end_of_turn>`, `<|im_end|>`)
//! is marked special (llguidance's `0xFF` prefix, as llama.cpp's llguidance glue does), so no
//! grammar produces it as text; user-defined tokens print their text (Gemma's `\n\n` and runs
//! of spaces are such tokens) and stay ordinary text. Our end-of-generation ids are its end
//! tokens. The mask then agrees with what the decoder prints byte for byte, and allows ending
//! exactly where the grammar accepts.

use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow, bail};
use llguidance::api::ParserLimits;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use super::Constraint;
use crate::tokenizer::Tokenizer;

/// Our vocabulary for llguidance: the token trie, and our tokenizer for the forced text.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Tokenizes text the grammar forces, as our tokenizer would (so the model sees forced
    /// text as it saw such text in training); text our tokenizer does not give back byte for
    /// byte (a piece of a UTF-8 character, a leading-space quirk) goes greedily by the trie.
    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<u32> {
        if let Ok(text) = std::str::from_utf8(bytes) {
            let ids = self.tokenizer.encode(text, false, false);
            if self.tokenizer.decode_bytes(&ids) == bytes {
                return ids;
            }
        }
        self.trie.greedy_tokenize(bytes)
    }
}

/// Grammars for one model's vocabulary: compiles a [`Constraint`] into a [`Matcher`]. Built
/// once per model, and keeps the last compiled grammar so that `--each-line` compiles it once.
/// Indexing the vocabulary is what a constrained run waits for before its first token: about
/// 0.8 s on Gemma 3's 262,144 tokens, 0.2 s on SmolLM2's 49,152, most of it in toktrie's trie
/// building, and as much again with llguidance's slices (see [`Grammars::new`]; measured on an
/// AMD EPYC VM, `benches/results/2026-12-07-epyc-1de2a5b.md`).
pub struct Grammars {
    factory: ParserFactory,
    last: Mutex<Option<(Constraint, Matcher)>>,
    vocab_size: usize,
}

impl Grammars {
    /// The grammars of `tokenizer`'s vocabulary. With `sliced`, llguidance's JSON slices too:
    /// tries of the tokens a JSON string may hold, which make each mask inside a string
    /// cheaper but take as long to build as the vocabulary's own trie (0.7 s more before
    /// Gemma 3's first token). One answer does not earn that back: its decode under three
    /// schemas was as fast without them. An `--each-line` batch computes a mask per line per
    /// step, and keeps them (32 lines on Gemma: 2.54 lines/s with, 2.31 without).
    pub fn new(tokenizer: Arc<Tokenizer>, sliced: bool) -> Result<Self> {
        let n = tokenizer.vocab_size();
        let vocab_size = u32::try_from(n).map_err(|_| anyhow!("a vocabulary of {n} tokens is too large"))?;
        let words: Vec<Vec<u8>> = (0..vocab_size)
            .map(|id| match (tokenizer.token_bytes(id), tokenizer.token_text(id).unwrap_or("")) {
                ([], name) if !name.is_empty() => {
                    [&[TokTrie::SPECIAL_TOKEN_MARKER][..], name.as_bytes()].concat()
                }
                (bytes, _) => bytes.to_vec(),
            })
            .collect();
        let mut ends: Vec<u32> =
            tokenizer.end_of_generation_ids().iter().copied().filter(|&id| id < vocab_size).collect();
        if ends.is_empty() {
            // llguidance needs an end token; a vocabulary without one ends where the grammar
            // allows nothing more (see `Mask::finished`), and id 0 (in Gemma and Llama
            // vocabularies a control token, never sampled under a grammar) stands in.
            ends.push(0);
        }
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size, ends[0]), &words).with_eos_tokens(&ends);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let caps = InferenceCapabilities { ff_tokens: true, ..InferenceCapabilities::default() };
        let slices = if sliced { SlicedBiasComputer::general_slices() } else { Vec::new() };
        let mut factory = ParserFactory::new(&env, caps, &slices)?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits { verbose_errors: false, ..ParserLimits::default() };
        Ok(Self { factory, last: Mutex::new(None), vocab_size: n })
    }

    /// A fresh matcher for `constraint`.
    pub fn matcher(&self, constraint: &Constraint) -> Result<Matcher> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((c, matcher)) = last.as_ref()
            && c == constraint
        {
            return Ok(matcher.clone());
        }
        let parser = self
            .factory
            .create_parser(constraint.grammar())
            .map_err(|e| anyhow!("{}: {}", constraint.flag(), super::one_line(&format!("{e:#}"))))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            bail!("{}: {}", constraint.flag(), super::one_line(&e));
        }
        *last = Some((constraint.clone(), matcher.clone()));
        Ok(matcher)
    }

    /// The mask of a new sequence under `constraint` (see [`Mask::new`] for `think`).
    pub fn mask(&self, constraint: &Constraint, think: Option<Think>) -> Result<Mask> {
        Ok(Mask::new(self.matcher(constraint)?, self.vocab_size, think))
    }
}

/// How a reasoning model's thinking is let through: the ids of its `<think>` and `</think>`
/// tokens, and whether the prompt already opened the thinking.
#[derive(Debug, Clone, Copy)]
pub struct Think {
    pub open: u32,
    pub close: u32,
    pub open_in_prompt: bool,
}

/// Where a sequence is, for its mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A reasoning model at the start: it may open its thinking, or answer at once.
    MayThink,
    /// Thinking, unconstrained, until `</think>`.
    Thinking,
    /// The answer: every token is the grammar's.
    Answer,
}

/// One sequence's constraint: which tokens may come next, the tokens the grammar forces, and
/// whether the answer so far is complete.
///
/// A reasoning model thinks freely and the grammar starts after `</think>` (as vLLM and
/// ollama do): at the start its first token may also be `<think>`. [`Mask::rewind`] undoes
/// the last tokens (llguidance's `rollback`), for speculative decoding's rejected proposals.
pub struct Mask {
    matcher: Matcher,
    phase: Phase,
    think: Option<Think>,
    vocab_size: usize,
    /// For each token since the start: the phase before it and whether the matcher took it,
    /// so that a rewind restores both.
    taken: Vec<(Phase, bool)>,
    /// Why the matcher failed, once it has (the sequence then ends, and says why).
    error: Option<String>,
}

impl Mask {
    /// A mask starting with `matcher`'s grammar; with `think`, a reasoning model's thinking
    /// comes first, unconstrained.
    pub fn new(matcher: Matcher, vocab_size: usize, think: Option<Think>) -> Self {
        let phase = match think {
            Some(t) if t.open_in_prompt => Phase::Thinking,
            Some(_) => Phase::MayThink,
            None => Phase::Answer,
        };
        Self { matcher, phase, think, vocab_size, taken: Vec::new(), error: None }
    }

    /// Why the grammar engine failed, if it did.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    fn fail<T>(&mut self, e: anyhow::Error) -> Result<T> {
        let message = format!("the grammar engine failed: {}", super::one_line(&format!("{e:#}")));
        self.error.get_or_insert(message.clone());
        Err(anyhow!(message))
    }

    /// Whether the answer is finished: the grammar accepts it and allows nothing more.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Answer && self.matcher.is_stopped() && self.error.is_none()
    }

    /// How many of the last tokens are the answer the grammar took (forced ones included);
    /// `None` while a reasoning model is still thinking.
    pub fn answer_tokens(&self) -> Option<usize> {
        (self.phase != Phase::Thinking).then(|| self.taken.iter().filter(|(_, takes)| *takes).count())
    }

    /// Whether the answer so far is a complete one (the grammar accepts it).
    pub fn complete(&mut self) -> bool {
        self.phase != Phase::Thinking && self.error.is_none() && self.matcher.is_accepting().unwrap_or(false)
    }

    /// Sets the logits of the tokens the grammar does not allow next to minus infinity (ids
    /// beyond the vocabulary too). While thinking nothing is masked.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<()> {
        if self.phase == Phase::Thinking {
            return Ok(());
        }
        let mut allowed = match self.matcher.compute_mask_or_eos() {
            Ok(allowed) => allowed,
            Err(e) => return self.fail(e),
        };
        if let (Phase::MayThink, Some(think)) = (self.phase, self.think) {
            allowed.allow_token(think.open);
        }
        for (id, logit) in logits.iter_mut().enumerate() {
            if id >= self.vocab_size || !allowed.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past the chosen `token` (not an end-of-generation one: the sequence ends there).
    pub fn accept(&mut self, token: u32) -> Result<()> {
        let before = self.phase;
        let open = self.think.map(|t| t.open);
        let close = self.think.map(|t| t.close);
        let takes = match self.phase {
            Phase::Thinking => {
                if Some(token) == close {
                    self.phase = Phase::Answer;
                }
                false
            }
            Phase::MayThink if Some(token) == open => {
                self.phase = Phase::Thinking;
                false
            }
            Phase::MayThink | Phase::Answer => {
                self.phase = Phase::Answer;
                true
            }
        };
        if takes && let Err(e) = self.matcher.consume_token(token) {
            return self.fail(e);
        }
        self.taken.push((before, takes));
        Ok(())
    }

    /// The tokens the grammar forces next (where exactly one continuation is allowed), at most
    /// `room` of them, already accepted: the caller feeds them in one pass.
    pub fn forced(&mut self, room: usize) -> Result<Vec<u32>> {
        if self.phase != Phase::Answer || room == 0 || self.matcher.is_stopped() {
            return Ok(Vec::new());
        }
        let mut tokens = self.matcher.compute_ff_tokens();
        if let Some(e) = self.matcher.get_error() {
            return self.fail(anyhow!(e));
        }
        tokens.truncate(room);
        if let Err(e) = self.matcher.consume_tokens(&tokens) {
            return self.fail(e);
        }
        self.taken.extend(tokens.iter().map(|_| (Phase::Answer, true)));
        Ok(tokens)
    }

    /// How many of `tokens`, in order from here, the constraint would take: a thinking model's
    /// tokens up to its `</think>` freely, the answer's as the grammar allows them (llguidance's
    /// `validate_tokens`, which changes nothing). Speculative decoding proposes only those: a
    /// proposal the mask refuses would be rejected anyway, after a row of the pass.
    pub fn allowed_prefix(&mut self, tokens: &[u32]) -> usize {
        if self.error.is_some() {
            return 0;
        }
        let (open, close) = (self.think.map(|t| t.open), self.think.map(|t| t.close));
        let mut phase = self.phase;
        let mut free = 0;
        for &t in tokens {
            match phase {
                Phase::Thinking => {
                    free += 1;
                    if Some(t) == close {
                        phase = Phase::Answer;
                    }
                }
                Phase::MayThink if Some(t) == open => {
                    free += 1;
                    phase = Phase::Thinking;
                }
                Phase::MayThink | Phase::Answer => break,
            }
        }
        if phase == Phase::Thinking || free == tokens.len() {
            return free;
        }
        // The grammar starts at `tokens[free]`, where the matcher is (nothing of the answer
        // has been taken while thinking).
        free + self.matcher.validate_tokens(&tokens[free..]).unwrap_or(0)
    }

    /// Forgets the last `n` accepted tokens, as if they had never been chosen.
    pub fn rewind(&mut self, n: usize) {
        let n = n.min(self.taken.len());
        let mut matched = 0;
        for (before, takes) in self.taken.drain(self.taken.len() - n..).rev() {
            matched += usize::from(takes);
            self.phase = before;
        }
        if matched > 0
            && let Err(e) = self.matcher.rollback(matched)
        {
            let _ = self.fail::<()>(e);
        }
    }
}

#[cfg(test)]
mod tests;
