//! The kernels against references computed in f64, on every instruction set this CPU has.

use super::*;

use crate::test_support::Rng;

/// Each output within 1e-4 (relative, plus 1e-4 absolute) of the f64 reference.
fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: output length");
    for (k, (&got, &want)) in got.iter().zip(want).enumerate() {
        let tol = 1e-4 * (1.0 + want.abs());
        assert!((f64::from(got) - want).abs() < tol, "{what} output {k}: {got} vs {want}");
    }
}

/// Random weights quantized by candle (ggml's reference quantizers).
fn weights(format: Format, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    use candle_core::quantized::QTensor;
    let data: Vec<f32> = (0..rows * cols).map(|_| rng.f32() * 3.0).collect();
    let t = candle_core::Tensor::from_vec(data, (rows, cols), &candle_core::Device::Cpu).expect("tensor");
    let Some(dtype) = format.ggml_dtype() else {
        panic!("candle cannot quantize to {format:?}; see ggml_blocks")
    };
    QTensor::quantize(&t, dtype).expect("quantize").data().expect("data").into_owned()
}

/// The reference: dequantized weights times dequantized activations, in f64.
fn reference(format: Format, w: &[u8], rows: usize, x: &QuantizedRows) -> Vec<f64> {
    let nb = x.cols / QK;
    let row_bytes = format.row_bytes(x.cols);
    let mut out = Vec::new();
    for i in 0..x.rows() {
        let (d, qs) = x.row(i);
        for r in 0..rows {
            let mut sum = 0f64;
            for b in 0..nb {
                let mut q = [0i8; QK];
                let BlockScale { s, m } = format.sub_block(&w[r * row_bytes..][..row_bytes], b, &mut q);
                for j in 0..QK {
                    let wj = f64::from(s[j / 16]) * f64::from(q[j]) + f64::from(m);
                    sum += wj * f64::from(d[b]) * f64::from(qs[b * QK + j]);
                }
            }
            out.push(sum);
        }
    }
    out
}

/// [`matmul`] on every instruction set this CPU has, against `want`.
fn matmul_agrees_on_every_isa(format: Format, w: &[u8], rows: usize, x: &QuantizedRows, want: &[f64]) {
    for &isa in Isa::available() {
        let mut out = vec![0f32; x.rows() * rows];
        matmul(format, isa, w, rows, x, &mut out).expect("matmul");
        assert_close(&out, want, &format!("{format:?} {isa:?}"));
    }
}

#[test]
fn every_isa_agrees_with_the_reference() {
    let mut rng = Rng(7);
    // Odd and even block counts, one and several activation rows, rows not a multiple of 16.
    for (format, rows, cols, m) in [
        (Format::Q8_0, 37, 640, 1),
        (Format::Q5_0, 70, 96, 3),
        (Format::Q8_0, 5, 32, 2),
        (Format::Q5_0, 33, 2048, 1),
        (Format::Q4_0, 37, 640, 1),
        (Format::Q4_0, 20, 96, 3),
        (Format::Q4_1, 37, 576, 1),
        (Format::Q4_1, 21, 1536, 2),
        (Format::Q5_1, 37, 576, 1),
        (Format::Q5_1, 22, 1536, 3),
        (Format::Q4K, 37, 512, 1),
        (Format::Q4K, 22, 2048, 5),
        (Format::Q6K, 37, 768, 1),
        (Format::Q6K, 21, 256, 7),
        (Format::Q8_0, 9, 640, 9),
    ] {
        let w = weights(format, rows, cols, &mut rng);
        let xs: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
        let x = QuantizedRows::new(&xs, cols).expect("quantize");
        let want = reference(format, &w, rows, &x);
        matmul_agrees_on_every_isa(format, &w, rows, &x, &want);
    }
}

