//! Unit tests of the constraints as the flags give them: llm's concise schema syntax, schema
//! and grammar files, and the mistakes that must be usage errors before a model loads.

use super::*;

fn schema_of(spec: &str) -> Value {
    match Constraint::concise(spec).expect(spec) {
        Constraint::JsonSchema(schema) => schema,
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_concise_syntax_means_what_it_means_in_llm() {
    // llm's own example, and its JSON Schema as llm makes it.
    assert_eq!(
        schema_of("name, age int, bio: a short bio"),
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "bio": {"type": "string", "description": "a short bio"},
            },
            "required": ["name", "age", "bio"],
        })
    );
    // With a newline, fields are lines, and a description may hold commas.
    let schema = schema_of("name str: the name, in full\nscore float\nok bool: yes, or no\n");
    assert_eq!(schema["properties"]["name"], json!({"type": "string", "description": "the name, in full"}));
    assert_eq!(schema["properties"]["score"], json!({"type": "number"}));
    assert_eq!(schema["properties"]["ok"], json!({"type": "boolean", "description": "yes, or no"}));
    assert_eq!(schema["required"], json!(["name", "score", "ok"]));
}

#[test]
fn concise_schemas_that_say_nothing_clear_are_refused() {
    for (spec, says) in [
        ("", "no fields"),
        (" , ", "no fields"),
        ("age integer", "the types are int, float, bool and str"),
        ("age int years", "after its type"),
        ("a, a int", "given twice"),
        (": a description", "has no name"),
    ] {
        let err = Constraint::concise(spec).expect_err(spec);
        assert!(format!("{err:#}").contains(says), "{spec:?}: {err:#}");
    }
}

#[test]
fn json_schemas_come_inline_or_from_a_file_and_must_be_objects() {
    assert_eq!(Constraint::json_schema("{}").ok(), Some(Constraint::JsonSchema(json!({}))));
    assert_eq!(Constraint::json_schema("true").ok(), Some(Constraint::JsonSchema(json!({}))));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("s.json");
    std::fs::write(&path, r#"{"type": "array"}"#).expect("write");
    assert_eq!(
        Constraint::json_schema(&format!("@{}", path.display())).ok(),
        Some(Constraint::JsonSchema(json!({"type": "array"})))
    );
    for (arg, says) in [
        ("{", "not valid JSON"),
        ("[1]", "is an object"),
        ("false", "is an object"),
        ("@/nonexistent/schema.json", "cannot open /nonexistent/schema.json"),
    ] {
        let err = Constraint::json_schema(arg).expect_err(arg);
        assert!(format!("{err:#}").contains(says), "{arg}: {err:#}");
    }
}

#[test]
fn what_cannot_compile_is_found_without_a_model() {
    let ok = [
        Constraint::JsonSchema(json!({})),
        Constraint::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "integer"}}})),
        Constraint::JsonObject,
        Constraint::Regex("[0-9]{4}-[0-9]{2}".into()),
        Constraint::Lark("start: \"yes\" | \"no\"\n".into()),
        Constraint::Choice(vec!["a \"quoted\" choice".into(), "b\\c".into()]),
    ];
    for c in ok {
        c.check().unwrap_or_else(|e| panic!("{c:?}: {e:#}"));
    }
    let bad = [
        Constraint::Regex("a(".into()),
        Constraint::Lark("start: missing_rule\n".into()),
        Constraint::JsonSchema(json!({"type": "no-such-type"})),
        Constraint::JsonSchema(json!({"$ref": "#/definitions/missing"})),
    ];
    for c in bad {
        let err = c.check().expect_err(&format!("{c:?}"));
        assert!(!format!("{err:#}").contains('\n'), "one line: {err:#}");
    }
}

