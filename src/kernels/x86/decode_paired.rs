//! The AVX2 decode kernel of 3 and 4 activation rows, [`paired_avx2_k`]: two weight rows side
//! by side in each register, and every activation row in two lanes.
//!
//! Why: the few-row kernel [`rows_avx2_k`] takes at most two activation rows per call, so 3 or
//! 4 rows read the weights twice, and the many-row kernel [`lanes_avx2_k_rows`] spends the same
//! work per weight block for 3 rows as for 8 (its 8 lanes are 8 activation rows). On
//! Qwen2.5-Coder-1.5B (Zen 3, 2 threads, `benches/batch_decode`) a pass of 3 or 4 rows cost
//! 2.0 to 3.2 one-row steps, as much as one of 8: the pass a speculative verification of 2 or
//! 3 proposals needs. Here each 4-byte group of the weights is broadcast for two weight rows at
//! once (lane `2k + j` is weight row j of the pair against activation row k), so the 8 lanes of
//! every `vpmaddubsw` are used with 4 activation rows. (Four weight rows against 2 activation
//! rows the same way measured no faster than [`rows_avx2_k`], so 2 rows stay there.)
//!
//! The arithmetic per (weight row, activation row) is the other kernels' exactly: per block the
//! exact integer `P = Σ (u - o)·y` (per 16-value half for Q6_K), `acc = fma(s · dy, P, acc)`
//! block after block, the minimums' `m · ys` summed apart, then `acc + mins`. So which kernel a
//! step takes never changes a sequence's logits.

use std::arch::x86_64::*;

use super::*;

/// The activation rows [`paired_avx2_k`] takes.
pub const PAIRED_AVX2: std::ops::RangeInclusive<usize> = 3..=4;

/// The 4-byte group j of a weight block for two weight rows side by side, in all 8 lanes (the
/// pair repeated), from the block's quants as [`interleave`] stored them.
///
/// # Safety
/// `q` must point at the 64 bytes [`interleave`] wrote for the pair's block.
#[inline(always)]
unsafe fn weight_group(q: *const u8, j: usize) -> __m256i {
    // 8-byte units: (g0, g1, g4, g5) of the unpacked low halves, then (g2, g3, g6, g7).
    const AT: [usize; 8] = [0, 1, 4, 5, 2, 3, 6, 7];
    // SAFETY: the caller's contract; the offsets are within the 64 bytes (read unaligned: no
    // f64 lives there).
    unsafe { _mm256_castpd_si256(_mm256_set1_pd(std::ptr::read_unaligned(q.add(8 * AT[j]).cast::<f64>()))) }
}

/// One block's quants of four weight rows `u`, stored at `dst` (4 vectors) so that
/// [`weight_group`] finds each 4-byte group of a pair side by side: rows (0, 1) in `dst[0..2]`,
/// rows (2, 3) in `dst[2..4]`.
///
/// # Safety
/// `dst` must be writable for 4 vectors.
#[inline(always)]
unsafe fn interleave(u: [__m256i; 4], dst: *mut __m256i) {
    // SAFETY: the caller's contract.
    unsafe {
        _mm256_storeu_si256(dst, _mm256_unpacklo_epi32(u[0], u[1]));
        _mm256_storeu_si256(dst.add(1), _mm256_unpackhi_epi32(u[0], u[1]));
        _mm256_storeu_si256(dst.add(2), _mm256_unpacklo_epi32(u[2], u[3]));
        _mm256_storeu_si256(dst.add(3), _mm256_unpackhi_epi32(u[2], u[3]));
    }
}

/// The two values at `p` repeated over the 8 lanes.
///
/// # Safety
/// `p` must point at two readable f32s (aligned for f32 only: read unaligned as one f64).
#[inline(always)]
unsafe fn repeated(p: *const f32) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe { _mm256_castpd_ps(_mm256_set1_pd(std::ptr::read_unaligned(p.cast::<f64>()))) }
}

/// The exact integers `P = Σ (u - o)·y` over half `h` of block `b` (the whole block for `None`)
/// of both pairs of weight rows (pair i's quants at `q + 64 · i`), every lane (weight row,
/// activation row) at once, as f32: the pairs' `vpmaddubsw` sums in i16 over
/// [`Decode::I16_GROUPS`] groups, widened by one `vpmaddwd`, then `o · Σ y` subtracted.
///
/// # Safety
/// The CPU must have AVX2; `q` must hold the block's interleaved quants.
#[inline(always)]
unsafe fn paired_products<F: Decode>(
    q: *const u8,
    lanes: &LanesAvx2,
    b: usize,
    h: Option<usize>,
) -> [__m256; 2] {
    debug_assert!(F::I16_GROUPS > 0);
    let y = &lanes.y[b * 8..b * 8 + 8];
    let (first, end) = h.map_or((0, 8), |h| (4 * h, 4 * h + 4));
    // SAFETY: the caller's contract.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut sum = [_mm256_setzero_si256(); 2];
        for j0 in (first..end).step_by(F::I16_GROUPS) {
            let mut part = [_mm256_setzero_si256(); 2];
            for (j, &y) in y.iter().enumerate().take((j0 + F::I16_GROUPS).min(end)).skip(j0) {
                for (i, part) in part.iter_mut().enumerate() {
                    let pairs = _mm256_maddubs_epi16(weight_group(q.add(64 * i), j), y);
                    *part = if j == j0 { pairs } else { _mm256_add_epi16(*part, pairs) };
                }
            }
            for (sum, part) in sum.iter_mut().zip(part) {
                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(part, ones));
            }
        }
        if F::OFFSET != 0 {
            let ys = match h {
                Some(h) => lanes.halves[2 * b + h],
                None => _mm256_add_epi32(lanes.halves[2 * b], lanes.halves[2 * b + 1]),
            };
            let off = _mm256_mullo_epi32(ys, _mm256_set1_epi32(i32::from(F::OFFSET)));
            sum = sum.map(|s| _mm256_sub_epi32(s, off));
        }
        sum.map(|s| _mm256_cvtepi32_ps(s))
    }
}

