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
//!
//! This file has the kernels of 1 to 5 activation rows and the per-format tables;
//! `decode_formats.rs` the block decoders, `decode_many.rs` the pair and many-row kernels,
//! `decode_lanes.rs` AVX2's many-row kernels and `decode_paired.rs` its kernel of 3 and 4 rows.

use std::arch::x86_64::*;

use super::*;

/// The most activation rows one call of [`rows_vnni`] takes (more go to [`pairs_vnni`] and
/// [`lanes_vnni`]).
pub const MAX_N: usize = 5;

/// The most activation rows one AVX2 call takes: it has 16 vector registers.
pub const MAX_N_AVX2: usize = 2;

/// The activation rows a call reads: per row, its block scales, quants and (for formats with
/// a minimum) block sums.
#[derive(Clone, Copy)]
pub(super) struct Rows<const N: usize> {
    pub(super) d: [*const f32; N],
    pub(super) qs: [*const i8; N],
    pub(super) sums: [*const f32; N],
}

impl<const N: usize> Rows<N> {
    /// Activation rows `i0..i0 + N` of `x`, with their block sums when `sums` is not empty.
    pub(super) fn new(x: &QuantizedRows, sums: &[f32], i0: usize) -> Self {
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
pub type LanesFn = LaidOutFn<Lanes>;

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
    /// With AVX2, [4 rows, 1 row] from [`LANES_AVX2_MIN`] activation rows on.
    pub lanes_avx2: Option<[LanesAvx2Fn; 2]>,
    /// With AVX2, for the k-quants: [4 rows, 1 row] for [`PAIRED_AVX2`] activation rows.
    pub paired_avx2: Option<[LanesAvx2Fn; 2]>,
}

/// From this many activation rows on, VNNI CPUs take [`lanes_vnni`]. Below, it would leave
/// lanes of its `vpdpbusd`s idle: [`rows_vnni`] at 5 rows was 1.34x faster, and at 7 and 8
/// 1.08x and 1.07x, before [`pairs_vnni`] took those (Gemma 3 270M, 2 threads,
/// `benches/batch_decode`, 3 alternating runs); from 9 on [`lanes_vnni`] is as fast or
/// faster.
pub const LANES_MIN: usize = PAIRS_MAX + 1;

/// The AVX2 kernel (see [`RowsFn`]), with the VNNI kernels' arithmetic: per 32-value block,
/// four weight rows decoded once for the call's N activation rows, each (weight row, activation
/// row)'s products summed to the exact integer `P` of the block (the four rows' lanes summed
/// together, [`four_row_sums_avx2`]), and `acc = fma(s · dy, P, acc)` four weight rows at a
/// time, the minimums' `m · ys` summed apart. So a row's result is the same bits whatever the
/// batch, and the many-row kernel ([`lanes_avx2`]) computes it the same way.
///
/// # Safety
/// The CPU must have the features enabled here; `w` must hold R rows of `row_bytes`,
/// each `x.cols` values; `x` rows `i0..i0 + N`; for a format with a minimum `sums`
/// their block sums; `out` must be writable at every (i, r) (R < 4 reads row 0 again for the
/// missing rows and drops their results).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows_avx2<F: Decode, const R: usize, const N: usize>(
    w: *const u8,
    row_bytes: usize,
    x: &QuantizedRows,
    sums: &[f32],
    i0: usize,
    out: *mut f32,
    stride: usize,
) {
    // Q6_K's halves have scales of their own: it takes `rows_avx2_k`.
    debug_assert!(!F::SPLIT);
    let nb = x.cols / QK;
    let rows = Rows::<N>::new(x, if F::MIN { sums } else { &[] }, i0);
    // Lane r: weight row r's output for activation row i.
    let mut acc = [_mm_setzero_ps(); N];
    let mut mins = [_mm_setzero_ps(); N];
    let row = |r: usize| w.wrapping_add(if r < R { r * row_bytes } else { 0 });
    let offset = _mm256_set1_epi8(F::OFFSET as i8);
    // SAFETY: (all reads and writes) within the rows, blocks and outputs of the contract; the
    // missing rows of an R < 4 call read row 0 again.
    unsafe {
        for b in 0..nb {
            let mut u = [(_mm256_setzero_si256(), _mm256_setzero_si256()); 4];
            let (mut s, mut m) = ([0f32; 4], [0f32; 4]);
            for r in 0..4 {
                if r < R {
                    // R streams: prefetch each a page ahead (a hint; past the end of the
                    // weights it is dropped, never faulting).
                    _mm_prefetch::<_MM_HINT_T0>(
                        row(r).wrapping_add(ahead::<R>(b * F::BYTES_PER_BLOCK, row_bytes)).cast(),
                    );
                }
                let block = F::block(row(r), b);
                u[r] = prep_avx2::<F>(block.u);
                s[r] = block.s[0];
                m[r] = block.m;
            }
            let (sv, mv) = (_mm_loadu_ps(s.as_ptr()), _mm_loadu_ps(m.as_ptr()));
            for i in 0..N {
                let y = _mm256_loadu_si256(rows.qs[i].add(b * QK).cast());
                // -o · Σ y per lane of 4 values.
                let neg = if F::OFFSET == 0 || F::OFFSET == 128 {
                    _mm256_setzero_si256()
                } else {
                    _mm256_sub_epi32(_mm256_setzero_si256(), lane_sums_avx2(offset, y))
                };
                let h = four_row_sums_avx2([
                    dot_avx2::<F>(u[0], y, neg),
                    dot_avx2::<F>(u[1], y, neg),
                    dot_avx2::<F>(u[2], y, neg),
                    dot_avx2::<F>(u[3], y, neg),
                ]);
                let p = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
                let dy = _mm_set1_ps(*rows.d[i].add(b));
                acc[i] = _mm_fmadd_ps(_mm_mul_ps(sv, dy), _mm_cvtepi32_ps(p), acc[i]);
                if F::MIN {
                    mins[i] = _mm_add_ps(mins[i], _mm_mul_ps(mv, _mm_set1_ps(*rows.sums[i].add(b))));
                }
            }
        }
        store_rows::<F, R, N>(&acc, &mins, out, i0, stride);
    }
}

