//! Weight matrices read straight from the memory-mapped GGUF file, and the matmuls over them.
//!
//! Like llama.cpp, we map the file instead of copying it: loading costs no time and no second
//! copy of the weights, and the kernel shares the pages with its page cache. Every format is
//! used in place, F16 and BF16 included (candle's `QMatMul` would widen those to an f32 copy,
//! twice the file in memory).
//!
//! Decoding reads every weight once per token, so its speed is how fast the weights stream
//! from memory: the block formats of most of a Q4_K_M file's bytes (Q8_0, Q5_0, Q5_1, Q4_0,
//! Q4_1) and the float formats go through our own kernels in [`crate::kernels`], the k-quants
//! through candle's `k_quants::matmul`. A prefill batch goes through our int8 batched kernel on
//! CPUs with AVX-512 VNNI or AVX2 (for the formats it reads); otherwise through a blocked float
//! GEMM that dequantizes a block of weight rows at a time ([`kernels::matmul_row_blocks`]).

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::{Device, Tensor};
use memmap2::Mmap;

use crate::gguf::Gguf;
use crate::kernels::{self, DecodePath, Format, Isa, Part, PrefillPath, QuantizedRows};

/// A quantized tensor's bytes inside the mapped file.
#[derive(Clone)]
pub struct Mapped {
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
    dtype: Format,
    /// (rows, cols): rows are output features, cols the reduced dimension.
    shape: (usize, usize),
}

impl Mapped {
    /// Describes `len` bytes at `offset` of `map` as a (rows, cols) matrix of `dtype` blocks.
    pub fn new(map: Arc<Mmap>, offset: usize, dtype: Format, shape: (usize, usize)) -> Result<Self> {
        let (rows, cols) = shape;
        let (block, block_bytes) = dtype.unit();
        if !cols.is_multiple_of(block) {
            bail!("a row of {cols} values is not a whole number of {dtype} blocks");
        }
        // Checked: a product that wraps would pass the bounds check.
        let len = rows.checked_mul(cols / block).and_then(|n| n.checked_mul(block_bytes));
        let end = len.and_then(|len| offset.checked_add(len));
        let (Some(len), Some(end)) = (len, end) else {
            bail!("tensor data of {rows}×{cols} {dtype} values is larger than the file");
        };
        if end > map.len() {
            bail!("tensor data runs past the end of the file (truncated download?)");
        }
        Ok(Self { map, offset, len, dtype, shape })
    }

    /// The matrix `name` of `gguf`, in place in its mapped file.
    pub fn from_gguf(gguf: &Gguf, name: &str) -> Result<Self> {
        let m = gguf.matrix(name)?;
        Self::new(m.map, m.offset, m.format, m.shape)
            .with_context(|| format!("{}: tensor {name}", gguf.path().display()))
    }

    pub fn dtype(&self) -> Format {
        self.dtype
    }

    /// (rows, cols).
    pub fn shape(&self) -> (usize, usize) {
        self.shape
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map[self.offset..self.offset + self.len]
    }

    /// The data as a slice of blocks. Checked: the type's block size and alignment must fit.
    fn blocks<T: GgmlType>(&self) -> Result<&[T]> {
        let bytes = self.bytes();
        if self.dtype.ggml_dtype() != Some(T::DTYPE) || !bytes.len().is_multiple_of(size_of::<T>()) {
            bail!("internal error: {} data viewed as {:?}", self.dtype, T::DTYPE);
        }
        if bytes.as_ptr().align_offset(align_of::<T>()) != 0 {
            bail!("tensor data is not aligned for {} blocks", self.dtype);
        }
        // SAFETY: the block types are `repr(C)` structs of integers and f16s, for which every
        // bit pattern is valid; size and alignment were checked above, and the slice borrows
        // the map, which lives as long as `self`.
        Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size_of::<T>()) })
    }
}

