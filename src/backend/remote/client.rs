//! The requests of the remote backend: the model list, the request body, sending with retries
//! until a server answers, and the error lines of what can go wrong; and `--endpoint`'s strict
//! parsing.

use std::io::Read;
use std::sync::mpsc::Sender;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use super::*;

impl Client {
    /// Adds the key to a request for `url`, only if `url` is at the endpoint's origin.
    pub(super) fn authorized<B>(
        &self,
        request: ureq::RequestBuilder<B>,
        url: &str,
    ) -> ureq::RequestBuilder<B> {
        crate::net::bearer(request, self.key.as_deref(), url, &self.base)
    }

    pub(super) fn models(&self) -> Result<Vec<String>> {
        let url = format!("{}/models", self.base);
        let response =
            self.authorized(self.agent.get(&url), &url).call().map_err(|e| connect_error(&self.base, e))?;
        let status = response.status().as_u16();
        let location = response.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let text = read_capped(response.into_body().into_reader())?;
        if (300..400).contains(&status) {
            bail!(
                "{url} redirects ({status}) to {}: give that address as --endpoint",
                location.as_deref().map(redact_userinfo).unwrap_or_else(|| "another address".to_owned())
            );
        }
        if !(200..300).contains(&status) {
            return Err(status_error(status, &text, self.key.is_some()))
                .with_context(|| format!("cannot list the models at {url}"));
        }
        let list: Value = serde_json::from_str(&text).with_context(|| {
            format!("{url} did not answer with JSON: is this an OpenAI-compatible server?")
        })?;
        let models = list["data"]
            .as_array()
            .ok_or_else(|| anyhow!("{url} answered without a \"data\" list of models"))?
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect();
        Ok(models)
    }

    /// The path and JSON body of a request.
    pub(super) fn body(&self, request: &Request) -> (&'static str, Value) {
        let (path, mut body) = if request.raw {
            let prompt = match &request.system {
                Some(system) => format!("{system}\n\n{}", request.prompt),
                None => request.prompt.clone(),
            };
            ("/completions", json!({ "model": self.model, "prompt": prompt }))
        } else {
            let mut messages = Vec::new();
            if let Some(system) = &request.system {
                messages.push(json!({ "role": "system", "content": system }));
            }
            for turn in &request.history {
                messages.push(json!({ "role": turn.role, "content": turn.content }));
            }
            messages.push(json!({ "role": "user", "content": request.prompt }));
            let mut body = json!({ "model": self.model, "messages": messages });
            if let Some(on) = request.enable_thinking {
                // The template variable, as vLLM, SGLang and llama-server take it.
                body["chat_template_kwargs"] = json!({ "enable_thinking": on });
            }
            ("/chat/completions", body)
        };
        let s = &request.sampling;
        body["stream"] = json!(true);
        body["stream_options"] = json!({ "include_usage": true });
        body["temperature"] = json!(s.temperature);
        body["top_p"] = json!(s.top_p);
        if let Some(n) = request.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if request.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Some(n) = request.logprobs {
            if request.raw {
                // The completions API's older form: the number of alternatives.
                body["logprobs"] = json!(n);
            } else {
                body["logprobs"] = json!(true);
                body["top_logprobs"] = json!(n);
            }
        }
        if !request.stop.is_empty() {
            body["stop"] = json!(request.stop);
        }
        let explicit = &request.explicit;
        if let Some(seed) = explicit.seed {
            body["seed"] = json!(seed);
        }
        if let Some(k) = explicit.top_k {
            body["top_k"] = json!(k);
        }
        if let Some(p) = explicit.min_p {
            body["min_p"] = json!(p);
        }
        if let Some(r) = explicit.repeat_penalty {
            // vLLM and SGLang call it repetition_penalty, llama-server repeat_penalty; each
            // ignores the other's name.
            body["repetition_penalty"] = json!(r);
            body["repeat_penalty"] = json!(r);
        }
        if let Some(constraint) = &request.constraint {
            constrain(&mut body, constraint);
        }
        (path, body)
    }

