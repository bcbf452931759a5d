//! Logging one exchange while its answer streams, on a thread of its own, so that the log never
//! delays or costs the answer: opening the database, waiting for another process's write, or
//! failing altogether happen beside the stream. The row is inserted when the answer starts and
//! its text updated in batches (every 200 ms), so a run that is killed leaves its partial answer,
//! marked `interrupted`. A log that cannot be opened or written is one warning on stderr.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Ending, LogDb, NewExchange};
use crate::answer::Record;
use crate::event::FinishReason;
use crate::output::{self, Summary};

/// How often the partial answer is written while it streams: often enough that a killed run
/// loses a fraction of a second of it, rarely enough that a write (a short transaction) costs
/// nothing beside generation.
const BATCH: Duration = Duration::from_millis(200);

enum Msg {
    Text(String),
    Reasoning(String),
    End(Ending),
}

/// The recording of one exchange. Dropped without [`Recorder::end`], the exchange stays as far
/// as it got, marked `interrupted`.
pub struct Recorder {
    tx: Option<Sender<Msg>>,
    thread: Option<JoinHandle<Option<i64>>>,
    started: Instant,
    first_text: Option<Instant>,
    /// The answer's summary, once [`crate::answer::Answer`] has made it.
    summary: Option<Summary>,
}

impl Recorder {
    /// Starts recording `new` in the log at `path`.
    pub fn start(path: PathBuf, new: NewExchange) -> Self {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("streamgen-log".into())
            .spawn(move || write_log(&path, &new, &rx))
            .map_err(|e| warn(&anyhow::Error::new(e).context("cannot start the log thread")))
            .ok();
        Self { tx: Some(tx), thread, started: Instant::now(), first_text: None, summary: None }
    }

    fn send(&self, msg: Msg) {
        if let Some(tx) = &self.tx {
            // The thread gone means logging failed and has said so.
            let _ = tx.send(msg);
        }
    }

    /// Ends the exchange as the answer ended (`result` is what writing it returned): the last
    /// text and how it ended are written, then the thread is waited for. Returns the
    /// exchange's conversation, when it was logged.
    pub fn close(self, result: &anyhow::Result<FinishReason>) -> Option<i64> {
        let ending = match (result, &self.summary) {
            (Ok(_), Some(summary)) => ending_of(summary),
            (Ok(reason), None) => Ending { finish: reason.as_str().to_owned(), ..Ending::default() },
            // The reader closed the pipe: the answer ended there, as a stop string ends it.
            (Err(e), _) if output::is_broken_pipe(e) => Ending {
                finish: FinishReason::Stop.as_str().to_owned(),
                ..self.summary.as_ref().map(ending_of).unwrap_or_default()
            },
            (Err(e), summary) => Ending {
                finish: "error".into(),
                error: Some(output::error_line(e)),
                ..summary.as_ref().map(ending_of).unwrap_or_default()
            },
        };
        self.end(ending)
    }

    /// Ends the exchange with `ending`: the last text and how it ended are written, then the
    /// thread is waited for. Returns the exchange's conversation, when it was logged.
    pub fn end(mut self, mut ending: Ending) -> Option<i64> {
        ending.seconds = self.started.elapsed().as_secs_f64();
        if ending.first_token_seconds.is_none() {
            ending.first_token_seconds =
                self.first_text.map(|t| t.duration_since(self.started).as_secs_f64());
        }
        self.send(Msg::End(ending));
        self.join()
    }

    fn join(&mut self) -> Option<i64> {
        self.tx = None;
        self.thread.take().and_then(|t| t.join().ok().flatten())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.join();
    }
}

impl Record for Recorder {
    fn text(&mut self, text: &str) {
        if !text.is_empty() {
            self.first_text.get_or_insert_with(Instant::now);
            self.send(Msg::Text(text.to_owned()));
        }
    }

    fn reasoning(&mut self, text: &str) {
        if !text.is_empty() {
            self.first_text.get_or_insert_with(Instant::now);
            self.send(Msg::Reasoning(text.to_owned()));
        }
    }

    fn summary(&mut self, summary: &Summary) {
        self.summary = Some(summary.clone());
    }
}

/// The ending of an answer from its summary.
fn ending_of(summary: &Summary) -> Ending {
    Ending {
        finish: summary.finish_reason.to_owned(),
        error: None,
        prompt_tokens: Some(summary.prompt_tokens),
        reused_tokens: Some(summary.reused_prompt_tokens),
        generated_tokens: Some(summary.generated_tokens),
        first_token_seconds: Some(summary.time_to_first_token_seconds).filter(|&s| s > 0.0),
        seconds: 0.0,
    }
}

/// The log thread: opens the database, inserts the row, and writes the text as it comes.
/// Returns the conversation, or `None` (after one warning) when the log failed.
fn write_log(path: &std::path::Path, new: &NewExchange, rx: &Receiver<Msg>) -> Option<i64> {
    let fail = |e: anyhow::Error| {
        warn(&e.context(format!("cannot write the log {}", path.display())));
        // Drain, so that the sender never notices (it ignores failures anyway).
        while rx.recv().is_ok() {}
        None
    };
    let db = match LogDb::open(path) {
        Ok(db) => db,
        Err(e) => return fail(e),
    };
    let (id, conversation) = match db.begin(new) {
        Ok(ids) => ids,
        Err(e) => return fail(e),
    };
    let (mut answer, mut reasoning) = (String::new(), String::new());
    let mut dirty = false;
    let mut written_at = Instant::now();
    loop {
        let wait = BATCH.saturating_sub(written_at.elapsed());
        let msg =
            if dirty { rx.recv_timeout(wait) } else { rx.recv().map_err(|_| RecvTimeoutError::Disconnected) };
        match msg {
            Ok(Msg::Text(t)) => {
                answer.push_str(&t);
                dirty = true;
            }
            Ok(Msg::Reasoning(t)) => {
                reasoning.push_str(&t);
                dirty = true;
            }
            Ok(Msg::End(ending)) => {
                return match db.finish(id, &answer, &reasoning, &ending) {
                    Ok(()) => Some(conversation),
                    Err(e) => fail(e),
                };
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                // Dropped without an end: keep what there is, still marked interrupted.
                if dirty && let Err(e) = db.update(id, &answer, &reasoning) {
                    return fail(e);
                }
                return Some(conversation);
            }
        }
        if dirty && written_at.elapsed() >= BATCH {
            if let Err(e) = db.update(id, &answer, &reasoning) {
                return fail(e);
            }
            dirty = false;
            written_at = Instant::now();
        }
    }
}

/// The one warning of a log that failed; the answer goes on.
fn warn(e: &anyhow::Error) {
    output::print_note(&format!(
        "warning: {} (the answer is not logged; --no-log or STREAMGEN_LOG=0 turns logging off)",
        output::error_line(e)
    ));
}
