//! The local engine as a [`Backend`]: a GGUF file's weights, tokenizer and chat template, and
//! our own decoder generating one token at a time.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::time::Instant;

use anyhow::{Result, bail};

use super::{Answers, Backend, Event, EventStream, Finish, Lines, Request, Stamped};
use crate::chat::{self, ChatTemplate, RenderContext};
use crate::engine::{Loaded, load};
use crate::event::FinishReason;
use crate::generate::{Choice, Generator, Limits, Sequence, Step, cache_reserve, prefill};
use crate::kernels;
use crate::model::{Model, Segment, State, logits_vec};
use crate::output;
use crate::prompt_cache::{PromptCache, common_prefix};
use crate::reasoning::{self, Piece, Splitter};
use crate::sample::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::weights;

/// The local engine: a loaded model and the chat template chosen for it.
pub struct Local {
    pub loaded: Loaded,
    /// The template prompts go through (unless a request is raw); `None`: plain text.
    template: Option<ChatTemplate>,
    /// Context size in tokens; 0 means the model's maximum.
    ctx_size: usize,
    /// `--prompt-cache`: prompts' keys and values kept on disk.
    prompt_cache: Option<PromptCache>,
    /// The vocabulary's `<think>` and `</think>` tokens.
    think: ThinkTags,
}

/// The ids of the reasoning tags, where the vocabulary has them as control or user-defined
/// tokens (Qwen3, the DeepSeek-R1 distills, QwQ): the model writes each as one token.
#[derive(Debug, Clone, Copy, Default)]
struct ThinkTags {
    open: Option<u32>,
    close: Option<u32>,
}

impl ThinkTags {
    fn of(tok: &Tokenizer) -> Self {
        let special = |text: &str| tok.token_id(text).filter(|&id| tok.is_special(id));
        Self { open: special(reasoning::OPEN), close: special(reasoning::CLOSE) }
    }

    /// The tag token `id` is, if it is one.
    fn tag(&self, id: u32) -> Option<&'static str> {
        if self.open == Some(id) {
            Some(reasoning::OPEN)
        } else if self.close == Some(id) {
            Some(reasoning::CLOSE)
        } else {
            None
        }
    }
}

impl Local {
    /// Opens a GGUF file with its own chat template and the model's whole context.
    pub fn open(path: PathBuf) -> Result<Self> {
        let mut loaded = load(path)?;
        let template = std::mem::replace(&mut loaded.chat_template, Ok(None))?;
        let think = ThinkTags::of(&loaded.tokenizer);
        Ok(Self { loaded, template, ctx_size: 0, prompt_cache: None, think })
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
        let think = ThinkTags::of(&loaded.tokenizer);
        Ok(Self { loaded, template, ctx_size, prompt_cache: None, think })
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

    /// The chat template prompts go through, unless a request is raw.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// The prompt as the model sees it (through the chat template unless raw): its tokens.
    pub fn prompt_tokens(&self, request: &Request) -> Result<Vec<u32>> {
        Ok(self.prompt(request)?.1)
    }

    /// How the tokens generated for `request` after `prompt` (its text) become events.
    ///
    /// Reasoning is split from the answer when the model may reason: its vocabulary has the
    /// `<think>` tags as tokens of their own, its chat template writes `<think>`, or the prompt
    /// ends inside an open `<think>` (then the output starts as reasoning). A raw completion is
    /// never split: it is the model's text, tags and all, as llama-server's and vLLM's
    /// completion endpoints return it.
    fn token_events(&self, request: &Request, prompt: &str) -> TokenEvents {
        let opens = reasoning::prompt_opens_reasoning(prompt);
        let reasons = self.think.open.is_some()
            || self.think.close.is_some()
            || self.template.as_ref().is_some_and(|t| t.source().contains(reasoning::OPEN))
            || opens;
        TokenEvents {
            decoder: StreamDecoder::new(),
            split: (reasons && !request.raw).then(|| Splitter::new(opens)),
            tags: self.think,
            pieces: Vec::new(),
        }
    }

    /// The prompt as the model sees it (through the chat template unless raw), and its tokens.
    fn prompt(&self, request: &Request) -> Result<(String, Vec<u32>)> {
        let tok = &self.loaded.tokenizer;
        let template = if request.raw { None } else { self.template.as_ref() };
        let (text, add_special) = match template {
            Some(template) => {
                let text_of = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
                let bos = text_of(tok.bos_id());
                let ctx = RenderContext {
                    enable_thinking: request.enable_thinking,
                    ..RenderContext::new(bos.clone(), text_of(tok.eos_id()))
                };
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
        Ok((text, ids))
    }
}

impl Backend for Local {
    fn stream(&self, request: &Request) -> Result<EventStream<'_>> {
        let Loaded { model, tokenizer, .. } = &self.loaded;
        let (text, tokens) = self.prompt(request)?;
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
            events: self.token_events(request, &text),
            queue: VecDeque::new(),
            cache: self.prompt_cache.as_ref().map(|c| (c, tokens)),
            reused,
        }))
    }

    fn default_parallel(&self) -> usize {
        default_parallel()
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
    /// Turns tokens into text and reasoning.
    events: TokenEvents,
    /// Events made and not yet handed out (a token can make several, or none).
    queue: VecDeque<Event>,
}

