//! A sequence's KV cache ([`State`]): its layout, growth, rollback, and copying prefixes
//! between states and to and from bytes (the shared prefixes of `--each-line` and the prompt
//! cache).
//!
//! A layer with a sliding window keeps only the last positions its queries can still see, in a
//! ring: position `p` lives in slot `p % capacity`, and the ring stops growing at its window plus
//! [`RING_SLACK`]. So after a long prompt, memory on those layers follows the window (15 of
//! Gemma 3's 18 layers), not the context. The slack holds a batch's own rows and what a
//! rollback (a rejected speculation) returns to. A global layer is the same structure whose
//! capacity always exceeds its positions, so `p % capacity` is `p`.

use super::*;

/// Positions a sliding-window ring holds beyond its window: the rows of one pass (a prefill
/// batch is at most 256) and the positions a rollback can go back to. A longer pass widens the
/// ring. (llama.cpp sizes its SWA cache the same way: window plus a micro-batch.)
pub(super) const RING_SLACK: usize = 512;

/// One layer's cached keys and values, each (n_head_kv, capacity, head_dim), in f16 as
/// llama.cpp keeps them by default: half the memory of f32, and half the bytes a decode step
/// streams at a long context.
pub(super) struct LayerCache {
    pub(super) k: Vec<f16>,
    pub(super) v: Vec<f16>,
    /// Positions per KV head; position `p` is in slot `p % capacity`.
    pub(super) capacity: usize,
    /// The layer's sliding window: a ring once it reaches its largest size.
    pub(super) window: Option<usize>,
}

impl LayerCache {
    /// Where position `p` of KV head `g` starts.
    fn at(&self, g: usize, p: usize, hd: usize) -> usize {
        (g * self.capacity + p % self.capacity.max(1)) * hd
    }

    /// The slots of positions `from..from + len` of KV head `g`, as one or two runs (the
    /// second empty unless the ring wraps between them). `len` is at most the capacity.
    pub(super) fn runs(&self, g: usize, from: usize, len: usize, hd: usize) -> [std::ops::Range<usize>; 2] {
        let slot = from % self.capacity.max(1);
        let first = len.min(self.capacity - slot);
        let base = g * self.capacity * hd;
        [base + slot * hd..base + (slot + first) * hd, base..base + (len - first) * hd]
    }

    /// Writes the keys and values `k`, `v` `(seq, n_kv, head_dim)` of positions `pos..`,
    /// converted to f16.
    pub(super) fn write(&mut self, pos: usize, k: &[f32], v: &[f32], n_kv: usize, hd: usize) {
        for (t, (kt, vt)) in k.chunks_exact(n_kv * hd).zip(v.chunks_exact(n_kv * hd)).enumerate() {
            for g in 0..n_kv {
                let at = self.at(g, pos + t, hd);
                self.k[at..at + hd].convert_from_f32_slice(&kt[g * hd..(g + 1) * hd]);
                self.v[at..at + hd].convert_from_f32_slice(&vt[g * hd..(g + 1) * hd]);
            }
        }
    }

    /// Copies positions `range` of `from` into the same positions here, in runs that break
    /// only where either ring wraps.
    fn copy_from(&mut self, from: &LayerCache, range: std::ops::Range<usize>, n_kv: usize, hd: usize) {
        let mut p = range.start;
        while p < range.end {
            let n =
                (range.end - p).min(from.capacity - p % from.capacity).min(self.capacity - p % self.capacity);
            for g in 0..n_kv {
                let (a, b) = (from.at(g, p, hd), self.at(g, p, hd));
                self.k[b..b + n * hd].copy_from_slice(&from.k[a..a + n * hd]);
                self.v[b..b + n * hd].copy_from_slice(&from.v[a..a + n * hd]);
            }
            p += n;
        }
    }
}

/// One sequence's KV cache and position.
pub struct State {
    pub(super) cache: Vec<LayerCache>,
    pub(super) max_len: usize,
    pub(super) pos: usize,
    /// The sliding window of the layers that keep a ring, if any do.
    window: Option<usize>,
    /// Positions below this are gone from the rings (overwritten by later ones).
    pub(super) lost: usize,
    /// [`RING_SLACK`] (smaller in tests, so that rings wrap within a tiny model's context).
    slack: usize,
}

