//! `--endpoint`: the same filter in front of an OpenAI-compatible server, tested against a
//! real HTTP server on loopback ([`server::ApiServer`]) that streams as vLLM and llama-server
//! do.

pub mod server;

use std::io::Read;
use std::time::Duration;

use serde_json::{Value, json};
use server::{ApiServer, Part, Reply, chat, content, data, done, finish, reasoning, usage};

use crate::support::{Done, streamgen};

/// A failed run: exit 1, and one `streamgen: error:` line that contains `needle`.
fn assert_fails_with(out: &Done, needle: &str) {
    let err = out.stderr();
    out.assert_exit(1);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("streamgen: error:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    assert!(lines[0].contains(needle), "{needle:?} not in {err}");
}

fn json_lines(out: &Done) -> Vec<Value> {
    out.stdout().lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

#[test]
fn chat_answers_stream_and_the_request_carries_the_flags() {
    let server = ApiServer::start(&["served-model"]);
    server.script(vec![chat(&["Hel", "lo", ", wor", "ld"])]);
    let out = streamgen()
        .endpoint(&server.url)
        .args([
            "-s",
            "Be brief.",
            "-n",
            "12",
            "--temperature",
            "0.5",
            "--seed",
            "9",
            "--stop",
            "END",
            "--api-key",
            "k1",
            "Say hi",
        ])
        .run();
    assert_eq!(out.stdout(), "Hello, world", "{}", out.stderr());
    assert!(out.success());
    let posts = server.posts();
    assert_eq!(posts.len(), 1);
    let post = &posts[0];
    assert_eq!(post.path, "/v1/chat/completions");
    assert_eq!(post.headers.get("authorization").map(String::as_str), Some("Bearer k1"));
    let body = &post.body;
    // -m was not given and the server serves one model: that one.
    assert_eq!(body["model"], "served-model");
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}])
    );
    assert_eq!(
        (body["stream"].clone(), body["max_tokens"].clone(), body["seed"].clone()),
        (json!(true), json!(12), json!(9))
    );
    assert_eq!(body["temperature"], json!(0.5));
    assert_eq!(body["stop"], json!(["END"]), "stop is always an array");
    // Settings left at their defaults are the server's business.
    assert!(body.get("top_k").is_none() && body.get("min_p").is_none(), "{body}");
    // Thinking is left to the server's template unless --no-think.
    assert!(body.get("chat_template_kwargs").is_none(), "{body}");
    assert!(body.get("ignore_eos").is_none(), "{body}");

    // --raw: plain completion, with the text in `text`.
    server.script(vec![Reply::Stream(vec![
        Part::Raw(data(&json!({"choices": [{"text": " Paris", "finish_reason": null}]}))),
        Part::Raw(data(&json!({"choices": [{"text": ".", "finish_reason": "length"}]}))),
        done(),
    ])]);
    let out = streamgen()
        .endpoint(&server.url)
        .args([
            "--raw",
            "-m",
            "served-model",
            "--top-k",
            "5",
            "-n",
            "9",
            "--ignore-eos",
            "The capital of France is",
        ])
        .run();
    assert_eq!(out.stdout(), " Paris.");
    let post = server.posts().pop().expect("a POST");
    assert_eq!(post.path, "/v1/completions");
    assert_eq!(post.body["prompt"], "The capital of France is");
    assert_eq!(post.body["top_k"], 5);
    assert_eq!(post.body["ignore_eos"], true);
    assert!(!post.headers.contains_key("authorization"), "no key was given");
}

#[test]
fn text_reaches_stdout_as_it_arrives_and_no_stream_prints_the_same_bytes() {
    let server = ApiServer::start(&["m"]);
    server.script(vec![Reply::Stream(vec![
        content("first"),
        Part::Gate("second"),
        content(" second"),
        finish("stop"),
        done(),
    ])]);
    let mut child = streamgen().endpoint(&server.url).arg("hi").spawn();
    let mut child_out = child.stdout.take().expect("stdout");
    // The server holds the rest back until the first piece has been read from our stdout.
    let mut first = [0u8; 5];
    child_out.read_exact(&mut first).expect("the first piece arrives before the rest is sent");
    assert_eq!(&first, b"first");
    server.open_gate("second");
    let mut rest = String::new();
    child_out.read_to_string(&mut rest).expect("read");
    child.finish().assert_success();
    assert_eq!(rest, " second");

    server.script(vec![chat(&["first", " second"])]);
    let out = streamgen().endpoint(&server.url).args(["--no-stream", "hi"]).run();
    assert_eq!(out.stdout(), "first second");
}

