//! Structured output (`--json-schema`, `--json-object`, `--schema`, `--grammar`, `--regex`,
//! `--choice`) on the two real test models, greedy and sampled: every answer matches its
//! constraint (JSON checked by an independent JSON Schema validator), `--each-line` writes one
//! JSON value per line, an answer cut short is exit 1, a constraint that cannot compile is exit 2
//! before any model loads, and `--endpoint` sends the constraint to the server.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::remote::server::{ApiServer, chat};
use crate::support::{Done, streamgen, test_model, test_model_smollm2};

/// Both test models: Gemma 3 270M (SentencePiece, 262k tokens, base) and SmolLM2 135M
/// (byte-level BPE, chat).
fn models() -> [PathBuf; 2] {
    [test_model(), test_model_smollm2()]
}

/// Greedy, and a seed at a high temperature (where a model left alone strays most).
const SAMPLINGS: [&[&str]; 2] = [&["--temperature", "0"], &["--temperature", "1.2", "--seed", "7"]];

const LINES: &str = "Describe a person you know.\nDescribe the weather today.\n";

fn assert_valid(schema: &Value, line: &str) {
    let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
    let validator = jsonschema::validator_for(schema).expect("a valid schema");
    let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{line} against {schema}: {errors:?}");
}

/// Runs `--each-line` over [`LINES`] with `args` and returns the output lines, after checking
/// the run succeeded and wrote one line per input line.
fn each_line(model: &PathBuf, args: &[&str]) -> Vec<String> {
    let out = streamgen().model(model).arg("--each-line").args(args).stdin(LINES).run();
    out.assert_success();
    let lines: Vec<String> = out.stdout().lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 2, "{args:?}: {:?}", out.stdout());
    lines
}

#[test]
fn json_schemas_hold_on_both_models_greedy_and_sampled() {
    let schemas = [
        // Nested objects, bounded strings and arrays, enums, a pattern, an integer range and
        // optional fields.
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 24},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
                "home": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 16},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["city", "zip"],
                    "additionalProperties": false,
                },
                "nickname": {"type": "string", "maxLength": 8},
                "happy": {"type": "boolean"},
            },
            "required": ["name", "age", "colors", "home"],
            "additionalProperties": false,
        }),
        json!({"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 2, "maxItems": 4}),
        json!({"enum": ["small", "medium", "large", 42, null]}),
    ];
    for model in &models() {
        for schema in &schemas {
            let text = schema.to_string();
            for sampling in SAMPLINGS {
                let args = [&["-n", "160", "--json-schema", text.as_str()][..], sampling].concat();
                for line in each_line(model, &args) {
                    assert_valid(schema, &line);
                }
            }
        }
    }
}

#[test]
fn choices_regexes_grammars_and_concise_schemas_hold_on_both_models() {
    let dir = tempfile::tempdir().expect("temp dir");
    let grammar = dir.path().join("greeting.lark");
    std::fs::write(
        &grammar,
        "start: greeting \" \" name \"!\"\ngreeting: \"hello\" | \"hi\"\nname: /[A-Z][a-z]{1,10}/\n",
    )
    .expect("write grammar");
    let grammar = grammar.to_string_lossy().into_owned();
    // The same grammar in GBNF, llama.cpp's format.
    let gbnf = dir.path().join("greeting.gbnf");
    std::fs::write(
        &gbnf,
        "root ::= greeting \" \" name \"!\"\ngreeting ::= \"hello\" | \"hi\"\nname ::= [A-Z] [a-z]{1,10}\n",
    )
    .expect("write grammar");
    let gbnf = gbnf.to_string_lossy().into_owned();
    for model in &models() {
        for sampling in SAMPLINGS {
            let with = |args: &[&str]| each_line(model, &[&["-n", "60"][..], args, sampling].concat());
            for line in with(&["--choice", "positive,negative,not sure"]) {
                assert!(["positive", "negative", "not sure"].contains(&line.as_str()), "{line:?}");
            }
            for line in with(&["--regex", "[0-9]{3}-[0-9]{4}"]) {
                let b = line.as_bytes();
                assert!(
                    b.len() == 8 && b[3] == b'-' && line.replace('-', "").bytes().all(|c| c.is_ascii_digit()),
                    "{line:?}"
                );
            }
            for line in [with(&["--grammar", &grammar]), with(&["--grammar", &gbnf])].concat() {
                let name = line
                    .strip_prefix("hello ")
                    .or(line.strip_prefix("hi "))
                    .unwrap_or_else(|| panic!("{line:?}"));
                let name = name.strip_suffix('!').unwrap_or_else(|| panic!("{line:?}"));
                assert!(name.chars().next().is_some_and(|c| c.is_ascii_uppercase()), "{line:?}");
                assert!(
                    (2..=11).contains(&name.len()) && name[1..].bytes().all(|c| c.is_ascii_lowercase()),
                    "{line:?}"
                );
            }
            let schema = json!({
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "cats": {"type": "boolean"}},
                "required": ["name", "age", "cats"],
            });
            let out = streamgen()
                .model(model)
                .args(
                    [
                        &["-n", "120", "--schema", "name: a short name, age int, cats bool", "Who are you?"]
                            [..],
                        sampling,
                    ]
                    .concat(),
                )
                .run();
            // A free-text field may run past -n: then the run says so, and only then.
            if out.success() {
                assert_valid(&schema, &out.stdout());
            } else {
                out.assert_exit(1);
                assert!(out.stderr().contains("-n/--max-tokens ran out"), "{}", out.stderr());
            }
        }
    }
}

