//! The decode matmul kernels on x86: weight rows (4 per call, or 1 at a matrix's end) against
//! the few activation rows of a decode step (one per sequence), for every block format of
//! [`Format`].
//!
//! Each 32-value weight block is decoded once per call into unsigned quants `u`, scales `s` and
//! a minimum `m`, with `w = s · (u - o) + m` (`o` per format: 128 for Q8_0 and the IQ4 tables,
//! 32 for Q6_K, 16 for Q5_0, 8 for Q4_0, 0 for the formats with a minimum), and multiplied with
//! every activation row while it sits in a register: `Σ w·y = s · (Σ u·y - o · Σ y) + m · Σ y`,
//! the integer part exact. So a decode step of several sequences decodes each weight block once,
//! not once per sequence, which is what made batched decoding compute-bound before.
//!
//! - [`rows_vnni`] (AVX-512 VNNI, 1 to 5 activation rows per call): both blocks of a pair in
//!   one 512-bit `vpdpbusd` (unsigned by signed bytes, as the instruction takes them) starting
//!   from `-o · Σ y`, then the four weight rows' products summed to one integer per block.
//!   [`rows_vnni_k`] is the same for the k-quants, with each super-block's scales and minimums
//!   decoded once per weight row, 8 blocks at a time, and transposed to the four rows'.
//! - [`pairs_vnni`] (AVX-512 VNNI, 6 to 8 activation rows): per weight row and pair of blocks,
//!   each 4-byte group of both blocks spread over 8 lanes each (`vpermd`) against the
//!   activation rows' groups laid out in [`Pairs`], so `vpdpbusd` gives every (block,
//!   activation row)'s product in a lane of its own, with no horizontal sums.
//! - [`lanes_vnni`] (AVX-512 VNNI, 9 to 15 activation rows per pass): one lane per activation
//!   row, the weights broadcast from the file.
//! - [`rows_avx2`]: AVX2 has no `vpdpbusd`; its `vpmaddubsw` adds pairs of products in i16,
//!   which cannot overflow for `u < 64` (2 · 63 · 127 < 32,768) but can for the formats with
//!   `o = 128`, so those take llama.cpp's sign trick instead: `|w| · (y · sign(w))`.
//!
//! On each instruction set, every (weight row, activation row) pair goes through the same
//! operations in the same order whatever the batch and wherever the activation row falls in it
//! (the two VNNI kernels included), so a sequence decoded in a batch gets bit for bit what it
//! gets alone.

use std::arch::x86_64::*;

use super::format::{IQ4_XS_BYTES, Q4_K_BYTES, Q6_K_BYTES};
use super::x86::{PREFETCH, five_bits, hsum, iq4_values, iq4xs_scale, nibbles};
use super::{Format, QK, QuantizedRows};

/// The most activation rows one call of [`rows_vnni`] takes (more go to [`pairs_vnni`] and
/// [`lanes_vnni`]).
pub const MAX_N: usize = 5;

/// The most activation rows one AVX2 call takes: it has 16 vector registers.
pub const MAX_N_AVX2: usize = 2;

/// One decoded 32-value block: `w = s · (u - o) + m`.
#[derive(Clone, Copy)]
struct Block {
    u: __m256i,
    /// The scales of values 0..16 and 16..32: equal but in Q6_K, whose sub-blocks are 16
    /// values.
    s: [f32; 2],
    m: f32,
}

/// A weight format as this kernel reads it.
trait Decode {
    /// The offset `o` (0, 8, 16, 32 or 128).
    const OFFSET: u8;
    /// Whether blocks carry a minimum (then `m` multiplies the activations' block sums).
    const MIN: bool;
    /// Whether the two 16-value halves of a block have scales of their own (Q6_K).
    const SPLIT: bool = false;
    /// Bytes per 32 values, on average (for prefetching).
    const BYTES_PER_BLOCK: usize;
    /// Whether [`Decode::pair`] gives the scales (and minimums) as the f16 values of the file
    /// (`d16`, `m16`), for the kernel to convert four rows' at once.
    const F16: bool = false;

    /// Block `b` of the row at `row`. (Without target features of its own, but always inlined
    /// into the kernels, whose features its intrinsics then get: a decoder with features of its
    /// own was left an out-of-line call, 7% of a batched decode step for Q4_K.)
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; the row must hold block `b`.
    unsafe fn block(row: *const u8, b: usize) -> Block;

    /// Blocks `b` and `b + 1` (b even) for the 512-bit kernel, bit for bit what two
    /// [`Decode::block`] calls give, in fewer operations where the format allows: both blocks'
    /// nibbles split in one 512-bit operation, Q5's fifth bits added under a 64-bit mask, the
    /// k-quants' shared scale fields read once.
    ///
    /// # Safety
    /// As [`Decode::block`] for both blocks, and the CPU must have AVX-512 F and BW (the
    /// method, like `block`, has no target features of its own and is always inlined into
    /// [`rows_vnni`], which has them).
    #[inline(always)]
    unsafe fn pair(row: *const u8, b: usize) -> Pair {
        // SAFETY: the caller's contract.
        let (lo, hi) = unsafe { (Self::block(row, b), Self::block(row, b + 1)) };
        Pair::of(lo, hi)
    }
}

/// Two decoded blocks: `u` holds the first block's quants in its low 256 bits; `s` the
/// scales of (first block's halves, second block's halves), `m` their minimums.
#[derive(Clone, Copy)]
struct Pair {
    u: __m512i,
    s: [f32; 4],
    m: [f32; 2],
    /// For formats with [`Decode::F16`]: the blocks' scales and minimums as stored, in place
    /// of `s` and `m`.
    d16: [u16; 2],
    m16: [u16; 2],
}

impl Pair {
    #[inline(always)]
    fn of(lo: Block, hi: Block) -> Self {
        // SAFETY: only ever inlined into the AVX-512 kernel (see `Decode::pair`).
        let u = unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo.u), hi.u) };
        Self { u, s: [lo.s[0], lo.s[1], hi.s[0], hi.s[1]], m: [lo.m, hi.m], d16: [0; 2], m16: [0; 2] }
    }
}

/// [`flip`] of two blocks' signed values, as one 512-bit vector (`lo` in the low half).
#[inline(always)]
fn flip_pair(lo: __m256i, hi: __m256i) -> __m512i {
    // SAFETY: only ever inlined into the AVX-512 kernel (see `Decode::pair`).
    unsafe {
        _mm512_xor_si512(
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi),
            _mm512_set1_epi8(0x80u8 as i8),
        )
    }
}

/// `x` with 16-bit lane `i` (0..8) set to `v`.
#[inline(always)]
fn insert16(x: __m128i, i: usize, v: u16) -> __m128i {
    let v = i32::from(v);
    // SAFETY: only ever inlined into the AVX-512 kernel (see `Decode::pair`), where the loop
    // that calls it is unrolled and `i` a constant.
    unsafe {
        match i {
            0 => _mm_insert_epi16::<0>(x, v),
            1 => _mm_insert_epi16::<1>(x, v),
            2 => _mm_insert_epi16::<2>(x, v),
            3 => _mm_insert_epi16::<3>(x, v),
            4 => _mm_insert_epi16::<4>(x, v),
            5 => _mm_insert_epi16::<5>(x, v),
            6 => _mm_insert_epi16::<6>(x, v),
            _ => _mm_insert_epi16::<7>(x, v),
        }
    }
}

/// The 32 nibbles of each of two Q4/Q5 blocks (16 bytes at `a`, 16 at `b`) as unsigned bytes,
/// laid out as two [`nibbles`] calls and a 256-bit insert would give.
///
/// # Safety
/// As [`Decode::pair`]; 16 bytes readable at `a` and at `b`.
#[inline(always)]
unsafe fn nibble_pair(a: *const u8, b: *const u8) -> __m512i {
    // SAFETY: the caller's contract.
    unsafe {
        let x = _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(a.cast())),
            _mm_loadu_si128(b.cast()),
        );
        let y = _mm256_srli_epi16::<4>(x);
        // 64-bit lanes: a's low nibbles, a's high nibbles, b's low, b's high.
        let order = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
        let z = _mm512_permutex2var_epi64(_mm512_castsi256_si512(x), order, _mm512_castsi256_si512(y));
        _mm512_and_si512(z, _mm512_set1_epi8(0x0f))
    }
}

