//! The x86 kernels of [`crate::kernels::attend`] (`kernels/attention.rs`): single-query
//! attention's scores, exponentials and weighted values over the f16 cache, on AVX-512 and AVX2.

use std::arch::x86_64::*;

use super::*;

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

/// Single-query attention's scores for Q query rows (`q`, rows of `hd`) against `n` f16 key
/// rows: `scores[h · stride + t] = q_h · k_t`, each key converted once for all Q queries; each
/// score is two 8-lane fma sums over 16 columns at a time, `hsum`med, then the last `hd % 16`
/// columns added one by one.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `q` must hold Q rows, `k` n rows, `scores` Q rows of
/// `stride ≥ n`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn key_scores_avx2<const Q: usize>(
    q: &[f32],
    hd: usize,
    k: &[half::f16],
    n: usize,
    scores: &mut [f32],
    stride: usize,
) {
    assert!(q.len() >= Q * hd && k.len() >= n * hd && n <= stride);
    assert!(scores.len() >= (Q - 1) * stride + n);
    let full = hd / 16 * 16;
    let (pq, pk) = (q.as_ptr(), k.as_ptr());
    // SAFETY: every read is within the asserted lengths.
    unsafe {
        for t in 0..n {
            let kt = pk.add(t * hd);
            let mut acc = [[_mm256_setzero_ps(); 2]; Q];
            for i in (0..full).step_by(16) {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(kt.add(i).cast()));
                let k1 = _mm256_cvtph_ps(_mm_loadu_si128(kt.add(i + 8).cast()));
                for (h, acc) in acc.iter_mut().enumerate() {
                    let a = pq.add(h * hd + i);
                    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a), k0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(8)), k1, acc[1]);
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                let mut sum = hsum(_mm256_add_ps(acc[0], acc[1]));
                for j in full..hd {
                    sum += q[h * hd + j] * k[t * hd + j].to_f32();
                }
                scores[h * stride + t] = sum;
            }
        }
    }
}

/// Single-query attention's weighted values for Q rows: `out_h = Σ_t scores[h · stride + t]
/// · v_t` over `n` f16 value rows of `hd`, each output summed from 0 with one fma per position
/// (the last `hd % 8` columns a multiply and an add). Two rows at a time,
/// 32 columns (a value row's cache line) in registers across all positions, then 8 columns at
/// a time: each position's 32 values are converted once for both rows, and each score
/// broadcast once per 32 columns.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `v` must hold n rows, `scores` Q rows of
/// `stride ≥ n`, `out` Q rows of `hd`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn value_sums_avx2<const Q: usize>(
    scores: &[f32],
    stride: usize,
    hd: usize,
    v: &[half::f16],
    n: usize,
    out: &mut [f32],
) {
    assert!(v.len() >= n * hd && n <= stride && out.len() >= Q * hd);
    assert!(scores.len() >= (Q - 1) * stride + n);
    let (wide, full) = (hd / 32 * 32, hd / 8 * 8);
    // SAFETY: the asserted lengths bound every access of the blocks.
    unsafe {
        let mut h = 0;
        while h + 2 <= Q {
            value_block::<2, 4>(scores, stride, hd, v, n, out, h, 0..wide);
            value_block::<2, 1>(scores, stride, hd, v, n, out, h, wide..full);
            h += 2;
        }
        if h < Q {
            value_block::<1, 4>(scores, stride, hd, v, n, out, h, 0..wide);
            value_block::<1, 1>(scores, stride, hd, v, n, out, h, wide..full);
        }
    }
    for h in 0..Q {
        for j in full..hd {
            let mut a = 0f32;
            for t in 0..n {
                a += scores[h * stride + t] * v[t * hd + j].to_f32();
            }
            out[h * hd + j] = a;
        }
    }
}

/// Rows `h0..h0 + H` of [`value_sums_avx2`] over `columns` (a multiple of 8 · C wide), 8 · C
/// columns at a time.
///
/// # Safety
/// As [`value_sums_avx2`], for rows h0..h0 + H.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn value_block<const H: usize, const C: usize>(
    scores: &[f32],
    stride: usize,
    hd: usize,
    v: &[half::f16],
    n: usize,
    out: &mut [f32],
    h0: usize,
    columns: std::ops::Range<usize>,
) {
    let (pv, ps, po) = (v.as_ptr(), scores.as_ptr(), out.as_mut_ptr());
    // SAFETY: the caller's contract.
    unsafe {
        for c in columns.step_by(8 * C) {
            let mut acc = [[_mm256_setzero_ps(); C]; H];
            for t in 0..n {
                let vt: [__m256; C] = std::array::from_fn(|k| {
                    _mm256_cvtph_ps(_mm_loadu_si128(pv.add(t * hd + c + 8 * k).cast()))
                });
                for (h, acc) in acc.iter_mut().enumerate() {
                    let p = _mm256_set1_ps(*ps.add((h0 + h) * stride + t));
                    for (a, &x) in acc.iter_mut().zip(&vt) {
                        *a = _mm256_fmadd_ps(p, x, *a);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                for (k, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(po.add((h0 + h) * hd + c + 8 * k), *a);
                }
            }
        }
    }
}

/// `s_t = e^(s_t - max)` for every score, in place, and their sum: 8 lanes at a time (the last
/// ones padded), summed in lanes and then across as `hsum` does. The exponential is Cephes'
/// `expf` (a degree-6 polynomial of the remainder after powers of 2, within 2 ulp of
/// `f32::exp`), so a span's softmax costs a few vector operations per score instead of a
/// libm call each; a lane below -87.3 (e^x under f32's normal range) gives 0.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_sum(s: &mut [f32], max: f32) -> f32 {
    let full = s.len() / 8 * 8;
    let m = _mm256_set1_ps(max);
    let mut sum = _mm256_setzero_ps();
    let p = s.as_mut_ptr();
    // SAFETY: every access is within the first `full` elements of `s`.
    unsafe {
        for i in (0..full).step_by(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
            _mm256_storeu_ps(p.add(i), e);
            sum = _mm256_add_ps(sum, e);
        }
    }
    let tail = s.len() - full;
    if tail > 0 {
        let mut rest = [f32::NEG_INFINITY; 8];
        rest[..tail].copy_from_slice(&s[full..]);
        // SAFETY: `rest` holds 8 f32s.
        let e = unsafe { exp8(_mm256_sub_ps(_mm256_loadu_ps(rest.as_ptr()), m)) };
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(rest.as_mut_ptr(), e) };
        s[full..].copy_from_slice(&rest[..tail]);
        sum = _mm256_add_ps(sum, e);
    }
    hsum(sum)
}

/// e^x in 8 lanes (Cephes `expf`): x = n · ln 2 + r with |r| ≤ ln 2 / 2, e^r by its polynomial,
/// 2^n put into the exponent; 0 below -87.3, where 2^n would leave the normal range.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp8(x: __m256) -> __m256 {
    let low = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.3));
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_andnot_ps(low, _mm256_mul_ps(e, two_n))
}
