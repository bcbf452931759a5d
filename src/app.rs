//! One run of the filter: pick the backend (the local engine on a resolved and loaded model,
//! or a server), make a [`Request`] of each prompt, and write each answer's events through
//! [`crate::answer`] to [`crate::output`]. With `--each-line`, input lines are read as they
//! arrive and answered up to `--parallel` at once, and written strictly in input order.

use std::io::{BufRead, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::answer::{Answer, AnswerOptions, Incomplete, Record, empty_summary};
use crate::backend::local::{self, Local};
use crate::backend::remote::Remote;
use crate::backend::{Answers, Backend, Lines, Request};
use crate::chat::ChatTemplate;
use crate::config::{Config, EachLine, MAX_STDIN_BYTES, Mode, TokensOnly, UsageError, each_line_prompt};
use crate::conversation::{self, Origin};
use crate::engine::load;
use crate::event::FinishReason;
use crate::hub::{self, HubOptions};
use crate::log::History;
use crate::output::{self, Output, OutputOptions};
use crate::prompt_cache::PromptCache;

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
    if matches!(cfg.mode, Mode::Logs(_) | Mode::Search(_) | Mode::Delete(_)) {
        return conversation::log_command(cfg).map(|()| RunEnd::Done);
    }
    // Read before the model loads: a conversation that is not there is a quick error.
    let history = conversation::history(cfg)?;
    if let Some(what) = cfg.tokens_only {
        return print_tokens(cfg, what, history.as_ref()).map(|()| RunEnd::Done);
    }
    let start = Instant::now();
    let (backend, origin) = open_backend(cfg)?;
    let answer_opts = AnswerOptions {
        stop: cfg.stop.clone(),
        reasoning: cfg.reasoning,
        stats: cfg.stats,
        extract: cfg.extract,
        dim_reasoning: output::stderr_is_colour_terminal(),
        run_start: start,
        load_time: start.elapsed(),
    };
    let opts = OutputOptions {
        stream: cfg.stream,
        json: cfg.json,
        one_line: cfg.each_line.is_some(),
        json_lines: cfg.constraint.as_ref().is_some_and(|c| c.is_json()),
        terminal: output::stdout_is_terminal(),
    };
    if cfg.mode == Mode::Chat {
        return crate::interactive::run(cfg, backend.as_ref(), &origin, history, &answer_opts, signals);
    }
    let mut out = Output::stdout(opts);
    let ended = match &cfg.each_line {
        None => {
            let mut request = request_for(cfg, &cfg.prompt, &signals.interrupted);
            if let Some(history) = &history {
                conversation::continue_request(&mut request, history);
            }
            let mut recorder =
                conversation::recorder(cfg, &origin, &request, history.as_ref().map(|h| h.conversation));
            let record = recorder.as_mut().map(|r| r as &mut dyn Record);
            let result = answer(backend.as_ref(), &request, &mut out, &answer_opts, signals, record);
            if let Some(recorder) = recorder {
                recorder.close(&result);
            }
            result.map(end_of)
        }
        Some(each) => each_line(backend, &origin, each, cfg, &mut out, &answer_opts, signals),
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

/// The backend the configuration asks for (a server, or the local engine on a resolved and
/// loaded model), and where its answers come from, for the log.
pub fn open_backend(cfg: &Config) -> Result<(Arc<dyn Backend + Send>, Origin)> {
    Ok(match &cfg.endpoint {
        Some(remote) => {
            if cfg.prompt_cache.as_ref().is_some_and(|c| c.explicit) && !cfg.quiet {
                output::print_note(
                    "note: --prompt-cache has no effect with --endpoint: the server keeps its own cache",
                );
            }
            let origin = Origin {
                model: remote.model.clone().unwrap_or_default(),
                endpoint: Some(output::redact_userinfo(&remote.endpoint)),
                template: (!cfg.raw).then(|| "server".to_owned()),
            };
            (Arc::new(Remote::new(remote.clone())?), origin)
        }
        None => {
            crate::kernels::check_kernels_env()?;
            let hub_opts = hub_options(cfg);
            let path = hub::resolve_model(&cfg.model, &hub_opts)?;
            let loaded = load(path)?;
            let template = cfg.chat_template.as_deref().map(ChatTemplate::from_arg).transpose()?;
            let cache = match &cfg.prompt_cache {
                Some(c) => Some(PromptCache::new(&c.dir, &loaded.path, c.max_bytes, cfg.quiet)?),
                None => None,
            };
            let model = loaded.path.display().to_string();
            let mut local = Local::new(loaded, template, cfg.raw, cfg.ctx_size)?;
            if let Some(draft) = &cfg.draft_model {
                let path = hub::resolve_model(draft, &hub_opts)?;
                local = local.with_draft(load(path).context("cannot load the draft model")?)?;
            }
            if cfg.no_think
                && !cfg.quiet
                && !local.template().is_some_and(|t| t.source().contains("enable_thinking"))
            {
                output::print_note(
                    "--no-think: this chat template has no enable_thinking switch, so the model may \
                     reason anyway (its reasoning still stays off stdout)",
                );
            }
            let template = match (&cfg.chat_template, local.template()) {
                (Some(name), _) => Some(name.clone()),
                (None, Some(_)) => Some("model".to_owned()),
                (None, None) => None,
            };
            let origin = Origin { model, endpoint: None, template };
            // The chat's turns build on each other: the last one's keys and values stay.
            let local = if cfg.mode == Mode::Chat { local.keep_conversation() } else { local };
            let local = match cache {
                Some(cache) => local.with_prompt_cache(cache),
                None => local,
            };
            (Arc::new(local), origin)
        }
    })
}

fn hub_options(cfg: &Config) -> HubOptions {
    HubOptions { offline: cfg.offline, progress: cfg.stderr_is_terminal && !cfg.quiet, quiet: cfg.quiet }
}

/// `--count-tokens`, `--tokenize`: each prompt's tokens as the model would get them (through
/// the chat template, after the conversation so far), from the file's vocabulary alone, one
/// line per prompt.
fn print_tokens(cfg: &Config, what: TokensOnly, history: Option<&History>) -> Result<()> {
    let path = hub::resolve_model(&cfg.model, &hub_options(cfg))?;
    let vocab = crate::engine::load_vocabulary(&path)?;
    let given = cfg.chat_template.as_deref().map(ChatTemplate::from_arg).transpose()?;
    let template = local::choose_template(vocab.chat_template, given, cfg.raw)?;
    let ctx = local::context_tokens(cfg.ctx_size, vocab.context_length);
    let never = Arc::new(AtomicBool::new(false));
    let line_of = |prompt: &str| -> Result<String> {
        let ids = if prompt.trim().is_empty() && cfg.each_line.is_some() {
            Vec::new()
        } else {
            let mut request = request_for(cfg, prompt, &never);
            if let Some(history) = history {
                conversation::continue_request(&mut request, history);
            }
            local::prompt_of(&vocab.tokenizer, template.as_ref(), ctx, &request)?.1
        };
        Ok(match what {
            TokensOnly::Count => format!("{}\n", ids.len()),
            TokensOnly::Ids => format!("{}\n", serde_json::to_string(&ids)?),
        })
    };
    let mut stdout = std::io::stdout().lock();
    let mut write = |prompt: &str| -> Result<bool> {
        let line = line_of(prompt)?;
        // A reader that closed the pipe (`| head -1`) ends the run normally.
        match stdout.write_all(line.as_bytes()).and_then(|()| stdout.flush()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(e).context("cannot write to standard output"),
        }
    };
    let Some(each) = &cfg.each_line else { return write(&cfg.prompt).map(drop) };
    let mut failed = None;
    let mut each_prompt = |line: &str| match write(&each_line_prompt(&each.instruction, line)) {
        Ok(more) => more,
        Err(e) => {
            failed = Some(e);
            false
        }
    };
    for_each_line(each, &mut each_prompt);
    failed.map_or(Ok(()), Err)
}

/// The request for one prompt.
pub fn request_for(cfg: &Config, prompt: &str, cancel: &Arc<AtomicBool>) -> Request {
    Request {
        prompt: prompt.to_owned(),
        system: cfg.system.clone(),
        history: Vec::new(),
        raw: cfg.raw,
        max_tokens: cfg.max_tokens,
        sampling: cfg.sampling.clone(),
        explicit: cfg.explicit.clone(),
        stop: cfg.stop.clone(),
        cancel: cancel.clone(),
        verbose: cfg.verbose_prompt,
        enable_thinking: cfg.no_think.then_some(false),
        constraint: cfg.constraint.clone(),
        lookup: cfg.lookup,
        draft_max: cfg.draft_max,
        ignore_eos: cfg.ignore_eos,
        logprobs: cfg.logprobs,
    }
}

/// Computes and writes one answer, and shows it to `record` (the log) as it is written.
pub fn answer<W: Write>(
    backend: &dyn Backend,
    request: &Request,
    out: &mut Output<W>,
    opts: &AnswerOptions,
    signals: &Signals,
    record: Option<&mut dyn Record>,
) -> Result<FinishReason> {
    // From here on Ctrl-C ends this answer cleanly (an "interrupted" summary) instead of
    // exiting at once: the prompt is this answer's work, and `--verbose-prompt` has shown it.
    signals.generating.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let result = backend.stream(request).and_then(|events| {
        let record = record.map(|r| r as &mut dyn Record);
        Answer::new(out, opts, started).recording(record).write(events.map(|e| (Instant::now(), e)))
    });
    signals.generating.store(false, Ordering::SeqCst);
    result
}

/// `--each-line`: one answer per input line, in input order, while the backend answers up to
/// `--parallel` lines at once. Lines are read as they arrive (`tail -f log | streamgen
/// --each-line`); the answer being written streams, the ones behind it wait in their channels.
fn each_line<W: Write>(
    backend: Arc<dyn Backend + Send>,
    origin: &Origin,
    each: &EachLine,
    cfg: &Config,
    out: &mut Output<W>,
    opts: &AnswerOptions,
    signals: &Signals,
) -> Result<RunEnd> {
    let parallel = cfg.parallel.unwrap_or_else(|| backend.default_parallel()).max(1);
    // A bounded queue: a fast producer (a large file) waits instead of filling memory.
    let (request_tx, request_rx) = mpsc::sync_channel(2 * parallel);
    {
        let (cfg, each, cancel) = (cfg.clone(), each.clone(), signals.interrupted.clone());
        std::thread::Builder::new()
            .name("streamgen-input".into())
            .spawn(move || {
                let mut send = |line: &str| {
                    let prompt = each_line_prompt(&each.instruction, line);
                    let request = (!prompt.trim().is_empty()).then(|| request_for(&cfg, &prompt, &cancel));
                    request_tx.send(request).is_ok()
                };
                for_each_line(&each, &mut send);
            })
            .context("cannot start the input thread")?;
    }
    let (opened_tx, opened_rx) = mpsc::channel();
    let lines = Arc::new(Lines::new(request_rx));
    let answers = Arc::new(Answers::new(opened_tx));
    signals.generating.store(true, Ordering::SeqCst);
    let engine = {
        let (backend, lines, answers) = (backend.clone(), lines.clone(), answers.clone());
        std::thread::Builder::new()
            .name("streamgen-engine".into())
            .spawn(move || backend.answer_lines(&lines, &answers, parallel))
            .context("cannot start the engine thread")?
    };
    drop(answers);
    let (mut written, mut answered, mut failed) = (0, 0, 0);
    let mut log_failed = false;
    while let Some(opened) = recv_unless_interrupted(&opened_rx, signals) {
        written += 1;
        out.begin(Some(opened.line));
        if !opened.request {
            out.end(&empty_summary(opts)).context("cannot write to standard output")?;
            continue;
        }
        // The first event, or the engine's failure (which drops the channel).
        let Some(first) = recv_unless_interrupted(&opened.events, signals) else {
            if signals.interrupted.load(Ordering::SeqCst) {
                return Ok(RunEnd::Interrupted);
            }
            break;
        };
        // A line's own failure (its prompt refused, its request failed) is set aside here, so
        // that it is told from a failure to write the output.
        let mut line_error: Option<anyhow::Error> = None;
        // Each line is an exchange of its own in the log, until the log fails once: a log
        // that cannot be written is not tried again on every line.
        let mut recorder = if log_failed {
            None
        } else {
            conversation::recorder(cfg, origin, &request_for(cfg, &opened.prompt, &signals.interrupted), None)
        };
        let written_answer = {
            let events = std::iter::once(first)
                .chain(opened.events)
                .map(|(at, event)| (at, event.map_err(|e| anyhow::anyhow!("{}", line_error.insert(e)))));
            let record = recorder.as_mut().map(|r| r as &mut dyn Record);
            Answer::new(out, opts, opened.started).recording(record).write(events)
        };
        if let Some(recorder) = recorder {
            log_failed |= recorder.close(&written_answer).is_none();
        }
        match (written_answer, line_error) {
            (Ok(finish), _) => {
                answered += 1;
                if finish == FinishReason::Interrupted {
                    return Ok(RunEnd::Interrupted);
                }
            }
            (Err(_), Some(e)) => {
                // Fatal when nothing can be answered: no line has been, and the server cannot
                // be reached at all.
                if answered == 0 && crate::net::is_unreachable(&e) {
                    return Err(e);
                }
                failed += 1;
                let e = e.context(format!("line {}", opened.line));
                out.failed(&output::error_line(&e)).context("cannot write to standard output")?;
                output::print_error(&e);
            }
            // An answer that does not match its constraint ended its line already (and its
            // summary says so): the line failed, the others go on.
            (Err(e), None) if e.is::<Incomplete>() => {
                failed += 1;
                output::print_error(&e.context(format!("line {}", opened.line)));
            }
            (Err(e), None) => return Err(e),
        }
    }
    if signals.interrupted.load(Ordering::SeqCst) {
        return Ok(RunEnd::Interrupted);
    }
    // The writer is done: the engine has ended (or failed, and says why).
    engine.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    signals.generating.store(false, Ordering::SeqCst);
    if written == 0 {
        return Err(UsageError::NoLines.into());
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {written} lines failed (each error is above); the other lines were answered"
        );
    }
    Ok(RunEnd::Done)
}

/// Waits for the next message, giving up when Ctrl-C is pressed (the sender may be waiting
/// for input that never comes) or the channel closes.
fn recv_unless_interrupted<T>(rx: &Receiver<T>, signals: &Signals) -> Option<T> {
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(value) => return Some(value),
            Err(RecvTimeoutError::Timeout) if !signals.interrupted.load(Ordering::SeqCst) => {}
            Err(_) => return None,
        }
    }
}

