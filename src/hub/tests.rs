//! Unit tests of the Hub module: model specs, file choice, the environment, small helpers.

use std::ffi::OsString;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use super::cache::is_commit_hash;
use super::client::backoff;
use super::spec::quant_matches;
use super::*;
use crate::net::origin;

fn hub(spec: &str) -> HubSpec {
    match ModelSpec::parse(spec) {
        Ok(ModelSpec::Hub(h)) => h,
        other => panic!("{spec}: expected a Hub spec, got {other:?}"),
    }
}

#[test]
fn parses_hub_specs() {
    assert_eq!(
        hub("ggml-org/gemma-3-270m-it-GGUF"),
        HubSpec {
            repo: "ggml-org/gemma-3-270m-it-GGUF".into(),
            revision: "main".into(),
            file: FileChoice::Auto
        }
    );
    let h = hub("o/r:q8_0@v1.0");
    assert_eq!((h.file, h.revision.as_str()), (FileChoice::Quant("q8_0".into()), "v1.0"));
    let h = hub("o/r@refs/pr/1:Q4_K_M");
    assert_eq!((h.file, h.revision.as_str()), (FileChoice::Quant("Q4_K_M".into()), "refs/pr/1"));
    let h = hub("o/r/sub/dir/m.GGUF@0123456789abcdef0123456789abcdef01234567");
    assert_eq!(h.file, FileChoice::Path("sub/dir/m.GGUF".into()));
    assert!(is_commit_hash(&h.revision));
    assert_eq!(hub(DEFAULT_MODEL).file, FileChoice::Path("gemma-3-270m-it-Q8_0.gguf".into()));
    assert_eq!(hub("o/r/f.gguf@dev").to_string(), "o/r/f.gguf@dev");
}

#[test]
fn local_looking_specs_never_reach_the_hub() {
    for spec in ["/nope/m.gguf", "./m.gguf", "../m.gguf", "~/m.gguf", "m.gguf", "dir/m.gguf"] {
        assert!(
            matches!(ModelSpec::parse(spec), Err(HubError::LocalMissing(_))),
            "{spec}: {:?}",
            ModelSpec::parse(spec)
        );
    }
    let err = ModelSpec::parse("./missing.gguf").expect_err("missing file");
    assert!(err.to_string().starts_with("model file not found: ./missing.gguf"), "{err}");
}

#[test]
fn an_existing_file_wins_over_the_hub_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("o/r/m.gguf");
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(&path, b"GGUF").expect("write");
    let spec = path.to_str().expect("utf-8 path");
    assert_eq!(ModelSpec::parse(spec).expect("parse"), ModelSpec::Local(path.clone()));
    assert!(matches!(ModelSpec::parse(dir.path().to_str().expect("utf-8")), Err(HubError::BadSpec { .. })));
}

