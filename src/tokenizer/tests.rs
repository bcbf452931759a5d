//! Unit tests of the tokenizer over small synthetic vocabularies: SentencePiece merges, byte
//! fallback, special tokens and their partition (against a port of llama.cpp's loop), BOS/EOS,
//! end of generation, errors, and properties of encode, decode and streaming.

use super::*;
use crate::test_support::{Rng, gguf_with};

/// One vocabulary entry: text, score, token_type.
type Entry<'a> = (&'a str, f32, i32);

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER: i32 = 4;
const BYTE: i32 = 6;

fn vocab_metadata(entries: &[Entry]) -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::String("test".into())),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(entries.iter().map(|e| Value::String(e.0.into())).collect())),
        ("tokenizer.ggml.scores", Value::Array(entries.iter().map(|e| Value::F32(e.1)).collect())),
        ("tokenizer.ggml.token_type", Value::Array(entries.iter().map(|e| Value::I32(e.2)).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(2)),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(3)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
    ]
}

/// A small Gemma-like vocabulary: specials, all 256 byte tokens, then words.
fn entries() -> Vec<(String, f32, i32)> {
    let mut v: Vec<(String, f32, i32)> = vec![
        ("<pad>".into(), -1000.0, CONTROL),
        ("<eos>".into(), -1000.0, CONTROL),
        ("<bos>".into(), -1000.0, CONTROL),
        ("<unk>".into(), -1000.0, UNKNOWN),
        ("<start_of_turn>".into(), -1000.0, CONTROL),
        ("<end_of_turn>".into(), -1000.0, CONTROL),
        ("\n".into(), -1000.0, USER),
        ("\n\n".into(), -1000.0, USER),
        ("  ".into(), -1000.0, USER),
        ("   ".into(), -1000.0, USER),
        ("<table>".into(), -1000.0, USER),
        ("<tab".into(), -1000.0, USER),
        ("ble>".into(), -1000.0, USER),
    ];
    for b in 0..=255u8 {
        v.push((format!("<0x{b:02X}>"), 0.0, BYTE));
    }
    for (text, score) in [
        ("▁", -1.0),
        ("a", -2.0),
        ("b", -3.0),
        ("c", -4.0),
        ("ab", -5.0),
        ("bc", -6.0),
        ("h", -7.0),
        ("e", -8.0),
        ("l", -9.0),
        ("o", -10.0),
        ("he", -11.0),
        ("ll", -12.0),
        ("llo", -13.0),
        ("hello", -14.0),
        ("▁hello", -15.0),
        ("<", -16.0),
        (">", -17.0),
        ("x", -18.0),
        ("xx", -19.0),
        ("y", -20.0),
        ("z", -21.0),
        ("yz", -5.5),
        ("xy", -5.5),
    ] {
        v.push((text.into(), score, NORMAL));
    }
    v
}

fn tokenizer_from(entries: &[(String, f32, i32)]) -> Tokenizer {
    let e: Vec<Entry> = entries.iter().map(|(t, s, ty)| (t.as_str(), *s, *ty)).collect();
    let (_file, gguf) = gguf_with(vocab_metadata(&e));
    Tokenizer::from_gguf(&gguf).expect("tokenizer")
}

fn tokenizer() -> Tokenizer {
    tokenizer_from(&entries())
}

fn ids(tok: &Tokenizer, texts: &[&str]) -> Vec<u32> {
    texts.iter().map(|t| tok.token_id(t).unwrap_or_else(|| panic!("no token {t:?}"))).collect()
}

#[test]
fn merges_follow_scores() {
    let tok = tokenizer();
    // "ab" (-5) beats "bc" (-6).
    assert_eq!(tok.encode("abc", false, false), ids(&tok, &["ab", "c"]));
    // "hello" builds up through he, ll, llo; "▁hello" needs the space mark.
    assert_eq!(tok.encode("hello", false, false), ids(&tok, &["hello"]));
    assert_eq!(tok.encode(" hello", false, false), ids(&tok, &["▁hello"]));
    // Equal scores ("xy" and "yz" both -5.5): the leftmost pair merges first.
    assert_eq!(tok.encode("xyz", false, false), ids(&tok, &["xy", "z"]));
    // Equal pairs: left to right.
    assert_eq!(tok.encode("xxx", false, false), ids(&tok, &["xx", "x"]));
}