#[test]
fn dequantize_agrees_with_candle_on_every_isa() {
    use candle_core::quantized::{GgmlDType, QStorage, QTensor};
    let mut rng = Rng(11);
    for (format, dtype) in [
        (Format::Q8_0, GgmlDType::Q8_0),
        (Format::Q5_0, GgmlDType::Q5_0),
        (Format::Q4_0, GgmlDType::Q4_0),
        (Format::Q4_1, GgmlDType::Q4_1),
        (Format::Q5_1, GgmlDType::Q5_1),
        (Format::Q4K, GgmlDType::Q4K),
        (Format::Q6K, GgmlDType::Q6K),
    ] {
        let cols = if format.unit().0 == 256 { 512 } else { 64 };
        let w = weights(format, 300, cols, &mut rng);
        let storage =
            QStorage::from_data(w.clone().into(), &candle_core::Device::Cpu, dtype).expect("storage");
        let want = QTensor::new(storage, (300, cols))
            .expect("qtensor")
            .dequantize(&candle_core::Device::Cpu)
            .expect("dequantize")
            .flatten_all()
            .expect("flatten")
            .to_vec1::<f32>()
            .expect("vec");
        for &isa in Isa::available() {
            let mut got = vec![0f32; 300 * cols];
            dequantize(format, isa, &w, &mut got).expect("dequantize");
            assert_eq!(got, want, "{format:?} {isa:?}");
        }
    }
}

#[test]
fn attention_agrees_with_a_plain_softmax_on_every_isa() {
    let mut rng = Rng(5);
    // With AVX-512, 1 to 8 queries and a width that is a multiple of 32 take the 512-bit
    // kernels; the others the per-row ones.
    for (n_q, hd, len) in [
        (4, 256, 1000),
        (2, 24, 1),
        (1, 40, 129),
        (8, 64, 300),
        (1, 96, 129),
        (2, 64, 7),
        (3, 64, 50),
        (7, 32, 200),
        (9, 64, 40),
    ] {
        let q: Vec<f32> = (0..n_q * hd).map(|_| rng.f32()).collect();
        let k: Vec<f16> = (0..len * hd).map(|_| f16::from_f32(rng.f32() * 4.0)).collect();
        let v: Vec<f16> = (0..len * hd).map(|_| f16::from_f32(rng.f32())).collect();
        let mut want = vec![0f64; n_q * hd];
        for i in 0..n_q {
            let s: Vec<f64> = (0..len)
                .map(|t| (0..hd).map(|j| f64::from(q[i * hd + j]) * f64::from(k[t * hd + j].to_f32())).sum())
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = s.iter().map(|x| (x - max).exp()).sum();
            for t in 0..len {
                let p = (s[t] - max).exp() / total;
                for j in 0..hd {
                    want[i * hd + j] += p * f64::from(v[t * hd + j].to_f32());
                }
            }
        }
        for &isa in Isa::available() {
            let mut out = vec![0f32; n_q * hd];
            attend(isa, &q, n_q, hd, None, [&k, &[]], [&v, &[]], &mut out).expect("attend");
            for (j, (&got, &want)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() < 1e-5,
                    "{isa:?} ({n_q}, {hd}, {len}) {j}: {got} vs {want}"
                );
            }
            // A ring's span in two runs, split anywhere, gives the same bits as one run.
            for cut in [1, len / 2, len - 1, 128.min(len - 1), 130.min(len - 1)] {
                let mut split = vec![0f32; n_q * hd];
                let (k, v) = (k.split_at(cut * hd), v.split_at(cut * hd));
                attend(isa, &q, n_q, hd, None, [k.0, k.1], [v.0, v.1], &mut split).expect("attend");
                assert_eq!(split, out, "{isa:?} ({n_q}, {hd}, {len}) cut at {cut}");
            }
        }
    }
}

