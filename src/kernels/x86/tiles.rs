//! The x86 kernels of the batched (prefill) matmul (`kernels/tiles.rs`): weight rows repacked
//! into 16-row tiles, and the tile GEMM with AVX-512 VNNI or AVX2.

use std::arch::x86_64::*;

use super::*;

/// The 32 quants of values 32·k..32·k + 32 of one row of `format`, as the unsigned bytes of
/// [`crate::kernels::matmul_batched`], and the (s, m) of their one or two sub-blocks: the scale
/// and the minimum of the decode kernels' `w = s · (u - o) + m` (m is 0 but for the formats
/// with a minimum), computed as they compute them.
///
/// # Safety
/// The CPU must have AVX2 and F16C; `row` must point at a whole row holding slice k.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_slice(
    format: crate::kernels::Format,
    row: *const u8,
    k: usize,
) -> (__m256i, [(f32, f32); 2]) {
    use crate::kernels::Format as F;
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
                (_mm256_xor_si256(q, flip), [(d, 0.0); 2])
            }
            // The nibbles are already unsigned: Q4_0's w = d · (q - 8), Q4_1's w = d · q + m.
            F::Q4_0 => {
                let block = row.add(k * format.unit().1);
                let d = f16(block);
                (nibbles(block.add(2)), [(d, 0.0); 2])
            }
            F::Q4_1 | F::Q5_1 => {
                let block = row.add(k * format.unit().1);
                let (d, m) = (f16(block), f16(block.add(2)));
                let q = if format == F::Q4_1 { nibbles(block.add(4)) } else { quants_q5_1(block) };
                (q, [(d, m); 2])
            }
            F::Q4K => {
                let block = row.add(k / 8 * Q4_K_BYTES);
                let j = k % 8;
                let (d, dmin) = (f16(block), f16(block.add(2)));
                let (scale, min) =
                    crate::kernels::q4k_scale_min(std::slice::from_raw_parts(block.add(4), 12), j);
                let qs = _mm256_loadu_si256(block.add(16 + 32 * (j / 2)).cast());
                let q = if j.is_multiple_of(2) { qs } else { _mm256_srli_epi16(qs, 4) };
                let ac = (d * f32::from(scale), -(dmin * f32::from(min)));
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
                (q, [(a0, 0.0), (a1, 0.0)])
            }
            // Not reached: `matmul_batched_group` refuses formats without the tile path.
            _ => (_mm256_setzero_si256(), [(0.0, 0.0); 2]),
        }
    }
}

/// Repacks `n` (at most 16) weight rows of `cols` values into the tile layout of
/// [`tile_gemm`]: per 32 values, 8 groups of 64 bytes, group j holding quants 4j..4j + 4 of
/// rows 0..16; per sub-block, the rows' scales `a` and minimums `c` (see [`tile_slice`]).
/// Missing rows have a = c = 0.
///
/// # Safety
/// The CPU must have AVX2 and F16C; `w` must hold `n` rows of `cols` values in `format`,
/// `a` and `c` `cols / sub · 16` values each and `quants` `cols · 16` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn pack_tile(
    format: crate::kernels::Format,
    w: &[u8],
    n: usize,
    cols: usize,
    a: &mut [f32],
    c: &mut [f32],
    quants: &mut [u8],
) {
    let row_bytes = format.row_bytes(cols);
    let per_slice = 32 / crate::kernels::tile_sub(format);
    a.fill(0.0);
    c.fill(0.0);
    for k in 0..cols / 32 {
        // The rows' bytes 16 slices on, every other slice: 16 rows read side by side are more
        // streams than the hardware prefetcher follows, and the repacking waited on each line.
        if k % 2 == 0 && (k + 16) * 32 < cols {
            let at = row_bytes * (k + 16) * 32 / cols;
            for row in 0..n {
                // SAFETY: `at` < row_bytes: a prefetch within each of the n rows.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().add(row * row_bytes + at).cast()) };
            }
        }
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

/// What the tile kernels read of the activations besides their quants and block scales:
/// the exact sum of every 16 values, and for the formats with a minimum each block's `d · Σ q`
/// (the decode kernels' block sums, `QuantizedRows::block_sums`; empty for the others).
#[derive(Clone, Copy)]
pub struct TileSums<'a> {
    pub y16: &'a [i32],
    pub blocks: &'a [f32],
}

/// One packed tile (16 weight rows) against every row of `x`: row i of the result goes to
/// `out[i * ld..][..n]` (the tile's columns of a (rows of x, ld) output).
///
/// Each output is computed with the decode kernels' arithmetic, operation for operation: per
/// sub-block the exact integer `P = Σ (u - o)·y`, `acc = fma(s · dy, P, acc)` sub-block after
/// sub-block, the minimums' `m · (d · Σ q)` summed apart and added at the end. So a row's
/// result is the same bits whether a prompt's pass has 1 row or 500, and whether it goes
/// through these kernels or the decode ones.
///
/// # Safety
/// The CPU must have AVX-512 VNNI and VL; the tile must be packed by [`pack_tile`] for
/// `x`'s width and `format`, `sums` hold x's sums, `n` ≤ 16, and `out` must be valid for those
/// writes.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile_gemm(
    format: crate::kernels::Format,
    a: &[f32],
    c: &[f32],
    quants: &[u8],
    x: &crate::kernels::QuantizedRows,
    sums: TileSums<'_>,
    out: *mut f32,
    ld: usize,
    n: usize,
) {
    use crate::kernels::Format as F;
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match format {
            // u = q + 128 for the signed formats (Q5_0's q already less its 16).
            F::Q8_0 | F::Q5_0 => all_rows::<32, 128, false>(a, c, quants, x, sums, out, ld, n),
            F::Q6K => all_rows::<16, 32, false>(a, c, quants, x, sums, out, ld, n),
            F::Q4_0 => all_rows::<32, 8, false>(a, c, quants, x, sums, out, ld, n),
            _ => all_rows::<32, 0, true>(a, c, quants, x, sums, out, ld, n),
        }
    }
}

