//! The core filter on the real model: logits against llama.cpp's references, and the
//! executable's streaming, pipe, exit-code and determinism behaviour.

use std::io::Read;
use std::time::Instant;

use serde::Deserialize;
use streamgen::engine;
use streamgen::model::{Model, Segment, logits_vec};

use crate::support::{Done, streamgen, test_data, test_model, test_model_smollm2};

#[derive(Deserialize)]
pub(crate) struct GreedyCase {
    pub(crate) prompt: String,
    pub(crate) prompt_ids: Vec<u32>,
    pub(crate) greedy_ids: Vec<u32>,
    top5_per_step: Vec<Vec<(u32, f32)>>,
}

/// Positions compared and positions that agree, per the reference README's rules.
#[derive(Default)]
pub(crate) struct Agreement {
    pub(crate) compared: usize,
    pub(crate) argmax_checked: usize,
    /// Steps where llama.cpp's choice was clear and ours differs.
    pub(crate) argmax_failures: Vec<String>,
    /// |our logit - llama.cpp's| for every top-5 entry, with a label.
    logit_diffs: Vec<(f32, String)>,
}

impl Agreement {
    pub(crate) fn within(&self, tolerance: f32) -> usize {
        self.logit_diffs.iter().filter(|(d, _)| *d <= tolerance).count()
    }

    pub(crate) fn mean(&self) -> f32 {
        self.logit_diffs.iter().map(|(d, _)| d).sum::<f32>() / self.logit_diffs.len().max(1) as f32
    }

    pub(crate) fn max(&self) -> f32 {
        self.logit_diffs.iter().map(|(d, _)| *d).fold(0.0, f32::max)
    }

    /// Prints the figures and asserts the README's rules: the argmax everywhere llama.cpp's
    /// lead is over 0.5, and the top-5 logits within about 1.0.
    ///
    /// This model is numerically chaotic: llama.cpp itself moves its logits by up to 2.7
    /// against the shared reference when only its CPU code path changes (AVX2 vs AVX-512, flash
    /// attention on or off, batched or one token at a time; see tests/data/gemma3-270m/README.md),
    /// with about 1% of entries beyond 1.0. So "about 1.0" is asserted as: at least 95% of the
    /// entries within 1.0, at least 99% within 2.5, and a mean difference under 0.35 (ours is
    /// about 0.2 to 0.3). A real bug (a wrong rope base, norm, scale or window) moves the logits
    /// by several units at most positions and fails all three.
    fn check(&self, name: &str) {
        let n = self.logit_diffs.len();
        let within = self.within(1.0);
        eprintln!(
            "{name}: argmax agrees at {}/{} clear steps ({} positions); top-5 logits within 1.0: {within}/{n}, \
             within 2.5: {}/{n}, mean |diff| {:.3}, max {:.3}",
            self.argmax_checked - self.argmax_failures.len(),
            self.argmax_checked,
            self.compared,
            self.within(2.5),
            self.mean(),
            self.max()
        );
        assert!(n > 0 && self.argmax_checked > 0);
        assert!(
            self.argmax_failures.is_empty(),
            "argmax disagreements:\n{}",
            self.argmax_failures.join("\n")
        );
        let outliers: Vec<String> =
            self.logit_diffs.iter().filter(|(d, _)| *d > 1.0).map(|(_, l)| l.clone()).collect();
        assert!(
            within * 100 >= n * 95,
            "{} of {n} logits differ by more than 1.0:\n{}",
            n - within,
            outliers.join("\n")
        );
        assert!(self.within(2.5) * 100 >= n * 99, "logits beyond 2.5:\n{}", outliers.join("\n"));
        assert!(self.mean() < 0.35, "mean logit difference {}", self.mean());
    }
}

pub(crate) fn compare_teacher_forced(cases: &[GreedyCase], loaded: &engine::Loaded) -> Agreement {
    for case in cases {
        let tokenized = loaded.tokenizer.encode(&case.prompt, true, true);
        assert_eq!(tokenized, case.prompt_ids, "our tokenization of the prompt differs from llama.cpp's");
    }
    compare_logits(cases, &loaded.model, 0, false)
}

