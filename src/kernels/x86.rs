//! Every helper carries the target features it needs and is `#[inline]`, so that it inlines
//! into the kernels (which enable a superset); a helper without them would stay an
//! out-of-line call around each intrinsic.

use std::arch::x86_64::*;

use super::QK;
use super::format::{IQ4_XS_BYTES, Q4_K_BYTES, Q6_K_BYTES};

/// How far ahead of the block being read the decode kernels prefetch weights: one 4 KiB page.
/// The weights are a memory-mapped file in 4 KiB pages, and the stall measured was at the first
/// load of each new page (the page walk), which the hardware prefetcher does not cross; a
/// prefetch a page ahead starts that walk early. On SmolLM2 (Intel Xeon, 2 threads) decode went
/// from about 80 to 130 tok/s; 1 to 2 KiB ahead gave 90 to 110, 8 KiB 120, 16 KiB 95.
pub(super) const PREFETCH: usize = 4096;

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
unsafe fn quants_q5_1(block: *const u8) -> __m256i {
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
unsafe fn quants_q4_0(block: *const u8) -> __m256i {
    // SAFETY: the caller's contract; the nibbles are bytes 2..18.
    _mm256_sub_epi8(unsafe { nibbles(block.add(2)) }, _mm256_set1_epi8(8))
}

/// The 32 unsigned values of a Q4_1 block.
///
/// # Safety
/// `block` must point at a 20-byte Q4_1 block.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn quants_q4_1(block: *const u8) -> __m256i {
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
        let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(super::KVALUES_IQ4NL.as_ptr().cast()));
        _mm256_shuffle_epi8(table, nibbles(p))
    }
}

