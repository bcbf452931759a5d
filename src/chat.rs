//! Chat templates: turning a system prompt and a user's text into the exact prompt string an
//! instruct model was trained on. Owns the Jinja environment that Hugging Face templates
//! expect (as `transformers`' `apply_chat_template` sets it up), the built-in templates, the
//! fallback that folds a system prompt into the user turn, and the rule that keeps BOS single.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, context};
use serde::Serialize;

use crate::gguf::Gguf;

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
        let user_only = [Message::new("user", user)];
        let Some(system) = system else {
            return self.render(&user_only, ctx);
        };
        let with_system = [Message::new("system", system), Message::new("user", user)];
        match self.render(&with_system, ctx) {
            Ok(rendered) if !self.drops_system(&rendered, system, user, ctx) => Ok(rendered),
            first => {
                let folded = [Message::new("user", format!("{system}\n\n{user}"))];
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
    fn drops_system(&self, rendered: &str, system: &str, user: &str, ctx: &RenderContext) -> bool {
        if !rendered.contains(system.trim()) {
            return true;
        }
        self.render(&[Message::new("user", user)], ctx).is_ok_and(|alone| alone == rendered)
    }
}

/// Whether the tokenizer should add BOS in front of a rendered prompt: only when it would
/// add one anyway and the template has not already written the BOS text itself. Most
/// templates start with `{{ bos_token }}`, and a second BOS degrades the answer.
pub fn needs_bos(rendered: &str, bos_text: Option<&str>, tokenizer_adds_bos: bool) -> bool {
    let already = bos_text.is_some_and(|bos| !bos.is_empty() && rendered.starts_with(bos));
    tokenizer_adds_bos && !already
}

/// A Jinja environment configured like `transformers`' chat-template sandbox:
/// `trim_blocks` and `lstrip_blocks` on, `keep_trailing_newline` off (Jinja's default, which
/// `transformers` keeps), loop controls, Python string and dict methods, `raise_exception`,
/// `strftime_now` and a `tojson` that writes what Python's `json.dumps` writes.
fn hf_environment() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
        .context("configuring the template syntax")?;
    env.set_syntax(syntax);
    env.set_fuel(Some(TEMPLATE_FUEL));
    // Filters and functions Jinja has and minijinja leaves to its contrib crate.
    minijinja_contrib::add_to_environment(&mut env);
    // `.strip()`, `.startswith()`, `.split()`, `.items()`, ...: templates are written in Python.
    env.set_unknown_method_callback(|state, value, method, args| {
        if method == "format"
            && let Some(format) = value.as_str()
        {
            check_format_widths(format)?;
        }
        minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
    });
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    Ok(env)
}

/// How long a render may run (see [`ChatTemplate::render`]): real templates take
/// milliseconds.
pub const RENDER_TIME_LIMIT: Duration = Duration::from_secs(10);

/// The stack of the thread templates render on: enough for the deepest nesting of values the
/// fuel allows (see [`ChatTemplate::render`]). Reserved address space, not memory: pages are
/// used only as deep as a template goes.
const RENDER_STACK: usize = 2 << 30;

/// The most instructions one rendering may execute. A real chat template renders a
/// conversation in thousands (Qwen 3's, one of the longest, in about 5,000 per message);
/// ten million take well under a second.
pub const TEMPLATE_FUEL: u64 = 10_000_000;

/// The most bytes a rendering may write beyond twice the messages' text.
const RENDER_OUTPUT_BASE: usize = 16 << 20;

/// The largest chat template file `--chat-template` reads.
const MAX_TEMPLATE_FILE: u64 = 1 << 20;

