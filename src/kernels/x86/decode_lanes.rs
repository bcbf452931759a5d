//! The AVX2 decode kernels of many activation rows: one 32-bit lane per activation row, the
//! weights broadcast, as [`lanes_vnni`] does with AVX-512. [`lanes_avx2_k`] for the k-quants
//! (Q6_K; Q4_K through [`lanes_avx2_k_rows`]), [`lanes_avx2`] for the other block formats.
//!
//! Why: the few-row kernels ([`rows_avx2`], [`rows_avx2_k`]) take one or two activation rows
//! per call and sum each (weight row, activation row)'s products across the lanes of a
//! register, unpacks and adds per block and row. A speculative verification pass or an
//! `--each-line` step of 8 rows cost about 5 one-row steps that way on Qwen2.5-Coder-1.5B (Zen 3,
//! 2 threads, `benches/batch_decode`), about 2.7 on this kernel. Here each
//! lane is one activation row's own sum, so there is nothing to sum across lanes: per block and
//! weight row, 8 `vpmaddubsw` for up to 8 activation rows, then one `vpmaddwd`, one conversion,
//! one multiply and one fma for all of them.
//!
//! The arithmetic per (weight row, activation row) is [`rows_avx2_k`]'s exactly (and so the
//! VNNI kernels'): per block the exact integer `P = Σ (u - o)·y` (per 16-value half for Q6_K),
//! `acc = fma(s · dy, P, acc)` block after block, the minimums' `m · ys` summed apart, then
//! `acc + mins`. So which kernel a step takes never changes a sequence's logits.

use std::arch::x86_64::*;

use super::*;

/// The most activation rows one [`lanes_avx2`] pass takes: the 8 lanes of a 256-bit register.
pub const LANES_AVX2: usize = 8;

/// From this many activation rows on, AVX2 CPUs take the many-row kernels.
pub const LANES_AVX2_MIN: usize = 5;

/// Activation rows `i0..i0 + n` laid out for [`lanes_avx2`] (`v` = 1, n ≤ [`LANES_AVX2`]) or
/// for [`paired_avx2_k`] (`v` = 2, n ≤ 4): per block and 4-value group g, a 32-byte
/// vector whose lane l holds row l / v's 4 values (zeros past n), so each row fills `v` lanes
/// side by side; per block, the rows' sums over each 16-value half, scales and block sums in
/// the same lanes.
pub struct LanesAvx2 {
    pub(super) i0: usize,
    pub(super) n: usize,
    /// Lanes per activation row: the weight rows one register holds side by side.
    pub(super) v: usize,
    /// (blocks, 8) vectors.
    pub(super) y: Vec<__m256i>,
    /// (blocks, 2) vectors: row i's `Σ y` over values 0..16 and 16..32 of the block, as i32.
    pub(super) halves: Vec<__m256i>,
    /// (blocks) vectors: row i's `d` in lane i.
    pub(super) d: Vec<__m256>,
    /// (blocks) vectors: row i's block sum `d · Σ q` in lane i (formats with a minimum).
    pub(super) sums: Vec<__m256>,
}

impl LanesAvx2 {
    /// Lays out activation rows `i0..i0 + n` of `x`, each in `v` lanes; `sums` are their block
    /// sums, or empty.
    pub fn new(x: &QuantizedRows, sums: &[f32], i0: usize, n: usize, v: usize) -> Self {
        debug_assert!(matches!(v, 1 | 2) && n * v <= LANES_AVX2 && i0 + n <= x.rows());
        let nb = x.cols / QK;
        let mut bytes = vec![0i8; nb * 8 * 32];
        let mut halves = vec![0i32; nb * 2 * 8];
        let mut d = vec![0f32; nb * 8];
        let mut s = vec![0f32; if sums.is_empty() { 0 } else { nb * 8 }];
        for l in 0..n * v {
            let i = l / v;
            let (di, qs) = x.row(i0 + i);
            for b in 0..nb {
                let q = &qs[b * QK..][..QK];
                for g in 0..8 {
                    bytes[(b * 8 + g) * 32 + 4 * l..][..4].copy_from_slice(&q[4 * g..4 * g + 4]);
                }
                for h in 0..2 {
                    halves[(b * 2 + h) * 8 + l] = q[16 * h..16 * h + 16].iter().map(|&v| i32::from(v)).sum();
                }
                d[b * 8 + l] = di[b];
                if !s.is_empty() {
                    s[b * 8 + l] = sums[(i0 + i) * nb + b];
                }
            }
        }
        // SAFETY: the vector types are plain bytes; the chunks are 32 bytes each.
        let load_b = |c: &[i8]| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<__m256i>()) };
        // SAFETY: as `load_b`: 8 i32s are 32 bytes.
        let load_i = |c: &[i32]| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<__m256i>()) };
        // SAFETY: as `load_b`: 8 f32s are 32 bytes.
        let load_f = |c: &[f32]| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<__m256>()) };
        Self {
            i0,
            n,
            v,
            y: bytes.chunks_exact(32).map(load_b).collect(),
            halves: halves.chunks_exact(8).map(load_i).collect(),
            d: d.chunks_exact(8).map(load_f).collect(),
            sums: s.chunks_exact(8).map(load_f).collect(),
        }
    }
}

