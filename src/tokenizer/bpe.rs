//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`: Llama 3, Qwen 2/3, SmolLM, GPT-2, StarCoder…)
//! as llama.cpp's `llm_tokenizer_bpe_session`: pre-tokenize (see [`super::pre`]), spell each
//! piece's bytes with GPT-2's byte characters, merge adjacent symbols lowest rank first, emit
//! each symbol's token or, failing that, a token per byte.
//!
//! The merge table is the big part of the load (280k merges for Llama 3), so it is one hash map
//! from a pair of ids to (rank, merged id), with ids resolved once at load: the session never
//! builds or hashes a string while merging.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use anyhow::{Result, bail};
use candle_core::quantized::gguf_file::Value;

use super::Tokenizer;
use super::pre::Recipe;
use super::unicode::{BYTE_TO_CHAR, char_to_byte, flags};

/// A symbol that is no vocabulary entry and in no merge: it can only end as per-byte tokens.
const NO_ID: u32 = u32::MAX;

/// The merge table and recipe of a byte-level BPE vocabulary.
pub(super) struct Bpe {
    pub(super) recipe: Recipe,
    /// `(left id, right id)` packed in a `u64` → `(rank, id of the merged text)`.
    merges: HashMap<u64, (u32, u32), BuildHasherDefault<FxHasher>>,
    /// The id of each byte's GPT-2 character, the symbols a piece starts from.
    byte_ids: [u32; 256],
    /// Ids from `n_vocab` up name texts that merges produce or use but the vocabulary lacks
    /// (none in well-formed files); such symbols fall back to per-byte tokens.
    n_vocab: u32,
}

impl Bpe {
    /// Reads `tokenizer.ggml.merges` ("left right" strings, rank = position) against the
    /// vocabulary of `tok`.
    pub(super) fn build(tok: &Tokenizer, path: &str, merges: Option<&Value>, recipe: Recipe) -> Result<Self> {
        let key = "tokenizer.ggml.merges";
        let merges = match merges {
            None => bail!(
                "{path}: metadata key {key} is missing: a gpt2 (byte-level BPE) vocabulary needs its merges"
            ),
            Some(Value::Array(a)) => a.as_slice(),
            Some(_) => bail!("{path}: metadata key {key} is not an array"),
        };
        let n_vocab = tok.vocab_size() as u32;
        let mut extra: HashMap<Vec<u8>, u32> = HashMap::new();
        let mut id_of = |text: &[u8]| -> u32 {
            tok.lookup(text).unwrap_or_else(|| {
                let next = n_vocab + extra.len() as u32;
                *extra.entry(text.to_vec()).or_insert(next)
            })
        };
        let mut table: HashMap<u64, (u32, u32), BuildHasherDefault<FxHasher>> =
            HashMap::with_capacity_and_hasher(merges.len(), Default::default());
        let mut joined = Vec::new();
        for (rank, merge) in merges.iter().enumerate() {
            let Value::String(merge) = merge else {
                bail!("{path}: metadata key {key}: entry {rank} is not a string");
            };
            // llama.cpp splits at the first space after the first byte (so a merge of a space
            // character itself would still parse); an entry without one names no pair.
            let Some(at) = merge.as_bytes().iter().skip(1).position(|&b| b == b' ').map(|i| i + 1) else {
                continue;
            };
            let (left, right) = (&merge.as_bytes()[..at], &merge.as_bytes()[at + 1..]);
            joined.clear();
            joined.extend_from_slice(left);
            joined.extend_from_slice(right);
            let (left, right, result) = (id_of(left), id_of(right), id_of(&joined));
            let rank = u32::try_from(rank).unwrap_or(u32::MAX);
            // A repeated pair keeps its first rank, as llama.cpp's map emplace.
            table.entry(pair(left, right)).or_insert((rank, result));
        }
        let mut byte_ids = [NO_ID; 256];
        let mut utf8 = [0u8; 4];
        for (b, id) in byte_ids.iter_mut().enumerate() {
            let text = BYTE_TO_CHAR[b].encode_utf8(&mut utf8).as_bytes();
            *id = tok.lookup(text).or_else(|| extra.get(text).copied()).unwrap_or(NO_ID);
        }
        Ok(Self { recipe, merges: table, byte_ids, n_vocab })
    }
}

