//! Reasoning models on the local engine, end to end: the real executable on a tiny synthetic
//! "reasoning model" written here with candle's `gguf_file::write`. Its vocabulary has
//! `<think>` and `</think>` as user-defined tokens (as Qwen3's and the R1 distills' GGUF files
//! do), and its weights make greedy decoding a fixed function of the last token: one-hot
//! embeddings, zero attention and feed-forward weights (the residual carries the embedding
//! through), and an output matrix with one entry per token naming its successor. So the
//! prompt's last token (chosen by the chat template) picks which scripted output follows.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value as Json;

use crate::support::{Done, TestCommand, streamgen};

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER: i32 = 4;
const BYTE: i32 = 6;

/// The vocabulary: text and token type.
const VOCAB: &[(&str, i32)] = &[
    ("<unk>", UNKNOWN),        // 0
    ("<s>", CONTROL),          // 1
    ("</s>", CONTROL),         // 2
    ("<think>", USER),         // 3
    ("</think>", USER),        // 4
    ("<|im_start|>", CONTROL), // 5: the usual generation prompt: the model thinks
    ("<|b|>", CONTROL),        // 6: the tags written as ordinary text pieces
    ("<|c|>", CONTROL),        // 7: an answer without reasoning
    ("<0x0A>", BYTE),          // 8: "\n"
    ("▁Hmm", NORMAL),          // 9
    (",", NORMAL),             // 10
    ("▁let", NORMAL),          // 11
    ("▁me", NORMAL),           // 12
    ("▁think", NORMAL),        // 13
    (".", NORMAL),             // 14
    ("\n", NORMAL),            // 15
    ("\n\n", NORMAL),          // 16
    ("▁Paris", NORMAL),        // 17
    ("!", NORMAL),             // 18
    ("<thi", NORMAL),          // 19
    ("nk>", NORMAL),           // 20
    ("▁Why", NORMAL),          // 21
    ("</th", NORMAL),          // 22
    ("ink>", NORMAL),          // 23
    ("▁Rome", NORMAL),         // 24
    ("▁Hello", NORMAL),        // 25
];

/// Each token's successor under greedy decoding; every other token is followed by `</s>`.
const NEXT: &[(u32, u32)] = &[
    // <|im_start|> <think> \n Hmm , let me think . \n </think> \n\n Paris ! </s>
    (5, 3),
    (3, 8),
    (8, 9),
    (9, 10),
    (10, 11),
    (11, 12),
    (12, 13),
    (13, 14),
    (14, 15),
    (15, 4),
    (4, 16),
    (16, 17),
    (17, 18),
    (18, 2),
    // <|b|> "<thi" "nk>" Why "</th" "ink>" Rome </s>
    (6, 19),
    (19, 20),
    (20, 21),
    (21, 22),
    (22, 23),
    (23, 24),
    (24, 2),
    // <|c|> Hello </s>
    (7, 25),
    (25, 2),
];

