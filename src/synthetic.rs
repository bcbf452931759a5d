//! Random-weight GGUF models of every supported architecture, in miniature or at a real size.
//!
//! No package registry we can reach ships Qwen, Phi or Gemma 2 weights, so these files stand
//! in for them: each has the real shape of its family (grouped-query attention, biases, fused
//! tensors, partial rotary, LongRoPE factors, soft-caps, sliding windows, Granite's scales) with
//! random weights, and a small vocabulary (byte-level BPE or SentencePiece) that both streamgen
//! and llama.cpp read. The tests compare our logits on them with llama.cpp's
//! (`tests/data/archs/`, made by `scripts/llama-reference/make-archs.sh`), and the benchmarks
//! time decoding on the real-size ones. The same [`Spec`] always gives the same bytes: every
//! tensor's values come from a generator seeded by its name.
//!
//! The layout of the files follows llama.cpp's converter (`convert_hf_to_gguf.py`) and the
//! minimal metadata of its own random-model test (`tests/test-llama-archs.cpp`).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::{Value, write};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// The tokenizer written into a synthetic file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vocab {
    /// Byte-level BPE (`gpt2`, pre-tokenizer `qwen2`): the 256 bytes, a few merges, and the
    /// ChatML and `<think>` tokens, with a ChatML template that thinks.
    Bytes,
    /// SentencePiece (`llama`, as Mistral and Llama 2 files): `<unk>`, `<s>`, `</s>`, the 256
    /// byte-fallback tokens and a few pieces with scores; BOS is added.
    Spm,
}

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// Every matrix in this type (norms, biases and rope factors are always F32).
    All(GgmlDType),
    /// llama.cpp's Q4_K_M recipe (`llama-quant.cpp`): Q6_K for the output (tied: the
    /// embedding), `attn_v` and `ffn_down` on the "more bits" layers, Q4_K elsewhere, fused
    /// `attn_qkv` Q5_K; where a row is not a multiple of 256 values, Q6_K falls back to Q8_0
    /// and Q4_K/Q5_K to Q5_0/Q5_1.
    Q4KM,
}

/// The shape and switches of one synthetic model.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `general.architecture`.
    pub arch: &'static str,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    /// Rotated dimensions per head (`rope.dimension_count`); the head size when `None`.
    pub n_rot: Option<usize>,
    pub context_length: usize,
    pub vocab: Vocab,
    /// Real-size models replace the small vocabulary's embedding rows by this many (the extra
    /// tokens are unused placeholders), so the output matrix has its real cost.
    pub vocab_rows: Option<usize>,
    pub weights: Weights,
    /// Q, K and V biases (Qwen 2), on the separate or the fused projection.
    pub qkv_bias: bool,
    /// `output.bias` on the logits (allowed in Qwen 2).
    pub output_bias: bool,
    /// One `attn_qkv` matrix instead of three (Phi-3).
    pub fused_qkv: bool,
    /// One `ffn_up` matrix holding gate and up, and no `ffn_gate` (Phi-3).
    pub fused_gate_up: bool,
    /// Its own `output.weight` rather than the embedding.
    pub untied_output: bool,
    /// Phi-3's LongRoPE: `rope_factors_short/long`, `rope.scaling.attn_factor` and the original
    /// context (`rope.scaling.original_context_length`).
    pub long_rope: Option<(f32, usize)>,
    /// `attention.sliding_window` (Gemma 2, Gemma 3).
    pub sliding_window: Option<usize>,
    /// `attn_logit_softcapping` and `final_logit_softcapping` (Gemma 2).
    pub softcaps: Option<(f32, f32)>,
    /// Granite's embedding, residual, attention and logit scales.
    pub granite_scales: Option<[f32; 4]>,
    /// `rope_freqs.weight` (Llama 3.1's long-context factors).
    pub rope_freqs: bool,
}