impl State {
    /// How many tokens have been fed so far.
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Whether no token has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// The most tokens this state can hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Whether the state still holds what a sequence cut to its first `len` positions needs:
    /// every layer's keys and values that position `len` can see.
    pub fn can_truncate(&self, len: usize) -> bool {
        len >= self.pos || self.window.is_none() || kernels::first_key(len, self.window) >= self.lost
    }

    /// Forgets every token after the first `len` (a rejected speculation): the next token fed
    /// goes to position `len`, over the keys and values that were there. Refused when a ring
    /// has already overwritten what position `len` would see ([`State::can_truncate`]).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if !self.can_truncate(len) {
            bail!(
                "cannot go back to position {len}: the sliding-window layers no longer hold the \
                 positions before it"
            );
        }
        self.pos = self.pos.min(len);
        Ok(())
    }

    /// Records that positions up to `end` were written: the rings have lost what they no
    /// longer hold.
    pub(super) fn wrote(&mut self, end: usize) {
        if let Some(ring) = self.cache.iter().find(|l| l.window.is_some()) {
            self.lost = self.lost.max(end.saturating_sub(ring.capacity));
        }
    }

    /// The capacity a layer with `window` needs for `needed` positions and passes of up to
    /// `rows` rows: all of them on a global layer, at most the window and the slack (or the
    /// pass) on a ring.
    fn target(&self, window: Option<usize>, needed: usize, rows: usize) -> usize {
        let needed = needed.min(self.max_len);
        match window {
            Some(w) => needed.min(w + self.slack.max(rows)),
            None => needed,
        }
    }
}

impl Model {
    /// A fresh sequence state that can hold up to `max_len` tokens (capped at the model's
    /// context length), with rings of `slack` positions beyond their window. Memory grows
    /// with use, not with `max_len`.
    pub(super) fn state_with_slack(&self, max_len: usize, slack: usize) -> State {
        let cache = self
            .layers
            .iter()
            .map(|l| LayerCache { k: Vec::new(), v: Vec::new(), capacity: 0, window: l.window })
            .collect();
        let max_len = max_len.min(self.cfg.context_length).max(1);
        let window = self.layers.iter().find_map(|l| l.window);
        State { cache, max_len, pos: 0, window, lost: 0, slack }
    }

    /// Whether some layers keep only their sliding window, in a ring: a state then cannot go
    /// back, or give out, positions its rings have moved past.
    pub fn has_rings(&self) -> bool {
        self.layers.iter().any(|l| l.window.is_some())
    }

    /// A new state of up to `max_len` tokens that starts with the first `len` positions of
    /// `from` (at most as many as it holds): the shared prefix of several prompts is computed
    /// once and copied into each sequence, rather than fed again. Room is made for `reserve`
    /// positions. Refused when `from`'s rings no longer hold what position `len` sees.
    pub fn fork(&self, from: &State, len: usize, max_len: usize, reserve: usize) -> Result<State> {
        let len = len.min(from.pos);
        let mut state = self.state_with_slack(max_len, from.slack);
        if len > state.max_len {
            bail!("a prefix of {len} tokens does not fit in a context of {}", state.max_len);
        }
        if !from.can_truncate(len) {
            bail!(
                "a prefix of {len} tokens is no longer held whole: the sliding-window layers moved past it"
            );
        }
        self.reserve(&mut state, reserve.max(len))?;
        let (n_kv, hd) = (self.cfg.n_head_kv, self.cfg.head_dim);
        for (dst, src) in state.cache.iter_mut().zip(&from.cache) {
            let lo = if dst.window.is_some() { from.lost.max(len.saturating_sub(dst.capacity)) } else { 0 };
            dst.copy_from(src, lo..len, n_kv, hd);
        }
        state.pos = len;
        state.lost = from.lost.min(len);
        state.wrote(len);
        Ok(state)
    }

    /// The size in bytes of `len` positions of keys and values ([`Model::export_range`]).
    pub fn prefix_bytes(&self, len: usize) -> usize {
        2 * self.cfg.n_layer * self.cfg.n_head_kv * len * self.cfg.head_dim * std::mem::size_of::<f16>()
    }