#[test]
fn pings_multi_line_data_usage_and_json_events() {
    let server = ApiServer::start(&["m"]);
    let multi_line = "data: {\"choices\": [{\"index\": 0,\ndata:  \"delta\": {\"content\": \" two\"}}]}\n\n";
    server.script(vec![Reply::Stream(vec![
        Part::Raw(": ping\n\n".into()),
        content("one"),
        Part::Raw(": keep-alive\r\n\r\n".into()),
        Part::Raw(multi_line.into()),
        finish("stop"),
        usage(11, 2),
        done(),
    ])]);
    let out = streamgen().endpoint(&server.url).args(["--json", "hi"]).run();
    assert!(out.success(), "{}", out.stderr());
    let lines = json_lines(&out);
    let text: String = lines.iter().filter_map(|l| l["text"].as_str()).collect();
    assert_eq!(text, "one two");
    let summary = lines.last().expect("a summary");
    assert_eq!(summary["finish_reason"], "eos");
    assert_eq!(
        (summary["prompt_tokens"].clone(), summary["generated_tokens"].clone()),
        (json!(11), json!(2))
    );
}

#[test]
fn reasoning_stays_off_stdout_unless_asked_for() {
    let server = ApiServer::start(&["m"]);
    let think = || {
        Reply::Stream(vec![
            reasoning("reasoning_content", "Let me think."),
            reasoning("reasoning", " Done."),
            content("\n\nAnswer."),
            finish("stop"),
            done(),
        ])
    };
    server.script(vec![think(), think(), think(), think()]);
    // stderr is not a terminal here: the reasoning goes nowhere by default.
    let out = streamgen().endpoint(&server.url).arg("q").run();
    assert_eq!(out.stdout(), "\n\nAnswer.");
    assert!(!out.stderr().contains("think"), "{}", out.stderr());
    let out = streamgen().endpoint(&server.url).args(["--reasoning", "stderr", "q"]).run();
    assert_eq!(out.stdout(), "\n\nAnswer.");
    assert!(out.stderr().contains("Let me think. Done."), "{}", out.stderr());
    let out = streamgen().endpoint(&server.url).args(["--reasoning", "stdout", "q"]).run();
    assert_eq!(out.stdout(), "<think>\nLet me think. Done.\n</think>\n\n\n\nAnswer.");
    let out = streamgen().endpoint(&server.url).args(["--json", "q"]).run();
    let lines = json_lines(&out);
    let thought: String = lines.iter().filter_map(|l| l["reasoning"].as_str()).collect();
    assert_eq!(thought, "Let me think. Done.");
    assert!(lines.iter().all(|l| l.get("text").is_none() || l.get("reasoning").is_none()));

    // Reasoning that uses up -n before the answer begins is a failure, not an empty success.
    server.script(vec![Reply::Stream(vec![
        reasoning("reasoning_content", "Hmm, so"),
        finish("length"),
        done(),
    ])]);
    let out = streamgen().endpoint(&server.url).args(["-n", "3", "q"]).run();
    assert_fails_with(&out, "still reasoning");
    assert_eq!(out.stdout(), "");
}

/// `--no-think` reaches the server's template as vLLM, SGLang and llama-server take it.
#[test]
fn no_think_is_sent_as_a_chat_template_argument() {
    let server = ApiServer::start(&["m"]);
    server.script(vec![chat(&["Yes."])]);
    let out = streamgen().endpoint(&server.url).args(["--no-think", "q"]).run();
    assert_eq!(out.stdout(), "Yes.", "{}", out.stderr());
    let post = server.posts().pop().expect("a POST");
    assert_eq!(post.body["chat_template_kwargs"], json!({"enable_thinking": false}));
}

