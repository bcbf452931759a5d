//! The decoder: one transformer forward pass, configured from GGUF metadata, over the file's
//! quantized weights, with a KV cache.
//!
//! Model families differ in a handful of switches (norm placement, activation, q/k norms,
//! sliding-window layers, rope bases, embedding scale, tied output). [`Config`] holds them and
//! [`Model::forward`] is the one forward pass; llama.cpp's graph builders (`llm_build_gemma3_iswa`)
//! are the reference for what each switch does. Supported today: `gemma3`.

use anyhow::{Context, Result, bail};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::gguf::Gguf;
use crate::kernels::{self, Isa};
use crate::weights::{Embedding, Linear};

/// The feed-forward gate's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU with the tanh approximation (Gemma; ggml's `gelu`).
    GeluTanh,
}

/// Everything about a model's shape and numerics that the forward pass needs, read from GGUF
/// metadata.
#[derive(Debug, Clone)]
pub struct Config {
    /// `general.architecture`.
    pub architecture: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Per-head size of queries and keys (`attention.key_length`).
    pub head_dim: usize,
    pub n_ff: usize,
    pub vocab_size: usize,
    /// The context the model was trained for.
    pub context_length: usize,
    pub rms_eps: f32,
    /// Rope base of the global-attention layers.
    pub rope_base: f32,
    /// Rope base of the sliding-window layers.
    pub rope_base_local: f32,
    /// Multiplier of rope positions on global layers (1 / linear scaling factor).
    pub rope_freq_scale: f32,
    /// Sliding window in tokens, and which layers use it.
    pub sliding_window: Option<usize>,
    pub local_layers: Vec<bool>,
    /// Input embeddings are multiplied by this (Gemma: sqrt(n_embd)).
    pub embed_scale: f32,
    /// Queries are multiplied by this before q·k.
    pub attn_scale: f32,
    pub activation: Activation,
}

impl Config {
    /// Reads the configuration of a supported architecture from the file's metadata.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let arch = gguf.str("general.architecture")?.to_string();
        match arch.as_str() {
            "gemma3" => Self::gemma3(gguf, arch),
            other => bail!(
                "{}: unsupported model architecture '{other}' (supported: gemma3)",
                gguf.path().display()
            ),
        }
    }

    fn gemma3(gguf: &Gguf, arch: String) -> Result<Self> {
        let key = |k: &str| format!("{arch}.{k}");
        let usize_of = |k: &str| -> Result<usize> { Ok(gguf.u64(&key(k))? as usize) };
        let n_layer = usize_of("block_count")?;
        let n_embd = usize_of("embedding_length")?;
        let n_head = usize_of("attention.head_count")?;
        let n_head_kv = match gguf.opt_u64(&key("attention.head_count_kv"))? {
            Some(n) => n as usize,
            None => n_head,
        };
        let head_dim = match gguf.opt_u64(&key("attention.key_length"))? {
            Some(n) => n as usize,
            None => n_embd / n_head.max(1),
        };
        let sliding_window = gguf.opt_u64(&key("attention.sliding_window"))?.map(|w| w as usize);
        // llama.cpp's `set_swa_pattern(6)` for Gemma 3: five local layers, then one global.
        let local_layers = (0..n_layer).map(|il| sliding_window.is_some() && il % 6 < 5).collect();
        let rope_scale = match gguf.opt_str(&key("rope.scaling.type"))? {
            Some("linear") => gguf.opt_f32(&key("rope.scaling.factor"))?.unwrap_or(1.0),
            _ => 1.0,
        };
        let vocab_size = gguf
            .content()
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .context("token_embd.weight is missing")?;
        let cfg = Self {
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: usize_of("feed_forward_length")?,
            vocab_size,
            context_length: usize_of("context_length")?,
            rms_eps: gguf.opt_f32(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
            rope_base: gguf.opt_f32(&key("rope.freq_base"))?.unwrap_or(1_000_000.0),
            // Gemma 3 files carry no key for it; llama.cpp hard-codes 10,000 for the local layers.
            rope_base_local: gguf.opt_f32(&key("rope.freq_base_swa"))?.unwrap_or(10_000.0),
            rope_freq_scale: 1.0 / rope_scale,
            sliding_window,
            local_layers,
            embed_scale: (n_embd as f32).sqrt(),
            // Gemma 3 scales queries by 1/sqrt(head_dim) (gemma_pytorch's query_pre_attn_scalar).
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            activation: Activation::GeluTanh,
            architecture: arch,
        };
        cfg.validate(gguf)?;
        Ok(cfg)
    }

    fn validate(&self, gguf: &Gguf) -> Result<()> {
        let bad =
            |what: &str| anyhow::anyhow!("{}: inconsistent model metadata: {what}", gguf.path().display());
        if self.n_layer == 0 || self.n_embd == 0 || self.n_head == 0 || self.head_dim == 0 {
            return Err(bad("zero layers, width or heads"));
        }
        if self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return Err(bad("head_count is not a multiple of head_count_kv"));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad("odd attention.key_length"));
        }
        if self.sliding_window == Some(0) {
            return Err(bad("sliding_window is 0"));
        }
        Ok(())
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    post_attn_norm: Tensor,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Tensor,
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
    output_norm: Tensor,
    layers: Vec<Layer>,
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

