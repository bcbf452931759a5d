//! The conversation log: every exchange (prompt, system prompt, template, model or endpoint,
//! options, answer, reasoning, how it ended, token counts, timings) in a SQLite database that
//! the user owns, at `$XDG_STATE_HOME/streamgen/logs.db` unless `STREAMGEN_LOGS` says where.
//! It is what `-c/--continue` and `--cid` read the earlier turns from, and what `--logs`,
//! `--logs-search` and `--logs-delete` show and prune.
//!
//! Many streamgen processes write at once (`xargs -P16`): the database is in WAL mode (readers
//! never block the writer, and a commit needs no fsync) and every connection waits up to
//! [`BUSY_TIMEOUT`] for the write lock instead of failing. A database that is not ours (a
//! corrupt file, a newer schema) is never written: opening it is an error, which the run
//! reports as a warning while the answer streams (see [`recorder`]).

pub mod recorder;
pub mod show;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use crate::chat::Message;
use crate::env;

/// How long a connection waits for another process's write to end. A write is one short
/// transaction (a row, a batch of answer text), so even 16 processes at once wait milliseconds;
/// the bound is for a database someone holds locked, where the run warns and goes on.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema version, in `PRAGMA user_version`. A database with a higher one was written by a
/// newer streamgen and is left alone.
const SCHEMA_VERSION: i64 = 1;

/// The tables. `finish` starts as `interrupted` and is set when the answer ends, so a run that
/// is killed leaves its partial answer marked as such. The FTS5 index (external content: the
/// text is stored once) follows the table through triggers.
const SCHEMA: &str = "
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL
);
CREATE TABLE exchanges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    started TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT,
    template TEXT,
    system TEXT,
    prompt TEXT NOT NULL,
    options TEXT NOT NULL,
    answer TEXT NOT NULL DEFAULT '',
    reasoning TEXT NOT NULL DEFAULT '',
    finish TEXT NOT NULL DEFAULT 'interrupted',
    error TEXT,
    prompt_tokens INTEGER,
    reused_tokens INTEGER,
    generated_tokens INTEGER,
    first_token_seconds REAL,
    seconds REAL
);
CREATE INDEX exchanges_conversation ON exchanges(conversation, id);
CREATE VIRTUAL TABLE exchanges_fts USING fts5(
    system, prompt, answer, content='exchanges', content_rowid='id'
);
CREATE TRIGGER exchanges_ai AFTER INSERT ON exchanges BEGIN
    INSERT INTO exchanges_fts(rowid, system, prompt, answer)
        VALUES (new.id, new.system, new.prompt, new.answer);
END;
CREATE TRIGGER exchanges_ad AFTER DELETE ON exchanges BEGIN
    INSERT INTO exchanges_fts(exchanges_fts, rowid, system, prompt, answer)
        VALUES ('delete', old.id, old.system, old.prompt, old.answer);
END;
CREATE TRIGGER exchanges_au AFTER UPDATE OF system, prompt, answer ON exchanges BEGIN
    INSERT INTO exchanges_fts(exchanges_fts, rowid, system, prompt, answer)
        VALUES ('delete', old.id, old.system, old.prompt, old.answer);
    INSERT INTO exchanges_fts(rowid, system, prompt, answer)
        VALUES (new.id, new.system, new.prompt, new.answer);
END;
";

/// Where the log is: `STREAMGEN_LOGS`, else `$XDG_STATE_HOME/streamgen/logs.db`, else
/// `~/.local/state/streamgen/logs.db` (the XDG base directory defaults). `None` without a
/// home directory.
pub fn default_path(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(path) = var(env::LOGS) {
        return Some(PathBuf::from(path));
    }
    // The XDG spec: a relative XDG_STATE_HOME is invalid and ignored.
    let state = var(env::XDG_STATE_HOME)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| var(env::HOME).map(|home| Path::new(&home).join(".local/state")))?;
    Some(state.join("streamgen").join("logs.db"))
}

/// Whether logging is on: `--no-log` and `STREAMGEN_LOG=0` (or `false`, `no`, `off`) turn it off.
pub fn enabled(no_log: bool, var: impl Fn(&str) -> Option<String>) -> bool {
    let off = var(env::LOG)
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "0" | "false" | "no" | "off"));
    !no_log && !off
}