#[test]
fn stop_strings_cut_the_answer_here_too() {
    let server = ApiServer::start(&["m"]);
    server.script(vec![chat(&["Hello ", "ST", "OP and more"])]);
    let out = streamgen().endpoint(&server.url).args(["--stop", "STOP", "hi"]).run();
    assert_eq!(out.stdout(), "Hello ");
    assert!(out.success());
}

#[test]
fn errors_from_the_server_are_one_line_and_exit_1() {
    let server = ApiServer::start(&["m"]);
    // An error event mid-stream, with and without [DONE] after it.
    let error = Part::Raw(data(&json!({"error": {"message": "out of memory", "type": "server_error"}})));
    server.script(vec![
        Reply::Stream(vec![content("partial"), error.clone(), done()]),
        Reply::Stream(vec![content("partial"), error]),
        Reply::Stream(vec![
            content("partial"),
            Part::Raw("event: error\ndata: {\"message\":\"engine died\"}\n\n".into()),
        ]),
    ]);
    for needle in ["out of memory", "out of memory", "engine died"] {
        let out = streamgen().endpoint(&server.url).arg("hi").run();
        assert_fails_with(&out, needle);
        assert_eq!(out.stdout(), "partial", "text already written stays");
    }
    // A stream that just ends: neither a finish reason nor [DONE].
    server.script(vec![Reply::Stream(vec![content("partial")])]);
    assert_fails_with(
        &streamgen().endpoint(&server.url).arg("hi").run(),
        "closed in the middle of the answer",
    );
    // A cut connection (the chunked body never ends).
    server.script(vec![Reply::Stream(vec![content("partial"), Part::Cut])]);
    assert_fails_with(&streamgen().endpoint(&server.url).arg("hi").run(), "in the middle of the answer");
    // A finish reason without [DONE] is a complete answer.
    server.script(vec![Reply::Stream(vec![content("whole"), finish("stop")])]);
    let out = streamgen().endpoint(&server.url).arg("hi").run();
    assert!(out.success(), "{}", out.stderr());
    assert_eq!(out.stdout(), "whole");
}