/// The 32 signed values of an IQ4_NL block (within ±127).
///
/// # Safety
/// `block` must point at an 18-byte IQ4_NL block.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn quants_iq4nl(block: *const u8) -> __m256i {
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
unsafe fn store_block(q: __m256i, d: __m256, m: __m256, dst: *mut f32) {
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
pub unsafe fn dequantize(format: super::Format, w: &[u8], out: &mut [f32]) {
    if format == super::Format::Iq4Xs {
        for (sb, dst) in w.chunks_exact(IQ4_XS_BYTES).zip(out.chunks_exact_mut(super::format::QK_K)) {
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
                super::Format::Q8_0 => quants_q8_0(block.as_ptr()),
                super::Format::Q5_0 => quants_q5_0(block.as_ptr()),
                super::Format::Q4_0 => quants_q4_0(block.as_ptr()),
                super::Format::Q4_1 => quants_q4_1(block.as_ptr()),
                super::Format::Q5_1 => quants_q5_1(block.as_ptr()),
                super::Format::Iq4Nl => quants_iq4nl(block.as_ptr()),
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

/// Single-query attention's scores for Q query rows (`q`, Q rows of `hd`, `hd` a multiple
/// of 32) against `n` f16 key rows (`k`, rows of `hd`): `scores[h · stride + t] = q_h · k_t`.
/// 512-bit: each key row is converted once for all Q queries.
///
/// # Safety
/// The CPU must have AVX-512 F; `q` must hold Q rows, `k` n rows, `scores` Q rows of
/// `stride ≥ n`.
#[target_feature(enable = "avx512f")]
pub unsafe fn key_scores_avx512<const Q: usize>(
    q: &[f32],
    hd: usize,
    k: &[half::f16],
    n: usize,
    scores: &mut [f32],
    stride: usize,
) {
    assert!(hd.is_multiple_of(32) && q.len() >= Q * hd && k.len() >= n * hd && n <= stride);
    assert!(scores.len() >= (Q - 1) * stride + n);
    let (pq, pk) = (q.as_ptr(), k.as_ptr());
    // SAFETY: every read is within the asserted lengths.
    unsafe {
        for t in 0..n {
            let kt = pk.add(t * hd);
            let mut acc = [[_mm512_setzero_ps(); 2]; Q];
            for i in (0..hd).step_by(32) {
                let k0 = _mm512_cvtph_ps(_mm256_loadu_si256(kt.add(i).cast()));
                let k1 = _mm512_cvtph_ps(_mm256_loadu_si256(kt.add(i + 16).cast()));
                for (h, acc) in acc.iter_mut().enumerate() {
                    let a = pq.add(h * hd + i);
                    acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(a), k0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(16)), k1, acc[1]);
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                scores[h * stride + t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
            }
        }
    }
}

/// Single-query attention's weighted values for Q rows: `out_h = Σ_t scores[h · stride + t]
/// · v_t` over `n` f16 value rows of `hd` (a multiple of 32), 32 columns at a time with the
/// sums in registers across all positions (each value row is read once per 32 columns, each
/// output written once).
///
/// # Safety
/// The CPU must have AVX-512 F; `v` must hold n rows, `scores` Q rows of `stride ≥ n`, `out`
/// Q rows of `hd`.
#[target_feature(enable = "avx512f")]
pub unsafe fn value_sums_avx512<const Q: usize>(
    scores: &[f32],
    stride: usize,
    hd: usize,
    v: &[half::f16],
    n: usize,
    out: &mut [f32],
) {
    assert!(hd.is_multiple_of(32) && v.len() >= n * hd && n <= stride && out.len() >= Q * hd);
    assert!(scores.len() >= (Q - 1) * stride + n);
    let (pv, ps, po) = (v.as_ptr(), scores.as_ptr(), out.as_mut_ptr());
    // SAFETY: every access is within the asserted lengths.
    unsafe {
        for c in (0..hd).step_by(32) {
            let mut acc = [[_mm512_setzero_ps(); 2]; Q];
            for t in 0..n {
                let vt = pv.add(t * hd + c);
                let v0 = _mm512_cvtph_ps(_mm256_loadu_si256(vt.cast()));
                let v1 = _mm512_cvtph_ps(_mm256_loadu_si256(vt.add(16).cast()));
                for (h, acc) in acc.iter_mut().enumerate() {
                    let p = _mm512_set1_ps(*ps.add(h * stride + t));
                    acc[0] = _mm512_fmadd_ps(p, v0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(p, v1, acc[1]);
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(po.add(h * hd + c), acc[0]);
                _mm512_storeu_ps(po.add(h * hd + c + 16), acc[1]);
            }
        }
    }
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
unsafe fn tile_slice(format: super::Format, row: *const u8, k: usize) -> (__m256i, [(f32, f32); 2]) {
    use super::Format as F;
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
                let block = row.add(k * format.unit().1);
                let q = if format == F::Q8_0 { quants_q8_0(block) } else { quants_q5_0(block) };
                let d = f16(block);
                (_mm256_xor_si256(q, flip), [(d, 128.0 * d); 2])
            }
            // The nibbles are already unsigned: Q4_0's w = d · q - 8d, Q4_1's w = d · q + m.
            F::Q4_0 => {
                let block = row.add(k * format.unit().1);
                let d = f16(block);
                (nibbles(block.add(2)), [(d, 8.0 * d); 2])
            }
            F::Q4_1 | F::Q5_1 => {
                let block = row.add(k * format.unit().1);
                let (d, m) = (f16(block), f16(block.add(2)));
                let q = if format == F::Q4_1 { nibbles(block.add(4)) } else { quants_q5_1(block) };
                (q, [(d, -m); 2])
            }
            F::Q4K => {
                let block = row.add(k / 8 * Q4_K_BYTES);
                let j = k % 8;
                let (d, dmin) = (f16(block), f16(block.add(2)));
                let (scale, min) = super::q4k_scale_min(std::slice::from_raw_parts(block.add(4), 12), j);
                let qs = _mm256_loadu_si256(block.add(16 + 32 * (j / 2)).cast());
                let q = if j.is_multiple_of(2) { qs } else { _mm256_srli_epi16(qs, 4) };
                let ac = (d * f32::from(scale), dmin * f32::from(min));
                (_mm256_and_si256(q, m4), [ac; 2])
            }
            F::Q6K => {
                // ggml's layout: per 128-value half n, value 32·qd + l (qd < 4, l < 32) has
                // low bits from ql[64n + 32·(qd & 1) + l] (low nibble for qd < 2, else high)
                // and high bits (qh[32n + l] >> 2·qd) & 3; scale sc[8n + 2·qd + l / 16].
                let block = row.add(k / 8 * Q6_K_BYTES);
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
            // Not reached: `matmul_batched_group` refuses formats without the tile path.
            _ => (_mm256_setzero_si256(), [(0.0, 0.0); 2]),
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
    format: super::Format,
    w: &[u8],
    n: usize,
    cols: usize,
    a: &mut [f32],
    c: &mut [f32],
    quants: &mut [u8],
) {
    let row_bytes = format.row_bytes(cols);
    let per_slice = 32 / super::tile_sub(format);
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

/// One packed tile (16 weight rows) against every row of `x`: row i of the result goes to
/// `out[i * ld..][..n]` (the tile's columns of a (rows of x, ld) output).
///
/// # Safety
/// The CPU must have AVX-512 VNNI and VL; the tile must be packed by [`pack_tile`] for
/// `x`'s width and `format`, `ysum` hold x's sums per 16 values, `n` ≤ 16, and `out` must be
/// valid for those writes.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile_gemm(
    format: super::Format,
    a: &[f32],
    c: &[f32],
    quants: &[u8],
    x: &super::QuantizedRows,
    ysum: &[f32],
    out: *mut f32,
    ld: usize,
    n: usize,
) {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        if super::tile_sub(format) == 16 {
            all_rows::<16>(a, c, quants, x, ysum, out, ld, n);
        } else {
            all_rows::<32>(a, c, quants, x, ysum, out, ld, n);
        }
    }
}

/// Every row of x against one tile, 8 rows per pass, then one at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn all_rows<const SUB: usize>(
    a: &[f32],
    c: &[f32],
    quants: &[u8],
    x: &super::QuantizedRows,
    ysum: &[f32],
    out: *mut f32,
    ld: usize,
    n: usize,
) {
    let m = x.rows();
    let mask: __mmask16 = if n >= 16 { !0 } else { (1u16 << n) - 1 };
    let mut i = 0;
    // SAFETY: (all) `tile_gemm`'s contract bounds every index; rows i..i + R exist.
    unsafe {
        while i + 8 <= m {
            rows_tile::<8, SUB>(a, c, quants, x, ysum, i, out, ld, mask);
            i += 8;
        }
        while i < m {
            rows_tile::<1, SUB>(a, c, quants, x, ysum, i, out, ld, mask);
            i += 1;
        }
    }
}

/// Rows i..i + R of x against one tile, sub-blocks of SUB values: R accumulators of 16
/// outputs each. The R rows' integer sums are built side by side (one `vpdpbusd` per row per
/// group of 4 quants, rows innermost), so that consecutive instructions are independent:
/// with the rows outermost, each row's chain of dependent `vpdpbusd`s left the unit idle for
/// their latency.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_tile<const R: usize, const SUB: usize>(
    a: &[f32],
    c: &[f32],
    quants: &[u8],
    x: &super::QuantizedRows,
    ysum: &[f32],
    i: usize,
    out: *mut f32,
    ld: usize,
    mask: __mmask16,
) {
    let cols = x.cols;
    let nsub = cols / SUB;
    let mut acc = [_mm512_setzero_ps(); R];
    let (qp, yp, dp, sp) = (quants.as_ptr(), x.qs.as_ptr(), x.d.as_ptr(), ysum.as_ptr());
    // SAFETY: sub-block s < nsub of rows i..i + R and of the tile are within their slices.
    unsafe {
        for s in 0..nsub {
            let (av, cv) = (_mm512_loadu_ps(a.as_ptr().add(s * 16)), _mm512_loadu_ps(c.as_ptr().add(s * 16)));
            let mut isum = [_mm512_setzero_si512(); R];
            for j in 0..SUB / 4 {
                let g = _mm512_loadu_si512(qp.add(s * SUB * 16 + j * 64).cast());
                for (r, isum) in isum.iter_mut().enumerate() {
                    let y = yp.add((i + r) * cols + s * SUB).cast::<i32>();
                    *isum =
                        _mm512_dpbusd_epi32(*isum, g, _mm512_set1_epi32(std::ptr::read_unaligned(y.add(j))));
                }
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let row = i + r;
                let at = (row * cols + s * SUB) / 16;
                let ys = if SUB == 32 { *sp.add(at) + *sp.add(at + 1) } else { *sp.add(at) };
                let t =
                    _mm512_fnmadd_ps(cv, _mm512_set1_ps(ys), _mm512_mul_ps(av, _mm512_cvtepi32_ps(isum[r])));
                *acc = _mm512_fmadd_ps(t, _mm512_set1_ps(*dp.add((row * cols + s * SUB) / 32)), *acc);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add((i + r) * ld), mask, *acc);
        }
    }
}

/// [`tile_gemm`] on CPUs with AVX2 but not AVX-512 VNNI: `vpmaddubsw` and `vpmaddwd` in place
/// of `vpdpbusd`, over each 64-byte group as two 256-bit halves (tile rows 0..8 and 8..16).
///
/// `vpmaddubsw` saturates its pairs at i16, so the bytes must stay small: the unsigned
/// nibbles of Q4_0, Q4_1 and Q4_K (≤ 15) and Q6_K (≤ 63) go in as they are (2 · 63 · 127
/// fits), but Q8_0's and Q5_0's `u = q + 128` would not. Those are turned back into their
/// signed `q` and multiplied as llama.cpp's AVX2 kernels do, `|q|` times `y` with q's sign
/// (2 · 128 · 127 fits), which makes the `c · Σ y` correction vanish.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; otherwise as [`tile_gemm`].
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile_gemm_avx2(
    format: super::Format,
    a: &[f32],
    c: &[f32],
    quants: &[u8],
    x: &super::QuantizedRows,
    ysum: &[f32],
    out: *mut f32,
    ld: usize,
    n: usize,
) {
    use super::Format as F;
    let signed = matches!(format, F::Q8_0 | F::Q5_0);
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match (super::tile_sub(format), signed) {
            (16, false) => all_rows_avx2::<16, false>(a, c, quants, x, ysum, out, ld, n),
            (16, true) => all_rows_avx2::<16, true>(a, c, quants, x, ysum, out, ld, n),
            (_, false) => all_rows_avx2::<32, false>(a, c, quants, x, ysum, out, ld, n),
            (_, true) => all_rows_avx2::<32, true>(a, c, quants, x, ysum, out, ld, n),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn all_rows_avx2<const SUB: usize, const SIGNED: bool>(
    a: &[f32],
    c: &[f32],
    quants: &[u8],
    x: &super::QuantizedRows,
    ysum: &[f32],
    out: *mut f32,
    ld: usize,
    n: usize,
) {
    let m = x.rows();
    let mut i = 0;
    // SAFETY: (all) `tile_gemm_avx2`'s contract bounds every index; rows i..i + R exist.
    unsafe {
        while i + 4 <= m {
            rows_tile_avx2::<4, SUB, SIGNED>(a, c, quants, x, ysum, i, out, ld, n);
            i += 4;
        }
        while i < m {
            rows_tile_avx2::<1, SUB, SIGNED>(a, c, quants, x, ysum, i, out, ld, n);
            i += 1;
        }
    }
}

/// Rows i..i + R of x against one tile, each half of the tile (8 weight rows) in turn.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_tile_avx2<const R: usize, const SUB: usize, const SIGNED: bool>(
    a: &[f32],
    c: &[f32],
    quants: &[u8],
    x: &super::QuantizedRows,
    ysum: &[f32],
    i: usize,
    out: *mut f32,
    ld: usize,
    n: usize,
) {
    let cols = x.cols;
    let nsub = cols / SUB;
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(0x80u8 as i8);
    let (qp, yp, dp, sp) = (quants.as_ptr(), x.qs.as_ptr(), x.d.as_ptr(), ysum.as_ptr());
    // SAFETY: sub-block s < nsub of rows i..i + R and of the tile are within their slices.
    unsafe {
        for half in 0..2 {
            if half * 8 >= n {
                break;
            }
            let mut acc = [_mm256_setzero_ps(); R];
            for s in 0..nsub {
                let av = _mm256_loadu_ps(a.as_ptr().add(s * 16 + half * 8));
                let cv = _mm256_loadu_ps(c.as_ptr().add(s * 16 + half * 8));
                let mut isum = [_mm256_setzero_si256(); R];
                for j in 0..SUB / 4 {
                    let g = _mm256_loadu_si256(qp.add(s * SUB * 16 + j * 64 + half * 32).cast());
                    // Signed formats: q = u - 128, multiplied as |q| and y with q's sign.
                    let (w, q) = if SIGNED {
                        let q = _mm256_xor_si256(g, flip);
                        (_mm256_sign_epi8(q, q), q)
                    } else {
                        (g, g)
                    };
                    for (r, isum) in isum.iter_mut().enumerate() {
                        let y = yp.add((i + r) * cols + s * SUB).cast::<i32>();
                        let mut yv = _mm256_set1_epi32(std::ptr::read_unaligned(y.add(j)));
                        if SIGNED {
                            yv = _mm256_sign_epi8(yv, q);
                        }
                        let pairs = _mm256_maddubs_epi16(w, yv);
                        *isum = _mm256_add_epi32(*isum, _mm256_madd_epi16(pairs, ones));
                    }
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let row = i + r;
                    let scaled = _mm256_mul_ps(av, _mm256_cvtepi32_ps(isum[r]));
                    let t = if SIGNED {
                        scaled
                    } else {
                        let at = (row * cols + s * SUB) / 16;
                        let ys = if SUB == 32 { *sp.add(at) + *sp.add(at + 1) } else { *sp.add(at) };
                        _mm256_fnmadd_ps(cv, _mm256_set1_ps(ys), scaled)
                    };
                    *acc = _mm256_fmadd_ps(t, _mm256_set1_ps(*dp.add((row * cols + s * SUB) / 32)), *acc);
                }
            }
            let valid = (n - half * 8).min(8);
            for (r, acc) in acc.iter().enumerate() {
                let dst = out.add((i + r) * ld + half * 8);
                if valid == 8 {
                    _mm256_storeu_ps(dst, *acc);
                } else {
                    let mut tmp = [0f32; 8];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), *acc);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, valid);
                }
            }
        }
    }
}

/// Float formats as const parameters of the float kernels (one monomorphized loop each).
const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;

/// Eight float weights of format `F` at `p`, widened to f32.
///
/// # Safety
/// `p` must point at 8 readable values (32 bytes for F32, else 16).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<const F: u8>(p: *const u8) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe {
        match F {
            F32 => _mm256_loadu_ps(p.cast()),
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            // bf16 is the upper half of an f32.
            _ => _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())), 16)),
        }
    }
}

