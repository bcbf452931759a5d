//! A stand-in for the Hugging Face Hub on 127.0.0.1, speaking the HTTP/1.1 subset streamgen
//! uses: `HEAD|GET /{repo}/resolve/{rev}/{file}` answering like the Hub for an LFS file (302 to
//! a CDN-like `/blobs/{sha256}` URL with `X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size`),
//! `/blobs/{sha256}` with `Range` (206) and `HEAD`, and the model-info API
//! (`/api/models/{repo}[/revision/{rev}]` with `siblings`). Errors carry the Hub's
//! `X-Error-Code` (`RepoNotFound` with 401, `GatedRepo`, `RevisionNotFound`, `EntryNotFound`).
//!
//! Faults are injected per server: statuses for the next requests, blob bodies cut off at a
//! byte offset, slow bodies, a flipped byte. Every request is logged for assertions.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Where a served file's bytes come from.
#[derive(Clone)]
pub enum Content {
    Bytes(Arc<Vec<u8>>),
    /// A file on disk, with its sha256 computed by the caller (hashing it is slow).
    Disk {
        path: PathBuf,
        sha256: String,
    },
}

#[derive(Clone)]
struct Served {
    path: String,
    sha256: String,
    size: u64,
    content: Content,
}

struct Repo {
    commit: String,
    files: Vec<Served>,
    /// A gated repo answers 401 unless this token is sent.
    token: Option<String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    fail_next: VecDeque<u16>,
    cut_at: Option<u64>,
    slow: Option<Duration>,
    flip_byte: Option<u64>,
    log: Vec<String>,
}

/// The running server; stops (and refuses connections) when dropped or [`HubServer::stop`]ped.
pub struct HubServer {
    pub url: String,
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl HubServer {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let url = format!("http://{addr}");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop, url) = (state.clone(), stop.clone(), url.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (state, url) = (state.clone(), url.clone());
                    std::thread::spawn(move || {
                        // A client that hangs up mid-answer is normal here (cut-off tests).
                        let _ = serve(stream, &state, &url);
                    });
                }
            })
        };
        Self { url, addr, state, stop, thread: Some(thread) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or replaces) a repo; returns its commit hash.
    pub fn add_repo(&self, repo: &str, files: Vec<(&str, Content)>) -> String {
        let commit = sha256_hex(repo.as_bytes())[..40].to_string();
        let files = files
            .into_iter()
            .map(|(path, content)| {
                let (sha256, size) = match &content {
                    Content::Bytes(b) => (sha256_hex(b), b.len() as u64),
                    Content::Disk { path, sha256 } => {
                        (sha256.clone(), std::fs::metadata(path).expect("served file").len())
                    }
                };
                Served { path: path.to_string(), sha256, size, content }
            })
            .collect();
        self.state().repos.insert(repo.to_string(), Repo { commit: commit.clone(), files, token: None });
        commit
    }

    /// Gates `repo`: requests without `Authorization: Bearer {token}` get 401.
    pub fn gate(&self, repo: &str, token: &str) {
        if let Some(r) = self.state().repos.get_mut(repo) {
            r.token = Some(token.to_string());
        }
    }

    /// The next requests (any path) are answered with these statuses, in order.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.state().fail_next.extend(statuses);
    }

    /// Blob bodies stop (the connection closes) when they reach this byte of the file.
    pub fn cut_at(&self, offset: Option<u64>) {
        self.state().cut_at = offset;
    }

    /// Pause this long after each 64 KiB of a blob body.
    pub fn slow(&self, pause: Option<Duration>) {
        self.state().slow = pause;
    }

    /// Blob bodies carry this byte inverted (a corrupt CDN).
    pub fn flip_byte(&self, offset: Option<u64>) {
        self.state().flip_byte = offset;
    }

    /// Every request so far, as `METHOD /path [range]`.
    pub fn requests(&self) -> Vec<String> {
        self.state().log.clone()
    }

    /// Stops accepting; afterwards connections are refused.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag and drops the listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

fn read_request(stream: &TcpStream) -> std::io::Result<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
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
    Ok(Request { method, path, headers })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        if bytes[i] == b'%'
            && let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

enum Body {
    Empty,
    Text(String),
    Blob { file: Box<Served>, start: u64, end: u64 },
}

impl Answer {
    fn status(status: u16, error_code: Option<&str>) -> Self {
        let mut headers = Vec::new();
        if let Some(code) = error_code {
            headers.push(("X-Error-Code".to_string(), code.to_string()));
        }
        Self { status, headers, body: Body::Text(format!("{{\"error\":\"{status}\"}}")) }
    }
}

