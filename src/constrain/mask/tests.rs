//! Constrained generation on a random-weight miniature (byte-level BPE with `<think>` tokens):
//! the answer matches its constraint greedy and sampled, forced tokens join the history at
//! once, a rewind continues as if the rewound tokens had never been chosen, a reasoning
//! model thinks freely until `</think>`, and speculative decoding under a constraint gives
//! the tokens of plain constrained decoding.

use super::*;
use crate::engine::{Loaded, load};
use crate::event::FinishReason;
use crate::generate::{Choice, Generator, Limits, Sequence, Step};
use crate::sample::{Sampler, SamplingParams};
use crate::synthetic::{Spec, write_file};

fn mini() -> (tempfile::TempDir, Loaded) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("mini.gguf");
    write_file(&Spec::mini("qwen2"), &path).expect("write");
    (dir, load(path).expect("load"))
}

fn sequence(loaded: &Loaded, mask: Mask, temperature: f32, seed: u64, max_tokens: usize) -> Sequence {
    let tok = &loaded.tokenizer;
    let state = loaded.model.new_state(512).expect("state");
    let sampler = Sampler::new(SamplingParams { temperature, seed, ..SamplingParams::default() });
    let limits = Limits {
        max_tokens: Some(max_tokens),
        end_of_generation: tok.end_of_generation_ids().to_vec(),
        ..Limits::default()
    };
    let prompt = tok.encode("The answer is", false, false);
    Sequence::new(state, sampler, prompt, limits).expect("sequence").with_mask(Some(mask))
}

/// Runs `seq` to its end: the text, how it ended, and how many passes it took.
fn run(loaded: &Loaded, seq: &mut Sequence) -> (String, FinishReason, usize) {
    let mut tokens = Vec::new();
    let mut passes = 0;
    loop {
        if let Some(reason) = seq.stop_reason().filter(|_| seq.generated() > 0) {
            return (loaded.tokenizer.decode(&tokens), reason, passes);
        }
        passes += 1;
        let mut logits = seq.feed(&loaded.model).expect("feed").expect("not interrupted");
        match seq.choose(&mut logits) {
            Choice::Token(t) => {
                tokens.push(t);
                tokens.extend(seq.forced());
            }
            Choice::Done(reason) => {
                assert_eq!(seq.constraint_error(), None);
                return (loaded.tokenizer.decode(&tokens), reason, passes);
            }
        }
    }
}

#[test]
fn answers_match_their_constraint_greedy_and_sampled() {
    let (_dir, loaded) = mini();
    let grammars = Grammars::new(loaded.tokenizer.clone(), false).expect("grammars");
    let date = Constraint::Regex("[0-9]{4}-[0-9]{2}-[0-9]{2}".into());
    let choice = Constraint::Choice(vec!["the red one".into(), "the blue one".into(), "green".into()]);
    let object = Constraint::concise("name, age int").expect("schema");
    for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (1.5, 3)] {
        let mut seq = sequence(&loaded, grammars.mask(&date, None).expect("mask"), temperature, seed, 40);
        let (text, finish, _) = run(&loaded, &mut seq);
        assert_eq!(finish, FinishReason::Eos, "{text:?}");
        assert_eq!(seq.complete(), Some(true));
        let bytes = text.as_bytes();
        assert!(
            text.len() == 10
                && bytes[4] == b'-'
                && bytes[7] == b'-'
                && text.replace('-', "").bytes().all(|b| b.is_ascii_digit()),
            "{text:?}"
        );

        let mut seq = sequence(&loaded, grammars.mask(&choice, None).expect("mask"), temperature, seed, 40);
        let (text, finish, passes) = run(&loaded, &mut seq);
        assert!(["the red one", "the blue one", "green"].contains(&text.as_str()), "{text:?}");
        assert_eq!(finish, FinishReason::Eos);
        // Once a choice is told apart, the rest of it is forced: fewer passes than tokens.
        assert!(passes < seq.generated(), "{passes} passes for {} tokens", seq.generated());

        let mut seq = sequence(&loaded, grammars.mask(&object, None).expect("mask"), temperature, seed, 200);
        let (text, finish, _) = run(&loaded, &mut seq);
        if finish == FinishReason::Eos {
            let value: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(value["name"].is_string() && value["age"].is_i64(), "{text}");
        } else {
            // A random model may write a name longer than -n: then the answer says so.
            assert_eq!((finish, seq.complete()), (FinishReason::Length, Some(false)), "{text:?}");
            assert!(text.starts_with("{\"name\": \""), "{text:?}");
        }
    }
}