impl Iterator for LocalStream<'_> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some(Ok(event));
            }
            let step = match self.steps.next()? {
                Ok(step) => step,
                Err(e) => return Some(Err(e)),
            };
            self.step(step);
        }
    }
}

impl LocalStream<'_> {
    fn step(&mut self, step: Step) {
        match step {
            Step::Prefilled => self
                .queue
                .push_back(Event::Prompt { tokens: self.steps.prompt_tokens(), reused: self.reused }),
            Step::Token(token) => self.events.token(self.tokenizer, token, &mut self.queue),
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
                self.events.finish(&mut self.queue);
                self.queue.push_back(Event::Finish(finish));
            }
        }
    }
}

/// How one generation's tokens become events: UTF-8 characters assembled across tokens and,
/// for a model that reasons, its reasoning split from its answer.
struct TokenEvents {
    decoder: StreamDecoder,
    /// `None`: every token is answer text.
    split: Option<Splitter>,
    tags: ThinkTags,
    pieces: Vec<Piece>,
}

impl TokenEvents {
    /// The events of generated token `id`: one text event per token (empty while a character
    /// is incomplete), unless reasoning is split, where a token makes what the splitter knows.
    fn token(&mut self, tokenizer: &Tokenizer, id: u32, out: &mut VecDeque<Event>) {
        let Some(split) = &mut self.split else {
            out.push_back(Event::Text {
                text: self.decoder.push(tokenizer.token_bytes(id)),
                token: Some(id),
            });
            return;
        };
        match self.tags.tag(id) {
            // A tag token is its tag, whatever the vocabulary prints for it (nothing for a
            // control token), until the answer begins; then it is text like any other.
            Some(tag) if !split.answering() => {
                split.push(&self.decoder.finish(), &mut self.pieces);
                split.push(tag, &mut self.pieces);
            }
            _ => split.push(&self.decoder.push(tokenizer.token_bytes(id)), &mut self.pieces),
        }
        let answering = split.answering();
        let sent = self.drain(Some(id), out);
        if answering && !sent {
            // As without splitting: every answer token is reported.
            out.push_back(Event::Text { text: String::new(), token: Some(id) });
        }
    }

    /// The events of the end of the output: an incomplete character, what the splitter held.
    fn finish(&mut self, out: &mut VecDeque<Event>) {
        let tail = self.decoder.finish();
        match &mut self.split {
            None if tail.is_empty() => {}
            None => out.push_back(Event::Text { text: tail, token: None }),
            Some(split) => {
                split.push(&tail, &mut self.pieces);
                split.finish(&mut self.pieces);
                self.drain(None, out);
            }
        }
    }

    /// Turns the splitter's pieces into events, `token` going with the last answer text (the
    /// text it completes); whether there was answer text.
    fn drain(&mut self, token: Option<u32>, out: &mut VecDeque<Event>) -> bool {
        let last = self.pieces.iter().rposition(|p| matches!(p, Piece::Answer(_)));
        for (i, piece) in self.pieces.drain(..).enumerate() {
            out.push_back(match piece {
                Piece::Reasoning(text) => Event::Reasoning { text },
                Piece::Answer(text) => Event::Text { text, token: token.filter(|_| last == Some(i)) },
            });
        }
        last.is_some()
    }
}

/// Token ids as `llama-tokenize --ids` prints them: `[1, 2, 3]`.
fn id_list(ids: &[u32]) -> String {
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    format!("[{}]", list.join(", "))
}

/// How many lines `--each-line` decodes at once by default on the local engine: one decode
/// step of several sequences reads the weights once, where as many steps read them as many
/// times. On AVX-512 VNNI CPUs, the many-row kernel's width ([`kernels::decode_lanes`], 15):
/// a step of 15 sequences costs little more than one of 8 (Gemma 3 270M, 2 threads,
/// `benches/batch_decode` at 5c6c832: 303 to 312 tok/s at 8, 373 to 412 at 15, 246 to 266 at
/// 16, which takes two passes); elsewhere 8.
pub fn default_parallel() -> usize {
    kernels::decode_lanes().unwrap_or(8)
}

