use serde_json::json;

use super::*;
use crate::event::{Alternative, TokenLogprob};

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

/// `logprobs` in both APIs' forms: one log-probability event and one text event per token; a
/// character split over two tokens goes with the second (the first has empty text), as the
/// local engine reports it; tokens whose bytes are not the chunk's text are left out.
#[test]
fn logprobs_become_one_event_per_token() {
    let mut p = ChunkParser::new(false);
    let euro = "€".as_bytes();
    let alt =
        |token: &str, logprob: f64| json!({"token": token, "bytes": token.as_bytes(), "logprob": logprob});
    let chunk = json!({"choices": [{"delta": {"content": "a"}, "logprobs": {"content": [
        {"id": 64, "token": "a", "bytes": [97], "logprob": -0.5, "top_logprobs": [alt("a", -0.5), alt("b", -1.5)]},
        {"token": "\\xe2\\x82", "bytes": &euro[..2], "logprob": -0.25, "top_logprobs": []},
    ]}}]});
    let events = p.chunk(&chunk).expect("events");
    let lp = |token, bytes: &[u8], logprob, top| {
        Event::Logprob(TokenLogprob { token, bytes: bytes.to_vec(), logprob, top })
    };
    let top = vec![
        Alternative { token: None, bytes: b"a".to_vec(), logprob: -0.5 },
        Alternative { token: None, bytes: b"b".to_vec(), logprob: -1.5 },
    ];
    assert_eq!(
        events,
        vec![
            lp(Some(64), b"a", -0.5, top),
            Event::Text { text: "a".into(), token: Some(64) },
            lp(None, &euro[..2], -0.25, vec![]),
            Event::Text { text: String::new(), token: None },
        ]
    );
    let chunk = json!({"choices": [{"delta": {"content": "€!"}, "logprobs": {"content": [
        {"token": "\\xac", "bytes": &euro[2..], "logprob": -0.125, "top_logprobs": []},
        {"token": "!", "bytes": [33], "logprob": -2.0, "top_logprobs": []},
    ]}}]});
    let texts: Vec<Event> = p.chunk(&chunk).expect("events").into_iter().skip(1).step_by(2).collect();
    assert_eq!(
        texts,
        vec![Event::Text { text: "€".into(), token: None }, Event::Text { text: "!".into(), token: None }]
    );
    // Bytes that are not the text: the text alone.
    let chunk = json!({"choices": [{"delta": {"content": "xy"}, "logprobs": {"content": [
        {"token": "x", "bytes": [120], "logprob": -1.0, "top_logprobs": []},
    ]}}]});
    assert_eq!(p.chunk(&chunk).ok(), Some(vec![Event::Text { text: "xy".into(), token: None }]));

    // The completions API: tokens, token_logprobs, top_logprobs as text → logprob, most likely
    // first whatever the object's order.
    let mut p = ChunkParser::new(false);
    let chunk = json!({"choices": [{"text": " Paris", "logprobs": {
        "tokens": [" Paris"], "token_logprobs": [-0.75], "top_logprobs": [{" Lyon": -3.0, " Paris": -0.75}]
    }}]});
    assert_eq!(
        p.chunk(&chunk).ok(),
        Some(vec![
            lp(
                None,
                b" Paris",
                -0.75,
                vec![
                    Alternative { token: None, bytes: b" Paris".to_vec(), logprob: -0.75 },
                    Alternative { token: None, bytes: b" Lyon".to_vec(), logprob: -3.0 },
                ]
            ),
            Event::Text { text: " Paris".into(), token: None },
        ])
    );
}
