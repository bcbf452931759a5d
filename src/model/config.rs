//! The per-architecture switches of the one decoder, read from GGUF metadata.
//!
//! Model families are the same pre-norm RMSNorm / grouped-query attention / rotary decoder
//! with a handful of differences (llama.cpp's `src/models/<arch>.cpp`; summarised with
//! citations in the project's design notes). [`Config::from_gguf`] reads the keys every
//! architecture shares, then sets the switches of the file's architecture. Anything else is a
//! one-line error naming the architecture: never a guess that would load and write nonsense.

use anyhow::{Result, anyhow, bail};

use candle_core::quantized::gguf_file::Value;

use crate::gguf::{Gguf, value_u64};

/// The architectures [`Config::from_gguf`] accepts, for error messages.
pub const SUPPORTED: &str = "gemma2, gemma3, granite, llama, phi3, qwen2, qwen3";

/// The feed-forward gate's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU with the tanh approximation (Gemma; ggml's `gelu`): GeGLU.
    GeluTanh,
    /// `x · sigmoid(x)` (Llama and most others; ggml's `silu`): SwiGLU.
    Silu,
}

/// Which pairs of a head's values a rotary embedding rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])`: ggml's `LLAMA_ROPE_TYPE_NORM`. `llama` files use it
    /// because the converter permutes the rows of Q and K to make it equal Hugging Face's
    /// rotate-half.
    Norm,
    /// The two halves, `(x[i], x[i + n_rot/2])`: ggml's `LLAMA_ROPE_TYPE_NEOX` (Gemma, Qwen, Phi).
    Neox,
}

/// Everything about a model's shape and numerics that the forward pass needs.
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
    /// How many of a head's dimensions are rotated (`rope.dimension_count`); the rest pass
    /// through unchanged.
    pub n_rot: usize,
    pub n_ff: usize,
    pub vocab_size: usize,
    /// The context the model was trained for.
    pub context_length: usize,
    pub rms_eps: f32,
    pub rope_style: RopeStyle,
    /// Rope base of the global-attention layers.
    pub rope_base: f32,
    /// Rope base of the sliding-window layers.
    pub rope_base_local: f32,
    /// Multiplier of rope positions on global layers (1 / linear scaling factor).
    pub rope_freq_scale: f32,
    /// Sliding window in tokens, and which layers use it.
    pub sliding_window: Option<usize>,
    pub local_layers: Vec<bool>,
    /// Input embeddings are multiplied by this (Gemma: sqrt(n_embd); others 1).
    pub embed_scale: f32,
    /// Queries are multiplied by this before q·k.
    pub attn_scale: f32,
    pub activation: Activation,
    /// RMSNorm of each head's query and key before rope (Gemma 3, Qwen 3).
    pub qk_norm: bool,
    /// RMSNorm of the attention and FFN outputs before their residual adds (Gemma 2 and 3).
    pub post_norms: bool,
    /// Attention scores are soft-capped, `cap · tanh(s / cap)`, before the softmax (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// The logits are soft-capped the same way (Gemma 2; Gemma 3 when its file says so).
    pub final_softcap: Option<f32>,
    /// The attention and FFN outputs are multiplied by this before each residual add (Granite).
    pub residual_scale: f32,
    /// The logits are divided by this (Granite's `logit_scale`).
    pub logit_scale: f32,
    /// Whether the layers rotate queries and keys at all (Granite's `rope.scaling.finetuned`).
    pub use_rope: bool,
    /// Multiplier of the rotary cosines and sines (`rope.scaling.attn_factor`; Phi-3's LongRoPE).
    pub rope_attn_factor: f32,
    /// The output matrix is always the token embedding (Gemma 2: llama.cpp refuses a file with
    /// its own `output.weight`, and so do we, as an unused tensor).
    pub output_is_embedding: bool,
    /// The context the rope was trained for before any extension
    /// (`rope.scaling.original_context_length`): Phi-3's long rope factors apply above it.
    pub rope_original_context: usize,
}

/// The architectures and what distinguishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Gemma2,
    Gemma3,
    Granite,
    Llama,
    Phi3,
    Qwen2,
    Qwen3,
}

