//! `--prompt-cache DIR`: the keys and values of prompts kept on disk, so that a later run whose
//! prompt starts the same way (the same long system prompt, the same document with another
//! question) skips computing that prefix.
//!
//! Entries live in `DIR/<model fingerprint>/`, one file per prompt, named by the hash of its
//! tokens. A file holds a header (format version, model fingerprint, cache shape, the tokens),
//! the keys and values, and a sha256 of all of it. Lookup reads every header of the model's
//! folder and takes the entry with the longest common prefix with the new prompt. Nothing read
//! is trusted: a file of another version or model, of the wrong shape, cut short, padded or
//! failing its checksum, and anything under an entry's name that is not a regular file (a
//! FIFO, a folder, a symbolic link, which is never followed), is ignored with a warning and
//! removed, and the prefix is computed again. An entry's size is checked before it is read.
//! Writes go to a temporary file renamed into place, so a reader never sees half a file; the
//! folder is kept under `--prompt-cache-max` bytes, temporary files of writes under way
//! included, by removing the least recently used entries; a temporary file left over from an
//! interrupted write is removed after ten minutes.

use std::fs::{self, File};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::fsutil::{self, hex};
use crate::model::{Model, State};
use crate::output;

const MAGIC: &[u8; 8] = b"SGPCACHE";
/// Bumped whenever the file layout or the meaning of the cached values changes (the f16 cache
/// layout, rope, the kernels' numerics for a prompt).
const VERSION: u32 = 1;
/// Prompts sharing fewer tokens than this with a cached one are computed anew: reading a file
/// costs more than computing a few tokens.
pub const MIN_REUSE: usize = 16;
/// A temporary file older than this is left over from an interrupted write, and removed.
const TEMPORARY_GRACE: std::time::Duration = std::time::Duration::from_secs(600);
/// The default `--prompt-cache-max`.
pub const DEFAULT_MAX_BYTES: u64 = 2 << 30;

/// A prompt cache folder for one model file.
pub struct PromptCache {
    dir: PathBuf,
    fingerprint: [u8; 32],
    max_bytes: u64,
    root: PathBuf,
    quiet: bool,
}

/// What a header says.
struct Header {
    fingerprint: [u8; 32],
    shape: [u32; 3],
    tokens: Vec<u32>,
}

impl PromptCache {
    /// The cache in `root` for the model file at `model_path`. The folder is created on the
    /// first write.
    pub fn new(root: &Path, model_path: &Path, max_bytes: u64, quiet: bool) -> Result<Self> {
        let fingerprint = fingerprint(model_path)?;
        let dir = root.join(hex(&fingerprint[..8]));
        Ok(Self { dir, fingerprint, max_bytes, root: root.to_owned(), quiet })
    }

    fn warn(&self, msg: &str) {
        if !self.quiet {
            output::print_note(&format!("warning: prompt cache: {msg}"));
        }
    }