    /// Runs one request on its thread, sending events to `tx` until the answer ends or the
    /// stream's side hangs up.
    ///
    /// A request is tried again (up to [`MAX_ATTEMPTS`] in all) when it fails before the first
    /// byte of the answer: a refused or reset connection, a busy server's status, or a stream
    /// that breaks before it has carried any text (after its headers and a role-only chunk, say).
    pub(super) fn run(&self, path: &str, body: &str, stop_given: bool, tx: &Sender<Msg>) -> Result<()> {
        let url = format!("{}{path}", self.base);
        let mut attempt = 0;
        loop {
            let Some(response) = self.send(&url, body, &mut attempt, tx)? else { return Ok(()) };
            let is_json = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim_start().starts_with("application/json"));
            let reader = response.into_body().into_reader();
            if is_json {
                // A server that ignored "stream": the whole answer as one JSON object.
                let text = read_capped(reader)?;
                let answer: Value =
                    serde_json::from_str(&text).with_context(|| format!("{url} answered bad JSON"))?;
                let mut parser = ChunkParser::new(stop_given);
                for event in parser.chunk(&answer)? {
                    let _ = tx.send(Msg::Event(event));
                }
                let finish = parser.finish.clone().unwrap_or(parser.finish_with(FinishReason::Eos));
                let _ = tx.send(Msg::Event(Event::Finish(parser.with_usage(finish))));
                return Ok(());
            }
            let mut progress = Progress::default();
            match stream_events(reader, &self.base, stop_given, tx, &mut progress) {
                Err(e) if progress.broke && !progress.sent && attempt < MAX_ATTEMPTS => {
                    let wait = self.note_retry(&format!("{e:#}"), backoff(attempt));
                    if tx.send(Msg::Alive).is_err() {
                        return Ok(());
                    }
                    std::thread::sleep(wait);
                }
                other => return other,
            }
        }
    }

    /// Sends the request until a server answers it with success (`None` when the stream's side
    /// hung up meanwhile), retrying what may pass on another attempt.
    pub(super) fn send(
        &self,
        url: &str,
        body: &str,
        attempt: &mut u32,
        tx: &Sender<Msg>,
    ) -> Result<Option<ureq::http::Response<ureq::Body>>> {
        loop {
            *attempt += 1;
            let attempt = *attempt;
            let request = self
                .authorized(self.agent.post(url), url)
                .header("Content-Type", "application/json")
                .header("Accept", "text/event-stream");
            let wait = match request.send(body) {
                Ok(response) if response.status().is_success() => return Ok(Some(response)),
                Ok(response) => {
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(Duration::from_secs_f64);
                    let location =
                        response.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let text = read_capped(response.into_body().into_reader()).unwrap_or_default();
                    if (300..400).contains(&status) {
                        bail!(
                            "{url} redirects ({status}) to {}: give that address as --endpoint",
                            location
                                .as_deref()
                                .map(redact_userinfo)
                                .unwrap_or_else(|| "another address".to_owned())
                        );
                    }
                    if status == 404 {
                        return Err(self.not_found(url, &text));
                    }
                    let err = status_error(status, &text, self.key.is_some());
                    if !matches!(status, 429 | 502 | 503 | 504) || attempt >= MAX_ATTEMPTS {
                        return Err(err).with_context(|| format!("{url} failed"));
                    }
                    self.note_retry(&format!("{err:#}"), retry_after.unwrap_or(backoff(attempt)))
                }
                Err(e) => {
                    let retry = crate::net::is_retryable(&e);
                    if !retry || attempt >= MAX_ATTEMPTS {
                        return Err(connect_error(&self.base, e));
                    }
                    self.note_retry(&format!("{:#}", connect_error(&self.base, e)), backoff(attempt))
                }
            };
            if tx.send(Msg::Alive).is_err() {
                return Ok(None);
            }
            std::thread::sleep(wait.min(MAX_BACKOFF));
        }
    }

    /// A 404: a model the server does not serve (then the message lists what it does), or a
    /// wrong base URL.
    pub(super) fn not_found(&self, url: &str, text: &str) -> anyhow::Error {
        match self.models() {
            Ok(models) if !models.contains(&self.model) => anyhow!(
                "the server at {} does not serve the model '{}'; it serves: {} (choose one with -m)",
                self.base,
                self.model,
                if models.is_empty() { "nothing".to_owned() } else { model_list(&models, &self.base) }
            ),
            _ => anyhow!(
                "{url} was not found (404{}): is {} the server's OpenAI-compatible base URL (usually ending in /v1)?",
                message_suffix(text),
                self.base
            ),
        }
    }

    pub(super) fn note_retry(&self, why: &str, wait: Duration) -> Duration {
        let wait = wait.min(MAX_BACKOFF);
        if !self.quiet {
            output::print_note(&format!("{why}; trying again in {:.1} s", wait.as_secs_f64()));
        }
        wait
    }
}

