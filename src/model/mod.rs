//! The decoder: one transformer forward pass, configured from GGUF metadata, over the file's
//! quantized weights, with a KV cache.
//!
//! Model families differ in a handful of switches (norm placement, activation, q/k norms,
//! sliding-window layers, rope bases, embedding scale, tied output). [`Config`] holds them and
//! [`Model::forward`] is the one forward pass; llama.cpp's graph builders (`src/models/<arch>.cpp`)
//! are the reference for what each switch does. Supported: `gemma2`, `gemma3`, `granite`,
//! `llama` (Llama 2/3, SmolLM2, TinyLlama, Mistral 7B), `phi3`, `qwen2` and `qwen3`.

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::gguf::Gguf;
use crate::kernels::{self, Isa};
use crate::weights::{Embedding, Linear, Mapped};

mod config;

pub use config::{Activation, Config, RopeStyle};

/// A layer's query, key and value projections: three matrices, or one fused matrix whose
/// output rows are [Q | K | V] (Phi-3's `attn_qkv`; llama.cpp accepts either for every
/// architecture). Each with an optional bias (Qwen 2's files have them).
enum Qkv {
    Separate {
        wq: Linear,
        wk: Linear,
        wv: Linear,
        bq: Option<Tensor>,
        bk: Option<Tensor>,
        bv: Option<Tensor>,
    },
    Fused {
        w: Linear,
        b: Option<Tensor>,
    },
}

/// The feed-forward gate and up projections: two matrices, or one (Phi-3) whose first `n_ff`
/// output rows are the gate and the rest the up projection.
enum GateUp {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

struct Layer {
    attn_norm: Tensor,
    qkv: Qkv,
    wo: Linear,
    bo: Option<Tensor>,
    /// Per-head norms of queries and keys (when `Config::qk_norm`).
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// Norms of the attention and FFN outputs (when `Config::post_norms`).
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    gate_up: GateUp,
    down: Linear,
    post_ffn_norm: Option<Tensor>,
    /// The sliding window of this layer, or `None` for global attention.
    window: Option<usize>,
}

/// A loaded model: configuration and weights. Immutable; the per-sequence state lives in
/// [`State`], so one model can serve several sequences.
pub struct Model {
    cfg: Config,
    /// The token embedding, quantized as in the file. Rows are dequantized on lookup, so there
    /// is no f32 copy of the (vocab × n_embd) matrix.
    embedding: Embedding,
    output: Linear,
    /// Added to the logits (optional in Qwen 2 files).
    output_bias: Option<Tensor>,
    output_norm: Tensor,
    layers: Vec<Layer>,
    /// Per-dimension divisors of the rotary frequencies, `n_rot / 2` of them: `rope_freqs.weight`
    /// (Llama 3.1's long-context scaling), used at every context size.
    rope_freqs: Option<Vec<f32>>,
    /// Phi-3's LongRoPE factors (`rope_factors_short/long.weight`): the short ones while a
    /// sequence's context fits the original training context, the long ones above it, as
    /// llama.cpp chooses them by the configured context size.
    rope_factors: Option<(Vec<f32>, Vec<f32>)>,
}

/// One layer's cached keys and values, each (n_head_kv, capacity, head_dim), in f16 as
/// llama.cpp keeps them by default: half the memory of f32, and half the bytes a decode step
/// streams at a long context.
struct LayerCache {
    k: Vec<f16>,
    v: Vec<f16>,
}

/// One sequence's KV cache and position.
pub struct State {
    cache: Vec<LayerCache>,
    capacity: usize,
    max_len: usize,
    pos: usize,
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
}

/// One sequence's part of a [`Model::forward_batch`]: its state and the tokens to feed it.
pub struct Segment<'a> {
    pub state: &'a mut State,
    pub tokens: &'a [u32],
}

