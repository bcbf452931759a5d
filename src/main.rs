//! The `streamgen` executable: process policy only (arguments, threads, Ctrl-C, exit codes,
//! the error line). The work is in the library.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Parser;
use streamgen::app::{self, RunEnd, Signals};
use streamgen::cli::Cli;
use streamgen::config::{Config, UsageError};
use streamgen::output;

fn main() -> ExitCode {
    let mut cli = Cli::parse(); // clap prints usage errors itself and exits 2.
    tune_allocator();
    exit_cleanly_on_sigbus();
    one_line_panics();
    // More threads than CPUs only makes the barrier pool spin against itself (three tokens took
    // 40 s at -t 200 on two cores): clamp, and say so.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(n) = cli.threads
        && usize::from(n) > cpus
    {
        output::print_note(&format!(
            "warning: --threads {n} is more than the {cpus} CPUs here; using {cpus}"
        ));
        cli.threads = u16::try_from(cpus).ok();
    }
    if let Some(n) = cli.threads {
        // candle sizes its thread pools from these variables when they are first used, which is
        // after this point. SAFETY: no other thread exists yet, so nothing reads the environment
        // concurrently.
        unsafe {
            std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }

    // Ctrl-C while loading or downloading: leave at once (a partial download is kept under a
    // temporary name and resumed next time). While generating: stop after the current token
    // and flush; a second Ctrl-C leaves at once.
    let signals = Arc::new(Signals::default());
    let handler_signals = signals.clone();
    let _ = ctrlc::set_handler(move || {
        let s = &handler_signals;
        if !s.generating.load(Ordering::SeqCst) || s.interrupted.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });

    match Config::from_cli(cli).and_then(|cfg| app::run(&cfg, &signals)) {
        Ok(RunEnd::Interrupted) => ExitCode::from(130),
        Ok(RunEnd::Done) => ExitCode::SUCCESS,
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            output::print_error(&e);
            if e.downcast_ref::<UsageError>().is_some() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

/// Keeps freed memory in glibc's heap instead of handing it back at once: a prefill allocates
/// and frees megabytes per matmul (dequantized weights, activations), and glibc's defaults (a
/// fresh mmap per block above 128 KiB, trimming above 128 KiB) had the kernel fault in and
/// zero those pages again for every matmul. Measured on a 1,024-token prompt: prefill 355 ->
/// 410 tok/s, peak RSS +16 MiB (reuse is not perfect). 32 MiB is the largest mmap threshold
/// glibc accepts. A process-wide choice, so the executable makes it, not the library (as
/// ripgrep chooses its allocator in its `main.rs`).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// The weights are a memory-mapped file: if it is truncated while we run (a download tool
/// rewriting it, a full disk), reading a page past its new end raises SIGBUS, which would kill
/// the process with a core-dump message. Say what happened in our one-line error form instead,
/// and exit 1. Only async-signal-safe calls are made in the handler.
fn exit_cleanly_on_sigbus() {
    #[cfg(unix)]
    {
        extern "C" fn on_sigbus(_: libc::c_int) {
            const MSG: &[u8] = b"streamgen: error: the model file was truncated or replaced while in use \
                (SIGBUS reading its mapped weights): run again once it is complete\n";
            // SAFETY: write(2) and _exit(2) are async-signal-safe.
            unsafe {
                libc::write(2, MSG.as_ptr().cast(), MSG.len());
                libc::_exit(1);
            }
        }
        // SAFETY: installs a handler that only makes async-signal-safe calls.
        unsafe {
            libc::signal(libc::SIGBUS, on_sigbus as *const () as libc::sighandler_t);
        }
    }
}

/// A panic is a bug, but the user still gets one line in our error form, not Rust's report. A
/// chat template's render thread says nothing: its panic (inside minijinja, on a hostile
/// template) comes back to the caller as an ordinary error.
fn one_line_panics() {
    std::panic::set_hook(Box::new(|info| {
        if std::thread::current().name() == Some("streamgen-template") {
            return;
        }
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        output::print_error(&anyhow::anyhow!("internal error: {message}{at} (a bug: please report it)"));
    }));
}
