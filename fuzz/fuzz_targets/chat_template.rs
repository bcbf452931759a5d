//! Chat templates are hostile input: any template, with any messages, compiles or fails to,
//! then renders or fails within the budget (fuel, output cap): never a panic, a hang (run with
//! `-timeout`) or unbounded memory (libFuzzer's `-rss_limit_mb`).
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use streamgen::chat::{ChatTemplate, Message, RenderContext};

fuzz_target!(|data: &[u8]| {
    // The template, then messages, separated by 0xFF (never in UTF-8).
    let mut fields = data.split(|&b| b == 0xFF).map(String::from_utf8_lossy);
    let Some(source) = fields.next() else { return };
    let Ok(template) = ChatTemplate::from_source(&source) else { return };
    let roles = ["system", "user", "assistant"];
    let messages: Vec<Message> =
        fields.take(4).enumerate().map(|(i, text)| Message::new(roles[i % roles.len()], text)).collect();
    // A fixed clock: the same input renders the same way on every run.
    let ctx = RenderContext {
        now: Some(UNIX_EPOCH + Duration::from_secs(1_721_995_200)),
        ..RenderContext::new("<s>", "</s>")
    };
    if let Ok(out) = template.render(&messages, &ctx) {
        let text: usize = messages.iter().map(|m| m.content.len()).sum();
        assert!(out.len() <= (16 << 20) + 2 * text, "{} bytes of output", out.len());
    }
});
