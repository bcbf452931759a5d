//! The seam between "what to answer" and "who computes it". A [`Backend`] turns a [`Request`]
//! (a prompt, sampling, limits) into a stream of [`Event`]s: answer text, reasoning text, and a
//! closing [`Finish`]. Two backends stand behind it: [`local::Local`], our own decoder on a
//! GGUF file, and [`remote::Remote`], a client for an OpenAI-compatible server (vLLM,
//! llama-server, Ollama, SGLang). Everything downstream of the events (stop strings, reasoning
//! routing, output, JSON, `--each-line` ordering) is shared, in [`crate::answer`].
//!
//! A Rust program streams an answer the way the binary does:
//!
//! ```no_run
//! use streamgen::backend::{Backend, Event, Request, local::Local};
//!
//! # fn main() -> anyhow::Result<()> {
//! let backend = Local::open("model.gguf".into())?;
//! for event in backend.stream(&Request::new("Name three colors."))? {
//!     match event? {
//!         Event::Text { text, .. } => print!("{text}"),
//!         Event::Finish(finish) => eprintln!("\n[{}]", finish.reason.as_str()),
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! and the same loop runs over a server with
//! `Remote::new(RemoteOptions::new("http://localhost:8080/v1"))?` (`examples/local.rs` and
//! `examples/remote.rs` are runnable).

pub mod local;
pub mod remote;
pub mod sse;

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;

pub use crate::chat::Message;
use crate::constrain::Constraint;
pub use crate::event::{Alternative, ChoiceScore, Event, Finish, FinishReason, TokenLogprob};
use crate::sample::SamplingParams;

/// One answer to compute.
#[derive(Debug, Clone)]
pub struct Request {
    /// The user's text: one user turn for chat models, the text to continue with `raw`.
    pub prompt: String,
    /// A system message.
    pub system: Option<String>,
    /// The conversation so far (`-c`): user and assistant turns, oldest first, before `prompt`.
    /// Not allowed with `raw`.
    pub history: Vec<Message>,
    /// Plain completion of `prompt`, without a chat template.
    pub raw: bool,
    /// Stop after this many generated tokens.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Which sampling settings the user chose explicitly: a remote backend sends only those
    /// (and the temperature and top-p every server knows), so a server's own defaults and
    /// its parameter names for the rest are not overridden by ours.
    pub explicit: ExplicitSampling,
    /// Stop strings (a remote backend also sends them; the caller filters them either way).
    pub stop: Vec<String>,
    /// Set to end the answer early (Ctrl-C): the stream then ends with
    /// [`FinishReason::Interrupted`].
    pub cancel: Arc<AtomicBool>,
    /// Print the prompt as the model or server gets it on stderr (`--verbose-prompt`).
    pub verbose: bool,
    /// The chat template's `enable_thinking` (`Some(false)`: `--no-think`); `None` leaves it
    /// out, so the template does what it does by default (Qwen3 thinks).
    pub enable_thinking: Option<bool>,
    /// What the answer must match (`--json-schema`, `--regex`…): the local engine masks every
    /// token with it; a server gets it as its structured-output fields.
    pub constraint: Option<Constraint>,
    /// Speculate from the text so far: `Some(false)` never, otherwise wherever the output
    /// cannot change (greedy decoding). Local engine only.
    pub lookup: Option<bool>,
    /// The most tokens proposed at once (lookup or draft model).
    pub draft_max: usize,
    /// `--ignore-eos`: the model's end-of-generation tokens do not end the answer (`-n` does);
    /// a server gets `ignore_eos`, which vLLM and llama-server know.
    pub ignore_eos: bool,
    /// `--logprobs N`: report each token's log-probability and its N most likely alternatives
    /// ([`Event::Logprob`]). Local engine, one prompt.
    pub logprobs: Option<usize>,
}

/// Sampling settings given on the command line rather than left at their defaults.
#[derive(Debug, Clone, Default)]
pub struct ExplicitSampling {
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub seed: Option<u64>,
}

