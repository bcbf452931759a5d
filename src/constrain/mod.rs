//! Answers of a known shape: a JSON Schema, a Lark grammar, a regular expression or one of a
//! list of choices. This module owns the constraint as the user gave it ([`Constraint`], read
//! from the flags and checked before any model loads) and how it becomes a grammar for
//! llguidance; [`mask`] is the per-sequence matcher that masks every sampled token with it, and
//! the remote backend sends the same [`Constraint`] to a server instead.

mod gbnf;
pub mod mask;

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::{Map, Value, json};

/// The most bytes read from a `--json-schema @FILE` or `--grammar FILE`: far more than any
/// hand-written schema or grammar, so only a wrong path (a log, a device) is stopped by it.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// What the answer must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON Schema (`{}`: any JSON value); also what `--schema` makes.
    JsonSchema(Value),
    /// Any JSON object (`--json-object`).
    JsonObject,
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
    /// A regular expression (Rust `regex` syntax) the whole answer matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

impl Constraint {
    /// `--json-schema SCHEMA|@FILE`: a schema given inline or read from a file.
    pub fn json_schema(arg: &str) -> Result<Self> {
        let text = match arg.strip_prefix('@') {
            Some(path) => read_file(Path::new(path))?,
            None => arg.to_string(),
        };
        let schema: Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("the schema is not valid JSON: {e}"))?;
        let schema = match schema {
            // JSON Schema's boolean schemas: `true` takes anything, `false` nothing.
            Value::Bool(true) => json!({}),
            Value::Object(_) => schema,
            _ => bail!("a JSON Schema is an object (such as {{\"type\": \"object\"}}, or {{}} for any JSON)"),
        };
        Ok(Self::JsonSchema(schema))
    }

    /// `--schema`: llm's concise schema syntax, `name, age int, bio: a short bio`. Fields are
    /// separated by commas, or by newlines when there is a newline; each is a name, an optional
    /// type (`int`, `float`, `bool`, `str`; the default is `str`) and an optional description
    /// after a colon. Every field is required. An unknown type is an error here, where llm
    /// would quietly make the field a string.
    pub fn concise(spec: &str) -> Result<Self> {
        let fields: Vec<&str> =
            if spec.contains('\n') { spec.trim().split('\n').collect() } else { spec.split(',').collect() };
        let mut properties = Map::new();
        let mut required = Vec::new();
        for field in fields.iter().map(|f| f.trim()).filter(|f| !f.is_empty()) {
            let (head, description) = match field.split_once(':') {
                Some((head, description)) => (head, Some(description.trim())),
                None => (field, None),
            };
            let mut words = head.split_whitespace();
            let Some(name) = words.next() else { bail!("the field '{field}' has no name") };
            let kind = match words.next() {
                None | Some("str") => "string",
                Some("int") => "integer",
                Some("float") => "number",
                Some("bool") => "boolean",
                Some(other) => {
                    bail!("the field '{name}' has the type '{other}'; the types are int, float, bool and str")
                }
            };
            if let Some(extra) = words.next() {
                bail!("the field '{name}' has '{extra}' after its type (a description goes after a colon)");
            }
            let mut property = json!({ "type": kind });
            if let Some(d) = description.filter(|d| !d.is_empty()) {
                property["description"] = json!(d);
            }
            if properties.insert(name.to_string(), property).is_some() {
                bail!("the field '{name}' is given twice");
            }
            required.push(json!(name));
        }
        if properties.is_empty() {
            bail!("no fields: give them as 'name, age int, bio: a short bio'");
        }
        Ok(Self::JsonSchema(json!({ "type": "object", "properties": properties, "required": required })))
    }

    /// `--grammar FILE`: a Lark grammar file, or a GBNF one (llama.cpp's), converted to Lark.
    pub fn grammar_file(path: &Path) -> Result<Self> {
        let text = read_file(path)?;
        if looks_like_gbnf(&text) {
            let lark = gbnf::to_lark(&text)
                .with_context(|| format!("{} (GBNF, llama.cpp's grammar format)", path.display()))?;
            return Ok(Self::Lark(lark));
        }
        Ok(Self::Lark(text))
    }

    /// `--choice a,b,c`: exactly one of the strings.
    pub fn choices(choices: &[String]) -> Result<Self> {
        if choices.iter().any(|c| c.is_empty()) {
            bail!("a choice is empty (choices are separated by commas: --choice yes,no)");
        }
        if choices.is_empty() {
            bail!("no choices");
        }
        Ok(Self::Choice(choices.to_vec()))
    }

    /// The flag the constraint came from, for messages.
    pub fn flag(&self) -> &'static str {
        match self {
            Self::JsonSchema(_) => "--json-schema",
            Self::JsonObject => "--json-object",
            Self::Lark(_) => "--grammar",
            Self::Regex(_) => "--regex",
            Self::Choice(_) => "--choice",
        }
    }

    /// Whether the answer is JSON: then it holds no line break (see [`Constraint::grammar`]),
    /// and an `--each-line` line is the JSON value as it is.
    pub fn is_json(&self) -> bool {
        matches!(self, Self::JsonSchema(_) | Self::JsonObject)
    }

    /// The JSON Schema, for a JSON constraint (`{"type": "object"}` for `--json-object`).
    pub fn schema(&self) -> Option<Value> {
        match self {
            Self::JsonSchema(schema) => Some(schema.clone()),
            Self::JsonObject => Some(json!({ "type": "object" })),
            _ => None,
        }
    }

    /// The grammar llguidance compiles. JSON is written on one line with the separators
    /// people and models write (`{"a": 1, "b": [2, 3]}`): no other white space is allowed
    /// between tokens, so a model cannot pad an answer with white space forever, and an
    /// `--each-line` answer stays one line. (A schema's own `x-guidance` options win.)
    pub fn grammar(&self) -> TopLevelGrammar {
        match self {
            Self::JsonSchema(_) | Self::JsonObject => {
                let mut schema = self.schema().unwrap_or_else(|| json!({}));
                if let Some(object) = schema.as_object_mut()
                    && !object.contains_key("x-guidance")
                {
                    let options = JsonCompileOptions {
                        item_separator: ", ".into(),
                        key_separator: ": ".into(),
                        whitespace_flexible: false,
                        ..JsonCompileOptions::default()
                    };
                    options.apply_to(&mut schema);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Self::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            Self::Regex(re) => TopLevelGrammar::from_regex(re),
            Self::Choice(choices) => TopLevelGrammar::from_lark(choice_grammar(choices)),
        }
    }

    /// Compiles the grammar once over a vocabulary of single bytes, so that a schema, grammar
    /// or regular expression that cannot compile is reported before a model loads. (The
    /// compiled grammar does not depend on the vocabulary; only the masks do.)
    pub fn check(&self) -> Result<()> {
        self.byte_matcher().map(drop)
    }

    /// Whether `text` matches the constraint whole: how an answer from a server, which
    /// constrains it (or not) on its own, is checked.
    pub fn matches(&self, text: &str) -> bool {
        let Ok(mut matcher) = self.byte_matcher() else { return false };
        // Over the vocabulary of single bytes, a byte's token is its value.
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        matcher.consume_tokens(&bytes).is_ok() && matcher.is_accepting().unwrap_or(false)
    }

    /// A matcher of the grammar over a vocabulary of single bytes.
    fn byte_matcher(&self) -> Result<Matcher> {
        let mut factory =
            ParserFactory::new(&ApproximateTokEnv::single_byte_env(), InferenceCapabilities::default(), &[])?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits { verbose_errors: false, ..ParserLimits::default() };
        let parser =
            factory.create_parser(self.grammar()).map_err(|e| anyhow!("{}", one_line(&format!("{e:#}"))))?;
        Ok(Matcher::new(Ok(parser)))
    }
}

/// The Lark grammar of `--choice`: the choices as string literals (Lark's are JSON strings).
fn choice_grammar(choices: &[String]) -> String {
    let alternatives: Vec<String> = choices.iter().map(|c| Value::String(c.clone()).to_string()).collect();
    format!("start: {}\n", alternatives.join(" | "))
}

/// Whether a grammar file is GBNF rather than Lark: GBNF rules are `name ::= ...`, which Lark
/// has no use for.
fn looks_like_gbnf(text: &str) -> bool {
    text.lines().any(|line| {
        let line = line.trim_start();
        !line.starts_with('#') && !line.starts_with("//") && line.contains("::=")
    })
}

/// An error message on one line (llguidance's may span several).
fn one_line(text: &str) -> String {
    text.split('\n').map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// A schema or grammar file's text, at most [`MAX_FILE_BYTES`].
fn read_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        bail!("{} is larger than {} MiB", path.display(), MAX_FILE_BYTES >> 20);
    }
    Ok(text)
}

#[cfg(test)]
mod tests;