impl Config {
    /// Reads the configuration of a supported architecture from the file's metadata.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let path = gguf.path().display().to_string();
        let arch = gguf.str("general.architecture")?.to_string();
        let family = match arch.as_str() {
            "gemma2" => Family::Gemma2,
            "gemma3" => Family::Gemma3,
            "granite" => Family::Granite,
            "llama" => Family::Llama,
            "phi3" => Family::Phi3,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            other => bail!(
                "{path}: unsupported model architecture '{}' (supported: {SUPPORTED})",
                other.escape_debug()
            ),
        };
        let key = |k: &str| format!("{arch}.{k}");
        // A mixture-of-experts variant under a dense architecture's name.
        if gguf.opt_u64(&key("expert_count"))?.is_some_and(|n| n > 0) {
            bail!(
                "{path}: '{arch}' with mixture-of-experts layers ({} is set) is not supported",
                key("expert_count")
            );
        }
        let count = |k: &str| -> Result<usize> {
            let v = gguf.u64(&key(k))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v <= MAX_DIM)
                .ok_or_else(|| anyhow!("{path}: metadata key {} = {v} is out of range", key(k)))
        };
        let opt_count = |k: &str| -> Result<Option<usize>> {
            match gguf.get(&key(k)) {
                None => Ok(None),
                Some(_) => count(k).map(Some),
            }
        };
        let n_layer = count("block_count")?;
        // Checked against the tensors present before anything is sized by it: 2^24 layers
        // would reserve gigabytes before the first missing tensor was noticed.
        let last = format!("blk.{}.", n_layer.saturating_sub(1));
        if n_layer > 0 && !gguf.tensor_names().any(|name| name.starts_with(&last)) {
            bail!(
                "{path}: {} = {n_layer}, but the file has no tensors for block {}",
                key("block_count"),
                n_layer - 1
            );
        }
        let n_embd = count("embedding_length")?;
        let n_head = count("attention.head_count")?;
        let n_head_kv = opt_count("attention.head_count_kv")?.unwrap_or(n_head);
        let head_dim = opt_count("attention.key_length")?.unwrap_or(n_embd / n_head.max(1));
        let n_rot = opt_count("rope.dimension_count")?.unwrap_or(head_dim);
        let rope_scale = match gguf.opt_str(&key("rope.scaling.type"))? {
            Some("linear") | None => gguf.opt_f32(&key("rope.scaling.factor"))?.unwrap_or(1.0),
            Some("none") => 1.0,
            Some(other) => {
                bail!("{path}: rope scaling '{}' is not supported (supported: linear)", other.escape_debug())
            }
        };
        let rope_scale = if rope_scale > 0.0 { rope_scale } else { 1.0 };
        let vocab_size = match gguf.tensor_shape("token_embd.weight") {
            Some(&[rows, _]) => rows,
            _ => bail!("{path}: tensor token_embd.weight is missing or not a matrix"),
        };

        let context_length = count("context_length")?;
        let mut cfg = Self {
            architecture: arch.clone(),
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            n_ff: count("feed_forward_length")?,
            vocab_size,
            context_length,
            rms_eps: gguf.f32(&key("attention.layer_norm_rms_epsilon"))?,
            rope_style: RopeStyle::Neox,
            rope_base: gguf.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_base_local: 10_000.0,
            rope_freq_scale: 1.0 / rope_scale,
            sliding_window: None,
            local_layers: vec![false; n_layer],
            embed_scale: 1.0,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            activation: Activation::Silu,
            qk_norm: false,
            post_norms: false,
            attn_softcap: None,
            final_softcap: None,
            residual_scale: 1.0,
            logit_scale: 1.0,
            use_rope: true,
            rope_attn_factor: gguf.opt_f32(&key("rope.scaling.attn_factor"))?.unwrap_or(1.0),
            output_is_embedding: false,
            rope_original_context: opt_count("rope.scaling.original_context_length")?
                .unwrap_or(context_length),
        };
        if let Some(v) = opt_count("attention.value_length")?
            && v != head_dim
        {
            bail!(
                "{path}: {} = {v} differs from attention.key_length = {head_dim} (not supported)",
                key("attention.value_length")
            );
        }
        // A positive soft-cap from the file, or `default` when the key is absent.
        let softcap = |k: &str, default: Option<f32>| -> Result<Option<f32>> {
            Ok(match gguf.opt_f32(&key(k))? {
                Some(c) if c > 0.0 => Some(c),
                Some(_) => None,
                None => default,
            })
        };
        // `attention.sliding_window_pattern`: every n-th layer is global (llama.cpp's
        // `set_swa_pattern`), or one flag per layer.
        let swa_pattern = |default: usize| -> Result<Vec<bool>> {
            let pattern = match gguf.get(&key("attention.sliding_window_pattern")) {
                None => default,
                Some(Value::Array(flags)) => {
                    if flags.len() < n_layer {
                        bail!(
                            "{path}: {} has {} entries for {n_layer} layers",
                            key("attention.sliding_window_pattern"),
                            flags.len()
                        );
                    }
                    return Ok(flags
                        .iter()
                        .take(n_layer)
                        .map(|f| value_u64(f).is_some_and(|x| x != 0) || matches!(f, Value::Bool(true)))
                        .collect());
                }
                Some(_) => count("attention.sliding_window_pattern")?,
            };
            Ok((0..n_layer).map(|il| pattern == 0 || il % pattern < pattern - 1).collect())
        };
        match family {
            Family::Gemma2 => {
                // llama.cpp's `llm_build_gemma2_iswa`: every other layer slides over 4,096 tokens
                // unless the file says otherwise; both kinds use the same rope base.
                let window = opt_count("attention.sliding_window")?.unwrap_or(4096);
                cfg.local_layers = swa_pattern(2)?;
                cfg.sliding_window = Some(window);
                cfg.rope_base_local = gguf.opt_f32(&key("rope.freq_base_swa"))?.unwrap_or(cfg.rope_base);
                cfg.embed_scale = (n_embd as f32).sqrt();
                cfg.activation = Activation::GeluTanh;
                cfg.post_norms = true;
                cfg.output_is_embedding = true;
                cfg.attn_softcap = softcap("attn_logit_softcapping", Some(50.0))?;
                cfg.final_softcap = softcap("final_logit_softcapping", Some(30.0))?;
                cfg.attn_scale = gemma_attn_scale(46, n_layer, n_embd, n_head, head_dim);
            }
            Family::Gemma3 => {
                let window = opt_count("attention.sliding_window")?.filter(|&w| w > 0);
                // llama.cpp's `set_swa_pattern(6)` for Gemma 3: five local layers, then one global.
                cfg.local_layers = if window.is_some() { swa_pattern(6)? } else { vec![false; n_layer] };
                cfg.sliding_window = window;
                // Gemma 3 files carry no key for it; llama.cpp defaults it to 10,000.
                cfg.rope_base_local = gguf.opt_f32(&key("rope.freq_base_swa"))?.unwrap_or(10_000.0);
                cfg.embed_scale = (n_embd as f32).sqrt();
                cfg.activation = Activation::GeluTanh;
                cfg.qk_norm = true;
                cfg.post_norms = true;
                cfg.final_softcap = softcap("final_logit_softcapping", None)?;
                cfg.attn_scale = gemma_attn_scale(62, n_layer, n_embd, n_head, head_dim);
            }
            Family::Llama | Family::Granite => {
                cfg.rope_style = RopeStyle::Norm;
                // llama.cpp requires it for `llama`: the converter never writes partial rotary.
                if n_rot != head_dim {
                    bail!(
                        "{path}: {} = {n_rot} differs from the head size {head_dim}",
                        key("rope.dimension_count")
                    );
                }
                if family == Family::Granite {
                    // llama.cpp's `llm_build_granite`: `logit_scale` is required, the rest optional.
                    cfg.logit_scale = gguf.f32(&key("logit_scale"))?;
                    if let Some(s) = gguf.opt_f32(&key("embedding_scale"))?.filter(|&s| s != 0.0) {
                        cfg.embed_scale = s;
                    }
                    if let Some(s) = gguf.opt_f32(&key("residual_scale"))?.filter(|&s| s != 0.0) {
                        cfg.residual_scale = s;
                    }
                    if let Some(s) = gguf.opt_f32(&key("attention.scale"))?.filter(|&s| s != 0.0) {
                        cfg.attn_scale = s;
                    }
                    cfg.use_rope = gguf.opt_bool(&key("rope.scaling.finetuned"))?.unwrap_or(true);
                }
            }
            // Sliding window keys in Phi-3 files are ignored, as llama.cpp ignores them.
            Family::Phi3 | Family::Qwen2 => {}
            Family::Qwen3 => cfg.qk_norm = true,
        }
        cfg.validate(&path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &str) -> Result<()> {
        let bad = |what: &str| anyhow!("{path}: inconsistent model metadata: {what}");
        if self.n_layer == 0 || self.n_embd == 0 || self.n_head == 0 || self.head_dim == 0 || self.n_ff == 0 {
            return Err(bad("zero layers, width, heads or feed-forward size"));
        }
        if self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return Err(bad("head_count is not a multiple of head_count_kv"));
        }
        if !self.n_rot.is_multiple_of(2) || self.n_rot > self.head_dim || self.n_rot == 0 {
            return Err(bad("rope.dimension_count must be even, non-zero and at most the head size"));
        }
        if self.sliding_window == Some(0) {
            return Err(bad("sliding_window is 0"));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return Err(bad("layer_norm_rms_epsilon is not a finite non-negative number"));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0 && self.rope_base_local > 0.0) {
            return Err(bad("rope.freq_base is not a positive number"));
        }
        if self.context_length == 0 {
            return Err(bad("context_length is 0"));
        }
        let finite =
            [self.embed_scale, self.attn_scale, self.residual_scale, self.logit_scale, self.rope_attn_factor];
        if finite.iter().any(|x| !x.is_finite()) || self.logit_scale == 0.0 {
            return Err(bad("a scale is not a finite number (or logit_scale is 0)"));
        }
        Ok(())
    }
}

/// Gemma's query scale: 1/sqrt(n_embd / n_head) for the 27B models (told apart by their
/// layer count, `layers_27b`: 46 for Gemma 2, 62 for Gemma 3), else 1/sqrt(head_dim)
/// (llama.cpp's `f_attention_scale`, from gemma_pytorch's config).
fn gemma_attn_scale(layers_27b: usize, n_layer: usize, n_embd: usize, n_head: usize, head_dim: usize) -> f32 {
    let d = if n_layer == layers_27b { n_embd / n_head.max(1) } else { head_dim };
    1.0 / (d as f32).sqrt()
}

/// Bound on any one size read from metadata (layers, width, heads, context): far above real
/// models, low enough that products of two of them cannot overflow.
const MAX_DIM: usize = 1 << 24;
