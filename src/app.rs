//! One run of the filter: resolve and load the model, turn each prompt into tokens (through
//! the chat template unless raw), generate, and send the text to [`crate::output`] as it is
//! decoded, through the stop-string filter.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::chat::{self, ChatTemplate, RenderContext};
use crate::config::Config;
use crate::generate::{FinishReason, Generation, Limits, generate};
use crate::gguf::Gguf;
use crate::hub::{self, HubOptions};
use crate::model::Model;
use crate::output::{self, Output, OutputOptions, Summary};
use crate::sample::Sampler;
use crate::stop::StopFilter;
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

/// Process-wide signals shared with the Ctrl-C handler.
#[derive(Debug, Default)]
pub struct Signals {
    /// Set by Ctrl-C: stop after the current token.
    pub interrupted: AtomicBool,
    /// Set while tokens are being generated; before that, Ctrl-C exits at once.
    pub generating: AtomicBool,
}

/// How a whole run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    Done,
    Interrupted,
}

/// Runs the whole filter for `cfg`, writing to stdout. A reader that closes the pipe ends the
/// run normally.
pub fn run(cfg: &Config, signals: &Signals) -> Result<RunEnd> {
    let start = Instant::now();
    let hub_opts =
        HubOptions { offline: cfg.offline, progress: cfg.stderr_is_terminal && !cfg.quiet, quiet: cfg.quiet };
    let path = hub::resolve_model(&cfg.model, &hub_opts)?;
    let mut loaded = load(path)?;
    let override_template = cfg.chat_template.as_deref().map(ChatTemplate::from_arg).transpose()?;
    let embedded = std::mem::replace(&mut loaded.chat_template, Ok(None));
    let embedded = match (&override_template, cfg.raw) {
        (None, false) => embedded?,
        _ => None,
    };
    let template = if cfg.raw { None } else { override_template.as_ref().or(embedded.as_ref()) };
    let load_time = start.elapsed();

    let opts = OutputOptions {
        stream: cfg.stream,
        json: cfg.json,
        one_line: cfg.each_line.is_some(),
        terminal: output::stdout_is_terminal(),
    };
    let mut out = Output::stdout(opts);
    let prompts: Vec<(Option<usize>, &str)> = match &cfg.each_line {
        Some(lines) => lines.iter().enumerate().map(|(i, l)| (Some(i + 1), l.as_str())).collect(),
        None => vec![(None, cfg.prompt.as_str())],
    };
    let mut end = RunEnd::Done;
    for (line, prompt) in prompts {
        out.begin(line);
        let answer = Answer { loaded: &loaded, template, cfg, signals, load_time, start };
        match answer.run(prompt, &mut out) {
            Ok(Some(g)) if g.finish == FinishReason::Interrupted => {
                end = RunEnd::Interrupted;
                break;
            }
            Ok(_) => {}
            Err(e) if output::is_broken_pipe(&e) => return Ok(RunEnd::Done),
            Err(e) => return Err(e),
        }
    }
    match out.finish() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(RunEnd::Done),
        other => other.context("cannot write to standard output").map(|()| end),
    }
}

/// Everything one answer needs.
struct Answer<'a> {
    loaded: &'a Loaded,
    template: Option<&'a ChatTemplate>,
    cfg: &'a Config,
    signals: &'a Signals,
    load_time: Duration,
    start: Instant,
}

