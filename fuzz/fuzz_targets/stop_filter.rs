//! Stop strings: streamed in any chunks, the output is the text before the first stop string
//! to be completed, as one push of the whole text gives and as a byte-by-byte reference finds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamgen::stop::StopFilter;

/// The text before the first stop string to end, found by growing the text one char at a time.
fn reference(input: &str, stops: &[String]) -> (String, bool) {
    let first = input.char_indices().map(|(i, c)| i + c.len_utf8()).find_map(|end| {
        stops
            .iter()
            .filter(|s| !s.is_empty() && input[..end].ends_with(s.as_str()))
            .map(|s| end - s.len())
            .min()
    });
    match first {
        Some(i) => (input[..i].to_owned(), true),
        None => (input.to_owned(), false),
    }
}

fuzz_target!(|data: &[u8]| {
    // Fields separated by 0xFF (never in UTF-8): stops, then the text, then chunk sizes.
    let fields: Vec<&[u8]> = data.split(|&b| b == 0xFF).collect();
    let Some((sizes, rest)) = fields.split_last() else { return };
    let Some((text, stops)) = rest.split_last() else { return };
    let text = String::from_utf8_lossy(text);
    let stops: Vec<String> = stops.iter().take(8).map(|s| String::from_utf8_lossy(s).into_owned()).collect();

    let mut one_shot = StopFilter::new(stops.clone());
    let (mut whole, hit) = one_shot.push(&text);
    whole.push_str(&one_shot.finish());
    assert_eq!((whole.clone(), hit), reference(&text, &stops), "text {text:?}, stops {stops:?}");

    // Chunks of whole chars, their byte sizes (1 to 8) cycling through `sizes`.
    let mut chunks = Vec::new();
    let mut at = 0;
    for end in text.char_indices().map(|(i, _)| i).skip(1).chain([text.len()]) {
        let want = 1 + usize::from(sizes.get(chunks.len() % sizes.len().max(1)).copied().unwrap_or(0) % 8);
        if end - at >= want || end == text.len() {
            chunks.push(&text[at..end]);
            at = end;
        }
    }
    let mut filter = StopFilter::new(stops);
    let (mut out, mut stopped) = (String::new(), false);
    for chunk in chunks {
        let (piece, hit) = filter.push(chunk);
        out.push_str(&piece);
        if hit {
            stopped = true;
            break;
        }
    }
    if !stopped {
        out.push_str(&filter.finish());
    }
    assert_eq!((out, stopped), (whole, hit), "text {text:?}");
});
