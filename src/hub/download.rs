//! Fetching one file into the cache: the download under the lock, resumed after a cut,
//! checked against its size and sha256 before it takes its final name, then linked into the
//! snapshot.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

use super::HubError;
use super::cache::{RepoCache, link_pointer, lock, write_atomically};
use super::client::{Client, Failure, FileMeta, MAX_ATTEMPTS, backoff, header};

impl Client<'_> {
    /// Makes `file` available in the cache and returns its snapshot path.
    pub(super) fn fetch(&self, file: &str, progress: bool) -> Result<PathBuf> {
        let meta = match self.head(file) {
            Err(e)
                if matches!(
                    e.downcast_ref::<HubError>(),
                    Some(HubError::NotFound { available: None, .. })
                ) =>
            {
                // Tell a missing file from a missing repo, and list what the repo has.
                return Err(match self.list_ggufs() {
                    Ok(available) => {
                        HubError::NotFound { what: self.file_label(file), available: Some(available) }.into()
                    }
                    Err(listing)
                        if matches!(listing.downcast_ref::<HubError>(), Some(HubError::NotFound { .. })) =>
                    {
                        listing
                    }
                    Err(_) => e,
                });
            }
            meta => meta?,
        };
        let cache = RepoCache::new(&self.env.cache_dir, &self.spec.repo);
        let blob = cache.blob(&meta.etag);
        if !blob.is_file() {
            let _lock = lock(&cache.lock_path(&meta.etag), progress, file)?;
            // Another process may have finished the download while we waited.
            if !blob.is_file() {
                self.download(&meta, file, &blob, progress)?;
            }
        }
        let pointer = cache.pointer(&meta.commit, file);
        link_pointer(&blob, &pointer, file)?;
        if self.spec.revision != meta.commit {
            write_atomically(&cache.ref_path(&self.spec.revision), meta.commit.as_bytes())?;
        }
        Ok(pointer)
    }

    /// Downloads the blob into `{blob}.incomplete`, resuming what is there, checks its size
    /// and sha256, and only then renames it to its final name. The caller holds the lock.
    fn download(&self, meta: &FileMeta, file: &str, blob: &Path, progress: bool) -> Result<()> {
        let what = self.file_label(file);
        let mut partial = blob.as_os_str().to_owned();
        partial.push(".incomplete");
        let partial = PathBuf::from(partial);
        if let Some(dir) = partial.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
        }
        let mut out = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        let mut hasher = Sha256::new();
        let mut have = out.metadata()?.len();
        if have > meta.size {
            out.set_len(0)?;
            have = 0;
        } else if have > 0 {
            // Resuming: the checksum covers the whole file, so hash what is already there.
            let copied = std::io::copy(&mut (&mut out).take(have), &mut hasher)?;
            if copied != have {
                bail!("{}: could not read back the partial download", partial.display());
            }
        }
        let bar = progress_bar(progress, meta.size, file);
        bar.set_position(have);

        let mut failures = 0;
        let mut buf = vec![0u8; 1 << 18];
        while have < meta.size {
            let before = have;
            let err = match self.fetch_from(meta, have) {
                Err(Failure::Network { source, retry: false }) => return Err(self.unreachable(source)),
                Err(Failure::Network { source, .. }) => anyhow!(source),
                Err(Failure::Transient(e)) => e,
                Err(Failure::Fatal(e)) => return Err(e),
                Ok((start, response)) => {
                    if start != have {
                        // The server ignored the range: start over from its first byte.
                        out.set_len(0)?;
                        out.seek(SeekFrom::Start(0))?;
                        hasher = Sha256::new();
                        have = 0;
                        bar.set_position(0);
                    }
                    let mut body = response.into_body().into_reader();
                    let stopped = loop {
                        match body.read(&mut buf) {
                            Ok(0) => {
                                break Some(anyhow!("the connection closed at byte {have} of {}", meta.size));
                            }
                            Ok(n) => {
                                if have + n as u64 > meta.size {
                                    out.set_len(0)?;
                                    bail!(
                                        "{what}: the server sent more than the {} bytes it announced",
                                        meta.size
                                    );
                                }
                                // A write error (a full disk) is not retried; the partial file
                                // stays for the next run to resume.
                                out.write_all(&buf[..n])
                                    .with_context(|| format!("{what}: cannot write {}", partial.display()))?;
                                hasher.update(&buf[..n]);
                                have += n as u64;
                                bar.inc(n as u64);
                                if have == meta.size {
                                    break None;
                                }
                            }
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) => break Some(anyhow!(e)),
                        }
                    };
                    match stopped {
                        None => break,
                        Some(e) => e,
                    }
                }
            };
            failures = if have > before { 1 } else { failures + 1 };
            if failures >= MAX_ATTEMPTS {
                bar.abandon();
                return Err(err.context(format!(
                    "{what}: download stopped at byte {have} of {}; the partial file is kept, run again to resume",
                    meta.size
                )));
            }
            std::thread::sleep(backoff(failures));
        }
        bar.finish_and_clear();
        out.sync_all().with_context(|| format!("cannot write {}", partial.display()))?;
        drop(out);

        let on_disk = fs::metadata(&partial)?.len();
        let digest = crate::fsutil::hex(&hasher.finalize());
        // The ETag of an LFS file is its sha256; a plain git file's is a sha1 of the blob, and
        // only its size can be checked.
        let bad = if on_disk != meta.size {
            Some(format!("its size is {on_disk} bytes, the Hub says {}", meta.size))
        } else if is_sha256(&meta.etag) && !digest.eq_ignore_ascii_case(&meta.etag) {
            Some(format!("its sha256 is {digest}, the Hub says {}", meta.etag))
        } else {
            None
        };
        if let Some(why) = bad {
            fs::remove_file(&partial).ok();
            bail!("{what}: the download is corrupt ({why}); it was removed, run again");
        }
        fs::rename(&partial, blob)
            .with_context(|| format!("cannot move {} to {}", partial.display(), blob.display()))?;
        Ok(())
    }

    /// One GET of the blob from byte `offset`. Returns the first byte the body starts at.
    fn fetch_from(
        &self,
        meta: &FileMeta,
        offset: u64,
    ) -> Result<(u64, ureq::http::Response<ureq::Body>), Failure> {
        let mut request = self.authorize(self.agent.get(&meta.url), &meta.url);
        if offset > 0 {
            request = request.header("Range", format!("bytes={offset}-"));
        }
        let response = request.call()?;
        let status = response.status().as_u16();
        match status {
            200 => Ok((0, response)),
            206 => {
                let start = header(response.headers(), "content-range")
                    .and_then(|r| r.strip_prefix("bytes ")?.split('-').next()?.trim().parse::<u64>().ok());
                match start {
                    Some(start) if start == offset => Ok((start, response)),
                    _ => Err(Failure::Transient(anyhow!(
                        "{}: a range answer does not start at byte {offset}",
                        meta.url
                    ))),
                }
            }
            _ => {
                let code = header(response.headers(), "x-error-code");
                Err(self.status_failure(status, code.as_deref(), &meta.url, None))
            }
        }
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn progress_bar(show: bool, len: u64, file: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style =
        ProgressStyle::with_template("{msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(format!("downloading {}", file.rsplit('/').next().unwrap_or(file)));
    bar
}