/// A new line's prompt (after the shared prefix) of at most this many tokens rides along with
/// the next decode step instead of taking a pass of its own.
const RIDE_ALONG_MAX: usize = 16;

/// A shared prompt prefix shorter than this is fed with each line instead of being copied.
const MIN_SHARED_PREFIX: usize = 8;

/// One line being answered in a batch: its [`Sequence`] (which holds the stop rules, so a
/// line ends where it would alone) and where its events go.
struct Seq {
    seq: Sequence,
    tx: Sender<Stamped>,
    events: TokenEvents,
    /// Whether the line has ended (or nobody wants the rest).
    done: bool,
}

impl Seq {
    /// Sends an event; `false` when the writer no longer wants this line.
    fn send(&self, event: Result<Event>) -> bool {
        self.tx.send((Instant::now(), event)).is_ok()
    }

    /// Sends the events of a token or of the end; `false` when the writer no longer wants
    /// this line.
    fn send_all(&self, events: VecDeque<Event>) -> bool {
        events.into_iter().all(|event| self.send(Ok(event)))
    }

    fn finish(&mut self, reason: FinishReason) {
        self.done = true;
        let mut tail = VecDeque::new();
        self.events.finish(&mut tail);
        self.send_all(tail);
        self.send(Ok(Event::Finish(Finish {
            reason,
            prompt_tokens: Some(self.seq.prompt_len()),
            generated_tokens: Some(self.seq.generated()),
        })));
    }

