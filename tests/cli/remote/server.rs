//! A stand-in for an OpenAI-compatible server (vLLM, llama-server, Ollama) on 127.0.0.1. It
//! speaks what streamgen uses: `GET /v1/models`, and `POST /v1/chat/completions` and
//! `/v1/completions` answered as the real servers stream, in HTTP/1.1 chunked encoding with
//! `text/event-stream` (SSE comment pings, multi-line `data:`, a usage chunk with empty
//! `choices`, `reasoning_content`/`reasoning` deltas, error events, `[DONE]`).
//!
//! Each POST takes the next scripted [`Reply`]; with none left it echoes the user's text. A
//! reply can pause, wait for the test to open a gate, or cut the connection. Every request is
//! logged with its headers and JSON body, and the requests in flight are
//! counted, for the `--each-line --parallel` tests.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};

/// One piece of a streamed reply.
#[derive(Clone, Debug)]
pub enum Part {
    /// Bytes of the event stream, sent as one HTTP chunk.
    Raw(String),
    Sleep(Duration),
    /// Wait until the test opens the gate of this name.
    Gate(&'static str),
    /// Close the connection without ending the body.
    Cut,
}

/// How the server answers one POST.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with an event stream made of these parts.
    Stream(Vec<Part>),
    /// This status, with headers and a body.
    Status(u16, Vec<(&'static str, String)>, String),
    /// 200 with this JSON body (a server that ignores `"stream": true`).
    Json(Value),
}

/// A logged request.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
}

#[derive(Default)]
struct State {
    models: Vec<String>,
    /// The answer to `GET /v1/models` instead of the list, when set.
    models_reply: Option<Reply>,
    script: VecDeque<Reply>,
    log: Vec<Logged>,
    in_flight: usize,
    gates: HashMap<&'static str, bool>,
}

/// The running server; it stops when dropped.
pub struct ApiServer {
    /// The base URL, ending in `/v1`.
    pub url: String,
    addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// A server that lists these models.
    pub fn start(models: &[&str]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new((
            Mutex::new(State { models: models.iter().map(|m| m.to_string()).collect(), ..State::default() }),
            Condvar::new(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || {
                        // A client that hangs up mid-answer is normal here.
                        let _ = serve(stream, &state);
                    });
                }
            })
        };
        Self { url: format!("http://{addr}/v1"), addr, state, stop, thread: Some(thread) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `GET /v1/models` is answered with `reply` (a redirect, an error) instead of the list.
    pub fn models_reply(&self, reply: Reply) {
        self.state().models_reply = Some(reply);
    }

    /// The next POSTs are answered with these replies, in order.
    pub fn script(&self, replies: Vec<Reply>) {
        self.state().script.extend(replies);
    }

    pub fn open_gate(&self, name: &'static str) {
        self.state().gates.insert(name, true);
        self.state.1.notify_all();
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.state().log.clone()
    }

    /// The POSTs so far.
    pub fn posts(&self) -> Vec<Logged> {
        self.requests().into_iter().filter(|r| r.method == "POST").collect()
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> usize {
        self.state().in_flight
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Gated replies would wait forever: open every gate.
        for (_, open) in self.state().gates.iter_mut() {
            *open = true;
        }
        self.state().gates.insert("*", true);
        self.state.1.notify_all();
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `data: {json}` and a blank line.
pub fn data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// A chat delta with answer text.
pub fn content(text: &str) -> Part {
    Part::Raw(data(
        &json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]}),
    ))
}

/// A chat delta with reasoning, under the field name `field`.
pub fn reasoning(field: &str, text: &str) -> Part {
    Part::Raw(data(&json!({"choices": [{"index": 0, "delta": {field: text}, "finish_reason": null}]})))
}

/// The chunk that carries the finish reason.
pub fn finish(reason: &str) -> Part {
    Part::Raw(data(&json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})))
}

/// The usage chunk `stream_options.include_usage` asks for: empty `choices`.
pub fn usage(prompt: u64, completion: u64) -> Part {
    Part::Raw(data(
        &json!({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}),
    ))
}

