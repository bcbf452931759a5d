//! What the benchmark programs share: telling a `cargo bench` run from a `cargo test` one.

/// The program's arguments when `cargo bench` runs it, or `None` when `cargo test` does.
///
/// `cargo bench --bench NAME -- ARGS` runs the program with ARGS and a trailing `--bench` (the
/// cue criterion takes too). `cargo test --all-targets`, as `tests/run.sh` runs it, builds and
/// runs every bench target as well, with only libtest's flags (`--test-threads=2`): then there
/// is nothing to measure, and the program only proves that it builds. A binary copied aside for
/// an A/B comparison runs as `./batch_decode-a MODEL.gguf --bench`.
pub fn bench_args() -> Option<Vec<String>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let given = args.len();
    args.retain(|arg| arg != "--bench");
    (args.len() < given).then_some(args)
}