/// Teacher forcing on llama.cpp's own greedy output, from its prompt ids, in a context of at
/// least `context` tokens (Phi-3's rope depends on it): the forced tokens in one batch, or
/// (`stepwise`) one at a time, as decoding feeds them.
pub(crate) fn compare_logits(
    cases: &[GreedyCase],
    model: &Model,
    context: usize,
    stepwise: bool,
) -> Agreement {
    let mut agreement = Agreement::default();
    for case in cases {
        let len = case.prompt_ids.len() + case.greedy_ids.len();
        let mut state = model.new_state(len.max(context)).expect("state");
        // Row 0: logits after the prompt; rows 1..: after each forced greedy token.
        let first = streamgen::generate::prefill(model, &mut state, &case.prompt_ids).expect("prefill");
        let n = case.greedy_ids.len();
        let mut rows = vec![first];
        if stepwise {
            for &t in &case.greedy_ids[..n - 1] {
                rows.push(logits_vec(&model.forward(&mut state, &[t]).expect("forward")).expect("logits"));
            }
        } else {
            let rest = model.forward_all(&mut state, &case.greedy_ids[..n - 1]).expect("forward_all");
            for i in 0..n - 1 {
                rows.push(logits_vec(&rest.get(i).expect("row")).expect("logits"));
            }
        }
        for (k, (ours, top5)) in rows.iter().zip(&case.top5_per_step).enumerate() {
            agreement.compared += 1;
            let label = format!("prompt {:?}… step {k}", case.prompt.chars().take(30).collect::<String>());
            if top5[0].1 - top5[1].1 > 0.5 {
                agreement.argmax_checked += 1;
                let ours_argmax = streamgen::sample::argmax(ours);
                if ours_argmax != case.greedy_ids[k] {
                    agreement
                        .argmax_failures
                        .push(format!("{label}: argmax {ours_argmax}, llama.cpp {}", case.greedy_ids[k]));
                }
            }
            for &(id, theirs) in top5 {
                let mine = ours[id as usize];
                let entry = format!("{label}: logit of {id} is {mine:.3}, llama.cpp {theirs:.3}");
                agreement.logit_diffs.push(((mine - theirs).abs(), entry));
            }
        }
    }
    agreement
}

fn load_cases(path: &std::path::Path) -> Vec<GreedyCase> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

fn loaded_model() -> engine::Loaded {
    engine::load(test_model()).expect("load the test model")
}

#[test]
fn teacher_forced_logits_match_llama_cpp() {
    let loaded = loaded_model();
    let cases = load_cases(&test_data("gemma3-270m/greedy.json"));
    compare_teacher_forced(&cases, &loaded).check("greedy.json");
}

#[test]
fn teacher_forced_logits_match_llama_cpp_beyond_the_sliding_window() {
    let loaded = loaded_model();
    let cases = load_cases(&test_data("gemma3-270m/greedy-long.json"));
    assert!(cases.iter().any(|c| c.prompt_ids.len() > 1000), "the long references must exceed 1,000 tokens");
    compare_teacher_forced(&cases, &loaded).check("greedy-long.json");
}

/// SmolLM2 (`llama`: adjacent-pair rope, SwiGLU, grouped-query attention, Q4_1 weights) on
/// raw and chat-rendered prompts.
#[test]
fn smollm2_teacher_forced_logits_match_llama_cpp() {
    let loaded = engine::load(test_model_smollm2()).expect("load SmolLM2");
    let cases = load_cases(&test_data("smollm2-135m/greedy.json"));
    compare_teacher_forced(&cases, &loaded).check("smollm2-135m/greedy.json");
}

