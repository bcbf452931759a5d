//! Our own matrix-vector kernels for the block formats that carry most of a model's bytes
//! (Q8_0, Q5_0 and Q5_1 in Q4_K_M files of small models, Q4_0 and Q4_1 in the classic formats), used
//! in place in the mapped file when decoding (one to a few activation rows); the int8 batched
//! kernel for prefill; float (F32, F16, BF16) weights in place and the blocked GEMM of
//! prefill elsewhere ([`matmul_row_blocks`]); and attention over the f16 KV cache.
//!
//! Why not candle's: its Q5_0, Q5_1 and Q4_1 dot products have no SIMD path at all (and converting Q5_0 to Q8_0
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

use std::sync::OnceLock;

use anyhow::{Result, bail};
use half::f16;

mod attention;
mod decode;
mod float;
pub mod format;
mod tiles;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use attention::{KvRuns, KvSpan, Span, attend, attend_batch, first_key};
pub use decode::{dequantize, matmul, matmul_group};
pub use float::{float_to_f32, matmul_float, matmul_row_blocks, silu_times};
pub use format::{DecodePath, Format, PrefillPath, QK};
use format::{IQ4_XS_BYTES, Q4_K_BYTES, Q6_K_BYTES};
pub use tiles::{batched_available, matmul_batched, matmul_batched_group};

/// `out` as the kernels' output type: values they may write but need not read. Sound because
/// the kernels write only f32 values, so `out` never holds an uninitialized one.
fn as_uninit(out: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and nothing writes an uninitialized
    // value through the result (see above).
    unsafe { &mut *(std::ptr::from_mut(out) as *mut [std::mem::MaybeUninit<f32>]) }
}

/// One weight matrix of a group matmul ([`matmul_group`], [`matmul_batched_group`]): its
/// format, bytes and number of rows.
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    pub format: Format,
    pub w: &'a [u8],
    pub rows: usize,
}

/// IQ4_NL's and IQ4_XS's 16 values (ggml-common.h's `kvalues_iq4nl`).
pub const KVALUES_IQ4NL: [i8; 16] =
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

impl Format {
    /// The quants of 32-value block `b` of `w` (whole units) and how they scale:
    /// `w_j = s[j / 16] · q_j + m`.
    fn sub_block(self, w: &[u8], b: usize, q: &mut [i8; QK]) -> BlockScale {
        let f16_at = |p: &[u8]| f16::from_le_bytes([p[0], p[1]]).to_f32();
        match self {
            Self::Iq4Xs => {
                let sb = &w[b / 8 * IQ4_XS_BYTES..][..IQ4_XS_BYTES];
                let ib = b % 8;
                let scales_h = u16::from_le_bytes([sb[2], sb[3]]);
                let ls =
                    ((sb[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) | ((((scales_h >> (2 * ib)) & 3) as u8) << 4);
                for (j, &byte) in sb[8 + 16 * ib..][..16].iter().enumerate() {
                    q[j] = KVALUES_IQ4NL[usize::from(byte & 0xf)];
                    q[j + 16] = KVALUES_IQ4NL[usize::from(byte >> 4)];
                }
                // As ggml rounds: d · (ls - 32) first.
                BlockScale::uniform(f16_at(sb) * (i32::from(ls) - 32) as f32, 0.0)
            }
            Self::Q4K => {
                let sb = &w[b / 8 * Q4_K_BYTES..][..Q4_K_BYTES];
                let j = b % 8;
                let (sc, mn) = q4k_scale_min(&sb[4..16], j);
                for (o, &byte) in q.iter_mut().zip(&sb[16 + 32 * (j / 2)..][..32]) {
                    *o = ((byte >> (4 * (j % 2))) & 0xf) as i8;
                }
                // As ggml's dequantizer rounds: d · sc and dmin · mn first.
                BlockScale::uniform(f16_at(sb) * f32::from(sc), -(f16_at(&sb[2..]) * f32::from(mn)))
            }
            Self::Q6K => {
                let sb = &w[b / 8 * Q6_K_BYTES..][..Q6_K_BYTES];
                let (n, k) = ((b % 8) / 4, b % 4);
                let ql = &sb[64 * n + 32 * (k & 1)..][..32];
                let qh = &sb[128 + 32 * n..][..32];
                for (l, o) in q.iter_mut().enumerate() {
                    let lo = if k < 2 { ql[l] & 0xf } else { ql[l] >> 4 };
                    let hi = (qh[l] >> (2 * k)) & 3;
                    *o = (lo | (hi << 4)) as i8 - 32;
                }
                let d = f16_at(&sb[208..]);
                let sc = |h: usize| d * f32::from(sb[192 + 8 * n + 2 * k + h] as i8);
                BlockScale { s: [sc(0), sc(1)], m: 0.0 }
            }
            _ => {
                let bytes = self.block_bytes();
                let block = &w[b * bytes..][..bytes];
                unpack(self, block, q);
                let m = if self.has_minimum() { f16_at(&block[2..]) } else { 0.0 };
                BlockScale::uniform(f16_at(block), m)
            }
        }
    }
}

/// How a block's quants scale: values 0..16 by `s[0]`, 16..32 by `s[1]` (they differ only in
/// Q6_K), plus `m`.
struct BlockScale {
    s: [f32; 2],
    m: f32,
}

impl BlockScale {
    fn uniform(s: f32, m: f32) -> Self {
        Self { s: [s, s], m }
    }
}

/// The six-bit scale and minimum of block `j` (< 8) of a Q4_K super-block, from its 12 bytes
/// of packed scales (ggml's `get_scale_min_k4`).
fn q4k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0xf) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    }
}