/// A many-row AVX2 kernel: weight rows at `w` (R of them, `row_bytes` apart) against the
/// activation rows laid out in a [`LanesAvx2`]; output (i, r) goes to `out[i · stride + r]`.
pub type LanesAvx2Fn = LaidOutFn<LanesAvx2>;

/// The AVX2 kernel for many activation rows (see [`LanesAvx2Fn`]): per weight block, its 8
/// groups of 4 unsigned quants broadcast against the 8 group vectors of [`LanesAvx2`]
/// (`vpmaddubsw`, unsigned weights by signed activations), the pairs summed in i16 as far as
/// they cannot overflow (all 8 groups for Q4_K's u < 16: 8 · 2 · 15 · 127 < 32,768; two for
/// Q6_K's u < 64), widened by one `vpmaddwd`, and `o · Σ y` subtracted: the exact integer per
/// block (per half for Q6_K) of every activation row at once.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` must hold R rows of `row_bytes`, each with the
/// blocks `lanes` was laid out for; `out` must be writable at (i, r) for the lanes' rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn lanes_avx2_k<F: SuperBlock, const R: usize>(
    w: *const u8,
    row_bytes: usize,
    lanes: &LanesAvx2,
    out: *mut f32,
    stride: usize,
) {
    let nb = lanes.d.len();
    let mut acc = [_mm256_setzero_ps(); R];
    let mut mins = [_mm256_setzero_ps(); R];
    let row = |r: usize| w.wrapping_add(if r < R { r * row_bytes } else { 0 });
    // Weight row r's quants of blocks b and b + 1, for broadcasting from memory.
    let mut quants = [[0f32; 16]; R];
    // SAFETY: (all reads and writes) within the rows, blocks and outputs of the contract (a
    // k-quant row is whole super-blocks); the missing rows of an R < 4 call read row 0 again.
    unsafe {
        for g in 0..nb / 8 {
            let [first, second, min] = scale_tables::<F>([row(0), row(1), row(2), row(3)], g);
            for p in 0..4 {
                let b = 8 * g + 2 * p;
                let ahead = ahead::<R>(b * F::BYTES_PER_BLOCK, row_bytes);
                for (r, q) in quants.iter_mut().enumerate() {
                    _mm_prefetch::<_MM_HINT_T0>(row(r).wrapping_add(ahead).cast());
                    let (u0, u1) = F::quants_pair_avx2(row(r), b);
                    _mm256_storeu_si256(q.as_mut_ptr().cast(), u0);
                    _mm256_storeu_si256(q.as_mut_ptr().add(8).cast(), u1);
                }
                for k in 0..2 {
                    let bb = b + k;
                    let dy = lanes.d[bb];
                    for r in 0..R {
                        let q = quants[r].as_ptr().add(8 * k);
                        let at = 4 * k + r;
                        if F::SPLIT {
                            let lo = exact_products::<F>(q, lanes, bb, Some(0));
                            let hi = exact_products::<F>(q, lanes, bb, Some(1));
                            let (s0, s1) = (_mm256_set1_ps(first[p][at]), _mm256_set1_ps(second[p][at]));
                            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s0, dy), lo, acc[r]);
                            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s1, dy), hi, acc[r]);
                        } else {
                            let sum = exact_products::<F>(q, lanes, bb, None);
                            let s = _mm256_set1_ps(first[p][at]);
                            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s, dy), sum, acc[r]);
                        }
                        if F::MIN {
                            let m = _mm256_set1_ps(min[p][at]);
                            mins[r] = _mm256_add_ps(mins[r], _mm256_mul_ps(m, lanes.sums[bb]));
                        }
                    }
                }
            }
        }
        store_lanes::<F, R>(&acc, &mins, lanes, out, stride);
    }
}

