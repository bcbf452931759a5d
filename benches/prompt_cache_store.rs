//! What the prompt cache costs a run that cannot profit from it yet: the time to look a prompt
//! up and miss, and to write it, against the time to compute it. This is what decides the
//! shortest prompt worth writing (`prompt_cache::MIN_STORE`): a first run must not be slowed by
//! more than 2%, and a whole run takes at least its prompt's time.
//!
//! ```sh
//! cargo bench --bench prompt_cache_store -- MODEL.gguf [SIZES]   # SIZES: 32,64,128,...
//! ```
//!
//! For each size it computes a prompt of that many tokens (ids spread over the vocabulary),
//! then, five times into a fresh cache folder holding the other sizes' entries, looks it up
//! (a miss) and stores it; it prints the medians and their ratio to the prompt's time. The
//! writes land in the page cache, as a run's do (the cache does not sync its files).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use streamgen::generate::prefill;
use streamgen::gguf::Gguf;
use streamgen::model::Model;
use streamgen::prompt_cache::PromptCache;

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

mod common;

const USAGE: &str = "usage: cargo bench --bench prompt_cache_store -- MODEL.gguf [SIZES, e.g. 32,64,128]";

fn main() -> Result<()> {
    let Some(args) = common::bench_args(USAGE) else { return Ok(()) };
    let path = args.first().context(USAGE)?;
    let sizes: Vec<usize> = args
        .get(1)
        .map_or("32,64,128,256,1024", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("SIZES: numbers separated by commas")?;
    let path = std::path::Path::new(path);
    let model = Model::load(&Gguf::open(path)?)?;
    let vocab = model.config().vocab_size as u32;
    println!("# {}: prompt time, cache lookup (a miss) and write, medians of 5", path.display());
    println!("tokens  prompt s  lookup ms  write ms  (lookup + write) / prompt");
    for &n in &sizes {
        let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let mut state = model.new_state(n + 16)?;
        let t = Instant::now();
        prefill(&model, &mut state, &tokens)?;
        let computed = t.elapsed();
        let (mut lookups, mut writes) = (Vec::new(), Vec::new());
        for round in 0..5 {
            let dir = tempfile::tempdir()?;
            let cache = PromptCache::new(dir.path(), path, 1 << 30, false)?;
            // The other sizes' prompts, so the lookup reads a folder that is not empty.
            for &m in sizes.iter().filter(|&&m| m < n) {
                let other: Vec<u32> = (0..m as u32).map(|i| (i * 31 + round + 1) % vocab).collect();
                cache.store(&model, &other, &state_for(&model, &other)?);
            }
            let t = Instant::now();
            let found = cache.lookup(&model, &tokens, n + 16, n + 16);
            lookups.push(t.elapsed());
            assert!(found.is_none(), "a miss");
            let t = Instant::now();
            cache.store(&model, &tokens, &state);
            writes.push(t.elapsed());
        }
        let (l, w) = (median(lookups), median(writes));
        println!(
            "{n:6}  {:8.3}  {:9.2}  {:8.2}  {:.4}",
            computed.as_secs_f64(),
            l.as_secs_f64() * 1e3,
            w.as_secs_f64() * 1e3,
            (l + w).as_secs_f64() / computed.as_secs_f64()
        );
    }
    Ok(())
}

fn state_for(model: &Model, tokens: &[u32]) -> Result<streamgen::model::State> {
    let mut state = model.new_state(tokens.len() + 16)?;
    prefill(model, &mut state, tokens)?;
    Ok(state)
}