/// SmolLM2 on three prompts of 749 to 1,866 tokens (one a chat turn).
#[test]
fn smollm2_teacher_forced_logits_match_llama_cpp_on_long_prompts() {
    let loaded = engine::load(test_model_smollm2()).expect("load SmolLM2");
    let cases = load_cases(&test_data("smollm2-135m/greedy-long.json"));
    assert!(cases.iter().any(|c| c.prompt_ids.len() > 1000), "the long references must exceed 1,000 tokens");
    compare_teacher_forced(&cases, &loaded).check("smollm2-135m/greedy-long.json");
}

#[test]
fn incremental_decoding_agrees_with_one_batch() {
    // The KV-cache path (one token at a time, quantized activations) and the batched path (a
    // float GEMM) compute the same function with different rounding. On this chaotic model that
    // alone moves single logits by a few units at a few positions (llama.cpp behaves the same
    // between its batched and one-token paths); a cache bug (a wrong position, a stale or
    // missing key) moves all of them and changes the argmax.
    let loaded = loaded_model();
    let text = "The quick brown fox jumps over the lazy dog because it wanted to see what was on the \
                other side of the river, where the farmer kept his geese.";
    let ids = loaded.tokenizer.encode(text, true, true);
    let mut batch = loaded.model.new_state(128).expect("state");
    let all = loaded.model.forward_all(&mut batch, &ids).expect("batch");
    let mut step = loaded.model.new_state(128).expect("state");
    let (mut sum, mut max, mut n, mut argmax_diff) = (0f32, 0f32, 0usize, 0usize);
    for (i, &id) in ids.iter().enumerate() {
        let one = logits_vec(&loaded.model.forward(&mut step, &[id]).expect("step")).expect("logits");
        let row = logits_vec(&all.get(i).expect("row")).expect("logits");
        for (a, b) in one.iter().zip(&row) {
            let d = (a - b).abs();
            sum += d;
            max = max.max(d);
            n += 1;
        }
        let mut sorted = row.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 0.5 && streamgen::sample::argmax(&one) != streamgen::sample::argmax(&row) {
            argmax_diff += 1;
        }
    }
    let mean = sum / n as f32;
    eprintln!("incremental vs batched over {} positions: mean |diff| {mean:.4}, max {max:.3}", ids.len());
    assert_eq!(argmax_diff, 0, "the argmax differs at {argmax_diff} clear positions");
    assert!(mean < 0.35, "incremental and batched logits differ: mean {mean}, max {max}");
}

#[test]
fn a_batch_of_lines_agrees_with_each_line_alone() {
    // `--each-line` decodes several sequences in one forward pass, at different positions and
    // lengths. Teacher-forced on each sequence's own greedy tokens, every row of the batch must
    // agree with the same sequence decoded alone: the argmax at clear steps, and the logits
    // within the rounding differences of the batched kernels (a row reading another
    // sequence's cache or position would move them all).
    let loaded = loaded_model();
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let prompts =
        ["The capital of France is", "Write two lines of a poem:", "1, 2, 3,", "My favourite food is"];
    let steps = 16;
    let mut alone_tokens = Vec::new();
    let mut alone_logits = Vec::new();
    for p in prompts {
        let ids = tok.encode(p, true, true);
        let mut state = model.new_state(256).expect("state");
        let mut logits = logits_vec(&model.forward(&mut state, &ids).expect("prompt")).expect("logits");
        let (mut toks, mut rows) = (Vec::new(), Vec::new());
        for _ in 0..steps {
            let t = streamgen::sample::argmax(&logits);
            rows.push(logits.clone());
            toks.push(t);
            logits = logits_vec(&model.forward(&mut state, &[t]).expect("step")).expect("logits");
        }
        alone_tokens.push(toks);
        alone_logits.push(rows);
    }
    // All four together: the prompts in one pass, then one token each per pass.
    let mut states: Vec<_> = prompts.iter().map(|_| model.new_state(256).expect("state")).collect();
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(p, true, true)).collect();
    let (mut sum, mut max, mut n, mut clear_misses) = (0f32, 0f32, 0usize, Vec::new());
    for step in 0..steps {
        let feeds: Vec<Vec<u32>> =
            if step == 0 { ids.clone() } else { alone_tokens.iter().map(|t| vec![t[step - 1]]).collect() };
        let mut segments: Vec<Segment<'_>> =
            states.iter_mut().zip(&feeds).map(|(state, tokens)| Segment { state, tokens }).collect();
        let batch = model.forward_batch(&mut segments).expect("batch");
        for (i, alone) in alone_logits.iter().enumerate() {
            let row = logits_vec(&batch.get(i).expect("row")).expect("logits");
            for (a, b) in row.iter().zip(&alone[step]) {
                let d = (a - b).abs();
                sum += d;
                max = max.max(d);
                n += 1;
            }
            let mut sorted = alone[step].clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > 0.5 && streamgen::sample::argmax(&row) != alone_tokens[i][step] {
                clear_misses.push(format!("line {i} step {step}"));
            }
        }
    }
    let mean = sum / n as f32;
    eprintln!("batch vs alone over {} rows: mean |diff| {mean:.4}, max {max:.3}", prompts.len() * steps);
    assert!(clear_misses.is_empty(), "the argmax differs at clear steps: {clear_misses:?}");
    assert!(mean < 0.35 && max < 3.0, "batched rows differ from each line alone: mean {mean}, max {max}");
}

