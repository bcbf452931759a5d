use super::*;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};

/// A tiny random model of `arch` (2 layers; Gemma 3 with a window of 3) written to a
/// temporary GGUF file, minus the tensors named in `skip`, plus the optional tensors named
/// in `extra` (`bias`: q/k/v/output biases; `rope_freqs`; `stray`: a tensor no
/// architecture uses).
fn tiny(arch: &str, skip: &[&str], extra: &[&str]) -> tempfile::NamedTempFile {
    let (vocab, embd, heads, kv, hd, ff, layers) = (32usize, 16usize, 2u32, 1u32, 8u32, 24usize, 2usize);
    let gemma = arch == "gemma3";
    let key = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("block_count"), Value::U32(layers as u32)),
        (key("embedding_length"), Value::U32(embd as u32)),
        (key("feed_forward_length"), Value::U32(ff as u32)),
        (key("attention.head_count"), Value::U32(heads)),
        (key("attention.head_count_kv"), Value::U32(kv)),
        (key("attention.key_length"), Value::U32(hd)),
        (key("context_length"), Value::U32(64)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (key("rope.freq_base"), Value::F32(1e4)),
    ];
    if gemma {
        meta.push((key("attention.sliding_window"), Value::U32(3)));
    }
    if extra.contains(&"experts") {
        meta.push((key("expert_count"), Value::U32(8)));
    }
    let dev = Device::Cpu;
    let mut rng = crate::test_support::Rng(1);
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.f32()).collect() };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, data: Vec<f32>| {
        let t = Tensor::from_vec(data, shape, &dev).expect("tensor");
        tensors.push((name, QTensor::quantize(&t, GgmlDType::F32).expect("quantize")));
    };
    add("token_embd.weight".into(), vec![vocab, embd], rand(vocab * embd));
    add("output_norm.weight".into(), vec![embd], vec![1.0; embd]);
    if extra.contains(&"rope_freqs") {
        add("rope_freqs.weight".into(), vec![hd as usize / 2], vec![1.0, 1.0, 4.0, 8.0]);
    }
    if extra.contains(&"stray") {
        add("blk.0.ffn_down.bias".into(), vec![embd], vec![0.0; embd]);
    }
    let (q, k) = (heads as usize * hd as usize, kv as usize * hd as usize);
    for il in 0..layers {
        for (name, shape) in [
            ("attn_q", vec![q, embd]),
            ("attn_k", vec![k, embd]),
            ("attn_v", vec![k, embd]),
            ("attn_output", vec![embd, q]),
            ("ffn_gate", vec![ff, embd]),
            ("ffn_up", vec![ff, embd]),
            ("ffn_down", vec![embd, ff]),
        ] {
            let n = shape.iter().product();
            add(format!("blk.{il}.{name}.weight"), shape, rand(n));
        }
        if extra.contains(&"bias") {
            for (name, n) in [("attn_q", q), ("attn_k", k), ("attn_v", k), ("attn_output", embd)] {
                add(format!("blk.{il}.{name}.bias"), vec![n], rand(n));
            }
        }
        let mut norms = vec![("attn_norm", embd), ("ffn_norm", embd)];
        if gemma {
            norms.extend([
                ("attn_q_norm", hd as usize),
                ("attn_k_norm", hd as usize),
                ("post_attention_norm", embd),
                ("post_ffw_norm", embd),
            ]);
        }
        for (name, n) in norms {
            add(format!("blk.{il}.{name}.weight"), vec![n], vec![1.0; n]);
        }
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        tensors.iter().filter(|(n, _)| !skip.contains(&n.as_str())).map(|(n, t)| (n.as_str(), t)).collect();
    crate::test_support::gguf_file(&meta_refs, &tensor_refs)
}

fn tiny_gemma3(skip: &[&str]) -> tempfile::NamedTempFile {
    tiny("gemma3", skip, &[])
}

fn load(file: &tempfile::NamedTempFile) -> Result<Model> {
    Model::load(&Gguf::open(file.path())?)
}