#[test]
fn refused_keys_missing_models_and_absent_servers() {
    let server = ApiServer::start(&["llama", "qwen"]);
    // Two models served: -m is needed, and the message lists them.
    assert_fails_with(&streamgen().endpoint(&server.url).arg("hi").run(), "llama, qwen");
    server.script(vec![Reply::Status(401, vec![], r#"{"error":{"message":"invalid api key"}}"#.into())]);
    let out = streamgen().endpoint(&server.url).args(["-m", "qwen", "--api-key", "wrong", "hi"]).run();
    assert_fails_with(&out, "refused the API key");
    assert!(out.stderr().contains("invalid api key"));
    server.script(vec![Reply::Status(401, vec![], String::new())]);
    assert_fails_with(&streamgen().endpoint(&server.url).args(["-m", "qwen", "hi"]).run(), "--api-key");
    // A model the server does not serve: the 404 says which ones it does.
    server.script(vec![Reply::Status(
        404,
        vec![],
        r#"{"error":{"message":"The model `gpt` does not exist."}}"#.into(),
    )]);
    assert_fails_with(
        &streamgen().endpoint(&server.url).args(["-m", "gpt", "hi"]).run(),
        "does not serve the model 'gpt'; it serves: llama, qwen",
    );

    // Nothing listening.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let out = streamgen().endpoint(&format!("http://{addr}/v1")).args(["-m", "x", "hi"]).run();
    assert_fails_with(&out, "cannot reach the server");
    // Not a URL at all: a usage error.
    streamgen().endpoint("localhost:8000").arg("hi").run().assert_exit(2);
}

#[test]
fn keys_go_only_where_they_were_given() {
    let server = ApiServer::start(&["m"]);
    let sent_key = |envs: &[(&str, &str)]| {
        server.script(vec![chat(&["ok"])]);
        let mut cmd = streamgen().endpoint(&server.url).arg("hi");
        for (key, value) in envs {
            cmd = cmd.env(key, value);
        }
        cmd.run().assert_success();
        server.posts().pop().and_then(|p| p.headers.get("authorization").cloned())
    };
    assert_eq!(sent_key(&[("OPENAI_API_KEY", "sk-openai")]), None, "OPENAI_API_KEY is for OPENAI_BASE_URL");
    assert_eq!(
        sent_key(&[("OPENAI_API_KEY", "sk-openai"), ("OPENAI_BASE_URL", &server.url)]).as_deref(),
        Some("Bearer sk-openai")
    );
    assert_eq!(
        sent_key(&[("OPENAI_API_KEY", "sk-openai"), ("OPENAI_BASE_URL", "https://api.openai.com/v1")]),
        None
    );
    assert_eq!(sent_key(&[("STREAMGEN_API_KEY", "sg")]).as_deref(), Some("Bearer sg"));
}

#[test]
fn busy_servers_are_retried_before_the_first_byte_only() {
    let server = ApiServer::start(&["m"]);
    let busy = || {
        Reply::Status(429, vec![("Retry-After", "0".into())], r#"{"error":{"message":"slow down"}}"#.into())
    };
    server.script(vec![
        busy(),
        Reply::Status(503, vec![("Retry-After", "0".into())], String::new()),
        chat(&["fine"]),
    ]);
    let out = streamgen().endpoint(&server.url).arg("hi").run();
    assert_eq!(out.stdout(), "fine", "{}", out.stderr());
    assert_eq!(server.posts().len(), 3);
    assert!(out.stderr().contains("trying again"), "{}", out.stderr());
    // Always busy: give up after a few attempts, with the server's message.
    server.script(vec![busy(), busy(), busy(), busy()]);
    let before = server.posts().len();
    assert_fails_with(&streamgen().endpoint(&server.url).args(["-q", "hi"]).run(), "slow down");
    assert_eq!(server.posts().len() - before, 4);
    // After text has been written, a broken stream is not asked for again.
    server.script(vec![Reply::Stream(vec![content("partial"), Part::Cut]), chat(&["again"])]);
    let before = server.posts().len();
    let out = streamgen().endpoint(&server.url).arg("hi").run();
    assert_fails_with(&out, "in the middle");
    assert_eq!(server.posts().len() - before, 1);
}

#[test]
fn a_silent_server_times_out_but_pings_keep_it_alive() {
    let server = ApiServer::start(&["m"]);
    server.script(vec![Reply::Stream(vec![content("started"), Part::Gate("never")])]);
    let out = streamgen().endpoint(&server.url).args(["--idle-timeout", "1", "hi"]).run();
    assert_fails_with(&out, "sent nothing for 1 s");
    assert_eq!(out.stdout(), "started");
    // Quiet for longer than the timeout in all, but never for more than a fifth of it without
    // a ping (a margin for a loaded machine).
    let mut parts = vec![content("a")];
    for _ in 0..8 {
        parts.extend([Part::Sleep(Duration::from_millis(200)), Part::Raw(": ping\n\n".into())]);
    }
    parts.extend([content("b"), finish("stop"), done()]);
    server.script(vec![Reply::Stream(parts)]);
    let out = streamgen().endpoint(&server.url).args(["--idle-timeout", "1", "hi"]).run();
    assert_eq!(out.stdout(), "ab", "{}", out.stderr());
}

#[test]
fn each_line_runs_lines_concurrently_and_writes_them_in_order() {
    let server = ApiServer::start(&["m"]);
    // Line 1 waits until line 3 has been answered: only concurrent requests can finish.
    let input = "wait:three one\ntwo\n\nthree\nfour\n";
    let mut child =
        streamgen().endpoint(&server.url).args(["--each-line", "--parallel", "4"]).stdin_piped().spawn();
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input.as_bytes()).expect("write");
    // Open the gate once the third line's request has been answered and line 1 still waits.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let posted = |text: &str| server.posts().iter().any(|p| p.body["messages"][0]["content"] == text);
    while !posted("wait:three one") || !posted("three") || server.in_flight() > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the other lines were not requested while line 1 waited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.open_gate("three");
    let out = child.finish();
    out.assert_success();
    // Line 1 could only finish after line 3 had been requested: the lines ran concurrently.
    assert_eq!(out.stdout(), "one\ntwo\n\nthree\nfour\n");

    // --json carries the line numbers, in order.
    let out = streamgen().endpoint(&server.url).args(["--each-line", "--json"]).stdin("a\nb\nc\n").run();
    let lines: Vec<u64> = json_lines(&out)
        .iter()
        .filter(|l| l.get("finish_reason").is_some())
        .filter_map(|l| l["line"].as_u64())
        .collect();
    assert_eq!(lines, [1, 2, 3]);
}

#[test]
fn ctrl_c_ends_a_waiting_request_with_an_interrupted_summary() {
    let server = ApiServer::start(&["m"]);
    server.script(vec![Reply::Stream(vec![content("so far"), Part::Gate("never")])]);
    let mut child = streamgen().endpoint(&server.url).args(["--json", "hi"]).spawn();
    let mut child_out = child.stdout.take().expect("stdout");
    let mut first = vec![0u8; 1];
    child_out.read_exact(&mut first).expect("the first chunk");
    child.interrupt();
    let mut rest = Vec::new();
    child_out.read_to_end(&mut rest).expect("read");
    child.finish().assert_exit(130);
    let text = String::from_utf8([first, rest].concat()).expect("utf8");
    let last: Value = serde_json::from_str(text.lines().last().expect("lines")).expect("json");
    assert_eq!(last["finish_reason"], "interrupted");
}

#[test]
fn a_closed_pipe_ends_the_run_quietly() {
    let server = ApiServer::start(&["m"]);
    let mut parts = vec![content("0123456789")];
    parts.extend((0..200).map(|_| content("more text ")));
    parts.extend([finish("stop"), done()]);
    server.script(vec![Reply::Stream(parts)]);
    let mut child = streamgen().endpoint(&server.url).arg("hi").spawn();
    let mut head = [0u8; 4];
    child.stdout.take().expect("stdout").read_exact(&mut head).expect("read");
    // The read end is closed here (dropped): the next write fails with EPIPE.
    let out = child.finish();
    out.assert_exit(0);
    assert_eq!(out.stderr(), "");
}

#[test]
fn a_server_that_ignores_stream_still_answers() {
    let server = ApiServer::start(&["m"]);
    server.script(vec![Reply::Json(json!({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Whole answer."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2}
    }))]);
    let out = streamgen().endpoint(&server.url).arg("hi").run();
    assert_eq!(out.stdout(), "Whole answer.", "{}", out.stderr());
}

/// A malformed endpoint is a usage error before any connection, so a key never goes to a
/// server the user did not name: `:99999` used to connect to port 80 with the key. A password
/// in the URL is refused and never printed.
#[test]
fn malformed_endpoints_are_refused_and_secrets_never_printed() {
    let server = ApiServer::start(&["m"]);
    let port = server.url.rsplit(':').next().and_then(|p| p.split('/').next()).expect("port").to_owned();
    for (endpoint, needle) in [
        ("http://127.0.0.1:99999/v1".to_owned(), "99999"),
        ("http://127.0.0.1:8x/v1".to_owned(), "8x"),
        (format!("http://user:s3cret@127.0.0.1:{port}/v1"), "password"),
        (format!("http://127.0.0.1:{port}/v1?key=1"), "query"),
    ] {
        let out = streamgen().endpoint(&endpoint).args(["--api-key", "k3y", "hi"]).run();
        out.assert_exit(2);
        let err = out.stderr();
        assert_eq!(err.lines().count(), 1, "{endpoint}: {err}");
        assert!(err.contains(needle), "{endpoint}: {err}");
        assert!(!err.contains("s3cret") && !err.contains("k3y"), "{endpoint}: a secret was printed: {err}");
    }
    assert!(server.requests().is_empty(), "a malformed endpoint reached the server: {:?}", server.requests());
}

/// Error lines stay short whatever the server lists: a few models, how many more, and where to
/// see them all (10,000 names made one line of 166 KiB).
#[test]
fn a_server_with_thousands_of_models_gives_a_short_error_line() {
    let names: Vec<String> = (0..10_000).map(|i| format!("org/model-{i:05}-with-a-long-name")).collect();
    let server = ApiServer::start(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let out = streamgen().endpoint(&server.url).arg("hi").run();
    assert_fails_with(&out, "serves 10000 models");
    let err = out.stderr();
    assert!(err.len() < 1000, "an error line of {} bytes", err.len());
    assert!(err.contains("org/model-00000") && err.contains("and 9992 more"), "{err}");
    assert!(err.contains(&format!("{}/models", server.url)), "{err}");
}

/// A redirect on the model list names the new address, as a redirect on the request does.
#[test]
fn a_redirect_on_the_model_list_names_the_new_address() {
    let server = ApiServer::start(&["m"]);
    server.models_reply(Reply::Status(
        308,
        vec![("Location", "http://127.0.0.1:9/elsewhere/v1".into())],
        String::new(),
    ));
    let out = streamgen().endpoint(&server.url).arg("hi").run();
    assert_fails_with(&out, "http://127.0.0.1:9/elsewhere/v1");
}

/// `--prompt-cache` cannot apply to a server: the run says so on stderr instead of ignoring it
/// silently, and still answers.
#[test]
fn a_prompt_cache_with_an_endpoint_is_named_as_having_no_effect() {
    let server = ApiServer::start(&["m"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let out = streamgen().endpoint(&server.url).arg("--prompt-cache").arg(dir.path()).arg("hi").run();
    out.assert_success();
    assert!(out.stderr().contains("--prompt-cache has no effect with --endpoint"), "{}", out.stderr());
    assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0, "nothing is cached");
}

/// `-n` holds even against a server that ignores `max_tokens`: the answer stops after n chunks
/// of text (reasoning included), reported as `length`, and the connection is closed.
#[test]
fn max_tokens_is_enforced_on_the_client() {
    let server = ApiServer::start(&["m"]);
    let parts: Vec<String> = (0..200).map(|i| format!("w{i} ")).collect();
    server.script(vec![chat(&parts.iter().map(String::as_str).collect::<Vec<_>>())]);
    let out = streamgen().endpoint(&server.url).args(["-n", "3", "--json", "hi"]).run();
    let lines = json_lines(out.assert_success());
    let text: String = lines.iter().filter_map(|l| l["text"].as_str()).collect();
    assert_eq!(text, "w0 w1 w2 ");
    let last = lines.last().expect("a summary");
    assert_eq!(
        (last["finish_reason"].as_str(), last["generated_tokens"].as_u64()),
        (Some("length"), Some(3)),
        "{last}"
    );
}

/// Any bytes are a sign of life: an event dripped out a byte at a time over more than the idle
/// timeout is slow, not silent (it was declared silent, as only whole lines counted).
#[test]
fn a_server_that_drips_bytes_is_not_silent() {
    let server = ApiServer::start(&["m"]);
    let event =
        data(&json!({"choices": [{"index": 0, "delta": {"content": "slow"}, "finish_reason": null}]}));
    let mut parts = Vec::new();
    for byte in event.chars() {
        parts.push(Part::Raw(byte.to_string()));
        parts.push(Part::Sleep(Duration::from_millis(40)));
    }
    parts.extend([finish("stop"), done()]);
    assert!(event.len() * 40 > 2000, "the drip must outlast the idle timeout");
    server.script(vec![Reply::Stream(parts)]);
    let out = streamgen().endpoint(&server.url).args(["--idle-timeout", "1", "hi"]).run();
    assert_eq!(out.assert_success().stdout(), "slow");
}

/// A connection cut after the response headers and a role-only chunk, before any text, is
/// tried again: nothing has reached stdout, so "retried only before the first byte of the
/// answer" holds exactly. A cut after text is not retried.
#[test]
fn a_stream_cut_before_any_text_is_tried_again() {
    let server = ApiServer::start(&["m"]);
    let role = Part::Raw(data(
        &json!({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": null}]}),
    ));
    server.script(vec![Reply::Stream(vec![role, Part::Cut]), chat(&["Hel", "lo"])]);
    let out = streamgen().endpoint(&server.url).arg("hi").run();
    assert_eq!(out.assert_success().stdout(), "Hello");
    assert_eq!(server.posts().len(), 2, "one retry");

    server.script(vec![Reply::Stream(vec![content("Hel"), Part::Cut]), chat(&["Hel", "lo"])]);
    assert_fails_with(&streamgen().endpoint(&server.url).arg("hi").run(), "in the middle of the answer");
    assert_eq!(server.posts().len(), 3, "no retry after text");
}

/// One failed line does not end the run: it gives an empty output line (an error object with
/// `--json`) and its error on stderr with its number, every other line is answered in order,
/// and the exit status is 1.
#[test]
fn a_failed_line_leaves_the_other_lines_answered() {
    let server = ApiServer::start(&["m"]);
    let error = Reply::Status(500, vec![], r#"{"error": {"message": "boom"}}"#.into());
    for json in [false, true] {
        server.script(vec![chat(&["one"]), chat(&["two"]), error.clone(), chat(&["four"]), chat(&["five"])]);
        let mut args = vec!["--each-line", "--parallel", "1"];
        if json {
            args.push("--json");
        }
        let out = streamgen().endpoint(&server.url).args(&args).stdin("a\nb\nc\nd\ne\n").run();
        out.assert_exit(1);
        let err = out.stderr();
        assert!(err.contains("streamgen: error: line 3:") && err.contains("boom"), "{err}");
        assert!(err.contains("1 of 5 lines failed"), "{err}");
        if json {
            let lines = json_lines(&out);
            let failed: Vec<&Value> = lines.iter().filter(|l| l.get("error").is_some()).collect();
            assert_eq!(failed.len(), 1, "{lines:?}");
            assert_eq!(failed[0]["line"], 3);
            let texts: String = lines.iter().filter_map(|l| l["text"].as_str()).collect();
            assert_eq!(texts, "onetwofourfive");
        } else {
            assert_eq!(out.stdout(), "one\ntwo\n\nfour\nfive\n");
        }
    }
}

/// `--json --logprobs N` against a server: the chat request asks for `logprobs` and
/// `top_logprobs` (a raw completion for `logprobs: N`), and the answer is written one object
/// per token with its log-probabilities, as the local engine writes it.
#[test]
fn logprobs_are_asked_for_and_written_per_token() {
    let server = ApiServer::start(&["m"]);
    let token = |t: &str, lp: f64| {
        json!({"token": t, "bytes": t.as_bytes(), "logprob": lp,
               "top_logprobs": [{"token": t, "bytes": t.as_bytes(), "logprob": lp}, {"token": "z", "logprob": -9.0}]})
    };
    server.script(vec![Reply::Stream(vec![
        Part::Raw(data(&json!({"choices": [{"delta": {"content": "Hi"},
            "logprobs": {"content": [token("H", -0.5), token("i", -0.25)]}}]}))),
        Part::Raw(data(&json!({"choices": [{"delta": {"content": "!"},
            "logprobs": {"content": [token("!", -1.0)]}, "finish_reason": "stop"}]}))),
        done(),
    ])]);
    let out = streamgen().endpoint(&server.url).args(["--json", "--logprobs", "1", "hi"]).run();
    assert!(out.success(), "{}", out.stderr());
    let lines = json_lines(&out);
    let texts: Vec<&str> = lines.iter().filter_map(|l| l["text"].as_str()).collect();
    assert_eq!(texts, ["H", "i", "!"]);
    let logprobs: Vec<f64> = lines.iter().filter_map(|l| l["logprob"].as_f64()).collect();
    assert_eq!(logprobs, [-0.5, -0.25, -1.0]);
    assert_eq!(
        lines[0]["top_logprobs"][1],
        json!({"token": null, "text": "z", "bytes": [122], "logprob": -9.0})
    );
    let body = server.posts().pop().expect("a POST").body;
    assert_eq!((body["logprobs"].clone(), body["top_logprobs"].clone()), (json!(true), json!(1)));

    server.script(vec![chat(&["x"])]);
    let out = streamgen().endpoint(&server.url).args(["--raw", "--json", "--logprobs", "3", "x"]).run();
    assert!(out.success(), "{}", out.stderr());
    let body = server.posts().pop().expect("a POST").body;
    assert_eq!(body["logprobs"], 3);
    assert!(body.get("top_logprobs").is_none(), "{body}");
}
