//! What happens to an answer's events on their way out, whichever backend computed them:
//! stop strings cut the answer text, reasoning goes where `--reasoning` says, the text goes to
//! [`crate::output`], and the summary (`--stats`, the closing JSON object) is made from the
//! token counts and the times the events arrived.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::event::{Event, Finish, FinishReason, TokenLogprob};
use crate::extract::Extract;
use crate::output::{self, Output, Summary};
use crate::reasoning::ReasoningMode;
use crate::stop::StopFilter;

/// An answer that ended before it matched its constraint (`--json-schema`, `--regex`…): the
/// run fails with it (exit 1), and with `--each-line` only its line does. Its text and summary
/// have been written as they were.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Incomplete(String);

/// Settings shared by every answer of a run.
#[derive(Debug, Clone)]
pub struct AnswerOptions {
    pub stop: Vec<String>,
    pub reasoning: ReasoningMode,
    /// Print the stats line on stderr after each answer.
    pub stats: bool,
    /// `-x/--extract`: write only the contents of the answer's first fenced code block.
    pub extract: bool,
    /// Dim reasoning on stderr (a terminal without `NO_COLOR`).
    pub dim_reasoning: bool,
    /// When the run started (time to first token counts from there) and how long loading took.
    pub run_start: Instant,
    pub load_time: Duration,
}

/// What watches an answer as it is written (the conversation log): the text exactly as it
/// went out (after stop strings), the reasoning, and the closing summary.
pub trait Record {
    fn text(&mut self, text: &str);
    fn reasoning(&mut self, text: &str);
    fn summary(&mut self, summary: &Summary);
}

/// One answer being written.
pub struct Answer<'a, W: Write> {
    out: &'a mut Output<W>,
    opts: &'a AnswerOptions,
    record: Option<&'a mut dyn Record>,
    stops: StopFilter,
    /// When the request was made.
    started: Instant,
    prompt_tokens: Option<(usize, Instant)>,
    /// Prompt tokens not computed again (a shared prefix, the prompt cache).
    reused: usize,
    /// Speculative decoding's counts, when the backend speculated.
    speculation: Option<crate::speculate::Counts>,
    /// `--choice` with `--logprobs`: the choices' scores.
    choices: Option<Vec<crate::event::ChoiceScore>>,
    /// `--logprobs`: the log-probabilities reported for the next token.
    logprob: Option<TokenLogprob>,
    first_text: Option<Instant>,
    last_text: Option<Instant>,
    /// Token ids reported (local engine) or text chunks received (a server without usage).
    tokens: usize,
    chunks: usize,
    /// Whether answer text other than white space has arrived.
    answer_begun: bool,
    reasoning_seen: bool,
    /// `--reasoning stdout`: a `<think>` has been written and not yet closed.
    think_open: bool,
    /// `--reasoning stderr`: reasoning was written there and its line not yet ended.
    stderr_open: bool,
    /// `-x/--extract`: the code block filter, after the stop strings.
    extract: Option<Extract>,
}

impl<'a, W: Write> Answer<'a, W> {
    pub fn new(out: &'a mut Output<W>, opts: &'a AnswerOptions, started: Instant) -> Self {
        Self {
            out,
            opts,
            record: None,
            stops: StopFilter::new(opts.stop.clone()),
            extract: opts.extract.then(Extract::new),
            started,
            prompt_tokens: None,
            reused: 0,
            speculation: None,
            choices: None,
            logprob: None,
            first_text: None,
            last_text: None,
            tokens: 0,
            chunks: 0,
            answer_begun: false,
            reasoning_seen: false,
            think_open: false,
            stderr_open: false,
        }
    }

    /// Has `record` watch the answer as it is written.
    pub fn recording(mut self, record: Option<&'a mut dyn Record>) -> Self {
        self.record = record;
        self
    }

