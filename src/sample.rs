//! Choosing the next token from logits: repeat penalty, top-k, top-p, min-p, temperature and a
//! seeded random draw, in llama.cpp's default order (penalties → top-k → top-p → min-p →
//! temperature → draw). Temperature 0 is greedy.

/// Sampling settings. The defaults are llama.cpp's.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less) picks the most likely token every time.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to p; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recently seen tokens by this; 1 is off.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    /// The random seed: the same seed and input give the same output.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

/// A sampler with its own random state and scratch space, reused across tokens so the
/// per-token path does not allocate.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    candidates: Vec<(f32, u32)>,
    seen: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self { params, rng, candidates: Vec::new(), seen: Vec::new() }
    }

    /// Whether the choice is a function of the logits and the history alone (temperature 0 or
    /// top-k 1): what speculative decoding needs to leave the output unchanged.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0 || self.params.top_k == 1
    }

    /// Picks the next token. `logits` is modified (penalties); `history` is every token of the
    /// sequence so far, prompt included.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.sample_checking(logits, history, None)
    }

    /// Picks the next token where `proposal` was proposed for it (speculative decoding), so
    /// that the token has exactly the distribution [`Sampler::sample`] gives it, whatever was
    /// proposed. Greedy: the largest logit, as always. Sampling: speculative sampling's rule
    /// (Leviathan et al., Chen et al., 2023) for a proposal that did not come from a
    /// distribution the target can see (the text's own, a greedy draft): one-hot q at x.
    /// Accept x with probability p(x); otherwise draw from p without x. Then
    /// P(x) = p(x) and, for y ≠ x, P(y) = (1 − p(x)) · p(y) / (1 − p(x)) = p(y).
    /// The token is `proposal` exactly when the proposal is accepted.
    pub fn sample_checking(&mut self, logits: &mut [f32], history: &[u32], proposal: Option<u32>) -> u32 {
        let p = &self.params;
        if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
            let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
            self.seen.clear();
            self.seen.extend_from_slice(recent);
            self.seen.sort_unstable();
            self.seen.dedup();
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / p.repeat_penalty } else { *l * p.repeat_penalty };
                }
            }
        }
        if self.is_greedy() {
            return argmax(logits);
        }
        if !self.keep_candidates(logits) {
            return 0;
        }
        // Each candidate's weight: its probability times a common factor.
        let t = self.params.temperature;
        let max = self.candidates[0].0;
        let weight = |l: f32| ((l - max) / t).exp();
        let total: f32 = self.candidates.iter().map(|&(l, _)| weight(l)).sum();
        let proposed = proposal.and_then(|x| self.candidates.iter().find(|&&(_, id)| id == x).copied());
        let Some((proposed_logit, x)) = proposed else {
            // Not a candidate: p(x) = 0, never accepted; a plain draw.
            return self.draw(total, weight, None);
        };
        let px = weight(proposed_logit);
        if self.rng.next_f32() * total < px {
            return x;
        }
        if total - px <= 0.0 {
            // Every other candidate's weight rounds to nothing.
            return x;
        }
        self.draw(total - px, weight, Some(x))
    }

    /// Keeps the candidates the filters let through, most likely first: top-k, then top-p and
    /// min-p on the probabilities before temperature, as llama.cpp's see them. False when every
    /// logit is NaN.
    fn keep_candidates(&mut self, logits: &[f32]) -> bool {
        let p = &self.params;
        // Top-k by partial selection: O(vocab) rather than sorting all 262k logits.
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (l, i as u32)));
        if c.is_empty() {
            return false;
        }
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k = if p.top_k == 0 { c.len() } else { p.top_k.min(c.len()) };
        if k < c.len() {
            c.select_nth_unstable_by(k - 1, by_logit_desc);
            c.truncate(k);
        }
        c.sort_unstable_by(by_logit_desc);

        let max = c[0].0;
        let total: f32 = c.iter().map(|&(l, _)| (l - max).exp()).sum();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = c.len();
            for (i, &(l, _)) in c.iter().enumerate() {
                cum += (l - max).exp() / total;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            // p_i >= min_p * p_max  <=>  l_i >= max + ln(min_p)
            let floor = max + p.min_p.ln();
            let keep = c.iter().take_while(|&&(l, _)| l >= floor).count();
            c.truncate(keep.max(1));
        }
        true
    }

    /// A candidate drawn in proportion to `weight`, leaving out `skip`; `total` is the sum of
    /// the weights drawn from.
    fn draw(&mut self, total: f32, weight: impl Fn(f32) -> f32, skip: Option<u32>) -> u32 {
        let c = &self.candidates;
        let mut r = self.rng.next_f32() * total;
        let mut last = c[c.len() - 1].1;
        for &(l, id) in c.iter().filter(|&&(_, id)| Some(id) != skip) {
            let w = weight(l);
            if r < w {
                return id;
            }
            r -= w;
            last = id;
        }
        last
    }
}

