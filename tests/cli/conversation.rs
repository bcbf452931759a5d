//! Conversations: the log every exchange is written to (parallel writers, a killed run, a log
//! that cannot be used), `-c`/`--cid` on the local engine and through a server, and `--logs`,
//! `--logs-search`, `--logs-delete`. The chat (`-i`) is driven through a pseudo-terminal.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::remote::server::{ApiServer, Part, Reply, chat, content};
use crate::support::{Done, streamgen, test_model_smollm2};

const GREEDY: [&str; 4] = ["--temperature", "0", "--seed", "1"];

const SYSTEM: &str = "You are a helpful assistant who knows a great deal about colors, paint, light \
    and the way people name the colors they see. You answer in one short sentence, with no \
    preamble and no list, and you never repeat the question. When two colors are compared, you \
    say which one is darker, lighter or brighter, and why, in plain words that a child would \
    understand.";

/// The log's exchanges, oldest first, as `--logs N --json` prints them.
fn logged(logs: &Path, n: usize) -> Vec<Value> {
    let out = streamgen().env("STREAMGEN_LOGS", logs).args(["--logs", &n.to_string(), "--json"]).run();
    out.assert_success();
    out.stdout().lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

fn warnings(out: &Done) -> Vec<String> {
    out.stderr().lines().filter(|l| l.starts_with("streamgen: warning:")).map(str::to_owned).collect()
}

#[test]
fn three_turns_via_continue_give_what_the_same_turns_in_one_prompt_give() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs.db");
    let cache = dir.path().join("cache");
    let turn = |extra: &[&str], prompt: &str| {
        let out = streamgen()
            .model(test_model_smollm2())
            .env("STREAMGEN_LOGS", &logs)
            .args(GREEDY)
            .args(["-n", "8", "--json", "--verbose-prompt", "--prompt-cache"])
            .arg(&cache)
            .args(extra)
            .arg(prompt)
            .run();
        out.assert_success();
        assert!(warnings(&out).is_empty(), "{out}");
        out
    };
    let text_of = |out: &Done| -> (String, u64) {
        let lines: Vec<Value> =
            out.stdout().lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
        let text: String = lines.iter().filter_map(|l| l["text"].as_str()).collect();
        let reused = lines.last().and_then(|l| l["reused_prompt_tokens"].as_u64()).expect("a summary");
        (text, reused)
    };
    let prompt_of = |out: &Done| -> String {
        let err = out.stderr();
        let start = err.find("prompt as given to the model:\n").expect("--verbose-prompt") + 30;
        let end = err.rfind("\nstreamgen: prompt token ids").expect("the token ids");
        err[start..end].to_owned()
    };
    // A system prompt long enough for the prompt cache to store the first turn (it skips
    // prompts of a few dozen tokens).
    let first = turn(&["-s", SYSTEM], "Name a color.");
    let (a1, _) = text_of(&first);
    let second = turn(&["-c"], "Name another one.");
    let (a2, reused2) = text_of(&second);
    let third = turn(&["-c"], "Which of the two is darker?");
    let (a3, reused3) = text_of(&third);
    assert!(!a1.is_empty() && !a2.is_empty() && !a3.is_empty());
    // The model saw the whole conversation, system prompt kept, turns in order.
    let rendered = prompt_of(&third);
    let mut at = 0;
    for part in [SYSTEM, "Name a color.", &a1, "Name another one.", &a2, "Which of the two is darker?"] {
        let found = rendered[at..]
            .find(part.trim())
            .unwrap_or_else(|| panic!("{part:?} not in order in {rendered:?}"));
        at += found + part.trim().len();
    }
    // The follow-ups started from the earlier turns' prompts in the prompt cache.
    assert!(reused2 > 0 && reused3 > reused2, "reused {reused2}, then {reused3}");
    // The same conversation as one prompt, computed afresh, gives the same answer.
    let fresh = streamgen()
        .model(test_model_smollm2())
        .args(GREEDY)
        .args(["--no-log", "-n", "8", "--json", "--raw", &rendered])
        .run();
    fresh.assert_success();
    assert_eq!(text_of(&fresh).0, a3, "{fresh}");
    // Three exchanges, one conversation.
    let rows = logged(&logs, 10);
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["conversation"] == rows[0]["conversation"]), "{rows:?}");
    assert_eq!(rows[2]["answer"], a3.as_str());
    assert_eq!(rows[2]["system"], SYSTEM);
}