/// Every row of x against one tile, 8 rows per pass, then one at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn all_rows<const SUB: usize, const OFF: i32, const MIN: bool>(
    a: &[f32],
    c: &[f32],
    quants: &[u8],
    x: &crate::kernels::QuantizedRows,
    sums: TileSums<'_>,
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
            rows_tile::<8, SUB, OFF, MIN>(a, c, quants, x, sums, i, out, ld, mask);
            i += 8;
        }
        while i < m {
            rows_tile::<1, SUB, OFF, MIN>(a, c, quants, x, sums, i, out, ld, mask);
            i += 1;
        }
    }
}

/// Rows i..i + R of x against one tile, sub-blocks of SUB values with offset OFF: R
/// accumulators of 16 outputs each. The R rows' integer sums are built side by side (one
/// `vpdpbusd` per row per group of 4 quants, rows innermost), so that consecutive
/// instructions are independent: with the rows outermost, each row's chain of dependent
/// `vpdpbusd`s left the unit idle for their latency.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn rows_tile<const R: usize, const SUB: usize, const OFF: i32, const MIN: bool>(
    a: &[f32],
    c: &[f32],
    quants: &[u8],
    x: &crate::kernels::QuantizedRows,
    sums: TileSums<'_>,
    i: usize,
    out: *mut f32,
    ld: usize,
    mask: __mmask16,
) {
    let cols = x.cols;
    let nsub = cols / SUB;
    let mut acc = [_mm512_setzero_ps(); R];
    let mut mins = [_mm512_setzero_ps(); R];
    let (qp, yp, dp, sp, bp) =
        (quants.as_ptr(), x.qs.as_ptr(), x.d.as_ptr(), sums.y16.as_ptr(), sums.blocks.as_ptr());
    // SAFETY: sub-block s < nsub of rows i..i + R and of the tile are within their slices.
    unsafe {
        for s in 0..nsub {
            let av = _mm512_loadu_ps(a.as_ptr().add(s * 16));
            let mut isum = [_mm512_setzero_si512(); R];
            for j in 0..SUB / 4 {
                let g = _mm512_loadu_si512(qp.add(s * SUB * 16 + j * 64).cast());
                for (r, isum) in isum.iter_mut().enumerate() {
                    let y = yp.add((i + r) * cols + s * SUB).cast::<i32>();
                    *isum =
                        _mm512_dpbusd_epi32(*isum, g, _mm512_set1_epi32(std::ptr::read_unaligned(y.add(j))));
                }
            }
            for (r, (acc, mins)) in acc.iter_mut().zip(&mut mins).enumerate() {
                let at = ((i + r) * cols + s * SUB) / 16;
                let p = if OFF == 0 {
                    isum[r]
                } else {
                    let ys = if SUB == 32 { *sp.add(at) + *sp.add(at + 1) } else { *sp.add(at) };
                    _mm512_sub_epi32(isum[r], _mm512_set1_epi32(OFF * ys))
                };
                let b = ((i + r) * cols + s * SUB) / 32;
                let t = _mm512_mul_ps(av, _mm512_set1_ps(*dp.add(b)));
                *acc = _mm512_fmadd_ps(t, _mm512_cvtepi32_ps(p), *acc);
                if MIN {
                    let m =
                        _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr().add(s * 16)), _mm512_set1_ps(*bp.add(b)));
                    *mins = _mm512_add_ps(*mins, m);
                }
            }
        }
        for (r, (acc, mins)) in acc.iter().zip(&mins).enumerate() {
            let v = if MIN { _mm512_add_ps(*acc, *mins) } else { *acc };
            _mm512_mask_storeu_ps(out.add((i + r) * ld), mask, v);
        }
    }
}