/// [`rows_avx2`] for the k-quants, with [`rows_vnni_k`]'s arithmetic: per super-block, each
/// weight row's 8 blocks' scales and minimums decoded at once ([`SuperBlock::scales_avx2`]) and
/// transposed to the four rows', and per block the exact integer `Σ w·y` of each (weight row,
/// activation row) pair (per 16-value half for Q6_K) scaled by one fma, four weight rows at a
/// time. So a row's result is, value for value, what the VNNI kernels give, and each block costs
/// one fma where [`rows_avx2`] spends one per 8 lanes of partial sums and decodes the scales
/// block by block (the 1.5B's Q4_K matmuls ran at half of memory speed that way).
///
/// # Safety
/// As [`rows_avx2`] (R < 4 reads row 0 again for the missing rows and drops their results).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows_avx2_k<F: SuperBlock, const R: usize, const N: usize>(
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
    let row = |r: usize| w.wrapping_add(if r < R { r * row_bytes } else { 0 });
    let offset = _mm256_set1_epi8(F::OFFSET as i8);
    let ones = _mm256_set1_epi16(1);
    // SAFETY: (all reads and writes) within the rows, blocks and outputs of the contract (a
    // k-quant row is whole super-blocks); the missing rows of an R < 4 call read row 0 again.
    unsafe {
        for g in 0..nb / 8 {
            let scales = F::scales_avx2([row(0), row(1), row(2), row(3)], g);
            for p in 0..4 {
                let b = 8 * g + 2 * p;
                let mut u = [(_mm256_setzero_si256(), _mm256_setzero_si256()); 4];
                let ahead = ahead::<R>(b * F::BYTES_PER_BLOCK, row_bytes);
                for (r, u) in u.iter_mut().enumerate() {
                    if r < R {
                        _mm_prefetch::<_MM_HINT_T0>(row(r).wrapping_add(ahead).cast());
                    }
                    *u = F::quants_pair_avx2(row(r), b);
                }
                for i in 0..N {
                    // 128-bit lane h of h[k]: the four rows' sums over half h of block b + k.
                    let mut h = [_mm256_setzero_si256(); 2];
                    for (k, h) in h.iter_mut().enumerate() {
                        let y = _mm256_loadu_si256(rows.qs[i].add((b + k) * QK).cast());
                        // -o · Σ y per lane of 4 values.
                        let neg = if F::OFFSET == 0 {
                            _mm256_setzero_si256()
                        } else {
                            _mm256_sub_epi32(_mm256_setzero_si256(), lane_sums_avx2(offset, y))
                        };
                        let dot = |u: __m256i| {
                            _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(u, y), ones), neg)
                        };
                        *h = four_row_sums_avx2(if k == 0 {
                            [dot(u[0].0), dot(u[1].0), dot(u[2].0), dot(u[3].0)]
                        } else {
                            [dot(u[0].1), dot(u[1].1), dot(u[2].1), dot(u[3].1)]
                        });
                    }
                    // Both blocks' halves 0 (then halves 1): block b's rows, then block b + 1's.
                    let h0 = _mm256_permute2x128_si256::<0x20>(h[0], h[1]);
                    let h1 = _mm256_permute2x128_si256::<0x31>(h[0], h[1]);
                    let dy = both_blocks(rows.d[i].add(b));
                    let lo = _mm256_castps256_ps128;
                    let hi = _mm256_extractf128_ps::<1>;
                    if F::SPLIT {
                        let (t0, t1) =
                            (_mm256_mul_ps(scales.first[p], dy), _mm256_mul_ps(scales.second[p], dy));
                        let (p0, p1) = (_mm256_cvtepi32_ps(h0), _mm256_cvtepi32_ps(h1));
                        acc[i] = _mm_fmadd_ps(lo(t0), lo(p0), acc[i]);
                        acc[i] = _mm_fmadd_ps(lo(t1), lo(p1), acc[i]);
                        acc[i] = _mm_fmadd_ps(hi(t0), hi(p0), acc[i]);
                        acc[i] = _mm_fmadd_ps(hi(t1), hi(p1), acc[i]);
                    } else {
                        let t = _mm256_mul_ps(scales.first[p], dy);
                        let p = _mm256_cvtepi32_ps(_mm256_add_epi32(h0, h1));
                        acc[i] = _mm_fmadd_ps(lo(t), lo(p), acc[i]);
                        acc[i] = _mm_fmadd_ps(hi(t), hi(p), acc[i]);
                    }
                    if F::MIN {
                        let m = _mm256_mul_ps(scales.min[p], both_blocks(rows.sums[i].add(b)));
                        mins[i] = _mm_add_ps(mins[i], lo(m));
                        mins[i] = _mm_add_ps(mins[i], hi(m));
                    }
                }
            }
        }
        store_rows::<F, R, N>(&acc, &mins, out, i0, stride);
    }
}