#[test]
fn the_json_summary_says_whether_the_answer_is_complete() {
    let out = streamgen()
        .model(test_model())
        .args(["--json", "--temperature", "0", "--choice", "yes,no", "Is the sky blue?"])
        .run();
    out.assert_success();
    let last: Value = serde_json::from_str(out.stdout().lines().last().expect("a summary")).expect("JSON");
    assert_eq!(last["complete"], json!(true), "{}", out.stdout());
    assert_eq!(last["finish_reason"], json!("eos"));
    // Without a constraint the summary has no such field.
    let out = streamgen().model(test_model()).args(["--json", "-n", "2", "Hello"]).run();
    let last: Value = serde_json::from_str(out.stdout().lines().last().expect("a summary")).expect("JSON");
    assert_eq!(last.get("complete"), None);
}

#[test]
fn an_answer_cut_short_is_an_error_and_its_text_stays() {
    // Three strings cannot fit in three tokens.
    let schema = r#"{"type": "array", "items": {"type": "string"}, "minItems": 3}"#;
    let out = streamgen()
        .model(test_model())
        .args(["-n", "3", "--temperature", "0", "--json-schema", schema, "List fruits."])
        .run();
    out.assert_exit(1);
    assert!(out.stdout().starts_with('['), "{:?}", out.stdout());
    let errors: Vec<String> =
        out.stderr().lines().filter(|l| l.starts_with("streamgen: error:")).map(String::from).collect();
    assert_eq!(errors.len(), 1, "{}", out.stderr());
    assert!(errors[0].contains("does not match the constraint: -n/--max-tokens ran out"), "{}", errors[0]);
    // With --each-line only the cut lines fail: each still has its own line.
    let out = streamgen()
        .model(test_model())
        .args(["--each-line", "-n", "3", "--temperature", "0", "--json-schema", schema])
        .stdin(LINES)
        .run();
    out.assert_exit(1);
    assert_eq!(out.stdout().lines().count(), 2, "{:?}", out.stdout());
    assert!(out.stderr().contains("2 of 2 lines failed"), "{}", out.stderr());
}

