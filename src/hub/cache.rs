//! The Hugging Face cache on disk: reading a repo's snapshots without the network, and the
//! writes a download makes there (the lock, the snapshot link, refs), each safe against a
//! concurrent reader or downloader. The only user of hf-hub's cache layout: every path in the
//! cache is named here.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use hf_hub::{Cache, CacheRepo, Repo, RepoType};
use indicatif::{ProgressBar, ProgressDrawTarget};

use super::spec::ends_with_gguf;
use crate::fsutil;

/// One repo's folder in the cache, read without the network.
pub(super) struct RepoCache {
    dir: PathBuf,
    /// `.locks/models--{owner}--{repo}`.
    locks: PathBuf,
    /// hf-hub's names for the blobs and snapshots.
    hf: CacheRepo,
}

impl RepoCache {
    pub(super) fn new(cache_dir: &Path, repo: &str) -> Self {
        let repo = Repo::new(repo.to_string(), RepoType::Model);
        let folder = repo.folder_name();
        Self {
            dir: cache_dir.join(&folder),
            locks: cache_dir.join(".locks").join(folder),
            hf: Cache::new(cache_dir.to_path_buf()).repo(repo),
        }
    }

    /// `blobs/{etag}`: a file's bytes.
    pub(super) fn blob(&self, etag: &str) -> PathBuf {
        self.hf.blob_path(etag)
    }

    /// `snapshots/{commit}/{file}`: the link to the blob that a revision's file is read through.
    pub(super) fn pointer(&self, commit: &str, file: &str) -> PathBuf {
        self.hf.pointer_path(commit).join(file)
    }

    /// `.locks/models--{owner}--{repo}/{etag}.lock`: the lock a download of the blob holds.
    pub(super) fn lock_path(&self, etag: &str) -> PathBuf {
        self.locks.join(format!("{etag}.lock"))
    }

    /// `refs/{revision}`: the commit a branch or tag was last seen at.
    pub(super) fn ref_path(&self, revision: &str) -> PathBuf {
        self.dir.join("refs").join(revision)
    }

    /// The snapshot folder of `revision`: through `refs/{revision}` for a branch or tag, or
    /// directly for a commit hash (Python writes no ref for those).
    fn snapshot(&self, revision: &str) -> Option<PathBuf> {
        if let Ok(commit) = fs::read_to_string(self.dir.join("refs").join(revision)) {
            let commit = commit.trim();
            if safe_name(commit) {
                return Some(self.dir.join("snapshots").join(commit));
            }
        }
        is_commit_hash(revision).then(|| self.dir.join("snapshots").join(revision))
    }

    /// The cached `file` of `revision`, when its blob is present (a dangling link is a miss).
    pub(super) fn file(&self, revision: &str, file: &str) -> Option<PathBuf> {
        let path = self.snapshot(revision)?.join(file);
        path.is_file().then_some(path)
    }

    /// The cached `.gguf` files of `revision`, as repo-relative paths.
    pub(super) fn ggufs(&self, revision: &str) -> Vec<String> {
        let mut found = Vec::new();
        if let Some(root) = self.snapshot(revision) {
            collect_ggufs(&root, "", &mut found);
        }
        found.sort();
        found
    }
}

fn collect_ggufs(dir: &Path, prefix: &str, found: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let path = entry.path();
        if path.is_dir() {
            collect_ggufs(&path, &rel, found);
        } else if path.is_file() && ends_with_gguf(&rel) {
            found.push(rel);
        }
    }
}

pub(super) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Commit hashes and etags from the server become file names: no separators, no dots.
pub(super) fn safe_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Takes the download lock, waiting for another process that holds it (possibly Python).
pub(super) fn lock(path: &Path, progress: bool, file: &str) -> Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let handle = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match handle.try_lock() {
        Ok(()) => return Ok(handle),
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    let spinner = if progress {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    spinner.set_message(format!("waiting for another process downloading {file}"));
    spinner.enable_steady_tick(Duration::from_millis(200));
    let locked = handle.lock().with_context(|| format!("cannot lock {}", path.display()));
    spinner.finish_and_clear();
    locked?;
    Ok(handle)
}

/// Points `snapshots/{commit}/{file}` at the blob with a relative symlink, as Python does
/// (`../../blobs/{etag}`, one more `..` per folder in `file`). The link is made under a
/// temporary name and renamed, so a concurrent reader never sees it missing.
pub(super) fn link_pointer(blob: &Path, pointer: &Path, file: &str) -> Result<()> {
    if pointer.is_file() {
        return Ok(());
    }
    let dir = pointer.parent().ok_or_else(|| anyhow!("bad snapshot path {}", pointer.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = fsutil::temp_sibling(pointer);
    #[cfg(unix)]
    {
        let mut target = PathBuf::new();
        for _ in 0..=file.split('/').count() {
            target.push("..");
        }
        target.push("blobs");
        target.push(blob.file_name().ok_or_else(|| anyhow!("bad blob path {}", blob.display()))?);
        std::os::unix::fs::symlink(&target, &tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
    }
    #[cfg(not(unix))]
    {
        // Without symlinks, huggingface_hub copies too.
        let _ = file;
        fs::copy(blob, &tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    }
    fs::rename(&tmp, pointer).with_context(|| format!("cannot create {}", pointer.display()))
}

pub(super) fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    if fs::read(path).is_ok_and(|c| c == contents) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fsutil::write_atomically(path, contents).with_context(|| format!("cannot write {}", path.display()))
}
