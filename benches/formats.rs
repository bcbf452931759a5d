//! Measures the weight formats: rewrites a model's matrices in another format (to load it
//! and measure its peak RSS), and times the decode matmul of each format.
//!
//! ```sh
//! cargo bench --bench formats -- convert model.gguf model-f16.gguf F16
//! cargo bench --bench formats -- speed
//! cargo bench --bench formats -- prefill
//! cargo bench --bench formats -- model model.gguf [ROWS]
//! ```
//!
//! `model` times the matmul of each matrix of layer 0 (from cache) and of the embedding
//! matrix against ROWS activation rows (default 1, a decode step; 8, a verification pass or
//! an `--each-line` step, takes the many-row kernels), then each kind of layer matrix from
//! memory, and prints GB/s of weights and G multiply-adds/s.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use streamgen::gguf::Gguf;
use streamgen::kernels::Format;
use streamgen::weights::{Linear, Mapped};

fn dtype(name: &str) -> Result<GgmlDType> {
    Ok(match name {
        "F32" => GgmlDType::F32,
        "F16" => GgmlDType::F16,
        "BF16" => GgmlDType::BF16,
        "Q8_0" => GgmlDType::Q8_0,
        "Q5_1" => GgmlDType::Q5_1,
        "Q4_0" => GgmlDType::Q4_0,
        "Q4K" => GgmlDType::Q4K,
        "Q6K" => GgmlDType::Q6K,
        _ => bail!("unknown type {name}"),
    })
}

/// Every matrix of `input` in `to`, vectors in F32, metadata as it was.
fn convert(input: &str, output: &str, to: GgmlDType) -> Result<()> {
    let gguf = Gguf::open(input.as_ref())?;
    let content = gguf.content();
    let mut tensors = Vec::new();
    for (name, info) in &content.tensor_infos {
        let t = gguf.tensor(name)?.dequantize(&Device::Cpu)?;
        let to = if info.shape.rank() == 2 { to } else { GgmlDType::F32 };
        tensors.push((name.clone(), QTensor::quantize(&t, to)?));
    }
    let metadata: Vec<(&str, &Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(output).with_context(|| format!("cannot create {output}"))?;
    gguf_file::write(&mut file, &metadata, &tensors)?;
    file.flush()?;
    Ok(())
}

/// The one-row decode matmul over a 4096 × 4096 matrix of each format, as weight bytes per
/// second.
fn speed() -> Result<()> {
    let (rows, cols) = (4096, 4096);
    let data: Vec<f32> = (0..rows * cols).map(|i| (i * 7919 % 1009) as f32 / 500.0 - 1.0).collect();
    let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu)?;
    let x = Tensor::from_vec(
        (0..cols).map(|i| (i as f32 * 0.01).sin()).collect::<Vec<_>>(),
        (1, cols),
        &Device::Cpu,
    )?;
    for name in ["F32", "F16", "BF16", "Q8_0", "Q5_1", "Q4_0", "Q4K", "Q6K"] {
        let dtype = dtype(name)?;
        let bytes = QTensor::quantize(&t, dtype)?.data()?.into_owned();
        let mut file = tempfile::NamedTempFile::new()?;
        file.write_all(&bytes)?;
        // SAFETY: a private temporary file nothing else writes.
        let map = unsafe { memmap2::Mmap::map(file.as_file()) }?;
        let linear = Linear::new(Mapped::new(
            Arc::new(map),
            0,
            Format::from_ggml_dtype(dtype).context("a format we read")?,
            (rows, cols),
        )?)?;
        for _ in 0..5 {
            linear.forward(&x)?;
        }
        let n = 100;
        let start = Instant::now();
        for _ in 0..n {
            linear.forward(&x)?;
        }
        let per = start.elapsed().as_secs_f64() / f64::from(n);
        let gbs = bytes.len() as f64 / per / 1e9;
        // An error, not a panic, when stdout is closed (`| head`).
        writeln!(
            std::io::stdout(),
            "{name:>5}: {:7.1} µs per 4096×4096 matvec, {gbs:5.1} GB/s of weights",
            per * 1e6
        )?;
    }
    Ok(())
}

