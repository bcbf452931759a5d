//! The prompt cache: the keys and values of prompts kept on disk, so that a later run whose
//! prompt starts the same way (the same document with another question, the same long system
//! prompt, the conversation so far) skips computing that prefix. On by default, in
//! `$XDG_CACHE_HOME/streamgen/prompts` (see [`default_dir`]).
//!
//! **A trie of chunks.** A prompt is stored as chunks of [`CHUNK`] positions (the last one
//! shorter), each in its own file named by its parent's id and its own: a chunk's id hashes its
//! parent's id and its tokens, so it names the whole prefix up to its end. Prompts that share a
//! beginning share its chunks: a hundred questions about one document store the document once,
//! and each question only in the chunk where it differs. Lookup follows the new prompt's own
//! chunks by name as far as they exist, then takes, among the children of the last one found,
//! the one sharing the most tokens with the rest of the prompt, token by token: a prompt that
//! extends a cached one by a few tokens, or differs from it only in its last words, reuses all
//! that matches. A shorter last chunk that a longer one extends is removed when the longer one
//! is written.
//!
//! **Exact.** What a run takes from the cache is what it would have computed: every prompt long
//! enough for the batched kernels is computed by them (see [`crate::generate::prefill_batches`]),
//! which compute each row the same whatever the batch around it, and a run starting from a
//! cached prefix leaves at least their row minimum to compute ([`crate::generate::resume_limit`]).
//! Only prompts' keys and values are stored, never an answer's (the row kernels compute those).
//!
//! **Nothing read is trusted.** A chunk file holds a header (format version, model fingerprint,
//! cache shape, parent id, first position, its tokens), the keys and values, and a sha256 of all
//! of it. A file of another version or model, of the wrong shape, cut short, padded or failing
//! its checksum, and anything under a chunk's name that is not a regular file (a FIFO, a folder,
//! a symbolic link, which is never followed), is ignored with a warning and removed, and the
//! prefix is computed again. A file's size is checked before it is read. Writes go to a
//! temporary file renamed into place, so a reader never sees half a file, and files and folders
//! are the user's alone (0600, 0700). The cache is kept under its size limit, temporary files of
//! writes under way included, by removing the least recently used chunks (and the chunks that
//! follow a removed one); a temporary file left over from an interrupted write is removed after
//! ten minutes.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::fsutil::{self, hex};
use crate::generate::resume_limit;
use crate::model::{Model, State};
use crate::output;

const MAGIC: &[u8; 8] = b"SGPCACHE";
/// Bumped whenever the file layout or the meaning of the cached values changes (the f16 cache
/// layout, rope, the kernels' numerics for a prompt).
const VERSION: u32 = 2;
/// Positions per chunk. Prompts that differ store their own copy of at most one chunk's worth
/// of a shared beginning; smaller chunks mean more files to open per lookup.
pub const CHUNK: usize = 256;
/// Prompts sharing fewer tokens than this with the cache are computed anew: reading files costs
/// more than computing a few tokens.
pub const MIN_REUSE: usize = 16;
/// Prompts shorter than this are not written: they are computed in a blink, and writing them
/// would cost a short run more than it can save a later one (see `benches/prompt_cache.rs`).
pub const MIN_STORE: usize = 64;
/// A temporary file older than this is left over from an interrupted write, and removed.
const TEMPORARY_GRACE: std::time::Duration = std::time::Duration::from_secs(600);
/// The default `--prompt-cache-max`.
pub const DEFAULT_MAX_BYTES: u64 = 2 << 30;
/// The id of the empty prefix: the parent of every first chunk.
const ROOT: Id = [0; 16];

/// A chunk's id: the hash of its parent's id and its tokens.
type Id = [u8; 16];

/// The prompt cache's folder when none is given: `$XDG_CACHE_HOME/streamgen/prompts`, or
/// `~/.cache/streamgen/prompts` (the XDG base directory rules: a relative `XDG_CACHE_HOME` is
/// ignored); `None` when neither variable is set. The environment is read through `var`.
pub fn default_dir(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let base = var(crate::env::XDG_CACHE_HOME)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| var(crate::env::HOME).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("streamgen").join("prompts"))
}

/// A prompt cache folder for one model file.
pub struct PromptCache {
    dir: PathBuf,
    fingerprint: [u8; 32],
    max_bytes: u64,
    root: PathBuf,
    quiet: bool,
    /// Set by a failed write: a run warns once, and stops trying.
    unwritable: std::sync::atomic::AtomicBool,
}

