//! llama.cpp's SentencePiece session (`llm_tokenizer_spm_session`): the bigram merge by score
//! with byte fallback, for `tokenizer.ggml.model = "llama"` vocabularies (Llama 1/2, Gemma 1–3,
//! Mistral v1, Phi-3…), and the `▁` space mark those vocabularies use.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::Tokenizer;

/// The SentencePiece word-boundary mark that stands for a space inside vocabulary entries.
pub(super) const SPACE_MARK: &str = "\u{2581}";

/// Appends `text` with each `▁` (E2 96 81) replaced by a space.
pub(super) fn unescape_spaces(text: &[u8], out: &mut Vec<u8>) {
    let mut rest = text;
    while let Some(at) = rest.iter().position(|&b| b == 0xE2) {
        if rest.get(at + 1..at + 3) == Some(&[0x96, 0x81]) {
            out.extend_from_slice(&rest[..at]);
            out.push(b' ');
            rest = &rest[at + 3..];
        } else {
            out.extend_from_slice(&rest[..=at]);
            rest = &rest[at + 1..];
        }
    }
    out.extend_from_slice(rest);
}

/// llama.cpp's `llm_tokenizer_spm_session` (after the original llama.cpp SentencePiece port):
/// start from UTF-8 characters, repeatedly merge the adjacent pair whose concatenation is the
/// best-scoring vocabulary entry, then emit each symbol's id or its bytes.
#[derive(Default)]
pub(super) struct SpmSession {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Bigram>,
    /// The fragment with its spaces escaped, kept to reuse its allocation.
    escaped: String,
}

#[derive(Clone, Copy)]
struct Symbol {
    prev: i32,
    next: i32,
    start: u32,
    len: u32,
}

struct Bigram {
    score: f32,
    left: u32,
    right: u32,
    size: u32,
}

impl Ord for Bigram {
    /// Highest score first; among equal scores the leftmost pair (llama.cpp's `llm_bigram_spm`).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .partial_cmp(&other.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| other.left.cmp(&self.left))
    }
}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}

/// Byte length of the UTF-8 sequence a lead byte starts (1 for stray continuation bytes), as
/// llama.cpp's `unicode_len_utf8`.
fn utf8_len(lead: u8) -> usize {
    const LOOKUP: [u8; 16] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4];
    LOOKUP[(lead >> 4) as usize] as usize
}

impl SpmSession {
    /// Appends the ids of one raw-text fragment: spaces become `▁` (and one is put in front when
    /// `space_prefix`), then the merge runs over the whole fragment.
    pub(super) fn tokenize(&mut self, tok: &Tokenizer, text: &str, space_prefix: bool, out: &mut Vec<u32>) {
        let mut escaped = std::mem::take(&mut self.escaped);
        escaped.clear();
        if space_prefix {
            escaped.push_str(SPACE_MARK);
        }
        for (i, piece) in text.split(' ').enumerate() {
            if i > 0 {
                escaped.push_str(SPACE_MARK);
            }
            escaped.push_str(piece);
        }
        self.merge(tok, escaped.as_bytes(), out);
        self.escaped = escaped;
    }

    fn merge(&mut self, tok: &Tokenizer, text: &[u8], out: &mut Vec<u32>) {
        self.symbols.clear();
        self.queue.clear();
        let mut offset = 0;
        while offset < text.len() {
            let len = utf8_len(text[offset]).min(text.len() - offset);
            let index = self.symbols.len() as i32;
            offset += len;
            self.symbols.push(Symbol {
                prev: index - 1,
                next: if offset == text.len() { -1 } else { index + 1 },
                start: (offset - len) as u32,
                len: len as u32,
            });
        }
        for right in 1..self.symbols.len() {
            self.try_add_bigram(tok, text, right as i32 - 1, right as i32);
        }
        while let Some(bigram) = self.queue.pop() {
            let left = self.symbols[bigram.left as usize];
            let right = self.symbols[bigram.right as usize];
            // Skip pairs that a previous merge made stale.
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
                continue;
            }
            self.symbols[bigram.left as usize].len += right.len;
            self.symbols[bigram.right as usize].len = 0;
            self.symbols[bigram.left as usize].next = right.next;
            if right.next >= 0 {
                self.symbols[right.next as usize].prev = bigram.left as i32;
            }
            self.try_add_bigram(tok, text, left.prev, bigram.left as i32);
            self.try_add_bigram(tok, text, bigram.left as i32, right.next);
        }
        // A merged symbol is always a vocabulary entry (pairs are only queued when they are), so
        // llama.cpp's rev_merge re-segmentation never applies: a symbol is its entry or its bytes.
        let mut i = if self.symbols.is_empty() { -1 } else { 0 };
        while i >= 0 {
            let symbol = self.symbols[i as usize];
            let piece = &text[symbol.start as usize..(symbol.start + symbol.len) as usize];
            match tok.lookup(piece) {
                Some(id) => out.push(id),
                None => {
                    for &b in piece {
                        // llama.cpp aborts when a byte has no token; fall back to <unk>.
                        if let Some(id) = tok.byte_ids[b as usize].or(tok.unk) {
                            out.push(id);
                        }
                    }
                }
            }
            i = symbol.next;
        }
    }

    fn try_add_bigram(&mut self, tok: &Tokenizer, text: &[u8], left: i32, right: i32) {
        if left < 0 || right < 0 {
            return;
        }
        let (l, r) = (self.symbols[left as usize], self.symbols[right as usize]);
        let size = l.len + r.len;
        let piece = &text[l.start as usize..(l.start + size) as usize];
        if let Some(id) = tok.lookup(piece) {
            self.queue.push(Bigram {
                score: tok.scores[id as usize],
                left: left as u32,
                right: right as u32,
                size,
            });
        }
    }
}
