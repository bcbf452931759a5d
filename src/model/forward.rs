//! The forward pass: the layers over a batch of segments (one or several sequences), and
//! attention split into its steps: project Q, K and V; normalise and rotate them; write the keys
//! and values to each sequence's cache; attend.

use super::kv_cache::LayerCache;
use super::*;

impl Model {
    /// The layers over the concatenated tokens of several sequences: each segment's keys and
    /// values go to its own cache at its own position. Returns the final-normed hidden states
    /// `(rows, n_embd)` of every row, or of each segment's last row when `last_only`.
    pub(super) fn hidden_segments(&self, segments: &mut [Segment<'_>], last_only: bool) -> Result<Tensor> {
        let cfg = &self.cfg;
        if segments.is_empty() || segments.iter().any(|s| s.tokens.is_empty()) {
            bail!("no tokens to feed the model");
        }
        for seg in segments.iter_mut() {
            let (pos, seq) = (seg.state.pos, seg.tokens.len());
            if pos + seq > seg.state.max_len {
                bail!(
                    "the context is full: {} tokens do not fit in {} ({} already used)",
                    seq,
                    seg.state.max_len,
                    pos
                );
            }
            if let Some(&bad) = seg.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                bail!("token id {bad} is outside the vocabulary of {} tokens", cfg.vocab_size);
            }
            self.grow(seg.state, pos + seq, seq)?;
        }
        let tokens: Vec<u32> = segments.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let spans: Vec<(usize, usize)> = segments.iter().map(|s| (s.state.pos, s.tokens.len())).collect();

        // (rows, n_embd)
        let mut x = self.embedding.lookup(&tokens)?;
        if cfg.embed_scale != 1.0 {
            x = (x * f64::from(cfg.embed_scale))?;
        }

        // LongRoPE's factors are chosen by the context size, as llama.cpp chooses them by its
        // configured context (`get_rope_factors`): here the largest of the batch's sequences.
        let context = segments.iter().map(|s| s.state.max_len).max().unwrap_or(0);
        let freqs = match (&self.rope_freqs, &self.rope_factors) {
            (Some(f), _) => Some(f.as_slice()),
            (None, Some((short, long))) => {
                Some(if context > cfg.rope_original_context { long.as_slice() } else { short.as_slice() })
            }
            (None, None) => None,
        };
        let global = Rope::new(cfg, cfg.rope_base, cfg.rope_freq_scale, freqs, &spans);
        // Only models with sliding-window layers use the local tables.
        let local = cfg.sliding_window.map(|_| Rope::new(cfg, cfg.rope_base_local, 1.0, None, &spans));

        // A pass of few rows attends row by row with the decode kernel, which splits a long
        // span over the threads (a few queries are too few items for the batch kernel's
        // hand-out). Either way a row gets the same bits (see `kernels::attend_batch`).
        let rowwise = tokens.len() < crate::weights::batch_rows_min();
        for (il, layer) in self.layers.iter().enumerate() {
            let rope = match (&local, layer.window) {
                (Some(local), Some(_)) => local,
                _ => &global,
            };
            let residual = &x;
            let h = rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
            let mut att = self.attention(il, layer, &h, rope, segments, rowwise)?;
            if let Some(norm) = &layer.post_attn_norm {
                att = rms_norm(&att, norm, cfg.rms_eps)?;
            }
            if cfg.residual_scale != 1.0 {
                att = (att * f64::from(cfg.residual_scale))?;
            }
            let x_mid = add(&att, residual)?;

            let h = rms_norm(&x_mid, &layer.ffn_norm, cfg.rms_eps)?;
            let gated = match &layer.gate_up {
                GateUp::Separate { gate, up } => {
                    let [g, u] = Linear::forward_group([gate, up], &h)?;
                    gated_activation(cfg.activation, &g, &u)?
                }
                GateUp::Fused(w) => {
                    let both = w.forward(&h)?;
                    let n_ff = cfg.n_ff;
                    let (gate, up) = (both.narrow(1, 0, n_ff)?, both.narrow(1, n_ff, n_ff)?);
                    gated_activation(cfg.activation, &gate, &up)?
                }
            };
            let mut ff = layer.down.forward(&gated)?;
            if let Some(norm) = &layer.post_ffn_norm {
                ff = rms_norm(&ff, norm, cfg.rms_eps)?;
            }
            if cfg.residual_scale != 1.0 {
                ff = (ff * f64::from(cfg.residual_scale))?;
            }
            x = add(&ff, &x_mid)?;
        }
        for seg in segments.iter_mut() {
            seg.state.pos += seg.tokens.len();
            seg.state.wrote(seg.state.pos);
        }

        let x = if last_only {
            // Each segment's last row.
            let mut end = 0;
            let last: Vec<u32> = spans
                .iter()
                .map(|&(_, seq)| {
                    end += seq;
                    (end - 1) as u32
                })
                .collect();
            let n = last.len();
            x.index_select(&Tensor::from_vec(last, n, &Device::Cpu)?, 0)?
        } else {
            x
        };
        rms_norm(&x, &self.output_norm, cfg.rms_eps)
    }

