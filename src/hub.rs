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
//! `hf-hub` (blocking API) supplies the cache layout, the resolve URLs and the model-info
//! request. Its download path falls short of what a first run needs, so the metadata request
//! and the transfer are ours: hf-hub gives up on a lock after five seconds, renames the partial
//! file without checking its size or sha256, sets no timeouts, sends the token to the CDN
//! host, does not read `HF_TOKEN`, and its errors do not tell "gated" from "not found".

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use hf_hub::api::RepoInfo;
use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use ureq::typestate::WithoutBody;
use ureq::{Agent, RequestBuilder};

/// The model used without `-m/--model` or `STREAMGEN_MODEL`: Gemma 3 270M instruction-tuned,
/// Q8_0 (about 292 MB). Same architecture and tokenizer as the test model.
pub const DEFAULT_MODEL: &str = "ggml-org/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q8_0.gguf";

/// The Hub used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How many times a transient failure (5xx, 429, reset, timeout, body cut short) is tried
/// before giving up. A retry that made download progress does not count against it.
const MAX_ATTEMPTS: u32 = 5;
/// The first pause between attempts; it doubles each time (0.25, 0.5, 1, 2 s).
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Relative redirects (a renamed repo, `/api/resolve-cache/...`) followed by the metadata request.
const MAX_RELATIVE_REDIRECTS: usize = 5;
/// The GGUF quantizations picked from a repo with several files, in order: the common
/// llama.cpp default, then the near-lossless one.
const PREFERRED_QUANTS: [&str; 2] = ["Q4_K_M", "Q8_0"];

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

/// The process environment as the Hub client sees it. [`HubEnv::from_env`] reads the same
/// variables as Python's `huggingface_hub`; tests build one by hand so that parallel tests
/// never touch process-global variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEnv {
    /// `HF_ENDPOINT`, without a trailing slash; [`DEFAULT_ENDPOINT`] when unset.
    pub endpoint: String,
    /// The hub cache: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, else `$HF_HOME/token`).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE` is set to a true value (1, on, yes, true).
    pub offline: bool,
    /// How long to wait for the Hub to connect and answer a request:
    /// `HF_HUB_ETAG_TIMEOUT` seconds, 10 by default, as `huggingface_hub`.
    pub timeout: Duration,
    /// How long a download may go without a byte: `HF_HUB_DOWNLOAD_TIMEOUT`, 10 s by default.
    pub download_timeout: Duration,
}

impl HubEnv {
    /// Reads the Hub settings from the process environment (and the token file).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// Reads the Hub settings through `var`, which maps a variable name to its value.
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Self {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        let home_dir = get("HOME").map(PathBuf::from);
        let expand = |v: OsString| expand_tilde(Path::new(&v), home_dir.as_deref());
        // huggingface_hub: HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface.
        let hf_home = get("HF_HOME").map(expand).unwrap_or_else(|| {
            get("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| home_dir.as_ref().map(|h| h.join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = get("HF_TOKEN")
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .and_then(|t| t.into_string().ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| {
                let path = get("HF_TOKEN_PATH").map(expand).unwrap_or_else(|| hf_home.join("token"));
                let token = fs::read_to_string(path).ok()?;
                Some(token.trim().to_string()).filter(|t| !t.is_empty())
            });
        let endpoint = get("HF_ENDPOINT")
            .and_then(|e| e.into_string().ok())
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_string_lossy().trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")
        });
        let seconds = |name: &str| {
            get(name)
                .and_then(|v| v.to_str().and_then(|v| v.trim().parse::<f64>().ok()))
                .filter(|s| s.is_finite() && *s > 0.0)
                .map_or(DEFAULT_TIMEOUT, |s| Duration::from_secs_f64(s.min(3600.0)))
        };
        let timeout = seconds("HF_HUB_ETAG_TIMEOUT");
        let download_timeout = seconds("HF_HUB_DOWNLOAD_TIMEOUT");
        Self { endpoint, cache_dir, token, offline, timeout, download_timeout }
    }
}

/// The Hub's answer time allowed per request when no variable says otherwise
/// (`huggingface_hub`'s default for both of its timeouts).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A parsed `-m/--model` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// An existing local file.
    Local(PathBuf),
    /// A file in a Hub repo.
    Hub(HubSpec),
}

/// A model on the Hub: `owner/repo[:QUANT | /FILE.gguf][@REVISION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    /// `owner/repo`.
    pub repo: String,
    /// A branch, tag or commit; `main` when not given.
    pub revision: String,
    /// Which `.gguf` file of the repo.
    pub file: FileChoice,
}

/// How the `.gguf` file of a repo is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileChoice {
    /// `owner/repo`: the only `.gguf`, else Q4_K_M, else Q8_0.
    Auto,
    /// `owner/repo:QUANT` (case-insensitive), llama.cpp's `-hf` convention.
    Quant(String),
    /// `owner/repo/path/file.gguf`.
    Path(String),
}

