//! Our own matrix-vector kernels for the two block formats that carry most of a model's bytes,
//! Q8_0 and Q5_0, used in place in the mapped file when decoding (one to a few activation rows).
//!
//! Why not candle's: its Q5_0 dot product has no SIMD path at all (and converting Q5_0 to Q8_0
//! at load costs half as many bytes again, in memory and in every decode step), and its Q8_0
//! kernel converts two f16 scales through out-of-line calls per 32-value block; decoding is
//! bound by how fast the weights stream from memory, and that overhead kept it at about 20 GB/s
//! where this machine reads 26 GB/s.
//!
//! The instruction set is chosen at run time ([`Isa::detect`]): AVX-512 VNNI (`vpdpbusd` on
//! 256-bit registers), else AVX2 (`vpmaddubsw`), else portable scalar code, so a plain
//! `cargo build` runs fast on a new CPU and still runs on an old one. The arithmetic follows
//! ggml's: activations are quantized to Q8_0 per 32-value block (scale `amax / 127` rounded to
//! f16, values rounded half away from zero), each block's dot product is an exact integer, and
//! it is scaled by the two f16 scales. The signed-by-signed byte products use llama.cpp's trick
//! for unsigned-by-signed instructions: `|w| · (y · sign(w))`.

use std::ops::Range;
use std::sync::OnceLock;

use anyhow::{Result, bail};
use half::f16;

/// Values per block in both formats.
pub const QK: usize = 32;

/// A weight block format these kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// f16 scale, then 32 signed bytes: `w = d · q`.
    Q8_0,
    /// f16 scale, 32 high bits (u32, little-endian), then 16 bytes of low nibbles:
    /// `w = d · (q - 16)`, q in 0..32.
    Q5_0,
}

impl Format {
    /// Bytes per block of 32 values.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q5_0 => 22,
        }
    }
}

/// The instruction set a kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 VNNI with VL (Ice Lake, Zen 4 and later).
    Avx512Vnni,
    /// AVX2 with FMA (Haswell, Zen 1 and later).
    Avx2,
    /// Portable code, any CPU.
    Scalar,
}

impl Isa {
    /// The best instruction set this CPU has, detected once.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| Self::available()[0])
    }

    /// Every instruction set this CPU can run, best first (tests run them all).
    pub fn available() -> Vec<Isa> {
        let mut isas = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                {
                    isas.push(Isa::Avx512Vnni);
                }
                isas.push(Isa::Avx2);
            }
        }
        isas.push(Isa::Scalar);
        isas
    }
}

/// Activation rows quantized to Q8_0: per block of 32 values, one scale and 32 signed bytes.
pub struct QuantizedRows {
    cols: usize,
    /// (rows, cols / 32): each block's scale, already rounded through f16 as ggml stores it.
    d: Vec<f32>,
    /// (rows, cols)
    qs: Vec<i8>,
}

impl QuantizedRows {
    /// Quantizes `x`, a row-major (rows, cols) matrix, as ggml's `quantize_row_q8_0_ref` does;
    /// a batch's rows are split over the pool.
    pub fn new(x: &[f32], cols: usize) -> Result<Self> {
        if cols == 0 || !cols.is_multiple_of(QK) || !x.len().is_multiple_of(cols) {
            bail!("cannot quantize rows of {cols} values (the length must be a multiple of {QK})");
        }
        let mut d = vec![0f32; x.len() / QK];
        let mut qs = vec![0i8; x.len()];
        let quantize = |x: &[f32], d: &mut [f32], qs: &mut [i8]| {
            for ((block, out), d) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).zip(d) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                for (q, &v) in out.iter_mut().zip(block) {
                    *q = (v * inv).round() as i8;
                }
                *d = f16::from_f32(scale).to_f32();
            }
        };
        let rows = x.len() / cols;
        if rows == 1 {
            quantize(x, &mut d, &mut qs);
        } else {
            let (d_ptr, q_ptr) = (SendPtr(d.as_mut_ptr()), SendPtr(qs.as_mut_ptr()));
            let nb = cols / QK;
            candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
                // SAFETY: each row range owns its rows of `d` and `qs`, which outlive the call.
                let (d, qs) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(d_ptr.get().add(range.start * nb), range.len() * nb),
                        std::slice::from_raw_parts_mut(
                            q_ptr.get().add(range.start * cols),
                            range.len() * cols,
                        ),
                    )
                };
                quantize(&x[range.start * cols..range.end * cols], d, qs);
            });
        }
        Ok(Self { cols, d, qs })
    }

    fn rows(&self) -> usize {
        self.qs.len() / self.cols
    }

    fn row(&self, i: usize) -> (&[f32], &[i8]) {
        let nb = self.cols / QK;
        (&self.d[i * nb..(i + 1) * nb], &self.qs[i * self.cols..(i + 1) * self.cols])
    }
}