/// The rendering's output, refusing to grow past `limit` bytes.
struct Capped {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            self.buf.resize(self.limit, 0);
            return Err(std::io::Error::other("the chat template's output is too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads a template file, refusing what is not a regular file of reasonable size without
/// blocking on it: `--chat-template` on a FIFO would wait for a writer, on `/dev/zero` read
/// forever.
fn read_template_file(path: &Path) -> Result<String> {
    use std::io::Read;
    #[cfg(unix)]
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?
    };
    #[cfg(not(unix))]
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        bail!("not a regular file");
    }
    if meta.len() > MAX_TEMPLATE_FILE {
        bail!("{} bytes, more than the {MAX_TEMPLATE_FILE} a chat template may have", meta.len());
    }
    let mut text = String::new();
    file.take(MAX_TEMPLATE_FILE + 1).read_to_string(&mut text)?;
    Ok(text)
}

/// The widest field `str.format` may pad to, and the most digits it may print.
const MAX_FORMAT_WIDTH: u64 = 1 << 16;

/// Refuses a `str.format` string with a width or precision over [`MAX_FORMAT_WIDTH`]: the
/// contrib crate's `format` builds the padding before anything is charged, so
/// `'{:>999999999999}'.format(x)` would abort the process on a failed allocation.
fn check_format_widths(format: &str) -> std::result::Result<(), Error> {
    // Numbers in a field's spec, after its ':' (`{0:>10.3f}`); `{{` is a literal brace and
    // names no field, and a number before the ':' is an argument index.
    // minijinja's field parser steps through a field by bytes and panics inside a multi-byte
    // character (found by fuzzing): fields (names, `[indices]`, specs with nested fields) must
    // be ASCII. A field ends at its matching `}` outside brackets.
    let bytes = format.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'{' {
            i += 1;
            continue;
        }
        if bytes.get(i + 1) == Some(&b'{') {
            i += 2; // a literal brace
            continue;
        }
        let (mut j, mut depth, mut bracket) = (i + 1, 1usize, false);
        while j < bytes.len() {
            match bytes[j] {
                b'[' => bracket = true,
                b']' => bracket = false,
                b'{' if !bracket => depth += 1,
                b'}' if !bracket => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            j += 1;
        }
        if !bytes[i..j.min(bytes.len())].is_ascii() {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "str.format: a replacement field with characters other than ASCII",
            ));
        }
        i = j + 1;
    }
    for field in format.split('{').skip(1).filter(|f| !f.is_empty()) {
        let Some((_, spec)) = field.split('}').next().and_then(|f| f.split_once(':')) else { continue };
        for digits in spec.split(|c: char| !c.is_ascii_digit()).filter(|d| !d.is_empty()) {
            if digits.parse::<u64>().is_ok_and(|n| n <= MAX_FORMAT_WIDTH) {
                continue;
            }
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "str.format: a width or precision of {digits} is over the limit of {MAX_FORMAT_WIDTH}"
                ),
            ));
        }
    }
    Ok(())
}

/// `raise_exception(msg)`: the template's way to refuse its input; the error carries `msg`.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)` on the local clock, in the local time zone, like Python's
/// `datetime.now().strftime(format)`.
fn strftime_now(format: &str) -> std::result::Result<String, Error> {
    strftime(&jiff::Zoned::now(), format)
}

fn strftime(time: &jiff::Zoned, format: &str) -> std::result::Result<String, Error> {
    jiff::fmt::strtime::format(format, time).map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format {format:?}")).with_source(e)
    })
}

/// `tojson` as `transformers` defines it: Python's `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)`. Jinja's own `tojson` (and minijinja's)
/// escape HTML characters and write compact JSON, which is not what tool-calling templates
/// were trained on: `{"a": 1, "b": [1, 2]}` with spaces after `:` and `,`.
///
/// minijinja charges a filter's fuel only for the value it returns, once it is built, so this
/// one charges its output as it writes (see [`charge`]): an indent of `10**12`, or 100,000 items
/// indented by 100,000 spaces, is refused before it is allocated, not after.
fn tojson(state: &State, value: &Value, kwargs: Kwargs) -> std::result::Result<String, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_usize(), v.as_str()) {
            (Some(n), _) => {
                charge(state, n)?;
                Some(" ".repeat(n))
            }
            (None, Some(s)) => Some(s.to_owned()),
            _ => {
                return Err(Error::new(ErrorKind::InvalidOperation, "tojson: bad indent"));
            }
        },
        None => None,
    };
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators needs two"));
        }
        // Python's defaults: no space before a newline when indenting.
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(state, &mut out, value, &style, 0)?;
    Ok(out)
}

