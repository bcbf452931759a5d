//! The vocabulary's storage: token texts and output pieces in flat buffers with offsets, token
//! attributes, the byte-fallback table, the metadata arrays they are read from, and the
//! open-addressing index from text to id.

use anyhow::{Result, anyhow, bail};
use candle_core::quantized::gguf_file::Value;

use crate::gguf::{Gguf, value_u64};

use super::{bpe, spm};

/// Token attributes, as llama.cpp's `llama_token_attr` bits derived from `tokenizer.ggml.token_type`.
pub(super) mod attr {
    pub const UNDEFINED: u8 = 0;
    pub const UNKNOWN: u8 = 1 << 0;
    pub const UNUSED: u8 = 1 << 1;
    pub const NORMAL: u8 = 1 << 2;
    pub const CONTROL: u8 = 1 << 3;
    pub const USER_DEFINED: u8 = 1 << 4;
    pub const BYTE: u8 = 1 << 5;
    /// Whitespace after the token is dropped when partitioning text (llama.cpp's RSTRIP).
    pub const RSTRIP: u8 = 1 << 6;
}

/// `tokenizer.ggml.token_type` values (SentencePiece's piece types, shifted by one).
fn attr_from_type(token_type: i64) -> u8 {
    match token_type {
        1 => attr::NORMAL,
        2 => attr::UNKNOWN,
        3 => attr::CONTROL,
        4 => attr::USER_DEFINED,
        5 => attr::UNUSED,
        6 => attr::BYTE,
        _ => attr::UNDEFINED,
    }
}

/// Every vocabulary entry back to back; entry `i` is `texts[offsets[i]..offsets[i + 1]]`.
pub(super) struct Texts {
    pub(super) texts: String,
    pub(super) offsets: Vec<u32>,
}

impl Texts {
    /// Reads `tokenizer.ggml.tokens`: a missing key, an empty vocabulary, an entry that is not
    /// a string or more than 4 GiB of text is an error naming the key.
    pub(super) fn read(gguf: &Gguf, path: &str) -> Result<Self> {
        let tokens = match gguf.get("tokenizer.ggml.tokens") {
            None => {
                bail!("{path}: metadata key tokenizer.ggml.tokens is missing: the file has no vocabulary")
            }
            Some(Value::Array(a)) => a.as_slice(),
            Some(_) => bail!("{path}: metadata key tokenizer.ggml.tokens is not an array"),
        };
        let n = tokens.len();
        if n == 0 || n >= u32::MAX as usize / 2 {
            bail!("{path}: metadata key tokenizer.ggml.tokens has {n} entries");
        }

        // Vocabulary texts.
        let total: usize = tokens.iter().map(|t| if let Value::String(s) = t { s.len() } else { 0 }).sum();
        let mut texts = String::with_capacity(total + 64);
        let mut text_offsets = Vec::with_capacity(n + 1);
        text_offsets.push(0u32);
        for (i, t) in tokens.iter().enumerate() {
            let Value::String(s) = t else {
                bail!("{path}: metadata key tokenizer.ggml.tokens: entry {i} is not a string");
            };
            if s.is_empty() {
                // llama.cpp renames empty entries so that every text is unique and non-empty.
                texts.push_str(&format!("[EMPTY_{i}]"));
            } else {
                texts.push_str(s);
            }
            let end = u32::try_from(texts.len())
                .map_err(|_| anyhow!("{path}: metadata key tokenizer.ggml.tokens is larger than 4 GiB"))?;
            text_offsets.push(end);
        }
        Ok(Self { texts, offsets: text_offsets })
    }

    /// The number of entries.
    pub(super) fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Entry `id`'s text.
    pub(super) fn get(&self, id: usize) -> &str {
        &self.texts[self.offsets[id] as usize..self.offsets[id + 1] as usize]
    }
}

