//! The remote backend: a client for an OpenAI-compatible server (vLLM, llama.cpp's
//! llama-server, Ollama, SGLang), for models that outgrow one machine.
//!
//! `--raw` posts to `/completions`, anything else to `/chat/completions` with the system
//! prompt as a system message, always streamed (`text/event-stream`). Each request runs on a
//! thread of its own that turns the server's chunks into [`Event`]s and sends them over a
//! channel; the stream on the caller's side waits in short ticks, so Ctrl-C, a stop string or
//! a closed pipe end it at once, and a server that goes silent for `--idle-timeout` is given up
//! on (an idle timeout, not a total one: a long prompt may keep a server busy for minutes, and
//! any byte, including an SSE comment ping, counts as a sign of life).
//!
//! Busy servers (429, 502, 503, 504) and dropped connections are retried with backoff, but only
//! before the first byte of the answer: text that has reached stdout is never asked for twice.

use std::io::{BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use ureq::Agent;

use super::sse::{Item, SseReader};
use super::{Backend, Event, EventStream, Finish, Request};
use crate::event::FinishReason;
use crate::output::{self, redact_userinfo};

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// The OpenAI-compatible base URL, such as `http://gpu-box:8000/v1`. A URL with no path
    /// gets `/v1`.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The served model's name; `None`: the only one the server lists.
    pub model: Option<String>,
    /// Give up when the server sends nothing for this long.
    pub idle_timeout: Duration,
    /// No retry notes on stderr.
    pub quiet: bool,
}

impl RemoteOptions {
    /// Options for `endpoint` with the defaults: no key, the only served model, a
    /// [`DEFAULT_IDLE_TIMEOUT`].
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            api_key: None,
            model: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            quiet: false,
        }
    }
}

/// Requests in flight at once for `--each-line` by default: enough for a server's batching
/// to matter, few enough to leave room for other clients.
pub const DEFAULT_PARALLEL: usize = 4;

/// The default `--idle-timeout`: long enough for a server to read a long prompt.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Connecting (DNS and TCP/TLS handshake) takes at most this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at a request that meets a busy server or a dropped connection before any text.
const MAX_ATTEMPTS: u32 = 4;
/// The first pause between attempts; it doubles, and a `Retry-After` header replaces it.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest pause between attempts, even if `Retry-After` asks for more.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a waiting stream checks for Ctrl-C and silence.
const TICK: Duration = Duration::from_millis(50);
/// After the finish reason, how long to wait for the usage chunk and `[DONE]` before ending
/// anyway (some servers keep the connection open).
const FINISH_GRACE: Duration = Duration::from_secs(2);
/// The most of an error body or a non-streamed answer that is read.
const MAX_BODY: u64 = 16 << 20;

/// A client for one server and model.
pub struct Remote {
    client: Arc<Client>,
    idle_timeout: Duration,
}

/// What a request's thread needs.
struct Client {
    agent: Agent,
    /// The base URL, without a trailing slash.
    base: String,
    key: Option<String>,
    model: String,
    quiet: bool,
}

impl Remote {
    /// A client for `opts.endpoint`. Without a model name, asks the server which models it
    /// serves and takes the only one.
    pub fn new(opts: RemoteOptions) -> Result<Self> {
        let base = base_url(&opts.endpoint)?;
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            // A redirect could carry the key elsewhere; the user is told the new address.
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_resolve(Some(CONNECT_TIMEOUT))
            // A backstop for the reading thread; the stream enforces the idle timeout itself.
            .timeout_per_read(Some(opts.idle_timeout + FINISH_GRACE))
            .accept_encoding(ureq::config::AutoHeaderValue::None)
            .user_agent(format!("streamgen/{}", env!("CARGO_PKG_VERSION")).as_str())
            .build()
            .into();
        let mut client = Client { agent, base, key: opts.api_key, model: String::new(), quiet: opts.quiet };
        client.model = match opts.model {
            Some(model) => model,
            None => match client.models()?.as_slice() {
                [one] => one.clone(),
                [] => bail!("the server at {} lists no models: name one with -m", client.base),
                many => bail!(
                    "the server at {} serves {} models ({}): choose one with -m",
                    client.base,
                    many.len(),
                    model_list(many, &client.base)
                ),
            },
        };
        Ok(Self { client: Arc::new(client), idle_timeout: opts.idle_timeout })
    }

