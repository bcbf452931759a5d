//! Unit tests of chat templates: the built-ins, the `transformers` environment (whitespace,
//! Python methods, variables, `strftime_now`, `tojson`), the system-prompt fallback, and
//! hostile templates ending in one-line errors.

use super::tojson::write_python_float;
use super::*;
use std::time::{Duration, UNIX_EPOCH};

/// 2024-07-26 12:00:00 UTC: the date Llama 3.1's template hard-codes, at noon.
const FIXED: u64 = 1_721_995_200;

fn ctx() -> RenderContext {
    RenderContext {
        now: Some(UNIX_EPOCH + Duration::from_secs(FIXED)),
        ..RenderContext::new("<bos>", "<eos>")
    }
}

/// Renders a one-off template with extra variables, through the same environment.
fn render_str(source: &str, vars: Value) -> Result<String> {
    let template = ChatTemplate::from_source(source)?;
    let t = template.env.get_template(TEMPLATE_NAME)?;
    Ok(t.render(vars)?)
}

fn user(text: &str) -> Vec<Message> {
    vec![Message::new("user", text)]
}

#[test]
fn builtins_compile_and_unknown_names_are_none() {
    for name in BUILTIN_NAMES {
        let template = ChatTemplate::builtin(name).expect("built-in template compiles");
        assert!(!template.source().is_empty());
    }
    assert!(ChatTemplate::builtin("vicuna").is_none());
}

#[test]
fn gemma_builtin_renders_the_gemma3_prompt() {
    let gemma = ChatTemplate::builtin("gemma").expect("built-in");
    assert_eq!(
        gemma.render(&user("Hello"), &ctx()).expect("renders"),
        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
    );
    let no_prompt = RenderContext { add_generation_prompt: false, ..ctx() };
    assert_eq!(
        gemma.render(&user("  Hello \n"), &no_prompt).expect("renders"),
        "<bos><start_of_turn>user\nHello<end_of_turn>\n"
    );
}

#[test]
fn syntax_error_is_a_clear_error() {
    let err = ChatTemplate::from_source("{% for m in messages %}{{ m.content }}").expect_err("must fail");
    let text = format!("{err:#}");
    assert!(text.contains("does not compile"), "{text}");
    assert!(text.contains("syntax error"), "{text}");
    assert!(text.contains("endfor") || text.contains("end of input"), "{text}");
}

#[test]
fn from_arg_reads_builtins_and_files_and_names_bad_files() {
    assert!(ChatTemplate::from_arg("chatml").is_ok());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.jinja");
    std::fs::write(&path, "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}")
        .expect("write");
    let from_file = ChatTemplate::from_arg(path.to_str().expect("utf-8 path")).expect("loads");
    assert_eq!(from_file.render(&user("hi"), &ctx()).expect("renders"), "[user] hi");

    let missing = dir.path().join("missing.jinja");
    let err = ChatTemplate::from_arg(missing.to_str().expect("utf-8")).expect_err("must fail");
    let text = format!("{err:#}");
    assert!(text.contains("missing.jinja") && text.contains("gemma, chatml, llama3"), "{text}");

    std::fs::write(&path, "{{ oops").expect("write");
    let err = ChatTemplate::from_arg(path.to_str().expect("utf-8")).expect_err("must fail");
    let text = format!("{err:#}");
    assert!(text.contains("t.jinja") && text.contains("syntax error"), "{text}");
}

#[test]
fn raise_exception_is_an_error_carrying_the_message() {
    let t = ChatTemplate::from_source("{{ raise_exception('Roles must alternate') }}").expect("compiles");
    let err = t.render(&user("x"), &ctx()).expect_err("must fail");
    assert!(format!("{err:#}").contains("Roles must alternate"), "{err:#}");
}

#[test]
fn whitespace_control_matches_transformers() {
    // trim_blocks drops the newline after a tag, lstrip_blocks the indentation before it,
    // and the template's final newline is dropped (keep_trailing_newline off).
    let source = "  {% for m in messages %}\n{{ m.content }}\n    {% endfor %}\nend\n";
    let t = ChatTemplate::from_source(source).expect("compiles");
    let two = [Message::new("user", "a"), Message::new("assistant", "b")];
    assert_eq!(t.render(&two, &ctx()).expect("renders"), "a\nb\nend");
}

