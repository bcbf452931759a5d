//! The local engine as a [`Backend`]: a GGUF file's weights, tokenizer and chat template, and
//! our own decoder generating one token at a time.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, bail};

use super::{
    Alternative, Answers, Backend, ChoiceScore, Event, EventStream, Finish, Lines, Request, TokenLogprob,
};
use crate::chat::{self, ChatTemplate, RenderContext};
use crate::constrain::Constraint;
use crate::constrain::mask::{Grammars, Mask, Think};
use crate::engine::{Loaded, load};
use crate::event::FinishReason;
use crate::generate::{ChosenLogprob, Generator, Limits, Step, cache_reserve};
use crate::model::{Model, State};
use crate::output;
use crate::prompt_cache::{PromptCache, common_prefix};
use crate::reasoning::{self, Piece, Splitter};
use crate::sample::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};

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
    /// Constraints compiled for this vocabulary, made at the first constrained request (or
    /// why they cannot be).
    grammars: OnceLock<std::result::Result<Grammars, String>>,
    /// `--draft-model`: a small model of the same vocabulary that proposes tokens.
    draft: Option<Loaded>,
    /// [`Local::keep_conversation`]: the last answer's keys and values, and its tokens (the
    /// prompt, then the answer as generated).
    kept: Option<Kept>,
}