/// Bytes per value of format `F`.
const fn float_bytes<const F: u8>() -> usize {
    if F == F32 { 4 } else { 2 }
}

/// Value `i` of format `F` at `p`, widened to f32.
///
/// # Safety
/// `p` must point at `i + 1` readable values.
#[inline]
unsafe fn load1<const F: u8>(p: *const u8, i: usize) -> f32 {
    // SAFETY: the caller's contract.
    unsafe {
        match F {
            F32 => std::ptr::read_unaligned(p.cast::<f32>().add(i)),
            F16 => half::f16::from_bits(std::ptr::read_unaligned(p.cast::<u16>().add(i))).to_f32(),
            _ => f32::from_bits(u32::from(std::ptr::read_unaligned(p.cast::<u16>().add(i))) << 16),
        }
    }
}

/// Four float weight rows `w[r * row_bytes..]` against the f32 activation row `x`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` must hold 4 rows of `row_bytes`, each `x.len()`
/// values of `format`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot4_float(format: super::float::Float, w: &[u8], row_bytes: usize, x: &[f32]) -> [f32; 4] {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match format {
            super::float::Float::F32 => dot4_float_impl::<F32>(w, row_bytes, x),
            super::float::Float::F16 => dot4_float_impl::<F16>(w, row_bytes, x),
            super::float::Float::BF16 => dot4_float_impl::<BF16>(w, row_bytes, x),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_float_impl<const F: u8>(w: &[u8], row_bytes: usize, x: &[f32]) -> [f32; 4] {
    let n = x.len();
    let es = float_bytes::<F>();
    // Two accumulators per row: eight independent FMA chains, enough to cover its latency.
    let (mut acc, mut acc1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut i = 0;
    // SAFETY: (all reads) value i of row r is w[r * row_bytes + i * es..], i < n, r < 4, and
    // x[i] (the contract).
    unsafe {
        while i + 16 <= n {
            let (x0, x1) = (_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(xp.add(i + 8)));
            for r in 0..4 {
                let p = wp.add(r * row_bytes + i * es);
                // One prefetch per 64-byte line, a page ahead (see `PREFETCH`); a hint, never
                // faulting past the end.
                if (i * es).is_multiple_of(64) {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH).cast());
                }
                acc[r] = _mm256_fmadd_ps(load8::<F>(p), x0, acc[r]);
                acc1[r] = _mm256_fmadd_ps(load8::<F>(p.add(8 * es)), x1, acc1[r]);
            }
            i += 16;
        }
        if i + 8 <= n {
            let xv = _mm256_loadu_ps(xp.add(i));
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(load8::<F>(wp.add(r * row_bytes + i * es)), xv, *acc);
            }
            i += 8;
        }
        for r in 0..4 {
            acc[r] = _mm256_add_ps(acc[r], acc1[r]);
        }
        let mut out: [f32; 4] = std::array::from_fn(|r| hsum(acc[r]));
        for j in i..n {
            for (r, o) in out.iter_mut().enumerate() {
                *o += load1::<F>(wp.add(r * row_bytes), j) * *xp.add(j);
            }
        }
        out
    }
}