/// The index of the largest logit, first on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    // The largest value first, in 16 independent lanes the compiler vectorizes (a scalar
    // compare-and-branch over 262,144 logits was 1% of a decode step), then its first
    // position. NaN compares false, so it is never chosen; all NaN or -inf gives 0.
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = logits.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            *m = if l > *m { l } else { *m };
        }
    }
    let max = lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

/// The model's log-probabilities at one position (`--logprobs`): the log of the softmax of
/// `logits` as they come from the model, computed in f64.
#[derive(Debug, Clone)]
pub struct Logprobs {
    /// log Σ exp(logit).
    log_sum: f64,
    /// The `n` largest logits' tokens, most likely first (lower ids first on ties).
    top: Vec<u32>,
}

impl Logprobs {
    /// The distribution of `logits`, with its `n` most likely tokens.
    pub fn new(logits: &[f32], n: usize) -> Self {
        let max = logits.iter().copied().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().filter(|l| !l.is_nan()).map(|&l| f64::from(l - max).exp()).sum();
        let log_sum = f64::from(max) + sum.ln();
        // The n best by insertion into a short sorted list: one pass over the vocabulary.
        let mut top: Vec<u32> = Vec::with_capacity(n + 1);
        for (id, &l) in logits.iter().enumerate() {
            if n == 0 || l.is_nan() || top.len() == n && l <= logits[top[n - 1] as usize] {
                continue;
            }
            let at = top.partition_point(|&t| logits[t as usize] >= l);
            top.insert(at, id as u32);
            top.truncate(n);
        }
        Self { log_sum, top }
    }

    /// Token `id`'s log-probability under `logits` (those [`Logprobs::new`] was given).
    pub fn of(&self, logits: &[f32], id: u32) -> f32 {
        logits.get(id as usize).map_or(f32::NEG_INFINITY, |&l| (f64::from(l) - self.log_sum) as f32)
    }

    /// The most likely tokens, most likely first.
    pub fn top(&self) -> &[u32] {
        &self.top
    }
}