#[test]
fn continuing_through_a_server_sends_the_earlier_turns_as_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs.db");
    let server = ApiServer::start(&["served"]);
    let run = |args: &[&str]| streamgen().endpoint(&server.url).env("STREAMGEN_LOGS", &logs).args(args).run();
    // The server echoes the user's text.
    assert_eq!(run(&["-s", "Be brief.", "first question"]).assert_success().stdout(), "first question");
    assert_eq!(run(&["-c", "second"]).assert_success().stdout(), "second");
    let posts = server.posts();
    let messages = &posts.last().expect("a POST").body["messages"];
    let roles: Vec<(&str, &str)> = messages
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (m["role"].as_str().unwrap_or(""), m["content"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        roles,
        [
            ("system", "Be brief."),
            ("user", "first question"),
            ("assistant", "first question"),
            ("user", "second")
        ]
    );
    // --cid picks a conversation; a new -s replaces the system prompt from then on.
    let cid = logged(&logs, 1)[0]["conversation"].as_i64().expect("a conversation id");
    run(&["fresh start"]).assert_success();
    run(&["--cid", &cid.to_string(), "-s", "Be kind.", "third"]).assert_success();
    let messages = server.posts().last().expect("a POST").body["messages"].clone();
    assert_eq!(messages.as_array().map(Vec::len), Some(6), "{messages}");
    assert_eq!(messages[0]["content"], "Be kind.");
    assert_eq!(messages[4]["content"], "second");
    // Mistakes.
    run(&["--raw", "-c", "x"]).assert_exit(2);
    run(&["--each-line", "-c", "x"]).assert_exit(2);
    let missing = run(&["--cid", "999", "x"]);
    missing.assert_exit(1);
    assert!(missing.stderr().contains("no conversation 999"), "{missing}");
    let empty = streamgen()
        .endpoint(&server.url)
        .env("STREAMGEN_LOGS", dir.path().join("none.db"))
        .args(["-c", "x"])
        .run();
    empty.assert_exit(1);
    assert!(empty.stderr().contains("no log at"), "{empty}");
}

#[test]
fn sixteen_parallel_runs_all_log_without_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("state/logs.db");
    let server = ApiServer::start(&["served"]);
    let runs: Vec<_> = (0..16)
        .map(|i| {
            streamgen()
                .endpoint(&server.url)
                .env("STREAMGEN_LOGS", &logs)
                .arg(format!("prompt number {i}"))
                .spawn()
        })
        .collect();
    for (i, run) in runs.into_iter().enumerate() {
        let out = run.finish();
        out.assert_success();
        assert_eq!(out.stdout(), format!("prompt number {i}"));
        assert!(out.stderr().is_empty(), "{out}");
    }
    let rows = logged(&logs, 100);
    assert_eq!(rows.len(), 16);
    let mut prompts: Vec<&str> = rows.iter().map(|r| r["prompt"].as_str().expect("prompt")).collect();
    prompts.sort_unstable();
    let mut want: Vec<String> = (0..16).map(|i| format!("prompt number {i}")).collect();
    want.sort_unstable();
    assert_eq!(prompts, want);
    assert!(rows.iter().all(|r| r["answer"] == r["prompt"] && r["finish"] != "interrupted"), "{rows:?}");
}

