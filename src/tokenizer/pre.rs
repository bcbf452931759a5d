//! Byte-level BPE pre-tokenizers: how llama.cpp cuts text into pieces before merging, chosen by
//! `tokenizer.ggml.pre`.
//!
//! llama.cpp applies a list of regexes in sequence: the first cuts the text into pieces (matches
//! and the gaps between them both become pieces), each later one re-cuts every piece on its own,
//! so a look-ahead at a piece's end sees the end of input (`unicode_regex_split`). The common
//! lists run through hand-written splitters there (`unicode_regex_split_custom_gpt2`, `_llama3`,
//! `_qwen2`, `_qwen35` in `src/unicode.cpp`), the rest through `std::regex` on a "collapsed" text
//! in which every non-ASCII code point is one byte for its class. These functions follow those
//! splitters line by line, and the collapsed semantics for the simple class runs, so the
//! pieces are llama.cpp's by construction; no regex engine is involved.

use super::unicode::{LETTER, MARK, NUMBER, PUNCTUATION, WHITESPACE};

/// A pre-tokenizer recipe (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*` with the same regex list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pre {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// `\p{N}`, then GPT-2: every digit is its own piece (StarCoder, Refact, SmolLM, Command R).
    DigitsThenGpt2,
    /// `(?:'[sS]|…)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    Llama3,
    /// As Llama 3 with `\p{N}` (one digit per piece).
    Qwen2,
    /// As Qwen2 with combining marks counted with letters: `[\p{L}\p{M}]+`.
    Qwen35,
    /// `[\p{P}\$\+<=>\^~\|`]+`, then GPT-2, then `[0-9][0-9][0-9]`.
    Falcon,
    /// `[\p{P}\$\+<=>\^~\|]+`, then GPT-2, then `\p{N}+`, then `[0-9][0-9][0-9]`: llama.cpp's
    /// fallback for a missing `tokenizer.ggml.pre` or `default`.
    Default,
}

/// What a `tokenizer.ggml.pre` value selects.
#[derive(Debug, Clone, Copy)]
pub(super) struct Recipe {
    pub pre: Pre,
    /// A piece that is a vocabulary entry becomes that token without merging.
    pub ignore_merges: bool,
    /// Whether BOS is added when the file has no `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
}

/// llama.cpp's recipe for a BPE vocabulary without `tokenizer.ggml.pre`.
pub(super) const DEFAULT: Recipe = Recipe { pre: Pre::Default, ignore_merges: false, add_bos: false };

/// The `tokenizer.ggml.pre` values supported, for the error message.
pub(super) const SUPPORTED: &str = "default, gpt-2, phi-2, mpt, olmo, jais, starcoder, refact, smollm, command-r, \
     codeshell, exaone, minerva, llama-bpe, llama3, llama-v3, falcon3, falcon-h1, pixtral, lfm2, \
     dbrx, smaug-bpe, qwen2, deepseek-r1-qwen, stablelm2, qwen35, falcon";

impl Recipe {
    /// The recipe of a `tokenizer.ggml.pre` value (llama.cpp's `llama_vocab::impl::load`, which
    /// also sets `ignore_merges` and the BOS default there); `None` when not supported.
    pub(super) fn from_name(name: &str) -> Option<Self> {
        let (pre, ignore_merges, add_bos) = match name {
            "default" => (Pre::Default, false, false),
            "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
            | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais" | "trillion" | "exaone4" => {
                (Pre::Gpt2, false, false)
            }
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva"
            | "mellum2" => (Pre::DigitsThenGpt2, false, false),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
            | "lfm2" | "jina-v5-nano" => (Pre::Llama3, true, true),
            "dbrx" | "smaug-bpe" => (Pre::Llama3, false, false),
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "stablelm2" | "hunyuan" | "solar-open" => {
                (Pre::Qwen2, false, false)
            }
            "qwen35" => (Pre::Qwen35, false, false),
            "falcon" => (Pre::Falcon, false, false),
            _ => return None,
        };
        Some(Self { pre, ignore_merges, add_bos })
    }
}

