//! What the unit tests of every module share: one pseudo-random generator, one GGUF writer,
//! and ggml's IQ4 reference data. (`crate::synthetic` stays the source of whole model shapes.)

use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{self, Value};

use crate::gguf::Gguf;

/// A linear congruential generator with Knuth's MMIX constants (the one ggml's and our C
/// reference programs use): reproducible, and no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0
    }

    /// Uniform in [-0.5, 0.5), from the top 24 bits.
    pub fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 33) as usize) % n
    }

    /// The top byte.
    pub fn byte(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }
}

/// The bytes of a GGUF file with `metadata` and `tensors` (candle's writer).
pub fn gguf_bytes(metadata: &[(&str, &Value)], tensors: &[(&str, &QTensor)]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, metadata, tensors).expect("write gguf");
    out.into_inner()
}

/// A temporary GGUF file with `metadata` and `tensors`.
pub fn gguf_file(metadata: &[(&str, &Value)], tensors: &[(&str, &QTensor)]) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), gguf_bytes(metadata, tensors)).expect("write gguf");
    file
}

/// A temporary GGUF file with `metadata` and no tensors, opened.
pub fn gguf_with(metadata: Vec<(&str, Value)>) -> (tempfile::NamedTempFile, Gguf) {
    let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let file = gguf_file(&refs, &[]);
    let gguf = Gguf::open(file.path()).expect("open gguf");
    (file, gguf)
}

/// IQ4_NL or IQ4_XS blocks of pseudo-random bytes and their values as ggml's reference
/// dequantizer gives them (candle cannot write these formats): `xs` picks IQ4_XS (6 blocks of
/// 256 values, 136 bytes) over IQ4_NL (12 blocks of 32 values, 18 bytes). The blocks are made
/// here with the generator of `scripts/iq4-reference/iq4-reference.c`; the values are what
/// that program wrote with ggml (`tests/data/iq4/`).
pub fn iq4_reference(xs: bool) -> (Vec<u8>, Vec<f32>) {
    let (blocks, block_bytes, json) = if xs {
        (6, 136, include_str!("../tests/data/iq4/iq4_xs.json"))
    } else {
        (12, 18, include_str!("../tests/data/iq4/iq4_nl.json"))
    };
    let mut rng = Rng(42);
    let mut next_byte = || rng.byte();
    if xs {
        // The program made the IQ4_NL blocks first, from the same generator: their 12 · 18
        // bytes and 12 scales.
        for _ in 0..12 * 18 + 12 {
            next_byte();
        }
    }
    let mut data: Vec<u8> = (0..blocks * block_bytes).map(|_| next_byte()).collect();
    for b in 0..blocks {
        // A scale in [0.001, 0.05), negative for every third block, in f32 as the C program.
        let d = 0.001f32 + 0.049f32 * f32::from(next_byte()) / 256.0;
        let d = half::f16::from_f32(if b % 3 == 2 { -d } else { d });
        data[b * block_bytes..b * block_bytes + 2].copy_from_slice(&d.to_le_bytes());
    }
    let values: Vec<f64> = serde_json::from_str(json).expect("IQ4 reference JSON");
    (data, values.into_iter().map(|v| v as f32).collect())
}