    /// Writes the answer carried by `events` (each with the time it arrived), up to its
    /// finish or a stop string, then its summary. Returns how it ended.
    pub fn write(
        mut self,
        events: impl IntoIterator<Item = (Instant, Result<Event>)>,
    ) -> Result<FinishReason> {
        let mut finish = None;
        for (at, event) in events {
            match event? {
                Event::Prompt { tokens, reused } => {
                    self.prompt_tokens = Some((tokens, at));
                    self.reused = reused;
                }
                Event::Speculation(counts) => self.speculation = Some(counts),
                Event::Choices(scores) => self.choices = Some(scores),
                Event::Logprob(lp) => self.logprob = Some(lp),
                Event::Reasoning { text } => {
                    // A reasoning token's log-probabilities are not reported.
                    self.logprob = None;
                    // Reasoning is generated like the answer: the first token, the decode
                    // speed and a server's chunk count include it.
                    self.first_text.get_or_insert(at);
                    self.last_text = Some(at);
                    self.chunks += usize::from(!text.is_empty());
                    self.reasoning(&text)?
                }
                Event::Text { text, token } => {
                    self.first_text.get_or_insert(at);
                    self.last_text = Some(at);
                    self.chunks += 1;
                    self.tokens += usize::from(token.is_some());
                    let logprob = self.logprob.take().filter(|lp| lp.token == token);
                    if self.text(&text, token, logprob.as_ref())? {
                        finish = Some(Finish {
                            reason: FinishReason::Stop,
                            prompt_tokens: None,
                            generated_tokens: None,
                            complete: None,
                        });
                        break;
                    }
                }
                Event::Finish(f) => {
                    finish = Some(f);
                    break;
                }
            }
        }
        let finish = finish.ok_or_else(|| anyhow!("the answer ended without saying why (a backend bug)"))?;
        self.end(finish)
    }

    /// Routes reasoning text; an empty piece says that the model has begun to reason.
    fn reasoning(&mut self, text: &str) -> Result<()> {
        self.reasoning_seen = true;
        if text.is_empty() {
            return Ok(());
        }
        if let Some(record) = self.record.as_mut() {
            record.reasoning(text);
        }
        match self.opts.reasoning {
            ReasoningMode::Hide => {}
            ReasoningMode::Stderr => {
                output::print_reasoning(text, self.opts.dim_reasoning);
                self.stderr_open = !text.ends_with('\n');
            }
            ReasoningMode::Stdout => {
                let open = !self.think_open;
                self.think_open = true;
                self.out.reasoning(text, open).context("cannot write to standard output")?;
            }
        }
        Ok(())
    }

    /// Writes answer text through the stop filter; `true` when a stop string ended it.
    fn text(&mut self, text: &str, token: Option<u32>, logprob: Option<&TokenLogprob>) -> Result<bool> {
        if text.is_empty() {
            // `--json` lists every token, those that complete no character too.
            self.out.token_chunk("", token, logprob).context("cannot write to standard output")?;
            return Ok(false);
        }
        if !self.answer_begun && !text.trim().is_empty() {
            self.answer_begun = true;
        }
        self.close_reasoning()?;
        let (text, hit) = self.stops.push(text);
        // The log keeps the model's answer (what -c continues from), before -x cuts it.
        if let Some(record) = self.record.as_mut() {
            record.text(&text);
        }
        let (text, closed) = match &mut self.extract {
            // The block's end ends the answer as a stop string does: the rest would be dropped.
            Some(x) => (x.push(&text), x.closed()),
            None => (text, false),
        };
        self.out.token_chunk(&text, token, logprob).context("cannot write to standard output")?;
        Ok(hit || closed)
    }

    /// Ends the reasoning section once the answer begins (or the answer ends).
    fn close_reasoning(&mut self) -> Result<()> {
        if self.think_open {
            self.think_open = false;
            self.out.end_reasoning().context("cannot write to standard output")?;
        }
        if self.stderr_open {
            self.stderr_open = false;
            output::print_reasoning("\n", false);
        }
        Ok(())
    }

