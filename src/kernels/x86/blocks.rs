//! Block helpers of the x86 kernels: the quants of each 32-value block format, scales, and
//! whole-block dequantization and Q8_0 quantization (the counterparts of the portable code in
//! `kernels/mod.rs` and `kernels/decode.rs`).
//!
//! Every helper carries the target features it needs and is `#[inline]`, so that it inlines
//! into the kernels (which enable a superset); a helper without them would stay an
//! out-of-line call around each intrinsic.

use std::arch::x86_64::*;

use super::*;

/// How far ahead of the block being read the decode kernels prefetch weights: one 4 KiB page.
/// The weights are a memory-mapped file in 4 KiB pages, and the stall measured was at the first
/// load of each new page (the page walk), which the hardware prefetcher does not cross; a
/// prefetch a page ahead starts that walk early. On SmolLM2 (Intel Xeon, 2 threads) decode went
/// from about 80 to 130 tok/s; 1 to 2 KiB ahead gave 90 to 110, 8 KiB 120, 16 KiB 95.
pub(super) const PREFETCH: usize = 4096;

/// Where a kernel reading R rows side by side, at offset `at` of each, prefetches in each row's
/// stream (a hint; past the end of the weights it is dropped, never faulting): a page ahead
/// ([`PREFETCH`]), and past the row's end in the row the next call reads in its place, R rows
/// on. Rows shorter than that page lie one after the other, so a page ahead of each covers the
/// next call's rows already; a longer row (the 1.5B's down projection: 7,350 bytes of Q6_K)
/// would otherwise leave the first page of each of the next call's rows to a stall.
#[inline(always)]
pub(super) fn ahead<const R: usize>(at: usize, row_bytes: usize) -> usize {
    let ahead = at + PREFETCH;
    if row_bytes > PREFETCH && ahead >= row_bytes { ahead + (R - 1) * row_bytes } else { ahead }
}

/// The block's f16 scale times the activation block's scale, in all 8 lanes.
///
/// # Safety
/// `block` must point at a block's two-byte scale.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn scale(block: *const u8, dy: f32) -> __m256 {
    // SAFETY: the caller's contract.
    let bits = unsafe { std::ptr::read_unaligned(block.cast::<u16>()) };
    let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))));
    _mm256_set1_ps(dw * dy)
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn hsum(v: __m256) -> f32 {
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
pub(super) unsafe fn quants_q8_0(block: *const u8) -> __m256i {
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
pub(super) unsafe fn quants_q5_0(block: *const u8) -> __m256i {
    // SAFETY: the caller's contract; the high bits are bytes 2..6.
    let (q, set) = unsafe { five_bits(block.add(2)) };
    // Where the high bit is clear, q - 16 = q | 0xf0 in two's complement.
    _mm256_or_si256(q, _mm256_andnot_si256(set, _mm256_set1_epi8(0xf0u8 as i8)))
}

/// The 32 unsigned values of a Q5_1 block, 0..32.
///
/// # Safety
/// `block` must point at a 24-byte Q5_1 block: scale, minimum, 4 bytes of high bits, 16 of
/// nibbles.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quants_q5_1(block: *const u8) -> __m256i {
    // SAFETY: the caller's contract; the high bits are bytes 4..8.
    let (q, set) = unsafe { five_bits(block.add(4)) };
    _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
}

/// The low nibbles of the 32 values whose 32 high bits are at `p` and 16 bytes of nibbles
/// follow, and a byte mask of the values whose high bit is set.
///
/// # Safety
/// `p` must point at 20 readable bytes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn five_bits(p: *const u8) -> (__m256i, __m256i) {
    // SAFETY: the caller's contract.
    let (qh, nib) = unsafe { (std::ptr::read_unaligned(p.cast::<u32>()), _mm_loadu_si128(p.add(4).cast())) };
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
    (q, _mm256_cmpeq_epi8(bit, _mm256_set1_epi64x(-1)))
}

/// The 32 nibbles of a Q4 block's 16 bytes at `p` as unsigned bytes: values 0..16 from the
/// low nibbles, 16..32 from the high ones.
///
/// # Safety
/// `p` must point at 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller's contract.
    let nib = unsafe { _mm_loadu_si128(p.cast()) };
    let m4 = _mm_set1_epi8(0x0f);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(nib, 4), m4), _mm_and_si128(nib, m4))
}

/// The 32 signed values of a Q4_0 block, q - 8.
///
/// # Safety
/// `block` must point at an 18-byte Q4_0 block.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quants_q4_0(block: *const u8) -> __m256i {
    // SAFETY: the caller's contract; the nibbles are bytes 2..18.
    _mm256_sub_epi8(unsafe { nibbles(block.add(2)) }, _mm256_set1_epi8(8))
}

/// The 32 unsigned values of a Q4_1 block.
///
/// # Safety
/// `block` must point at a 20-byte Q4_1 block.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quants_q4_1(block: *const u8) -> __m256i {
    // SAFETY: the caller's contract; the nibbles are bytes 4..20.
    unsafe { nibbles(block.add(4)) }
}

