//! Chat templates: turning a system prompt and a user's text into the exact prompt string an
//! instruct model was trained on. Owns the Jinja environment that Hugging Face templates
//! expect (as `transformers`' `apply_chat_template` sets it up), the built-in templates, the
//! fallback that folds a system prompt into the user turn, and the rule that keeps BOS single.
//! The environment and its limits are in `sandbox.rs`, Python's `json.dumps` as `tojson` in
//! `tojson.rs`, and the built-in templates are the `.jinja` files in `templates/`.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use minijinja::value::Value;
use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

use crate::gguf::Gguf;

mod sandbox;
#[cfg(test)]
mod tests;
mod tojson;

use sandbox::{
    Capped, RENDER_OUTPUT_BASE, RENDER_STACK, hf_environment, read_template_file, strftime, strftime_now,
};
pub use sandbox::{RENDER_TIME_LIMIT, TEMPLATE_FUEL};

/// The GGUF metadata key that holds a model's chat template.
pub const GGUF_CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// The names `--chat-template` accepts besides a file path.
pub const BUILTIN_NAMES: [&str; 3] = ["gemma", "chatml", "llama3"];

/// The name the template is stored under in its environment; it shows in error locations.
const TEMPLATE_NAME: &str = "chat_template";

/// One turn of a conversation, as templates see it: `message.role`, `message['content']`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// The variables a template gets besides `messages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderContext {
    /// The BOS token's text (`<bos>`, `<|begin_of_text|>`); templates often start with it.
    pub bos_token: String,
    /// The EOS token's text.
    pub eos_token: String,
    /// Append the header of the assistant's turn, so the model answers instead of the user.
    pub add_generation_prompt: bool,
    /// The time `strftime_now` reports. `None` is the local clock in the local time zone, as
    /// `transformers` does (Llama 3.2 puts today's date in its system header); `Some` is
    /// formatted in UTC, so a fixed time gives the same prompt on every machine (tests).
    pub now: Option<SystemTime>,
    /// How long a render may take before it is given up ([`RENDER_TIME_LIMIT`]).
    pub time_limit: Duration,
    /// `enable_thinking` (Qwen3's switch for reasoning); `None` leaves the variable undefined,
    /// as `transformers` does unless asked, so the template's default holds.
    pub enable_thinking: Option<bool>,
}

impl RenderContext {
    /// A context for generating a reply: the generation prompt on, the real clock.
    pub fn new(bos_token: impl Into<String>, eos_token: impl Into<String>) -> Self {
        Self {
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            add_generation_prompt: true,
            now: None,
            time_limit: RENDER_TIME_LIMIT,
            enable_thinking: None,
        }
    }
}

/// A compiled chat template and the Jinja environment it runs in.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source()).finish()
    }
}

impl ChatTemplate {
    /// Compiles `source` once. A syntax error says where it is.
    pub fn from_source(source: &str) -> Result<Self> {
        let mut env = hf_environment()?;
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(anyhow::Error::new)
            .context("the chat template does not compile")?;
        Ok(Self { env, source: source.to_owned() })
    }

    /// A built-in template by name: `gemma` (Gemma 3), `chatml` (Qwen2.5), `llama3` (Llama 3.2).
    pub fn builtin(name: &str) -> Option<Self> {
        let source = match name {
            "gemma" => GEMMA3_TEMPLATE,
            "chatml" => CHATML_TEMPLATE,
            "llama3" => LLAMA3_TEMPLATE,
            _ => return None,
        };
        // The built-ins are tested to compile; a failure here is a bug in this file.
        Self::from_source(source).ok()
    }

    /// The value of `--chat-template NAME|FILE`: a built-in name, else a file to read. A
    /// built-in name wins over a file of the same name; write `./gemma` to mean the file.
    pub fn from_arg(arg: &str) -> Result<Self> {
        if let Some(template) = Self::builtin(arg) {
            return Ok(template);
        }
        let path = Path::new(arg);
        let source = read_template_file(path).with_context(|| {
            format!(
                "cannot read chat template file {} (built-in templates are {})",
                path.display(),
                BUILTIN_NAMES.join(", ")
            )
        })?;
        Self::from_source(&source).with_context(|| format!("in chat template file {}", path.display()))
    }