/// `out[i · rows + r] = x_i · w_r` for every activation row i and weight row r: the weights `w`
/// are (rows, cols) in `format`, `x` is (m, cols), `out` is (m, rows). Work is split over candle's
/// thread pool (the one its own matmuls use, so the two never compete for the cores).
pub fn matmul(
    format: Format,
    isa: Isa,
    w: &[u8],
    rows: usize,
    x: &QuantizedRows,
    out: &mut [f32],
) -> Result<()> {
    let row_bytes = x.cols / QK * format.block_bytes();
    let m = x.rows();
    if w.len() != rows * row_bytes || out.len() != m * rows {
        bail!(
            "internal error: a ({rows} × {}) {format:?} matmul got {} weight bytes and {} outputs",
            x.cols,
            w.len(),
            out.len()
        );
    }
    let isa = if Isa::available().contains(&isa) { isa } else { Isa::Scalar };
    // Work items of 16 weight rows: small enough to balance two threads on a 256-row matrix,
    // large enough that handing them out costs nothing next to their 10 KB or more of weights.
    const ROWS_PER_ITEM: usize = 16;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let items = rows.div_ceil(ROWS_PER_ITEM);
    candle_core::utils::barrier_pool().execute_chunked(items, |range| {
        let range = range.start * ROWS_PER_ITEM..(range.end * ROWS_PER_ITEM).min(rows);
        // SAFETY: work items are disjoint row ranges, so each output element (i, r) is written
        // by exactly one call, and `out` outlives the pool's execution of this closure.
        unsafe { rows_range(format, isa, w, row_bytes, rows, x, range, out_ptr) }
    });
    Ok(())
}

/// A pointer that the pool's threads may share, each writing only its own elements.
struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: used only to write disjoint elements from the pool's threads (see the callers).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer. (A method, so closures capture the whole `SendPtr`, not its field.)
    fn get(self) -> *mut T {
        self.0
    }
}

/// Dequantizes (rows, cols) weights in `format` into `out` as f32, split over the pool: the
/// prefill's GEMM reads them so, once per batch.
pub fn dequantize(format: Format, isa: Isa, w: &[u8], out: &mut [f32]) -> Result<()> {
    let bytes = format.block_bytes();
    if !w.len().is_multiple_of(bytes) || out.len() != w.len() / bytes * QK {
        bail!("internal error: {} bytes of {format:?} do not dequantize to {} values", w.len(), out.len());
    }
    let isa = if Isa::available().contains(&isa) { isa } else { Isa::Scalar };
    // Work items of 256 blocks (32 KB of output).
    const BLOCKS_PER_ITEM: usize = 256;
    let blocks = w.len() / bytes;
    let out_ptr = SendPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(blocks.div_ceil(BLOCKS_PER_ITEM), |range| {
        let range = range.start * BLOCKS_PER_ITEM..(range.end * BLOCKS_PER_ITEM).min(blocks);
        // SAFETY: work items are disjoint block ranges, each writing only its own 32 values per
        // block, within `out` (whose length was checked), which outlives the pool's execution.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(range.start * QK), range.len() * QK) };
        let src = &w[range.start * bytes..range.end * bytes];
        match isa {
            // SAFETY: an `Isa` other than Scalar is one this CPU has (checked above).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Avx2 => unsafe { x86::dequantize(format, src, dst) },
            _ => dequantize_scalar(format, src, dst),
        }
    });
    Ok(())
}

/// Rows of weights per tile of the batched kernel: one 256-bit register of i32 outputs.
const TILE: usize = 8;

/// `out = x · wᵀ` for many activation rows at once (a prefill batch): like [`matmul`], but
/// with AVX-512 VNNI only; `None` on other CPUs, where the caller's float GEMM is the faster
/// way.
///
/// Every 8 weight rows are first repacked, per block, so that 4 consecutive quants of the 8
/// rows sit side by side: one `vpdpbusd` of that register with 4 activation bytes broadcast
/// then yields 8 outputs' partial sums at once, 32 multiply-adds per instruction, with no
/// per-product sign fix-ups. The weights are stored offset by +128 (unsigned, as `vpdpbusd`
/// wants), and the offset's contribution, 128 · Σy per activation block, is subtracted up
/// front. The idea is llama.cpp's (and candle's `repack_x86`) interleaved layouts; the repack
/// here is done per call, into a buffer the size of one matrix's tile row, so no second copy
/// of the weights lives in memory.
pub fn matmul_batched(
    format: Format,
    w: &[u8],
    rows: usize,
    x: &QuantizedRows,
    out: &mut [f32],
) -> Option<Result<()>> {
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() == Isa::Avx512Vnni {
        return Some(batched_vnni(format, w, rows, x, out));
    }
    let _ = (format, w, rows, x, out);
    None
}