#[test]
fn the_batched_kernel_agrees_with_the_reference() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let mut rng = Rng(13);
    for (format, dtype, rows, cols, m) in [
        (Format::Q5_0, GgmlDType::Q5_0, 37, 640, 9),
        (Format::Q8_0, GgmlDType::Q8_0, 16, 64, 4),
        (Format::Q8_0, GgmlDType::Q8_0, 3, 32, 1),
        (Format::Q5_0, GgmlDType::Q5_0, 64, 96, 7),
        (Format::Q4K, GgmlDType::Q4K, 21, 512, 10),
        (Format::Q6K, GgmlDType::Q6K, 19, 768, 9),
        (Format::Q4_0, GgmlDType::Q4_0, 21, 576, 9),
        (Format::Q4_1, GgmlDType::Q4_1, 35, 1536, 11),
        (Format::Q5_1, GgmlDType::Q5_1, 35, 576, 9),
    ] {
        let data: Vec<f32> = (0..rows * cols).map(|_| rng.f32() * 3.0).collect();
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&t, dtype).expect("quantize");
        let w = q.data().expect("data").into_owned();
        let wf =
            q.dequantize(&Device::Cpu).expect("dq").flatten_all().expect("flat").to_vec1::<f32>().expect("v");
        let xs: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
        let x = QuantizedRows::new(&xs, cols).expect("quantize");
        let mut want = Vec::new();
        for i in 0..m {
            let (d, qs) = x.row(i);
            for r in 0..rows {
                let dot: f64 = (0..cols)
                    .map(|j| f64::from(wf[r * cols + j]) * f64::from(d[j / QK]) * f64::from(qs[j]))
                    .sum();
                want.push(dot);
            }
        }
        for &isa in Isa::available() {
            let mut out = vec![0f32; m * rows];
            let result = matmul_batched(format, isa, &w, rows, &x, &mut out);
            if isa.0 == Level::Scalar {
                assert!(result.is_err(), "the portable path has no batched kernel");
            } else {
                result.expect("matmul");
                assert_close(&out, &want, &format!("{format:?} {isa:?}"));
            }
        }
    }
}

/// A cache of `n_kv` heads of `end` positions in f16, (n_kv, end, hd), and its runs as
/// [`attend_batch`] reads them: one run, or two cut `cut` positions into the span (a ring's).
fn cache_runs<'a>(
    k: &'a [f16],
    v: &'a [f16],
    end: usize,
    hd: usize,
    cut: usize,
) -> impl Fn(usize, usize, usize) -> KvSpan<'a> + Sync {
    move |g: usize, start: usize, len: usize| {
        let at = (g * end + start) * hd;
        let c = cut.min(len) * hd;
        let (k, v) = (&k[at..at + len * hd], &v[at..at + len * hd]);
        ([&k[..c], &k[c..]], [&v[..c], &v[c..]])
    }
}

/// Batch attention computes each query as decoding computes it, bit for bit, whatever the
/// batch it is in and wherever a ring's span wraps: so a prompt's rows get the same bits in a
/// pass of 300 queries, of 16, of 1, resumed from the prompt cache or decoded. With and
/// without a window, soft-capped, every head group width the kernels special-case (1 to 8)
/// and one past them, head sizes with tails, spans past 128 keys.
#[test]
fn batch_attention_computes_each_query_as_decoding_does() {
    let mut rng = Rng(29);
    for (n_head, n_kv, hd, pos, seq, window, softcap) in [
        (4, 1, 64, 280, 40, Some(300), None),
        (4, 1, 64, 0, 300, None, None),
        (6, 2, 128, 100, 50, None, Some(30.0)),
        (14, 2, 24, 7, 20, Some(9), None),
        (9, 1, 40, 120, 17, None, None),
        (3, 3, 32, 0, 140, Some(130), None),
    ] {
        let end = pos + seq;
        let q: Vec<f32> = (0..seq * n_head * hd).map(|_| rng.f32()).collect();
        let k: Vec<f16> = (0..n_kv * end * hd).map(|_| f16::from_f32(rng.f32() * 3.0)).collect();
        let v: Vec<f16> = (0..n_kv * end * hd).map(|_| f16::from_f32(rng.f32())).collect();
        let span = Span { pos, seq, window, softcap };
        let n_rep = n_head / n_kv;
        for &isa in Isa::available() {
            let got = attend_batch(isa, &q, n_head, n_kv, hd, span, &cache_runs(&k, &v, end, hd, usize::MAX))
                .expect("attend");
            let wrapped = attend_batch(isa, &q, n_head, n_kv, hd, span, &cache_runs(&k, &v, end, hd, 100))
                .expect("attend");
            assert!(got == wrapped, "{isa:?} ({n_head}, {hd}, {pos}, {seq}): a wrapped span differs");
            for i in 0..seq {
                let p = pos + i;
                let start = first_key(p, window);
                for g in 0..n_kv {
                    let (kr, vr) = cache_runs(&k, &v, end, hd, usize::MAX)(g, start, p + 1 - start);
                    let at = (i * n_head + g * n_rep) * hd;
                    let mut want = vec![0f32; n_rep * hd];
                    attend(isa, &q[at..at + n_rep * hd], n_rep, hd, softcap, kr, vr, &mut want)
                        .expect("attend");
                    assert!(
                        got[at..at + n_rep * hd] == want[..],
                        "{isa:?} ({n_head}, {hd}, {pos}, {seq}): query {i} of group {g}"
                    );
                }
            }
        }
    }
}

