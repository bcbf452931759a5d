//! Special tokens: the ids of BOS, EOS and unknown, the end-of-generation set (llama.cpp's
//! tables of EOG, EOT and FIM texts, detected when their keys are absent), the per-family
//! quirks, and the partition of input text on special tokens with its index.

use anyhow::{Result, bail};

use crate::gguf::Gguf;

use super::Tokenizer;
use super::pre::Recipe;
use super::vocab::{Texts, attr};

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

/// The ids of BOS, EOS and unknown, and whether `encode` adds BOS, EOS and a space prefix.
pub(super) struct SpecialIds {
    pub(super) bos: Option<u32>,
    pub(super) eos: Option<u32>,
    pub(super) unk: Option<u32>,
    pub(super) add_bos: bool,
    pub(super) add_eos: bool,
    pub(super) add_space_prefix: bool,
}

impl SpecialIds {
    /// Reads them for a vocabulary of `n` tokens (`recipe` is `None` for SentencePiece). A file
    /// that asks for BOS or EOS without naming it is an error.
    pub(super) fn read(gguf: &Gguf, path: &str, n: usize, recipe: Option<Recipe>) -> Result<Self> {
        let is_bpe = recipe.is_some();
        // Special ids: SentencePiece defaults, then the file's keys when in range (llama.cpp
        // keeps the default when a key is out of range).
        let n32 = n as u32;
        let in_range = |id: u32| (id < n32).then_some(id);
        let key_id = |key: &str| key_id(gguf, n, key);
        // llama.cpp's defaults: SentencePiece bos 1, eos 2, unk 0; BPE bos = eos = 11 (GPT-2's
        // era), no unk, and BOS only where the pre-tokenizer recipe says so (Llama 3). The file's
        // keys override all of these.
        let (bos_default, eos_default, unk_default) = if is_bpe { (11, 11, None) } else { (1, 2, Some(0)) };
        let bos = key_id("tokenizer.ggml.bos_token_id")?.or(in_range(bos_default));
        let eos = key_id("tokenizer.ggml.eos_token_id")?.or(in_range(eos_default));
        let unk = key_id("tokenizer.ggml.unknown_token_id")?.or(unk_default.and_then(in_range));
        let add_bos_default = recipe.is_none_or(|r| r.add_bos);
        let add_bos = gguf.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_default);
        let add_eos = gguf.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        // BPE never adds a space prefix (llama.cpp reads the key for every model but only the
        // SentencePiece session uses it).
        let add_space_prefix = !is_bpe && gguf.opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
        if add_bos && bos.is_none() {
            bail!("{path}: tokenizer.ggml.add_bos_token is true, but tokenizer.ggml.bos_token_id is not set");
        }
        if add_eos && eos.is_none() {
            bail!("{path}: tokenizer.ggml.add_eos_token is true, but tokenizer.ggml.eos_token_id is not set");
        }
        Ok(Self { bos, eos, unk, add_bos, add_eos, add_space_prefix })
    }
}

/// The id in metadata key `key`, when it is set and inside the vocabulary of `n` tokens.
fn key_id(gguf: &Gguf, n: usize, key: &str) -> Result<Option<u32>> {
    let n32 = n as u32;
    let in_range = |id: u32| (id < n32).then_some(id);
    Ok(gguf.opt_u64(key)?.and_then(|v| u32::try_from(v).ok()).and_then(in_range))
}

/// The sorted ids that end generation: EOS, the end-of-turn and end-of-message tokens, the FIM
/// tokens that end generation and every token with an EOG text. Tokens detected by their text
/// become CONTROL in `attrs`; the structural tokens of some families become printable again.
pub(super) fn end_of_generation(
    gguf: &Gguf,
    n: usize,
    lookup: &impl Fn(&str) -> Option<u32>,
    attrs: &mut [u8],
    eos: Option<u32>,
) -> Result<Vec<u32>> {
    let key_id = |key: &str| key_id(gguf, n, key);
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
    Ok(eog)
}

/// The per-family quirk llama.cpp applies by model name after loading the vocabulary: Phi-3's
/// special tokens take the whitespace after them.
pub(super) fn phi3_rstrip(
    gguf: &Gguf,
    lookup: &impl Fn(&str) -> Option<u32>,
    attrs: &mut [u8],
) -> Result<()> {
    // Phi-3 (told by the model's name, as llama.cpp tells it): whitespace after a special
    // token is part of the token, as in the Hugging Face tokenizer's `rstrip` added tokens.
    let name = gguf.opt_str("general.name")?.unwrap_or("").to_lowercase();
    if name.contains("phi-3") || name.contains("phi3") {
        for a in attrs.iter_mut() {
            if *a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0 {
                *a |= attr::RSTRIP;
            }
        }
        if let Some(id) = lookup("</s>") {
            attrs[id as usize] |= attr::RSTRIP;
        }
        for text in ["<unk>", "<s>", "<|endoftext|>"] {
            if let Some(id) = lookup(text) {
                attrs[id as usize] &= !attr::RSTRIP;
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
pub(super) struct Special {
    id: u32,
    /// Position in llama.cpp's `cache_special_tokens` order: longest text first.
    rank: u32,
    /// The token's text, `texts[start..start + len]`.
    start: u32,
    len: u32,
}

/// The special-token partition's candidates (CONTROL, USER_DEFINED, UNKNOWN) ordered by text,
/// and for each first byte the range of them starting with it.
pub(super) fn partition_index(texts: &Texts, attrs: &[u8]) -> (Vec<Special>, Box<[(u32, u32); 256]>) {
    let n32 = attrs.len() as u32;
    let text_of = |id: usize| texts.get(id);
    let text_offsets = &texts.offsets;
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
    (specials, special_first)
}

impl Tokenizer {
    /// llama.cpp's `tokenizer_st_partition`: split `text` on special tokens. Candidates are taken
    /// longest first; each splits every remaining raw fragment at its leftmost non-overlapping
    /// occurrences. Equivalently (and without one string search per candidate): find every
    /// candidate occurrence, then accept them in (candidate order, position) order when none of
    /// their bytes is already taken, since raw fragments are exactly the runs of untaken bytes.
    pub(super) fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
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
            if self.attrs[id as usize] & attr::RSTRIP != 0 {
                // C's isspace: space, \t, \n, \v, \f, \r. llama.cpp strips them when this
                // token splits its fragment, before any shorter special token (such as a
                // whitespace token) splits the rest; so they go even where one matched.
                while at < bytes.len() && matches!(bytes[at], b' ' | b'\t'..=b'\r') {
                    at += 1;
                }
            }
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
pub(super) enum Fragment {
    Text(usize, usize),
    Token(u32),
}
