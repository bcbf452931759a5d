//! The terminal chat (`-i`, or plain `streamgen` between two terminals): a line editor with
//! history (rustyline), each answer streamed as it comes, the conversation carried from turn to
//! turn and logged like any other, so that `-c` continues it later. Ctrl-C stops the answer
//! being written (the session goes on), Ctrl-D leaves, and a few commands in the manner of
//! `ollama run` act on the conversation: `/clear`, `/system TEXT`, `/save FILE`.
//!
//! The local engine keeps the conversation's keys and values in memory between turns
//! ([`crate::backend::local::Local::keep_conversation`]), so a turn computes only what is new.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;

use crate::answer::{AnswerOptions, Record};
use crate::app::{RunEnd, Signals, answer, request_for};
use crate::backend::{Backend, Message, Request};
use crate::config::Config;
use crate::conversation::{self, Origin};
use crate::log::History;
use crate::output::{self, Output, OutputOptions, Summary};

const HELP: &str = "\
/clear        start a new conversation
/system TEXT  set the system prompt (/system alone removes it)
/save FILE    write the conversation so far to FILE
/help         this list
Ctrl-C stops an answer, Ctrl-D (or /bye) leaves.";

/// Runs the chat until Ctrl-D. `history`, from `-c`/`--cid`, is where it starts.
pub fn run(
    cfg: &Config,
    backend: &dyn Backend,
    origin: &Origin,
    history: Option<History>,
    opts: &AnswerOptions,
    signals: &Signals,
) -> Result<RunEnd> {
    let mut editor = DefaultEditor::new().context("cannot start the line editor")?;
    let history_file = conversation::line_history_path(cfg);
    if let Some(file) = &history_file {
        // Missing on the first run; unreadable is not worth a word either: it is only recall.
        let _ = editor.load_history(file);
    }
    let mut chat = Chat { system: cfg.system.clone(), turns: Vec::new(), conversation: None };
    if let Some(history) = history {
        chat.system = cfg.system.clone().or(history.system);
        chat.turns = history.turns;
        chat.conversation = Some(history.conversation);
    }
    if !cfg.quiet {
        let continued =
            chat.conversation.map(|c| format!(", continuing conversation {c}")).unwrap_or_default();
        output::print_note(&format!(
            "chat{continued}: type a message; /help lists the commands, Ctrl-D leaves"
        ));
    }
    loop {
        let line = match editor.readline(">>> ") {
            Ok(line) => line,
            // Ctrl-C at the prompt drops the line being typed, as in a shell.
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("cannot read the terminal"),
        };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(text);
        if let Some(command) = text.strip_prefix('/') {
            if chat.command(command)? {
                break;
            }
            continue;
        }
        let ended = chat.turn(cfg, backend, origin, line.trim_end(), opts, signals);
        if let Err(e) = ended {
            if output::is_broken_pipe(&e) {
                break;
            }
            // One failed turn (a server that refused, a prompt too long) does not end the chat.
            output::print_error(&e);
        }
    }
    if let Some(file) = &history_file {
        let _ = editor.save_history(file);
    }
    Ok(RunEnd::Done)
}

/// The conversation being held.
struct Chat {
    system: Option<String>,
    /// User and assistant turns so far.
    turns: Vec<Message>,
    /// Its conversation in the log, once the first turn is logged.
    conversation: Option<i64>,
}

impl Chat {
    /// Runs a `/command`; `true` means leave.
    fn command(&mut self, command: &str) -> Result<bool> {
        let (name, arg) = command.split_once(char::is_whitespace).unwrap_or((command, ""));
        let arg = arg.trim();
        match name {
            "clear" => {
                self.turns.clear();
                self.conversation = None;
                output::print_note("a new conversation begins");
            }
            "system" => {
                self.system = (!arg.is_empty()).then(|| arg.to_owned());
                output::print_note(if arg.is_empty() { "no system prompt" } else { "system prompt set" });
            }
            "save" if !arg.is_empty() => {
                let path = std::path::Path::new(arg);
                match crate::fsutil::write_atomically(path, self.transcript().as_bytes()) {
                    Ok(()) => output::print_note(&format!("saved to {}", path.display())),
                    Err(e) => output::print_error(
                        &anyhow::Error::new(e).context(format!("cannot write {}", path.display())),
                    ),
                }
            }
            "bye" | "exit" | "quit" => return Ok(true),
            "help" | "?" => output::print_note(HELP),
            _ => output::print_note(&format!("unknown command /{name}\n{HELP}")),
        }
        Ok(false)
    }

    /// The conversation as Markdown-like text: the system prompt, then each turn.
    fn transcript(&self) -> String {
        let mut out = String::new();
        if let Some(system) = &self.system {
            out.push_str(&format!("system: {system}\n\n"));
        }
        for turn in &self.turns {
            if turn.role == "user" {
                for line in turn.content.lines() {
                    out.push_str(&format!("> {line}\n"));
                }
            } else {
                out.push_str(&turn.content);
            }
            out.push_str("\n\n");
        }
        out
    }

    /// One turn: the answer to `prompt` given the conversation so far, streamed and logged.
    fn turn(
        &mut self,
        cfg: &Config,
        backend: &dyn Backend,
        origin: &Origin,
        prompt: &str,
        opts: &AnswerOptions,
        signals: &Signals,
    ) -> Result<()> {
        let request = Request {
            system: self.system.clone(),
            history: self.turns.clone(),
            ..request_for(cfg, prompt, &signals.interrupted)
        };
        // Times count from this turn, not from when the chat began.
        let opts = &AnswerOptions { run_start: Instant::now(), load_time: Duration::ZERO, ..opts.clone() };
        let recorder = conversation::recorder(cfg, origin, &request, self.conversation);
        let mut kept = Kept { text: String::new(), log: recorder };
        // A fresh writer per turn: the line editor writes its prompt to the terminal between.
        let mut out = Output::stdout(OutputOptions::streamed_text());
        let result = answer(backend, &request, &mut out, opts, signals, Some(&mut kept));
        let finished = out.finish().context("cannot write to standard output");
        drop(out);
        // The next Ctrl-C is for the next answer.
        signals.interrupted.store(false, Ordering::SeqCst);
        if let Some(recorder) = kept.log.take() {
            let logged = recorder.close(&result);
            self.conversation = self.conversation.or(logged);
        }
        result?;
        finished?;
        // What the user saw is what the model is told it said, interrupted or not.
        self.turns.push(Message::new("user", prompt));
        self.turns.push(Message::new("assistant", kept.text));
        Ok(())
    }
}

/// The answer's text kept for the next turn, passed on to the log.
struct Kept {
    text: String,
    log: Option<crate::log::recorder::Recorder>,
}

impl Record for Kept {
    fn text(&mut self, text: &str) {
        self.text.push_str(text);
        if let Some(log) = &mut self.log {
            log.text(text);
        }
    }

    fn reasoning(&mut self, text: &str) {
        if let Some(log) = &mut self.log {
            log.reasoning(text);
        }
    }

    fn summary(&mut self, summary: &Summary) {
        if let Some(log) = &mut self.log {
            log.summary(summary);
        }
    }
}