/// What is known of an exchange when it starts.
#[derive(Debug, Clone, Serialize)]
pub struct NewExchange {
    /// The conversation it continues; `None` starts a new one.
    pub conversation: Option<i64>,
    /// The model file (local engine) or the served model's name (`--endpoint`, may be empty).
    pub model: String,
    pub endpoint: Option<String>,
    /// The chat template: a built-in name or file (`--chat-template`), `model` (the GGUF
    /// file's own), `server` (the endpoint's); `None` for plain completion.
    pub template: Option<String>,
    pub system: Option<String>,
    pub prompt: String,
    /// Sampling and limits, as JSON.
    pub options: serde_json::Value,
}

/// How an exchange ended.
#[derive(Debug, Clone, Default)]
pub struct Ending {
    /// `eos`, `length`, `stop`, `interrupted` or `error`.
    pub finish: String,
    pub error: Option<String>,
    pub prompt_tokens: Option<usize>,
    pub reused_tokens: Option<usize>,
    pub generated_tokens: Option<usize>,
    pub first_token_seconds: Option<f64>,
    pub seconds: f64,
}

/// One logged exchange, as `--logs` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Exchange {
    pub id: i64,
    pub conversation: i64,
    pub started: String,
    pub model: String,
    pub endpoint: Option<String>,
    pub template: Option<String>,
    pub system: Option<String>,
    pub prompt: String,
    pub options: serde_json::Value,
    pub answer: String,
    pub reasoning: String,
    pub finish: String,
    pub error: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub reused_tokens: Option<i64>,
    pub generated_tokens: Option<i64>,
    pub first_token_seconds: Option<f64>,
    pub seconds: Option<f64>,
}

/// The earlier turns of a conversation, for `-c`/`--cid`.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    pub conversation: i64,
    /// The system prompt of its latest exchange.
    pub system: Option<String>,
    /// User and assistant turns, alternating, oldest first.
    pub turns: Vec<Message>,
}

/// An open log database.
pub struct LogDb {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for LogDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogDb").field("path", &self.path).finish()
    }
}