/// The one-row decode matmul over each distinct matrix of a model (layer 0's and the output),
/// as weight bytes per second, next to what 2 threads read from memory per second.
fn model(path: &str, nr: usize) -> Result<()> {
    let gguf = Gguf::open(path.as_ref())?;
    let mut names: Vec<String> = gguf.tensor_names().filter(|n| n.starts_with("blk.0.")).cloned().collect();
    names.sort();
    names.push("token_embd.weight".into());
    for name in names {
        if gguf.tensor_shape(&name).is_none_or(|s| s.len() != 2)
            || std::env::var("SG_ONLY").is_ok_and(|only| !name.contains(&only))
        {
            continue;
        }
        let m = Mapped::from_gguf(&gguf, &name)?;
        let (rows, cols) = m.shape();
        let bytes = m.bytes().len();
        let dtype = m.dtype();
        let linear = Linear::new(m)?;
        let x = Tensor::from_vec(
            (0..cols * nr).map(|i| (i as f32 * 0.01).sin()).collect::<Vec<_>>(),
            (nr, cols),
            &Device::Cpu,
        )?;
        for _ in 0..3 {
            linear.forward(&x)?;
        }
        // At least 200 MB of weights per figure, so the output matrix is read from memory.
        let n = (200_000_000 / bytes).clamp(5, 2000);
        let start = Instant::now();
        for _ in 0..n {
            linear.forward(&x)?;
        }
        let per = start.elapsed().as_secs_f64() / n as f64;
        writeln!(
            std::io::stdout(),
            "{name:>28} {dtype:?} ({rows}, {cols}): {:8.1} µs, {:5.1} GB/s of weights, {:6.1} G MAC/s",
            per * 1e6,
            bytes as f64 / per / 1e9,
            (rows * cols * nr) as f64 / per / 1e9
        )?;
    }
    // From memory: each kind of layer matrix, all layers of one format in turn (past the
    // last-level cache when they add up to more than 64 MB).
    let mut groups: std::collections::BTreeMap<(String, String), Vec<String>> = Default::default();
    for name in gguf.tensor_names() {
        let Some(kind) = name.strip_prefix("blk.").and_then(|n| n.split_once('.')).map(|(_, k)| k) else {
            continue;
        };
        if gguf.tensor_shape(name).is_some_and(|s| s.len() == 2) {
            let dtype = format!("{:?}", Mapped::from_gguf(&gguf, name)?.dtype());
            groups.entry((kind.to_string(), dtype)).or_default().push(name.clone());
        }
    }
    for ((kind, dtype), names) in groups {
        let linears =
            names.iter().map(|n| Linear::new(Mapped::from_gguf(&gguf, n)?)).collect::<Result<Vec<_>>>()?;
        let bytes: usize =
            names.iter().map(|n| Mapped::from_gguf(&gguf, n).map(|m| m.bytes().len())).sum::<Result<_>>()?;
        if bytes < 64_000_000 {
            continue;
        }
        let cols = gguf.tensor_shape(&names[0]).map_or(0, |s| s[1]);
        let x = Tensor::from_vec(
            (0..cols).map(|i| (i as f32 * 0.01).sin()).collect::<Vec<_>>(),
            (1, cols),
            &Device::Cpu,
        )?;
        let pass = || linears.iter().try_for_each(|l| l.forward(&x).map(|_| ()));
        pass()?;
        let start = Instant::now();
        for _ in 0..3 {
            pass()?;
        }
        let per = start.elapsed().as_secs_f64() / 3.0;
        writeln!(
            std::io::stdout(),
            "{kind:>20} {dtype} x {:2} layers, from memory: {:5.1} GB/s of weights",
            names.len(),
            bytes as f64 / per / 1e9
        )?;
    }
    // Memory read speed: 2 threads summing 512 MiB each, 3 times.
    let buf: Vec<u64> = (0..(1u64 << 27)).collect();
    let start = Instant::now();
    let mut total = 0u64;
    for _ in 0..3 {
        total = total.wrapping_add(std::thread::scope(|s| {
            let halves: Vec<_> = buf
                .chunks(buf.len() / 2)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &v| a ^ v)))
                .collect();
            halves.into_iter().map(|h| h.join().unwrap_or(0)).fold(0, |a, v| a ^ v)
        }));
    }
    let gbs = (3 * buf.len() * 8) as f64 / start.elapsed().as_secs_f64() / 1e9;
    writeln!(std::io::stdout(), "memory read, 2 threads: {gbs:5.1} GB/s (checksum {total})")?;
    Ok(())
}