impl Pre {
    /// Cuts `cpts` (whose classes are `flags`) into pieces; `out` receives each piece's length
    /// in code points, in order. `scratch` is reused between stages.
    pub(super) fn split(self, cpts: &[char], flags: &[u16], out: &mut Vec<usize>, scratch: &mut Vec<usize>) {
        out.clear();
        if cpts.is_empty() {
            return;
        }
        out.push(cpts.len());
        let text = Text { cpts, flags };
        let mut stage = |f: &Splitter| {
            std::mem::swap(out, scratch);
            out.clear();
            let mut start = 0;
            for &len in scratch.iter() {
                f(text, start, start + len, out);
                start += len;
            }
        };
        match self {
            Pre::Gpt2 => stage(&gpt2),
            Pre::DigitsThenGpt2 => {
                stage(&|t, ini, end, out| runs(ini, end, out, 1, |pos| t.collapsed(pos, NUMBER, "")));
                stage(&gpt2);
            }
            Pre::Llama3 => stage(&|t, ini, end, out| llama3_like(t, ini, end, out, 3, false)),
            Pre::Qwen2 => stage(&|t, ini, end, out| llama3_like(t, ini, end, out, 1, false)),
            Pre::Qwen35 => stage(&|t, ini, end, out| llama3_like(t, ini, end, out, 1, true)),
            Pre::Falcon => {
                stage(&|t, ini, end, out| {
                    runs(ini, end, out, usize::MAX, |pos| t.collapsed(pos, PUNCTUATION, "$+<=>^~|`"))
                });
                stage(&gpt2);
                stage(&|t, ini, end, out| three_digits(t, ini, end, out));
            }
            Pre::Default => {
                stage(&|t, ini, end, out| {
                    runs(ini, end, out, usize::MAX, |pos| t.collapsed(pos, PUNCTUATION, "$+<=>^~|"))
                });
                stage(&gpt2);
                stage(&|t, ini, end, out| {
                    runs(ini, end, out, usize::MAX, |pos| t.collapsed(pos, NUMBER, ""))
                });
                stage(&|t, ini, end, out| three_digits(t, ini, end, out));
            }
        }
    }
}

/// One regex of a recipe: cuts the piece `ini..end` of the text, pushing the new lengths.
type Splitter<'a> = dyn Fn(Text, usize, usize, &mut Vec<usize>) + 'a;

#[derive(Clone, Copy)]
struct Text<'a> {
    cpts: &'a [char],
    flags: &'a [u16],
}

impl Text<'_> {
    /// Whether the code point at `pos` is in `[\p{class}extra]` as llama.cpp's `std::regex`
    /// fallback sees it: ASCII as itself (the class's ASCII members, from the same table), any
    /// other code point as one byte for its class, or a whitespace byte when it is whitespace.
    fn collapsed(&self, pos: usize, class: u16, extra: &str) -> bool {
        let c = self.cpts[pos];
        let flags = self.flags[pos];
        if c.is_ascii() {
            flags & class != 0 || extra.contains(c)
        } else {
            flags & WHITESPACE == 0 && flags & 0xFF == class
        }
    }
}

/// Emits the part of a piece between the last cut and `end`, if not empty.
struct Cutter<'o> {
    prev_end: usize,
    out: &'o mut Vec<usize>,
}

impl Cutter<'_> {
    fn cut(&mut self, end: usize) {
        if end > self.prev_end {
            self.out.push(end - self.prev_end);
        }
        self.prev_end = end;
    }
}

/// Matches of `class{1,max_len}` (greedy, left to right) and the gaps between them.
fn runs(ini: usize, end: usize, out: &mut Vec<usize>, max_len: usize, class: impl Fn(usize) -> bool) {
    let mut cutter = Cutter { prev_end: ini, out };
    let mut pos = ini;
    while pos < end {
        if class(pos) {
            cutter.cut(pos);
            let start = pos;
            while pos < end && pos - start < max_len && class(pos) {
                pos += 1;
            }
            cutter.cut(pos);
        } else {
            pos += 1;
        }
    }
    cutter.cut(end);
}

/// Matches of `[0-9][0-9][0-9]` (left to right, non-overlapping) and the gaps between them.
fn three_digits(t: Text, ini: usize, end: usize, out: &mut Vec<usize>) {
    let mut cutter = Cutter { prev_end: ini, out };
    let mut pos = ini;
    while pos < end {
        if pos + 3 <= end && t.cpts[pos..pos + 3].iter().all(char::is_ascii_digit) {
            cutter.cut(pos);
            pos += 3;
            cutter.cut(pos);
        } else {
            pos += 1;
        }
    }
    cutter.cut(end);
}

