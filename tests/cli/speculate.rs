//! Speculative decoding (prompt lookup, a draft model) changes the speed, never the output:
//! greedy answers are byte for byte those of plain decoding, under a JSON Schema too; sampled
//! runs speculate only when asked; a draft of another vocabulary is refused.

use std::path::Path;

use crate::support::{Done, streamgen, test_model, test_model_smollm2};

/// Text an answer copies from: the model continues a list it has seen.
const COPY: &str = "apple, banana, cherry, damson, elderberry, fig, grape, apple, banana, cherry, damson, \
                    elderberry, fig, grape, apple, banana, cherry, damson, elderberry, fig, grape, apple,";

fn run(model: &Path, args: &[&str], prompt: &str) -> Done {
    streamgen()
        .model(model)
        .args(["--temperature", "0", "-n", "40", "--no-prompt-cache"])
        .args(args)
        .arg(prompt)
        .run()
}

/// The (proposed, accepted) counts of a `--json` run's summary, if it has them.
fn counts(out: &Done) -> Option<(u64, u64)> {
    let text = out.assert_success().stdout();
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a summary")).expect("JSON");
    Some((last["proposed_tokens"].as_u64()?, last["accepted_tokens"].as_u64()?))
}

/// The answer's text of a `--json` run.
fn text(out: &Done) -> String {
    out.assert_success()
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn lookup_is_on_for_greedy_runs_and_changes_nothing_but_the_speed() {
    // (model, arguments, prompt, whether the answer copies the prompt)
    let cases = [
        (test_model(), &["--raw"][..], COPY, true),
        (test_model(), &["--raw"][..], "The three most important inventions of the last century were", false),
        (test_model_smollm2(), &["--raw"][..], COPY, true),
        (test_model_smollm2(), &[][..], "Write a short poem about the sea.", false),
    ];
    for (model, args, prompt, copies) in cases {
        let plain = run(&model, &[args, &["--no-lookup", "--json"]].concat(), prompt);
        let lookup = run(&model, &[args, &["--json"]].concat(), prompt);
        assert_eq!(text(&lookup), text(&plain), "{prompt}");
        assert_eq!(counts(&plain), None, "--no-lookup proposes nothing");
        let (proposed, accepted) = counts(&lookup).expect("lookup is on by default when greedy");
        assert!(accepted <= proposed);
        if copies {
            assert!(accepted > 20, "a list to copy: {accepted} of {proposed} accepted");
        }
        // The bytes of plain output too, and --stats says it.
        let stdout = run(&model, args, prompt).assert_success().stdout().to_string();
        assert_eq!(stdout, run(&model, &[args, &["--no-lookup"]].concat(), prompt).assert_success().stdout());
        let stats = run(&model, &[args, &["--stats"]].concat(), prompt);
        assert!(stats.assert_success().stderr().contains("proposed tokens accepted"), "{}", stats.stderr());
    }
}

#[test]
fn a_draft_model_changes_nothing_but_the_speed_and_another_vocabulary_is_refused() {
    let model = test_model();
    let as_draft = model.to_str().expect("a UTF-8 path").to_string();
    for prompt in [COPY, "The three most important inventions of the last century were"] {
        let plain = run(&model, &["--raw", "--no-lookup", "--json"], prompt);
        let drafted =
            run(&model, &["--raw", "--json", "--draft-model", &as_draft, "--draft-max", "5"], prompt);
        assert_eq!(text(&drafted), text(&plain), "{prompt}");
        // The model drafting for itself: every proposal is what it decodes.
        let (proposed, accepted) = counts(&drafted).expect("counts");
        assert!(proposed > 0 && accepted == proposed, "{accepted} of {proposed}");
    }
    let other = test_model_smollm2();
    let out = run(&model, &["--raw", "--draft-model", other.to_str().expect("UTF-8")], COPY);
    out.assert_exit(1);
    let err = out.stderr();
    assert!(err.contains("vocabulary") && err.lines().count() == 1, "{err}");
}

/// Records to extract: the answer under [`TICKETS`] copies its values from the text.
const EXTRACT: &str = "Ticket 4411 was opened by Maria Gonzalez (maria.gonzalez@example.com) about the \
                       Billing Dashboard. Ticket 4412 was opened by Kenji Watanabe (kenji.w@example.org) \
                       about the Identity Portal.\n\nThe two tickets above as JSON:\n";
const TICKETS: &str = r#"{"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "object",
    "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "email": {"type": "string"},
    "product": {"type": "string"}}, "required": ["id", "name", "email", "product"],
    "additionalProperties": false}}"#;

