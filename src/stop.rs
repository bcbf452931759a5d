//! Stop strings over a stream of decoded text: decides which text is safe to print now, which
//! must be held back because it could still be the start of a stop string, and where the
//! output ends when a stop string appears. It sees only text, never token ids, so a stop
//! string that spans several tokens (or ends in the middle of one) is found all the same.

/// Filters a stream of text chunks against a set of stop strings.
///
/// The concatenation of everything [`StopFilter::push`] and [`StopFilter::finish`] return is
/// exactly the input up to (not including) the first stop string to be completed, or the
/// whole input when none occurs, however the input is cut into chunks. "First completed"
/// matters when stops overlap: with stops `abcd` and `bc`, the text `xabcd` stops at `bc`,
/// because a generator would have stopped there before producing the `d`.
#[derive(Debug, Clone, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    /// Text received but not yet released: always a proper prefix of some stop string.
    held: String,
    /// Set once a stop string has been seen; everything after it is swallowed.
    stopped: bool,
}

impl StopFilter {
    /// A filter for `stops`. Empty strings are ignored (an empty stop would end generation
    /// before its first token, which nobody means); no stops at all makes a pass-through.
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self { stops, held: String::new(), stopped: false }
    }

    /// Whether a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The text currently held back because it could still begin a stop string.
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Feeds the next decoded chunk. Returns the text that is safe to emit now and whether a
    /// stop string was hit. On a hit the returned text ends right before the stop string,
    /// which is never returned; once stopped, further chunks return nothing.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        if self.stops.is_empty() {
            return (text.to_owned(), false);
        }
        self.held.push_str(text);
        // The stop string completed first: generation ends the moment one is complete, so
        // the earliest *end* decides, whatever the chunking (of two ending at the same byte,
        // the longer one is cut). `held` had no complete stop before this chunk, so any
        // occurrence ends inside the new text, though it may begin in the held part.
        let hit = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()).map(|start| (start + stop.len(), start)))
            .min();
        if let Some((_, start)) = hit {
            self.held.truncate(start);
            self.stopped = true;
            return (std::mem::take(&mut self.held), true);
        }
        // Hold back from the earliest position whose suffix could still grow into a stop
        // string; everything before it can never be part of one, so it goes out now.
        let keep_from = self.partial_match_start();
        let rest = self.held.split_off(keep_from);
        (std::mem::replace(&mut self.held, rest), false)
    }

    /// Ends the stream without a hit: releases whatever is held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn partial_match_start(&self) -> usize {
        partial_match_start(&self.held, &self.stops)
    }
}