fn serve(mut stream: TcpStream, state: &Mutex<State>, url: &str) -> std::io::Result<()> {
    let request = read_request(&stream)?;
    let (answer, cut_at, slow, flip) = {
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let range = request.headers.get("range").map(|r| format!(" {r}")).unwrap_or_default();
        state.log.push(format!("{} {}{range}", request.method, request.path));
        let answer = match state.fail_next.pop_front() {
            Some(status) => Answer::status(status, None),
            None => route(&state, &request, url),
        };
        (answer, state.cut_at, state.slow, state.flip_byte)
    };
    let reason = match answer.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        _ => "Whatever",
    };
    let length = match &answer.body {
        Body::Empty => 0,
        Body::Text(t) => t.len() as u64,
        Body::Blob { start, end, .. } => end - start,
    };
    let mut head =
        format!("HTTP/1.1 {} {reason}\r\nContent-Length: {length}\r\nConnection: close\r\n", answer.status);
    for (k, v) in &answer.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if request.method == "HEAD" {
        return Ok(());
    }
    match answer.body {
        Body::Empty => {}
        Body::Text(t) => stream.write_all(t.as_bytes())?,
        Body::Blob { file, start, end } => {
            let mut reader: Box<dyn Read + '_> = match &file.content {
                Content::Bytes(b) => Box::new(b.get(start as usize..).unwrap_or_default()),
                Content::Disk { path, .. } => {
                    let mut f = File::open(path)?;
                    f.seek(SeekFrom::Start(start))?;
                    Box::new(f)
                }
            };
            let mut pos = start;
            let mut buf = vec![0u8; 64 * 1024];
            while pos < end {
                let mut want = (end - pos).min(buf.len() as u64);
                if let Some(cut) = cut_at.filter(|&c| c >= pos) {
                    if cut == pos {
                        break;
                    }
                    want = want.min(cut - pos);
                }
                let n = reader.read(&mut buf[..want as usize])?;
                if n == 0 {
                    break;
                }
                if let Some(f) = flip.filter(|&f| f >= pos && f < pos + n as u64) {
                    buf[(f - pos) as usize] ^= 0xff;
                }
                stream.write_all(&buf[..n])?;
                pos += n as u64;
                if let Some(pause) = slow {
                    std::thread::sleep(pause);
                }
            }
        }
    }
    stream.flush()?;
    stream.shutdown(Shutdown::Both)
}

fn route(state: &State, request: &Request, url: &str) -> Answer {
    if request.method != "GET" && request.method != "HEAD" {
        return Answer::status(405, None);
    }
    let path = request.path.trim_start_matches('/');
    let segments: Vec<String> = path.split('/').map(percent_decode).collect();
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    match seg.as_slice() {
        ["blobs", sha] => blob(state, request, sha),
        ["api", "models", owner, name, rest @ ..] => {
            let rev = match rest {
                [] => "main",
                ["revision", rev] => rev,
                _ => return Answer::status(404, None),
            };
            let repo = match find_repo(state, request, owner, name, rev) {
                Ok(repo) => repo,
                Err(answer) => return answer,
            };
            let siblings: Vec<String> = std::iter::once("README.md".to_string())
                .chain(repo.files.iter().map(|f| f.path.clone()))
                .map(|p| format!("{{\"rfilename\":\"{p}\"}}"))
                .collect();
            let body = format!(
                "{{\"id\":\"{owner}/{name}\",\"sha\":\"{}\",\"siblings\":[{}]}}",
                repo.commit,
                siblings.join(",")
            );
            Answer {
                status: 200,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: Body::Text(body),
            }
        }
        [owner, name, "resolve", rev, file @ ..] if !file.is_empty() => {
            let repo = match find_repo(state, request, owner, name, rev) {
                Ok(repo) => repo,
                Err(answer) => return answer,
            };
            let file = file.join("/");
            let Some(served) = repo.files.iter().find(|f| f.path == file) else {
                return Answer::status(404, Some("EntryNotFound"));
            };
            // As the Hub answers for an LFS file: a redirect to the CDN, the sha256 in
            // X-Linked-Etag, and an ETag that is not the content's (the pointer's git oid).
            Answer {
                status: 302,
                headers: vec![
                    ("Location".into(), format!("{url}/blobs/{}", served.sha256)),
                    ("X-Repo-Commit".into(), repo.commit.clone()),
                    ("X-Linked-Etag".into(), format!("\"{}\"", served.sha256)),
                    ("X-Linked-Size".into(), served.size.to_string()),
                    ("ETag".into(), format!("\"{}\"", &sha256_hex(file.as_bytes())[..40])),
                ],
                body: Body::Empty,
            }
        }
        _ => Answer::status(404, None),
    }
}

fn find_repo<'s>(
    state: &'s State,
    request: &Request,
    owner: &str,
    name: &str,
    rev: &str,
) -> Result<&'s Repo, Answer> {
    // The Hub hides private repos: an unknown repo is a 401, told apart by X-Error-Code.
    let repo = state
        .repos
        .get(&format!("{owner}/{name}"))
        .ok_or_else(|| Answer::status(401, Some("RepoNotFound")))?;
    if let Some(token) = &repo.token
        && request.headers.get("authorization") != Some(&format!("Bearer {token}"))
    {
        return Err(Answer::status(401, Some("GatedRepo")));
    }
    if rev != "main" && rev != repo.commit {
        return Err(Answer::status(404, Some("RevisionNotFound")));
    }
    Ok(repo)
}

fn blob(state: &State, request: &Request, sha: &str) -> Answer {
    let Some(file) = state.repos.values().flat_map(|r| r.files.iter()).find(|f| f.sha256 == sha) else {
        return Answer::status(404, None);
    };
    let size = file.size;
    let range = request.headers.get("range").and_then(|r| {
        let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
        let start: u64 = a.parse().ok()?;
        let end: u64 = if b.is_empty() { size } else { b.parse::<u64>().ok()? + 1 };
        Some((start, end.min(size)))
    });
    match range {
        Some((start, _)) if start >= size => {
            let mut a = Answer::status(416, None);
            a.headers.push(("Content-Range".into(), format!("bytes */{size}")));
            a
        }
        Some((start, end)) => Answer {
            status: 206,
            headers: vec![
                ("Content-Range".into(), format!("bytes {start}-{}/{size}", end - 1)),
                ("Accept-Ranges".into(), "bytes".into()),
            ],
            body: Body::Blob { file: Box::new(file.clone()), start, end },
        },
        None => Answer {
            status: 200,
            headers: vec![("Accept-Ranges".into(), "bytes".into())],
            body: Body::Blob { file: Box::new(file.clone()), start: 0, end: size },
        },
    }
}