/// A prefill batch of 256 rows through (1536, 576) and (576, 1536) matrices of each format
/// (SmolLM2-135M's FFN shapes), as multiply-adds per second.
fn prefill() -> Result<()> {
    for (rows, cols) in [(1536, 576), (576, 1536)] {
        let data: Vec<f32> = (0..rows * cols).map(|i| (i * 7919 % 1009) as f32 / 500.0 - 1.0).collect();
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu)?;
        let m = 256;
        let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.01).sin()).collect();
        let x = Tensor::from_vec(x, (m, cols), &Device::Cpu)?;
        {
            // candle's f32 matmul over the whole matrix, as streamgen did for F16 before.
            let wt = t.t()?;
            x.matmul(&wt)?;
            let start = Instant::now();
            for _ in 0..20 {
                x.matmul(&wt)?;
            }
            let per = start.elapsed().as_secs_f64() / 20.0;
            let gflops = (2 * m * rows * cols) as f64 / per / 1e9;
            writeln!(
                std::io::stdout(),
                "({rows}, {cols}) candle f32: {:7.1} µs, {gflops:5.1} GFLOP/s",
                per * 1e6
            )?;
        }
        for name in ["F32", "F16", "BF16", "Q8_0", "Q4_0"] {
            let dtype = dtype(name)?;
            let bytes = QTensor::quantize(&t, dtype)?.data()?.into_owned();
            let mut file = tempfile::NamedTempFile::new()?;
            file.write_all(&bytes)?;
            // SAFETY: a private temporary file nothing else writes.
            let map = unsafe { memmap2::Mmap::map(file.as_file()) }?;
            let linear = Linear::new(Mapped::new(
                Arc::new(map),
                0,
                Format::from_ggml_dtype(dtype).context("a format we read")?,
                (rows, cols),
            )?)?;
            linear.forward(&x)?;
            let n = 20;
            let start = Instant::now();
            for _ in 0..n {
                linear.forward(&x)?;
            }
            let per = start.elapsed().as_secs_f64() / f64::from(n);
            let gflops = (2 * m * rows * cols) as f64 / per / 1e9;
            writeln!(
                std::io::stdout(),
                "({rows}, {cols}) {name:>5}: {:7.1} µs per batch of {m}, {gflops:5.1} GFLOP/s",
                per * 1e6
            )?;
        }
    }
    Ok(())
}

mod common;

const USAGE: &str = "usage: cargo bench --bench formats -- convert IN.gguf OUT.gguf TYPE | speed | prefill | model MODEL.gguf [ROWS]";

fn main() -> Result<()> {
    let Some(args) = common::bench_args(USAGE) else { return Ok(()) };
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["convert", input, output, to] => convert(input, output, dtype(to)?),
        ["speed"] => speed(),
        ["prefill"] => prefill(),
        ["model", path] => model(path, 1),
        ["model", path, rows] => model(path, rows.parse().map_err(|e| anyhow::anyhow!("rows {rows}: {e}"))?),
        _ => bail!(USAGE),
    }
}