/// The k-quant kernel for 3 and 4 activation rows laid out with two lanes each (see
/// [`LanesAvx2Fn`]): per super-block, the four weight rows' 8 blocks unpacked and interleaved
/// by pairs, each 4-byte group of a pair broadcast from memory against the activation groups,
/// so every lane is one (weight row, activation row)'s exact integer per block (per half for
/// Q6_K), then scaled by one fma per pair.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` must hold R rows of `row_bytes`, each with the
/// blocks `lanes` was laid out for (two lanes per row); `out` must be writable at (i, r) for
/// the lanes' rows. R < 4 reads row 0 again for the missing rows and drops their results.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn paired_avx2_k<F: SuperBlock, const R: usize>(
    w: *const u8,
    row_bytes: usize,
    lanes: &LanesAvx2,
    out: *mut f32,
    stride: usize,
) {
    debug_assert!(lanes.v == 2);
    let nb = lanes.d.len();
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut mins = [_mm256_setzero_ps(); 2];
    let row = |r: usize| w.wrapping_add(if r < R { r * row_bytes } else { 0 });
    // A super-block's 8 blocks of the four rows, interleaved by pairs.
    let mut quants = [[_mm256_setzero_si256(); 4]; 8];
    // SAFETY: (all reads and writes) within the rows, blocks and outputs of the contract (a
    // k-quant row is whole super-blocks); the missing rows of an R < 4 call read row 0 again.
    unsafe {
        for g in 0..nb / 8 {
            let [first, second, min] = scale_tables::<F>([row(0), row(1), row(2), row(3)], g);
            for p in 0..4 {
                let b = 8 * g + 2 * p;
                let ahead = ahead::<R>(b * F::BYTES_PER_BLOCK, row_bytes);
                // Per row, blocks b and b + 1.
                let u: [(__m256i, __m256i); 4] = std::array::from_fn(|r| {
                    if r < R {
                        _mm_prefetch::<_MM_HINT_T0>(row(r).wrapping_add(ahead).cast());
                    }
                    F::quants_pair_avx2(row(r), b)
                });
                interleave(u.map(|u| u.0), quants[2 * p].as_mut_ptr());
                interleave(u.map(|u| u.1), quants[2 * p + 1].as_mut_ptr());
            }
            // Opaque, so that the groups are broadcast from memory (one load each).
            let all = std::hint::black_box(&mut quants);
            for (k, q) in all.iter().enumerate() {
                let (bb, p) = (8 * g + k, k / 2);
                // Weight row r of block k sits at 4 · (k % 2) + r of the tables; pair i's two
                // rows side by side from 2i.
                let at = |i: usize| 4 * (k % 2) + 2 * i;
                let dy = lanes.d[bb];
                let q = q.as_ptr().cast::<u8>();
                if F::SPLIT {
                    let lo = paired_products::<F>(q, lanes, bb, Some(0));
                    let hi = paired_products::<F>(q, lanes, bb, Some(1));
                    for i in 0..2 {
                        let s0 = repeated(first[p].as_ptr().add(at(i)));
                        let s1 = repeated(second[p].as_ptr().add(at(i)));
                        acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(s0, dy), lo[i], acc[i]);
                        acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(s1, dy), hi[i], acc[i]);
                    }
                } else {
                    let sum = paired_products::<F>(q, lanes, bb, None);
                    for i in 0..2 {
                        let s = repeated(first[p].as_ptr().add(at(i)));
                        acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(s, dy), sum[i], acc[i]);
                    }
                }
                if F::MIN {
                    for (i, mins) in mins.iter_mut().enumerate() {
                        let m = repeated(min[p].as_ptr().add(at(i)));
                        *mins = _mm256_add_ps(*mins, _mm256_mul_ps(m, lanes.sums[bb]));
                    }
                }
            }
        }
        for i in 0..2 {
            let v = if F::MIN { _mm256_add_ps(acc[i], mins[i]) } else { acc[i] };
            let mut o = [0f32; 8];
            _mm256_storeu_ps(o.as_mut_ptr(), v);
            for (l, &o) in o.iter().enumerate().take(2 * lanes.n) {
                // Lane l: activation row l / 2 against weight row 2i + l % 2.
                let r = 2 * i + l % 2;
                if r < R {
                    *out.add((lanes.i0 + l / 2) * stride + r) = o;
                }
            }
        }
    }
}
