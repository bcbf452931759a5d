//! What the benchmark programs share: telling a `cargo bench` run from a `cargo test` one.

/// The program's arguments when `cargo bench` runs it, or `None` when there is nothing to do.
///
/// `cargo bench --bench NAME -- ARGS` runs the program with ARGS and a trailing `--bench` (the
/// cue criterion takes too). `cargo test --all-targets`, as `tests/run.sh` runs it, builds and
/// runs every bench target as well, with only libtest's flags (`--test-threads=2`): then the
/// program only proves that it builds. A bare `cargo bench` runs every bench target with
/// `--bench` alone: then each prints its `usage` on stderr. A binary copied aside for an A/B
/// comparison runs as `./batch_decode-a MODEL.gguf --bench`.
#[allow(clippy::print_stderr)]
pub fn bench_args(usage: &str) -> Option<Vec<String>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let given = args.len();
    args.retain(|arg| arg != "--bench");
    if args.len() == given {
        return None;
    }
    if args.is_empty() {
        eprintln!("{usage}");
        return None;
    }
    Some(args)
}