#[test]
fn an_answer_cut_by_the_length_limit_is_not_complete_and_forced_tokens_respect_it() {
    let (_dir, loaded) = mini();
    let grammars = Grammars::new(loaded.tokenizer.clone(), false).expect("grammars");
    let object =
        Constraint::concise("a_rather_long_field_name, another_long_field_name int").expect("schema");
    let mut seq = sequence(&loaded, grammars.mask(&object, None).expect("mask"), 0.0, 0, 3);
    let (_, finish, _) = run(&loaded, &mut seq);
    assert_eq!((finish, seq.generated(), seq.complete()), (FinishReason::Length, 3, Some(false)));
}

#[test]
fn a_rewound_constraint_continues_as_if_the_tokens_were_never_chosen() {
    let (_dir, loaded) = mini();
    let grammars = Grammars::new(loaded.tokenizer.clone(), false).expect("grammars");
    let re = Constraint::Regex("[a-z]{3,12}( [a-z]{2,8}){2}".into());
    let mut straight = sequence(&loaded, grammars.mask(&re, None).expect("mask"), 0.0, 0, 30);
    let (expected, _, _) = run(&loaded, &mut straight);
    let mut seq = sequence(&loaded, grammars.mask(&re, None).expect("mask"), 0.0, 0, 30);
    let prompt_len = seq.prompt_len();
    let first_logits = seq.feed(&loaded.model).expect("feed").expect("logits");
    assert!(matches!(seq.choose(&mut first_logits.clone()), Choice::Token(_)));
    for _ in 0..2 {
        let mut logits = seq.feed(&loaded.model).expect("feed").expect("logits");
        assert!(matches!(seq.choose(&mut logits), Choice::Token(_)));
    }
    // Back to the prompt: the mask is where it started, so the first pass's logits choose
    // the same first token (and forced ones), and the rest follows as in the straight run.
    seq.rewind(prompt_len).expect("rewind");
    assert_eq!((seq.constraint_error(), seq.generated()), (None, 0));
    let Choice::Token(first) = seq.choose(&mut first_logits.clone()) else { panic!("a first token") };
    let head: Vec<u32> = std::iter::once(first).chain(seq.forced().iter().copied()).collect();
    let (rest, _, _) = run(&loaded, &mut seq);
    assert_eq!(format!("{}{rest}", loaded.tokenizer.decode(&head)), expected);
}

#[test]
fn a_reasoning_model_thinks_freely_until_its_closing_tag() {
    let (_dir, loaded) = mini();
    let tok = &loaded.tokenizer;
    let grammars = Grammars::new(tok.clone(), true).expect("grammars");
    let (open, close) =
        (tok.token_id("<think>").expect("<think>"), tok.token_id("</think>").expect("</think>"));
    let digit = tok.encode("7", false, false)[0];
    let letter = tok.encode("x", false, false)[0];
    let constraint = Constraint::Regex("[0-9]+".into());
    let allowed = |mask: &mut Mask| {
        let mut logits = vec![0.0; tok.vocab_size()];
        mask.apply(&mut logits).expect("apply");
        move |id: u32| logits[id as usize] > f32::NEG_INFINITY
    };
    // At the start the model may open its thinking, or answer at once.
    let think = Think { open, close, open_in_prompt: false };
    let mut mask = grammars.mask(&constraint, Some(think)).expect("mask");
    let ok = allowed(&mut mask);
    assert!(ok(open) && ok(digit) && !ok(letter) && !ok(close));
    mask.accept(open).expect("open");
    // Thinking: anything goes, the grammar waits.
    assert!(allowed(&mut mask)(letter));
    mask.accept(letter).expect("think");
    assert!(!mask.complete());
    mask.accept(close).expect("close");
    let ok = allowed(&mut mask);
    assert!(ok(digit) && !ok(letter) && !ok(open));
    mask.accept(digit).expect("digit");
    assert!(mask.complete());
    // Rewinding past the closing tag thinks again.
    mask.rewind(2);
    assert!(allowed(&mut mask)(letter));
    // A prompt that opened the thinking starts there.
    let mut mask = grammars.mask(&constraint, Some(Think { open_in_prompt: true, ..think })).expect("mask");
    assert!(allowed(&mut mask)(letter));
}

