use candle_core::quantized::gguf_file::Value;

use super::*;

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER: i32 = 4;
const BYTE: i32 = 6;

/// A SentencePiece vocabulary with the reasoning tags as tokens of `tag_type` (user-defined
/// in Qwen3's and the R1 distills' GGUF files; control in some conversions), words, the
/// tag's halves as ordinary text, and byte tokens for `é` (two bytes, two tokens).
fn vocabulary(tag_type: i32) -> (tempfile::NamedTempFile, Tokenizer) {
    let entries: [(&str, i32); 14] = [
        ("<unk>", UNKNOWN),
        ("<s>", CONTROL),
        ("</s>", CONTROL),
        ("<think>", tag_type),
        ("</think>", tag_type),
        ("▁Hmm", NORMAL),
        ("<0x0A>", BYTE),
        ("▁Paris", NORMAL),
        (".", NORMAL),
        ("</th", NORMAL),
        ("ink>", NORMAL),
        ("<0xC3>", BYTE),
        ("<0xA9>", BYTE),
        ("<th", NORMAL),
    ];
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("test".into())),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(entries.iter().map(|e| Value::String(e.0.into())).collect())),
        ("tokenizer.ggml.scores", Value::Array(entries.iter().map(|_| Value::F32(0.0)).collect())),
        ("tokenizer.ggml.token_type", Value::Array(entries.iter().map(|e| Value::I32(e.1)).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ];
    let (file, gguf) = crate::test_support::gguf_with(metadata);
    let tokenizer = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    (file, tokenizer)
}

const OPEN: u32 = 3;
const CLOSE: u32 = 4;
const HMM: u32 = 5;
const NL: u32 = 6;
const PARIS: u32 = 7;
const DOT: u32 = 8;
const TH: u32 = 9;
const INK: u32 = 10;
const E1: u32 = 11;
const E2: u32 = 12;
const OPEN_TH: u32 = 13;

/// The events of `ids` generated after a prompt that does (or does not) open reasoning,
/// with splitting on.
fn events(tok: &Tokenizer, in_reasoning: bool, ids: &[u32]) -> Vec<Event> {
    let mut events = TokenEvents {
        decoder: StreamDecoder::new(),
        split: Some(Splitter::new(in_reasoning)),
        tags: ThinkTags::of(tok),
        pieces: Vec::new(),
    };
    let mut out = VecDeque::new();
    for &id in ids {
        events.token(tok, id, &mut out);
    }
    events.finish(&mut out);
    out.into()
}

/// Reasoning and answer text, and the ids the answer's text events carry.
fn texts(events: &[Event]) -> (String, String, Vec<u32>) {
    let (mut reasoning, mut answer, mut ids) = (String::new(), String::new(), Vec::new());
    for event in events {
        match event {
            Event::Reasoning { text } => {
                assert!(answer.is_empty(), "reasoning after the answer began: {events:?}");
                reasoning.push_str(text);
            }
            Event::Text { text, token } => {
                answer.push_str(text);
                ids.extend(token);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    (reasoning, answer, ids)
}

#[test]
fn tag_tokens_split_reasoning_from_the_answer_whatever_they_print() {
    for tag_type in [USER, CONTROL] {
        let (_file, tok) = vocabulary(tag_type);
        let tags = ThinkTags::of(&tok);
        assert_eq!((tags.open, tags.close), (Some(OPEN), Some(CLOSE)), "type {tag_type}");
        // <think>\n Hmm é \n</think>\n\n Paris é .  (é in two byte tokens, in both parts): the
        // white space after each tag is dropped.
        let ids = [OPEN, NL, HMM, E1, E2, NL, CLOSE, NL, NL, PARIS, E1, E2, DOT];
        let out = events(&tok, false, &ids);
        assert_eq!(out.first(), Some(&Event::Reasoning { text: String::new() }), "opened: {out:?}");
        let (reasoning, answer, answer_ids) = texts(&out);
        assert_eq!(reasoning, "Hmmé", "type {tag_type}");
        assert_eq!(answer, "Parisé.", "type {tag_type}");
        // Every answer token is reported, once, with the text it completes.
        assert_eq!(answer_ids, [PARIS, E1, E2, DOT], "type {tag_type}");
    }
}

#[test]
fn a_prompt_that_opened_reasoning_needs_only_the_closing_token() {
    let (_file, tok) = vocabulary(USER);
    let (reasoning, answer, _) = texts(&events(&tok, true, &[NL, HMM, CLOSE, NL, PARIS]));
    assert_eq!((reasoning.as_str(), answer.as_str()), ("Hmm", "Paris"));
}

#[test]
fn tags_spelled_in_ordinary_tokens_split_too_and_never_leak() {
    let (_file, tok) = vocabulary(USER);
    // "<th" "ink>" opens, "</th" "ink>" closes: the tags as text across token boundaries.
    let out = events(&tok, false, &[OPEN_TH, INK, HMM, TH, INK, NL, PARIS, DOT]);
    let (reasoning, answer, _) = texts(&out);
    assert_eq!((reasoning.as_str(), answer.as_str()), ("Hmm", "Paris."), "{out:?}");
}

#[test]
fn a_tag_after_the_answer_began_is_answer_text() {
    let (_file, tok) = vocabulary(USER);
    let (reasoning, answer, ids) = texts(&events(&tok, false, &[PARIS, OPEN, DOT, CLOSE]));
    assert_eq!(reasoning, "");
    assert_eq!(answer, " Paris<think>.</think>");
    assert_eq!(ids, [PARIS, OPEN, DOT, CLOSE]);
}

#[test]
fn output_cut_inside_reasoning_is_all_reasoning() {
    let (_file, tok) = vocabulary(CONTROL);
    let out = events(&tok, false, &[OPEN, HMM, TH]);
    let (reasoning, answer, _) = texts(&out);
    assert_eq!((reasoning.as_str(), answer.as_str()), ("Hmm</th", ""));
}
