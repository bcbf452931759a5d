//! `--prompt-cache`: a second run whose prompt starts like an earlier one skips computing that
//! prefix; damaged, foreign or outdated files are ignored with a warning and rebuilt; the folder
//! stays under its size limit.

use std::path::{Path, PathBuf};

use crate::support::{Done, TestCommand, streamgen, test_model, test_model_smollm2};

/// A document of about 300 tokens, then a question.
fn prompt(question: &str) -> String {
    let doc = "The river rose in the night and the farmers moved their geese to the hill. ".repeat(18);
    format!("{doc}\nQuestion: {question}")
}

/// `streamgen -m MODEL --raw --json -n 4 --temperature 0 --prompt-cache CACHE ARGS PROMPT`,
/// the prompt being the document and `question`.
fn cached(model: &Path, cache: &Path, args: &[&str], question: &str) -> TestCommand {
    streamgen()
        .model(model)
        .args(["--raw", "--json", "-n", "4", "--temperature", "0", "--prompt-cache"])
        .arg(cache)
        .args(args)
        .arg(prompt(question))
}

/// `reused_prompt_tokens` and `prompt_tokens` of a run's summary.
fn reused(out: &Done) -> (u64, u64) {
    let text = out.assert_success().stdout();
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a summary")).expect("JSON");
    (last["reused_prompt_tokens"].as_u64().expect("reused"), last["prompt_tokens"].as_u64().expect("prompt"))
}

fn files(cache: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(cache)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "kv"))
        .collect();
    files.sort();
    files
}

#[test]
fn a_second_prompt_with_the_same_start_reuses_the_cached_prefix() {
    let cache = tempfile::tempdir().expect("tempdir");
    let model = test_model();
    let first = cached(&model, cache.path(), &[], "Where did the geese go?").run();
    assert_eq!(reused(&first).0, 0, "an empty cache has nothing");
    assert_eq!(files(cache.path()).len(), 1);
    let second = cached(&model, cache.path(), &[], "When did the river rise?").run();
    let (n, total) = reused(&second);
    assert!(n > 250 && n < total, "reused {n} of {total}");
    // The same prompt again reuses all but its last token (whose logits are needed).
    let again = cached(&model, cache.path(), &[], "When did the river rise?").run();
    let (n, total) = reused(&again);
    assert_eq!(n + 1, total);
}

#[test]
fn damaged_foreign_and_outdated_files_are_ignored_and_rebuilt() {
    let cache = tempfile::tempdir().expect("tempdir");
    let model = test_model();
    let question = "Where did the geese go?";
    assert_eq!(reused(&cached(&model, cache.path(), &[], question).run()).0, 0);
    let file = files(cache.path()).pop().expect("a cache file");
    let good = std::fs::read(&file).expect("read");

    let mut damaged = good.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x55;
    let mut outdated = good.clone();
    outdated[8] = outdated[8].wrapping_add(1); // the format version
    let mut foreign = good.clone();
    foreign[12] ^= 0xff; // the model fingerprint
    for (bytes, why) in [
        (damaged, "checksum"),
        (outdated, "format version"),
        (foreign, "another model"),
        (good[..good.len() / 3].to_vec(), "cut short"),
    ] {
        std::fs::write(&file, &bytes).expect("write");
        let out = cached(&model, cache.path(), &[], question).run();
        let err = out.stderr();
        assert!(err.contains("warning: prompt cache: ignoring") && err.contains(why), "{why}: {err}");
        assert_eq!(reused(&out).0, 0, "{why}: nothing is trusted");
        // Rebuilt: the next run reuses it again.
        assert_eq!(std::fs::read(&file).expect("rebuilt"), good, "{why}");
        assert!(reused(&cached(&model, cache.path(), &[], question).run()).0 > 0);
    }
}