/// The base URL from `--endpoint`: http(s) only, no trailing slash, `/v1` when it has no path.
pub fn base_url(endpoint: &str) -> Result<String> {
    const EXAMPLE: &str = "such as http://localhost:8000/v1";
    let endpoint = endpoint.trim();
    // Never echo a password: every message shows the URL with its user information hidden.
    let shown = redact_userinfo(endpoint);
    let Some(rest) = endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://")) else {
        bail!("--endpoint must be an http:// or https:// URL, {EXAMPLE} (got '{shown}')");
    };
    if rest.is_empty() || rest.starts_with('/') {
        bail!("--endpoint '{shown}' has no host");
    }
    // Parsed with the parser the connection uses (the `http` crate's, through ureq), then
    // checked strictly: that parser takes a port out of range as no port at all, so
    // `:99999` connected to port 80 and sent the key there.
    let uri: ureq::http::Uri = endpoint
        .parse()
        .map_err(|e| anyhow!("--endpoint '{shown}' is not a valid URL ({e}): give one {EXAMPLE}"))?;
    let Some(authority) = uri.authority() else {
        bail!("--endpoint '{shown}' has no host");
    };
    if authority.as_str().contains('@') {
        bail!(
            "--endpoint '{shown}' has a user name or password in it: give the key with --api-key or \
             STREAMGEN_API_KEY instead"
        );
    }
    let host = authority.host();
    if host.is_empty() {
        bail!("--endpoint '{shown}' has no host");
    }
    if let Some(port) = authority.as_str()[host.len()..].strip_prefix(':')
        && !port.parse::<u16>().is_ok_and(|p| p > 0)
    {
        bail!("--endpoint '{shown}' has port '{port}', which is not a port number (1 to 65535)");
    }
    if uri.query().is_some() || endpoint.contains('#') {
        bail!("--endpoint '{shown}' has a query or fragment: give the API's base URL, {EXAMPLE}");
    }
    let path = uri.path().trim_end_matches('/');
    let path = if path.is_empty() { "/v1" } else { path };
    Ok(format!("{}://{authority}{path}", uri.scheme_str().unwrap_or("http")))
}

/// The first few of `models` for an error line, then how many more and where to see them all:
/// a server with thousands of models must not make a line of hundreds of kilobytes.
pub(super) fn model_list(models: &[String], base: &str) -> String {
    const SHOWN: usize = 8;
    let mut list =
        models.iter().take(SHOWN).map(|m| m.chars().take(100).collect::<String>()).collect::<Vec<_>>();
    if models.len() > SHOWN {
        list.push(format!("and {} more, listed at {base}/models", models.len() - SHOWN));
    }
    list.join(", ")
}