/// What a chunk's header says.
struct Header {
    fingerprint: [u8; 32],
    shape: [u32; 3],
    parent: Id,
    start: usize,
    tokens: Vec<u32>,
}

/// The chunk files of a model's folder, by parent.
struct Listing {
    children: HashMap<Id, Vec<(Id, PathBuf)>>,
}

impl Listing {
    fn has(&self, parent: &Id, id: &Id) -> bool {
        self.children.get(parent).is_some_and(|c| c.iter().any(|(i, _)| i == id))
    }
}

/// A chunk of the cache a lookup takes positions from.
struct Take {
    path: PathBuf,
    parent: Id,
    start: usize,
    /// How many of its positions are taken.
    len: usize,
}

impl PromptCache {
    /// The cache in `root` for the model file at `model_path`. The folders are created on the
    /// first write.
    pub fn new(root: &Path, model_path: &Path, max_bytes: u64, quiet: bool) -> Result<Self> {
        let fingerprint = fingerprint(model_path)?;
        let dir = root.join(hex(&fingerprint[..8]));
        Ok(Self { dir, fingerprint, max_bytes, root: root.to_owned(), quiet, unwritable: Default::default() })
    }

    fn warn(&self, msg: &str) {
        if !self.quiet {
            output::print_note(&format!("warning: prompt cache: {msg}"));
        }
    }