#[test]
fn the_cache_stays_under_its_size_limit_and_models_do_not_mix() {
    let cache = tempfile::tempdir().expect("tempdir");
    let model = test_model();
    cached(&model, cache.path(), &[], "Where did the geese go?").run();
    let one = std::fs::metadata(&files(cache.path())[0]).expect("size").len();
    // Room for one entry and a half: each new prompt evicts the least recently used one.
    let max = format!("{}", one * 3 / 2);
    for q in ["When did the river rise?", "Who moved the geese?"] {
        let out = cached(&model, cache.path(), &["--prompt-cache-max", &max], q).run();
        out.assert_success();
        assert_eq!(files(cache.path()).len(), 1, "after {q:?}");
    }
    // Another model's entries live in their own folder and are never offered to this one.
    let other = cached(&test_model_smollm2(), cache.path(), &[], "Where did the geese go?").run();
    assert_eq!(reused(&other).0, 0);
    assert_eq!(std::fs::read_dir(cache.path()).expect("dir").count(), 2);
}

/// Entries are opened without blocking and without following links, only as regular files, and
/// their size is checked before they are read: a FIFO does not hang the run, a link to a file
/// outside the cache is neither read nor touched, a folder is warned about once and rebuilt, a
/// sparse entry padded to 4 GiB is refused without being read, and leftover temporary files are
/// counted against the limit and cleaned.
#[test]
fn hostile_entries_are_refused_without_hanging_reading_or_following_links() {
    let cache = tempfile::tempdir().expect("tempdir");
    let model = test_model();
    let question = "Where did the geese go?";
    assert_eq!(reused(&cached(&model, cache.path(), &[], question).run()).0, 0);
    let file = files(cache.path()).pop().expect("a cache file");
    let folder = file.parent().expect("the model's folder").to_owned();
    let good = std::fs::read(&file).expect("read");
    let refused = |why: &str| {
        let out = cached(&model, cache.path(), &[], question).run_within(std::time::Duration::from_secs(60));
        let err = out.stderr();
        assert!(err.contains("warning: prompt cache: ignoring") && err.contains(why), "{why}: {err}");
        assert_eq!(reused(&out).0, 0, "{why}: nothing is trusted");
        assert_eq!(std::fs::read(&file).expect("rebuilt"), good, "{why}: rebuilt as a regular file");
    };

    std::fs::remove_file(&file).expect("remove");
    let made = std::process::Command::new("mkfifo").arg(&file).status().expect("mkfifo");
    assert!(made.success());
    refused("not a regular file");

    let outside = tempfile::NamedTempFile::new().expect("outside");
    std::fs::write(outside.path(), &good).expect("write");
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .append(true)
        .open(outside.path())
        .and_then(|f| f.set_modified(old))
        .expect("age");
    std::fs::remove_file(&file).expect("remove");
    std::os::unix::fs::symlink(outside.path(), &file).expect("symlink");
    refused("symbolic link");
    let meta = std::fs::metadata(outside.path()).expect("outside");
    assert_eq!(meta.modified().expect("mtime"), old, "a file outside the cache was touched");

    std::fs::remove_file(&file).expect("remove");
    std::fs::create_dir(&file).expect("mkdir");
    refused("not a regular file");
    let again = cached(&model, cache.path(), &[], question).run();
    assert!(!again.stderr().contains("warning"), "warned again: {}", again.stderr());
    assert!(reused(&again).0 > 0);

    std::fs::File::options().append(true).open(&file).and_then(|f| f.set_len(4 << 30)).expect("pad");
    refused("padded");

    // An interrupted write's leftover, an hour old, is removed; a fresh one (a write under way)
    // counts against the limit.
    let stale = folder.join("x.kv.1.0.tmp");
    std::fs::write(&stale, b"left over").expect("write");
    std::fs::File::options().append(true).open(&stale).and_then(|f| f.set_modified(old)).expect("age");
    let fresh = folder.join("y.kv.2.0.tmp");
    std::fs::write(&fresh, &good).expect("write");
    let max = format!("{}", good.len() * 3 / 2);
    let out = cached(&model, cache.path(), &["--prompt-cache-max", &max], "When did the river rise?").run();
    out.assert_success();
    assert!(!stale.exists(), "the stale temporary file is still there");
    assert!(fresh.exists(), "a write under way was removed");
    // Two entries and the write under way make three entries' worth against room for 1.5: both
    // entries go (without counting the temporary file, one would stay).
    assert!(files(cache.path()).is_empty(), "the temporary file was not counted: {:?}", files(cache.path()));
}
