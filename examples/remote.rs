//! Streams an answer from an OpenAI-compatible server (vLLM, llama-server, Ollama) through the
//! library: the same loop as the local example, over another backend.
//!
//! `cargo run --example remote -- http://localhost:8080/v1 'Name three colors.'`

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;

use streamgen::backend::remote::{Remote, RemoteOptions};
use streamgen::backend::{Backend, Event, Request};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(endpoint), Some(prompt)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: remote BASE_URL PROMPT");
    };
    // The model: the only one the server serves (set `options.model` to choose).
    let backend = Remote::new(RemoteOptions::new(endpoint))?;
    let mut stdout = std::io::stdout().lock();
    for event in backend.stream(&Request::new(prompt))? {
        match event? {
            Event::Reasoning { text } => eprint!("{text}"),
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
