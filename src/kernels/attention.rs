//! Attention over the f16 KV cache: one query row when decoding, a causal batch in prefill.

use anyhow::{Result, bail};
use half::f16;

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{Isa, Level, SendPtr};

/// The keys (and values) of one attention span: [`SPAN`] of them, from the first key the query
/// sees; each span is reduced on its own and the spans merged, the same way whichever pass the
/// query is in.
const SPAN: usize = 128;

/// Single-query attention for decoding: the `n_q` queries (n_q, hd) that share one KV head,
/// already scaled and rotated, over that head's cached keys and values (len, hd) in f16, each
/// given in two runs (a ring's span wraps; the second run is empty when it does not); writes
/// the softmax-weighted values to `out` (n_q, hd).
///
/// The positions are split into spans of 128 handed out over the pool; each span yields
/// its own running maximum, sum of exponentials and unnormalized output per query (the
/// split-softmax of "flash decoding"), and the spans are merged at the end in their order. One
/// pass over the cache, and both cores stream it: at a long context the cache is megabytes per
/// layer. [`attend_batch`] computes each of a prompt's queries the same way, so a query's
/// result does not depend on the pass it is in or on the number of threads.
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
    let spans = len.div_ceil(SPAN);
    let stride = n_q * (2 + hd);
    let mut partials = vec![0f32; spans * stride];
    let parts = SendPtr(partials.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(spans, |range| {
        let mut scratch = Scratch::default();
        for span in range {
            // SAFETY: each span writes only its own `stride` values of `partials`, which
            // outlives the pool's execution of this closure.
            let part = unsafe { std::slice::from_raw_parts_mut(parts.get().add(span * stride), stride) };
            span_partial(isa, q, n_q, hd, softcap, (k, v), span, part, &mut scratch);
        }
    });
    merge(&partials, n_q, hd, out);
    Ok(())
}

/// A thread's buffers for [`span_partial`].
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    k: Vec<f16>,
    v: Vec<f16>,
}

/// Span `span` of single-query attention (see [`attend`]): into `part`, the `n_q` queries'
/// maxima, sums of exponentials and unnormalized outputs (n_q, hd) over keys
/// `span · SPAN..` of the runs.
#[allow(clippy::too_many_arguments)]
fn span_partial(
    isa: Isa,
    q: &[f32],
    n_q: usize,
    hd: usize,
    softcap: Option<f32>,
    (k, v): ([&[f16]; 2], [&[f16]; 2]),
    span: usize,
    part: &mut [f32],
    scratch: &mut Scratch,
) {
    let len = (k[0].len() + k[1].len()) / hd;
    let t0 = span * SPAN;
    let n = SPAN.min(len - t0);
    let Scratch { scores, k: k_joined, v: v_joined } = scratch;
    scores.resize(n_q * SPAN, 0.0);
    let (stats, acc) = part.split_at_mut(2 * n_q);
    // A span that straddles the two runs is copied whole, so that every span is computed as
    // it would be over one contiguous cache.
    let k = contiguous(k, t0 * hd, n * hd, k_joined);
    let v = contiguous(v, t0 * hd, n * hd, v_joined);
    key_scores(isa, q, n_q, hd, k, scores, SPAN);
    for i in 0..n_q {
        let s = &mut scores[i * SPAN..i * SPAN + n];
        if let Some(cap) = softcap {
            soft_cap(s, cap);
        }
        let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        stats[i] = max;
        stats[n_q + i] = exp_sum(isa, s, max);
    }
    value_sums(isa, scores, SPAN, n_q, hd, v, acc);
}

/// `s_t = e^(s_t - max)` for every score, and their sum.
pub(super) fn exp_sum(isa: Isa, s: &mut [f32], max: f32) -> f32 {
    match isa.0 {
        // SAFETY: an `Isa` exists only for instruction sets this CPU has (see `Isa`).
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni | Level::Avx2 => unsafe { x86::exp_sum(s, max) },
        _ => {
            let mut sum = 0f32;
            for st in s.iter_mut() {
                *st = (*st - max).exp();
                sum += *st;
            }
            sum
        }
    }
}

