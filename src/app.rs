//! One run of the filter: resolve and load the model, tokenize the prompt, generate, and send
//! the text to [`crate::output`] as it is decoded.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};

use crate::config::Config;
use crate::generate::{FinishReason, Generation, Limits, generate};
use crate::gguf::Gguf;
use crate::hub::{self, HubOptions};
use crate::model::Model;
use crate::output::Output;
use crate::sample::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// A model file opened and ready: weights and tokenizer.
pub struct Loaded {
    pub path: PathBuf,
    pub model: Model,
    pub tokenizer: Tokenizer,
}

/// Opens a local GGUF file and loads its tokenizer and weights.
pub fn load(path: PathBuf) -> Result<Loaded> {
    let mut gguf = Gguf::open(&path)?;
    // An unsupported architecture is the clearer error, so check it before the tokenizer.
    crate::model::Config::from_gguf(&gguf)?;
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let model = Model::load(&mut gguf)?;
    Ok(Loaded { path, model, tokenizer })
}

/// Runs the whole filter for `cfg`, writing the answer to stdout. A reader that closes the
/// pipe ends the run normally (`FinishReason::Stop`).
pub fn run(cfg: &Config, interrupted: &AtomicBool) -> Result<Generation> {
    let hub_opts = HubOptions { offline: cfg.offline, progress: cfg.stderr_is_terminal && !cfg.quiet };
    let path = hub::resolve_model(&cfg.model, &hub_opts)?;
    let loaded = load(path)?;
    let Loaded { model, tokenizer, .. } = &loaded;

    let prompt = tokenizer.encode(&cfg.prompt, true, true);
    let ctx = if cfg.ctx_size == 0 { model.config().context_length } else { cfg.ctx_size };
    let mut state = model.new_state(ctx)?;
    let mut sampler = Sampler::new(cfg.sampling.clone());
    let limits = Limits {
        max_tokens: cfg.max_tokens,
        end_of_generation: tokenizer.end_of_generation_ids(),
        interrupted,
    };

    let mut out = Output::stdout(cfg.stream);
    let mut decoder = StreamDecoder::new();
    let mut pipe_closed = false;
    let result = generate(model, &mut state, &mut sampler, &prompt, &limits, |token| {
        let text = decoder.push(tokenizer.token_bytes(token));
        match out.write(&text) {
            Ok(()) => Ok(ControlFlow::Continue(())),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                pipe_closed = true;
                Ok(ControlFlow::Break(()))
            }
            Err(e) => Err(e).context("cannot write to standard output"),
        }
    });
    let generation = result?;
    if pipe_closed {
        return Ok(Generation { finish: FinishReason::Stop, ..generation });
    }
    let tail = decoder.finish();
    let written = out.write(&tail).and_then(|()| out.finish());
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(generation),
        other => other.context("cannot write to standard output").map(|()| generation),
    }
}