// ---- the executable ----

const GREEDY: &[&str] = &["--temperature", "0", "-n", "24"];

#[test]
fn greedy_completion_is_sensible_and_args_equal_stdin() {
    let by_args = streamgen().model(test_model()).args(GREEDY).arg("The capital of France is").stdout();
    // llama.cpp's greedy continuation of this prompt (greedy.json) begins " the capital of the
    // country of France."; ours must agree up to " country". The next step is a near-tie in
    // llama.cpp itself (" of" leads "." by 0.39, less than llama.cpp's own spread between its
    // code paths), so from there a greedy path may take either; the teacher-forced test checks
    // the logits of every step instead.
    assert!(by_args.starts_with(" the capital of the country"), "unexpected completion: {by_args:?}");
    let by_stdin = streamgen().model(test_model()).args(GREEDY).stdin("The capital of France is\n").stdout();
    assert_eq!(by_args, by_stdin, "the prompt as arguments and as piped stdin must give the same answer");
}

#[test]
fn no_stream_output_equals_streamed_output() {
    let prompt = "Write a short list of fruits:";
    let streamed = streamgen().model(test_model()).args(GREEDY).arg(prompt).stdout();
    let whole = streamgen().model(test_model()).args(GREEDY).args(["--no-stream", prompt]).stdout();
    assert!(!streamed.is_empty());
    assert_eq!(streamed, whole);
}

#[test]
fn same_seed_same_output_and_seeds_matter() {
    let args = |seed: &'static str| -> Vec<&'static str> {
        vec!["--temperature", "1.0", "--seed", seed, "-n", "24", "Once upon a time"]
    };
    let a = streamgen().model(test_model()).args(args("42")).stdout();
    let b = streamgen().model(test_model()).args(args("42")).stdout();
    assert_eq!(a, b);
    let others: Vec<String> =
        ["1", "2", "3"].iter().map(|s| streamgen().model(test_model()).args(args(s)).stdout()).collect();
    assert!(others.iter().any(|o| *o != a), "different seeds always gave the same text: {a:?}");
}

#[test]
fn greedy_output_is_the_same_with_one_and_two_threads() {
    let one =
        streamgen().model(test_model()).args(GREEDY).args(["--threads", "1", "The history of Rome"]).stdout();
    let two =
        streamgen().model(test_model()).args(GREEDY).args(["--threads", "2", "The history of Rome"]).stdout();
    assert_eq!(one, two);
}

