//! Turns parsed arguments into what a run needs: the prompt (from the arguments, piped stdin,
//! or both), the model source, sampling settings and the terminal state.

use std::io::{self, IsTerminal, Read};
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::backend::ExplicitSampling;
use crate::backend::remote::{RemoteOptions, base_url};
use crate::cli::Cli;
use crate::constrain::Constraint;
use crate::env;
use crate::reasoning::ReasoningMode;
use crate::sample::SamplingParams;

/// A mistake in how streamgen was called: reported with exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("the prompt is empty: give it as arguments or on standard input (see --help)")]
    EmptyPrompt,
    #[error("--each-line reads prompts from standard input, and it has no lines")]
    NoLines,
    #[error("standard input is larger than 256 MiB, more than any model's context can hold")]
    InputTooLarge,
    #[error("{0}")]
    BadEndpoint(String),
    #[error("{0} applies to the local engine only, not with --endpoint (the server has its own)")]
    LocalOnly(&'static str),
    #[error("--logs-delete needs a conversation ID or --all, not both")]
    DeleteWhat,
    #[error("{0} reads the log, so it takes no prompt")]
    LogsTakeNoPrompt(&'static str),
    #[error("-i/--interactive reads its prompts from the terminal, so it takes no prompt words")]
    ChatTakesNoPrompt,
    /// A schema, grammar, regular expression or choice list that cannot be used.
    #[error("{flag}: {why}")]
    BadConstraint { flag: &'static str, why: String },
    #[error(
        "--draft-model does not apply to --each-line: the batched engine already fills each \
         pass with several lines' tokens"
    )]
    DraftEachLine,
}

/// What a run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Answer the prompt (or each line with `--each-line`).
    Answer,
    /// A chat in the terminal (`-i`).
    Chat,
    /// `--logs N`: print the latest exchanges.
    Logs(usize),
    /// `--logs-search TEXT`.
    Search(String),
    /// `--logs-delete ID`, `--logs-delete --all` (`None`).
    Delete(Option<i64>),
}

/// What `--count-tokens` and `--tokenize` print of each prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokensOnly {
    /// How many tokens it is.
    Count,
    /// Its token ids, as a JSON array.
    Ids,
}

/// Which conversation a run continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continue {
    /// `-c`: the latest one in the log.
    Latest,
    /// `--cid ID`.
    Id(i64),
}

/// `--each-line`: the instruction words put before every line, and the lines.
#[derive(Debug, Clone)]
pub struct EachLine {
    pub instruction: String,
    /// The input, when it has been read already; `None`: stdin, read line by line as it
    /// arrives.
    pub input: Option<String>,
}

/// Everything a run needs, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub prompt: String,
    /// The `-m` argument, `STREAMGEN_MODEL`, or the default model.
    pub model: String,
    pub offline: bool,
    /// Context size; 0 means the model's maximum.
    pub ctx_size: usize,
    pub max_tokens: Option<usize>,
    /// `--ignore-eos`: only `-n` ends the answer.
    pub ignore_eos: bool,
    /// `--logprobs N`: each token's log-probability and its N most likely alternatives.
    pub logprobs: Option<usize>,
    /// `--count-tokens`, `--tokenize`: print the prompt's tokens instead of answering it.
    pub tokens_only: Option<TokensOnly>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub system: Option<String>,
    pub raw: bool,
    pub chat_template: Option<String>,
    /// `--each-line`: the instruction, and where the lines come from.
    pub each_line: Option<EachLine>,
    /// `--parallel`: lines answered at once with `--each-line` (default: the backend's).
    pub parallel: Option<usize>,
    pub verbose_prompt: bool,
    /// `--no-think`: render the chat template with `enable_thinking` false.
    pub no_think: bool,
    pub stream: bool,
    pub json: bool,
    pub stats: bool,
    /// `-x/--extract`: only the first fenced code block of each answer.
    pub extract: bool,
    pub quiet: bool,
    /// Whether stderr is a terminal (progress bars only then).
    pub stderr_is_terminal: bool,
    /// Sampling settings given explicitly (a server gets only those).
    pub explicit: ExplicitSampling,
    pub reasoning: ReasoningMode,
    /// `--endpoint`: answer through this server instead of the local engine.
    pub endpoint: Option<RemoteOptions>,
    /// What the answer must match (`--json-schema`, `--regex`…), checked already.
    pub constraint: Option<Constraint>,
    /// The prompt cache, unless turned off (the local engine only).
    pub prompt_cache: Option<PromptCacheConfig>,
    pub mode: Mode,
    /// The conversation log's path (`None`: no home directory to put it in).
    pub log_path: Option<PathBuf>,
    /// Whether this run's exchanges are written to the log (`--no-log`, `STREAMGEN_LOG=0`).
    pub log: bool,
    /// `-c`, `--cid`: the conversation this prompt continues.
    pub continues: Option<Continue>,
    /// `--lookup` (`Some(true)`), `--no-lookup` (`Some(false)`), or the default.
    pub lookup: Option<bool>,
    /// `--draft-model`.
    pub draft_model: Option<String>,
    /// `--draft-max`.
    pub draft_max: usize,
}

