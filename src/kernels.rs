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
    /// The best instruction set this CPU has.
    pub fn detect() -> Isa {
        Self::available()[0]
    }

    /// Every instruction set this CPU can run, best first (tests run them all); detected once.
    pub fn available() -> &'static [Isa] {
        static ISAS: OnceLock<Vec<Isa>> = OnceLock::new();
        ISAS.get_or_init(|| {
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
        })
    }

    /// `self` if this CPU has it, else the portable code: what the kernels actually run.
    fn or_scalar(self) -> Isa {
        if Self::available().contains(&self) { self } else { Isa::Scalar }
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
    /// Quantizes `x`, a row-major (rows, cols) matrix, as ggml's `quantize_row_q8_0_ref` does
    /// (scale `amax / 127` stored as f16, values rounded half away from zero); a batch's rows
    /// are split over the pool. (ggml's AVX2 code rounds half to even instead; against the
    /// reference logits that agreed worse, mean |diff| 0.299 against 0.232 on greedy.json.)
    pub fn new(x: &[f32], cols: usize) -> Result<Self> {
        if cols == 0 || !cols.is_multiple_of(QK) || !x.len().is_multiple_of(cols) {
            bail!("cannot quantize rows of {cols} values (the length must be a multiple of {QK})");
        }
        let mut d = vec![0f32; x.len() / QK];
        let mut qs = vec![0i8; x.len()];
        let isa = Isa::detect();
        let quantize = |x: &[f32], d: &mut [f32], qs: &mut [i8]| match isa {
            // SAFETY: an `Isa` other than Scalar is one this CPU has; the slices hold whole
            // blocks, one scale per 32 values.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Avx2 => unsafe { x86::quantize_q8_0(x, d, qs) },
            _ => {
                for ((values, qs), d) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).zip(d.iter_mut()) {
                    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = amax / 127.0;
                    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                    for (q, &v) in qs.iter_mut().zip(values) {
                        *q = (v * inv).round() as i8;
                    }
                    *d = f16::from_f32(scale).to_f32();
                }
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
    let isa = isa.or_scalar();
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
    let isa = isa.or_scalar();
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

/// Rows of weights per tile of the batched kernel: one 512-bit register of i32 outputs.
const TILE: usize = 16;

/// A weight format the batched kernel reads: the two of [`Format`] and two k-quants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileFormat {
    Q8_0,
    Q5_0,
    /// 256-value super-blocks (144 bytes): f16 d and dmin, 8 six-bit scales and mins, 4-bit
    /// quants; `w = d · sc · q - dmin · m` per 32 values.
    Q4K,
    /// 256-value super-blocks (210 bytes): 4 low and 2 high bits per quant, 16 i8 scales, f16 d;
    /// `w = d · sc · (q - 32)` per 16 values.
    Q6K,
}

impl TileFormat {
    /// (values, bytes) per block.
    fn block(self) -> (usize, usize) {
        match self {
            Self::Q8_0 => (QK, Format::Q8_0.block_bytes()),
            Self::Q5_0 => (QK, Format::Q5_0.block_bytes()),
            Self::Q4K => (256, 144),
            Self::Q6K => (256, 210),
        }
    }

    /// Values per scale: each such sub-block has its own `a` and `c` (see [`matmul_batched`]).
    fn sub(self) -> usize {
        if self == Self::Q6K { 16 } else { 32 }
    }
}

/// Whether this CPU runs [`matmul_batched`]: it needs AVX-512 VNNI. Elsewhere a float GEMM
/// over dequantized weights is the faster way to multiply a batch.
pub fn batched_available() -> bool {
    Isa::detect() == Isa::Avx512Vnni
}

/// `out = x · wᵀ` for many activation rows at once (a prefill batch): like [`matmul`], but
/// on CPUs with AVX-512 VNNI only (see [`batched_available`]; an error elsewhere).
///
/// Every 16 weight rows are first repacked so that 4 consecutive quants of the 16 rows sit
/// side by side as unsigned bytes `u`: one 512-bit `vpdpbusd` of that register with 4
/// activation bytes broadcast then yields 16 outputs' partial sums at once, 64 multiply-adds
/// per instruction, against 16 for an f32 FMA of the same width. (16 rows in 512-bit registers
/// measured 11% faster than 8 in 256-bit ones on Zen 4, which splits 512-bit work in two:
/// the broadcasts and scale arithmetic are shared by twice the rows.) Each format's weights
/// are written `w = a · u - c` per sub-block (Q8_0/Q5_0: u = q + 128, c = 128 · d; Q4_K:
/// c = dmin · m; Q6_K: c = 32 · a), so a sub-block contributes `dy · (a · Σ u·y - c · Σ y)`.
/// The layout idea is llama.cpp's interleaved repacks (and candle's `repack_x86`); the repack
/// is done per call, one tile at a time, so no second copy of the weights lives in memory.
pub fn matmul_batched(
    format: TileFormat,
    w: &[u8],
    rows: usize,
    x: &QuantizedRows,
    out: &mut [f32],
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if batched_available() {
        return batched_vnni(format, w, rows, x, out);
    }
    let _ = (format, w, rows, x, out);
    bail!("internal error: the batched kernel needs AVX-512 VNNI")
}

#[cfg(target_arch = "x86_64")]
fn batched_vnni(format: TileFormat, w: &[u8], rows: usize, x: &QuantizedRows, out: &mut [f32]) -> Result<()> {
    let (values, bytes) = format.block();
    let m = x.rows();
    if !x.cols.is_multiple_of(values) || w.len() != rows * x.cols / values * bytes || out.len() != m * rows {
        bail!(
            "internal error: a ({rows} × {}) {format:?} batched matmul got {} weight bytes",
            x.cols,
            w.len()
        );
    }
    let sub = format.sub();
    let nsub = x.cols / sub;
    // Σ y per activation sub-block, as f32 (exact: at most 32 · 127).
    let ysum: Vec<f32> = x.qs.chunks_exact(sub).map(|b| b.iter().map(|&q| f32::from(q)).sum()).collect();
    let row_bytes = x.cols / values * bytes;
    let tiles = rows.div_ceil(TILE);
    let out_ptr = SendPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(tiles, |range| {
        // One tile at a time: repacked, then run against every row of x.
        let mut a = vec![0f32; nsub * TILE];
        let mut c = vec![0f32; nsub * TILE];
        let mut quants = vec![0u8; x.cols * TILE];
        let mut tile_out = vec![0f32; m * TILE];
        for t in range {
            let r0 = t * TILE;
            let n = TILE.min(rows - r0);
            // SAFETY: the CPU has AVX-512 VNNI (checked by the caller), which implies AVX2 and
            // F16C here; the slices hold the tile's rows and the buffers its repacked form.
            unsafe {
                x86::pack_tile(
                    format,
                    &w[r0 * row_bytes..(r0 + n) * row_bytes],
                    n,
                    x.cols,
                    &mut a,
                    &mut c,
                    &mut quants,
                );
                x86::tile_gemm(format, &a, &c, &quants, x, &ysum, &mut tile_out);
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
    let isa = isa.or_scalar();
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

/// The geometry of a batch's attention: queries at positions `pos..pos + seq`, keys cached
/// from position `kv_start`, and the layer's sliding window.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub pos: usize,
    pub seq: usize,
    pub kv_start: usize,
    pub window: Option<usize>,
}

/// Causal attention for a batch of queries (prefill): `q` is (seq, n_head, hd), already scaled
/// and rotated; `k` and `v` are (n_kv, kv_len, hd) for positions `kv_start..pos + seq`; the
/// result is (seq, n_head · hd).
///
/// Work items are (head, block of 32 queries), handed out over the pool. Each multiplies its
/// queries only with the keys some of them can see (causal, and within the window), with a
/// single-threaded GEMM from the `gemm` crate (the one candle uses), so masked scores are
/// mostly never computed and no second thread pool competes for the cores.
pub fn attend_batch(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_head: usize,
    n_kv: usize,
    hd: usize,
    span: Span,
) -> Result<Vec<f32>> {
    let Span { pos, seq, kv_start, window } = span;
    let kv_len = pos + seq - kv_start;
    if n_kv == 0
        || !n_head.is_multiple_of(n_kv)
        || q.len() != seq * n_head * hd
        || k.len() != n_kv * kv_len * hd
        || v.len() != k.len()
    {
        bail!("internal error: batch attention over {} queries and {} keys", q.len(), k.len());
    }
    const QB: usize = 32;
    let blocks = seq.div_ceil(QB);
    let n_rep = n_head / n_kv;
    let row = n_head * hd;
    let mut out = vec![0f32; seq * row];
    let out_ptr = SendPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(n_head * blocks, |items| {
        let mut scores = Vec::new();
        for item in items {
            let (h, b) = (item / blocks, item % blocks);
            let g = h / n_rep;
            let (i0, i1) = (b * QB, seq.min((b + 1) * QB));
            // Keys any query of the block sees: up to the last query, from the first query's
            // window start.
            let lo = window.map_or(kv_start, |w| (pos + i0 + 1).saturating_sub(w).max(kv_start));
            let hi = pos + i1;
            let (m, n) = (i1 - i0, hi - lo);
            scores.clear();
            scores.resize(m * n, 0f32);
            let kg = &k[(g * kv_len + lo - kv_start) * hd..];
            let vg = &v[(g * kv_len + lo - kv_start) * hd..];
            // SAFETY: (m, hd) queries of head h times the (hd, n) transposed keys into this
            // item's own (m, n) scores, all within their slices.
            unsafe {
                gemm_one_thread(
                    (m, n, hd),
                    (scores.as_mut_ptr(), n),
                    (q.as_ptr().add(i0 * row + h * hd), row),
                    (kg.as_ptr(), 1, hd),
                )
            };
            for (r, s) in scores.chunks_exact_mut(n).enumerate() {
                let p = pos + i0 + r;
                // Visible keys: lo + t within [p + 1 - window, p].
                let first = window.map_or(0, |w| (p + 1).saturating_sub(w).saturating_sub(lo));
                let last = p + 1 - lo; // exclusive
                let max = s[first..last].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0f32;
                for x in &mut s[first..last] {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                s[..first].fill(0.0);
                s[last..].fill(0.0);
                for x in &mut s[first..last] {
                    *x *= inv;
                }
            }
            // SAFETY: (m, n) probabilities times (n, hd) values into rows i0..i1, columns of
            // head h: disjoint from every other item's output.
            unsafe {
                gemm_one_thread(
                    (m, hd, n),
                    (out_ptr.get().add(i0 * row + h * hd), row),
                    (scores.as_ptr(), n),
                    (vg.as_ptr(), hd, 1),
                )
            };
        }
    });
    Ok(out)
}

/// `dst (m, n) = lhs (m, k) · rhs (k, n)` on the calling thread with the `gemm` crate. `dst` and
/// `lhs` are given with their row stride (their elements within a row are contiguous), `rhs`
/// with its row and column strides.
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
    // SAFETY: the caller's contract. dst = 0 · dst + 1 · lhs · rhs, without reading dst.
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

    /// Quantizes whole 32-value blocks of `x` to Q8_0: `d` gets one scale per block, `qs` the
    /// values.
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `d` must hold `x.len() / 32` values and `qs` `x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_q8_0(x: &[f32], d: &mut [f32], qs: &mut [i8]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (b, values) in x.chunks_exact(QK).enumerate() {
            // SAFETY: block b's 32 values, 32 quants and one scale are within the slices.
            unsafe {
                let p = values.as_ptr();
                let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
                let m =
                    v.iter().fold(_mm256_setzero_ps(), |m, &v| _mm256_max_ps(m, _mm256_and_ps(v, abs_mask)));
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
                let scale = amax / 127.0;
                let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
                let q: [__m256i; 4] = std::array::from_fn(|i| {
                    // Half away from zero: add ±0.5, then truncate.
                    let x = _mm256_mul_ps(v[i], inv);
                    let half = _mm256_or_ps(_mm256_and_ps(x, _mm256_set1_ps(-0.0)), _mm256_set1_ps(0.5));
                    _mm256_cvttps_epi32(_mm256_add_ps(x, half))
                });
                // i32 -> i16 -> i8 packs interleave the 128-bit lanes; a final permute restores
                // the order.
                let q16 = (_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
                let q8 = _mm256_packs_epi16(q16.0, q16.1);
                let q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(qs.as_mut_ptr().add(b * QK).cast(), q8);
                *d.get_unchecked_mut(b) = half::f16::from_f32(scale).to_f32();
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

    /// The 32 quants of values 32·k..32·k + 32 of one row of `format`, as the unsigned bytes of
    /// [`super::matmul_batched`], and the (a, c) of their one or two sub-blocks.
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `row` must point at a whole row holding slice k.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_slice(format: super::TileFormat, row: *const u8, k: usize) -> (__m256i, [(f32, f32); 2]) {
        use super::TileFormat as F;
        let f16 = |p: *const u8| {
            // SAFETY: p points at an f16 inside the row (the caller's contract).
            half::f16::from_bits(unsafe { std::ptr::read_unaligned(p.cast::<u16>()) }).to_f32()
        };
        let flip = _mm256_set1_epi8(0x80u8 as i8);
        let m4 = _mm256_set1_epi8(0x0f);
        // SAFETY: every read is inside the block that holds slice k (the contract).
        unsafe {
            match format {
                F::Q8_0 | F::Q5_0 => {
                    let block = row.add(k * format.block().1);
                    let q = if format == F::Q8_0 { quants_q8_0(block) } else { quants_q5_0(block) };
                    let d = f16(block);
                    (_mm256_xor_si256(q, flip), [(d, 128.0 * d); 2])
                }
                F::Q4K => {
                    let block = row.add(k / 8 * 144);
                    let j = k % 8;
                    let (d, dmin, sc) = (f16(block), f16(block.add(2)), block.add(4));
                    let s = |i: usize| *sc.add(i);
                    let (scale, min) = if j < 4 {
                        (s(j) & 63, s(j + 4) & 63)
                    } else {
                        ((s(j + 4) & 0xf) | ((s(j - 4) >> 6) << 4), (s(j + 4) >> 4) | ((s(j) >> 6) << 4))
                    };
                    let qs = _mm256_loadu_si256(block.add(16 + 32 * (j / 2)).cast());
                    let q = if j.is_multiple_of(2) { qs } else { _mm256_srli_epi16(qs, 4) };
                    let ac = (d * f32::from(scale), dmin * f32::from(min));
                    (_mm256_and_si256(q, m4), [ac; 2])
                }
                F::Q6K => {
                    // ggml's layout: per 128-value half n, value 32·qd + l (qd < 4, l < 32) has
                    // low bits from ql[64n + 32·(qd & 1) + l] (low nibble for qd < 2, else high)
                    // and high bits (qh[32n + l] >> 2·qd) & 3; scale sc[8n + 2·qd + l / 16].
                    let block = row.add(k / 8 * 210);
                    let (n, qd) = ((k % 8) / 4, k % 4);
                    let ql = _mm256_loadu_si256(block.add(64 * n + 32 * (qd & 1)).cast());
                    let lo = if qd < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
                    let qh = _mm256_loadu_si256(block.add(128 + 32 * n).cast());
                    let hi = match qd {
                        0 => qh,
                        1 => _mm256_srli_epi16(qh, 2),
                        2 => _mm256_srli_epi16(qh, 4),
                        _ => _mm256_srli_epi16(qh, 6),
                    };
                    let hi = _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(3)), 4);
                    let q = _mm256_or_si256(_mm256_and_si256(lo, m4), hi);
                    let d = f16(block.add(208));
                    let sc = |h: usize| d * f32::from(*block.add(192 + 8 * n + 2 * qd + h).cast::<i8>());
                    let (a0, a1) = (sc(0), sc(1));
                    (q, [(a0, 32.0 * a0), (a1, 32.0 * a1)])
                }
            }
        }
    }

    /// Repacks `n` (at most 16) weight rows of `cols` values into the tile layout of
    /// [`tile_gemm`]: per 32 values, 8 groups of 64 bytes, group j holding quants 4j..4j + 4 of
    /// rows 0..16; per sub-block, the rows' `a` and `c`. Missing rows have a = c = 0.
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `w` must hold `n` rows of `cols` values in `format`,
    /// `a` and `c` `cols / sub · 16` values each and `quants` `cols · 16` bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn pack_tile(
        format: super::TileFormat,
        w: &[u8],
        n: usize,
        cols: usize,
        a: &mut [f32],
        c: &mut [f32],
        quants: &mut [u8],
    ) {
        let (values, bytes) = format.block();
        let row_bytes = cols / values * bytes;
        let per_slice = 32 / format.sub();
        a.fill(0.0);
        c.fill(0.0);
        for k in 0..cols / 32 {
            for half in 0..2 {
                let mut r = [_mm256_setzero_si256(); 8];
                for (i, reg) in r.iter_mut().enumerate() {
                    let row = half * 8 + i;
                    if row >= n {
                        break;
                    }
                    // SAFETY: row `row` lies within `w` (the contract).
                    let (q, ac) = unsafe { tile_slice(format, w.as_ptr().add(row * row_bytes), k) };
                    *reg = q;
                    for (h, &(ah, ch)) in ac.iter().enumerate().take(per_slice) {
                        a[(k * per_slice + h) * 16 + row] = ah;
                        c[(k * per_slice + h) * 16 + row] = ch;
                    }
                }
                // An 8 × 8 transpose of 32-bit elements: element j of row i becomes element i
                // of group j.
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
                    // SAFETY: slice k's 512 bytes lie within `quants` (the contract); group j
                    // holds rows 0..8 in its first 32 bytes and rows 8..16 in its second.
                    unsafe {
                        _mm256_storeu_si256(quants.as_mut_ptr().add(k * 512 + j * 64 + half * 32).cast(), g)
                    };
                }
            }
        }
    }

    /// One packed tile (16 weight rows) against every row of `x`: `out` is (rows of x, 16).
    ///
    /// # Safety
    /// The CPU must have AVX-512 VNNI and VL; the tile must be packed by [`pack_tile`] for
    /// `x`'s width and `format`, and `ysum` hold x's sums per sub-block.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_gemm(
        format: super::TileFormat,
        a: &[f32],
        c: &[f32],
        quants: &[u8],
        x: &super::QuantizedRows,
        ysum: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: the caller's contract, passed on.
        unsafe {
            if format.sub() == 16 {
                all_rows::<16>(a, c, quants, x, ysum, out);
            } else {
                all_rows::<32>(a, c, quants, x, ysum, out);
            }
        }
    }

    /// Every row of x against one tile, 8 rows per pass, then one at a time.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    unsafe fn all_rows<const SUB: usize>(
        a: &[f32],
        c: &[f32],
        quants: &[u8],
        x: &super::QuantizedRows,
        ysum: &[f32],
        out: &mut [f32],
    ) {
        let m = x.rows();
        let mut i = 0;
        // SAFETY (all): `tile_gemm`'s contract bounds every index; rows i..i + R exist.
        unsafe {
            while i + 8 <= m {
                rows_tile::<8, SUB>(a, c, quants, x, ysum, i, out);
                i += 8;
            }
            while i < m {
                rows_tile::<1, SUB>(a, c, quants, x, ysum, i, out);
                i += 1;
            }
        }
    }

    /// Rows i..i + R of x against one tile, sub-blocks of SUB values: R accumulators of 16
    /// outputs each.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    unsafe fn rows_tile<const R: usize, const SUB: usize>(
        a: &[f32],
        c: &[f32],
        quants: &[u8],
        x: &super::QuantizedRows,
        ysum: &[f32],
        i: usize,
        out: &mut [f32],
    ) {
        let cols = x.cols;
        let nsub = cols / SUB;
        let mut acc = [_mm512_setzero_ps(); R];
        let (qp, yp, dp) = (quants.as_ptr(), x.qs.as_ptr(), x.d.as_ptr());
        // SAFETY: sub-block s < nsub of rows i..i + R and of the tile are within their slices.
        unsafe {
            for s in 0..nsub {
                let (av, cv) =
                    (_mm512_loadu_ps(a.as_ptr().add(s * 16)), _mm512_loadu_ps(c.as_ptr().add(s * 16)));
                let g: [__m512i; 8] = std::array::from_fn(|j| {
                    if j < SUB / 4 {
                        _mm512_loadu_si512(qp.add(s * SUB * 16 + j * 64).cast())
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let row = i + r;
                    let y = yp.add(row * cols + s * SUB).cast::<i32>();
                    let mut isum = _mm512_setzero_si512();
                    for (j, &gj) in g.iter().enumerate().take(SUB / 4) {
                        isum = _mm512_dpbusd_epi32(
                            isum,
                            gj,
                            _mm512_set1_epi32(std::ptr::read_unaligned(y.add(j))),
                        );
                    }
                    let t = _mm512_fnmadd_ps(
                        cv,
                        _mm512_set1_ps(*ysum.get_unchecked(row * nsub + s)),
                        _mm512_mul_ps(av, _mm512_cvtepi32_ps(isum)),
                    );
                    *acc = _mm512_fmadd_ps(t, _mm512_set1_ps(*dp.add((row * cols + s * SUB) / 32)), *acc);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add((i + r) * 16), *acc);
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

    /// Each output within 1e-4 (relative, plus 1e-4 absolute) of the f64 reference.
    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: output length");
        for (k, (&got, &want)) in got.iter().zip(want).enumerate() {
            let tol = 1e-4 * (1.0 + want.abs());
            assert!((f64::from(got) - want).abs() < tol, "{what} output {k}: {got} vs {want}");
        }
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
            for &isa in Isa::available() {
                let mut out = vec![0f32; m * rows];
                matmul(format, isa, &w, rows, &x, &mut out).expect("matmul");
                assert_close(&out, &want, &format!("{format:?} {isa:?}"));
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
            for &isa in Isa::available() {
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
            for &isa in Isa::available() {
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
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let mut seed = 13;
        for (format, dtype, rows, cols, m) in [
            (TileFormat::Q5_0, GgmlDType::Q5_0, 37, 640, 9),
            (TileFormat::Q8_0, GgmlDType::Q8_0, 16, 64, 4),
            (TileFormat::Q8_0, GgmlDType::Q8_0, 3, 32, 1),
            (TileFormat::Q5_0, GgmlDType::Q5_0, 64, 96, 7),
            (TileFormat::Q4K, GgmlDType::Q4K, 21, 512, 10),
            (TileFormat::Q6K, GgmlDType::Q6K, 19, 768, 9),
        ] {
            let data: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed) * 3.0).collect();
            let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("tensor");
            let q = QTensor::quantize(&t, dtype).expect("quantize");
            let w = q.data().expect("data").into_owned();
            let wf = q
                .dequantize(&Device::Cpu)
                .expect("dq")
                .flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("v");
            let xs: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed)).collect();
            let x = QuantizedRows::new(&xs, cols).expect("quantize");
            let mut want = Vec::new();
            for i in 0..m {
                let (d, qs) = x.row(i);
                for r in 0..rows {
                    let dot: f64 = (0..cols)
                        .map(|j| f64::from(wf[r * cols + j]) * f64::from(d[j / QK]) * f64::from(qs[j]))
                        .sum();
                    want.push(dot);
                }
            }
            let mut out = vec![0f32; m * rows];
            let result = matmul_batched(format, &w, rows, &x, &mut out);
            if batched_available() {
                result.expect("matmul");
                assert_close(&out, &want, &format!("{format:?}"));
            } else {
                assert!(result.is_err(), "without VNNI the batched kernel must refuse");
            }
        }
    }

    #[test]
    fn batch_attention_agrees_with_a_masked_softmax() {
        let mut seed = 17;
        // (n_head, n_kv, hd, pos, seq, kv_start, window): from the start, after a prefix, and
        // with a window that cuts into the batch.
        for (n_head, n_kv, hd, pos, seq, kv_start, window) in
            [(4, 1, 16, 0, 70, 0, None), (2, 2, 8, 5, 40, 0, None), (4, 2, 8, 30, 45, 21, Some(10))]
        {
            let kv_len = pos + seq - kv_start;
            let q: Vec<f32> = (0..seq * n_head * hd).map(|_| lcg(&mut seed)).collect();
            let k: Vec<f32> = (0..n_kv * kv_len * hd).map(|_| lcg(&mut seed) * 3.0).collect();
            let v: Vec<f32> = (0..n_kv * kv_len * hd).map(|_| lcg(&mut seed)).collect();
            let span = Span { pos, seq, kv_start, window };
            let got = attend_batch(&q, &k, &v, n_head, n_kv, hd, span).expect("attend");
            for i in 0..seq {
                let p = pos + i;
                for h in 0..n_head {
                    let g = h / (n_head / n_kv);
                    let visible: Vec<usize> =
                        (kv_start..=p).filter(|&t| window.is_none_or(|w| p - t < w)).collect();
                    let s: Vec<f64> = visible
                        .iter()
                        .map(|&t| {
                            (0..hd)
                                .map(|d| {
                                    f64::from(q[(i * n_head + h) * hd + d])
                                        * f64::from(k[(g * kv_len + t - kv_start) * hd + d])
                                })
                                .sum()
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let total: f64 = s.iter().map(|x| (x - max).exp()).sum();
                    for d in 0..hd {
                        let want: f64 = visible
                            .iter()
                            .zip(&s)
                            .map(|(&t, &x)| {
                                (x - max).exp() / total * f64::from(v[(g * kv_len + t - kv_start) * hd + d])
                            })
                            .sum();
                        let have = f64::from(got[i * n_head * hd + h * hd + d]);
                        assert!((have - want).abs() < 1e-5, "query {i} head {h} dim {d}: {have} vs {want}");
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
        // Exact halves (scale 1): rounded away from zero, as ggml's reference and candle do.
        xs[64..70].copy_from_slice(&[127.0, 2.5, -3.5, 0.5, -0.5, 126.5]);
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