pub fn done() -> Part {
    Part::Raw("data: [DONE]\n\n".into())
}

/// A whole streamed chat answer: the pieces, `stop`, usage and `[DONE]`.
pub fn chat(pieces: &[&str]) -> Reply {
    let mut parts: Vec<Part> = pieces.iter().map(|p| content(p)).collect();
    parts.extend([finish("stop"), usage(7, pieces.len() as u64), done()]);
    Reply::Stream(parts)
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

fn read_request(stream: &TcpStream) -> std::io::Result<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let length: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Request { method, path, headers, body })
}

fn serve(mut stream: TcpStream, state: &(Mutex<State>, Condvar)) -> std::io::Result<()> {
    let request = read_request(&stream)?;
    let lock = || state.0.lock().unwrap_or_else(|e| e.into_inner());
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    let reply = {
        let mut s = lock();
        s.log.push(Logged {
            method: request.method.clone(),
            path: request.path.clone(),
            headers: request.headers.clone(),
            body: body.clone(),
        });
        if request.method == "GET"
            && request.path == "/v1/models"
            && let Some(reply) = s.models_reply.take()
        {
            reply
        } else if request.method == "GET" && request.path == "/v1/models" {
            let data: Vec<Value> = s.models.iter().map(|m| json!({"id": m, "object": "model"})).collect();
            Reply::Json(json!({"object": "list", "data": data}))
        } else if request.method != "POST" {
            Reply::Status(404, vec![], r#"{"detail":"Not Found"}"#.into())
        } else {
            s.in_flight += 1;
            s.script.pop_front().unwrap_or_else(|| echo(&body))
        }
    };
    let result = send(&mut stream, reply, state);
    if request.method == "POST" {
        lock().in_flight -= 1;
    }
    result
}

/// The default reply: the user's text back, word by word. A prompt `wait:NAME ...` first
/// waits for the gate NAME.
fn echo(body: &Value) -> Reply {
    let text = body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str());
    let text = text.or(body["prompt"].as_str()).unwrap_or("").to_string();
    let mut parts = Vec::new();
    let mut words: Vec<&str> = text.split(' ').collect();
    if let Some(gate) = words.first().and_then(|w| w.strip_prefix("wait:")) {
        let gate: &'static str = Box::leak(gate.to_string().into_boxed_str());
        parts.push(Part::Gate(gate));
        words.remove(0);
    }
    for (i, word) in words.iter().enumerate() {
        parts.push(content(&if i == 0 { word.to_string() } else { format!(" {word}") }));
    }
    parts.extend([finish("stop"), done()]);
    Reply::Stream(parts)
}

fn send(stream: &mut TcpStream, reply: Reply, state: &(Mutex<State>, Condvar)) -> std::io::Result<()> {
    let (status, headers, body) = match reply {
        Reply::Stream(parts) => {
            stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                  Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            )?;
            stream.flush()?;
            for part in parts {
                match part {
                    Part::Raw(text) => {
                        write!(stream, "{:x}\r\n{text}\r\n", text.len())?;
                        stream.flush()?;
                    }
                    Part::Sleep(d) => std::thread::sleep(d),
                    Part::Gate(name) => {
                        let mut s = state.0.lock().unwrap_or_else(|e| e.into_inner());
                        while !s.gates.get(name).copied().unwrap_or(false) && !s.gates.contains_key("*") {
                            s = state.1.wait(s).unwrap_or_else(|e| e.into_inner());
                        }
                    }
                    Part::Cut => return stream.shutdown(Shutdown::Both),
                }
            }
            stream.write_all(b"0\r\n\r\n")?;
            stream.flush()?;
            return stream.shutdown(Shutdown::Both);
        }
        Reply::Status(status, headers, body) => (status, headers, body),
        Reply::Json(v) => (200, vec![("Content-Type", "application/json".to_string())], v.to_string()),
    };
    let mut head =
        format!("HTTP/1.1 {status} Whatever\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()?;
    stream.shutdown(Shutdown::Both)
}
