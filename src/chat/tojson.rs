//! `tojson` for chat templates: Python's `json.dumps` as `transformers` calls it, with the
//! work it does charged to the render's fuel.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Error, ErrorKind, State};

/// `tojson` as `transformers` defines it: Python's `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)`. Jinja's own `tojson` (and minijinja's)
/// escape HTML characters and write compact JSON, which is not what tool-calling templates
/// were trained on: `{"a": 1, "b": [1, 2]}` with spaces after `:` and `,`.
///
/// minijinja charges a filter's fuel only for the value it returns, once it is built, so this
/// one charges its output as it writes (see [`charge`]): an indent of `10**12`, or 100,000 items
/// indented by 100,000 spaces, is refused before it is allocated, not after.
pub(super) fn tojson(state: &State, value: &Value, kwargs: Kwargs) -> std::result::Result<String, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_usize(), v.as_str()) {
            (Some(n), _) => {
                charge(state, n)?;
                Some(" ".repeat(n))
            }
            (None, Some(s)) => Some(s.to_owned()),
            _ => {
                return Err(Error::new(ErrorKind::InvalidOperation, "tojson: bad indent"));
            }
        },
        None => None,
    };
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators needs two"));
        }
        // Python's defaults: no space before a newline when indenting.
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(state, &mut out, value, &style, 0)?;
    Ok(out)
}

/// How deep `tojson` follows nested lists and maps. Python's `json.dumps` stops at its
/// recursion limit (about 1,000); a template can nest a list a million deep within its fuel,
/// which would overflow the stack here.
const MAX_JSON_DEPTH: usize = 500;

/// Charges `bytes` about to be written against the rendering's fuel, at the rate minijinja
/// charges data (one unit per 64 bytes, at least one per call), so that a runaway `tojson`
/// ends in the same out-of-fuel error as any other runaway work.
fn charge(state: &State, bytes: usize) -> std::result::Result<(), Error> {
    state.consume_fuel((bytes as u64).div_ceil(64).max(1))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json(
    state: &State,
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> std::result::Result<(), Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: the value is nested more than {MAX_JSON_DEPTH} levels deep"),
        ));
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => write_python_float(out, f64::try_from(value.clone())?),
        ValueKind::String | ValueKind::Plain => {
            let text = value.to_string();
            charge(state, text.len())?;
            write_json_string(out, &text, style.ensure_ascii)
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            let items = keys
                .into_iter()
                .map(|k| value.get_item(&k).map(|v| (k, v)))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            write_container(state, out, style, depth, ('{', '}'), &items, |out, (k, v)| {
                // Python turns non-string keys into strings: 1 → "1", True → "true".
                let key = match k.kind() {
                    ValueKind::String => k.to_string(),
                    _ => {
                        let mut s = String::new();
                        write_json(state, &mut s, k, style, depth + 1)?;
                        s
                    }
                };
                charge(state, key.len() + style.key_sep.len())?;
                write_json_string(out, &key, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(state, out, v, style, depth + 1)
            })?;
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(state, out, style, depth, ('[', ']'), &items, |out, v| {
                write_json(state, out, v, style, depth + 1)
            })?;
        }
        // Bytes, invalid values and kinds added to minijinja later.
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: {} is not JSON serializable", value.kind()),
            ));
        }
    }
    Ok(())
}

fn write_container<T>(
    state: &State,
    out: &mut String,
    style: &JsonStyle,
    depth: usize,
    (open, close): (char, char),
    items: &[T],
    mut write_item: impl FnMut(&mut String, &T) -> std::result::Result<(), Error>,
) -> std::result::Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        let indent_bytes = style.indent.as_ref().map_or(0, |s| s.len().saturating_mul(depth + 1));
        charge(state, style.item_sep.len().saturating_add(indent_bytes))?;
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        if let Some(indent) = &style.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        write_item(out, item)?;
    }
    if let Some(indent) = &style.indent {
        charge(state, indent.len().saturating_mul(depth))?;
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// A JSON string as Python writes it: `\n`, `\t` and friends by name, other control
/// characters as `\u00XX`, and non-ASCII escaped (as UTF-16) only with `ensure_ascii`.
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as Python's `repr` writes it: shortest round-trip digits, always with a `.0` or
/// an exponent, scientific below 1e-4 and from 1e16 on, exponents signed with two digits.
pub(super) fn write_python_float(out: &mut String, x: f64) {
    if x.is_nan() {
        out.push_str("NaN");
        return;
    }
    if x.is_infinite() {
        out.push_str(if x > 0.0 { "Infinity" } else { "-Infinity" });
        return;
    }
    let magnitude = x.abs();
    if magnitude != 0.0 && !(1e-4..1e16).contains(&magnitude) {
        // `{:e}` gives the shortest digits: 1e16 → "1e16", 1.5e-7 → "1.5e-7".
        let sci = format!("{x:e}");
        let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        let _ = write!(out, "{mantissa}e{sign}{digits:0>2}");
    } else {
        // `{:?}` gives the shortest round-trip digits with a `.0` on whole numbers.
        let _ = write!(out, "{x:?}");
    }
}