#[test]
fn python_string_methods_work() {
    let out = render_str(
        "{{ s.strip() }}|{{ s.upper().strip() }}|{{ s.startswith('  a') }}|{{ s.split('b')[-1] }}|\
         {{ s.lstrip().rstrip('c ') }}|{% for k, v in d.items() %}{{ k }}={{ v }}{% endfor %}",
        context! { s => "  abc ", d => context! { x => 1 } },
    )
    .expect("renders");
    assert_eq!(out, "abc|ABC|True|c |ab|x=1");
}

#[test]
fn variables_transformers_passes() {
    let t = ChatTemplate::from_source(
        "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ tools is none }}|\
         {% if enable_thinking is defined and enable_thinking is false %}no-think{% endif %}",
    )
    .expect("compiles");
    assert_eq!(t.render(&[], &ctx()).expect("renders"), "<bos>|<eos>|True|True|");
    let no_think = RenderContext { enable_thinking: Some(false), ..ctx() };
    assert_eq!(t.render(&[], &no_think).expect("renders"), "<bos>|<eos>|True|True|no-think");
}

/// Qwen3's switch: by default the variable is undefined and the model thinks (as
/// `transformers` renders it unless asked); `enable_thinking=false` writes an empty
/// reasoning block into the prompt.
#[test]
fn enable_thinking_is_left_undefined_unless_set() {
    let t = ChatTemplate::from_source(
        "{% if enable_thinking is defined %}[{{ enable_thinking }}]{% else %}[undefined]{% endif %}",
    )
    .expect("compiles");
    assert_eq!(t.render(&[], &ctx()).expect("renders"), "[undefined]");
    for (on, want) in [(true, "[True]"), (false, "[False]")] {
        let set = RenderContext { enable_thinking: Some(on), ..ctx() };
        assert_eq!(t.render(&[], &set).expect("renders"), want);
    }
}

#[test]
fn strftime_now_uses_the_fixed_time_or_the_clock() {
    let t = ChatTemplate::from_source("{{ strftime_now('%d %b %Y') }}").expect("compiles");
    assert_eq!(t.render(&[], &ctx()).expect("renders"), "26 Jul 2024");
    let t = ChatTemplate::from_source("{{ strftime_now('%Y') }}").expect("compiles");
    let live = RenderContext::new("<bos>", "<eos>");
    let year = jiff::Zoned::now().year().to_string();
    assert_eq!(t.render(&[], &live).expect("renders"), year);
    let bad = ChatTemplate::from_source("{{ strftime_now('%') }}").expect("compiles");
    assert!(bad.render(&[], &ctx()).is_err());
}

#[test]
fn tojson_writes_what_python_json_dumps_writes() {
    let source = r#"{% set x = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": desc}}, "required": ["city"], "n": [1, 2.5, 1.0, none, true, false, {}, []]}} %}{{ x | tojson }}
{{ x | tojson(indent=4) }}
{{ {"b": 1, "a": "é☕😀"} | tojson(ensure_ascii=true, sort_keys=true) }}
{{ {"a": [1, 2]} | tojson(separators=[",", ":"]) }}
{{ "<tag> & 'q'" | tojson }}"#;
    let out = render_str(source, context! { desc => "Café \"quoted\"\n\t\u{1}" }).expect("renders");
    // Produced by Python 3.11's json.dumps(..., ensure_ascii=False) on the same values.
    let expected = r#"{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Café \"quoted\"\n\t\u0001"}}, "required": ["city"], "n": [1, 2.5, 1.0, null, true, false, {}, []]}}
{
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {
                "type": "string",
                "description": "Café \"quoted\"\n\t\u0001"
            }
        },
        "required": [
            "city"
        ],
        "n": [
            1,
            2.5,
            1.0,
            null,
            true,
            false,
            {},
            []
        ]
    }
}
{"a": "\u00e9\u2615\ud83d\ude00", "b": 1}
{"a":[1,2]}
"<tag> & 'q'""#;
    assert_eq!(out, expected);
}

