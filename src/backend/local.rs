//! The local engine as a [`Backend`]: a GGUF file's weights, tokenizer and chat template, and
//! our own decoder generating one token at a time.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::time::Instant;

use anyhow::{Result, bail};

use super::{Answers, Backend, Event, EventStream, Finish, Lines, Request, Stamped};
use crate::chat::{self, ChatTemplate, RenderContext};
use crate::generate::{
    FinishReason, Generator, Limits, Step, cache_reserve, prefill, prefill_unless_interrupted,
};
use crate::gguf::Gguf;
use crate::model::{Model, Segment, State, logits_vec};
use crate::output;
use crate::prompt_cache::{PromptCache, common_prefix};
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
    /// `--prompt-cache`: prompts' keys and values kept on disk.
    prompt_cache: Option<PromptCache>,
}

impl Local {
    /// Opens a GGUF file with its own chat template and the model's whole context.
    pub fn open(path: PathBuf) -> Result<Self> {
        let mut loaded = load(path)?;
        let template = std::mem::replace(&mut loaded.chat_template, Ok(None))?;
        Ok(Self { loaded, template, ctx_size: 0, prompt_cache: None })
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
        Ok(Self { loaded, template, ctx_size, prompt_cache: None })
    }

    /// Keeps prompts' keys and values in `cache`, and starts from the longest cached prefix.
    pub fn with_prompt_cache(mut self, cache: PromptCache) -> Self {
        self.prompt_cache = Some(cache);
        self
    }

    /// A state for `tokens`: the longest prefix the prompt cache has, or an empty one.
    fn state_for(&self, tokens: &[u32], reserve: usize) -> Result<State> {
        let (model, ctx) = (&self.loaded.model, self.context_size());
        if let Some(state) = self.prompt_cache.as_ref().and_then(|c| c.lookup(model, tokens, ctx, reserve)) {
            return Ok(state);
        }
        let mut state = model.new_state(ctx)?;
        model.reserve(&mut state, reserve)?;
        Ok(state)
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
        let state = self.state_for(&tokens, cache_reserve(tokens.len(), request.max_tokens))?;
        let reused = state.len();
        let sampler = Sampler::new(request.sampling.clone());
        let steps = Generator::new(model, state, sampler, tokens.clone(), limits)?;
        Ok(Box::new(LocalStream {
            steps,
            model,
            tokenizer,
            decoder: StreamDecoder::new(),
            finish: None,
            cache: self.prompt_cache.as_ref().map(|c| (c, tokens)),
            reused,
        }))
    }

    fn default_parallel(&self) -> usize {
        DEFAULT_PARALLEL
    }

    fn answer_lines(&self, lines: &Lines, answers: &Answers, parallel: usize) -> Result<()> {
        self.answer_batched(lines, answers, parallel)
    }
}