    /// The served model's name.
    pub fn model(&self) -> &str {
        &self.client.model
    }

    /// The models the server lists at `/models`.
    pub fn models(&self) -> Result<Vec<String>> {
        self.client.models()
    }
}

impl Backend for Remote {
    fn stream(&self, request: &Request) -> Result<EventStream<'_>> {
        let (path, body) = self.client.body(request);
        if request.verbose {
            let pretty = serde_json::to_string_pretty(&body).unwrap_or_default();
            output::print_note(&format!("request to {}{path}:\n{pretty}", self.client.base));
        }
        let (tx, rx) = mpsc::channel();
        let client = self.client.clone();
        let stop_given = !request.stop.is_empty();
        let body = body.to_string();
        std::thread::Builder::new()
            .name("streamgen-request".into())
            .spawn(move || {
                if let Err(e) = client.run(path, &body, stop_given, &tx) {
                    let _ = tx.send(Msg::Fail(e));
                }
            })
            .context("cannot start a thread for the request")?;
        Ok(Box::new(RemoteStream {
            rx,
            limit: request.max_tokens,
            chunks: 0,
            cancel: request.cancel.clone(),
            idle_timeout: self.idle_timeout,
            base: self.client.base.clone(),
            last_heard: Instant::now(),
            pending: None,
            done: false,
        }))
    }

    fn default_parallel(&self) -> usize {
        DEFAULT_PARALLEL
    }
}

/// What a request's thread tells its stream.
enum Msg {
    /// A sign of life without content (an SSE comment, a retry pause).
    Alive,
    Event(Event),
    /// The finish reason has arrived; the final [`Event::Finish`] (with usage) should follow.
    FinishSeen(Finish),
    Fail(anyhow::Error),
}

/// The caller's side of a request.
struct RemoteStream {
    rx: Receiver<Msg>,
    /// `-n`, enforced here too: a server that ignores `max_tokens` (or reasons forever) would
    /// otherwise stream without end.
    limit: Option<usize>,
    /// Chunks of answer or reasoning text so far: the server's tokens, as far as we can count
    /// them (a chunk is one token on every server we know).
    chunks: usize,
    cancel: Arc<AtomicBool>,
    idle_timeout: Duration,
    base: String,
    last_heard: Instant,
    pending: Option<Finish>,
    done: bool,
}

impl Iterator for RemoteStream {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Result<Event>> {
        if self.done {
            return None;
        }
        let item = loop {
            if self.cancel.load(Ordering::Relaxed) {
                break Ok(Event::Finish(Finish {
                    reason: FinishReason::Interrupted,
                    prompt_tokens: None,
                    generated_tokens: None,
                }));
            }
            match self.rx.recv_timeout(TICK) {
                Ok(Msg::Alive) => self.last_heard = Instant::now(),
                Ok(Msg::FinishSeen(finish)) => {
                    self.last_heard = Instant::now();
                    self.pending = Some(finish);
                }
                Ok(Msg::Event(event)) => {
                    self.last_heard = Instant::now();
                    if matches!(event, Event::Finish(_)) {
                        break Ok(event);
                    }
                    let text = matches!(&event, Event::Text { text, .. } | Event::Reasoning { text } if !text.is_empty());
                    if text {
                        // One chunk past `-n`: the server ignores max_tokens. Its finish, if it
                        // sends one after the n-th chunk, is taken as usual.
                        if self.limit.is_some_and(|n| self.chunks >= n) {
                            break Ok(Event::Finish(Finish {
                                reason: FinishReason::Length,
                                prompt_tokens: None,
                                generated_tokens: Some(self.chunks),
                            }));
                        }
                        self.chunks += 1;
                    }
                    return Some(Ok(event));
                }
                Ok(Msg::Fail(e)) => break Err(e),
                Err(RecvTimeoutError::Timeout) => {
                    let quiet_for = self.last_heard.elapsed();
                    if let Some(finish) = self.pending.take_if(|_| quiet_for >= FINISH_GRACE) {
                        break Ok(Event::Finish(finish));
                    }
                    if quiet_for >= self.idle_timeout {
                        break Err(anyhow!(
                            "the server at {} sent nothing for {} s: giving up (--idle-timeout)",
                            self.base,
                            self.idle_timeout.as_secs_f64()
                        ));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    break Err(anyhow!("the request to {} ended without an answer", self.base));
                }
            }
        };
        // Dropping the receiver makes the thread's next send fail, and it closes the
        // connection, which tells the server to stop generating.
        self.done = true;
        Some(item)
    }
}

impl Client {
    /// Adds the key to a request for `url`, only if `url` is at the endpoint's origin.
    fn authorized<B>(&self, request: ureq::RequestBuilder<B>, url: &str) -> ureq::RequestBuilder<B> {
        crate::net::bearer(request, self.key.as_deref(), url, &self.base)
    }