/// The instruction set a kernel uses. There is no way to make one but [`Isa::detect`] and
/// [`Isa::available`], so holding an `Isa` proves this CPU runs it: the kernels' `unsafe`
/// calls into `#[target_feature]` code rest on that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isa(Level);

/// The environment variable that caps the instruction set of streamgen's own kernels:
/// `avx512` (the default: the best the CPU has), `avx2` or `portable`. candle's kernels (the
/// k-quant matmuls, the float GEMM) choose their own.
const KERNELS_ENV: &str = crate::env::KERNELS;

/// Checks `STREAMGEN_KERNELS`: an unknown value is an error, not silently the default.
pub fn check_kernels_env() -> anyhow::Result<()> {
    match std::env::var(KERNELS_ENV) {
        Ok(v) if ceiling(&v).is_none() => {
            anyhow::bail!(
                "{KERNELS_ENV}={:?} is not one of avx512, avx2, portable",
                v.escape_debug().to_string()
            )
        }
        _ => Ok(()),
    }
}

fn ceiling(value: &str) -> Option<Level> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "avx512" | "auto" => Some(Level::Avx512Vnni),
        "avx2" => Some(Level::Avx2),
        "portable" | "scalar" => Some(Level::Scalar),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    /// AVX-512 VNNI with VL (Ice Lake, Zen 4 and later).
    Avx512Vnni,
    /// AVX2 with FMA and F16C (Haswell, Zen 1 and later).
    Avx2,
    /// Portable code, any CPU.
    Scalar,
}

impl Level {
    /// Lower is better.
    fn rank(self) -> u8 {
        match self {
            Self::Avx512Vnni => 0,
            Self::Avx2 => 1,
            Self::Scalar => 2,
        }
    }
}

impl Isa {
    /// The best instruction set this CPU has.
    pub fn detect() -> Isa {
        Self::available()[0]
    }

    /// Every instruction set this CPU can run, best first (tests run them all); detected once.
    /// `STREAMGEN_KERNELS` (see [`check_kernels_env`]) can rule out the better ones, to
    /// measure or test the paths other CPUs take.
    pub fn available() -> &'static [Isa] {
        static ISAS: OnceLock<Vec<Isa>> = OnceLock::new();
        ISAS.get_or_init(|| {
            let ceiling =
                std::env::var(KERNELS_ENV).ok().and_then(|v| ceiling(&v)).unwrap_or(Level::Avx512Vnni);
            let mut isas = Self::detected();
            isas.retain(|isa| isa.0.rank() >= ceiling.rank());
            isas
        })
    }

    /// Every instruction set this CPU can run, best first.
    fn detected() -> Vec<Isa> {
        {
            let mut isas = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
                {
                    if std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512vl")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                        && std::arch::is_x86_feature_detected!("avx512vnni")
                    {
                        isas.push(Isa(Level::Avx512Vnni));
                    }
                    isas.push(Isa(Level::Avx2));
                }
            }
            isas.push(Isa(Level::Scalar));
            isas
        }
    }

    /// The portable code, which every CPU runs.
    pub fn scalar() -> Isa {
        Isa(Level::Scalar)
    }

    /// A short name for messages and benchmarks.
    pub fn name(self) -> &'static str {
        match self.0 {
            Level::Avx512Vnni => "AVX-512 VNNI",
            Level::Avx2 => "AVX2",
            Level::Scalar => "portable",
        }
    }
}