/// [`nibble_pair`] plus 16 where the blocks' fifth bits (32-bit fields at `ha` and `hb`) are
/// set: the values of two Q5_0 or Q5_1 blocks.
///
/// # Safety
/// As [`nibble_pair`]; 4 bytes readable at `ha` and at `hb`.
#[inline(always)]
unsafe fn five_bit_pair(a: *const u8, b: *const u8, ha: *const u8, hb: *const u8) -> __m512i {
    // SAFETY: the caller's contract.
    unsafe {
        let q = nibble_pair(a, b);
        let bits = u64::from(std::ptr::read_unaligned(ha.cast::<u32>()))
            | u64::from(std::ptr::read_unaligned(hb.cast::<u32>())) << 32;
        _mm512_mask_add_epi8(q, bits, q, _mm512_set1_epi8(0x10))
    }
}

/// Flips signed bytes to `v + 128` as unsigned.
#[inline]
#[target_feature(enable = "avx2")]
fn flip(v: __m256i) -> __m256i {
    _mm256_xor_si256(v, _mm256_set1_epi8(0x80u8 as i8))
}

/// The 5-bit values of a Q5_0 or Q5_1 block whose high bits start at `p`, unsigned.
///
/// # Safety
/// `p` must point at 20 readable bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn five_bit_values(p: *const u8) -> __m256i {
    // SAFETY: the caller's contract.
    let (q, set) = unsafe { five_bits(p) };
    _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
}

macro_rules! simple_formats {
    ($($t:ident: $format:expr, $offset:expr, $min:expr, |$p:ident| $u:expr, |$a:ident, $b:ident| $pair:expr;)*) => {$(
        struct $t;
        impl Decode for $t {
            const OFFSET: u8 = $offset;
            const MIN: bool = $min;
            const BYTES_PER_BLOCK: usize = $format.unit().1;
            const F16: bool = true;
            #[inline(always)]
            unsafe fn block(row: *const u8, b: usize) -> Block {
                // SAFETY: the block is BYTES_PER_BLOCK bytes at `row + b · BYTES_PER_BLOCK` (the
                // contract).
                unsafe {
                    let $p = row.add(b * Self::BYTES_PER_BLOCK);
                    let m = if $min { f16c_at($p.add(2)) } else { 0.0 };
                    let d = f16c_at($p);
                    Block { u: $u, s: [d, d], m }
                }
            }
            #[inline(always)]
            unsafe fn pair(row: *const u8, b: usize) -> Pair {
                // SAFETY: as `block`, for blocks b and b + 1.
                unsafe {
                    let ($a, $b) = (row.add(b * Self::BYTES_PER_BLOCK), row.add((b + 1) * Self::BYTES_PER_BLOCK));
                    let f16 = |p: *const u8| std::ptr::read_unaligned(p.cast::<u16>());
                    let m16 = if $min { [f16($a.add(2)), f16($b.add(2))] } else { [0; 2] };
                    Pair { u: $pair, s: [0.0; 4], m: [0.0; 2], d16: [f16($a), f16($b)], m16 }
                }
            }
        }
    )*};
}

simple_formats! {
    Q8_0: Format::Q8_0, 128, false, |p| flip(_mm256_loadu_si256(p.add(2).cast())),
        |a, b| flip_pair(_mm256_loadu_si256(a.add(2).cast()), _mm256_loadu_si256(b.add(2).cast()));
    Q5_0: Format::Q5_0, 16, false, |p| five_bit_values(p.add(2)),
        |a, b| five_bit_pair(a.add(6), b.add(6), a.add(2), b.add(2));
    Q4_0: Format::Q4_0, 8, false, |p| nibbles(p.add(2)), |a, b| nibble_pair(a.add(2), b.add(2));
    Q4_1: Format::Q4_1, 0, true, |p| nibbles(p.add(4)), |a, b| nibble_pair(a.add(4), b.add(4));
    Q5_1: Format::Q5_1, 0, true, |p| five_bit_values(p.add(4)),
        |a, b| five_bit_pair(a.add(8), b.add(8), a.add(4), b.add(4));
    Iq4Nl: Format::Iq4Nl, 128, false, |p| flip(iq4_values(p.add(2))),
        |a, b| flip_pair(iq4_values(a.add(2)), iq4_values(b.add(2)));
}

struct Iq4Xs;
impl Decode for Iq4Xs {
    const OFFSET: u8 = 128;
    const MIN: bool = false;
    const BYTES_PER_BLOCK: usize = IQ4_XS_BYTES / 8;
    #[inline(always)]
    unsafe fn block(row: *const u8, b: usize) -> Block {
        // SAFETY: super-block b / 8 is IQ4_XS_BYTES at `row + b / 8 · IQ4_XS_BYTES` (the contract).
        unsafe {
            let (sb, ib) = (row.add(b / 8 * IQ4_XS_BYTES), b % 8);
            // As ggml rounds: d · (ls - 32) first.
            let s = f16c_at(sb) * (iq4xs_scale(sb, ib) - 32) as f32;
            Block { u: flip(iq4_values(sb.add(8 + 16 * ib))), s: [s, s], m: 0.0 }
        }
    }
}

/// Q4_K: super-blocks (Q4_K_BYTES) of 256 values: f16 d and dmin, 12 bytes of six-bit scales and
/// minimums for the 8 blocks, 128 bytes of nibbles (block j: the low or high nibbles of bytes
/// 32 · (j / 2)..); `w = d · sc · q - dmin · mn`.
struct Q4K;
impl Decode for Q4K {
    const OFFSET: u8 = 0;
    const MIN: bool = true;
    const BYTES_PER_BLOCK: usize = Q4_K_BYTES / 8;
    #[inline(always)]
    unsafe fn block(row: *const u8, b: usize) -> Block {
        // SAFETY: super-block b / 8 is Q4_K_BYTES at `row + b / 8 · Q4_K_BYTES` (the contract).
        unsafe {
            let (sb, j) = (row.add(b / 8 * Q4_K_BYTES), b % 8);
            let (sc, mn) = super::q4k_scale_min(std::slice::from_raw_parts(sb.add(4), 12), j);
            let qs = _mm256_loadu_si256(sb.add(16 + 32 * (j / 2)).cast());
            let q = if j.is_multiple_of(2) { qs } else { _mm256_srli_epi16(qs, 4) };
            Block {
                u: _mm256_and_si256(q, _mm256_set1_epi8(0x0f)),
                s: [f16c_at(sb) * f32::from(sc); 2],
                m: -(f16c_at(sb.add(2)) * f32::from(mn)),
            }
        }
    }
}

/// Q6_K: super-blocks (Q6_K_BYTES) of 256 values: 128 bytes of low nibbles, 64 of high bit pairs,
/// 16 i8 scales (one per 16 values), f16 d; `w = d · sc · (q - 32)`. ggml's layout: per
/// 128-value half n, value 32·k + l (k < 4, l < 32) has its low bits from
/// ql[64n + 32·(k & 1) + l] (the low nibble for k < 2, else the high one), its high bits from
/// (qh[32n + l] >> 2k) & 3, and scale sc[8n + 2k + l / 16].
struct Q6K;
impl Decode for Q6K {
    const OFFSET: u8 = 32;
    const MIN: bool = false;
    const SPLIT: bool = true;
    const BYTES_PER_BLOCK: usize = Q6_K_BYTES / 8;
    #[inline(always)]
    unsafe fn block(row: *const u8, b: usize) -> Block {
        // SAFETY: super-block b / 8 is Q6_K_BYTES at `row + b / 8 · Q6_K_BYTES` (the contract).
        unsafe {
            let sb = row.add(b / 8 * Q6_K_BYTES);
            let (n, k) = ((b % 8) / 4, b % 4);
            let ql = _mm256_loadu_si256(sb.add(64 * n + 32 * (k & 1)).cast());
            let lo = if k < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
            let qh = _mm256_loadu_si256(sb.add(128 + 32 * n).cast());
            let hi = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k as i32));
            let hi = _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(3)), 4);
            let u = _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi8(0x0f)), hi);
            let d = f16c_at(sb.add(208));
            let sc = |h: usize| d * f32::from(*sb.add(192 + 8 * n + 2 * k + h).cast::<i8>());
            Block { u, s: [sc(0), sc(1)], m: 0.0 }
        }
    }
}

