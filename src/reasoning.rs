//! Separating a reasoning model's thinking from its answer. Qwen3, the DeepSeek-R1 distills
//! and their kin write `<think>…</think>` before the answer, and their templates often write
//! the opening `<think>` into the prompt, so that only `</think>` is generated. A [`Splitter`]
//! takes the generated text piece by piece and hands out reasoning and answer text as soon as
//! it is known which one it is, holding back only what could still be the start of a tag and
//! white space whose fate is not yet decided.
//!
//! The rules are those of llama.cpp's and vLLM's reasoning parsers: reasoning is recognised
//! only at the start of the output (a `<think>` later in the answer is the answer's text), its
//! surrounding white space is dropped, and so is the white space between `</think>` and the
//! answer.

/// The tag that opens reasoning.
pub const OPEN: &str = "<think>";
/// The tag that ends reasoning.
pub const CLOSE: &str = "</think>";

/// Where a reasoning model's thinking goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReasoningMode {
    /// Nowhere.
    Hide,
    /// To stderr, dimmed on a terminal.
    Stderr,
    /// To stdout before the answer, between `<think>` and `</think>` (with `--json`: as
    /// `reasoning` objects).
    Stdout,
}

/// A piece of the output, once its kind is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Reasoning text. Empty once, when reasoning opens: the model has begun to reason, even
    /// if the output ends before a word of it.
    Reasoning(String),
    /// Answer text.
    Answer(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing but white space so far: a `<think>` may still open reasoning.
    Start,
    /// Inside reasoning; `begun` once text other than white space has been handed out.
    Reasoning { begun: bool },
    /// After `</think>`: white space is dropped until the answer begins.
    AfterReasoning,
    /// The answer: everything from here on is answer text, verbatim.
    Answer,
}

/// Splits one generation's text into reasoning and answer.
#[derive(Debug, Clone)]
pub struct Splitter {
    phase: Phase,
    /// Text not handed out yet: white space and what may be the start of a tag.
    held: String,
    /// The generation starts in reasoning, and has not said so yet.
    announce: bool,
}

impl Splitter {
    /// A splitter for a generation that starts in reasoning (the prompt ended with an open
    /// `<think>`), or that may open it with a `<think>` of its own.
    pub fn new(in_reasoning: bool) -> Self {
        let phase = if in_reasoning { Phase::Reasoning { begun: false } } else { Phase::Start };
        Self { phase, held: String::new(), announce: in_reasoning }
    }

    /// Whether the answer has begun: from here on, text passes through unchanged.
    pub fn answering(&self) -> bool {
        self.phase == Phase::Answer
    }

    /// Adds generated text, appending what is now known to `out`.
    pub fn push(&mut self, text: &str, out: &mut Vec<Piece>) {
        if std::mem::take(&mut self.announce) {
            out.push(Piece::Reasoning(String::new()));
        }
        self.held.push_str(text);
        self.drain(false, out);
    }

    /// The output has ended: what was held back goes out (a partial tag as the text it is),
    /// except white space that reasoning would have dropped.
    pub fn finish(&mut self, out: &mut Vec<Piece>) {
        self.drain(true, out);
        self.held.clear();
    }

