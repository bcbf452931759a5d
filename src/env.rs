//! Every environment variable streamgen reads, by name, in one place. A leaf: the modules that
//! read a variable take its name from here (and take its value as an injected input where
//! tests need to set it, as [`crate::config`] and the hub do).

/// The default for `-m/--model`.
pub const MODEL: &str = "STREAMGEN_MODEL";
/// The default for `--endpoint`.
pub const ENDPOINT: &str = "STREAMGEN_ENDPOINT";
/// The default for `--api-key`.
pub const API_KEY: &str = "STREAMGEN_API_KEY";
/// The prompt cache's folder, or `off`: the default for `--prompt-cache`.
pub const PROMPT_CACHE: &str = "STREAMGEN_PROMPT_CACHE";
/// Forces a kernel family (`avx512`, `avx2`, `portable`) instead of the best the CPU has.
pub const KERNELS: &str = "STREAMGEN_KERNELS";
/// Disables colour on stderr (<https://no-color.org>).
pub const NO_COLOR: &str = "NO_COLOR";
/// The OpenAI client's variables: `OPENAI_API_KEY` is sent only to `OPENAI_BASE_URL`.
pub const OPENAI_BASE_URL: &str = "OPENAI_BASE_URL";
pub const OPENAI_API_KEY: &str = "OPENAI_API_KEY";
/// `HOME`, for `~` in paths and the default cache directory.
pub const HOME: &str = "HOME";
/// The XDG cache directory (`~/.cache` by default), where the Hub's cache goes by default.
pub const XDG_CACHE_HOME: &str = "XDG_CACHE_HOME";

/// Python `huggingface_hub`'s variables, read with the same meanings so that both share one
/// cache and one login.
pub mod hf {
    /// The root of the Hub's files (`~/.cache/huggingface` by default).
    pub const HOME: &str = "HF_HOME";
    /// The model cache (`$HF_HOME/hub` by default).
    pub const HUB_CACHE: &str = "HF_HUB_CACHE";
    /// An access token, before the token file.
    pub const TOKEN: &str = "HF_TOKEN";
    /// The token file (`$HF_HOME/token` by default).
    pub const TOKEN_PATH: &str = "HF_TOKEN_PATH";
    /// Another Hub (a mirror).
    pub const ENDPOINT: &str = "HF_ENDPOINT";
    /// `1` behaves like `--offline`.
    pub const HUB_OFFLINE: &str = "HF_HUB_OFFLINE";
    /// Seconds to wait for the Hub's metadata answers.
    pub const ETAG_TIMEOUT: &str = "HF_HUB_ETAG_TIMEOUT";
    /// Seconds to wait for a download to make progress.
    pub const DOWNLOAD_TIMEOUT: &str = "HF_HUB_DOWNLOAD_TIMEOUT";
}