    fn models(&self) -> Result<Vec<String>> {
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
    fn body(&self, request: &Request) -> (&'static str, Value) {
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
        (path, body)
    }

    /// Runs one request on its thread, sending events to `tx` until the answer ends or the
    /// stream's side hangs up.
    ///
    /// A request is tried again (up to [`MAX_ATTEMPTS`] in all) when it fails before the first
    /// byte of the answer: a refused or reset connection, a busy server's status, or a stream
    /// that breaks before it has carried any text (after its headers and a role-only chunk, say).
    fn run(&self, path: &str, body: &str, stop_given: bool, tx: &Sender<Msg>) -> Result<()> {
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
    fn send(
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
    fn not_found(&self, url: &str, text: &str) -> anyhow::Error {
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

    fn note_retry(&self, why: &str, wait: Duration) -> Duration {
        let wait = wait.min(MAX_BACKOFF);
        if !self.quiet {
            output::print_note(&format!("{why}; trying again in {:.1} s", wait.as_secs_f64()));
        }
        wait
    }
}

/// A reader that tells the stream the server is alive whenever bytes arrive, not only when a
/// whole line or event has: a server that drips an event out byte by byte is slow, not silent.
/// (What bounds one that sends bytes forever: a line longer than [`super::sse::MAX_LINE`] is an
/// error, and `-n` ends an answer whose events keep coming.)
struct Activity<'a, R> {
    inner: R,
    tx: &'a Sender<Msg>,
    last_told: Instant,
}

impl<R: Read> Read for Activity<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        // At most one message per tick: a fast stream reads often.
        if n > 0 && self.last_told.elapsed() >= TICK {
            self.last_told = Instant::now();
            let _ = self.tx.send(Msg::Alive);
        }
        Ok(n)
    }
}

/// Reads the event stream of a successful response, sending its events.
/// How far a stream got: whether it carried any event (then it is not tried again: something
/// may have reached the output), and whether it ended by breaking off.
#[derive(Default)]
struct Progress {
    sent: bool,
    broke: bool,
}

fn stream_events(
    reader: impl Read,
    base: &str,
    stop_given: bool,
    tx: &Sender<Msg>,
    progress: &mut Progress,
) -> Result<()> {
    let reader = Activity { inner: reader, tx, last_told: Instant::now() };
    let mut sse = SseReader::new(BufReader::new(reader));
    let mut parser = ChunkParser::new(stop_given);
    let mut done = false;
    loop {
        let item = match sse.next_item() {
            Ok(Some(item)) => item,
            Ok(None) => break,
            // The answer is complete; only the closing formalities were lost.
            Err(_) if parser.finish.is_some() => break,
            Err(e) => {
                progress.broke = true;
                let when = if progress.sent { "in the middle of the answer" } else { "before the answer" };
                return Err(e).with_context(|| format!("the connection to {base} broke {when}"));
            }
        };
        let msgs = match item {
            Item::Comment => vec![Msg::Alive],
            Item::Event { data, .. } if data.trim() == "[DONE]" => {
                done = true;
                break;
            }
            Item::Event { name: Some(name), data } if name == "error" => {
                bail!("the server reported an error{}", message_suffix(&data))
            }
            Item::Event { data, .. } => {
                let chunk: Value = serde_json::from_str(&data).with_context(|| {
                    format!("{base} sent a chunk that is not JSON: {}", truncate(&data, 200))
                })?;
                let had_finish = parser.finish.is_some();
                let mut msgs: Vec<Msg> = parser.chunk(&chunk)?.into_iter().map(Msg::Event).collect();
                if let (false, Some(finish)) = (had_finish, &parser.finish) {
                    msgs.push(Msg::FinishSeen(parser.with_usage(finish.clone())));
                }
                msgs
            }
        };
        for msg in msgs {
            progress.sent |= matches!(msg, Msg::Event(_) | Msg::FinishSeen(_));
            if tx.send(msg).is_err() {
                // The caller stopped listening: returning drops the connection.
                return Ok(());
            }
        }
    }
    let finish = match (&parser.finish, done) {
        (Some(finish), _) => finish.clone(),
        (None, true) => parser.finish_with(FinishReason::Eos),
        (None, false) => {
            progress.broke = true;
            let when = if progress.sent { "in the middle of the answer" } else { "before the answer" };
            bail!("the connection to {base} closed {when} (no finish reason and no [DONE])")
        }
    };
    let _ = tx.send(Msg::Event(Event::Finish(parser.with_usage(finish))));
    Ok(())
}

/// Turns the server's JSON chunks into events, remembering the finish reason and usage.
struct ChunkParser {
    /// Stop strings were sent: the server's `stop` may mean one of them matched.
    stop_given: bool,
    finish: Option<Finish>,
    usage: Option<(usize, usize)>,
}

impl ChunkParser {
    fn new(stop_given: bool) -> Self {
        Self { stop_given, finish: None, usage: None }
    }

