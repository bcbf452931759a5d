//! Hostile but fair input: absurd flags and crafted model files get a clear one-line error (or
//! a clamp with a warning), never a panic, a hang or a terminal taken over.

use std::process::{Output, Stdio};

use candle_core::quantized::gguf_file::{Value, write};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::support::{streamgen, test_model_smollm2};

fn run(model: &std::path::Path, args: &[&str]) -> Output {
    let home = tempfile::tempdir().expect("tempdir");
    let mut cmd = streamgen(home.path());
    cmd.arg("-m").arg(model).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.output().expect("run streamgen")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

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
    let out = run(&test_model_smollm2(), &["-t", "1000", "--raw", "-n", "2", "--temperature", "0", "Hi"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("--threads 1000 is more than the"), "{}", stderr(&out));
}

#[test]
fn nan_and_out_of_range_sampling_flags_are_usage_errors() {
    for arg in ["--temperature=nan", "--top-p=2", "--min-p=inf", "--repeat-penalty=-1"] {
        let out = run(&test_model_smollm2(), &[arg, "Hi"]);
        assert_eq!(out.status.code(), Some(2), "{arg}: {}", stderr(&out));
    }
}

#[test]
fn a_hostile_architecture_name_cannot_reach_the_terminal() {
    let file = gguf_file(&[("general.architecture", Value::String("evil\x1b]0;owned\x07\x1b[2J".into()))]);
    let out = run(file.path(), &["Hi"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.contains("unsupported model architecture"), "{err:?}");
    assert!(!err.trim_end().chars().any(|c| c.is_control()), "control characters in {err:?}");
}