/// How many sequences the decode kernels take in one pass at the cost of one (the many-row
/// kernel's lanes), on a CPU that has that kernel (AVX-512 VNNI).
pub fn decode_lanes() -> Option<usize> {
    Isa::detect().decode_lanes()
}

impl Isa {
    /// [`decode_lanes`] for this instruction set.
    pub fn decode_lanes(self) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if self.0 == Level::Avx512Vnni {
            return Some(x86::LANES);
        }
        None
    }
}

/// Activation rows quantized to Q8_0: per block of 32 values, one scale and 32 signed bytes.
pub struct QuantizedRows {
    cols: usize,
    /// (rows, cols / 32): each block's scale, already rounded through f16 as ggml stores it.
    d: Vec<f32>,
    /// (rows, cols)
    qs: Vec<i8>,
    /// (rows, cols / 16): the sum of each 16 quants, which the batched kernel multiplies by the
    /// weights' offsets. Made with the quants, on the pool,
    /// by [`QuantizedRows::for_batched`]; empty otherwise (the decode kernels do not read it).
    sums16: Vec<i32>,
}

impl QuantizedRows {
    /// Quantizes `x`, a row-major (rows, cols) matrix, as ggml's `quantize_row_q8_0_ref` does
    /// (scale `amax / 127` stored as f16, values rounded half away from zero); a batch's rows
    /// are split over the pool. (ggml's AVX2 code rounds half to even instead; against the
    /// reference logits that agreed worse, mean |diff| 0.299 against 0.232 on greedy.json.)
    pub fn new(x: &[f32], cols: usize) -> Result<Self> {
        Self::quantize(x, cols, false)
    }

    /// [`QuantizedRows::new`] for the batched (prefill) kernel: with the sums it reads.
    pub fn for_batched(x: &[f32], cols: usize) -> Result<Self> {
        Self::quantize(x, cols, true)
    }

    fn quantize(x: &[f32], cols: usize, with_sums16: bool) -> Result<Self> {
        if cols == 0 || !cols.is_multiple_of(QK) || !x.len().is_multiple_of(cols) {
            bail!("cannot quantize rows of {cols} values (the length must be a multiple of {QK})");
        }
        let mut d = vec![0f32; x.len() / QK];
        let mut qs = vec![0i8; x.len()];
        let isa = Isa::detect();
        let quantize = |x: &[f32], d: &mut [f32], qs: &mut [i8]| match isa.0 {
            // SAFETY: an `Isa` exists only for instruction sets this CPU has; the slices hold whole
            // blocks, one scale per 32 values.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Vnni | Level::Avx2 => unsafe { x86::quantize_q8_0(x, d, qs) },
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
        let mut sums16 = Vec::new();
        if rows == 1 && !with_sums16 {
            quantize(x, &mut d, &mut qs);
        } else {
            if with_sums16 {
                sums16 = vec![0i32; x.len() / 16];
            }
            let (d_ptr, q_ptr, s_ptr) =
                (SendPtr(d.as_mut_ptr()), SendPtr(qs.as_mut_ptr()), SendPtr(sums16.as_mut_ptr()));
            let nb = cols / QK;
            candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
                // SAFETY: each row range owns its rows of `d`, `qs` and `sums16`, which outlive
                // the call.
                let (d, qs, sums) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(d_ptr.get().add(range.start * nb), range.len() * nb),
                        std::slice::from_raw_parts_mut(
                            q_ptr.get().add(range.start * cols),
                            range.len() * cols,
                        ),
                        if with_sums16 {
                            std::slice::from_raw_parts_mut(
                                s_ptr.get().add(range.start * cols / 16),
                                range.len() * cols / 16,
                            )
                        } else {
                            &mut [][..]
                        },
                    )
                };
                quantize(&x[range.start * cols..range.end * cols], d, qs);
                if with_sums16 {
                    sum16(qs, sums);
                }
            });
        }
        Ok(Self { cols, d, qs, sums16 })
    }

    /// [`QuantizedRows::sums16`], made now if these rows were quantized without them.
    fn sums16(&self) -> std::borrow::Cow<'_, [i32]> {
        if self.sums16.len() == self.qs.len() / 16 {
            std::borrow::Cow::Borrowed(&self.sums16)
        } else {
            let mut sums = vec![0i32; self.qs.len() / 16];
            sum16(&self.qs, &mut sums);
            std::borrow::Cow::Owned(sums)
        }
    }

    fn rows(&self) -> usize {
        self.qs.len() / self.cols
    }

    fn row(&self, i: usize) -> (&[f32], &[i8]) {
        let nb = self.cols / QK;
        (&self.d[i * nb..(i + 1) * nb], &self.qs[i * self.cols..(i + 1) * self.cols])
    }

    /// Each block's scale times the sum of its values, (rows, cols / 32): what a block minimum
    /// (Q4_1) multiplies. ggml keeps the same per block in its Q8_1 activations; here only the
    /// matmuls over Q4_1 weights compute it.
    fn block_sums(&self) -> Vec<f32> {
        self.qs
            .chunks_exact(QK)
            .zip(&self.d)
            .map(|(b, &d)| d * b.iter().map(|&q| i32::from(q)).sum::<i32>() as f32)
            .collect()
    }
}

