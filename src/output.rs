//! The only writer of stdout, and the formatter of what goes to stderr.
//!
//! Streaming writes each chunk with `write_all` on the locked stdout and flushes at once, so the
//! reader sees every token when it is decoded whether stdout is a terminal, a pipe or a file
//! (Rust's stdout is line-buffered, an implementation detail we do not rely on:
//! rust-lang/rust#60673). `--no-stream` collects the same bytes and writes them once at the end.

use std::borrow::Cow;
use std::io::{self, IsTerminal, Write};

use serde_json::json;

use crate::event::TokenLogprob;

/// How the answer is written.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputOptions {
    /// Flush each chunk at once (else write everything at the end).
    pub stream: bool,
    /// JSON Lines instead of text.
    pub json: bool,
    /// `--each-line`: every answer is exactly one line.
    pub one_line: bool,
    /// The answers are JSON on one line (a JSON constraint): with `one_line`, they are written
    /// as they are, so that each line is the JSON value (escaping would break its strings'
    /// backslashes); a line break, which such JSON never holds, would still be escaped.
    pub json_lines: bool,
    /// stdout is a terminal: neutralize control characters and end with a newline.
    pub terminal: bool,
}

impl OutputOptions {
    /// Text streamed to stdout as it comes, made safe when stdout is a terminal: what the chat
    /// and `--logs` write.
    pub fn streamed_text() -> Self {
        Self { stream: true, terminal: stdout_is_terminal(), ..Self::default() }
    }
}

/// The numbers reported at the end of an answer (`--stats`, `--json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    /// Prompt tokens taken from a shared prefix or the prompt cache instead of computed.
    pub reused_prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    pub time_to_first_token_seconds: f64,
    pub load_seconds: f64,
    /// Under a constraint (`--json-schema`, `--regex`…), whether the answer matches it whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub complete: Option<bool>,
    /// Speculative decoding: tokens proposed and accepted (absent when it was off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proposed_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted_tokens: Option<usize>,
    /// `--choice` with `--logprobs`: each choice's score, in the order given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<crate::event::ChoiceScore>>,
}

impl Summary {
    /// The one-line `--stats` report.
    pub fn stats_line(&self) -> String {
        format!(
            "prompt {} tokens{}, {:.1} tok/s; generated {} tokens, {:.1} tok/s{}; first token {:.3} s; load {:.3} s; finish {}",
            self.prompt_tokens,
            if self.reused_prompt_tokens > 0 {
                format!(" ({} reused)", self.reused_prompt_tokens)
            } else {
                String::new()
            },
            self.prompt_tokens_per_second,
            self.generated_tokens,
            self.decode_tokens_per_second,
            match (self.proposed_tokens, self.accepted_tokens) {
                (Some(p), Some(a)) => format!(" ({a} of {p} proposed tokens accepted)"),
                _ => String::new(),
            },
            self.time_to_first_token_seconds,
            self.load_seconds,
            self.finish_reason
        )
    }
}

/// Where the generated text goes.
pub struct Output<W: Write> {
    w: W,
    opts: OutputOptions,
    /// Bytes held for `--no-stream`.
    pending: Vec<u8>,
    /// Whether the last text written ended a line, for the closing newline on terminals.
    at_line_start: bool,
    /// The input line number of the current answer, with `--each-line`.
    line: Option<usize>,
}

impl Output<io::StdoutLock<'static>> {
    /// The process's stdout, locked for the lifetime of the output.
    pub fn stdout(opts: OutputOptions) -> Self {
        Self::new(io::stdout().lock(), opts)
    }
}

/// Whether stdout is a terminal.
pub fn stdout_is_terminal() -> bool {
    io::stdout().is_terminal()
}

impl<W: Write> Output<W> {
    pub fn new(w: W, opts: OutputOptions) -> Self {
        Self { w, opts, pending: Vec::new(), at_line_start: true, line: None }
    }

    /// Starts the answer to input line `line` (1-based), with `--each-line`.
    pub fn begin(&mut self, line: Option<usize>) {
        self.line = line;
    }

