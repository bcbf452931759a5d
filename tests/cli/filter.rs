//! The filter's interface on the real model: stop strings, end-of-generation tokens, chat
//! templates and `--verbose-prompt`, `--stats`, `--json`, `--each-line`, and terminal safety
//! under a pseudo-terminal.

use std::process::{Command, Stdio};

use streamgen::event::FinishReason;
use streamgen::generate::{Generator, Limits, Step};
use streamgen::sample::{Sampler, SamplingParams};

use crate::support::{streamgen, test_model};

const GREEDY: &[&str] = &["--raw", "--temperature", "0"];
/// Greedy continues this with " the capital of the country of France." (llama.cpp agrees).
const FRANCE: &str = "The capital of France is";

#[test]
fn a_stop_string_across_tokens_ends_the_answer_and_is_never_printed() {
    // "he coun" spans the tokens " the" and " country".
    for mode in [&[][..], &["--no-stream"][..]] {
        let args =
            [GREEDY, mode, &["-n", "30", "--stop", "he coun", "--stop", "never seen", FRANCE]].concat();
        let out = streamgen().model(test_model()).args(&args).stdout();
        assert_eq!(out, " the capital of t", "mode {mode:?}");
    }
    // Without the stop string the same run goes on past it.
    let out = streamgen().model(test_model()).args(GREEDY).args(["-n", "8", FRANCE]).stdout();
    assert!(out.starts_with(" the capital of the country"), "{out}");
}

#[test]
fn end_of_generation_tokens_stop_and_are_not_passed_on() {
    let loaded = streamgen::engine::load(test_model()).expect("load");
    let tok = &loaded.tokenizer;
    for text in ["<end_of_turn>", "<eos>"] {
        let id = tok.token_id(text).expect("in the vocabulary");
        assert!(tok.is_end_of_generation(id), "{text} must end generation");
    }
    let prompt = tok.encode(FRANCE, true, true);
    let greedy = |eog: &[u32], n: usize| {
        let state = loaded.model.new_state(64).expect("state");
        let sampler = Sampler::new(SamplingParams { temperature: 0.0, ..SamplingParams::default() });
        let limits = Limits { max_tokens: Some(n), end_of_generation: eog.to_vec(), ..Limits::default() };
        let mut seen = Vec::new();
        let steps = Generator::new(&loaded.model, state, sampler, prompt.clone(), limits).expect("generator");
        for step in steps {
            match step.expect("step") {
                Step::Prefilled => {}
                Step::Token(t) => seen.push(t),
                Step::Done(g) => return (g.finish, seen),
            }
        }
        panic!("the generator ended without Step::Done")
    };
    let (finish, free) = greedy(tok.end_of_generation_ids(), 6);
    assert_eq!((finish, free.len()), (FinishReason::Length, 6));
    // Force the third token to be an end-of-generation token: generation stops before it.
    let forced = [tok.end_of_generation_ids(), &[free[2]]].concat();
    let (finish, seen) = greedy(&forced, 6);
    assert_eq!(finish, FinishReason::Eos);
    assert_eq!(seen, free[..2]);
}

#[test]
fn chat_template_and_verbose_prompt() {
    let model = test_model();
    let plain = streamgen()
        .model(&model)
        .args(["--chat-template", "gemma", "--temperature", "0", "-n", "8", "Name three colors."])
        .run();
    plain.assert_success();
    let verbose = streamgen()
        .model(&model)
        .args([
            "--chat-template",
            "gemma",
            "--temperature",
            "0",
            "-n",
            "8",
            "--verbose-prompt",
            "Name three colors.",
        ])
        .run();
    verbose.assert_success();
    assert_eq!(plain.stdout_bytes(), verbose.stdout_bytes(), "--verbose-prompt must not change stdout");
    let stderr = verbose.stderr();
    assert!(
        stderr.contains("<bos><start_of_turn>user\nName three colors.<end_of_turn>\n<start_of_turn>model\n"),
        "{stderr}"
    );
    assert!(!stderr.contains("<bos><bos>"));
    // The template makes a difference: llama.cpp's greedy answer to this chat prompt begins
    // "Name three colors." (greedy.json), while raw completion continues the sentence.
    assert!(plain.stdout().starts_with("Name three colors."), "{}", plain.stdout());
    let raw = streamgen()
        .model(&model)
        .args(["--raw", "--temperature", "0", "-n", "8", "Name three colors."])
        .run();
    raw.assert_success();
    assert_ne!(raw.stdout_bytes(), plain.stdout_bytes());

    // A system message is folded into the user turn by Gemma's template.
    let sys = streamgen()
        .model(&model)
        .args(["--chat-template", "gemma", "-s", "Be brief.", "-n", "1", "--verbose-prompt", "Hi"])
        .run();
    sys.assert_success();
    let stderr = sys.stderr();
    assert!(stderr.contains("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>"), "{stderr}");
}