/// The two f32 at `p` as (`p[0]` four times, `p[1]` four times).
///
/// # Safety
/// 8 bytes readable at `p`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn both_blocks(p: *const f32) -> __m256 {
    // SAFETY: the caller's contract.
    let v = _mm256_castps128_ps256(_mm_castpd_ps(unsafe { _mm_load_sd(p.cast()) }));
    _mm256_permutevar8x32_ps(v, _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0))
}

/// The sums of the two 128-bit lanes of four rows' products `q`: lane h of the result holds
/// (row 0, row 1, row 2, row 3)'s sums over lane h of their vector. Exact (integers).
#[inline]
#[target_feature(enable = "avx2")]
fn four_row_sums_avx2(q: [__m256i; 4]) -> __m256i {
    let t01 = _mm256_add_epi32(_mm256_unpacklo_epi32(q[0], q[1]), _mm256_unpackhi_epi32(q[0], q[1]));
    let t23 = _mm256_add_epi32(_mm256_unpacklo_epi32(q[2], q[3]), _mm256_unpackhi_epi32(q[2], q[3]));
    _mm256_add_epi32(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23))
}

/// AVX2: for `o = 128`, (|w|, w) for the sign trick; else the quants as they are.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn prep_avx2<F: Decode>(u: __m256i) -> (__m256i, __m256i) {
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
pub(super) fn dot_avx2<F: Decode>(u: (__m256i, __m256i), y: __m256i, neg: __m256i) -> __m256i {
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
pub(super) fn lane_sums_avx2(offset: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(offset, y), _mm256_set1_epi16(1))
}

