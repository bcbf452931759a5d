//! Chat templates against their real sources: the Gemma 3, Qwen2.5 (ChatML) and Llama 3.x
//! templates as those models' GGUF files carry them (plus Gemma 2, which rejects system
//! messages, and Qwen3, rendered with and without `enable_thinking=false`), rendered by
//! `streamgen::chat` and compared with what Python's jinja2 renders under transformers'
//! settings (`tests/data/templates/expected.json`, written by `gen_expected.py` beside it). The
//! three built-in templates are read from their only copy, `src/chat/templates`. And the
//! rendered Gemma prompt's token ids on the real test model, with exactly one BOS.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value as Json;
use streamgen::chat::{self, ChatTemplate, RenderContext};
use streamgen::gguf::Gguf;
use streamgen::tokenizer::Tokenizer;

use crate::support;

fn templates_dir() -> PathBuf {
    support::test_data("templates")
}

/// The file a built-in template is compiled from (`include_str!` in `src/chat/mod.rs`).
fn builtin_file(name: &str) -> PathBuf {
    let file = match name {
        "gemma" => "gemma3.jinja",
        "chatml" => "chatml.jinja",
        "llama3" => "llama3.jinja",
        _ => panic!("no file for the built-in {name}"),
    };
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/chat/templates").join(file)
}

/// The template file a case renders: a built-in's own file, else one in `tests/data/templates`.
/// expected.json names the built-ins by their llama.cpp file names, where they come from.
fn case_file(case: &Json) -> PathBuf {
    match case["builtin"].as_str() {
        Some(name) => builtin_file(name),
        None => templates_dir().join(text(case, "template")),
    }
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e} (the templates come from the llama-cpp-python sdist's \
             vendor/llama.cpp/models/templates; expected.json from gen_expected.py)",
            path.display()
        )
    })
}