/// Every architecture, with and without biases and rope frequency factors: feeding one
/// token at a time, or uneven chunks, equals one batch (across Gemma's window of 3).
#[test]
fn one_token_at_a_time_equals_one_batch() {
    for (arch, extra) in [
        ("gemma3", &[][..]),
        ("gemma3", &["bias"][..]),
        ("llama", &[][..]),
        ("llama", &["bias", "rope_freqs"][..]),
    ] {
        let file = tiny(arch, &[], extra);
        let model = load(&file).expect("load");
        let tokens = [2u32, 7, 9, 30, 4, 4, 11, 1, 5];
        let mut batch = model.new_state(64).expect("state");
        let all = model.forward_all(&mut batch, &tokens).expect("batch");
        let row = |i: usize| logits_vec(&all.get(i).expect("row")).expect("vec");
        // f32 weights: the one-row and the several-row float kernels sum in different orders
        // (measured up to 1.4e-4 on logits of a few units).
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 5e-4);
        let mut step = model.new_state(64).expect("state");
        for (i, &t) in tokens.iter().enumerate() {
            let one = logits_vec(&model.forward(&mut step, &[t]).expect("step")).expect("vec");
            let diff = one.iter().zip(&row(i)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(close(&one, &row(i)), "{arch} {extra:?} position {i}: {diff}");
        }
        let mut chunked = model.new_state(64).expect("state");
        model.forward(&mut chunked, &tokens[..4]).expect("chunk");
        let last = logits_vec(&model.forward(&mut chunked, &tokens[4..]).expect("chunk")).expect("vec");
        assert!(close(&last, &row(tokens.len() - 1)), "{arch} {extra:?} in chunks");
    }
}

/// Several sequences in one batch, at different positions and with different numbers of
/// tokens (decode steps next to a prompt), give each sequence the logits it gets alone:
/// every row attends over its own cache and window only.
#[test]
fn a_batch_of_sequences_equals_each_alone() {
    for arch in ["gemma3", "llama"] {
        let file = tiny(arch, &[], &[]);
        let model = load(&file).expect("load");
        let prompts: [&[u32]; 3] = [&[2, 7, 9, 30, 4], &[5, 1], &[11, 3, 3, 8, 20, 6, 2]];
        let next: [&[u32]; 3] = [&[8], &[6, 6, 1, 7], &[9]];
        let alone: Vec<Vec<f32>> = prompts
            .iter()
            .zip(next)
            .map(|(p, n)| {
                let mut state = model.new_state(64).expect("state");
                model.feed(&mut state, p).expect("prompt");
                logits_vec(&model.forward(&mut state, n).expect("next")).expect("vec")
            })
            .collect();
        let mut states: Vec<State> = prompts
            .iter()
            .map(|p| {
                let mut state = model.new_state(64).expect("state");
                model.feed(&mut state, p).expect("prompt");
                state
            })
            .collect();
        let mut segments: Vec<Segment<'_>> =
            states.iter_mut().zip(next).map(|(state, tokens)| Segment { state, tokens }).collect();
        let batch = model.forward_batch(&mut segments).expect("batch");
        for (i, want) in alone.iter().enumerate() {
            let got = logits_vec(&batch.get(i).expect("row")).expect("vec");
            let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "{arch}: sequence {i} differs by {diff}");
        }
        for (state, (p, n)) in states.iter().zip(prompts.iter().zip(next)) {
            assert_eq!(state.len(), p.len() + n.len());
        }
    }
}

/// A state forked from another's first positions continues exactly as if it had been fed
/// those tokens itself.
#[test]
fn a_forked_prefix_equals_feeding_it() {
    for arch in ["gemma3", "llama"] {
        let file = tiny(arch, &[], &[]);
        let model = load(&file).expect("load");
        let (prefix, rest) = ([2u32, 7, 9, 30, 4, 4], [11u32, 1, 5]);
        let mut fed = model.new_state(64).expect("state");
        model.feed(&mut fed, &prefix[..4]).expect("prefix");
        let want = logits_vec(&model.forward(&mut fed, &rest).expect("rest")).expect("vec");
        let mut base = model.new_state(64).expect("state");
        model.feed(&mut base, &prefix).expect("longer prefix");
        // Only the first four positions are taken from `base`.
        let mut forked = model.fork(&base, 4, 64, 8).expect("fork");
        assert_eq!(forked.len(), 4);
        let got = logits_vec(&model.forward(&mut forked, &rest).expect("rest")).expect("vec");
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "{arch}: {diff}");
    }
}