#[test]
fn stats_go_to_stderr_and_leave_stdout_alone() {
    let args = [GREEDY, &["-n", "10", FRANCE]].concat();
    let plain = streamgen().model(test_model()).args(&args).run();
    plain.assert_success();
    let with = streamgen().model(test_model()).args(&args).arg("--stats").run();
    with.assert_success();
    assert_eq!(plain.stdout_bytes(), with.stdout_bytes());
    let stderr = with.stderr();
    let line = stderr.lines().last().expect("a stats line");
    for part in ["prompt 6 tokens", "tok/s", "generated 10 tokens", "first token", "load"] {
        assert!(line.contains(part), "{line}");
    }
    assert!(plain.stderr().is_empty());
}

#[test]
fn json_lines_carry_the_same_text_and_a_final_summary() {
    let args = [GREEDY, &["-n", "12", FRANCE]].concat();
    let text = streamgen().model(test_model()).args(&args).stdout();
    let json = streamgen().model(test_model()).args(&args).arg("--json").stdout();
    let objects: Vec<serde_json::Value> =
        json.lines().map(|l| serde_json::from_str(l).expect("every line is JSON")).collect();
    let (last, chunks) = objects.split_last().expect("objects");
    let joined: String = chunks.iter().map(|o| o["text"].as_str().expect("text")).collect();
    assert_eq!(joined, text);
    assert!(chunks.iter().all(|o| o["token"].is_u64()));
    assert_eq!(last["finish_reason"], "length");
    assert_eq!(last["generated_tokens"], 12);
    assert_eq!(last["prompt_tokens"], 6);
    assert!(last["time_to_first_token_seconds"].as_f64().is_some_and(|t| t > 0.0));
}

#[test]
fn each_line_gives_one_output_line_per_input_line() {
    let input = "The capital of France is\n\nWrite two lines of a poem:\n1, 2, 3,\n";
    // One line at a time runs the same kernels as a prompt alone: the same answers, exactly
    // (with their newlines escaped).
    let model = test_model();
    let out = streamgen()
        .model(&model)
        .args(GREEDY)
        .args(["--each-line", "--parallel", "1", "-n", "12"])
        .stdin(input)
        .stdout();
    let lines: Vec<&str> = out.split_terminator('\n').collect();
    assert_eq!(lines.len(), 4, "{out:?}");
    assert_eq!(lines[1], "", "an empty input line gives an empty answer");
    assert!(lines[0].starts_with(" the capital of the country"), "{out:?}");
    let alone =
        streamgen().model(&model).args(GREEDY).args(["-n", "12", "Write two lines of a poem:"]).stdout();
    assert_eq!(lines[2], alone.replace('\\', "\\\\").replace('\n', "\\n"));
    // Decoded together (the default, 8 at once), every line gets exactly the same answer,
    // also when sampling with a seed: a line's result does not depend on its neighbours.
    let batched =
        streamgen().model(&model).args(GREEDY).args(["--each-line", "-n", "12"]).stdin(input).stdout();
    assert_eq!(batched, out);
    let sampled = |parallel: &str| {
        let args =
            ["--raw", "--each-line", "--seed", "5", "--temperature", "1", "-n", "12", "--parallel", parallel];
        streamgen().model(&model).args(args).stdin(input).stdout()
    };
    assert_eq!(sampled("1"), sampled("3"));

    let json = streamgen()
        .model(&model)
        .args(GREEDY)
        .args(["--each-line", "--json", "-n", "3"])
        .stdin(input)
        .stdout();
    let finals: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON"))
        .filter(|o| o.get("finish_reason").is_some())
        .collect();
    let numbers: Vec<u64> = finals.iter().map(|o| o["line"].as_u64().expect("line number")).collect();
    assert_eq!(numbers, [1, 2, 3, 4]);
}

#[test]
fn many_lines_at_once_sample_exactly_as_one_at_a_time() {
    // Seven lines: decoded together, their steps take the many-row kernel (from 5 sequences on,
    // where the CPU has it) instead of the few-row one; the same seed must still give the same
    // text, line for line.
    let input = "Name a colour.\nName a fruit.\nName a river.\nName a city.\nName a tree.\nName a bird.\nName a metal.\n";
    let sampled = |parallel: &str| {
        let args = ["--each-line", "--seed", "11", "--temperature", "1", "-n", "10", "--parallel", parallel];
        streamgen().model(test_model()).args(args).stdin(input).stdout()
    };
    let one = sampled("1");
    assert_eq!(one.lines().count(), 7, "{one:?}");
    assert_eq!(sampled("7"), one);
    assert_eq!(sampled("31"), one);
}