/// Calls `$body` with `$t` bound to the block type of `$dtype` (the types with a `k_quants`
/// matmul), or evaluates `$other` for the rest.
macro_rules! with_block_type {
    ($dtype:expr, $t:ident => $body:expr, _ => $other:expr) => {
        match $dtype {
            Format::Q4_0 => {
                type $t = k_quants::BlockQ4_0;
                $body
            }
            Format::Q4_1 => {
                type $t = k_quants::BlockQ4_1;
                $body
            }
            Format::Q5_0 => {
                type $t = k_quants::BlockQ5_0;
                $body
            }
            Format::Q5_1 => {
                type $t = k_quants::BlockQ5_1;
                $body
            }
            Format::Q8_0 => {
                type $t = k_quants::BlockQ8_0;
                $body
            }
            Format::Q2K => {
                type $t = k_quants::BlockQ2K;
                $body
            }
            Format::Q3K => {
                type $t = k_quants::BlockQ3K;
                $body
            }
            Format::Q4K => {
                type $t = k_quants::BlockQ4K;
                $body
            }
            Format::Q5K => {
                type $t = k_quants::BlockQ5K;
                $body
            }
            Format::Q6K => {
                type $t = k_quants::BlockQ6K;
                $body
            }
            _ => $other,
        }
    };
}

/// A linear layer `y = x · Wᵀ` over a (rows, cols) weight matrix used in place in the mapped
/// file, whatever its format, with the kernels its format takes resolved once.
pub struct Linear {
    w: Mapped,
    decode: DecodePath,
    prefill: PrefillPath,
}

impl Linear {
    /// Makes the layer for a matrix in the file (every [`Format`] has kernels).
    pub fn new(w: Mapped) -> Result<Self> {
        let (decode, prefill) = (w.dtype.decode(), w.dtype.prefill());
        Ok(Self { w, decode, prefill })
    }

    /// Whether a prefill batch on `isa` goes through the int8 tile kernel.
    fn tiles(&self, isa: Isa) -> bool {
        self.prefill == PrefillPath::Tiles && isa.has_batched_kernel()
    }