    fn finish_with(&self, reason: FinishReason) -> Finish {
        Finish { reason, prompt_tokens: None, generated_tokens: None }
    }

    fn with_usage(&self, mut finish: Finish) -> Finish {
        if let Some((prompt, completion)) = self.usage {
            finish.prompt_tokens = Some(prompt);
            finish.generated_tokens = Some(completion);
        }
        finish
    }

    /// The events of one chunk (a streamed delta, or a whole non-streamed answer).
    fn chunk(&mut self, chunk: &Value) -> Result<Vec<Event>> {
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            bail!("the server reported an error: {}", error_text(error));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            let count = |key: &str| usage[key].as_u64().map(|n| n as usize);
            if let (Some(prompt), Some(completion)) = (count("prompt_tokens"), count("completion_tokens")) {
                self.usage = Some((prompt, completion));
            }
        }
        let mut events = Vec::new();
        // One answer per request (n = 1): the first choice.
        let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) else {
            return Ok(events);
        };
        // Streamed chat chunks carry `delta`, a non-streamed chat answer `message`, completions
        // `text`.
        let delta = choice.get("delta").or_else(|| choice.get("message")).unwrap_or(&Value::Null);
        // vLLM and llama-server say `reasoning_content`, newer vLLM and Ollama `reasoning`.
        let reasoning = ["reasoning_content", "reasoning"].iter().find_map(|k| delta[k].as_str());
        if let Some(text) = reasoning.filter(|t| !t.is_empty()) {
            events.push(Event::Reasoning { text: text.to_owned() });
        }
        let text = delta["content"].as_str().or_else(|| choice["text"].as_str());
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            events.push(Event::Text { text: text.to_owned(), token: None });
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            let reason = match reason {
                "length" => FinishReason::Length,
                // A server does not say whether a stop string or the model's end token ended
                // the answer.
                "stop" if self.stop_given => FinishReason::Stop,
                _ => FinishReason::Eos,
            };
            self.finish.get_or_insert(Finish { reason, prompt_tokens: None, generated_tokens: None });
        }
        Ok(events)
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
fn model_list(models: &[String], base: &str) -> String {
    const SHOWN: usize = 8;
    let mut list =
        models.iter().take(SHOWN).map(|m| m.chars().take(100).collect::<String>()).collect::<Vec<_>>();
    if models.len() > SHOWN {
        list.push(format!("and {} more, listed at {base}/models", models.len() - SHOWN));
    }
    list.join(", ")
}

/// The pause before attempt `attempt + 1`: 0.5 s, 1 s, 2 s...
fn backoff(attempt: u32) -> Duration {
    crate::net::backoff(FIRST_BACKOFF, attempt)
}

/// A transport error as one line that says what to check.
fn connect_error(base: &str, e: ureq::Error) -> anyhow::Error {
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
fn status_error(status: u16, text: &str, key_given: bool) -> anyhow::Error {
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
fn message_suffix(text: &str) -> String {
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
fn error_text(error: &Value) -> String {
    let text = match error {
        Value::String(s) => s.clone(),
        v => v.get("message").and_then(Value::as_str).map_or_else(|| v.to_string(), str::to_owned),
    };
    truncate(&text, 300)
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

/// Reads at most [`MAX_BODY`] bytes of a body as text.
fn read_capped(reader: impl Read) -> Result<String> {
    let mut bytes = Vec::new();
    reader.take(MAX_BODY).read_to_end(&mut bytes).context("cannot read the server's answer")?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(base_url("http://gpu:8000/v1/").ok().as_deref(), Some("http://gpu:8000/v1"));
        assert_eq!(base_url("http://localhost:11434").ok().as_deref(), Some("http://localhost:11434/v1"));
        assert_eq!(
            base_url("https://api.example/openai/v1").ok().as_deref(),
            Some("https://api.example/openai/v1")
        );
        assert_eq!(base_url("http://[::1]:8080").ok().as_deref(), Some("http://[::1]:8080/v1"));
        for bad in [
            "localhost:8000",
            "ftp://x/v1",
            "http://",
            "http:///v1",
            "http://127.0.0.1:99999/v1",
            "http://127.0.0.1:0/v1",
            "http://127.0.0.1:/v1",
            "http://host:80x/v1",
            "http://a b/v1",
            "http://user:pass@host/v1",
            "http://host/v1?x=1",
            "http://host/v1#f",
        ] {
            let err = format!("{:#}", base_url(bad).expect_err(bad));
            assert!(!err.contains("pass@") && !err.contains('\n'), "{bad}: {err}");
        }
        assert_eq!(redact_userinfo("http://user:pass@host/v1"), "http://***@host/v1");
        assert_eq!(redact_userinfo("http://host/a@b"), "http://host/a@b");
    }

    #[test]
    fn chunks_become_events() {
        let mut p = ChunkParser::new(false);
        let chunk = json!({"choices": [{"delta": {"reasoning_content": "hm", "content": null}, "finish_reason": null}]});
        assert_eq!(p.chunk(&chunk).ok(), Some(vec![Event::Reasoning { text: "hm".into() }]));
        let chunk = json!({"choices": [{"delta": {"content": "Hi"}, "finish_reason": "length"}]});
        assert_eq!(p.chunk(&chunk).ok(), Some(vec![Event::Text { text: "Hi".into(), token: None }]));
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}});
        assert_eq!(p.chunk(&usage).ok(), Some(vec![]));
        let finish = p.finish.clone().map(|f| p.with_usage(f));
        assert_eq!(
            finish,
            Some(Finish { reason: FinishReason::Length, prompt_tokens: Some(5), generated_tokens: Some(1) })
        );
        assert!(p.chunk(&json!({"error": {"message": "boom"}})).is_err());
    }

    #[test]
    fn error_messages_are_found_in_common_shapes() {
        assert_eq!(message_suffix(r#"{"error":{"message":"no such model"}}"#), ": no such model");
        assert_eq!(message_suffix(r#"{"detail":"Not Found"}"#), ": Not Found");
        assert_eq!(message_suffix("plain"), ": plain");
        assert_eq!(message_suffix(""), "");
    }
}
