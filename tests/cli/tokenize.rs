//! The tokenizer on the real test model against llama.cpp's own tokenization and detokenization
//! (the shared reference and our committed `tests/data` files), plus round trips and timings.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::Value as Json;
use streamgen::gguf::Gguf;
use streamgen::tokenizer::{StreamDecoder, Tokenizer};

use crate::support;

/// The test model's tokenizer, built once for all tests in this file.
fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let gguf = Gguf::open(&support::test_model()).expect("open the test model");
        Tokenizer::from_gguf(&gguf).expect("tokenizer from the test model")
    })
}

fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e} (tokenize-extra.json and decode-extra.json are produced with \
             llama.cpp's llama-tokenize on the test model and committed under tests/data)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn ids(value: &Json, what: &str) -> Vec<u32> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{what} is not an array"))
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .unwrap_or_else(|| panic!("{what} holds a non-id {v}"))
        })
        .collect()
}

/// Checks every `{text, ids_parse_special, ids_no_parse_special}` entry of `path`; the failure
/// message lists every mismatch with both id lists and a summary count.
fn check_tokenize_file(path: &Path) {
    let tok = tokenizer();
    let json = read_json(path);
    let entries = json.as_array().unwrap_or_else(|| panic!("{} is not a list", path.display()));
    assert!(!entries.is_empty(), "{} has no entries", path.display());
    let mut mismatches = Vec::new();
    let mut matched = 0;
    for (i, entry) in entries.iter().enumerate() {
        let text = entry["text"].as_str().unwrap_or_else(|| panic!("{} entry {i}: no text", path.display()));
        let mut ok = true;
        for (key, parse_special) in [("ids_parse_special", true), ("ids_no_parse_special", false)] {
            let want = ids(&entry[key], &format!("{} entry {i} {key}", path.display()));
            let got = tok.encode(text, true, parse_special);
            if got != want {
                ok = false;
                mismatches.push(format!(
                    "  entry {i} {text:?} ({key}):\n    llama.cpp: {want:?}\n    ours:      {got:?}"
                ));
            }
        }
        matched += usize::from(ok);
    }
    assert!(
        mismatches.is_empty(),
        "tokenize ({}): {matched}/{} strings matched\n{}",
        path.display(),
        entries.len(),
        mismatches.join("\n")
    );
}

#[test]
fn tokenize_matches_llama_cpp_reference() {
    check_tokenize_file(&support::shared_reference("tokenize.json"));
}

#[test]
fn tokenize_matches_llama_cpp_extra() {
    check_tokenize_file(&support::test_data("gemma3-270m/tokenize-extra.json"));
}

#[test]
fn decode_matches_llama_cpp_extra() {
    let tok = tokenizer();
    let path = support::test_data("gemma3-270m/decode-extra.json");
    let json = read_json(&path);
    let entries = json.as_array().unwrap_or_else(|| panic!("{} is not a list", path.display()));
    assert!(!entries.is_empty(), "{} has no entries", path.display());
    let mut mismatches = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let want = entry["text"].as_str().unwrap_or_else(|| panic!("{} entry {i}: no text", path.display()));
        let ids = ids(&entry["ids"], &format!("{} entry {i} ids", path.display()));
        let got = tok.decode(&ids);
        if got != want {
            mismatches.push(format!("  entry {i} {ids:?}:\n    llama.cpp: {want:?}\n    ours:      {got:?}"));
        }
        // Streaming the same tokens gives the same text.
        let mut stream = StreamDecoder::new();
        let mut streamed: String = ids.iter().map(|&id| stream.push(tok.token_bytes(id))).collect();
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, got, "entry {i}: streamed text differs from decode");
    }
    assert!(
        mismatches.is_empty(),
        "decode: {}/{} id lists matched\n{}",
        entries.len() - mismatches.len(),
        entries.len(),
        mismatches.join("\n")
    );
}

#[test]
fn test_model_vocabulary_facts() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 262_144);
    assert_eq!(tok.bos_id(), Some(2));
    assert_eq!(tok.eos_id(), Some(1));
    assert!(tok.adds_bos());
    assert_eq!(tok.token_id("<start_of_turn>"), Some(105));
    assert_eq!(tok.token_id("<end_of_turn>"), Some(106));
    assert_eq!(tok.token_text(107), Some("\n"));
    assert!(tok.is_control(105) && tok.is_control(2) && !tok.is_control(107));
    // End of generation: <eos>, <end_of_turn>, and "</s>", which llama.cpp lists by text.
    let eog = tok.end_of_generation_ids();
    for id in [1, 106] {
        assert!(tok.is_end_of_generation(id), "{id} should end generation: {eog:?}");
    }
    assert!(!tok.is_end_of_generation(2) && !tok.is_end_of_generation(107));
    // Byte tokens print their byte; control tokens print nothing.
    assert_eq!(tok.token_bytes(tok.token_id("<0x0A>").expect("<0x0A>")), b"\n");
    assert_eq!(tok.token_bytes(105), b"");
    assert_eq!(tok.token_bytes(tok.token_id("▁Hello").expect("▁Hello")), b" Hello");
}

