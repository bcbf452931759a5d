//! The only writer of stdout, and the formatter of what goes to stderr.
//!
//! Streaming writes each chunk with `write_all` on the locked stdout and flushes at once, so the
//! reader sees every token when it is decoded whether stdout is a terminal, a pipe or a file
//! (Rust's stdout is line-buffered, an implementation detail we do not rely on:
//! rust-lang/rust#60673). `--no-stream` collects the same bytes and writes them once at the end.

use std::io::{self, IsTerminal, Write};

/// Where the generated text goes.
pub struct Output<W: Write> {
    w: W,
    stream: bool,
    /// Text held for `--no-stream`.
    pending: Vec<u8>,
    /// Whether the last byte written ended a line, for the closing newline on terminals.
    at_line_start: bool,
    terminal: bool,
}

impl Output<io::StdoutLock<'static>> {
    /// The process's stdout, locked for the lifetime of the output.
    pub fn stdout(stream: bool) -> Self {
        let terminal = io::stdout().is_terminal();
        Self::new(io::stdout().lock(), stream, terminal)
    }
}

impl<W: Write> Output<W> {
    /// Wraps a writer. `terminal` says whether it is a terminal: then the answer is closed with
    /// a newline so the shell prompt does not land on its last line.
    pub fn new(w: W, stream: bool, terminal: bool) -> Self {
        Self { w, stream, pending: Vec::new(), at_line_start: true, terminal }
    }

    /// Writes a chunk of generated text: at once when streaming, else at [`Output::finish`].
    /// A closed pipe comes back as an `io::ErrorKind::BrokenPipe` error.
    pub fn write(&mut self, text: &str) -> io::Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        self.at_line_start = text.ends_with('\n');
        if self.stream {
            self.w.write_all(text.as_bytes())?;
            self.w.flush()
        } else {
            self.pending.extend_from_slice(text.as_bytes());
            Ok(())
        }
    }

    /// Writes what `--no-stream` held back, ends the line on a terminal, and flushes.
    pub fn finish(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.w.write_all(&self.pending)?;
            self.pending.clear();
        }
        if self.terminal && !self.at_line_start {
            self.w.write_all(b"\n")?;
            self.at_line_start = true;
        }
        self.w.flush()
    }

    /// The wrapped writer, for tests.
    pub fn into_inner(self) -> W {
        self.w
    }
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
    let color = io::stderr().is_terminal()
        && std::env::var_os(crate::cli::env::NO_COLOR).is_none_or(|v| v.is_empty());
    let label = if color { "\x1b[1;31merror\x1b[0m" } else { "error" };
    // One line: the chain is joined with ": " and any newline inside a cause is flattened.
    let msg = format!("{err:#}").replace('\n', " ");
    let _ = writeln!(io::stderr().lock(), "streamgen: {label}: {msg}");
}

/// Prints an informational line on stderr (load messages, warnings).
pub fn print_note(msg: &str) {
    let _ = writeln!(io::stderr().lock(), "streamgen: {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_writes_each_chunk_and_no_stream_writes_once() {
        let mut out = Output::new(Vec::new(), true, false);
        out.write("a").and_then(|_| out.write(" b")).expect("write to a Vec");
        assert_eq!(out.into_inner(), b"a b");

        let mut out = Output::new(Vec::new(), false, false);
        out.write("a").and_then(|_| out.write(" b")).expect("write to a Vec");
        assert!(out.w.is_empty(), "--no-stream holds text until finish");
        out.finish().expect("finish");
        assert_eq!(out.into_inner(), b"a b");
    }

    #[test]
    fn a_terminal_gets_a_closing_newline_and_a_pipe_does_not() {
        let mut out = Output::new(Vec::new(), true, true);
        out.write("x").and_then(|_| out.finish()).expect("write");
        assert_eq!(out.into_inner(), b"x\n");
        let mut out = Output::new(Vec::new(), true, false);
        out.write("x").and_then(|_| out.finish()).expect("write");
        assert_eq!(out.into_inner(), b"x");
    }

    #[test]
    fn broken_pipe_is_found_anywhere_in_the_chain() {
        let err = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe)).context("writing");
        assert!(is_broken_pipe(&err));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}
