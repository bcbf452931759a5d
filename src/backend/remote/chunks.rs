//! A server's event stream turned into [`Event`]s: the SSE items read with any byte counted as
//! a sign of life, the JSON chunks parsed (answer, reasoning, finish reason, usage), and how far
//! a stream got (whether a break may be retried).

use std::io::{BufReader, Read};
use std::sync::mpsc::Sender;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::event::{Alternative, TokenLogprob};

use super::*;

/// A reader that tells the stream the server is alive whenever bytes arrive, not only when a
/// whole line or event has: a server that drips an event out byte by byte is slow, not silent.
/// (What bounds one that sends bytes forever: a line longer than [`super::sse::MAX_LINE`] is an
/// error, and `-n` ends an answer whose events keep coming.)
pub(super) struct Activity<'a, R> {
    pub(super) inner: R,
    pub(super) tx: &'a Sender<Msg>,
    pub(super) last_told: Instant,
}

impl<R: Read> Read for Activity<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        // At most one message per tick: a fast stream reads often.
        if n > 0 && self.last_told.elapsed() >= TICK {
            self.last_told = Instant::now();
            let _ = self.tx.send(Msg::Alive);
        }
        Ok(n)
    }
}

/// Reads the event stream of a successful response, sending its events.
/// How far a stream got: whether it carried any event (then it is not tried again: something
/// may have reached the output), and whether it ended by breaking off.
#[derive(Default)]
pub(super) struct Progress {
    pub(super) sent: bool,
    pub(super) broke: bool,
}

pub(super) fn stream_events(
    reader: impl Read,
    base: &str,
    stop_given: bool,
    tx: &Sender<Msg>,
    progress: &mut Progress,
) -> Result<()> {
    let reader = Activity { inner: reader, tx, last_told: Instant::now() };
    let mut sse = SseReader::new(BufReader::new(reader));
    let mut parser = ChunkParser::new(stop_given);
    let mut done = false;
    loop {
        let item = match sse.next_item() {
            Ok(Some(item)) => item,
            Ok(None) => break,
            // The answer is complete; only the closing formalities were lost.
            Err(_) if parser.finish.is_some() => break,
            Err(e) => {
                progress.broke = true;
                let when = if progress.sent { "in the middle of the answer" } else { "before the answer" };
                return Err(e).with_context(|| format!("the connection to {base} broke {when}"));
            }
        };
        let msgs = match item {
            Item::Comment => vec![Msg::Alive],
            Item::Event { data, .. } if data.trim() == "[DONE]" => {
                done = true;
                break;
            }
            Item::Event { name: Some(name), data } if name == "error" => {
                bail!("the server reported an error{}", message_suffix(&data))
            }
            Item::Event { data, .. } => {
                let chunk: Value = serde_json::from_str(&data).with_context(|| {
                    format!("{base} sent a chunk that is not JSON: {}", truncate(&data, 200))
                })?;
                let had_finish = parser.finish.is_some();
                let mut msgs: Vec<Msg> = parser.chunk(&chunk)?.into_iter().map(Msg::Event).collect();
                if let (false, Some(finish)) = (had_finish, &parser.finish) {
                    msgs.push(Msg::FinishSeen(parser.with_usage(finish.clone())));
                }
                msgs
            }
        };
        for msg in msgs {
            progress.sent |= matches!(msg, Msg::Event(_) | Msg::FinishSeen(_));
            if tx.send(msg).is_err() {
                // The caller stopped listening: returning drops the connection.
                return Ok(());
            }
        }
    }
    let finish = match (&parser.finish, done) {
        (Some(finish), _) => finish.clone(),
        (None, true) => parser.finish_with(FinishReason::Eos),
        (None, false) => {
            progress.broke = true;
            let when = if progress.sent { "in the middle of the answer" } else { "before the answer" };
            bail!("the connection to {base} closed {when} (no finish reason and no [DONE])")
        }
    };
    let _ = tx.send(Msg::Event(Event::Finish(parser.with_usage(finish))));
    Ok(())
}

/// Turns the server's JSON chunks into events, remembering the finish reason and usage.
pub(super) struct ChunkParser {
    /// Stop strings were sent: the server's `stop` may mean one of them matched.
    pub(super) stop_given: bool,
    pub(super) finish: Option<Finish>,
    pub(super) usage: Option<(usize, usize)>,
    /// The bytes of a character that the tokens with log-probabilities so far have begun and
    /// not completed.
    carry: Vec<u8>,
}

impl ChunkParser {
    pub(super) fn new(stop_given: bool) -> Self {
        Self { stop_given, finish: None, usage: None, carry: Vec::new() }
    }

    pub(super) fn finish_with(&self, reason: FinishReason) -> Finish {
        Finish { reason, prompt_tokens: None, generated_tokens: None, complete: None }
    }

    pub(super) fn with_usage(&self, mut finish: Finish) -> Finish {
        if let Some((prompt, completion)) = self.usage {
            finish.prompt_tokens = Some(prompt);
            finish.generated_tokens = Some(completion);
        }
        finish
    }