    /// The template stored in a GGUF file, or `None` when the file carries none (a base model:
    /// run raw completion).
    pub fn from_gguf(gguf: &Gguf) -> Result<Option<Self>> {
        let Some(source) = gguf.opt_str(GGUF_CHAT_TEMPLATE_KEY)? else {
            return Ok(None);
        };
        if source.trim().is_empty() {
            return Ok(None);
        }
        Self::from_source(source)
            .with_context(|| {
                format!(
                    "{}: metadata key {GGUF_CHAT_TEMPLATE_KEY}: use --chat-template NAME|FILE \
                     to override it, or --raw",
                    gguf.path().display()
                )
            })
            .map(Some)
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` with the variables `transformers` passes: `messages`, `bos_token`,
    /// `eos_token`, `add_generation_prompt`, `tools` and `documents` (none), and
    /// `enable_thinking` when the context sets it.
    pub fn render(&self, messages: &[Message], ctx: &RenderContext) -> Result<String> {
        // The render runs on a thread of its own, for two reasons. minijinja's values free,
        // print and compare nested lists recursively, and a template can nest a list as deep as
        // its fuel allows (two million levels) in a loop: deeper than any thread's default
        // stack, which would kill the process; this thread's stack holds the deepest nesting
        // the fuel allows (reserved address space, touched only as deep as a template goes).
        // And some work is not charged to the fuel: a list doubled sixty times by `l + l` is
        // a small chain of views, but `|length` on it walks 2^60 elements. Such a render is
        // given up after a time limit (its thread cannot be stopped, and is left behind).
        let template = ChatTemplate { env: self.env.clone(), source: self.source.clone() };
        let (messages, ctx) = (messages.to_vec(), ctx.clone());
        let limit = ctx.time_limit;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("streamgen-template".into())
            .stack_size(RENDER_STACK)
            .spawn(move || {
                let _ = tx.send(template.render_here(&messages, &ctx));
            })
            .context("cannot start the template thread")?;
        match rx.recv_timeout(limit) {
            Ok(rendered) => rendered,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => bail!(
                "the chat template ran for more than {} s (a runaway template?); use --chat-template NAME|FILE or --raw",
                limit.as_secs_f64()
            ),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the chat template failed to render (its thread panicked)")
            }
        }
    }

    fn render_here(&self, messages: &[Message], ctx: &RenderContext) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(anyhow::Error::new)?;
        // A fixed time shadows the global `strftime_now` for this render only.
        let strftime_now = match ctx.now {
            Some(time) => {
                let zoned = jiff::Timestamp::try_from(time)
                    .context("the fixed render time is out of range")?
                    .to_zoned(jiff::tz::TimeZone::UTC);
                Value::from_function(move |format: &str| strftime(&zoned, format))
            }
            None => Value::from_function(strftime_now),
        };
        // A template is a stranger's program (it comes inside a downloaded model): its work is
        // bounded by fuel (minijinja counts instructions) and its output by a cap, so a loop
        // over range(10**9) or a string doubled in a loop ends in an error, not a hung or
        // swapping machine.
        let budget: usize = messages.iter().map(|m| m.content.len()).sum();
        let mut out = Capped { buf: Vec::new(), limit: RENDER_OUTPUT_BASE + 2 * budget };
        template
            .render_captured_to(
                context! {
                    messages => Value::from(minijinja::value::Serde(messages)),
                    bos_token => &ctx.bos_token,
                    eos_token => &ctx.eos_token,
                    add_generation_prompt => ctx.add_generation_prompt,
                    tools => Value::from(()),
                    documents => Value::from(()),
                    strftime_now => strftime_now,
                    ..match ctx.enable_thinking {
                        Some(on) => context! { enable_thinking => on },
                        None => context! {},
                    }
                },
                &mut out,
            )
            .map_err(|e| match e.kind() {
                ErrorKind::OutOfFuel => anyhow!(
                    "the chat template did more than {TEMPLATE_FUEL} steps of work (a runaway loop?); \
                     use --chat-template NAME|FILE or --raw"
                ),
                ErrorKind::WriteFailure if out.buf.len() >= out.limit => anyhow!(
                    "the chat template's output passed {} bytes (a runaway template?); \
                     use --chat-template NAME|FILE or --raw",
                    out.limit
                ),
                _ => anyhow::Error::new(e),
            })
            .context("the chat template failed to render")?;
        String::from_utf8(out.buf).context("the chat template wrote invalid UTF-8")
    }

    /// One user turn, with an optional system prompt, ready for the model to answer.
    ///
    /// The system prompt goes in a system message first. When the template rejects that
    /// (Gemma 2 raises "System role not supported") or silently drops it, the system text is
    /// folded into the user turn as `"{system}\n\n{user}"`, which is what Gemma 3's own
    /// template does with a system message.
    pub fn render_prompt(&self, system: Option<&str>, user: &str, ctx: &RenderContext) -> Result<String> {
        self.render_turns(system, &[], user, ctx)
    }

    /// A conversation: the earlier user and assistant turns (`history`, oldest first), then
    /// the user's new turn, with an optional system prompt, ready for the model to answer. The
    /// system prompt is handled as in [`ChatTemplate::render_prompt`], folded into the first
    /// user turn when the template has no place for it.
    pub fn render_turns(
        &self,
        system: Option<&str>,
        history: &[Message],
        user: &str,
        ctx: &RenderContext,
    ) -> Result<String> {
        let mut turns = history.to_vec();
        turns.push(Message::new("user", user));
        let Some(system) = system else {
            return self.render(&turns, ctx);
        };
        let with_system: Vec<Message> =
            std::iter::once(Message::new("system", system)).chain(turns.clone()).collect();
        match self.render(&with_system, ctx) {
            Ok(rendered) if !self.drops_system(&rendered, system, &turns, ctx) => Ok(rendered),
            first => {
                let mut folded = turns;
                // The first turn is the user's: history alternates from a user turn.
                if let Some(first_user) = folded.iter_mut().find(|m| m.role == "user") {
                    first_user.content = format!("{system}\n\n{}", first_user.content);
                }
                self.render(&folded, ctx).with_context(|| match first {
                    Err(e) => format!(
                        "the system prompt failed both as a system message ({e:#}) and folded \
                         into the user turn"
                    ),
                    Ok(_) => "the template ignores system messages, and the system prompt \
                              folded into the user turn failed"
                        .to_owned(),
                })
            }
        }
    }

    /// Whether a render with a system message lost the system text. Templates trim content,
    /// so the trimmed text is looked for; a render identical to the one without a system
    /// message also counts, in case the user text happens to contain the system text.
    fn drops_system(&self, rendered: &str, system: &str, turns: &[Message], ctx: &RenderContext) -> bool {
        if !rendered.contains(system.trim()) {
            return true;
        }
        self.render(turns, ctx).is_ok_and(|alone| alone == rendered)
    }
}

/// Whether the tokenizer should add BOS in front of a rendered prompt: only when it would
/// add one anyway and the template has not already written the BOS text itself. Most
/// templates start with `{{ bos_token }}`, and a second BOS degrades the answer.
pub fn needs_bos(rendered: &str, bos_text: Option<&str>, tokenizer_adds_bos: bool) -> bool {
    let already = bos_text.is_some_and(|bos| !bos.is_empty() && rendered.starts_with(bos));
    tokenizer_adds_bos && !already
}

/// Gemma 3's template, as `google/gemma-3-*-it` ship it in `tokenizer_config.json` and GGUF
/// converters copy it (it is `_CHAT_TEMPLATE` in transformers' `convert_gemma3_weights.py`).
/// A system message becomes a prefix of the first user turn.
const GEMMA3_TEMPLATE: &str = include_str!("templates/gemma3.jinja");

/// Qwen2.5-Instruct's ChatML template (llama.cpp's `models/templates/Qwen-Qwen2.5-7B-Instruct.jinja`).
/// Without a system message it inserts Qwen's default one.
const CHATML_TEMPLATE: &str = include_str!("templates/chatml.jinja");

/// Llama 3.2-Instruct's template (llama.cpp's `models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja`):
/// like 3.1's and 3.3's, but with today's date from `strftime_now` instead of a fixed one.
const LLAMA3_TEMPLATE: &str = include_str!("templates/llama3.jinja");