impl Model {
    /// Loads the weights of a GGUF file whose architecture is supported.
    pub fn load(gguf: &Gguf) -> Result<Self> {
        let cfg = Config::from_gguf(gguf)?;
        let embd = gguf.matrix("token_embd.weight")?;
        check_dims(gguf, "token_embd.weight", embd.shape(), (cfg.vocab_size, cfg.n_embd))?;
        let embedding = Embedding::new(embd)?;
        // Tied output: the logits reuse the embedding matrix unless the file has its own.
        let output = if gguf.has_tensor("output.weight") {
            let m = gguf.matrix("output.weight")?;
            check_dims(gguf, "output.weight", m.shape(), (cfg.vocab_size, cfg.n_embd))?;
            Linear::new(m)?
        } else {
            embedding.as_linear()?
        };
        let output_norm = vector(gguf, "output_norm.weight", cfg.n_embd)?;
        let q_dim = cfg.n_head * cfg.head_dim;
        let kv_dim = cfg.n_head_kv * cfg.head_dim;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for il in 0..cfg.n_layer {
            let p = format!("blk.{il}");
            let wq = matrix(gguf, &p, "attn_q", q_dim, cfg.n_embd)?;
            let wk = matrix(gguf, &p, "attn_k", kv_dim, cfg.n_embd)?;
            let wv = matrix(gguf, &p, "attn_v", kv_dim, cfg.n_embd)?;
            let wo = matrix(gguf, &p, "attn_output", cfg.n_embd, q_dim)?;
            let gate = matrix(gguf, &p, "ffn_gate", cfg.n_ff, cfg.n_embd)?;
            let up = matrix(gguf, &p, "ffn_up", cfg.n_ff, cfg.n_embd)?;
            let down = matrix(gguf, &p, "ffn_down", cfg.n_embd, cfg.n_ff)?;
            let vec = |name: &str, n: usize| vector(gguf, &format!("{p}.{name}.weight"), n);
            layers.push(Layer {
                attn_norm: vec("attn_norm", cfg.n_embd)?,
                q_norm: vec("attn_q_norm", cfg.head_dim)?,
                k_norm: vec("attn_k_norm", cfg.head_dim)?,
                post_attn_norm: vec("post_attention_norm", cfg.n_embd)?,
                ffn_norm: vec("ffn_norm", cfg.n_embd)?,
                post_ffn_norm: vec("post_ffw_norm", cfg.n_embd)?,
                wq,
                wk,
                wv,
                wo,
                gate,
                up,
                down,
                window: if cfg.local_layers[il] { cfg.sliding_window } else { None },
            });
        }
        Ok(Self { cfg, embedding, output, output_norm, layers })
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
        Ok(self.output.forward(&hidden)?.squeeze(0)?)
    }

    /// Feeds `tokens` into the cache without computing logits (prefill chunks before the last).
    pub fn feed(&self, state: &mut State, tokens: &[u32]) -> Result<()> {
        self.hidden(state, tokens, true).map(drop)
    }

    /// Like [`Model::forward`], but returns the logits after every fed token: `(seq, vocab)`.
    /// Row `i` predicts the token after `tokens[i]`. For tests and evaluation.
    pub fn forward_all(&self, state: &mut State, tokens: &[u32]) -> Result<Tensor> {
        let hidden = self.hidden(state, tokens, false)?;
        self.output.forward(&hidden)
    }

