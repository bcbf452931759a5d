//! Hostile but fair input: absurd flags and crafted model files get a clear one-line error (or
//! a clamp with a warning), never a panic, a hang or a terminal taken over.

use candle_core::quantized::gguf_file::{Value, write};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::support::{streamgen, test_model_smollm2};

/// A GGUF file with the given metadata and one small tensor.
fn gguf_file(meta: &[(&str, Value)]) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    let t = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).expect("tensor");
    let q = QTensor::quantize(&t, GgmlDType::F32).expect("quantize");
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    write(&mut file.reopen().expect("reopen"), &meta, &[("token_embd.weight", &q)]).expect("write");
    file
}

#[test]
fn more_threads_than_cpus_are_clamped_with_a_warning() {
    let out = streamgen()
        .model(test_model_smollm2())
        .args(["-t", "1000", "--raw", "-n", "2", "--temperature", "0", "Hi"])
        .run();
    assert!(out.success(), "{}", out.stderr());
    assert!(out.stderr().contains("--threads 1000 is more than the"), "{}", out.stderr());
}

#[test]
fn nan_and_out_of_range_sampling_flags_are_usage_errors() {
    for arg in ["--temperature=nan", "--top-p=2", "--min-p=inf", "--repeat-penalty=-1"] {
        let out = streamgen().model(test_model_smollm2()).args([arg, "Hi"]).run();
        assert_eq!(out.code(), Some(2), "{arg}: {}", out.stderr());
    }
}

#[test]
fn a_hostile_architecture_name_cannot_reach_the_terminal() {
    let file = gguf_file(&[("general.architecture", Value::String("evil\x1b]0;owned\x07\x1b[2J".into()))]);
    let out = streamgen().model(file.path()).arg("Hi").run();
    assert_eq!(out.code(), Some(1));
    let err = out.stderr();
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.contains("unsupported model architecture"), "{err:?}");
    assert!(!err.trim_end().chars().any(|c| c.is_control()), "control characters in {err:?}");
}

/// Writes `bytes` of `unit` repeated to the child's stdin on a thread (a closed pipe ends it).
fn feed(child: &mut std::process::Child, unit: &'static [u8], bytes: usize) -> std::thread::JoinHandle<()> {
    let mut stdin = child.stdin.take().expect("stdin");
    std::thread::spawn(move || {
        use std::io::Write;
        let block = unit.repeat((1 << 20) / unit.len());
        let mut sent = 0;
        while sent < bytes {
            let n = block.len().min(bytes - sent);
            if stdin.write_all(&block[..n]).is_err() {
                return;
            }
            sent += n;
        }
    })
}

#[test]
fn a_prompt_that_cannot_fit_the_context_is_refused_before_tokenizing() {
    // 20 MiB of words: SmolLM2's 8,192-token context cannot hold it whatever the tokens.
    let mut child = streamgen().model(test_model_smollm2()).args(["-n", "1"]).stdin_piped().spawn();
    let writer = feed(&mut child, b"lorem ipsum dolor sit amet ", 20 << 20);
    let out = child.finish();
    writer.join().expect("writer");
    assert_eq!(out.code(), Some(1), "{}", out.stderr());
    assert!(out.stderr().contains("more than a context of 8192 tokens can hold"), "{}", out.stderr());
}

#[test]
fn endless_stdin_is_cut_off_not_read_into_memory() {
    let mut child = streamgen().model(test_model_smollm2()).args(["-n", "1"]).stdin_piped().spawn();
    let writer = feed(&mut child, b"x", 300 << 20);
    let out = child.finish();
    writer.join().expect("writer");
    assert_eq!(out.code(), Some(2), "{}", out.stderr());
    assert!(out.stderr().contains("larger than 256 MiB"), "{}", out.stderr());
}