impl Model {
    /// Loads the weights of a GGUF file whose architecture is supported.
    pub fn load(gguf: &Gguf) -> Result<Self> {
        let cfg = Config::from_gguf(gguf)?;
        // Every tensor of the file must be used: one we would ignore (an FFN bias, a norm of an
        // architecture variant) means the file is not the model we think, and running it
        // anyway would print fluent nonsense. llama.cpp refuses such files the same way.
        let mut used = Used::new(gguf);
        let embd = used.matrix("token_embd.weight", (cfg.vocab_size, cfg.n_embd))?;
        let embedding = Embedding::new(embd)?;
        // Tied output: the logits reuse the embedding matrix unless the file has its own.
        let output = if gguf.has_tensor("output.weight") && !cfg.output_is_embedding {
            Linear::new(used.matrix("output.weight", (cfg.vocab_size, cfg.n_embd))?)?
        } else {
            embedding.as_linear()?
        };
        let output_norm = used.vector("output_norm.weight", cfg.n_embd)?;
        let output_bias = used.opt_vector("output.bias", cfg.vocab_size)?;
        let half_rot = cfg.n_rot / 2;
        let rope_freqs =
            used.opt_vector("rope_freqs.weight", half_rot)?.map(|t| t.to_vec1::<f32>()).transpose()?;
        let short = used.opt_vector("rope_factors_short.weight", half_rot)?;
        let long = used.opt_vector("rope_factors_long.weight", half_rot)?;
        let rope_factors = match (short, long) {
            (Some(s), Some(l)) => Some((s.to_vec1::<f32>()?, l.to_vec1::<f32>()?)),
            (None, None) => None,
            _ => bail!(
                "{}: the file has only one of rope_factors_short and rope_factors_long",
                gguf.path().display()
            ),
        };
        let q_dim = cfg.n_head * cfg.head_dim;
        let kv_dim = cfg.n_head_kv * cfg.head_dim;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for il in 0..cfg.n_layer {
            let p = |name: &str| format!("blk.{il}.{name}");
            let qkv = if gguf.has_tensor(&p("attn_qkv.weight")) {
                let w = Linear::new(used.matrix(&p("attn_qkv.weight"), (q_dim + 2 * kv_dim, cfg.n_embd))?)?;
                Qkv::Fused { w, b: used.opt_vector(&p("attn_qkv.bias"), q_dim + 2 * kv_dim)? }
            } else {
                Qkv::Separate {
                    wq: Linear::new(used.matrix(&p("attn_q.weight"), (q_dim, cfg.n_embd))?)?,
                    wk: Linear::new(used.matrix(&p("attn_k.weight"), (kv_dim, cfg.n_embd))?)?,
                    wv: Linear::new(used.matrix(&p("attn_v.weight"), (kv_dim, cfg.n_embd))?)?,
                    bq: used.opt_vector(&p("attn_q.bias"), q_dim)?,
                    bk: used.opt_vector(&p("attn_k.bias"), kv_dim)?,
                    bv: used.opt_vector(&p("attn_v.bias"), kv_dim)?,
                }
            };
            let gate_up = if gguf.has_tensor(&p("ffn_gate.weight")) {
                GateUp::Separate {
                    gate: Linear::new(used.matrix(&p("ffn_gate.weight"), (cfg.n_ff, cfg.n_embd))?)?,
                    up: Linear::new(used.matrix(&p("ffn_up.weight"), (cfg.n_ff, cfg.n_embd))?)?,
                }
            } else {
                // No gate: the up projection must be the fused gate|up, twice as wide.
                GateUp::Fused(Linear::new(used.matrix(&p("ffn_up.weight"), (2 * cfg.n_ff, cfg.n_embd))?)?)
            };
            let wo = Linear::new(used.matrix(&p("attn_output.weight"), (cfg.n_embd, q_dim))?)?;
            let down = Linear::new(used.matrix(&p("ffn_down.weight"), (cfg.n_embd, cfg.n_ff))?)?;
            let (qk_norm, post) = (cfg.qk_norm, cfg.post_norms);
            let mut norm = |name: &str, n: usize, present: bool| -> Result<Option<Tensor>> {
                if present { used.vector(&p(name), n).map(Some) } else { Ok(None) }
            };
            let q_norm = norm("attn_q_norm.weight", cfg.head_dim, qk_norm)?;
            let k_norm = norm("attn_k_norm.weight", cfg.head_dim, qk_norm)?;
            let post_attn_norm = norm("post_attention_norm.weight", cfg.n_embd, post)?;
            let post_ffn_norm = norm("post_ffw_norm.weight", cfg.n_embd, post)?;
            layers.push(Layer {
                attn_norm: used.vector(&p("attn_norm.weight"), cfg.n_embd)?,
                ffn_norm: used.vector(&p("ffn_norm.weight"), cfg.n_embd)?,
                bo: used.opt_vector(&p("attn_output.bias"), cfg.n_embd)?,
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                qkv,
                wo,
                gate_up,
                down,
                window: if cfg.local_layers[il] { cfg.sliding_window } else { None },
            });
        }
        used.check_all_used()?;
        Ok(Self { cfg, embedding, output, output_bias, output_norm, layers, rope_freqs, rope_factors })
    }

    /// The model's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// A fresh sequence state that can hold up to `max_len` tokens (capped at the model's
    /// context length). Memory grows with use, not with `max_len`.
    pub fn new_state(&self, max_len: usize) -> Result<State> {
        let max_len = max_len.min(self.cfg.context_length).max(1);
        Ok(State { cache: Vec::new(), capacity: 0, max_len, pos: 0 })
    }

    /// Feeds `tokens` at the state's current position and returns the logits that predict the
    /// token after the last one, as a `(vocab,)` tensor.
    pub fn forward(&self, state: &mut State, tokens: &[u32]) -> Result<Tensor> {
        let hidden = self.hidden(state, tokens, true)?;
        Ok(self.logits(&hidden)?.squeeze(0)?)
    }

    /// Feeds `tokens` into the cache without computing logits (prefill chunks before the last).
    pub fn feed(&self, state: &mut State, tokens: &[u32]) -> Result<()> {
        self.hidden(state, tokens, true).map(drop)
    }

    /// One step for several sequences at once: feeds each segment's tokens at its state's
    /// position and returns the logits after each segment's last token, `(segments, vocab)`.
    /// The matmuls run over all the segments' rows together, so the weights are read once for
    /// the whole batch; attention runs per sequence, over its own cache. A decode step of
    /// eight sequences is eight one-token segments; a new sequence's prompt can ride along.
    pub fn forward_batch(&self, segments: &mut [Segment<'_>]) -> Result<Tensor> {
        let hidden = self.hidden_segments(segments, true)?;
        self.logits(&hidden)
    }

    /// Like [`Model::forward`], but returns the logits after every fed token: `(seq, vocab)`.
    /// Row `i` predicts the token after `tokens[i]`. For tests and evaluation.
    pub fn forward_all(&self, state: &mut State, tokens: &[u32]) -> Result<Tensor> {
        let hidden = self.hidden(state, tokens, false)?;
        self.logits(&hidden)
    }

    /// The logits `(rows, vocab)` for final-normed hidden states: the output matrix, then the
    /// output bias, Granite's logit scale and Gemma 2's soft-cap, in llama.cpp's order.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let cfg = &self.cfg;
        let mut logits = self.output.forward(hidden)?;
        if let Some(b) = &self.output_bias {
            logits = logits.broadcast_add(b)?;
        }
        if cfg.logit_scale != 1.0 {
            logits = (logits / f64::from(cfg.logit_scale))?;
        }
        if let Some(cap) = cfg.final_softcap {
            logits = ((logits / f64::from(cap))?.tanh()? * f64::from(cap))?;
        }
        Ok(logits)
    }