    /// Runs the layers over `tokens`, appends their keys and values to the cache, and returns
    /// the final-normed hidden states `(seq, n_embd)`, or only the last row when `last_only`.
    fn hidden(&self, state: &mut State, tokens: &[u32], last_only: bool) -> Result<Tensor> {
        let cfg = &self.cfg;
        let seq = tokens.len();
        if seq == 0 {
            bail!("no tokens to feed the model");
        }
        let pos = state.pos;
        if pos + seq > state.max_len {
            bail!(
                "the context is full: {} tokens do not fit in {} ({} already used)",
                seq,
                state.max_len,
                pos
            );
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            bail!("token id {bad} is outside the vocabulary of {} tokens", cfg.vocab_size);
        }
        self.reserve(state, pos + seq)?;

        // (seq, n_embd)
        let mut x = (self.embedding.lookup(tokens)? * f64::from(cfg.embed_scale))?;

        let (cos_g, sin_g) = rope_tables(cfg.rope_base, cfg.rope_freq_scale, cfg.head_dim, pos, seq)?;
        let (cos_l, sin_l) = rope_tables(cfg.rope_base_local, 1.0, cfg.head_dim, pos, seq)?;

        let capacity = state.capacity;
        for (layer, cache) in self.layers.iter().zip(state.cache.iter_mut()) {
            let (cos, sin) = if layer.window.is_some() { (&cos_l, &sin_l) } else { (&cos_g, &sin_g) };
            // The first cached position any query of this batch can see.
            let kv_start = layer.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let kv_len = pos + seq - kv_start;
            let residual = &x;
            let h = rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
            let att = self.attention(layer, &h, cos, sin, cache, capacity, pos, kv_start, kv_len)?;
            let att = rms_norm(&att, &layer.post_attn_norm, cfg.rms_eps)?;
            let x_mid = (att + residual)?;

            let h = rms_norm(&x_mid, &layer.ffn_norm, cfg.rms_eps)?;
            let gated = match cfg.activation {
                Activation::GeluTanh => geglu(&layer.gate.forward(&h)?, &layer.up.forward(&h)?)?,
            };
            let ff = layer.down.forward(&gated)?;
            let ff = rms_norm(&ff, &layer.post_ffn_norm, cfg.rms_eps)?;
            x = (ff + x_mid)?;
        }
        state.pos += seq;

        let x = if last_only { x.narrow(0, seq - 1, 1)? } else { x };
        rms_norm(&x, &self.output_norm, cfg.rms_eps)
    }

    /// Self-attention of one layer for the batch `h` `(seq, n_embd)`; writes the batch's keys
    /// and values into the cache at `pos`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: &mut LayerCache,
        capacity: usize,
        pos: usize,
        kv_start: usize,
        kv_len: usize,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (seq, _) = h.dims2()?;
        let (n_head, n_kv, hd) = (cfg.n_head, cfg.n_head_kv, cfg.head_dim);
        let n_rep = n_head / n_kv;