#[test]
fn tokens_are_streamed_as_they_are_decoded() {
    let start = Instant::now();
    let mut child = streamgen()
        .model(test_model())
        .args(["--temperature", "0", "-n", "64", "Tell me a long story about a dragon."])
        .spawn();
    let mut stdout = child.stdout.take().expect("stdout");
    let mut arrivals = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stdout.read(&mut buf).expect("read stdout");
        if n == 0 {
            break;
        }
        arrivals.push(start.elapsed());
    }
    child.finish().assert_success();
    // The answer is a few hundred bytes: written at the end, one read would return it all.
    // (No assertion on timing: CI machines are slow and shared.)
    assert!(arrivals.len() >= 10, "only {} reads returned data: output was not streamed", arrivals.len());
}

#[test]
fn a_reader_closing_the_pipe_ends_the_run_quietly() {
    // With --stats, a run that went on to the end would print its stats line on stderr; one
    // that stopped at the closed pipe prints nothing.
    let mut child = streamgen()
        .model(test_model())
        .args(["--temperature", "0", "-n", "500", "--stats", "Count from one to a thousand:"])
        .spawn();
    let mut stdout = child.stdout.take().expect("stdout");
    let mut five = [0u8; 5];
    stdout.read_exact(&mut five).expect("read 5 bytes"); // like `| head -c 5`
    drop(stdout);
    let out = child.finish();
    out.assert_exit(0);
    assert!(out.stderr().is_empty(), "generation went on after the pipe closed: {}", out.stderr());
}

#[test]
fn ctrl_c_stops_after_the_current_token_and_exits_130() {
    let mut child = streamgen()
        .model(test_model())
        .args(["--temperature", "0", "-n", "2000", "Count from one to a thousand:"])
        .spawn();
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).expect("first byte");
    child.interrupt();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).expect("read the rest");
    child.finish().assert_exit(130);
    let text = [&first[..], &rest].concat();
    assert!(String::from_utf8(text).is_ok(), "the flushed text must be whole UTF-8");
}

#[test]
fn an_empty_prompt_is_a_usage_error() {
    streamgen().model(test_model()).run().assert_exit(2);
    let out = streamgen().model(test_model()).stdin("  \n").run();
    out.assert_exit(2);
    let stderr = out.stderr();
    assert!(stderr.starts_with("streamgen: error: ") && stderr.contains("prompt is empty"), "{stderr}");
}

fn one_line_error(out: &Done) -> String {
    out.assert_exit(1);
    assert!(out.stdout_bytes().is_empty(), "{out}");
    let stderr = out.stderr();
    assert_eq!(stderr.lines().count(), 1, "the error must be one line: {stderr:?}");
    assert!(stderr.starts_with("streamgen: error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn bad_model_files_give_a_one_line_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.gguf");
    let err = one_line_error(&streamgen().model(&missing).arg("hello").run());
    assert!(err.contains("missing.gguf"), "{err}");

    let not_gguf = dir.path().join("notes.gguf");
    std::fs::write(&not_gguf, "this is not a model").expect("write");
    let err = one_line_error(&streamgen().model(&not_gguf).arg("hello").run());
    assert!(err.contains("notes.gguf") && err.contains("not a GGUF"), "{err}");

    let truncated = dir.path().join("truncated.gguf");
    let head =
        std::fs::read(test_model()).expect("read model").into_iter().take(100_000).collect::<Vec<u8>>();
    std::fs::write(&truncated, head).expect("write");
    let err = one_line_error(&streamgen().model(&truncated).arg("hello").run());
    assert!(err.contains("truncated.gguf"), "{err}");
}

#[test]
fn an_unsupported_architecture_is_named() {
    use candle_core::quantized::gguf_file::{Value, write};
    use candle_core::quantized::{GgmlDType, QTensor};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mamba.gguf");
    let mut f = std::fs::File::create(&path).expect("create");
    let arch = Value::String("mamba".into());
    let tensor = QTensor::quantize(
        &candle_core::Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu).expect("t"),
        GgmlDType::F32,
    )
    .expect("q");
    write(&mut f, &[("general.architecture", &arch)], &[("token_embd.weight", &tensor)]).expect("write gguf");
    drop(f);
    let err = one_line_error(&streamgen().model(&path).arg("hello").run());
    assert!(err.contains("mamba"), "{err}");
}