/// A k-quant: super-blocks of 8 blocks whose scales (and minimums) are packed together, decoded
/// once per super-block and weight row by [`rows_vnni_k`] instead of once per block.
trait SuperBlock: Decode {
    /// Super-block g's scales, block j's halves at 2j and 2j + 1, and minimums, block j's at
    /// j: the values [`Decode::block`] gives, computed the same way.
    ///
    /// # Safety
    /// As [`Decode::pair`], for the super-block's 8 blocks.
    unsafe fn scales(row: *const u8, g: usize) -> (__m512, __m256);

    /// The quants of blocks b and b + 1 (b even), as [`Decode::pair`] gives them.
    ///
    /// # Safety
    /// As [`Decode::pair`].
    unsafe fn quants_pair(row: *const u8, b: usize) -> __m512i;
}

impl SuperBlock for Q4K {
    #[inline(always)]
    unsafe fn scales(row: *const u8, g: usize) -> (__m512, __m256) {
        // SAFETY: super-block g is Q4_K_BYTES at `row + g · Q4_K_BYTES` (the contract); only ever
        // inlined into the AVX-512 kernel.
        unsafe {
            let sb = row.add(g * Q4_K_BYTES);
            // The 12 bytes of six-bit scales and minimums, unpacked four at a time as
            // llama.cpp's `ggml_vec_dot_q4_K_q8_K` does: bytes 0..8 the scales, 8..16 the
            // minimums (as `q4k_scale_min` gives them one by one).
            let word = |i: usize| std::ptr::read_unaligned(sb.add(4 + 4 * i).cast::<u32>());
            let (w0, w1, w2) = (word(0), word(1), word(2));
            const LOW6: u32 = 0x3f3f_3f3f;
            const LOW4: u32 = 0x0f0f_0f0f;
            const LOW2: u32 = 0x0303_0303;
            let sc_lo = w0 & LOW6;
            let sc_hi = (w2 & LOW4) | (((w0 >> 6) & LOW2) << 4);
            let mn_lo = w1 & LOW6;
            let mn_hi = ((w2 >> 4) & LOW4) | (((w1 >> 6) & LOW2) << 4);
            let packed = _mm_set_epi32(mn_hi as i32, mn_lo as i32, sc_hi as i32, sc_lo as i32);
            let sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(packed));
            let mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(packed)));
            let d = _mm256_set1_ps(f16c_at(sb));
            let dmin = _mm256_set1_ps(f16c_at(sb.add(2)));
            let s = _mm256_mul_ps(d, sc);
            // Both halves of a block share its scale.
            let s = _mm512_permutexvar_ps(
                _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0),
                _mm512_castps256_ps512(s),
            );
            (s, _mm256_xor_ps(_mm256_mul_ps(dmin, mn), _mm256_set1_ps(-0.0)))
        }
    }
    #[inline(always)]
    unsafe fn quants_pair(row: *const u8, b: usize) -> __m512i {
        // SAFETY: as `Decode::block`: blocks b and b + 1 are the low and high nibbles of the
        // 32 bytes at 16 + 32 · (b % 8 / 2) of their super-block.
        unsafe {
            let q = _mm256_loadu_si256(row.add(b / 8 * Q4_K_BYTES + 16 + 16 * (b % 8)).cast());
            let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q), _mm256_srli_epi16::<4>(q));
            _mm512_and_si512(both, _mm512_set1_epi8(0x0f))
        }
    }
}

impl SuperBlock for Q6K {
    #[inline(always)]
    unsafe fn scales(row: *const u8, g: usize) -> (__m512, __m256) {
        // SAFETY: super-block g is Q6_K_BYTES at `row + g · Q6_K_BYTES` (the contract), its 16 i8
        // scales at 192; only ever inlined into the AVX-512 kernel.
        unsafe {
            let sb = row.add(g * Q6_K_BYTES);
            let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sb.add(192).cast())));
            (_mm512_mul_ps(_mm512_set1_ps(f16c_at(sb.add(208))), sc), _mm256_setzero_ps())
        }
    }
    #[inline(always)]
    unsafe fn quants_pair(row: *const u8, b: usize) -> __m512i {
        // SAFETY: b is even, so blocks b and b + 1 (k and k + 1) have their low bits in the
        // 64 bytes at 64 · n (low nibbles for k = 0, high for k = 2) and their high bits in the
        // same 32 bytes of qh, shifted by 2k and 2k + 2.
        unsafe {
            let sb = row.add(b / 8 * Q6_K_BYTES);
            let (n, k) = ((b % 8) / 4, b % 4);
            let ql = _mm512_loadu_si512(sb.add(64 * n).cast());
            let lo = if k == 0 { ql } else { _mm512_srli_epi16::<4>(ql) };
            let qh = _mm256_loadu_si256(sb.add(128 + 32 * n).cast());
            let shift = _mm_cvtsi32_si128(2 * k as i32);
            let hi = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_srl_epi16(qh, shift)),
                _mm256_srl_epi16(_mm256_srli_epi16::<2>(qh), shift),
            );
            let hi = _mm512_slli_epi16::<4>(_mm512_and_si512(hi, _mm512_set1_epi8(3)));
            _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi8(0x0f)), hi)
        }
    }
}

/// The activation rows a call reads: per row, its block scales, quants and (for formats with
/// a minimum) block sums.
#[derive(Clone, Copy)]
struct Rows<const N: usize> {
    d: [*const f32; N],
    qs: [*const i8; N],
    sums: [*const f32; N],
}

impl<const N: usize> Rows<N> {
    /// Activation rows `i0..i0 + N` of `x`, with their block sums when `sums` is not empty.
    fn new(x: &QuantizedRows, sums: &[f32], i0: usize) -> Self {
        let nb = x.cols / QK;
        let mut rows =
            Self { d: [std::ptr::null(); N], qs: [std::ptr::null(); N], sums: [std::ptr::null(); N] };
        for i in 0..N {
            let (d, qs) = x.row(i0 + i);
            rows.d[i] = d.as_ptr();
            rows.qs[i] = qs.as_ptr();
            if !sums.is_empty() {
                rows.sums[i] = sums[(i0 + i) * nb..][..nb].as_ptr();
            }
        }
        rows
    }
}

/// A decode kernel: weight rows at `w` (R of them, `row_bytes` apart) against activation rows
/// `i0..i0 + N` of `x`; output (i, r) goes to `out[i · stride + r]`.
pub type RowsFn = unsafe fn(*const u8, usize, &QuantizedRows, &[f32], usize, *mut f32, usize);

/// A many-row kernel: weight rows at `w` (R of them, `row_bytes` apart) against the activation
/// rows laid out in a [`Lanes`]; output (i, r) goes to `out[i · stride + r]`.
pub type LanesFn = unsafe fn(*const u8, usize, &Lanes, *mut f32, usize);

/// The kernels of one format and instruction set: `four[n - 1]` takes 4 weight rows and n
/// activation rows, `one[n - 1]` one weight row; n is at most `max_n`. With VNNI, `lanes`
/// ([4 rows, 1 row]) takes from [`LANES_MIN`] activation rows on.
pub struct Table {
    pub four: [RowsFn; MAX_N],
    pub one: [RowsFn; MAX_N],
    pub max_n: usize,
    pub lanes: Option<[LanesFn; 2]>,
    /// With VNNI, [4 rows, 1 row] for [`PAIRS_MIN`] to [`PAIRS_MAX`] activation rows.
    pub pairs: Option<[PairsFn; 2]>,
}