/// Ctrl-C during a long prefill stops it between batches: the run ends as interrupted with no
/// token generated (before, the whole prefill ran and one token was sampled first).
#[test]
fn ctrl_c_during_prefill_stops_between_batches() {
    use std::io::{BufRead, BufReader, Read};
    let mut child = streamgen()
        .model(crate::support::test_model())
        .args(["--raw", "--json", "--verbose-prompt", "--temperature", "0", "-n", "50", "--ctx-size", "8192"])
        .stdin_piped()
        .spawn();
    // About 6,000 tokens: seconds of prefill on this machine.
    let writer = feed(&mut child, b"The keeper wrote down the wind and the swell. ", 30 << 10);
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    // The token ids are printed just before generation starts.
    let mut line = String::new();
    while !line.contains("prompt token ids") {
        line.clear();
        assert!(err.read_line(&mut line).expect("read stderr") > 0, "streamgen ended before generating");
    }
    child.interrupt();
    let mut rest = String::new();
    err.read_to_string(&mut rest).expect("stderr");
    let out = child.finish();
    writer.join().expect("writer");
    assert_eq!(out.code(), Some(130), "{rest}");
    let stdout = String::from_utf8_lossy(out.stdout_bytes());
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a summary")).expect("json");
    assert_eq!(last["finish_reason"], "interrupted", "{stdout}");
    assert_eq!(last["generated_tokens"], 0, "{stdout}");
}

fn template_file(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("template.jinja");
    std::fs::write(&path, text).expect("write template");
    path.display().to_string()
}

#[test]
fn a_runaway_chat_template_is_stopped_by_its_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (template, why) in [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
            "steps of work",
        ),
        ("{% set x = 'a' * 1000000 %}{% for i in range(100000) %}{{ x }}{% endfor %}", "output passed"),
    ] {
        let path = template_file(&dir, template);
        let out =
            streamgen().model(test_model_smollm2()).args(["--chat-template", &path, "-n", "1", "Hi"]).run();
        assert_eq!(out.code(), Some(1), "{template}: {}", out.stderr());
        assert!(out.stderr().contains(why), "{template}: {}", out.stderr());
        assert_eq!(out.stderr().lines().count(), 1, "{}", out.stderr());
    }
}

#[test]
fn a_chat_template_that_is_not_a_regular_file_is_refused_without_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(status.success());
    for path in [fifo.display().to_string(), "/dev/zero".to_string()] {
        let out =
            streamgen().model(test_model_smollm2()).args(["--chat-template", &path, "-n", "1", "Hi"]).run();
        assert_eq!(out.code(), Some(1), "{path}: {}", out.stderr());
        assert!(out.stderr().contains("not a regular file"), "{path}: {}", out.stderr());
    }
}

/// SmolLM2 with its chat template replaced by `template`, in a temporary file.
fn smollm2_with_template(template: &str) -> tempfile::NamedTempFile {
    use candle_core::quantized::gguf_file::Content;
    let src_path = test_model_smollm2();
    let mut src = std::fs::File::open(&src_path).expect("open SmolLM2");
    let content = Content::read(&mut src).expect("read SmolLM2");
    let mut meta: Vec<(String, Value)> =
        content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for (k, v) in &mut meta {
        if k == "tokenizer.chat_template" {
            *v = Value::String(template.to_string());
        }
    }
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .iter()
        .map(|n| ((*n).clone(), content.tensor(&mut src, n, &Device::Cpu).expect("tensor")))
        .collect();
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write(&mut file.reopen().expect("reopen"), &meta_refs, &tensor_refs).expect("write");
    file
}

/// A broken template inside the model file fails only the runs that use it: `--raw` and the
/// `--chat-template` override its own error message recommends still work.
#[test]
fn a_broken_embedded_template_does_not_stop_raw_or_an_override() {
    let file = smollm2_with_template("{% for %}");
    let out = streamgen().model(file.path()).args(["-n", "2", "Hi"]).run();
    assert_eq!(out.code(), Some(1), "{}", out.stderr());
    assert!(out.stderr().contains("--raw"), "{}", out.stderr());
    for args in [&["--raw"][..], &["--chat-template", "chatml"][..]] {
        let out =
            streamgen().model(file.path()).args(args).args(["-n", "2", "--temperature", "0", "Hi"]).run();
        assert!(out.success(), "{args:?}: {}", out.stderr());
        assert!(!out.stdout_bytes().is_empty(), "{args:?}");
    }
}