/// A generation's steps turned into text events.
struct LocalStream<'a> {
    steps: Generator<'a>,
    model: &'a Model,
    tokenizer: &'a Tokenizer,
    /// `--prompt-cache` and the prompt, saved once the answer is done.
    cache: Option<(&'a PromptCache, Vec<u32>)>,
    /// Prompt tokens taken from the cache.
    reused: usize,
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
            Step::Prefilled => Event::Prompt { tokens: self.steps.prompt_tokens(), reused: self.reused },
            Step::Token(token) => {
                Event::Text { text: self.decoder.push(self.tokenizer.token_bytes(token)), token: Some(token) }
            }
            Step::Done(g) => {
                // Saved after the answer, so that writing it never delays the first token.
                if let Some((cache, tokens)) = &self.cache
                    && g.finish != FinishReason::Interrupted
                    && self.steps.state().len() >= tokens.len()
                {
                    cache.store(self.model, tokens, self.steps.state());
                }
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

/// How many lines `--each-line` decodes at once by default on the local engine: one decode
/// step of eight sequences reads the weights once, where eight steps read them eight times.
pub const DEFAULT_PARALLEL: usize = 8;

/// A shared prompt prefix shorter than this is fed with each line instead of being copied.
const MIN_SHARED_PREFIX: usize = 8;

/// One line being answered in a batch.
struct Seq {
    tx: Sender<Stamped>,
    state: State,
    sampler: Sampler,
    /// The prompt and the tokens chosen so far (the repeat penalty looks back over them).
    history: Vec<u32>,
    prompt_len: usize,
    /// The token chosen last, fed at the next step.
    last: u32,
    generated: usize,
    max_tokens: Option<usize>,
    cancel: Arc<AtomicBool>,
    decoder: StreamDecoder,
    /// Whether the line has ended (or nobody wants the rest).
    done: bool,
}

impl Seq {
    /// Sends an event; `false` when the writer no longer wants this line.
    fn send(&self, event: Result<Event>) -> bool {
        self.tx.send((Instant::now(), event)).is_ok()
    }

    fn finish(&mut self, reason: FinishReason) {
        self.done = true;
        let tail = self.decoder.finish();
        if !tail.is_empty() {
            self.send(Ok(Event::Text { text: tail, token: None }));
        }
        self.send(Ok(Event::Finish(Finish {
            reason,
            prompt_tokens: Some(self.prompt_len),
            generated_tokens: Some(self.generated),
        })));
    }

    /// Chooses the next token from `logits` and sends it, or ends the line; the checks and
    /// their order are [`Generator`]'s, so a line ends where it would alone.
    fn advance(&mut self, logits: &mut [f32], tokenizer: &Tokenizer) {
        if self.max_tokens.is_some_and(|n| self.generated >= n) {
            return self.finish(FinishReason::Length);
        }
        let token = self.sampler.sample(logits, &self.history);
        if tokenizer.end_of_generation_ids().contains(&token) {
            return self.finish(FinishReason::Eos);
        }
        self.history.push(token);
        self.generated += 1;
        let text = self.decoder.push(tokenizer.token_bytes(token));
        if !self.send(Ok(Event::Text { text, token: Some(token) })) {
            self.done = true;
        } else if self.cancel.load(Ordering::Relaxed) {
            self.finish(FinishReason::Interrupted);
        } else if self.max_tokens.is_some_and(|n| self.generated >= n) {
            self.finish(FinishReason::Length);
        } else if self.state.len() >= self.state.max_len() {
            self.finish(FinishReason::ContextFull);
        } else {
            self.last = token;
        }
    }
}

/// The prompt prefix the lines share: its tokens and a state that holds their keys and values.
struct Shared {
    tokens: Vec<u32>,
    state: State,
}

impl Local {
    /// `--each-line` on the local engine: up to `parallel` lines are decoded together, one
    /// forward pass per step over all of them, each with its own state, sampler and limits.
    /// A new line's prompt is processed alone when the line starts, and the prefix the lines
    /// share (template opening, system prompt, instruction) is computed once and copied.
    ///
    /// Below 16 rows the matmul kernels compute every row exactly as for a single row, so each
    /// line's answer is bit for bit the same whatever `parallel` is (up to 15), and the same
    /// seed gives the same output.
    fn answer_batched(&self, lines: &Lines, answers: &Answers, parallel: usize) -> Result<()> {
        let mut active: Vec<Seq> = Vec::new();
        let mut input_open = true;
        let mut first_prompt: Option<Vec<u32>> = None;
        let mut shared: Option<Shared> = None;
        loop {
            // Take new lines while there is room: waiting for one only when idle, so that
            // `tail -f | streamgen --each-line` answers each line as it comes.
            while input_open && active.len() < parallel.max(1) {
                let next = if active.is_empty() {
                    lines.next(answers).ok_or(false)
                } else {
                    lines.try_next(answers)
                };
                let (request, tx) = match next {
                    Ok(next) => next,
                    Err(more) => {
                        input_open = more;
                        break;
                    }
                };
                // An empty line: its dropped channel is answered with an empty line.
                let Some(request) = request else { continue };
                match self.start_line(request, tx.clone(), &mut first_prompt, &mut shared) {
                    Ok(Some(seq)) => active.push(seq),
                    Ok(None) => {}
                    Err(e) => {
                        let _ = tx.send((Instant::now(), Err(e)));
                    }
                }
            }
            if active.is_empty() {
                if input_open {
                    continue;
                }
                return Ok(());
            }
            if let Err(e) = self.step(&mut active) {
                // Every line in the batch fails with it; the one being written reports it.
                for seq in &active {
                    seq.send(Err(anyhow::anyhow!("{e:#}")));
                }
                return Err(e);
            }
            active.retain(|s| !s.done);
        }
    }

    /// Starts a line: its prompt is processed (after the shared prefix, copied in when there
    /// is one) and its first token chosen. `None` when the line ended at once.
    fn start_line(
        &self,
        request: Request,
        tx: Sender<Stamped>,
        first_prompt: &mut Option<Vec<u32>>,
        shared: &mut Option<Shared>,
    ) -> Result<Option<Seq>> {
        let Loaded { model, tokenizer, .. } = &self.loaded;
        let tokens = self.prompt_tokens(&request)?;
        let ctx = self.context_size();
        if tokens.is_empty() || tokens.len() >= ctx {
            bail!(
                "the prompt is {} tokens and the context holds {ctx}: shorten the prompt or raise --ctx-size",
                tokens.len()
            );
        }
        let reserve = cache_reserve(tokens.len(), request.max_tokens);
        // The second line decides what is shared: the prefix it has in common with the first.
        // It is computed once, and every later line starts from a copy of it. (The first line
        // is computed whole, before any sharing, whatever `parallel` is.)
        if shared.is_none()
            && let Some(first) = first_prompt.as_deref()
        {
            let n = common_prefix(first, &tokens).min(tokens.len() - 1);
            if n >= MIN_SHARED_PREFIX {
                let mut state = self.state_for(&tokens[..=n], n)?;
                let start = state.len();
                if start < n {
                    prefill(model, &mut state, &tokens[start..n])?;
                }
                if let Some(cache) = &self.prompt_cache {
                    cache.store(model, &tokens[..n], &state);
                }
                *shared = Some(Shared { tokens: tokens[..n].to_vec(), state });
            }
        }
        first_prompt.get_or_insert_with(|| tokens.clone());
        let reuse = shared
            .as_ref()
            .map(|s| (common_prefix(&s.tokens, &tokens).min(tokens.len() - 1), &s.state))
            .filter(|&(n, _)| n >= MIN_SHARED_PREFIX);
        let mut state = match reuse {
            Some((n, from)) => model.fork(from, n, ctx, reserve)?,
            None => self.state_for(&tokens, reserve)?,
        };
        let reused = state.len();
        let Some(mut logits) =
            prefill_unless_interrupted(model, &mut state, &tokens[reused..], &request.cancel)?
        else {
            let finish =
                Finish { reason: FinishReason::Interrupted, prompt_tokens: None, generated_tokens: None };
            let _ = tx.send((Instant::now(), Ok(Event::Finish(finish))));
            return Ok(None);
        };
        let mut seq = Seq {
            tx,
            state,
            sampler: Sampler::new(request.sampling.clone()),
            history: tokens.clone(),
            prompt_len: tokens.len(),
            last: 0,
            generated: 0,
            max_tokens: request.max_tokens,
            cancel: request.cancel.clone(),
            decoder: StreamDecoder::new(),
            done: false,
        };
        if !seq.send(Ok(Event::Prompt { tokens: tokens.len(), reused })) {
            return Ok(None);
        }
        seq.advance(&mut logits, tokenizer);
        Ok((!seq.done).then_some(seq))
    }

    /// One decode step of every active line: each feeds its last token, all in one pass.
    fn step(&self, active: &mut [Seq]) -> Result<()> {
        let Loaded { model, tokenizer, .. } = &self.loaded;
        if active.iter().any(|s| s.cancel.load(Ordering::Relaxed)) {
            for seq in active.iter_mut() {
                seq.finish(FinishReason::Interrupted);
            }
            return Ok(());
        }
        let feeds: Vec<[u32; 1]> = active.iter().map(|s| [s.last]).collect();
        let logits = {
            let mut segments: Vec<Segment<'_>> = active
                .iter_mut()
                .zip(&feeds)
                .map(|(s, t)| Segment { state: &mut s.state, tokens: t })
                .collect();
            model.forward_batch(&mut segments)?
        };
        for (row, seq) in active.iter_mut().enumerate() {
            let mut row_logits = logits_vec(&logits.get(row)?)?;
            seq.advance(&mut row_logits, tokenizer);
        }
        Ok(())
    }
}