/// From this many activation rows on, VNNI CPUs take [`lanes_vnni`]. Below, it would leave
/// lanes of its `vpdpbusd`s idle: [`rows_vnni`] at 5 rows was 1.34x faster, and at 7 and 8
/// 1.08x and 1.07x, before [`pairs_vnni`] took those (Gemma 3 270M, 2 threads,
/// `benches/batch_decode`, 3 alternating runs); from 9 on [`lanes_vnni`] is as fast or
/// faster.
pub const LANES_MIN: usize = PAIRS_MAX + 1;

/// The AVX2 kernel (see [`RowsFn`]): per 32-value block and weight row, the block decoded once
/// for the call's N activation rows, 8 lanes of 4 products each; every batch size does the
/// same arithmetic per pair.
///
/// # Safety
/// The CPU must have the features enabled here; `w` must hold R rows of `row_bytes`,
/// each `x.cols` values; `x` rows `i0..i0 + N`; for a format with a minimum `sums`
/// their block sums; `out` must be writable at every (i, r).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<F: Decode, const R: usize, const N: usize>(
    w: *const u8,
    row_bytes: usize,
    x: &QuantizedRows,
    sums: &[f32],
    i0: usize,
    out: *mut f32,
    stride: usize,
) {
    let nb = x.cols / QK;
    let rows = Rows::<N>::new(x, if F::MIN { sums } else { &[] }, i0);
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    // Lane r: the minimum's part of row r's output.
    let mut mins = [_mm_setzero_ps(); N];
    let offset = _mm256_set1_epi8(F::OFFSET as i8);
    // SAFETY: (all reads and writes) within the rows, blocks and outputs of the contract.
    unsafe {
        for b in 0..nb {
            let mut u = [(_mm256_setzero_si256(), _mm256_setzero_si256()); R];
            let mut s = [_mm256_setzero_ps(); R];
            let mut m = [0f32; 4];
            for r in 0..R {
                let row = w.add(r * row_bytes);
                // R streams: prefetch each a page ahead (a hint; past the end of the
                // weights it is dropped, never faulting).
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(b * F::BYTES_PER_BLOCK + PREFETCH).cast());
                let block = F::block(row, b);
                u[r] = prep_avx2::<F>(block.u);
                s[r] = _mm256_set_m128(_mm_set1_ps(block.s[1]), _mm_set1_ps(block.s[0]));
                m[r] = block.m;
            }
            let mv = _mm_loadu_ps(m.as_ptr());
            for i in 0..N {
                let y = _mm256_loadu_si256(rows.qs[i].add(b * QK).cast());
                let dy = _mm256_set1_ps(*rows.d[i].add(b));
                // -o · Σ y per lane of 4 values.
                let neg = if F::OFFSET == 0 {
                    _mm256_setzero_si256()
                } else {
                    _mm256_sub_epi32(_mm256_setzero_si256(), lane_sums_avx2(offset, y))
                };
                for r in 0..R {
                    let p = dot_avx2::<F>(u[r], y, neg);
                    acc[r][i] = _mm256_fmadd_ps(_mm256_mul_ps(s[r], dy), _mm256_cvtepi32_ps(p), acc[r][i]);
                }
                if F::MIN {
                    mins[i] = _mm_add_ps(mins[i], _mm_mul_ps(mv, _mm_set1_ps(*rows.sums[i].add(b))));
                }
            }
        }
        for i in 0..N {
            let mut m = [0f32; 4];
            _mm_storeu_ps(m.as_mut_ptr(), mins[i]);
            for r in 0..R {
                *out.add((i0 + i) * stride + r) = hsum(acc[r][i]) + m[r];
            }
        }
    }
}

/// AVX2: for `o = 128`, (|w|, w) for the sign trick; else the quants as they are.
#[inline]
#[target_feature(enable = "avx2")]
fn prep_avx2<F: Decode>(u: __m256i) -> (__m256i, __m256i) {
    if F::OFFSET == 128 {
        let w = flip(u);
        (_mm256_sign_epi8(w, w), w)
    } else {
        (u, u)
    }
}

/// `neg + Σ u·y` per lane, or for `o = 128` `Σ |w|·(y · sign(w))`.
#[inline]
#[target_feature(enable = "avx2")]
fn dot_avx2<F: Decode>(u: (__m256i, __m256i), y: __m256i, neg: __m256i) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    if F::OFFSET == 128 {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u.0, _mm256_sign_epi8(y, u.1)), ones)
    } else {
        _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(u.0, y), ones), neg)
    }
}

/// `o · Σ y` per lane (`o` at most 32 here: no i16 overflow).
#[inline]
#[target_feature(enable = "avx2")]
fn lane_sums_avx2(offset: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(offset, y), _mm256_set1_epi16(1))
}

/// The f16 at `p` as f32, with F16C.
///
/// # Safety
/// `p` must point at two readable bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16c_at(p: *const u8) -> f32 {
    // SAFETY: the caller's contract.
    let bits = unsafe { std::ptr::read_unaligned(p.cast::<u16>()) };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// The sums of the 4 × 128-bit lanes of four rows' products `q`: lane k of the result holds
/// (row 0, row 1, row 2, row 3)'s sums over 128-bit lane k of their vector. Exact (integers).
#[inline]
#[target_feature(enable = "avx512f")]
fn four_row_sums(q: [__m512i; 4]) -> __m512i {
    let t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(q[0], q[1]), _mm512_unpackhi_epi32(q[0], q[1]));
    let t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(q[2], q[3]), _mm512_unpackhi_epi32(q[2], q[3]));
    _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23))
}

/// The VNNI kernel for a few activation rows (see [`RowsFn`]), with 4 weight rows per call
/// (R = 1 at a matrix's end is done as 4 with the missing rows' results dropped: `R` only
/// says how many are real). Per pair of blocks, each (weight row, activation row) product is
/// one 512-bit `vpdpbusd` (both blocks), the four rows' products are summed to one integer
/// per row and block, and those are scaled four rows at a time.
///
/// The arithmetic per (weight row, activation row) is [`lanes_vnni`]'s exactly: per block,
/// the exact integer `P = Σ w·y` (per 16-value half for Q6_K), then
/// `acc = fma(s · dy, P, acc)` block after block, and `+ Σ m · ys` for formats with a
/// minimum. So the kernel a step takes, which depends on how many sequences it decodes,
/// never changes a sequence's logits.
///
/// # Safety
/// The CPU must have AVX-512 F, VL, BW and VNNI; `w` must hold R rows of `row_bytes`, each
/// `x.cols` values; `x` rows `i0..i0 + N`; for a format with a minimum `sums` their block
/// sums; `out` must be writable at every (i, r).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn rows_vnni<F: Decode, const R: usize, const N: usize>(
    w: *const u8,
    row_bytes: usize,
    x: &QuantizedRows,
    sums: &[f32],
    i0: usize,
    out: *mut f32,
    stride: usize,
) {
    let nb = x.cols / QK;
    let rows = Rows::<N>::new(x, if F::MIN { sums } else { &[] }, i0);
    // Lane r: weight row r's output for activation row i.
    let mut acc = [_mm_setzero_ps(); N];
    let mut mins = [_mm_setzero_ps(); N];
    // SAFETY: (all reads and writes) within the rows, blocks and outputs of the contract; the
    // missing rows of an R < 4 call read row 0 again.
    unsafe {
        let mut b = 0;
        while b < nb {
            let two = b + 1 < nb;
            let mut u = [_mm512_setzero_si512(); 4];
            // Per block of the pair and half: the four rows' scales; and their minimums.
            let mut s = [[0f32; 4]; 4];
            let mut m = [[0f32; 4]; 2];
            // Formats with f16 scales (and minimums): the four rows' raw scales of both blocks,
            // converted in one instruction after the loop.
            let f16 = F::F16 && two;
            let (mut h, mut hm) = (_mm_setzero_si128(), _mm_setzero_si128());
            for r in 0..4 {
                let row = w.add(if r < R { r * row_bytes } else { 0 });
                if r < R {
                    // R streams: prefetch each a page ahead (a hint; past the end of the
                    // weights it is dropped, never faulting).
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(b * F::BYTES_PER_BLOCK + PREFETCH).cast());
                }
                let p = if two {
                    F::pair(row, b)
                } else {
                    Pair::of(F::block(row, b), Block { u: _mm256_setzero_si256(), s: [0.0; 2], m: 0.0 })
                };
                u[r] = p.u;
                if f16 {
                    h = insert16(insert16(h, r, p.d16[0]), r + 4, p.d16[1]);
                    if F::MIN {
                        hm = insert16(insert16(hm, r, p.m16[0]), r + 4, p.m16[1]);
                    }
                } else {
                    (s[0][r], s[1][r], s[2][r], s[3][r]) = (p.s[0], p.s[1], p.s[2], p.s[3]);
                    (m[0][r], m[1][r]) = (p.m[0], p.m[1]);
                }
            }
            let (s, m): ([__m128; 4], [__m128; 2]) = if f16 {
                let v = _mm256_cvtph_ps(h);
                let (lo, hi) = (_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let v = _mm256_cvtph_ps(hm);
                ([lo, lo, hi, hi], [_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)])
            } else {
                (
                    [
                        _mm_loadu_ps(s[0].as_ptr()),
                        _mm_loadu_ps(s[1].as_ptr()),
                        _mm_loadu_ps(s[2].as_ptr()),
                        _mm_loadu_ps(s[3].as_ptr()),
                    ],
                    [_mm_loadu_ps(m[0].as_ptr()), _mm_loadu_ps(m[1].as_ptr())],
                )
            };
            accumulate::<F, N>(&rows, b, two, u, s, m, &mut acc, &mut mins);
            b += 2;
        }
        store_rows::<F, R, N>(&acc, &mins, out, i0, stride);
    }
}

