//! The weight formats streamgen reads, and every fact about each in one table: its ggml type
//! id and name, the size of its unit (a block or a super-block), whether its blocks carry an
//! additive minimum, and which kernels multiply by it when decoding and during prefill. In
//! the spirit of ggml's per-type trait tables (`type_traits[]` in ggml.c, `type_traits_cpu[]`
//! in ggml-cpu.c): adding a format is a row here and its kernels.
//!
//! A leaf: the GGUF reader names a tensor's type with it, [`crate::weights`] resolves each
//! matrix's kernels from it once at load, and the kernels read block sizes from it.

use std::fmt;

use candle_core::quantized::GgmlDType;

/// Values per block of the 32-value formats (ggml's `QK4_0`, `QK8_0`, ...), and per sub-block
/// of the super-block formats.
pub const QK: usize = 32;
/// Values per super-block of the k-quants and IQ4_XS (ggml's `QK_K`).
pub const QK_K: usize = 256;
/// Bytes per IQ4_XS super-block: f16 d, u16 of high scale bits, 4 bytes of low scale bits,
/// 128 bytes of nibbles.
pub const IQ4_XS_BYTES: usize = 136;
/// Bytes per Q4_K super-block: f16 d and dmin, 12 bytes of six-bit scales and minimums, 128
/// bytes of nibbles.
pub const Q4_K_BYTES: usize = 144;
/// Bytes per Q6_K super-block: 128 bytes of low nibbles, 64 of high bit pairs, 16 i8 scales,
/// f16 d.
pub const Q6_K_BYTES: usize = 210;

/// A weight matrix's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    F32,
    F16,
    BF16,
    /// f16 scale, then 16 bytes of nibbles: `w = d · (q - 8)`, q in 0..16.
    Q4_0,
    /// f16 scale, f16 minimum, then 16 bytes of nibbles: `w = d · q + m`, q in 0..16.
    Q4_1,
    /// f16 scale, 32 high bits (u32, little-endian), then 16 bytes of low nibbles:
    /// `w = d · (q - 16)`, q in 0..32.
    Q5_0,
    /// f16 scale, f16 minimum, 32 high bits, then 16 bytes of low nibbles: `w = d · q + m`,
    /// q in 0..32.
    Q5_1,
    /// f16 scale, then 32 signed bytes: `w = d · q`.
    Q8_0,
    /// f16 scale, then 16 bytes of nibbles indexing a nonlinear table:
    /// `w = d · KVALUES_IQ4NL[q]`.
    Iq4Nl,
    /// 256-value super-blocks: f16 d, 8 six-bit scales `ls` (low 4 bits in 4 bytes, high 2
    /// bits in a u16 before them), then 128 bytes of nibbles as IQ4_NL's, 16 per 32 values:
    /// `w = d · (ls - 32) · KVALUES_IQ4NL[q]`.
    Iq4Xs,
    Q2K,
    Q3K,
    /// 256-value super-blocks: f16 d and dmin, 8 six-bit scales and minimums, 4-bit quants:
    /// `w = d · sc · q - dmin · mn` per 32 values.
    Q4K,
    Q5K,
    /// 256-value super-blocks: 4 low and 2 high bits per quant, 16 i8 scales, f16 d:
    /// `w = d · sc · (q - 32)` per 16 values.
    Q6K,
}

/// Which kernels multiply one or a few activation rows (a decode step) by a matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodePath {
    /// Our int8 block kernels ([`crate::kernels::matmul`]): activations quantized to Q8_0.
    Blocks,
    /// Our float kernels ([`crate::kernels::matmul_float`]): f32 activations.
    Float,
    /// candle's `k_quants::matmul` (it picks its instruction set itself).
    Candle,
}

/// Which kernels multiply a prefill batch by a matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillPath {
    /// Our int8 tile kernel ([`crate::kernels::matmul_batched`]) on CPUs that have it (AVX2 or
    /// AVX-512 VNNI), else [`PrefillPath::RowBlocks`].
    Tiles,
    /// A blocked float GEMM over dequantized blocks of weight rows
    /// ([`crate::kernels::matmul_row_blocks`]).
    RowBlocks,
}

/// One row of the table.
struct Facts {
    /// ggml's name, as llama.cpp and model cards spell it.
    name: &'static str,
    /// ggml's `enum ggml_type` id, as GGUF files store it.
    id: u32,
    /// (values, bytes) of the smallest whole unit: a block, or a super-block.
    unit: (usize, usize),
    /// Whether blocks carry an additive minimum: matmuls then need the activations' sums.
    minimum: bool,
    decode: DecodePath,
    prefill: PrefillPath,
}