    /// Writes a chunk of generated text (the text decoded so far from `token`): at once when
    /// streaming, else at [`Output::finish`]. A closed pipe comes back as an
    /// `io::ErrorKind::BrokenPipe` error.
    pub fn chunk(&mut self, text: &str, token: Option<u32>) -> io::Result<()> {
        self.token_chunk(text, token, None)
    }

    /// [`Output::chunk`] with the token's log-probabilities (`--logprobs`). With `--json`
    /// every token gets its object, with empty text when it completes no character (the text
    /// goes with the token that completes it, or that a stop string releases it with).
    pub fn token_chunk(
        &mut self,
        text: &str,
        token: Option<u32>,
        logprob: Option<&TokenLogprob>,
    ) -> io::Result<()> {
        if self.opts.json {
            if text.is_empty() && token.is_none() {
                return Ok(());
            }
            let mut obj = json!({ "text": text, "token": token });
            if let Some(lp) = logprob {
                // As the OpenAI API: each token's bytes too, since a token can be part of a
                // character (its text then shows U+FFFD).
                obj["bytes"] = json!(lp.bytes);
                obj["logprob"] = json!(lp.logprob);
                obj["top_logprobs"] = lp
                    .top
                    .iter()
                    .map(|a| {
                        json!({
                            "token": a.token,
                            "text": String::from_utf8_lossy(&a.bytes),
                            "bytes": a.bytes,
                            "logprob": a.logprob
                        })
                    })
                    .collect();
            }
            return self.json_line(obj);
        }
        if text.is_empty() {
            return Ok(());
        }
        self.text(text)
    }

    /// Writes text as the answer is written: escaped onto one line with `--each-line`, its
    /// control characters neutralized on a terminal.
    fn text(&mut self, text: &str) -> io::Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let text = match (self.opts.one_line, self.opts.json_lines) {
            (true, false) => escape_line(text),
            (true, true) if text.contains(['\n', '\r']) => {
                Cow::Owned(text.replace('\n', "\\n").replace('\r', "\\r"))
            }
            _ => Cow::Borrowed(text),
        };
        let text =
            if self.opts.terminal { neutralize_controls(&text).into_owned() } else { text.into_owned() };
        self.at_line_start = text.ends_with('\n');
        self.emit(text.as_bytes())
    }

    /// Writes a piece of the model's reasoning to stdout (`--reasoning stdout`): a `reasoning`
    /// object with `--json`, else text after a `<think>` line (`open`: the first piece).
    pub fn reasoning(&mut self, text: &str, open: bool) -> io::Result<()> {
        if self.opts.json {
            return self.json_line(json!({ "reasoning": text }));
        }
        if open {
            self.text("<think>\n")?;
        }
        self.text(text)
    }

    /// Ends the reasoning written by [`Output::reasoning`]: `</think>` on a line of its own, and
    /// a blank line before the answer.
    pub fn end_reasoning(&mut self) -> io::Result<()> {
        if self.opts.json {
            return Ok(());
        }
        let close = if self.at_line_start { "</think>\n\n" } else { "\n</think>\n\n" };
        self.text(close)
    }

    fn json_line(&mut self, mut obj: serde_json::Value) -> io::Result<()> {
        if let Some(line) = self.line {
            obj["line"] = json!(line);
        }
        let mut bytes = obj.to_string().into_bytes();
        bytes.push(b'\n');
        self.emit(&bytes)
    }

    /// Ends one answer: the final JSON object, or the newline that ends an `--each-line` line.
    pub fn end(&mut self, summary: &Summary) -> io::Result<()> {
        if self.opts.json {
            let obj = serde_json::to_value(summary).map_err(io::Error::other)?;
            self.json_line(obj)
        } else if self.opts.one_line {
            self.at_line_start = true;
            self.emit(b"\n")
        } else {
            Ok(())
        }
    }

    /// Ends an `--each-line` answer that failed: its output line ends there (empty if nothing
    /// was written yet), or with `--json` an `{"line", "error"}` object takes its summary's place.
    pub fn failed(&mut self, error: &str) -> io::Result<()> {
        if self.opts.json {
            self.json_line(json!({ "error": error }))
        } else {
            self.at_line_start = true;
            self.emit(b"\n")
        }
    }

    /// Writes what `--no-stream` held back, ends the line on a terminal, and flushes.
    pub fn finish(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.w.write_all(&self.pending)?;
            self.pending.clear();
        }
        if self.opts.terminal && !self.opts.json && !self.at_line_start {
            self.w.write_all(b"\n")?;
            self.at_line_start = true;
        }
        self.w.flush()
    }

    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.opts.stream {
            self.w.write_all(bytes)?;
            self.w.flush()
        } else {
            self.pending.extend_from_slice(bytes);
            Ok(())
        }
    }

    /// The wrapped writer, for tests.
    pub fn into_inner(self) -> W {
        self.w
    }
}