/// Strings for which decode(encode(text)) must give the text back.
fn round_trip_samples() -> Vec<String> {
    let mut samples: Vec<String> = [
        "",
        " ",
        "  ",
        "\n",
        "\t\t x",
        "Hello world",
        " Hello world ",
        "line one\nline two\n\n\nline four\r\n",
        "The year 2024 had 366 days; π≈3.14159.",
        "emoji: 😀🎉👍🏽 and ❤️ 🏳️‍🌈 family 👨‍👩‍👧",
        "日本語のテキスト、中文文本，한국어 텍스트",
        "Ελληνικά, русский, עברית, العربية, हिन्दी",
        "<start_of_turn>user\nHi<end_of_turn>\n",
        "<table><tr><td>x</td></tr></table>",
        "<bos><eos><pad><unk><mask>",
        "<unused0><unused99>[multimodal]<start_of_image>",
        "fn main() {\n    println!(\"hi\");\n}\n",
        "    four spaces and                                  a long run",
        "zero\u{200b}width\u{feff}bom\u{0}nul\u{7f}del",
        "combining é vs é, ﬁ ligature, Ａ fullwidth",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 \u{10FFFF} \u{E000}",
        "https://example.com/path?q=1&r=two#frag",
        "!!!???...,,,;;;",
        "a\u{2581}b ▁▁ ▁",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Every printable ASCII character, and a long mixed text.
    samples.push((0x20u8..0x7f).map(char::from).collect());
    samples.push("The quick brown fox jumps over the lazy dog. ".repeat(40));
    samples
}

#[test]
fn decode_of_encode_gives_the_text_back() {
    let tok = tokenizer();
    let mut failures = Vec::new();
    for text in round_trip_samples() {
        let ids = tok.encode(&text, false, false);
        let back = tok.decode(&ids);
        if back != text {
            failures.push(format!("  {text:?}\n    ids:  {ids:?}\n    back: {back:?}"));
        }
    }
    assert!(failures.is_empty(), "round trip failed for:\n{}", failures.join("\n"));
}

/// The text of `</s>` is the one exception to the round trip: llama.cpp makes that vocabulary
/// entry a control token (it ends generation), so it is neither split out of plain text nor
/// printed, yet SentencePiece can still merge the characters into it.
#[test]
fn closing_s_tag_follows_llama_cpp() {
    let tok = tokenizer();
    let id = tok.token_id("</s>").expect("</s> in the vocabulary");
    assert!(tok.is_control(id) && tok.is_end_of_generation(id));
    assert_eq!(
        tok.encode("a</s>b", false, true),
        vec![tok.token_id("a").expect("a"), id, tok.token_id("b").expect("b")]
    );
}

/// Prints how long building the tokenizer and encoding take (run with `--nocapture` to see).
#[test]
#[allow(clippy::print_stderr)]
fn tokenizer_timings() {
    let t = Instant::now();
    let gguf = Gguf::open(&support::test_model()).expect("open the test model");
    let open = t.elapsed();
    let t = Instant::now();
    let tok = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    let build = t.elapsed();

    let text: String = round_trip_samples().concat();
    let text = &text[..text.char_indices().map(|(i, _)| i).take_while(|&i| i <= 4096).last().unwrap_or(0)];
    let t = Instant::now();
    let rounds = 20;
    let mut n_ids = 0;
    for _ in 0..rounds {
        n_ids = tok.encode(text, true, true).len();
    }
    let encode = t.elapsed() / rounds;
    eprintln!(
        "tokenizer timings: Gguf::open {open:?}, Tokenizer::from_gguf {build:?}, \
         encode of {} bytes ({n_ids} ids) {encode:?}",
        text.len()
    );
    assert!(n_ids > 500, "{n_ids} ids for {} bytes", text.len());
}

#[test]
fn tmp_diff_against_llama_tokenize() {
    let tok = tokenizer();
    let mut bad = Vec::new();
    for k in 0..24 {
        let text = std::fs::read_to_string(format!("/tmp/tok/diff/{k}.txt")).expect("txt");
        for (m, ps) in [("ps", true), ("nps", false)] {
            let want: Vec<u32> = serde_json::from_str(
                &std::fs::read_to_string(format!("/tmp/tok/diff/{k}.{m}")).expect("ids"),
            )
            .expect("json");
            let got = tok.encode(&text, true, ps);
            if got != want {
                let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
                bad.push(format!(
                    "{k}.{m}: first diff at {i}: want {:?} got {:?}",
                    &want[i.saturating_sub(3)..(i + 5).min(want.len())],
                    &got[i.saturating_sub(3)..(i + 5).min(got.len())]
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
