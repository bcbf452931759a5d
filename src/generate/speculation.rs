//! Speculative decoding's bookkeeping: where a generator's proposals come from, what a pass
//! of each size costs on this machine, and how often each kind of proposal is accepted.

use anyhow::Result;

use crate::speculate::{Counts, Propose};

/// A generator's speculative decoding: where proposals come from, how many a pass, and counts.
pub(super) struct Speculation<'m> {
    pub(super) proposer: Box<dyn Propose + 'm>,
    pub(super) max: usize,
    pub(super) counts: Counts,
    pub(super) costs: PassCosts,
}

impl<'m> Speculation<'m> {
    pub(super) fn new(proposer: Box<dyn Propose + 'm>, max: usize) -> Self {
        let costs = PassCosts::new(max + 1, proposer.kinds());
        Self { proposer, max, counts: Counts::default(), costs }
    }

    /// Up to `max` proposals after `history`, as many as pay for their pass (none when too
    /// few do). A proposer whose proposals cost nothing is asked for the most, and as many are
    /// checked as pay given their kind; one that costs (a draft model) is asked for that many.
    pub(super) fn propose(
        &mut self,
        history: &[u32],
        max: usize,
        allowed: impl FnOnce(&[u32]) -> usize,
    ) -> Result<Vec<u32>> {
        let free = self.proposer.free();
        let ask = if free { max } else { self.costs.best(0, max) };
        let mut proposals = if ask > 0 { self.proposer.propose(history, ask)? } else { Vec::new() };
        // Under a constraint, none past the first it refuses.
        proposals.truncate(allowed(&proposals));
        let kind = self.proposer.kind();
        if free && !proposals.is_empty() {
            let k = self.costs.best(kind, proposals.len());
            proposals.truncate(k);
        }
        if !self.costs.pays(kind, proposals.len()) {
            // Fewer than were asked for, and too few to pay for their pass.
            proposals.clear();
        }
        Ok(proposals)
    }
}

/// What a pass of r rows has cost (seconds, a moving average per r) and how often a proposal
/// is accepted (per kind of proposal, [`Propose::kind`]), so that a pass checks as many
/// proposals as pay for themselves on this machine. Where several rows cost little more than
/// one (the decode kernels read the weights once for them all, and VNNI makes the extra rows
/// cheap) that is many; where each row adds much of a step it is fewer, or none.
pub(super) struct PassCosts {
    pub(super) seconds: Vec<Option<f64>>,
    /// Per kind of proposal, the chances (moving averages) that its first proposal is accepted
    /// and that each later one is, given the one before it was. Acceptance comes in runs: a
    /// copy that goes on at all tends to go on, so the first token is the uncertain one.
    pub(super) accept: Vec<Chances>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Chances {
    pub(super) first: f64,
    pub(super) next: f64,
}

impl Chances {
    /// Where a kind's chances start, and drift back to while it is not tried.
    const PRIOR: Self = Self { first: 0.4, next: 0.6 };

    /// Expected tokens from a pass checking k proposals: the one the pass makes anyway, and
    /// 1 + next + … + next^(k-1) more if the first is accepted.
    fn tokens(self, k: usize) -> f64 {
        let (first, next) = (self.first.clamp(0.0, 1.0), self.next.clamp(0.0, 0.999));
        1.0 + if k == 0 { 0.0 } else { first * (0..k).map(|i| next.powi(i as i32)).sum::<f64>() }
    }
}

impl PassCosts {
    pub(super) fn new(max_rows: usize, kinds: usize) -> Self {
        Self { seconds: vec![None; max_rows + 1], accept: vec![Chances::PRIOR; kinds.max(1)] }
    }

    pub(super) fn record(&mut self, rows: usize, seconds: f64) {
        if let Some(slot) = self.seconds.get_mut(rows) {
            *slot = Some(slot.map_or(seconds, |s| 0.7 * s + 0.3 * seconds));
        }
    }

    pub(super) fn record_acceptance(&mut self, kind: usize, proposed: usize, accepted: usize) {
        let Some(c) = self.accept.get_mut(kind) else { return };
        if proposed == 0 {
            return;
        }
        c.first = 0.8 * c.first + 0.2 * f64::from(u8::from(accepted > 0));
        // After the first: accepted ones count as successes, the first rejected one as a
        // failure. A lone proposal accepted counts as a success too (the copy did not break
        // where it could be seen), or a kind checked one at a time would never learn that
        // more would pay.
        if accepted > 0 {
            let rejected = accepted < proposed;
            let (ok, tries) =
                if proposed == 1 { (1, 1) } else { (accepted - 1, accepted - 1 + usize::from(rejected)) };
            if tries > 0 {
                c.next = 0.8 * c.next + 0.2 * (ok as f64 / tries as f64);
            }
        }
    }

    /// How many proposals of `kind` to check, at most `offered`: the k that makes the most
    /// expected tokens per second ([`Chances::tokens`] for a pass of k + 1 rows). A pass size
    /// not measured yet is assumed to cost a one-row step and a tenth of one for each row more
    /// ([`PassCosts::cost`]): optimistic, so that each size is tried and measured once it looks
    /// best. A size's cost does not follow from its neighbours': on AVX2 (Zen 3,
    /// Qwen2.5-Coder-1.5B) 2 rows cost 1.3 to 1.5 steps, 3 and 4 rows 1.5 to 1.8 (the paired
    /// kernel), 5 to 8 rows 2.2 to 2.5 (the many-row kernel), and 9 rows 3.5.
    pub(super) fn best(&mut self, kind: usize, offered: usize) -> usize {
        let k = self.best_now(kind, offered);
        if k == 0
            && let Some(c) = self.accept.get_mut(kind)
        {
            // Without passes nothing is learned: the estimate drifts back to the prior, so that
            // text which starts to repeat itself is tried again after a while.
            c.first = 0.97 * c.first + 0.03 * Chances::PRIOR.first;
            c.next = 0.97 * c.next + 0.03 * Chances::PRIOR.next;
        }
        k
    }

    pub(super) fn best_now(&self, kind: usize, offered: usize) -> usize {
        // One plain step is measured first.
        let Some(one) = self.seconds.get(1).copied().flatten() else {
            return 0;
        };
        let c = self.chances(kind);
        let mut best = (0, 1.0 / one);
        for k in 1..=offered.min(self.seconds.len() - 2) {
            let rate = c.tokens(k) / self.cost(k + 1, one);
            if rate > best.1 {
                best = (k, rate);
            }
        }
        best.0
    }

    /// Whether a pass checking `k` proposals of `kind` is expected to make more tokens per
    /// second than a plain step (a proposer may find fewer than were asked for).
    pub(super) fn pays(&self, kind: usize, k: usize) -> bool {
        let Some(one) = self.seconds.get(1).copied().flatten() else {
            return false;
        };
        k > 0
            && k + 2 <= self.seconds.len()
            && self.chances(kind).tokens(k) / self.cost(k + 1, one) > 1.0 / one
    }

    fn chances(&self, kind: usize) -> Chances {
        self.accept.get(kind).copied().unwrap_or(Chances::PRIOR)
    }

    /// A pass of `rows` rows: as measured, else the estimate [`PassCosts::best`] describes.
    pub(super) fn cost(&self, rows: usize, one: f64) -> f64 {
        self.seconds.get(rows).copied().flatten().unwrap_or(one * (1.0 + 0.1 * (rows - 1) as f64))
    }
}
