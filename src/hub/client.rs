//! Requests to the Hub for one repo and revision: the HTTP agent, the token only for the
//! Hub's own host, retries with backoff, HTTP statuses turned into [`HubError`]s, the file
//! list and a file's metadata.

use std::time::Duration;

use anyhow::{Result, anyhow};
use ureq::typestate::WithoutBody;
use ureq::{Agent, RequestBuilder};

use super::cache::safe_name;
use super::spec::ends_with_gguf;
use super::{HubEnv, HubError, HubSpec};

/// How many times a transient failure (5xx, 429, reset, timeout, body cut short) is tried
/// before giving up. A retry that made download progress does not count against it.
pub(super) const MAX_ATTEMPTS: u32 = 5;
/// The first pause between attempts; it doubles each time (0.25, 0.5, 1, 2 s).
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Relative redirects (a renamed repo, `/api/resolve-cache/...`) followed by the metadata request.
const MAX_RELATIVE_REDIRECTS: usize = 5;

/// What the Hub says about one file.
#[derive(Debug)]
pub(super) struct FileMeta {
    pub(super) commit: String,
    pub(super) etag: String,
    pub(super) size: u64,
    /// The CDN URL the Hub redirected to, or the resolve URL itself.
    pub(super) url: String,
}

/// How one attempt failed, which decides whether it is tried again.
pub(super) enum Failure {
    /// 5xx, 429, a body cut short: try again after a pause.
    Transient(anyhow::Error),
    /// A transport error; `retry` for resets and timeouts, not for refused or unresolvable.
    Network { source: ureq::Error, retry: bool },
    /// Anything else: report at once.
    Fatal(anyhow::Error),
}

impl From<ureq::Error> for Failure {
    fn from(source: ureq::Error) -> Self {
        let retry = crate::net::is_retryable(&source);
        Failure::Network { source, retry }
    }
}

/// A connection to the Hub for one repo and revision.
pub(super) struct Client<'a> {
    pub(super) env: &'a HubEnv,
    pub(super) spec: &'a HubSpec,
    /// Our agent: timeouts, statuses as values so that headers such as `X-Error-Code` are read,
    /// and no automatic gzip (ranges must count raw bytes).
    pub(super) agent: Agent,
    /// `--quiet`: retries are not announced.
    quiet: bool,
}

impl<'a> Client<'a> {
    pub(super) fn new(env: &'a HubEnv, spec: &'a HubSpec, quiet: bool) -> Result<Self> {
        // The Hub's one HTTP configuration: every request (model info, HEAD, download) goes
        // through this agent. (hf-hub's own client is not used: hf-hub's job here is the cache
        // layout, in cache.rs.)
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
        Ok(Self { env, spec, agent, quiet })
    }

    /// `repo@rev` for messages.
    fn repo_label(&self) -> String {
        match self.spec.revision.as_str() {
            "main" => self.spec.repo.clone(),
            rev => format!("{}@{rev}", self.spec.repo),
        }
    }

    pub(super) fn file_label(&self, file: &str) -> String {
        match self.spec.revision.as_str() {
            "main" => format!("{}/{file}", self.spec.repo),
            rev => format!("{}/{file}@{rev}", self.spec.repo),
        }
    }

    /// Adds the token, but only for the Hub's own host: a CDN URL is signed and must not
    /// receive it (huggingface_hub drops it there too).
    pub(super) fn authorize(
        &self,
        request: RequestBuilder<WithoutBody>,
        url: &str,
    ) -> RequestBuilder<WithoutBody> {
        crate::net::bearer(request, self.env.token.as_deref(), url, &self.env.endpoint)
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

    pub(super) fn unreachable(&self, source: ureq::Error) -> anyhow::Error {
        HubError::Unreachable { endpoint: self.env.endpoint.clone(), source: Box::new(source) }.into()
    }

    /// Turns an HTTP error status into a failure, reading the Hub's `X-Error-Code` when given
    /// (the Hub answers 401 for a repo that does not exist, to hide private ones).
    pub(super) fn status_failure(
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
    pub(super) fn list_files(&self) -> Result<Vec<String>> {
        /// The part of the model info we read.
        #[derive(serde::Deserialize)]
        struct Info {
            siblings: Vec<Sibling>,
        }
        #[derive(serde::Deserialize)]
        struct Sibling {
            rfilename: String,
        }
        let url =
            format!("{}/api/models/{}/revision/{}", self.env.endpoint, self.spec.repo, self.url_revision());
        self.retry(|| {
            let request = self.authorize(self.agent.get(&url), &url);
            let mut response = request.config().timeout_global(Some(self.env.timeout * 3)).build().call()?;
            let status = response.status().as_u16();
            if status != 200 {
                let code = header(response.headers(), "x-error-code");
                return Err(self.status_failure(status, code.as_deref(), &self.env.endpoint, None));
            }
            let info: Info = response.body_mut().read_json().map_err(|e| {
                Failure::Fatal(anyhow!(e).context(format!("{}: unreadable model info", self.repo_label())))
            })?;
            Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
        })
    }

    /// The revision as it goes in a URL: a branch such as `refs/pr/1` with its slashes escaped,
    /// as huggingface_hub and hf-hub write it.
    fn url_revision(&self) -> String {
        self.spec.revision.replace('/', "%2F")
    }

    /// The `.gguf` files of the repo, sorted, for a "not found" message.
    pub(super) fn list_ggufs(&self) -> Result<Vec<String>> {
        let mut files: Vec<String> = self.list_files()?.into_iter().filter(|f| ends_with_gguf(f)).collect();
        files.sort();
        Ok(files)
    }

    /// The file's commit, etag and size: a HEAD on its resolve URL, following only relative
    /// redirects, as huggingface_hub's `get_hf_file_metadata` does. An absolute redirect
    /// points at the CDN, where the bytes are then fetched.
    pub(super) fn head(&self, file: &str) -> Result<FileMeta> {
        let resolve_url =
            format!("{}/{}/resolve/{}/{file}", self.env.endpoint, self.spec.repo, self.url_revision());
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
                        url = format!("{}{location}", crate::net::origin(&url));
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
}

pub(super) fn header(headers: &ureq::http::HeaderMap, name: &str) -> Option<String> {
    headers.get(name)?.to_str().ok().map(str::to_string)
}

pub(super) fn backoff(failures: u32) -> Duration {
    crate::net::backoff(BACKOFF_BASE, failures)
}
