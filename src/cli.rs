//! The command line, declared with clap's derive API. No I/O here: [`crate::config`] turns
//! these raw arguments into a resolved configuration.

use clap::Parser;

use crate::env;

const AFTER_HELP: &str = "\
Input:
  The prompt is the PROMPT words joined with spaces, or piped standard input, or both: then
  stdin is the material and the words the instruction, material first (stdin, a blank line,
  then the words), so a second question about the same document reuses the prompt cache.
  With --each-line the words go first: they are the prefix every line shares. One trailing
  newline of piped input is dropped. Models with a chat template get the prompt as one user
  turn; --raw gives plain completion.

Prompt cache:
  On by default in $XDG_CACHE_HOME/streamgen/prompts (~/.cache/streamgen/prompts): the keys
  and values of prompts of 64 tokens or more, readable by you alone. --no-prompt-cache or
  STREAMGEN_PROMPT_CACHE=off turns it off; rm -r ~/.cache/streamgen/prompts clears it.

Models:
  -m takes a local .gguf file or a Hugging Face repo. The default is
  ggml-org/gemma-3-270m-it-GGUF (gemma-3-270m-it-Q8_0.gguf), downloaded on first use into the
  Hugging Face cache (~/.cache/huggingface/hub, as Python's huggingface_hub) and used offline after.

Examples:
  echo 'What is the weather today?' | streamgen
  streamgen -m model.gguf --raw The capital of France is
  git diff | streamgen Summarize this change. | tee summary.txt
  answer=$(streamgen --no-stream -n 20 --temperature 0 'Say hi')
  cut -f2 questions.tsv | streamgen --each-line -n 40 > answers.txt
  streamgen 'Name a French cheese.' && streamgen -c 'And one from Spain?'
  streamgen --endpoint http://gpu-box:8000/v1 -m Qwen/Qwen3-8B 'Explain RAID 5.'
  streamgen -m ggml-org/gemma-3-270m-it-GGUF:Q8_0 'Name three colors.'
  streamgen --json 'Say hi' | jq -r 'select(.text) | .text'

Conversations:
  Every exchange is logged in $XDG_STATE_HOME/streamgen/logs.db (~/.local/state/streamgen);
  -c continues the latest conversation, --cid a given one, -i chats in the terminal, --logs
  shows the log. --no-log or STREAMGEN_LOG=0: nothing is written.

Reasoning models:
  Models that think in <think>...</think> before answering (Qwen3, DeepSeek-R1 distills) write
  only the answer to stdout; --reasoning says where the thinking goes and --no-think asks them
  to skip it. Thinking that uses up -n before the answer begins is an error (exit 1). With --raw
  the output is the model's text verbatim, tags included.

Servers:
  --endpoint sends the same requests to an OpenAI-compatible server (vLLM, llama-server, Ollama,
  SGLang) instead of the local engine; -m is then the served model's name (optional when the
  server serves one). Output, stop strings, --json, --each-line and exit codes are the same.

Exit status:
  0    success, also when the reader closes the pipe early (| head)
  1    runtime error (model file, download, generation); with --each-line, also when some
       lines failed (each has an empty output line and its error on stderr; the others are
       answered); an answer cut short by -n or the context before it matched its
       --json-schema, --regex, --choice... (the partial answer stays on stdout)
  2    usage error (bad option, empty prompt, a schema, grammar or regex that does not compile)
  130  interrupted (Ctrl-C)

