//! One run of the filter: pick the backend (the local engine on a resolved and loaded model,
//! or a server), make a [`Request`] of each prompt, and write each answer's events through
//! [`crate::answer`] to [`crate::output`]. With `--each-line` and a backend that answers
//! several requests at once, lines are requested concurrently and written strictly in input
//! order: the line being printed streams, the ones behind it wait in their channels.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::answer::{Answer, AnswerOptions, empty_summary};
use crate::backend::local::Local;
pub use crate::backend::local::{Loaded, load};
use crate::backend::remote::Remote;
use crate::backend::{Backend, Event, Request};
use crate::chat::ChatTemplate;
use crate::config::Config;
use crate::generate::FinishReason;
use crate::hub::{self, HubOptions};
use crate::output::{self, Output, OutputOptions};

/// Process-wide signals shared with the Ctrl-C handler.
#[derive(Debug, Default)]
pub struct Signals {
    /// Set by Ctrl-C: stop after the current token. Requests carry it as their cancel flag.
    pub interrupted: Arc<AtomicBool>,
    /// Set while answers are being generated; before that, Ctrl-C exits at once.
    pub generating: AtomicBool,
}

/// How a whole run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    Done,
    Interrupted,
}

/// Runs the whole filter for `cfg`, writing to stdout. A reader that closes the pipe ends the
/// run normally.
pub fn run(cfg: &Config, signals: &Signals) -> Result<RunEnd> {
    let start = Instant::now();
    let backend: Box<dyn Backend> = match &cfg.endpoint {
        Some(remote) => Box::new(Remote::new(remote.clone())?),
        None => {
            let hub_opts = HubOptions {
                offline: cfg.offline,
                progress: cfg.stderr_is_terminal && !cfg.quiet,
                quiet: cfg.quiet,
            };
            let path = hub::resolve_model(&cfg.model, &hub_opts)?;
            let loaded = load(path)?;
            let template = cfg.chat_template.as_deref().map(ChatTemplate::from_arg).transpose()?;
            Box::new(Local::new(loaded, template, cfg.raw, cfg.ctx_size)?)
        }
    };
    let answer_opts = AnswerOptions {
        stop: cfg.stop.clone(),
        reasoning: cfg.reasoning,
        stats: cfg.stats,
        dim_reasoning: output::stderr_is_colour_terminal(),
        run_start: start,
        load_time: start.elapsed(),
    };
    let opts = OutputOptions {
        stream: cfg.stream,
        json: cfg.json,
        one_line: cfg.each_line.is_some(),
        terminal: output::stdout_is_terminal(),
    };
    let mut out = Output::stdout(opts);
    let ended = match &cfg.each_line {
        None => {
            let request = request(cfg, &cfg.prompt, signals);
            answer(backend.as_ref(), &request, &mut out, &answer_opts, signals).map(end_of)
        }
        Some(lines) => {
            let requests: Vec<Option<Request>> = lines
                .iter()
                .map(|line| (!line.trim().is_empty()).then(|| request(cfg, line, signals)))
                .collect();
            each_line(backend.as_ref(), &requests, &mut out, &answer_opts, signals)
        }
    };
    let end = match ended {
        Ok(end) => end,
        Err(e) if output::is_broken_pipe(&e) => return Ok(RunEnd::Done),
        Err(e) => return Err(e),
    };
    match out.finish() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(RunEnd::Done),
        other => other.context("cannot write to standard output").map(|()| end),
    }
}

fn end_of(finish: FinishReason) -> RunEnd {
    if finish == FinishReason::Interrupted { RunEnd::Interrupted } else { RunEnd::Done }
}

/// The request for one prompt.
fn request(cfg: &Config, prompt: &str, signals: &Signals) -> Request {
    Request {
        prompt: prompt.to_owned(),
        system: cfg.system.clone(),
        raw: cfg.raw,
        max_tokens: cfg.max_tokens,
        sampling: cfg.sampling.clone(),
        explicit: cfg.explicit.clone(),
        stop: cfg.stop.clone(),
        cancel: signals.interrupted.clone(),
        verbose: cfg.verbose_prompt,
    }
}