/// A model file truncated while streamgen reads it: one error line and exit 1, not a SIGBUS
/// death.
#[test]
fn a_model_file_truncated_while_in_use_is_a_clean_error() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("model.gguf");
    std::fs::copy(test_model_smollm2(), &copy).expect("copy the model");
    let mut child = streamgen()
        .model(&copy)
        .args(["--raw", "-n", "100000", "--temperature", "0", "Count to a million:"])
        .spawn();
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).expect("the first byte");
    std::fs::OpenOptions::new().write(true).open(&copy).expect("open").set_len(4096).expect("truncate");
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest);
    let out = child.finish();
    assert_eq!(out.code(), Some(1), "{}", out.stderr());
    assert!(out.stderr().contains("truncated or replaced while in use"), "{}", out.stderr());
}

/// A GGUF v3 file written byte by byte, so that a test can put any value anywhere (candle's
/// writer only writes valid files).
struct Raw(Vec<u8>);

/// ggml type ids used below.
const F32: u32 = 0;
/// A type streamgen does not read (IQ4_XS, 23, it does).
const IQ2_XXS: u32 = 16;

impl Raw {
    /// The header: magic, version 3, tensor and metadata counts.
    fn new(tensors: u64, kvs: u64) -> Self {
        Self(b"GGUF".to_vec()).u32(3).u64(tensors).u64(kvs)
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(self, s: &str) -> Self {
        let mut r = self.u64(s.len() as u64);
        r.0.extend_from_slice(s.as_bytes());
        r
    }
    fn kv_u32(self, key: &str, v: u32) -> Self {
        self.str(key).u32(4).u32(v)
    }
    fn kv_f32(self, key: &str, v: f32) -> Self {
        self.str(key).u32(6).u32(v.to_bits())
    }
    fn kv_str(self, key: &str, v: &str) -> Self {
        self.str(key).u32(8).str(v)
    }
    /// A tensor info; `dims` innermost first, as in the file.
    fn tensor(self, name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> Self {
        let mut r = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(ggml_type).u64(offset)
    }
    /// Zeros up to the next multiple of `align`, then `data` zero bytes.
    fn data(mut self, align: usize, data: usize) -> Self {
        let n = self.0.len().next_multiple_of(align) + data;
        self.0.resize(n, 0);
        self
    }
    fn file(&self) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(file.path(), &self.0).expect("write");
        file
    }
}

/// The metadata of a one-layer llama small enough to be built by hand (7 keys), so that a
/// crafted file gets past the configuration to the tensors.
fn llama_meta(r: Raw, block_count: u32) -> Raw {
    r.kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", block_count)
        .kv_u32("llama.embedding_length", 32)
        .kv_u32("llama.attention.head_count", 1)
        .kv_u32("llama.feed_forward_length", 32)
        .kv_u32("llama.context_length", 64)
        .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
}

/// Runs streamgen on `file` and checks that it was refused the way bad input must be: exit
/// code 1, one line on stderr starting `streamgen: error: `, containing `want`.
fn assert_refused(file: &Raw, want: &str) {
    let f = file.file();
    let out = streamgen().model(f.path()).arg("Hi").run();
    let err = out.stderr();
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(out.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.starts_with("streamgen: error: "), "{err:?}");
    assert!(err.contains(want), "expected {want:?} in {err:?}");
}

#[test]
fn hardening_zero_alignment_is_refused() {
    let file = Raw::new(1, 1)
        .kv_u32("general.alignment", 0)
        .tensor("token_embd.weight", &[32, 4], F32, 0)
        .data(32, 512);
    assert_refused(&file, "general.alignment = 0 is not a power of two");
}

#[test]
fn hardening_alignment_that_is_not_a_power_of_two_is_refused() {
    let file = Raw::new(1, 1)
        .kv_u32("general.alignment", 24)
        .tensor("token_embd.weight", &[32, 4], F32, 0)
        .data(24, 512);
    assert_refused(&file, "general.alignment = 24 is not a power of two");
}

#[test]
fn hardening_a_tensor_without_dimensions_is_refused() {
    let file = llama_meta(Raw::new(1, 7), 1).tensor("token_embd.weight", &[], F32, 0).data(32, 32);
    assert_refused(&file, "tensor token_embd.weight has no dimensions");
}

#[test]
fn hardening_a_dimension_of_zero_is_refused() {
    let file = llama_meta(Raw::new(1, 7), 1).tensor("token_embd.weight", &[32, 0], F32, 0).data(32, 32);
    assert_refused(&file, "tensor token_embd.weight has a dimension of 0");
}

#[test]
fn hardening_more_than_four_dimensions_are_refused() {
    let file = Raw::new(1, 0).tensor("token_embd.weight", &[1, 1, 1, 1, 1], F32, 0).data(32, 32);
    assert_refused(&file, "tensor token_embd.weight has 5 dimensions");
}

#[test]
fn hardening_a_size_that_wraps_past_2_64_is_refused() {
    // 32 × 2^59 f32s are 2^66 bytes: 0 modulo 2^64, so an unchecked product passes any bounds
    // check.
    let file =
        llama_meta(Raw::new(1, 7), 1).tensor("token_embd.weight", &[32, 1 << 59], F32, 0).data(32, 512);
    assert_refused(&file, "F32) is larger than the file");
}

#[test]
fn hardening_an_offset_that_wraps_is_refused() {
    // tensor_data_offset + offset wraps to the start of the file: the header would be read
    // as weights.
    let file = llama_meta(Raw::new(1, 7), 1)
        .tensor("token_embd.weight", &[32, 4], F32, 0u64.wrapping_sub(256))
        .data(32, 512);
    assert_refused(&file, "tensor token_embd.weight runs past the end of the file");
}

#[test]
fn hardening_a_header_whose_counts_cannot_fit_is_refused() {
    let full = llama_meta(Raw::new(1, 7), 1).tensor("token_embd.weight", &[32, 4], F32, 0).data(32, 512);
    assert_refused(
        &Raw(full.0[..60].to_vec()),
        "1 tensors and 7 metadata entries, more than a file of 60 bytes",
    );
    assert_refused(&Raw::new(1 << 40, 0), "1099511627776 tensors");
}

#[test]
fn hardening_data_past_the_end_of_the_file_is_refused() {
    let file = Raw::new(1, 0).tensor("token_embd.weight", &[32, 4], F32, 0).data(32, 500);
    assert_refused(&file, "tensor token_embd.weight runs past the end of the file");
}

#[test]
fn hardening_overlapping_tensors_are_refused() {
    let file = Raw::new(2, 0)
        .tensor("token_embd.weight", &[32, 4], F32, 0)
        .tensor("output_norm.weight", &[32], F32, 256)
        .data(32, 512);
    assert_refused(&file, "overlap");
}

#[test]
fn hardening_duplicate_tensor_names_are_refused() {
    let file = Raw::new(2, 0)
        .tensor("token_embd.weight", &[32, 4], F32, 0)
        .tensor("token_embd.weight", &[32, 4], F32, 512)
        .data(32, 1024);
    assert_refused(&file, "tensor token_embd.weight appears twice");
}

#[test]
fn hardening_duplicate_metadata_keys_are_refused() {
    let file = Raw::new(0, 2).kv_str("general.architecture", "llama").kv_str("general.architecture", "evil");
    assert_refused(&file, "metadata key general.architecture appears twice");
}

#[test]
fn hardening_an_unknown_tensor_type_names_the_tensor_and_type() {
    let file = Raw::new(1, 0).tensor("blk.0.attn_q.weight", &[256, 4], IQ2_XXS, 0).data(32, 1024);
    assert_refused(
        &file,
        "tensor blk.0.attn_q.weight is IQ2_XXS (type 16), which streamgen does not read yet",
    );
}

#[test]
fn hardening_an_unknown_value_type_names_the_key() {
    let file = Raw::new(0, 1).str("general.name").u32(13).u32(0);
    assert_refused(&file, "metadata key general.name has unknown value type 13");
}

#[test]
fn hardening_a_huge_string_length_is_refused_without_allocating() {
    let file = Raw::new(0, 1).str("general.name").u32(8).u64(1 << 62);
    assert_refused(&file, "string of 4611686018427387904 bytes");
}

#[test]
fn hardening_a_huge_array_is_refused_without_allocating() {
    let file = Raw::new(0, 1).str("tokenizer.ggml.scores").u32(9).u32(6).u64(1 << 40);
    assert_refused(&file, "array of 1099511627776 elements");
}

#[test]
fn hardening_a_file_truncated_in_the_metadata_is_refused() {
    let full = llama_meta(Raw::new(1, 7), 1).tensor("token_embd.weight", &[32, 4], F32, 0).data(32, 512);
    // Long enough for the counts (a shorter cut fails on them), inside the fifth entry.
    let cut = Raw(full.0[..200].to_vec());
    assert_refused(&cut, "the metadata is truncated");
}

#[test]
fn hardening_a_file_truncated_in_the_tensor_table_is_refused() {
    let meta = llama_meta(Raw::new(1, 7), 1);
    let at = meta.0.len() + 20;
    let full = meta.tensor("token_embd.weight", &[32, 4], F32, 0).data(32, 512);
    let cut = Raw(full.0[..at].to_vec());
    assert_refused(&cut, "the tensor table is truncated");
}

#[test]
fn hardening_a_block_count_beyond_the_tensors_is_refused_before_allocating() {
    let file =
        llama_meta(Raw::new(1, 7), 1 << 24).tensor("token_embd.weight", &[32, 4], F32, 0).data(32, 512);
    assert_refused(&file, "llama.block_count = 16777216");
}

#[test]
fn hardening_a_row_that_is_not_whole_blocks_is_refused() {
    const Q4_0: u32 = 2;
    let file = Raw::new(1, 0).tensor("token_embd.weight", &[16, 4], Q4_0, 0).data(32, 512);
    assert_refused(
        &file,
        "tensor token_embd.weight has rows of 16 values, not a whole number of Q4_0 blocks",
    );
}

/// The header reader agrees with candle's on real files from several writers: the two test
/// models and llama.cpp's vocabulary files (metadata only, no tensors).
#[test]
fn hardening_the_header_reader_agrees_with_candles_on_real_files() {
    use candle_core::quantized::gguf_file::Content;
    let mut paths = vec![crate::support::test_model(), test_model_smollm2()];
    let vocab = crate::support::test_vocab_dir();
    for entry in std::fs::read_dir(&vocab).expect("vocab dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "gguf") {
            paths.push(path);
        }
    }
    assert!(paths.len() > 10, "only {} files", paths.len());
    for path in paths {
        let ours = streamgen::gguf::Gguf::open(&path).expect("open");
        let ours = ours.content();
        let theirs = Content::read(&mut std::fs::File::open(&path).expect("open")).expect("candle");
        let name = path.display();
        assert_eq!(ours.tensor_data_offset, theirs.tensor_data_offset, "{name}");
        let sorted = |m: &std::collections::HashMap<String, Value>| {
            let mut v: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {v:?}")).collect();
            v.sort();
            v
        };
        assert!(sorted(&ours.metadata) == sorted(&theirs.metadata), "{name}: metadata differs");
        assert_eq!(ours.tensor_infos.len(), theirs.tensor_infos.len(), "{name}");
        for (k, t) in &theirs.tensor_infos {
            let o = &ours.tensor_infos[k];
            assert_eq!(
                (o.ggml_dtype, o.shape.dims(), o.offset),
                (t.ggml_dtype, t.shape.dims(), t.offset),
                "{name}: {k}"
            );
        }
    }
}

/// `STREAMGEN_KERNELS` caps our kernels' instruction set; a value it does not know is a
/// one-line error, and the portable kernels give the answer the best ones give (greedy, on
/// the test model's clear first steps; the sixth token is a near tie that summation order flips).
#[test]
fn the_kernels_switch_is_checked_and_the_portable_path_agrees() {
    let model = test_model_smollm2();
    let run = |kernels: &str| {
        streamgen()
            .env("STREAMGEN_KERNELS", kernels)
            .model(&model)
            .args(["--raw", "-n", "3", "--temperature", "0", "The capital of France is"])
            .run()
    };
    let bad = run("sse9");
    assert!(!bad.success() && bad.stdout_bytes().is_empty(), "{bad:?}");
    let err = bad.stderr();
    assert!(err.contains("STREAMGEN_KERNELS") && err.lines().count() == 1, "{err}");
    let best = run("avx512");
    let portable = run("portable");
    assert!(best.success() && portable.success(), "{best:?} {portable:?}");
    assert!(!best.stdout_bytes().is_empty());
    assert_eq!(best.stdout_bytes(), portable.stdout_bytes());
}
