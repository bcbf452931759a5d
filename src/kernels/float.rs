//! Float weights (F32, F16, BF16) used in place in the mapped file, and the blocked GEMM that
//! every format's prefill runs on CPUs without the int8 batched kernel.
//!
//! candle's `QMatMul` turns F16 and BF16 matrices into an f32 tensor at load, twice the bytes
//! of the file in memory and in every decode step; here the 2-byte values are widened in
//! registers (F16C's `vcvtph2ps`, BF16 by a 16-bit shift) as they stream past. Activations stay
//! f32: no quantization error is added to float weights.

use std::ops::Range;
use std::sync::Mutex;

use anyhow::{Result, bail};
use half::f16;

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{Format, Isa, Level, SendPtr};

/// The float formats of [`Format`], as the kernels' `match`es want them: exhaustive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Float {
    F32,
    F16,
    /// The upper half of an f32: `w = f32::from_bits(b << 16)`.
    BF16,
}

impl Float {
    /// The float format `format` is; an error for the others.
    pub(super) fn of(format: Format) -> Result<Self> {
        Ok(match format {
            Format::F32 => Self::F32,
            Format::F16 => Self::F16,
            Format::BF16 => Self::BF16,
            _ => bail!("internal error: {format} is not a float format"),
        })
    }

    /// Bytes per value.
    fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// Value `i` of little-endian `w`.
    pub(super) fn get(self, w: &[u8], i: usize) -> f32 {
        match self {
            Self::F32 => f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]),
            Self::F16 => f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32(),
            Self::BF16 => f32::from_bits(u32::from(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])) << 16),
        }
    }
}

/// `out[i · rows + r] = x_i · w_r` for (rows, cols) float weights `w` and f32 activations `x`,
/// (m, cols): the decode matmul, split over the pool like [`super::matmul`], and with its
/// bit-for-bit promise (each activation row gets what it would get alone).
pub fn matmul_float(
    format: Format,
    isa: Isa,
    w: &[u8],
    (rows, cols): (usize, usize),
    x: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let format = Float::of(format)?;
    let row_bytes = cols * format.bytes();
    if cols == 0
        || w.len() != rows * row_bytes
        || !x.len().is_multiple_of(cols)
        || out.len() != x.len() / cols * rows
    {
        bail!(
            "internal error: a ({rows} × {cols}) {format:?} matmul got {} weight bytes, {} inputs and {} outputs",
            w.len(),
            x.len(),
            out.len()
        );
    }
    let m = x.len() / cols;
    const ROWS_PER_ITEM: usize = 16;
    let out_ptr = SendPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(rows.div_ceil(ROWS_PER_ITEM), |range| {
        let range = range.start * ROWS_PER_ITEM..(range.end * ROWS_PER_ITEM).min(rows);
        let mut r = range.start;
        // Four weight rows at a time against each activation row in turn (see `decode.rs`).
        while r + 4 <= range.end {
            let w4 = &w[r * row_bytes..(r + 4) * row_bytes];
            for i in 0..m {
                let v = dot4(format, isa, w4, row_bytes, &x[i * cols..(i + 1) * cols]);
                for (k, v) in v.into_iter().enumerate() {
                    // SAFETY: (i, r + k) is in bounds (lengths checked above) and written only
                    // by this work item, whose rows are its own; `out` outlives the pool call.
                    unsafe { *out_ptr.get().add(i * rows + r + k) = v };
                }
            }
            r += 4;
        }
        for r in r..range.end {
            let wr = &w[r * row_bytes..(r + 1) * row_bytes];
            for i in 0..m {
                let v = dot(format, isa, wr, &x[i * cols..(i + 1) * cols]);
                // SAFETY: as above.
                unsafe { *out_ptr.get().add(i * rows + r) = v };
            }
        }
    });
    Ok(())
}

fn dot4(format: Float, isa: Isa, w: &[u8], row_bytes: usize, x: &[f32]) -> [f32; 4] {
    match isa.0 {
        // SAFETY: an `Isa` exists only for instruction sets this CPU has (see `Isa`), and `w`
        // holds four rows of `x.len()` values (checked by `matmul_float`).
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni | Level::Avx2 => unsafe { x86::dot4_float(format, w, row_bytes, x) },
        _ => std::array::from_fn(|r| dot_scalar(format, &w[r * row_bytes..(r + 1) * row_bytes], x)),
    }
}

fn dot(format: Float, isa: Isa, w: &[u8], x: &[f32]) -> f32 {
    match isa.0 {
        // SAFETY: as for `dot4`, with one row.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni | Level::Avx2 => unsafe { x86::dot_float(format, w, x) },
        _ => dot_scalar(format, w, x),
    }
}