/// The sum of each 16 of `qs` into `sums`.
fn sum16(qs: &[i8], sums: &mut [i32]) {
    for (s, q) in sums.iter_mut().zip(qs.chunks_exact(16)) {
        *s = q.iter().map(|&v| i32::from(v)).sum::<i32>();
    }
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
// SAFETY: as for `Send`: the threads write disjoint elements, and read none.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer. (A method, so closures capture the whole `SendPtr`, not its field.)
    fn get(self) -> *mut T {
        self.0
    }
}

/// Values per scale in the batched kernel's tiles: each such sub-block has its own `a` and
/// `c` (see [`matmul_batched`]).
fn tile_sub(format: Format) -> usize {
    if format == Format::Q6K { 16 } else { QK }
}

/// The 32 quants of one block (without its scale and minimum): signed, but for Q4_1 in 0..16
/// and for Q5_1 in 0..32.
pub fn unpack(format: Format, block: &[u8], out: &mut [i8; QK]) {
    match format {
        Format::Q8_0 => {
            for (o, &b) in out.iter_mut().zip(&block[2..2 + QK]) {
                *o = b as i8;
            }
        }
        Format::Q5_0 | Format::Q5_1 => {
            // Q5_1 has a minimum before the high bits, and no offset.
            let (at, offset) = if format == Format::Q5_0 { (2, 16) } else { (4, 0) };
            let qh = u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]]);
            // ggml's layout: value j (j < 16) is the low nibble of byte j with high bit j of qh;
            // value j + 16 is the high nibble of byte j with high bit j + 16.
            for j in 0..QK / 2 {
                let b = block[at + 4 + j];
                let lo = (b & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
                let hi = (b >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                out[j] = lo as i8 - offset;
                out[j + 16] = hi as i8 - offset;
            }
        }
        Format::Iq4Nl => {
            for (j, &b) in block[2..18].iter().enumerate() {
                out[j] = KVALUES_IQ4NL[usize::from(b & 0x0f)];
                out[j + 16] = KVALUES_IQ4NL[usize::from(b >> 4)];
            }
        }
        // Super-blocks are read through `Format::sub_block`; the rest have no int8 blocks.
        Format::Iq4Xs
        | Format::Q4K
        | Format::Q6K
        | Format::Q2K
        | Format::Q3K
        | Format::Q5K
        | Format::F32
        | Format::F16
        | Format::BF16 => out.fill(0),
        Format::Q4_0 | Format::Q4_1 => {
            // Value j (j < 16) is the low nibble of byte j, value j + 16 its high nibble.
            let (nibbles, offset) =
                if format == Format::Q4_0 { (&block[2..18], 8) } else { (&block[4..20], 0) };
            for (j, &b) in nibbles.iter().enumerate() {
                out[j] = (b & 0x0f) as i8 - offset;
                out[j + 16] = (b >> 4) as i8 - offset;
            }
        }
    }
}

#[cfg(test)]
mod tests;