/// How deep `tojson` follows nested lists and maps. Python's `json.dumps` stops at its
/// recursion limit (about 1,000); a template can nest a list a million deep within its fuel,
/// which would overflow the stack here.
const MAX_JSON_DEPTH: usize = 500;

/// Charges `bytes` about to be written against the rendering's fuel, at the rate minijinja
/// charges data (one unit per 64 bytes, at least one per call), so that a runaway `tojson`
/// ends in the same out-of-fuel error as any other runaway work.
fn charge(state: &State, bytes: usize) -> std::result::Result<(), Error> {
    state.consume_fuel((bytes as u64).div_ceil(64).max(1))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json(
    state: &State,
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> std::result::Result<(), Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: the value is nested more than {MAX_JSON_DEPTH} levels deep"),
        ));
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => write_python_float(out, f64::try_from(value.clone())?),
        ValueKind::String | ValueKind::Plain => {
            let text = value.to_string();
            charge(state, text.len())?;
            write_json_string(out, &text, style.ensure_ascii)
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            let items = keys
                .into_iter()
                .map(|k| value.get_item(&k).map(|v| (k, v)))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            write_container(state, out, style, depth, ('{', '}'), &items, |out, (k, v)| {
                // Python turns non-string keys into strings: 1 → "1", True → "true".
                let key = match k.kind() {
                    ValueKind::String => k.to_string(),
                    _ => {
                        let mut s = String::new();
                        write_json(state, &mut s, k, style, depth + 1)?;
                        s
                    }
                };
                charge(state, key.len() + style.key_sep.len())?;
                write_json_string(out, &key, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(state, out, v, style, depth + 1)
            })?;
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(state, out, style, depth, ('[', ']'), &items, |out, v| {
                write_json(state, out, v, style, depth + 1)
            })?;
        }
        // Bytes, invalid values and kinds added to minijinja later.
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: {} is not JSON serializable", value.kind()),
            ));
        }
    }
    Ok(())
}