/// Keys and values written out in ranges and read back one after the other continue exactly as
/// the original state.
#[test]
fn exported_ranges_import_exactly() {
    let file = tiny("llama", &[], &[]);
    let model = load(&file).expect("load");
    let mut state = model.new_state(64).expect("state");
    model.feed(&mut state, &[2, 7, 9, 30, 4, 4]).expect("prompt");
    let export = |range| model.export_range(&state, range).expect("export");
    let (head, tail) = (export(0..2), export(2..6));
    assert_eq!(head.len(), model.prefix_bytes(2));
    assert_eq!(tail.len(), model.prefix_bytes(4));
    let mut back = model.new_state(64).expect("state");
    model.import_range(&mut back, &head, 2, 2).expect("import");
    model.import_range(&mut back, &tail, 4, 3).expect("import");
    assert_eq!(back.len(), 5);
    let mut fed = model.new_state(64).expect("state");
    model.feed(&mut fed, &[2, 7, 9, 30, 4]).expect("prompt");
    let want = logits_vec(&model.forward(&mut fed, &[4, 11]).expect("forward")).expect("vec");
    let got = logits_vec(&model.forward(&mut back, &[4, 11]).expect("forward")).expect("vec");
    assert_eq!(got, want);
    assert!(model.import_range(&mut back, &tail[1..], 4, 3).is_err(), "a wrong size is refused");
    let mut small = model.new_state(3).expect("state");
    assert!(model.import_range(&mut small, &tail, 4, 4).is_err(), "more than the context is refused");
}

/// A sliding-window layer's ring gives every step the bits a whole cache gives, through
/// prefill batches wider than its slack (the ring widens), single steps, a rollback within
/// the slack and a fork, while holding only the window and the slack; going back
/// further, or giving out positions it no longer holds, is refused.
#[test]
fn a_ring_computes_what_a_whole_cache_computes() {
    use crate::synthetic::{Spec, write_file};
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("mini.gguf");
    write_file(&Spec::mini("gemma3"), &path).expect("write"); // windows of 16, one global layer
    let model = Model::load(&Gguf::open(&path).expect("open")).expect("load");
    let window = 16;
    let mut ring = model.state_with_slack(1024, 2);
    let mut whole = model.state_with_slack(1024, 1 << 20);
    let tokens: Vec<u32> = (0..400).map(|i| 3 + (i * 7 + i / 5) % 200).collect();
    let step = |ring: &mut State, whole: &mut State, fed: &[u32]| {
        let a = logits_vec(&model.forward(ring, fed).expect("ring")).expect("vec");
        let b = logits_vec(&model.forward(whole, fed).expect("whole")).expect("vec");
        assert_eq!(a, b, "at {} after {} rows", whole.len(), fed.len());
    };
    // Batches past the row kernels' limit, a short one, then single steps.
    let rows = crate::weights::batch_rows_min().max(8);
    let mut at = 0;
    for n in [rows, rows + 5, 4, rows, 3 * rows, 2 * rows] {
        step(&mut ring, &mut whole, &tokens[at..at + n]);
        at += n;
    }
    for t in &tokens[at..at + 10] {
        step(&mut ring, &mut whole, std::slice::from_ref(t));
    }
    at += 10;
    let rings = || ring.cache.iter().filter(|l| l.window.is_some());
    assert!(rings().all(|l| l.capacity == window + 3 * rows), "the window and the widest pass");
    assert!(ring.lost > 0, "the ring has wrapped");
    // Two rejected rows, rolled back.
    step(&mut ring, &mut whole, &[5, 6]);
    for state in [&mut ring, &mut whole] {
        state.truncate(at).expect("a rollback within the slack");
    }
    step(&mut ring, &mut whole, &tokens[at..at + 2]);
    at += 2;
    // The earliest position to go back to: its window's start still held.
    let gone = ring.lost;
    let earliest = gone + window - 1;
    assert!(earliest < at && ring.can_truncate(earliest));
    assert!(ring.truncate(earliest - 1).is_err(), "a ring cannot go back past what it holds");
    assert!(model.export_range(&ring, gone - 1..at).is_err(), "nor give out positions it lost");
    assert!(model.export_range(&ring, gone..at).is_ok());
    assert!(model.fork(&ring, earliest - 1, 1024, 0).is_err(), "nor fork there");
    let mut forked = model.fork(&ring, at, 1024, 0).expect("fork at the end");
    step(&mut forked, &mut whole, &tokens[at..at + 3]);
}

