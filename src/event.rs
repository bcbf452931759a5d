//! What an answer is made of, whoever computes it: the [`Event`]s a backend reports (text,
//! reasoning, the end) and why generation ended. A leaf: the local engine, the server client
//! and the shared answer path all speak it.

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

/// What a backend reports while it answers. New kinds of events come with new features, so a
/// program matching on them needs a catch-all arm.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The prompt has been processed; its length in tokens (the local engine says so before
    /// the first token; a server only at the end, in [`Finish`]), and how many of them were
    /// not computed again because another line or a cache had them already.
    Prompt { tokens: usize, reused: usize },
    /// The next piece of the answer. `token` is the id it completes when the backend knows it;
    /// the local engine reports every token, with empty text while a UTF-8 character is
    /// still incomplete.
    Text { text: String, token: Option<u32> },
    /// The next piece of the model's reasoning ("thinking"), before the answer. Empty text
    /// says only that the model has begun to reason (the local engine, at `<think>`), so that
    /// `-n` running out before the answer is an error even before a word of reasoning.
    Reasoning { text: String },
    /// The log-probability of the token the next [`Event::Text`] reports and the most likely
    /// alternatives to it (`--logprobs`; the local engine, only when asked for).
    Logprob(TokenLogprob),
    /// `--choice` with `--logprobs`: each choice's log-probability as the answer, and its
    /// probability among the choices (the local engine, before [`Event::Finish`]).
    Choices(Vec<ChoiceScore>),
    /// Speculative decoding's counts so far: tokens proposed and accepted (the local engine,
    /// before [`Event::Finish`], when it speculated).
    Speculation(crate::speculate::Counts),
    /// The end of the answer; nothing follows.
    Finish(Finish),
}

/// A generated token's log-probability under the model, and the `top` most likely tokens at
/// its place (most likely first): the model's own distribution, before temperature,
/// penalties and constraints, as vLLM reports it by default.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token's id, when the backend knows it (a server may report only its text).
    pub token: Option<u32>,
    /// The token's bytes (a piece of a UTF-8 character, for some).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<Alternative>,
}

/// One `--choice`'s score: the log-probability under the model of the answer being that choice
/// (its tokens teacher-forced after the prompt, before temperature and penalties), and the
/// probability it has among the choices (those log-probabilities normalized).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChoiceScore {
    pub choice: String,
    pub logprob: f64,
    pub probability: f64,
}

/// One of the most likely tokens at a place.
#[derive(Debug, Clone, PartialEq)]
pub struct Alternative {
    pub token: Option<u32>,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// How an answer ended, with the token counts the backend knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: Option<usize>,
    pub generated_tokens: Option<usize>,
    /// Under a constraint (`--json-schema`, `--regex`…), whether the answer matches it whole;
    /// `None` without one.
    pub complete: Option<bool>,
}
