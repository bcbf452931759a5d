//! File plumbing shared by the Hub cache and the prompt cache: writes that either happen whole
//! or not at all, and hex names.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `contents` to `path` through a temporary file beside it, synced, then renamed over
/// `path`: a reader (or a crash) sees the old file or the new one, never a part. The temporary
/// file is removed when anything fails.
pub fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_through_temporary(path, contents, File::options().write(true).create_new(true), true)
}

/// Like [`write_atomically`], for a file only its owner may read or write (mode 0600 on Unix,
/// from its first byte on: the prompt cache holds what users' prompts computed to), and not
/// synced: a reader sees a whole file or none, but after a crash the file may be cut short.
/// For files that carry their own checksum (a prompt cache chunk is checked whole before use),
/// where a sync would cost every run more than a lost file costs the next one.
pub fn write_privately(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut options = File::options();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    write_through_temporary(path, contents, &options, false)
}

fn write_through_temporary(
    path: &Path,
    contents: &[u8],
    options: &fs::OpenOptions,
    sync: bool,
) -> io::Result<()> {
    let tmp = temp_sibling(path);
    let written = options
        .open(&tmp)
        .and_then(|mut f| f.write_all(contents).and_then(|()| if sync { f.sync_all() } else { Ok(()) }))
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Creates `dir` and its missing parents, those it creates readable by the owner only (mode
/// 0700 on Unix).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// A unique name beside `path` (process id and a counter), for write-then-rename.
pub fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    PathBuf::from(name)
}

/// `bytes` in lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        write_atomically(&path, b"old").expect("write");
        write_atomically(&path, b"new").expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"new");
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
        // Into a missing directory: an error, and nothing left behind.
        assert!(write_atomically(&dir.path().join("no/such"), b"x").is_err());
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