    /// The keys and values of positions `range` of `state` (clamped to what it holds), as
    /// little-endian f16: per layer the keys then the values, each per KV head a run of the
    /// range's positions. Refused for positions a ring no longer holds.
    pub fn export_range(&self, state: &State, range: std::ops::Range<usize>) -> Result<Vec<u8>> {
        let end = range.end.min(state.pos);
        let start = range.start.min(end);
        let hd = self.cfg.head_dim;
        if start == end {
            return Ok(Vec::new());
        }
        if state.window.is_some() && start < state.lost {
            bail!("positions from {start} are no longer held: the sliding-window layers moved past them");
        }
        let mut out = vec![0u8; self.prefix_bytes(end - start)];
        // Filled through fixed-size pieces of a buffer sized once, which the compiler turns
        // into plain copies (a push per value made writing the prompt cache 2-3% of a small
        // model's prompt time).
        let mut pieces = out.chunks_exact_mut((end - start) * hd * 2);
        for layer in &state.cache {
            for values in [&layer.k, &layer.v] {
                for g in 0..self.cfg.n_head_kv {
                    let Some(piece) = pieces.next() else { bail!("internal error: a short export buffer") };
                    let [a, b] = layer.runs(g, start, end - start, hd);
                    let held = values[a].iter().chain(&values[b]);
                    for (bytes, x) in piece.chunks_exact_mut(2).zip(held) {
                        bytes.copy_from_slice(&x.to_le_bytes());
                    }
                }
            }
        }
        Ok(out)
    }

    /// Appends to `state` the first `len` of the `stored` positions that `bytes`
    /// ([`Model::export_range`]) holds, as if they had been fed; the cache grows to hold them.
    pub fn import_range(&self, state: &mut State, bytes: &[u8], stored: usize, len: usize) -> Result<()> {
        if bytes.len() != self.prefix_bytes(stored) || len > stored {
            bail!("cached keys and values of the wrong size for this model");
        }
        let pos = state.pos;
        if pos + len > state.max_len {
            bail!("a prefix of {} tokens does not fit in a context of {}", pos + len, state.max_len);
        }
        self.reserve(state, pos + len)?;
        let hd = self.cfg.head_dim;
        let run = stored * hd * 2; // bytes of one KV head's positions
        let mut chunks = bytes.chunks_exact(run);
        for layer in &mut state.cache {
            // A ring takes only the positions it keeps.
            let skip = len.saturating_sub(layer.capacity);
            for which in 0..2 {
                for g in 0..self.cfg.n_head_kv {
                    let Some(chunk) = chunks.next() else { bail!("cached keys and values cut short") };
                    let [a, b] = layer.runs(g, pos + skip, len - skip, hd);
                    let values = if which == 0 { &mut layer.k } else { &mut layer.v };
                    let (first, second) = values.split_at_mut(a.start);
                    let slots = second[..a.len()].iter_mut().chain(&mut first[b]);
                    for (dst, x) in slots.zip(chunk[skip * hd * 2..].chunks_exact(2)) {
                        *dst = f16::from_le_bytes([x[0], x[1]]);
                    }
                }
            }
        }
        state.pos = pos + len;
        state.wrote(pos + len);
        Ok(())
    }

    /// Makes sure the cache holds at least `needed` positions (capped at the state's maximum,
    /// and at a ring's size), growing it geometrically so that a long generation copies the
    /// cache only a logarithmic number of times. Callers that know how long the sequence will
    /// get reserve it up front: the cache then never grows, and never exists twice during a
    /// copy.
    pub fn reserve(&self, state: &mut State, needed: usize) -> Result<()> {
        self.grow(state, needed, 0)
    }

    /// [`Model::reserve`] for a pass of `rows` rows: a ring must hold the window before the
    /// pass's first row and all of its rows at once.
    pub(super) fn grow(&self, state: &mut State, needed: usize, rows: usize) -> Result<()> {
        let (n_kv, hd) = (self.cfg.n_head_kv, self.cfg.head_dim);
        for il in 0..state.cache.len() {
            let old = &state.cache[il];
            let target = state.target(old.window, needed, rows);
            if target <= old.capacity {
                continue;
            }
            let limit = state.target(old.window, usize::MAX, rows);
            let capacity = target.max(old.capacity * 2).max(256).min(limit);
            let mut layer = LayerCache {
                k: vec![f16::ZERO; n_kv * capacity * hd],
                v: vec![f16::ZERO; n_kv * capacity * hd],
                capacity,
                window: old.window,
            };
            let held = match old.window {
                Some(_) => state.lost.max(state.pos.saturating_sub(old.capacity)),
                None => 0,
            };
            if old.capacity > 0 {
                layer.copy_from(old, held..state.pos, n_kv, hd);
            }
            state.cache[il] = layer;
        }
        Ok(())
    }
}