/// `--each-line` escaping: an answer stays on one line. Backslashes are doubled first so the
/// escapes can be undone unambiguously (`\n` is a newline, `\\` a backslash).
pub fn escape_line(text: &str) -> Cow<'_, str> {
    if !text.contains(['\\', '\n', '\r']) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.replace('\\', "\\\\").replace('\n', "\\n").replace('\r', "\\r"))
}

/// Makes model output safe to show on a terminal: control characters other than newline and
/// tab (ESC and so CSI/OSC sequences, BEL, backspace, carriage return, DEL, and the C1 controls)
/// become visible symbols, so generated text cannot move the cursor, retitle the window or hide
/// text. C0 controls map to their Unicode control pictures (ESC shows as ␛).
pub fn neutralize_controls(text: &str) -> Cow<'_, str> {
    let is_unsafe = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.contains(is_unsafe) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| match c {
                c if !is_unsafe(c) => c,
                '\u{7f}' => '\u{2421}',
                c if (c as u32) < 0x20 => char::from_u32(0x2400 + c as u32).unwrap_or('\u{fffd}'),
                _ => '\u{fffd}',
            })
            .collect(),
    )
}

/// Whether an error chain contains a closed pipe: that is a normal end for a filter whose
/// reader went away (`| head`), not an error. ripgrep walks the chain the same way.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|cause| cause.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe))
}

/// Prints `streamgen: error: <chain>` as one line on stderr, the `error` in red when stderr
/// is a terminal and `NO_COLOR` is unset.
pub fn print_error(err: &anyhow::Error) {
    let color = stderr_is_colour_terminal();
    let label = if color { "\x1b[1;31merror\x1b[0m" } else { "error" };
    let _ = writeln!(io::stderr().lock(), "streamgen: {label}: {}", error_line(err));
}

/// The error chain on one line (causes joined with ": ", newlines flattened), with every
/// control character shown as a symbol: an architecture name, a tensor name or a server's
/// reply inside an error is a stranger's text, and must not move the cursor or retitle the
/// terminal.
///
/// A password in any URL it quotes (`http://user:pass@host`, from `HF_ENDPOINT`, a redirect,
/// a server's message) is hidden: `http://***@host`.
pub fn error_line(err: &anyhow::Error) -> String {
    let line = redact_userinfo(&format!("{err:#}").replace('\n', " "));
    neutralize_controls(&line).into_owned()
}

/// `text` with the user information of every URL in it (what stands between `://` and an `@`
/// in the authority) replaced by `***`.
pub fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace() || c == '\'' || c == '"')
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&tail[at..end]);
            }
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Writes a piece of a model's reasoning to stderr as it arrives (no line ending added), its
/// control characters shown as symbols, dimmed when `dim`.
pub fn print_reasoning(text: &str, dim: bool) {
    let text = neutralize_controls(text);
    let mut err = io::stderr().lock();
    let _ = if dim { write!(err, "\x1b[2m{text}\x1b[0m") } else { err.write_all(text.as_bytes()) };
    let _ = err.flush();
}

/// Whether stderr is a terminal that may be coloured (`NO_COLOR` unset or empty).
pub fn stderr_is_colour_terminal() -> bool {
    io::stderr().is_terminal() && std::env::var_os(crate::env::NO_COLOR).is_none_or(|v| v.is_empty())
}