/// Writes the few-row kernels' results: lane r of `acc[i]` (plus `mins[i]` for formats with
/// a minimum) is output (i0 + i, r), for the R real weight rows.
///
/// # Safety
/// `out` must be writable at every (i0 + i) · stride + r.
#[inline(always)]
unsafe fn store_rows<F: Decode, const R: usize, const N: usize>(
    acc: &[__m128; N],
    mins: &[__m128; N],
    out: *mut f32,
    i0: usize,
    stride: usize,
) {
    for i in 0..N {
        // SAFETY: the caller's contract; only ever inlined into the AVX-512 kernels.
        unsafe {
            let v = if F::MIN { _mm_add_ps(acc[i], mins[i]) } else { acc[i] };
            let mut o = [0f32; 4];
            _mm_storeu_ps(o.as_mut_ptr(), v);
            for (r, &o) in o.iter().enumerate().take(R) {
                *out.add((i0 + i) * stride + r) = o;
            }
        }
    }
}

/// 128-bit lane `p` (0..4) of `v`.
#[inline(always)]
fn lane(v: __m512, p: usize) -> __m128 {
    // SAFETY: only ever inlined into the AVX-512 kernel, where the loop that calls it is
    // unrolled and `p` a constant.
    unsafe {
        match p {
            0 => _mm512_castps512_ps128(v),
            1 => _mm512_extractf32x4_ps::<1>(v),
            2 => _mm512_extractf32x4_ps::<2>(v),
            _ => _mm512_extractf32x4_ps::<3>(v),
        }
    }
}

/// [`rows_vnni`] for the k-quants: per super-block, each weight row's 8 blocks' scales and
/// minimums are decoded at once ([`SuperBlock::scales`]) and transposed into per-block vectors
/// of the four rows, in place of a scalar decode per block and row gathered through memory.
/// The arithmetic per (weight row, activation row) is [`rows_vnni`]'s, value for value.
///
/// # Safety
/// As [`rows_vnni`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn rows_vnni_k<F: SuperBlock, const R: usize, const N: usize>(
    w: *const u8,
    row_bytes: usize,
    x: &QuantizedRows,
    sums: &[f32],
    i0: usize,
    out: *mut f32,
    stride: usize,
) {
    let nb = x.cols / QK;
    let rows = Rows::<N>::new(x, if F::MIN { sums } else { &[] }, i0);
    let mut acc = [_mm_setzero_ps(); N];
    let mut mins = [_mm_setzero_ps(); N];
    let row = |r: usize| w.wrapping_add(if r < R { r * row_bytes } else { 0 });
    // SAFETY: (all reads and writes) within the rows, blocks and outputs of the contract (a
    // k-quant row is whole super-blocks); the missing rows of an R < 4 call read row 0 again.
    unsafe {
        for g in 0..nb / 8 {
            let mut sv = [_mm512_setzero_ps(); 4];
            let mut mv = [_mm256_setzero_ps(); 4];
            for r in 0..4 {
                (sv[r], mv[r]) = F::scales(row(r), g);
            }
            // 4 × 4 transposes in each 128-bit lane: lane k of st[c] holds the four rows'
            // value 4k + c, so the pair p's scales are lane p of st[0..4] and its blocks'
            // minimums lane p / 2 of mt[2 · (p % 2)] and mt[2 · (p % 2) + 1].
            let (a, b) = (_mm512_unpacklo_ps(sv[0], sv[1]), _mm512_unpackhi_ps(sv[0], sv[1]));
            let (c, d) = (_mm512_unpacklo_ps(sv[2], sv[3]), _mm512_unpackhi_ps(sv[2], sv[3]));
            let pd = _mm512_castps_pd;
            let st = [
                _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a), pd(c))),
                _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a), pd(c))),
                _mm512_castpd_ps(_mm512_unpacklo_pd(pd(b), pd(d))),
                _mm512_castpd_ps(_mm512_unpackhi_pd(pd(b), pd(d))),
            ];
            let mt = if F::MIN {
                let (a, b) = (_mm256_unpacklo_ps(mv[0], mv[1]), _mm256_unpackhi_ps(mv[0], mv[1]));
                let (c, d) = (_mm256_unpacklo_ps(mv[2], mv[3]), _mm256_unpackhi_ps(mv[2], mv[3]));
                let pd = _mm256_castps_pd;
                [
                    _mm256_castpd_ps(_mm256_unpacklo_pd(pd(a), pd(c))),
                    _mm256_castpd_ps(_mm256_unpackhi_pd(pd(a), pd(c))),
                    _mm256_castpd_ps(_mm256_unpacklo_pd(pd(b), pd(d))),
                    _mm256_castpd_ps(_mm256_unpackhi_pd(pd(b), pd(d))),
                ]
            } else {
                [_mm256_setzero_ps(); 4]
            };
            for p in 0..4 {
                let b = 8 * g + 2 * p;
                let mut u = [_mm512_setzero_si512(); 4];
                for (r, u) in u.iter_mut().enumerate() {
                    if r < R {
                        // R streams: prefetch each a page ahead (a hint; past the end of the
                        // weights it is dropped, never faulting).
                        _mm_prefetch::<_MM_HINT_T0>(
                            row(r).wrapping_add(b * F::BYTES_PER_BLOCK + PREFETCH).cast(),
                        );
                    }
                    *u = F::quants_pair(row(r), b);
                }
                let s = [lane(st[0], p), lane(st[1], p), lane(st[2], p), lane(st[3], p)];
                let half = |v: __m256| {
                    if p < 2 { _mm256_castps256_ps128(v) } else { _mm256_extractf128_ps::<1>(v) }
                };
                let m = [half(mt[2 * (p % 2)]), half(mt[2 * (p % 2) + 1])];
                accumulate::<F, N>(&rows, b, true, u, s, m, &mut acc, &mut mins);
            }
        }
        store_rows::<F, R, N>(&acc, &mins, out, i0, stride);
    }
}