#[test]
fn tokens_that_print_text_are_text_and_control_tokens_never_are() {
    let (_dir, loaded) = mini();
    let tok = &loaded.tokenizer;
    let grammars = Grammars::new(tok.clone(), true).expect("grammars");
    let allowed = |re: &str| {
        let mut mask = grammars.mask(&Constraint::Regex(re.into()), None).expect("mask");
        let mut logits = vec![0.0; tok.vocab_size()];
        mask.apply(&mut logits).expect("apply");
        move |text: &str| {
            logits[tok.token_id(text).unwrap_or_else(|| panic!("{text}")) as usize] > f32::NEG_INFINITY
        }
    };
    // `<think>` is user-defined: it prints its text, so a grammar may write it as text.
    assert!(allowed("<think>[0-9]")("<think>"));
    // A control token prints nothing: no text matches it, but the ends of generation
    // (`<|im_end|>`, `<|endoftext|>`) are allowed where the grammar accepts.
    let any = allowed("(?s).*");
    assert!(!any("<|im_start|>"));
    assert!(any("<|im_end|>") && any("<|endoftext|>"));
    assert!(!allowed("[0-9]+")("<|im_end|>"));
}

/// Proposes the tokens a reference run wrote after the history, the one at `wrong_at` of each
/// proposal replaced by `wrong`.
struct Replay {
    prompt_len: usize,
    tokens: Vec<u32>,
    wrong_at: Option<(usize, u32)>,
}

impl crate::speculate::Propose for Replay {
    fn propose(&mut self, history: &[u32], max: usize) -> anyhow::Result<Vec<u32>> {
        let mut next: Vec<u32> =
            self.tokens.iter().skip(history.len() - self.prompt_len).take(max).copied().collect();
        if let Some((j, wrong)) = self.wrong_at
            && j < next.len()
        {
            next[j] = wrong;
        }
        Ok(next)
    }

    fn feedback(&mut self, _: usize, _: usize) {}
}

/// Runs a generator of `constraint` to its end, with `proposer` when given: its tokens
/// (forced ones included), how it ended, and (proposed, accepted).
fn generate(
    loaded: &Loaded,
    grammars: &Grammars,
    constraint: &Constraint,
    proposer: Option<Replay>,
) -> (Vec<u32>, FinishReason, Option<(usize, usize)>) {
    let tok = &loaded.tokenizer;
    let state = loaded.model.new_state(512).expect("state");
    let sampler = Sampler::new(SamplingParams { temperature: 0.0, ..SamplingParams::default() });
    let limits = Limits {
        max_tokens: Some(60),
        end_of_generation: tok.end_of_generation_ids().to_vec(),
        ..Limits::default()
    };
    let prompt = tok.encode("The answer is", false, false);
    let mut generator = Generator::new(&loaded.model, state, sampler, prompt, limits).expect("generator");
    if let Some(proposer) = proposer {
        generator = generator.with_speculation(Box::new(proposer), 6, false);
    }
    let mut generator = generator.with_mask(Some(grammars.mask(constraint, None).expect("mask")));
    let (mut tokens, mut end) = (Vec::new(), None);
    for step in generator.by_ref() {
        match step.expect("step") {
            Step::Token(t) => tokens.push(t),
            Step::Done(g) => end = Some(g.finish),
            Step::Prefilled => {}
        }
    }
    let counts = generator.speculation_counts().map(|c| (c.proposed, c.accepted));
    (tokens, end.expect("an end"), counts)
}

