//! The second real model, SmolLM2-135M-Instruct (Q4_1; `llama` architecture, byte-level BPE,
//! ChatML template with a default system message), end to end through the executable and
//! against llama.cpp's chat-rendered references.

use serde::Deserialize;
use serde_json::{Value as Json, json};
use streamgen::chat::{ChatTemplate, RenderContext};
use streamgen::gguf::Gguf;

use crate::support::{streamgen, test_data, test_model_smollm2};

#[derive(Deserialize)]
struct Case {
    kind: String,
    prompt: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    text_hex: String,
    #[serde(default)]
    question: Option<String>,
    #[serde(default)]
    system: Option<String>,
}

fn cases() -> Vec<Case> {
    let path = test_data("smollm2-135m/greedy.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

fn unhex(hex: &str) -> String {
    let bytes: Vec<u8> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect();
    String::from_utf8(bytes).expect("UTF-8")
}

#[test]
fn the_files_chat_template_renders_as_python_jinja2_does() {
    let gguf = Gguf::open(&test_model_smollm2()).expect("open");
    let template = ChatTemplate::from_gguf(&gguf).expect("template").expect("the file has a chat template");
    let ctx = RenderContext::new("<|im_start|>", "<|im_end|>");
    let mut checked = 0;
    for case in cases().iter().filter(|c| c.kind == "chat") {
        let question = case.question.as_deref().expect("chat cases have a question");
        let rendered = template.render_prompt(case.system.as_deref(), question, &ctx).expect("render");
        assert_eq!(rendered, case.prompt, "question {question:?}");
        checked += 1;
    }
    assert!(checked >= 3);
}

/// The answer to a question through the file's chat template, greedy, ending at `<|im_end|>`:
/// llama.cpp's answer (greedy.json) up to its first near-tie, where llama.cpp's own top two
/// logits are within 0.5 and either choice is right (the teacher-forced test checks every
/// step's logits). `--verbose-prompt` shows llama.cpp's prompt ids.
#[test]
fn a_question_on_stdin_gets_llama_cpps_answer_and_stops_at_the_end_of_turn() {
    #[derive(Deserialize)]
    struct Steps {
        question: Option<String>,
        top5_per_step: Vec<Vec<(u32, f32)>>,
    }
    let all = cases();
    let case = all
        .iter()
        .find(|c| c.question.as_deref() == Some("What is the weather today?"))
        .expect("the weather case");
    let path = test_data("smollm2-135m/greedy.json");
    let steps: Vec<Steps> =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("parse");
    let steps = steps.iter().find(|s| s.question == case.question).expect("steps");
    let clear = steps.top5_per_step.iter().take_while(|t| t[0].1 - t[1].1 > 0.5).count();
    let gguf = Gguf::open(&test_model_smollm2()).expect("open");
    let tokenizer = streamgen::tokenizer::Tokenizer::from_gguf(&gguf).expect("tokenizer");
    let agreed = tokenizer.decode(&case.greedy_ids[..clear]);
    assert!(agreed.starts_with("The weather today is mostly sunny"), "reference: {agreed:?}");

    let out = streamgen()
        .model(test_model_smollm2())
        .args(["--temperature", "0", "--verbose-prompt", "--json"])
        .stdin("What is the weather today?\n")
        .run();
    let lines: Vec<Json> = out
        .assert_success()
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let answer: String = lines.iter().filter_map(|v| v["text"].as_str()).collect();
    assert!(
        answer.starts_with(&agreed),
        "ours: {answer:?}\nllama.cpp's, up to its first near-tie: {agreed:?}"
    );
    assert_eq!(lines.last().expect("summary")["finish_reason"], "eos", "the answer must end at <|im_end|>");
    let ids: Vec<String> = case.prompt_ids.iter().map(u32::to_string).collect();
    let stderr = out.stderr();
    assert!(stderr.contains(&format!("[{}]", ids.join(", "))), "stderr: {stderr}");
    assert_eq!(unhex(&case.text_hex).get(..agreed.len()), Some(agreed.as_str()));
}

#[test]
fn raw_completion_and_json_events() {
    let out = streamgen()
        .model(test_model_smollm2())
        .args(["--raw", "--temperature", "0", "-n", "3", "--json", "The capital of France is"])
        .stdout();
    let lines: Vec<Json> = out.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let text: String = lines.iter().filter_map(|v| v["text"].as_str()).collect();
    assert_eq!(text, " Paris.\n", "llama.cpp's greedy completion (greedy.json) starts \" Paris.\\n\"");
    let last = lines.last().expect("a final object");
    assert_eq!(last["finish_reason"], "length");
    assert_eq!(last["generated_tokens"], 3);
}

#[test]
fn each_line_stop_strings_and_a_system_prompt() {
    let text = streamgen()
        .model(test_model_smollm2())
        .args(["--each-line", "--temperature", "0", "-n", "24", "--stop", "sunny", "-s", "Be brief."])
        .stdin("What is the weather today?\n\nName a color.\n")
        .stdout();
    let lines: Vec<&str> = text.split('\n').collect();
    assert_eq!(lines.len(), 4, "one line per input line and a final newline: {text:?}");
    assert!(!lines[0].contains("sunny") && !lines[0].is_empty(), "{:?}", lines[0]);
    assert_eq!(lines[1], "", "an empty input line gives an empty output line");
    assert!(!lines[2].is_empty());
}

#[test]
fn each_line_computes_the_shared_prompt_prefix_once() {
    // The system prompt and the instruction open every line's prompt: from the second line on
    // they are copied from the first computation, not fed again.
    let input = "I love this film.\nWorst meal ever.\nThe bus was on time.\n";
    let args = [
        "--each-line",
        "--json",
        "--temperature",
        "0",
        "-n",
        "4",
        "-s",
        "You label sentiment.",
        "Classify the sentiment:",
    ];
    for parallel in ["1", "3"] {
        let out = streamgen()
            .model(test_model_smollm2())
            .args(args)
            .args(["--parallel", parallel])
            .stdin(input)
            .stdout();
        let finals: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON"))
            .filter(|o| o.get("finish_reason").is_some())
            .collect();
        assert_eq!(finals.len(), 3);
        for f in &finals[1..] {
            let (reused, prompt) = (f["reused_prompt_tokens"].as_u64(), f["prompt_tokens"].as_u64());
            assert!(reused.is_some_and(|r| r >= 12 && Some(r) < prompt), "--parallel {parallel}: {f}");
        }
    }
}

/// `--ignore-eos` generates exactly `-n` tokens where the model would have ended its turn (alone
/// and with `--each-line`), and without `-n` it is a usage error.
#[test]
fn ignore_eos_generates_exactly_n_tokens() {
    let summary = |extra: &[&str], stdin: &str| -> Vec<Json> {
        let out = streamgen()
            .model(test_model_smollm2())
            .args(["--temperature", "0", "-n", "48", "--json", "--no-prompt-cache", "--no-log"])
            .args(extra)
            .stdin(stdin)
            .run();
        assert!(out.success(), "{}", out.stderr());
        out.stdout()
            .lines()
            .map(|l| serde_json::from_str::<Json>(l).expect("a JSON line"))
            .filter(|v| v.get("finish_reason").is_some())
            .collect()
    };
    let plain = summary(&[], "Reply with one word: yes or no. Is water wet?");
    assert_eq!(plain[0]["finish_reason"], "eos", "the model ends its turn early: {plain:?}");
    assert!(plain[0]["generated_tokens"].as_u64().is_some_and(|n| n < 48), "{plain:?}");
    let forced = summary(&["--ignore-eos"], "Reply with one word: yes or no. Is water wet?");
    assert_eq!(
        (forced[0]["finish_reason"].clone(), forced[0]["generated_tokens"].clone()),
        (json!("length"), json!(48))
    );
    let lines = summary(&["--ignore-eos", "--each-line"], "Is water wet? Reply yes or no.\nSay hi.\n");
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert_eq!(
            (line["finish_reason"].clone(), line["generated_tokens"].clone()),
            (json!("length"), json!(48))
        );
    }
    let out = streamgen().model(test_model_smollm2()).args(["--ignore-eos", "hi"]).stdin("").run();
    out.assert_exit(2);
    assert!(out.stderr().contains("--max-tokens"), "{}", out.stderr());
}

/// `--json --logprobs N`: an object for every generated token (the count the summary gives, the
/// tokens of a character split over several included), each with its log-probability and the N
/// most likely tokens in order; greedy, the token is the most likely one. An answer cut inside
/// a character ends with one more object, its replacement text with a null token. `--logprobs`
/// without `--json` is a usage error.
#[test]
fn logprobs_come_with_every_token() {
    let run = |extra: &[&str]| -> Vec<Json> {
        let out = streamgen()
            .model(test_model_smollm2())
            .args(["-n", "24", "--json", "--logprobs", "3", "--no-prompt-cache", "--no-log"])
            .args(extra)
            .stdin("Write good morning in Japanese, Chinese and Russian.")
            .run();
        assert!(out.success(), "{}", out.stderr());
        out.stdout().lines().map(|l| serde_json::from_str::<Json>(l).expect("a JSON line")).collect()
    };
    for (extra, greedy) in
        [(&["--temperature", "0"][..], true), (&["--temperature", "1.5", "--seed", "3"][..], false)]
    {
        let lines = run(extra);
        let (summary, mut tokens) = lines.split_last().expect("a summary");
        if let Some((tail, rest)) = tokens.split_last()
            && tail["token"].is_null()
        {
            assert_eq!(tail["text"], "\u{fffd}", "{lines:?}");
            assert!(tail.get("logprob").is_none(), "{tail}");
            tokens = rest;
        }
        assert_eq!(tokens.len() as u64, summary["generated_tokens"].as_u64().expect("a count"), "{lines:?}");
        for t in tokens {
            let logprob = t["logprob"].as_f64().expect("a logprob");
            let top = t["top_logprobs"].as_array().expect("top_logprobs");
            assert_eq!(top.len(), 3, "{t}");
            let values: Vec<f64> = top.iter().map(|a| a["logprob"].as_f64().expect("a logprob")).collect();
            assert!(values.windows(2).all(|w| w[0] >= w[1]), "{t}");
            assert!(values.iter().map(|v| v.exp()).sum::<f64>() <= 1.0 + 1e-4, "{t}");
            assert!(logprob <= values[0] + 1e-6 && logprob <= 0.0, "{t}");
            assert!(top.iter().all(|a| a["text"].is_string() && a["bytes"].is_array()), "{t}");
            assert!(t["bytes"].as_array().is_some_and(|b| !b.is_empty()), "{t}");
            if greedy {
                assert_eq!(t["token"], top[0]["token"], "{t}");
            }
        }
    }
    let out = streamgen().model(test_model_smollm2()).args(["--logprobs", "2", "hi"]).stdin("").run();
    out.assert_exit(2);
    // With --each-line, each line's tokens are those of its prompt alone, and their
    // log-probabilities too, up to the rounding of prefilling a prompt's tail beside other lines
    // rather than alone; the same bits whatever --parallel is.
    let questions = ["Name a color.", "Write good morning in Japanese, Chinese and Russian.", "What is 2+2?"];
    let json_lines = |out: &str| -> Vec<Json> {
        out.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
    };
    let batched = |parallel: &str| {
        let out = streamgen()
            .model(test_model_smollm2())
            .args(["--each-line", "--json", "--logprobs", "2", "--temperature", "0", "-n", "12", "--no-log"])
            .args(["--parallel", parallel])
            .stdin(questions.join("\n"))
            .run();
        assert!(out.success(), "{}", out.stderr());
        let lines = json_lines(&out.stdout());
        lines.into_iter().filter(|l| l.get("logprob").is_some()).collect::<Vec<_>>()
    };
    let batched_by_3 = batched("3");
    assert!(batched_by_3 == batched("1"), "--parallel 3 and 1 differ");
    for (i, question) in questions.iter().enumerate() {
        let line: Vec<&Json> = batched_by_3.iter().filter(|l| l["line"] == i + 1).collect();
        let out = streamgen()
            .model(test_model_smollm2())
            .args(["--json", "--logprobs", "2", "--temperature", "0", "-n", "12", "--no-log", question])
            .stdin("")
            .run();
        let alone = json_lines(&out.stdout());
        let alone: Vec<&Json> = alone.iter().filter(|l| l.get("logprob").is_some()).collect();
        assert!(line.len() >= 2 && line.len() == alone.len(), "line {}: {line:?}", i + 1);
        for (ours, theirs) in line.iter().zip(&alone) {
            assert_eq!(ours["token"], theirs["token"], "line {}", i + 1);
            let (a, b) = (ours["logprob"].as_f64().expect("lp"), theirs["logprob"].as_f64().expect("lp"));
            assert!((a - b).abs() < 0.25, "line {}: {a} against {b} alone", i + 1);
        }
    }
}

/// `--tokenize` prints the prompt's ids as the model gets them (through the chat template, with
/// its default system message or `-s`): llama.cpp's ids for the same chat; `--count-tokens`
/// prints how many. With `--each-line`, one line each (an empty line is no prompt: 0 and `[]`).
/// With `--endpoint`, whose server has its own vocabulary, both are usage errors.
#[test]
fn tokenize_and_count_tokens_print_llama_cpps_prompt_ids() {
    let mut checked = 0;
    for case in cases().iter().filter(|c| c.kind == "chat") {
        let question = case.question.as_deref().expect("chat cases have a question");
        let system: Vec<&str> = case.system.as_deref().map(|s| vec!["-s", s]).unwrap_or_default();
        let run = |flag: &str| {
            streamgen().model(test_model_smollm2()).arg(flag).args(&system).arg(question).stdin("").stdout()
        };
        let ids: Vec<u32> = serde_json::from_str(run("--tokenize").trim_end()).expect("a JSON array of ids");
        assert_eq!(ids, case.prompt_ids, "question {question:?}");
        assert_eq!(run("--count-tokens"), format!("{}\n", case.prompt_ids.len()), "question {question:?}");
        checked += 1;
    }
    assert!(checked >= 3);

    let one = |flag: &str, prompt: &str| {
        streamgen().model(test_model_smollm2()).args([flag, "--raw", prompt]).stdin("").stdout()
    };
    let each = |flag: &str| {
        streamgen()
            .model(test_model_smollm2())
            .args([flag, "--raw", "--each-line", "Translate:"])
            .stdin("Good morning.\n\nWhere is the station?\n")
            .stdout()
    };
    let (first, third) = ("Translate:\n\nGood morning.", "Translate:\n\nWhere is the station?");
    let ids = each("--tokenize");
    assert_eq!(ids, format!("{}[]\n{}", one("--tokenize", first), one("--tokenize", third)));
    assert!(ids.lines().all(|l| serde_json::from_str::<Vec<u32>>(l).is_ok()), "{ids}");
    let counts = each("--count-tokens");
    assert_eq!(counts, format!("{}0\n{}", one("--count-tokens", first), one("--count-tokens", third)));
    assert_ne!(counts.lines().next(), Some("0"));

    for flag in ["--count-tokens", "--tokenize"] {
        let out = streamgen()
            .model(test_model_smollm2())
            .args([flag, "hi"])
            .env("STREAMGEN_ENDPOINT", "http://127.0.0.1:9/v1")
            .stdin("")
            .run();
        out.assert_exit(2);
        assert!(out.stderr().contains(flag), "{}", out.stderr());
    }
}

/// `--choice` with `--logprobs`: the summary scores every choice, in the order given, with its
/// log-probability under the model as the answer and its probability among the choices. The
/// answer's own token carries the same log-probability (the model's, before the constraint).
/// With `--each-line` every line's summary has its own scores; without `--logprobs`, none.
#[test]
fn choice_probabilities_come_with_the_summary() {
    let choices = ["positive", "negative", "neutral"];
    let args = ["--json", "--temperature", "0", "--choice", "positive,negative,neutral", "--no-log"];
    let check = |summary: &Json| -> Vec<f64> {
        let scores = summary["choices"].as_array().expect("choices in the summary");
        let names: Vec<&str> = scores.iter().map(|s| s["choice"].as_str().expect("a choice")).collect();
        assert_eq!(names, choices);
        let logprobs: Vec<f64> = scores.iter().map(|s| s["logprob"].as_f64().expect("a logprob")).collect();
        let total: f64 = logprobs.iter().map(|lp| lp.exp()).sum();
        for (score, lp) in scores.iter().zip(&logprobs) {
            assert!(*lp < 0.0, "{summary}");
            let p = score["probability"].as_f64().expect("a probability");
            assert!((p - lp.exp() / total).abs() < 1e-9, "{summary}");
        }
        logprobs
    };
    let out = streamgen()
        .model(test_model_smollm2())
        .args(args)
        .args(["--logprobs", "0", "Classify the sentiment: I love this film."])
        .stdin("")
        .run();
    assert!(out.success(), "{}", out.stderr());
    let lines: Vec<Json> =
        out.stdout().lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let (summary, tokens) = lines.split_last().expect("a summary");
    let logprobs = check(summary);
    // Each choice is one token of this vocabulary, so the answer is one chosen token.
    assert_eq!(tokens.len(), 1, "{lines:?}");
    let answer = choices.iter().position(|c| tokens[0]["text"] == *c).expect("the answer is a choice");
    let token_logprob = tokens[0]["logprob"].as_f64().expect("a logprob");
    assert!((token_logprob - logprobs[answer]).abs() < 1e-3, "{token_logprob} against {logprobs:?}");
    // Greedy under the constraint: the most likely choice.
    assert!(logprobs.iter().all(|&lp| lp <= logprobs[answer]), "{logprobs:?}, answer {answer}");

    let out = streamgen()
        .model(test_model_smollm2())
        .args(args)
        .args(["--logprobs", "0", "--each-line", "Classify the sentiment:"])
        .stdin("I love this film.\nWorst meal ever.\n")
        .run();
    assert!(out.success(), "{}", out.stderr());
    let summaries: Vec<Json> = out
        .stdout()
        .lines()
        .map(|l| serde_json::from_str::<Json>(l).expect("a JSON line"))
        .filter(|l| l.get("finish_reason").is_some())
        .collect();
    assert_eq!(summaries.len(), 2);
    let (first, second) = (check(&summaries[0]), check(&summaries[1]));
    assert_ne!(first, second, "two lines, two sets of scores");

    let out =
        streamgen().model(test_model_smollm2()).args(args).arg("Classify: I love this film.").stdin("").run();
    let last = out.stdout().lines().last().map(|l| serde_json::from_str::<Json>(l).expect("JSON"));
    assert!(last.is_some_and(|s| s.get("choices").is_none()), "{}", out.stdout());
}
