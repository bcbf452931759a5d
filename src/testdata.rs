//! Reference data shared by the unit tests of several modules.

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
    let mut state = 42u64;
    let mut next_byte = || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 56) as u8
    };
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