/// One pair of blocks (or a last lone block, `two` false) of the four weight rows, decoded to
/// quants `u`, scales `s` (per block of the pair and half) and minimums `m`, against each of
/// the N activation rows: the part of [`rows_vnni`] every format shares.
///
/// # Safety
/// As [`rows_vnni`], for blocks b and (when `two`) b + 1.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate<F: Decode, const N: usize>(
    rows: &Rows<N>,
    b: usize,
    two: bool,
    u: [__m512i; 4],
    s: [__m128; 4],
    m: [__m128; 2],
    acc: &mut [__m128; N],
    mins: &mut [__m128; N],
) {
    // SAFETY: the caller's contract; only ever inlined into the AVX-512 kernels.
    unsafe {
        let offset = _mm512_set1_epi8(F::OFFSET as i8);
        for i in 0..N {
            // A zero second block when there is none: it adds nothing to the sums.
            let y = if two {
                _mm512_loadu_si512(rows.qs[i].add(b * QK).cast())
            } else {
                _mm512_castsi256_si512(_mm256_loadu_si256(rows.qs[i].add(b * QK).cast()))
            };
            // -o · Σ y per lane of 4 values.
            let neg = if F::OFFSET == 0 {
                _mm512_setzero_si512()
            } else {
                _mm512_sub_epi32(
                    _mm512_setzero_si512(),
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, y),
                )
            };
            let q = [
                _mm512_dpbusd_epi32(neg, u[0], y),
                _mm512_dpbusd_epi32(neg, u[1], y),
                _mm512_dpbusd_epi32(neg, u[2], y),
                _mm512_dpbusd_epi32(neg, u[3], y),
            ];
            // 128-bit lane k: the rows' sums over values 16k..16k + 16 of the pair.
            let h = four_row_sums(q);
            let d = rows.d[i].add(b);
            let ys = if F::MIN { rows.sums[i].add(b) } else { std::ptr::null() };
            for k in 0..2 {
                if k == 1 && !two {
                    break;
                }
                let dy = _mm_set1_ps(*d.add(k));
                let (lo, hi) = if k == 0 {
                    (_mm512_castsi512_si128(h), _mm512_extracti32x4_epi32::<1>(h))
                } else {
                    (_mm512_extracti32x4_epi32::<2>(h), _mm512_extracti32x4_epi32::<3>(h))
                };
                if F::SPLIT {
                    acc[i] = _mm_fmadd_ps(_mm_mul_ps(s[2 * k], dy), _mm_cvtepi32_ps(lo), acc[i]);
                    acc[i] = _mm_fmadd_ps(_mm_mul_ps(s[2 * k + 1], dy), _mm_cvtepi32_ps(hi), acc[i]);
                } else {
                    let p = _mm_add_epi32(lo, hi);
                    acc[i] = _mm_fmadd_ps(_mm_mul_ps(s[2 * k], dy), _mm_cvtepi32_ps(p), acc[i]);
                }
                if F::MIN {
                    mins[i] = _mm_add_ps(mins[i], _mm_mul_ps(m[k], _mm_set1_ps(*ys.add(k))));
                }
            }
        }
    }
}

/// The most activation rows [`pairs_vnni`] takes: 8 lanes per block of a pair.
pub const PAIRS_MAX: usize = 8;

/// From this many activation rows on (to [`PAIRS_MAX`]), VNNI CPUs take [`pairs_vnni`]: one
/// decode step of 6 and 8 sequences 1.09x and 1.25x faster than on [`rows_vnni`] (Gemma 3
/// 270M, 2 threads, `benches/batch_decode`, 4 alternating runs, medians), 5 about 4% slower
/// (the pair kernel's work does not shrink with fewer rows).
pub const PAIRS_MIN: usize = 6;

/// Activation rows `i0..i0 + n` (n ≤ [`PAIRS_MAX`]) laid out for [`pairs_vnni`], per pair of
/// blocks p (blocks 2p and 2p + 1): lane 2i holds row i's block 2p, lane 2i + 1 its block
/// 2p + 1 (zeros past n, and for a lone last block).
pub struct Pairs {
    i0: usize,
    n: usize,
    /// Blocks per row.
    nb: usize,
    /// (pairs, 8) vectors: lane i the 4 signed values of group g of row i's block.
    y: Vec<__m512i>,
    /// (pairs, 2) vectors: the sums of each block's values 0..16 and 16..32, as i32.
    halves: Vec<__m512i>,
    /// (pairs) vectors: the blocks' scales `d`.
    d: Vec<__m512>,
    /// (pairs) vectors: the block sums `d · Σ q` (formats with a minimum).
    sums: Vec<__m512>,
}

impl Pairs {
    /// Lays out activation rows `i0..i0 + n` of `x`; `sums` are their block sums, or empty.
    pub fn new(x: &QuantizedRows, sums: &[f32], i0: usize, n: usize) -> Self {
        debug_assert!(n <= PAIRS_MAX && i0 + n <= x.rows());
        let nb = x.cols / QK;
        let pairs = nb.div_ceil(2);
        let mut bytes = vec![0i8; pairs * 8 * 64];
        let mut halves = vec![0i32; pairs * 2 * 16];
        let mut d = vec![0f32; pairs * 16];
        let mut s = vec![0f32; if sums.is_empty() { 0 } else { pairs * 16 }];
        for i in 0..n {
            let (di, qs) = x.row(i0 + i);
            for b in 0..nb {
                let (p, lane) = (b / 2, 2 * i + b % 2);
                let q = &qs[b * QK..(b + 1) * QK];
                for g in 0..8 {
                    bytes[(p * 8 + g) * 64 + 4 * lane..][..4].copy_from_slice(&q[4 * g..4 * g + 4]);
                }
                for h in 0..2 {
                    halves[(p * 2 + h) * 16 + lane] =
                        q[16 * h..16 * h + 16].iter().map(|&v| i32::from(v)).sum();
                }
                d[p * 16 + lane] = di[b];
                if !s.is_empty() {
                    s[p * 16 + lane] = sums[(i0 + i) * nb + b];
                }
            }
        }
        // SAFETY: the vector types are plain bytes; the chunks are 64 bytes each.
        let load_b = |c: &[i8]| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<__m512i>()) };
        // SAFETY: as `load_b`: 16 i32s are 64 bytes.
        let load_i = |c: &[i32]| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<__m512i>()) };
        // SAFETY: as `load_b`: 16 f32s are 64 bytes.
        let load_f = |c: &[f32]| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<__m512>()) };
        Self {
            i0,
            n,
            nb,
            y: bytes.chunks_exact(64).map(load_b).collect(),
            halves: halves.chunks_exact(16).map(load_i).collect(),
            d: d.chunks_exact(16).map(load_f).collect(),
            sums: s.chunks_exact(16).map(load_f).collect(),
        }
    }
}

/// The activation rows of a decode step laid out for the kernel its batch size takes.
pub enum Layout {
    /// None: the few-row kernels read the rows as they are.
    Rows,
    /// For [`pairs_vnni`].
    Pairs(Pairs),
    /// For [`lanes_vnni`], in chunks of at most [`LANES`] rows.
    Lanes(Vec<Lanes>),
}

/// A pair kernel: weight rows at `w` (R of them, `row_bytes` apart) against the activation
/// rows laid out in a [`Pairs`]; output (i, r) goes to `out[i · stride + r]`.
pub type PairsFn = unsafe fn(*const u8, usize, &Pairs, *mut f32, usize);

