//! Writes the random-weight models of `streamgen::synthetic` into a directory: the test
//! matrix (`cases`), or one real-size model for the decode benchmarks.
//!
//!     cargo bench --bench synthetic_models -- DIR
//!     cargo bench --bench synthetic_models -- DIR --half-billion ARCH q4_k_m|q8_0
//!
//! The reference script (`scripts/llama-reference/make-archs.sh`) runs llama.cpp on the first
//! kind; `benches/archs.py` on the second.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use streamgen::synthetic::{self, Spec, Weights};

mod common;

const USAGE: &str = "usage: cargo bench --bench synthetic_models -- DIR [--half-billion ARCH q4_k_m|q8_0]";

fn main() -> Result<()> {
    let Some(args) = common::bench_args(USAGE) else { return Ok(()) };
    let Some(dir) = args.first().map(PathBuf::from) else {
        bail!(USAGE);
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if let Some(flag) = args.get(1) {
        let (Some(arch), Some(format), "--half-billion") = (args.get(2), args.get(3), flag.as_str()) else {
            bail!(USAGE);
        };
        let weights = match format.as_str() {
            "q4_k_m" => Weights::Q4KM,
            "q8_0" => Weights::All(GgmlDType::Q8_0),
            other => bail!("unknown format {other} (q4_k_m or q8_0)"),
        };
        let arch: &'static str = Box::leak(arch.clone().into_boxed_str());
        let path = dir.join(format!("{arch}-0.5b-{format}.gguf"));
        synthetic::write_file(&Spec::half_billion(arch, weights), &path)?;
        println!("{}", path.display());
        return Ok(());
    }
    // The prompt the references are made with, as the JSON list `greedy_top5` reads.
    std::fs::write(dir.join("prompts.json"), serde_json::to_string(&[synthetic::PROMPT])?)?;
    for (name, spec) in synthetic::cases() {
        let path = dir.join(format!("{name}.gguf"));
        synthetic::write_file(&spec, &path)?;
        println!("{}", path.display());
    }
    Ok(())
}