    /// Self-attention of layer `il` for the rows `h` `(rows, n_embd)` of `segments`: each
    /// segment's keys and values are written into its cache at its position, and its queries
    /// attend over its own cache (each row alone, with the decode kernel, when `rowwise`).
    fn attention(
        &self,
        il: usize,
        layer: &Layer,
        h: &Tensor,
        rope: &Rope,
        segments: &mut [Segment<'_>],
        rowwise: bool,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (rows, _) = h.dims2()?;
        let (n_head, n_kv, hd) = (cfg.n_head, cfg.n_head_kv, cfg.head_dim);
        let (q, k, v) = self.project_qkv(layer, h, rope)?;
        let mut out = Vec::with_capacity(rows * n_head * hd);
        let mut row = 0;
        for seg in segments.iter_mut() {
            let (pos, seq) = (seg.state.pos, seg.tokens.len());
            let cache = &mut seg.state.cache[il];
            let (q, k, v) = (
                &q[row * n_head * hd..(row + seq) * n_head * hd],
                &k[row * n_kv * hd..(row + seq) * n_kv * hd],
                &v[row * n_kv * hd..(row + seq) * n_kv * hd],
            );
            row += seq;
            cache.write(pos, k, v, n_kv, hd);
            if rowwise {
                for (i, q) in q.chunks_exact(n_head * hd).enumerate() {
                    self.attend(layer, cache, pos + i, q, &mut out)?;
                }
            } else {
                self.attend(layer, cache, pos, q, &mut out)?;
            }
        }
        output(&layer.wo, &layer.bo, Tensor::from_vec(out, (rows, n_head * hd), &Device::Cpu)?)
    }

    /// The queries `(rows, n_head, head_dim)`, keys and values `(rows, n_kv, head_dim)` of the
    /// rows `h`: projected (with biases), q/k-normed where the family has it, rotated, and the
    /// queries scaled.
    fn project_qkv(&self, layer: &Layer, h: &Tensor, rope: &Rope) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let cfg = &self.cfg;
        let (rows, _) = h.dims2()?;
        let (n_head, n_kv, hd) = (cfg.n_head, cfg.n_head_kv, cfg.head_dim);
        let bias = |y: Tensor, b: &Option<Tensor>| -> Result<Tensor> {
            Ok(match b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        };
        let (q, k, v) = match &layer.qkv {
            Qkv::Separate { wq, wk, wv, bq, bk, bv } => {
                let [q, k, v] = Linear::forward_group([wq, wk, wv], h)?;
                (bias(q, bq)?, bias(k, bk)?, bias(v, bv)?)
            }
            Qkv::Fused { w, b } => {
                let all = bias(w.forward(h)?, b)?;
                let (qd, kd) = (n_head * hd, n_kv * hd);
                (all.narrow(1, 0, qd)?, all.narrow(1, qd, kd)?, all.narrow(1, qd + kd, kd)?)
            }
        };
        // (rows, heads, head_dim)
        let mut q = q.contiguous()?.reshape((rows, n_head, hd))?;
        let mut k = k.contiguous()?.reshape((rows, n_kv, hd))?;
        let v = v.contiguous()?.reshape((rows, n_kv, hd))?;
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            q = rms_norm(&q, qn, cfg.rms_eps)?;
            k = rms_norm(&k, kn, cfg.rms_eps)?;
        }
        let mut q = q.flatten_all()?.to_vec1::<f32>()?;
        let mut k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        if cfg.use_rope {
            rope.apply(&mut q, n_head);
            rope.apply(&mut k, n_kv);
        }
        for x in &mut q {
            *x *= cfg.attn_scale;
        }
        Ok((q, k, v))
    }

    /// One segment's queries `q` `(seq, n_head, head_dim)`, at positions `pos..`, over the
    /// visible span of its layer cache (which already holds their own keys and values): the
    /// attention output rows are appended to `out`.
    fn attend(
        &self,
        layer: &Layer,
        cache: &LayerCache,
        pos: usize,
        q: &[f32],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (n_head, n_kv, hd) = (cfg.n_head, cfg.n_head_kv, cfg.head_dim);
        let seq = q.len() / (n_head * hd);
        if seq == 1 {
            let kv_start = kernels::first_key(pos, layer.window);
            let kv_len = pos + 1 - kv_start;
            // Decoding: our single-query kernel reads the f16 cache in place, in the one or
            // two runs a ring keeps the span in. q is (n_head, hd).
            let mut o = vec![0f32; n_head * hd];
            let group = (n_head / n_kv) * hd;
            for g in 0..n_kv {
                let [a, b] = cache.runs(g, kv_start, kv_len, hd);
                kernels::attend(
                    Isa::detect(),
                    &q[g * group..(g + 1) * group],
                    n_head / n_kv,
                    hd,
                    cfg.attn_softcap,
                    [&cache.k[a.clone()], &cache.k[b.clone()]],
                    [&cache.v[a], &cache.v[b]],
                    &mut o[g * group..(g + 1) * group],
                )?;
            }
            out.extend_from_slice(&o);
            return Ok(());
        }
        // A prompt: each query as decoding computes it, over the f16 cache in place.
        let runs = |g: usize, start: usize, len: usize| {
            let [a, b] = cache.runs(g, start, len, hd);
            ([&cache.k[a.clone()], &cache.k[b.clone()]], [&cache.v[a], &cache.v[b]])
        };
        let span = kernels::Span { pos, seq, window: layer.window, softcap: cfg.attn_softcap };
        out.extend(kernels::attend_batch(Isa::detect(), q, n_head, n_kv, hd, span, &runs)?);
        Ok(())
    }
}