fn expected() -> Json {
    let path = templates_dir().join("expected.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn text(case: &Json, key: &str) -> String {
    case[key].as_str().unwrap_or_else(|| panic!("{key} missing in {case}")).to_owned()
}

/// The render context gen_expected.py used: that case's tokens, its `enable_thinking` (unset
/// unless the case sets it) and its fixed clock.
fn context(case: &Json, fixed: u64) -> RenderContext {
    RenderContext {
        now: Some(UNIX_EPOCH + Duration::from_secs(fixed)),
        enable_thinking: case["enable_thinking"].as_bool(),
        ..RenderContext::new(text(case, "bos_token"), text(case, "eos_token"))
    }
}

/// A case's name in a failure: its input and its `enable_thinking`.
fn label(case: &Json) -> String {
    format!("{}, enable_thinking={}", text(case, "input"), case["enable_thinking"])
}

#[test]
fn real_templates_render_exactly_as_python_jinja2_does() {
    let expected = expected();
    let fixed = expected["fixed_time_unix"].as_u64().expect("fixed_time_unix");
    let cases = expected["cases"].as_array().expect("cases");
    assert!(cases.len() >= 24, "expected.json has {} cases", cases.len());
    // Qwen3 both ways: thinking by default, an empty reasoning block with enable_thinking=false.
    let qwen3: Vec<&Json> = cases.iter().filter(|c| c["template"] == "Qwen-Qwen3-0.6B.jinja").collect();
    let think_block = |c: &&&Json| text(c, "expected").ends_with("<think>\n\n</think>\n\n");
    assert!(qwen3.iter().filter(|c| c["enable_thinking"].is_null()).all(|c| !think_block(&c)));
    assert!(qwen3.iter().filter(|c| c["enable_thinking"] == false).all(|c| think_block(&c)));
    assert_eq!(qwen3.len(), 6);
    let mut failures = Vec::new();
    for case in cases {
        let file = text(case, "template");
        let template = ChatTemplate::from_source(&read(&case_file(case)))
            .unwrap_or_else(|e| panic!("{file} does not compile: {e:#}"));
        let system = case["system"].as_str();
        let user = text(case, "user");
        let want = text(case, "expected");
        match template.render_prompt(system, &user, &context(case, fixed)) {
            Ok(got) if got == want => {}
            Ok(got) => failures.push(format!("{file}, {}:\n  want {want:?}\n  got  {got:?}", label(case))),
            Err(e) => failures.push(format!("{file}, {}: error {e:#}", label(case))),
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn builtins_are_the_real_templates() {
    let expected = expected();
    let fixed = expected["fixed_time_unix"].as_u64().expect("fixed_time_unix");
    let mut seen = Vec::new();
    for case in expected["cases"].as_array().expect("cases") {
        let Some(name) = case["builtin"].as_str() else {
            continue;
        };
        let file = builtin_file(name);
        let builtin = ChatTemplate::builtin(name).expect("built-in exists");
        assert_eq!(builtin.source(), read(&file), "{name} vs {}", file.display());
        let got = builtin
            .render_prompt(case["system"].as_str(), &text(case, "user"), &context(case, fixed))
            .expect("renders");
        assert_eq!(got, text(case, "expected"), "{name}, {}", text(case, "input"));
        seen.push(name.to_owned());
    }
    seen.dedup();
    assert_eq!(seen, chat::BUILTIN_NAMES);
}

#[test]
fn system_prompt_is_folded_where_the_template_has_no_system_role() {
    // Gemma 2 raises "System role not supported"; the prompt must still come out.
    let template = ChatTemplate::from_arg(
        templates_dir().join("google-gemma-2-2b-it.jinja").to_str().expect("utf-8 path"),
    )
    .expect("loads");
    let ctx = RenderContext::new("<bos>", "<eos>");
    let messages = [chat::Message::new("system", "Be brief."), chat::Message::new("user", "Hi")];
    let err = template.render(&messages, &ctx).expect_err("must fail");
    assert!(format!("{err:#}").contains("System role not supported"), "{err:#}");
    assert_eq!(
        template.render_prompt(Some("Be brief."), "Hi", &ctx).expect("folds"),
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    );
}

#[test]
fn llama3_builtin_dates_its_prompt_from_the_clock() {
    let llama3 = ChatTemplate::builtin("llama3").expect("built-in");
    let rendered = llama3
        .render_prompt(None, "Hi", &RenderContext::new("<|begin_of_text|>", "<|eot_id|>"))
        .expect("renders");
    // Local time, as transformers' `datetime.now()`; not the fixed date Llama 3.1 falls back to.
    let today = jiff::Zoned::now().strftime("%d %b %Y").to_string();
    assert!(rendered.contains(&format!("\nToday Date: {today}\n")), "{rendered:?} vs {today}");
}

/// Gemma's rendered prompt on the real tokenizer: special-token text becomes single ids and
/// BOS appears exactly once, although both the template and the tokenizer want to add it.
#[test]
fn gemma_prompt_token_ids_have_exactly_one_bos() {
    let gguf = Gguf::open(&support::test_model()).expect("open the test model");
    let tokenizer = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    let bos = tokenizer.bos_id().expect("Gemma has a BOS token");
    let bos_text = tokenizer.token_text(bos).expect("BOS has text").to_owned();
    assert_eq!(bos_text, "<bos>");
    assert!(tokenizer.adds_bos(), "the test model's GGUF asks for BOS");

    let gemma = ChatTemplate::builtin("gemma").expect("built-in");
    let ctx = RenderContext::new(bos_text.clone(), "<eos>");
    let encode = |user: &str| {
        let rendered = gemma.render_prompt(None, user, &ctx).expect("renders");
        let add = chat::needs_bos(&rendered, Some(&bos_text), tokenizer.adds_bos());
        assert!(!add, "the template already wrote {bos_text}: {rendered:?}");
        (rendered.clone(), tokenizer.encode(&rendered, add, true))
    };

    let (rendered, ids) = encode("Hello");
    assert_eq!(rendered, "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n");
    assert_eq!(ids, [2, 105, 2364, 107, 9259, 106, 107, 105, 4368, 107]);
    assert_eq!(ids.iter().filter(|&&id| id == bos).count(), 1);

    // Cross-check with llama.cpp: its tokenization of the user turn (BOS added by the
    // tokenizer) must be our prompt minus the generation header.
    let reference: Json = serde_json::from_str(&read(&support::test_data("gemma3-270m/tokenize.json")))
        .expect("tokenize.json is JSON");
    let turn = reference
        .as_array()
        .expect("a list")
        .iter()
        .find(|e| e["text"] == "<start_of_turn>user\nHi<end_of_turn>\n")
        .expect("the reference has the Gemma user turn");
    let llama_ids: Vec<u32> = turn["ids_parse_special"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect();
    let (_, ids) = encode("Hi");
    let header = [105, 4368, 107]; // <start_of_turn> model \n
    assert_eq!(ids[..ids.len() - 3], llama_ids[..], "ours {ids:?}, llama.cpp {llama_ids:?}");
    assert_eq!(ids[ids.len() - 3..], header);
    assert_eq!(tokenizer.token_text(4368), Some("model"));

    // Without the rule, the tokenizer would put a second BOS in front of the template's.
    let doubled = tokenizer.encode(&rendered, true, true);
    assert_eq!(doubled[..2], [bos, bos], "add_special on a rendered prompt doubles BOS");
}
