//! The prompt cache: on by default in the XDG cache folder; a second question about the same
//! piped document skips the document and answers exactly as without the cache; prompts are
//! stored as a trie of chunks (a shared beginning once); damaged, foreign or outdated files
//! are ignored with a warning and rebuilt; the folder stays under its size limit and is the
//! user's alone; a cache that cannot be written costs a warning, never the answer.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::support::{Done, TestCommand, streamgen, test_model, test_model_smollm2};

/// A document of about 340 tokens (two chunks: one whole, one partial).
fn document() -> String {
    "The river rose in the night and the farmers moved their geese to the hill. ".repeat(20)
}

/// The raw prompt: the document, then a question.
fn prompt(question: &str) -> String {
    format!("{}\nQuestion: {question}", document())
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

/// Every chunk file under `cache` (all models), sorted.
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

/// The chunk file that holds the prompt's first positions (its parent is the empty prefix).
fn first_chunk(cache: &Path) -> PathBuf {
    let first: Vec<PathBuf> = files(cache)
        .into_iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&"0".repeat(32))))
        .collect();
    assert_eq!(first.len(), 1, "one first chunk: {first:?}");
    first[0].clone()
}

#[test]
fn a_second_question_about_a_piped_document_reuses_it_by_default_and_answers_the_same() {
    for model in [test_model_smollm2(), test_model()] {
        let home = tempfile::tempdir().expect("home");
        let ask = |question: &str, args: &[&str]| {
            streamgen()
                .model(&model)
                .home(home.path())
                .args(["-n", "12", "--temperature", "0"])
                .args(args)
                .arg(question)
                .stdin(document())
                .run()
        };
        let json = |q: &str| ask(q, &["--json"]);
        assert_eq!(reused(&json("Where did the geese go?")).0, 0, "an empty cache has nothing");
        let cache = home.path().join(".cache/streamgen/prompts");
        assert!(!files(&cache).is_empty(), "nothing stored in {}", cache.display());
        let (n, total) = reused(&json("When did the river rise?"));
        assert!(n > 300 && n < total, "reused {n} of {total}");
        let stats = ask("When did the river rise?", &["--stats"]);
        assert!(stats.assert_success().stderr().contains(" reused)"), "{}", stats.stderr());

        // Bit for bit the answer of a run that computes the whole prompt.
        for q in ["When did the river rise?", "Who moved the geese, and why?"] {
            let warm = ask(q, &[]);
            let cold = ask(q, &["--no-prompt-cache"]);
            assert_eq!(warm.assert_success().stdout(), cold.assert_success().stdout(), "{q}");
        }
    }
}

/// Gemma 3 keeps its sliding-window layers' last 1,024 positions only (window and slack), so
/// by the end of a 1,600-token document they no longer hold its first chunks: those are stored
/// as the prompt is fed, and the next question still reuses the whole document, bit for bit.
#[test]
fn a_document_longer_than_the_sliding_windows_is_reused_and_answers_the_same() {
    let home = tempfile::tempdir().expect("home");
    let long = document().repeat(5);
    let ask = |question: &str, args: &[&str]| {
        streamgen()
            .model(test_model())
            .home(home.path())
            .args(["-n", "8", "--temperature", "0", "--raw"])
            .args(args)
            .arg(format!("{long}\nQuestion: {question}"))
            .stdin("")
            .run()
    };
    let (n, total) = reused(&ask("Where did the geese go?", &["--json"]));
    assert!(n == 0 && total > 1500, "reused {n} of {total}");
    let (n, total) = reused(&ask("When did the river rise?", &["--json"]));
    assert!(n > 1500 && n < total, "reused {n} of {total}");
    let warm = ask("Who moved the geese?", &[]);
    let cold = ask("Who moved the geese?", &["--no-prompt-cache"]);
    assert_eq!(warm.assert_success().stdout(), cold.assert_success().stdout());
}

