//! Aggregate decode speed of one forward pass over B sequences (`Model::forward_batch`), the
//! step `--each-line --parallel B` takes: tokens/s at B = 1, 2, 4, 8, 16, against B = 1.
//!
//! `cargo bench --bench batch_decode -- MODEL.gguf [STEPS] [THREADS] [SIZES] [PROMPT]`
//! (SIZES: comma-separated, default 1,2,4,8,16; PROMPT: each sequence's prompt length before
//! the timed steps, default 8, e.g. 1018 to measure decode at a long context).

// A benchmark's report is its output.
#![allow(clippy::print_stderr)]

use std::time::Instant;

use anyhow::{Context, Result};
use streamgen::gguf::Gguf;
use streamgen::model::{Model, Segment};

mod common;

const USAGE: &str =
    "usage: cargo bench --bench batch_decode -- MODEL.gguf [STEPS] [THREADS] [SIZES] [PROMPT]";

fn main() -> Result<()> {
    let Some(args) = common::bench_args(USAGE) else { return Ok(()) };
    let mut args = args.into_iter();
    let path = args.next().context(USAGE)?;
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(32);
    let threads: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2);
    let sizes: Vec<usize> = match args.next() {
        Some(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![1, 2, 4, 8, 16],
    };
    let prompt_len: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(8);
    // candle's pool reads this when it starts.
    // SAFETY: nothing else runs yet.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
    let gguf = Gguf::open(std::path::Path::new(&path))?;
    let model = Model::load(&gguf)?;
    let mut single = 0.0;
    for b in sizes {
        // Each sequence starts from its own short prompt, then decodes fixed tokens (the
        // speed does not depend on which).
        let mut states = (0..b).map(|_| model.new_state(prompt_len + steps)).collect::<Result<Vec<_>>>()?;
        for (i, state) in states.iter_mut().enumerate() {
            let prompt: Vec<u32> = (0..prompt_len).map(|t| 100 + ((i * 8 + t) % 50_000) as u32).collect();
            for chunk in prompt.chunks(512) {
                model.forward(state, chunk)?;
            }
        }
        let start = Instant::now();
        for step in 0..steps {
            let tokens: Vec<[u32; 1]> = (0..b).map(|i| [1000 + (step * 16 + i) as u32]).collect();
            let mut segments: Vec<Segment<'_>> =
                states.iter_mut().zip(&tokens).map(|(state, t)| Segment { state, tokens: t }).collect();
            model.forward_batch(&mut segments)?;
        }
        let rate = (b * steps) as f64 / start.elapsed().as_secs_f64();
        if single == 0.0 {
            single = rate;
        }
        eprintln!("batch {b:>2}: {rate:7.1} tok/s  {:.2}x the first size", rate / single);
    }
    Ok(())
}
