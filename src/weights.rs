//! Weight matrices read straight from the memory-mapped GGUF file, and the matmuls over them.
//!
//! Like llama.cpp, we map the file instead of copying it: loading costs no time and no second
//! copy of the weights, and the kernel shares the pages with its page cache. The quantized
//! blocks are used in place.
//!
//! Decoding reads every weight once per token, so its speed is how fast the weights stream
//! from memory: Q8_0 and Q5_0 matrices (most of the bytes of a Q4_K_M file) go through our own
//! kernels in [`crate::kernels`], the k-quants through candle's `k_quants::matmul`. A prefill
//! batch goes through our int8 batched kernel on CPUs with AVX-512 VNNI; elsewhere it
//! dequantizes each matrix once per batch and runs a float GEMM (`Linear::forward_gemm`).

use std::sync::Arc;

use anyhow::{Result, bail};
use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use memmap2::Mmap;

use crate::kernels::{self, Format, Isa, QuantizedRows, TileFormat};

/// A quantized tensor's bytes inside the mapped file.
#[derive(Clone)]
pub struct Mapped {
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
    dtype: GgmlDType,
    /// (rows, cols): rows are output features, cols the reduced dimension.
    shape: (usize, usize),
}

impl Mapped {
    /// Describes `len` bytes at `offset` of `map` as a (rows, cols) matrix of `dtype` blocks.
    pub fn new(map: Arc<Mmap>, offset: usize, dtype: GgmlDType, shape: (usize, usize)) -> Result<Self> {
        let (rows, cols) = shape;
        let block = dtype.block_size();
        if !cols.is_multiple_of(block) {
            bail!("a row of {cols} values is not a whole number of {dtype:?} blocks");
        }
        // Checked: a product that wraps would pass the bounds check.
        let len = rows.checked_mul(cols / block).and_then(|n| n.checked_mul(dtype.type_size()));
        let end = len.and_then(|len| offset.checked_add(len));
        let (Some(len), Some(end)) = (len, end) else {
            bail!("tensor data of {rows}×{cols} {dtype:?} values is larger than the file");
        };
        if end > map.len() {
            bail!("tensor data runs past the end of the file (truncated download?)");
        }
        Ok(Self { map, offset, len, dtype, shape })
    }

    pub fn dtype(&self) -> GgmlDType {
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
        if T::DTYPE != self.dtype || !bytes.len().is_multiple_of(size_of::<T>()) {
            bail!("internal error: {:?} data viewed as {:?}", self.dtype, T::DTYPE);
        }
        if bytes.as_ptr().align_offset(align_of::<T>()) != 0 {
            bail!("tensor data is not aligned for {:?} blocks", self.dtype);
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
            GgmlDType::Q4_0 => {
                type $t = k_quants::BlockQ4_0;
                $body
            }
            GgmlDType::Q4_1 => {
                type $t = k_quants::BlockQ4_1;
                $body
            }
            GgmlDType::Q5_0 => {
                type $t = k_quants::BlockQ5_0;
                $body
            }
            GgmlDType::Q5_1 => {
                type $t = k_quants::BlockQ5_1;
                $body
            }
            GgmlDType::Q8_0 => {
                type $t = k_quants::BlockQ8_0;
                $body
            }
            GgmlDType::Q2K => {
                type $t = k_quants::BlockQ2K;
                $body
            }
            GgmlDType::Q3K => {
                type $t = k_quants::BlockQ3K;
                $body
            }
            GgmlDType::Q4K => {
                type $t = k_quants::BlockQ4K;
                $body
            }
            GgmlDType::Q5K => {
                type $t = k_quants::BlockQ5K;
                $body
            }
            GgmlDType::Q6K => {
                type $t = k_quants::BlockQ6K;
                $body
            }
            _ => $other,
        }
    };
}

/// A linear layer `y = x · Wᵀ` over a (rows, cols) weight matrix.
pub enum Linear {
    /// Quantized blocks used in place in the mapped file.
    Mapped(Mapped),
    /// Weights candle owns: float matrices and formats no kernel reads in place.
    Owned(QMatMul),
}

impl Linear {
    /// Makes the layer for a matrix in the file: in place when a kernel reads its format.
    pub fn new(m: Mapped) -> Result<Self> {
        if has_kernel(m.dtype) {
            return Ok(Self::Mapped(m));
        }
        let storage = QStorage::from_data(m.bytes().into(), &Device::Cpu, m.dtype)?;
        Ok(Self::Owned(QMatMul::from_qtensor(QTensor::new(storage, m.shape)?)?))
    }