/// Speculation under a constraint changes nothing but the speed: with proposals all right,
/// wrong at each position, or refused by the grammar, the tokens and the end are those of
/// plain constrained decoding. Proposals that go on with the tokens the grammar forces are
/// accepted through them (all right, all accepted: the object's keys are forced mid-pass).
#[test]
fn speculation_under_a_constraint_gives_the_tokens_of_plain_constrained_decoding() {
    let (_dir, loaded) = mini();
    let tok = &loaded.tokenizer;
    let grammars = Grammars::new(tok.clone(), false).expect("grammars");
    let prompt_len = tok.encode("The answer is", false, false).len();
    // A token no constraint here allows (a letter in a date; `{` inside a string is allowed,
    // so the object's wrong token is one the straight run never writes: rejected, not refused).
    let letter = tok.encode("x", false, false)[0];
    let constraints = [
        Constraint::Regex("[0-9]{4}-[0-9]{2}-[0-9]{2}".into()),
        Constraint::concise("name, age int, city").expect("schema"),
        Constraint::Choice(vec!["the red one".into(), "the blue one".into(), "green".into()]),
    ];
    for constraint in &constraints {
        let (straight, finish, counts) = generate(&loaded, &grammars, constraint, None);
        assert_eq!(counts, None);
        assert!(straight.len() > 4, "{:?}", tok.decode(&straight));
        for wrong_at in [None, Some((0, letter)), Some((1, letter)), Some((2, letter)), Some((3, letter))] {
            let replay = Replay { prompt_len, tokens: straight.clone(), wrong_at };
            let (tokens, end, counts) = generate(&loaded, &grammars, constraint, Some(replay));
            let what = format!("{:?}, wrong at {wrong_at:?}", tok.decode(&straight));
            assert_eq!((tokens.as_slice(), end), (straight.as_slice(), finish), "{what}");
            let (proposed, accepted) = counts.expect("speculated");
            match wrong_at {
                // (A choice is forced once told apart: it may leave nothing to propose.)
                None => assert!(
                    accepted == proposed && (proposed > 0 || matches!(constraint, Constraint::Choice(_))),
                    "all right, all accepted: {what}: {proposed} proposed, {accepted} accepted"
                ),
                // A letter first is refused by the date's grammar: nothing is ever proposed.
                Some((0, _)) if matches!(constraint, Constraint::Regex(_)) => {
                    assert_eq!(proposed, 0, "{what}")
                }
                // The date and the choices refuse the letter anywhere: it is cut before the
                // pass, never a rejected row.
                Some(_) if !matches!(constraint, Constraint::JsonSchema(_)) => {
                    assert_eq!(accepted, proposed, "{what}")
                }
                Some(_) => {}
            }
        }
    }
}

#[test]
fn proposals_are_cut_where_the_constraint_refuses_one() {
    let (_dir, loaded) = mini();
    let tok = &loaded.tokenizer;
    let grammars = Grammars::new(tok.clone(), true).expect("grammars");
    let (open, close) =
        (tok.token_id("<think>").expect("<think>"), tok.token_id("</think>").expect("</think>"));
    let digits = tok.encode("2024", false, false);
    let (dash, letter) = (tok.encode("-", false, false)[0], tok.encode("x", false, false)[0]);
    let date = Constraint::Regex("[0-9]{4}-[0-9]{2}".into());
    let mut mask = grammars.mask(&date, None).expect("mask");
    let ahead = [digits.as_slice(), &[dash, letter, dash]].concat();
    assert_eq!(mask.allowed_prefix(&ahead), digits.len() + 1);
    assert_eq!(mask.allowed_prefix(&[letter]), 0);
    // Nothing was taken: the mask still starts at the first digit.
    assert_eq!(mask.allowed_prefix(&digits), digits.len());
    // A reasoning model's thinking is free up to its closing tag, then the grammar's.
    let think = Think { open, close, open_in_prompt: false };
    let mut mask = grammars.mask(&date, Some(think)).expect("mask");
    let thought = [&[open, letter, letter, close][..], &digits, &[letter]].concat();
    assert_eq!(mask.allowed_prefix(&thought), 4 + digits.len());
    assert_eq!(mask.allowed_prefix(&[letter, open]), 0);
    let mut mask = grammars.mask(&date, Some(Think { open_in_prompt: true, ..think })).expect("mask");
    assert_eq!(mask.allowed_prefix(&[letter, dash, open]), 3);
}