    /// `text` split into the pieces that each of its tokens (`logprobs`) completes, with a
    /// character begun by one token going with the token that completes it; `None` when there
    /// are no tokens or their bytes are not the text (a server that reports them elsewhere).
    fn split(&mut self, text: &str, logprobs: &[TokenLogprob]) -> Option<Vec<String>> {
        if logprobs.is_empty() {
            return None;
        }
        let mut carry = self.carry.clone();
        let mut pieces = Vec::with_capacity(logprobs.len());
        for lp in logprobs {
            carry.extend_from_slice(&lp.bytes);
            let (piece, rest) = complete_characters(&carry);
            pieces.push(piece);
            carry = rest;
        }
        (pieces.concat() == text).then(|| {
            self.carry = carry;
            pieces
        })
    }

    /// The events of one chunk (a streamed delta, or a whole non-streamed answer).
    pub(super) fn chunk(&mut self, chunk: &Value) -> Result<Vec<Event>> {
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            bail!("the server reported an error: {}", error_text(error));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            let count = |key: &str| usage[key].as_u64().map(|n| n as usize);
            if let (Some(prompt), Some(completion)) = (count("prompt_tokens"), count("completion_tokens")) {
                self.usage = Some((prompt, completion));
            }
        }
        let mut events = Vec::new();
        // One answer per request (n = 1): the first choice.
        let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) else {
            return Ok(events);
        };
        // Streamed chat chunks carry `delta`, a non-streamed chat answer `message`, completions
        // `text`.
        let delta = choice.get("delta").or_else(|| choice.get("message")).unwrap_or(&Value::Null);
        // vLLM and llama-server say `reasoning_content`, newer vLLM and Ollama `reasoning`.
        let reasoning = ["reasoning_content", "reasoning"].iter().find_map(|k| delta[k].as_str());
        if let Some(text) = reasoning.filter(|t| !t.is_empty()) {
            events.push(Event::Reasoning { text: text.to_owned() });
        }
        let text = delta["content"].as_str().or_else(|| choice["text"].as_str()).unwrap_or("");
        let logprobs = if reasoning.is_some() { Vec::new() } else { token_logprobs(&choice["logprobs"]) };
        match self.split(text, &logprobs) {
            // One event per token, as the local engine reports them.
            Some(pieces) => {
                for (lp, piece) in logprobs.into_iter().zip(pieces) {
                    let token = lp.token;
                    events.push(Event::Logprob(lp));
                    events.push(Event::Text { text: piece, token });
                }
            }
            None if !text.is_empty() => events.push(Event::Text { text: text.to_owned(), token: None }),
            None => {}
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            let reason = match reason {
                "length" => FinishReason::Length,
                // A server does not say whether a stop string or the model's end token ended
                // the answer.
                "stop" if self.stop_given => FinishReason::Stop,
                _ => FinishReason::Eos,
            };
            self.finish.get_or_insert(Finish {
                reason,
                prompt_tokens: None,
                generated_tokens: None,
                complete: None,
            });
        }
        Ok(events)
    }
}

/// The text of the whole characters at the start of `bytes` and the bytes of an incomplete
/// last one; bytes that can never be UTF-8 become U+FFFD.
fn complete_characters(bytes: &[u8]) -> (String, Vec<u8>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_owned(), Vec::new()),
        Err(e) if e.error_len().is_none() => {
            let (done, rest) = bytes.split_at(e.valid_up_to());
            (String::from_utf8_lossy(done).into_owned(), rest.to_vec())
        }
        Err(_) => (String::from_utf8_lossy(bytes).into_owned(), Vec::new()),
    }
}

/// A choice's `logprobs`, in the chat API's form (`content`: one object per token with its
/// `token`, `bytes`, `logprob` and `top_logprobs`; llama-server adds each token's `id`) or
/// the completions API's (`tokens`, `token_logprobs`, and `top_logprobs` as one object per
/// token mapping text to log-probability).
fn token_logprobs(logprobs: &Value) -> Vec<TokenLogprob> {
    let id = |v: &Value| v["id"].as_u64().and_then(|id| u32::try_from(id).ok());
    let bytes = |v: &Value| match v["bytes"].as_array() {
        Some(b) => b.iter().filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok())).collect(),
        None => v["token"].as_str().unwrap_or("").as_bytes().to_vec(),
    };
    let logprob = |v: &Value| v["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY) as f32;
    if let Some(content) = logprobs["content"].as_array() {
        return content
            .iter()
            .map(|t| TokenLogprob {
                token: id(t),
                bytes: bytes(t),
                logprob: logprob(t),
                top: t["top_logprobs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| Alternative { token: id(a), bytes: bytes(a), logprob: logprob(a) })
                    .collect(),
            })
            .collect();
    }
    let Some(tokens) = logprobs["tokens"].as_array() else { return Vec::new() };
    tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let mut top: Vec<Alternative> = logprobs["top_logprobs"][i]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(text, lp)| Alternative {
                    token: None,
                    bytes: text.as_bytes().to_vec(),
                    logprob: lp.as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
                })
                .collect();
            top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
            TokenLogprob {
                token: None,
                bytes: token.as_str().unwrap_or("").as_bytes().to_vec(),
                logprob: logprobs["token_logprobs"][i].as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
                top,
            }
        })
        .collect()
}
