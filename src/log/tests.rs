use super::*;

fn new(prompt: &str, conversation: Option<i64>) -> NewExchange {
    NewExchange {
        conversation,
        model: "m.gguf".into(),
        endpoint: None,
        template: Some("model".into()),
        system: Some("Be brief.".into()),
        prompt: prompt.into(),
        options: serde_json::json!({ "temperature": 0.0 }),
    }
}

fn ended(finish: &str) -> Ending {
    Ending { finish: finish.into(), prompt_tokens: Some(10), generated_tokens: Some(3), ..Ending::default() }
}

#[test]
fn a_conversation_is_its_turns_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = LogDb::open(&dir.path().join("a/b/logs.db")).expect("open");
    let (first, cid) = db.begin(&new("Hi", None)).expect("begin");
    db.update(first, "Hel", "").expect("update");
    db.finish(first, "Hello", "", &ended("eos")).expect("finish");
    let (other, other_cid) = db.begin(&new("Elsewhere", None)).expect("begin");
    db.finish(other, "x", "", &ended("eos")).expect("finish");
    assert_ne!(cid, other_cid);
    let (second, same) = db.begin(&new("And you?", Some(cid))).expect("begin");
    assert_eq!(same, cid);
    db.finish(second, "Fine", "", &ended("length")).expect("finish");
    assert_eq!(db.latest_conversation().expect("latest"), Some(cid));
    let history = db.history(cid).expect("history").expect("exists");
    assert_eq!(history.system.as_deref(), Some("Be brief."));
    let turns: Vec<(&str, &str)> =
        history.turns.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
    assert_eq!(turns, [("user", "Hi"), ("assistant", "Hello"), ("user", "And you?"), ("assistant", "Fine")]);
    assert!(db.history(999).expect("history").is_none());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("a/b/logs.db")), 0o600);
        assert_eq!(mode(&dir.path().join("a/b")), 0o700);
    }
}

#[test]
fn an_unfinished_exchange_is_interrupted_with_its_partial_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = LogDb::open(&dir.path().join("logs.db")).expect("open");
    let (id, _) = db.begin(&new("Count", None)).expect("begin");
    db.update(id, "1 2 3", "").expect("update");
    let rows = db.recent(3).expect("recent");
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].finish.as_str(), rows[0].answer.as_str()), ("interrupted", "1 2 3"));
}

#[test]
fn search_finds_words_literally_and_delete_removes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("logs.db");
    let db = LogDb::open(&path).expect("open");
    for (prompt, answer) in [("What's a rainbow?", "Light in \"drops\""), ("Name a fruit", "An apple")] {
        let (id, _) = db.begin(&new(prompt, None)).expect("begin");
        db.finish(id, answer, "", &ended("eos")).expect("finish");
    }
    // Query syntax in the text is taken literally.
    for query in ["what's", "\"drops\"", "rainbow\"", "(rainbow", "APPLE fruit"] {
        assert_eq!(db.search(query, 10).expect(query).len(), 1, "{query}");
    }
    assert!(db.search("banana", 10).expect("search").is_empty());
    assert!(db.search("  ", 10).expect("search").is_empty());
    let cid = db.search("rainbow", 1).expect("search")[0].conversation;
    assert_eq!(db.delete_conversation(cid).expect("delete"), 1);
    assert!(db.search("rainbow", 10).expect("search").is_empty(), "the index follows deletes");
    assert_eq!(db.recent(10).expect("recent").len(), 1);
    assert_eq!(db.delete_all().expect("delete all"), 1);
    assert!(db.recent(10).expect("recent").is_empty());
    // The readers' view.
    let read = LogDb::open_read(&path).expect("open read");
    assert!(read.latest_conversation().expect("latest").is_none());
}

#[test]
fn a_database_that_is_not_ours_is_refused_and_left_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Not SQLite at all.
    let junk = dir.path().join("junk.db");
    let bytes = b"this is not a database, and it is the user's file".repeat(100);
    std::fs::write(&junk, &bytes).expect("write");
    assert!(LogDb::open(&junk).is_err());
    assert_eq!(std::fs::read(&junk).expect("read"), bytes);
    // Another program's SQLite database.
    let other = dir.path().join("other.db");
    Connection::open(&other).and_then(|c| c.execute_batch("CREATE TABLE t (x)")).expect("other db");
    let before = std::fs::read(&other).expect("read");
    let err = LogDb::open(&other).expect_err("not a log");
    assert!(format!("{err:#}").contains("not a streamgen log"), "{err:#}");
    assert_eq!(std::fs::read(&other).expect("read"), before);
    // A newer streamgen's log.
    let newer = dir.path().join("newer.db");
    Connection::open(&newer).and_then(|c| c.execute_batch("PRAGMA user_version = 99")).expect("newer db");
    assert!(format!("{:#}", LogDb::open(&newer).expect_err("newer")).contains("newer streamgen"));
}

#[test]
fn the_path_follows_xdg_and_the_override() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    };
    assert_eq!(
        default_path(vars(&[("HOME", "/h")])),
        Some(PathBuf::from("/h/.local/state/streamgen/logs.db"))
    );
    assert_eq!(
        default_path(vars(&[("HOME", "/h"), ("XDG_STATE_HOME", "/s")])),
        Some(PathBuf::from("/s/streamgen/logs.db"))
    );
    assert_eq!(
        default_path(vars(&[("HOME", "/h"), ("XDG_STATE_HOME", "rel")])),
        Some(PathBuf::from("/h/.local/state/streamgen/logs.db")),
        "a relative XDG_STATE_HOME is ignored"
    );
    assert_eq!(
        default_path(vars(&[("HOME", "/h"), ("STREAMGEN_LOGS", "/x.db")])),
        Some(PathBuf::from("/x.db"))
    );
    assert_eq!(default_path(vars(&[])), None);
    assert!(enabled(false, vars(&[])));
    assert!(!enabled(true, vars(&[])));
    assert!(!enabled(false, vars(&[("STREAMGEN_LOG", "0")])));
    assert!(enabled(false, vars(&[("STREAMGEN_LOG", "1")])));
}
