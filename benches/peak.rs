//! How many int8 multiply-adds this CPU can do, and how much of that the prefill kernel gets:
//! the yardstick issue 24 measures prefill against.
//!
//! ```sh
//! cargo bench --bench peak -- peak
//! cargo bench --bench peak -- model MODEL.gguf [ROWS]
//! cargo bench --bench peak -- prefill MODEL.gguf [TOKENS]
//! ```
//!
//! `peak` times the multiply instructions alone, on 1 and on 2 threads: `vpmaddubsw` (AVX2, 32
//! u8 × i8 products a 256-bit instruction, summed in pairs) and, where the CPU has AVX-512
//! VNNI, `vpdpbusd` (64 products a 512-bit instruction, summed in fours into i32). Each thread
//! runs 12 independent chains, more than latency × throughput, so the figure is the
//! instruction's throughput: the most any int8 kernel on this CPU can do. It then runs our tile
//! kernel (`kernels::matmul_batched`, the default instruction set) on Q4_K matrices small
//! enough to stay in cache, 2 threads, which is what the kernel's own instruction mix allows.
//!
//! `model` runs the batched matmul on every matrix of layer 0 of a model, ROWS (default 512)
//! activation rows at a time, 2 threads, and prints each one's multiply-adds per second (the
//! fastest of 7 calls): the kernel at a real prompt's shape, against the peak.
//!
//! `prefill` feeds the whole model a TOKENS-token prompt (default 256, one pass, the size of
//! a prompt's pass in streamgen) 5 times from an empty cache and prints the fastest as tokens/s
//! and as multiply-adds per second of the layers' matrices (attention and the rest count as
//! time, not as work).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::time::Instant;

use anyhow::{Result, bail};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use streamgen::gguf::Gguf;
use streamgen::kernels::{Format, Isa, QuantizedRows, matmul_batched};
use streamgen::weights::Mapped;

mod common;

/// Instructions per chain per timed call.
const STEPS: u64 = 1 << 24;

/// `vpmaddubsw` throughput: 12 chains of `x = maddubs(x, y)`, so nothing can be hoisted.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn maddubs_chains(seed: i32) -> i64 {
    use std::arch::x86_64::*;
    let y = _mm256_set1_epi8(3);
    let mut x: [__m256i; 12] = std::array::from_fn(|i| _mm256_set1_epi32(seed + i as i32));
    for _ in 0..STEPS {
        for x in &mut x {
            *x = _mm256_maddubs_epi16(*x, y);
        }
    }
    x.iter().map(|v| i64::from(_mm256_extract_epi32::<0>(*v))).sum()
}

/// The AVX2 tile kernel's instruction mix: per step, 2 weight registers against 4 activation
/// broadcasts from memory, `vpmaddubsw` then `vpaddw` into 8 i16 sums.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn mix_chains(seed: i32) -> i64 {
    use std::arch::x86_64::*;
    let ys: Vec<i32> = (0..1024).map(|i| i * 31 + seed).collect();
    let mut g0 = _mm256_set1_epi8(3);
    let mut g1 = _mm256_set1_epi8(5);
    let mut acc = [_mm256_setzero_si256(); 8];
    for step in 0..STEPS / 4 {
        let base = (step as usize * 4) & 1020;
        for (r, pair) in acc.chunks_exact_mut(2).enumerate() {
            // SAFETY: base + r < 1024.
            let y = _mm256_set1_epi32(unsafe { *ys.get_unchecked(base + r) });
            pair[0] = _mm256_add_epi16(pair[0], _mm256_maddubs_epi16(g0, y));
            pair[1] = _mm256_add_epi16(pair[1], _mm256_maddubs_epi16(g1, y));
        }
        g0 = _mm256_add_epi8(g0, g1);
        g1 = _mm256_xor_si256(g1, g0);
    }
    acc.iter().map(|v| i64::from(_mm256_extract_epi32::<0>(*v))).sum()
}

/// `vpdpbusd` (512-bit) throughput: 12 accumulator chains.
///
/// # Safety
/// The CPU must have AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dpbusd_chains(seed: i32) -> i64 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_epi32(seed | 0x0101_0101);
    let b = _mm512_set1_epi32(0x0102_0304);
    let mut x: [__m512i; 12] = std::array::from_fn(|i| _mm512_set1_epi32(i as i32));
    for _ in 0..STEPS {
        for x in &mut x {
            *x = _mm512_dpbusd_epi32(*x, a, b);
        }
    }
    x.iter().map(|v| i64::from(_mm512_reduce_add_epi32(*v))).sum()
}

/// Runs `f` on `threads` threads at once and returns multiply-adds per second, given the
/// multiply-adds one call does.
fn rate(threads: usize, macs_per_call: f64, f: fn(i32) -> i64) -> f64 {
    let start = Instant::now();
    let check: i64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|t| s.spawn(move || f(t as i32))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    std::hint::black_box(check);
    macs_per_call * threads as f64 / start.elapsed().as_secs_f64()
}