    fn drain(&mut self, at_end: bool, out: &mut Vec<Piece>) {
        loop {
            match self.phase {
                Phase::Start => {
                    let rest = self.held.trim_start();
                    if let Some(after) = rest.strip_prefix(OPEN) {
                        self.held = after.to_owned();
                        self.phase = Phase::Reasoning { begun: false };
                        out.push(Piece::Reasoning(String::new()));
                    } else if let Some(after) = rest.strip_prefix(CLOSE) {
                        // A `</think>` with no opening (a template that opened it without
                        // ending the prompt with it): there is no reasoning to show, and the
                        // tag is not answer text.
                        self.held = after.to_owned();
                        self.phase = Phase::AfterReasoning;
                    } else if !at_end
                        && (rest.is_empty() || OPEN.starts_with(rest) || CLOSE.starts_with(rest))
                    {
                        return;
                    } else {
                        self.phase = Phase::Answer;
                    }
                }
                Phase::Reasoning { begun } => {
                    if !begun {
                        let blank = self.held.len() - self.held.trim_start().len();
                        self.held.drain(..blank);
                    }
                    if let Some(i) = self.held.find(CLOSE) {
                        let text = self.held[..i].trim_end();
                        if !text.is_empty() {
                            out.push(Piece::Reasoning(text.to_owned()));
                        }
                        self.held.drain(..i + CLOSE.len());
                        self.phase = Phase::AfterReasoning;
                        continue;
                    }
                    // Hold a possible partial `</think>` and the white space before it, which
                    // is dropped if the tag follows.
                    let tag = if at_end {
                        self.held.len()
                    } else {
                        crate::stop::partial_match_start(&self.held, &[CLOSE])
                    };
                    let end = self.held[..tag].trim_end().len();
                    if end > 0 {
                        out.push(Piece::Reasoning(self.held[..end].to_owned()));
                        self.held.drain(..end);
                        self.phase = Phase::Reasoning { begun: true };
                    }
                    return;
                }
                Phase::AfterReasoning => {
                    let blank = self.held.len() - self.held.trim_start().len();
                    self.held.drain(..blank);
                    if self.held.is_empty() {
                        return;
                    }
                    self.phase = Phase::Answer;
                }
                Phase::Answer => {
                    if !self.held.is_empty() {
                        out.push(Piece::Answer(std::mem::take(&mut self.held)));
                    }
                    return;
                }
            }
        }
    }
}