/// The logits themselves, not only the greedy answer, are those of a run without the cache:
/// Gemma 3's window layers once summed a resumed prompt's attention in a different order (its
/// batch started elsewhere), which this text of 600 pseudo-random words brought out in the
/// log-probabilities.
#[test]
fn a_resumed_prompt_has_the_log_probabilities_of_a_whole_run() {
    let words = "the river rose in night and farmers moved their geese to hill while old mill stood quiet \
                 under grey sky";
    let words: Vec<&str> = words.split_whitespace().collect();
    let mut x: u64 = 1;
    let text: Vec<&str> = (0..600)
        .map(|_| {
            x = (x * 1_103_515_245 + 12_345) % (1 << 31);
            words[(x >> 16) as usize % words.len()]
        })
        .collect();
    let text = text.join(" ");
    let cache = tempfile::tempdir().expect("cache");
    let run = |question: &str, cache_args: &[&str]| {
        let out = streamgen()
            .model(test_model())
            .args(["--raw", "-n", "4", "--temperature", "0", "--json", "--logprobs", "3"])
            .args(cache_args)
            .arg(format!("{text}\n\n{question}"))
            .stdin("")
            .run();
        // The token lines, without the summary (its timings).
        let stdout = out.assert_success().stdout();
        stdout.lines().filter(|l| l.contains("\"logprob\"")).map(String::from).collect::<Vec<_>>()
    };
    let dir = cache.path().to_str().expect("a UTF-8 path");
    run("one", &["--prompt-cache", dir]);
    let warm = run("two fish", &["--prompt-cache", dir]);
    let cold = run("two fish", &["--no-prompt-cache"]);
    assert_eq!(warm.len(), 4);
    assert_eq!(warm, cold);
}

#[test]
fn piped_material_comes_before_the_words_but_each_line_keeps_the_instruction_first() {
    let shown = |cmd: TestCommand| -> String {
        let out = cmd.args(["--raw", "-n", "0", "--verbose-prompt"]).run();
        let err = out.assert_success().stderr();
        let start = err.find("prompt as given to the model:\n").expect("the prompt") + 30;
        err[start..].split("\nstreamgen: prompt token ids").next().expect("the prompt").to_string()
    };
    let model = test_model();
    assert_eq!(shown(streamgen().model(&model).args(["Who", "signed?"]).stdin("")), "Who signed?");
    assert_eq!(shown(streamgen().model(&model).stdin("The report.\n")), "The report.");
    assert_eq!(
        shown(streamgen().model(&model).args(["Who", "signed?"]).stdin("The report.\n")),
        "The report.\n\nWho signed?"
    );
    let out = streamgen()
        .model(&model)
        .args(["--raw", "-n", "0", "--verbose-prompt", "--each-line", "Translate:"])
        .stdin("one\ntwo\n")
        .run();
    let err = out.assert_success().stderr();
    for line in ["one", "two"] {
        assert!(err.contains(&format!("Translate:\n\n{line}")), "{err}");
    }
}

#[test]
fn prompts_sharing_a_beginning_share_its_chunks_and_an_extension_replaces_the_shorter_one() {
    let cache = tempfile::tempdir().expect("tempdir");
    let model = test_model();
    let first = cached(&model, cache.path(), &[], "Where did the geese go?").run();
    assert_eq!(reused(&first).0, 0);
    // About 340 tokens: one whole chunk of 256 and one of the rest.
    assert_eq!(files(cache.path()).len(), 2, "{:?}", files(cache.path()));
    let second = cached(&model, cache.path(), &[], "When did the river rise?").run();
    let (n, total) = reused(&second);
    assert!(n > 300 && n < total, "reused {n} of {total}");
    assert_eq!(files(cache.path()).len(), 3, "the first chunk is shared: {:?}", files(cache.path()));
    // The same prompt again reuses all but what the batched kernels must compute.
    let again = cached(&model, cache.path(), &[], "When did the river rise?").run();
    let (n, total) = reused(&again);
    assert!(n + 32 >= total && n < total, "reused {n} of {total}");
    // A prompt that extends one by a few tokens reuses it token by token, and its chunk
    // replaces the shorter one it extends.
    let longer = cached(&model, cache.path(), &[], "When did the river rise? And the sun?").run();
    assert!(reused(&longer).0 > 300);
    assert_eq!(files(cache.path()).len(), 3, "{:?}", files(cache.path()));
}

#[test]
fn no_prompt_cache_and_off_read_and_write_nothing() {
    let model = test_model();
    for (args, env) in [(&["--no-prompt-cache"][..], None), (&[][..], Some("off"))] {
        let home = tempfile::tempdir().expect("home");
        for _ in 0..2 {
            let mut cmd = streamgen()
                .model(&model)
                .home(home.path())
                .args(["--raw", "--json", "-n", "2", "--temperature", "0"])
                .args(args)
                .arg(prompt("Where did the geese go?"));
            if let Some(v) = env {
                cmd = cmd.env("STREAMGEN_PROMPT_CACHE", v);
            }
            assert_eq!(reused(&cmd.run()).0, 0);
        }
        assert!(!home.path().join(".cache/streamgen").exists(), "{args:?} {env:?}");
    }
    // XDG_CACHE_HOME moves it.
    let home = tempfile::tempdir().expect("home");
    let xdg = tempfile::tempdir().expect("xdg");
    let out = streamgen()
        .model(&model)
        .home(home.path())
        .env("XDG_CACHE_HOME", xdg.path())
        .args(["--raw", "-n", "2", "--temperature", "0"])
        .arg(prompt("Where did the geese go?"))
        .run();
    out.assert_success();
    assert!(!files(&xdg.path().join("streamgen/prompts")).is_empty());
    assert!(!home.path().join(".cache/streamgen").exists());
}