    /// Lists the model's folder: every chunk file by its parent (names that are not a chunk's
    /// are left alone; they are removed by eviction if they look like one of ours).
    fn list(&self) -> Listing {
        let mut children: HashMap<Id, Vec<(Id, PathBuf)>> = HashMap::new();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if let Some((parent, id)) = chunk_name(&path) {
                children.entry(parent).or_default().push((id, path));
            }
        }
        Listing { children }
    }

    /// A state holding the longest prefix of `tokens` the cache has, cut to what
    /// [`resume_limit`] allows, if it is at least [`MIN_REUSE`] long; room is made for
    /// `reserve` positions.
    pub fn lookup(&self, model: &Model, tokens: &[u32], max_len: usize, reserve: usize) -> Option<State> {
        let limit = resume_limit(tokens.len());
        if limit < MIN_REUSE {
            return None;
        }
        let listing = self.list();
        let mut takes = Vec::new();
        let (mut parent, mut pos) = (ROOT, 0);
        while pos < limit {
            let rest = &tokens[pos..];
            // The prompt's own next chunk, by name.
            if rest.len() >= CHUNK {
                let id = chunk_id(&parent, &rest[..CHUNK]);
                if listing.has(&parent, &id) {
                    takes.push(Take {
                        path: self.dir.join(name(&parent, &id)),
                        parent,
                        start: pos,
                        len: CHUNK,
                    });
                    (parent, pos) = (id, pos + CHUNK);
                    continue;
                }
            }
            // Else the child sharing the most tokens with the rest of the prompt.
            let mut best: Option<(usize, PathBuf)> = None;
            for (_, path) in listing.children.get(&parent).into_iter().flatten() {
                match self.read_header(model, path) {
                    Ok(h) if h.parent == parent && h.start == pos => {
                        let n = common_prefix(&h.tokens, rest);
                        if n > 0 && best.as_ref().is_none_or(|(m, _)| n > *m) {
                            best = Some((n, path.clone()));
                        }
                    }
                    Ok(_) => self.discard(path, &anyhow::anyhow!("its header does not match its name")),
                    Err(e) if is_gone(&e) => {}
                    Err(e) => self.discard(path, &e),
                }
            }
            if let Some((n, path)) = best {
                takes.push(Take { path, parent, start: pos, len: n });
                pos += n;
            }
            break;
        }
        let total = pos.min(limit);
        if total < MIN_REUSE {
            return None;
        }
        let mut state = model.new_state(max_len).ok()?;
        model.reserve(&mut state, reserve.max(total)).ok()?;
        let now = SystemTime::now();
        for take in takes {
            let want = take.len.min(total - state.len());
            if want == 0 {
                break;
            }
            match self.read_chunk(model, &take, &tokens[take.start..take.start + want], &mut state) {
                // Recently used chunks are the last to be evicted. (Opened as the reads are: a
                // symbolic link put there since is not followed.)
                Ok(()) => {
                    let _ = open_entry(&take.path, true).map(|(f, _)| f.set_modified(now));
                }
                Err(e) => {
                    if !is_gone(&e) {
                        self.discard(&take.path, &e);
                    }
                    break;
                }
            }
        }
        (state.len() >= MIN_REUSE).then_some(state)
    }

    /// Warns about a bad file and removes it, whatever it is (a file, a link, a folder or a
    /// FIFO under a chunk's name), so that the next write rebuilds it and the warning is not
    /// repeated on every run.
    fn discard(&self, path: &Path, why: &anyhow::Error) {
        self.warn(&format!("ignoring {}: {why:#}; it will be rebuilt", path.display()));
        let is_dir = fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
        let _ = if is_dir { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    }

    fn check(&self, model: &Model, header: &Header) -> Result<()> {
        if header.fingerprint != self.fingerprint {
            bail!("made for another model file");
        }
        if header.shape != shape(model) {
            bail!("made for a model of another shape");
        }
        Ok(())
    }

    fn read_header(&self, model: &Model, path: &Path) -> Result<Header> {
        let mut r = BufReader::new(open_entry(path, false)?.0);
        let header = read_header(&mut r)?;
        self.check(model, &header)?;
        Ok(header)
    }

    /// Reads `take`'s chunk whole, checks it, and appends the positions of `tokens` (its first
    /// tokens, as the prompt has them) to `state`.
    fn read_chunk(&self, model: &Model, take: &Take, tokens: &[u32], state: &mut State) -> Result<()> {
        let (file, len) = open_entry(&take.path, false)?;
        // The size is checked before anything is read, and never more than it is read: a
        // chunk padded to gigabytes (sparse, so it costs its maker nothing) is refused at once.
        // A chunk holds at most CHUNK positions, so this bounds the read too.
        let most = (header_bytes(CHUNK) + model.prefix_bytes(CHUNK) + 32) as u64;
        if len > most {
            bail!("padded ({len} bytes, more than a chunk can hold)");
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(len).read_to_end(&mut bytes)?;
        let mut r = bytes.as_slice();
        let header = read_header(&mut r)?;
        self.check(model, &header)?;
        let stored = header.tokens.len();
        let want = header_bytes(stored) + model.prefix_bytes(stored) + 32;
        if bytes.len() != want {
            bail!("cut short or padded ({} bytes where {want} belong)", bytes.len());
        }
        let (body, sum) = bytes.split_at(want - 32);
        if Sha256::digest(body).as_slice() != sum {
            bail!("its checksum does not match (a damaged file)");
        }
        if header.parent != take.parent || header.start != take.start || !header.tokens.starts_with(tokens) {
            bail!("its header does not match its name");
        }
        model.import_range(state, &r[..r.len() - 32], stored, tokens.len())
    }

    /// Stores the prompt `tokens` (the first of them that `state` holds), chunk by chunk,
    /// writing only the chunks the cache does not have. Prompts shorter than [`MIN_STORE`] are
    /// not stored. Failures are warnings: the cache is an optimisation.
    pub fn store(&self, model: &Model, tokens: &[u32], state: &State) {
        let len = tokens.len().min(state.len());
        if len < MIN_STORE || self.unwritable.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.write(model, &tokens[..len], state) {
            self.unwritable.store(true, std::sync::atomic::Ordering::Relaxed);
            self.warn(&format!("cannot save the prompt in {}: {e:#}", self.dir.display()));
        }
    }

    /// Stores the whole chunks of the prompt fed so far (`tokens`, of which `state` holds the
    /// first): called after each prefill batch of a model whose sliding-window layers keep
    /// rings, which by the end of a long prompt, or of its answer, no longer hold its first
    /// chunks. The last, partial chunk is left to [`PromptCache::store`].
    pub fn store_during(&self, model: &Model, tokens: &[u32], state: &State) {
        let whole = tokens.len().min(state.len()) / CHUNK * CHUNK;
        self.store(model, &tokens[..whole], state);
    }

    fn write(&self, model: &Model, tokens: &[u32], state: &State) -> Result<()> {
        fsutil::create_private_dir(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let listing = self.list();
        let now = SystemTime::now();
        let mut wrote = false;
        let mut parent = ROOT;
        for start in (0..tokens.len()).step_by(CHUNK) {
            let chunk = &tokens[start..(start + CHUNK).min(tokens.len())];
            let id = chunk_id(&parent, chunk);
            let path = self.dir.join(name(&parent, &id));
            if listing.has(&parent, &id) {
                let _ = open_entry(&path, true).map(|(f, _)| f.set_modified(now));
            } else {
                // A chunk a sliding window has moved past (a long answer after the prompt)
                // cannot be stored, nor anything after it. [`PromptCache::store_during`]
                // stores such a prompt's chunks while they are still held.
                let Ok(keys) = model.export_range(state, start..start + chunk.len()) else { break };
                let mut bytes =
                    Vec::with_capacity(header_bytes(chunk.len()) + model.prefix_bytes(chunk.len()) + 32);
                bytes.extend_from_slice(MAGIC);
                bytes.extend_from_slice(&VERSION.to_le_bytes());
                bytes.extend_from_slice(&self.fingerprint);
                for v in shape(model) {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
                bytes.extend_from_slice(&parent);
                bytes.extend_from_slice(&(start as u32).to_le_bytes());
                bytes.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
                bytes.extend_from_slice(&le_bytes(chunk));
                bytes.extend_from_slice(&keys);
                let sum = Sha256::digest(&bytes);
                bytes.extend_from_slice(&sum);
                fsutil::write_privately(&path, &bytes)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                wrote = true;
                self.remove_superseded(model, &listing, &parent, &id, chunk);
            }
            parent = id;
        }
        if wrote {
            self.evict();
        }
        Ok(())
    }

    /// Removes the shorter last chunks under `parent` that the new chunk `id` extends: every
    /// lookup that found them finds it. (A shorter chunk is always a prompt's last, with no
    /// chunk after it.)
    fn remove_superseded(&self, model: &Model, listing: &Listing, parent: &Id, id: &Id, chunk: &[u32]) {
        for (other, path) in listing.children.get(parent).into_iter().flatten() {
            if other != id
                && let Ok(h) = self.read_header(model, path)
                && h.tokens.len() < chunk.len()
                && chunk.starts_with(&h.tokens)
            {
                let _ = fs::remove_file(path);
            }
        }
    }

    /// Removes the least recently used chunks (of every model) until the cache fits, then the
    /// chunks whose parent is gone (no lookup can reach them).
    fn evict(&self) {
        let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        // Temporary files of writes under way (here or in another process) count against the
        // limit but are not evicted; one older than [`TEMPORARY_GRACE`] is left over from an
        // interrupted write, and removed.
        let mut writing: u64 = 0;
        let folders: Vec<PathBuf> =
            fs::read_dir(&self.root).into_iter().flatten().flatten().map(|d| d.path()).collect();
        for dir in &folders {
            for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let Ok(meta) = entry.metadata() else { continue };
                let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                if path.extension().is_some_and(|e| e == "tmp") {
                    if modified.elapsed().unwrap_or_default() > TEMPORARY_GRACE {
                        let _ = fs::remove_file(&path);
                    } else {
                        writing += meta.len();
                    }
                } else if path.extension().is_some_and(|e| e == "kv") {
                    files.push((modified, meta.len(), path));
                }
            }
        }
        let mut total: u64 = writing + files.iter().map(|f| f.1).sum::<u64>();
        files.sort();
        let mut removed = false;
        for (_, size, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= size;
                removed = true;
            }
        }
        if removed {
            for dir in &folders {
                remove_orphans(dir);
            }
        }
    }
}

/// Removes the chunks of `dir` whose parent chunk is gone, and theirs, until none is left.
fn remove_orphans(dir: &Path) {
    loop {
        let chunks: Vec<(Id, Id, PathBuf)> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| chunk_name(&e.path()).map(|(p, i)| (p, i, e.path())))
            .collect();
        let ids: std::collections::HashSet<Id> = chunks.iter().map(|c| c.1).collect();
        let mut removed = false;
        for (parent, _, path) in &chunks {
            if *parent != ROOT && !ids.contains(parent) && fs::remove_file(path).is_ok() {
                removed = true;
            }
        }
        if !removed {
            return;
        }
    }
}

