//! Conversations on top of the log: the earlier turns a continued prompt (`-c`, `--cid`) brings
//! along, the log row each exchange makes (what the run knew of its model, template and
//! options), and the commands that read and prune the log (`--logs`, `--logs-search`,
//! `--logs-delete`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use serde_json::json;

use crate::backend::Request;
use crate::config::{Config, Continue, Mode};
use crate::log::recorder::Recorder;
use crate::log::{self, History, LogDb, NewExchange};
use crate::output::{self, Output, OutputOptions};

/// Where an exchange's answer comes from, as the log records it.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The model file (local engine), or the served model's name (may be empty).
    pub model: String,
    pub endpoint: Option<String>,
    /// `--chat-template`'s value, `model` (the file's own template), `server`, or `None`
    /// (plain completion).
    pub template: Option<String>,
}

/// The log's path, or why there is none.
fn log_path(cfg: &Config) -> Result<&Path> {
    cfg.log_path.as_deref().ok_or_else(|| {
        anyhow!("there is no conversation log: HOME is not set (set STREAMGEN_LOGS to the log's path)")
    })
}

/// The conversation `-c`/`--cid` continues, read from the log; `None` without those flags.
pub fn history(cfg: &Config) -> Result<Option<History>> {
    let Some(continues) = cfg.continues else { return Ok(None) };
    let path = log_path(cfg)?;
    let what = || format!("cannot read the conversation log {}", path.display());
    let db = LogDb::open_read(path).with_context(what)?;
    let id = match continues {
        Continue::Id(id) => id,
        Continue::Latest => db.latest_conversation().with_context(what)?.ok_or_else(|| {
            anyhow!("there is no conversation to continue: the log {} is empty", path.display())
        })?,
    };
    let history = db.history(id).with_context(what)?;
    history
        .map(Some)
        .ok_or_else(|| anyhow!("there is no conversation {id} in the log {} (see --logs)", path.display()))
}

/// Applies `history` to a request: its turns come first, and its system prompt holds unless
/// the request has its own.
pub fn continue_request(request: &mut Request, history: &History) {
    request.history = history.turns.clone();
    if request.system.is_none() {
        request.system = history.system.clone();
    }
}

/// Starts logging `request`'s exchange (in `conversation`, or a new one), unless logging is off.
pub fn recorder(
    cfg: &Config,
    origin: &Origin,
    request: &Request,
    conversation: Option<i64>,
) -> Option<Recorder> {
    if !cfg.log {
        return None;
    }
    let Some(path) = cfg.log_path.clone() else {
        output::print_note(
            "warning: the answer is not logged: HOME is not set (set STREAMGEN_LOGS to a path)",
        );
        return None;
    };
    Some(Recorder::start(path, new_exchange(cfg, origin, request, conversation)))
}

/// The log row of `request`, as it starts.
fn new_exchange(cfg: &Config, origin: &Origin, request: &Request, conversation: Option<i64>) -> NewExchange {
    let s = &request.sampling;
    NewExchange {
        conversation,
        model: origin.model.clone(),
        endpoint: origin.endpoint.clone(),
        template: origin.template.clone(),
        system: request.system.clone(),
        prompt: request.prompt.clone(),
        options: json!({
            "max_tokens": request.max_tokens,
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "min_p": s.min_p,
            "repeat_penalty": s.repeat_penalty,
            "repeat_last_n": s.repeat_last_n,
            "seed": s.seed,
            "stop": request.stop,
            "ctx_size": cfg.ctx_size,
            "raw": request.raw,
            "no_think": cfg.no_think,
        }),
    }
}

/// `--logs`, `--logs-search`, `--logs-delete`: reads or prunes the log, writing to stdout.
pub fn log_command(cfg: &Config) -> Result<()> {
    let path = log_path(cfg)?;
    let exchanges = match &cfg.mode {
        Mode::Logs(n) => open_read(path)?.recent(*n),
        Mode::Search(text) => open_read(path)?.search(text, 20),
        Mode::Delete(which) => {
            // Never made just to be pruned.
            open_read(path)?;
            let db = LogDb::open(path).with_context(|| format!("cannot open the log {}", path.display()))?;
            let deleted = match which {
                Some(id) => {
                    let n = db.delete_conversation(*id)?;
                    if n == 0 {
                        anyhow::bail!(
                            "there is no conversation {id} in the log {} (see --logs)",
                            path.display()
                        );
                    }
                    n
                }
                None => db.delete_all()?,
            };
            if !cfg.quiet {
                output::print_note(&format!("deleted {deleted} exchanges from {}", path.display()));
            }
            return Ok(());
        }
        Mode::Answer | Mode::Chat => return Ok(()),
    }
    .with_context(|| format!("cannot read the log {}", path.display()))?;
    let text = if cfg.json { log::show::json_lines(&exchanges) } else { log::show::text(&exchanges) };
    let mut out = Output::stdout(OutputOptions::streamed_text());
    out.chunk(&text, None)
        .and_then(|()| out.finish())
        .or_else(|e| if e.kind() == std::io::ErrorKind::BrokenPipe { Ok(()) } else { Err(e) })?;
    Ok(())
}

fn open_read(path: &Path) -> Result<LogDb> {
    LogDb::open_read(path).with_context(|| format!("cannot read the log {}", path.display()))
}

/// The file the chat keeps its line history in: beside the log, as private.
pub fn line_history_path(cfg: &Config) -> Option<PathBuf> {
    let path = cfg.log_path.as_ref().filter(|_| cfg.log)?;
    Some(path.with_file_name("chat_history"))
}