impl Spec {
    /// A miniature of `arch` with the switches its real files have: 2 layers (Gemma 3: 6, so
    /// that one is global), 256 wide (every k-quant block fits), 4 query heads sharing 2 KV heads.
    pub fn mini(arch: &'static str) -> Self {
        let mut spec = Self {
            arch,
            n_layer: 2,
            n_embd: 256,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 64,
            n_ff: 512,
            n_rot: None,
            context_length: 4096,
            vocab: Vocab::Bytes,
            vocab_rows: None,
            weights: Weights::All(GgmlDType::F32),
            qkv_bias: false,
            output_bias: false,
            fused_qkv: false,
            fused_gate_up: false,
            untied_output: false,
            long_rope: None,
            sliding_window: None,
            softcaps: None,
            granite_scales: None,
            rope_freqs: false,
        };
        match arch {
            "qwen2" => spec.qkv_bias = true,
            // Qwen3-0.6B's shape in miniature: heads wider than n_embd / n_head.
            "qwen3" => spec.head_dim = 128,
            "phi3" => {
                spec.fused_qkv = true;
                spec.fused_gate_up = true;
                spec.n_rot = Some(32);
                spec.long_rope = Some((1.19, 128));
            }
            "gemma2" => {
                spec.sliding_window = Some(16);
                spec.softcaps = Some((50.0, 30.0));
            }
            "gemma3" => {
                spec.n_layer = 6;
                spec.sliding_window = Some(16);
            }
            "granite" => spec.granite_scales = Some([2.0, 0.5, 0.1, 0.5]),
            _ => {}
        }
        spec
    }

    /// A model of about Qwen2.5-0.5B's size with `arch`'s switches, for decode benchmarks:
    /// 24 layers, 896 wide, 14 query and 2 KV heads of 64, an FFN of 4,864 and 151,936
    /// embedding rows.
    pub fn half_billion(arch: &'static str, weights: Weights) -> Self {
        let mini = Self::mini(arch);
        Self {
            n_layer: 24,
            n_embd: 896,
            n_head: 14,
            n_head_kv: 2,
            head_dim: 64,
            n_ff: 4864,
            n_rot: mini.n_rot.map(|_| 32),
            vocab_rows: Some(151_936),
            weights,
            sliding_window: mini.sliding_window.map(|_| 4096),
            long_rope: mini.long_rope.map(|(f, _)| (f, 4096)),
            ..mini
        }
    }

    /// The Qwen 2 miniature in one weight format: the format tests.
    pub fn format(weights: Weights) -> Self {
        Self { weights, ..Self::mini("qwen2") }
    }
}

/// The test matrix: a name and a spec for every architecture and switch combination, and for
/// every weight format on one architecture. `tests/data/archs/NAME.json` holds llama.cpp's
/// reference for each.
pub fn cases() -> Vec<(String, Spec)> {
    let mut cases: Vec<(String, Spec)> = Vec::new();
    for arch in ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "granite"] {
        cases.push((arch.into(), Spec::mini(arch)));
    }
    cases
        .push(("mistral-spm".into(), Spec { vocab: Vocab::Spm, untied_output: true, ..Spec::mini("llama") }));
    cases.push((
        "llama-fused-bias".into(),
        Spec { fused_qkv: true, qkv_bias: true, rope_freqs: true, ..Spec::mini("llama") },
    ));
    cases.push((
        "qwen2-output-bias".into(),
        Spec { output_bias: true, untied_output: true, ..Spec::mini("qwen2") },
    ));
    // A window longer than the test prompt, and soft-caps low enough to bite.
    cases.push((
        "gemma2-long-window".into(),
        Spec { sliding_window: Some(4096), softcaps: Some((1.0, 10.0)), ..Spec::mini("gemma2") },
    ));
    // Phi-3 whose context fits the original one: the short factors.
    cases.push(("phi3-short-rope".into(), Spec { long_rope: Some((1.19, 8192)), ..Spec::mini("phi3") }));
    let formats = [
        ("f16", GgmlDType::F16),
        ("bf16", GgmlDType::BF16),
        ("q8_0", GgmlDType::Q8_0),
        ("q5_0", GgmlDType::Q5_0),
        ("q5_1", GgmlDType::Q5_1),
        ("q4_0", GgmlDType::Q4_0),
        ("q4_1", GgmlDType::Q4_1),
        ("q2_k", GgmlDType::Q2K),
        ("q3_k", GgmlDType::Q3K),
        ("q4_k", GgmlDType::Q4K),
        ("q5_k", GgmlDType::Q5K),
        ("q6_k", GgmlDType::Q6K),
    ];
    for (name, dtype) in formats {
        cases.push((format!("qwen2-{name}"), Spec::format(Weights::All(dtype))));
    }
    cases.push(("qwen2-q4_k_m".into(), Spec::format(Weights::Q4KM)));
    cases.push(("phi3-q4_k_m".into(), Spec { weights: Weights::Q4KM, ..Spec::mini("phi3") }));
    cases
}

/// The prompt the reference data was made with: text of both vocabularies' pieces, digits,
/// punctuation and a multi-byte character, 60-odd tokens (longer than the test windows).
pub const PROMPT: &str =
    "The theme of the day: the thin thread that ties the three things together, 0123456789, café!";