/// A chunk file's name: its parent's id and its own, in hex.
fn name(parent: &Id, id: &Id) -> String {
    format!("{}-{}.kv", hex(parent), hex(id))
}

/// The parent and own id a chunk file's name gives, if it is one.
fn chunk_name(path: &Path) -> Option<(Id, Id)> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".kv")?;
    let (parent, id) = stem.split_once('-')?;
    Some((unhex(parent)?, unhex(id)?))
}

fn unhex(s: &str) -> Option<Id> {
    if s.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// The id of the chunk `tokens` after the prefix `parent`.
fn chunk_id(parent: &Id, tokens: &[u32]) -> Id {
    let mut h = Sha256::new();
    h.update(b"streamgen prompt chunk");
    h.update(parent);
    h.update(le_bytes(tokens));
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize()[..16]);
    id
}

/// Whether `e` says a file is not there (removed by another run since the folder was listed):
/// nothing to warn about.
fn is_gone(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// Opens a cache file without following a symbolic link (nothing out of the cache folder is
/// read or touched) and without blocking (a FIFO under a chunk's name would hang the run), and
/// only if it is a regular file; with its length.
fn open_entry(path: &Path, write: bool) -> Result<(File, u64)> {
    let mut options = File::options();
    if write {
        options.append(true);
    } else {
        options.read(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW | libc::O_NONBLOCK);
    let file = match options.open(path) {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            bail!("a symbolic link, which the cache does not follow")
        }
        other => other?,
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        bail!("not a regular file");
    }
    Ok((file, meta.len()))
}

/// Bytes of a header for `tokens` tokens: magic, version, fingerprint, shape, parent, start,
/// count, tokens.
fn header_bytes(tokens: usize) -> usize {
    MAGIC.len() + 4 + 32 + 12 + 16 + 4 + 4 + 4 * tokens
}

fn shape(model: &Model) -> [u32; 3] {
    let cfg = model.config();
    [cfg.n_layer, cfg.n_head_kv, cfg.head_dim].map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

/// Reads and checks a header: magic, version, fingerprint, shape, parent, start, tokens.
fn read_header(r: &mut impl Read) -> Result<Header> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).context("cut short")?;
    if &magic != MAGIC {
        bail!("not a streamgen prompt cache file");
    }
    let version = read_u32s(r, 1)?[0];
    if version != VERSION {
        bail!("format version {version}, not {VERSION}");
    }
    let mut fingerprint = [0u8; 32];
    r.read_exact(&mut fingerprint).context("cut short")?;
    let s = read_u32s(r, 3)?;
    let mut parent = ROOT;
    r.read_exact(&mut parent).context("cut short")?;
    let start = read_u32s(r, 1)?[0] as usize;
    let n = read_u32s(r, 1)?[0] as usize;
    // A hostile count must not allocate anything before the read fails.
    if n == 0 || n > CHUNK {
        bail!("a chunk of {n} tokens");
    }
    let tokens = read_u32s(r, n)?;
    Ok(Header { fingerprint, shape: [s[0], s[1], s[2]], parent, start, tokens })
}