/// Computes and writes one answer.
fn answer<W: Write>(
    backend: &dyn Backend,
    request: &Request,
    out: &mut Output<W>,
    opts: &AnswerOptions,
    signals: &Signals,
) -> Result<FinishReason> {
    // From here on Ctrl-C ends this answer cleanly (an "interrupted" summary) instead of
    // exiting at once: the prompt is this answer's work, and `--verbose-prompt` has shown it.
    signals.generating.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let result = backend
        .stream(request)
        .and_then(|events| Answer::new(out, opts, started).write(events.map(|e| (Instant::now(), e))));
    signals.generating.store(false, Ordering::SeqCst);
    result
}

/// `--each-line`: one answer per line, in input order; `None` is an empty line, answered with
/// an empty line.
fn each_line<W: Write>(
    backend: &dyn Backend,
    requests: &[Option<Request>],
    out: &mut Output<W>,
    opts: &AnswerOptions,
    signals: &Signals,
) -> Result<RunEnd> {
    let workers = backend.parallelism().min(requests.iter().flatten().count());
    if workers <= 1 {
        for (i, request) in requests.iter().enumerate() {
            out.begin(Some(i + 1));
            let Some(request) = request else {
                out.end(&empty_summary(opts)).context("cannot write to standard output")?;
                continue;
            };
            if answer(backend, request, out, opts, signals)? == FinishReason::Interrupted {
                return Ok(RunEnd::Interrupted);
            }
        }
        return Ok(RunEnd::Done);
    }
    // Each line has a channel: its worker sends the events as they come, stamped with their
    // arrival, and the writer below drains the channels in line order.
    let lines: Vec<Slot> = requests.iter().map(|_| Slot::new()).collect();
    let next = AtomicUsize::new(0);
    let give_up = AtomicBool::new(false);
    signals.generating.store(true, Ordering::SeqCst);
    let written = std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= requests.len() || give_up.load(Ordering::SeqCst) {
                        break;
                    }
                    let Some(request) = &requests[i] else { continue };
                    let Some(tx) = lines[i].tx.lock().ok().and_then(|mut tx| tx.take()) else { continue };
                    let _ = lines[i].started.set(Instant::now());
                    match backend.stream(request) {
                        Err(e) => {
                            let _ = tx.send((Instant::now(), Err(e)));
                        }
                        Ok(events) => {
                            for event in events {
                                // The writer hung up (a stop string, an error): dropping the
                                // stream ends the request.
                                if tx.send((Instant::now(), event)).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            });
        }
        let result = write_in_order(requests, &lines, out, opts);
        if result.is_err() || matches!(result, Ok(RunEnd::Interrupted)) {
            // Stop the requests still in flight and start no more.
            give_up.store(true, Ordering::SeqCst);
            signals.interrupted.store(true, Ordering::SeqCst);
        }
        result
    });
    signals.generating.store(false, Ordering::SeqCst);
    written
}

/// An event and when it arrived.
type Stamped = (Instant, Result<Event>);

/// One line of a concurrent `--each-line`: the channel from its worker to the writer, and
/// when its request was made.
struct Slot {
    tx: Mutex<Option<Sender<Stamped>>>,
    rx: Mutex<Option<Receiver<Stamped>>>,
    started: OnceLock<Instant>,
}

impl Slot {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Self { tx: Mutex::new(Some(tx)), rx: Mutex::new(Some(rx)), started: OnceLock::new() }
    }
}

/// The writer side of a concurrent `--each-line`: the lines' events, in order.
fn write_in_order<W: Write>(
    requests: &[Option<Request>],
    lines: &[Slot],
    out: &mut Output<W>,
    opts: &AnswerOptions,
) -> Result<RunEnd> {
    for (i, request) in requests.iter().enumerate() {
        out.begin(Some(i + 1));
        if request.is_none() {
            out.end(&empty_summary(opts)).context("cannot write to standard output")?;
            continue;
        }
        let Some(rx) = lines[i].rx.lock().ok().and_then(|mut rx| rx.take()) else { continue };
        // The first event comes after the worker has recorded when it asked.
        let first = rx.recv().context("a request thread ended without an answer")?;
        let started = lines[i].started.get().copied().unwrap_or(first.0);
        let finish = Answer::new(out, opts, started).write(std::iter::once(first).chain(rx))?;
        if finish == FinishReason::Interrupted {
            return Ok(RunEnd::Interrupted);
        }
    }
    Ok(RunEnd::Done)
}