#[cfg(target_arch = "x86_64")]
fn batched_vnni(format: Format, w: &[u8], rows: usize, x: &QuantizedRows, out: &mut [f32]) -> Result<()> {
    let nb = x.cols / QK;
    let bytes = format.block_bytes();
    let m = x.rows();
    if w.len() != rows * nb * bytes || out.len() != m * rows {
        bail!(
            "internal error: a ({rows} × {}) {format:?} batched matmul got {} weight bytes",
            x.cols,
            w.len()
        );
    }
    // -128 · Σ qs per activation block: the +128 offset's contribution, removed up front.
    let corr: Vec<i32> =
        x.qs.chunks_exact(QK).map(|b| -128 * b.iter().map(|&q| i32::from(q)).sum::<i32>()).collect();
    let tiles = rows.div_ceil(TILE);
    let out_ptr = SendPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(tiles, |range| {
        // One tile at a time: repacked (nb blocks × 8 rows), then run against every row of x.
        let mut scales = vec![0f32; nb * TILE];
        let mut quants = vec![0u8; nb * TILE * QK];
        let mut tile_out = vec![0f32; m * TILE];
        for t in range {
            let r0 = t * TILE;
            let n = TILE.min(rows - r0);
            // SAFETY: the CPU has AVX-512 VNNI (checked by the caller), which implies AVX2;
            // the slices hold the tile's rows and the buffers its repacked blocks.
            unsafe {
                x86::pack_tile(
                    format,
                    &w[r0 * nb * bytes..(r0 + n) * nb * bytes],
                    n,
                    nb,
                    &mut scales,
                    &mut quants,
                );
                x86::tile_gemm(&scales, &quants, x, &corr, &mut tile_out);
            }
            for i in 0..m {
                // SAFETY: columns r0..r0 + n of every output row belong to this tile alone.
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(i * rows + r0), n) };
                dst.copy_from_slice(&tile_out[i * TILE..i * TILE + n]);
            }
        }
    });
    Ok(())
}

/// Single-query attention for decoding: the `n_q` queries (n_q, hd) that share one KV head,
/// already scaled and rotated, over that head's cached keys and values (len, hd) in f16;
/// writes the softmax-weighted values to `out` (n_q, hd).
///
/// The positions are split into spans handed out over the pool; each span yields its own
/// running maximum, sum of exponentials and unnormalized output per query (the split-softmax
/// of "flash decoding"), and the spans are merged exactly at the end. One pass over the cache,
/// and both cores stream it: at a long context the cache is megabytes per layer.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    isa: Isa,
    q: &[f32],
    n_q: usize,
    hd: usize,
    k: &[f16],
    v: &[f16],
    out: &mut [f32],
) -> Result<()> {
    let len = k.len() / hd.max(1);
    if hd == 0
        || len == 0
        || q.len() != n_q * hd
        || k.len() != len * hd
        || v.len() != k.len()
        || out.len() != q.len()
    {
        bail!("internal error: attention over {} keys and {} values of width {hd}", k.len(), v.len());
    }
    let isa = if Isa::available().contains(&isa) { isa } else { Isa::Scalar };
    const SPAN: usize = 128;
    let spans = len.div_ceil(SPAN);
    // Per span: n_q maxima, n_q sums, n_q · hd outputs.
    let stride = n_q * (2 + hd);
    let mut partials = vec![0f32; spans * stride];
    let parts = SendPtr(partials.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(spans, |range| {
        let mut scores = vec![0f32; n_q * SPAN];
        for span in range {
            let t0 = span * SPAN;
            let n = SPAN.min(len - t0);
            // SAFETY: each span writes only its own `stride` values of `partials`, which
            // outlives the pool's execution of this closure.
            let part = unsafe { std::slice::from_raw_parts_mut(parts.get().add(span * stride), stride) };
            let (stats, acc) = part.split_at_mut(2 * n_q);
            let (k, v) = (&k[t0 * hd..(t0 + n) * hd], &v[t0 * hd..(t0 + n) * hd]);
            for (i, qi) in q.chunks_exact(hd).enumerate() {
                let s = &mut scores[i * SPAN..i * SPAN + n];
                for (st, kt) in s.iter_mut().zip(k.chunks_exact(hd)) {
                    *st = dot_f16(isa, qi, kt);
                }
                let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0f32;
                for st in s.iter_mut() {
                    *st = (*st - max).exp();
                    sum += *st;
                }
                stats[i] = max;
                stats[n_q + i] = sum;
            }
            acc.fill(0.0);
            for (t, vt) in v.chunks_exact(hd).enumerate() {
                for (i, acc_i) in acc.chunks_exact_mut(hd).enumerate() {
                    axpy_f16(isa, acc_i, scores[i * SPAN + t], vt);
                }
            }
        }
    });
    // Merge: out_i = Σ_span e^(m_span - M) · acc_span / Σ_span e^(m_span - M) · l_span.
    for (i, out_i) in out.chunks_exact_mut(hd).enumerate() {
        let max = partials.chunks_exact(stride).fold(f32::NEG_INFINITY, |m, p| m.max(p[i]));
        out_i.fill(0.0);
        let mut total = 0f32;
        for p in partials.chunks_exact(stride) {
            let w = (p[i] - max).exp();
            total += w * p[n_q + i];
            for (o, &a) in out_i.iter_mut().zip(&p[2 * n_q + i * hd..2 * n_q + (i + 1) * hd]) {
                *o += w * a;
            }
        }
        for o in out_i.iter_mut() {
            *o /= total;
        }
    }
    Ok(())
}

/// `a · b` for f32 `a` and f16 `b`.
fn dot_f16(isa: Isa, a: &[f32], b: &[f16]) -> f32 {
    match isa {
        // SAFETY: an `Isa` other than Scalar is one this CPU has (checked by the callers).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni | Isa::Avx2 if a.len() == b.len() => unsafe { x86::dot_f16(a, b) },
        _ => a.iter().zip(b).map(|(&x, &y)| x * y.to_f32()).sum(),
    }
}

/// `acc += p · v` for f16 `v`.
fn axpy_f16(isa: Isa, acc: &mut [f32], p: f32, v: &[f16]) {
    match isa {
        // SAFETY: as for `dot_f16`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni | Isa::Avx2 if acc.len() == v.len() => unsafe { x86::axpy_f16(acc, p, v) },
        _ => {
            for (a, &x) in acc.iter_mut().zip(v) {
                *a += p * x.to_f32();
            }
        }
    }
}

fn dequantize_scalar(format: Format, w: &[u8], out: &mut [f32]) {
    let mut q = [0i8; QK];
    for (block, dst) in w.chunks_exact(format.block_bytes()).zip(out.chunks_exact_mut(QK)) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        unpack(format, block, &mut q);
        for (o, &v) in dst.iter_mut().zip(&q) {
            *o = d * f32::from(v);
        }
    }
}