#[test]
fn a_killed_run_leaves_its_partial_answer_marked_interrupted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs.db");
    let server = ApiServer::start(&["served"]);
    // Half an answer, then a server that never goes on.
    server.script(vec![Reply::Stream(vec![content("Once upon"), content(" a time"), Part::Gate("never")])]);
    let mut run = streamgen().endpoint(&server.url).env("STREAMGEN_LOGS", &logs).arg("Tell a story").spawn();
    let mut stdout = run.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&seen).contains("a time") {
        let n = stdout.read(&mut buf).expect("read stdout");
        assert!(n > 0, "the run ended early: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // The answer reaches the log while it streams (the next batch, within a fraction of a
    // second, or longer on a loaded machine); then the run dies at once, as under `kill -9`.
    let start = Instant::now();
    let partial = || {
        let db =
            rusqlite::Connection::open_with_flags(&logs, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
        db.query_row("SELECT answer FROM exchanges", [], |r| r.get::<_, String>(0)).ok()
    };
    while partial().as_deref() != Some("Once upon a time") {
        assert!(start.elapsed() < Duration::from_secs(30), "the partial answer never reached the log");
        std::thread::sleep(Duration::from_millis(50));
    }
    run.kill().expect("kill");
    run.finish();
    let rows = logged(&logs, 1);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["finish"], "interrupted");
    assert_eq!(rows[0]["answer"], "Once upon a time");
    server.open_gate("never");
}

#[test]
fn a_log_that_cannot_be_used_is_a_warning_and_the_answer_still_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ApiServer::start(&["served"]);
    let run = |logs: &Path| streamgen().endpoint(&server.url).env("STREAMGEN_LOGS", logs).arg("hello").run();
    let check = |out: &Done, needle: &str| {
        out.assert_success();
        assert_eq!(out.stdout(), "hello");
        let warned = warnings(out);
        assert_eq!(warned.len(), 1, "one warning: {out}");
        assert!(warned[0].contains(needle), "{needle:?}: {out}");
    };
    // A file that is not a database: left exactly as it was.
    let corrupt = dir.path().join("corrupt.db");
    let bytes = b"SQLite format 3\0 but not really; the user's bytes".repeat(200);
    std::fs::write(&corrupt, &bytes).expect("write");
    check(&run(&corrupt), "corrupt.db");
    assert_eq!(std::fs::read(&corrupt).expect("read"), bytes);
    // A path that cannot be made (its folder is a file).
    let blocked = dir.path().join("a-file");
    std::fs::write(&blocked, "x").expect("write");
    check(&run(&blocked.join("logs.db")), "cannot create");
    // A database another program holds locked for writing: the run waits a while, then warns;
    // the log keeps what it had.
    let locked = dir.path().join("locked.db");
    run(&locked).assert_success();
    let holder = rusqlite::Connection::open(&locked).expect("open");
    holder.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    check(&run(&locked), "locked");
    holder.execute_batch("COMMIT").expect("unlock");
    drop(holder);
    assert_eq!(logged(&locked, 10).len(), 1);
    // A log the user made read-only: a warning, and not a byte changes (even for root, who
    // could write it).
    let read_only = dir.path().join("read-only.db");
    run(&read_only).assert_success();
    let before = std::fs::read(&read_only).expect("read");
    let mut perms = std::fs::metadata(&read_only).expect("metadata").permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&read_only, perms).expect("chmod");
    check(&run(&read_only), "read-only");
    assert_eq!(std::fs::read(&read_only).expect("read"), before);
    assert_eq!(logged(&read_only, 10).len(), 1);
    // Logging off: nothing is made.
    let off = dir.path().join("off.db");
    streamgen()
        .endpoint(&server.url)
        .env("STREAMGEN_LOGS", &off)
        .args(["--no-log", "x"])
        .run()
        .assert_success();
    streamgen()
        .endpoint(&server.url)
        .env("STREAMGEN_LOGS", &off)
        .env("STREAMGEN_LOG", "0")
        .arg("x")
        .run()
        .assert_success();
    assert!(!off.exists());
}

