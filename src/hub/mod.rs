//! Where the weights come from: the only module that touches the network. It turns a model
//! spec (`-m/--model`, `STREAMGEN_MODEL`, or [`DEFAULT_MODEL`]) into a local `.gguf` path,
//! downloading the file into the Hugging Face cache on first use.
//!
//! The cache is byte-compatible with Python's `huggingface_hub`, so either tool reuses what the
//! other downloaded: `models--{owner}--{repo}/blobs/{etag}` holds the bytes,
//! `snapshots/{commit}/{file}` is a relative symlink to the blob, `refs/{revision}` holds the
//! commit, partial downloads are `blobs/{etag}.incomplete` and the lock is
//! `.locks/models--{owner}--{repo}/{etag}.lock` (an `flock`, as Python's `filelock` takes).
//!
//! `hf-hub` (blocking API) supplies the cache layout (used in `cache.rs` only), the resolve URLs
//! and the model-info request (used in `client.rs` only). Its download path falls short of what
//! a first run needs, so the metadata request and the transfer are ours: hf-hub gives up on a
//! lock after five seconds, renames the partial file without checking its size or sha256, sets
//! no timeouts, sends the token to the CDN host, does not read `HF_TOKEN`, and its errors do not
//! tell "gated" from "not found".
//!
//! The parts: `spec.rs` parses `-m/--model` and picks a repo's `.gguf` file, `env.rs` reads
//! the `HF_*` variables, `cache.rs` reads and writes the cache folder, `client.rs` asks the
//! Hub (retries, statuses, file metadata), and `download.rs` fetches a file into the cache.

use std::path::PathBuf;

use anyhow::{Result, bail};

mod cache;
mod client;
mod download;
mod env;
mod spec;
#[cfg(test)]
mod tests;

use cache::RepoCache;
use client::Client;
pub use env::{DEFAULT_ENDPOINT, DEFAULT_TIMEOUT, HubEnv};
pub use spec::{FileChoice, HubSpec, ModelSpec, select_gguf};

/// The model used without `-m/--model` or `STREAMGEN_MODEL`: Gemma 3 270M instruction-tuned,
/// Q8_0 (about 292 MB). Same architecture and tokenizer as the test model.
pub const DEFAULT_MODEL: &str = "ggml-org/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q8_0.gguf";

/// Where the model comes from, resolved from `-m/--model`, `STREAMGEN_MODEL`, or the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct HubOptions {
    /// `--offline`; `HF_HUB_OFFLINE=1` also turns it on (read in [`HubEnv::from_env`]).
    pub offline: bool,
    /// Show a progress bar on stderr (the caller decides: stderr is a tty and not `--quiet`).
    pub progress: bool,
    /// `--quiet`: no notes on stderr (such as a retry after a failed request), errors only.
    pub quiet: bool,
}