    /// `x` is (m, cols); the result is (m, rows).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_on(x, Isa::detect())
    }

    /// `x · Wᵀ` for several layers that share their input (a layer's Q, K and V; its gate and
    /// up projections): when every matrix is in one of our own decode formats and the batch is
    /// small, the activations are quantized once and all the matrices go over the pool in one
    /// hand-out (a decode step waits for the threads once instead of once per matrix), with
    /// the same results as [`Linear::forward`]; otherwise each layer's own forward.
    pub fn forward_group<const N: usize>(layers: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        let (m, k) = x.dims2()?;
        let isa = Isa::detect();
        let same_input = layers.iter().all(|l| l.w.shape.1 == k);
        let parts = || -> Vec<Part<'_>> {
            layers.iter().map(|l| Part { format: l.w.dtype, w: l.w.bytes(), rows: l.w.shape.0 }).collect()
        };
        let outputs: Vec<Tensor> = if m >= gemm_min_rows(isa) {
            if same_input && layers.iter().all(|l| l.tiles(isa)) {
                // A prefill batch: the activations are quantized once for all the matrices,
                // and their tiles go over the pool in one hand-out (as `forward` would multiply
                // each).
                group_outputs(&layers, x, true, |lhs, outs| {
                    kernels::matmul_batched_group(&parts(), isa, lhs, outs)
                })?
            } else {
                layers.iter().map(|l| l.forward(x)).collect::<Result<_>>()?
            }
        } else if same_input && layers.iter().all(|l| l.decode == DecodePath::Blocks) {
            group_outputs(&layers, x, false, |lhs, outs| kernels::matmul_group(&parts(), isa, lhs, outs))?
        } else {
            layers.iter().map(|l| l.forward(x)).collect::<Result<_>>()?
        };
        outputs.try_into().map_err(|_| anyhow::anyhow!("internal error: a matmul group lost an output"))
    }

    /// [`Linear::forward`] with the kernels of `isa` (tests run every one this CPU has).
    fn forward_on(&self, x: &Tensor, isa: Isa) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        let w = &self.w;
        let (rows, cols) = w.shape;
        if k != cols {
            bail!("matmul of a (.., {k}) input with a ({rows}, {cols}) matrix");
        }
        let part = || [Part { format: w.dtype, w: w.bytes(), rows }];
        let batch = m >= gemm_min_rows(isa);
        if (batch && self.tiles(isa)) || (!batch && self.decode == DecodePath::Blocks) {
            // A batch on an AVX2 or VNNI CPU: the int8 batched kernel, faster than the float
            // GEMM and with llama.cpp's numerics (activations quantized to Q8_0, as decoding).
            // Activations are quantized to Q8_0 for every format. (llama.cpp pairs k-quants
            // with Q8_K, one f32 scale per 256 values; that was tried, and agreed worse with
            // llama.cpp's reference logits: mean |diff| 0.205 against 0.183 on the long
            // prompts, max 2.5 against 1.1.) A few rows: our decode kernels.
            let [out] = group_outputs(&[self], x, batch, |lhs, outs| {
                if batch {
                    kernels::matmul_batched_group(&part(), isa, lhs, outs)
                } else {
                    kernels::matmul_group(&part(), isa, lhs, outs)
                }
            })?
            .try_into()
            .map_err(|_| anyhow::anyhow!("internal error: a matmul lost its output"))?;
            return Ok(out);
        }
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dst = vec![0f32; m * rows];
        if batch {
            kernels::matmul_row_blocks(w.shape, &xs, &mut dst, |r, buf| w.dequantize_rows(isa, r, buf))?;
        } else {
            match self.decode {
                DecodePath::Float => kernels::matmul_float(w.dtype, isa, w.bytes(), w.shape, &xs, &mut dst)?,
                // The other k-quants: candle's kernels (AVX2; it picks the instruction set itself).
                DecodePath::Candle => {
                    with_block_type!(w.dtype, T => k_quants::matmul::<T>((m, cols, rows), &xs, w.blocks::<T>()?, &mut dst)?,
                        _ => bail!("internal error: no kernel for {}", w.dtype));
                }
                DecodePath::Blocks => bail!("internal error: the decode kernels' path fell through"),
            }
        }
        Ok(Tensor::from_vec(dst, (m, rows), &Device::Cpu)?)
    }
}

/// The outputs of a matmul group: `x` quantized once (for the batched kernel when `batched`),
/// `multiply` writes every value of one (m, rows) buffer per layer.
fn group_outputs(
    layers: &[&Linear],
    x: &Tensor,
    batched: bool,
    multiply: impl FnOnce(&QuantizedRows, &mut [&mut [MaybeUninit<f32>]]) -> Result<()>,
) -> Result<Vec<Tensor>> {
    let (m, k) = x.dims2()?;
    // The activations read in place, and the outputs left unwritten until the kernels write
    // them: a copy and a zeroing on the calling thread while the pool's threads wait were 4% of
    // a prefill's time.
    let quantize =
        |xs: &[f32]| if batched { QuantizedRows::for_batched(xs, k) } else { QuantizedRows::new(xs, k) };
    let lhs = with_values(x, quantize)??;
    let lens: Vec<usize> = layers.iter().map(|l| m * l.w.shape.0).collect();
    let mut dsts: Vec<Vec<f32>> = lens.iter().map(|&n| Vec::with_capacity(n)).collect();
    let mut outs: Vec<&mut [MaybeUninit<f32>]> =
        dsts.iter_mut().zip(&lens).map(|(d, &n)| &mut d.spare_capacity_mut()[..n]).collect();
    multiply(&lhs, &mut outs)?;
    drop(outs);
    for (d, n) in dsts.iter_mut().zip(lens) {
        // SAFETY: on `Ok` the kernels have written every one of the `n` values (the contract
        // of `matmul_group` and `matmul_batched_group`).
        unsafe { d.set_len(n) };
    }
    Ok(dsts
        .into_iter()
        .zip(layers)
        .map(|(d, l)| Tensor::from_vec(d, (m, l.w.shape.0), &Device::Cpu))
        .collect::<candle_core::Result<_>>()?)
}