/// Merges the spans' partials (each `n_q · (2 + hd)` values, in span order) into `out` (n_q,
/// hd): `out_i = Σ_span e^(m_span - M) · acc_span / Σ_span e^(m_span - M) · l_span`.
fn merge(partials: &[f32], n_q: usize, hd: usize, out: &mut [f32]) {
    let stride = n_q * (2 + hd);
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

/// The first key a query at `pos` sees: its window's start (0 without a window).
pub fn first_key(pos: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w))
}

/// The geometry of a batch's attention: queries at positions `pos..pos + seq`, and the
/// layer's sliding window.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub pos: usize,
    pub seq: usize,
    pub window: Option<usize>,
    /// Scores are soft-capped, `cap · tanh(s / cap)`, before the softmax (Gemma 2).
    pub softcap: Option<f32>,
}

/// A layer's cache as attention reads it: for KV head `g` and positions `start..start + len`,
/// the keys and the values, (len, hd) f16 each, in one or two runs.
pub type KvRuns<'a> = dyn Fn(usize, usize, usize) -> KvSpan<'a> + Sync + 'a;

/// Keys and values, each in one or two runs (see [`KvRuns`]).
pub type KvSpan<'a> = ([&'a [f16]; 2], [&'a [f16]; 2]);

/// Causal attention for a batch of queries (prefill): `q` is (seq, n_head, hd), already scaled
/// and rotated, the keys and values of positions up to `pos + seq` are cached (`kv`); the
/// result is (seq, n_head · hd).
///
/// Each query is computed exactly as [`attend`] computes it when decoding: over the keys from
/// its own window start ([`first_key`]), in spans of 128 keys reduced one by one and merged in
/// order, each key read from the f16 cache as it is stored. So a prompt's row gets the same
/// bits whether it is fed alone, in a pass of 16 or of 256, resumed from the prompt cache or
/// decoded. Work items are (KV head, query), handed out over the pool in shrinking grabs, the
/// queries that see the most keys first; an item takes the queries of every head that shares
/// the KV head, so each key is converted from f16 once for all of them.
pub fn attend_batch(
    isa: Isa,
    q: &[f32],
    n_head: usize,
    n_kv: usize,
    hd: usize,
    span: Span,
    kv: &KvRuns<'_>,
) -> Result<Vec<f32>> {
    let Span { pos, seq, window, softcap } = span;
    if n_kv == 0 || hd == 0 || !n_head.is_multiple_of(n_kv) || q.len() != seq * n_head * hd {
        bail!("internal error: batch attention over {} queries of {n_head} heads", q.len());
    }
    let n_rep = n_head / n_kv;
    let row = n_head * hd;
    let mut out = vec![0f32; seq * row];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let failed = std::sync::Mutex::new(None);
    super::decode::for_each_item(n_kv * seq, |item| {
        // The last queries first: they see the most keys.
        let (g, i) = (item % n_kv, seq - 1 - item / n_kv);
        let p = pos + i;
        let start = first_key(p, window);
        let len = p + 1 - start;
        let (k, v) = kv(g, start, len);
        if [k[0].len() + k[1].len(), v[0].len() + v[1].len()] != [len * hd; 2] {
            *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
            return;
        }
        let at = i * row + g * n_rep * hd;
        // SAFETY: query i's columns of the heads of group g belong to this item alone, and
        // `out` outlives the pool's execution.
        let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(at), n_rep * hd) };
        let (spans, stride) = (len.div_ceil(SPAN), n_rep * (2 + hd));
        SCRATCH.with(|cell| {
            let (partials, scratch) = &mut *cell.borrow_mut();
            partials.resize(spans * stride, 0.0);
            let partials = &mut partials[..spans * stride];
            for (s, part) in partials.chunks_exact_mut(stride).enumerate() {
                span_partial(isa, &q[at..at + n_rep * hd], n_rep, hd, softcap, (k, v), s, part, scratch);
            }
            merge(partials, n_rep, hd, o);
        });
    });
    if let Some(p) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        bail!("internal error: the cache does not hold the keys of position {p}");
    }
    Ok(out)
}

thread_local! {
    /// A pool thread's buffers for [`attend_batch`]: the spans' partials and [`Scratch`].
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Scratch)> = std::cell::RefCell::default();
}