#[test]
fn logs_are_printed_searched_and_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs.db");
    let server = ApiServer::start(&["served"]);
    let run = |args: &[&str]| streamgen().endpoint(&server.url).env("STREAMGEN_LOGS", &logs).args(args).run();
    for prompt in ["a question about rainbows", "one about apples", "and pears", "the last one"] {
        run(&[prompt]).assert_success();
    }
    // The default is the last three, as text.
    let text = run(&["--logs"]).assert_success().stdout();
    assert_eq!(text.matches("## exchange").count(), 3, "{text}");
    assert!(
        !text.contains("rainbows") && text.contains("> one about apples") && text.contains("the last one")
    );
    assert_eq!(logged(&logs, 10).len(), 4);
    let found = run(&["--logs-search", "APPLES", "--json"]).assert_success().stdout();
    assert_eq!(found.lines().count(), 1, "{found}");
    let row: Value = serde_json::from_str(found.trim()).expect("JSON");
    assert_eq!(row["answer"], "one about apples");
    assert_eq!(row["finish"], "eos");
    assert!(row["options"]["temperature"].is_number(), "{row}");
    assert!(row["endpoint"].as_str().is_some_and(|e| e.starts_with("http://127.0.0.1")), "{row}");
    let cid = row["conversation"].as_i64().expect("conversation").to_string();
    run(&["--logs-delete", &cid]).assert_success();
    assert!(run(&["--logs-search", "apples"]).assert_success().stdout().is_empty());
    assert_eq!(logged(&logs, 10).len(), 3);
    run(&["--logs-delete"]).assert_exit(2);
    run(&["--logs", "x"]).assert_exit(2);
    run(&["--logs-delete", "--all"]).assert_success();
    assert!(logged(&logs, 10).is_empty());
}

/// A program run under a pseudo-terminal (util-linux `script`): what it shows, read as it
/// comes, and keys typed at it.
struct Terminal {
    child: std::process::Child,
    input: std::process::ChildStdin,
    output: std::sync::mpsc::Receiver<Vec<u8>>,
    screen: String,
}

impl Terminal {
    /// Runs the shell command `cmd` (which should `exec` the program: the shell `script`
    /// starts must not stay between, as dash ends itself on a Ctrl-C its child handled) with
    /// HOME at `home`, the log at `logs` and only PATH and TERM besides.
    fn start(cmd: &str, home: &Path, logs: &Path) -> Self {
        use std::process::{Command, Stdio};
        let mut child = Command::new("script")
            .args(["-qefc", cmd, "/dev/null"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", home)
            .env("TERM", "xterm")
            .env("STREAMGEN_LOGS", logs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run `script` (util-linux) to get a pseudo-terminal");
        let input = child.stdin.take().expect("stdin");
        let mut out = child.stdout.take().expect("stdout");
        let (tx, output) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Self { child, input, output, screen: String::new() }
    }

    /// Waits up to `limit` for `needle` to have been shown `count` times; the screen so far.
    fn wait_for(&mut self, needle: &str, count: usize, limit: Duration) -> String {
        let start = Instant::now();
        while self.screen.matches(needle).count() < count {
            assert!(start.elapsed() < limit, "waiting for {needle:?} in {:?}", self.screen);
            if let Ok(bytes) = self.output.recv_timeout(Duration::from_millis(100)) {
                self.screen.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        self.screen.clone()
    }

    fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.input.write_all(bytes).expect("write to the terminal");
        self.input.flush().expect("flush");
    }
}

/// The chat under a pseudo-terminal (util-linux `script`): a question is answered, Ctrl-C
/// stops an answer and the chat goes on, Ctrl-D leaves, and `-c` continues it afterwards.
#[test]
fn the_chat_answers_stops_on_ctrl_c_and_leaves_on_ctrl_d() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs.db");
    let server = ApiServer::start(&["served"]);
    // The second answer hangs half way until Ctrl-C.
    server.script(vec![
        chat(&["It is blue."]),
        Reply::Stream(vec![content("Let me think"), Part::Gate("never")]),
        chat(&["Still here."]),
    ]);
    let cmd = format!("exec '{}' --endpoint '{}' -i", env!("CARGO_BIN_EXE_streamgen"), server.url);
    let mut chat = Terminal::start(&cmd, dir.path(), &logs);
    let limit = Duration::from_secs(30);
    chat.wait_for(">>> ", 1, limit);
    chat.send(b"What color is the sky?\r");
    chat.wait_for("It is blue.", 1, limit);
    chat.wait_for(">>> ", 2, limit);
    chat.send(b"Why?\r");
    chat.wait_for("Let me think", 1, limit);
    chat.send(b"\x03");
    chat.wait_for(">>> ", 3, limit);
    chat.send(b"And now?\r");
    chat.wait_for("Still here.", 1, limit);
    chat.wait_for(">>> ", 4, limit);
    chat.send(b"\x04");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = chat.child.try_wait().expect("wait") {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "Ctrl-D did not end the chat: {:?}", chat.screen);
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}: {:?}", chat.screen);
    server.open_gate("never");
    // Every turn went to the server with the ones before it, and into the log as one
    // conversation; the interrupted answer is the part that was shown.
    let posts = server.posts();
    assert_eq!(posts.len(), 3);
    assert_eq!(posts[2].body["messages"].as_array().map(Vec::len), Some(5), "{:?}", posts[2].body);
    assert_eq!(posts[2].body["messages"][3]["content"], "Let me think");
    let rows = logged(&logs, 10);
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["conversation"] == rows[0]["conversation"]), "{rows:?}");
    assert_eq!(rows[1]["finish"], "interrupted");
    // -c picks the chat up.
    let out = streamgen().endpoint(&server.url).env("STREAMGEN_LOGS", &logs).args(["-c", "Bye"]).run();
    out.assert_success();
    assert_eq!(server.posts().last().expect("a POST").body["messages"].as_array().map(Vec::len), Some(7));
}