#[test]
fn higher_score_wins_regardless_of_position() {
    let mut e = entries();
    for entry in e.iter_mut() {
        if entry.0 == "bc" {
            entry.1 = -4.5;
        }
    }
    let tok = tokenizer_from(&e);
    assert_eq!(tok.encode("abc", false, false), ids(&tok, &["a", "bc"]));
}

#[test]
fn unknown_characters_fall_back_to_bytes() {
    let tok = tokenizer();
    assert_eq!(tok.encode("é", false, false), ids(&tok, &["<0xC3>", "<0xA9>"]));
    assert_eq!(tok.encode("a😀", false, false), ids(&tok, &["a", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]));
    assert_eq!(tok.decode(&tok.encode("a😀é", false, false)), "a😀é");
}

#[test]
fn user_defined_tokens_split_even_without_parse_special() {
    let tok = tokenizer();
    let want = ids(&tok, &["ab", "\n\n", "  ", "hello", "\n"]);
    assert_eq!(tok.encode("ab\n\n  hello\n", false, false), want);
    assert_eq!(tok.encode("ab\n\n  hello\n", false, true), want);
    // Longest first: three spaces beat two; five spaces are three then two.
    assert_eq!(tok.encode("a     b", false, false), ids(&tok, &["a", "   ", "  ", "b"]));
    // "<table>" (7 bytes) is taken before its pieces "<tab" and "ble>".
    assert_eq!(tok.encode("x<table>x", false, false), ids(&tok, &["x", "<table>", "x"]));
    assert_eq!(tok.encode("<tabxble>", false, false), ids(&tok, &["<tab", "x", "ble>"]));
}

/// Phi-3's special tokens swallow the whitespace after them (llama.cpp sets RSTRIP by the
/// model's name), except <s>, <unk> and <|endoftext|>.
#[test]
fn phi3_special_tokens_strip_the_whitespace_after_them() {
    let e: Vec<(String, f32, i32)> = entries();
    let e: Vec<Entry> = e.iter().map(|(t, s, ty)| (t.as_str(), *s, *ty)).collect();
    let text = "<start_of_turn>\n  hello<end_of_turn>\n";
    let plain = tokenizer();
    let mut meta = vocab_metadata(&e);
    meta.push(("general.name", Value::String("Phi-3 mini".into())));
    let (_file, gguf) = gguf_with(meta);
    let phi3 = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    assert_eq!(phi3.encode(text, false, true), ids(&phi3, &["<start_of_turn>", "hello", "<end_of_turn>"]));
    assert_eq!(
        plain.encode(text, false, true),
        ids(&plain, &["<start_of_turn>", "\n", "  ", "hello", "<end_of_turn>", "\n"])
    );
    // Without parse_special the control tokens are text: no whitespace after them goes.
    let unparsed = phi3.decode(&phi3.encode("<start_of_turn> x", false, false));
    assert_eq!(unparsed, "<start_of_turn> x");
}

#[test]
fn control_tokens_need_parse_special() {
    let tok = tokenizer();
    let text = "<start_of_turn>hello<end_of_turn>";
    assert_eq!(tok.encode(text, false, true), ids(&tok, &["<start_of_turn>", "hello", "<end_of_turn>"]));
    let plain = tok.encode(text, false, false);
    assert!(!plain.iter().any(|&id| tok.is_control(id)), "{plain:?}");
    assert_eq!(tok.decode(&plain), text);
    // The unknown token is not split out without parse_special either.
    assert!(!tok.encode("<unk>", false, false).contains(&3));
    assert_eq!(tok.encode("<unk>", false, true), vec![3]);
}

