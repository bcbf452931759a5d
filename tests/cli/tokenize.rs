//! The tokenizer on the real test models against llama.cpp's own tokenization and detokenization
//! (the shared reference and our committed `tests/data` files), llama.cpp's golden vocabulary
//! tests, plus round trips and timings.

use std::path::{Path, PathBuf};
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

/// The SmolLM2 test model's tokenizer (byte-level BPE, `tokenizer.ggml.pre = smollm`).
fn smollm2() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let gguf = Gguf::open(&support::test_model_smollm2()).expect("open the SmolLM2 test model");
        Tokenizer::from_gguf(&gguf).expect("tokenizer from the SmolLM2 test model")
    })
}

/// Checks every `{text, ids_parse_special, ids_no_parse_special}` entry of `path` against the
/// Gemma test model; the failure message lists every mismatch with both id lists and a count.
fn check_tokenize_file(path: &Path) {
    check_tokenize_file_with(tokenizer(), path);
}

fn check_tokenize_file_with(tok: &Tokenizer, path: &Path) {
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
    check_tokenize_file(&support::test_data("gemma3-270m/tokenize.json"));
}

/// 60 random strings (word salad with special-token texts, whitespace runs, control characters,
/// astral and private-use code points), tokenized by llama.cpp 0c1e570's `llama-tokenize
/// --ids --no-escape` (without `--no-escape` it would turn `\t` in the text into a tab).
#[test]
fn tokenize_matches_llama_cpp_random() {
    check_tokenize_file(&support::test_data("gemma3-270m/tokenize-random.json"));
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
        "a</s>b <s> </s",
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

/// A literal `▁` in the input is the same as a space: SentencePiece marks spaces with it before
/// merging, and llama.cpp does the same, so it comes back as a space.
#[test]
fn literal_space_mark_is_a_space() {
    let tok = tokenizer();
    // Single spaces only: runs of real spaces are user-defined tokens, split out first.
    assert_eq!(tok.encode("a\u{2581}b\u{2581}c", false, false), tok.encode("a b c", false, false));
    assert_eq!(tok.decode(&tok.encode("a▁b", false, false)), "a b");
}

/// `</s>` is an HTML tag in Gemma's vocabulary (user-defined, id 212), but llama.cpp lists it
/// among the end-of-generation texts and so makes it a control token: parsed as a special token
/// it ends generation and prints nothing; as plain text it is spelled out. The ids are
/// `llama-tokenize --ids --no-escape` output for this text.
#[test]
fn closing_s_tag_follows_llama_cpp() {
    let tok = tokenizer();
    let id = tok.token_id("</s>").expect("</s> in the vocabulary");
    assert_eq!(id, 212);
    assert!(tok.is_control(id) && tok.is_end_of_generation(id));
    assert_eq!(tok.token_bytes(id), b"");
    let text = "a</s>b <eos> x";
    assert_eq!(tok.encode(text, true, true), [2, 236746, 212, 236763, 236743, 1, 1123]);
    assert_eq!(
        tok.encode(text, true, false),
        [2, 236746, 954, 236751, 236813, 236763, 655, 211827, 236813, 1123]
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

    // About 4 KB of mixed text, cut at a character boundary.
    let all = round_trip_samples().concat().repeat(2);
    let cut = all.char_indices().map(|(i, _)| i).take_while(|&i| i <= 4096).last().unwrap_or(0);
    let text = &all[..cut];
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

    // Inputs that stress one part each: the special-token partition ("<", newlines), the merge
    // queue (one long word), byte fallback (rare characters).
    for (name, text) in [
        ("4 KB of '<'", "<".repeat(4096)),
        ("4 KB of newlines", "\n".repeat(4096)),
        ("4 KB of <start_of_turn>", "<start_of_turn>".repeat(273)),
        ("4 KB of 'a'", "a".repeat(4096)),
        ("4 KB of rare CJK", "𠀀𠀁𠀂𪜀".repeat(256)),
    ] {
        let t = Instant::now();
        let ids = tok.encode(&text, true, true);
        let elapsed = t.elapsed();
        eprintln!("tokenizer timings: encode of {name}: {} ids in {elapsed:?}", ids.len());
        assert_eq!(tok.decode(&tok.encode(&text, false, false)), text, "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// SmolLM2 (byte-level BPE) against llama.cpp.

#[test]
fn smollm2_tokenize_matches_llama_cpp_reference() {
    check_tokenize_file_with(smollm2(), &support::test_data("smollm2-135m/tokenize.json"));
}

/// The chat-rendered prompts of greedy.json, with special tokens parsed, as llama.cpp
/// tokenized them before generating.
#[test]
fn smollm2_prompt_ids_match_llama_cpp() {
    let tok = smollm2();
    let path = support::test_data("smollm2-135m/greedy.json");
    let json = read_json(&path);
    let entries = json.as_array().unwrap_or_else(|| panic!("{} is not a list", path.display()));
    assert!(entries.len() >= 3, "{} has {} entries", path.display(), entries.len());
    let mut mismatches = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let prompt = entry["prompt"].as_str().unwrap_or_else(|| panic!("entry {i}: no prompt"));
        let want = ids(&entry["prompt_ids"], &format!("{} entry {i} prompt_ids", path.display()));
        let got = tok.encode(prompt, true, true);
        if got != want {
            mismatches
                .push(format!("  entry {i} {prompt:?}:\n    llama.cpp: {want:?}\n    ours:      {got:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "prompt_ids: {}/{} matched\n{}",
        entries.len() - mismatches.len(),
        entries.len(),
        mismatches.join("\n")
    );
}

#[test]
fn smollm2_vocabulary_facts() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49_152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    // The file says add_bos_token = false.
    assert!(!tok.adds_bos());
    assert_eq!(tok.encode("Hello", true, false), tok.encode("Hello", false, false));
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    // <|endoftext|>, <|im_end|> and the FIM token <reponame> end generation, as in llama.cpp.
    for id in [0, 2, 4] {
        assert!(tok.is_end_of_generation(id), "{id}: {:?}", tok.end_of_generation_ids());
    }
    assert!(!tok.is_end_of_generation(1));
    // Byte-level pieces decode to raw bytes: "Ġworld" is " world", "Ċ" a newline.
    assert_eq!(tok.token_bytes(tok.token_id("Ġworld").expect("Ġworld")), b" world");
    assert_eq!(tok.token_bytes(tok.token_id("Ċ").expect("Ċ")), b"\n");
    assert_eq!(tok.token_bytes(1), b"");
}

#[test]
fn smollm2_decode_of_encode_gives_the_text_back() {
    let tok = smollm2();
    let mut failures = Vec::new();
    for text in round_trip_samples() {
        for parse_special in [false, true] {
            let ids = tok.encode(&text, false, parse_special);
            let back = tok.decode(&ids);
            // Parsed control tokens print nothing, so only the plain encoding must come back.
            if !parse_special && back != text {
                failures.push(format!("  {text:?}\n    ids:  {ids:?}\n    back: {back:?}"));
            }
            // Streaming the ids token by token gives the same text as decoding them at once,
            // also where a character's bytes are spread over several tokens.
            let mut stream = StreamDecoder::new();
            let mut streamed: String = ids.iter().map(|&id| stream.push(tok.token_bytes(id))).collect();
            streamed.push_str(&stream.finish());
            assert_eq!(streamed, back, "{text:?}: streamed text differs from decode");
        }
    }
    assert!(failures.is_empty(), "round trip failed for:\n{}", failures.join("\n"));
}

/// Characters whose bytes byte-level BPE spreads over several tokens come out whole from the
/// stream decoder, never as replacement characters.
#[test]
fn smollm2_streams_characters_split_across_tokens() {
    let tok = smollm2();
    let text = "𠀀𠀁 𪜀 🏳️‍🌈 ꙮ ᚠᛇᚻ";
    let ids = tok.encode(text, false, false);
    let split = ids.iter().filter(|&&id| std::str::from_utf8(tok.token_bytes(id)).is_err()).count();
    assert!(split >= 2, "expected tokens holding partial characters in {ids:?}");
    let mut stream = StreamDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        let piece = stream.push(tok.token_bytes(id));
        assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{piece:?} from token {id}");
        out.push_str(&piece);
    }
    out.push_str(&stream.finish());
    assert_eq!(out, text);
}

// ---------------------------------------------------------------------------------------------
// llama.cpp's golden tokenizer tests (`models/ggml-vocab-*.gguf` with `.inp`/`.out`, as its
// tests/test-tokenizer-0.cpp reads them: add_special = false, parse_special = false).

/// The inputs and expected ids of `ggml-vocab-<name>.gguf`.
fn golden_cases(name: &str) -> (PathBuf, Vec<(String, Vec<u32>)>) {
    let dir = support::test_vocab_dir();
    let vocab = dir.join(format!("ggml-vocab-{name}.gguf"));
    let read = |ext: &str| {
        let path = dir.join(format!("ggml-vocab-{name}.gguf.{ext}"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    };
    let (inp, out) = (read("inp"), read("out"));
    let mut inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    // The file ends with a separator.
    if inputs.last() == Some(&"") {
        inputs.pop();
    }
    let outputs: Vec<&str> = out.lines().collect();
    assert_eq!(inputs.len(), outputs.len(), "{name}: .inp and .out have different numbers of cases");
    let cases = inputs
        .iter()
        .zip(&outputs)
        .map(|(text, ids)| {
            let ids = ids
                .split_whitespace()
                .map(|id| id.parse().unwrap_or_else(|e| panic!("{name}.out: bad id {id:?}: {e}")))
                .collect();
            (text.to_string(), ids)
        })
        .collect();
    (vocab, cases)
}

/// Every case of `ggml-vocab-<name>` must give llama.cpp's ids.
fn check_golden(name: &str) {
    let (vocab, cases) = golden_cases(name);
    assert!(!cases.is_empty(), "{name}: no cases");
    let gguf = Gguf::open(&vocab).expect("open the vocabulary");
    let tok = Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let mut mismatches = Vec::new();
    for (text, want) in &cases {
        let got = tok.encode(text, false, false);
        if &got != want {
            mismatches.push(format!("  {text:?}:\n    llama.cpp: {want:?}\n    ours:      {got:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "ggml-vocab-{name}: {}/{} cases matched\n{}",
        cases.len() - mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}

/// A vocabulary whose pre-tokenizer streamgen lacks must fail to load, naming the value.
fn check_golden_unsupported(name: &str, pre: &str) {
    let (vocab, _) = golden_cases(name);
    let gguf = Gguf::open(&vocab).expect("open the vocabulary");
    let err = format!("{:#}", Tokenizer::from_gguf(&gguf).expect_err("unsupported pre-tokenizer"));
    assert!(err.contains(&format!("tokenizer.ggml.pre is \"{pre}\"")), "{name}: {err}");
}

macro_rules! golden {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                check_golden($name);
            }
        )*
    };
}

golden! {
    golden_gpt_2 => "gpt-2",
    golden_llama_bpe => "llama-bpe",
    golden_qwen2 => "qwen2",
    golden_qwen35 => "qwen35",
    golden_refact => "refact",
    golden_starcoder => "starcoder",
    golden_command_r => "command-r",
    golden_mpt => "mpt",
    golden_falcon => "falcon",
    golden_llama_spm => "llama-spm",
    golden_phi_3 => "phi-3",
}

#[test]
fn golden_deepseek_vocabularies_are_unsupported() {
    check_golden_unsupported("deepseek-coder", "deepseek-coder");
    check_golden_unsupported("deepseek-llm", "deepseek-llm");
}

/// Found by fuzz/bpe_tokenizer: StarCoder's vocabulary has no token for the byte 0xF1 (GPT-2's
/// `ñ`), which starts the UTF-8 of U+40000 to U+7FFFF, so such a character loses that byte, as
/// in llama.cpp, and byte-level BPE round-trips only the bytes the vocabulary spells. The
/// fuzzer's input is kept as found (its first byte was the target's flags).
#[test]
fn bpe_round_trip_drops_only_bytes_the_vocabulary_lacks() {
    let path = "tests/data/fuzz-regressions/bpe_tokenizer/starcoder-no-token-for-byte-f1";
    let input = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let text = String::from_utf8_lossy(&input[1..]);
    assert!(text.as_bytes().contains(&0xF1), "the input lost its 0xF1 byte");
    let gguf = Gguf::open(&support::test_vocab_dir().join("ggml-vocab-starcoder.gguf")).expect("open");
    let tok = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    assert_eq!(tok.token_id("ñ"), None, "StarCoder's vocabulary now spells 0xF1");
    let want: Vec<u8> = text.bytes().filter(|&b| b != 0xF1).collect();
    assert_eq!(tok.decode_bytes(&tok.encode(&text, false, false)), want);
    assert_eq!(tok.decode_bytes(&tok.encode("a\u{5F601}b", false, false)), b"a\x9F\x98\x81b");
}

/// Phi-3's special tokens take the whitespace after them (except <s>, <unk>, <|endoftext|>),
/// as llama.cpp tokenizes a rendered Phi-3 chat prompt: ids from `llama-tokenize` on
/// llama.cpp's Phi-3 vocabulary with special tokens parsed.
#[test]
fn phi3_chat_prompt_ids_match_llama_cpp() {
    let path = crate::support::test_vocab_dir().join("ggml-vocab-phi-3.gguf");
    let gguf = streamgen::gguf::Gguf::open(&path).expect("open the Phi-3 vocabulary");
    let tok = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    let text = "<|user|>\nHello there<|end|>\n<|assistant|>\n  Hi</s> \n<s> x";
    assert_eq!(tok.encode(text, true, true), [1, 32010, 15043, 727, 32007, 32001, 6324, 2, 1, 29871, 921]);
}