/// [`lanes_avx2_k`] for Q4_K, P of its R weight rows at a time (P divides R): each row's
/// super-block quants unpacked into a buffer the compiler cannot see through (so each group is
/// one broadcast load), and each activation group loaded once for the P rows. Each row's blocks
/// accumulate in block order as in [`lanes_avx2_k`], so the results are the same bits.
///
/// Measured with 8 activation rows on the 1.5B's ffn_gate and ffn_up (Zen 3, 2 threads, in
/// cache, `benches/formats.rs`, alternating rounds; `benches/results/2026-12-07-epyc-79634cf.md`):
/// P = 2 ran 28 to 40% faster than [`lanes_avx2_k`], whose 4 rows side by side kept their sums
/// on the stack, and P = 4 another 14 to 37% faster. On Q6_K (two scales a block, two rounds
/// of i16 sums) P = 2 and P = 4 both ran slower, so Q6_K keeps [`lanes_avx2_k`].
///
/// # Safety
/// As [`lanes_avx2_k`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn lanes_avx2_k_rows<F: SuperBlock, const R: usize, const P: usize>(
    w: *const u8,
    row_bytes: usize,
    lanes: &LanesAvx2,
    out: *mut f32,
    stride: usize,
) {
    debug_assert!(!F::SPLIT && R.is_multiple_of(P));
    let nb = lanes.d.len();
    let mut acc = [_mm256_setzero_ps(); R];
    let mut mins = [_mm256_setzero_ps(); R];
    let row = |r: usize| w.wrapping_add(if r < R { r * row_bytes } else { 0 });
    // P weight rows' quants of a super-block's 8 blocks, for broadcasting from memory.
    let mut quants = [[_mm256_setzero_si256(); 8]; P];
    // SAFETY: (all reads and writes) within the rows, blocks and outputs of the contract (a
    // k-quant row is whole super-blocks); the missing rows of an R < 4 call read row 0 again.
    unsafe {
        for g in 0..nb / 8 {
            let [first, _, min] = scale_tables::<F>([row(0), row(1), row(2), row(3)], g);
            // P weight rows at a time, each activation group loaded once for all of them. Each
            // row's 8 blocks accumulate in block order, so the nesting does not change a bit.
            for r0 in (0..R).step_by(P) {
                let rows: [usize; P] = std::array::from_fn(|i| r0 + i);
                for (&r, quants) in rows.iter().zip(quants.iter_mut()) {
                    for p in 0..4 {
                        let b = 8 * g + 2 * p;
                        let ahead = ahead::<R>(b * F::BYTES_PER_BLOCK, row_bytes);
                        _mm_prefetch::<_MM_HINT_T0>(row(r).wrapping_add(ahead).cast());
                        (quants[2 * p], quants[2 * p + 1]) = F::quants_pair_avx2(row(r), b);
                    }
                }
                // Opaque, so that the groups are broadcast from memory (one load each) and not
                // rebuilt from the registers just stored (two shuffles each).
                let all = std::hint::black_box(&mut quants);
                let q: [*const f32; P] = std::array::from_fn(|i| all[i].as_ptr().cast::<f32>());
                let (mut a, mut m) = (rows.map(|r| acc[r]), rows.map(|r| mins[r]));
                for k in 0..8 {
                    let (bb, p) = (8 * g + k, k / 2);
                    let at = rows.map(|r| 4 * (k % 2) + r);
                    let dy = lanes.d[bb];
                    let qk = q.map(|q| q.add(8 * k));
                    let sum = products_n::<F, P>(qk, lanes, bb);
                    for i in 0..P {
                        let s = _mm256_set1_ps(first[p][at[i]]);
                        a[i] = _mm256_fmadd_ps(_mm256_mul_ps(s, dy), sum[i], a[i]);
                    }
                }
                // The minimums' sums apart, block after block as before: in the loop above,
                // their P accumulators left too few registers for its own, which went to the
                // stack, and each block's fma waited on a load and a store.
                if F::MIN {
                    for k in 0..8 {
                        let (bb, p) = (8 * g + k, k / 2);
                        let at = rows.map(|r| 4 * (k % 2) + r);
                        for i in 0..P {
                            let mv = _mm256_set1_ps(min[p][at[i]]);
                            m[i] = _mm256_add_ps(m[i], _mm256_mul_ps(mv, lanes.sums[bb]));
                        }
                    }
                }
                for i in 0..P {
                    (acc[rows[i]], mins[rows[i]]) = (a[i], m[i]);
                }
            }
        }
        store_lanes::<F, R>(&acc, &mins, lanes, out, stride);
    }
}