fn peak() -> Result<()> {
    let mut out = std::io::stdout();
    #[cfg(target_arch = "x86_64")]
    {
        let chains = 12.0 * STEPS as f64;
        let (avx2, vnni) = (is_x86_feature_detected!("avx2"), is_x86_feature_detected!("avx512vnni"));
        // SAFETY: run only where `avx2` is true (below).
        let maddubs: fn(i32) -> i64 = |s| unsafe { maddubs_chains(s) };
        // SAFETY: run only where `avx2` is true (below).
        let mix: fn(i32) -> i64 = |s| unsafe { mix_chains(s) };
        // SAFETY: run only where `vnni` is true (below).
        let dpbusd: fn(i32) -> i64 = |s| unsafe { dpbusd_chains(s) };
        // What, whether the CPU runs it, multiply-adds per call, the call.
        type Case = (&'static str, bool, f64, fn(i32) -> i64);
        let cases: [Case; 3] = [
            ("vpmaddubsw ymm", avx2, 32.0 * chains, maddubs),
            ("vpmaddubsw + vpaddw, broadcasts from memory", avx2, 32.0 * 8.0 * (STEPS / 4) as f64, mix),
            ("vpdpbusd zmm", vnni, 64.0 * chains, dpbusd),
        ];
        for (what, runs, macs, f) in cases {
            for threads in [1, 2].into_iter().filter(|_| runs) {
                let best = (0..3).map(|_| rate(threads, macs, f)).fold(0.0, f64::max);
                writeln!(out, "{what}, {threads} thread(s): {:7.1} G int8 multiply-adds/s", best / 1e9)?;
            }
        }
    }
    // The tile kernel in cache: a (256, 1536) Q4_K matrix (221 KB) against 64 rows (98 KB).
    let isa = Isa::detect();
    let (rows, cols, m) = (256, 1536, 64);
    let w: Vec<f32> = (0..rows * cols).map(|i| (i * 7919 % 1009) as f32 / 500.0 - 1.0).collect();
    let w = QTensor::quantize(&Tensor::from_vec(w, (rows, cols), &Device::Cpu)?, GgmlDType::Q4K)?;
    let w = w.data()?.into_owned();
    let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.01).sin()).collect();
    let x = QuantizedRows::for_batched(&x, cols)?;
    let mut y = vec![0f32; m * rows];
    let calls = 400;
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..calls {
            matmul_batched(Format::Q4K, isa, &w, rows, &x, &mut y)?;
        }
        best = best.max((calls * m * rows * cols) as f64 / start.elapsed().as_secs_f64());
    }
    writeln!(
        out,
        "tile kernel ({}), Q4_K ({rows}, {cols}) × {m} rows in cache, all the pool's threads: {:7.1} G multiply-adds/s",
        isa.name(),
        best / 1e9
    )?;
    Ok(())
}

fn model(path: &str, m: usize) -> Result<()> {
    let gguf = Gguf::open(path.as_ref())?;
    let isa = Isa::detect();
    let mut names: Vec<String> = gguf.tensor_names().filter(|n| n.starts_with("blk.0.")).cloned().collect();
    names.sort();
    let mut total = (0f64, 0f64);
    for name in names {
        if gguf.tensor_shape(&name).is_none_or(|s| s.len() != 2) {
            continue;
        }
        let mapped = Mapped::from_gguf(&gguf, &name)?;
        let (rows, cols) = mapped.shape();
        let format = mapped.dtype();
        if !matches!(format.prefill(), streamgen::kernels::PrefillPath::Tiles) {
            writeln!(std::io::stdout(), "{name:>28} {format:?}: no tile kernel")?;
            continue;
        }
        let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.01).sin()).collect();
        let x = QuantizedRows::for_batched(&x, cols)?;
        let mut y = vec![0f32; m * rows];
        matmul_batched(format, isa, mapped.bytes(), rows, &x, &mut y)?;
        // The fastest of 7 calls: on a shared machine the others measure the neighbours.
        let mut secs = f64::MAX;
        for _ in 0..7 {
            let start = Instant::now();
            matmul_batched(format, isa, mapped.bytes(), rows, &x, &mut y)?;
            secs = secs.min(start.elapsed().as_secs_f64());
        }
        let macs = (m * rows * cols) as f64;
        total = (total.0 + macs, total.1 + secs);
        writeln!(
            std::io::stdout(),
            "{name:>28} {format:?} ({rows}, {cols}) × {m}: {:8.2} ms, {:6.1} G multiply-adds/s",
            secs * 1e3,
            macs / secs / 1e9
        )?;
    }
    writeln!(std::io::stdout(), "layer 0, all matrices: {:6.1} G multiply-adds/s", total.0 / total.1 / 1e9)?;
    Ok(())
}

fn prefill(path: &str, n: usize) -> Result<()> {
    let gguf = Gguf::open(path.as_ref())?;
    let model = streamgen::model::Model::load(&gguf)?;
    // Multiply-adds per token: every matrix of every layer.
    let macs: usize = gguf
        .tensor_names()
        .filter(|name| name.starts_with("blk."))
        .filter_map(|name| gguf.tensor_shape(name).filter(|s| s.len() == 2).map(|s| s[0] * s[1]))
        .sum();
    let prompt: Vec<u32> = (0..n).map(|t| 100 + (t * 7919 % 20_000) as u32).collect();
    let mut secs = f64::MAX;
    for _ in 0..5 {
        let mut state = model.new_state(n + 1)?;
        let start = Instant::now();
        model.forward(&mut state, &prompt)?;
        secs = secs.min(start.elapsed().as_secs_f64());
    }
    writeln!(
        std::io::stdout(),
        "prefill of {n} tokens: {:.3} s, {:6.1} tok/s, {:6.1} G multiply-adds/s in the layers' matrices",
        secs,
        n as f64 / secs,
        (n * macs) as f64 / secs / 1e9
    )?;
    Ok(())
}

const USAGE: &str =
    "usage: cargo bench --bench peak -- peak | model MODEL.gguf [ROWS] | prefill MODEL.gguf [TOKENS]";

fn main() -> Result<()> {
    let Some(args) = common::bench_args(USAGE) else { return Ok(()) };
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["peak"] => peak(),
        ["model", path] => model(path, 512),
        ["model", path, rows] => model(path, rows.parse()?),
        ["prefill", path] => prefill(path, 256),
        ["prefill", path, tokens] => prefill(path, tokens.parse()?),
        _ => bail!(USAGE),
    }
}