/// [`tile_gemm`] on CPUs with AVX2 but not AVX-512 VNNI: `vpmaddubsw` and `vpmaddwd` in place
/// of `vpdpbusd`, over each 64-byte group as two 256-bit halves (tile rows 0..8 and 8..16),
/// with the same arithmetic per output.
///
/// `vpmaddubsw` saturates its pairs at i16, so the bytes must stay small: the unsigned
/// nibbles of Q4_0, Q4_1 and Q4_K (≤ 15) and Q6_K (≤ 63) go in as they are (2 · 63 · 127
/// fits), but Q8_0's and Q5_0's `u = q + 128` would not. Those are turned back into their
/// signed `q` and multiplied as llama.cpp's AVX2 kernels do, `|q|` times `y` with q's sign
/// (2 · 128 · 127 fits), which gives `P` with no offset to take off.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; otherwise as [`tile_gemm`].
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile_gemm_avx2(
    format: crate::kernels::Format,
    a: &[f32],
    c: &[f32],
    quants: &[u8],
    x: &crate::kernels::QuantizedRows,
    sums: TileSums<'_>,
    out: *mut f32,
    ld: usize,
    n: usize,
) {
    use crate::kernels::Format as F;
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match format {
            F::Q8_0 | F::Q5_0 => all_rows_avx2::<4, 32, true, 1, 0, false>(a, c, quants, x, sums, out, ld, n),
            F::Q6K => all_rows_avx2::<3, 16, false, 2, 32, false>(a, c, quants, x, sums, out, ld, n),
            F::Q5_1 => all_rows_avx2::<4, 32, false, 4, 0, true>(a, c, quants, x, sums, out, ld, n),
            F::Q4_0 => all_rows_avx2::<4, 32, false, 8, 8, false>(a, c, quants, x, sums, out, ld, n),
            _ => all_rows_avx2::<4, 32, false, 8, 0, true>(a, c, quants, x, sums, out, ld, n),
        }
    }
}

/// Every row of x against one tile, R rows per pass, then one at a time. R is what fits the 16
/// registers: 4, but 3 for Q6_K, whose sub-blocks take two rounds of K groups and so R more
/// registers of i32 sums (with 4 rows they spilled; 3 measured about 10% faster on the 1.5B's
/// matrices). Q5_1 takes two rounds too; it has not been measured.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn all_rows_avx2<
    const R: usize,
    const SUB: usize,
    const SIGNED: bool,
    const K: usize,
    const OFF: i32,
    const MIN: bool,
>(
    a: &[f32],
    c: &[f32],
    quants: &[u8],
    x: &crate::kernels::QuantizedRows,
    sums: TileSums<'_>,
    out: *mut f32,
    ld: usize,
    n: usize,
) {
    let m = x.rows();
    let mut i = 0;
    // SAFETY: (all) `tile_gemm_avx2`'s contract bounds every index; rows i..i + R exist.
    unsafe {
        while i + R <= m {
            rows_tile_avx2::<R, SUB, SIGNED, K, OFF, MIN>(a, c, quants, x, sums, i, out, ld, n);
            i += R;
        }
        while i < m {
            rows_tile_avx2::<1, SUB, SIGNED, K, OFF, MIN>(a, c, quants, x, sums, i, out, ld, n);
            i += 1;
        }
    }
}

/// Rows i..i + R of x against one tile, each half of the tile (8 weight rows) in turn.
///
/// The pairs of products `vpmaddubsw` gives are summed in i16 over K groups of 4 quants before
/// one `vpmaddwd` widens them, which halves the multiplier port's work for the 4-bit formats:
/// K · 2 · u · 128 must stay below 2^15, so K is 8 for quants up to 15 (Q4_0, Q4_1, Q4_K), 4 up to 31
/// (Q5_1), 2 up to 63 (Q6_K) and 1 for the signed formats. The integer sums, and so the results,
/// are the same for every K.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn rows_tile_avx2<
    const R: usize,
    const SUB: usize,
    const SIGNED: bool,
    const K: usize,
    const OFF: i32,
    const MIN: bool,
