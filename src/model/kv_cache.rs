//! A sequence's KV cache ([`State`]): its layout, growth, rollback, and copying prefixes
//! between states and to and from bytes (the shared prefixes of `--each-line` and the prompt
//! cache).

use super::*;

/// One layer's cached keys and values, each (n_head_kv, capacity, head_dim), in f16 as
/// llama.cpp keeps them by default: half the memory of f32, and half the bytes a decode step
/// streams at a long context.
pub(super) struct LayerCache {
    pub(super) k: Vec<f16>,
    pub(super) v: Vec<f16>,
}

impl LayerCache {
    /// Writes the keys and values `k`, `v` `(seq, n_kv, head_dim)` of positions `pos..` into a
    /// cache of `capacity` positions, converted to f16. Layout (n_kv, capacity, head_dim): one
    /// contiguous run of positions per KV head.
    pub(super) fn write(
        &mut self,
        capacity: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
        n_kv: usize,
        hd: usize,
    ) {
        let at = |g: usize, p: usize| (g * capacity + p) * hd;
        for (t, (kt, vt)) in k.chunks_exact(n_kv * hd).zip(v.chunks_exact(n_kv * hd)).enumerate() {
            for g in 0..n_kv {
                let dst = at(g, pos + t)..at(g, pos + t) + hd;
                self.k[dst.clone()].convert_from_f32_slice(&kt[g * hd..(g + 1) * hd]);
                self.v[dst].convert_from_f32_slice(&vt[g * hd..(g + 1) * hd]);
            }
        }
    }
}

/// One sequence's KV cache and position.
pub struct State {
    pub(super) cache: Vec<LayerCache>,
    pub(super) capacity: usize,
    pub(super) max_len: usize,
    pub(super) pos: usize,
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

    /// Forgets every token after the first `len` (a rejected speculation): the next token fed
    /// goes to position `len`, over the keys and values that were there.
    pub fn truncate(&mut self, len: usize) {
        self.pos = self.pos.min(len);
    }
}

impl Model {
    /// A new state of up to `max_len` tokens that starts with the first `len` positions of
    /// `from` (at most as many as it holds): the shared prefix of several prompts is computed
    /// once and copied into each sequence, rather than fed again. Room is made for `reserve`
    /// positions.
    pub fn fork(&self, from: &State, len: usize, max_len: usize, reserve: usize) -> Result<State> {
        let len = len.min(from.pos);
        let mut state = self.new_state(max_len)?;
        if len > state.max_len {
            bail!("a prefix of {len} tokens does not fit in a context of {}", state.max_len);
        }
        self.reserve(&mut state, reserve.max(len))?;
        let hd = self.cfg.head_dim;
        for (dst, src) in state.cache.iter_mut().zip(&from.cache) {
            for g in 0..self.cfg.n_head_kv {
                let (a, b) = (g * from.capacity * hd, g * state.capacity * hd);
                dst.k[b..b + len * hd].copy_from_slice(&src.k[a..a + len * hd]);
                dst.v[b..b + len * hd].copy_from_slice(&src.v[a..a + len * hd]);
            }
        }
        state.pos = len;
        Ok(state)
    }

    /// The size in bytes of `len` positions of keys and values ([`Model::export_range`]).
    pub fn prefix_bytes(&self, len: usize) -> usize {
        2 * self.cfg.n_layer * self.cfg.n_head_kv * len * self.cfg.head_dim * std::mem::size_of::<f16>()
    }

    /// The keys and values of positions `range` of `state` (clamped to what it holds), as
    /// little-endian f16: per layer the keys then the values, each per KV head a run of the
    /// range's positions.
    pub fn export_range(&self, state: &State, range: std::ops::Range<usize>) -> Vec<u8> {
        let end = range.end.min(state.pos);
        let start = range.start.min(end);
        let hd = self.cfg.head_dim;
        if start == end {
            return Vec::new();
        }
        let mut out = vec![0u8; self.prefix_bytes(end - start)];
        // Filled through fixed-size pieces of a buffer sized once, which the compiler turns
        // into plain copies (a push per value made writing the prompt cache 2-3% of a small
        // model's prompt time).
        let mut pieces = out.chunks_exact_mut((end - start) * hd * 2);
        for layer in &state.cache {
            for values in [&layer.k, &layer.v] {
                for g in 0..self.cfg.n_head_kv {
                    let at = g * state.capacity * hd;
                    let Some(piece) = pieces.next() else { return out };
                    for (b, x) in piece.chunks_exact_mut(2).zip(&values[at + start * hd..at + end * hd]) {
                        b.copy_from_slice(&x.to_le_bytes());
                    }
                }
            }
        }
        out
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
            for values in [&mut layer.k, &mut layer.v] {
                for g in 0..self.cfg.n_head_kv {
                    let Some(chunk) = chunks.next() else { bail!("cached keys and values cut short") };
                    let at = g * state.capacity * hd + pos * hd;
                    for (dst, b) in values[at..at + len * hd].iter_mut().zip(chunk.chunks_exact(2)) {
                        *dst = f16::from_le_bytes([b[0], b[1]]);
                    }
                }
            }
        }
        state.pos = pos + len;
        Ok(())
    }

    /// Makes sure the cache holds at least `needed` positions (capped at the state's maximum),
    /// growing it geometrically so that a long generation copies the cache only a logarithmic
    /// number of times. Callers that know how long the sequence will get reserve it up front:
    /// the cache then never grows, and never exists twice during a copy.
    pub fn reserve(&self, state: &mut State, needed: usize) -> Result<()> {
        let needed = needed.min(state.max_len);
        if needed <= state.capacity {
            return Ok(());
        }
        let cfg = &self.cfg;
        let capacity = needed.max(state.capacity * 2).max(256).min(state.max_len);
        let (n_kv, hd) = (cfg.n_head_kv, cfg.head_dim);
        let mut cache = Vec::with_capacity(cfg.n_layer);
        for il in 0..cfg.n_layer {
            let mut layer = LayerCache {
                k: vec![f16::ZERO; n_kv * capacity * hd],
                v: vec![f16::ZERO; n_kv * capacity * hd],
            };
            if let Some(old) = state.cache.get(il) {
                // Each KV head's run of positions moves to its place at the new capacity.
                for g in 0..n_kv {
                    let (from, to) = (g * state.capacity * hd, g * capacity * hd);
                    let n = state.pos * hd;
                    layer.k[to..to + n].copy_from_slice(&old.k[from..from + n]);
                    layer.v[to..to + n].copy_from_slice(&old.v[from..from + n]);
                }
            }
            cache.push(layer);
        }
        state.cache = cache;
        state.capacity = capacity;
        Ok(())
    }
}