#[test]
fn bos_is_added_when_asked_and_the_file_says_so() {
    let tok = tokenizer();
    assert!(tok.adds_bos());
    assert_eq!(tok.bos_id(), Some(2));
    assert_eq!(tok.eos_id(), Some(1));
    assert_eq!(tok.encode("ab", true, false), [vec![2], ids(&tok, &["ab"])].concat());
    assert_eq!(tok.encode("", true, false), vec![2]);
    assert_eq!(tok.encode("", false, false), Vec::<u32>::new());

    let e = entries();
    let entries: Vec<Entry> = e.iter().map(|(t, s, ty)| (t.as_str(), *s, *ty)).collect();
    let mut metadata = vocab_metadata(&entries);
    for (key, value) in metadata.iter_mut() {
        if *key == "tokenizer.ggml.add_bos_token" {
            *value = Value::Bool(false);
        }
    }
    metadata.push(("tokenizer.ggml.add_eos_token", Value::Bool(true)));
    let (_file, gguf) = gguf_with(metadata);
    let tok = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    assert!(!tok.adds_bos());
    assert_eq!(tok.encode("ab", true, false), [ids(&tok, &["ab"]), vec![1]].concat());
}

#[test]
fn space_prefix_when_the_file_asks_for_it() {
    let e = entries();
    let entries: Vec<Entry> = e.iter().map(|(t, s, ty)| (t.as_str(), *s, *ty)).collect();
    let mut metadata = vocab_metadata(&entries);
    metadata.retain(|(key, _)| *key != "tokenizer.ggml.add_space_prefix");
    let (_file, gguf) = gguf_with(metadata);
    let tok = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    // SentencePiece default: a space before the text and after each special token.
    assert_eq!(tok.encode("hello", false, false), ids(&tok, &["▁hello"]));
    assert_eq!(tok.encode("<start_of_turn>hello", false, true), ids(&tok, &["<start_of_turn>", "▁hello"]));
}

#[test]
fn decode_prints_pieces_and_skips_control_tokens() {
    let tok = tokenizer();
    let seq = ids(&tok, &["<bos>", "▁hello", "\n", "<start_of_turn>", "<0xC3>", "<0xA9>", "  ", "<eos>"]);
    assert_eq!(tok.decode(&seq), " hello\né  ");
    assert_eq!(tok.token_bytes(ids(&tok, &["<0xC3>"])[0]), &[0xC3]);
    assert_eq!(tok.token_bytes(2), b"");
    assert_eq!(tok.token_bytes(u32::MAX), b"");
    assert_eq!(tok.token_text(2), Some("<bos>"));
    assert_eq!(tok.token_text(1_000_000), None);
    // A lone continuation byte decodes lossily.
    assert_eq!(tok.decode(&ids(&tok, &["a", "<0xA9>"])), "a\u{FFFD}");
    assert_eq!(tok.vocab_size(), entries().len());
}

#[test]
fn end_of_generation_comes_from_ids_and_texts() {
    let tok = tokenizer();
    let eot = tok.token_id("<end_of_turn>").expect("eot");
    assert!(tok.is_end_of_generation(1));
    assert!(tok.is_end_of_generation(eot));
    assert!(!tok.is_end_of_generation(2));
    assert_eq!(tok.end_of_generation_ids(), &[1, eot]);
}

#[test]
fn eog_texts_become_control_tokens() {
    // llama.cpp forces "</s>" (an HTML tag in Gemma's vocabulary, user-defined) to a control
    // token that ends generation; it then prints nothing and is not split out of plain text.
    let mut e = entries();
    e.push(("</s>".into(), -1000.0, USER));
    let tok = tokenizer_from(&e);
    let id = tok.token_id("</s>").expect("</s>");
    assert!(tok.is_control(id));
    assert!(tok.is_end_of_generation(id));
    assert_eq!(tok.token_bytes(id), b"");
    assert_eq!(tok.encode("a</s>", false, true), [ids(&tok, &["a"]), vec![id]].concat());
    assert!(!tok.encode("a</s>", false, false).contains(&id));
}