        // (1, seq, heads, head_dim), the layout candle's rope_thd wants.
        let q = layer.wq.forward(h)?.reshape((1, seq, n_head, hd))?;
        let k = layer.wk.forward(h)?.reshape((1, seq, n_kv, hd))?;
        let v = layer.wv.forward(h)?.reshape((seq, n_kv, hd))?;
        let q = rms_norm(&q, &layer.q_norm, cfg.rms_eps)?;
        let k = rms_norm(&k, &layer.k_norm, cfg.rms_eps)?;
        let q = (candle_nn::rotary_emb::rope_thd(&q.contiguous()?, cos, sin)? * f64::from(cfg.attn_scale))?;
        let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, cos, sin)?;

        // Cache layout (n_kv, capacity, head_dim): one contiguous run of keys per KV head.
        let at = |g: usize, p: usize| (g * capacity + p) * hd;
        {
            let k = k.flatten_all()?.to_vec1::<f32>()?; // (seq, n_kv, hd)
            let v = v.flatten_all()?.to_vec1::<f32>()?;
            for (t, (kt, vt)) in k.chunks_exact(n_kv * hd).zip(v.chunks_exact(n_kv * hd)).enumerate() {
                for g in 0..n_kv {
                    let dst = at(g, pos + t)..at(g, pos + t) + hd;
                    cache.k[dst.clone()].convert_from_f32_slice(&kt[g * hd..(g + 1) * hd]);
                    cache.v[dst].convert_from_f32_slice(&vt[g * hd..(g + 1) * hd]);
                }
            }
        }

        if seq == 1 {
            // Decoding: our single-query kernel reads the f16 cache in place.
            let q = q.flatten_all()?.to_vec1::<f32>()?; // (n_head, hd)
            let mut out = vec![0f32; n_head * hd];
            let group = n_rep * hd;
            for g in 0..n_kv {
                let span = at(g, kv_start)..at(g, kv_start + kv_len);
                kernels::attend(
                    Isa::detect(),
                    &q[g * group..(g + 1) * group],
                    n_rep,
                    hd,
                    &cache.k[span.clone()],
                    &cache.v[span],
                    &mut out[g * group..(g + 1) * group],
                )?;
            }
            return layer.wo.forward(&Tensor::from_vec(out, (1, n_head * hd), &Device::Cpu)?);
        }

        // A batch: our causal batch kernel over the visible span of the cache, widened to f32.
        let widen = |c: &[f16]| -> Vec<f32> {
            let mut out = vec![0f32; n_kv * kv_len * hd];
            for (g, dst) in out.chunks_exact_mut(kv_len * hd).enumerate() {
                c[at(g, kv_start)..at(g, kv_start + kv_len)].convert_to_f32_slice(dst);
            }
            out
        };
        let (k_all, v_all) = (widen(&cache.k), widen(&cache.v)); // (n_kv, kv_len, hd)
        let q = q.flatten_all()?.to_vec1::<f32>()?; // (seq, n_head, hd)
        let span = kernels::Span { pos, seq, kv_start, window: layer.window };
        let out = kernels::attend_batch(&q, &k_all, &v_all, n_head, n_kv, hd, span)?;
        layer.wo.forward(&Tensor::from_vec(out, (seq, n_head * hd), &Device::Cpu)?)
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

/// `gelu(gate) * up`, elementwise, with GELU computed as ggml computes it: the tanh formula
/// evaluated once per f16 input and looked up through a 64K-entry table (ggml's
/// `GGML_GELU_FP16`, used by llama.cpp's fused `geglu`). This matches llama.cpp's numerics
/// exactly and replaces a libm `tanhf` per element, a tenth of a prefill's time.
fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| {
                let x = half::f16::from_bits(bits).to_f32();
                let y = 0.5 * x * (1.0 + (0.797_884_6 * x * (1.0 + 0.044_715 * x * x)).tanh());
                half::f16::from_f32(y).to_f32()
            })
            .collect()
    });
    let shape = gate.shape().clone();
    let g = gate.flatten_all()?.to_vec1::<f32>()?;
    let mut out = up.flatten_all()?.to_vec1::<f32>()?;
    let gelu_times = |g: &[f32], u: &mut [f32]| {
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
    // A prefill batch's elements are split over the pool; one row is not worth the hand-off.
    const CHUNK: usize = 16 * 1024;
    if out.len() <= CHUNK {
        gelu_times(&g, &mut out);
    } else {
        let chunks: Vec<std::sync::Mutex<&mut [f32]>> =
            out.chunks_mut(CHUNK).map(std::sync::Mutex::new).collect();
        candle_core::utils::barrier_pool().execute_chunked(chunks.len(), |range| {
            for i in range {
                // Each chunk is locked by exactly one work item, so this never waits.
                let mut u = chunks[i].lock().unwrap_or_else(|e| e.into_inner());
                gelu_times(&g[i * CHUNK..], &mut u);
            }
        });
    }
    Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
}

/// RMSNorm over the last dimension. GGUF files store Gemma's norm weights with the +1 already
/// folded in (convert_hf_to_gguf), so this is the plain `x / rms(x) * w`.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?)
}

/// Rotary tables `(seq, head_dim / 2)` for positions `pos..pos + seq`, built per call for just
/// those positions. Frequencies follow ggml's rope: theta_i = p · base^(-2i/d), with the powers
/// taken by repeated multiplication in f32 as ggml does, so our angles match llama.cpp's.
fn rope_tables(
    base: f32,
    freq_scale: f32,
    head_dim: usize,
    pos: usize,
    seq: usize,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let theta_scale = base.powf(-2.0 / head_dim as f32);
    let mut cos = Vec::with_capacity(seq * half);
    let mut sin = Vec::with_capacity(seq * half);
    for p in pos..pos + seq {
        let mut theta = p as f32 * freq_scale;
        for _ in 0..half {
            cos.push(theta.cos());
            sin.push(theta.sin());
            theta *= theta_scale;
        }
    }
    Ok((Tensor::from_vec(cos, (seq, half), &Device::Cpu)?, Tensor::from_vec(sin, (seq, half), &Device::Cpu)?))
}