#[test]
fn floats_are_written_like_python_repr() {
    let cases: [(f64, &str); 9] = [
        (1e16, "1e+16"),
        (1.5e-7, "1.5e-07"),
        (0.0001, "0.0001"),
        (123456789012345.6, "123456789012345.6"),
        (1e-5, "1e-05"),
        (9999999999999998.0, "9999999999999998.0"),
        (-0.0, "-0.0"),
        (0.1, "0.1"),
        (1e300, "1e+300"),
    ];
    for (x, python) in cases {
        let mut out = String::new();
        write_python_float(&mut out, x);
        assert_eq!(out, python, "{x:e}");
    }
}

#[test]
fn system_prompt_kept_where_the_template_supports_it() {
    let chatml = ChatTemplate::builtin("chatml").expect("built-in");
    assert_eq!(
        chatml.render_prompt(Some("Be brief."), "Hi", &ctx()).expect("renders"),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // Gemma 3's template folds the system text into the user turn itself.
    let gemma = ChatTemplate::builtin("gemma").expect("built-in");
    assert_eq!(
        gemma.render_prompt(Some("Be brief."), "Hi", &ctx()).expect("renders"),
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    );
}

#[test]
fn system_prompt_folded_when_the_template_rejects_it() {
    // Gemma 2's template, in short: no system role at all. (The model header is an
    // expression because a template's own final newline is dropped, as in Jinja.)
    let gemma2 = ChatTemplate::from_source(
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}\
         {{ raise_exception('System role not supported') }}{% endif %}\
         {% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content | trim }}\
         <end_of_turn>\n{% endfor %}{{ '<start_of_turn>model\n' }}",
    )
    .expect("compiles");
    assert_eq!(
        gemma2.render_prompt(Some("Be brief."), "Hi", &ctx()).expect("renders"),
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    );
}

#[test]
fn system_prompt_folded_when_the_template_drops_it() {
    let drops = ChatTemplate::from_source(
        "{% for m in messages if m.role != 'system' %}<{{ m.role }}>{{ m.content }}{% endfor %}",
    )
    .expect("compiles");
    assert_eq!(
        drops.render_prompt(Some("Be brief."), "Hi", &ctx()).expect("renders"),
        "<user>Be brief.\n\nHi"
    );
    // The user text containing the system text must not hide the drop.
    assert_eq!(drops.render_prompt(Some("Hi"), "Hi there", &ctx()).expect("renders"), "<user>Hi\n\nHi there");
}

#[test]
fn render_prompt_never_panics_and_reports_both_failures() {
    let always =
        ChatTemplate::from_source("{{ raise_exception('nope: ' + messages[0].role) }}").expect("compiles");
    let err = always.render_prompt(Some("sys"), "hi", &ctx()).expect_err("must fail");
    let text = format!("{err:#}");
    assert!(text.contains("nope: system") && text.contains("nope: user"), "{text}");
    assert!(always.render_prompt(None, "hi", &ctx()).is_err());
    // Odd inputs: empty texts, a template that indexes past the end.
    let gemma = ChatTemplate::builtin("gemma").expect("built-in");
    assert!(gemma.render_prompt(Some(""), "", &ctx()).is_ok());
    let bad = ChatTemplate::from_source("{{ messages[5].content.foo }}").expect("compiles");
    assert!(bad.render_prompt(Some("s"), "u", &ctx()).is_err());
}

#[test]
fn bos_is_added_once() {
    let rendered = "<bos><start_of_turn>user\nHi";
    assert!(!needs_bos(rendered, Some("<bos>"), true));
    assert!(needs_bos("<start_of_turn>user\nHi", Some("<bos>"), true));
    assert!(!needs_bos("<start_of_turn>user\nHi", Some("<bos>"), false));
    assert!(needs_bos("Hi", None, true));
    assert!(needs_bos("Hi", Some(""), true));
    assert!(!needs_bos(rendered, None, false));
}