    /// Runs the layers over `tokens`, appends their keys and values to the cache, and returns
    /// the final-normed hidden states `(seq, n_embd)`, or only the last row when `last_only`.
    fn hidden(&self, state: &mut State, tokens: &[u32], last_only: bool) -> Result<Tensor> {
        self.hidden_segments(&mut [Segment { state, tokens }], last_only)
    }

    /// The layers over the concatenated tokens of several sequences: each segment's keys and
    /// values go to its own cache at its own position. Returns the final-normed hidden states
    /// `(rows, n_embd)` of every row, or of each segment's last row when `last_only`.
    fn hidden_segments(&self, segments: &mut [Segment<'_>], last_only: bool) -> Result<Tensor> {
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
            self.reserve(seg.state, pos + seq)?;
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

        for (il, layer) in self.layers.iter().enumerate() {
            let rope = match (&local, layer.window) {
                (Some(local), Some(_)) => local,
                _ => &global,
            };
            let residual = &x;
            let h = rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
            let mut att = self.attention(il, layer, &h, rope, segments)?;
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
    /// attend over its own cache.
    fn attention(
        &self,
        il: usize,
        layer: &Layer,
        h: &Tensor,
        rope: &Rope,
        segments: &mut [Segment<'_>],
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (rows, _) = h.dims2()?;
        let (n_head, n_kv, hd) = (cfg.n_head, cfg.n_head_kv, cfg.head_dim);
        let n_rep = n_head / n_kv;

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

        let mut out = Vec::with_capacity(rows * n_head * hd);
        let mut row = 0;
        for seg in segments.iter_mut() {
            let (pos, seq, capacity) = (seg.state.pos, seg.tokens.len(), seg.state.capacity);
            let cache = &mut seg.state.cache[il];
            let (q, k, v) = (
                &q[row * n_head * hd..(row + seq) * n_head * hd],
                &k[row * n_kv * hd..(row + seq) * n_kv * hd],
                &v[row * n_kv * hd..(row + seq) * n_kv * hd],
            );
            row += seq;
            // The first cached position any query of this segment can see.
            let kv_start = layer.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let kv_len = pos + seq - kv_start;

            // Cache layout (n_kv, capacity, head_dim): one contiguous run of keys per KV head.
            let at = |g: usize, p: usize| (g * capacity + p) * hd;
            for (t, (kt, vt)) in k.chunks_exact(n_kv * hd).zip(v.chunks_exact(n_kv * hd)).enumerate() {
                for g in 0..n_kv {
                    let dst = at(g, pos + t)..at(g, pos + t) + hd;
                    cache.k[dst.clone()].convert_from_f32_slice(&kt[g * hd..(g + 1) * hd]);
                    cache.v[dst].convert_from_f32_slice(&vt[g * hd..(g + 1) * hd]);
                }
            }

            if seq == 1 {
                // Decoding: our single-query kernel reads the f16 cache in place. q is (n_head, hd).
                let mut o = vec![0f32; n_head * hd];
                let group = n_rep * hd;
                for g in 0..n_kv {
                    let span = at(g, kv_start)..at(g, kv_start + kv_len);
                    kernels::attend(
                        Isa::detect(),
                        &q[g * group..(g + 1) * group],
                        n_rep,
                        hd,
                        cfg.attn_softcap,
                        &cache.k[span.clone()],
                        &cache.v[span],
                        &mut o[g * group..(g + 1) * group],
                    )?;
                }
                out.extend_from_slice(&o);
                continue;
            }

            // A prompt: our causal batch kernel over the visible span of the cache, widened to f32.
            let widen = |c: &[f16]| -> Vec<f32> {
                let mut w = vec![0f32; n_kv * kv_len * hd];
                for (g, dst) in w.chunks_exact_mut(kv_len * hd).enumerate() {
                    c[at(g, kv_start)..at(g, kv_start + kv_len)].convert_to_f32_slice(dst);
                }
                w
            };
            let (k_all, v_all) = (widen(&cache.k), widen(&cache.v)); // (n_kv, kv_len, hd)
            let span = kernels::Span { pos, seq, kv_start, window: layer.window, softcap: cfg.attn_softcap };
            out.extend(kernels::attend_batch(q, &k_all, &v_all, n_head, n_kv, hd, span)?);
        }
        output(&layer.wo, &layer.bo, Tensor::from_vec(out, (rows, n_head * hd), &Device::Cpu)?)
    }

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

    /// The size in bytes of `len` positions of keys and values ([`Model::export_prefix`]).
    pub fn prefix_bytes(&self, len: usize) -> usize {
        2 * self.cfg.n_layer * self.cfg.n_head_kv * len * self.cfg.head_dim * std::mem::size_of::<f16>()
    }

    /// The keys and values of the first `len` positions of `state`, as little-endian f16:
    /// per layer the keys then the values, each per KV head a run of `len` positions.
    pub fn export_prefix(&self, state: &State, len: usize) -> Vec<u8> {
        let len = len.min(state.pos);
        let hd = self.cfg.head_dim;
        let mut out = Vec::with_capacity(self.prefix_bytes(len));
        for layer in &state.cache {
            for values in [&layer.k, &layer.v] {
                for g in 0..self.cfg.n_head_kv {
                    let at = g * state.capacity * hd;
                    for x in &values[at..at + len * hd] {
                        out.extend_from_slice(&x.to_le_bytes());
                    }
                }
            }
        }
        out
    }

    /// A new state of up to `max_len` tokens holding the first `len` of the `stored` positions
    /// that `bytes` ([`Model::export_prefix`]) holds, with room for `reserve` positions.
    pub fn import_prefix(
        &self,
        bytes: &[u8],
        stored: usize,
        len: usize,
        max_len: usize,
        reserve: usize,
    ) -> Result<State> {
        if bytes.len() != self.prefix_bytes(stored) || len > stored {
            bail!("cached keys and values of the wrong size for this model");
        }
        let mut state = self.new_state(max_len)?;
        if len > state.max_len {
            bail!("a prefix of {len} tokens does not fit in a context of {}", state.max_len);
        }
        self.reserve(&mut state, reserve.max(len))?;
        let hd = self.cfg.head_dim;
        let run = stored * hd * 2; // bytes of one KV head's positions
        let mut chunks = bytes.chunks_exact(run);
        for layer in &mut state.cache {
            for values in [&mut layer.k, &mut layer.v] {
                for g in 0..self.cfg.n_head_kv {
                    let Some(chunk) = chunks.next() else { bail!("cached keys and values cut short") };
                    let at = g * state.capacity * hd;
                    for (dst, b) in values[at..at + len * hd].iter_mut().zip(chunk.chunks_exact(2)) {
                        *dst = f16::from_le_bytes([b[0], b[1]]);
                    }
                }
            }
        }
        state.pos = len;
        Ok(state)
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

/// `act(gate) * up`, elementwise: GeGLU or SwiGLU.
///
/// GELU is computed as ggml computes it: the tanh formula evaluated once per f16 input and
/// looked up through a 64K-entry table (ggml's `GGML_GELU_FP16`, used by llama.cpp's fused
/// `geglu`). This matches llama.cpp's numerics exactly and replaces a libm `tanhf` per
/// element, a tenth of a prefill's time. SiLU is `x / (1 + e^-x)` in f32, as ggml's `swiglu`.
fn gated_activation(activation: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    let shape = gate.shape().clone();
    let mut out = up.flatten_all()?.to_vec1::<f32>()?;
    if gate.elem_count() != out.len() {
        bail!("internal error: a gate of {:?} with an up projection of {:?}", gate.shape(), up.shape());
    }
    let gelu_times = |g: &[f32], u: &mut [f32]| {
        let table = TABLE.get_or_init(|| {
            (0..=u16::MAX)
                .map(|bits| {
                    let x = half::f16::from_bits(bits).to_f32();
                    let y = 0.5 * x * (1.0 + (0.797_884_6 * x * (1.0 + 0.044_715 * x * x)).tanh());
                    half::f16::from_f32(y).to_f32()
                })
                .collect()
        });
        for (&x, u) in g.iter().zip(u) {
            *u *= if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x
            } else {
                table[half::f16::from_f32(x).to_bits() as usize]
            };
        }
    };
    let silu_times = |g: &[f32], u: &mut [f32]| {
        for (&x, u) in g.iter().zip(u) {
            *u *= x / (1.0 + (-x).exp());
        }
    };
    let apply = |g: &[f32], u: &mut [f32]| match activation {
        Activation::GeluTanh => gelu_times(g, u),
        Activation::Silu => silu_times(g, u),
    };
    // A prefill batch's elements are split over the pool; one row is not worth the hand-off.
    const CHUNK: usize = 16 * 1024;
    // The gate is read in place.
    with_values(gate, |g| {
        if out.len() <= CHUNK {
            apply(g, &mut out);
            return;
        }
        let chunks: Vec<std::sync::Mutex<&mut [f32]>> =
            out.chunks_mut(CHUNK).map(std::sync::Mutex::new).collect();
        candle_core::utils::barrier_pool().execute_chunked(chunks.len(), |range| {
            for i in range {
                // Each chunk is locked by exactly one work item, so this never waits.
                let mut u = chunks[i].lock().unwrap_or_else(|e| e.into_inner());
                apply(&g[i * CHUNK..], &mut u);
            }
        });
    })?;
    Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
}

/// RMSNorm over the last dimension. GGUF files store Gemma's norm weights with the +1 already
/// folded in (convert_hf_to_gguf), so this is the plain `x / rms(x) * w`, as candle's
/// `rms_norm` computes it but with the squares summed in 16 lanes (ggml sums them in f64) and a
/// batch's rows split over our pool: candle's runs on rayon's threads, which then compete for
/// the cores with our pool's spinning workers.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let n = w.elem_count();
    if n == 0 || x.dim(candle_core::D::Minus1)? != n {
        bail!("internal error: an RMSNorm of width {n} over {:?}", x.shape());
    }
    // The weights, like the input, read in place.
    let out = with_values(w, |w| {
        with_values(x, |xs| {
            let mut out = vec![0f32; xs.len()];
            for_rows(&mut out, n, |i, dst| {
                let src = &xs[i * n..(i + 1) * n];
                let mut lanes = [0f32; 16];
                let mut chunks = src.chunks_exact(16);
                for c in &mut chunks {
                    for (l, &v) in lanes.iter_mut().zip(c) {
                        *l += v * v;
                    }
                }
                let sum2 = lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| v * v).sum::<f32>();
                let m = (sum2 / n as f32 + eps).sqrt();
                for ((d, &s), &a) in dst.iter_mut().zip(src).zip(w) {
                    *d = s / m * a;
                }
            });
            out
        })
    })??;
    Ok(Tensor::from_vec(out, x.shape(), &Device::Cpu)?)
}

/// `a + b` for two tensors of the same shape (the residual connections), split over our pool
/// for a batch (see [`rms_norm`]).
fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        bail!("internal error: adding {:?} to {:?}", a.shape(), b.shape());
    }
    let cols = a.dim(candle_core::D::Minus1)?.max(1);
    let out = with_values(a, |av| {
        with_values(b, |bv| {
            let mut out = vec![0f32; av.len()];
            for_rows(&mut out, cols, |i, dst| {
                for ((d, &x), &y) in dst.iter_mut().zip(&av[i * cols..]).zip(&bv[i * cols..]) {
                    *d = x + y;
                }
            });
            out
        })
    })??;
    Ok(Tensor::from_vec(out, a.shape(), &Device::Cpu)?)
}

/// `f` over the f32 values of a CPU tensor, read in place (no copy when it is contiguous).
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        bail!("internal error: a tensor that is not on the CPU");
    };
    let start = layout.start_offset();
    let values = cpu.as_slice::<f32>()?.get(start..start + t.elem_count());
    let Some(values) = values else { bail!("internal error: a tensor shorter than its shape") };
    Ok(f(values))
}