/// `f` over the f32 values of a CPU tensor, read in place (no copy when it is contiguous).
pub(crate) fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
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

impl Mapped {
    /// Weight rows `r` as f32 into `out` (`r.len() · cols` values), on the calling thread.
    fn dequantize_rows(&self, isa: Isa, r: Range<usize>, out: &mut [f32]) -> Result<()> {
        let (rows, cols) = self.shape;
        if r.end > rows || out.len() != r.len() * cols {
            bail!("internal error: rows {r:?} of a ({rows}, {cols}) matrix into {} values", out.len());
        }
        let row_bytes = self.len / rows;
        let bytes = &self.bytes()[r.start * row_bytes..r.end * row_bytes];
        match self.dtype.decode() {
            DecodePath::Blocks => return kernels::dequantize(self.dtype, isa, bytes, out),
            DecodePath::Float => return kernels::float_to_f32(self.dtype, isa, bytes, out),
            DecodePath::Candle => with_block_type!(self.dtype, T => {
                let blocks = self.blocks::<T>()?;
                let per_row = blocks.len() / rows;
                T::to_float(&blocks[r.start * per_row..r.end * per_row], out);
            }, _ => bail!("internal error: no kernel for {}", self.dtype)),
        }
        Ok(())
    }
}

/// The most rows a matmul computes with the decode kernels on this CPU: each row's result is
/// then bit for bit what it would be alone (31 with AVX-512 VNNI, else 15).
pub fn decode_rows_max() -> usize {
    gemm_min_rows(Isa::detect()) - 1
}

/// The fewest rows a matmul computes with the batched kernels on this CPU ([`decode_rows_max`]
/// + 1).
pub fn batch_rows_min() -> usize {
    gemm_min_rows(Isa::detect())
}

/// From this many input rows on (prefill), matmuls run batched: the int8 tile kernel on VNNI
/// and AVX2 CPUs, else a blocked float GEMM over blocks of dequantized weight rows (the GEMM's kernels
/// reuse each weight across rows, so a 256-token prefill went from about 200 to 320 tokens/s
/// that way).
/// Below it, every row is computed by the decode kernels exactly as a single decoded token
/// is: they need no repacking (repacking the 178 MB output matrix for a decode step of eight
/// sequences cost more than the step), the weights stay in cache across the rows, and a
/// decode step of several sequences gives each one bit for bit what it gets alone. With
/// AVX-512 VNNI that holds up to 31 rows (two passes of the many-row kernel, faster than the
/// tiles there: Gemma 3 270M decoding 16 sequences went from 142 to 181 tok/s); elsewhere up
/// to 15.
fn gemm_min_rows(isa: Isa) -> usize {
    if isa.decode_lanes().is_some() { 32 } else { 16 }
}

/// The token embedding, looked up row by row from the mapped file: no f32 copy of the
/// (vocab × n_embd) matrix is ever made.
pub struct Embedding {
    m: Mapped,
}

impl Embedding {
    pub fn new(m: Mapped) -> Result<Self> {
        Ok(Self { m })
    }

