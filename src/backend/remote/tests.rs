use serde_json::json;

use super::*;

#[test]
fn base_urls() {
    assert_eq!(base_url("http://gpu:8000/v1/").ok().as_deref(), Some("http://gpu:8000/v1"));
    assert_eq!(base_url("http://localhost:11434").ok().as_deref(), Some("http://localhost:11434/v1"));
    assert_eq!(
        base_url("https://api.example/openai/v1").ok().as_deref(),
        Some("https://api.example/openai/v1")
    );
    assert_eq!(base_url("http://[::1]:8080").ok().as_deref(), Some("http://[::1]:8080/v1"));
    for bad in [
        "localhost:8000",
        "ftp://x/v1",
        "http://",
        "http:///v1",
        "http://127.0.0.1:99999/v1",
        "http://127.0.0.1:0/v1",
        "http://127.0.0.1:/v1",
        "http://host:80x/v1",
        "http://a b/v1",
        "http://user:pass@host/v1",
        "http://host/v1?x=1",
        "http://host/v1#f",
    ] {
        let err = format!("{:#}", base_url(bad).expect_err(bad));
        assert!(!err.contains("pass@") && !err.contains('\n'), "{bad}: {err}");
    }
    assert_eq!(redact_userinfo("http://user:pass@host/v1"), "http://***@host/v1");
    assert_eq!(redact_userinfo("http://host/a@b"), "http://host/a@b");
}

#[test]
fn chunks_become_events() {
    let mut p = ChunkParser::new(false);
    let chunk =
        json!({"choices": [{"delta": {"reasoning_content": "hm", "content": null}, "finish_reason": null}]});
    assert_eq!(p.chunk(&chunk).ok(), Some(vec![Event::Reasoning { text: "hm".into() }]));
    let chunk = json!({"choices": [{"delta": {"content": "Hi"}, "finish_reason": "length"}]});
    assert_eq!(p.chunk(&chunk).ok(), Some(vec![Event::Text { text: "Hi".into(), token: None }]));
    let usage = json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}});
    assert_eq!(p.chunk(&usage).ok(), Some(vec![]));
    let finish = p.finish.clone().map(|f| p.with_usage(f));
    assert_eq!(
        finish,
        Some(Finish {
            reason: FinishReason::Length,
            prompt_tokens: Some(5),
            generated_tokens: Some(1),
            complete: None
        })
    );
    assert!(p.chunk(&json!({"error": {"message": "boom"}})).is_err());
}

#[test]
fn error_messages_are_found_in_common_shapes() {
    assert_eq!(message_suffix(r#"{"error":{"message":"no such model"}}"#), ": no such model");
    assert_eq!(message_suffix(r#"{"detail":"Not Found"}"#), ": Not Found");
    assert_eq!(message_suffix("plain"), ": plain");
    assert_eq!(message_suffix(""), "");
}