impl std::fmt::Display for HubSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.repo)?;
        match &self.file {
            FileChoice::Auto => {}
            FileChoice::Quant(q) => write!(f, ":{q}")?,
            FileChoice::Path(p) => write!(f, "/{p}")?,
        }
        if self.revision != "main" {
            write!(f, "@{}", self.revision)?;
        }
        Ok(())
    }
}

impl ModelSpec {
    /// Parses a model spec. An existing file always wins; a spec that looks like a path
    /// (`/`, `./`, `../`, `~`, or a `.gguf` name without the `owner/repo/` shape) and does not
    /// exist is [`HubError::LocalMissing`], never a Hub lookup.
    pub fn parse(spec: &str) -> Result<Self, HubError> {
        let bad = |why: &str| HubError::BadSpec { spec: spec.to_string(), why: why.to_string() };
        if spec.trim().is_empty() {
            return Err(bad("it is empty"));
        }
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let path = expand_tilde(Path::new(spec), home.as_deref());
        if path.is_file() {
            return Ok(Self::Local(path));
        }
        if path.is_dir() {
            return Err(HubError::BadSpec {
                spec: spec.to_string(),
                why: "it is a directory, not a .gguf file".to_string(),
            });
        }
        let looks_local = ["/", "./", "../", "~"].iter().any(|p| spec.starts_with(p))
            || spec == "."
            || spec == ".."
            || (ends_with_gguf(spec) && spec.split('/').count() < 3);
        if looks_local {
            return Err(HubError::LocalMissing(path));
        }
        parse_hub(spec).map(Self::Hub).map_err(|why| bad(&why))
    }
}

fn parse_hub(spec: &str) -> Result<HubSpec, String> {
    let (head, mut revision) = match spec.split_once('@') {
        Some((head, rev)) => (head, Some(rev)),
        None => (spec, None),
    };
    // Accept both owner/repo:QUANT@REV and owner/repo@REV:QUANT (git refs cannot hold ':').
    let (head, mut quant) = match head.split_once(':') {
        Some((head, q)) => (head, Some(q)),
        None => (head, None),
    };
    if quant.is_none()
        && let Some((rev, q)) = revision.and_then(|r| r.split_once(':'))
    {
        revision = Some(rev);
        quant = Some(q);
    }
    let parts: Vec<&str> = head.split('/').collect();
    if parts.len() < 2 {
        return Err("it is not an existing file and has no owner/repo".to_string());
    }
    for name in &parts[..2] {
        let ok = !name.is_empty()
            && *name != "."
            && *name != ".."
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            return Err(format!("{name:?} is not a valid Hub owner or repo name"));
        }
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    let file = if parts.len() == 2 {
        match quant {
            Some(q) if q.is_empty() || !q.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                return Err(format!("{q:?} is not a quantization name such as Q4_K_M"));
            }
            Some(q) => FileChoice::Quant(q.to_string()),
            None => FileChoice::Auto,
        }
    } else {
        if quant.is_some() {
            return Err(":QUANT goes with owner/repo, not with a file name".to_string());
        }
        if parts[2..].iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
            return Err("the file path has an empty, . or .. component".to_string());
        }
        let file = parts[2..].join("/");
        if !ends_with_gguf(&file) {
            return Err(format!("{file} is not a .gguf file"));
        }
        FileChoice::Path(file)
    };
    let revision = match revision {
        None => "main".to_string(),
        Some(rev) => {
            let ok = !rev.is_empty()
                && rev.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
                && rev.chars().all(|c| c.is_ascii_graphic() && !"\\?#%".contains(c));
            if !ok {
                return Err(format!("{rev:?} is not a valid revision"));
            }
            rev.to_string()
        }
    };
    Ok(HubSpec { repo, revision, file })
}

fn ends_with_gguf(name: &str) -> bool {
    name.len() >= 5 && name.get(name.len() - 5..).is_some_and(|e| e.eq_ignore_ascii_case(".gguf"))
}

fn expand_tilde(path: &Path, home: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path.to_path_buf(),
    }
}

/// True when `file`'s name ends in `-QUANT.gguf` (or `.QUANT`/`_QUANT`), case-insensitively:
/// `Q4_K` matches `x-Q4_K.gguf` but not `x-Q4_K_M.gguf`.
fn quant_matches(file: &str, quant: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file).to_ascii_lowercase();
    let Some(stem) = name.strip_suffix(".gguf") else {
        return false;
    };
    let quant = quant.to_ascii_lowercase();
    stem == quant || stem.strip_suffix(quant.as_str()).is_some_and(|rest| rest.ends_with(['-', '.', '_']))
}