/// Whether a prompt leaves the model inside reasoning: it ends with `<think>` (and white
/// space), as DeepSeek-R1's and QwQ's templates end theirs.
pub fn prompt_opens_reasoning(prompt: &str) -> bool {
    prompt.trim_end().ends_with(OPEN)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Splits `chunks` fed one after the other; adjacent pieces of one kind are joined, and
    /// the empty marker of opened reasoning is kept apart as `opened`.
    fn split(in_reasoning: bool, chunks: &[&str]) -> (bool, String, String) {
        let mut s = Splitter::new(in_reasoning);
        let mut out = Vec::new();
        for chunk in chunks {
            s.push(chunk, &mut out);
        }
        s.finish(&mut out);
        join(&out)
    }

    fn join(pieces: &[Piece]) -> (bool, String, String) {
        let (mut opened, mut reasoning, mut answer) = (false, String::new(), String::new());
        for piece in pieces {
            match piece {
                Piece::Reasoning(t) if t.is_empty() => opened = true,
                Piece::Reasoning(t) => {
                    assert!(answer.is_empty(), "reasoning {t:?} after answer {answer:?}");
                    reasoning.push_str(t);
                }
                Piece::Answer(t) => {
                    assert!(!t.is_empty(), "an empty answer piece");
                    answer.push_str(t);
                }
            }
        }
        (opened, reasoning, answer)
    }

    fn owned(opened: bool, reasoning: &str, answer: &str) -> (bool, String, String) {
        (opened, reasoning.to_owned(), answer.to_owned())
    }

    #[test]
    fn qwen3_style_output_splits_and_drops_the_blank_lines() {
        let out = split(false, &["<think>", "\n", "Let me see", ".\n", "</think>", "\n\n", "Paris", "."]);
        assert_eq!(out, owned(true, "Let me see.", "Paris."));
    }

    #[test]
    fn a_prompt_that_opened_reasoning_needs_only_the_closing_tag() {
        assert_eq!(split(true, &["\nHmm", "</think>\n\nYes"]), owned(true, "Hmm", "Yes"));
        assert!(prompt_opens_reasoning("<｜Assistant｜><think>\n"));
        assert!(!prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!prompt_opens_reasoning("explain <think> tags<|im_end|>\n<|im_start|>assistant\n"));
    }

    #[test]
    fn tags_split_across_pieces_never_leak() {
        assert_eq!(split(false, &["<th", "ink>a", "</th", "ink>", "b"]), owned(true, "a", "b"));
        assert_eq!(
            split(false, &["<", "t", "h", "i", "n", "k", ">x<", "/", "think", ">", "y"]),
            owned(true, "x", "y")
        );
    }

    #[test]
    fn an_answer_without_reasoning_is_verbatim_and_not_held_longer_than_a_tag_could_be() {
        assert_eq!(split(false, &["  Hello <think> there"]), owned(false, "", "  Hello <think> there"));
        let mut s = Splitter::new(false);
        let mut out = Vec::new();
        s.push("<", &mut out);
        assert!(out.is_empty(), "'<' may begin <think>");
        s.push("b>", &mut out);
        assert_eq!(out, [Piece::Answer("<b>".into())]);
        s.push("<think>", &mut out);
        assert_eq!(out.last(), Some(&Piece::Answer("<think>".into())), "a tag inside the answer is text");
    }

    #[test]
    fn reasoning_is_handed_out_as_it_comes_except_a_possible_tag() {
        let mut s = Splitter::new(true);
        let mut out = Vec::new();
        s.push("one two", &mut out);
        assert_eq!(out, [Piece::Reasoning(String::new()), Piece::Reasoning("one two".into())]);
        out.clear();
        s.push(" three </", &mut out);
        assert_eq!(out, [Piece::Reasoning(" three".into())], "the space and '</' are held");
        out.clear();
        s.push("b> four", &mut out);
        assert_eq!(out, [Piece::Reasoning(" </b> four".into())]);
    }

    #[test]
    fn output_that_ends_inside_reasoning_or_a_tag_keeps_its_text() {
        assert_eq!(split(true, &["still thinking </thi"]), owned(true, "still thinking </thi", ""));
        assert_eq!(split(false, &["  <thi"]), owned(false, "", "  <thi"));
        assert_eq!(split(false, &["<think>", "\n\n"]), owned(true, "", ""));
        assert_eq!(split(false, &["<think>a</think>", "\n\n"]), owned(true, "a", ""));
    }

    #[test]
    fn a_stray_closing_tag_at_the_start_is_dropped() {
        assert_eq!(split(false, &["</think>\n\n", "Answer"]), owned(false, "", "Answer"));
    }

    #[test]
    fn empty_reasoning_as_qwen3_writes_it_with_thinking_off() {
        assert_eq!(split(false, &["<think>\n\n</think>\n\n", "Hi"]), owned(true, "", "Hi"));
    }

    /// The text cut into pieces at the given fractions of its length (at character
    /// boundaries).
    fn cut<'a>(text: &'a str, cuts: &[prop::sample::Index]) -> Vec<&'a str> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(text.len() + 1)).collect();
        at.retain(|&i| text.is_char_boundary(i));
        at.sort_unstable();
        let mut pieces = Vec::new();
        let mut start = 0;
        for i in at.into_iter().chain([text.len()]) {
            pieces.push(&text[start..i]);
            start = i;
        }
        pieces
    }

    /// Text made of the tags, their fragments, white space and words, so that tags and
    /// near-tags are common.
    fn text() -> impl Strategy<Value = String> {
        let atom = prop::sample::select(vec![
            "<think>", "</think>", "<", "</", "<th", "think>", "ink>", "</b>", " ", "\n", "\n\n", "a", "é",
            "word", "☕",
        ]);
        prop::collection::vec(atom, 0..16).prop_map(|atoms| atoms.concat())
    }

    proptest! {
        /// However the text is cut, the reasoning and the answer are those of the text given
        /// whole, and every piece's text is part of the input in order (nothing invented,
        /// nothing reordered).
        #[test]
        fn any_chunking_gives_the_same_split(
            s in text(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            in_reasoning in any::<bool>(),
        ) {
            let whole = split(in_reasoning, &[&s]);
            let pieces = cut(&s, &cuts);
            prop_assert_eq!(split(in_reasoning, &pieces), whole.clone());
            // Reference: the same rules written over the whole string.
            let (opened, reasoning, answer) = reference(&s, in_reasoning);
            prop_assert_eq!(whole, (opened, reasoning, answer));
        }
    }

    /// The split of a whole output, written directly from the rules.
    fn reference(s: &str, in_reasoning: bool) -> (bool, String, String) {
        let mut opened = in_reasoning;
        let body = if in_reasoning {
            Some(s)
        } else {
            let t = s.trim_start();
            if let Some(after) = t.strip_prefix(OPEN) {
                opened = true;
                Some(after)
            } else if let Some(after) = t.strip_prefix(CLOSE) {
                return (false, String::new(), after.trim_start().to_owned());
            } else {
                None
            }
        };
        match body {
            None => (false, String::new(), s.to_owned()),
            Some(body) => match body.find(CLOSE) {
                Some(i) => {
                    (opened, body[..i].trim().to_owned(), body[i + CLOSE.len()..].trim_start().to_owned())
                }
                None => (opened, body.trim().to_owned(), String::new()),
            },
        }
    }
}