/// llama.cpp's `unicode_regex_split_custom_gpt2`.
fn gpt2(t: Text, ini: usize, end: usize, out: &mut Vec<usize>) {
    // Classes outside the piece are 0, as llama.cpp's default flags.
    let f = |pos: usize| if pos < end { t.flags[pos] } else { 0 };
    let mut cutter = Cutter { prev_end: ini, out };
    let mut pos = ini;
    while pos < end {
        let c = t.cpts[pos];
        // 's|'t|'re|'ve|'m|'ll|'d (case-sensitive here)
        if c == '\'' && pos + 1 < end {
            let next = t.cpts[pos + 1];
            if matches!(next, 's' | 't' | 'm' | 'd') {
                pos += 2;
                cutter.cut(pos);
                continue;
            }
            if pos + 2 < end && matches!((next, t.cpts[pos + 2]), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                pos += 3;
                cutter.cut(pos);
                continue;
            }
        }
        let space = usize::from(c == ' ');
        let mut f2 = if c == ' ' { f(pos + 1) } else { f(pos) };
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
        if let Some(class) = [LETTER, NUMBER].into_iter().find(|&class| f2 & class != 0) {
            pos += space;
            while f2 & class != 0 {
                pos += 1;
                f2 = f(pos);
            }
            cutter.cut(pos);
            continue;
        }
        if f2 & (WHITESPACE | LETTER | NUMBER) == 0 && f2 != 0 {
            pos += space;
            while f2 & (WHITESPACE | LETTER | NUMBER) == 0 && f2 != 0 {
                pos += 1;
                f2 = f(pos);
            }
            cutter.cut(pos);
            continue;
        }
        pos = whitespace(t, pos, end, &mut cutter, false);
    }
}

/// The whitespace alternatives shared by all splitters: `\s*[\r\n]+` (when `newlines`),
/// `\s+(?!\S)`, `\s+`, else one code point on its own. Returns the new position.
fn whitespace(t: Text, pos: usize, end: usize, cutter: &mut Cutter, newlines: bool) -> usize {
    let mut n = 0;
    let mut last_newline_end = None;
    while pos + n < end && t.flags[pos + n] & WHITESPACE != 0 {
        if newlines && matches!(t.cpts[pos + n], '\r' | '\n') {
            last_newline_end = Some(pos + n + 1);
        }
        n += 1;
    }
    let to = if let Some(to) = last_newline_end {
        to
    } else if n > 1 && pos + n < end {
        // \s+(?!\S): all but the last whitespace, which goes with what follows.
        pos + n - 1
    } else if n > 0 {
        pos + n
    } else {
        pos + 1
    };
    cutter.cut(to);
    to
}

/// llama.cpp's `unicode_regex_split_custom_llama3` (`max_digits` 3, no marks), `_qwen2`
/// (`max_digits` 1) and `_qwen35` (`max_digits` 1, marks count with letters).
fn llama3_like(t: Text, ini: usize, end: usize, out: &mut Vec<usize>, max_digits: usize, marks: bool) {
    let f = |pos: usize| if pos < end { t.flags[pos] } else { 0 };
    let word = if marks { LETTER | MARK } else { LETTER };
    let mut cutter = Cutter { prev_end: ini, out };
    let mut pos = ini;
    while pos < end {
        let c = t.cpts[pos];
        let flags = f(pos);
        // (?i:'s|'t|'re|'ve|'m|'ll|'d): llama.cpp lower-cases with its own table, where only
        // ASCII letters lower-case to these letters (checked by scripts/gen-unicode-data.py).
        if c == '\'' && pos + 1 < end {
            let next = t.cpts[pos + 1].to_ascii_lowercase();
            if matches!(next, 's' | 't' | 'm' | 'd') {
                pos += 2;
                cutter.cut(pos);
                continue;
            }
            if pos + 2 < end
                && matches!(
                    (next, t.cpts[pos + 2].to_ascii_lowercase()),
                    ('r', 'e') | ('v', 'e') | ('l', 'l')
                )
            {
                pos += 3;
                cutter.cut(pos);
                continue;
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+ (with \p{M} beside \p{L} for Qwen 3.5)
        if !(c == '\r' || c == '\n' || flags & NUMBER != 0) && (flags & word != 0 || f(pos + 1) & word != 0) {
            pos += 1;
            while f(pos) & word != 0 {
                pos += 1;
            }
            cutter.cut(pos);
            continue;
        }
        // \p{N}{1,max_digits}
        if flags & NUMBER != 0 {
            let mut group = pos;
            while f(pos) & NUMBER != 0 {
                pos += 1;
                if pos - group >= max_digits {
                    cutter.cut(pos);
                    group = pos;
                }
            }
            cutter.cut(pos);
            continue;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`; llama.cpp tests the first code point's flags for being
        // inside the piece, so a lone trailing space is taken here too.
        let other = WHITESPACE | word | NUMBER;
        let mut f2 = if c == ' ' { f(pos + 1) } else { flags };
        if f2 & other == 0 && flags != 0 {
            pos += usize::from(c == ' ');
            while f2 & other == 0 && f2 != 0 {
                pos += 1;
                f2 = f(pos);
            }
            while pos < end && matches!(t.cpts[pos], '\r' | '\n') {
                pos += 1;
            }
            cutter.cut(pos);
            continue;
        }
        pos = whitespace(t, pos, end, &mut cutter, true);
    }
}