/// A direct port of llama.cpp's fragment-splitting loop, to check the faster partition.
fn naive_partition(tok: &Tokenizer, text: &str, parse_special: bool) -> Vec<Fragment> {
    let mut order: Vec<u32> = (0..tok.vocab_size() as u32)
        .filter(|&id| tok.attrs[id as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
        .collect();
    order.sort_by_key(|&id| (std::cmp::Reverse(tok.text(id as usize).len()), id));
    let mut fragments = if text.is_empty() { vec![] } else { vec![Fragment::Text(0, text.len())] };
    for id in order {
        if !parse_special && tok.attrs[id as usize] & (attr::CONTROL | attr::UNKNOWN) != 0 {
            continue;
        }
        let needle = tok.text(id as usize).as_bytes();
        let mut next = Vec::new();
        for fragment in fragments {
            let Fragment::Text(mut start, end) = fragment else {
                next.push(fragment);
                continue;
            };
            while let Some(found) =
                text.as_bytes()[start..end].windows(needle.len()).position(|w| w == needle)
            {
                if found > 0 {
                    next.push(Fragment::Text(start, start + found));
                }
                next.push(Fragment::Token(id));
                start += found + needle.len();
            }
            if start < end {
                next.push(Fragment::Text(start, end));
            }
        }
        fragments = next;
    }
    fragments
}

#[test]
fn fast_partition_equals_llama_cpp_loop() {
    let tok = tokenizer();
    let alphabet = ["\n", " ", "<", "table>", "tab", "ble>", ">", "a", "<start_of_turn>", "<unk>", "é"];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for case in 0..3000 {
        let len = rng.below(14);
        let text: String = (0..len).map(|_| alphabet[rng.below(alphabet.len())]).collect();
        for parse_special in [false, true] {
            assert_eq!(
                tok.partition(&text, parse_special),
                naive_partition(&tok, &text, parse_special),
                "case {case}: {text:?} parse_special={parse_special}"
            );
        }
    }
}

#[test]
fn round_trip_on_random_text() {
    let tok = tokenizer();
    let alphabet = ["a", "b", "c", " ", "  ", "\n", "\t", "hello", "é", "😀", "<", ">", "<table>", "ü", "x"];
    let mut rng = Rng(42);
    for _ in 0..500 {
        let len = rng.below(20);
        let text: String = (0..len).map(|_| alphabet[rng.below(alphabet.len())]).collect();
        assert_eq!(tok.decode(&tok.encode(&text, false, false)), text, "{text:?}");
    }
}

#[test]
fn missing_tokenizer_is_an_error_naming_the_key() {
    let (_file, gguf) = gguf_with(vec![("general.architecture", Value::String("test".into()))]);
    let err = format!("{:#}", Tokenizer::from_gguf(&gguf).expect_err("no tokenizer"));
    assert!(err.contains("tokenizer.ggml.model"), "{err}");
    assert!(err.contains(&gguf.path().display().to_string()), "{err}");

    let mut metadata = vocab_metadata(&[("a", 0.0, NORMAL), ("b", 0.0, NORMAL), ("c", 0.0, NORMAL)]);
    metadata.retain(|(k, _)| *k != "tokenizer.ggml.tokens");
    let (_file, gguf) = gguf_with(metadata);
    let err = format!("{:#}", Tokenizer::from_gguf(&gguf).expect_err("no tokens"));
    assert!(err.contains("tokenizer.ggml.tokens"), "{err}");
}

#[test]
fn unsupported_model_is_a_clear_error() {
    let mut metadata = vocab_metadata(&[("a", 0.0, NORMAL), ("b", 0.0, NORMAL), ("c", 0.0, NORMAL)]);
    for (key, value) in metadata.iter_mut() {
        if *key == "tokenizer.ggml.model" {
            *value = Value::String("bert".into());
        }
    }
    let (_file, gguf) = gguf_with(metadata);
    let err = format!("{:#}", Tokenizer::from_gguf(&gguf).expect_err("bert"));
    assert!(err.contains("\"bert\"") && err.contains("not support"), "{err}");
}

#[test]
fn duplicate_entries_are_an_error() {
    let (_file, gguf) = gguf_with(vocab_metadata(&[
        ("a", 0.0, NORMAL),
        ("b", 0.0, NORMAL),
        ("c", 0.0, NORMAL),
        ("a", 0.0, NORMAL),
    ]));
    let err = format!("{:#}", Tokenizer::from_gguf(&gguf).expect_err("duplicate"));
    assert!(err.contains("duplicate") && err.contains("ids 0 and 3"), "{err}");
}

/// Property tests over the small SentencePiece vocabulary above (all 256 byte tokens, so
/// every text can be spelled).
mod properties {
    use std::sync::OnceLock;

    use proptest::prelude::*;

    use super::*;

    /// The vocabulary without a space prefix, and the same with SentencePiece's default prefix.
    fn spm(space_prefix: bool) -> &'static Tokenizer {
        static PLAIN: OnceLock<Tokenizer> = OnceLock::new();
        static PREFIXED: OnceLock<Tokenizer> = OnceLock::new();
        let build = move || {
            let e = entries();
            let entries: Vec<Entry> = e.iter().map(|(t, s, ty)| (t.as_str(), *s, *ty)).collect();
            let mut metadata = vocab_metadata(&entries);
            for (key, value) in metadata.iter_mut() {
                if *key == "tokenizer.ggml.add_space_prefix" {
                    *value = Value::Bool(space_prefix);
                }
            }
            let (_file, gguf) = gguf_with(metadata);
            Tokenizer::from_gguf(&gguf).expect("tokenizer")
        };
        if space_prefix { PREFIXED.get_or_init(build) } else { PLAIN.get_or_init(build) }
    }

    /// Arbitrary Unicode, or text made of the vocabulary's pieces (merges, user-defined and
    /// control token texts, the `▁` mark itself) where the interesting cases are.
    fn text() -> impl Strategy<Value = String> {
        let pieces = vec![
            "a",
            "b",
            "c",
            "ab",
            "hello",
            " ",
            "  ",
            "\n",
            "▁",
            "<",
            ">",
            "<table>",
            "<tab",
            "ble>",
            "<bos>",
            "<unk>",
            "<start_of_turn>",
            "é",
            "😀",
            "x",
            "y",
            "z",
            "\u{0}",
            "\u{FFFD}",
        ];
        prop_oneof![
            any::<String>(),
            proptest::collection::vec(proptest::sample::select(pieces), 0..16).prop_map(|p| p.concat()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Encoding any text with any flags gives ids inside the vocabulary.
        #[test]
        fn encode_never_panics(s in text(), add_special: bool, parse_special: bool, prefix: bool) {
            let tok = spm(prefix);
            for id in tok.encode(&s, add_special, parse_special) {
                prop_assert!((id as usize) < tok.vocab_size());
            }
        }

        /// Without a space prefix and without parsing control tokens, decoding gives the
        /// text back except for SentencePiece's one normalisation: the `▁` mark (U+2581)
        /// is how the vocabulary spells a space, so a `▁` in the text decodes as a space.
        #[test]
        fn decode_inverts_encode_up_to_the_space_mark(s in text()) {
            let tok = spm(false);
            prop_assert_eq!(tok.decode(&tok.encode(&s, false, false)), s.replace('▁', " "));
        }

        /// With the space prefix, SentencePiece puts a space before every raw-text fragment
        /// (at the start and after each user-defined token the text contains), as llama.cpp
        /// does; user-defined tokens decode verbatim.
        #[test]
        fn decode_inverts_encode_plus_one_space_per_fragment(s in text()) {
            let tok = spm(true);
            let mut want = String::new();
            for fragment in tok.partition(&s, false) {
                match fragment {
                    Fragment::Text(start, end) => {
                        want.push(' ');
                        want.push_str(&s[start..end].replace('▁', " "));
                    }
                    Fragment::Token(id) => want.push_str(tok.text(id as usize)),
                }
            }
            prop_assert_eq!(tok.decode(&tok.encode(&s, false, false)), want);
        }

        /// Streaming any ids (in range or not) through the incremental decoder, cut anywhere,
        /// gives the text `decode` gives for all of them at once.
        #[test]
        fn streamed_tokens_equal_the_full_decode(
            ids in proptest::collection::vec(0u32..300, 0..40),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let tok = spm(false);
            let bytes = tok.decode_bytes(&ids);
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut decoder = StreamDecoder::new();
            let mut streamed = String::new();
            // Token by token, as generation does ...
            for &id in &ids {
                streamed.push_str(&decoder.push(tok.token_bytes(id)));
            }
            streamed.push_str(&decoder.finish());
            prop_assert_eq!(&streamed, &tok.decode(&ids));
            // ... and the same bytes cut at arbitrary places, inside tokens.
            let mut at = 0;
            let mut cut_streamed = String::new();
            for cut in cuts.into_iter().chain([bytes.len()]) {
                cut_streamed.push_str(&decoder.push(&bytes[at..cut]));
                at = cut;
            }
            cut_streamed.push_str(&decoder.finish());
            prop_assert_eq!(cut_streamed, streamed);
        }
    }
}
