//! The integration suite: one test binary that spawns the real `streamgen` executable and uses
//! the library API on the real test model. `tests/run.sh` fetches the model first.

#![allow(clippy::print_stderr, clippy::print_stdout)]

mod archs;
mod chat;
mod conversation;
mod docs;
mod filter;
mod generate;
mod hardening;
mod hub;
mod prompt_cache;
mod reasoning;
mod remote;
mod smollm2;
mod speculate;
mod structured;
mod support;
mod tokenize;