fn matrix(gguf: &Gguf, layer: &str, name: &str, rows: usize, cols: usize) -> Result<Linear> {
    let full = format!("{layer}.{name}.weight");
    let m = gguf.matrix(&full)?;
    check_dims(gguf, &full, m.shape(), (rows, cols))?;
    Linear::new(m)
}

fn check_dims(gguf: &Gguf, name: &str, got: (usize, usize), want: (usize, usize)) -> Result<()> {
    if got != want {
        bail!("{}: tensor {name} has shape {got:?}, expected {want:?}", gguf.path().display());
    }
    Ok(())
}

fn vector(gguf: &Gguf, name: &str, n: usize) -> Result<Tensor> {
    let t = gguf.tensor(name)?;
    check_shape(gguf, name, &t, &[n])?;
    Ok(t.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)
}

fn check_shape(gguf: &Gguf, name: &str, t: &QTensor, want: &[usize]) -> Result<()> {
    if t.shape().dims() != want {
        bail!("{}: tensor {name} has shape {:?}, expected {want:?}", gguf.path().display(), t.shape().dims());
    }
    Ok(())
}

/// Copies a `(vocab,)` logits tensor into a vector.
pub fn logits_vec(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::quantized::gguf_file::{Value, write};

    /// A tiny random Gemma 3 (2 layers, window 3) written to a temporary GGUF file, minus the
    /// tensors named in `skip`.
    fn tiny_gemma3(skip: &[&str]) -> tempfile::NamedTempFile {
        let (vocab, embd, heads, kv, hd, ff, layers) = (32usize, 16usize, 2u32, 1u32, 8u32, 24usize, 2usize);
        let meta: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String("gemma3".into())),
            ("gemma3.block_count".into(), Value::U32(layers as u32)),
            ("gemma3.embedding_length".into(), Value::U32(embd as u32)),
            ("gemma3.feed_forward_length".into(), Value::U32(ff as u32)),
            ("gemma3.attention.head_count".into(), Value::U32(heads)),
            ("gemma3.attention.head_count_kv".into(), Value::U32(kv)),
            ("gemma3.attention.key_length".into(), Value::U32(hd)),
            ("gemma3.context_length".into(), Value::U32(64)),
            ("gemma3.attention.sliding_window".into(), Value::U32(3)),
            ("gemma3.rope.freq_base".into(), Value::F32(1e6)),
        ];
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
            for (name, n) in [
                ("attn_norm", embd),
                ("attn_q_norm", hd as usize),
                ("attn_k_norm", hd as usize),
                ("post_attention_norm", embd),
                ("ffn_norm", embd),
                ("post_ffw_norm", embd),
            ] {
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

    fn load(file: &tempfile::NamedTempFile) -> Result<Model> {
        Model::load(&Gguf::open(file.path())?)
    }

    #[test]
    fn one_token_at_a_time_equals_one_batch_across_the_window() {
        let file = tiny_gemma3(&[]);
        let model = load(&file).expect("load");
        let tokens = [2u32, 7, 9, 30, 4, 4, 11, 1, 5];
        let mut batch = model.new_state(64).expect("state");
        let all = model.forward_all(&mut batch, &tokens).expect("batch");
        let mut step = model.new_state(64).expect("state");
        for (i, &t) in tokens.iter().enumerate() {
            let one = logits_vec(&model.forward(&mut step, &[t]).expect("step")).expect("vec");
            let row = logits_vec(&all.get(i).expect("row")).expect("vec");
            for (a, b) in one.iter().zip(&row) {
                assert!((a - b).abs() < 1e-4, "position {i}: {a} vs {b}");
            }
        }
        // Chunks of uneven size over the same sequence agree too.
        let mut chunked = model.new_state(64).expect("state");
        model.forward(&mut chunked, &tokens[..4]).expect("chunk");
        let last = logits_vec(&model.forward(&mut chunked, &tokens[4..]).expect("chunk")).expect("vec");
        let row = logits_vec(&all.get(tokens.len() - 1).expect("row")).expect("vec");
        assert!(last.iter().zip(&row).all(|(a, b)| (a - b).abs() < 1e-4));
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
}