#[test]
fn a_cache_that_cannot_be_written_is_a_warning_and_the_answer_still_streams() {
    let model = test_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let blocker = dir.path().join("a file");
    std::fs::write(&blocker, b"not a folder").expect("write");
    let out = cached(&model, &blocker, &[], "Where did the geese go?").run();
    let err = out.stderr();
    assert!(err.contains("warning: prompt cache: cannot save the prompt"), "{err}");
    assert_eq!(err.lines().filter(|l| l.contains("warning")).count(), 1, "{err}");
    assert_eq!(reused(&out).1, reused(&cached(&model, dir.path(), &[], "Where did the geese go?").run()).1);
    assert_eq!(std::fs::read(&blocker).expect("read"), b"not a folder", "the file was touched");
}

#[test]
fn damaged_foreign_and_outdated_files_are_ignored_and_rebuilt() {
    let cache = tempfile::tempdir().expect("tempdir");
    let model = test_model();
    let question = "Where did the geese go?";
    assert_eq!(reused(&cached(&model, cache.path(), &[], question).run()).0, 0);
    let file = first_chunk(cache.path());
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
fn the_cache_stays_under_its_size_limit_is_private_and_models_do_not_mix() {
    let cache = tempfile::tempdir().expect("tempdir");
    let model = test_model();
    cached(&model, cache.path(), &[], "Where did the geese go?").run();
    let stored: u64 = files(cache.path()).iter().map(|f| std::fs::metadata(f).expect("size").len()).sum();
    for f in files(cache.path()) {
        let mode = std::fs::metadata(&f).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
        let dir = std::fs::metadata(f.parent().expect("folder")).expect("meta").permissions().mode() & 0o777;
        assert_eq!(dir, 0o700);
    }
    // Room for one prompt and a bit: each new document evicts the least recently used chunks,
    // and the chunks that followed them.
    let max = stored * 5 / 4;
    for q in ["When did the river rise?", "Who moved the geese?"] {
        let other = format!("Another document. {q}");
        let out = streamgen()
            .model(&model)
            .args(["--raw", "--json", "-n", "1", "--prompt-cache"])
            .arg(cache.path())
            .args(["--prompt-cache-max", &max.to_string()])
            .arg(format!("{other}\n{}", prompt(q)))
            .run();
        out.assert_success();
        let now: u64 = files(cache.path()).iter().map(|f| std::fs::metadata(f).expect("size").len()).sum();
        assert!(now <= max, "after {q:?}: {now} > {max}");
        let _ = first_chunk(cache.path());
    }
    // Another model's entries live in their own folder and are never offered to this one.
    let other = cached(&test_model_smollm2(), cache.path(), &[], "Where did the geese go?").run();
    assert_eq!(reused(&other).0, 0);
    assert_eq!(std::fs::read_dir(cache.path()).expect("dir").count(), 2);
}

/// Chunks are opened without blocking and without following links, only as regular files, and
/// their size is checked before they are read: a FIFO does not hang the run, a link to a file
/// outside the cache is neither read nor touched, a folder is warned about once and rebuilt, a
/// sparse chunk padded to 4 GiB is refused without being read, and leftover temporary files are
/// counted against the limit and cleaned.
#[test]
fn hostile_entries_are_refused_without_hanging_reading_or_following_links() {
    let cache = tempfile::tempdir().expect("tempdir");
    let model = test_model();
    let question = "Where did the geese go?";
    assert_eq!(reused(&cached(&model, cache.path(), &[], question).run()).0, 0);
    let file = first_chunk(cache.path());
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
    let stored: u64 = files(cache.path()).iter().map(|f| std::fs::metadata(f).expect("size").len()).sum();
    std::fs::File::create(&fresh).and_then(|f| f.set_len(stored)).expect("write");
    let max = format!("{}", stored * 3 / 2);
    let out = cached(&model, cache.path(), &["--prompt-cache-max", &max], "When did the river rise?").run();
    out.assert_success();
    assert!(!stale.exists(), "the stale temporary file is still there");
    assert!(fresh.exists(), "a write under way was removed");
    // The stored prompt, the new one's chunk and the write under way make more than room for
    // 1.5 prompts: the chunks go, least recently used first (without counting the temporary
    // file, all would stay).
    assert!(files(cache.path()).len() < 3, "the temporary file was not counted: {:?}", files(cache.path()));
}
