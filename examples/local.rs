//! Streams an answer from a local GGUF model through the library, the way the binary does.
//!
//! `cargo run --release --example local -- model.gguf 'Name three colors.'`

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;

use streamgen::backend::local::Local;
use streamgen::backend::{Backend, Event, Request};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(prompt)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: local MODEL.gguf PROMPT");
    };
    let backend = Local::open(model.into())?;
    let mut request = Request::new(prompt);
    request.max_tokens = Some(64);
    let mut stdout = std::io::stdout().lock();
    for event in backend.stream(&request)? {
        match event? {
            Event::Text { text, .. } => {
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            Event::Finish(finish) => eprintln!("\n[finish: {}]", finish.reason.as_str()),
            _ => {}
        }
    }
    Ok(())
}