Environment:
  STREAMGEN_MODEL   default for --model
  HF_HOME           Hugging Face home (cache in $HF_HOME/hub, token in $HF_HOME/token)
  HF_HUB_CACHE      Hugging Face cache folder
  HF_ENDPOINT       Hub address (default https://huggingface.co)
  HF_TOKEN          access token for gated or private repos
  HF_HUB_OFFLINE    1: never touch the network, like --offline
  STREAMGEN_PROMPT_CACHE  default for --prompt-cache (off: no prompt cache)
  STREAMGEN_LOGS    the conversation log's path
  STREAMGEN_LOG     0: log nothing, like --no-log
  STREAMGEN_ENDPOINT  default for --endpoint
  STREAMGEN_API_KEY   default for --api-key
  OPENAI_API_KEY    the key, only when --endpoint is the same URL as OPENAI_BASE_URL
  NO_COLOR          no colour on stderr";

/// Run a small language model locally and stream its answer to stdout, token by token.
#[derive(Debug, Parser)]
#[command(name = "streamgen", version, about, after_help = AFTER_HELP, max_term_width = 100)]
pub struct Cli {
    /// The prompt; several words are joined with spaces.
    #[arg(value_name = "PROMPT")]
    pub prompt: Vec<String>,

    /// A local .gguf file or a Hugging Face repo: owner/repo, owner/repo:QUANT,
    /// owner/repo/file.gguf, each optionally @revision.
    #[arg(short = 'm', long, value_name = "MODEL", env = env::MODEL, help_heading = "Model")]
    pub model: Option<String>,

    /// Never touch the network: use only local files and the cache.
    #[arg(long, help_heading = "Model")]
    pub offline: bool,

    /// Context size in tokens (prompt + answer); 0 means the model's maximum.
    #[arg(long, value_name = "N", default_value_t = 0, help_heading = "Model")]
    pub ctx_size: usize,

    /// Where the prompt cache keeps the keys and values of prompts, so that a later prompt that
    /// starts the same way (the same piped document with another question, a long system
    /// prompt) skips computing that part; `off` turns it off [default:
    /// $XDG_CACHE_HOME/streamgen/prompts, or ~/.cache/streamgen/prompts].
    #[arg(long, value_name = "DIR", help_heading = "Model")]
    pub prompt_cache: Option<std::path::PathBuf>,

    /// Neither read nor write the prompt cache.
    #[arg(long, conflicts_with = "prompt_cache", help_heading = "Model")]
    pub no_prompt_cache: bool,

    /// The most the prompt cache folder holds (K, M, G); the least recently used prompts go
    /// first.
    #[arg(long, value_name = "SIZE", default_value = "2G", value_parser = size, help_heading = "Model")]
    pub prompt_cache_max: u64,

    /// Threads for the matrix kernels [default: the number of physical cores].
    #[arg(short = 't', long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..), help_heading = "Model")]
    pub threads: Option<u16>,

    /// Speculate from the text so far (prompt lookup): proposals copied from earlier text are
    /// checked in one pass. Greedy output does not change; sampled output keeps its
    /// distribution but not a seed's draws [default: on with --temperature 0].
    #[arg(long, overrides_with = "no_lookup", help_heading = "Speed")]
    pub lookup: bool,

    /// Never speculate from the text so far.
    #[arg(long, help_heading = "Speed")]
    pub no_lookup: bool,

    /// A small model with the same vocabulary proposes the next tokens, checked by the model in
    /// one pass (a file, a Hub repo or repo:QUANT, as -m). Greedy output does not change; sampled
    /// output keeps its distribution.
    #[arg(long, value_name = "MODEL", help_heading = "Speed")]
    pub draft_model: Option<String>,

    /// The most tokens proposed at once (by the draft model or the lookup); at most 14.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=14), help_heading = "Speed")]
    pub draft_max: u16,

    /// Stop after N generated tokens [default: until the model ends or the context is full].
    #[arg(short = 'n', long, value_name = "N", help_heading = "Sampling")]
    pub max_tokens: Option<usize>,

    /// Generate exactly -n tokens: the model's end-of-generation tokens are text like any other
    /// (for benchmarks, and to force a length).
    #[arg(long, requires = "max_tokens", help_heading = "Sampling")]
    pub ignore_eos: bool,

    /// With --json: each token's log-probability under the model, and the N most likely tokens
    /// at its place (0 to 20), as the OpenAI API reports them.
    #[arg(long, value_name = "N", requires = "json", value_parser = clap::value_parser!(u8).range(0..=20), help_heading = "Output")]
    pub logprobs: Option<u8>,

    /// Sampling temperature; 0 always picks the most likely token (greedy).
    #[arg(long, value_name = "T", default_value_t = 0.8, value_parser = non_negative, help_heading = "Sampling")]
    pub temperature: f32,

    /// Sample among the K most likely tokens; 0 disables [default: 40].
    #[arg(long, value_name = "K", help_heading = "Sampling")]
    pub top_k: Option<usize>,

    /// Sample among the most likely tokens whose probabilities add up to P; 1 disables.
    #[arg(long, value_name = "P", default_value_t = 0.95, value_parser = probability, help_heading = "Sampling")]
    pub top_p: f32,

    /// Drop tokens less likely than P times the most likely one; 0 disables [default: 0.05].
    #[arg(long, value_name = "P", value_parser = probability, help_heading = "Sampling")]
    pub min_p: Option<f32>,

    /// Penalize tokens seen in the last --repeat-last-n tokens; 1 disables [default: 1].
    #[arg(long, value_name = "X", value_parser = positive, help_heading = "Sampling")]
    pub repeat_penalty: Option<f32>,

    /// How many recent tokens the repeat penalty looks at.
    #[arg(long, value_name = "N", default_value_t = 64, help_heading = "Sampling")]
    pub repeat_last_n: usize,

    /// Random seed: the same seed and input give the same output [default: random].
    #[arg(long, value_name = "N", help_heading = "Sampling")]
    pub seed: Option<u64>,

    /// End the answer before this text; it is never printed. Repeatable.
    #[arg(long, value_name = "TEXT", help_heading = "Sampling")]
    pub stop: Vec<String>,

    /// A system message for chat models (folded into the first user turn where the template
    /// has no system role).
    #[arg(short = 's', long, value_name = "TEXT", help_heading = "Prompt")]
    pub system: Option<String>,

    /// Plain completion of the prompt text, without a chat template.
    #[arg(long, help_heading = "Prompt")]
    pub raw: bool,

    /// Use this chat template instead of the model's: a built-in name (gemma, chatml, llama3)
    /// or a Jinja file.
    #[arg(long, value_name = "NAME|FILE", conflicts_with = "raw", help_heading = "Prompt")]
    pub chat_template: Option<String>,

    /// Ask a reasoning model to answer without thinking first: the chat template is rendered
    /// with enable_thinking=false (Qwen3; sent as chat_template_kwargs with --endpoint).
    #[arg(long, conflicts_with = "raw", help_heading = "Prompt")]
    pub no_think: bool,

    /// Treat each line of standard input as a separate prompt, and write exactly one line of
    /// output per input line (newlines in an answer are written as \n, backslashes as \\).
    #[arg(long, help_heading = "Prompt")]
    pub each_line: bool,

    /// Print how many tokens the prompt is (after the chat template, as -v shows it), then
    /// exit without generating; with --each-line, one count per line. Reads only the model's
    /// vocabulary.
    #[arg(long, conflicts_with_all = ["tokenize", "interactive", "endpoint", "logs", "logs_search", "logs_delete"], help_heading = "Prompt")]
    pub count_tokens: bool,

    /// Print the prompt's token ids as a JSON array (`[1, 2, 3]`), then exit without
    /// generating; with --each-line, one array per line. Reads only the model's vocabulary.
    #[arg(long, conflicts_with_all = ["interactive", "endpoint", "logs", "logs_search", "logs_delete"], help_heading = "Prompt")]
    pub tokenize: bool,

    /// Print the exact prompt given to the model (after the chat template) and its token ids,
    /// as `[1, 2, 3]`, on stderr.
    #[arg(long, help_heading = "Prompt")]
    pub verbose_prompt: bool,

    /// Where a reasoning model's thinking goes: hide, stderr (dimmed on a terminal) or stdout
    /// (between <think> and </think>; with --json, as "reasoning" objects) [default: stderr
    /// when it is a terminal, else hide; with --json, stdout].
    #[arg(long, value_name = "WHERE", help_heading = "Output")]
    pub reasoning: Option<crate::reasoning::ReasoningMode>,

    /// Print the whole answer once, at the end, instead of streaming it.
    #[arg(long, help_heading = "Output")]
    pub no_stream: bool,

    /// Write JSON Lines: one object per streamed chunk, then one with the finish reason,
    /// token counts and timings.
    #[arg(long, help_heading = "Output")]
    pub json: bool,

    /// Write only the contents of the answer's first fenced code block (``` lines), streamed;
    /// the answer ends with the block. Nothing, and a note on stderr, when there is none.
    #[arg(short = 'x', long, help_heading = "Output")]
    pub extract: bool,

    /// After the answer, print token counts, speeds, time to first token and load time on stderr.
    #[arg(long, help_heading = "Output")]
    pub stats: bool,

    /// Print no progress or informational lines on stderr; errors still print.
    #[arg(short = 'q', long, help_heading = "Output")]
    pub quiet: bool,

    /// Continue the latest conversation in the log: the model sees its earlier turns (and its
    /// system prompt, unless -s gives another).
    #[arg(short = 'c', long = "continue", conflicts_with_all = ["raw", "each_line"], help_heading = "Conversation")]
    pub continue_last: bool,

    /// Continue conversation ID of the log (as --logs shows it).
    #[arg(long, value_name = "ID", conflicts_with_all = ["continue_last", "raw", "each_line"], help_heading = "Conversation")]
    pub cid: Option<i64>,

    /// A chat in the terminal: line editing and history, each answer streamed; Ctrl-C stops
    /// an answer, Ctrl-D leaves; /clear, /system TEXT, /save FILE. Also what plain
    /// `streamgen` opens when stdin and stdout are both terminals.
    #[arg(short = 'i', long, conflicts_with_all = ["raw", "each_line", "json", "no_stream"], help_heading = "Conversation")]
    pub interactive: bool,

    /// Do not log this exchange (every exchange is logged in
    /// $XDG_STATE_HOME/streamgen/logs.db unless STREAMGEN_LOG=0).
    #[arg(long, help_heading = "Conversation")]
    pub no_log: bool,

    /// Print the last N exchanges of the log (as JSON Lines with --json), then exit.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "3", help_heading = "Conversation")]
    pub logs: Option<usize>,

    /// Print the logged exchanges that contain every word of TEXT (best match last), then exit.
    #[arg(long, value_name = "TEXT", conflicts_with = "logs", help_heading = "Conversation")]
    pub logs_search: Option<String>,

    /// Delete conversation ID from the log (or every one, with --all), then exit.
    #[arg(long, value_name = "ID", num_args = 0..=1, conflicts_with_all = ["logs", "logs_search"], help_heading = "Conversation")]
    pub logs_delete: Option<Option<i64>>,

    /// With --logs-delete: delete every conversation.
    #[arg(long, requires = "logs_delete", help_heading = "Conversation")]
    pub all: bool,

    /// Send the requests to this OpenAI-compatible server (its base URL, such as
    /// http://gpu-box:8000/v1) instead of running the model here [env: STREAMGEN_ENDPOINT].
    #[arg(long, value_name = "URL", help_heading = "Server")]
    pub endpoint: Option<String>,

    /// The server's API key, sent as a bearer token [env: STREAMGEN_API_KEY].
    #[arg(long, value_name = "KEY", help_heading = "Server")]
    pub api_key: Option<String>,

    /// With --each-line, how many lines are answered at once [default: 15 here on CPUs with
    /// AVX-512 VNNI, else 8 (one batched decode step for all of them); 4 requests in flight with
    /// --endpoint].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64), help_heading = "Prompt")]
    pub parallel: Option<u16>,

    /// The answer is JSON valid against this JSON Schema, given inline or as @FILE; '{}' allows
    /// any JSON value. JSON is written on one line.
    #[arg(long, value_name = "SCHEMA|@FILE", group = "constraint", help_heading = "Structured output")]
    pub json_schema: Option<String>,

    /// The answer is a JSON object.
    #[arg(long, group = "constraint", help_heading = "Structured output")]
    pub json_object: bool,

    /// The answer is a JSON object with these fields (llm's concise syntax): 'name, age int,
    /// bio: a short bio'. Types are int, float, bool and str (the default); a description goes
    /// after a colon; fields are separated by commas, or by newlines when there are any.
    #[arg(long, value_name = "FIELDS", group = "constraint", help_heading = "Structured output")]
    pub schema: Option<String>,

    /// The answer matches this grammar: Lark (llguidance's dialect; see
    /// docs/structured-output.md) or GBNF, llama.cpp's format.
    #[arg(long, value_name = "FILE", group = "constraint", help_heading = "Structured output")]
    pub grammar: Option<std::path::PathBuf>,

    /// The whole answer matches this regular expression (Rust regex syntax).
    #[arg(long, value_name = "RE", group = "constraint", help_heading = "Structured output")]
    pub regex: Option<String>,

    /// The answer is exactly one of these strings, separated by commas.
    #[arg(
        long,
        value_name = "A,B,...",
        value_delimiter = ',',
        group = "constraint",
        help_heading = "Structured output"
    )]
    pub choice: Vec<String>,

    /// Give up when the server sends nothing for this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86400), help_heading = "Server")]
    pub idle_timeout: u64,
}