/// Computes the outputs of weight rows `range` for every activation row.
///
/// # Safety
/// `out` must point to (m, rows) f32s, with no other writer of these rows' columns.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_range(
    format: Format,
    isa: Isa,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    x: &QuantizedRows,
    range: Range<usize>,
    out: SendPtr<f32>,
) {
    for r in range {
        let wr = &w[r * row_bytes..(r + 1) * row_bytes];
        for i in 0..x.rows() {
            let (d, qs) = x.row(i);
            let v = dot(format, isa, wr, d, qs);
            // SAFETY: (i, r) is in bounds and written only here (see the function's contract).
            unsafe { *out.get().add(i * rows + r) = v };
        }
    }
}

/// One weight row (whole blocks) against one quantized activation row.
fn dot(format: Format, isa: Isa, w: &[u8], d: &[f32], qs: &[i8]) -> f32 {
    debug_assert_eq!(w.len(), d.len() * format.block_bytes());
    debug_assert_eq!(qs.len(), d.len() * QK);
    match isa {
        // SAFETY: `matmul` only passes an `Isa` this CPU has (checked via `Isa::available`),
        // and the x86 kernels read within the slices, whose lengths were checked.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe {
            match format {
                Format::Q8_0 => x86::dot_q8_0_vnni(w, d, qs),
                Format::Q5_0 => x86::dot_q5_0_vnni(w, d, qs),
            }
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe {
            match format {
                Format::Q8_0 => x86::dot_q8_0_avx2(w, d, qs),
                Format::Q5_0 => x86::dot_q5_0_avx2(w, d, qs),
            }
        },
        _ => dot_scalar(format, w, d, qs),
    }
}

fn dot_scalar(format: Format, w: &[u8], d: &[f32], qs: &[i8]) -> f32 {
    let mut sum = 0f32;
    let mut wq = [0i8; QK];
    for ((block, &dy), y) in w.chunks_exact(format.block_bytes()).zip(d).zip(qs.chunks_exact(QK)) {
        let dw = f16::from_le_bytes([block[0], block[1]]).to_f32();
        unpack(format, block, &mut wq);
        let isum: i32 = wq.iter().zip(y).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
        sum += dw * dy * isum as f32;
    }
    sum
}