/// The chat on the local engine keeps the conversation's keys and values between turns: the
/// second turn computes only what is new (its `--stats` line reports the rest as reused).
#[test]
fn the_local_chat_keeps_the_conversation_in_memory_between_turns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cmd = format!(
        "exec '{}' -m '{}' --no-prompt-cache --temperature 0 -n 6 --stats -i",
        env!("CARGO_BIN_EXE_streamgen"),
        test_model_smollm2().display()
    );
    let mut chat = Terminal::start(&cmd, dir.path(), &dir.path().join("logs.db"));
    let limit = Duration::from_secs(60);
    chat.wait_for(">>> ", 1, limit);
    chat.send(b"Name a color.\r");
    chat.wait_for("finish", 1, limit);
    chat.send(b"Name another one.\r");
    let screen = chat.wait_for("finish", 2, limit);
    chat.send(b"\x04");
    drop(chat.input);
    assert!(chat.child.wait().expect("wait").success(), "{screen:?}");
    let stats: Vec<&str> = screen.lines().filter(|l| l.contains("streamgen: prompt ")).collect();
    assert_eq!(stats.len(), 2, "{screen:?}");
    assert!(!stats[0].contains("reused"), "{}", stats[0]);
    let reused: usize = stats[1]
        .split(" tokens (")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no reused count in {:?}", stats[1]));
    let prompt: usize = stats[1]
        .split("prompt ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the prompt's token count");
    // Everything but the new turn (and the one token whose logits are needed).
    assert!(reused > prompt / 2 && reused < prompt, "{}", stats[1]);
}

#[test]
fn each_line_logs_every_line_as_an_exchange_of_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs.db");
    let server = ApiServer::start(&["served"]);
    let out = streamgen()
        .endpoint(&server.url)
        .env("STREAMGEN_LOGS", &logs)
        .args(["--each-line", "--parallel", "2", "Echo:"])
        .stdin("one\n\ntwo\nthree\n")
        .run();
    out.assert_success();
    assert!(warnings(&out).is_empty(), "{out}");
    let rows = logged(&logs, 10);
    // The empty line is answered with an empty line, and is no exchange.
    let prompts: Vec<&str> = rows.iter().map(|r| r["prompt"].as_str().expect("prompt")).collect();
    assert_eq!(prompts, ["Echo:\n\none", "Echo:\n\ntwo", "Echo:\n\nthree"]);
    assert!(rows.iter().all(|r| r["answer"] == r["prompt"] && r["finish"] == "eos"), "{rows:?}");
    let mut conversations: Vec<i64> = rows.iter().filter_map(|r| r["conversation"].as_i64()).collect();
    conversations.dedup();
    assert_eq!(conversations.len(), 3, "each line is a conversation of its own: {rows:?}");
}