/// What [`Local::keep_conversation`] holds.
type Kept = Mutex<Option<(Vec<u32>, State)>>;

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
        Ok(Self {
            loaded,
            template,
            ctx_size: 0,
            prompt_cache: None,
            think,
            grammars: OnceLock::new(),
            draft: None,
            kept: None,
        })
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
        let template = choose_template(embedded, template, raw)?;
        let think = ThinkTags::of(&loaded.tokenizer);
        Ok(Self {
            loaded,
            template,
            ctx_size,
            prompt_cache: None,
            think,
            grammars: OnceLock::new(),
            draft: None,
            kept: None,
        })
    }

    /// Keeps prompts' keys and values in `cache`, and starts from the longest cached prefix.
    pub fn with_prompt_cache(mut self, cache: PromptCache) -> Self {
        self.prompt_cache = Some(cache);
        self
    }

    /// Speculates with `draft`'s proposals; refused unless its vocabulary is this model's,
    /// token for token.
    pub fn with_draft(mut self, draft: Loaded) -> Result<Self> {
        crate::speculate::check_vocabulary(&self.loaded.tokenizer, &draft.tokenizer)
            .with_context(|| format!("cannot use {} as a draft model", draft.path.display()))?;
        self.draft = Some(draft);
        Ok(self)
    }

    /// Keeps the keys and values of each answer in memory for the next request, which starts
    /// from the longest prefix it shares with them: the terminal chat, where the next turn's
    /// prompt is this one's, its answer, and the new user turn. The answer's keys and values
    /// are the ones decoding computed, which round differently from a prefill of the same
    /// tokens: a turn is then not bit-identical to the same conversation computed afresh (the
    /// prompt cache, which stores prompts only, is), but it computes only the new turn.
    pub fn keep_conversation(mut self) -> Self {
        self.kept = Some(Mutex::new(None));
        self
    }

    /// A state for `tokens`: the longest prefix the kept conversation or the prompt cache
    /// has, or an empty one.
    fn state_for(&self, tokens: &[u32], reserve: usize) -> Result<State> {
        let (model, ctx) = (&self.loaded.model, self.context_size());
        if let Some(kept) = &self.kept {
            let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((kept_tokens, mut state)) = kept.take() {
                // All but the last token at most: its logits are needed.
                let n = common_prefix(&kept_tokens[..state.len().min(kept_tokens.len())], tokens)
                    .min(tokens.len().saturating_sub(1));
                // (A ring past the common prefix cannot go back to it: the turn starts anew.)
                if n > 0 && state.truncate(n).is_ok() {
                    model.reserve(&mut state, reserve)?;
                    return Ok(state);
                }
            }
        }
        if let Some(state) = self.prompt_cache.as_ref().and_then(|c| c.lookup(model, tokens, ctx, reserve)) {
            return Ok(state);
        }
        let mut state = model.new_state(ctx)?;
        model.reserve(&mut state, reserve)?;
        Ok(state)
    }

    /// The context in tokens: `--ctx-size`, at most the model's, which is also the default.
    pub fn context_size(&self) -> usize {
        context_tokens(self.ctx_size, self.loaded.model.config().context_length)
    }

    /// The chat template prompts go through, unless a request is raw.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// The prompt as the model sees it (through the chat template unless raw): its tokens.
    pub fn prompt_tokens(&self, request: &Request) -> Result<Vec<u32>> {
        Ok(self.prompt(request)?.1)
    }

    /// Whether answers to `request` after `prompt` (its text) may begin with reasoning: the
    /// vocabulary has the `<think>` tags as tokens of their own, the chat template writes
    /// `<think>`, or the prompt ends inside an open `<think>`; never for a raw completion.
    fn reasons(&self, request: &Request, prompt: &str) -> bool {
        let reasons = self.think.open.is_some()
            || self.think.close.is_some()
            || self.template.as_ref().is_some_and(|t| t.source().contains(reasoning::OPEN))
            || reasoning::prompt_opens_reasoning(prompt);
        reasons && !request.raw
    }

    /// The mask of `request`'s constraint, if it has one. A reasoning model whose vocabulary
    /// has both tags as tokens thinks first, unconstrained; without those tokens the constraint
    /// holds from the first token. `batched`: the request is one line of an `--each-line`
    /// batch (whose masks are worth llguidance's slices, see [`Grammars::new`]).
    fn mask(&self, request: &Request, prompt: &str, batched: bool) -> Result<Option<Mask>> {
        let Some(constraint) = &request.constraint else { return Ok(None) };
        let grammars = self
            .grammars
            .get_or_init(|| {
                Grammars::new(self.loaded.tokenizer.clone(), batched).map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("cannot index the vocabulary for {}: {e}", constraint.flag()))?;
        let think = match (self.think.open, self.think.close) {
            (Some(open), Some(close)) if self.reasons(request, prompt) => {
                Some(Think { open, close, open_in_prompt: reasoning::prompt_opens_reasoning(prompt) })
            }
            _ => None,
        };
        grammars.mask(constraint, think).map(Some)
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
        TokenEvents {
            decoder: StreamDecoder::new(),
            split: self.reasons(request, prompt).then(|| Splitter::new(opens)),
            tags: self.think,
            pieces: Vec::new(),
        }
    }

    /// `--choice` with `--logprobs`: each choice and the tokens whose probability after the
    /// prompt is its score: its own, and where it begins another choice, an end of generation
    /// (the model chooses it by ending the answer there).
    fn choice_answers(&self, request: &Request) -> Option<Vec<(String, Vec<u32>)>> {
        let Some(Constraint::Choice(choices)) = &request.constraint else { return None };
        request.logprobs?;
        let tok = &self.loaded.tokenizer;
        let end = tok.end_of_generation_ids().first().copied();
        let answer = |c: &String| {
            let mut ids = tok.encode(c, false, false);
            if choices.iter().any(|other| other != c && other.starts_with(c.as_str())) {
                ids.extend(end);
            }
            (c.clone(), ids)
        };
        Some(choices.iter().map(answer).collect())
    }

    /// The prompt as the model sees it (through the chat template unless raw), and its tokens.
    fn prompt(&self, request: &Request) -> Result<(String, Vec<u32>)> {
        prompt_of(&self.loaded.tokenizer, self.template.as_ref(), self.context_size(), request)
    }
}

/// The chat template prompts go through: none when `raw`, else `given` (`--chat-template`),
/// else the file's own (`embedded`), whose error (a template that does not compile) matters
/// only then.
pub fn choose_template(
    embedded: Result<Option<ChatTemplate>>,
    given: Option<ChatTemplate>,
    raw: bool,
) -> Result<Option<ChatTemplate>> {
    Ok(match (given, raw) {
        (_, true) => None,
        (Some(t), false) => Some(t),
        (None, false) => embedded?,
    })
}

/// The context, in tokens, of `--ctx-size N` (0: the model's) on a model of `model_max`.
pub fn context_tokens(ctx_size: usize, model_max: usize) -> usize {
    if ctx_size == 0 { model_max } else { ctx_size.min(model_max) }
}