    /// The rows for `ids`, as an (ids.len(), n_embd) tensor.
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        let (rows, cols) = self.m.shape;
        let mut out = vec![0f32; ids.len() * cols];
        let isa = Isa::detect();
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(cols)) {
            let id = id as usize;
            if id >= rows {
                bail!("token id {id} is outside the embedding's {rows} rows");
            }
            self.m.dequantize_rows(isa, id..id + 1, dst)?;
        }
        Ok(Tensor::from_vec(out, (ids.len(), cols), &Device::Cpu)?)
    }

    /// The same matrix as an output layer (tied embeddings).
    pub fn as_linear(&self) -> Result<Linear> {
        Linear::new(self.m.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Rng;
    use candle_core::quantized::QTensor;
    use std::io::Write;

    /// A (rows, cols) matrix of random weights quantized by candle, in a mapped temporary file.
    fn mapped(dtype: Format, rows: usize, cols: usize, rng: &mut Rng) -> (tempfile::NamedTempFile, Mapped) {
        let data: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("tensor");
        let ggml = dtype.ggml_dtype().expect("a type candle quantizes");
        let bytes = QTensor::quantize(&t, ggml).expect("quantize").data().expect("data").into_owned();
        let mut file = tempfile::NamedTempFile::new().expect("tempfile");
        file.write_all(&bytes).expect("write");
        // SAFETY: a private temporary file that nothing else writes while it is mapped.
        let map = unsafe { Mmap::map(file.as_file()) }.expect("mmap");
        let m = Mapped::new(Arc::new(map), 0, dtype, (rows, cols)).expect("mapped");
        (file, m)
    }

    /// The weights as ggml's reference dequantizers give them: candle's for the types it
    /// knows, for IQ4 the values computed by ggml itself (`crate::test_support`).
    fn dequantized(m: &Mapped, iq4_values: &[f32]) -> Tensor {
        use candle_core::quantized::QStorage;
        let Some(dtype) = m.dtype.ggml_dtype() else {
            return Tensor::from_vec(iq4_values.to_vec(), m.shape, &Device::Cpu).expect("tensor");
        };
        let storage = QStorage::from_data(m.bytes().into(), &Device::Cpu, dtype).expect("storage");
        QTensor::new(storage, m.shape).expect("qtensor").dequantize(&Device::Cpu).expect("dequantize")
    }

    /// A (rows, cols) IQ4 matrix made of ggml's reference blocks in a shuffled order, in a
    /// mapped temporary file, and its values as ggml dequantizes them.
    fn mapped_iq4(dtype: Format, rows: usize, cols: usize) -> (tempfile::NamedTempFile, Mapped, Vec<f32>) {
        let (blocks, floats) = crate::test_support::iq4_reference(dtype != Format::Iq4Nl);
        let (values, bytes) = dtype.unit();
        let n = blocks.len() / bytes;
        let (mut w, mut wf) = (Vec::new(), Vec::new());
        for u in (0..rows * cols / values).map(|i| (i * 5 + i / 7) % n) {
            w.extend_from_slice(&blocks[u * bytes..(u + 1) * bytes]);
            wf.extend_from_slice(&floats[u * values..(u + 1) * values]);
        }
        let mut file = tempfile::NamedTempFile::new().expect("tempfile");
        file.write_all(&w).expect("write");
        // SAFETY: a private temporary file that nothing else writes while it is mapped.
        let map = unsafe { Mmap::map(file.as_file()) }.expect("mmap");
        let m = Mapped::new(Arc::new(map), 0, dtype, (rows, cols)).expect("mapped");
        (file, m, wf)
    }

    /// A matrix of every type, and the weights as ggml dequantizes them.
    fn any_mapped(
        dtype: Format,
        rows: usize,
        cols: usize,
        rng: &mut Rng,
    ) -> (tempfile::NamedTempFile, Mapped, Tensor) {
        let (file, m, iq4_values) = match dtype {
            Format::Iq4Nl | Format::Iq4Xs => mapped_iq4(dtype, rows, cols),
            _ => {
                let (file, m) = mapped(dtype, rows, cols, rng);
                (file, m, Vec::new())
            }
        };
        let w = dequantized(&m, &iq4_values);
        (file, m, w)
    }

    /// Every path a matmul can take (one-row kernels on every instruction set this CPU has, the
    /// int8 batched kernel where the CPU has VNNI, the blocked GEMM, candle's k-quant kernels),
    /// for every type, agrees with a float GEMM over the weights as ggml dequantizes them:
    /// one row, a few rows (a decode step of several sequences) and a batch (prefill). The
    /// difference left is the Q8_0 rounding of the activations of the block formats, well under
    /// 1% of the outputs' spread; float weights take f32 activations and agree to rounding.
    #[test]
    fn every_matmul_path_agrees_with_the_float_gemm() {
        let mut rng = Rng(23);
        for dtype in Format::ALL {
            // 43 rows: not a multiple of the four-row kernels or of a GEMM block; for the float
            // formats a row of 520 values is not a multiple of 16 either.
            let float = dtype.decode() == DecodePath::Float;
            let cols = if float { 520 } else { 512 };
            let (_file, m, w) = any_mapped(dtype, 43, cols, &mut rng);
            let linear = Linear::new(m).expect("linear");
            let tolerance = if float { 1e-5 } else { 0.01 };
            for rows in [1, 3, 20] {
                let x: Vec<f32> =
                    (0..rows * cols).map(|i| ((i * 7919 % 613) as f32 / 97.0 - 3.0).sin()).collect();
                let x = Tensor::from_vec(x, (rows, cols), &Device::Cpu).expect("x");
                let want = x.matmul(&w.t().expect("t")).expect("matmul");
                let want = want.flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
                let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for &isa in Isa::available() {
                    let got = linear.forward_on(&x, isa).expect("forward");
                    let got = got.flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
                    let worst = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        worst < tolerance * spread,
                        "{dtype} with {rows} rows on {}: off by {worst} (spread {spread})",
                        isa.name()
                    );
                }
            }
        }
    }

    /// An embedding row of every type is the row ggml's dequantizer gives, bit for bit.
    #[test]
    fn embedding_rows_match_the_dequantized_matrix() {
        let mut rng = Rng(5);
        for dtype in Format::ALL {
            let (_file, m, want) = any_mapped(dtype, 9, 256, &mut rng);
            let got = Embedding::new(m).expect("embedding").lookup(&[7, 0, 7]).expect("lookup");
            let ids = Tensor::new(&[7u32, 0, 7], &Device::Cpu).expect("ids");
            let want = want.index_select(&ids, 0).expect("rows");
            let flat = |t: Tensor| t.flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
            assert_eq!(flat(got), flat(want), "{dtype}");
        }
    }

    /// A group of matrices over the pool in one hand-out gives each exactly what its own
    /// forward gives, for our formats (grouped) and others (each on its own), in one row and a few.
    #[test]
    fn a_group_equals_each_matrix_alone() {
        let mut rng = Rng(5);
        for dtypes in [
            [Format::Q8_0, Format::Q5_0, Format::Q4_1],
            [Format::Q4_0, Format::Q4K, Format::Q8_0],
            [Format::Q8_0, Format::Q5K, Format::F16],
        ] {
            let files: Vec<_> =
                dtypes.iter().zip([48, 16, 40]).map(|(&d, rows)| mapped(d, rows, 256, &mut rng)).collect();
            let layers: Vec<Linear> =
                files.iter().map(|(_, m)| Linear::new(m.clone()).expect("linear")).collect();
            let refs: Vec<&Linear> = layers.iter().collect();
            // One row and a few (the decode kernels), and a prefill batch (the batched kernel).
            for rows in [1, 5, 19] {
                let x: Vec<f32> =
                    (0..rows * 256).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0).cos()).collect();
                let x = Tensor::from_vec(x, (rows, 256), &Device::Cpu).expect("x");
                let grouped = Linear::forward_group([refs[0], refs[1], refs[2]], &x).expect("group");
                for (layer, got) in layers.iter().zip(grouped) {
                    let want = layer.forward(&x).expect("forward");
                    let flat = |t: Tensor| t.flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
                    assert_eq!(flat(got), flat(want), "{dtypes:?} with {rows} rows");
                }
            }
        }
    }

    /// A shape whose byte size wraps past 2^64 (2^62 × 32 f32s are 2^69 bytes, 0 modulo 2^64)
    /// is refused, not taken for an empty tensor that fits anywhere.
    #[test]
    fn a_size_that_wraps_is_refused() {
        let (_file, m) = mapped(Format::F32, 1, 32, &mut Rng(1));
        let err = Mapped::new(m.map.clone(), 0, Format::F32, (1 << 62, 32)).err().expect("refused");
        assert!(format!("{err}").contains("larger than the file"), "{err}");
    }
}