/// The failures a caller may branch on. Every message is one line naming the repo or file and
/// saying what to do next.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The spec looks like a local path (or ends in `.gguf`) and no such file exists.
    #[error("model file not found: {}: pass an existing .gguf file, or a Hub model as owner/repo[:QUANT]", .0.display())]
    LocalMissing(PathBuf),
    /// The spec is neither an existing file nor a well-formed Hub reference.
    #[error(
        "invalid model {spec:?}: {why} (expected a .gguf path, owner/repo, owner/repo:QUANT or owner/repo/FILE.gguf, each with an optional @REVISION)"
    )]
    BadSpec { spec: String, why: String },
    /// Offline mode is on and the file is not in the cache.
    #[error(
        "{what} is not in the Hugging Face cache ({}) and offline mode is on (--offline or HF_HUB_OFFLINE): run once online to download it, or pass a local .gguf path",
        .cache.display()
    )]
    OfflineMissing { what: String, cache: PathBuf },
    /// The Hub answered 401 or 403: the repo is gated or private.
    #[error("{what}: gated or private: accept its terms on the Hub and set HF_TOKEN")]
    Gated { what: String },
    /// The repo, revision or file does not exist. `available` lists the repo's `.gguf` files
    /// when the repo exists.
    #[error("not found: {what}{}", listing(.available))]
    NotFound { what: String, available: Option<Vec<String>> },
    /// `owner/repo` holds several `.gguf` files and none is the preferred one.
    #[error(
        "{repo}: cannot choose among its .gguf files: name one as {repo}:QUANT or {repo}/FILE (choices: {})",
        .choices.join(", ")
    )]
    Ambiguous { repo: String, choices: Vec<String> },
    /// The Hub cannot be reached (refused, no DNS, TLS failure, timeouts after retries).
    #[error("cannot reach {endpoint}: check the network, or use --offline or a local path")]
    Unreachable {
        endpoint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn listing(available: &Option<Vec<String>>) -> String {
    match available {
        None => String::new(),
        Some(files) if files.is_empty() => " (the repo has no .gguf files)".to_string(),
        Some(files) => format!(" (the repo has: {})", files.join(", ")),
    }
}

/// Resolves a model spec to a local .gguf path, downloading it into the HF cache when needed.
///
/// Reads `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN` and `HF_HUB_OFFLINE` from the
/// process environment; see [`resolve_model_with`].
pub fn resolve_model(spec: &str, opts: &HubOptions) -> Result<PathBuf> {
    resolve_model_with(spec, opts, &HubEnv::from_env())
}

/// [`resolve_model`] with the environment given explicitly.
///
/// A file already in the cache is returned without any network request, also when online.
/// For `owner/repo` and `owner/repo:QUANT`, the choice is then made among the cached `.gguf`
/// files of that revision, so a file downloaded earlier keeps being used.
pub fn resolve_model_with(spec: &str, opts: &HubOptions, env: &HubEnv) -> Result<PathBuf> {
    let hub = match ModelSpec::parse(spec)? {
        ModelSpec::Local(path) => return Ok(path),
        ModelSpec::Hub(hub) => hub,
    };
    let offline = opts.offline || env.offline;
    let cache = RepoCache::new(&env.cache_dir, &hub.repo);

    let cached = match &hub.file {
        FileChoice::Path(file) => Ok(cache.file(&hub.revision, file)),
        FileChoice::Auto | FileChoice::Quant(_) => {
            let files = cache.ggufs(&hub.revision);
            match select_gguf(&hub.repo, &files, quant_of(&hub.file)) {
                Ok(file) => Ok(cache.file(&hub.revision, &file)),
                // Several cached candidates and offline: naming them helps more than "missing".
                Err(e @ HubError::Ambiguous { .. }) if offline => Err(e),
                Err(_) => Ok(None),
            }
        }
    };
    if let Some(path) = cached? {
        return Ok(path);
    }
    if offline {
        let what = match &hub.file {
            FileChoice::Auto => format!("{hub} (any .gguf file)"),
            _ => hub.to_string(),
        };
        return Err(HubError::OfflineMissing { what, cache: env.cache_dir.clone() }.into());
    }

    // A token that cannot be sent as a header would fail every request with a transport error
    // that reads like a network problem; name it instead.
    if let Some(token) = &env.token
        && !token.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        bail!(
            "the Hugging Face token (HF_TOKEN or the token file) is not a valid HTTP header value: \
             it contains a control or non-ASCII character"
        );
    }
    let client = Client::new(env, &hub, opts.quiet)?;
    let file = match &hub.file {
        FileChoice::Path(file) => file.clone(),
        FileChoice::Auto | FileChoice::Quant(_) => {
            let files = client.list_files()?;
            select_gguf(&hub.repo, &files, quant_of(&hub.file))?
        }
    };
    client.fetch(&file, opts.progress)
}

fn quant_of(choice: &FileChoice) -> Option<&str> {
    match choice {
        FileChoice::Quant(q) => Some(q),
        _ => None,
    }
}
