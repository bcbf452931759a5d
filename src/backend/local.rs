//! The local engine as a [`Backend`]: a GGUF file's weights, tokenizer and chat template, and
//! our own decoder generating one token at a time.

use std::path::PathBuf;

use anyhow::{Result, bail};

use super::{Backend, Event, EventStream, Finish, Request};
use crate::chat::{self, ChatTemplate, RenderContext};
use crate::generate::{Generator, Limits, Step};
use crate::gguf::Gguf;
use crate::model::Model;
use crate::output;
use crate::sample::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// A model file opened and ready: weights, tokenizer and the file's chat template.
pub struct Loaded {
    pub path: PathBuf,
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The file's own chat template; an error when it does not compile, which only matters
    /// when it is used (not with `--raw` or `--chat-template`, which its message recommends).
    pub chat_template: Result<Option<ChatTemplate>>,
}

/// Opens a local GGUF file and loads its tokenizer, chat template and weights.
pub fn load(path: PathBuf) -> Result<Loaded> {
    let mut gguf = Gguf::open(&path)?;
    // An unsupported architecture is the clearer error, so check it before the tokenizer.
    crate::model::Config::from_gguf(&gguf)?;
    // The tokenizer (a quarter of a million strings) and the weights (mapping, checking,
    // sizing) are independent: build them on two threads, as both are on the way to the first
    // token.
    let (tokenizer, model) = std::thread::scope(|scope| {
        let weights = scope.spawn(|| Model::load(&gguf));
        let tokenizer = Tokenizer::from_gguf(&gguf);
        let model = weights.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (tokenizer, model)
    });
    let (tokenizer, model) = (tokenizer?, model?);
    let chat_template = ChatTemplate::from_gguf(&gguf);
    gguf.release_tokenizer_metadata();
    release_freed_memory();
    Ok(Loaded { path, model, tokenizer, chat_template })
}

/// Hands memory freed during loading (a quarter of a million small metadata strings) back to
/// the system. glibc keeps small freed blocks in its heap, where they would still count
/// towards the process's memory while the model runs.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
        // From here on, keep freed memory in the heap instead of handing it back at once: a
        // prefill allocates and frees megabytes per matmul (dequantized weights, activations),
        // and glibc's defaults (a fresh mmap per block above 128 KiB, trimming above 128 KiB)
        // had the kernel fault in and zero those pages again for every matmul. Measured on a
        // 1,024-token prompt: prefill 355 -> 410 tok/s, peak RSS +16 MiB (reuse is not
        // perfect). 32 MiB is the largest mmap threshold glibc accepts.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// The local engine: a loaded model and the chat template chosen for it.
pub struct Local {
    pub loaded: Loaded,
    /// The template prompts go through (unless a request is raw); `None`: plain text.
    template: Option<ChatTemplate>,
    /// Context size in tokens; 0 means the model's maximum.
    ctx_size: usize,
}

impl Local {
    /// Opens a GGUF file with its own chat template and the model's whole context.
    pub fn open(path: PathBuf) -> Result<Self> {
        let mut loaded = load(path)?;
        let template = std::mem::replace(&mut loaded.chat_template, Ok(None))?;
        Ok(Self { loaded, template, ctx_size: 0 })
    }

    /// A backend over a loaded model. `template` replaces the file's own; without it the
    /// file's template is used, and a file whose template does not compile is an error
    /// unless `raw` (where no template is used at all).
    pub fn new(
        mut loaded: Loaded,
        template: Option<ChatTemplate>,
        raw: bool,
        ctx_size: usize,
    ) -> Result<Self> {
        let embedded = std::mem::replace(&mut loaded.chat_template, Ok(None));
        let template = match (template, raw) {
            (_, true) => None,
            (Some(t), false) => Some(t),
            (None, false) => embedded?,
        };
        Ok(Self { loaded, template, ctx_size })
    }

    /// The context in tokens: `--ctx-size`, at most the model's, which is also the default.
    pub fn context_size(&self) -> usize {
        let model_max = self.loaded.model.config().context_length;
        if self.ctx_size == 0 { model_max } else { self.ctx_size.min(model_max) }
    }