    fn end(mut self, finish: Finish) -> Result<FinishReason> {
        if !self.stops.stopped() {
            // Text held back for a possible stop string.
            let rest = self.stops.finish();
            if let Some(record) = self.record.as_mut() {
                record.text(&rest);
            }
            let rest = match &mut self.extract {
                Some(x) => x.push(&rest),
                None => rest,
            };
            self.out.chunk(&rest, None).context("cannot write to standard output")?;
        }
        if let Some(x) = &mut self.extract {
            let rest = x.finish();
            self.out.chunk(&rest, None).context("cannot write to standard output")?;
            if !x.found() {
                output::print_note(
                    "note: -x/--extract: the answer has no fenced code block, so nothing was written",
                );
            }
        }
        self.close_reasoning()?;
        let summary = self.summary(&finish);
        if let Some(record) = self.record.as_mut() {
            record.summary(&summary);
        }
        self.out.end(&summary).context("cannot write to standard output")?;
        if self.opts.stats {
            output::print_note(&summary.stats_line());
        }
        if finish.reason == FinishReason::Length && self.reasoning_seen && !self.answer_begun {
            bail!(
                "the model was still reasoning when -n/--max-tokens ran out, and the answer had not begun: \
                 raise -n"
            );
        }
        if finish.complete == Some(false) {
            let why = match finish.reason {
                FinishReason::Length => "-n/--max-tokens ran out before it was complete: raise -n",
                FinishReason::ContextFull => "the context filled before it was complete: raise --ctx-size",
                // Locally the mask lets the model end only where the answer is complete; a
                // server may ignore the fields that carry the constraint.
                FinishReason::Eos => {
                    "it ended without matching (with --endpoint: the server may not support this constraint)"
                }
                // A stop string or Ctrl-C ended it: what was asked for.
                FinishReason::Stop | FinishReason::Interrupted => return Ok(finish.reason),
            };
            return Err(Incomplete(format!("the answer does not match the constraint: {why}")).into());
        }
        Ok(finish.reason)
    }

    fn summary(&self, finish: &Finish) -> Summary {
        let per_second = |n: usize, d: Duration| if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() };
        let generated =
            finish.generated_tokens.unwrap_or(if self.tokens > 0 { self.tokens } else { self.chunks });
        let prompt = finish.prompt_tokens.or(self.prompt_tokens.map(|(n, _)| n)).unwrap_or(0);
        // Prefill: until the prompt was processed (the local engine says when), or else until
        // the first text arrived.
        let prefill_end = self.prompt_tokens.map(|(_, at)| at).or(self.first_text);
        let prefill = prefill_end.map_or(Duration::ZERO, |t| t.saturating_duration_since(self.started));
        // Speed over the tokens actually computed.
        let computed = prompt.saturating_sub(self.reused);
        let decode = match (self.first_text, self.last_text) {
            (Some(first), Some(last)) => last.saturating_duration_since(first),
            _ => Duration::ZERO,
        };
        Summary {
            finish_reason: finish.reason.as_str(),
            prompt_tokens: prompt,
            reused_prompt_tokens: self.reused,
            generated_tokens: generated,
            prompt_tokens_per_second: per_second(computed, prefill),
            decode_tokens_per_second: per_second(generated.saturating_sub(1), decode),
            time_to_first_token_seconds: self
                .first_text
                .map_or(0.0, |t| t.saturating_duration_since(self.opts.run_start).as_secs_f64()),
            load_seconds: self.opts.load_time.as_secs_f64(),
            // A stop string cut the answer short of what the engine saw.
            complete: finish.complete.map(|c| c && finish.reason != FinishReason::Stop),
            proposed_tokens: self.speculation.map(|c| c.proposed),
            accepted_tokens: self.speculation.map(|c| c.accepted),
            choices: self.choices.clone(),
        }
    }
}

/// The summary of an empty `--each-line` line, answered with an empty line.
pub fn empty_summary(opts: &AnswerOptions) -> Summary {
    Summary {
        finish_reason: "stop",
        prompt_tokens: 0,
        reused_prompt_tokens: 0,
        generated_tokens: 0,
        prompt_tokens_per_second: 0.0,
        decode_tokens_per_second: 0.0,
        time_to_first_token_seconds: 0.0,
        load_seconds: opts.load_time.as_secs_f64(),
        complete: None,
        proposed_tokens: None,
        accepted_tokens: None,
        choices: None,
    }
}
