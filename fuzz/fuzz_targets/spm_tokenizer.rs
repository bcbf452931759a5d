//! SentencePiece (llama.cpp's Llama 2 test vocabulary): encoding any text with any flags gives
//! ids in the vocabulary; without specials, decoding gives the text back with one space in
//! front (the space prefix) and U+2581 read as a space; decoding any ids, streamed or not,
//! agrees.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use streamgen::tokenizer::Tokenizer;

mod common;

static TOK: LazyLock<Tokenizer> = LazyLock::new(|| common::vocab("llama-spm"));

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let tok = &*TOK;
    let text = String::from_utf8_lossy(rest);
    let (add_special, parse_special) = (flags & 1 != 0, flags & 2 != 0);
    let ids = tok.encode(&text, add_special, parse_special);
    assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()), "{ids:?}");
    if !add_special && !parse_special {
        // This vocabulary has no user-defined tokens, so the text is one fragment.
        let want = if text.is_empty() { String::new() } else { format!(" {}", text.replace('▁', " ")) };
        assert_eq!(tok.decode(&ids), want, "text {text:?}");
    }
    common::check_decode(tok, &common::ids_from(rest, tok));
});
