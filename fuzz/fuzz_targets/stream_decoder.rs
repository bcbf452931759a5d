//! The incremental UTF-8 decoder: any bytes cut at any places give the lossy decoding of all
//! of them at once, and it never holds back more than an incomplete sequence.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamgen::tokenizer::StreamDecoder;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk sizes (1 to 8, cycling through its bits).
    let Some((&sizes, bytes)) = data.split_first() else { return };
    let mut decoder = StreamDecoder::new();
    let mut got = String::new();
    let (mut at, mut i) = (0, 0);
    while at < bytes.len() {
        let take = 1 + ((sizes.rotate_left(i * 3) & 7) as usize);
        let end = (at + take).min(bytes.len());
        got.push_str(&decoder.push(&bytes[at..end]));
        at = end;
        i += 1;
    }
    got.push_str(&decoder.finish());
    assert_eq!(got, String::from_utf8_lossy(bytes));
});
