//! The sandbox chat templates run in: a Jinja environment set up as `transformers`' is, the
//! limits on a render (fuel, output, stack, time), the template file reader, and the functions
//! templates call (`raise_exception`, `strftime_now`, a guarded `str.format`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};

use super::tojson::tojson;

/// A Jinja environment configured like `transformers`' chat-template sandbox:
/// `trim_blocks` and `lstrip_blocks` on, `keep_trailing_newline` off (Jinja's default, which
/// `transformers` keeps), loop controls, Python string and dict methods, `raise_exception`,
/// `strftime_now` and a `tojson` that writes what Python's `json.dumps` writes.
pub(super) fn hf_environment() -> Result<Environment<'static>> {
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

/// How long a render may run (see [`ChatTemplate::render`](super::ChatTemplate::render)): real
/// templates take milliseconds.
pub const RENDER_TIME_LIMIT: Duration = Duration::from_secs(10);

/// The stack of the thread templates render on: enough for the deepest nesting of values the
/// fuel allows (see [`ChatTemplate::render`](super::ChatTemplate::render)). Reserved address
/// space, not memory: pages are used only as deep as a template goes.
pub(super) const RENDER_STACK: usize = 2 << 30;

/// The most instructions one rendering may execute. A real chat template renders a
/// conversation in thousands (Qwen 3's, one of the longest, in about 5,000 per message);
/// ten million take well under a second.
pub const TEMPLATE_FUEL: u64 = 10_000_000;

/// The most bytes a rendering may write beyond twice the messages' text.
pub(super) const RENDER_OUTPUT_BASE: usize = 16 << 20;

/// The largest chat template file `--chat-template` reads.
const MAX_TEMPLATE_FILE: u64 = 1 << 20;

/// The rendering's output, refusing to grow past `limit` bytes.
pub(super) struct Capped {
    pub(super) buf: Vec<u8>,
    pub(super) limit: usize,
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
pub(super) fn read_template_file(path: &Path) -> Result<String> {
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
pub(super) fn strftime_now(format: &str) -> std::result::Result<String, Error> {
    strftime(&jiff::Zoned::now(), format)
}

pub(super) fn strftime(time: &jiff::Zoned, format: &str) -> std::result::Result<String, Error> {
    jiff::fmt::strtime::format(format, time).map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format {format:?}")).with_source(e)
    })
}