#[test]
fn a_full_context_and_bad_tokens_are_errors() {
    let file = tiny_gemma3(&[]);
    let model = load(&file).expect("load");
    let mut state = model.new_state(4).expect("state");
    model.forward(&mut state, &[1, 2, 3]).expect("fits");
    let Err(err) = model.forward(&mut state, &[1, 2]) else { panic!("the context should be full") };
    assert!(err.to_string().contains("context is full"), "{err}");
    let mut state = model.new_state(4).expect("state");
    let Err(err) = model.forward(&mut state, &[99]) else { panic!("token 99 is out of range") };
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn a_missing_tensor_is_named() {
    let file = tiny_gemma3(&["blk.1.ffn_up.weight"]);
    let Err(err) = load(&file) else { panic!("a missing tensor must fail the load") };
    assert!(format!("{err:#}").contains("blk.1.ffn_up.weight"), "{err:#}");
}

/// The optional tensors change the result (so they are really applied).
#[test]
fn biases_and_rope_factors_are_applied() {
    let tokens = [3u32, 1, 4, 1, 5, 9, 2, 6];
    let logits = |extra: &[&str]| {
        let file = tiny("llama", &[], extra);
        let model = load(&file).expect("load");
        let mut state = model.new_state(64).expect("state");
        logits_vec(&model.forward(&mut state, &tokens).expect("forward")).expect("vec")
    };
    let plain = logits(&[]);
    for extra in [&["bias"][..], &["rope_freqs"][..]] {
        let other = logits(extra);
        let diff = plain.iter().zip(&other).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff > 1e-3, "{extra:?} made no difference");
    }
}

/// llama's adjacent-pair rope on rows permuted as llama.cpp's converter permutes Q and K
/// equals the half-split rope on the original rows: the identity `llama` files rely on.
#[test]
fn adjacent_pair_rope_on_permuted_rows_equals_half_split_rope() {
    let file = tiny("llama", &[], &[]);
    let gguf = Gguf::open(file.path()).expect("open");
    let mut cfg = Config::from_gguf(&gguf).expect("config");
    let (heads, hd, seq) = (3, cfg.head_dim, 5);
    let x: Vec<f32> = (0..seq * heads * hd).map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0).collect();
    // The converter's permute: new row (h, i, j) comes from old row (h, j, i), i < hd/2, j < 2.
    let permute = |v: &[f32]| -> Vec<f32> {
        let mut out = vec![0f32; v.len()];
        for (src, dst) in v.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    dst[2 * i + j] = src[j * hd / 2 + i];
                }
            }
        }
        out
    };
    cfg.rope_style = RopeStyle::Neox;
    let mut neox = x.clone();
    Rope::new(&cfg, 1e4, 1.0, None, &[(7, seq)]).apply(&mut neox, heads);
    cfg.rope_style = RopeStyle::Norm;
    let mut norm = permute(&x);
    Rope::new(&cfg, 1e4, 1.0, None, &[(7, seq)]).apply(&mut norm, heads);
    let want = permute(&neox);
    for (a, b) in norm.iter().zip(&want) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    assert!(neox != x, "the rotation must change the values");
}

#[test]
fn unknown_tensors_and_architectures_are_refused() {
    let file = tiny("llama", &[], &["stray"]);
    let Err(err) = load(&file) else { panic!("a stray tensor must fail the load") };
    assert!(format!("{err:#}").contains("blk.0.ffn_down.bias"), "{err:#}");
    let file = tiny("mamba\u{1b}[2J", &[], &[]);
    let Err(err) = load(&file) else { panic!("an unknown architecture must fail") };
    let msg = format!("{err:#}");
    assert!(msg.contains("unsupported model architecture") && !msg.contains('\u{1b}'), "{msg}");
    // Mixture-of-experts and hybrid families by name, and experts under a dense name.
    for arch in ["qwen3moe", "qwen35", "gemma3n"] {
        let file = tiny(arch, &[], &[]);
        let Err(err) = load(&file) else { panic!("{arch} must be refused") };
        assert!(format!("{err:#}").contains(&format!("architecture '{arch}'")), "{err:#}");
    }
    let file = tiny("llama", &[], &["experts"]);
    let Err(err) = load(&file) else { panic!("experts must be refused") };
    assert!(format!("{err:#}").contains("mixture-of-experts"), "{err:#}");
}