fn pair(left: u32, right: u32) -> u64 {
    u64::from(left) << 32 | u64::from(right)
}

/// rustc's FxHasher for one `u64` key: a multiply, ample for ids and far cheaper than SipHash.
#[derive(Default)]
pub(super) struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
        // The table takes the top bits for its groups; fold the high half down as well.
        self.0 ^= self.0 >> 29;
    }
}

/// The bytes a NORMAL token's text stands for (llama.cpp's `llama_decode_text`): each character
/// maps back to its byte; one outside GPT-2's byte alphabet becomes llama.cpp's
/// `[UNK_BYTE_0x…]` marker.
pub(super) fn decode_text(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut utf8 = [0u8; 4];
                for b in c.encode_utf8(&mut utf8).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                // llama.cpp appends the whole token text here, not the character.
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
}

/// Buffers of one `encode` call, reused across its fragments.
#[derive(Default)]
pub(super) struct BpeSession {
    cpts: Vec<char>,
    flags: Vec<u16>,
    pieces: Vec<usize>,
    scratch: Vec<usize>,
    encoded: Vec<u8>,
    symbols: Vec<Symbol>,
    /// `(rank, left, right, size, merged id)`, smallest rank first, then leftmost
    /// (`llm_bigram_bpe`'s order).
    queue: BinaryHeap<Reverse<QueuedPair>>,
}

/// `(rank, left symbol, right symbol, merged length, merged id)`.
type QueuedPair = (u32, u32, u32, u32, u32);

#[derive(Clone, Copy)]
struct Symbol {
    prev: i32,
    next: i32,
    /// Byte range in the piece (one symbol per byte at the start: each byte is one character
    /// of the byte-level spelling).
    start: u32,
    len: u32,
    id: u32,
}

impl BpeSession {
    /// Appends the ids of one raw-text fragment.
    pub(super) fn tokenize(&mut self, tok: &Tokenizer, bpe: &Bpe, text: &str, out: &mut Vec<u32>) {
        self.cpts.clear();
        self.cpts.extend(text.chars());
        self.flags.clear();
        self.flags.extend(self.cpts.iter().map(|&c| flags(c)));
        let mut pieces = std::mem::take(&mut self.pieces);
        bpe.recipe.pre.split(&self.cpts, &self.flags, &mut pieces, &mut self.scratch);
        let (mut at, mut byte_at) = (0, 0);
        for &len in &pieces {
            let bytes: usize = self.cpts[at..at + len].iter().map(|c| c.len_utf8()).sum();
            self.piece(tok, bpe, &text.as_bytes()[byte_at..byte_at + bytes], out);
            at += len;
            byte_at += bytes;
        }
        self.pieces = pieces;
    }

    fn piece(&mut self, tok: &Tokenizer, bpe: &Bpe, piece: &[u8], out: &mut Vec<u32>) {
        if bpe.recipe.ignore_merges {
            self.encoded.clear();
            let mut utf8 = [0u8; 4];
            for &b in piece {
                self.encoded.extend_from_slice(BYTE_TO_CHAR[b as usize].encode_utf8(&mut utf8).as_bytes());
            }
            if let Some(id) = tok.lookup(&self.encoded) {
                out.push(id);
                return;
            }
        }
        self.symbols.clear();
        self.queue.clear();
        let n = piece.len() as i32;
        for (i, &b) in piece.iter().enumerate() {
            let i = i as i32;
            self.symbols.push(Symbol {
                prev: i - 1,
                next: if i + 1 == n { -1 } else { i + 1 },
                start: i as u32,
                len: 1,
                id: bpe.byte_ids[b as usize],
            });
        }
        for right in 1..self.symbols.len() {
            self.add_pair(bpe, right as i32 - 1, right as i32);
        }
        while let Some(Reverse((_, left, right, size, merged))) = self.queue.pop() {
            let (l, r) = (self.symbols[left as usize], self.symbols[right as usize]);
            // Skip pairs that a previous merge made stale: either side was absorbed or grew.
            if l.len == 0 || r.len == 0 || l.len + r.len != size {
                continue;
            }
            let left_symbol = &mut self.symbols[left as usize];
            left_symbol.len = size;
            left_symbol.id = merged;
            left_symbol.next = r.next;
            self.symbols[right as usize].len = 0;
            if r.next >= 0 {
                self.symbols[r.next as usize].prev = left as i32;
            }
            self.add_pair(bpe, l.prev, left as i32);
            self.add_pair(bpe, left as i32, r.next);
        }
        let mut i = if self.symbols.is_empty() { -1 } else { 0 };
        while i >= 0 {
            let symbol = self.symbols[i as usize];
            if symbol.id < bpe.n_vocab {
                out.push(symbol.id);
            } else {
                // llama.cpp looks each byte of the symbol's byte-level spelling up as a
                // one-byte text: only printable ASCII bytes spell themselves, so only they can
                // be found; the others are dropped.
                for &b in &piece[symbol.start as usize..(symbol.start + symbol.len) as usize] {
                    if (0x21..=0x7E).contains(&b)
                        && let Some(id) = tok.lookup(&[b])
                    {
                        out.push(id);
                    }
                }
            }
            i = symbol.next;
        }
    }

