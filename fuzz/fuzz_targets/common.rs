//! What several targets share: loading llama.cpp's real test vocabularies, and the checks
//! every tokenizer must pass on any ids.

#![allow(dead_code)] // Each target uses part of this.

use std::path::PathBuf;

use streamgen::gguf::Gguf;
use streamgen::tokenizer::{StreamDecoder, Tokenizer};

/// llama.cpp's vocabulary `ggml-vocab-<name>.gguf`, fetched by `tests/fetch-vocab.sh` into the
/// same place the test suite reads it from (`STREAMGEN_TEST_VOCAB_DIR` overrides it).
pub fn vocab(name: &str) -> Tokenizer {
    let dir = std::env::var_os("STREAMGEN_TEST_VOCAB_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("STREAMGEN_TEST_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("streamgen-test")))
            .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/streamgen-test")))
            .expect("HOME is not set");
        cache.join("llama-vocab-0.3.36")
    });
    let path = dir.join(format!("ggml-vocab-{name}.gguf"));
    let gguf = Gguf::open(&path).unwrap_or_else(|e| {
        panic!("{e:#}: run tests/fetch-vocab.sh and set STREAMGEN_TEST_VOCAB_DIR to the directory it prints")
    });
    Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

/// Ids from bytes, two at a time, so that both valid ids and ids past the vocabulary occur.
pub fn ids_from(bytes: &[u8], tok: &Tokenizer) -> Vec<u32> {
    let n = tok.vocab_size() as u32;
    bytes
        .chunks(3)
        .map(|c| {
            let x = c.iter().fold(0u32, |x, &b| x << 8 | u32::from(b));
            // Mostly in range, sometimes just past it or far past it.
            if x & 0x80_0000 != 0 { x } else { x % (n + 2) }
        })
        .collect()
}

/// Decoding any ids: token by token through the stream decoder equals the one-shot decode.
pub fn check_decode(tok: &Tokenizer, ids: &[u32]) {
    let full = tok.decode(ids);
    let mut decoder = StreamDecoder::new();
    let mut streamed = String::new();
    for &id in ids {
        streamed.push_str(&decoder.push(tok.token_bytes(id)));
    }
    streamed.push_str(&decoder.finish());
    assert_eq!(streamed, full, "ids {ids:?}");
}
