//! Byte-level BPE with real vocabularies and pre-tokenizers (Llama 3, Qwen 2, GPT-2,
//! StarCoder): encoding any text with any flags gives ids in the vocabulary; without specials
//! decoding gives exactly the text back when the vocabulary has a token for each of its bytes
//! (StarCoder's lacks some, e.g. 0xF1, and llama.cpp drops such bytes, as we do); decoding any
//! ids, streamed or not, agrees.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use streamgen::tokenizer::Tokenizer;

mod common;

const NAMES: [&str; 4] = ["llama-bpe", "qwen2", "gpt-2", "starcoder"];
static TOKS: LazyLock<Vec<(Tokenizer, [bool; 256])>> = LazyLock::new(|| {
    NAMES
        .iter()
        .map(|n| {
            let tok = common::vocab(n);
            let spelled = gpt2_byte_chars().map(|c| tok.token_id(&c.to_string()).is_some());
            (tok, spelled)
        })
        .collect()
});

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes are themselves, the others are
/// U+0100 upwards in byte order.
fn gpt2_byte_chars() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut next = 0x100;
    for (b, c) in chars.iter_mut().enumerate() {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        *c = if printable {
            char::from(b as u8)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\0')
        };
    }
    chars
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let which = (flags >> 2) as usize % NAMES.len();
    let (tok, spelled) = &TOKS[which];
    let text = String::from_utf8_lossy(rest);
    let (add_special, parse_special) = (flags & 1 != 0, flags & 2 != 0);
    let ids = tok.encode(&text, add_special, parse_special);
    assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()), "{ids:?}");
    if !add_special && !parse_special && text.bytes().all(|b| spelled[b as usize]) {
        assert_eq!(tok.decode(&ids), text, "{}: ids {ids:?}", NAMES[which]);
    }
    common::check_decode(tok, &common::ids_from(rest, tok));
});