impl Request {
    /// A request for `prompt` with the default sampling settings.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            system: None,
            history: Vec::new(),
            raw: false,
            max_tokens: None,
            sampling: SamplingParams::default(),
            explicit: ExplicitSampling::default(),
            stop: Vec::new(),
            cancel: Arc::new(AtomicBool::new(false)),
            verbose: false,
            enable_thinking: None,
            constraint: None,
            lookup: None,
            draft_max: 8,
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// The stream of one answer's events. Dropping it early (a stop string, a closed pipe) ends
/// the generation, or closes the connection to the server.
pub type EventStream<'a> = Box<dyn Iterator<Item = Result<Event>> + 'a>;

/// An event and when it arrived.
pub type Stamped = (Instant, Result<Event>);

/// Requests that arrive one at a time (`--each-line` reads stdin as it comes): `None` is an
/// empty line, answered with an empty line.
pub struct Lines {
    rx: Mutex<Receiver<Option<Request>>>,
}

/// What [`Lines::next`] gives: the request (`None` for an empty line) and the channel for
/// its events, opened in input order.
pub type Next = (Option<Request>, Sender<Stamped>);

impl Lines {
    pub fn new(rx: Receiver<Option<Request>>) -> Self {
        Self { rx: Mutex::new(rx) }
    }

    /// The next line, waiting for it; `None` at the end of the input. Its answer channel is
    /// opened in `answers` while the line is taken, so that answers are written in input order
    /// even when several threads take lines.
    pub fn next(&self, answers: &Answers) -> Option<Next> {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        let request = rx.recv().ok()?;
        Some(answers.open(request))
    }

    /// Like [`Lines::next`], without waiting: `Err(true)` when no line is there yet,
    /// `Err(false)` at the end of the input.
    pub fn try_next(&self, answers: &Answers) -> Result<Next, bool> {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        match rx.try_recv() {
            Ok(request) => Ok(answers.open(request)),
            Err(TryRecvError::Empty) => Err(true),
            Err(TryRecvError::Disconnected) => Err(false),
        }
    }
}

/// The writer's side of [`Lines`]: one channel of events per line, in input order, with
/// the time its request was taken.
pub struct Opened {
    pub line: usize,
    /// `false` for an empty line (its channel carries nothing).
    pub request: bool,
    /// The line's prompt (for the log); empty for an empty line.
    pub prompt: String,
    pub started: Instant,
    pub events: Receiver<Stamped>,
}

/// Opens the answer channels of [`Lines`] and hands them to the writer.
pub struct Answers {
    tx: Mutex<(Sender<Opened>, usize)>,
}

impl Answers {
    pub fn new(tx: Sender<Opened>) -> Self {
        Self { tx: Mutex::new((tx, 0)) }
    }

    fn open(&self, request: Option<Request>) -> Next {
        let (tx, rx) = mpsc::channel();
        let mut guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        guard.1 += 1;
        let opened = Opened {
            line: guard.1,
            request: request.is_some(),
            prompt: request.as_ref().map(|r| r.prompt.clone()).unwrap_or_default(),
            started: Instant::now(),
            events: rx,
        };
        // The writer gone means the run is ending; the answer then goes nowhere.
        let _ = guard.0.send(opened);
        (request, tx)
    }
}

/// Something that answers requests: the local engine or a server.
pub trait Backend: Sync {
    /// Starts answering `request`. Errors known before any work starts (a prompt too long for
    /// the context) come back here; the rest (a server that refuses, a broken connection) as
    /// an `Err` item of the stream, after which it ends.
    fn stream(&self, request: &Request) -> Result<EventStream<'_>>;

    /// How many answers `--each-line` computes at once unless `--parallel` says otherwise.
    fn default_parallel(&self) -> usize {
        1
    }

    /// Answers every line of `lines`, up to `parallel` at once, sending each one's events to
    /// its channel. A line whose channel has been dropped (a stop string, a closed pipe) is
    /// abandoned. This default runs `parallel` threads over [`Backend::stream`], which suits a
    /// server; the local engine batches its sequences instead.
    fn answer_lines(&self, lines: &Lines, answers: &Answers, parallel: usize) -> Result<()> {
        std::thread::scope(|scope| {
            for _ in 0..parallel.max(1) {
                scope.spawn(|| {
                    while let Some((request, tx)) = lines.next(answers) {
                        let Some(request) = request else { continue };
                        match self.stream(&request) {
                            Err(e) => {
                                let _ = tx.send((Instant::now(), Err(e)));
                            }
                            Ok(events) => {
                                for event in events {
                                    if tx.send((Instant::now(), event)).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                });
            }
        });
        Ok(())
    }
}