/// Writes the model to `path`.
fn write_model(path: &Path) {
    let n = VOCAB.len();
    let (head_dim, ff) = (8usize, 8usize);
    let key = |k: &str| format!("llama.{k}");
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (key("block_count"), Value::U32(1)),
        (key("embedding_length"), Value::U32(n as u32)),
        (key("feed_forward_length"), Value::U32(ff as u32)),
        (key("attention.head_count"), Value::U32(1)),
        (key("attention.head_count_kv"), Value::U32(1)),
        (key("attention.key_length"), Value::U32(head_dim as u32)),
        (key("context_length"), Value::U32(256)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (key("rope.freq_base"), Value::F32(1e4)),
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(VOCAB.iter().map(|e| Value::String(e.0.into())).collect()),
        ),
        ("tokenizer.ggml.scores".into(), Value::Array(VOCAB.iter().map(|_| Value::F32(0.0)).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(VOCAB.iter().map(|e| Value::I32(e.1)).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
    ];
    let mut identity = vec![0f32; n * n];
    let mut output = vec![0f32; n * n];
    for i in 0..n {
        identity[i * n + i] = 1.0;
        let next = NEXT.iter().find(|&&(from, _)| from as usize == i).map_or(2, |&(_, to)| to as usize);
        // output.weight is (vocab, embd): row `next`, column `i`.
        output[next * n + i] = 1.0;
    }
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: &str, shape: &[usize], data: Vec<f32>| {
        let t = Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor");
        tensors.push((name.to_owned(), QTensor::quantize(&t, GgmlDType::F32).expect("quantize")));
    };
    add("token_embd.weight", &[n, n], identity);
    add("output.weight", &[n, n], output);
    add("output_norm.weight", &[n], vec![1.0; n]);
    for (name, shape) in [
        ("attn_q", [head_dim, n]),
        ("attn_k", [head_dim, n]),
        ("attn_v", [head_dim, n]),
        ("attn_output", [n, head_dim]),
        ("ffn_gate", [ff, n]),
        ("ffn_up", [ff, n]),
        ("ffn_down", [n, ff]),
    ] {
        add(&format!("blk.0.{name}.weight"), &shape, vec![0.0; shape[0] * shape[1]]);
    }
    add("blk.0.attn_norm.weight", &[n], vec![1.0; n]);
    add("blk.0.ffn_norm.weight", &[n], vec![1.0; n]);
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).expect("create the model file");
    gguf_file::write(&mut file, &meta, &refs).expect("write gguf");
}

/// The model and chat templates, in a temporary folder.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        write_model(&dir.path().join("think.gguf"));
        let templates = [
            // The user's turn, then the generation prompt: the model opens <think> itself.
            ("thinks.jinja", "{{ messages[-1].content }}<|im_start|>"),
            // DeepSeek-R1's way: the prompt ends inside an open <think>.
            ("opened.jinja", "{{ messages[-1].content }}<|im_start|><think>\n"),
            // The tags as ordinary text pieces.
            ("spelled.jinja", "{{ messages[-1].content }}<|b|>"),
            // Qwen3's switch: an empty reasoning block when thinking is off.
            (
                "switch.jinja",
                "{{ messages[-1].content }}{% if enable_thinking is defined and enable_thinking is false %}\
                 <|c|>{% else %}<|im_start|>{% endif %}",
            ),
        ];
        for (name, source) in templates {
            std::fs::write(dir.path().join(name), source).expect("write template");
        }
        Self { dir }
    }

    /// `streamgen -m think.gguf --chat-template TEMPLATE --temperature 0`, for the test's
    /// arguments and stdin.
    fn chat(&self, template: &str) -> TestCommand {
        streamgen()
            .model(self.dir.path().join("think.gguf"))
            .arg("--chat-template")
            .arg(self.dir.path().join(template))
            .args(["--temperature", "0"])
    }

    /// `streamgen -m think.gguf --raw --temperature 0`.
    fn raw(&self) -> TestCommand {
        streamgen().model(self.dir.path().join("think.gguf")).args(["--raw", "--temperature", "0"])
    }
}

/// The stdout and stderr of a run that must succeed.
fn ok(out: &Done) -> (String, String) {
    out.assert_success();
    (out.stdout(), out.stderr())
}

#[test]
fn stdout_carries_only_the_answer_and_reasoning_goes_where_asked() {
    let f = Fixture::new();
    // Not a terminal: the reasoning goes nowhere by default.
    let (stdout, stderr) = ok(&f.chat("thinks.jinja").stdin("Capital?\n").run());
    assert_eq!(stdout, "Paris!");
    assert!(!stderr.contains("Hmm"), "{stderr}");

    let (stdout, stderr) =
        ok(&f.chat("thinks.jinja").args(["--reasoning", "stderr"]).stdin("Capital?\n").run());
    assert_eq!(stdout, "Paris!");
    assert!(stderr.contains("Hmm, let me think.\n"), "{stderr:?}");
    assert!(!stderr.contains("think>"), "no tags on stderr: {stderr:?}");

    let (stdout, _) = ok(&f.chat("thinks.jinja").args(["--reasoning", "stdout"]).stdin("Capital?\n").run());
    assert_eq!(stdout, "<think>\nHmm, let me think.\n</think>\n\nParis!");

    let (stdout, _) = ok(&f.chat("thinks.jinja").args(["--reasoning", "hide"]).stdin("Capital?\n").run());
    assert_eq!(stdout, "Paris!");
}

#[test]
fn a_prompt_that_opens_reasoning_and_tags_spelled_in_pieces_split_the_same_way() {
    let f = Fixture::new();
    let (stdout, _) = ok(&f.chat("opened.jinja").args(["--reasoning", "stdout"]).stdin("Capital?\n").run());
    assert_eq!(stdout, "<think>\nHmm, let me think.\n</think>\n\nParis!");
    let (stdout, _) = ok(&f.chat("spelled.jinja").args(["--reasoning", "stdout"]).stdin("Capital?\n").run());
    assert_eq!(stdout, "<think>\nWhy\n</think>\n\nRome");
    let (stdout, _) = ok(&f.chat("spelled.jinja").stdin("Capital?\n").run());
    assert_eq!(stdout, "Rome");
}