/// The VNNI kernel for 6 to 8 activation rows (see [`PairsFn`]): per weight row and pair of
/// blocks, both blocks' quants decoded once into one vector, each 4-byte group of both
/// blocks spread over 8 lanes each (one `vpermd`) and multiplied by `vpdpbusd` with group g of
/// every activation row's two blocks, starting from `-o · Σ y`: 16 exact integer block
/// products per weight row with no horizontal sums, where [`rows_vnni`] sums four rows' lanes
/// per activation row and [`lanes_vnni`] would leave half its lanes idle.
///
/// The arithmetic per (weight row, activation row) is [`rows_vnni`]'s exactly: the exact
/// integer per block (per half for Q6_K), then `acc = fma(s · dy, P, acc)` block after block,
/// and `+ m · ys` per block for formats with a minimum.
///
/// # Safety
/// The CPU must have AVX-512 F, VL, BW and VNNI; `w` must hold R rows of `row_bytes`,
/// each with the blocks `pairs` was laid out for; `out` must be writable at every (i, r).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn pairs_vnni<F: Decode, const R: usize>(
    w: *const u8,
    row_bytes: usize,
    pairs: &Pairs,
    out: *mut f32,
    stride: usize,
) {
    let (np, nb) = (pairs.d.len(), pairs.nb);
    // Lane 2i: activation row i's sum; odd lanes hold what the kernel never reads.
    let mut acc = [_mm512_setzero_ps(); R];
    let mut mins = [_mm512_setzero_ps(); R];
    let o = _mm512_set1_epi32(i32::from(F::OFFSET));
    // Dword g of both blocks side by side: g and 8 + g.
    let interleave = _mm512_set_epi32(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
    // Two f32 as the 64-bit value whose broadcast puts `a` in even lanes, `b` in odd ones.
    let two_f32 = |a: f32, b: f32| {
        _mm512_castsi512_ps(_mm512_set1_epi64(
            ((u64::from(b.to_bits()) << 32) | u64::from(a.to_bits())) as i64,
        ))
    };
    // The odd lanes' values moved to the even lanes.
    let odd = |v: __m512| _mm512_castsi512_ps(_mm512_srli_epi64::<32>(_mm512_castps_si512(v)));
    // SAFETY: (all reads and writes) within the rows, blocks and outputs of the contract.
    unsafe {
        for p in 0..np {
            let b = 2 * p;
            let two = b + 1 < nb;
            let y = &pairs.y[p * 8..p * 8 + 8];
            let dy = pairs.d[p];
            let (h0, h1) = (pairs.halves[2 * p], pairs.halves[2 * p + 1]);
            // -o · Σ y, per half (Q6_K) or per block.
            let neg0 = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_mullo_epi32(o, h0));
            let neg1 = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_mullo_epi32(o, h1));
            let neg = _mm512_add_epi32(neg0, neg1);
            for r in 0..R {
                let row = w.add(r * row_bytes);
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(b * F::BYTES_PER_BLOCK + PREFETCH).cast());
                let pair = if two {
                    F::pair(row, b)
                } else {
                    Pair::of(F::block(row, b), Block { u: _mm256_setzero_si256(), s: [0.0; 2], m: 0.0 })
                };
                // The blocks' scales (per half for Q6_K) and minimums, each pair as one 64-bit
                // broadcast: block b's value in the even lanes, block b + 1's in the odd ones.
                let (s0, s1, m) = if F::F16 && two {
                    let f16_pair = |v: [u16; 2]| {
                        let bits = u32::from(v[0]) | (u32::from(v[1]) << 16);
                        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
                        _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_castps_pd(v)))
                    };
                    let s = f16_pair(pair.d16);
                    (s, s, if F::MIN { f16_pair(pair.m16) } else { _mm512_setzero_ps() })
                } else {
                    (
                        two_f32(pair.s[0], pair.s[2]),
                        two_f32(pair.s[1], pair.s[3]),
                        two_f32(pair.m[0], pair.m[1]),
                    )
                };
                // Group g of both blocks, as one 64-bit broadcast each.
                let mut groups = [0u64; 8];
                _mm512_storeu_si512(groups.as_mut_ptr().cast(), _mm512_permutexvar_epi32(interleave, pair.u));
                // Through memory on purpose: a broadcast from memory is a load, where the
                // compiler's register shuffles for `set1` of a lane would compete with
                // `vpdpbusd` for the shuffle port.
                let groups = std::hint::black_box(&groups);
                let group =
                    |g: usize| _mm512_broadcastq_epi64(_mm_loadl_epi64(groups.as_ptr().add(g).cast()));
                let pf = if F::SPLIT {
                    let (mut lo, mut hi) = (neg0, neg1);
                    for g in 0..4 {
                        lo = _mm512_dpbusd_epi32(lo, group(g), y[g]);
                        hi = _mm512_dpbusd_epi32(hi, group(g + 4), y[g + 4]);
                    }
                    [_mm512_cvtepi32_ps(lo), _mm512_cvtepi32_ps(hi)]
                } else {
                    // Two chains, for instruction-level parallelism; integer sums, so exact in
                    // any order.
                    let (mut a, mut c) = (neg, _mm512_setzero_si512());
                    for g in (0..8).step_by(2) {
                        a = _mm512_dpbusd_epi32(a, group(g), y[g]);
                        c = _mm512_dpbusd_epi32(c, group(g + 1), y[g + 1]);
                    }
                    let p = _mm512_cvtepi32_ps(_mm512_add_epi32(a, c));
                    [p, p]
                };
                let s0 = _mm512_mul_ps(s0, dy);
                if F::SPLIT {
                    let s1 = _mm512_mul_ps(s1, dy);
                    acc[r] = _mm512_fmadd_ps(s0, pf[0], acc[r]);
                    acc[r] = _mm512_fmadd_ps(s1, pf[1], acc[r]);
                    if two {
                        acc[r] = _mm512_fmadd_ps(odd(s0), odd(pf[0]), acc[r]);
                        acc[r] = _mm512_fmadd_ps(odd(s1), odd(pf[1]), acc[r]);
                    }
                } else {
                    acc[r] = _mm512_fmadd_ps(s0, pf[0], acc[r]);
                    if two {
                        acc[r] = _mm512_fmadd_ps(odd(s0), odd(pf[0]), acc[r]);
                    }
                }
                if F::MIN {
                    let m = _mm512_mul_ps(m, pairs.sums[p]);
                    mins[r] = _mm512_add_ps(mins[r], m);
                    if two {
                        mins[r] = _mm512_add_ps(mins[r], odd(m));
                    }
                }
            }
        }
        for r in 0..R {
            let v = if F::MIN { _mm512_add_ps(acc[r], mins[r]) } else { acc[r] };
            let mut o = [0f32; 16];
            _mm512_storeu_ps(o.as_mut_ptr(), v);
            for i in 0..pairs.n {
                *out.add((pairs.i0 + i) * stride + r) = o[2 * i];
            }
        }
    }
}

/// The most activation rows [`lanes_vnni`] takes at once: 16 lanes, one of them for the
/// correction.
pub const LANES: usize = 15;

/// Activation rows `i0..i0 + n` (n ≤ [`LANES`]) laid out for [`lanes_vnni`]: per block and
/// 4-value group g, a 64-byte vector whose lane i holds row i's 4 values plus 128 (unsigned),
/// and whose last lane holds four 128s; per block, the rows' scales and block sums in lanes.
pub struct Lanes {
    i0: usize,
    n: usize,
    /// (blocks, 8) vectors.
    y: Vec<__m512i>,
    /// (blocks) vectors of 16 f32: row i's `d` in lane i.
    d: Vec<__m512>,
    /// (blocks) vectors: row i's block sum `d · Σ q` in lane i (formats with a minimum).
    sums: Vec<__m512>,
}