#[test]
fn each_line_writes_json_values_as_they_are() {
    // Strings that need escapes stay valid JSON on their line (not escaped again).
    let schema = json!({"type": "object", "properties": {"quote": {"type": "string", "pattern": "^\"[a-z]{1,5}\\\\n\"$"}}, "required": ["quote"], "additionalProperties": false});
    for line in
        each_line(&test_model(), &["-n", "40", "--temperature", "0", "--json-schema", &schema.to_string()])
    {
        assert_valid(&schema, &line);
        assert!(line.contains(r#"\"#), "{line}");
    }
}

/// A constraint that cannot compile is a usage error before the model loads: the model path
/// does not exist, and loading it would be exit 1.
#[test]
fn constraints_that_cannot_compile_are_usage_errors_before_the_model_loads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gbnf = dir.path().join("g.gbnf");
    std::fs::write(&gbnf, "root ::= undefined\n").expect("write");
    let lark = dir.path().join("bad.lark");
    std::fs::write(&lark, "start: undefined_rule\n").expect("write");
    let (gbnf, lark) = (gbnf.to_string_lossy().into_owned(), lark.to_string_lossy().into_owned());
    for (args, says) in [
        (vec!["--regex", "a("], "--regex"),
        (vec!["--json-schema", "{not json"], "--json-schema: the schema is not valid JSON"),
        (vec!["--json-schema", r#"{"type": "nonsense"}"#], "--json-schema"),
        (vec!["--json-schema", "@/no/such/schema.json"], "cannot open /no/such/schema.json"),
        (vec!["--schema", "age integer"], "--schema: the field 'age' has the type 'integer'"),
        (vec!["--grammar", &gbnf], "the rule 'undefined' is used but not defined"),
        (vec!["--grammar", &lark], "--grammar"),
        (vec!["--choice", "a,,b"], "--choice: a choice is empty"),
    ] {
        let out = streamgen().model("/no/such/model.gguf").args(&args).arg("prompt").run();
        out.assert_exit(2);
        let err = out.stderr();
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("streamgen: error: ") && err.contains(says), "{args:?}: {err}");
    }
    // Two constraints at once are refused by the parser.
    let out = streamgen().model("/no/such/model.gguf").args(["--regex", "a", "--choice", "a", "x"]).run();
    out.assert_exit(2);
}

fn body_of(args: &[&str], answer: &[&str]) -> (Done, Value) {
    let server = ApiServer::start(&["served"]);
    server.script(vec![chat(answer)]);
    let out = streamgen().endpoint(&server.url).args(args).arg("Answer.").run();
    let posts = server.posts();
    assert_eq!(posts.len(), 1, "{}", out.stderr());
    (out, posts[0].body.clone())
}

#[test]
fn endpoint_requests_carry_the_constraint_and_answers_are_checked() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
    let (out, body) = body_of(&["--json-schema", &schema.to_string()], &["{\"a\": ", "1}"]);
    out.assert_success();
    assert_eq!(out.stdout(), "{\"a\": 1}");
    assert_eq!(
        body["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": true}})
    );
    let (_, body) = body_of(&["--json-object"], &["{}"]);
    assert_eq!(body["response_format"], json!({"type": "json_object"}));
    let (out, body) = body_of(&["--choice", "yes,no"], &["yes"]);
    out.assert_success();
    assert_eq!(body["structured_outputs"], json!({"choice": ["yes", "no"]}));
    let (_, body) = body_of(&["--regex", "[0-9]+"], &["12"]);
    assert_eq!(body["structured_outputs"], json!({"regex": "[0-9]+"}));
    // A server that ignores the fields answers freely: that is an error, not an answer.
    let (out, _) = body_of(&["--choice", "yes,no", "--json"], &["Maybe", " so."]);
    out.assert_exit(1);
    assert!(out.stderr().contains("the server may not support this constraint"), "{}", out.stderr());
    let last: Value = serde_json::from_str(out.stdout().lines().last().expect("a summary")).expect("JSON");
    assert_eq!(last["complete"], json!(false));
}

#[test]
fn extract_writes_only_the_first_code_block_and_ends_the_answer_there() {
    let server = ApiServer::start(&["served"]);
    server.script(vec![
        chat(&[
            "Here is the filter:\n``",
            "`jq\n.items[]",
            " | .name\n",
            "```\nIt prints",
            " names.\n```\nmore\n```",
        ]),
        chat(&["No code here."]),
    ]);
    let out = streamgen().endpoint(&server.url).args(["-x", "a jq filter"]).run();
    out.assert_success();
    assert_eq!(out.stdout(), ".items[] | .name\n");
    let out = streamgen().endpoint(&server.url).args(["--extract", "a jq filter"]).run();
    out.assert_success();
    assert_eq!(out.stdout(), "");
    assert!(out.stderr().contains("no fenced code block"), "{}", out.stderr());
}