/// [`lanes_avx2_k`] for the formats of plain 32-value blocks (Q8_0, Q5_0, Q4_0, Q4_1, Q5_1,
/// IQ4_NL, IQ4_XS), each block decoded by [`Decode::block`]: the unsigned quants broadcast
/// as they are, their pairs summed in i16 over [`Decode::I16_GROUPS`] groups, or for `o = 128`
/// the signed values by llama.cpp's sign trick, `|w| · (y · sign(w))`, a group at a time.
/// The arithmetic per (weight row, activation row) is [`rows_avx2`]'s.
///
/// # Safety
/// As [`lanes_avx2_k`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn lanes_avx2<F: Decode, const R: usize>(
    w: *const u8,
    row_bytes: usize,
    lanes: &LanesAvx2,
    out: *mut f32,
    stride: usize,
) {
    debug_assert!(!F::SPLIT);
    let nb = lanes.d.len();
    let mut acc = [_mm256_setzero_ps(); R];
    let mut mins = [_mm256_setzero_ps(); R];
    // SAFETY: (all reads and writes) within the rows, blocks and outputs of the contract.
    unsafe {
        for b in 0..nb {
            let dy = lanes.d[b];
            for r in 0..R {
                let row = w.add(r * row_bytes);
                _mm_prefetch::<_MM_HINT_T0>(
                    row.wrapping_add(ahead::<R>(b * F::BYTES_PER_BLOCK, row_bytes)).cast(),
                );
                let block = F::block(row, b);
                // For broadcasting from memory: the signed values for o = 128, else the quants.
                let mut q = [0f32; 8];
                let v = if F::OFFSET == 128 { flip(block.u) } else { block.u };
                _mm256_storeu_si256(q.as_mut_ptr().cast(), v);
                let sum = exact_products::<F>(q.as_ptr(), lanes, b, None);
                let s = _mm256_set1_ps(block.s[0]);
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s, dy), sum, acc[r]);
                if F::MIN {
                    mins[r] = _mm256_add_ps(mins[r], _mm256_mul_ps(_mm256_set1_ps(block.m), lanes.sums[b]));
                }
            }
        }
        store_lanes::<F, R>(&acc, &mins, lanes, out, stride);
    }
}

/// Super-block g's scales, their second halves' ([`Decode::SPLIT`]) and minimums
/// ([`Decode::MIN`]) of four weight rows ([`SuperBlock::scales_avx2`]) as tables: per pair of
/// blocks p, lane 4k + r holds row r's value for block 2p + k (zeros where the format has none).
///
/// # Safety
/// As [`SuperBlock::scales_avx2`].
#[inline(always)]
pub(super) unsafe fn scale_tables<F: SuperBlock>(rows: [*const u8; 4], g: usize) -> [[[f32; 8]; 4]; 3] {
    let mut tables = [[[0f32; 8]; 4]; 3];
    // SAFETY: the caller's contract; each table row is 8 f32s.
    unsafe {
        let scales = F::scales_avx2(rows, g);
        for (table, (vectors, used)) in
            tables.iter_mut().zip([(scales.first, true), (scales.second, F::SPLIT), (scales.min, F::MIN)])
        {
            if used {
                for (row, v) in table.iter_mut().zip(vectors) {
                    _mm256_storeu_ps(row.as_mut_ptr(), v);
                }
            }
        }
    }
    tables
}