/// Found measuring hostile templates: each of these aborted the process on a failed
/// allocation (a width, precision or indent of 10**12 built before anything was charged)
/// or, nested deep enough, would overflow the stack in `tojson`; now each is a one-line
/// error.
#[test]
fn hostile_sizes_are_a_one_line_error_not_an_abort() {
    let deep = "{% set ns = namespace(x=[]) %}{% for i in range(1000) %}{% set ns.x = [ns.x] %}\
                {% endfor %}{{ ns.x | tojson }}";
    for (source, why) in [
        ("{{ [1] | tojson(indent=10**12) }}", "steps of work"),
        ("{{ range(100000) | list | tojson(indent=100000) }}", "steps of work"),
        ("{{ '{:>999999999999}'.format('x') }}", "999999999999 is over the limit"),
        ("{{ '{:^999999999999}'.format('x') }}", "999999999999 is over the limit"),
        ("{{ '{:.999999999999f}'.format(1.0) }}", "999999999999 is over the limit"),
        ("{{ '{0:099999999999}'.format(1) }}", "099999999999 is over the limit"),
        // Found by fuzzing: a multi-byte character in a field panicked inside minijinja.
        ("{{ '{xx[xx\u{fffd}xxx~xdatxxxx:}'.format('x') }}", "other than ASCII"),
        ("{{ '{é}'.format('x') }}", "other than ASCII"),
        ("{{ '{xx[E}\u{b5}x]}'.format('x') }}", "other than ASCII"),
        ("{{ '{0:{1}\u{b5}}'.format('x', 2) }}", "other than ASCII"),
        (deep, "nested more than 500 levels deep"),
    ] {
        let template = ChatTemplate::from_source(source).expect("compiles");
        let text = format!("{:#}", template.render(&user("hi"), &ctx()).expect_err(source));
        assert!(text.contains(why) && !text.contains('\n'), "{source}: {text}");
    }
    // Ordinary widths, indents and nesting still work.
    let fine = ChatTemplate::from_source(
        "{{ '{:>5}|{:.2f}|{{x}}'.format('ab', 1.0) }} {{ [[1]] | tojson(indent=2) }}",
    )
    .expect("compiles");
    assert_eq!(fine.render(&[], &ctx()).expect("renders"), "   ab|1.00|{x} [\n  [\n    1\n  ]\n]");
}

/// A list nested as deep as the fuel allows, then freed, printed and compared: minijinja
/// recurses once per level, which overflowed the stack and killed the process.
#[test]
fn nesting_as_deep_as_the_fuel_allows_is_an_error_not_a_crash() {
    for use_it in ["{{ 1 }}", "{{ ns.x }}", "{{ ns.x == ns.x }}", "{{ 1 in ns.x }}"] {
        let source = format!(
            "{{% set ns = namespace(x=[]) %}}{{% for i in range(10000) %}}{{% for j in range(10000) %}}\
             {{% set ns.x = [ns.x] %}}{{% endfor %}}{{% endfor %}}{use_it}"
        );
        let template = ChatTemplate::from_source(&source).expect("compiles");
        let err = template.render(&user("hi"), &ctx()).expect_err("runs out of fuel");
        assert!(format!("{err:#}").contains("steps of work"), "{use_it}: {err:#}");
    }
    // Within the fuel, deep nesting is used and freed without trouble.
    let source = "{% set ns = namespace(x=[]) %}{% for i in range(100) %}{% for j in range(2000) %}\
                  {% set ns.x = [ns.x] %}{% endfor %}{% endfor %}{{ ns.x == ns.x }} {{ 1 in ns.x }}";
    let template = ChatTemplate::from_source(source).expect("compiles");
    assert_eq!(template.render(&user("hi"), &ctx()).expect("renders"), "True False");
}