/// Prints an informational line on stderr (load messages, warnings), its control characters
/// other than newline and tab shown as symbols.
pub fn print_note(msg: &str) {
    let _ = writeln!(io::stderr().lock(), "streamgen: {}", neutralize_controls(msg));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_hidden() {
        let err =
            anyhow::anyhow!("http://u:p4ss@hub.example/api failed").context("fetching 'http://x:y@z:1/v1'");
        let line = error_line(&err);
        assert!(!line.contains("p4ss") && !line.contains("x:y"), "{line}");
        assert!(
            line.contains("http://***@hub.example/api") && line.contains("'http://***@z:1/v1'"),
            "{line}"
        );
        assert_eq!(redact_userinfo("no url, a@b, http://h/p@q"), "no url, a@b, http://h/p@q");
    }

    fn opts(stream: bool, terminal: bool) -> OutputOptions {
        OutputOptions { stream, terminal, ..OutputOptions::default() }
    }

    #[test]
    fn streaming_writes_each_chunk_and_no_stream_writes_once() {
        let mut out = Output::new(Vec::new(), opts(true, false));
        out.chunk("a", Some(1)).and_then(|_| out.chunk(" b", Some(2))).expect("write to a Vec");
        assert_eq!(out.into_inner(), b"a b");

        let mut out = Output::new(Vec::new(), opts(false, false));
        out.chunk("a", None).and_then(|_| out.chunk(" b", None)).expect("write to a Vec");
        assert!(out.w.is_empty(), "--no-stream holds text until finish");
        out.finish().expect("finish");
        assert_eq!(out.into_inner(), b"a b");
    }

    #[test]
    fn error_lines_are_one_line_without_control_characters() {
        let err = anyhow::anyhow!("architecture 'x\x1b]0;pwned\x07\x1b[2J'").context("model.gguf:\nbad");
        let line = error_line(&err);
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert!(line.starts_with("model.gguf: bad: architecture 'x␛]0;pwned␇␛[2J'"), "{line:?}");
    }

    #[test]
    fn a_terminal_gets_a_closing_newline_and_safe_text_and_a_pipe_does_not() {
        let mut out = Output::new(Vec::new(), opts(true, true));
        out.chunk("x\x1b[2J\x07\ty\r", None).and_then(|_| out.finish()).expect("write");
        assert_eq!(String::from_utf8(out.into_inner()).expect("utf8"), "x\u{241b}[2J\u{2407}\ty\u{240d}\n");
        let mut out = Output::new(Vec::new(), opts(true, false));
        out.chunk("x\x1b[2J", None).and_then(|_| out.finish()).expect("write");
        assert_eq!(out.into_inner(), b"x\x1b[2J");
        assert_eq!(neutralize_controls("\u{9b}31m\u{7f}"), "\u{fffd}31m\u{2421}");
    }

    #[test]
    fn each_line_answers_stay_on_one_line() {
        assert_eq!(escape_line("a\\n\nb\r"), "a\\\\n\\nb\\r");
        let mut out = Output::new(
            Vec::new(),
            OutputOptions { stream: true, one_line: true, ..OutputOptions::default() },
        );
        let summary = Summary {
            finish_reason: "eos",
            prompt_tokens: 1,
            reused_prompt_tokens: 0,
            generated_tokens: 1,
            prompt_tokens_per_second: 1.0,
            decode_tokens_per_second: 1.0,
            time_to_first_token_seconds: 0.1,
            load_seconds: 0.1,
            complete: None,
            proposed_tokens: None,
            accepted_tokens: None,
            choices: None,
        };
        out.chunk("one\ntwo", None).and_then(|_| out.end(&summary)).expect("write");
        assert_eq!(out.into_inner(), b"one\\ntwo\n");
    }

    #[test]
    fn json_lines_are_valid_json() {
        let mut out =
            Output::new(Vec::new(), OutputOptions { stream: true, json: true, ..OutputOptions::default() });
        out.begin(Some(3));
        out.chunk("é\n\x1b", Some(7)).expect("write");
        let text = String::from_utf8(out.into_inner()).expect("utf8");
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).expect("valid JSON");
        assert_eq!(v["text"], "é\n\x1b");
        assert_eq!(v["token"], 7);
        assert_eq!(v["line"], 3);
    }

    #[test]
    fn broken_pipe_is_found_anywhere_in_the_chain() {
        let err = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe)).context("writing");
        assert!(is_broken_pipe(&err));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}