/// One float weight row against the f32 activation row `x`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` must hold `x.len()` values of `format`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_float(format: super::float::Float, w: &[u8], x: &[f32]) -> f32 {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match format {
            super::float::Float::F32 => dot_float_impl::<F32>(w, x),
            super::float::Float::F16 => dot_float_impl::<F16>(w, x),
            super::float::Float::BF16 => dot_float_impl::<BF16>(w, x),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_float_impl<const F: u8>(w: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let es = float_bytes::<F>();
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut i = 0;
    // SAFETY: (all reads) values i < n of w and x (the contract).
    unsafe {
        while i + 16 <= n {
            _mm_prefetch::<_MM_HINT_T0>(wp.add(i * es).wrapping_add(PREFETCH).cast());
            acc0 = _mm256_fmadd_ps(load8::<F>(wp.add(i * es)), _mm256_loadu_ps(xp.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(load8::<F>(wp.add((i + 8) * es)), _mm256_loadu_ps(xp.add(i + 8)), acc1);
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(load8::<F>(wp.add(i * es)), _mm256_loadu_ps(xp.add(i)), acc0);
            i += 8;
        }
        let mut sum = hsum(_mm256_add_ps(acc0, acc1));
        for j in i..n {
            sum += load1::<F>(wp, j) * *xp.add(j);
        }
        sum
    }
}

/// Widens `out.len()` float values of `format` at `w` to f32.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` must hold `out.len()` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn float_to_f32(format: super::float::Float, w: &[u8], out: &mut [f32]) {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match format {
            super::float::Float::F32 => float_to_f32_impl::<F32>(w, out),
            super::float::Float::F16 => float_to_f32_impl::<F16>(w, out),
            super::float::Float::BF16 => float_to_f32_impl::<BF16>(w, out),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_to_f32_impl<const F: u8>(w: &[u8], out: &mut [f32]) {
    let n = out.len();
    let es = float_bytes::<F>();
    let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    // SAFETY: values i < n of w and out (the contract).
    unsafe {
        while i + 8 <= n {
            _mm256_storeu_ps(op.add(i), load8::<F>(wp.add(i * es)));
            i += 8;
        }
        for j in i..n {
            *op.add(j) = load1::<F>(wp, j);
        }
    }
}
