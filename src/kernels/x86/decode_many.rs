//! The x86 decode kernels of many activation rows at once (AVX-512 VNNI): [`pairs_vnni`] for
//! 6 to 8 rows, [`lanes_vnni`] for 9 to 15 per pass (see `decode.rs`).

use std::arch::x86_64::*;

use super::*;

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
    pub(super) i0: usize,
    pub(super) n: usize,
    /// Blocks per row.
    pub(super) nb: usize,
    /// (pairs, 8) vectors: lane i the 4 signed values of group g of row i's block.
    pub(super) y: Vec<__m512i>,
    /// (pairs, 2) vectors: the sums of each block's values 0..16 and 16..32, as i32.
    pub(super) halves: Vec<__m512i>,
    /// (pairs) vectors: the blocks' scales `d`.
    pub(super) d: Vec<__m512>,
    /// (pairs) vectors: the block sums `d · Σ q` (formats with a minimum).
    pub(super) sums: Vec<__m512>,
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
    /// For [`lanes_avx2`], in chunks of at most [`LANES_AVX2`] rows.
    LanesAvx2(Vec<LanesAvx2>),
    /// For [`paired_avx2_k`]: 3 or 4 rows, each in two lanes.
    PairedAvx2(LanesAvx2),
}

/// A kernel of laid-out activation rows: weight rows at `w` (R of them, `row_bytes` apart)
/// against the rows laid out in an `L`; output (i, r) goes to `out[i · stride + r]`.
pub type LaidOutFn<L> = unsafe fn(*const u8, usize, &L, *mut f32, usize);

/// A pair kernel (see [`LaidOutFn`]).
pub type PairsFn = LaidOutFn<Pairs>;

/// Runs `kernels` ([4 weight rows, 1 row]) over weight rows `range` of `w`, four at a time and
/// one at a time at the end, against each of `chunks`.
///
/// # Safety
/// As the kernels': the chunks lay out activation rows of `w`'s width, and the outputs of
/// weight rows `range` for the chunks' rows are this call's alone.
#[allow(clippy::too_many_arguments)]
pub unsafe fn by_weight_rows<L>(
    kernels: [LaidOutFn<L>; 2],
    chunks: &[L],
    w: &[u8],
    row_bytes: usize,
    range: std::ops::Range<usize>,
    out: *mut f32,
    stride: usize,
) {
    let mut r = range.start;
    while r < range.end {
        let (k, kernel) = if r + 4 <= range.end { (4, kernels[0]) } else { (1, kernels[1]) };
        for chunk in chunks {
            // SAFETY: the caller's contract; rows r..r + k are whole rows of `w`.
            unsafe { kernel(w.as_ptr().add(r * row_bytes), row_bytes, chunk, out.add(r), stride) };
        }
        r += k;
    }
}

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
pub(super) unsafe fn pairs_vnni<F: Decode, const R: usize>(
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
                _mm_prefetch::<_MM_HINT_T0>(
                    row.wrapping_add(ahead::<R>(b * F::BYTES_PER_BLOCK, row_bytes)).cast(),
                );
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
    pub(super) i0: usize,
    pub(super) n: usize,
    /// (blocks, 8) vectors.
    pub(super) y: Vec<__m512i>,
    /// (blocks) vectors of 16 f32: row i's `d` in lane i.
    pub(super) d: Vec<__m512>,
    /// (blocks) vectors: row i's block sum `d · Σ q` in lane i (formats with a minimum).
    pub(super) sums: Vec<__m512>,
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
pub(super) unsafe fn lanes_vnni<F: Decode, const R: usize>(
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
                _mm_prefetch::<_MM_HINT_T0>(
                    row.wrapping_add(ahead::<R>(b * F::BYTES_PER_BLOCK, row_bytes)).cast(),
                );
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