>(
    a: &[f32],
    c: &[f32],
    quants: &[u8],
    x: &crate::kernels::QuantizedRows,
    sums: TileSums<'_>,
    i: usize,
    out: *mut f32,
    ld: usize,
    n: usize,
) {
    let cols = x.cols;
    let nsub = cols / SUB;
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(0x80u8 as i8);
    let (qp, yp, dp, sp, bp) =
        (quants.as_ptr(), x.qs.as_ptr(), x.d.as_ptr(), sums.y16.as_ptr(), sums.blocks.as_ptr());
    // SAFETY: sub-block s < nsub of rows i..i + R and of the tile are within their slices.
    unsafe {
        for half in 0..2 {
            if half * 8 >= n {
                break;
            }
            let mut acc = [_mm256_setzero_ps(); R];
            // Per row: its quants, block scales, sums per 16 values and block sums.
            let rows: [(*const i8, *const f32, *const i32, *const f32); R] = std::array::from_fn(|r| {
                let row = i + r;
                (
                    yp.add(row * cols),
                    dp.add(row * cols / 32),
                    sp.add(row * cols / 16),
                    bp.wrapping_add(row * cols / 32),
                )
            });
            for s in 0..nsub {
                let av = _mm256_loadu_ps(a.as_ptr().add(s * 16 + half * 8));
                let mut isum = [_mm256_setzero_si256(); R];
                for j0 in (0..SUB / 4).step_by(K) {
                    let mut part = [_mm256_setzero_si256(); R];
                    for j in j0..j0 + K {
                        let g = _mm256_loadu_si256(qp.add(s * SUB * 16 + j * 64 + half * 32).cast());
                        // Signed formats: q = u - 128, multiplied as |q| and y with q's sign.
                        let (w, q) = if SIGNED {
                            let q = _mm256_xor_si256(g, flip);
                            (_mm256_sign_epi8(q, q), q)
                        } else {
                            (g, g)
                        };
                        for (part, &(y, _, _, _)) in part.iter_mut().zip(&rows) {
                            let y = y.add(s * SUB).cast::<i32>();
                            let mut yv = _mm256_set1_epi32(std::ptr::read_unaligned(y.add(j)));
                            if SIGNED {
                                yv = _mm256_sign_epi8(yv, q);
                            }
                            let pairs = _mm256_maddubs_epi16(w, yv);
                            *part = if j == j0 { pairs } else { _mm256_add_epi16(*part, pairs) };
                        }
                    }
                    for (isum, part) in isum.iter_mut().zip(part) {
                        *isum = _mm256_add_epi32(*isum, _mm256_madd_epi16(part, ones));
                    }
                }
                let b = s * SUB / 32;
                for (r, (acc, &(_, d, ys, _))) in acc.iter_mut().zip(&rows).enumerate() {
                    let p = if OFF == 0 {
                        isum[r]
                    } else {
                        let at = s * SUB / 16;
                        let ys = if SUB == 32 { *ys.add(at) + *ys.add(at + 1) } else { *ys.add(at) };
                        _mm256_sub_epi32(isum[r], _mm256_set1_epi32(OFF * ys))
                    };
                    let t = _mm256_mul_ps(av, _mm256_set1_ps(*d.add(b)));
                    *acc = _mm256_fmadd_ps(t, _mm256_cvtepi32_ps(p), *acc);
                }
            }
            if MIN {
                // The minimums' sums, sub-block after sub-block as the decode kernels add them,
                // apart from the main loop so that their accumulators take no register there;
                // the R rows' side by side, so that each row's chain of dependent adds does not
                // wait on its own latency (one row at a time, this loop took a tenth of the
                // kernel's time).
                let mut mins = [_mm256_setzero_ps(); R];
                for s in 0..nsub {
                    let cv = _mm256_loadu_ps(c.as_ptr().add(s * 16 + half * 8));
                    for (mins, &(_, _, _, bs)) in mins.iter_mut().zip(&rows) {
                        *mins =
                            _mm256_add_ps(*mins, _mm256_mul_ps(cv, _mm256_set1_ps(*bs.add(s * SUB / 32))));
                    }
                }
                for (acc, mins) in acc.iter_mut().zip(mins) {
                    *acc = _mm256_add_ps(*acc, mins);
                }
            }
            let valid = (n - half * 8).min(8);
            for (r, acc) in acc.iter().enumerate() {
                let v = *acc;
                let dst = out.add((i + r) * ld + half * 8);
                if valid == 8 {
                    _mm256_storeu_ps(dst, v);
                } else {
                    let mut tmp = [0f32; 8];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), v);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, valid);
                }
            }
        }
    }
}