/// The first `n` entries of the metadata array `key`, each converted by `convert`, or `missing`
/// for every token when the file has no such key. `what` names an entry `convert` refuses.
pub(super) fn read_array<T: Clone>(
    gguf: &Gguf,
    path: &str,
    key: &str,
    n: usize,
    missing: T,
    what: &str,
    convert: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>> {
    let Some(value) = gguf.get(key) else {
        return Ok(vec![missing; n]);
    };
    let Value::Array(values) = value else { bail!("{path}: metadata key {key} is not an array") };
    if values.len() < n {
        bail!("{path}: metadata key {key} has {} entries for {n} tokens", values.len());
    }
    values[..n]
        .iter()
        .map(|v| convert(v).ok_or_else(|| anyhow!("{path}: metadata key {key} holds {what}")))
        .collect()
}

/// An entry of `tokenizer.ggml.scores`.
pub(super) fn score(value: &Value) -> Option<f32> {
    match *value {
        Value::F32(x) => Some(x),
        Value::F64(x) => Some(x as f32),
        Value::I32(x) => Some(x as f32),
        _ => None,
    }
}

/// An entry of `tokenizer.ggml.token_type`, as attribute bits.
pub(super) fn attr_of(value: &Value) -> Option<u8> {
    match *value {
        Value::I32(x) => Some(attr_from_type(x.into())),
        ref other => value_u64(other).map(|x| attr_from_type(i64::try_from(x).unwrap_or(0))),
    }
}

/// The byte-fallback table: `<0xNN>` (upper-case hex), else the byte itself as an entry.
pub(super) fn byte_table(lookup: &impl Fn(&str) -> Option<u32>) -> [Option<u32>; 256] {
    let mut byte_ids = [None; 256];
    for (b, slot) in byte_ids.iter_mut().enumerate() {
        *slot = lookup(&format!("<0x{b:02X}>")).or_else(|| {
            let b = u8::try_from(b).ok().filter(u8::is_ascii)?;
            lookup(std::str::from_utf8(&[b]).ok()?)
        });
    }
    byte_ids
}

/// Output pieces (llama.cpp's token_to_piece with special = false), back to back, and their
/// offsets.
pub(super) fn pieces(texts: &Texts, attrs: &[u8], is_bpe: bool, path: &str) -> Result<(Vec<u8>, Vec<u32>)> {
    let mut pieces = Vec::with_capacity(texts.texts.len());
    let mut piece_offsets = Vec::with_capacity(attrs.len() + 1);
    piece_offsets.push(0u32);
    for (id, &a) in attrs.iter().enumerate() {
        let text = texts.get(id);
        if a & (attr::CONTROL | attr::UNKNOWN) != 0 {
            // Not printed.
        } else if a & attr::USER_DEFINED != 0 {
            pieces.extend_from_slice(text.as_bytes());
        } else if a & attr::NORMAL != 0 {
            if is_bpe {
                bpe::decode_text(text, &mut pieces);
            } else {
                spm::unescape_spaces(text.as_bytes(), &mut pieces);
            }
        } else if a & attr::BYTE != 0
            && let Some(b) = text.get(3..5).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            pieces.push(b);
        }
        let end = u32::try_from(pieces.len())
            .map_err(|_| anyhow!("{path}: the vocabulary's pieces exceed 4 GiB"))?;
        piece_offsets.push(end);
    }
    Ok((pieces, piece_offsets))
}

/// An open-addressing hash index from vocabulary text to id. The texts stay in the tokenizer's
/// buffer; each slot holds an id and 32 more bits of the text's hash, so that probing compares
/// texts only when those bits agree (building the index then touches no text at random).
pub(super) struct TextIndex {
    slots: Vec<u64>,
    shift: u32,
}

const EMPTY_SLOT: u64 = u64::MAX;

impl TextIndex {
    /// Indexes ids `0..n`; a duplicate text is an error carrying both ids.
    pub(super) fn build<'a>(
        n: usize,
        text: impl Fn(usize) -> &'a [u8],
    ) -> std::result::Result<Self, (u32, u32)> {
        // Load factor at most 1/2 keeps probe sequences short.
        let bits = (usize::BITS - (2 * n).max(2).saturating_sub(1).leading_zeros()).max(1);
        let mut index = Self { slots: vec![EMPTY_SLOT; 1 << bits], shift: 64 - bits };
        let mask = index.slots.len() - 1;
        let hashes: Vec<u64> = (0..n).map(|id| hash_bytes(text(id))).collect();
        // Insert in order of the slot's top 8 bits: each group then lands in a small part of
        // the table that stays in cache, where ascending ids would write all over 4 MB.
        let mut starts = [0u32; 257];
        for &hash in &hashes {
            starts[(hash >> 56) as usize + 1] += 1;
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        let mut order = vec![0u32; n];
        for (id, &hash) in hashes.iter().enumerate() {
            let group = &mut starts[(hash >> 56) as usize];
            order[*group as usize] = id as u32;
            *group += 1;
        }
        for id in order {
            let hash = hashes[id as usize];
            let tag = hash & 0xFFFF_FFFF;
            let mut slot = (hash >> index.shift) as usize;
            loop {
                let entry = index.slots[slot];
                if entry == EMPTY_SLOT {
                    index.slots[slot] = tag << 32 | u64::from(id);
                    break;
                }
                let other = (entry & 0xFFFF_FFFF) as u32;
                if entry >> 32 == tag && text(other as usize) == text(id as usize) {
                    return Err((other.min(id), other.max(id)));
                }
                slot = (slot + 1) & mask;
            }
        }
        Ok(index)
    }

    pub(super) fn get<'a>(&self, key: &[u8], text: impl Fn(usize) -> &'a [u8]) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let hash = hash_bytes(key);
        let tag = hash & 0xFFFF_FFFF;
        let mut slot = (hash >> self.shift) as usize;
        loop {
            let entry = self.slots[slot];
            if entry == EMPTY_SLOT {
                return None;
            }
            let id = (entry & 0xFFFF_FFFF) as u32;
            if entry >> 32 == tag && text(id as usize) == key {
                return Some(id);
            }
            slot = (slot + 1) & mask;
        }
    }
}

/// A fast multiplicative hash of a short byte string (FxHash-style, 8 bytes at a time, after
/// rustc's FxHasher). The top bits pick the slot, the low 32 bits are the slot's tag.
fn hash_bytes(bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = bytes.len() as u64;
    let mut word = 0u64;
    let mut shift = 0;
    for &b in bytes {
        word |= u64::from(b) << shift;
        shift += 8;
        if shift == 64 {
            h = (h.rotate_left(5) ^ word).wrapping_mul(K);
            word = 0;
            shift = 0;
        }
    }
    if shift > 0 {
        h = (h.rotate_left(5) ^ word).wrapping_mul(K);
    }
    // Fold the high bits into the low ones (the tag) and mix once more for the slot bits.
    h ^= h >> 32;
    h.wrapping_mul(K) ^ (h & 0xFFFF_FFFF)
}