/// `f(i, row i)` for every row of `out`, (rows, cols): a batch's rows split over the pool (in
/// runs of 16), a few rows on the calling thread.
fn for_rows(out: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    const RUN: usize = 16;
    let rows = out.len() / cols;
    if rows < 2 * RUN {
        for (i, row) in out.chunks_exact_mut(cols).enumerate() {
            f(i, row);
        }
        return;
    }
    let runs: Vec<std::sync::Mutex<&mut [f32]>> =
        out.chunks_mut(RUN * cols).map(std::sync::Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(runs.len(), |range| {
        for r in range {
            // Each run is locked by exactly one work item, so this never waits.
            let mut run = runs[r].lock().unwrap_or_else(|e| e.into_inner());
            for (j, row) in run.chunks_exact_mut(cols).enumerate() {
                f(r * RUN + j, row);
            }
        }
    });
}

/// `x · woᵀ (+ bias)`: a layer's attention output projection.
fn output(wo: &Linear, bias: &Option<Tensor>, x: Tensor) -> Result<Tensor> {
    let y = wo.forward(&x)?;
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Rotary position embedding for the rows of one batch, each segment `(pos, seq)` at the
/// positions `pos..pos + seq` of its own sequence: the cosines and sines `(rows, n_rot / 2)`,
/// built per call for just those positions, and the pairing of the model's [`RopeStyle`].
///
/// Angles follow ggml's rope: theta_i = p · freq_scale · base^(-2i/n_rot) / factor_i, with the
/// powers taken by repeated multiplication in f32 as ggml does, so our angles match llama.cpp's;
/// the cosines and sines are multiplied by `rope.scaling.attn_factor` as ggml's `mscale`.
struct Rope {
    style: RopeStyle,
    head_dim: usize,
    n_rot: usize,
    seq: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(
        cfg: &Config,
        base: f32,
        freq_scale: f32,
        factors: Option<&[f32]>,
        spans: &[(usize, usize)],
    ) -> Self {
        let half = cfg.n_rot / 2;
        let theta_scale = base.powf(-2.0 / cfg.n_rot as f32);
        let seq: usize = spans.iter().map(|&(_, n)| n).sum();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for p in spans.iter().flat_map(|&(pos, n)| pos..pos + n) {
            let mut theta = p as f32;
            for i in 0..half {
                let factor = factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
                let angle = freq_scale * (theta / factor);
                cos.push(angle.cos() * cfg.rope_attn_factor);
                sin.push(angle.sin() * cfg.rope_attn_factor);
                theta *= theta_scale;
            }
        }
        Self { style: cfg.rope_style, head_dim: cfg.head_dim, n_rot: cfg.n_rot, seq, cos, sin }
    }

    /// Rotates `x`, laid out `(seq, heads, head_dim)`, in place.
    fn apply(&self, x: &mut [f32], heads: usize) {
        let (hd, half) = (self.head_dim, self.n_rot / 2);
        for (t, row) in x.chunks_exact_mut(heads * hd).enumerate().take(self.seq) {
            let (cos, sin) = (&self.cos[t * half..(t + 1) * half], &self.sin[t * half..(t + 1) * half]);
            for head in row.chunks_exact_mut(hd) {
                for i in 0..half {
                    let (a, b) = match self.style {
                        RopeStyle::Norm => (2 * i, 2 * i + 1),
                        RopeStyle::Neox => (i, i + half),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[i] - x1 * sin[i];
                    head[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }
}

/// Loads tensors by name, checking their shapes, and remembers which were used, so that a
/// file with tensors this decoder would ignore is refused.
struct Used<'a> {
    gguf: &'a Gguf,
    names: std::collections::HashSet<String>,
}

impl<'a> Used<'a> {
    fn new(gguf: &'a Gguf) -> Self {
        Self { gguf, names: std::collections::HashSet::new() }
    }

    fn path(&self) -> std::path::Display<'_> {
        self.gguf.path().display()
    }

    /// A (rows, cols) matrix, in place in the mapped file.
    fn matrix(&mut self, name: &str, want: (usize, usize)) -> Result<Mapped> {
        let m = self.gguf.matrix(name)?;
        if m.shape() != want {
            bail!("{}: tensor {name} has shape {:?}, expected {want:?}", self.path(), m.shape());
        }
        self.names.insert(name.to_string());
        Ok(m)
    }

    /// A vector of `n` values, as f32.
    fn vector(&mut self, name: &str, n: usize) -> Result<Tensor> {
        let t = self.gguf.tensor(name)?;
        if t.shape().dims() != [n] {
            bail!("{}: tensor {name} has shape {:?}, expected [{n}]", self.path(), t.shape().dims());
        }
        self.names.insert(name.to_string());
        Ok(t.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)
    }

    /// Like [`Used::vector`], or `None` when the file has no such tensor.
    fn opt_vector(&mut self, name: &str, n: usize) -> Result<Option<Tensor>> {
        if self.gguf.has_tensor(name) { self.vector(name, n).map(Some) } else { Ok(None) }
    }

    fn check_all_used(&self) -> Result<()> {
        let mut unused: Vec<&String> =
            self.gguf.tensor_names().filter(|n| !self.names.contains(*n)).collect();
        unused.sort();
        if let Some(first) = unused.first() {
            bail!(
                "{}: tensor {} (and {} more) is not part of a '{}' model as streamgen knows it; \
                 refusing to run a model it would compute wrongly",
                self.path(),
                first.escape_debug(),
                unused.len() - 1,
                self.gguf.str("general.architecture").unwrap_or("?").escape_debug()
            );
        }
        Ok(())
    }
}

/// Copies a `(vocab,)` logits tensor into a vector.
pub fn logits_vec(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{Value, write};
    use candle_core::quantized::{GgmlDType, QTensor};

    /// A tiny random model of `arch` (2 layers; Gemma 3 with a window of 3) written to a
    /// temporary GGUF file, minus the tensors named in `skip`, plus the optional tensors named
    /// in `extra` (`bias`: q/k/v/output biases; `rope_freqs`; `stray`: a tensor no
    /// architecture uses).
    fn tiny(arch: &str, skip: &[&str], extra: &[&str]) -> tempfile::NamedTempFile {
        let (vocab, embd, heads, kv, hd, ff, layers) = (32usize, 16usize, 2u32, 1u32, 8u32, 24usize, 2usize);
        let gemma = arch == "gemma3";
        let key = |k: &str| format!("{arch}.{k}");
        let mut meta: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (key("block_count"), Value::U32(layers as u32)),
            (key("embedding_length"), Value::U32(embd as u32)),
            (key("feed_forward_length"), Value::U32(ff as u32)),
            (key("attention.head_count"), Value::U32(heads)),
            (key("attention.head_count_kv"), Value::U32(kv)),
            (key("attention.key_length"), Value::U32(hd)),
            (key("context_length"), Value::U32(64)),
            (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
            (key("rope.freq_base"), Value::F32(1e4)),
        ];
        if gemma {
            meta.push((key("attention.sliding_window"), Value::U32(3)));
        }
        if extra.contains(&"experts") {
            meta.push((key("expert_count"), Value::U32(8)));
        }
        let dev = Device::Cpu;
        let mut seed = 1u32;
        let mut rand = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, data: Vec<f32>| {
            let t = Tensor::from_vec(data, shape, &dev).expect("tensor");
            tensors.push((name, QTensor::quantize(&t, GgmlDType::F32).expect("quantize")));
        };
        add("token_embd.weight".into(), vec![vocab, embd], rand(vocab * embd));
        add("output_norm.weight".into(), vec![embd], vec![1.0; embd]);
        if extra.contains(&"rope_freqs") {
            add("rope_freqs.weight".into(), vec![hd as usize / 2], vec![1.0, 1.0, 4.0, 8.0]);
        }
        if extra.contains(&"stray") {
            add("blk.0.ffn_down.bias".into(), vec![embd], vec![0.0; embd]);
        }
        let (q, k) = (heads as usize * hd as usize, kv as usize * hd as usize);
        for il in 0..layers {
            for (name, shape) in [
                ("attn_q", vec![q, embd]),
                ("attn_k", vec![k, embd]),
                ("attn_v", vec![k, embd]),
                ("attn_output", vec![embd, q]),
                ("ffn_gate", vec![ff, embd]),
                ("ffn_up", vec![ff, embd]),
                ("ffn_down", vec![embd, ff]),
            ] {
                let n = shape.iter().product();
                add(format!("blk.{il}.{name}.weight"), shape, rand(n));
            }
            if extra.contains(&"bias") {
                for (name, n) in [("attn_q", q), ("attn_k", k), ("attn_v", k), ("attn_output", embd)] {
                    add(format!("blk.{il}.{name}.bias"), vec![n], rand(n));
                }
            }
            let mut norms = vec![("attn_norm", embd), ("ffn_norm", embd)];
            if gemma {
                norms.extend([
                    ("attn_q_norm", hd as usize),
                    ("attn_k_norm", hd as usize),
                    ("post_attention_norm", embd),
                    ("post_ffw_norm", embd),
                ]);
            }
            for (name, n) in norms {
                add(format!("blk.{il}.{name}.weight"), vec![n], vec![1.0; n]);
            }
        }
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors
            .iter()
            .filter(|(n, _)| !skip.contains(&n.as_str()))
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        let mut f = file.reopen().expect("reopen");
        write(&mut f, &meta_refs, &tensor_refs).expect("write gguf");
        file
    }

    fn tiny_gemma3(skip: &[&str]) -> tempfile::NamedTempFile {
        tiny("gemma3", skip, &[])
    }

    fn load(file: &tempfile::NamedTempFile) -> Result<Model> {
        Model::load(&Gguf::open(file.path())?)
    }

    /// Every architecture, with and without biases and rope frequency factors: feeding one
    /// token at a time, or uneven chunks, equals one batch (across Gemma's window of 3).
    #[test]
    fn one_token_at_a_time_equals_one_batch() {
        for (arch, extra) in [
            ("gemma3", &[][..]),
            ("gemma3", &["bias"][..]),
            ("llama", &[][..]),
            ("llama", &["bias", "rope_freqs"][..]),
        ] {
            let file = tiny(arch, &[], extra);
            let model = load(&file).expect("load");
            let tokens = [2u32, 7, 9, 30, 4, 4, 11, 1, 5];
            let mut batch = model.new_state(64).expect("state");
            let all = model.forward_all(&mut batch, &tokens).expect("batch");
            let row = |i: usize| logits_vec(&all.get(i).expect("row")).expect("vec");
            // f32 weights: the one-row and the several-row float kernels sum in different orders
            // (measured up to 1.4e-4 on logits of a few units).
            let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 5e-4);
            let mut step = model.new_state(64).expect("state");
            for (i, &t) in tokens.iter().enumerate() {
                let one = logits_vec(&model.forward(&mut step, &[t]).expect("step")).expect("vec");
                let diff = one.iter().zip(&row(i)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(close(&one, &row(i)), "{arch} {extra:?} position {i}: {diff}");
            }
            let mut chunked = model.new_state(64).expect("state");
            model.forward(&mut chunked, &tokens[..4]).expect("chunk");
            let last = logits_vec(&model.forward(&mut chunked, &tokens[4..]).expect("chunk")).expect("vec");
            assert!(close(&last, &row(tokens.len() - 1)), "{arch} {extra:?} in chunks");
        }
    }

    /// Several sequences in one batch, at different positions and with different numbers of
    /// tokens (decode steps next to a prompt), give each sequence the logits it gets alone:
    /// every row attends over its own cache and window only.
    #[test]
    fn a_batch_of_sequences_equals_each_alone() {
        for arch in ["gemma3", "llama"] {
            let file = tiny(arch, &[], &[]);
            let model = load(&file).expect("load");
            let prompts: [&[u32]; 3] = [&[2, 7, 9, 30, 4], &[5, 1], &[11, 3, 3, 8, 20, 6, 2]];
            let next: [&[u32]; 3] = [&[8], &[6, 6, 1, 7], &[9]];
            let alone: Vec<Vec<f32>> = prompts
                .iter()
                .zip(next)
                .map(|(p, n)| {
                    let mut state = model.new_state(64).expect("state");
                    model.feed(&mut state, p).expect("prompt");
                    logits_vec(&model.forward(&mut state, n).expect("next")).expect("vec")
                })
                .collect();
            let mut states: Vec<State> = prompts
                .iter()
                .map(|p| {
                    let mut state = model.new_state(64).expect("state");
                    model.feed(&mut state, p).expect("prompt");
                    state
                })
                .collect();
            let mut segments: Vec<Segment<'_>> =
                states.iter_mut().zip(next).map(|(state, tokens)| Segment { state, tokens }).collect();
            let batch = model.forward_batch(&mut segments).expect("batch");
            for (i, want) in alone.iter().enumerate() {
                let got = logits_vec(&batch.get(i).expect("row")).expect("vec");
                let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-4, "{arch}: sequence {i} differs by {diff}");
            }
            for (state, (p, n)) in states.iter().zip(prompts.iter().zip(next)) {
                assert_eq!(state.len(), p.len() + n.len());
            }
        }
    }

    /// A state forked from another's first positions continues exactly as if it had been fed
    /// those tokens itself.
    #[test]
    fn a_forked_prefix_equals_feeding_it() {
        for arch in ["gemma3", "llama"] {
            let file = tiny(arch, &[], &[]);
            let model = load(&file).expect("load");
            let (prefix, rest) = ([2u32, 7, 9, 30, 4, 4], [11u32, 1, 5]);
            let mut fed = model.new_state(64).expect("state");
            model.feed(&mut fed, &prefix[..4]).expect("prefix");
            let want = logits_vec(&model.forward(&mut fed, &rest).expect("rest")).expect("vec");
            let mut base = model.new_state(64).expect("state");
            model.feed(&mut base, &prefix).expect("longer prefix");
            // Only the first four positions are taken from `base`.
            let mut forked = model.fork(&base, 4, 64, 8).expect("fork");
            assert_eq!(forked.len(), 4);
            let got = logits_vec(&model.forward(&mut forked, &rest).expect("rest")).expect("vec");
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "{arch}: {diff}");
        }
    }

    /// Keys and values written out and read back continue exactly as the original state.
    #[test]
    fn an_exported_prefix_imports_exactly() {
        let file = tiny("llama", &[], &[]);
        let model = load(&file).expect("load");
        let mut state = model.new_state(64).expect("state");
        model.feed(&mut state, &[2, 7, 9, 30, 4, 4]).expect("prompt");
        let bytes = model.export_prefix(&state, 6);
        assert_eq!(bytes.len(), model.prefix_bytes(6));
        let mut back = model.import_prefix(&bytes, 6, 5, 64, 16).expect("import");
        assert_eq!(back.len(), 5);
        let mut fed = model.new_state(64).expect("state");
        model.feed(&mut fed, &[2, 7, 9, 30, 4]).expect("prompt");
        let want = logits_vec(&model.forward(&mut fed, &[4, 11]).expect("forward")).expect("vec");
        let got = logits_vec(&model.forward(&mut back, &[4, 11]).expect("forward")).expect("vec");
        assert_eq!(got, want);
        assert!(model.import_prefix(&bytes[1..], 6, 5, 64, 16).is_err(), "a wrong size is refused");
    }

    #[test]
    fn a_full_context_and_bad_tokens_are_errors() {
        let file = tiny_gemma3(&[]);
        let model = load(&file).expect("load");
        let mut state = model.new_state(4).expect("state");
        model.forward(&mut state, &[1, 2, 3]).expect("fits");
        let Err(err) = model.forward(&mut state, &[1, 2]) else { panic!("the context should be full") };
        assert!(err.to_string().contains("context is full"), "{err}");
        let mut state = model.new_state(4).expect("state");
        let Err(err) = model.forward(&mut state, &[99]) else { panic!("token 99 is out of range") };
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }

    #[test]
    fn a_missing_tensor_is_named() {
        let file = tiny_gemma3(&["blk.1.ffn_up.weight"]);
        let Err(err) = load(&file) else { panic!("a missing tensor must fail the load") };
        assert!(format!("{err:#}").contains("blk.1.ffn_up.weight"), "{err:#}");
    }

    /// The optional tensors change the result (so they are really applied).
    #[test]
    fn biases_and_rope_factors_are_applied() {
        let tokens = [3u32, 1, 4, 1, 5, 9, 2, 6];
        let logits = |extra: &[&str]| {
            let file = tiny("llama", &[], extra);
            let model = load(&file).expect("load");
            let mut state = model.new_state(64).expect("state");
            logits_vec(&model.forward(&mut state, &tokens).expect("forward")).expect("vec")
        };
        let plain = logits(&[]);
        for extra in [&["bias"][..], &["rope_freqs"][..]] {
            let other = logits(extra);
            let diff = plain.iter().zip(&other).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff > 1e-3, "{extra:?} made no difference");
        }
    }

    /// llama's adjacent-pair rope on rows permuted as llama.cpp's converter permutes Q and K
    /// equals the half-split rope on the original rows: the identity `llama` files rely on.
    #[test]
    fn adjacent_pair_rope_on_permuted_rows_equals_half_split_rope() {
        let file = tiny("llama", &[], &[]);
        let gguf = Gguf::open(file.path()).expect("open");
        let mut cfg = Config::from_gguf(&gguf).expect("config");
        let (heads, hd, seq) = (3, cfg.head_dim, 5);
        let x: Vec<f32> = (0..seq * heads * hd).map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0).collect();
        // The converter's permute: new row (h, i, j) comes from old row (h, j, i), i < hd/2, j < 2.
        let permute = |v: &[f32]| -> Vec<f32> {
            let mut out = vec![0f32; v.len()];
            for (src, dst) in v.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
                for i in 0..hd / 2 {
                    for j in 0..2 {
                        dst[2 * i + j] = src[j * hd / 2 + i];
                    }
                }
            }
            out
        };
        cfg.rope_style = RopeStyle::Neox;
        let mut neox = x.clone();
        Rope::new(&cfg, 1e4, 1.0, None, &[(7, seq)]).apply(&mut neox, heads);
        cfg.rope_style = RopeStyle::Norm;
        let mut norm = permute(&x);
        Rope::new(&cfg, 1e4, 1.0, None, &[(7, seq)]).apply(&mut norm, heads);
        let want = permute(&neox);
        for (a, b) in norm.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!(neox != x, "the rotation must change the values");
    }

    #[test]
    fn unknown_tensors_and_architectures_are_refused() {
        let file = tiny("llama", &[], &["stray"]);
        let Err(err) = load(&file) else { panic!("a stray tensor must fail the load") };
        assert!(format!("{err:#}").contains("blk.0.ffn_down.bias"), "{err:#}");
        let file = tiny("mamba\u{1b}[2J", &[], &[]);
        let Err(err) = load(&file) else { panic!("an unknown architecture must fail") };
        let msg = format!("{err:#}");
        assert!(msg.contains("unsupported model architecture") && !msg.contains('\u{1b}'), "{msg}");
        // Mixture-of-experts and hybrid families by name, and experts under a dense name.
        for arch in ["qwen3moe", "qwen35", "gemma3n"] {
            let file = tiny(arch, &[], &[]);
            let Err(err) = load(&file) else { panic!("{arch} must be refused") };
            assert!(format!("{err:#}").contains(&format!("architecture '{arch}'")), "{err:#}");
        }
        let file = tiny("llama", &[], &["experts"]);
        let Err(err) = load(&file) else { panic!("experts must be refused") };
        assert!(format!("{err:#}").contains("mixture-of-experts"), "{err:#}");
    }
}
