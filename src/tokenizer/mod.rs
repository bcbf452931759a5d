//! Text ⇄ token ids, built from a GGUF file's `tokenizer.ggml.*` metadata, matching llama.cpp's
//! tokenizer exactly (its `src/llama-vocab.cpp`). This module owns the shared vocabulary: texts,
//! attributes, the special-token partition, the piece each token prints and the
//! end-of-generation set. The merge itself lives in `spm`; the incremental UTF-8 decoder that
//! streaming output uses in `stream` ([`StreamDecoder`]).
//!
//! Only SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`, llama.cpp's
//! `LLAMA_VOCAB_TYPE_SPM`: Llama 1/2, Gemma 1–3, Mistral v1…) are supported; other models are a
//! clear error at load time.
//!
//! The vocabulary is a quarter of a million strings and building it is part of the time to first
//! token, so it lives in two flat buffers with offsets and an open-addressing index over them,
//! never one `String` per token.

mod spm;
mod stream;

use std::fmt;

use anyhow::{Result, anyhow, bail};
use candle_core::quantized::gguf_file::Value;

use crate::gguf::{Gguf, value_u64};

pub use stream::StreamDecoder;

use spm::SpmSession;

/// Token attributes, as llama.cpp's `llama_token_attr` bits derived from `tokenizer.ggml.token_type`.
mod attr {
    pub const UNDEFINED: u8 = 0;
    pub const UNKNOWN: u8 = 1 << 0;
    pub const UNUSED: u8 = 1 << 1;
    pub const NORMAL: u8 = 1 << 2;
    pub const CONTROL: u8 = 1 << 3;
    pub const USER_DEFINED: u8 = 1 << 4;
    pub const BYTE: u8 = 1 << 5;
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

/// Token texts that llama.cpp treats as end of generation whatever their id (`special_eog_ids`,
/// built from the text because converters do not record it). They are also forced to CONTROL.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Texts llama.cpp recognises as the end-of-turn token when `tokenizer.ggml.eot_token_id` is absent.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

/// Fill-in-the-middle tokens llama.cpp detects by text when their key is absent: the detected
/// token becomes CONTROL (so it is no longer split out of text unless specials are parsed), and
/// the pad/repo/separator ones also end generation.
const FIM_KEYS_AND_TEXTS: &[(&str, &str, &[&str])] = &[
    (
        "tokenizer.ggml.fim_pre_token_id",
        "tokenizer.ggml.prefix_token_id",
        &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ],
    ),
    (
        "tokenizer.ggml.fim_suf_token_id",
        "tokenizer.ggml.suffix_token_id",
        &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ],
    ),
    (
        "tokenizer.ggml.fim_mid_token_id",
        "tokenizer.ggml.middle_token_id",
        &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ],
    ),
];
const FIM_EOG_KEYS_AND_TEXTS: &[(&str, &[&str])] = &[
    ("tokenizer.ggml.fim_pad_token_id", &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"]),
    (
        "tokenizer.ggml.fim_rep_token_id",
        &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"],
    ),
    ("tokenizer.ggml.fim_sep_token_id", &["<|file_sep|>"]),
];

/// A SentencePiece tokenizer read from GGUF metadata; behaves as llama.cpp's `llama_vocab`.
pub struct Tokenizer {
    /// Every vocabulary entry back to back; entry `i` is `texts[text_offsets[i]..text_offsets[i + 1]]`.
    texts: String,
    text_offsets: Vec<u32>,
    /// What each token contributes to the output (llama.cpp's `token_to_piece` without specials),
    /// laid out the same way.
    pieces: Vec<u8>,
    piece_offsets: Vec<u32>,
    scores: Vec<f32>,
    attrs: Vec<u8>,
    index: TextIndex,
    /// The `<0xNN>` token of each byte, for byte fallback.
    byte_ids: [Option<u32>; 256],
    /// The special-token partition's candidates (CONTROL, USER_DEFINED, UNKNOWN), ordered by text
    /// so that all candidates matching at a position are found by narrowing a range byte by byte.
    specials: Vec<Special>,
    /// For each first byte, the range of `specials` starting with it.
    special_first: Box<[(u32, u32); 256]>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    /// Sorted ids that end generation.
    eog: Vec<u32>,
}

#[derive(Clone, Copy)]
struct Special {
    id: u32,
    /// Position in llama.cpp's `cache_special_tokens` order: longest text first.
    rank: u32,
    /// The token's text, `texts[start..start + len]`.
    start: u32,
    len: u32,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("add_space_prefix", &self.add_space_prefix)
            .field("end_of_generation", &self.eog)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Reads the vocabulary from `gguf`'s metadata.
    ///
    /// Errors name the file and the key: a file without a tokenizer, an unsupported
    /// `tokenizer.ggml.model`, arrays of the wrong type or length, duplicate entries.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let path = gguf.path().display().to_string();
        let model = match gguf.get("tokenizer.ggml.model") {
            None => bail!(
                "{path}: metadata key tokenizer.ggml.model is missing: the file has no tokenizer \
                 (streamgen needs a GGUF file with an embedded vocabulary)"
            ),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => bail!("{path}: metadata key tokenizer.ggml.model is not a string"),
        };
        if model != "llama" {
            bail!(
                "{path}: tokenizer.ggml.model is \"{model}\", which streamgen does not support \
                 (only SentencePiece vocabularies, tokenizer.ggml.model = \"llama\", e.g. Gemma, Llama 2, Mistral)"
            );
        }

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

        let scores = read_scores(gguf, &path, n)?;
        let mut attrs = read_attrs(gguf, &path, n)?;

        let text_of = |id: usize| &texts[text_offsets[id] as usize..text_offsets[id + 1] as usize];
        let index = TextIndex::build(n, |id| text_of(id).as_bytes()).map_err(|(a, b)| {
            anyhow!(
                "{path}: metadata key tokenizer.ggml.tokens: duplicate entry {:?} at ids {a} and {b}",
                text_of(a as usize)
            )
        })?;
        let lookup = |s: &str| index.get(s.as_bytes(), |id| text_of(id).as_bytes());

        // Special ids: SentencePiece defaults, then the file's keys when in range (llama.cpp
        // keeps the default when a key is out of range).
        let n32 = n as u32;
        let in_range = |id: u32| (id < n32).then_some(id);
        let key_id = |key: &str| -> Result<Option<u32>> {
            Ok(gguf.opt_u64(key)?.and_then(|v| u32::try_from(v).ok()).and_then(in_range))
        };
        let bos = key_id("tokenizer.ggml.bos_token_id")?.or(in_range(1));
        let eos = key_id("tokenizer.ggml.eos_token_id")?.or(in_range(2));
        let unk = key_id("tokenizer.ggml.unknown_token_id")?.or(in_range(0));
        let add_bos = gguf.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(true);
        let add_eos = gguf.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let add_space_prefix = gguf.opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
        if add_bos && bos.is_none() {
            bail!("{path}: tokenizer.ggml.add_bos_token is true, but tokenizer.ggml.bos_token_id is not set");
        }
        if add_eos && eos.is_none() {
            bail!("{path}: tokenizer.ggml.add_eos_token is true, but tokenizer.ggml.eos_token_id is not set");
        }

        // Tokens detected by their text, as llama.cpp does after loading (see EOG_TEXTS). The
        // first match in id order wins where llama.cpp takes the first in hash-map order; that
        // only differs for vocabularies holding two spellings of the same FIM token.
        let mut force_control = |id: u32| attrs[id as usize] |= attr::CONTROL;
        let detect = |key_value: Option<u32>, names: &[&str]| -> Option<u32> {
            key_value.or_else(|| names.iter().filter_map(|t| lookup(t)).min())
        };
        let eot_key = key_id("tokenizer.ggml.eot_token_id")?;
        let eom_key = key_id("tokenizer.ggml.eom_token_id")?;
        let eot = detect(eot_key, EOT_TEXTS);
        let eom = detect(eom_key, &["<|eom_id|>"]);
        for (found, from_key) in [(eot, eot_key.is_some()), (eom, eom_key.is_some())] {
            if let (Some(id), false) = (found, from_key) {
                force_control(id);
            }
        }
        for (key, old_key, names) in FIM_KEYS_AND_TEXTS {
            let from_key = key_id(key)?.or(key_id(old_key)?);
            if from_key.is_none()
                && let Some(id) = detect(None, names)
            {
                force_control(id);
            }
        }
        let mut eog: Vec<u32> = Vec::new();
        for (key, names) in FIM_EOG_KEYS_AND_TEXTS {
            let from_key = key_id(key)?;
            if let Some(id) = detect(from_key, names) {
                if from_key.is_none() {
                    force_control(id);
                }
                eog.push(id);
            }
        }
        for text in EOG_TEXTS {
            if let Some(id) = lookup(text) {
                eog.push(id);
                force_control(id);
            }
        }
        // gpt-oss: these structural tokens are always printed.
        for text in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(id) = lookup(text) {
                attrs[id as usize] = attr::USER_DEFINED;
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();
        // o200k_harmony and solar-open end a message with <|end|> without ending generation.
        let in_eog = |eog: &[u32], text: &str| lookup(text).filter(|id| eog.binary_search(id).is_ok());
        let has_call = in_eog(&eog, "<|call|>").is_some() || in_eog(&eog, "<|calls|>").is_some();
        let has_return_or_flush = in_eog(&eog, "<|return|>").is_some() || in_eog(&eog, "<|flush|>").is_some();
        if let Some(end) = in_eog(&eog, "<|end|>")
            && has_call
            && has_return_or_flush
        {
            eog.retain(|&id| id != end);
            attrs[end as usize] = attr::USER_DEFINED;
        }
        // Gemma 4 and PaddleOCR: </s> is an ordinary word there.
        if in_eog(&eog, "<|tool_response>").is_some()
            && let Some(s) = in_eog(&eog, "</s>")
        {
            eog.retain(|&id| id != s);
            attrs[s as usize] = attr::NORMAL;
        }

        // The byte-fallback table: `<0xNN>` (upper-case hex), else the byte itself as an entry.
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = lookup(&format!("<0x{b:02X}>")).or_else(|| {
                let b = u8::try_from(b).ok().filter(u8::is_ascii)?;
                lookup(std::str::from_utf8(&[b]).ok()?)
            });
        }

        // Output pieces (llama.cpp's token_to_piece with special = false).
        let mut pieces = Vec::with_capacity(total);
        let mut piece_offsets = Vec::with_capacity(n + 1);
        piece_offsets.push(0u32);
        for (id, &a) in attrs.iter().enumerate() {
            let text = text_of(id);
            if a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                // Not printed.
            } else if a & attr::USER_DEFINED != 0 {
                pieces.extend_from_slice(text.as_bytes());
            } else if a & attr::NORMAL != 0 {
                spm::unescape_spaces(text.as_bytes(), &mut pieces);
            } else if a & attr::BYTE != 0
                && let Some(b) = text.get(3..5).and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                pieces.push(b);
            }
            let end = u32::try_from(pieces.len())
                .map_err(|_| anyhow!("{path}: the vocabulary's pieces exceed 4 GiB"))?;
            piece_offsets.push(end);
        }

        // Special-token partition candidates, in llama.cpp's order (longest text first; among
        // equal lengths llama.cpp's std::sort leaves the order unspecified, we take the id).
        let mut by_length: Vec<u32> = (0..n32)
            .filter(|&id| attrs[id as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
            .collect();
        by_length.sort_by_key(|&id| (std::cmp::Reverse(text_of(id as usize).len()), id));
        let mut specials: Vec<Special> = by_length
            .iter()
            .enumerate()
            .map(|(rank, &id)| Special {
                id,
                rank: rank as u32,
                start: text_offsets[id as usize],
                len: text_offsets[id as usize + 1] - text_offsets[id as usize],
            })
            .collect();
        specials.sort_unstable_by(|a, b| text_of(a.id as usize).cmp(text_of(b.id as usize)));
        let mut special_first = Box::new([(0u32, 0u32); 256]);
        for (i, s) in specials.iter().enumerate() {
            let first = text_of(s.id as usize).as_bytes()[0] as usize;
            let range = &mut special_first[first];
            if range.0 == range.1 {
                *range = (i as u32, i as u32 + 1);
            } else {
                range.1 = i as u32 + 1;
            }
        }

        Ok(Self {
            texts,
            text_offsets,
            pieces,
            piece_offsets,
            scores,
            attrs,
            index,
            byte_ids,
            specials,
            special_first,
            bos,
            eos,
            unk,
            add_bos,
            add_eos,
            add_space_prefix,
            eog,
        })
    }

    /// Token ids of `text`, as llama.cpp's `llama_tokenize(text, add_special, parse_special)`.
    ///
    /// `add_special` adds BOS (and EOS) when the file asks for them; `parse_special` lets the
    /// text of control tokens such as `<start_of_turn>` become those tokens (user-defined
    /// tokens are always matched, as in llama.cpp).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special
            && self.add_bos
            && let Some(bos) = self.bos
        {
            out.push(bos);
        }
        let mut session = SpmSession::default();
        let mut prev_special = true;
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Text(start, end) => {
                    // SentencePiece adds its space prefix at the start and after special tokens.
                    let prefix = self.add_space_prefix && prev_special;
                    session.tokenize(self, &text[start..end], prefix, &mut out);
                    prev_special = false;
                }
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
            }
        }
        if add_special
            && self.add_eos
            && let Some(eos) = self.eos
        {
            out.push(eos);
        }
        out
    }

    /// The text of `ids`: each token's piece (control tokens print nothing), lossy UTF-8.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// The bytes of `ids`, before UTF-8 decoding.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id));
        }
        out
    }

    /// The bytes token `id` contributes to output: empty for control, unknown and unused tokens
    /// and for ids outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let id = id as usize;
        if id >= self.attrs.len() {
            return &[];
        }
        &self.pieces[self.piece_offsets[id] as usize..self.piece_offsets[id + 1] as usize]
    }

    /// The raw vocabulary entry of `id` (with `▁` for spaces), if `id` is in the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        let id = id as usize;
        (id < self.attrs.len()).then(|| self.text(id))
    }

    /// The id of the vocabulary entry `text`, exactly.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.lookup(text.as_bytes())
    }

    /// Whether `id` is a control token (BOS, EOS, `<start_of_turn>`…): it prints nothing.
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs.get(id as usize).is_some_and(|a| a & attr::CONTROL != 0)
    }

    /// The number of entries in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.attrs.len()
    }

    /// The beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The unknown-text token.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Whether generating `id` ends generation (EOS, end of turn and the like).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All ids that end generation, sorted.
    pub fn end_of_generation_ids(&self) -> &[u32] {
        &self.eog
    }

    fn text(&self, id: usize) -> &str {
        &self.texts[self.text_offsets[id] as usize..self.text_offsets[id + 1] as usize]
    }

    fn lookup(&self, bytes: &[u8]) -> Option<u32> {
        self.index.get(bytes, |id| self.text(id).as_bytes())
    }

    /// llama.cpp's `tokenizer_st_partition`: split `text` on special tokens. Candidates are taken
    /// longest first; each splits every remaining raw fragment at its leftmost non-overlapping
    /// occurrences. Equivalently (and without one string search per candidate): find every
    /// candidate occurrence, then accept them in (candidate order, position) order when none of
    /// their bytes is already taken, since raw fragments are exactly the runs of untaken bytes.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let bytes = text.as_bytes();
        // (rank, start, len, id) of every occurrence of an allowed candidate.
        let mut found: Vec<(u32, u32, u32, u32)> = Vec::new();
        let all = self.texts.as_bytes();
        let allowed =
            |s: &Special| parse_special || self.attrs[s.id as usize] & (attr::CONTROL | attr::UNKNOWN) == 0;
        for start in 0..bytes.len() {
            let (lo, hi) = self.special_first[bytes[start] as usize];
            let (mut lo, mut hi) = (lo as usize, hi as usize);
            let mut depth = 1;
            // Invariant: every candidate in lo..hi starts with bytes[start..start + depth].
            while lo < hi {
                let first = self.specials[lo];
                let first_text = &all[first.start as usize..(first.start + first.len) as usize];
                if hi - lo == 1 {
                    // One candidate left: compare the rest of it at once.
                    if bytes[start..].starts_with(first_text) && allowed(&first) {
                        found.push((first.rank, start as u32, first.len, first.id));
                    }
                    break;
                }
                if first_text.len() == depth {
                    // Sorted order puts the one candidate equal to the prefix first.
                    if allowed(&first) {
                        found.push((first.rank, start as u32, first.len, first.id));
                    }
                    lo += 1;
                }
                let Some(&b) = bytes.get(start + depth) else {
                    break;
                };
                let range = &self.specials[lo..hi];
                let below = range.partition_point(|s| all[s.start as usize + depth] < b);
                let upto = range.partition_point(|s| all[s.start as usize + depth] <= b);
                hi = lo + upto;
                lo += below;
                depth += 1;
            }
        }
        if found.is_empty() {
            return if text.is_empty() { Vec::new() } else { vec![Fragment::Text(0, text.len())] };
        }
        // Candidate order, then position: a stable counting sort by rank keeps the positions
        // ascending as they were found.
        let mut order = vec![0u32; self.specials.len() + 1];
        for &(rank, ..) in &found {
            order[rank as usize + 1] += 1;
        }
        for i in 1..order.len() {
            order[i] += order[i - 1];
        }
        let mut sorted = vec![(0u32, 0u32, 0u32); found.len()];
        for &(rank, start, len, id) in &found {
            let slot = &mut order[rank as usize];
            sorted[*slot as usize] = (start, len, id);
            *slot += 1;
        }
        // Earlier candidates are at least as long, so one that overlaps this occurrence covers
        // its first or its last byte: checking those two is enough.
        let mut taken = vec![false; bytes.len()];
        let mut token_at = vec![u32::MAX; bytes.len()];
        for (start, len, id) in sorted {
            let (first, last) = (start as usize, (start + len - 1) as usize);
            if !taken[first] && !taken[last] {
                taken[first..=last].fill(true);
                token_at[first] = id;
            }
        }
        let mut fragments = Vec::new();
        let (mut at, mut text_start) = (0, 0);
        while at < bytes.len() {
            let id = token_at[at];
            if id == u32::MAX {
                at += 1;
                continue;
            }
            if at > text_start {
                fragments.push(Fragment::Text(text_start, at));
            }
            fragments.push(Fragment::Token(id));
            at += self.text(id as usize).len();
            text_start = at;
        }
        if text_start < bytes.len() {
            fragments.push(Fragment::Text(text_start, bytes.len()));
        }
        fragments
    }
}