    /// `x` is (m, cols); the result is (m, rows).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if let Self::Mapped(w) = self {
            let (rows, cols) = w.shape;
            if k != cols {
                bail!("matmul of a (.., {k}) input with a ({rows}, {cols}) matrix");
            }
            let own = own_format(w.dtype);
            // A batch on a VNNI CPU: the int8 batched kernel, faster than the float GEMM and
            // with llama.cpp's numerics (activations quantized to Q8_0, as when decoding).
            if kernels::batched_available()
                && m >= GEMM_MIN_ROWS
                && let Some(format) = tile_format(w.dtype)
            {
                // Activations are quantized to Q8_0 for every format. (llama.cpp pairs k-quants
                // with Q8_K, one f32 scale per 256 values; that was tried, and agreed worse with
                // llama.cpp's reference logits: mean |diff| 0.205 against 0.183 on the long
                // prompts, max 2.5 against 1.1.)
                let lhs = QuantizedRows::new(&x.contiguous()?.flatten_all()?.to_vec1::<f32>()?, cols)?;
                let mut dst = vec![0f32; m * rows];
                kernels::matmul_batched(format, Isa::detect(), w.bytes(), rows, &lhs, &mut dst)?;
                return Ok(Tensor::from_vec(dst, (m, rows), &Device::Cpu)?);
            }
            if let Some(format) = own
                && m < GEMM_MIN_ROWS
            {
                let lhs = QuantizedRows::new(&x.contiguous()?.flatten_all()?.to_vec1::<f32>()?, cols)?;
                let mut dst = vec![0f32; m * rows];
                kernels::matmul(format, Isa::detect(), w.bytes(), rows, &lhs, &mut dst)?;
                return Ok(Tensor::from_vec(dst, (m, rows), &Device::Cpu)?);
            }
        }
        if m >= GEMM_MIN_ROWS {
            return self.forward_gemm(x);
        }
        match self {
            Self::Owned(mm) => Ok(mm.forward(x)?),
            Self::Mapped(w) => {
                let (rows, cols) = w.shape;
                let lhs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                let mut dst = vec![0f32; m * rows];
                with_block_type!(w.dtype, T => k_quants::matmul::<T>((m, cols, rows), &lhs, w.blocks::<T>()?, &mut dst)?,
                    _ => bail!("no kernel for {:?}", w.dtype));
                Ok(Tensor::from_vec(dst, (m, rows), &Device::Cpu)?)
            }
        }
    }

    /// (m, cols) · (cols, rows): a float GEMM over the dequantized weights.
    fn forward_gemm(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.dequantize()?;
        Ok(x.contiguous()?.matmul(&w.t()?)?)
    }
}

impl Linear {
    /// The weights as a (rows, cols) f32 tensor, made on demand (a few MB at most here).
    fn dequantize(&self) -> Result<Tensor> {
        match self {
            Self::Owned(QMatMul::QTensor(t)) => Ok(t.dequantize(&Device::Cpu)?),
            Self::Owned(QMatMul::Tensor(t)) => Ok(t.clone()),
            Self::Owned(QMatMul::TensorF16(t)) => Ok(t.to_dtype(candle_core::DType::F32)?),
            Self::Mapped(w) => {
                let (rows, cols) = w.shape;
                let mut out = vec![0f32; rows * cols];
                if let Some(format) = own_format(w.dtype) {
                    kernels::dequantize(format, Isa::detect(), w.bytes(), &mut out)?;
                    return Ok(Tensor::from_vec(out, (rows, cols), &Device::Cpu)?);
                }
                with_block_type!(w.dtype, T => T::to_float(w.blocks::<T>()?, &mut out),
                    _ => bail!("no kernel for {:?}", w.dtype));
                Ok(Tensor::from_vec(out, (rows, cols), &Device::Cpu)?)
            }
        }
    }
}

/// From this many input rows on (prefill), matmuls run batched: the int8 tile kernel on VNNI
/// CPUs, else a float GEMM over the dequantized weights (the GEMM's blocked kernels reuse each
/// weight across rows, so a 256-token prefill went from about 200 to 320 tokens/s that way).
/// Below it, every row is computed by the one-row kernels exactly as a single decoded token
/// is: they need no repacking (repacking the 178 MB output matrix for a decode step of eight
/// sequences cost more than the step), the weights stay in cache across the rows, and a
/// decode step of several sequences gives each one bit for bit what it gets alone.
const GEMM_MIN_ROWS: usize = 16;

/// Whether our kernels or candle's `k_quants::matmul` can use this format in place.
fn has_kernel(dtype: GgmlDType) -> bool {
    use GgmlDType as D;
    own_format(dtype).is_some() || matches!(dtype, D::Q5_1 | D::Q2K | D::Q3K | D::Q4K | D::Q5K | D::Q6K)
}

/// The formats the batched (prefill) kernel reads; rows must be whole blocks (checked when the
/// matrix was mapped).
fn tile_format(dtype: GgmlDType) -> Option<TileFormat> {
    match dtype {
        GgmlDType::Q8_0 => Some(TileFormat::Q8_0),
        GgmlDType::Q5_0 => Some(TileFormat::Q5_0),
        GgmlDType::Q4_0 => Some(TileFormat::Q4_0),
        GgmlDType::Q4_1 => Some(TileFormat::Q4_1),
        GgmlDType::Q4K => Some(TileFormat::Q4K),
        GgmlDType::Q6K => Some(TileFormat::Q6K),
        _ => None,
    }
}