impl Answer<'_> {
    /// The prompt as the model sees it (through the chat template), and its tokens.
    fn tokens(&self, prompt: &str) -> Result<Vec<u32>> {
        let tok = &self.loaded.tokenizer;
        let (text, add_special) = match self.template {
            Some(template) => {
                let text_of = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
                let bos = text_of(tok.bos_id());
                let ctx = RenderContext::new(bos.clone(), text_of(tok.eos_id()));
                let rendered = template.render_prompt(self.cfg.system.as_deref(), prompt, &ctx)?;
                // Templates usually write the BOS text themselves: never add a second one.
                let add =
                    chat::needs_bos(&rendered, (!bos.is_empty()).then_some(bos.as_str()), tok.adds_bos());
                (rendered, add)
            }
            None => match &self.cfg.system {
                Some(system) => (format!("{system}\n\n{prompt}"), true),
                None => (prompt.to_string(), true),
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
        if self.cfg.verbose_prompt {
            output::print_note(&format!("prompt as given to the model:\n{text}"));
            output::print_note(&format!("prompt token ids ({}): {}", ids.len(), id_list(&ids)));
        }
        Ok(ids)
    }

    /// Generates one answer into `out`. `None` for an empty `--each-line` line.
    fn run<W: std::io::Write>(&self, prompt: &str, out: &mut Output<W>) -> Result<Option<Generation>> {
        let Loaded { model, tokenizer, .. } = self.loaded;
        if prompt.trim().is_empty() {
            // An empty line of --each-line input: an empty answer keeps the lines aligned.
            out.end(&self.summary(None))?;
            return Ok(None);
        }
        // From here on Ctrl-C ends this answer cleanly (an "interrupted" summary) instead of
        // exiting at once: the prompt is this answer's work, and `--verbose-prompt` has shown it.
        self.signals.generating.store(true, Ordering::SeqCst);
        let tokens =
            self.tokens(prompt).inspect_err(|_| self.signals.generating.store(false, Ordering::SeqCst))?;
        let mut state = model.new_state(self.context_size())?;
        let mut sampler = Sampler::new(self.cfg.sampling.clone());
        let limits = Limits {
            max_tokens: self.cfg.max_tokens,
            end_of_generation: tokenizer.end_of_generation_ids(),
            interrupted: &self.signals.interrupted,
        };
        let mut decoder = StreamDecoder::new();
        let mut stops = StopFilter::new(self.cfg.stop.clone());
        let mut first_token: Option<Duration> = None;
        let generation = generate(model, &mut state, &mut sampler, &tokens, &limits, |token| {
            first_token.get_or_insert_with(|| self.start.elapsed());
            let text = decoder.push(tokenizer.token_bytes(token));
            let (text, hit) = stops.push(&text);
            out.chunk(&text, Some(token)).context("cannot write to standard output")?;
            Ok(if hit { ControlFlow::Break(()) } else { ControlFlow::Continue(()) })
        });
        self.signals.generating.store(false, Ordering::SeqCst);
        let generation = generation?;
        if !stops.stopped() {
            // Text held back for a possible stop string, or an incomplete UTF-8 tail.
            let tail = decoder.finish();
            let (text, _) = stops.push(&tail);
            let rest = stops.finish();
            out.chunk(&format!("{text}{rest}"), None).context("cannot write to standard output")?;
        }
        let summary = self.summary(Some((&generation, first_token)));
        out.end(&summary).context("cannot write to standard output")?;
        if self.cfg.stats {
            output::print_note(&summary.stats_line());
        }
        Ok(Some(generation))
    }

    /// The context in tokens: `--ctx-size`, at most the model's, which is also the default.
    fn context_size(&self) -> usize {
        let model_max = self.loaded.model.config().context_length;
        if self.cfg.ctx_size == 0 { model_max } else { self.cfg.ctx_size.min(model_max) }
    }

    fn summary(&self, generation: Option<(&Generation, Option<Duration>)>) -> Summary {
        let per_second = |n: usize, d: Duration| if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() };
        match generation {
            Some((g, first)) => Summary {
                finish_reason: g.finish.as_str(),
                prompt_tokens: g.prompt_tokens,
                generated_tokens: g.generated_tokens,
                prompt_tokens_per_second: per_second(g.prompt_tokens, g.prefill),
                decode_tokens_per_second: per_second(g.generated_tokens.saturating_sub(1), g.decode),
                time_to_first_token_seconds: first.unwrap_or_default().as_secs_f64(),
                load_seconds: self.load_time.as_secs_f64(),
            },
            None => Summary {
                finish_reason: "stop",
                prompt_tokens: 0,
                generated_tokens: 0,
                prompt_tokens_per_second: 0.0,
                decode_tokens_per_second: 0.0,
                time_to_first_token_seconds: 0.0,
                load_seconds: self.load_time.as_secs_f64(),
            },
        }
    }
}

/// Token ids as `llama-tokenize --ids` prints them: `[1, 2, 3]`.
fn id_list(ids: &[u32]) -> String {
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    format!("[{}]", list.join(", "))
}