impl Lanes {
    /// Lays out activation rows `i0..i0 + n` of `x`; `sums` are their block sums, or empty.
    pub fn new(x: &QuantizedRows, sums: &[f32], i0: usize, n: usize) -> Self {
        debug_assert!(n <= LANES && i0 + n <= x.rows());
        let nb = x.cols / QK;
        let mut bytes = vec![0x80u8; nb * 8 * 64];
        let mut d = vec![0f32; nb * 16];
        let mut s = vec![0f32; if sums.is_empty() { 0 } else { nb * 16 }];
        for i in 0..n {
            let (di, qs) = x.row(i0 + i);
            for b in 0..nb {
                for g in 0..8 {
                    for k in 0..4 {
                        bytes[(b * 8 + g) * 64 + 4 * i + k] = (qs[b * QK + 4 * g + k] as u8) ^ 0x80;
                    }
                }
                d[b * 16 + i] = di[b];
                if !s.is_empty() {
                    s[b * 16 + i] = sums[(i0 + i) * nb + b];
                }
            }
        }
        // Lanes past n: zero activations (128 - 128), so they compute nothing; the last lane's
        // 128s stay.
        for v in bytes.chunks_exact_mut(64) {
            v[4 * n..60].fill(0x80);
        }
        // SAFETY: __m512i and __m512 are plain bytes; the chunks are 64 bytes each.
        let load_i = |c: &[u8]| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<__m512i>()) };
        // SAFETY: as `load_i`: 16 f32s are 64 bytes.
        let load_f = |c: &[f32]| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<__m512>()) };
        Self {
            i0,
            n,
            y: bytes.chunks_exact(64).map(load_i).collect(),
            d: d.chunks_exact(16).map(load_f).collect(),
            sums: s.chunks_exact(16).map(load_f).collect(),
        }
    }
}

/// The VNNI kernel for many activation rows: one lane per activation row, R weight rows per
/// call. Per weight block, its 8 groups of 4 signed values are broadcast against the 8 group
/// vectors of [`Lanes`] (`vpdpbusd` with activations + 128 unsigned and weights signed), so
/// each instruction does 4 values for up to 15 rows at once, and the scaling is 3 vector
/// operations per block for all of them; the last lane, 128s, yields `128 · Σ w`, which
/// every lane subtracts. The arithmetic per (weight row, activation row) is [`rows_vnni`]'s.
///
/// # Safety
/// The CPU must have AVX-512 F, VL and VNNI; `w` must hold R rows of `row_bytes`, each as
/// many values as `lanes` has per row; `out` must be writable at (i, r) for the lanes' rows.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn lanes_vnni<F: Decode, const R: usize>(
    w: *const u8,
    row_bytes: usize,
    lanes: &Lanes,
    out: *mut f32,
    stride: usize,
) {
    let nb = lanes.d.len();
    let mut acc = [_mm512_setzero_ps(); R];
    let mut mins = [_mm512_setzero_ps(); R];
    let last = _mm512_set1_epi32(15);
    // SAFETY: (all reads and writes) within the rows, blocks and outputs of the contract.
    unsafe {
        for b in 0..nb {
            let y = &lanes.y[b * 8..b * 8 + 8];
            let dy = lanes.d[b];
            for r in 0..R {
                let row = w.add(r * row_bytes);
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(b * F::BYTES_PER_BLOCK + PREFETCH).cast());
                let block = F::block(row, b);
                let v = match F::OFFSET {
                    0 => block.u,
                    128 => flip(block.u),
                    o => _mm256_sub_epi8(block.u, _mm256_set1_epi8(o as i8)),
                };
                let mut vb = [0i32; 8];
                _mm256_storeu_si256(vb.as_mut_ptr().cast(), v);
                let group = |g: usize| _mm512_set1_epi32(vb[g]);
                let exact =
                    |p: __m512i| _mm512_cvtepi32_ps(_mm512_sub_epi32(p, _mm512_permutexvar_epi32(last, p)));
                let zero = _mm512_setzero_si512();
                if F::SPLIT {
                    // One chain per 16-value half.
                    let (mut lo, mut hi) = (zero, zero);
                    for g in 0..4 {
                        lo = _mm512_dpbusd_epi32(lo, y[g], group(g));
                        hi = _mm512_dpbusd_epi32(hi, y[g + 4], group(g + 4));
                    }
                    acc[r] =
                        _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(block.s[0]), dy), exact(lo), acc[r]);
                    acc[r] =
                        _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(block.s[1]), dy), exact(hi), acc[r]);
                } else {
                    // Two chains, for instruction-level parallelism; integer sums, so exact in
                    // any order.
                    let (mut a, mut c) = (zero, zero);
                    for g in (0..8).step_by(2) {
                        a = _mm512_dpbusd_epi32(a, y[g], group(g));
                        c = _mm512_dpbusd_epi32(c, y[g + 1], group(g + 1));
                    }
                    let p = exact(_mm512_add_epi32(a, c));
                    acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(block.s[0]), dy), p, acc[r]);
                }
                if F::MIN {
                    mins[r] = _mm512_add_ps(mins[r], _mm512_mul_ps(_mm512_set1_ps(block.m), lanes.sums[b]));
                }
            }
        }
        for r in 0..R {
            let v = if F::MIN { _mm512_add_ps(acc[r], mins[r]) } else { acc[r] };
            let mut o = [0f32; 16];
            _mm512_storeu_ps(o.as_mut_ptr(), v);
            for (i, &o) in o.iter().enumerate().take(lanes.n) {
                *out.add((lanes.i0 + i) * stride + r) = o;
            }
        }
    }
}

fn table_of<F: Decode>(vnni: bool) -> Table {
    if vnni {
        Table {
            four: [
                rows_vnni::<F, 4, 1>,
                rows_vnni::<F, 4, 2>,
                rows_vnni::<F, 4, 3>,
                rows_vnni::<F, 4, 4>,
                rows_vnni::<F, 4, 5>,
            ],
            one: [
                rows_vnni::<F, 1, 1>,
                rows_vnni::<F, 1, 2>,
                rows_vnni::<F, 1, 3>,
                rows_vnni::<F, 1, 4>,
                rows_vnni::<F, 1, 5>,
            ],
            max_n: MAX_N,
            lanes: Some([lanes_vnni::<F, 4>, lanes_vnni::<F, 1>]),
            pairs: Some([pairs_vnni::<F, 4>, pairs_vnni::<F, 1>]),
        }
    } else {
        // Entries past `max_n` are never called.
        let (four1, four2): (RowsFn, RowsFn) = (rows_avx2::<F, 4, 1>, rows_avx2::<F, 4, 2>);
        let (one1, one2): (RowsFn, RowsFn) = (rows_avx2::<F, 1, 1>, rows_avx2::<F, 1, 2>);
        Table {
            four: [four1, four2, four2, four2, four2],
            one: [one1, one2, one2, one2, one2],
            max_n: MAX_N_AVX2,
            lanes: None,
            pairs: None,
        }
    }
}

/// [`table_of`] with the k-quants' own few-row kernel on VNNI.
fn table_k<F: SuperBlock>(vnni: bool) -> Table {
    let mut table = table_of::<F>(vnni);
    if vnni {
        table.four = [
            rows_vnni_k::<F, 4, 1>,
            rows_vnni_k::<F, 4, 2>,
            rows_vnni_k::<F, 4, 3>,
            rows_vnni_k::<F, 4, 4>,
            rows_vnni_k::<F, 4, 5>,
        ];
        table.one = [
            rows_vnni_k::<F, 1, 1>,
            rows_vnni_k::<F, 1, 2>,
            rows_vnni_k::<F, 1, 3>,
            rows_vnni_k::<F, 1, 4>,
            rows_vnni_k::<F, 1, 5>,
        ];
    }
    table
}

/// The kernels for `format`: with AVX-512 VNNI when `vnni`, else with AVX2; `None` for a
/// format without int8 decode kernels. The caller must have checked that the CPU has the
/// instruction set.
pub fn table(format: Format, vnni: bool) -> Option<Table> {
    Some(match format {
        Format::Q8_0 => table_of::<Q8_0>(vnni),
        Format::Q5_0 => table_of::<Q5_0>(vnni),
        Format::Q4_0 => table_of::<Q4_0>(vnni),
        Format::Q4_1 => table_of::<Q4_1>(vnni),
        Format::Q5_1 => table_of::<Q5_1>(vnni),
        Format::Iq4Nl => table_of::<Iq4Nl>(vnni),
        Format::Iq4Xs => table_of::<Iq4Xs>(vnni),
        Format::Q4K => table_k::<Q4K>(vnni),
        Format::Q6K => table_k::<Q6K>(vnni),
        Format::F32 | Format::F16 | Format::BF16 | Format::Q2K | Format::Q3K | Format::Q5K => return None,
    })
}
