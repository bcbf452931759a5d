//! Code point classes and the GPT-2 byte ⇄ character map, as llama.cpp's `src/unicode.cpp`.
//!
//! The classes come from llama.cpp's own table (see [`super::unicode_data`]), not from Rust's or
//! Python's Unicode tables: the pre-tokenizers must split exactly where llama.cpp splits, and
//! another Unicode version would classify newly assigned code points differently.

use super::unicode_data::{ASCII, RANGES};

pub(super) const NUMBER: u16 = 0x02;
pub(super) const LETTER: u16 = 0x04;
pub(super) const MARK: u16 = 0x10;
pub(super) const PUNCTUATION: u16 = 0x20;
pub(super) const WHITESPACE: u16 = 0x0100;

/// llama.cpp's `unicode_cpt_flags_from_cpt(c).as_uint()`, restricted to the category bits and
/// the whitespace bit. Never 0 for a code point (unassigned ones are "undefined", 0x01), so 0
/// can stand for "outside the piece" as llama.cpp's default-constructed flags do.
pub(super) fn flags(c: char) -> u16 {
    let cpt = c as u32;
    if cpt < 128 {
        return ASCII[cpt as usize];
    }
    // The last range starting at or before `cpt`; RANGES[0] starts at 0.
    let i = RANGES.partition_point(|&(start, _)| start <= cpt);
    RANGES[i - 1].1
}

/// GPT-2's byte → printable character map (`bytes_to_unicode` in OpenAI's encoder.py, llama.cpp's
/// `unicode_byte_to_utf8_map`): printable Latin-1 bytes stand for themselves, the other 68 bytes
/// get the code points 256, 257, … in byte order.
pub(super) static BYTE_TO_CHAR: [char; 256] = byte_to_char();

const fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    let mut b = 0;
    while b < 256 {
        let printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        let cpt = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        table[b] = match char::from_u32(cpt) {
            Some(c) => c,
            None => '\0',
        };
        b += 1;
    }
    table
}

/// The byte a GPT-2 byte-level character stands for, if it is one of the 256.
pub(super) fn char_to_byte(c: char) -> Option<u8> {
    let cpt = c as u32;
    match cpt {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(cpt as u8),
        256..=323 => {
            // The (cpt - 256)-th byte that is not printable.
            let mut k = cpt - 256;
            (0..=255u8).find(|&b| {
                let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
                if printable {
                    return false;
                }
                if k == 0 {
                    return true;
                }
                k -= 1;
                false
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_gpt2s() {
        // Well-known members: space is Ġ, newline Ċ, tab ĉ, NUL Ā, 0xAD ń.
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], 'Ċ');
        assert_eq!(BYTE_TO_CHAR[b'\t' as usize], 'ĉ');
        assert_eq!(BYTE_TO_CHAR[0], 'Ā');
        assert_eq!(BYTE_TO_CHAR[0xAD], 'Ń');
        assert_eq!(BYTE_TO_CHAR[b'a' as usize], 'a');
        // A bijection, and char_to_byte is its inverse.
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(BYTE_TO_CHAR[b as usize]), Some(b), "{b}");
        }
        let mut chars: Vec<char> = BYTE_TO_CHAR.to_vec();
        chars.sort_unstable();
        chars.dedup();
        assert_eq!(chars.len(), 256);
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(char_to_byte('€'), None);
    }

    #[test]
    fn classes_follow_llama_cpp() {
        assert_eq!(flags('a'), LETTER);
        assert_eq!(flags('7'), NUMBER);
        assert_eq!(flags(' '), WHITESPACE | 0x08);
        assert_eq!(flags('\n'), WHITESPACE | 0x80);
        assert_eq!(flags('!'), PUNCTUATION);
        assert_eq!(flags('é'), LETTER);
        assert_eq!(flags('日'), LETTER);
        assert_eq!(flags('²'), NUMBER);
        assert_eq!(flags('\u{0301}'), MARK);
        assert_eq!(flags('\u{3000}'), WHITESPACE | 0x08);
        // U+0085 (next line) is whitespace in llama.cpp's list; U+200B (zero width space) is not.
        assert_ne!(flags('\u{85}') & WHITESPACE, 0);
        assert_eq!(flags('\u{200B}') & WHITESPACE, 0);
        assert_eq!(flags('😀'), 0x40);
        // Unassigned and private use.
        assert_eq!(flags('\u{10FFFF}'), 0x01);
        assert_ne!(flags('\u{E000}'), 0);
    }
}