/// A piece of the input after the special-token partition: raw text (a byte range of the input)
/// or a special token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

fn read_scores(gguf: &Gguf, path: &str, n: usize) -> Result<Vec<f32>> {
    let key = "tokenizer.ggml.scores";
    let Some(value) = gguf.get(key) else {
        // llama.cpp scores every token 0 then; merges go left to right.
        return Ok(vec![0.0; n]);
    };
    let Value::Array(values) = value else { bail!("{path}: metadata key {key} is not an array") };
    if values.len() < n {
        bail!("{path}: metadata key {key} has {} entries for {n} tokens", values.len());
    }
    values[..n]
        .iter()
        .map(|v| match *v {
            Value::F32(x) => Ok(x),
            Value::F64(x) => Ok(x as f32),
            Value::I32(x) => Ok(x as f32),
            _ => Err(anyhow!("{path}: metadata key {key} holds a non-number")),
        })
        .collect()
}

fn read_attrs(gguf: &Gguf, path: &str, n: usize) -> Result<Vec<u8>> {
    let key = "tokenizer.ggml.token_type";
    let Some(value) = gguf.get(key) else {
        return Ok(vec![attr::NORMAL; n]);
    };
    let Value::Array(values) = value else { bail!("{path}: metadata key {key} is not an array") };
    if values.len() < n {
        bail!("{path}: metadata key {key} has {} entries for {n} tokens", values.len());
    }
    values[..n]
        .iter()
        .map(|v| match *v {
            Value::I32(x) => Ok(attr_from_type(x.into())),
            ref other => value_u64(other)
                .map(|x| attr_from_type(i64::try_from(x).unwrap_or(0)))
                .ok_or_else(|| anyhow!("{path}: metadata key {key} holds a non-integer")),
        })
        .collect()
}