#[test]
fn batch_attention_agrees_with_a_masked_softmax() {
    let mut rng = Rng(17);
    // (n_head, n_kv, hd, pos, seq, window): from the start, after a prefix, and with a window
    // that cuts into the batch.
    for (n_head, n_kv, hd, pos, seq, window) in
        [(4, 1, 16, 0, 70, None), (2, 2, 8, 5, 40, None), (4, 2, 8, 30, 45, Some(10))]
    {
        let end = pos + seq;
        let q: Vec<f32> = (0..seq * n_head * hd).map(|_| rng.f32()).collect();
        let k: Vec<f16> = (0..n_kv * end * hd).map(|_| f16::from_f32(rng.f32() * 3.0)).collect();
        let v: Vec<f16> = (0..n_kv * end * hd).map(|_| f16::from_f32(rng.f32())).collect();
        let span = Span { pos, seq, window, softcap: None };
        for &isa in Isa::available() {
            let got = attend_batch(isa, &q, n_head, n_kv, hd, span, &cache_runs(&k, &v, end, hd, usize::MAX))
                .expect("attend");
            for i in 0..seq {
                let p = pos + i;
                for h in 0..n_head {
                    let g = h / (n_head / n_kv);
                    let visible: Vec<usize> = (0..=p).filter(|&t| window.is_none_or(|w| p - t < w)).collect();
                    let key = |t: usize, d: usize| f64::from(k[(g * end + t) * hd + d].to_f32());
                    let s: Vec<f64> = visible
                        .iter()
                        .map(|&t| (0..hd).map(|d| f64::from(q[(i * n_head + h) * hd + d]) * key(t, d)).sum())
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let total: f64 = s.iter().map(|x| (x - max).exp()).sum();
                    for d in 0..hd {
                        let want: f64 = visible
                            .iter()
                            .zip(&s)
                            .map(|(&t, &x)| {
                                (x - max).exp() / total * f64::from(v[(g * end + t) * hd + d].to_f32())
                            })
                            .sum();
                        let have = f64::from(got[i * n_head * hd + h * hd + d]);
                        assert!(
                            (have - want).abs() < 1e-5,
                            "{isa:?} query {i} head {h} dim {d}: {have} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn quantized_activations_match_candle() {
    use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
    let mut rng = Rng(3);
    let mut xs: Vec<f32> = (0..128).map(|_| rng.f32() * 10.0).collect();
    xs[32..64].fill(0.0); // an all-zero block has scale 0
    // Exact halves (scale 1): rounded away from zero, as ggml's reference and candle do.
    xs[64..70].copy_from_slice(&[127.0, 2.5, -3.5, 0.5, -0.5, 126.5]);
    let ours = QuantizedRows::new(&xs, 128).expect("quantize");
    let mut theirs = vec![BlockQ8_0::zeros(); 4];
    BlockQ8_0::from_float(&xs, &mut theirs);
    // SAFETY: BlockQ8_0 is a repr(C) struct of 34 bytes (an f16, then 32 i8), no padding.
    let bytes = unsafe { std::slice::from_raw_parts(theirs.as_ptr().cast::<u8>(), 4 * 34) };
    for (b, block) in bytes.chunks_exact(34).enumerate() {
        assert_eq!(ours.d[b], f16::from_le_bytes([block[0], block[1]]).to_f32());
        let mut q = [0i8; QK];
        unpack(Format::Q8_0, block, &mut q);
        assert_eq!(&ours.qs[b * QK..(b + 1) * QK], &q[..]);
    }
}

#[test]
fn bad_shapes_are_errors() {
    assert!(QuantizedRows::new(&[0.0; 40], 40).is_err());
    let x = QuantizedRows::new(&[0.5; 64], 32).expect("quantize");
    let mut out = vec![0f32; 2];
    assert!(matmul(Format::Q8_0, Isa::scalar(), &[0u8; 33], 1, &x, &mut out).is_err());
}

#[test]
fn float_weights_agree_with_the_reference_on_every_isa() {
    let mut rng = Rng(19);
    // Rows of 4k + 1 (the four-row kernel and a single row), widths with and without a tail.
    for (format, rows, cols, m) in [
        (Format::F16, 9, 64, 1),
        (Format::BF16, 9, 77, 3),
        (Format::F32, 5, 40, 2),
        (Format::F16, 21, 1003, 2),
        (Format::BF16, 6, 8, 1),
    ] {
        let values: Vec<f32> = (0..rows * cols).map(|_| rng.f32() * 3.0).collect();
        let w: Vec<u8> = values
            .iter()
            .flat_map(|&v| match format {
                Format::F32 => v.to_le_bytes().to_vec(),
                Format::F16 => f16::from_f32(v).to_le_bytes().to_vec(),
                _ => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            })
            .collect();
        let float = float::Float::of(format).expect("a float format");
        let widened: Vec<f32> = (0..rows * cols).map(|i| float.get(&w, i)).collect();
        let xs: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
        let mut want = Vec::new();
        for i in 0..m {
            for r in 0..rows {
                want.push(
                    (0..cols).map(|j| f64::from(widened[r * cols + j]) * f64::from(xs[i * cols + j])).sum(),
                );
            }
        }
        for &isa in Isa::available() {
            let mut out = vec![0f32; m * rows];
            matmul_float(format, isa, &w, (rows, cols), &xs, &mut out).expect("matmul");
            assert_close(&out, &want, &format!("{format:?} {isa:?}"));
            let mut back = vec![0f32; rows * cols];
            float_to_f32(format, isa, &w, &mut back).expect("widen");
            assert_eq!(back, widened, "{format:?} {isa:?}");
        }
        // The widening itself, against the `half` crate.
        let expected: Vec<f32> = match format {
            Format::F32 => values.clone(),
            Format::F16 => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            _ => values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
        };
        assert_eq!(widened, expected, "{format:?}");
    }
}

#[test]
fn the_blocked_gemm_agrees_with_the_reference() {
    let mut rng = Rng(29);
    // A block is 65536 / cols rows (at least 16): 300 rows of 1000 are 5 blocks, the last short.
    let (rows, cols, m) = (300, 1000, 17);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
    let xs: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
    let mut out = vec![0f32; m * rows];
    matmul_row_blocks((rows, cols), &xs, &mut out, |r, buf| {
        buf.copy_from_slice(&w[r.start * cols..r.end * cols]);
        Ok(())
    })
    .expect("gemm");
    let want: Vec<f64> = (0..m)
        .flat_map(|i| {
            let (w, xs) = (&w, &xs);
            (0..rows).map(move |r| {
                (0..cols).map(|j| f64::from(w[r * cols + j]) * f64::from(xs[i * cols + j])).sum()
            })
        })
        .collect();
    assert_close(&out, &want, "blocked gemm");
    // An error from the dequantizer is returned, not lost.
    let err = matmul_row_blocks((rows, cols), &xs, &mut out, |_, _| anyhow::bail!("bad block"));
    assert!(err.is_err());
}

/// IQ4 blocks and their values as ggml's reference dequantizer gives them.
fn ggml_blocks(format: Format) -> (Vec<u8>, Vec<f32>) {
    match format {
        Format::Iq4Nl => crate::test_support::iq4_reference(false),
        Format::Iq4Xs => crate::test_support::iq4_reference(true),
        _ => panic!("no ggml reference data for {format:?}"),
    }
}

#[test]
fn iq4_dequantizes_as_ggml_on_every_isa() {
    for format in [Format::Iq4Nl, Format::Iq4Xs] {
        let (w, want) = ggml_blocks(format);
        for &isa in Isa::available() {
            let mut got = vec![0f32; want.len()];
            dequantize(format, isa, &w, &mut got).expect("dequantize");
            assert_eq!(got, want, "{format:?} {isa:?}");
        }
        // Not a whole super-block: refused.
        let mut out = vec![0f32; 32];
        assert!(dequantize(format, Isa::scalar(), &w[..17], &mut out).is_err());
    }
}

#[test]
fn iq4_matmuls_agree_with_ggml_values_on_every_isa() {
    let mut rng = Rng(31);
    // Rows made of the reference units in rotation: row r holds units r, r + 1, … (mod n).
    for (format, rows, units_per_row, m) in [
        (Format::Iq4Nl, 9, 4, 1),
        (Format::Iq4Nl, 7, 12, 3),
        (Format::Iq4Xs, 5, 2, 1),
        (Format::Iq4Xs, 6, 3, 2),
    ] {
        let (blocks, values) = ggml_blocks(format);
        let (unit_values, unit_bytes) = format.unit();
        let n = blocks.len() / unit_bytes;
        let cols = units_per_row * unit_values;
        let (mut w, mut wf) = (Vec::new(), Vec::new());
        for r in 0..rows {
            for k in 0..units_per_row {
                let u = (r + k) % n;
                w.extend_from_slice(&blocks[u * unit_bytes..(u + 1) * unit_bytes]);
                wf.extend_from_slice(&values[u * unit_values..(u + 1) * unit_values]);
            }
        }
        let xs: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
        let x = QuantizedRows::new(&xs, cols).expect("quantize");
        let mut want = Vec::new();
        for i in 0..m {
            let (d, qs) = x.row(i);
            for r in 0..rows {
                want.push(
                    (0..cols)
                        .map(|j| f64::from(wf[r * cols + j]) * f64::from(d[j / QK]) * f64::from(qs[j]))
                        .sum::<f64>(),
                );
            }
        }
        matmul_agrees_on_every_isa(format, &w, rows, &x, &want);
    }
}

#[test]
fn a_batch_gives_each_row_what_it_gets_alone_on_every_isa() {
    let mut rng = Rng(41);
    // Rows not a multiple of 4 (the one-row kernel at the end), batches of every size up to 17:
    // the few-row kernel (calls of up to eight activation rows) and, with VNNI, the pair
    // kernel (5 to 8 rows) and the many-row kernel (chunks of up to 15), with AVX2 the paired
    // kernel of the k-quants (3 and 4 rows) and the many-row kernels (chunks of up to 8); rows
    // of an odd number of blocks (Q5_0, Q5_1), whose last block has no pair.
    for (format, rows, cols) in [
        (Format::Q8_0, 18, 640),
        (Format::Q5_0, 17, 96),
        (Format::Q4_0, 9, 64),
        (Format::Q4_1, 10, 576),
        (Format::Q5_1, 7, 160),
        (Format::Q4K, 13, 512),
        (Format::Q6K, 11, 256),
    ] {
        let w = weights(format, rows, cols, &mut rng);
        let xs: Vec<f32> = (0..17 * cols).map(|_| rng.f32()).collect();
        for &isa in Isa::available() {
            let alone: Vec<Vec<f32>> = xs
                .chunks_exact(cols)
                .map(|row| {
                    let x = QuantizedRows::new(row, cols).expect("quantize");
                    let mut out = vec![0f32; rows];
                    matmul(format, isa, &w, rows, &x, &mut out).expect("matmul");
                    out
                })
                .collect();
            for m in 1..=17 {
                let x = QuantizedRows::new(&xs[..m * cols], cols).expect("quantize");
                let mut out = vec![0f32; m * rows];
                matmul(format, isa, &w, rows, &x, &mut out).expect("matmul");
                for (i, got) in out.chunks_exact(rows).enumerate() {
                    let same = got.iter().zip(&alone[i]).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{format:?} {isa:?}: row {i} of a batch of {m}");
                }
            }
        }
    }
}

/// The decode arithmetic every int8 kernel shares (AVX2 and VNNI, one row or many): per block
/// the exact integer `P = Σ q·y` (per 16-value half for Q6_K), `acc = fma(s · dy, P, acc)`
/// block after block, the minimums' `m · ys` summed apart, then `acc + mins`.
fn block_decode(format: Format, w: &[u8], x: &QuantizedRows, i: usize) -> f32 {
    let (d, qs) = x.row(i);
    let sums = x.block_sums();
    let nb = x.cols / QK;
    let (mut acc, mut mins) = (0f32, 0f32);
    let mut q = [0i8; QK];
    for b in 0..nb {
        let BlockScale { s, m } = format.sub_block(w, b, &mut q);
        let y = &qs[b * QK..][..QK];
        let half = |h: usize| -> i32 {
            q[16 * h..][..16].iter().zip(&y[16 * h..]).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum()
        };
        if format == Format::Q6K {
            acc = (s[0] * d[b]).mul_add(half(0) as f32, acc);
            acc = (s[1] * d[b]).mul_add(half(1) as f32, acc);
        } else {
            acc = (s[0] * d[b]).mul_add((half(0) + half(1)) as f32, acc);
            if format.has_minimum() {
                mins += m * sums[i * nb + b];
            }
        }
    }
    if format.has_minimum() { acc + mins } else { acc }
}

#[test]
fn the_decode_kernels_round_alike_on_every_int8_isa() {
    let mut rng = Rng(43);
    // Rows not a multiple of 4 (the one-row kernel at the end), up to 9 activation rows (every
    // few-row kernel, the many-row kernels of AVX2 and VNNI, VNNI's pair kernel and AVX2's
    // paired kernel), every block format with an int8 kernel.
    for (format, rows, cols) in [
        (Format::Q4K, 13, 1536),
        (Format::Q6K, 11, 768),
        (Format::Q8_0, 6, 320),
        (Format::Q5_0, 5, 96),
        (Format::Q4_0, 7, 256),
        (Format::Q4_1, 9, 576),
        (Format::Q5_1, 3, 160),
        (Format::Iq4Nl, 5, 256),
        (Format::Iq4Xs, 6, 512),
    ] {
        let w = match format {
            Format::Iq4Nl | Format::Iq4Xs => {
                let (one, _) = ggml_blocks(format);
                // The file's blocks repeated to fill the matrix.
                let bytes = rows * format.row_bytes(cols);
                one.iter().copied().cycle().take(bytes).collect()
            }
            _ => weights(format, rows, cols, &mut rng),
        };
        let row_bytes = format.row_bytes(cols);
        let xs: Vec<f32> = (0..9 * cols).map(|_| rng.f32() - 0.5).collect();
        for m in 1..=9 {
            let x = QuantizedRows::new(&xs[..m * cols], cols).expect("quantize");
            for &isa in Isa::available().iter().filter(|isa| isa.0 != Level::Scalar) {
                let mut out = vec![0f32; m * rows];
                matmul(format, isa, &w, rows, &x, &mut out).expect("matmul");
                for (k, &got) in out.iter().enumerate() {
                    let (i, r) = (k / rows, k % rows);
                    let want = block_decode(format, &w[r * row_bytes..][..row_bytes], &x, i);
                    assert_eq!(got.to_bits(), want.to_bits(), "{format:?} {isa:?}: ({i}, {r}) of {m} rows");
                }
            }
        }
    }
}

/// The batched (prefill) kernels compute every output with the decode kernels' arithmetic, so
/// a prompt's row gets the same bits in a pass of 1 row and in a pass of 300: checked against
/// [`block_decode`] for every format with tiles, weight rows not a multiple of the tile's 16,
/// and activation rows not a multiple of the kernels' 4 or 8.
#[test]
fn the_batched_kernels_round_as_the_decode_kernels() {
    let mut rng = Rng(47);
    for (format, rows, cols) in [
        (Format::Q4K, 21, 512),
        (Format::Q6K, 19, 768),
        (Format::Q8_0, 33, 320),
        (Format::Q5_0, 17, 96),
        (Format::Q4_0, 18, 256),
        (Format::Q4_1, 35, 576),
        (Format::Q5_1, 20, 160),
    ] {
        let w = weights(format, rows, cols, &mut rng);
        let row_bytes = format.row_bytes(cols);
        let xs: Vec<f32> = (0..13 * cols).map(|_| rng.f32() - 0.5).collect();
        let x = QuantizedRows::for_batched(&xs, cols).expect("quantize");
        for &isa in Isa::available().iter().filter(|isa| isa.has_batched_kernel()) {
            let mut out = vec![0f32; 13 * rows];
            matmul_batched(format, isa, &w, rows, &x, &mut out).expect("matmul");
            for (k, &got) in out.iter().enumerate() {
                let (i, r) = (k / rows, k % rows);
                let want = block_decode(format, &w[r * row_bytes..][..row_bytes], &x, i);
                assert_eq!(got.to_bits(), want.to_bits(), "{format:?} {isa:?}: ({i}, {r})");
            }
        }
    }
}

/// The softmax's exponentials: within 2e-7 of `f32::exp` relative (2 ulp), 0 far below the
/// maximum, and the sum as the lanes add them, for lengths with and without a tail.
#[test]
fn span_exponentials_agree_with_exp_on_every_isa() {
    let mut rng = Rng(53);
    for n in [1, 7, 8, 29, 128] {
        let scores: Vec<f32> =
            (0..n).map(|i| if i == 3 { -200.0 } else { rng.f32() * 90.0 - 85.0 }).collect();
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        for &isa in Isa::available() {
            let mut s = scores.clone();
            let sum = super::attention::exp_sum(isa, &mut s, max);
            for (&got, &x) in s.iter().zip(&scores) {
                let want = (x - max).exp();
                let tolerance = if want < f32::MIN_POSITIVE { f32::MIN_POSITIVE } else { 2.4e-7 * want };
                assert!((got - want).abs() <= tolerance, "{isa:?}: e^{} = {got}, not {want}", x - max);
            }
            let want: f64 = s.iter().map(|&e| f64::from(e)).sum();
            assert!((f64::from(sum) - want).abs() < 1e-6 * want, "{isa:?} n {n}: sum {sum} vs {want}");
        }
    }
}

/// SwiGLU's gate: within 4 ulp of the scalar `x / (1 + e^-x) · u` on every instruction set,
/// for lengths with and without a tail, and finite where the exponential would overflow.
#[test]
fn silu_agrees_with_the_scalar_formula_on_every_isa() {
    let mut rng = Rng(59);
    for n in [1, 7, 8, 29, 128] {
        let g: Vec<f32> = (0..n)
            .map(|i| match i {
                3 => -200.0,
                5 => 150.0,
                6 => 0.0,
                _ => rng.f32() * 40.0 - 20.0,
            })
            .collect();
        let u: Vec<f32> = (0..n).map(|_| rng.f32() * 4.0 - 2.0).collect();
        for &isa in Isa::available() {
            let mut got = u.clone();
            super::silu_times(isa, &g, &mut got);
            for ((&got, &x), &y) in got.iter().zip(&g).zip(&u) {
                let want = (f64::from(x) / (1.0 + (-f64::from(x)).exp()) * f64::from(y)) as f32;
                assert!(got.is_finite(), "{isa:?}: silu({x}) · {y} = {got}");
                let tolerance = (4.8e-7 * want.abs()).max(1e-30);
                assert!((got - want).abs() <= tolerance, "{isa:?}: silu({x}) · {y} = {got}, not {want}");
            }
        }
    }
}