#[test]
fn rejects_malformed_specs() {
    for spec in [
        "",
        "justaname",
        "o/r:",
        "o/r:Q4 K",
        "o/r/file.bin",
        "o/r/../x.gguf",
        "o w/r",
        "o/r@",
        "o/r@a/../b",
        "o/r/f.gguf:Q8_0",
    ] {
        assert!(
            matches!(ModelSpec::parse(spec), Err(HubError::BadSpec { .. })),
            "{spec}: {:?}",
            ModelSpec::parse(spec)
        );
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn selects_the_gguf_file() {
    let files = names(&[
        "README.md",
        "m-Q2_K.gguf",
        "m-Q4_K_M.gguf",
        "m-Q4_K.gguf",
        "m-Q8_0.gguf",
        "mmproj-m-f16.gguf",
    ]);
    assert_eq!(select_gguf("o/r", &files, None).expect("auto"), "m-Q4_K_M.gguf");
    assert_eq!(select_gguf("o/r", &files, Some("q8_0")).expect("q8"), "m-Q8_0.gguf");
    assert_eq!(select_gguf("o/r", &files, Some("Q4_K")).expect("q4_k"), "m-Q4_K.gguf");
    let err = select_gguf("o/r", &files, Some("Q5_K_M")).expect_err("absent quant");
    assert!(matches!(&err, HubError::NotFound { available: Some(a), .. } if a.len() == 5), "{err}");
    assert!(err.to_string().contains("the repo has: m-Q2_K.gguf, m-Q4_K_M.gguf"), "{err}");

    let only_q8 = names(&["a/m-Q8_0.gguf", "m-F16.gguf"]);
    assert_eq!(select_gguf("o/r", &only_q8, None).expect("q8"), "a/m-Q8_0.gguf");
    let single = names(&["weird-name.gguf", "mmproj.gguf", "config.json"]);
    assert_eq!(select_gguf("o/r", &single, None).expect("single"), "weird-name.gguf");

    let ambiguous = names(&["m-Q2_K.gguf", "m-Q3_K_S.gguf"]);
    let err = select_gguf("o/r", &ambiguous, None).expect_err("ambiguous");
    assert_eq!(
        err.to_string(),
        "o/r: cannot choose among its .gguf files: name one as o/r:QUANT or o/r/FILE (choices: m-Q2_K.gguf, m-Q3_K_S.gguf)"
    );
    let twice = names(&["a/m-Q8_0.gguf", "b/m-Q8_0.gguf"]);
    assert!(matches!(select_gguf("o/r", &twice, Some("Q8_0")), Err(HubError::Ambiguous { .. })));
    assert!(matches!(select_gguf("o/r", &names(&["x.bin"]), None), Err(HubError::NotFound { .. })));
}

#[test]
fn reads_the_environment_like_huggingface_hub() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("hfhome");
    fs::create_dir_all(&home).expect("mkdir");
    fs::write(home.join("token"), "hf_file\n").expect("token");
    let vars = |pairs: Vec<(&'static str, OsString)>| {
        move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
    };

    let env = HubEnv::from_vars(vars(vec![("HOME", "/home/u".into())]));
    assert_eq!(env.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
    assert_eq!((env.endpoint.as_str(), env.offline, env.token.as_deref()), (DEFAULT_ENDPOINT, false, None));

    let env = HubEnv::from_vars(vars(vec![
        ("HF_HOME", home.clone().into()),
        ("HF_ENDPOINT", "http://127.0.0.1:9/".into()),
        ("HF_HUB_OFFLINE", "TRUE".into()),
    ]));
    assert_eq!(env.cache_dir, home.join("hub"));
    assert_eq!(env.endpoint, "http://127.0.0.1:9");
    assert_eq!(env.token.as_deref(), Some("hf_file"));
    assert!(env.offline);

    let env = HubEnv::from_vars(vars(vec![
        ("HF_HOME", home.clone().into()),
        ("HF_HUB_CACHE", "/c".into()),
        ("HF_TOKEN", "hf_env".into()),
        ("HF_HUB_OFFLINE", "0".into()),
    ]));
    assert_eq!(
        (env.cache_dir, env.token.as_deref(), env.offline),
        (PathBuf::from("/c"), Some("hf_env"), false)
    );

    let env = HubEnv::from_vars(vars(vec![("HOME", "/h".into()), ("XDG_CACHE_HOME", "/x".into())]));
    assert_eq!(env.cache_dir, PathBuf::from("/x/huggingface/hub"));
}

#[test]
fn small_helpers() {
    assert_eq!(origin("https://huggingface.co/o/r/resolve/main/f"), "https://huggingface.co");
    assert_eq!(origin("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
    assert!(quant_matches("x/gemma-3-270m-it-Q8_0.gguf", "q8_0"));
    assert!(quant_matches("Model.Q4_K_M.gguf", "Q4_K_M"));
    assert!(!quant_matches("m-Q4_K_M.gguf", "4_K_M"));
    assert!(!quant_matches("m-Q4_K_M.gguf", "Q4_K"));
    assert_eq!(backoff(1), Duration::from_millis(250));
    assert_eq!(backoff(4), Duration::from_secs(2));
}
