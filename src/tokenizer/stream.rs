//! The incremental UTF-8 decoder that streaming output uses: token bytes in, complete
//! characters out.

/// Incremental detokenizer: feed each token's bytes, get text as soon as it is complete UTF-8.
///
/// It holds back at most an incomplete UTF-8 sequence at the end (3 bytes); invalid bytes become
/// U+FFFD at once. The concatenated output equals `String::from_utf8_lossy` of all bytes pushed,
/// however they were split.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes`; returns the text completed so far.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // The first `valid_up_to` bytes are valid UTF-8 by definition.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // An invalid sequence: one replacement character, as from_utf8_lossy.
                        Some(len) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[len..];
                        }
                        // A sequence cut short by the end of the input: wait for more bytes.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let drop = self.pending.len() - keep;
        self.pending.drain(..drop);
        out
    }

    /// Flushes what is pending: an incomplete sequence becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::test_support::Rng;

    fn stream(chunks: &[&[u8]]) -> String {
        let mut decoder = StreamDecoder::new();
        let mut out = String::new();
        for chunk in chunks {
            out.push_str(&decoder.push(chunk));
        }
        out + &decoder.finish()
    }

    #[test]
    fn stream_decoder_cases() {
        let mut d = StreamDecoder::new();
        // A 2-byte character split 1+1: nothing, then the character.
        assert_eq!(d.push(&[0xC3]), "");
        assert_eq!(d.push(&[0xA9]), "é");
        // A 4-byte emoji split 1+3 and 3+1.
        let emoji = "😀".as_bytes();
        assert_eq!(d.push(&emoji[..1]), "");
        assert_eq!(d.push(&emoji[1..]), "😀");
        assert_eq!(d.push(&emoji[..3]), "");
        assert_eq!(d.push(&emoji[3..]), "😀");
        // Invalid bytes are replaced at once, never held back.
        assert_eq!(d.push(&[0xFF]), "\u{FFFD}");
        assert_eq!(d.push(&[b'a', 0x80, b'b']), "a\u{FFFD}b");
        // A lead byte followed by a non-continuation: replacement, then the ASCII.
        assert_eq!(d.push(&[0xE2]), "");
        assert_eq!(d.push(b"x"), "\u{FFFD}x");
        // An incomplete tail at the end becomes one replacement character.
        assert_eq!(d.push(&[0xF0, 0x9F]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
        assert_eq!(d.finish(), "");
        // Plain ASCII passes straight through.
        assert_eq!(stream(&[b"hello", b" ", b"world"]), "hello world");
    }

    #[test]
    fn stream_decoder_equals_lossy_decoding_for_any_split() {
        let samples: Vec<Vec<u8>> = vec![
            "héllo wörld 😀🎉👍🏽 ❤️ π≈3.14 日本語".as_bytes().to_vec(),
            vec![0xF0, 0x9F, 0x98, 0x80, 0xF0, 0x9F, 0x98, 0xC3, 0xA9, 0xE2, 0x82],
            vec![0x80, 0xBF, 0xC0, 0xC1, 0xF5, 0xFF, 0xED, 0xA0, 0x80, 0xEF, 0xBF, 0xBD, b'z'],
            vec![0xE2, 0x96, 0x81, 0xE2, 0x96, 0xF0, 0x90, 0x80, 0x41, 0xF4, 0x90, 0x80, 0x80],
            vec![0xC3, 0xC3, 0xA9, 0xE0, 0x80, 0xAF, 0xE0, 0xA0, 0xF0, 0x8F, 0xBF, 0xBF],
        ];
        let mut rng = Rng(7);
        for sample in &samples {
            let want = String::from_utf8_lossy(sample).into_owned();
            for _ in 0..400 {
                let mut decoder = StreamDecoder::new();
                let mut got = String::new();
                let mut at = 0;
                while at < sample.len() {
                    let take = 1 + rng.below(4.min(sample.len() - at));
                    let out = decoder.push(&sample[at..at + take]);
                    got.push_str(&out);
                    at += take;
                    // Never more than an incomplete sequence (≤ 3 bytes) held back.
                    assert!(decoder.pending.len() <= 3, "{sample:?}");
                }
                got.push_str(&decoder.finish());
                assert_eq!(got, want, "{sample:?}");
            }
        }
    }

    /// Bytes that are mostly pieces of UTF-8 sequences (whole, cut short, or stray), so that
    /// chunk boundaries fall inside characters.
    fn utf8ish() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            any::<char>().prop_map(|c| c.to_string().into_bytes()),
            (any::<char>(), any::<prop::sample::Index>()).prop_map(|(c, cut)| {
                let bytes = c.to_string().into_bytes();
                bytes[..cut.index(bytes.len())].to_vec()
            }),
            any::<u8>().prop_map(|b| vec![b]),
        ];
        proptest::collection::vec(piece, 0..24).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// However bytes are cut into chunks, the streamed text equals the lossy decoding of
        /// all of them at once, so no character is ever split or replaced because of a cut; and
        /// no more than an incomplete sequence is held back.
        #[test]
        fn any_chunking_equals_decoding_at_once(
            bytes in utf8ish(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut decoder = StreamDecoder::new();
            let mut got = String::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                got.push_str(&decoder.push(&bytes[at..cut]));
                at = cut;
                prop_assert!(decoder.pending.len() <= 3, "{} bytes pending", decoder.pending.len());
            }
            got.push_str(&decoder.finish());
            prop_assert_eq!(got, String::from_utf8_lossy(&bytes));
        }

        /// Valid UTF-8 cut anywhere comes out unchanged: each chunk of output is whole characters.
        #[test]
        fn valid_text_cut_anywhere_is_unchanged(text: String, cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8)) {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut decoder = StreamDecoder::new();
            let mut got = String::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                let out = decoder.push(&bytes[at..cut]);
                // What came out so far is a prefix of the text, ending at a char boundary.
                got.push_str(&out);
                prop_assert!(text.starts_with(&got), "{got:?} is not a prefix of {text:?}");
                at = cut;
            }
            prop_assert_eq!(decoder.finish(), "");
            prop_assert_eq!(got, text);
        }
    }
}