    fn add_pair(&mut self, bpe: &Bpe, left: i32, right: i32) {
        if left < 0 || right < 0 {
            return;
        }
        let (l, r) = (self.symbols[left as usize], self.symbols[right as usize]);
        if l.id == NO_ID || r.id == NO_ID {
            return;
        }
        if let Some(&(rank, merged)) = bpe.merges.get(&pair(l.id, r.id)) {
            self.queue.push(Reverse((rank, left as u32, right as u32, l.len + r.len, merged)));
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::gguf_file::Value;

    use crate::test_support::gguf_with;
    use crate::tokenizer::Tokenizer;

    const NORMAL: i32 = 1;
    const CONTROL: i32 = 3;
    const USER: i32 = 4;

    /// A tiny byte-level vocabulary: `tokens` with their types, `merges` in rank order.
    fn tokenizer(
        pre: Option<&str>,
        tokens: &[(&str, i32)],
        merges: &[&str],
        extra: Vec<(&str, Value)>,
    ) -> Tokenizer {
        let mut metadata = vec![
            ("general.architecture", Value::String("test".into())),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(tokens.iter().map(|t| Value::String(t.0.into())).collect()),
            ),
            ("tokenizer.ggml.token_type", Value::Array(tokens.iter().map(|t| Value::I32(t.1)).collect())),
            (
                "tokenizer.ggml.merges",
                Value::Array(merges.iter().map(|m| Value::String((*m).into())).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ];
        if let Some(pre) = pre {
            metadata.push(("tokenizer.ggml.pre", Value::String(pre.into())));
        }
        metadata.extend(extra);
        let (_file, gguf) = gguf_with(metadata);
        Tokenizer::from_gguf(&gguf).expect("tokenizer")
    }

    const TOKENS: &[(&str, i32)] = &[
        ("<|endoftext|>", CONTROL),
        ("a", NORMAL),
        ("b", NORMAL),
        ("c", NORMAL),
        ("Ġ", NORMAL),
        ("ab", NORMAL),
        ("bc", NORMAL),
        ("abc", NORMAL),
        ("Ġa", NORMAL),
        ("Ġab", NORMAL),
        ("cab", NORMAL),
        ("<tag>", USER),
        ("1", NORMAL),
        ("2", NORMAL),
        ("12", NORMAL),
    ];

    fn ids(tok: &Tokenizer, texts: &[&str]) -> Vec<u32> {
        texts.iter().map(|t| tok.token_id(t).unwrap_or_else(|| panic!("no token {t:?}"))).collect()
    }

    #[test]
    fn lowest_rank_merges_first() {
        let tok = tokenizer(Some("gpt-2"), TOKENS, &["Ġ a", "a b", "ab c", "b c", "Ġa b", "1 2"], vec![]);
        assert_eq!(tok.encode("abc", false, false), ids(&tok, &["abc"]));
        assert_eq!(tok.encode(" ab", false, false), ids(&tok, &["Ġab"]));
        assert_eq!(tok.encode("cab", false, false), ids(&tok, &["c", "ab"]));
        assert_eq!(tok.token_bytes(ids(&tok, &["Ġab"])[0]), b" ab");
        assert_eq!(tok.decode(&tok.encode("ab abc", false, false)), "ab abc");
        // GPT-2 keeps digits together; the StarCoder recipe splits them first.
        assert_eq!(tok.encode("12", false, false), ids(&tok, &["12"]));
        let tok = tokenizer(Some("starcoder"), TOKENS, &["Ġ a", "a b", "ab c", "b c", "Ġa b", "1 2"], vec![]);
        assert_eq!(tok.encode("12", false, false), ids(&tok, &["1", "2"]));

        // With "b c" ranked first, "a" and "bc" never meet in a merge.
        let tok = tokenizer(Some("gpt-2"), TOKENS, &["b c", "a b", "ab c"], vec![]);
        assert_eq!(tok.encode("abc", false, false), ids(&tok, &["a", "bc"]));
    }

    #[test]
    fn ignore_merges_takes_whole_pieces_for_llama3() {
        // "cab" is an entry with no merge path to it.
        let merges = ["a b", "ab c"];
        let gpt2 = tokenizer(Some("gpt-2"), TOKENS, &merges, vec![]);
        assert_eq!(gpt2.encode("cab", false, false), ids(&gpt2, &["c", "ab"]));
        let llama3 = tokenizer(Some("llama-bpe"), TOKENS, &merges, vec![]);
        assert_eq!(llama3.encode("cab", false, false), ids(&llama3, &["cab"]));
        // dbrx has the Llama 3 split without ignore_merges.
        let dbrx = tokenizer(Some("dbrx"), TOKENS, &merges, vec![]);
        assert_eq!(dbrx.encode("cab", false, false), ids(&dbrx, &["c", "ab"]));
    }

    #[test]
    fn unknown_symbols_fall_back_to_printable_bytes() {
        // "c c" merges into "cc", which is no entry: the symbol falls back to its bytes.
        let tok = tokenizer(Some("gpt-2"), TOKENS, &["c c"], vec![]);
        assert_eq!(tok.encode("cc", false, false), ids(&tok, &["c", "c"]));
        // Bytes whose GPT-2 character is no entry are dropped, as llama.cpp does.
        assert_eq!(tok.encode("aé", false, false), ids(&tok, &["a"]));
    }

    #[test]
    fn bos_default_follows_the_recipe_and_the_file_overrides() {
        let merges = ["a b"];
        assert!(tokenizer(Some("llama-bpe"), TOKENS, &merges, vec![]).adds_bos());
        assert!(!tokenizer(Some("gpt-2"), TOKENS, &merges, vec![]).adds_bos());
        assert!(!tokenizer(None, TOKENS, &merges, vec![]).adds_bos());
        let off = tokenizer(
            Some("llama-bpe"),
            TOKENS,
            &merges,
            vec![("tokenizer.ggml.add_bos_token", Value::Bool(false))],
        );
        assert!(!off.adds_bos());
        let on = tokenizer(
            Some("gpt-2"),
            TOKENS,
            &merges,
            vec![("tokenizer.ggml.add_bos_token", Value::Bool(true))],
        );
        assert_eq!(on.encode("ab", true, false), [vec![0], ids(&on, &["ab"])].concat());
    }

    #[test]
    fn user_defined_tokens_print_verbatim_and_control_tokens_not_at_all() {
        let tok = tokenizer(Some("gpt-2"), TOKENS, &["a b"], vec![]);
        let tag = tok.token_id("<tag>").expect("<tag>");
        assert_eq!(tok.encode("ab<tag>", false, false), [ids(&tok, &["ab"]), vec![tag]].concat());
        assert_eq!(tok.token_bytes(tag), b"<tag>");
        assert_eq!(tok.token_bytes(0), b"");
        assert_eq!(tok.encode("<|endoftext|>", false, true), vec![0]);
    }

    #[test]
    fn unknown_pre_is_an_error_naming_it() {
        let mut metadata = vec![
            ("general.architecture", Value::String("test".into())),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("xyz".into())),
            ("tokenizer.ggml.tokens", Value::Array(vec![Value::String("a".into())])),
        ];
        metadata.push(("tokenizer.ggml.merges", Value::Array(vec![])));
        let (_file, gguf) = gguf_with(metadata);
        let err = format!("{:#}", Tokenizer::from_gguf(&gguf).expect_err("unknown pre"));
        assert!(err.contains("tokenizer.ggml.pre is \"xyz\"") && err.contains("not support"), "{err}");
        assert!(err.contains("llama-bpe") && err.contains(&gguf.path().display().to_string()), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn missing_merges_is_an_error_naming_the_key() {
        let (_file, gguf) = gguf_with(vec![
            ("general.architecture", Value::String("test".into())),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
            ("tokenizer.ggml.tokens", Value::Array(vec![Value::String("a".into())])),
        ]);
        let err = format!("{:#}", Tokenizer::from_gguf(&gguf).expect_err("no merges"));
        assert!(err.contains("tokenizer.ggml.merges"), "{err}");
    }

    /// Property tests over a byte-level vocabulary that is well formed in the way real ones
    /// are: every byte's GPT-2 character is an entry and every merge's result is an entry.
    mod properties {
        use std::sync::OnceLock;

        use proptest::prelude::*;

        use super::*;
        use crate::tokenizer::unicode::BYTE_TO_CHAR;

        /// Recipes with different pre-tokenizers (and llama-bpe's ignore_merges).
        const RECIPES: [&str; 6] = ["default", "gpt-2", "starcoder", "llama-bpe", "qwen2", "falcon"];

        fn bpe(recipe: usize) -> &'static Tokenizer {
            static TOKENIZERS: [OnceLock<Tokenizer>; RECIPES.len()] =
                [const { OnceLock::new() }; RECIPES.len()];
            TOKENIZERS[recipe].get_or_init(|| {
                let bytes: Vec<String> = BYTE_TO_CHAR.iter().map(char::to_string).collect();
                let merges =
                    ["Ġ a", "a b", "ab c", "b c", "Ġa b", "1 2", "Ã ©", "Ġ Ġ", "ĠĠ Ġ", "Ċ Ċ", "h e", "he l"];
                let mut tokens: Vec<(&str, i32)> = vec![("<|endoftext|>", CONTROL), ("<tag>", USER)];
                tokens.extend(bytes.iter().map(|b| (b.as_str(), NORMAL)));
                let joined: Vec<String> = merges.iter().map(|m| m.replace(' ', "")).collect();
                tokens.extend(joined.iter().map(|j| (j.as_str(), NORMAL)));
                tokens.push(("Ġhello", NORMAL)); // reachable only by ignore_merges
                tokenizer(Some(RECIPES[recipe]), &tokens, &merges, vec![])
            })
        }

        fn text() -> impl Strategy<Value = String> {
            let pieces = vec![
                "a",
                "b",
                "c",
                "abc",
                " ",
                "  ",
                "\n",
                "\n\n",
                "\r\n",
                "\t",
                "1",
                "12",
                "123",
                "é",
                "😀",
                "<tag>",
                "<|endoftext|>",
                "'s",
                "'LL",
                "hello",
                " hello",
                "Ġ",
                ".",
                "\u{0}",
                "\u{3000}",
            ];
            prop_oneof![
                any::<String>(),
                proptest::collection::vec(proptest::sample::select(pieces), 0..16).prop_map(|p| p.concat()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// Byte-level BPE loses nothing: without parsing control tokens, decoding gives back
            /// exactly the text, whatever the pre-tokenizer (no normalisation, no space prefix).
            #[test]
            fn decode_inverts_encode(s in text(), recipe in 0..RECIPES.len()) {
                let tok = bpe(recipe);
                prop_assert_eq!(tok.decode(&tok.encode(&s, false, false)), s);
            }

            /// With control tokens parsed, they print nothing, so the text comes back without
            /// them; any flags give ids inside the vocabulary.
            #[test]
            fn parsed_control_tokens_are_the_only_loss(s in text(), recipe in 0..RECIPES.len(), add_special: bool) {
                let tok = bpe(recipe);
                let ids = tok.encode(&s, add_special, true);
                prop_assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
                prop_assert_eq!(tok.decode(&ids), s.replace("<|endoftext|>", ""));
            }
        }
    }
}