/// The Gemma 2 and Gemma 3 miniatures (windows of 16, Gemma 3 with a global layer) with their
/// real ring slack: after a prompt three rings long, fed in prefill batches, and a few steps,
/// the logits are the bits of a cache that keeps everything, and the rings hold 592 positions.
#[test]
fn the_gemma_miniatures_rings_compute_what_whole_caches_compute() {
    use crate::synthetic::{Spec, write_file};
    for arch in ["gemma2", "gemma3"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("mini.gguf");
        write_file(&Spec::mini(arch), &path).expect("write");
        let model = Model::load(&Gguf::open(&path).expect("open")).expect("load");
        let mut ring = model.new_state(4096).expect("state");
        let mut whole = model.state_with_slack(4096, 1 << 20);
        let prompt: Vec<u32> = (0..1600u32).map(|i| 3 + (i * 37 + i / 7) % 200).collect();
        let a = crate::generate::prefill(&model, &mut ring, &prompt).expect("ring");
        let b = crate::generate::prefill(&model, &mut whole, &prompt).expect("whole");
        assert_eq!(a, b, "{arch}: after the prompt");
        for t in [5u32, 9, 77, 12] {
            let a = logits_vec(&model.forward(&mut ring, &[t]).expect("ring")).expect("vec");
            let b = logits_vec(&model.forward(&mut whole, &[t]).expect("whole")).expect("vec");
            assert_eq!(a, b, "{arch}: at {}", whole.len());
        }
        let caps: Vec<usize> = ring.cache.iter().map(|l| l.capacity).collect();
        let local = model.layers.iter().zip(&caps).filter(|(l, _)| l.window.is_some());
        assert!(
            local.clone().count() > 0 && local.clone().all(|(_, &c)| c == 16 + kv_cache::RING_SLACK),
            "{arch}: {caps:?}"
        );
        assert!(ring.lost > 0, "{arch}: the rings wrapped");
    }
}

/// Issue 24's guarantee, model by model: a prompt's logits are a function of its own tokens
/// only. The miniature of every family, in int8 formats (Q8_0, and llama.cpp's Q4_K_M recipe
/// for two), gives every position the same bits fed as one pass, one token at a time, in
/// uneven passes on either side of the batched kernels' row minimum, and beside another
/// sequence in a batch. (On CPUs with AVX2, where the batched kernels compute each row as the
/// decode kernels do.)
#[test]
fn every_family_gives_a_prompt_the_same_bits_however_it_is_fed() {
    use crate::synthetic::{Spec, Weights, write_file};
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cases: Vec<(&str, Weights)> = ["gemma3", "gemma2", "llama", "qwen2", "qwen3", "phi3", "granite"]
        .map(|a| (a, Weights::All(GgmlDType::Q8_0)))
        .to_vec();
    cases.extend([("gemma3", Weights::Q4KM), ("qwen2", Weights::Q4KM)]);
    let tokens: Vec<u32> = (0..70).map(|i| 3 + (i * 7 + i / 3) % 200).collect();
    for (arch, weights) in cases {
        let path = dir.path().join(format!("{arch}-{weights:?}.gguf"));
        let mut spec = Spec::mini(arch);
        spec.weights = weights;
        write_file(&spec, &path).expect("write");
        let model = Model::load(&Gguf::open(&path).expect("open")).expect("load");
        let what = format!("{arch} {weights:?}");
        let mut state = model.new_state(256).expect("state");
        let whole = model.forward_all(&mut state, &tokens).expect("one pass");
        let row = |i: usize| logits_vec(&whole.get(i).expect("row")).expect("vec");
        let mut state = model.new_state(256).expect("state");
        for (i, t) in tokens.iter().enumerate() {
            let step =
                logits_vec(&model.forward(&mut state, std::slice::from_ref(t)).expect("step")).expect("vec");
            assert!(step == row(i), "{what}: position {i} one token at a time");
        }
        let mut state = model.new_state(256).expect("state");
        let mut end = 0;
        for n in [1, 20, 3, 15, 17, 14] {
            end += n;
            let pass =
                logits_vec(&model.forward(&mut state, &tokens[end - n..end]).expect("pass")).expect("vec");
            assert!(pass == row(end - 1), "{what}: position {} at the end of a pass of {n}", end - 1);
        }
        let (mut other, mut state) =
            (model.new_state(256).expect("state"), model.new_state(256).expect("state"));
        model.feed(&mut other, &tokens[30..40]).expect("other");
        let mut segments = [
            Segment { state: &mut other, tokens: &tokens[..9] },
            Segment { state: &mut state, tokens: &tokens[..] },
        ];
        let batch = model.forward_batch(&mut segments).expect("batch");
        let beside = logits_vec(&batch.get(1).expect("row")).expect("vec");
        assert!(beside == row(tokens.len() - 1), "{what}: beside another sequence");
    }
}
