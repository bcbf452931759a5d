//! The elementwise and per-row operations of the forward pass: gated activations, RMS norm,
//! residual adds, rotary embeddings, and the helpers that run them over rows on the pool.

use super::*;

/// `act(gate) * up`, elementwise: GeGLU or SwiGLU.
///
/// GELU is computed as ggml computes it: the tanh formula evaluated once per f16 input and
/// looked up through a 64K-entry table (ggml's `GGML_GELU_FP16`, used by llama.cpp's fused
/// `geglu`). This matches llama.cpp's numerics exactly and replaces a libm `tanhf` per
/// element, a tenth of a prefill's time. SiLU is `x / (1 + e^-x)` in f32, as ggml's `swiglu`,
/// with a vectorized exponential (`kernels::silu_times`).
pub(super) fn gated_activation(activation: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
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
    let isa = crate::kernels::Isa::detect();
    let apply = |g: &[f32], u: &mut [f32]| match activation {
        Activation::GeluTanh => gelu_times(g, u),
        Activation::Silu => crate::kernels::silu_times(isa, g, u),
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
pub(super) fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
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
pub(super) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
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

pub(super) use crate::weights::with_values;

/// `f(i, row i)` for every row of `out`, (rows, cols): a batch's rows split over the pool (in
/// runs of 16), a few rows on the calling thread.
pub(super) fn for_rows(out: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
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
pub(super) fn output(wo: &Linear, bias: &Option<Tensor>, x: Tensor) -> Result<Tensor> {
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
pub(super) struct Rope {
    style: RopeStyle,
    head_dim: usize,
    n_rot: usize,
    seq: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub(super) fn new(
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
    pub(super) fn apply(&self, x: &mut [f32], heads: usize) {
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