/// An open-addressing hash index from vocabulary text to id. The texts stay in the tokenizer's
/// buffer; each slot holds an id and 32 more bits of the text's hash, so that probing compares
/// texts only when those bits agree (building the index then touches no text at random).
struct TextIndex {
    slots: Vec<u64>,
    shift: u32,
}

const EMPTY_SLOT: u64 = u64::MAX;

impl TextIndex {
    /// Indexes ids `0..n`; a duplicate text is an error carrying both ids.
    fn build<'a>(n: usize, text: impl Fn(usize) -> &'a [u8]) -> std::result::Result<Self, (u32, u32)> {
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

    fn get<'a>(&self, key: &[u8], text: impl Fn(usize) -> &'a [u8]) -> Option<u32> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use testing::{Rng, gguf_with};

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
            (
                "tokenizer.ggml.tokens",
                Value::Array(entries.iter().map(|e| Value::String(e.0.into())).collect()),
            ),
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
        assert_eq!(
            tok.encode("a😀", false, false),
            ids(&tok, &["a", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"])
        );
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
        assert_eq!(
            tok.encode("<start_of_turn>hello", false, true),
            ids(&tok, &["<start_of_turn>", "▁hello"])
        );
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
        let alphabet =
            ["a", "b", "c", " ", "  ", "\n", "\t", "hello", "é", "😀", "<", ">", "<table>", "ü", "x"];
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
                *value = Value::String("gpt2".into());
            }
        }
        let (_file, gguf) = gguf_with(metadata);
        let err = format!("{:#}", Tokenizer::from_gguf(&gguf).expect_err("gpt2"));
        assert!(err.contains("\"gpt2\"") && err.contains("not support"), "{err}");
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
}

/// Helpers shared by the tests of this module and its children.
#[cfg(test)]
mod testing {
    use candle_core::quantized::gguf_file::{self, Value};
    use std::io::Write;

    use crate::gguf::Gguf;

    /// Writes a GGUF file with `metadata` (and no tensors) and opens it.
    pub(crate) fn gguf_with(metadata: Vec<(&str, Value)>) -> (tempfile::NamedTempFile, Gguf) {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(file.as_file_mut(), &refs, &[]).expect("write gguf");
        file.flush().expect("flush");
        let gguf = Gguf::open(file.path()).expect("open gguf");
        (file, gguf)
    }

    /// A tiny deterministic PRNG (xorshift64*) so property tests need no extra crate.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }
}