/// Writes the model `spec` describes to `path` (atomically: a temporary file renamed into place).
pub fn write_file(spec: &Spec, path: &Path) -> Result<()> {
    let (meta, tensors) = build(spec)?;
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp_name);
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut out = std::io::BufWriter::new(file);
        write(&mut out, &meta_refs, &tensor_refs)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

type Metadata = Vec<(String, Value)>;

fn build(spec: &Spec) -> Result<(Metadata, Vec<(String, QTensor)>)> {
    let arch = spec.arch;
    let key = |k: &str| format!("{arch}.{k}");
    let (tokens, vocab_meta) = vocabulary(spec.vocab);
    let n_vocab = spec.vocab_rows.unwrap_or(tokens).max(tokens);
    let u32v = |x: usize| Value::U32(x as u32);
    let mut meta: Metadata = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        // Not the architecture's name: llama.cpp changes a vocabulary's token attributes when
        // a model's name contains "phi3".
        ("general.name".into(), Value::String("streamgen synthetic model".into())),
        (key("block_count"), u32v(spec.n_layer)),
        (key("context_length"), u32v(spec.context_length)),
        (key("embedding_length"), u32v(spec.n_embd)),
        (key("feed_forward_length"), u32v(spec.n_ff)),
        (key("attention.head_count"), u32v(spec.n_head)),
        (key("attention.head_count_kv"), u32v(spec.n_head_kv)),
        (key("attention.key_length"), u32v(spec.head_dim)),
        (key("attention.value_length"), u32v(spec.head_dim)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (key("rope.freq_base"), Value::F32(10_000.0)),
    ];
    if let Some(n_rot) = spec.n_rot {
        meta.push((key("rope.dimension_count"), u32v(n_rot)));
    }
    if let Some(w) = spec.sliding_window {
        meta.push((key("attention.sliding_window"), u32v(w)));
    }
    if let Some((attn, last)) = spec.softcaps {
        meta.push((key("attn_logit_softcapping"), Value::F32(attn)));
        meta.push((key("final_logit_softcapping"), Value::F32(last)));
    }
    if let Some((attn_factor, original)) = spec.long_rope {
        meta.push((key("rope.scaling.attn_factor"), Value::F32(attn_factor)));
        meta.push((key("rope.scaling.original_context_length"), u32v(original)));
    }
    if let Some([embedding, residual, attention, logit]) = spec.granite_scales {
        meta.push((key("embedding_scale"), Value::F32(embedding)));
        meta.push((key("residual_scale"), Value::F32(residual)));
        meta.push((key("attention.scale"), Value::F32(attention)));
        meta.push((key("logit_scale"), Value::F32(logit)));
    }
    if spec.vocab_rows.is_some_and(|rows| rows > tokens) {
        meta.extend(pad_vocabulary(vocab_meta, n_vocab));
    } else {
        meta.extend(vocab_meta);
    }

    let (embd, ff) = (spec.n_embd, spec.n_ff);
    let (q, kv) = (spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim);
    let n_rot = spec.n_rot.unwrap_or(spec.head_dim);
    let quant = Quant { spec, n_layer: spec.n_layer };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut matrix = |name: String, rows: usize, cols: usize, scale: f32| -> Result<()> {
        let dtype = quant.dtype(&name, cols);
        let t = random(&name, rows * cols, scale, 0.0);
        let t = Tensor::from_vec(t, (rows, cols), &Device::Cpu)?;
        tensors.push((
            name.clone(),
            QTensor::quantize(&t, dtype).with_context(|| format!("quantizing {name}"))?,
        ));
        Ok(())
    };
    // Scales chosen so that activations stay near unit size and the logits spread over a few
    // units: clear argmaxes, like a trained model's.
    let w = 1.0 / (embd as f32).sqrt();
    // The embedding is kept small next to what the layers add (Gemma multiplies it by
    // sqrt(n_embd)), or a tied output would predict the last token again at every step; the
    // final norm's weights then spread the logits over a few units.
    let gemma = spec.arch.starts_with("gemma");
    let embd_scale = if gemma { 0.1 / (embd as f32).sqrt() } else { 0.05 };
    matrix("token_embd.weight".into(), n_vocab, embd, embd_scale)?;
    let output_scale = if spec.untied_output { 0.3 } else { embd_scale };
    if spec.untied_output {
        matrix("output.weight".into(), n_vocab, embd, output_scale)?;
    }
    let output_norm = 3.0 / ((embd as f32).sqrt() * output_scale);
    for il in 0..spec.n_layer {
        let p = |n: &str| format!("blk.{il}.{n}");
        if spec.fused_qkv {
            matrix(p("attn_qkv.weight"), q + 2 * kv, embd, 2.0 * w)?;
        } else {
            matrix(p("attn_q.weight"), q, embd, 2.0 * w)?;
            matrix(p("attn_k.weight"), kv, embd, 2.0 * w)?;
            matrix(p("attn_v.weight"), kv, embd, w)?;
        }
        matrix(p("attn_output.weight"), embd, q, 2.0 / (q as f32).sqrt())?;
        if spec.fused_gate_up {
            matrix(p("ffn_up.weight"), 2 * ff, embd, w)?;
        } else {
            matrix(p("ffn_gate.weight"), ff, embd, w)?;
            matrix(p("ffn_up.weight"), ff, embd, w)?;
        }
        matrix(p("ffn_down.weight"), embd, ff, 2.0 / (ff as f32).sqrt())?;
    }
    let mut vector = |name: String, n: usize, scale: f32, offset: f32| -> Result<()> {
        let t = Tensor::from_vec(random(&name, n, scale, offset), n, &Device::Cpu)?;
        tensors.push((name, QTensor::quantize(&t, GgmlDType::F32)?));
        Ok(())
    };
    vector("output_norm.weight".into(), embd, 0.2 * output_norm, output_norm)?;
    if spec.output_bias {
        vector("output.bias".into(), n_vocab, 1.0, 0.0)?;
    }
    if let Some(_long) = spec.long_rope {
        vector("rope_factors_short.weight".into(), n_rot / 2, 0.5, 1.5)?;
        vector("rope_factors_long.weight".into(), n_rot / 2, 8.0, 10.0)?;
    }
    if spec.rope_freqs {
        vector("rope_freqs.weight".into(), n_rot / 2, 2.0, 3.0)?;
    }
    for il in 0..spec.n_layer {
        let p = |n: &str| format!("blk.{il}.{n}");
        vector(p("attn_norm.weight"), embd, 0.2, 1.0)?;
        vector(p("ffn_norm.weight"), embd, 0.2, 1.0)?;
        if spec.qkv_bias && spec.fused_qkv {
            vector(p("attn_qkv.bias"), q + 2 * kv, 0.5, 0.0)?;
        } else if spec.qkv_bias {
            vector(p("attn_q.bias"), q, 0.5, 0.0)?;
            vector(p("attn_k.bias"), kv, 0.5, 0.0)?;
            vector(p("attn_v.bias"), kv, 0.5, 0.0)?;
        }
        if spec.arch == "qwen3" || spec.arch == "gemma3" {
            vector(p("attn_q_norm.weight"), spec.head_dim, 0.2, 1.0)?;
            vector(p("attn_k_norm.weight"), spec.head_dim, 0.2, 1.0)?;
        }
        if gemma {
            vector(p("post_attention_norm.weight"), embd, 0.2, 1.0)?;
            vector(p("post_ffw_norm.weight"), embd, 0.2, 1.0)?;
        }
    }
    Ok((meta, tensors))
}