/// Calls `line` with each `--each-line` input line (the text given, else stdin's lines as they
/// arrive) until the end or `line` returns `false`.
fn for_each_line(each: &EachLine, line: &mut impl FnMut(&str) -> bool) {
    match &each.input {
        Some(text) => {
            for text in text.lines() {
                if !line(text) {
                    break;
                }
            }
        }
        None => for_each_stdin_line(line),
    }
}

/// Calls `line` with each line of stdin as it arrives (without its line ending, invalid UTF-8
/// replaced), until the end of input or `line` returns `false`. A line is read up to
/// [`MAX_STDIN_BYTES`]; the rest of a longer one is dropped.
fn for_each_stdin_line(line: &mut impl FnMut(&str) -> bool) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match stdin.by_ref().take(MAX_STDIN_BYTES).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !buf.ends_with(b"\n") && buf.len() as u64 >= MAX_STDIN_BYTES {
            skip_line(&mut stdin);
        }
        let text = String::from_utf8_lossy(&buf);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        if !line(text.strip_suffix('\r').unwrap_or(text)) {
            return;
        }
    }
}

/// Skips input up to and including the next newline.
fn skip_line(reader: &mut impl BufRead) {
    loop {
        let (found, used) = match reader.fill_buf() {
            Ok([]) | Err(_) => return,
            Ok(buf) => match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (true, i + 1),
                None => (false, buf.len()),
            },
        };
        reader.consume(used);
        if found {
            return;
        }
    }
}