/// The formats our own decode kernels read.
fn own_format(dtype: GgmlDType) -> Option<Format> {
    match dtype {
        GgmlDType::Q8_0 => Some(Format::Q8_0),
        GgmlDType::Q5_0 => Some(Format::Q5_0),
        GgmlDType::Q4_0 => Some(Format::Q4_0),
        GgmlDType::Q4_1 => Some(Format::Q4_1),
        _ => None,
    }
}

/// The token embedding, looked up row by row from the mapped file: no f32 copy of the
/// (vocab × n_embd) matrix is ever made.
pub struct Embedding {
    m: Mapped,
}

impl Embedding {
    pub fn new(m: Mapped) -> Result<Self> {
        if !has_kernel(m.dtype) && !matches!(m.dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            bail!("token embeddings in {:?} are not supported", m.dtype);
        }
        Ok(Self { m })
    }

    /// The rows for `ids`, as an (ids.len(), n_embd) tensor.
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        let (rows, cols) = self.m.shape;
        let mut out = vec![0f32; ids.len() * cols];
        let row_bytes = self.m.len / rows;
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(cols)) {
            let id = id as usize;
            if id >= rows {
                bail!("token id {id} is outside the embedding's {rows} rows");
            }
            let dtype = self.m.dtype;
            with_block_type!(dtype, T => {
                let blocks = self.m.blocks::<T>()?;
                let per_row = blocks.len() / rows;
                T::to_float(&blocks[id * per_row..(id + 1) * per_row], dst);
            }, _ => {
                // Rare formats: dequantize just this row through candle.
                let bytes = &self.m.bytes()[id * row_bytes..(id + 1) * row_bytes];
                let storage = QStorage::from_data(bytes.into(), &Device::Cpu, dtype)?;
                let row = QTensor::new(storage, cols)?.dequantize(&Device::Cpu)?;
                dst.copy_from_slice(&row.flatten_all()?.to_vec1::<f32>()?);
            });
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
    use std::io::Write;

    /// A (rows, cols) matrix of random weights quantized by candle, in a mapped temporary file.
    fn mapped(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        seed: &mut u64,
    ) -> (tempfile::NamedTempFile, Mapped) {
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| {
                *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("tensor");
        let bytes = QTensor::quantize(&t, dtype).expect("quantize").data().expect("data").into_owned();
        let mut file = tempfile::NamedTempFile::new().expect("tempfile");
        file.write_all(&bytes).expect("write");
        // SAFETY: a private temporary file that nothing else writes while it is mapped.
        let map = unsafe { Mmap::map(file.as_file()) }.expect("mmap");
        let m = Mapped::new(Arc::new(map), 0, dtype, (rows, cols)).expect("mapped");
        (file, m)
    }

    /// Every path a matmul can take (one-row kernels, the int8 batched kernel where the CPU has
    /// VNNI, candle's k-quant kernels) agrees with the float GEMM over dequantized weights, the
    /// path CPUs without VNNI take for batches. The difference left is the Q8_0 rounding of
    /// the activations: well under 1% of the outputs' spread.
    #[test]
    fn every_matmul_path_agrees_with_the_float_gemm() {
        let mut seed = 23;
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q5_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let (_file, m) = mapped(dtype, 40, 512, &mut seed);
            let linear = Linear::new(m).expect("linear");
            for rows in [1, 3, 20] {
                let x: Vec<f32> =
                    (0..rows * 512).map(|i| ((i * 7919 % 613) as f32 / 97.0 - 3.0).sin()).collect();
                let x = Tensor::from_vec(x, (rows, 512), &Device::Cpu).expect("x");
                let flat = |t: Tensor| t.flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
                let got = flat(linear.forward(&x).expect("forward"));
                let want = flat(linear.forward_gemm(&x).expect("gemm"));
                let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    worst < 0.01 * spread,
                    "{dtype:?} with {rows} rows: off by {worst} (spread {spread})"
                );
            }
        }
    }

    /// A shape whose byte size wraps past 2^64 (2^62 × 32 f32s are 2^69 bytes, 0 modulo 2^64)
    /// is refused, not taken for an empty tensor that fits anywhere.
    #[test]
    fn a_size_that_wraps_is_refused() {
        let (_file, m) = mapped(GgmlDType::F32, 1, 32, &mut 1);
        let err = Mapped::new(m.map.clone(), 0, GgmlDType::F32, (1 << 62, 32)).err().expect("refused");
        assert!(format!("{err}").contains("larger than the file"), "{err}");
    }
}