#[test]
fn json_has_reasoning_objects_apart_from_the_text() {
    let f = Fixture::new();
    let (stdout, _) = ok(&f.chat("thinks.jinja").arg("--json").stdin("Capital?\n").run());
    let lines: Vec<Json> =
        stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect();
    let joined = |key: &str| lines.iter().filter_map(|l| l[key].as_str()).collect::<String>();
    assert_eq!(joined("reasoning"), "Hmm, let me think.");
    assert_eq!(joined("text"), "Paris!");
    // The answer's text objects carry its token ids: Paris (17), ! (18).
    let ids: Vec<u64> =
        lines.iter().filter(|l| l["text"].is_string()).filter_map(|l| l["token"].as_u64()).collect();
    assert_eq!(ids, [17, 18]);
    let last = lines.last().expect("a summary line");
    assert_eq!(last["finish_reason"], "eos");
    assert_eq!(last["generated_tokens"], 13, "reasoning tokens count as generated: {last}");
}

#[test]
fn no_think_renders_the_template_with_thinking_off() {
    let f = Fixture::new();
    let (stdout, _) = ok(&f.chat("switch.jinja").args(["--reasoning", "stdout"]).stdin("Hi\n").run());
    assert_eq!(stdout, "<think>\nHmm, let me think.\n</think>\n\nParis!");
    let (stdout, _) =
        ok(&f.chat("switch.jinja").args(["--reasoning", "stdout", "--no-think"]).stdin("Hi\n").run());
    assert_eq!(stdout, " Hello");
    // A template without the switch: said on stderr, and the reasoning still kept off stdout.
    let (stdout, stderr) = ok(&f.chat("thinks.jinja").arg("--no-think").stdin("Hi\n").run());
    assert_eq!(stdout, "Paris!");
    assert!(stderr.contains("no enable_thinking switch"), "{stderr}");
}

#[test]
fn reasoning_that_runs_out_of_max_tokens_is_an_error_not_an_empty_answer() {
    let f = Fixture::new();
    // Three tokens: <think>, "\n", "Hmm". One: only <think>, no word of reasoning yet.
    // Ten: the reasoning is closed, the answer not begun.
    for n in ["3", "1", "10"] {
        let out = f.chat("thinks.jinja").args(["-n", n]).stdin("Capital?\n").run();
        let stderr = out.stderr();
        assert_eq!(out.code(), Some(1), "-n {n}: {stderr}");
        assert!(stderr.contains("raise -n"), "-n {n}: {stderr}");
        assert_eq!(out.stdout_bytes(), b"", "-n {n}");
    }
    // Twelve: the answer has begun, and -n cuts it as usual.
    let (stdout, _) = ok(&f.chat("thinks.jinja").args(["-n", "12"]).stdin("Capital?\n").run());
    assert_eq!(stdout, "Paris");
}

#[test]
fn stop_strings_apply_to_the_answer_only() {
    let f = Fixture::new();
    // "think" is in the reasoning and must not end the answer there.
    let (stdout, _) =
        ok(&f.chat("thinks.jinja").args(["--stop", "think", "--stop", "!"]).stdin("Capital?\n").run());
    assert_eq!(stdout, "Paris");
}

#[test]
fn each_line_splits_every_line_in_a_batch() {
    let f = Fixture::new();
    let (stdout, _) =
        ok(&f.chat("thinks.jinja").args(["--each-line", "--parallel", "3"]).stdin("a\nb\n\nc\n").run());
    assert_eq!(stdout, "Paris!\nParis!\n\nParis!\n");
    let (stdout, _) =
        ok(&f.chat("spelled.jinja").args(["--each-line", "--reasoning", "stdout"]).stdin("a\nb\n").run());
    assert_eq!(stdout, "<think>\\nWhy\\n</think>\\n\\nRome\n".repeat(2));
}

/// `--raw` is plain completion: the model's text verbatim, tags included, as llama-server's
/// and vLLM's completion endpoints return it.
#[test]
fn raw_completion_is_never_split() {
    let f = Fixture::new();
    let (stdout, _) = ok(&f.raw().stdin("<|im_start|>\n").run());
    assert_eq!(stdout, "<think>\n Hmm, let me think.\n</think>\n\n Paris!");
    let out = f.raw().arg("--no-think").stdin("x\n").run();
    assert_eq!(out.code(), Some(2), "--no-think needs a chat template");
}