/// Which type each matrix gets.
struct Quant<'a> {
    spec: &'a Spec,
    n_layer: usize,
}

impl Quant<'_> {
    fn dtype(&self, name: &str, cols: usize) -> GgmlDType {
        let want = match self.spec.weights {
            Weights::All(d) => d,
            Weights::Q4KM => {
                let layer: Option<usize> =
                    name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse().ok());
                // llama.cpp's `use_more_bits`: the first and last eighth, and every third between.
                let more_bits = |il: usize| {
                    let n = self.n_layer;
                    il < n / 8 || il >= 7 * n / 8 || (il - n / 8).is_multiple_of(3)
                };
                let tied_output = name == "token_embd.weight" && !self.spec.untied_output;
                if name == "output.weight" || tied_output {
                    GgmlDType::Q6K
                } else if name == "token_embd.weight" {
                    GgmlDType::Q4K
                } else if name.ends_with("attn_qkv.weight") {
                    GgmlDType::Q5K
                } else if (name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight"))
                    && layer.is_some_and(more_bits)
                {
                    GgmlDType::Q6K
                } else {
                    GgmlDType::Q4K
                }
            }
        };
        // Rows that are not whole blocks fall back as llama.cpp's quantizer does.
        if cols.is_multiple_of(want.block_size()) {
            return want;
        }
        match want {
            GgmlDType::Q6K => GgmlDType::Q8_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
            _ => GgmlDType::F16,
        }
    }
}

/// `n` values uniform in `offset ± scale · √3` (standard deviation `scale`), from a generator
/// seeded by `name`: a tensor's values do not depend on the order tensors are made in.
fn random(name: &str, n: usize, scale: f32, offset: f32) -> Vec<f32> {
    // FNV-1a of the name, then SplitMix64.
    let mut state =
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let amplitude = scale * 3f32.sqrt();
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            offset + amplitude * (2.0 * unit - 1.0)
        })
        .collect()
}