/// The f16 at `p` as f32, with F16C.
///
/// # Safety
/// `p` must point at two readable bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn f16c_at(p: *const u8) -> f32 {
    // SAFETY: the caller's contract.
    let bits = unsafe { std::ptr::read_unaligned(p.cast::<u16>()) };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// The sums of the 4 × 128-bit lanes of four rows' products `q`: lane k of the result holds
/// (row 0, row 1, row 2, row 3)'s sums over 128-bit lane k of their vector. Exact (integers).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn four_row_sums(q: [__m512i; 4]) -> __m512i {
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
pub(super) unsafe fn rows_vnni<F: Decode, const R: usize, const N: usize>(
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
                    _mm_prefetch::<_MM_HINT_T0>(
                        row.wrapping_add(ahead::<R>(b * F::BYTES_PER_BLOCK, row_bytes)).cast(),
                    );
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
pub(super) unsafe fn store_rows<F: Decode, const R: usize, const N: usize>(
    acc: &[__m128; N],
    mins: &[__m128; N],
    out: *mut f32,
    i0: usize,
    stride: usize,
) {
    for i in 0..N {
        // SAFETY: the caller's contract (SSE only, which every x86_64 CPU has).
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
pub(super) fn lane(v: __m512, p: usize) -> __m128 {
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
pub(super) unsafe fn rows_vnni_k<F: SuperBlock, const R: usize, const N: usize>(
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
                            row(r).wrapping_add(ahead::<R>(b * F::BYTES_PER_BLOCK, row_bytes)).cast(),
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
pub(super) unsafe fn accumulate<F: Decode, const N: usize>(
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

pub(super) fn table_of<F: Decode>(vnni: bool) -> Table {
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
            lanes_avx2: None,
            paired_avx2: None,
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
            lanes_avx2: Some([lanes_avx2::<F, 4>, lanes_avx2::<F, 1>]),
            paired_avx2: None,
        }
    }
}

/// [`table_of`] with the k-quants' own few-row kernels.
pub(super) fn table_k<F: SuperBlock>(vnni: bool) -> Table {
    let mut table = table_of::<F>(vnni);
    if !vnni {
        let (four1, four2): (RowsFn, RowsFn) = (rows_avx2_k::<F, 4, 1>, rows_avx2_k::<F, 4, 2>);
        let (one1, one2): (RowsFn, RowsFn) = (rows_avx2_k::<F, 1, 1>, rows_avx2_k::<F, 1, 2>);
        table.four = [four1, four2, four2, four2, four2];
        table.one = [one1, one2, one2, one2, one2];
        table.lanes_avx2 = Some(if F::SPLIT {
            [lanes_avx2_k::<F, 4>, lanes_avx2_k::<F, 1>]
        } else {
            [lanes_avx2_k_rows::<F, 4, 4>, lanes_avx2_k_rows::<F, 1, 1>]
        });
        table.paired_avx2 = Some([paired_avx2_k::<F, 4>, paired_avx2_k::<F, 1>]);
    } else {
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