/// The smallest char boundary `i` such that `text[i..]` is a proper prefix of one of
/// `patterns` (a match the next text may complete), or `text.len()` when no end of `text` is.
/// Only the last `longest pattern - 1` bytes can qualify, so the scan is short however long
/// `text` is. (Also the reasoning splitter's test for a partial `</think>`.)
pub fn partial_match_start<S: AsRef<str>>(text: &str, patterns: &[S]) -> usize {
    let longest = patterns.iter().map(|p| p.as_ref().len()).max().unwrap_or(0);
    let lower = text.len().saturating_sub(longest.saturating_sub(1));
    text.char_indices()
        .map(|(i, _)| i)
        .filter(|&i| i >= lower)
        .find(|&i| {
            let tail = &text[i..];
            patterns.iter().any(|p| p.as_ref().len() > tail.len() && p.as_ref().starts_with(tail))
        })
        .unwrap_or(text.len())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The whole-string answer: `input` cut before the first (non-empty) stop to be completed,
    /// found by growing the text one byte at a time and looking for a stop at its end.
    fn reference(input: &str, stops: &[&str]) -> (String, bool) {
        let first = (1..=input.len()).find_map(|end| {
            stops
                .iter()
                .filter(|s| !s.is_empty() && input.is_char_boundary(end))
                .filter(|s| input[..end].ends_with(*s))
                .map(|s| end - s.len())
                .min()
        });
        match first {
            Some(i) => (input[..i].to_owned(), true),
            None => (input.to_owned(), false),
        }
    }

    /// What a perfect streaming filter may have released after seeing `seen` (which holds
    /// no complete stop): everything before the earliest suffix that is a proper prefix of a stop.
    fn reference_released<'a>(seen: &'a str, stops: &[&str]) -> &'a str {
        let start = seen
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &seen[i..];
                stops.iter().any(|s| s.len() > tail.len() && s.starts_with(tail))
            })
            .unwrap_or(seen.len());
        &seen[..start]
    }

    /// Runs the filter over `chunks`, checking after every push that exactly the right text
    /// has been released so far, and returns the concatenated output and whether it stopped.
    fn run(chunks: &[&str], stops: &[&str]) -> (String, bool) {
        let mut filter = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        let mut seen = String::new();
        for chunk in chunks {
            seen.push_str(chunk);
            let (text, hit) = filter.push(chunk);
            out.push_str(&text);
            if hit {
                return (out, true);
            }
            assert_eq!(
                out,
                reference_released(&seen, stops),
                "released text after {chunks:?} with stops {stops:?}"
            );
        }
        out.push_str(&filter.finish());
        (out, false)
    }

    /// Every way to cut `input` at char boundaries (2^(n-1) splits for n chars).
    fn all_splits(input: &str) -> Vec<Vec<&str>> {
        let bounds: Vec<usize> = input.char_indices().map(|(i, _)| i).skip(1).collect();
        assert!(bounds.len() < 16, "too many splits for an exhaustive test");
        (0u32..1 << bounds.len())
            .map(|mask| {
                let mut pieces = Vec::new();
                let mut start = 0;
                for (bit, &b) in bounds.iter().enumerate() {
                    if mask & (1 << bit) != 0 {
                        pieces.push(&input[start..b]);
                        start = b;
                    }
                }
                pieces.push(&input[start..]);
                pieces
            })
            .collect()
    }

    fn check_every_split(input: &str, stops: &[&str]) {
        let expected = reference(input, stops);
        for chunks in all_splits(input) {
            assert_eq!(run(&chunks, stops), expected, "input split as {chunks:?}, stops {stops:?}");
        }
    }

    #[test]
    fn no_stops_passes_everything_through_at_once() {
        let mut filter = StopFilter::new(vec![]);
        assert_eq!(filter.push("Hello"), ("Hello".to_owned(), false));
        assert_eq!(filter.push(" world"), (" world".to_owned(), false));
        assert_eq!(filter.finish(), "");
        let mut filter = StopFilter::new(vec![String::new()]);
        assert_eq!(filter.push("x"), ("x".to_owned(), false));
    }

    #[test]
    fn stop_split_across_chunks_is_never_emitted() {
        let mut filter = StopFilter::new(vec!["</answer>".into()]);
        assert_eq!(filter.push("The sky is blue</"), ("The sky is blue".to_owned(), false));
        assert_eq!(filter.held(), "</");
        assert_eq!(filter.push("ans"), (String::new(), false));
        assert_eq!(filter.push("wer> and more"), (String::new(), true));
        assert!(filter.stopped());
        assert_eq!(filter.push("after"), (String::new(), true));
        assert_eq!(filter.finish(), "");
    }

    #[test]
    fn held_text_is_released_as_soon_as_it_cannot_match() {
        let mut filter = StopFilter::new(vec!["STOP".into()]);
        assert_eq!(filter.push("a ST"), ("a ".to_owned(), false));
        assert_eq!(filter.push("O"), (String::new(), false));
        assert_eq!(filter.push("P!"), (String::new(), true));

        let mut filter = StopFilter::new(vec!["STOP".into()]);
        assert_eq!(filter.push("a ST"), ("a ".to_owned(), false));
        assert_eq!(filter.push("AR"), ("STAR".to_owned(), false));
        assert_eq!(filter.push("S"), (String::new(), false));
        assert_eq!(filter.finish(), "S");
    }

    #[test]
    fn overlapping_prefixes() {
        // "aab": the first 'a' starts a false match; the stop begins at the second one.
        check_every_split("aab", &["ab"]);
        check_every_split("xaabx", &["ab"]);
        check_every_split("aaab", &["aab"]);
        check_every_split("abababc", &["ababc"]);
        check_every_split("aabaabaaab", &["aaab"]);
        let mut filter = StopFilter::new(vec!["ab".into()]);
        assert_eq!(filter.push("a"), (String::new(), false));
        assert_eq!(filter.push("a"), ("a".to_owned(), false));
        assert_eq!(filter.push("b"), (String::new(), true));
    }

    #[test]
    fn stop_at_the_very_start() {
        check_every_split("ENDrest", &["END"]);
        let mut filter = StopFilter::new(vec!["END".into()]);
        assert_eq!(filter.push("END"), (String::new(), true));
    }

    #[test]
    fn stop_at_the_very_end_and_never_completed() {
        check_every_split("text END", &["END"]);
        check_every_split("text EN", &["END"]);
        check_every_split("E", &["END"]);
    }

    #[test]
    fn several_stops_the_earliest_wins() {
        check_every_split("one two three", &["three", "two"]);
        check_every_split("one two three", &["o t", "two"]);
        // The stop completed first wins, even over a longer one that began earlier ...
        check_every_split("xabcd", &["abcd", "bc"]);
        assert_eq!(run(&["xabcd"], &["abcd", "bc"]), ("xa".to_owned(), true));
        // ... and of two completed at the same byte, the longer one is cut.
        assert_eq!(run(&["xabc"], &["bc", "abc"]), ("x".to_owned(), true));
        check_every_split("xabcx", &["bc", "abc"]);
        check_every_split("<|im_end|>", &["<|im_end|>", "<|endoftext|>", "|"]);
        check_every_split("hello\n\nUser:", &["\n\nUser:", "\nUser:"]);
    }

    #[test]
    fn multibyte_utf8_in_stops_and_text() {
        check_every_split("héllo wörld", &["wö"]);
        check_every_split("日本語です。終わり", &["。終"]);
        check_every_split("a🙂b🙂🙃c", &["🙂🙃"]);
        // A stop that shares its first bytes (not chars) with the text: é = C3 A9, è = C3 A8.
        check_every_split("éèé", &["èx", "éé"]);
        let mut filter = StopFilter::new(vec!["🙂🙃".into()]);
        assert_eq!(filter.push("ok🙂"), ("ok".to_owned(), false));
        assert_eq!(filter.push("🙂"), ("🙂".to_owned(), false));
        assert_eq!(filter.push("🙃!"), (String::new(), true));
    }

    #[test]
    fn whole_string_invariant_on_pseudo_random_inputs() {
        let mut rng = crate::test_support::Rng(0x2545_f491_4f6c_dd1d);
        let mut next = move |n: usize| rng.below(n);
        let alphabet = ['a', 'b', 'c', 'é', '\n'];
        let word = |len: usize, next: &mut dyn FnMut(usize) -> usize| -> String {
            (0..len).map(|_| alphabet[next(alphabet.len())]).collect()
        };
        for _ in 0..3000 {
            let input_len = next(14);
            let input = word(input_len, &mut next);
            let stops: Vec<String> = (0..1 + next(3)).map(|_| word(1 + next(4), &mut next)).collect();
            let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
            // Random chunking at char boundaries.
            let chars: Vec<(usize, char)> = input.char_indices().collect();
            let mut chunks = Vec::new();
            let mut start = 0;
            for &(i, _) in chars.iter().skip(1) {
                if next(3) == 0 {
                    chunks.push(&input[start..i]);
                    start = i;
                }
            }
            chunks.push(&input[start..]);
            assert_eq!(
                run(&chunks, &stops),
                reference(&input, &stops),
                "input {input:?} split as {chunks:?}, stops {stops:?}"
            );
        }
    }

    #[test]
    fn exhaustive_small_alphabet() {
        // Every string over {a, b} up to length 6, every split, against a few stops.
        for len in 0..=6u32 {
            for bits in 0..1u32 << len {
                let input: String = (0..len).map(|i| if bits & (1 << i) != 0 { 'b' } else { 'a' }).collect();
                for stops in [&["ab"][..], &["aab"], &["aba", "bb"], &["b"], &["aaaa", "ba"]] {
                    check_every_split(&input, stops);
                }
            }
        }
    }

    #[test]
    fn finish_releases_partial_match() {
        let mut filter = StopFilter::new(vec!["<end>".into()]);
        assert_eq!(filter.push("done <en"), ("done ".to_owned(), false));
        assert_eq!(filter.finish(), "<en");
        assert_eq!(filter.finish(), "");
    }

    fn small_text(max: usize) -> impl Strategy<Value = String> {
        // Few distinct characters (one multi-byte) so that stops occur and overlap often.
        proptest::collection::vec(proptest::sample::select(&['a', 'b', 'é', '\n', '🙂'][..]), 0..max)
            .prop_map(|c| c.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Streaming the text in any chunks gives exactly what one push of the whole text gives,
        /// which is the text before the first stop string to be completed.
        #[test]
        fn any_split_equals_the_one_shot_result(
            input in small_text(24),
            stops in proptest::collection::vec(small_text(5), 0..4),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
            let mut one_shot = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
            let (mut whole, hit) = one_shot.push(&input);
            whole.push_str(&one_shot.finish());
            prop_assert_eq!((whole.clone(), hit), reference(&input, &stops));

            let bounds: Vec<usize> = input.char_indices().map(|(i, _)| i).collect();
            let mut cuts: Vec<usize> =
                cuts.iter().filter(|_| !bounds.is_empty()).map(|c| bounds[c.index(bounds.len())]).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut chunks = Vec::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([input.len()]) {
                chunks.push(&input[at..cut]);
                at = cut;
            }
            prop_assert_eq!(run(&chunks, &stops), (whole, hit));
        }
    }
}
