//! Attention over the f16 KV cache: one query row when decoding, a causal batch in prefill.

use anyhow::{Result, bail};
use half::f16;

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{Isa, Level, SendPtr};

/// Single-query attention for decoding: the `n_q` queries (n_q, hd) that share one KV head,
/// already scaled and rotated, over that head's cached keys and values (len, hd) in f16, each
/// given in two runs (a ring's span wraps; the second run is empty when it does not); writes
/// the softmax-weighted values to `out` (n_q, hd).
///
/// The positions are split into spans handed out over the pool; each span yields its own
/// running maximum, sum of exponentials and unnormalized output per query (the split-softmax
/// of "flash decoding"), and the spans are merged exactly at the end. One pass over the cache,
/// and both cores stream it: at a long context the cache is megabytes per layer.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    isa: Isa,
    q: &[f32],
    n_q: usize,
    hd: usize,
    softcap: Option<f32>,
    k: [&[f16]; 2],
    v: [&[f16]; 2],
    out: &mut [f32],
) -> Result<()> {
    let (k_len, v_len) = (k[0].len() + k[1].len(), v[0].len() + v[1].len());
    let len = k_len / hd.max(1);
    if hd == 0
        || len == 0
        || q.len() != n_q * hd
        || k_len != len * hd
        || v[0].len() != k[0].len()
        || v[1].len() != k[1].len()
        || out.len() != q.len()
    {
        bail!("internal error: attention over {k_len} keys and {v_len} values of width {hd}");
    }
    const SPAN: usize = 128;
    let spans = len.div_ceil(SPAN);
    // Per span: n_q maxima, n_q sums, n_q · hd outputs.
    let stride = n_q * (2 + hd);
    let mut partials = vec![0f32; spans * stride];
    let parts = SendPtr(partials.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(spans, |range| {
        let mut scores = vec![0f32; n_q * SPAN];
        // A span that straddles the two runs is copied whole here, so that every span is
        // computed as it would be over one contiguous cache.
        let (mut k_joined, mut v_joined) = (Vec::new(), Vec::new());
        for span in range {
            let t0 = span * SPAN;
            let n = SPAN.min(len - t0);
            // SAFETY: each span writes only its own `stride` values of `partials`, which
            // outlives the pool's execution of this closure.
            let part = unsafe { std::slice::from_raw_parts_mut(parts.get().add(span * stride), stride) };
            let (stats, acc) = part.split_at_mut(2 * n_q);
            let k = contiguous(k, t0 * hd, n * hd, &mut k_joined);
            let v = contiguous(v, t0 * hd, n * hd, &mut v_joined);
            key_scores(isa, q, n_q, hd, k, &mut scores, SPAN);
            for i in 0..n_q {
                let s = &mut scores[i * SPAN..i * SPAN + n];
                if let Some(cap) = softcap {
                    soft_cap(s, cap);
                }
                let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0f32;
                for st in s.iter_mut() {
                    *st = (*st - max).exp();
                    sum += *st;
                }
                stats[i] = max;
                stats[n_q + i] = sum;
            }
            value_sums(isa, &scores, SPAN, n_q, hd, v, acc);
        }
    });
    // Merge: out_i = Σ_span e^(m_span - M) · acc_span / Σ_span e^(m_span - M) · l_span.
    for (i, out_i) in out.chunks_exact_mut(hd).enumerate() {
        let max = partials.chunks_exact(stride).fold(f32::NEG_INFINITY, |m, p| m.max(p[i]));
        out_i.fill(0.0);
        let mut total = 0f32;
        for p in partials.chunks_exact(stride) {
            let w = (p[i] - max).exp();
            total += w * p[n_q + i];
            for (o, &a) in out_i.iter_mut().zip(&p[2 * n_q + i * hd..2 * n_q + (i + 1) * hd]) {
                *o += w * a;
            }
        }
        for o in out_i.iter_mut() {
            *o /= total;
        }
    }
    Ok(())
}

/// Elements `from..from + n` of the concatenation of `runs`: a slice of one run, or a copy in
/// `scratch` when they straddle both.
fn contiguous<'a>(runs: [&'a [f16]; 2], from: usize, n: usize, scratch: &'a mut Vec<f16>) -> &'a [f16] {
    let [a, b] = runs;
    if from + n <= a.len() {
        &a[from..from + n]
    } else if from >= a.len() {
        &b[from - a.len()..from - a.len() + n]
    } else {
        scratch.clear();
        scratch.extend_from_slice(&a[from..]);
        scratch.extend_from_slice(&b[..n - (a.len() - from)]);
        scratch
    }
}