/// Eight partial sums, lane j taking values j, j + 8, …: independent chains the compiler can
/// vectorize, and about the SIMD kernels' rounding. (No `mul_add`: without hardware FMA it is
/// a library call.)
fn dot_scalar(format: Float, w: &[u8], x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let full = x.len() / 8 * 8;
    for (i, &xi) in x[..full].iter().enumerate() {
        lanes[i % 8] += format.get(w, i) * xi;
    }
    let s: [f32; 4] = std::array::from_fn(|j| lanes[j] + lanes[j + 4]);
    let s = [s[0] + s[2], s[1] + s[3]];
    let mut sum = s[0] + s[1];
    for (i, &xi) in x.iter().enumerate().skip(full) {
        sum += format.get(w, i) * xi;
    }
    sum
}

/// Widens float weights `w` to f32 in `out` (exact for every format), on the calling thread.
pub fn float_to_f32(format: Format, isa: Isa, w: &[u8], out: &mut [f32]) -> Result<()> {
    let format = Float::of(format)?;
    if w.len() != out.len() * format.bytes() {
        bail!("internal error: {} bytes of {format:?} do not widen to {} values", w.len(), out.len());
    }
    match isa.0 {
        // SAFETY: an `Isa` exists only for instruction sets this CPU has; lengths checked above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni | Level::Avx2 => unsafe { x86::float_to_f32(format, w, out) },
        _ => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = format.get(w, i);
            }
        }
    }
    Ok(())
}

/// `out (m, rows) = x (m, cols) · wᵀ` for a batch of activation rows, where `dequantize(r, buf)`
/// writes weight rows `r` as f32 into `buf` (`r.len() · cols` values): a blocked GEMM that
/// widens one block of weight rows at a time (about 256 KB of f32, so it stays in cache while
/// the whole batch passes) and multiplies it with the `gemm` crate on that pool thread. No f32
/// copy of the whole matrix is ever made: a 49152 × 576 output matrix would be 113 MB.
pub fn matmul_row_blocks(
    (rows, cols): (usize, usize),
    x: &[f32],
    out: &mut [f32],
    dequantize: impl Fn(Range<usize>, &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    if cols == 0 || !x.len().is_multiple_of(cols) || out.len() != x.len() / cols * rows {
        bail!(
            "internal error: a ({rows} × {cols}) batched matmul got {} inputs and {} outputs",
            x.len(),
            out.len()
        );
    }
    let m = x.len() / cols;
    let block = (65536 / cols).clamp(16, 256);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let failed = Mutex::new(None);
    candle_core::utils::barrier_pool().execute_chunked(rows.div_ceil(block), |items| {
        let mut buf = vec![0f32; block * cols];
        for b in items {
            let r = b * block..((b + 1) * block).min(rows);
            let n = r.len();
            let buf = &mut buf[..n * cols];
            if let Err(e) = dequantize(r.clone(), buf) {
                *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                return;
            }
            // SAFETY: out (m, rows) has columns r of every row to itself (blocks are disjoint),
            // x is (m, cols) and buf (n, cols), read as its transpose (cols, n): row stride 1,
            // column stride cols. `out` outlives the pool call.
            unsafe {
                gemm_one_thread(
                    (m, n, cols),
                    (out_ptr.get().add(r.start), rows),
                    (x.as_ptr(), cols),
                    (buf.as_ptr(), 1, cols),
                );
            }
        }
    });
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `dst (m, n) = lhs (m, k) · rhs (k, n)` on the calling thread with
/// the `gemm` crate. `dst` and `lhs` are given with their row stride (their elements within a
/// row are contiguous), `rhs` with its row and column strides.
///
/// # Safety
/// The pointers and strides must describe memory valid for those shapes, and `dst` must not
/// overlap the inputs.
unsafe fn gemm_one_thread(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    (lhs, lhs_rs): (*const f32, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
) {
    // SAFETY: the caller's contract. dst = 0 · dst + 1 · lhs · rhs, never reading dst.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs,
            1,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// SwiGLU's gate: `u = g / (1 + e^-g) · u` elementwise (ggml's `swiglu`), vectorized on AVX2
/// (the exponential within 2 ulp of `f32::exp`). Each value depends on its own inputs alone,
/// so a row gets the same bits in a batch of any size.
pub fn silu_times(isa: Isa, g: &[f32], u: &mut [f32]) {
    match isa.0 {
        // SAFETY: an `Isa` exists only for instruction sets this CPU has (see `Isa`).
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni | Level::Avx2 => unsafe { x86::silu_times(g, u) },
        _ => {
            for (&x, u) in g.iter().zip(u) {
                *u *= x / (1.0 + (-x).exp());
            }
        }
    }
}