/// `cap · tanh(s / cap)` for each score, as ggml's attention soft-cap.
fn soft_cap(scores: &mut [f32], cap: f32) {
    for s in scores {
        *s = cap * (*s / cap).tanh();
    }
}

/// `$kernel::<R>(args)` for `R = $rows` (1 to 8; more is taken as 8): the attention kernels
/// take their number of rows as a constant.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($rows:expr, $($kernel:ident)::+, ($($arg:expr),*)) => {
        match $rows {
            1 => $($kernel)::+::<1>($($arg),*),
            2 => $($kernel)::+::<2>($($arg),*),
            3 => $($kernel)::+::<3>($($arg),*),
            4 => $($kernel)::+::<4>($($arg),*),
            5 => $($kernel)::+::<5>($($arg),*),
            6 => $($kernel)::+::<6>($($arg),*),
            7 => $($kernel)::+::<7>($($arg),*),
            _ => $($kernel)::+::<8>($($arg),*),
        }
    };
}

/// `scores[i · stride + t] = q_i · k_t` for the `n_q` query rows of `q` (rows of `hd`) and
/// every key row of `k`. With AVX-512, 1 to 8 queries per KV head and `hd` a multiple of
/// 32, in 512-bit registers with each key converted from f16 once for all the queries; else
/// with AVX2, up to 8 queries at a time, likewise.
fn key_scores(isa: Isa, q: &[f32], n_q: usize, hd: usize, k: &[f16], scores: &mut [f32], stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if isa.0 == Level::Avx512Vnni && hd.is_multiple_of(32) && (1..=8).contains(&n_q) {
        let n = k.len() / hd;
        // SAFETY: an `Isa` exists only for instruction sets this CPU has (see `Isa`); the
        // kernels check the lengths.
        unsafe {
            return by_rows!(n_q, x86::key_scores_avx512, (q, hd, k, n, scores, stride));
        }
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(isa.0, Level::Avx512Vnni | Level::Avx2) {
        let n = k.len() / hd;
        // Up to 8 rows per call: a row's scores are its own, so the grouping changes no bit.
        for (c, q) in q.chunks(8 * hd).enumerate() {
            let scores = &mut scores[8 * c * stride..];
            // SAFETY: as above; the kernel checks the lengths.
            unsafe { by_rows!(q.len() / hd, x86::key_scores_avx2, (q, hd, k, n, scores, stride)) }
        }
        return;
    }
    for (i, qi) in q.chunks_exact(hd).enumerate() {
        for (st, kt) in scores[i * stride..].iter_mut().zip(k.chunks_exact(hd)) {
            *st = qi.iter().zip(kt).map(|(&x, &y)| x * y.to_f32()).sum();
        }
    }
}

/// `acc_i = Σ_t scores[i · stride + t] · v_t` for the `n_q` rows of `acc` (rows of `hd`).
/// With AVX-512, 1 to 8 rows and `hd` a multiple of 32, 32 columns at a time with the
/// sums kept in registers over all the positions; else with AVX2, up to 8 rows at a time.
fn value_sums(isa: Isa, scores: &[f32], stride: usize, n_q: usize, hd: usize, v: &[f16], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.0 == Level::Avx512Vnni && hd.is_multiple_of(32) && (1..=8).contains(&n_q) {
        let n = v.len() / hd;
        // SAFETY: as in `key_scores`.
        unsafe {
            return by_rows!(n_q, x86::value_sums_avx512, (scores, stride, hd, v, n, acc));
        }
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(isa.0, Level::Avx512Vnni | Level::Avx2) {
        let n = v.len() / hd;
        // Up to 8 rows per call, as in `key_scores`.
        for (c, acc) in acc.chunks_mut(8 * hd).enumerate() {
            let scores = &scores[8 * c * stride..];
            // SAFETY: as in `key_scores`.
            unsafe { by_rows!(acc.len() / hd, x86::value_sums_avx2, (scores, stride, hd, v, n, acc)) }
        }
        return;
    }
    acc.fill(0.0);
    for (t, vt) in v.chunks_exact(hd).enumerate() {
        for (i, acc_i) in acc.chunks_exact_mut(hd).enumerate() {
            let p = scores[i * stride + t];
            for (a, &x) in acc_i.iter_mut().zip(vt) {
                *a += p * x.to_f32();
            }
        }
    }
}