/// Picks the `.gguf` file of `repo` among `files` (repo-relative paths; other files are
/// ignored). With `quant`, the one file of that quantization; without, the only `.gguf`
/// file, else Q4_K_M, else Q8_0. Multimodal projectors (`mmproj`) are never picked, as in
/// llama.cpp.
pub fn select_gguf(repo: &str, files: &[String], quant: Option<&str>) -> Result<String, HubError> {
    let ggufs: Vec<String> = files.iter().filter(|f| ends_with_gguf(f)).cloned().collect();
    let models: Vec<&String> = ggufs.iter().filter(|f| !f.to_ascii_lowercase().contains("mmproj")).collect();
    let pick = |q: &str| -> Vec<&String> { models.iter().copied().filter(|f| quant_matches(f, q)).collect() };
    let one = |matches: Vec<&String>| -> Result<String, HubError> {
        match matches.as_slice() {
            [only] => Ok((*only).clone()),
            _ => Err(HubError::Ambiguous {
                repo: repo.to_string(),
                choices: matches.into_iter().cloned().collect(),
            }),
        }
    };
    if let Some(q) = quant {
        let matches = pick(q);
        if matches.is_empty() {
            return Err(HubError::NotFound { what: format!("{repo}:{q}"), available: Some(ggufs) });
        }
        return one(matches);
    }
    match models.as_slice() {
        [] => Err(HubError::NotFound { what: format!("a .gguf model in {repo}"), available: Some(ggufs) }),
        [only] => Ok((*only).clone()),
        _ => {
            for q in PREFERRED_QUANTS {
                let matches = pick(q);
                if !matches.is_empty() {
                    return one(matches);
                }
            }
            one(models.clone())
        }
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

/// One repo's folder in the cache, read without the network.
struct RepoCache {
    dir: PathBuf,
}

impl RepoCache {
    fn new(cache_dir: &Path, repo: &str) -> Self {
        let folder = Repo::new(repo.to_string(), RepoType::Model).folder_name();
        Self { dir: cache_dir.join(folder) }
    }

    /// The snapshot folder of `revision`: through `refs/{revision}` for a branch or tag, or
    /// directly for a commit hash (Python writes no ref for those).
    fn snapshot(&self, revision: &str) -> Option<PathBuf> {
        if let Ok(commit) = fs::read_to_string(self.dir.join("refs").join(revision)) {
            let commit = commit.trim();
            if safe_name(commit) {
                return Some(self.dir.join("snapshots").join(commit));
            }
        }
        is_commit_hash(revision).then(|| self.dir.join("snapshots").join(revision))
    }

    /// The cached `file` of `revision`, when its blob is present (a dangling link is a miss).
    fn file(&self, revision: &str, file: &str) -> Option<PathBuf> {
        let path = self.snapshot(revision)?.join(file);
        path.is_file().then_some(path)
    }

    /// The cached `.gguf` files of `revision`, as repo-relative paths.
    fn ggufs(&self, revision: &str) -> Vec<String> {
        let mut found = Vec::new();
        if let Some(root) = self.snapshot(revision) {
            collect_ggufs(&root, "", &mut found);
        }
        found.sort();
        found
    }
}

fn collect_ggufs(dir: &Path, prefix: &str, found: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let path = entry.path();
        if path.is_dir() {
            collect_ggufs(&path, &rel, found);
        } else if path.is_file() && ends_with_gguf(&rel) {
            found.push(rel);
        }
    }
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Commit hashes and etags from the server become file names: no separators, no dots.
fn safe_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// What the Hub says about one file.
#[derive(Debug)]
struct FileMeta {
    commit: String,
    etag: String,
    size: u64,
    /// The CDN URL the Hub redirected to, or the resolve URL itself.
    url: String,
}

/// How one attempt failed, which decides whether it is tried again.
enum Failure {
    /// 5xx, 429, a body cut short: try again after a pause.
    Transient(anyhow::Error),
    /// A transport error; `retry` for resets and timeouts, not for refused or unresolvable.
    Network { source: ureq::Error, retry: bool },
    /// Anything else: report at once.
    Fatal(anyhow::Error),
}

impl From<ureq::Error> for Failure {
    fn from(source: ureq::Error) -> Self {
        let retry = match &source {
            ureq::Error::Timeout(_) | ureq::Error::Protocol(_) => true,
            ureq::Error::Io(e) => matches!(
                e.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::BrokenPipe
                    | ErrorKind::TimedOut
                    | ErrorKind::Interrupted
            ),
            _ => false,
        };
        Failure::Network { source, retry }
    }
}

/// A connection to the Hub for one repo and revision.
struct Client<'a> {
    env: &'a HubEnv,
    spec: &'a HubSpec,
    /// Our agent: timeouts, statuses as values so that headers such as `X-Error-Code` are read,
    /// and no automatic gzip (ranges must count raw bytes).
    agent: Agent,
    /// hf-hub: resolve URLs and the model-info request.
    api: Api,
    repo: Repo,
    /// `--quiet`: retries are not announced.
    quiet: bool,
}

impl<'a> Client<'a> {
    fn new(env: &'a HubEnv, spec: &'a HubSpec, quiet: bool) -> Result<Self> {
        let user_agent = format!("streamgen/{}; hf-hub/0.5", env!("CARGO_PKG_VERSION"));
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(10)
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .timeout_connect(Some(env.timeout))
            .timeout_recv_response(Some(env.timeout))
            .timeout_per_read(Some(env.download_timeout))
            .accept_encoding(ureq::config::AutoHeaderValue::None)
            .user_agent(user_agent.as_str())
            .build()
            .into();
        let api = ApiBuilder::from_cache(Cache::new(env.cache_dir.clone()))
            .with_endpoint(env.endpoint.clone())
            .with_token(env.token.clone())
            .with_progress(false)
            .with_user_agent("streamgen", env!("CARGO_PKG_VERSION"))
            .build()
            .context("cannot set up the Hugging Face Hub client")?;
        let repo = Repo::with_revision(spec.repo.clone(), RepoType::Model, spec.revision.clone());
        Ok(Self { env, spec, agent, api, repo, quiet })
    }

    /// `repo@rev` for messages.
    fn repo_label(&self) -> String {
        match self.spec.revision.as_str() {
            "main" => self.spec.repo.clone(),
            rev => format!("{}@{rev}", self.spec.repo),
        }
    }

    fn file_label(&self, file: &str) -> String {
        match self.spec.revision.as_str() {
            "main" => format!("{}/{file}", self.spec.repo),
            rev => format!("{}/{file}@{rev}", self.spec.repo),
        }
    }

    /// Adds the token, but only for the Hub's own host: a CDN URL is signed and must not
    /// receive it (huggingface_hub drops it there too).
    fn authorize(&self, request: RequestBuilder<WithoutBody>, url: &str) -> RequestBuilder<WithoutBody> {
        match &self.env.token {
            Some(token) if origin(url) == origin(&self.env.endpoint) => {
                request.header("Authorization", format!("Bearer {token}"))
            }
            _ => request,
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or has failed [`MAX_ATTEMPTS`] times.
    fn retry<T>(&self, mut attempt: impl FnMut() -> Result<T, Failure>) -> Result<T> {
        let mut failures = 0;
        loop {
            let err = match attempt() {
                Ok(value) => return Ok(value),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Network { source, retry: false }) => return Err(self.unreachable(source)),
                Err(Failure::Transient(e)) => e,
                Err(Failure::Network { source, retry: true }) => self.unreachable(source),
            };
            failures += 1;
            if failures >= MAX_ATTEMPTS {
                return Err(err.context(format!("gave up after {failures} attempts")));
            }
            // A silent wait is the worst kind: say what failed and that we try again.
            let pause = backoff(failures);
            if !self.quiet {
                crate::output::print_note(&format!(
                    "{}; trying again in {:.1} s ({} of {MAX_ATTEMPTS})",
                    crate::output::error_line(&err),
                    pause.as_secs_f64(),
                    failures + 1
                ));
            }
            std::thread::sleep(pause);
        }
    }

    fn unreachable(&self, source: ureq::Error) -> anyhow::Error {
        HubError::Unreachable { endpoint: self.env.endpoint.clone(), source: Box::new(source) }.into()
    }

    /// Turns an HTTP error status into a failure, reading the Hub's `X-Error-Code` when given
    /// (the Hub answers 401 for a repo that does not exist, to hide private ones).
    fn status_failure(
        &self,
        status: u16,
        error_code: Option<&str>,
        url: &str,
        file: Option<&str>,
    ) -> Failure {
        let what = match file {
            Some(file) => self.file_label(file),
            None => self.repo_label(),
        };
        match (status, error_code) {
            (_, Some("RepoNotFound")) => Failure::Fatal(
                HubError::NotFound {
                    what: format!(
                        "repo {} on {} (check the name; if it is private, set HF_TOKEN)",
                        self.spec.repo, self.env.endpoint
                    ),
                    available: None,
                }
                .into(),
            ),
            (_, Some("RevisionNotFound")) => Failure::Fatal(
                HubError::NotFound {
                    what: format!("revision {} of {}", self.spec.revision, self.spec.repo),
                    available: None,
                }
                .into(),
            ),
            (_, Some("GatedRepo")) | (401 | 403, _) => Failure::Fatal(HubError::Gated { what }.into()),
            (_, Some("EntryNotFound")) | (404 | 410, _) => {
                Failure::Fatal(HubError::NotFound { what, available: None }.into())
            }
            (429 | 500..=599, _) => Failure::Transient(anyhow!("{url}: the Hub answered HTTP {status}")),
            _ => Failure::Fatal(anyhow!("{what}: {url} answered HTTP {status}")),
        }
    }

    /// The repo's file list, from the model-info API (`/api/models/{repo}/revision/{rev}`).
    fn list_files(&self) -> Result<Vec<String>> {
        let api_repo = self.api.repo(self.repo.clone());
        self.retry(|| {
            let request = api_repo
                .info_request()
                .config()
                .http_status_as_error(false)
                .timeout_global(Some(self.env.timeout * 3))
                .build();
            let mut response = request.call()?;
            let status = response.status().as_u16();
            if status != 200 {
                let code = header(response.headers(), "x-error-code");
                return Err(self.status_failure(status, code.as_deref(), &self.env.endpoint, None));
            }
            let info: RepoInfo = response.body_mut().read_json().map_err(|e| {
                Failure::Fatal(anyhow!(e).context(format!("{}: unreadable model info", self.repo_label())))
            })?;
            Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
        })
    }

    /// The `.gguf` files of the repo, sorted, for a "not found" message.
    fn list_ggufs(&self) -> Result<Vec<String>> {
        let mut files: Vec<String> = self.list_files()?.into_iter().filter(|f| ends_with_gguf(f)).collect();
        files.sort();
        Ok(files)
    }

    /// The file's commit, etag and size: a HEAD on its resolve URL, following only relative
    /// redirects, as huggingface_hub's `get_hf_file_metadata` does. An absolute redirect
    /// points at the CDN, where the bytes are then fetched.
    fn head(&self, file: &str) -> Result<FileMeta> {
        let resolve_url = self.api.repo(self.repo.clone()).url(file);
        self.retry(|| {
            let mut url = resolve_url.clone();
            for _ in 0..=MAX_RELATIVE_REDIRECTS {
                let request = self.authorize(self.agent.head(&url), &url);
                let response = request.config().max_redirects(0).build().call()?;
                let status = response.status().as_u16();
                let headers = response.headers();
                if (300..400).contains(&status) {
                    let location = header(headers, "location").ok_or_else(|| {
                        Failure::Fatal(anyhow!("{url}: redirect without a Location header"))
                    })?;
                    if location.starts_with('/') {
                        url = format!("{}{location}", origin(&url));
                        continue;
                    }
                    return self.meta(headers, location, file);
                }
                if (200..300).contains(&status) {
                    return self.meta(headers, url, file);
                }
                let code = header(headers, "x-error-code");
                return Err(self.status_failure(status, code.as_deref(), &url, Some(file)));
            }
            Err(Failure::Fatal(anyhow!("{}: too many redirects", self.file_label(file))))
        })
    }

    fn meta(&self, headers: &ureq::http::HeaderMap, url: String, file: &str) -> Result<FileMeta, Failure> {
        let missing = |name: &str| {
            Failure::Fatal(anyhow!(
                "{}: the answer from {} has no valid {name} header: is HF_ENDPOINT a Hugging Face Hub?",
                self.file_label(file),
                self.env.endpoint
            ))
        };
        let commit = header(headers, "x-repo-commit")
            .filter(|c| safe_name(c))
            .ok_or_else(|| missing("X-Repo-Commit"))?;
        // The Hub gives an LFS file's sha256 in X-Linked-Etag (ETag then describes the redirect).
        let etag = header(headers, "x-linked-etag")
            .or_else(|| header(headers, "etag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
            .filter(|e| safe_name(e))
            .ok_or_else(|| missing("ETag"))?;
        let size = header(headers, "x-linked-size")
            .or_else(|| header(headers, "content-length"))
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| missing("Content-Length"))?;
        Ok(FileMeta { commit, etag, size, url })
    }

    /// Makes `file` available in the cache and returns its snapshot path.
    fn fetch(&self, file: &str, progress: bool) -> Result<PathBuf> {
        let meta = match self.head(file) {
            Err(e)
                if matches!(
                    e.downcast_ref::<HubError>(),
                    Some(HubError::NotFound { available: None, .. })
                ) =>
            {
                // Tell a missing file from a missing repo, and list what the repo has.
                return Err(match self.list_ggufs() {
                    Ok(available) => {
                        HubError::NotFound { what: self.file_label(file), available: Some(available) }.into()
                    }
                    Err(listing)
                        if matches!(listing.downcast_ref::<HubError>(), Some(HubError::NotFound { .. })) =>
                    {
                        listing
                    }
                    Err(_) => e,
                });
            }
            meta => meta?,
        };
        let cache = Cache::new(self.env.cache_dir.clone()).repo(self.repo.clone());
        let blob = cache.blob_path(&meta.etag);
        if !blob.is_file() {
            let folder = self.repo.folder_name();
            let lock_path =
                self.env.cache_dir.join(".locks").join(folder).join(format!("{}.lock", meta.etag));
            let _lock = lock(&lock_path, progress, file)?;
            // Another process may have finished the download while we waited.
            if !blob.is_file() {
                self.download(&meta, file, &blob, progress)?;
            }
        }
        let pointer = cache.pointer_path(&meta.commit).join(file);
        link_pointer(&blob, &pointer, file)?;
        if self.spec.revision != meta.commit {
            let ref_path =
                self.env.cache_dir.join(self.repo.folder_name()).join("refs").join(&self.spec.revision);
            write_atomically(&ref_path, meta.commit.as_bytes())?;
        }
        Ok(pointer)
    }

    /// Downloads the blob into `{blob}.incomplete`, resuming what is there, checks its size
    /// and sha256, and only then renames it to its final name. The caller holds the lock.
    fn download(&self, meta: &FileMeta, file: &str, blob: &Path, progress: bool) -> Result<()> {
        let what = self.file_label(file);
        let mut partial = blob.as_os_str().to_owned();
        partial.push(".incomplete");
        let partial = PathBuf::from(partial);
        if let Some(dir) = partial.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
        }
        let mut out = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        let mut hasher = Sha256::new();
        let mut have = out.metadata()?.len();
        if have > meta.size {
            out.set_len(0)?;
            have = 0;
        } else if have > 0 {
            // Resuming: the checksum covers the whole file, so hash what is already there.
            let copied = std::io::copy(&mut (&mut out).take(have), &mut hasher)?;
            if copied != have {
                bail!("{}: could not read back the partial download", partial.display());
            }
        }
        let bar = progress_bar(progress, meta.size, file);
        bar.set_position(have);

        let mut failures = 0;
        let mut buf = vec![0u8; 1 << 18];
        while have < meta.size {
            let before = have;
            let err = match self.fetch_from(meta, have) {
                Err(Failure::Network { source, retry: false }) => return Err(self.unreachable(source)),
                Err(Failure::Network { source, .. }) => anyhow!(source),
                Err(Failure::Transient(e)) => e,
                Err(Failure::Fatal(e)) => return Err(e),
                Ok((start, response)) => {
                    if start != have {
                        // The server ignored the range: start over from its first byte.
                        out.set_len(0)?;
                        out.seek(SeekFrom::Start(0))?;
                        hasher = Sha256::new();
                        have = 0;
                        bar.set_position(0);
                    }
                    let mut body = response.into_body().into_reader();
                    let stopped = loop {
                        match body.read(&mut buf) {
                            Ok(0) => {
                                break Some(anyhow!("the connection closed at byte {have} of {}", meta.size));
                            }
                            Ok(n) => {
                                if have + n as u64 > meta.size {
                                    out.set_len(0)?;
                                    bail!(
                                        "{what}: the server sent more than the {} bytes it announced",
                                        meta.size
                                    );
                                }
                                // A write error (a full disk) is not retried; the partial file
                                // stays for the next run to resume.
                                out.write_all(&buf[..n])
                                    .with_context(|| format!("{what}: cannot write {}", partial.display()))?;
                                hasher.update(&buf[..n]);
                                have += n as u64;
                                bar.inc(n as u64);
                                if have == meta.size {
                                    break None;
                                }
                            }
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) => break Some(anyhow!(e)),
                        }
                    };
                    match stopped {
                        None => break,
                        Some(e) => e,
                    }
                }
            };
            failures = if have > before { 1 } else { failures + 1 };
            if failures >= MAX_ATTEMPTS {
                bar.abandon();
                return Err(err.context(format!(
                    "{what}: download stopped at byte {have} of {}; the partial file is kept, run again to resume",
                    meta.size
                )));
            }
            std::thread::sleep(backoff(failures));
        }
        bar.finish_and_clear();
        out.sync_all().with_context(|| format!("cannot write {}", partial.display()))?;
        drop(out);

        let on_disk = fs::metadata(&partial)?.len();
        let digest = hex(&hasher.finalize());
        // The ETag of an LFS file is its sha256; a plain git file's is a sha1 of the blob, and
        // only its size can be checked.
        let bad = if on_disk != meta.size {
            Some(format!("its size is {on_disk} bytes, the Hub says {}", meta.size))
        } else if is_sha256(&meta.etag) && !digest.eq_ignore_ascii_case(&meta.etag) {
            Some(format!("its sha256 is {digest}, the Hub says {}", meta.etag))
        } else {
            None
        };
        if let Some(why) = bad {
            fs::remove_file(&partial).ok();
            bail!("{what}: the download is corrupt ({why}); it was removed, run again");
        }
        fs::rename(&partial, blob)
            .with_context(|| format!("cannot move {} to {}", partial.display(), blob.display()))?;
        Ok(())
    }

    /// One GET of the blob from byte `offset`. Returns the first byte the body starts at.
    fn fetch_from(
        &self,
        meta: &FileMeta,
        offset: u64,
    ) -> Result<(u64, ureq::http::Response<ureq::Body>), Failure> {
        let mut request = self.authorize(self.agent.get(&meta.url), &meta.url);
        if offset > 0 {
            request = request.header("Range", format!("bytes={offset}-"));
        }
        let response = request.call()?;
        let status = response.status().as_u16();
        match status {
            200 => Ok((0, response)),
            206 => {
                let start = header(response.headers(), "content-range")
                    .and_then(|r| r.strip_prefix("bytes ")?.split('-').next()?.trim().parse::<u64>().ok());
                match start {
                    Some(start) if start == offset => Ok((start, response)),
                    _ => Err(Failure::Transient(anyhow!(
                        "{}: a range answer does not start at byte {offset}",
                        meta.url
                    ))),
                }
            }
            _ => {
                let code = header(response.headers(), "x-error-code");
                Err(self.status_failure(status, code.as_deref(), &meta.url, None))
            }
        }
    }
}

fn header(headers: &ureq::http::HeaderMap, name: &str) -> Option<String> {
    headers.get(name)?.to_str().ok().map(str::to_string)
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

fn backoff(failures: u32) -> Duration {
    BACKOFF_BASE * 2u32.saturating_pow(failures.saturating_sub(1).min(4))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn progress_bar(show: bool, len: u64, file: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style =
        ProgressStyle::with_template("{msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(format!("downloading {}", file.rsplit('/').next().unwrap_or(file)));
    bar
}

/// Takes the download lock, waiting for another process that holds it (possibly Python).
fn lock(path: &Path, progress: bool, file: &str) -> Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let handle = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match handle.try_lock() {
        Ok(()) => return Ok(handle),
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    let spinner = if progress {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    spinner.set_message(format!("waiting for another process downloading {file}"));
    spinner.enable_steady_tick(Duration::from_millis(200));
    let locked = handle.lock().with_context(|| format!("cannot lock {}", path.display()));
    spinner.finish_and_clear();
    locked?;
    Ok(handle)
}

/// Points `snapshots/{commit}/{file}` at the blob with a relative symlink, as Python does
/// (`../../blobs/{etag}`, one more `..` per folder in `file`). The link is made under a
/// temporary name and renamed, so a concurrent reader never sees it missing.
fn link_pointer(blob: &Path, pointer: &Path, file: &str) -> Result<()> {
    if pointer.is_file() {
        return Ok(());
    }
    let dir = pointer.parent().ok_or_else(|| anyhow!("bad snapshot path {}", pointer.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = temp_sibling(pointer);
    #[cfg(unix)]
    {
        let mut target = PathBuf::new();
        for _ in 0..=file.split('/').count() {
            target.push("..");
        }
        target.push("blobs");
        target.push(blob.file_name().ok_or_else(|| anyhow!("bad blob path {}", blob.display()))?);
        std::os::unix::fs::symlink(&target, &tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
    }
    #[cfg(not(unix))]
    {
        // Without symlinks, huggingface_hub copies too.
        let _ = file;
        fs::copy(blob, &tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    }
    fs::rename(&tmp, pointer).with_context(|| format!("cannot create {}", pointer.display()))
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    if fs::read(path).is_ok_and(|c| c == contents) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = temp_sibling(path);
    fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// A unique name beside `path` (process id and a counter), for write-then-rename.
fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(spec: &str) -> HubSpec {
        match ModelSpec::parse(spec) {
            Ok(ModelSpec::Hub(h)) => h,
            other => panic!("{spec}: expected a Hub spec, got {other:?}"),
        }
    }

    #[test]
    fn parses_hub_specs() {
        assert_eq!(
            hub("ggml-org/gemma-3-270m-it-GGUF"),
            HubSpec {
                repo: "ggml-org/gemma-3-270m-it-GGUF".into(),
                revision: "main".into(),
                file: FileChoice::Auto
            }
        );
        let h = hub("o/r:q8_0@v1.0");
        assert_eq!((h.file, h.revision.as_str()), (FileChoice::Quant("q8_0".into()), "v1.0"));
        let h = hub("o/r@refs/pr/1:Q4_K_M");
        assert_eq!((h.file, h.revision.as_str()), (FileChoice::Quant("Q4_K_M".into()), "refs/pr/1"));
        let h = hub("o/r/sub/dir/m.GGUF@0123456789abcdef0123456789abcdef01234567");
        assert_eq!(h.file, FileChoice::Path("sub/dir/m.GGUF".into()));
        assert!(is_commit_hash(&h.revision));
        assert_eq!(hub(DEFAULT_MODEL).file, FileChoice::Path("gemma-3-270m-it-Q8_0.gguf".into()));
        assert_eq!(hub("o/r/f.gguf@dev").to_string(), "o/r/f.gguf@dev");
    }

    #[test]
    fn local_looking_specs_never_reach_the_hub() {
        for spec in ["/nope/m.gguf", "./m.gguf", "../m.gguf", "~/m.gguf", "m.gguf", "dir/m.gguf"] {
            assert!(
                matches!(ModelSpec::parse(spec), Err(HubError::LocalMissing(_))),
                "{spec}: {:?}",
                ModelSpec::parse(spec)
            );
        }
        let err = ModelSpec::parse("./missing.gguf").expect_err("missing file");
        assert!(err.to_string().starts_with("model file not found: ./missing.gguf"), "{err}");
    }

    #[test]
    fn an_existing_file_wins_over_the_hub_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("o/r/m.gguf");
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, b"GGUF").expect("write");
        let spec = path.to_str().expect("utf-8 path");
        assert_eq!(ModelSpec::parse(spec).expect("parse"), ModelSpec::Local(path.clone()));
        assert!(matches!(
            ModelSpec::parse(dir.path().to_str().expect("utf-8")),
            Err(HubError::BadSpec { .. })
        ));
    }

    #[test]
    fn rejects_malformed_specs() {
        for spec in [
            "",
            "justaname",
            "o/r:",
            "o/r:Q4 K",
            "o/r/file.bin",
            "o/r/../x.gguf",
            "o w/r",
            "o/r@",
            "o/r@a/../b",
            "o/r/f.gguf:Q8_0",
        ] {
            assert!(
                matches!(ModelSpec::parse(spec), Err(HubError::BadSpec { .. })),
                "{spec}: {:?}",
                ModelSpec::parse(spec)
            );
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn selects_the_gguf_file() {
        let files = names(&[
            "README.md",
            "m-Q2_K.gguf",
            "m-Q4_K_M.gguf",
            "m-Q4_K.gguf",
            "m-Q8_0.gguf",
            "mmproj-m-f16.gguf",
        ]);
        assert_eq!(select_gguf("o/r", &files, None).expect("auto"), "m-Q4_K_M.gguf");
        assert_eq!(select_gguf("o/r", &files, Some("q8_0")).expect("q8"), "m-Q8_0.gguf");
        assert_eq!(select_gguf("o/r", &files, Some("Q4_K")).expect("q4_k"), "m-Q4_K.gguf");
        let err = select_gguf("o/r", &files, Some("Q5_K_M")).expect_err("absent quant");
        assert!(matches!(&err, HubError::NotFound { available: Some(a), .. } if a.len() == 5), "{err}");
        assert!(err.to_string().contains("the repo has: m-Q2_K.gguf, m-Q4_K_M.gguf"), "{err}");

        let only_q8 = names(&["a/m-Q8_0.gguf", "m-F16.gguf"]);
        assert_eq!(select_gguf("o/r", &only_q8, None).expect("q8"), "a/m-Q8_0.gguf");
        let single = names(&["weird-name.gguf", "mmproj.gguf", "config.json"]);
        assert_eq!(select_gguf("o/r", &single, None).expect("single"), "weird-name.gguf");

        let ambiguous = names(&["m-Q2_K.gguf", "m-Q3_K_S.gguf"]);
        let err = select_gguf("o/r", &ambiguous, None).expect_err("ambiguous");
        assert_eq!(
            err.to_string(),
            "o/r: cannot choose among its .gguf files: name one as o/r:QUANT or o/r/FILE (choices: m-Q2_K.gguf, m-Q3_K_S.gguf)"
        );
        let twice = names(&["a/m-Q8_0.gguf", "b/m-Q8_0.gguf"]);
        assert!(matches!(select_gguf("o/r", &twice, Some("Q8_0")), Err(HubError::Ambiguous { .. })));
        assert!(matches!(select_gguf("o/r", &names(&["x.bin"]), None), Err(HubError::NotFound { .. })));
    }

    #[test]
    fn reads_the_environment_like_huggingface_hub() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("hfhome");
        fs::create_dir_all(&home).expect("mkdir");
        fs::write(home.join("token"), "hf_file\n").expect("token");
        let vars = |pairs: Vec<(&'static str, OsString)>| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
        };

        let env = HubEnv::from_vars(vars(vec![("HOME", "/home/u".into())]));
        assert_eq!(env.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(
            (env.endpoint.as_str(), env.offline, env.token.as_deref()),
            (DEFAULT_ENDPOINT, false, None)
        );

        let env = HubEnv::from_vars(vars(vec![
            ("HF_HOME", home.clone().into()),
            ("HF_ENDPOINT", "http://127.0.0.1:9/".into()),
            ("HF_HUB_OFFLINE", "TRUE".into()),
        ]));
        assert_eq!(env.cache_dir, home.join("hub"));
        assert_eq!(env.endpoint, "http://127.0.0.1:9");
        assert_eq!(env.token.as_deref(), Some("hf_file"));
        assert!(env.offline);

        let env = HubEnv::from_vars(vars(vec![
            ("HF_HOME", home.clone().into()),
            ("HF_HUB_CACHE", "/c".into()),
            ("HF_TOKEN", "hf_env".into()),
            ("HF_HUB_OFFLINE", "0".into()),
        ]));
        assert_eq!(
            (env.cache_dir, env.token.as_deref(), env.offline),
            (PathBuf::from("/c"), Some("hf_env"), false)
        );

        let env = HubEnv::from_vars(vars(vec![("HOME", "/h".into()), ("XDG_CACHE_HOME", "/x".into())]));
        assert_eq!(env.cache_dir, PathBuf::from("/x/huggingface/hub"));
    }

    #[test]
    fn small_helpers() {
        assert_eq!(origin("https://huggingface.co/o/r/resolve/main/f"), "https://huggingface.co");
        assert_eq!(origin("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert!(quant_matches("x/gemma-3-270m-it-Q8_0.gguf", "q8_0"));
        assert!(quant_matches("Model.Q4_K_M.gguf", "Q4_K_M"));
        assert!(!quant_matches("m-Q4_K_M.gguf", "4_K_M"));
        assert!(!quant_matches("m-Q4_K_M.gguf", "Q4_K"));
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(4), Duration::from_secs(2));
    }
}