fn write_container<T>(
    state: &State,
    out: &mut String,
    style: &JsonStyle,
    depth: usize,
    (open, close): (char, char),
    items: &[T],
    mut write_item: impl FnMut(&mut String, &T) -> std::result::Result<(), Error>,
) -> std::result::Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        let indent_bytes = style.indent.as_ref().map_or(0, |s| s.len().saturating_mul(depth + 1));
        charge(state, style.item_sep.len().saturating_add(indent_bytes))?;
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        if let Some(indent) = &style.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        write_item(out, item)?;
    }
    if let Some(indent) = &style.indent {
        charge(state, indent.len().saturating_mul(depth))?;
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// A JSON string as Python writes it: `\n`, `\t` and friends by name, other control
/// characters as `\u00XX`, and non-ASCII escaped (as UTF-16) only with `ensure_ascii`.
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as Python's `repr` writes it: shortest round-trip digits, always with a `.0` or
/// an exponent, scientific below 1e-4 and from 1e16 on, exponents signed with two digits.
fn write_python_float(out: &mut String, x: f64) {
    if x.is_nan() {
        out.push_str("NaN");
        return;
    }
    if x.is_infinite() {
        out.push_str(if x > 0.0 { "Infinity" } else { "-Infinity" });
        return;
    }
    let magnitude = x.abs();
    if magnitude != 0.0 && !(1e-4..1e16).contains(&magnitude) {
        // `{:e}` gives the shortest digits: 1e16 → "1e16", 1.5e-7 → "1.5e-7".
        let sci = format!("{x:e}");
        let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        let _ = write!(out, "{mantissa}e{sign}{digits:0>2}");
    } else {
        // `{:?}` gives the shortest round-trip digits with a `.0` on whole numbers.
        let _ = write!(out, "{x:?}");
    }
}

/// Gemma 3's template, as `google/gemma-3-*-it` ship it in `tokenizer_config.json` and GGUF
/// converters copy it (it is `_CHAT_TEMPLATE` in transformers' `convert_gemma3_weights.py`).
/// A system message becomes a prefix of the first user turn.
const GEMMA3_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"#;

/// Qwen2.5-Instruct's ChatML template (llama.cpp's `models/templates/Qwen-Qwen2.5-7B-Instruct.jinja`).
/// Without a system message it inserts Qwen's default one.
const CHATML_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

/// Llama 3.2-Instruct's template (llama.cpp's `models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja`):
/// like 3.1's and 3.3's, but with today's date from `strftime_now` instead of a fixed one.
const LLAMA3_TEMPLATE: &str = r#"{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// 2024-07-26 12:00:00 UTC: the date Llama 3.1's template hard-codes, at noon.
    const FIXED: u64 = 1_721_995_200;

    fn ctx() -> RenderContext {
        RenderContext {
            now: Some(UNIX_EPOCH + Duration::from_secs(FIXED)),
            ..RenderContext::new("<bos>", "<eos>")
        }
    }

    /// Renders a one-off template with extra variables, through the same environment.
    fn render_str(source: &str, vars: Value) -> Result<String> {
        let template = ChatTemplate::from_source(source)?;
        let t = template.env.get_template(TEMPLATE_NAME)?;
        Ok(t.render(vars)?)
    }

    fn user(text: &str) -> Vec<Message> {
        vec![Message::new("user", text)]
    }

    #[test]
    fn builtins_compile_and_unknown_names_are_none() {
        for name in BUILTIN_NAMES {
            let template = ChatTemplate::builtin(name).expect("built-in template compiles");
            assert!(!template.source().is_empty());
        }
        assert!(ChatTemplate::builtin("vicuna").is_none());
    }

    #[test]
    fn gemma_builtin_renders_the_gemma3_prompt() {
        let gemma = ChatTemplate::builtin("gemma").expect("built-in");
        assert_eq!(
            gemma.render(&user("Hello"), &ctx()).expect("renders"),
            "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
        );
        let no_prompt = RenderContext { add_generation_prompt: false, ..ctx() };
        assert_eq!(
            gemma.render(&user("  Hello \n"), &no_prompt).expect("renders"),
            "<bos><start_of_turn>user\nHello<end_of_turn>\n"
        );
    }

    #[test]
    fn syntax_error_is_a_clear_error() {
        let err = ChatTemplate::from_source("{% for m in messages %}{{ m.content }}").expect_err("must fail");
        let text = format!("{err:#}");
        assert!(text.contains("does not compile"), "{text}");
        assert!(text.contains("syntax error"), "{text}");
        assert!(text.contains("endfor") || text.contains("end of input"), "{text}");
    }

    #[test]
    fn from_arg_reads_builtins_and_files_and_names_bad_files() {
        assert!(ChatTemplate::from_arg("chatml").is_ok());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.jinja");
        std::fs::write(&path, "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}")
            .expect("write");
        let from_file = ChatTemplate::from_arg(path.to_str().expect("utf-8 path")).expect("loads");
        assert_eq!(from_file.render(&user("hi"), &ctx()).expect("renders"), "[user] hi");

        let missing = dir.path().join("missing.jinja");
        let err = ChatTemplate::from_arg(missing.to_str().expect("utf-8")).expect_err("must fail");
        let text = format!("{err:#}");
        assert!(text.contains("missing.jinja") && text.contains("gemma, chatml, llama3"), "{text}");

        std::fs::write(&path, "{{ oops").expect("write");
        let err = ChatTemplate::from_arg(path.to_str().expect("utf-8")).expect_err("must fail");
        let text = format!("{err:#}");
        assert!(text.contains("t.jinja") && text.contains("syntax error"), "{text}");
    }

    #[test]
    fn raise_exception_is_an_error_carrying_the_message() {
        let t = ChatTemplate::from_source("{{ raise_exception('Roles must alternate') }}").expect("compiles");
        let err = t.render(&user("x"), &ctx()).expect_err("must fail");
        assert!(format!("{err:#}").contains("Roles must alternate"), "{err:#}");
    }

    #[test]
    fn whitespace_control_matches_transformers() {
        // trim_blocks drops the newline after a tag, lstrip_blocks the indentation before it,
        // and the template's final newline is dropped (keep_trailing_newline off).
        let source = "  {% for m in messages %}\n{{ m.content }}\n    {% endfor %}\nend\n";
        let t = ChatTemplate::from_source(source).expect("compiles");
        let two = [Message::new("user", "a"), Message::new("assistant", "b")];
        assert_eq!(t.render(&two, &ctx()).expect("renders"), "a\nb\nend");
    }

    #[test]
    fn python_string_methods_work() {
        let out = render_str(
            "{{ s.strip() }}|{{ s.upper().strip() }}|{{ s.startswith('  a') }}|{{ s.split('b')[-1] }}|\
             {{ s.lstrip().rstrip('c ') }}|{% for k, v in d.items() %}{{ k }}={{ v }}{% endfor %}",
            context! { s => "  abc ", d => context! { x => 1 } },
        )
        .expect("renders");
        assert_eq!(out, "abc|ABC|True|c |ab|x=1");
    }

    #[test]
    fn variables_transformers_passes() {
        let t = ChatTemplate::from_source(
            "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ tools is none }}|\
             {% if enable_thinking is defined and enable_thinking is false %}no-think{% endif %}",
        )
        .expect("compiles");
        assert_eq!(t.render(&[], &ctx()).expect("renders"), "<bos>|<eos>|True|True|");
        let no_think = RenderContext { enable_thinking: Some(false), ..ctx() };
        assert_eq!(t.render(&[], &no_think).expect("renders"), "<bos>|<eos>|True|True|no-think");
    }

    /// Qwen3's switch: by default the variable is undefined and the model thinks (as
    /// `transformers` renders it unless asked); `enable_thinking=false` writes an empty
    /// reasoning block into the prompt.
    #[test]
    fn enable_thinking_is_left_undefined_unless_set() {
        let t = ChatTemplate::from_source(
            "{% if enable_thinking is defined %}[{{ enable_thinking }}]{% else %}[undefined]{% endif %}",
        )
        .expect("compiles");
        assert_eq!(t.render(&[], &ctx()).expect("renders"), "[undefined]");
        for (on, want) in [(true, "[True]"), (false, "[False]")] {
            let set = RenderContext { enable_thinking: Some(on), ..ctx() };
            assert_eq!(t.render(&[], &set).expect("renders"), want);
        }
    }

    #[test]
    fn strftime_now_uses_the_fixed_time_or_the_clock() {
        let t = ChatTemplate::from_source("{{ strftime_now('%d %b %Y') }}").expect("compiles");
        assert_eq!(t.render(&[], &ctx()).expect("renders"), "26 Jul 2024");
        let t = ChatTemplate::from_source("{{ strftime_now('%Y') }}").expect("compiles");
        let live = RenderContext::new("<bos>", "<eos>");
        let year = jiff::Zoned::now().year().to_string();
        assert_eq!(t.render(&[], &live).expect("renders"), year);
        let bad = ChatTemplate::from_source("{{ strftime_now('%') }}").expect("compiles");
        assert!(bad.render(&[], &ctx()).is_err());
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let source = r#"{% set x = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": desc}}, "required": ["city"], "n": [1, 2.5, 1.0, none, true, false, {}, []]}} %}{{ x | tojson }}
{{ x | tojson(indent=4) }}
{{ {"b": 1, "a": "é☕😀"} | tojson(ensure_ascii=true, sort_keys=true) }}
{{ {"a": [1, 2]} | tojson(separators=[",", ":"]) }}
{{ "<tag> & 'q'" | tojson }}"#;
        let out = render_str(source, context! { desc => "Café \"quoted\"\n\t\u{1}" }).expect("renders");
        // Produced by Python 3.11's json.dumps(..., ensure_ascii=False) on the same values.
        let expected = r#"{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Café \"quoted\"\n\t\u0001"}}, "required": ["city"], "n": [1, 2.5, 1.0, null, true, false, {}, []]}}
{
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {
                "type": "string",
                "description": "Café \"quoted\"\n\t\u0001"
            }
        },
        "required": [
            "city"
        ],
        "n": [
            1,
            2.5,
            1.0,
            null,
            true,
            false,
            {},
            []
        ]
    }
}
{"a": "\u00e9\u2615\ud83d\ude00", "b": 1}
{"a":[1,2]}
"<tag> & 'q'""#;
        assert_eq!(out, expected);
    }

    #[test]
    fn floats_are_written_like_python_repr() {
        let cases: [(f64, &str); 9] = [
            (1e16, "1e+16"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (123456789012345.6, "123456789012345.6"),
            (1e-5, "1e-05"),
            (9999999999999998.0, "9999999999999998.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (1e300, "1e+300"),
        ];
        for (x, python) in cases {
            let mut out = String::new();
            write_python_float(&mut out, x);
            assert_eq!(out, python, "{x:e}");
        }
    }

    #[test]
    fn system_prompt_kept_where_the_template_supports_it() {
        let chatml = ChatTemplate::builtin("chatml").expect("built-in");
        assert_eq!(
            chatml.render_prompt(Some("Be brief."), "Hi", &ctx()).expect("renders"),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // Gemma 3's template folds the system text into the user turn itself.
        let gemma = ChatTemplate::builtin("gemma").expect("built-in");
        assert_eq!(
            gemma.render_prompt(Some("Be brief."), "Hi", &ctx()).expect("renders"),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn system_prompt_folded_when_the_template_rejects_it() {
        // Gemma 2's template, in short: no system role at all. (The model header is an
        // expression because a template's own final newline is dropped, as in Jinja.)
        let gemma2 = ChatTemplate::from_source(
            "{{ bos_token }}{% if messages[0]['role'] == 'system' %}\
             {{ raise_exception('System role not supported') }}{% endif %}\
             {% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content | trim }}\
             <end_of_turn>\n{% endfor %}{{ '<start_of_turn>model\n' }}",
        )
        .expect("compiles");
        assert_eq!(
            gemma2.render_prompt(Some("Be brief."), "Hi", &ctx()).expect("renders"),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn system_prompt_folded_when_the_template_drops_it() {
        let drops = ChatTemplate::from_source(
            "{% for m in messages if m.role != 'system' %}<{{ m.role }}>{{ m.content }}{% endfor %}",
        )
        .expect("compiles");
        assert_eq!(
            drops.render_prompt(Some("Be brief."), "Hi", &ctx()).expect("renders"),
            "<user>Be brief.\n\nHi"
        );
        // The user text containing the system text must not hide the drop.
        assert_eq!(
            drops.render_prompt(Some("Hi"), "Hi there", &ctx()).expect("renders"),
            "<user>Hi\n\nHi there"
        );
    }

    #[test]
    fn render_prompt_never_panics_and_reports_both_failures() {
        let always = ChatTemplate::from_source("{{ raise_exception('nope: ' + messages[0].role) }}")
            .expect("compiles");
        let err = always.render_prompt(Some("sys"), "hi", &ctx()).expect_err("must fail");
        let text = format!("{err:#}");
        assert!(text.contains("nope: system") && text.contains("nope: user"), "{text}");
        assert!(always.render_prompt(None, "hi", &ctx()).is_err());
        // Odd inputs: empty texts, a template that indexes past the end.
        let gemma = ChatTemplate::builtin("gemma").expect("built-in");
        assert!(gemma.render_prompt(Some(""), "", &ctx()).is_ok());
        let bad = ChatTemplate::from_source("{{ messages[5].content.foo }}").expect("compiles");
        assert!(bad.render_prompt(Some("s"), "u", &ctx()).is_err());
    }

    #[test]
    fn bos_is_added_once() {
        let rendered = "<bos><start_of_turn>user\nHi";
        assert!(!needs_bos(rendered, Some("<bos>"), true));
        assert!(needs_bos("<start_of_turn>user\nHi", Some("<bos>"), true));
        assert!(!needs_bos("<start_of_turn>user\nHi", Some("<bos>"), false));
        assert!(needs_bos("Hi", None, true));
        assert!(needs_bos("Hi", Some(""), true));
        assert!(!needs_bos(rendered, None, false));
    }

    /// Found measuring hostile templates: each of these aborted the process on a failed
    /// allocation (a width, precision or indent of 10**12 built before anything was charged)
    /// or, nested deep enough, would overflow the stack in `tojson`; now each is a one-line
    /// error.
    #[test]
    fn hostile_sizes_are_a_one_line_error_not_an_abort() {
        let deep = "{% set ns = namespace(x=[]) %}{% for i in range(1000) %}{% set ns.x = [ns.x] %}\
                    {% endfor %}{{ ns.x | tojson }}";
        for (source, why) in [
            ("{{ [1] | tojson(indent=10**12) }}", "steps of work"),
            ("{{ range(100000) | list | tojson(indent=100000) }}", "steps of work"),
            ("{{ '{:>999999999999}'.format('x') }}", "999999999999 is over the limit"),
            ("{{ '{:^999999999999}'.format('x') }}", "999999999999 is over the limit"),
            ("{{ '{:.999999999999f}'.format(1.0) }}", "999999999999 is over the limit"),
            ("{{ '{0:099999999999}'.format(1) }}", "099999999999 is over the limit"),
            // Found by fuzzing: a multi-byte character in a field panicked inside minijinja.
            ("{{ '{xx[xx\u{fffd}xxx~xdatxxxx:}'.format('x') }}", "other than ASCII"),
            ("{{ '{é}'.format('x') }}", "other than ASCII"),
            ("{{ '{xx[E}\u{b5}x]}'.format('x') }}", "other than ASCII"),
            ("{{ '{0:{1}\u{b5}}'.format('x', 2) }}", "other than ASCII"),
            (deep, "nested more than 500 levels deep"),
        ] {
            let template = ChatTemplate::from_source(source).expect("compiles");
            let text = format!("{:#}", template.render(&user("hi"), &ctx()).expect_err(source));
            assert!(text.contains(why) && !text.contains('\n'), "{source}: {text}");
        }
        // Ordinary widths, indents and nesting still work.
        let fine = ChatTemplate::from_source(
            "{{ '{:>5}|{:.2f}|{{x}}'.format('ab', 1.0) }} {{ [[1]] | tojson(indent=2) }}",
        )
        .expect("compiles");
        assert_eq!(fine.render(&[], &ctx()).expect("renders"), "   ab|1.00|{x} [\n  [\n    1\n  ]\n]");
    }

    /// A list nested as deep as the fuel allows, then freed, printed and compared: minijinja
    /// recurses once per level, which overflowed the stack and killed the process.
    #[test]
    fn nesting_as_deep_as_the_fuel_allows_is_an_error_not_a_crash() {
        for use_it in ["{{ 1 }}", "{{ ns.x }}", "{{ ns.x == ns.x }}", "{{ 1 in ns.x }}"] {
            let source = format!(
                "{{% set ns = namespace(x=[]) %}}{{% for i in range(10000) %}}{{% for j in range(10000) %}}\
                 {{% set ns.x = [ns.x] %}}{{% endfor %}}{{% endfor %}}{use_it}"
            );
            let template = ChatTemplate::from_source(&source).expect("compiles");
            let err = template.render(&user("hi"), &ctx()).expect_err("runs out of fuel");
            assert!(format!("{err:#}").contains("steps of work"), "{use_it}: {err:#}");
        }
        // Within the fuel, deep nesting is used and freed without trouble.
        let source = "{% set ns = namespace(x=[]) %}{% for i in range(100) %}{% for j in range(2000) %}\
                      {% set ns.x = [ns.x] %}{% endfor %}{% endfor %}{{ ns.x == ns.x }} {{ 1 in ns.x }}";
        let template = ChatTemplate::from_source(source).expect("compiles");
        assert_eq!(template.render(&user("hi"), &ctx()).expect("renders"), "True False");
    }

    /// Work the fuel does not see (walking a list doubled sixty times by `l + l`) is given up
    /// after the time limit, with a one-line error.
    #[test]
    fn a_render_that_runs_too_long_is_an_error_not_a_hang() {
        let source = "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}\
                      {% endfor %}{{ ns.l | length }}";
        let template = ChatTemplate::from_source(source).expect("compiles");
        let quick = RenderContext { time_limit: Duration::from_millis(300), ..ctx() };
        let err = template.render(&user("hi"), &quick).expect_err("too long");
        assert!(format!("{err:#}").contains("ran for more than 0.3 s"), "{err:#}");
    }

    /// Inputs the `chat_template` fuzz target crashed on (`fuzz/`): the template, then messages,
    /// separated by 0xFF. Each must now compile or not, and render or fail, without a panic.
    #[test]
    fn fuzz_regressions_render_or_fail_cleanly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/fuzz-regressions/chat_template");
        let files: Vec<_> = std::fs::read_dir(&dir).expect("the regression folder").flatten().collect();
        assert!(!files.is_empty());
        for file in files {
            let data = std::fs::read(file.path()).expect("read");
            let mut fields = data.split(|&b| b == 0xFF).map(String::from_utf8_lossy);
            let source = fields.next().unwrap_or_default();
            let Ok(template) = ChatTemplate::from_source(&source) else { continue };
            let messages: Vec<Message> = fields.map(|t| Message::new("user", t)).collect();
            if let Err(e) = template.render(&messages, &ctx()) {
                assert!(!format!("{e:#}").contains("panicked"), "{}: {e:#}", file.path().display());
            }
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Template text built from pieces that loop, grow strings and lists, recurse, raise and
        /// break the syntax, so that most candidates compile and many are hostile.
        fn template() -> impl Strategy<Value = String> {
            let pieces = vec![
                "{{ messages[0].content }}",
                "{% for m in messages %}{{ m.role }}: {{ m['content'] | trim }}\n",
                "{% for i in range(100000) %}",
                "{% for j in range(1000) %}",
                "{% endfor %}",
                "{% set s = 'xy' %}",
                "{% set s = s ~ s %}",
                "{% set s = s + s %}",
                "{% set l = [s, s] + l|default([]) %}",
                "{{ s }}",
                "{{ s * 1000 }}",
                "{{ 'x' * 100000000 }}",
                "{{ range(100000) | list | length }}",
                "{{ s | center(100000) }}",
                "{{ s.replace('x', 'xxxxxxxx') }}",
                "{{ ' '.join(range(100000) | map('string')) }}",
                "{{ messages | tojson(indent=100) }}",
                "{% macro f(n) %}{{ f(n ~ n) }}{% endmacro %}{{ f('a') }}",
                "{% if loop is defined and loop.index is even %}",
                "{% endif %}",
                "{{ raise_exception('refused') }}",
                "{{ bos_token }}",
                "{% if add_generation_prompt %}<start>{% endif %}",
                "text ",
                "{%",
                "}}",
                "{#",
            ];
            prop_oneof![
                1 => any::<String>(),
                4 => proptest::collection::vec(proptest::sample::select(pieces), 0..10)
                    .prop_map(|p| p.concat()),
            ]
        }

        fn messages() -> impl Strategy<Value = Vec<Message>> {
            let role = proptest::sample::select(&["system", "user", "assistant", "tool", ""][..]);
            proptest::collection::vec((role, any::<String>()), 0..4)
                .prop_map(|m| m.into_iter().map(|(r, c)| Message::new(r, c)).collect())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Any template either fails to compile or renders any messages to a result within
            /// the output cap, or to an error; never a panic, and never unbounded work (the test
            /// would hang or run out of memory).
            #[test]
            fn any_template_renders_within_budget_or_errs(source in template(), messages in messages()) {
                let Ok(template) = ChatTemplate::from_source(&source) else { return Ok(()) };
                let limit = RENDER_OUTPUT_BASE + 2 * messages.iter().map(|m| m.content.len()).sum::<usize>();
                if let Ok(out) = template.render(&messages, &ctx()) {
                    prop_assert!(out.len() <= limit, "{} bytes", out.len());
                }
            }
        }
    }
}