impl LogDb {
    /// Opens the log for writing, creating it (and its folder) when missing. A file that is not
    /// a SQLite database, one with a newer schema, or one made read-only is an error and is not
    /// written.
    pub fn open(path: &Path) -> Result<Self> {
        // Prompts and answers are private: a new log and the folders made for it are the
        // user's alone (SQLite gives its -wal and -shm files the log's own mode).
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut new_file = std::fs::OpenOptions::new();
        new_file.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut new_file, 0o600);
        match new_file.open(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A log the user made read-only stays as it is, even for root, who could write it.
                if std::fs::metadata(path).is_ok_and(|m| m.permissions().readonly()) {
                    bail!("it is read-only (chmod u+w {} to log again)", path.display());
                }
            }
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        let db = Self { conn, path: path.to_owned() };
        db.conn.busy_timeout(BUSY_TIMEOUT)?;
        db.prepare()?;
        Ok(db)
    }

    /// Opens an existing log for reading only (`--logs`, the history of `-c`). A missing log
    /// is an error that says so.
    pub fn open_read(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("there is no log at {} yet (every answer is logged unless --no-log)", path.display());
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let db = Self { conn, path: path.to_owned() };
        let version = db.version()?;
        if version > SCHEMA_VERSION {
            bail!("it was written by a newer streamgen (schema {version}; this one reads {SCHEMA_VERSION})");
        }
        if version < SCHEMA_VERSION {
            bail!("it is not a streamgen log (no schema version)");
        }
        Ok(db)
    }

    /// The database's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn version(&self) -> Result<i64> {
        Ok(self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Checks the schema and creates it in a fresh database; switches to WAL. Several processes
    /// may do this at once on a new file: the schema is made in an immediate transaction (one
    /// writer at a time, the busy timeout waiting for it) and checked again inside it.
    fn prepare(&self) -> Result<()> {
        let version = self.version()?;
        if version > SCHEMA_VERSION {
            bail!("it was written by a newer streamgen (schema {version}; this one knows {SCHEMA_VERSION})");
        }
        if version == 0 {
            let tables: i64 = self.conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
            // Another process may have committed the schema between the two reads: tables
            // without a version are foreign only if the version is still 0 after them.
            if tables > 0 && self.version()? == 0 {
                bail!("it is a SQLite database that is not a streamgen log");
            }
        }
        // WAL persists in the file; only the first opener switches. Switching waits for the
        // other connections like any write.
        self.retry_busy(|| {
            let mode: String = self.conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
            Ok(mode)
        })?;
        // A commit in WAL mode with synchronous=NORMAL is durable across a crash of the process
        // (not of the machine) and needs no fsync: a log is not worth an fsync per batch.
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        if version == 0 {
            self.retry_busy(|| {
                let tx = rusqlite::Transaction::new_unchecked(
                    &self.conn,
                    rusqlite::TransactionBehavior::Immediate,
                )?;
                let now: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
                if now == 0 {
                    tx.execute_batch(SCHEMA)?;
                    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
                }
                tx.commit()?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Runs `f` again while SQLite says the database is busy without having waited (switching
    /// the journal mode and starting a transaction can fail at once instead of calling the
    /// busy handler when another connection is in the middle of the same), up to the timeout.
    fn retry_busy<T>(&self, mut f: impl FnMut() -> rusqlite::Result<T>) -> Result<T> {
        let start = std::time::Instant::now();
        loop {
            match f() {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) && start.elapsed() < BUSY_TIMEOUT =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return Ok(other?),
            }
        }
    }

    /// Records the start of an exchange (in a new conversation unless it continues one):
    /// the exchange's id and its conversation's.
    pub fn begin(&self, new: &NewExchange) -> Result<(i64, i64)> {
        let now = now();
        self.retry_busy(|| {
            let tx =
                rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)?;
            let conversation = match new.conversation {
                Some(id) => id,
                None => {
                    tx.execute("INSERT INTO conversations (created) VALUES (?1)", [&now])?;
                    tx.last_insert_rowid()
                }
            };
            tx.execute(
                "INSERT INTO exchanges (conversation, started, model, endpoint, template, system, prompt, options)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    conversation,
                    now,
                    new.model,
                    new.endpoint,
                    new.template,
                    new.system,
                    new.prompt,
                    new.options.to_string()
                ],
            )?;
            let id = tx.last_insert_rowid();
            tx.commit()?;
            Ok((id, conversation))
        })
    }

    /// The answer and reasoning so far.
    pub fn update(&self, id: i64, answer: &str, reasoning: &str) -> Result<()> {
        self.retry_busy(|| {
            self.conn.execute(
                "UPDATE exchanges SET answer = ?2, reasoning = ?3 WHERE id = ?1",
                params![id, answer, reasoning],
            )
        })?;
        Ok(())
    }

    /// The whole answer and how it ended.
    pub fn finish(&self, id: i64, answer: &str, reasoning: &str, end: &Ending) -> Result<()> {
        let count = |n: Option<usize>| n.and_then(|n| i64::try_from(n).ok());
        self.retry_busy(|| {
            self.conn.execute(
                "UPDATE exchanges SET answer = ?2, reasoning = ?3, finish = ?4, error = ?5,
                     prompt_tokens = ?6, reused_tokens = ?7, generated_tokens = ?8,
                     first_token_seconds = ?9, seconds = ?10
                 WHERE id = ?1",
                params![
                    id,
                    answer,
                    reasoning,
                    end.finish,
                    end.error,
                    count(end.prompt_tokens),
                    count(end.reused_tokens),
                    count(end.generated_tokens),
                    end.first_token_seconds,
                    end.seconds
                ],
            )
        })?;
        Ok(())
    }

    /// The conversation of the latest exchange, if any.
    pub fn latest_conversation(&self) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row("SELECT conversation FROM exchanges ORDER BY id DESC LIMIT 1", [], |r| r.get(0))
            .optional()?)
    }

    /// The turns of conversation `id` so far, or `None` when there is no such conversation.
    /// Exchanges that failed before any answer (a model that did not load, a server that
    /// refused) are left out: the model never answered them.
    pub fn history(&self, id: i64) -> Result<Option<History>> {
        let mut stmt = self.conn.prepare(
            "SELECT system, prompt, answer, finish FROM exchanges WHERE conversation = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok((
                r.get::<_, Option<String>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut history = History { conversation: id, system: None, turns: Vec::new() };
        let mut any = false;
        for row in rows {
            let (system, prompt, answer, finish) = row?;
            any = true;
            if finish == "error" && answer.is_empty() {
                continue;
            }
            history.system = system;
            history.turns.push(Message::new("user", prompt));
            history.turns.push(Message::new("assistant", answer));
        }
        Ok(any.then_some(history))
    }

    /// The latest `n` exchanges, oldest first.
    pub fn recent(&self, n: usize) -> Result<Vec<Exchange>> {
        let limit = i64::try_from(n).unwrap_or(i64::MAX);
        let sql =
            format!("SELECT * FROM (SELECT {COLUMNS} FROM exchanges ORDER BY id DESC LIMIT ?1) ORDER BY id");
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([limit], exchange)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The exchanges whose prompt, system prompt or answer contain every word of `text`
    /// (SQLite full-text search), best match last, at most `n`.
    pub fn search(&self, text: &str, n: usize) -> Result<Vec<Exchange>> {
        let query = fts_query(text);
        if query.is_empty() {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(n).unwrap_or(i64::MAX);
        let columns = COLUMNS.split(", ").map(|c| format!("e.{c}")).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "SELECT {columns} FROM exchanges_fts JOIN exchanges e ON e.id = exchanges_fts.rowid
             WHERE exchanges_fts MATCH ?1 ORDER BY rank DESC LIMIT ?2"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let mut found: Vec<Exchange> =
            stmt.query_map(params![query, limit], exchange)?.collect::<rusqlite::Result<_>>()?;
        // Best last: the best match is next to the prompt when read on a terminal.
        found.reverse();
        Ok(found)
    }

    /// Deletes conversation `id` with its exchanges; how many exchanges went.
    pub fn delete_conversation(&self, id: i64) -> Result<usize> {
        self.retry_busy(|| {
            let tx =
                rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)?;
            let n = tx.execute("DELETE FROM exchanges WHERE conversation = ?1", [id])?;
            tx.execute("DELETE FROM conversations WHERE id = ?1", [id])?;
            tx.commit()?;
            Ok(n)
        })
    }

    /// Deletes every conversation; how many exchanges went.
    pub fn delete_all(&self) -> Result<usize> {
        let n = self.retry_busy(|| {
            let tx =
                rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)?;
            let n = tx.execute("DELETE FROM exchanges", [])?;
            tx.execute("DELETE FROM conversations", [])?;
            tx.commit()?;
            Ok(n)
        })?;
        // Deleted text stays in the file's free pages until it is rebuilt: a user who deletes
        // everything means it gone from the disk too.
        let _ = self.conn.execute_batch("VACUUM");
        Ok(n)
    }
}

/// The columns of [`Exchange`], in its order.
const COLUMNS: &str = "id, conversation, started, model, endpoint, template, system, prompt, options, answer, \
                       reasoning, finish, error, prompt_tokens, reused_tokens, generated_tokens, \
                       first_token_seconds, seconds";

fn exchange(r: &rusqlite::Row<'_>) -> rusqlite::Result<Exchange> {
    let options: String = r.get(8)?;
    Ok(Exchange {
        id: r.get(0)?,
        conversation: r.get(1)?,
        started: r.get(2)?,
        model: r.get(3)?,
        endpoint: r.get(4)?,
        template: r.get(5)?,
        system: r.get(6)?,
        prompt: r.get(7)?,
        // Written by us as JSON; anything else (an edited row) is shown as the text it is.
        options: serde_json::from_str(&options).unwrap_or(serde_json::Value::String(options)),
        answer: r.get(9)?,
        reasoning: r.get(10)?,
        finish: r.get(11)?,
        error: r.get(12)?,
        prompt_tokens: r.get(13)?,
        reused_tokens: r.get(14)?,
        generated_tokens: r.get(15)?,
        first_token_seconds: r.get(16)?,
        seconds: r.get(17)?,
    })
}

/// A user's search text as an FTS5 query: every word must occur, each taken literally (in
/// double quotes, its own quotes doubled), so that `what's "this"` or `a AND` are words,
/// not query syntax errors.
fn fts_query(text: &str) -> String {
    text.split_whitespace().map(|w| format!("\"{}\"", w.replace('"', "\"\""))).collect::<Vec<_>>().join(" ")
}

/// Now, in RFC 3339 UTC to the second (sorts as text).
fn now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests;