/// Work the fuel does not see (walking a list doubled sixty times by `l + l`) is given up
/// after the time limit, with a one-line error.
#[test]
fn a_render_that_runs_too_long_is_an_error_not_a_hang() {
    let source = "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}\
                  {% endfor %}{{ ns.l | length }}";
    let template = ChatTemplate::from_source(source).expect("compiles");
    let quick = RenderContext { time_limit: Duration::from_millis(300), ..ctx() };
    let err = template.render(&user("hi"), &quick).expect_err("too long");
    assert!(format!("{err:#}").contains("ran for more than 0.3 s"), "{err:#}");
}

/// Inputs the `chat_template` fuzz target crashed on (`fuzz/`): the template, then messages,
/// separated by 0xFF. Each must now compile or not, and render or fail, without a panic.
#[test]
fn fuzz_regressions_render_or_fail_cleanly() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-regressions/chat_template");
    let files: Vec<_> = std::fs::read_dir(&dir).expect("the regression folder").flatten().collect();
    assert!(!files.is_empty());
    for file in files {
        let data = std::fs::read(file.path()).expect("read");
        let mut fields = data.split(|&b| b == 0xFF).map(String::from_utf8_lossy);
        let source = fields.next().unwrap_or_default();
        let Ok(template) = ChatTemplate::from_source(&source) else { continue };
        let messages: Vec<Message> = fields.map(|t| Message::new("user", t)).collect();
        if let Err(e) = template.render(&messages, &ctx()) {
            assert!(!format!("{e:#}").contains("panicked"), "{}: {e:#}", file.path().display());
        }
    }
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Template text built from pieces that loop, grow strings and lists, recurse, raise and
    /// break the syntax, so that most candidates compile and many are hostile.
    fn template() -> impl Strategy<Value = String> {
        let pieces = vec![
            "{{ messages[0].content }}",
            "{% for m in messages %}{{ m.role }}: {{ m['content'] | trim }}\n",
            "{% for i in range(100000) %}",
            "{% for j in range(1000) %}",
            "{% endfor %}",
            "{% set s = 'xy' %}",
            "{% set s = s ~ s %}",
            "{% set s = s + s %}",
            "{% set l = [s, s] + l|default([]) %}",
            "{{ s }}",
            "{{ s * 1000 }}",
            "{{ 'x' * 100000000 }}",
            "{{ range(100000) | list | length }}",
            "{{ s | center(100000) }}",
            "{{ s.replace('x', 'xxxxxxxx') }}",
            "{{ ' '.join(range(100000) | map('string')) }}",
            "{{ messages | tojson(indent=100) }}",
            "{% macro f(n) %}{{ f(n ~ n) }}{% endmacro %}{{ f('a') }}",
            "{% if loop is defined and loop.index is even %}",
            "{% endif %}",
            "{{ raise_exception('refused') }}",
            "{{ bos_token }}",
            "{% if add_generation_prompt %}<start>{% endif %}",
            "text ",
            "{%",
            "}}",
            "{#",
        ];
        prop_oneof![
            1 => any::<String>(),
            4 => proptest::collection::vec(proptest::sample::select(pieces), 0..10)
                .prop_map(|p| p.concat()),
        ]
    }

    fn messages() -> impl Strategy<Value = Vec<Message>> {
        let role = proptest::sample::select(&["system", "user", "assistant", "tool", ""][..]);
        proptest::collection::vec((role, any::<String>()), 0..4)
            .prop_map(|m| m.into_iter().map(|(r, c)| Message::new(r, c)).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any template either fails to compile or renders any messages to a result within
        /// the output cap, or to an error; never a panic, and never unbounded work (the test
        /// would hang or run out of memory).
        #[test]
        fn any_template_renders_within_budget_or_errs(source in template(), messages in messages()) {
            let Ok(template) = ChatTemplate::from_source(&source) else { return Ok(()) };
            let limit = RENDER_OUTPUT_BASE + 2 * messages.iter().map(|m| m.content.len()).sum::<usize>();
            if let Ok(out) = template.render(&messages, &ctx()) {
                prop_assert!(out.len() <= limit, "{} bytes", out.len());
            }
        }
    }
}
