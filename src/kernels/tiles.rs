//! The int8 batched kernel for prefill: many activation rows against 16-row weight tiles.

use std::mem::MaybeUninit;

use anyhow::{Result, bail};

use super::{Format, Isa, Level, Part, PrefillPath, QuantizedRows};
#[cfg(target_arch = "x86_64")]
use super::{SendPtr, x86};

/// 64 bytes on a cache line of their own: the repacked tile's storage.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Rows of weights per tile of the batched kernel: one 512-bit register of i32 outputs.
const TILE: usize = 16;

/// Whether this CPU runs [`matmul_batched`]: it needs AVX-512 VNNI or AVX2. Elsewhere (the
/// portable path) a float GEMM over dequantized weights multiplies a batch.
pub fn batched_available() -> bool {
    Isa::detect().has_batched_kernel()
}

impl Isa {
    /// Whether [`matmul_batched`] runs on this instruction set (AVX2 or AVX-512 VNNI).
    pub fn has_batched_kernel(self) -> bool {
        matches!(self.0, Level::Avx512Vnni | Level::Avx2)
    }
}

/// `out = x · wᵀ` for many activation rows at once (a prefill batch): like [`super::matmul`], but
/// with AVX-512 VNNI or AVX2 only (see [`batched_available`]; an error with `Isa` portable).
///
/// Every 16 weight rows are first repacked so that 4 consecutive quants of the 16 rows sit
/// side by side as unsigned bytes `u`: one 512-bit `vpdpbusd` of that register with 4
/// activation bytes broadcast then yields 16 outputs' partial sums at once, 64 multiply-adds
/// per instruction, against 16 for an f32 FMA of the same width. (16 rows in 512-bit registers
/// measured 11% faster than 8 in 256-bit ones on Zen 4, which splits 512-bit work in two:
/// the broadcasts and scale arithmetic are shared by twice the rows.) Each format's weights
/// are written as the decode kernels write them, `w = s · (u - o) + m` per sub-block (Q8_0 and
/// Q5_0: u = q + 128; Q4_K: m = -dmin · min; Q6_K: o = 32), and each output is summed as they
/// sum it (see `x86::tile_gemm`), so the two give the same bits for a row.
/// The layout idea is llama.cpp's interleaved repacks (and candle's `repack_x86`); the repack
/// is done per call, one tile at a time, so no second copy of the weights lives in memory.
pub fn matmul_batched(
    format: Format,
    isa: Isa,
    w: &[u8],
    rows: usize,
    x: &QuantizedRows,
    out: &mut [f32],
) -> Result<()> {
    matmul_batched_group(&[Part { format, w, rows }], isa, x, &mut [super::as_uninit(out)])
}

/// [`matmul_batched`] for several matrices that multiply the same activations (a layer's Q, K
/// and V; its gate and up projections): the tiles of all of them go over the pool in one
/// hand-out, so the threads wait for each other once, and the shorter matrices (K and V) do
/// not leave a thread idle at their end. `outs[i]` is (rows of x, `parts[i].rows`); on `Ok`,
/// every value of it has been written, so it needs no zeroing before.
pub fn matmul_batched_group(
    parts: &[Part<'_>],
    isa: Isa,
    x: &QuantizedRows,
    outs: &mut [&mut [MaybeUninit<f32>]],
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if isa.has_batched_kernel() {
        return batched_x86(parts, isa, x, outs);
    }
    let _ = (parts, isa, x, outs);
    bail!("internal error: the batched kernel needs AVX2 or AVX-512 VNNI")
}

#[cfg(target_arch = "x86_64")]
fn batched_x86(
    parts: &[Part<'_>],
    isa: Isa,
    x: &QuantizedRows,
    outs: &mut [&mut [MaybeUninit<f32>]],
) -> Result<()> {
    let m = x.rows();
    if parts.len() != outs.len() {
        bail!("internal error: {} matrices with {} outputs", parts.len(), outs.len());
    }
    for (part, out) in parts.iter().zip(outs.iter()) {
        let (values, bytes) = part.format.unit();
        let Part { format, w, rows } = *part;
        if format.prefill() != PrefillPath::Tiles {
            bail!("internal error: {format} has no batched kernel");
        }
        if !x.cols.is_multiple_of(values)
            || w.len() != rows * x.cols / values * bytes
            || out.len() != m * rows
        {
            bail!(
                "internal error: a ({rows} × {}) {format:?} batched matmul got {} weight bytes",
                x.cols,
                w.len()
            );
        }
    }
    // Σ y per 16 activation values, and the block sums the formats with a minimum multiply.
    let y16 = x.sums16();
    let blocks = if parts.iter().any(|p| p.format.has_minimum()) { x.block_sums() } else { Vec::new() };
    let sums = x86::TileSums { y16: &y16, blocks: &blocks };
    // Tile t of the group is tile t - first[i] of matrix i.
    let mut first = Vec::with_capacity(parts.len() + 1);
    first.push(0);
    for part in parts {
        first.push(first.last().copied().unwrap_or(0) + part.rows.div_ceil(TILE));
    }
    let tiles = first.last().copied().unwrap_or(0);
    let out_ptrs: Vec<SendPtr<f32>> =
        outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr().cast::<f32>())).collect();
    let out_ptrs = &out_ptrs;
    let first = &first;
    candle_core::utils::barrier_pool().execute_chunked(tiles, |range| {
        // One tile at a time: repacked, then run against every row of x.
        let nsub = x.cols / 16;
        let mut a = vec![0f32; nsub * TILE];
        let mut c = vec![0f32; nsub * TILE];
        // Aligned to a cache line, so that no 32-byte load of a tile straddles two.
        let mut lines = vec![Line([0; 64]); x.cols * TILE / 64];
        // SAFETY: `lines` is `x.cols * TILE` initialized bytes, borrowed mutably only here.
        let quants: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), x.cols * TILE) };
        for t in range {
            let p = first.partition_point(|&f| f <= t) - 1;
            let Part { format, w, rows } = parts[p];
            let row_bytes = format.row_bytes(x.cols);
            let r0 = (t - first[p]) * TILE;
            let n = TILE.min(rows - r0);
            // SAFETY: the CPU has AVX2, FMA and F16C, and AVX-512 VNNI where `isa` says so (an
            // `Isa` exists only for what the CPU runs); the slices hold the tile's rows and the
            // buffers its repacked form; columns r0..r0 + n of every row of matrix p's output
            // belong to this tile alone.
            unsafe {
                x86::pack_tile(
                    format,
                    &w[r0 * row_bytes..(r0 + n) * row_bytes],
                    n,
                    x.cols,
                    &mut a,
                    &mut c,
                    quants,
                );
                let out = out_ptrs[p].get().add(r0);
                if isa.0 == Level::Avx512Vnni {
                    x86::tile_gemm(format, &a, &c, quants, x, sums, out, rows, n);
                } else {
                    x86::tile_gemm_avx2(format, &a, &c, quants, x, sums, out, rows, n);
                }
            }
        }
    });
    Ok(())
}