/// A size in bytes, with an optional K, M or G suffix (powers of 1024).
fn size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| format!("'{s}' is not a size such as 512M or 2G"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("'{s}' is too large"))
}

/// A finite number, or a message saying why not.
fn finite(s: &str) -> Result<f32, String> {
    let v: f32 = s.trim().parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v.is_finite() { Ok(v) } else { Err(format!("'{s}' is not a finite number")) }
}

/// Temperatures: finite and at least 0.
fn non_negative(s: &str) -> Result<f32, String> {
    let v = finite(s)?;
    if v >= 0.0 { Ok(v) } else { Err(format!("{v} is negative")) }
}

/// Probabilities (top-p, min-p): from 0 to 1.
fn probability(s: &str) -> Result<f32, String> {
    let v = finite(s)?;
    if (0.0..=1.0).contains(&v) { Ok(v) } else { Err(format!("{v} is not between 0 and 1")) }
}

/// Factors (repeat penalty): finite and above 0.
fn positive(s: &str) -> Result<f32, String> {
    let v = finite(s)?;
    if v > 0.0 { Ok(v) } else { Err(format!("{v} is not above 0")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sampling_flags_out_of_range_are_usage_errors() {
        for (flag, value) in [
            ("--temperature", "nan"),
            ("--temperature", "inf"),
            ("--temperature", "-1"),
            ("--top-p", "1.5"),
            ("--top-p", "NaN"),
            ("--min-p", "-0.1"),
            ("--repeat-penalty", "0"),
            ("--repeat-penalty", "-inf"),
        ] {
            let arg = format!("{flag}={value}");
            let err = Cli::try_parse_from(["streamgen", arg.as_str(), "x"]).expect_err(value);
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{flag} {value}");
        }
        for (flag, value) in
            [("--temperature", "0"), ("--top-p", "1"), ("--min-p", "0"), ("--repeat-penalty", "1.1")]
        {
            assert!(Cli::try_parse_from(["streamgen", flag, value, "x"]).is_ok(), "{flag} {value}");
        }
    }

    #[test]
    fn command_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn words_and_flags_parse() {
        let cli =
            Cli::try_parse_from(["streamgen", "-m", "x.gguf", "-n", "5", "--seed", "3", "hello", "world"])
                .expect("valid arguments");
        assert_eq!(cli.prompt, ["hello", "world"]);
        assert_eq!(cli.max_tokens, Some(5));
        assert_eq!(cli.seed, Some(3));
        assert!(Cli::try_parse_from(["streamgen", "--threads", "0", "x"]).is_err());
    }
}