/// xoshiro256** seeded through splitmix64: small, fast and the same on every platform, so a
/// seed reproduces its output anywhere.
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn logprobs_are_the_log_softmax_and_the_top_tokens_in_order() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, f32::NAN, 0.5];
        let lp = Logprobs::new(&logits, 3);
        let finite = [1.0f64, 3.0, -2.0, 3.0, 0.5];
        let log_sum = finite.iter().map(|l| l.exp()).sum::<f64>().ln();
        for (id, &l) in logits.iter().enumerate().filter(|(_, l)| !l.is_nan()) {
            let want = f64::from(l) - log_sum;
            assert!((f64::from(lp.of(&logits, id as u32)) - want).abs() < 1e-6, "token {id}");
        }
        // Most likely first, the lower id first on a tie; NaN never.
        assert_eq!(lp.top(), &[1, 3, 0]);
        assert_eq!(Logprobs::new(&logits, 0).top(), &[] as &[u32]);
        assert_eq!(Logprobs::new(&logits, 9).top(), &[1, 3, 0, 5, 2]);
        assert_eq!(lp.of(&logits, 99), f32::NEG_INFINITY);
    }

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: 7, ..SamplingParams::default() }
    }

    #[test]
    fn argmax_is_the_first_largest_and_never_nan() {
        // The plain scan it replaced.
        let reference = |logits: &[f32]| {
            let (mut best, mut best_l) = (0, f32::NEG_INFINITY);
            for (i, &l) in logits.iter().enumerate() {
                if l > best_l {
                    (best, best_l) = (i, l);
                }
            }
            best as u32
        };
        let mut rng = crate::test_support::Rng(12345);
        for len in [1, 2, 15, 16, 17, 33, 100, 1000] {
            for _ in 0..20 {
                let logits: Vec<f32> = (0..len)
                    .map(|_| {
                        // Few distinct values, so ties are common; some NaN and -inf.
                        match rng.next_u64() >> 60 {
                            0 => f32::NAN,
                            1 => f32::NEG_INFINITY,
                            v => (v % 5) as f32,
                        }
                    })
                    .collect();
                assert_eq!(argmax(&logits), reference(&logits), "{logits:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NAN; 40]), 0);
        let mut last = vec![0.0; 35];
        last[34] = 1.0;
        assert_eq!(argmax(&last), 34, "the largest in the part after the last 16");
    }

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(params(0.0));
        let mut logits = vec![0.1, 3.0, -1.0, 2.9];
        assert_eq!(s.sample(&mut logits, &[]), 1);
    }

    #[test]
    fn repeat_penalty_can_change_the_greedy_choice() {
        let mut s = Sampler::new(SamplingParams { repeat_penalty: 2.0, ..params(0.0) });
        let mut logits = vec![0.0, 3.0, 2.0];
        assert_eq!(s.sample(&mut logits, &[1]), 2, "3.0 / 2 = 1.5 < 2.0");
        let mut logits = vec![-1.0, -0.5, -0.6];
        assert_eq!(s.sample(&mut logits, &[1]), 2, "-0.5 * 2 = -1.0 < -0.6");
    }

    #[test]
    fn same_seed_same_draws_and_different_seeds_differ() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 101) as f32 / 25.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                temperature: 1.5,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                ..SamplingParams::default()
            });
            (0..50).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_k_limits_the_choice() {
        let logits: Vec<f32> = (0..100).map(|i| i as f32 / 10.0).collect();
        let mut s = Sampler::new(SamplingParams {
            top_k: 3,
            top_p: 1.0,
            min_p: 0.0,
            temperature: 100.0,
            ..params(1.0)
        });
        for _ in 0..200 {
            let t = s.sample(&mut logits.clone(), &[]);
            assert!(t >= 97, "token {t} is not among the top 3");
        }
    }

    #[test]
    fn min_p_and_top_p_drop_unlikely_tokens() {
        // Token 0 has almost all the mass; the rest are far below min_p * p_max.
        let mut logits = vec![10.0f32; 1];
        logits.extend(std::iter::repeat_n(0.0, 999));
        let mut s = Sampler::new(SamplingParams {
            top_k: 0,
            top_p: 1.0,
            min_p: 0.05,
            temperature: 1.0,
            ..params(1.0)
        });
        for _ in 0..200 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
        }
        let mut s = Sampler::new(SamplingParams {
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            temperature: 1.0,
            ..params(1.0)
        });
        for _ in 0..200 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
        }
    }

    /// Pearson's chi-square of `counts` against probabilities `p` (bins expected to hold fewer
    /// than 5 draws merged into one), and the value a correct sampler stays under but once in
    /// a thousand tries (Wilson and Hilferty's approximation at z = 3.09).
    pub(crate) fn chi_square(counts: &[usize], p: &[f64]) -> (f64, f64) {
        let n: usize = counts.iter().sum();
        let (mut chi, mut bins) = (0.0, 0usize);
        let (mut rest_seen, mut rest_expected) = (0.0, 0.0);
        for (&c, &q) in counts.iter().zip(p) {
            let e = q * n as f64;
            if e < 5.0 {
                rest_seen += c as f64;
                rest_expected += e;
            } else {
                chi += (c as f64 - e).powi(2) / e;
                bins += 1;
            }
        }
        if rest_expected > 0.0 {
            chi += (rest_seen - rest_expected).powi(2) / rest_expected.max(1e-9);
            bins += 1;
        }
        let k = (bins.max(2) - 1) as f64;
        let limit = k * (1.0 - 2.0 / (9.0 * k) + 3.09 * (2.0 / (9.0 * k)).sqrt()).powi(3);
        (chi, limit)
    }

    /// The probabilities `sample` draws from with these settings (no filter but temperature).
    pub(crate) fn softmax(logits: &[f32], temperature: f32) -> Vec<f64> {
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
        let w: Vec<f64> = logits.iter().map(|&l| (((l - max) / temperature) as f64).exp()).collect();
        let total: f64 = w.iter().sum();
        w.iter().map(|x| x / total).collect()
    }

    /// Checking a proposal leaves the distribution exactly the sampler's: the proposal comes out
    /// as often as its probability says and every other token as often as its own, whether the
    /// proposal is likely, unlikely or not a candidate; and it is accepted exactly when chosen.
    #[test]
    fn a_checked_proposal_leaves_the_distribution_unchanged() {
        let logits: Vec<f32> = vec![2.0, 1.5, 0.0, -1.0, 1.0, 0.5, -3.0, 2.2];
        let free = SamplingParams { top_k: 0, top_p: 1.0, min_p: 0.0, temperature: 0.9, ..params(1.0) };
        let p = softmax(&logits, 0.9);
        for (proposal, seed) in [(7u32, 1), (0, 2), (6, 3), (2, 4)] {
            let mut s = Sampler::new(SamplingParams { seed, ..free.clone() });
            let mut counts = vec![0; logits.len()];
            for _ in 0..20_000 {
                counts[s.sample_checking(&mut logits.clone(), &[], Some(proposal)) as usize] += 1;
            }
            let (chi, limit) = chi_square(&counts, &p);
            assert!(chi < limit, "proposal {proposal}: chi-square {chi:.1} over {limit:.1}: {counts:?}");
        }
        // Always accepting would not pass: the check can fail.
        let mut always = vec![0; logits.len()];
        always[3] = 20_000;
        assert!(chi_square(&always, &p).0 > chi_square(&always, &p).1);
        // Top-k 2 leaves tokens 7 and 0; a proposal outside them is never chosen.
        let mut s = Sampler::new(SamplingParams { top_k: 2, ..free });
        for _ in 0..500 {
            let t = s.sample_checking(&mut logits.clone(), &[], Some(1));
            assert!(t == 7 || t == 0, "{t}");
        }
        // Greedy ignores the proposal.
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample_checking(&mut logits.clone(), &[], Some(3)), 7);
    }

    #[test]
    fn nan_logits_do_not_panic() {
        let mut s = Sampler::new(params(1.0));
        let mut logits = vec![f32::NAN, 1.0, f32::NAN];
        assert_eq!(s.sample(&mut logits, &[]), 1);
        let mut all_nan = vec![f32::NAN; 4];
        let _ = s.sample(&mut all_nan, &[]);
    }
}