/// The pause before attempt `attempt + 1`: 0.5 s, 1 s, 2 s...
pub(super) fn backoff(attempt: u32) -> Duration {
    crate::net::backoff(FIRST_BACKOFF, attempt)
}

/// A transport error as one line that says what to check.
pub(super) fn connect_error(base: &str, e: ureq::Error) -> anyhow::Error {
    let why = match &e {
        ureq::Error::HostNotFound => "the host name does not resolve",
        ureq::Error::ConnectionFailed => "the connection failed (is the server running?)",
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused (is the server running, on that port?)"
        }
        ureq::Error::Timeout(_) => "no answer in time",
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => "the TLS handshake failed",
        _ => "a network error",
    };
    anyhow::Error::new(e).context(format!("cannot reach the server at {base}: {why}"))
}

/// An error status as one line, with the server's message and what to do.
pub(super) fn status_error(status: u16, text: &str, key_given: bool) -> anyhow::Error {
    let message = message_suffix(text);
    match status {
        401 | 403 if key_given => {
            anyhow!(
                "the server refused the API key ({status}{message}): check --api-key or STREAMGEN_API_KEY"
            )
        }
        401 | 403 => anyhow!(
            "the server wants an API key ({status}{message}): give it with --api-key or STREAMGEN_API_KEY"
        ),
        429 => anyhow!("the server is busy (429 Too Many Requests{message})"),
        400 | 422 => anyhow!("the server rejected the request ({status}{message})"),
        _ => anyhow!("the server answered {status}{message}"),
    }
}

/// `: message` from an error body (OpenAI's `{"error": {"message": ...}}`, FastAPI's
/// `{"detail": ...}`, or plain text), or nothing.
pub(super) fn message_suffix(text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let message = match serde_json::from_str::<Value>(text) {
        Ok(v) => ["error", "detail", "message"]
            .iter()
            .find_map(|k| v.get(*k).filter(|e| !e.is_null()))
            .map_or_else(|| truncate(text, 300), error_text),
        Err(_) => truncate(text, 300),
    };
    format!(": {message}")
}

/// The message of an `error` value: a string, or an object with `message`.
pub(super) fn error_text(error: &Value) -> String {
    let text = match error {
        Value::String(s) => s.clone(),
        v => v.get("message").and_then(Value::as_str).map_or_else(|| v.to_string(), str::to_owned),
    };
    truncate(&text, 300)
}

pub(super) fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

/// Reads at most [`MAX_BODY`] bytes of a body as text.
pub(super) fn read_capped(reader: impl Read) -> Result<String> {
    let mut bytes = Vec::new();
    reader.take(MAX_BODY).read_to_end(&mut bytes).context("cannot read the server's answer")?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Puts `constraint` in a request body as servers take it: a JSON Schema as OpenAI's
/// `response_format` (vLLM, llama-server, SGLang and Ollama's OpenAI endpoint all read it),
/// and the rest as vLLM's `structured_outputs` (`choice`, `regex`, `grammar`; vLLM's guidance
/// backend reads Lark grammars). A server without these fields answers freely: the stream
/// checks the answer against the constraint (see `RemoteStream`), so that is an error, not a
/// wrong answer taken for a right one.
fn constrain(body: &mut Value, constraint: &Constraint) {
    match constraint {
        Constraint::JsonObject => body["response_format"] = json!({ "type": "json_object" }),
        Constraint::JsonSchema(schema) => {
            body["response_format"] = json!({
                "type": "json_schema",
                "json_schema": { "name": "answer", "schema": schema, "strict": true },
            });
        }
        Constraint::Choice(choices) => body["structured_outputs"] = json!({ "choice": choices }),
        Constraint::Regex(re) => body["structured_outputs"] = json!({ "regex": re }),
        Constraint::Lark(grammar) => body["structured_outputs"] = json!({ "grammar": grammar }),
    }
}
