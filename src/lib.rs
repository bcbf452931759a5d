//! streamgen: run a small language model locally and stream its answer token by token.
//!
//! The modules follow the data flow: [`cli`] (arguments) → [`config`] (prompt, model source,
//! sampling, terminal state) → [`hub`] (fetching weights) → [`gguf`]/[`model`] (weights and the
//! decoder) → [`tokenizer`] (text ⇄ token ids) → [`generate`] (prefill, sample, stop) →
//! [`output`] (the only writer of stdout). [`backend`] is the seam between the local engine
//! and an OpenAI-compatible server; [`answer`] is what both share downstream of it.

pub mod answer;
pub mod app;
pub mod backend;
pub mod chat;
pub mod cli;
pub mod config;
pub mod constrain;
pub mod conversation;
pub mod engine;
pub mod env;
pub mod event;
pub mod extract;
pub mod fsutil;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod interactive;
pub mod kernels;
pub mod log;
pub mod model;
pub mod net;
pub mod output;
pub mod prompt_cache;
pub mod reasoning;
pub mod sample;
pub mod speculate;
pub mod stop;
pub mod synthetic;
#[cfg(test)]
mod test_support;
pub mod tokenizer;
pub mod weights;