impl Format {
    /// Every format, in ggml's id order.
    pub const ALL: [Format; 15] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
        Self::Iq4Nl,
        Self::Iq4Xs,
        Self::BF16,
    ];

    /// The table.
    const fn facts(self) -> Facts {
        use DecodePath::{Blocks, Candle, Float};
        use PrefillPath::{RowBlocks, Tiles};
        let (name, id, unit, minimum, decode, prefill) = match self {
            Self::F32 => ("F32", 0, (1, 4), false, Float, RowBlocks),
            Self::F16 => ("F16", 1, (1, 2), false, Float, RowBlocks),
            Self::Q4_0 => ("Q4_0", 2, (QK, 18), false, Blocks, Tiles),
            Self::Q4_1 => ("Q4_1", 3, (QK, 20), true, Blocks, Tiles),
            Self::Q5_0 => ("Q5_0", 6, (QK, 22), false, Blocks, Tiles),
            Self::Q5_1 => ("Q5_1", 7, (QK, 24), true, Blocks, Tiles),
            Self::Q8_0 => ("Q8_0", 8, (QK, 34), false, Blocks, Tiles),
            Self::Q2K => ("Q2_K", 10, (QK_K, 84), true, Candle, RowBlocks),
            Self::Q3K => ("Q3_K", 11, (QK_K, 110), false, Candle, RowBlocks),
            Self::Q4K => ("Q4_K", 12, (QK_K, Q4_K_BYTES), true, Blocks, Tiles),
            Self::Q5K => ("Q5_K", 13, (QK_K, 176), true, Candle, RowBlocks),
            Self::Q6K => ("Q6_K", 14, (QK_K, Q6_K_BYTES), false, Blocks, Tiles),
            Self::Iq4Nl => ("IQ4_NL", 20, (QK, 18), false, Blocks, RowBlocks),
            Self::Iq4Xs => ("IQ4_XS", 23, (QK_K, IQ4_XS_BYTES), false, Blocks, RowBlocks),
            Self::BF16 => ("BF16", 30, (1, 2), false, Float, RowBlocks),
        };
        Facts { name, id, unit, minimum, decode, prefill }
    }

    /// The format of ggml type `id`, if streamgen reads it.
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.facts().id == id)
    }

    /// The format candle calls `dtype`, if streamgen reads it.
    pub fn from_ggml_dtype(dtype: GgmlDType) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.ggml_dtype() == Some(dtype))
    }

    /// ggml's type id.
    pub fn ggml_id(self) -> u32 {
        self.facts().id
    }

    /// ggml's name (`Q4_K`, `IQ4_XS`).
    pub fn name(self) -> &'static str {
        self.facts().name
    }

    /// The smallest whole unit of the format, (values, bytes): a block, a super-block, or one
    /// value of a float format.
    pub const fn unit(self) -> (usize, usize) {
        self.facts().unit
    }

    /// Bytes per 32 values (a block of the 32-value formats).
    pub const fn block_bytes(self) -> usize {
        let (values, bytes) = self.unit();
        bytes * QK / values
    }

    /// Bytes per row of `cols` values (whole units).
    pub const fn row_bytes(self, cols: usize) -> usize {
        let (values, bytes) = self.unit();
        cols / values * bytes
    }

    /// Whether blocks carry an additive minimum (Q4_1, Q5_1 and the k-quants with `dmin`):
    /// their matmuls need the activations' per-block sums.
    pub const fn has_minimum(self) -> bool {
        self.facts().minimum
    }

    /// The kernels of a decode step.
    pub const fn decode(self) -> DecodePath {
        self.facts().decode
    }

    /// The kernels of a prefill batch.
    pub const fn prefill(self) -> PrefillPath {
        self.facts().prefill
    }

    /// candle's name for the format, where candle has one (not the IQ4 formats).
    pub fn ggml_dtype(self) -> Option<GgmlDType> {
        use GgmlDType as D;
        Some(match self {
            Self::F32 => D::F32,
            Self::F16 => D::F16,
            Self::BF16 => D::BF16,
            Self::Q4_0 => D::Q4_0,
            Self::Q4_1 => D::Q4_1,
            Self::Q5_0 => D::Q5_0,
            Self::Q5_1 => D::Q5_1,
            Self::Q8_0 => D::Q8_0,
            Self::Q2K => D::Q2K,
            Self::Q3K => D::Q3K,
            Self::Q4K => D::Q4K,
            Self::Q5K => D::Q5K,
            Self::Q6K => D::Q6K,
            Self::Iq4Nl | Self::Iq4Xs => return None,
        })
    }
}

/// ggml's names (`Q4_K`, `IQ4_XS`), as llama.cpp and model cards spell them.
impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table agrees with candle's for every format both know (ids, block and byte sizes),
    /// and every id names one format.
    #[test]
    fn the_table_agrees_with_candle() {
        for format in Format::ALL {
            assert_eq!(Format::from_ggml_id(format.ggml_id()), Some(format));
            let Some(dtype) = format.ggml_dtype() else { continue };
            let (values, bytes) = format.unit();
            assert_eq!((values, bytes), (dtype.block_size(), dtype.type_size()), "{format}");
        }
        // ggml's activation types are never weights.
        assert_eq!(Format::from_ggml_id(9), None);
        assert_eq!(Format::from_ggml_id(15), None);
    }
}