    /// The prompt as the model sees it (through the chat template unless raw), and its tokens.
    pub fn prompt_tokens(&self, request: &Request) -> Result<Vec<u32>> {
        let tok = &self.loaded.tokenizer;
        let template = if request.raw { None } else { self.template.as_ref() };
        let (text, add_special) = match template {
            Some(template) => {
                let text_of = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
                let bos = text_of(tok.bos_id());
                let ctx = RenderContext::new(bos.clone(), text_of(tok.eos_id()));
                let rendered = template.render_prompt(request.system.as_deref(), &request.prompt, &ctx)?;
                // Templates usually write the BOS text themselves: never add a second one.
                let add =
                    chat::needs_bos(&rendered, (!bos.is_empty()).then_some(bos.as_str()), tok.adds_bos());
                (rendered, add)
            }
            None => match &request.system {
                Some(system) => (format!("{system}\n\n{}", request.prompt), true),
                None => (request.prompt.clone(), true),
            },
        };
        // A prompt that cannot fit is refused before tokenizing it: 100 MiB of text would take
        // minutes and gigabytes to turn into tokens only to be refused afterwards.
        let ctx = self.context_size();
        let max_bytes = ctx.saturating_mul(tok.max_token_bytes());
        if text.len() > max_bytes {
            bail!(
                "the prompt is {} bytes, more than a context of {ctx} tokens can hold (at most {max_bytes} \
                 bytes even with this vocabulary's longest tokens): shorten the prompt or raise --ctx-size",
                text.len()
            );
        }
        let ids = tok.encode(&text, add_special, true);
        if request.verbose {
            output::print_note(&format!("prompt as given to the model:\n{text}"));
            output::print_note(&format!("prompt token ids ({}): {}", ids.len(), id_list(&ids)));
        }
        Ok(ids)
    }
}

impl Backend for Local {
    fn stream(&self, request: &Request) -> Result<EventStream<'_>> {
        let Loaded { model, tokenizer, .. } = &self.loaded;
        let tokens = self.prompt_tokens(request)?;
        let limits = Limits {
            max_tokens: request.max_tokens,
            end_of_generation: tokenizer.end_of_generation_ids().to_vec(),
            interrupted: request.cancel.clone(),
        };
        let state = model.new_state(self.context_size())?;
        let sampler = Sampler::new(request.sampling.clone());
        let steps = Generator::new(model, state, sampler, tokens, limits)?;
        Ok(Box::new(LocalStream { steps, tokenizer, decoder: StreamDecoder::new(), finish: None }))
    }
}

/// A generation's steps turned into text events.
struct LocalStream<'a> {
    steps: Generator<'a>,
    tokenizer: &'a Tokenizer,
    /// Assembles UTF-8 characters that span tokens.
    decoder: StreamDecoder,
    /// The finish, held while the decoder's tail (an incomplete character) is sent first.
    finish: Option<Finish>,
}

impl Iterator for LocalStream<'_> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Result<Event>> {
        if let Some(finish) = self.finish.take() {
            return Some(Ok(Event::Finish(finish)));
        }
        let step = match self.steps.next()? {
            Ok(step) => step,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(match step {
            Step::Prefilled => Event::Prompt { tokens: self.steps.prompt_tokens() },
            Step::Token(token) => {
                Event::Text { text: self.decoder.push(self.tokenizer.token_bytes(token)), token: Some(token) }
            }
            Step::Done(g) => {
                let finish = Finish {
                    reason: g.finish,
                    prompt_tokens: Some(g.prompt_tokens),
                    generated_tokens: Some(g.generated_tokens),
                };
                let tail = self.decoder.finish();
                if tail.is_empty() {
                    Event::Finish(finish)
                } else {
                    self.finish = Some(finish);
                    Event::Text { text: tail, token: None }
                }
            }
        }))
    }
}

/// Token ids as `llama-tokenize --ids` prints them: `[1, 2, 3]`.
fn id_list(ids: &[u32]) -> String {
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    format!("[{}]", list.join(", "))
}