/// The token count and `tokenizer.*` metadata of a vocabulary.
fn vocabulary(vocab: Vocab) -> (usize, Metadata) {
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let types = |v: Vec<i32>| Value::Array(v.into_iter().map(Value::I32).collect());
    match vocab {
        Vocab::Bytes => {
            let mut tokens: Vec<String> = (0..=255u8).map(byte_char).map(String::from).collect();
            let mut kinds = vec![1i32; 256];
            let merges = ["Ġ t", "Ġt h", "Ġth e", "h e", "i n", "Ġt i", "Ġth in", "Ġ a"];
            for m in merges {
                tokens.push(m.replace(' ', ""));
                kinds.push(1);
            }
            let specials = [
                ("<|endoftext|>", 3),
                ("<|im_start|>", 3),
                ("<|im_end|>", 3),
                ("<think>", 4),
                ("</think>", 4),
            ];
            for (t, kind) in specials {
                tokens.push(t.into());
                kinds.push(kind);
            }
            let id = |t: &str| tokens.iter().position(|x| x == t).expect("special token") as u32;
            let (eos, im_end) = (id("<|endoftext|>"), id("<|im_end|>"));
            let n = tokens.len();
            let meta = vec![
                ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
                ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
                ("tokenizer.ggml.merges".into(), strings(merges.iter().map(|m| m.to_string()).collect())),
                ("tokenizer.ggml.eos_token_id".into(), Value::U32(im_end)),
                ("tokenizer.ggml.padding_token_id".into(), Value::U32(eos)),
                ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
                ("tokenizer.chat_template".into(), Value::String(CHATML_THINKING.into())),
                ("tokenizer.ggml.tokens".into(), strings(tokens)),
                ("tokenizer.ggml.token_type".into(), types(kinds)),
            ];
            (n, meta)
        }
        Vocab::Spm => {
            let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
            let mut kinds = vec![2i32, 3, 3];
            let mut scores = vec![0f32; 3];
            for b in 0..=255u8 {
                tokens.push(format!("<0x{b:02X}>"));
                kinds.push(6);
                scores.push(0.0);
            }
            let mut pieces: Vec<String> = ["▁", "▁t", "▁th", "▁the", "▁a", "he", "in", "▁thin", "▁thr", "ee"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            pieces.extend(('a'..='z').map(String::from));
            pieces.extend([",", ".", ":", "!"].map(String::from));
            for (i, p) in pieces.into_iter().enumerate() {
                // Longer pieces score higher, so they win the merges.
                scores.push(-(i as f32) / 10.0 + p.chars().count() as f32);
                tokens.push(p);
                kinds.push(1);
            }
            let n = tokens.len();
            let meta = vec![
                ("tokenizer.ggml.model".into(), Value::String("llama".into())),
                ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
                ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
                ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
                ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
                ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
                ("tokenizer.ggml.tokens".into(), strings(tokens)),
                ("tokenizer.ggml.scores".into(), Value::Array(scores.into_iter().map(Value::F32).collect())),
                ("tokenizer.ggml.token_type".into(), types(kinds)),
            ];
            (n, meta)
        }
    }
}

/// Pads the token list and types to `n` entries with unused placeholder tokens.
fn pad_vocabulary(meta: Metadata, n: usize) -> Metadata {
    meta.into_iter()
        .map(|(k, v)| match (k.as_str(), v) {
            ("tokenizer.ggml.tokens", Value::Array(mut a)) => {
                let have = a.len();
                a.extend((have..n).map(|i| Value::String(format!("<unused{i}>"))));
                (k, Value::Array(a))
            }
            ("tokenizer.ggml.token_type", Value::Array(mut a)) => {
                a.resize(n, Value::I32(5));
                (k, Value::Array(a))
            }
            ("tokenizer.ggml.scores", Value::Array(mut a)) => {
                a.resize(n, Value::F32(-1000.0));
                (k, Value::Array(a))
            }
            (_, v) => (k, v),
        })
        .collect()
}

/// GPT-2's byte-to-character map: printable Latin-1 bytes stand for themselves, the rest are
/// moved to U+0100 and up.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).expect("a valid char")
}

/// A ChatML template that opens a `<think>` block unless `enable_thinking` is false, as
/// Qwen 3's does.
const CHATML_THINKING: &str = "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
     message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ \
     '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{ \
     '<think>\\n\\n</think>\\n\\n' }}{%- else %}{{ '<think>\\n' }}{%- endif %}{%- endif %}";