/// The grid, in absolute positions, on which batch attention sums values: one piece of keys at
/// a time, every piece starting at a multiple of this. The caller gives keys from a multiple of
/// it (or from 0), and a ring keeps that many positions before its window.
pub const KEY_GRID: usize = 64;

/// The first key a query at `pos` reads in batch attention: its window's start, down to the
/// key grid (0 without a window). The model gives a batch its keys from here, and a ring keeps
/// them.
pub fn first_key(pos: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w) / KEY_GRID * KEY_GRID)
}

/// The geometry of a batch's attention: queries at positions `pos..pos + seq`, keys cached
/// from position `kv_start`, and the layer's sliding window.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub pos: usize,
    pub seq: usize,
    pub kv_start: usize,
    pub window: Option<usize>,
    /// Scores are soft-capped, `cap · tanh(s / cap)`, before the softmax (Gemma 2).
    pub softcap: Option<f32>,
}

/// Causal attention for a batch of queries (prefill): `q` is (seq, n_head, hd), already scaled
/// and rotated; `k` and `v` are (n_kv, kv_len, hd) for positions `kv_start..pos + seq`; the
/// result is (seq, n_head · hd).
///
/// Work items are (KV head, block of queries), handed out over the pool, the costliest (last)
/// blocks first so that no thread is left with a long item at the end. An item takes the
/// block's queries of every head that shares the KV head, (block · n_rep, hd) rows, and
/// multiplies them only with the keys some of them can see (causal, and within the window),
/// with a single-threaded GEMM from the `gemm` crate (the one candle uses): the keys and values
/// are packed once for all the heads of the group, masked scores are mostly never computed,
/// and no second thread pool competes for the cores.
pub fn attend_batch(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_head: usize,
    n_kv: usize,
    hd: usize,
    span: Span,
) -> Result<Vec<f32>> {
    let Span { pos, seq, kv_start, window, softcap } = span;
    let kv_len = pos + seq - kv_start;
    if n_kv == 0
        || !n_head.is_multiple_of(n_kv)
        || q.len() != seq * n_head * hd
        || k.len() != n_kv * kv_len * hd
        || v.len() != k.len()
    {
        bail!("internal error: batch attention over {} queries and {} keys", q.len(), k.len());
    }
    let n_rep = n_head / n_kv;
    // Queries per item: about 128 rows of (query, head) per GEMM, in blocks of at least 8.
    let qb = (128 / n_rep).clamp(8, 64);
    let blocks = seq.div_ceil(qb);
    let row = n_head * hd;
    let mut out = vec![0f32; seq * row];
    let out_ptr = SendPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(n_kv * blocks, |items| {
        let (mut scores, mut qs, mut os) = (Vec::new(), Vec::new(), Vec::new());
        for item in items {
            // The last blocks first: they see the most keys.
            let (g, b) = (item % n_kv, blocks - 1 - item / n_kv);
            let (i0, i1) = (b * qb, seq.min((b + 1) * qb));
            // Keys any query of the block sees: up to the last query, from the first query's
            // window start.
            // window start, down to the key grid (see `KEY_GRID`).
            let lo = first_key(pos + i0, window).max(kv_start);
            let hi = pos + i1;
            // Rows (query i, head r of the group), i in i0..i1, r < n_rep.
            let (m, n) = ((i1 - i0) * n_rep, hi - lo);
            qs.clear();
            for i in i0..i1 {
                qs.extend_from_slice(&q[i * row + g * n_rep * hd..i * row + (g + 1) * n_rep * hd]);
            }
            scores.clear();
            scores.resize(m * n, 0f32);
            let kg = &k[(g * kv_len + lo - kv_start) * hd..];
            let vg = &v[(g * kv_len + lo - kv_start) * hd..];
            // SAFETY: the (m, hd) queries times the (hd, n) transposed keys into this item's
            // own (m, n) scores, all within their buffers.
            unsafe {
                gemm_one_thread(
                    (m, n, hd),
                    (scores.as_mut_ptr(), n),
                    (qs.as_ptr(), hd),
                    (kg.as_ptr(), 1, hd),
                    false,
                )
            };
            for (r, s) in scores.chunks_exact_mut(n).enumerate() {
                let p = pos + i0 + r / n_rep;
                // Visible keys: lo + t within [p + 1 - window, p].
                let first = window.map_or(0, |w| (p + 1).saturating_sub(w).saturating_sub(lo));
                let last = p + 1 - lo; // exclusive
                if let Some(cap) = softcap {
                    soft_cap(&mut s[first..last], cap);
                }
                let max = s[first..last].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0f32;
                for x in &mut s[first..last] {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                s[..first].fill(0.0);
                s[last..].fill(0.0);
                for x in &mut s[first..last] {
                    *x *= inv;
                }
            }
            os.clear();
            os.resize(m * hd, 0f32);
            // The values summed a grid piece of keys at a time, each piece added to the rows in
            // turn: a query's sum then does not depend on which block it is in (where its span
            // starts, how long it is), only on its own keys; the GEMM would split a long span
            // where its own blocking falls.
            let mut c = lo;
            while c < hi {
                let end = hi.min((c / KEY_GRID + 1) * KEY_GRID);
                let (scores, vg) = (&scores[c - lo..], &vg[(c - lo) * hd..]);
                // SAFETY: (m, end - c) probabilities (rows n apart) times (end - c, hd) values,
                // added to the item's (m, hd) rows.
                unsafe {
                    gemm_one_thread(
                        (m, hd, end - c),
                        (os.as_mut_ptr(), hd),
                        (scores.as_ptr(), n),
                        (vg.as_ptr(), hd, 1),
                        c > lo,
                    )
                };
                c = end;
            }
            for (i, o) in (i0..i1).zip(os.chunks_exact(n_rep * hd)) {
                // SAFETY: row i's columns of the heads of group g belong to this item alone.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        o.as_ptr(),
                        out_ptr.get().add(i * row + g * n_rep * hd),
                        n_rep * hd,
                    )
                };
            }
        }
    });
    Ok(out)
}