    /// Chooses the next token from `logits` and sends it, or ends the line. The limits are
    /// checked at once after the token, so the line's end is sent with its last token.
    fn advance(&mut self, logits: &mut [f32], tokenizer: &Tokenizer) {
        let token = match self.seq.choose(logits) {
            Choice::Token(token) => token,
            Choice::Done(reason) => return self.finish(reason),
        };
        let mut events = VecDeque::new();
        self.events.token(tokenizer, token, &mut events);
        if !self.send_all(events) {
            self.done = true;
        } else if let Some(reason) = self.seq.stop_reason() {
            self.finish(reason);
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
    /// The prefix the lines share (template opening, system prompt, instruction) is computed
    /// once and copied; the rest of a new line's prompt rides along with the next step when it
    /// is short, else it is processed alone when the line starts.
    ///
    /// Below [`weights::decode_rows_max`] + 1 rows (32 with AVX-512 VNNI, else 16) the matmul
    /// kernels compute every row exactly as for a single row, and a step never takes more, so
    /// each line's answer is bit for bit the same whatever `parallel` is, and the same seed
    /// gives the same output. (`parallel` is capped at that many lines.)
    fn answer_batched(&self, lines: &Lines, answers: &Answers, parallel: usize) -> Result<()> {
        // Each active line takes at least one row of a step, and a step stays within the rows
        // the decode kernels compute exactly as alone (see `step`).
        let parallel = parallel.clamp(1, weights::decode_rows_max());
        let mut active: Vec<Seq> = Vec::new();
        let mut input_open = true;
        let mut first_prompt: Option<Vec<u32>> = None;
        let mut shared: Option<Shared> = None;
        loop {
            // Take new lines while there is room: waiting for one only when idle, so that
            // `tail -f | streamgen --each-line` answers each line as it comes.
            while input_open && active.len() < parallel {
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
        let (text, tokens) = self.prompt(&request)?;
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
        let state = match reuse {
            Some((n, from)) => model.fork(from, n, ctx, reserve)?,
            None => self.state_for(&tokens, reserve)?,
        };
        let reused = state.len();
        let limits = Limits {
            max_tokens: request.max_tokens,
            end_of_generation: tokenizer.end_of_generation_ids().to_vec(),
            interrupted: request.cancel.clone(),
        };
        let sampler = Sampler::new(request.sampling.clone());
        let mut seq = Seq {
            seq: Sequence::new(state, sampler, tokens, limits)?,
            tx,
            events: self.token_events(&request, &text),
            done: false,
        };
        let prompt = Event::Prompt { tokens: seq.seq.prompt_len(), reused };
        if seq.seq.unfed().len() <= RIDE_ALONG_MAX {
            // Fed with the next step (see `step`).
            return Ok(seq.send(Ok(prompt)).then_some(seq));
        }
        let Some(mut logits) = seq.seq.feed(model)? else {
            let finish =
                Finish { reason: FinishReason::Interrupted, prompt_tokens: None, generated_tokens: None };
            let _ = seq.tx.send((Instant::now(), Ok(Event::Finish(finish))));
            return Ok(None);
        };
        if !seq.send(Ok(prompt)) {
            return Ok(None);
        }
        seq.advance(&mut logits, tokenizer);
        Ok((!seq.done).then_some(seq))
    }

    /// One decode step of the active lines: each feeds what it has not fed yet (its last
    /// token, or a short prompt riding along), all in one pass of at most
    /// [`weights::decode_rows_max`] rows, the rows the decode kernels compute exactly as alone.
    /// A prompt that does not fit is processed alone first, with the same result, and its first
    /// token joins the pass if a row is left, else the next one. (Without that bound a pass
    /// could reach the batched kernels' row count, whose sums differ from the decode kernels':
    /// on a CPU without AVX-512 VNNI, 15 rows of riding prompts and one prompt processed alone
    /// made 16, and a sampled line's answer changed with `--parallel`.)
    fn step(&self, active: &mut [Seq]) -> Result<()> {
        let Loaded { model, tokenizer, .. } = &self.loaded;
        if active.iter().any(|s| s.seq.stop_reason() == Some(FinishReason::Interrupted)) {
            for seq in active.iter_mut() {
                seq.finish(FinishReason::Interrupted);
            }
            return Ok(());
        }
        let budget = weights::decode_rows_max();
        // Decoding lines first: `answer_batched` keeps at most `budget` lines active.
        let mut rows = active.iter().filter(|s| !s.seq.in_prompt()).count();
        let mut joins = vec![true; active.len()];
        for (seq, joins) in active.iter_mut().zip(&mut joins).filter(|(s, _)| s.seq.in_prompt()) {
            let len = seq.seq.unfed().len();
            if rows + len <= budget {
                rows += len;
                continue;
            }
            let Some(mut logits) = seq.seq.feed(model)? else {
                seq.finish(FinishReason::Interrupted);
                continue;
            };
            seq.advance(&mut logits, tokenizer);
            if rows < budget {
                rows += 1;
            } else {
                *joins = false;
            }
        }
        let fed: Vec<bool> = active.iter().zip(&joins).map(|(s, &j)| j && !s.done).collect();
        let logits = {
            let mut segments: Vec<Segment<'_>> =
                active.iter_mut().zip(&fed).filter(|(_, f)| **f).map(|(s, _)| s.seq.segment()).collect();
            if segments.is_empty() {
                return Ok(());
            }
            model.forward_batch(&mut segments)?
        };
        for (row, seq) in active.iter_mut().zip(&fed).filter(|(_, f)| **f).map(|(s, _)| s).enumerate() {
            let mut row_logits = logits_vec(&logits.get(row)?)?;
            seq.advance(&mut row_logits, tokenizer);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::gguf_file::{self, Value};

    use super::*;
    use crate::gguf::Gguf;

    const NORMAL: i32 = 1;
    const UNKNOWN: i32 = 2;
    const CONTROL: i32 = 3;
    const USER: i32 = 4;
    const BYTE: i32 = 6;

    /// A SentencePiece vocabulary with the reasoning tags as tokens of `tag_type` (user-defined
    /// in Qwen3's and the R1 distills' GGUF files; control in some conversions), words, the
    /// tag's halves as ordinary text, and byte tokens for `é` (two bytes, two tokens).
    fn vocabulary(tag_type: i32) -> (tempfile::NamedTempFile, Tokenizer) {
        let entries: [(&str, i32); 14] = [
            ("<unk>", UNKNOWN),
            ("<s>", CONTROL),
            ("</s>", CONTROL),
            ("<think>", tag_type),
            ("</think>", tag_type),
            ("▁Hmm", NORMAL),
            ("<0x0A>", BYTE),
            ("▁Paris", NORMAL),
            (".", NORMAL),
            ("</th", NORMAL),
            ("ink>", NORMAL),
            ("<0xC3>", BYTE),
            ("<0xA9>", BYTE),
            ("<th", NORMAL),
        ];
        let metadata: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("test".into())),
            ("tokenizer.ggml.model", Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(entries.iter().map(|e| Value::String(e.0.into())).collect()),
            ),
            ("tokenizer.ggml.scores", Value::Array(entries.iter().map(|_| Value::F32(0.0)).collect())),
            ("tokenizer.ggml.token_type", Value::Array(entries.iter().map(|e| Value::I32(e.1)).collect())),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ];
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(file.as_file_mut(), &refs, &[]).expect("write gguf");
        let tokenizer = Tokenizer::from_gguf(&Gguf::open(file.path()).expect("open")).expect("tokenizer");
        (file, tokenizer)
    }

    const OPEN: u32 = 3;
    const CLOSE: u32 = 4;
    const HMM: u32 = 5;
    const NL: u32 = 6;
    const PARIS: u32 = 7;
    const DOT: u32 = 8;
    const TH: u32 = 9;
    const INK: u32 = 10;
    const E1: u32 = 11;
    const E2: u32 = 12;
    const OPEN_TH: u32 = 13;

    /// The events of `ids` generated after a prompt that does (or does not) open reasoning,
    /// with splitting on.
    fn events(tok: &Tokenizer, in_reasoning: bool, ids: &[u32]) -> Vec<Event> {
        let mut events = TokenEvents {
            decoder: StreamDecoder::new(),
            split: Some(Splitter::new(in_reasoning)),
            tags: ThinkTags::of(tok),
            pieces: Vec::new(),
        };
        let mut out = VecDeque::new();
        for &id in ids {
            events.token(tok, id, &mut out);
        }
        events.finish(&mut out);
        out.into()
    }

    /// Reasoning and answer text, and the ids the answer's text events carry.
    fn texts(events: &[Event]) -> (String, String, Vec<u32>) {
        let (mut reasoning, mut answer, mut ids) = (String::new(), String::new(), Vec::new());
        for event in events {
            match event {
                Event::Reasoning { text } => {
                    assert!(answer.is_empty(), "reasoning after the answer began: {events:?}");
                    reasoning.push_str(text);
                }
                Event::Text { text, token } => {
                    answer.push_str(text);
                    ids.extend(token);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        (reasoning, answer, ids)
    }

    #[test]
    fn tag_tokens_split_reasoning_from_the_answer_whatever_they_print() {
        for tag_type in [USER, CONTROL] {
            let (_file, tok) = vocabulary(tag_type);
            let tags = ThinkTags::of(&tok);
            assert_eq!((tags.open, tags.close), (Some(OPEN), Some(CLOSE)), "type {tag_type}");
            // <think>\n Hmm é \n</think>\n\n Paris é .  (é in two byte tokens, in both parts): the
            // white space after each tag is dropped.
            let ids = [OPEN, NL, HMM, E1, E2, NL, CLOSE, NL, NL, PARIS, E1, E2, DOT];
            let out = events(&tok, false, &ids);
            assert_eq!(out.first(), Some(&Event::Reasoning { text: String::new() }), "opened: {out:?}");
            let (reasoning, answer, answer_ids) = texts(&out);
            assert_eq!(reasoning, "Hmmé", "type {tag_type}");
            assert_eq!(answer, "Parisé.", "type {tag_type}");
            // Every answer token is reported, once, with the text it completes.
            assert_eq!(answer_ids, [PARIS, E1, E2, DOT], "type {tag_type}");
        }
    }

    #[test]
    fn a_prompt_that_opened_reasoning_needs_only_the_closing_token() {
        let (_file, tok) = vocabulary(USER);
        let (reasoning, answer, _) = texts(&events(&tok, true, &[NL, HMM, CLOSE, NL, PARIS]));
        assert_eq!((reasoning.as_str(), answer.as_str()), ("Hmm", "Paris"));
    }

    #[test]
    fn tags_spelled_in_ordinary_tokens_split_too_and_never_leak() {
        let (_file, tok) = vocabulary(USER);
        // "<th" "ink>" opens, "</th" "ink>" closes: the tags as text across token boundaries.
        let out = events(&tok, false, &[OPEN_TH, INK, HMM, TH, INK, NL, PARIS, DOT]);
        let (reasoning, answer, _) = texts(&out);
        assert_eq!((reasoning.as_str(), answer.as_str()), ("Hmm", "Paris."), "{out:?}");
    }

    #[test]
    fn a_tag_after_the_answer_began_is_answer_text() {
        let (_file, tok) = vocabulary(USER);
        let (reasoning, answer, ids) = texts(&events(&tok, false, &[PARIS, OPEN, DOT, CLOSE]));
        assert_eq!(reasoning, "");
        assert_eq!(answer, " Paris<think>.</think>");
        assert_eq!(ids, [PARIS, OPEN, DOT, CLOSE]);
    }

    #[test]
    fn output_cut_inside_reasoning_is_all_reasoning() {
        let (_file, tok) = vocabulary(CONTROL);
        let out = events(&tok, false, &[OPEN, HMM, TH]);
        let (reasoning, answer, _) = texts(&out);
        assert_eq!((reasoning.as_str(), answer.as_str()), ("Hmm</th", ""));
    }
}