/// `request`'s prompt as a model with this vocabulary, chat template and context size (in
/// tokens) sees it: its text (through the template unless raw), and its tokens.
pub fn prompt_of(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    ctx: usize,
    request: &Request,
) -> Result<(String, Vec<u32>)> {
    let template = if request.raw { None } else { template };
    let (text, add_special) = match template {
        Some(template) => {
            let text_of = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
            let bos = text_of(tok.bos_id());
            let render = RenderContext {
                enable_thinking: request.enable_thinking,
                ..RenderContext::new(bos.clone(), text_of(tok.eos_id()))
            };
            let rendered = template.render_turns(
                request.system.as_deref(),
                &request.history,
                &request.prompt,
                &render,
            )?;
            // Templates usually write the BOS text themselves: never add a second one.
            let add = chat::needs_bos(&rendered, (!bos.is_empty()).then_some(bos.as_str()), tok.adds_bos());
            (rendered, add)
        }
        None if !request.history.is_empty() => {
            bail!(
                "a conversation's earlier turns need a chat template, and this prompt is raw (--raw or a model without one)"
            )
        }
        None => match &request.system {
            Some(system) => (format!("{system}\n\n{}", request.prompt), true),
            None => (request.prompt.clone(), true),
        },
    };
    // A prompt that cannot fit is refused before tokenizing it: 100 MiB of text would take
    // minutes and gigabytes to turn into tokens only to be refused afterwards.
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

impl Backend for Local {
    fn stream(&self, request: &Request) -> Result<EventStream<'_>> {
        let Loaded { model, tokenizer, .. } = &self.loaded;
        let (text, tokens) = self.prompt(request)?;
        let limits = Limits {
            max_tokens: request.max_tokens,
            end_of_generation: if request.ignore_eos {
                Vec::new()
            } else {
                tokenizer.end_of_generation_ids().to_vec()
            },
            interrupted: request.cancel.clone(),
        };
        let state = self.state_for(&tokens, cache_reserve(tokens.len(), request.max_tokens))?;
        let reused = state.len();
        let sampler = Sampler::new(request.sampling.clone());
        let mask = self.mask(request, &text, false)?;
        let mut steps = Generator::new(model, state, sampler, tokens.clone(), limits)?;
        // A long prompt's first chunks are gone from the rings by the end of its prefill, so
        // such a model's prompt is stored as it is fed.
        if let Some(cache) = &self.prompt_cache
            && model.has_rings()
        {
            steps = steps.after_each_batch(Box::new(move |fed, state| cache.store_during(model, fed, state)));
        }
        // Speculation: a draft model's proposals when there is one, else the text's own. With
        // sampling the output keeps its distribution but not its draws for a seed, so there
        // only when asked for (a draft model, --lookup); greedy, always unless --no-lookup.
        if let Some(draft) = &self.draft {
            let proposer = crate::speculate::Draft::new(&draft.model, self.context_size())?;
            steps = steps.with_speculation(Box::new(proposer), request.draft_max, true);
        } else if request.lookup != Some(false) {
            let lookup = Box::new(crate::speculate::PromptLookup::new());
            steps = steps.with_speculation(lookup, request.draft_max, request.lookup == Some(true));
        }
        // Under a constraint, proposals are cut where it refuses one (see `Generator::with_mask`).
        let steps = steps.with_mask(mask).with_logprobs(request.logprobs);
        Ok(Box::new(LocalStream {
            steps,
            model,
            tokenizer,
            events: self.token_events(request, &text),
            queue: VecDeque::new(),
            kept: self.kept.as_ref().map(|k| (k, tokens.clone(), self.context_size())),
            cache: self.prompt_cache.as_ref().map(|c| (c, tokens)),
            reused,
            emitted: 0,
            choices: self.choice_answers(request),
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
    /// [`Local::keep_conversation`]: where the state goes once the answer is done, the tokens
    /// so far (the prompt, then each generated one), and the context size.
    kept: Option<(&'a Kept, Vec<u32>, usize)>,
    /// Prompt tokens taken from the cache.
    reused: usize,
    /// Turns tokens into text and reasoning.
    events: TokenEvents,
    /// Events made and not yet handed out (a token can make several, or none).
    queue: VecDeque<Event>,
    /// Tokens handed out so far.
    emitted: usize,
    /// [`Local::choice_answers`].
    choices: Option<Vec<(String, Vec<u32>)>>,
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

impl Drop for LocalStream<'_> {
    fn drop(&mut self) {
        // Ended early (a stop string, a closed pipe): what was computed still counts.
        self.keep();
    }
}

impl LocalStream<'_> {
    /// Hands the state to [`Local::keep_conversation`]'s keeper, once.
    fn keep(&mut self) {
        if let Some((kept, tokens, ctx)) = self.kept.take() {
            let state = self.steps.state();
            // A copy (the generator keeps its own); a failure only costs the next turn its
            // head start.
            let copy = self.model.fork(state, state.len(), ctx, 0).ok();
            *kept.lock().unwrap_or_else(|e| e.into_inner()) = copy.map(|s| (tokens, s));
        }
    }

    fn step(&mut self, step: Step) {
        match step {
            Step::Prefilled => self
                .queue
                .push_back(Event::Prompt { tokens: self.steps.prompt_tokens(), reused: self.reused }),
            Step::Token(token) => {
                if let Some((_, tokens, _)) = &mut self.kept {
                    tokens.push(token);
                }
                if let Some(c) = self.steps.take_logprob(self.emitted) {
                    self.queue.push_back(Event::Logprob(token_logprob(self.tokenizer, &c)));
                }
                self.emitted += 1;
                self.events.token(self.tokenizer, token, &mut self.queue)
            }
            Step::Done(g) => {
                self.keep();
                // Saved after the answer, so that writing it never delays the first token.
                if let Some((cache, tokens)) = &self.cache
                    && g.finish != FinishReason::Interrupted
                    && self.steps.state().len() >= tokens.len()
                {
                    cache.store(self.model, tokens, self.steps.state());
                }
                if let Some(choices) = &self.choices
                    && g.finish != FinishReason::Interrupted
                    && let Some(scores) =
                        choice_scores(choices, self.steps.answer_logprobs(&tokens_of(choices)))
                {
                    self.queue.push_back(scores);
                }
                if let Some(counts) = self.steps.speculation_counts() {
                    self.queue.push_back(Event::Speculation(counts));
                }
                let finish = Finish {
                    reason: g.finish,
                    prompt_tokens: Some(g.prompt_tokens),
                    generated_tokens: Some(g.generated_tokens),
                    complete: g.complete,
                };
                self.events.finish(&mut self.queue);
                self.queue.push_back(Event::Finish(finish));
            }
        }
    }
}

/// The tokens of [`Local::choice_answers`].
fn tokens_of(choices: &[(String, Vec<u32>)]) -> Vec<Vec<u32>> {
    choices.iter().map(|(_, ids)| ids.clone()).collect()
}

/// The [`Event::Choices`] of the choices' log-probabilities, if they could be computed.
fn choice_scores(choices: &[(String, Vec<u32>)], logprobs: Result<Option<Vec<f64>>>) -> Option<Event> {
    let logprobs = logprobs.ok().flatten()?;
    let max = logprobs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = logprobs.iter().map(|lp| (lp - max).exp()).sum();
    let scores = choices.iter().zip(&logprobs).map(|((choice, _), &logprob)| ChoiceScore {
        choice: choice.clone(),
        logprob,
        probability: if total > 0.0 { (logprob - max).exp() / total } else { 0.0 },
    });
    Some(Event::Choices(scores.collect()))
}

/// A chosen token's log-probabilities as an event reports them.
fn token_logprob(tokenizer: &Tokenizer, c: &ChosenLogprob) -> TokenLogprob {
    let bytes = |id: u32| tokenizer.token_bytes(id).to_vec();
    let top = c.top.iter().map(|&(token, logprob)| Alternative {
        token: Some(token),
        bytes: bytes(token),
        logprob,
    });
    TokenLogprob { token: Some(c.token), bytes: bytes(c.token), logprob: c.logprob, top: top.collect() }
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

mod batch;

pub use batch::default_parallel;

#[cfg(test)]
mod tests;
