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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ureq::Agent;

use super::sse::{Item, SseReader};
use super::{Backend, Event, EventStream, Finish, Request};
use crate::constrain::Constraint;
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
            check: request.constraint.clone().map(|c| (c, String::new())),
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
    /// The constraint the answer must match, and the answer so far: checked at the end, since
    /// a server may ignore the fields that carry it.
    check: Option<(Constraint, String)>,
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
                    complete: None,
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
                                complete: None,
                            }));
                        }
                        self.chunks += 1;
                    }
                    if let (Event::Text { text, .. }, Some((_, answer))) = (&event, &mut self.check) {
                        answer.push_str(text);
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
        let item = match (item, &self.check) {
            (Ok(Event::Finish(mut finish)), Some((constraint, text))) => {
                finish.complete = Some(constraint.matches(text));
                Ok(Event::Finish(finish))
            }
            (item, _) => item,
        };
        Some(item)
    }
}

mod chunks;
mod client;
#[cfg(test)]
mod tests;

use chunks::*;
pub use client::base_url;
use client::*;