/// Under a schema, the lookup's and a draft's proposals are cut where the grammar refuses
/// them and checked against masked rows, with the forced keys taken from the proposals: the
/// answer is byte for byte that of plain constrained decoding, and complete.
#[test]
fn speculation_under_a_schema_changes_nothing_but_the_speed() {
    for model in [test_model(), test_model_smollm2()] {
        let as_draft = model.to_str().expect("a UTF-8 path").to_string();
        let under = |extra: &[&str]| {
            streamgen()
                .model(&model)
                .args(["--temperature", "0", "-n", "120", "--no-prompt-cache", "--raw", "--json"])
                .args(["--json-schema", TICKETS])
                .args(extra)
                .arg(EXTRACT)
                .run()
        };
        let plain = under(&["--no-lookup"]);
        let answer = text(&plain);
        let records: serde_json::Value = serde_json::from_str(&answer).expect("a complete answer");
        assert_eq!(records.as_array().map(Vec::len), Some(2), "{answer}");
        assert_eq!(counts(&plain), None);
        let lookup = under(&[]);
        assert_eq!(text(&lookup), answer);
        let (proposed, accepted) = counts(&lookup).expect("lookup is on under a schema");
        assert!(accepted > 5 && accepted <= proposed, "{accepted} of {proposed} accepted");
        // The model drafting for itself: every proposal the grammar allows is accepted, those
        // that agree with the forced keys among them (a pass that ends with part of a key
        // keeps the part's rows).
        let drafted = under(&["--draft-model", &as_draft, "--draft-max", "5"]);
        assert_eq!(text(&drafted), answer);
        let (proposed, accepted) = counts(&drafted).expect("counts");
        assert!(proposed > 0 && accepted == proposed, "{accepted} of {proposed}");
    }
}

/// With sampling, speculating keeps the output's distribution (the sampler's acceptance rule,
/// tested in the library) but not a seed's draws: it happens only when asked for, and a seed
/// still gives one answer. A draft with --each-line is refused.
#[test]
fn sampling_speculates_only_when_asked_and_each_line_drafts_are_a_usage_error() {
    let model = test_model();
    let path = model.to_str().expect("UTF-8").to_string();
    let sampled = |extra: &[&str]| {
        streamgen()
            .model(&model)
            .args(["--temperature", "0.8", "--seed", "7", "-n", "40", "--no-prompt-cache", "--raw", "--json"])
            .args(extra)
            .arg(COPY)
            .run()
    };
    assert_eq!(counts(&sampled(&[])), None, "not by default");
    let lookup = sampled(&["--lookup"]);
    let (proposed, _) = counts(&lookup).expect("--lookup asks for it");
    assert!(proposed > 0, "{}", lookup.stdout());
    assert_eq!(text(&lookup), text(&sampled(&["--lookup"])), "one seed, one answer");
    let drafted = sampled(&["--draft-model", &path]);
    let (proposed, _) = counts(&drafted).expect("a draft model asks for it");
    assert!(proposed > 0, "{}", drafted.stdout());
    let out = streamgen()
        .model(&model)
        .args(["--temperature", "0", "--each-line", "--draft-model", &path])
        .stdin("a line\n")
        .run();
    out.assert_exit(2);
    assert!(out.stderr().starts_with("streamgen: error:"), "{}", out.stderr());
}