impl Config {
    /// Resolves the arguments, reading piped stdin when stdin is not a terminal.
    pub fn from_cli(cli: Cli) -> Result<Self> {
        // --each-line reads stdin line by line while it runs (`tail -f log |` works); the chat
        // reads it line by line too, and the log commands do not read it.
        let reads_stdin = !cli.each_line && !cli.interactive && !log_command(&cli);
        let stdin = if !reads_stdin || io::stdin().is_terminal() { None } else { read_stdin()? };
        // Plain `streamgen` between two terminals is someone at the keyboard, not a pipeline:
        // it opens the chat (as `ollama run` does) instead of a usage error.
        let chat = cli.interactive
            || (stdin.is_none()
                && cli.prompt.is_empty()
                && !cli.each_line
                && !cli.count_tokens
                && !cli.tokenize
                && !log_command(&cli)
                && io::stdin().is_terminal()
                && io::stdout().is_terminal());
        let mut cli = cli;
        cli.interactive = chat;
        Self::resolve(cli, stdin, |name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// Resolves the arguments with the given stdin text (`None`: stdin is a terminal).
    /// The environment is read through `var`.
    pub fn resolve(cli: Cli, stdin: Option<String>, var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let endpoint = remote_options(&cli, &var)?;
        let mode = mode(&cli)?;
        let constraint = constraint(&cli)?;
        let lookup = if cli.no_lookup { Some(false) } else { cli.lookup.then_some(true) };
        if endpoint.is_some() {
            if cli.draft_model.is_some() {
                return Err(UsageError::LocalOnly("--draft-model").into());
            }
            if cli.lookup {
                return Err(UsageError::LocalOnly("--lookup").into());
            }
            if cli.count_tokens || cli.tokenize {
                let flag = if cli.tokenize { "--tokenize" } else { "--count-tokens" };
                return Err(UsageError::LocalOnly(flag).into());
            }
        }
        if cli.each_line && cli.draft_model.is_some() {
            return Err(UsageError::DraftEachLine.into());
        }
        let (prompt, each_line) = if mode != Mode::Answer {
            (String::new(), None)
        } else if cli.each_line {
            (String::new(), Some(EachLine { instruction: cli.prompt.join(" "), input: stdin }))
        } else {
            (compose_prompt(&cli.prompt, stdin.as_deref())?, None)
        };
        let seed = cli.seed.unwrap_or_else(random_seed);
        let defaults = SamplingParams::default();
        let stderr_is_terminal = io::stderr().is_terminal();
        let reasoning = cli.reasoning.unwrap_or(match (cli.json, stderr_is_terminal) {
            (true, _) => ReasoningMode::Stdout,
            (false, true) => ReasoningMode::Stderr,
            (false, false) => ReasoningMode::Hide,
        });
        Ok(Self {
            prompt,
            model: cli.model.clone().unwrap_or_else(|| crate::hub::DEFAULT_MODEL.to_string()),
            offline: cli.offline,
            ctx_size: cli.ctx_size,
            max_tokens: cli.max_tokens,
            ignore_eos: cli.ignore_eos,
            logprobs: cli.logprobs.map(usize::from),
            tokens_only: match (cli.count_tokens, cli.tokenize) {
                (true, _) => Some(TokensOnly::Count),
                (false, true) => Some(TokensOnly::Ids),
                (false, false) => None,
            },
            sampling: SamplingParams {
                temperature: cli.temperature,
                top_k: cli.top_k.unwrap_or(defaults.top_k),
                top_p: cli.top_p,
                min_p: cli.min_p.unwrap_or(defaults.min_p),
                repeat_penalty: cli.repeat_penalty.unwrap_or(defaults.repeat_penalty),
                repeat_last_n: cli.repeat_last_n,
                seed,
            },
            stop: cli.stop.clone(),
            system: cli.system.clone(),
            raw: cli.raw,
            chat_template: cli.chat_template.clone(),
            each_line,
            parallel: cli.parallel.map(usize::from),
            verbose_prompt: cli.verbose_prompt,
            no_think: cli.no_think,
            stream: !cli.no_stream,
            json: cli.json,
            stats: cli.stats,
            extract: cli.extract,
            quiet: cli.quiet,
            stderr_is_terminal,
            explicit: ExplicitSampling {
                top_k: cli.top_k,
                min_p: cli.min_p,
                repeat_penalty: cli.repeat_penalty,
                seed: cli.seed,
            },
            reasoning,
            constraint,
            prompt_cache: prompt_cache(&cli, &var),
            lookup,
            draft_model: cli.draft_model.clone(),
            draft_max: usize::from(cli.draft_max),
            endpoint,
            mode,
            log_path: crate::log::default_path(&var),
            log: crate::log::enabled(cli.no_log, &var),
            continues: match (cli.cid, cli.continue_last) {
                (Some(id), _) => Some(Continue::Id(id)),
                (None, true) => Some(Continue::Latest),
                (None, false) => None,
            },
        })
    }
}

/// Whether the arguments ask for a log command (which reads no prompt).
fn log_command(cli: &Cli) -> bool {
    cli.logs.is_some() || cli.logs_search.is_some() || cli.logs_delete.is_some()
}

/// What the run does, from the arguments.
fn mode(cli: &Cli) -> Result<Mode> {
    let no_prompt = |flag| {
        if cli.prompt.is_empty() { Ok(()) } else { Err(UsageError::LogsTakeNoPrompt(flag)) }
    };
    if let Some(n) = cli.logs {
        no_prompt("--logs")?;
        return Ok(Mode::Logs(n));
    }
    if let Some(text) = &cli.logs_search {
        no_prompt("--logs-search")?;
        return Ok(Mode::Search(text.clone()));
    }
    if let Some(id) = cli.logs_delete {
        no_prompt("--logs-delete")?;
        return match (id, cli.all) {
            (Some(id), false) => Ok(Mode::Delete(Some(id))),
            (None, true) => Ok(Mode::Delete(None)),
            _ => Err(UsageError::DeleteWhat.into()),
        };
    }
    if cli.interactive {
        if !cli.prompt.is_empty() {
            return Err(UsageError::ChatTakesNoPrompt.into());
        }
        return Ok(Mode::Chat);
    }
    Ok(Mode::Answer)
}

/// Where the prompt cache lives, and how large it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptCacheConfig {
    pub dir: std::path::PathBuf,
    pub max_bytes: u64,
    /// Given with `--prompt-cache` or `STREAMGEN_PROMPT_CACHE` (with `--endpoint`, where it has
    /// no effect, the run says so), rather than the default folder.
    pub explicit: bool,
}

/// The prompt cache: `--prompt-cache DIR`, else `STREAMGEN_PROMPT_CACHE`, else the default
/// folder ([`crate::prompt_cache::default_dir`]); none with `--no-prompt-cache`, or when the
/// folder given is `off` (or `0`, `false`, `no`).
fn prompt_cache(cli: &Cli, var: &impl Fn(&str) -> Option<String>) -> Option<PromptCacheConfig> {
    if cli.no_prompt_cache {
        return None;
    }
    let given = cli.prompt_cache.clone().or_else(|| var(env::PROMPT_CACHE).map(Into::into));
    let off = |d: &std::path::Path| {
        d.to_str().is_some_and(|s| ["off", "0", "false", "no"].contains(&s.to_ascii_lowercase().as_str()))
    };
    let (dir, explicit) = match given {
        Some(dir) if off(&dir) => return None,
        Some(dir) => (dir, true),
        None => (crate::prompt_cache::default_dir(var)?, false),
    };
    Some(PromptCacheConfig { dir, max_bytes: cli.prompt_cache_max, explicit })
}

/// The server to use, if any: `--endpoint` or `STREAMGEN_ENDPOINT`, with `--api-key` or
/// `STREAMGEN_API_KEY`. `OPENAI_API_KEY` is a key for `OPENAI_BASE_URL` and is sent only when
/// the endpoint is that same URL: a key is never sent to a server it was not given for.
fn remote_options(cli: &Cli, var: &impl Fn(&str) -> Option<String>) -> Result<Option<RemoteOptions>> {
    let Some(endpoint) = cli.endpoint.clone().or_else(|| var(env::ENDPOINT)) else {
        return Ok(None);
    };
    if cli.offline {
        return Err(UsageError::LocalOnly("--offline").into());
    }
    if cli.chat_template.is_some() {
        return Err(UsageError::LocalOnly("--chat-template").into());
    }
    let base = base_url(&endpoint).map_err(|e| UsageError::BadEndpoint(format!("{e:#}")))?;
    let openai_base = var(env::OPENAI_BASE_URL).and_then(|url| base_url(&url).ok());
    let api_key = cli.api_key.clone().or_else(|| var(env::API_KEY)).or_else(|| {
        if openai_base.as_deref() == Some(base.as_str()) { var(env::OPENAI_API_KEY) } else { None }
    });
    Ok(Some(RemoteOptions {
        endpoint,
        api_key,
        model: cli.model.clone(),
        idle_timeout: std::time::Duration::from_secs(cli.idle_timeout),
        quiet: cli.quiet,
    }))
}

/// The constraint the flags give, if any, compiled once to find its mistakes before a model
/// loads. (clap lets at most one of the flags through.)
fn constraint(cli: &Cli) -> Result<Option<Constraint>, UsageError> {
    let made = if let Some(schema) = &cli.json_schema {
        Some(("--json-schema", Constraint::json_schema(schema)))
    } else if cli.json_object {
        Some(("--json-object", Ok(Constraint::JsonObject)))
    } else if let Some(fields) = &cli.schema {
        Some(("--schema", Constraint::concise(fields)))
    } else if let Some(path) = &cli.grammar {
        Some(("--grammar", Constraint::grammar_file(path)))
    } else if let Some(re) = &cli.regex {
        Some(("--regex", Ok(Constraint::Regex(re.clone()))))
    } else if !cli.choice.is_empty() {
        Some(("--choice", Constraint::choices(&cli.choice)))
    } else {
        None
    };
    let Some((flag, made)) = made else { return Ok(None) };
    let bad = |e: anyhow::Error| UsageError::BadConstraint { flag, why: format!("{e:#}") };
    let constraint = made.map_err(bad)?;
    constraint.check().map_err(bad)?;
    Ok(Some(constraint))
}

/// The most piped input read. Far beyond any model's context (Gemma 3's 128K tokens are
/// about 0.5 MiB of text), so only a runaway pipe (`cat /dev/zero |`) is stopped by it, before
/// it fills memory.
pub const MAX_STDIN_BYTES: u64 = 256 << 20;

/// Reads all of piped stdin. A closed or unreadable stdin (as under CI) counts as empty.
fn read_stdin() -> Result<Option<String>> {
    let mut bytes = Vec::new();
    match io::stdin().lock().take(MAX_STDIN_BYTES + 1).read_to_end(&mut bytes) {
        Ok(_) => {}
        // EBADF: no stdin at all. Treat like an empty pipe rather than failing.
        Err(e) if e.raw_os_error() == Some(9) => return Ok(None),
        Err(e) => return Err(e).context("cannot read standard input"),
    }
    if bytes.len() as u64 > MAX_STDIN_BYTES {
        return Err(UsageError::InputTooLarge.into());
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// The prompt from the words and piped input: words joined with spaces; with both, stdin is
/// the material and the words the instruction, material first, then a blank line, then the
/// instruction (`cat report.txt | streamgen Who signed it?`). Material first because a second
/// question about the same material then starts the same way, and the prompt cache skips the
/// material (as `llm` and `ollama run` order it, and as model vendors advise for long
/// documents: the question after them). One trailing line ending of stdin is dropped (`echo
/// text |` means "text").
pub fn compose_prompt(words: &[String], stdin: Option<&str>) -> Result<String> {
    let args = words.join(" ");
    let piped = stdin.map(|s| s.strip_suffix('\n').map(|s| s.strip_suffix('\r').unwrap_or(s)).unwrap_or(s));
    let piped = piped.filter(|s| !s.trim().is_empty());
    let prompt = match (args.trim().is_empty(), piped) {
        (false, Some(material)) => format!("{material}\n\n{args}"),
        (false, None) => args,
        (true, Some(material)) => material.to_string(),
        (true, None) => return Err(UsageError::EmptyPrompt.into()),
    };
    Ok(prompt)
}

/// The prompt of one `--each-line` line: the line after the instruction words and a blank
/// line; an empty line stays empty. The instruction goes first here (unlike a one-shot prompt's
/// material first): it is the same for every line, so it is the prefix the lines share, computed
/// once for all of them and kept in the prompt cache, and each line is short.
pub fn each_line_prompt(instruction: &str, line: &str) -> String {
    let instruction = instruction.trim();
    if line.trim().is_empty() || instruction.is_empty() {
        line.to_string()
    } else {
        format!("{instruction}\n\n{line}")
    }
}

/// A seed for runs without `--seed`: different on every run.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's randomness once per process.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn words_are_joined_and_stdin_is_material() {
        assert_eq!(compose_prompt(&words(&["a", "b"]), None).ok().as_deref(), Some("a b"));
        assert_eq!(compose_prompt(&[], Some("text\n")).ok().as_deref(), Some("text"));
        assert_eq!(compose_prompt(&[], Some("text\r\n")).ok().as_deref(), Some("text"));
        assert_eq!(compose_prompt(&[], Some("two\n\n")).ok().as_deref(), Some("two\n"));
        assert_eq!(
            compose_prompt(&words(&["Summarize:"]), Some("body\n")).ok().as_deref(),
            Some("body\n\nSummarize:")
        );
    }

    #[test]
    fn each_line_keeps_one_prompt_per_line() {
        // `str::lines` (as the reader splits them) drops a trailing `\r`; an empty line stays
        // an empty prompt, so that the output keeps one line per input line.
        let prompts = |instruction, stdin: &str| -> Vec<String> {
            stdin.lines().map(|line| each_line_prompt(instruction, line)).collect()
        };
        assert_eq!(prompts("", "a\r\n\nb\n"), ["a", "", "b"]);
        assert_eq!(prompts("Translate:", "x\ny"), ["Translate:\n\nx", "Translate:\n\ny"]);
    }

    #[test]
    fn an_empty_prompt_is_a_usage_error() {
        for (w, s) in [(vec![], None), (vec![], Some("")), (vec![], Some("  \n")), (words(&[" "]), None)] {
            let err = compose_prompt(&w, s).expect_err("empty prompt");
            assert!(err.downcast_ref::<UsageError>().is_some());
        }
    }
}