/// `cap · tanh(s / cap)` for each score, as ggml's attention soft-cap.
fn soft_cap(scores: &mut [f32], cap: f32) {
    for s in scores {
        *s = cap * (*s / cap).tanh();
    }
}

/// `dst (m, n) = lhs (m, k) · rhs (k, n)` (or `dst += …` when `add`) on the calling thread with
/// the `gemm` crate. `dst` and `lhs` are given with their row stride (their elements within a
/// row are contiguous), `rhs` with its row and column strides.
///
/// # Safety
/// The pointers and strides must describe memory valid for those shapes, and `dst` must not
/// overlap the inputs.
pub(super) unsafe fn gemm_one_thread(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    (lhs, lhs_rs): (*const f32, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    add: bool,
) {
    // SAFETY: the caller's contract. dst = a · dst + 1 · lhs · rhs, reading dst only when
    // adding (a = 1).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            add,
            lhs,
            1,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            if add { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `a · b` for f32 `a` and f16 `b`.
fn dot_f16(isa: Isa, a: &[f32], b: &[f16]) -> f32 {
    match isa.0 {
        // SAFETY: an `Isa` exists only for instruction sets this CPU has (see `Isa`).
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni | Level::Avx2 if a.len() == b.len() => unsafe { x86::dot_f16(a, b) },
        _ => a.iter().zip(b).map(|(&x, &y)| x * y.to_f32()).sum(),
    }
}

/// `scores[i · stride + t] = q_i · k_t` for the `n_q` query rows of `q` (rows of `hd`) and
/// every key row of `k`. With AVX-512, 1 to 8 queries per KV head and `hd` a multiple of
/// 32, in 512-bit registers with each key converted from f16 once for all the queries.
fn key_scores(isa: Isa, q: &[f32], n_q: usize, hd: usize, k: &[f16], scores: &mut [f32], stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if isa.0 == Level::Avx512Vnni && hd.is_multiple_of(32) {
        let n = k.len() / hd;
        // SAFETY: an `Isa` exists only for instruction sets this CPU has (see `Isa`); the
        // kernels check the lengths.
        unsafe {
            match n_q {
                1 => return x86::key_scores_avx512::<1>(q, hd, k, n, scores, stride),
                2 => return x86::key_scores_avx512::<2>(q, hd, k, n, scores, stride),
                3 => return x86::key_scores_avx512::<3>(q, hd, k, n, scores, stride),
                4 => return x86::key_scores_avx512::<4>(q, hd, k, n, scores, stride),
                5 => return x86::key_scores_avx512::<5>(q, hd, k, n, scores, stride),
                6 => return x86::key_scores_avx512::<6>(q, hd, k, n, scores, stride),
                7 => return x86::key_scores_avx512::<7>(q, hd, k, n, scores, stride),
                8 => return x86::key_scores_avx512::<8>(q, hd, k, n, scores, stride),
                _ => {}
            }
        }
    }
    for (i, qi) in q.chunks_exact(hd).enumerate() {
        for (st, kt) in scores[i * stride..].iter_mut().zip(k.chunks_exact(hd)) {
            *st = dot_f16(isa, qi, kt);
        }
    }
}

/// `acc_i = Σ_t scores[i · stride + t] · v_t` for the `n_q` rows of `acc` (rows of `hd`).
/// With AVX-512, 1 to 8 rows and `hd` a multiple of 32, 32 columns at a time with the
/// sums kept in registers over all the positions.
fn value_sums(isa: Isa, scores: &[f32], stride: usize, n_q: usize, hd: usize, v: &[f16], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.0 == Level::Avx512Vnni && hd.is_multiple_of(32) {
        let n = v.len() / hd;
        // SAFETY: as in `key_scores`.
        unsafe {
            match n_q {
                1 => return x86::value_sums_avx512::<1>(scores, stride, hd, v, n, acc),
                2 => return x86::value_sums_avx512::<2>(scores, stride, hd, v, n, acc),
                3 => return x86::value_sums_avx512::<3>(scores, stride, hd, v, n, acc),
                4 => return x86::value_sums_avx512::<4>(scores, stride, hd, v, n, acc),
                5 => return x86::value_sums_avx512::<5>(scores, stride, hd, v, n, acc),
                6 => return x86::value_sums_avx512::<6>(scores, stride, hd, v, n, acc),
                7 => return x86::value_sums_avx512::<7>(scores, stride, hd, v, n, acc),
                8 => return x86::value_sums_avx512::<8>(scores, stride, hd, v, n, acc),
                _ => {}
            }
        }
    }
    acc.fill(0.0);
    for (t, vt) in v.chunks_exact(hd).enumerate() {
        for (i, acc_i) in acc.chunks_exact_mut(hd).enumerate() {
            axpy_f16(isa, acc_i, scores[i * stride + t], vt);
        }
    }
}

/// `acc += p · v` for f16 `v`.
fn axpy_f16(isa: Isa, acc: &mut [f32], p: f32, v: &[f16]) {
    match isa.0 {
        // SAFETY: as for `dot_f16`.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni | Level::Avx2 if acc.len() == v.len() => unsafe { x86::axpy_f16(acc, p, v) },
        _ => {
            for (a, &x) in acc.iter_mut().zip(v) {
                *a += p * x.to_f32();
            }
        }
    }
}