/// The exact integer `P = Σ (u - o)·y` of every lane (activation row) over half `h` of block
/// `b`, or over the whole block for `None`, as f32: the weight's 4-byte groups at `q` broadcast
/// from memory against the lanes' groups, their `vpmaddubsw` pairs summed in i16 over
/// [`Decode::I16_GROUPS`] groups before one `vpmaddwd` widens them, then `o · Σ y` subtracted;
/// for `o = 128` (signed values at `q`) llama.cpp's sign trick, `|w| · (y · sign(w))`, a group
/// at a time. (No target features of its own; always inlined into the kernels, which have them.)
///
/// # Safety
/// The CPU must have AVX2; `q` must hold the block's 8 groups.
#[inline(always)]
unsafe fn exact_products<F: Decode>(q: *const f32, lanes: &LanesAvx2, b: usize, h: Option<usize>) -> __m256 {
    let y = &lanes.y[b * 8..b * 8 + 8];
    let (first, end) = h.map_or((0, 8), |h| (4 * h, 4 * h + 4));
    // SAFETY: the caller's contract.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let group = |j: usize| _mm256_castps_si256(_mm256_broadcast_ss(&*q.add(j)));
        let mut sum = _mm256_setzero_si256();
        if F::I16_GROUPS == 0 {
            for (j, &y) in y.iter().enumerate().take(end).skip(first) {
                let wj = group(j);
                let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(wj, wj), _mm256_sign_epi8(y, wj));
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, ones));
            }
            return _mm256_cvtepi32_ps(sum);
        }
        for j0 in (first..end).step_by(F::I16_GROUPS) {
            let mut part = _mm256_maddubs_epi16(group(j0), y[j0]);
            for (j, &y) in y.iter().enumerate().take((j0 + F::I16_GROUPS).min(end)).skip(j0 + 1) {
                part = _mm256_add_epi16(part, _mm256_maddubs_epi16(group(j), y));
            }
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(part, ones));
        }
        if F::OFFSET != 0 {
            let ys = match h {
                Some(h) => lanes.halves[2 * b + h],
                None => _mm256_add_epi32(lanes.halves[2 * b], lanes.halves[2 * b + 1]),
            };
            sum = _mm256_sub_epi32(sum, _mm256_mullo_epi32(ys, _mm256_set1_epi32(i32::from(F::OFFSET))));
        }
        _mm256_cvtepi32_ps(sum)
    }
}

/// [`exact_products`] over a whole block, of P weight rows at once (`q[i]`), for the formats
/// summed in i16 ([`Decode::I16_GROUPS`] > 0): each activation group is loaded once for all.
///
/// # Safety
/// As [`exact_products`], for each of the P rows.
#[inline(always)]
unsafe fn products_n<F: Decode, const P: usize>(
    q: [*const f32; P],
    lanes: &LanesAvx2,
    b: usize,
) -> [__m256; P] {
    debug_assert!(F::I16_GROUPS > 0);
    let y = &lanes.y[b * 8..b * 8 + 8];
    // SAFETY: the caller's contract.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let group = |i: usize, j: usize| _mm256_castps_si256(_mm256_broadcast_ss(&*q[i].add(j)));
        let mut sum = [_mm256_setzero_si256(); P];
        for j0 in (0..8).step_by(F::I16_GROUPS) {
            let mut part = [_mm256_setzero_si256(); P];
            for (j, &y) in y.iter().enumerate().take((j0 + F::I16_GROUPS).min(8)).skip(j0) {
                for (i, part) in part.iter_mut().enumerate() {
                    let pairs = _mm256_maddubs_epi16(group(i, j), y);
                    *part = if j == j0 { pairs } else { _mm256_add_epi16(*part, pairs) };
                }
            }
            for (sum, part) in sum.iter_mut().zip(part) {
                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(part, ones));
            }
        }
        if F::OFFSET != 0 {
            let ys = _mm256_add_epi32(lanes.halves[2 * b], lanes.halves[2 * b + 1]);
            let off = _mm256_mullo_epi32(ys, _mm256_set1_epi32(i32::from(F::OFFSET)));
            sum = sum.map(|s| _mm256_sub_epi32(s, off));
        }
        sum.map(|s| _mm256_cvtepi32_ps(s))
    }
}

/// Writes weight row r's outputs `acc[r] (+ mins[r])` for the lanes' activation rows.
///
/// # Safety
/// `out` must be writable at (i, r) for the lanes' rows.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_lanes<F: Decode, const R: usize>(
    acc: &[__m256; R],
    mins: &[__m256; R],
    lanes: &LanesAvx2,
    out: *mut f32,
    stride: usize,
) {
    debug_assert_eq!(lanes.v, 1);
    for r in 0..R {
        let v = if F::MIN { _mm256_add_ps(acc[r], mins[r]) } else { acc[r] };
        let mut o = [0f32; 8];
        // SAFETY: the caller's contract.
        unsafe {
            _mm256_storeu_ps(o.as_mut_ptr(), v);
            for (i, &o) in o.iter().enumerate().take(lanes.n) {
                *out.add((lanes.i0 + i) * stride + r) = o;
            }
        }
    }
}