fn read_u32s(r: &mut impl Read, n: usize) -> Result<Vec<u32>> {
    let mut b = vec![0u8; 4 * n];
    r.read_exact(&mut b).context("cut short")?;
    Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Identifies a model file by content without reading all of it: its size and 16 samples of
/// 64 KiB spread over it (the header with the metadata, and weights throughout), hashed.
fn fingerprint(path: &Path) -> Result<[u8; 32]> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = f.metadata()?.len();
    let mut h = Sha256::new();
    h.update(b"streamgen prompt cache");
    h.update(size.to_le_bytes());
    let mut buf = vec![0u8; 64 << 10];
    for i in 0..16u64 {
        let at = size.saturating_sub(buf.len() as u64) * i / 15;
        f.seek(SeekFrom::Start(at))?;
        let n = f.read(&mut buf)?;
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// Length of the common prefix of two token lists.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn le_bytes(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_names_round_trip_and_others_are_not_chunks() {
        let (p, i) = (chunk_id(&ROOT, &[1, 2, 3]), chunk_id(&ROOT, &[1, 2]));
        assert_ne!(p, i, "the tokens make the id");
        assert_ne!(chunk_id(&p, &[1, 2]), i, "so does the parent");
        let n = name(&p, &i);
        assert_eq!(chunk_name(Path::new(&n)), Some((p, i)));
        for other in ["x.kv", "0123.kv", &format!("{}.kv", hex(&p)), &n.replace(".kv", ".tmp")] {
            assert_eq!(chunk_name(Path::new(other)), None, "{other}");
        }
    }
}