/// Issue 24's case: 32 one-line prompts, greedy, answered the same whatever `--parallel` and
/// whether the prompt cache is off, cold or warm (the shared instruction is long enough to be
/// stored, and the second cached run starts from it).
#[test]
fn thirty_two_lines_answer_the_same_at_any_parallel_and_with_the_cache_cold_or_warm() {
    let input: String =
        (1..=32).map(|i| format!("Item {i}: the {}th word of a list of animals is\n", i * 3)).collect();
    let instruction = "Complete each sentence with one animal name, then stop. Answer plainly, without \
                       explanations, lists, quotes or any other words; a sentence about a list of animals \
                       is finished by the name of an animal that could be in such a list, like cat, \
                       dog, horse, cow, sheep, goat, owl, fox, bear, wolf or deer.";
    let cache = tempfile::tempdir().expect("tempdir");
    let dir = cache.path().to_str().expect("UTF-8").to_string();
    let run = |parallel: &str, cache: &[&str]| {
        streamgen()
            .model(test_model())
            .args(GREEDY)
            .args(["-n", "24", "--each-line", "--parallel", parallel])
            .args(cache)
            .arg(instruction)
            .stdin(input.as_str())
            .stdout()
    };
    let one = run("1", &["--no-prompt-cache"]);
    assert_eq!(one.lines().count(), 32, "{one:?}");
    for parallel in ["8", "15", "31"] {
        assert_eq!(run(parallel, &["--no-prompt-cache"]), one, "--parallel {parallel}");
    }
    assert_eq!(run("8", &["--prompt-cache", &dir]), one, "a cold cache");
    assert!(std::fs::read_dir(&dir).expect("the cache folder").next().is_some(), "the instruction is stored");
    assert_eq!(run("15", &["--prompt-cache", &dir]), one, "a warm cache");
}

#[test]
fn escape_sequences_never_reach_a_terminal_raw() {
    // A prompt that makes the model continue a pattern of ANSI colour codes.
    let prompt = "colors: \x1b[31mred\x1b[0m, \x1b[32mgreen\x1b[0m, \x1b[34mblue\x1b[0m, \x1b[31mred\x1b[0m, \
                  \x1b[32mgreen\x1b[0m, \x1b[34mblue\x1b[0m, \x1b[31mred\x1b[0m,";
    let args = [GREEDY, &["-n", "12", prompt]].concat();
    let piped = streamgen().model(test_model()).args(&args).run();
    piped.assert_success();
    assert!(piped.stdout_bytes().contains(&0x1b), "the model must emit ESC for this test to mean anything");

    // Under a pseudo-terminal (util-linux `script`), the same output has no raw ESC.
    let mut shell_cmd = format!("'{}' -m '{}'", env!("CARGO_BIN_EXE_streamgen"), test_model().display());
    for a in &args {
        shell_cmd.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
    }
    let home = tempfile::tempdir().expect("tempdir");
    let out = Command::new("script")
        .args(["-qec", &shell_cmd, "/dev/null"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        // The terminal keeps the test's own HOME: nothing may be logged there.
        .env("STREAMGEN_LOG", "0")
        .stdin(Stdio::null())
        .output()
        .expect("run `script` (util-linux) to get a pseudo-terminal");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(!out.stdout.contains(&0x1b), "raw ESC reached the terminal: {shown:?}");
    assert!(shown.contains('\u{241b}'), "ESC should show as ␛: {shown:?}");
}

#[test]
fn error_colour_only_on_a_terminal_and_never_with_no_color() {
    // Run a failing command (missing model) under a pseudo-terminal, with and without NO_COLOR.
    let home = tempfile::tempdir().expect("tempdir");
    let missing = home.path().join("missing.gguf");
    let cmd = format!("'{}' -m '{}' hello", env!("CARGO_BIN_EXE_streamgen"), missing.display());
    let under_pty = |no_color: bool| {
        let mut c = Command::new("script");
        c.args(["-qec", &cmd, "/dev/null"])
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .env("STREAMGEN_LOG", "0");
        c.stdin(Stdio::null());
        if no_color {
            c.env("NO_COLOR", "1");
        } else {
            c.env_remove("NO_COLOR");
        }
        let out = c.output().expect("run `script` (util-linux) to get a pseudo-terminal");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = under_pty(false);
    assert!(coloured.contains("\x1b[1;31merror\x1b[0m"), "{coloured:?}");
    let plain = under_pty(true);
    assert!(plain.contains("streamgen: error: ") && !plain.contains('\x1b'), "{plain:?}");
    // A pipe never gets colour.
    let out = streamgen().env_remove("NO_COLOR").model(&missing).arg("hello").run();
    assert!(!out.stderr().contains('\x1b'), "{}", out.stderr());
}

/// On the local engine too, a line that fails (a prompt too long for the context) gives an
/// empty output line and its error on stderr, and the line after it is still answered.
#[test]
fn a_refused_line_leaves_the_next_line_answered() {
    let long = "x ".repeat(60_000);
    let input = format!("Name a colour.\n{long}\nName a fruit.\n");
    let args = [GREEDY, &["--each-line", "--ctx-size", "64", "-n", "4"]].concat();
    let out = streamgen().model(test_model()).args(&args).stdin(input).run();
    out.assert_exit(1);
    let stdout = out.stdout();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout:?}");
    assert!(!lines[0].is_empty() && lines[1].is_empty() && !lines[2].is_empty(), "{stdout:?}");
    let err = out.stderr();
    assert!(err.contains("streamgen: error: line 2:") && err.contains("1 of 3 lines failed"), "{err}");
}
