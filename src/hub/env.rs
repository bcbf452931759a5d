//! The Hub settings from the environment, read as Python's `huggingface_hub` reads them:
//! endpoint, cache folder, token, offline mode and timeouts.

use crate::env::{self, hf};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The Hub used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

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
        let home_dir = get(env::HOME).map(PathBuf::from);
        let expand = |v: OsString| expand_tilde(Path::new(&v), home_dir.as_deref());
        // huggingface_hub: HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface.
        let hf_home = get(hf::HOME).map(expand).unwrap_or_else(|| {
            get(env::XDG_CACHE_HOME)
                .map(PathBuf::from)
                .or_else(|| home_dir.as_ref().map(|h| h.join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = get(hf::HUB_CACHE)
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = get(hf::TOKEN)
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .and_then(|t| t.into_string().ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| {
                let path = get(hf::TOKEN_PATH).map(expand).unwrap_or_else(|| hf_home.join("token"));
                let token = fs::read_to_string(path).ok()?;
                Some(token.trim().to_string()).filter(|t| !t.is_empty())
            });
        let endpoint = get(hf::ENDPOINT)
            .and_then(|e| e.into_string().ok())
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let offline = var(hf::HUB_OFFLINE).is_some_and(|v| {
            matches!(v.to_string_lossy().trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")
        });
        let seconds = |name: &str| {
            get(name)
                .and_then(|v| v.to_str().and_then(|v| v.trim().parse::<f64>().ok()))
                .filter(|s| s.is_finite() && *s > 0.0)
                .map_or(DEFAULT_TIMEOUT, |s| Duration::from_secs_f64(s.min(3600.0)))
        };
        let timeout = seconds(hf::ETAG_TIMEOUT);
        let download_timeout = seconds(hf::DOWNLOAD_TIMEOUT);
        Self { endpoint, cache_dir, token, offline, timeout, download_timeout }
    }
}

/// The Hub's answer time allowed per request when no variable says otherwise
/// (`huggingface_hub`'s default for both of its timeouts).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn expand_tilde(path: &Path, home: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path.to_path_buf(),
    }
}