/// The 32 signed quants of one block (without its scale).
pub fn unpack(format: Format, block: &[u8], out: &mut [i8; QK]) {
    match format {
        Format::Q8_0 => {
            for (o, &b) in out.iter_mut().zip(&block[2..2 + QK]) {
                *o = b as i8;
            }
        }
        Format::Q5_0 => {
            let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            // ggml's layout: value j (j < 16) is the low nibble of byte j with high bit j of qh;
            // value j + 16 is the high nibble of byte j with high bit j + 16.
            for j in 0..QK / 2 {
                let b = block[6 + j];
                let lo = (b & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
                let hi = (b >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                out[j] = lo as i8 - 16;
                out[j + 16] = hi as i8 - 16;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Every helper carries the target features it needs and is `#[inline]`, so that it inlines
    //! into the kernels (which enable a superset); a helper without them would stay an
    //! out-of-line call around each intrinsic.

    use std::arch::x86_64::*;

    use super::QK;

    /// Sum of the products of signed bytes `w` and `y` as 8 i32 lanes: one `vpdpbusd` on
    /// |w| and y·sign(w).
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    fn dot_i8_vnni(w: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w))
    }

    /// The same with `vpmaddubsw` and `vpmaddwd`; no i16 saturation, because neither operand
    /// is -128 here (Q8_0 quants are within ±127, Q5_0 ones within -16..15).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot_i8_avx2(w: __m256i, y: __m256i) -> __m256i {
        let products = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
        _mm256_madd_epi16(products, _mm256_set1_epi16(1))
    }

    /// The block's f16 scale times the activation block's scale, in all 8 lanes.
    ///
    /// # Safety
    /// `block` must point at a block's two-byte scale.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scale(block: *const u8, dy: f32) -> __m256 {
        // SAFETY: the caller's contract.
        let bits = unsafe { std::ptr::read_unaligned(block.cast::<u16>()) };
        let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))));
        _mm256_set1_ps(dw * dy)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The 32 quants of a Q8_0 block.
    ///
    /// # Safety
    /// `block` must point at a 34-byte Q8_0 block.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quants_q8_0(block: *const u8) -> __m256i {
        // SAFETY: the caller's contract; the quants are bytes 2..34.
        unsafe { _mm256_loadu_si256(block.add(2).cast()) }
    }

    /// The 32 signed values of a Q5_0 block: bytes 0..16 from the low nibbles, 16..32 from the
    /// high ones, each minus 16 unless its high bit is set (llama.cpp's `bytes_from_bits_32`
    /// trick turns the 32 bits into 32 byte masks).
    ///
    /// # Safety
    /// `block` must point at a 22-byte Q5_0 block: scale, 4 bytes of high bits, 16 of nibbles.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quants_q5_0(block: *const u8) -> __m256i {
        // SAFETY: the caller's contract.
        let (qh, nib) = unsafe {
            (std::ptr::read_unaligned(block.add(2).cast::<u32>()), _mm_loadu_si128(block.add(6).cast()))
        };
        let m4 = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(nib, m4);
        let hi = _mm_and_si128(_mm_srli_epi16(nib, 4), m4);
        let q = _mm256_set_m128i(hi, lo);
        // Byte i gets byte i / 8 of qh, then is all ones where bit i % 8 of it is set.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(qh as i32),
            _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0),
        );
        let bit = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
        let set = _mm256_cmpeq_epi8(bit, _mm256_set1_epi64x(-1));
        // Where the high bit is clear, q - 16 = q | 0xf0 in two's complement.
        _mm256_or_si256(q, _mm256_andnot_si256(set, _mm256_set1_epi8(0xf0u8 as i8)))
    }

    /// The body of every kernel: two blocks per iteration into two accumulators, for
    /// instruction-level parallelism across the dependent convert-and-add chains.
    macro_rules! kernel_body {
        ($w:ident, $d:ident, $qs:ident, $bytes:expr, $quants:ident, $dot:ident) => {{
            let n = $d.len();
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let (w, y) = ($w.as_ptr(), $qs.as_ptr());
            let mut b = 0;
            // SAFETY (all pointer reads): block b is w[b * bytes..][..bytes] and
            // qs[b * 32..][..32], within the slices for b < d.len() (the kernels' contract).
            while b + 1 < n {
                let (b0, b1) = unsafe { (w.add(b * $bytes), w.add((b + 1) * $bytes)) };
                let p0 = $dot(unsafe { $quants(b0) }, unsafe { _mm256_loadu_si256(y.add(b * QK).cast()) });
                let p1 =
                    $dot(unsafe { $quants(b1) }, unsafe { _mm256_loadu_si256(y.add((b + 1) * QK).cast()) });
                acc0 = _mm256_fmadd_ps(unsafe { scale(b0, $d[b]) }, _mm256_cvtepi32_ps(p0), acc0);
                acc1 = _mm256_fmadd_ps(unsafe { scale(b1, $d[b + 1]) }, _mm256_cvtepi32_ps(p1), acc1);
                b += 2;
            }
            if b < n {
                let b0 = unsafe { w.add(b * $bytes) };
                let p0 = $dot(unsafe { $quants(b0) }, unsafe { _mm256_loadu_si256(y.add(b * QK).cast()) });
                acc0 = _mm256_fmadd_ps(unsafe { scale(b0, $d[b]) }, _mm256_cvtepi32_ps(p0), acc0);
            }
            hsum(_mm256_add_ps(acc0, acc1))
        }};
    }

    macro_rules! kernels {
        ($($name:ident: $features:literal, $bytes:expr, $quants:ident, $dot:ident;)*) => {$(
            /// One weight row against one quantized activation row.
            ///
            /// # Safety
            /// The CPU must have the features enabled here; `w` must hold `d.len()` blocks and
            /// `qs` `d.len() * 32` values.
            #[target_feature(enable = $features)]
            pub unsafe fn $name(w: &[u8], d: &[f32], qs: &[i8]) -> f32 {
                kernel_body!(w, d, qs, $bytes, $quants, $dot)
            }
        )*};
    }

    /// Dequantizes whole blocks of `format` into `out` (32 values per block).
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `out` must hold 32 values per block of `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequantize(format: super::Format, w: &[u8], out: &mut [f32]) {
        let bytes = format.block_bytes();
        for (b, block) in w.chunks_exact(bytes).enumerate() {
            // SAFETY: `block` is one whole block; `out` holds 32 values for it (the contract).
            unsafe {
                let q = match format {
                    super::Format::Q8_0 => quants_q8_0(block.as_ptr()),
                    super::Format::Q5_0 => quants_q5_0(block.as_ptr()),
                };
                let d = scale(block.as_ptr(), 1.0);
                let dst = out.as_mut_ptr().add(b * QK);
                let lo = _mm256_castsi256_si128(q);
                let hi = _mm256_extracti128_si256(q, 1);
                for (i, part) in
                    [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)].into_iter().enumerate()
                {
                    let v = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part)));
                    _mm256_storeu_ps(dst.add(i * 8), v);
                }
            }
        }
    }

    /// `a · b` for f32 `a` and f16 `b` of equal length.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(a: &[f32], b: &[half::f16]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY: every read is within the first n elements of both slices.
        unsafe {
            while i + 16 <= n {
                let b0 = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i).cast()));
                let b1 = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i + 8).cast()));
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), b0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), b1, acc1);
                i += 16;
            }
        }
        let mut sum = hsum(_mm256_add_ps(acc0, acc1));
        for j in i..n {
            sum += a[j] * b[j].to_f32();
        }
        sum
    }

    /// `acc += p · v` for f16 `v` as long as `acc`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(acc: &mut [f32], p: f32, v: &[half::f16]) {
        let n = acc.len().min(v.len());
        let (pa, pv) = (acc.as_mut_ptr(), v.as_ptr());
        let pp = _mm256_set1_ps(p);
        let mut i = 0;
        // SAFETY: every access is within the first n elements of both slices.
        unsafe {
            while i + 8 <= n {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(pv.add(i).cast()));
                _mm256_storeu_ps(pa.add(i), _mm256_fmadd_ps(pp, x, _mm256_loadu_ps(pa.add(i))));
                i += 8;
            }
        }
        for j in i..n {
            acc[j] += p * v[j].to_f32();
        }
    }

    /// Repacks `n` (at most 8) weight rows of `nb` blocks each into the tile layout of
    /// [`tile_gemm`]: per block, the 8 rows' f32 scales, then 8 groups of 32 bytes, group j
    /// holding quants 4j..4j + 4 of rows 0..8 as unsigned bytes (q + 128). Missing rows are
    /// zero with scale 0.
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `w` must hold `n · nb` blocks of `format`, `scales`
    /// `nb · 8` values and `quants` `nb · 256`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn pack_tile(
        format: super::Format,
        w: &[u8],
        n: usize,
        nb: usize,
        scales: &mut [f32],
        quants: &mut [u8],
    ) {
        let bytes = format.block_bytes();
        let flip = _mm256_set1_epi8(0x80u8 as i8);
        for b in 0..nb {
            let mut r = [_mm256_set1_epi8(0x80u8 as i8); 8];
            for (row, reg) in r.iter_mut().enumerate().take(n) {
                // SAFETY: block b of row `row` lies within `w` (the contract).
                unsafe {
                    let block = w.as_ptr().add((row * nb + b) * bytes);
                    let q = match format {
                        super::Format::Q8_0 => quants_q8_0(block),
                        super::Format::Q5_0 => quants_q5_0(block),
                    };
                    *reg = _mm256_xor_si256(q, flip);
                    scales[b * 8 + row] = _mm_cvtss_f32(scale(block, 1.0).cast_128());
                }
            }
            for s in &mut scales[b * 8 + n..b * 8 + 8] {
                *s = 0.0;
            }
            // An 8 × 8 transpose of 32-bit elements: element j of row i becomes element i of
            // group j.
            let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
            let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
            let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
            let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
            let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
            let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
            let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
            let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
            let u0 = _mm256_unpacklo_epi64(t0, t2);
            let u1 = _mm256_unpackhi_epi64(t0, t2);
            let u2 = _mm256_unpacklo_epi64(t1, t3);
            let u3 = _mm256_unpackhi_epi64(t1, t3);
            let u4 = _mm256_unpacklo_epi64(t4, t6);
            let u5 = _mm256_unpackhi_epi64(t4, t6);
            let u6 = _mm256_unpacklo_epi64(t5, t7);
            let u7 = _mm256_unpackhi_epi64(t5, t7);
            let groups = [
                _mm256_permute2x128_si256(u0, u4, 0x20),
                _mm256_permute2x128_si256(u1, u5, 0x20),
                _mm256_permute2x128_si256(u2, u6, 0x20),
                _mm256_permute2x128_si256(u3, u7, 0x20),
                _mm256_permute2x128_si256(u0, u4, 0x31),
                _mm256_permute2x128_si256(u1, u5, 0x31),
                _mm256_permute2x128_si256(u2, u6, 0x31),
                _mm256_permute2x128_si256(u3, u7, 0x31),
            ];
            for (j, g) in groups.into_iter().enumerate() {
                // SAFETY: block b's 256 bytes lie within `quants` (the contract).
                unsafe { _mm256_storeu_si256(quants.as_mut_ptr().add(b * 256 + j * 32).cast(), g) };
            }
        }
    }

    /// Helper so `scale`'s 8-lane result can be read as one f32.
    trait Cast128 {
        fn cast_128(self) -> __m128;
    }
    impl Cast128 for __m256 {
        #[inline(always)]
        fn cast_128(self) -> __m128 {
            // SAFETY: a register reinterpretation; AVX is implied by the callers' features.
            unsafe { _mm256_castps256_ps128(self) }
        }
    }

    /// One packed tile (8 weight rows) against every row of `x`: `out` is (rows of x, 8).
    ///
    /// # Safety
    /// The CPU must have AVX-512 VNNI and VL; the tile must be packed by [`pack_tile`] for
    /// `x`'s width, and `corr` hold x's per-block corrections.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn tile_gemm(
        scales: &[f32],
        quants: &[u8],
        x: &super::QuantizedRows,
        corr: &[i32],
        out: &mut [f32],
    ) {
        let nb = x.cols / QK;
        let m = x.rows();
        let mut i = 0;
        // SAFETY (all): the contract bounds every block index; rows i..i + R exist.
        unsafe {
            while i + 4 <= m {
                rows_tile::<4>(scales, quants, x, corr, i, nb, out);
                i += 4;
            }
            while i < m {
                rows_tile::<1>(scales, quants, x, corr, i, nb, out);
                i += 1;
            }
        }
    }

    /// Rows i..i + R of x against one tile: R accumulators of 8 outputs each.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    unsafe fn rows_tile<const R: usize>(
        scales: &[f32],
        quants: &[u8],
        x: &super::QuantizedRows,
        corr: &[i32],
        i: usize,
        nb: usize,
        out: &mut [f32],
    ) {
        let mut acc = [_mm256_setzero_ps(); R];
        let (qp, yp, dp, cp) = (quants.as_ptr(), x.qs.as_ptr(), x.d.as_ptr(), corr.as_ptr());
        // SAFETY: block b < nb of rows i..i + R and of the tile are within their slices.
        unsafe {
            for b in 0..nb {
                let ws = _mm256_loadu_ps(scales.as_ptr().add(b * 8));
                let g: [__m256i; 8] =
                    std::array::from_fn(|j| _mm256_loadu_si256(qp.add(b * 256 + j * 32).cast()));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let row = i + r;
                    let y = yp.add((row * nb + b) * QK).cast::<i32>();
                    let mut isum = _mm256_set1_epi32(*cp.add(row * nb + b));
                    for (j, &gj) in g.iter().enumerate() {
                        isum = _mm256_dpbusd_epi32(
                            isum,
                            gj,
                            _mm256_set1_epi32(std::ptr::read_unaligned(y.add(j))),
                        );
                    }
                    let s = _mm256_mul_ps(ws, _mm256_set1_ps(*dp.add(row * nb + b)));
                    *acc = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(isum), *acc);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add((i + r) * 8), *acc);
            }
        }
    }

    kernels! {
        dot_q8_0_vnni: "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", 34, quants_q8_0, dot_i8_vnni;
        dot_q8_0_avx2: "avx2,fma,f16c", 34, quants_q8_0, dot_i8_avx2;
        dot_q5_0_vnni: "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", 22, quants_q5_0, dot_i8_vnni;
        dot_q5_0_avx2: "avx2,fma,f16c", 22, quants_q5_0, dot_i8_avx2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// Random weights quantized by candle (ggml's reference quantizers).
    fn weights(format: Format, rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
        use candle_core::quantized::{GgmlDType, QTensor};
        let data: Vec<f32> = (0..rows * cols).map(|_| lcg(seed) * 3.0).collect();
        let t = candle_core::Tensor::from_vec(data, (rows, cols), &candle_core::Device::Cpu).expect("tensor");
        let dtype = match format {
            Format::Q8_0 => GgmlDType::Q8_0,
            Format::Q5_0 => GgmlDType::Q5_0,
        };
        QTensor::quantize(&t, dtype).expect("quantize").data().expect("data").into_owned()
    }

    /// The reference: dequantized weights times dequantized activations, in f64.
    fn reference(format: Format, w: &[u8], rows: usize, x: &QuantizedRows) -> Vec<f64> {
        let nb = x.cols / QK;
        let bytes = format.block_bytes();
        let mut out = Vec::new();
        for i in 0..x.rows() {
            let (d, qs) = x.row(i);
            for r in 0..rows {
                let mut sum = 0f64;
                for b in 0..nb {
                    let block = &w[(r * nb + b) * bytes..][..bytes];
                    let mut q = [0i8; QK];
                    unpack(format, block, &mut q);
                    let dw = f64::from(f16::from_le_bytes([block[0], block[1]]).to_f32());
                    for j in 0..QK {
                        sum += dw * f64::from(q[j]) * f64::from(d[b]) * f64::from(qs[b * QK + j]);
                    }
                }
                out.push(sum);
            }
        }
        out
    }

    #[test]
    fn every_isa_agrees_with_the_reference() {
        let mut seed = 7;
        // Odd and even block counts, one and several activation rows, rows not a multiple of 16.
        for (format, rows, cols, m) in [
            (Format::Q8_0, 37, 640, 1),
            (Format::Q5_0, 70, 96, 3),
            (Format::Q8_0, 5, 32, 2),
            (Format::Q5_0, 33, 2048, 1),
        ] {
            let w = weights(format, rows, cols, &mut seed);
            let xs: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed)).collect();
            let x = QuantizedRows::new(&xs, cols).expect("quantize");
            let want = reference(format, &w, rows, &x);
            for isa in Isa::available() {
                let mut out = vec![0f32; m * rows];
                matmul(format, isa, &w, rows, &x, &mut out).expect("matmul");
                for (k, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    let tol = 1e-4 * (1.0 + want.abs());
                    assert!(
                        (f64::from(got) - want).abs() < tol,
                        "{format:?} {isa:?} output {k}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn dequantize_agrees_with_candle_on_every_isa() {
        use candle_core::quantized::{GgmlDType, QStorage, QTensor};
        let mut seed = 11;
        for (format, dtype) in [(Format::Q8_0, GgmlDType::Q8_0), (Format::Q5_0, GgmlDType::Q5_0)] {
            let w = weights(format, 300, 64, &mut seed);
            let storage =
                QStorage::from_data(w.clone().into(), &candle_core::Device::Cpu, dtype).expect("storage");
            let want = QTensor::new(storage, (300, 64))
                .expect("qtensor")
                .dequantize(&candle_core::Device::Cpu)
                .expect("dequantize")
                .flatten_all()
                .expect("flatten")
                .to_vec1::<f32>()
                .expect("vec");
            for isa in Isa::available() {
                let mut got = vec![0f32; 300 * 64];
                dequantize(format, isa, &w, &mut got).expect("dequantize");
                assert_eq!(got, want, "{format:?} {isa:?}");
            }
        }
    }

    #[test]
    fn attention_agrees_with_a_plain_softmax_on_every_isa() {
        let mut seed = 5;
        for (n_q, hd, len) in [(4, 256, 1000), (2, 24, 1), (1, 40, 129)] {
            let q: Vec<f32> = (0..n_q * hd).map(|_| lcg(&mut seed)).collect();
            let k: Vec<f16> = (0..len * hd).map(|_| f16::from_f32(lcg(&mut seed) * 4.0)).collect();
            let v: Vec<f16> = (0..len * hd).map(|_| f16::from_f32(lcg(&mut seed))).collect();
            let mut want = vec![0f64; n_q * hd];
            for i in 0..n_q {
                let s: Vec<f64> = (0..len)
                    .map(|t| {
                        (0..hd).map(|j| f64::from(q[i * hd + j]) * f64::from(k[t * hd + j].to_f32())).sum()
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = s.iter().map(|x| (x - max).exp()).sum();
                for t in 0..len {
                    let p = (s[t] - max).exp() / total;
                    for j in 0..hd {
                        want[i * hd + j] += p * f64::from(v[t * hd + j].to_f32());
                    }
                }
            }
            for isa in Isa::available() {
                let mut out = vec![0f32; n_q * hd];
                attend(isa, &q, n_q, hd, &k, &v, &mut out).expect("attend");
                for (j, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(got) - want).abs() < 1e-5,
                        "{isa:?} ({n_q}, {hd}, {len}) {j}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_batched_kernel_agrees_with_the_reference() {
        let mut seed = 13;
        for (format, rows, cols, m) in [
            (Format::Q5_0, 37, 640, 9),
            (Format::Q8_0, 16, 64, 4),
            (Format::Q8_0, 3, 32, 1),
            (Format::Q5_0, 64, 96, 7),
        ] {
            let w = weights(format, rows, cols, &mut seed);
            let xs: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed)).collect();
            let x = QuantizedRows::new(&xs, cols).expect("quantize");
            let want = reference(format, &w, rows, &x);
            let mut out = vec![0f32; m * rows];
            match matmul_batched(format, &w, rows, &x, &mut out) {
                None => assert_ne!(Isa::detect(), Isa::Avx512Vnni, "VNNI CPUs must take the batched kernel"),
                Some(result) => {
                    result.expect("matmul");
                    for (k, (&got, &want)) in out.iter().zip(&want).enumerate() {
                        let tol = 1e-4 * (1.0 + want.abs());
                        assert!(
                            (f64::from(got) - want).abs() < tol,
                            "{format:?} output {k}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_activations_match_candle() {
        use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
        let mut seed = 3;
        let mut xs: Vec<f32> = (0..128).map(|_| lcg(&mut seed) * 10.0).collect();
        xs[32..64].fill(0.0); // an all-zero block has scale 0
        let ours = QuantizedRows::new(&xs, 128).expect("quantize");
        let mut theirs = vec![BlockQ8_0::zeros(); 4];
        BlockQ8_0::from_float(&xs, &mut theirs);
        // SAFETY: BlockQ8_0 is a repr(C) struct of 34 bytes (an f16, then 32 i8), no padding.
        let bytes = unsafe { std::slice::from_raw_parts(theirs.as_ptr().cast::<u8>(), 4 * 34) };
        for (b, block) in bytes.chunks_exact(34).enumerate() {
            assert_eq!(ours.d[b], f16::from_le_bytes([block[0], block[1]]).to_f32());
            let mut q = [0i8; QK];
            unpack(Format::Q8_0, block, &mut q);
            assert_eq!(&ours.qs[b * QK..(b + 1) * QK], &q[..]);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(QuantizedRows::new(&[0.0; 40], 40).is_err());
        let x = QuantizedRows::new(&[0.5; 64], 32).expect("quantize");
        let mut out = vec![0f32; 2];
        assert!(matmul(Format::Q8_0, Isa::Scalar, &[0u8; 33], 1, &x, &mut out).is_err());
    }
}
