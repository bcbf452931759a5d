//! The `streamgen` executable: process policy only (arguments, threads, Ctrl-C, exit codes,
//! the error line). The work is in the library.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use streamgen::cli::Cli;
use streamgen::config::{Config, UsageError};
use streamgen::generate::FinishReason;
use streamgen::{app, output};

fn main() -> ExitCode {
    let cli = Cli::parse(); // clap prints usage errors itself and exits 2.
    if let Some(n) = cli.threads {
        // candle sizes its thread pools from these variables when they are first used, which is
        // after this point. SAFETY: no other thread exists yet, so nothing reads the environment
        // concurrently.
        unsafe {
            std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }

    // First Ctrl-C: stop after the current token and flush. Second: leave at once.
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });

    let result = Config::from_cli(cli).and_then(|cfg| app::run(&cfg, &interrupted));
    match result {
        Ok(g) if g.finish == FinishReason::Interrupted => ExitCode::from(130),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            output::print_error(&e);
            if e.downcast_ref::<UsageError>().is_some() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}
