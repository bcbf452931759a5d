//! How `--logs` and `--logs-search` print exchanges: as text for reading, or as JSON Lines
//! (`--json`, one object per exchange with every column) for `jq` and scripts.

use super::Exchange;

/// `exchanges` as text: a header line per exchange (its id, conversation, time, model, how it
/// ended), the system prompt, the prompt quoted with `> `, then the answer.
pub fn text(exchanges: &[Exchange]) -> String {
    let mut out = String::new();
    for (i, e) in exchanges.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let model = match (&e.endpoint, e.model.is_empty()) {
            (Some(endpoint), true) => endpoint.clone(),
            (Some(endpoint), false) => format!("{} at {endpoint}", e.model),
            (None, _) => e.model.clone(),
        };
        let tokens = match (e.prompt_tokens, e.generated_tokens) {
            (Some(p), Some(g)) => format!(", {p}+{g} tokens"),
            _ => String::new(),
        };
        out.push_str(&format!(
            "## exchange {} · conversation {} · {} · {} · {}{tokens}\n",
            e.id, e.conversation, e.started, model, e.finish
        ));
        if let Some(system) = &e.system {
            out.push_str(&format!("system: {}\n", one_line(system)));
        }
        for line in e.prompt.lines() {
            out.push_str(if line.is_empty() { ">" } else { "> " });
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&e.answer);
        if !e.answer.ends_with('\n') {
            out.push('\n');
        }
        if let Some(error) = &e.error {
            out.push_str(&format!("(error: {error})\n"));
        }
    }
    out
}

/// `exchanges` as JSON Lines.
pub fn json_lines(exchanges: &[Exchange]) -> String {
    let mut out = String::new();
    for e in exchanges {
        // An Exchange is strings and numbers: serializing it cannot fail.
        out.push_str(&serde_json::to_string(e).unwrap_or_default());
        out.push('\n');
    }
    out
}

fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}