#[test]
fn choices_are_literal_strings() {
    assert_eq!(choice_grammar(&["yes".into(), "a\"b".into()]), "start: \"yes\" | \"a\\\"b\"\n");
    assert!(Constraint::choices(&["a".into(), String::new()]).is_err());
    assert!(Constraint::choices(&[]).is_err());
}

#[test]
fn gbnf_files_are_told_apart_from_lark() {
    assert!(looks_like_gbnf("root ::= \"yes\" | \"no\"\n"));
    assert!(!looks_like_gbnf("// root ::= is GBNF\nstart: \"yes\"\n"));
}

/// A GBNF grammar as a `--grammar` file: the answers it accepts, and only those.
fn gbnf(text: &str) -> Constraint {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("g.gbnf");
    std::fs::write(&path, text).expect("write");
    let constraint = Constraint::grammar_file(&path).unwrap_or_else(|e| panic!("{e:#}"));
    constraint.check().unwrap_or_else(|e| panic!("{e:#}\n{constraint:?}"));
    constraint
}

/// llama.cpp's own `grammars/json.gbnf` (as of 2025): multi-line rules inside parentheses, an
/// empty alternative, escapes in strings and classes, `{m,n}`, comments.
const JSON_GBNF: &str = r#"root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"#;

#[test]
fn gbnf_grammars_are_converted_to_lark() {
    let json = gbnf(JSON_GBNF);
    for good in [r#"{"a": [1, 2.5, "x\"y\u00e9"], "b": {}}"#, "{}", "{\n  \"k\": -0.5e3}"] {
        assert!(json.matches(good), "{good}");
    }
    for bad in [r#"{"a": }"#, "[1]", r#"{"a": 01}"#, "{\"a\": \"\u{1}\"}"] {
        assert!(!json.matches(bad), "{bad}");
    }
    let choice = gbnf("root ::= answer \".\"\nanswer ::= \"yes\" | \"no\" # the two\n");
    assert!(choice.matches("yes.") && choice.matches("no.") && !choice.matches("maybe."));
    // Names Lark would not read as rules (upper case, `start`) still work.
    let names = gbnf("root ::= Start start\nStart ::= \"a\"\nstart ::= [b-c]{2,3} .\n");
    assert!(
        names.matches("abc!") && names.matches("abcb\n") && !names.matches("ab!") && !names.matches("abcbc!")
    );
    let escapes = gbnf("root ::= \"\\x41\\u00e9\\t\" [\\]\\-^]+ [^\\n]\n");
    assert!(escapes.matches("A\u{e9}\t]-^x") && !escapes.matches("A\u{e9}\tx\n"));

    for (text, why) in [
        ("value ::= \"a\"\n", "no 'root' rule"),
        ("root ::= value\n", "'value' is used but not defined"),
        ("root ::= \"a\n", "line 1: a string is not closed"),
        ("root ::= \"a\"\nroot ::= \"b\"\n", "line 2: the rule 'root' is defined twice"),
        ("root ::= (\"a\" | \"b\"\nx ::= \"c\"\n", "expected ')'"),
        ("root ::= [a-z]{3,2}\n", "maximum below its minimum"),
        ("root ::= \"\\q\"\n", "expected an escape"),
        (
            format!("root ::= {}\"a\"{}\n", "(".repeat(300), ")".repeat(300)).as_str(),
            "groups nested more than 200 deep",
        ),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bad.gbnf");
        std::fs::write(&path, text).expect("write");
        let err = format!("{:#}", Constraint::grammar_file(&path).expect_err(text));
        assert!(err.contains(why) && err.contains("bad.gbnf"), "{text:?}: {err}");
    }
}

#[test]
fn json_is_asked_for_on_one_line() {
    let grammar = serde_json::to_value(Constraint::JsonObject.grammar()).expect("serializable");
    let schema = &grammar["grammars"][0]["json_schema"];
    assert_eq!(schema["x-guidance"]["whitespace_flexible"], json!(false));
    assert_eq!(schema["x-guidance"]["item_separator"], json!(", "));
}