    /// The state holding the longest prefix of `tokens` that an entry has (at most all but
    /// the last token, whose logits the caller needs), if it is at least [`MIN_REUSE`] long.
    pub fn lookup(&self, model: &Model, tokens: &[u32], max_len: usize, reserve: usize) -> Option<State> {
        let entries = fs::read_dir(&self.dir).ok()?;
        let want = tokens.len().saturating_sub(1);
        let mut best: Option<(usize, PathBuf, usize)> = None;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "kv") {
                continue;
            }
            match self.read_header(model, &path) {
                Ok(header) => {
                    let n = common_prefix(&header.tokens, tokens).min(want);
                    if n >= MIN_REUSE && best.as_ref().is_none_or(|(m, ..)| n > *m) {
                        best = Some((n, path, header.tokens.len()));
                    }
                }
                Err(e) => self.discard(&path, &e),
            }
        }
        let (n, path, stored) = best?;
        match self.read_state(model, &path, stored, n, max_len, reserve) {
            Ok(state) => {
                // Recently used entries are the last to be evicted. (Opened as the reads are:
                // a symbolic link put there since is not followed.)
                let _ = open_entry(&path, true).map(|(f, _)| f.set_modified(std::time::SystemTime::now()));
                Some(state)
            }
            Err(e) => {
                self.discard(&path, &e);
                None
            }
        }
    }

    /// Warns about a bad entry and removes it, whatever it is (a file, a link, a folder or a
    /// FIFO under an entry's name), so that the next write rebuilds it and the warning is not
    /// repeated on every run.
    fn discard(&self, path: &Path, why: &anyhow::Error) {
        self.warn(&format!("ignoring {}: {why:#}; it will be rebuilt", path.display()));
        let is_dir = fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
        let _ = if is_dir { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    }

    fn read_header(&self, model: &Model, path: &Path) -> Result<Header> {
        let mut r = BufReader::new(open_entry(path, false)?.0);
        let header = read_header(&mut r)?;
        if header.fingerprint != self.fingerprint {
            bail!("made for another model file");
        }
        if header.shape != shape(model) {
            bail!("made for a model of another shape");
        }
        Ok(header)
    }

    fn read_state(
        &self,
        model: &Model,
        path: &Path,
        stored: usize,
        n: usize,
        max_len: usize,
        reserve: usize,
    ) -> Result<State> {
        // The size is checked before anything is read, and never more than it is read: an
        // entry padded to gigabytes (sparse, so it costs its maker nothing) is refused at once.
        let (file, len) = open_entry(path, false)?;
        let want = header_bytes(stored) + model.prefix_bytes(stored) + 32;
        if len != want as u64 {
            bail!("cut short or padded ({len} bytes where {want} belong)");
        }
        let mut bytes = Vec::with_capacity(want);
        file.take(want as u64).read_to_end(&mut bytes)?;
        if bytes.len() != want {
            bail!("cut short ({} bytes where {want} belong)", bytes.len());
        }
        let mut r = bytes.as_slice();
        read_header(&mut r)?;
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            bail!("its checksum does not match (a damaged file)");
        }
        model.import_prefix(&r[..r.len() - 32], stored, n, max_len, reserve)
    }

    /// Stores the first `len` positions of `state` for `tokens` (its first `len` tokens).
    /// Failures are warnings: the cache is an optimisation.
    pub fn store(&self, model: &Model, tokens: &[u32], state: &State) {
        let len = tokens.len().min(state.len());
        if len < MIN_REUSE {
            return;
        }
        if let Err(e) = self.write(model, &tokens[..len], state) {
            self.warn(&format!("cannot save the prompt in {}: {e:#}", self.dir.display()));
        }
    }

    fn write(&self, model: &Model, tokens: &[u32], state: &State) -> Result<()> {
        let name = format!("{}.kv", hex(&Sha256::digest(le_bytes(tokens))[..16]));
        let path = self.dir.join(name);
        if path.exists() {
            return Ok(());
        }
        fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&self.fingerprint);
        for v in shape(model) {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&le_bytes(tokens));
        bytes.extend_from_slice(&model.export_prefix(state, tokens.len()));
        let sum = Sha256::digest(&bytes);
        bytes.extend_from_slice(&sum);
        fsutil::write_atomically(&path, &bytes)?;
        self.evict();
        Ok(())
    }

    /// Removes the least recently used entries (of every model) until the cache fits.
    fn evict(&self) {
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
        // Temporary files of writes under way (here or in another process) count against the
        // limit but are not evicted; one older than [`TEMPORARY_GRACE`] is left over from an
        // interrupted write, and removed.
        let mut writing: u64 = 0;
        for dir in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            for entry in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
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
        for (_, size, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= size;
            }
        }
    }
}

/// Opens a cache entry without following a symbolic link (nothing out of the cache folder is
/// read or touched) and without blocking (a FIFO under an entry's name would hang the run), and
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

/// Bytes of a header for `tokens` tokens: magic, version, fingerprint, shape, count, tokens.
fn header_bytes(tokens: usize) -> usize {
    MAGIC.len() + 4 + 32 + 12 + 4 + 4 * tokens
}

fn shape(model: &Model) -> [u32; 3] {
    let cfg = model.config();
    [cfg.n_layer, cfg.n_head_kv, cfg.head_dim].map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

/// Reads and checks a header: magic, version, fingerprint, shape, tokens.
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
    let n = read_u32s(r, 1)?[0] as usize;
    // A hostile count must not allocate gigabytes before the read fails.
    if n > 1 << 24 {
        bail!("a prompt of {n} tokens");
    }
    let tokens = read_u32s(r, n)?;
    Ok(Header { fingerprint, shape: [s[0], s[1], s[2]], tokens })
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
