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
mod forward;
mod kv_cache;
mod ops;

pub use config::{Activation, Config, RopeStyle};
pub use kv_cache::State;
use ops::{Rope, add, gated_activation, output, rms_norm};

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
        Ok(self.state_with_slack(max_len, kv_cache::RING_SLACK))
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

    /// Like [`Model::forward_all`], but only the logits after the last `rows` fed tokens,
    /// `(rows, vocab)`: a speculative pass that feeds forced tokens before its proposals
    /// needs none for them.
    pub fn forward_last(&self, state: &mut State, tokens: &[u32], rows: usize) -> Result<Tensor> {
        let hidden = self.hidden(state, tokens, false)?;
        let n = hidden.dim(0)?;
        if rows == 0 || rows > n {
            bail!("internal error: the logits of {rows} rows of a pass of {n}");
        }
        self.logits(&hidden.narrow(0, n - rows, rows)?.contiguous()?)
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
        let m = Mapped::from_gguf(self.gguf, name)?;
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
mod tests;