/// The 32 values of IQ4_NL's table that the 32 nibbles of the 16 bytes at `p` index.
///
/// # Safety
/// `p` must point at 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn iq4_values(p: *const u8) -> __m256i {
    // SAFETY: the table has 16 bytes; `p` is the caller's contract.
    unsafe {
        let table =
            _mm256_broadcastsi128_si256(_mm_loadu_si128(crate::kernels::KVALUES_IQ4NL.as_ptr().cast()));
        _mm256_shuffle_epi8(table, nibbles(p))
    }
}

/// The 32 signed values of an IQ4_NL block (within ±127).
///
/// # Safety
/// `block` must point at an 18-byte IQ4_NL block.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quants_iq4nl(block: *const u8) -> __m256i {
    // SAFETY: the caller's contract; the nibbles are bytes 2..18.
    unsafe { iq4_values(block.add(2)) }
}

/// The six-bit scale `ls` of 32-value block `ib` of the IQ4_XS super-block at `sb`.
///
/// # Safety
/// `sb` must point at an IQ4_XS super-block (IQ4_XS_BYTES); `ib < 8`.
#[inline]
pub(super) unsafe fn iq4xs_scale(sb: *const u8, ib: usize) -> i32 {
    // SAFETY: the caller's contract: scales_h is bytes 2..4, scales_l 4..8.
    let (h, l) = unsafe { (std::ptr::read_unaligned(sb.add(2).cast::<u16>()), *sb.add(4 + ib / 2)) };
    i32::from((l >> (4 * (ib % 2))) & 0xf) | (i32::from((h >> (2 * ib)) & 3) << 4)
}

/// The f16 at `p` as f32.
///
/// # Safety
/// `p` must point at two readable bytes.
#[inline]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller's contract.
    half::f16::from_bits(unsafe { std::ptr::read_unaligned(p.cast::<u16>()) }).to_f32()
}

/// Stores the 32 values `q` times `d` (multiply, then add `m`, not fused, as ggml's
/// dequantizers round) at `dst`.
///
/// # Safety
/// `dst` must point at 32 writable f32s.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn store_block(q: __m256i, d: __m256, m: __m256, dst: *mut f32) {
    let lo = _mm256_castsi256_si128(q);
    let hi = _mm256_extracti128_si256(q, 1);
    for (i, part) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)].into_iter().enumerate() {
        let v = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part))), m);
        // SAFETY: the caller's contract.
        unsafe { _mm256_storeu_ps(dst.add(i * 8), v) };
    }
}

/// Dequantizes whole blocks of `format` into `out` (32 values per block).
///
/// # Safety
/// The CPU must have AVX2 and F16C; `out` must hold 32 values per block of `w`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequantize(format: crate::kernels::Format, w: &[u8], out: &mut [f32]) {
    if format == crate::kernels::Format::Iq4Xs {
        for (sb, dst) in w.chunks_exact(IQ4_XS_BYTES).zip(out.chunks_exact_mut(crate::kernels::format::QK_K))
        {
            // SAFETY: a whole super-block, and 256 values for it (the contract).
            unsafe {
                let d = f16_at(sb.as_ptr());
                for ib in 0..8 {
                    let q = iq4_values(sb.as_ptr().add(8 + 16 * ib));
                    // As ggml rounds: d · (ls - 32) first.
                    let dl = _mm256_set1_ps(d * (iq4xs_scale(sb.as_ptr(), ib) - 32) as f32);
                    store_block(q, dl, _mm256_setzero_ps(), dst.as_mut_ptr().add(ib * QK));
                }
            }
        }
        return;
    }
    let bytes = format.block_bytes();
    for (b, block) in w.chunks_exact(bytes).enumerate() {
        // SAFETY: `block` is one whole block; `out` holds 32 values for it (the contract).
        unsafe {
            let q = match format {
                crate::kernels::Format::Q8_0 => quants_q8_0(block.as_ptr()),
                crate::kernels::Format::Q5_0 => quants_q5_0(block.as_ptr()),
                crate::kernels::Format::Q4_0 => quants_q4_0(block.as_ptr()),
                crate::kernels::Format::Q4_1 => quants_q4_1(block.as_ptr()),
                crate::kernels::Format::Q5_1 => quants_q5_1(block.as_ptr()),
                crate::kernels::Format::Iq4Nl => quants_iq4nl(block.as_ptr()),
                // Handled above, or not here (see the caller).
                _ => _mm256_setzero_si256(),
            };
            let d = scale(block.as_ptr(), 1.0);
            let m = _mm256_set1_ps(if format.has_minimum() { f16_at(block.as_ptr().add(2)) } else { 0.0 });
            store_block(q, d, m, out.as_mut_ptr().add(b * QK));
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
            let m = v.iter().fold(_mm256_setzero_ps(), |m, &v| _mm256_max_ps(m, _mm256_and_ps(v, abs_mask)));
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
