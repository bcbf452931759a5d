//! GBNF, llama.cpp's grammar format, converted to the Lark dialect llguidance reads, so that
//! `--grammar` takes the grammars people already have for llama.cpp.
//!
//! GBNF as llama.cpp's `grammar-parser` reads it: `name ::= alternatives` rules; `|`, grouping,
//! `*` `+` `?` `{m}` `{m,}` `{m,n}` `{,n}`; `"strings"` and `[character classes]` (with `^`,
//! ranges and the escapes `\n \r \t \\ \" \[ \] \- \xHH \uHHHH \UHHHHHHHH`); `.` for any
//! character; `#` comments. A rule ends at the end of its line, except inside parentheses and
//! after `::=` or `|`. `root` is where the grammar starts.
//!
//! Each rule becomes one Lark rule on one line: strings become JSON strings, character classes
//! and `.` become regular expressions with every character written as `\x{…}`, repetitions
//! keep llguidance's `{m,n}`, and names that Lark would not read as rule names (upper case, or
//! `start`) are renamed.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use anyhow::{Result, bail};
use serde_json::Value;

/// The Lark grammar of a GBNF grammar's text.
pub fn to_lark(text: &str) -> Result<String> {
    let mut p = Parser { chars: text.chars().collect(), pos: 0, depth: 0 };
    let mut rules: Vec<(String, Vec<Vec<Item>>)> = Vec::new();
    let mut defined = HashSet::new();
    loop {
        p.space(true);
        if p.at_end() {
            break;
        }
        let start = p.pos;
        let name = p.name().ok_or_else(|| p.error("a rule name"))?;
        p.space(false);
        if !p.eat_str("::=") {
            return Err(p.error("'::=' after the rule name"));
        }
        p.space(true);
        let alternatives = p.alternatives(false)?;
        p.space(false);
        if !p.at_end() && p.peek() != Some('\n') {
            return Err(p.error("the end of the line"));
        }
        if !defined.insert(name.clone()) {
            p.pos = start;
            bail!("line {}: the rule '{name}' is defined twice", p.line());
        }
        rules.push((name, alternatives));
    }
    if !defined.contains("root") {
        bail!("the grammar has no 'root' rule, where a GBNF grammar starts");
    }
    let names = lark_names(rules.iter().map(|(n, _)| n.as_str()));
    let mut out = String::from("start: root\n");
    for (name, alternatives) in &rules {
        let _ = writeln!(out, "{}: {}", names[name.as_str()], write_alternatives(alternatives, &names)?);
    }
    Ok(out)
}

/// One element of a sequence, with its repetition.
#[derive(Debug)]
struct Item {
    atom: Atom,
    repeat: Option<(u32, Option<u32>)>,
}

#[derive(Debug)]
enum Atom {
    Rule(String),
    Literal(String),
    /// A character class: negated or not, and its ranges (inclusive).
    Class(bool, Vec<(char, char)>),
    Any,
    Group(Vec<Vec<Item>>),
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    /// How many groups the parser is inside.
    depth: usize,
}

/// The deepest nesting of parentheses read: deeper would take the parser's stack.
const MAX_DEPTH: usize = 200;

impl Parser {
    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        self.pos += usize::from(c.is_some());
        c
    }

    fn eat(&mut self, c: char) -> bool {
        let found = self.peek() == Some(c);
        self.pos += usize::from(found);
        found
    }

    fn eat_str(&mut self, s: &str) -> bool {
        let n = s.chars().count();
        let found = self.chars.get(self.pos..self.pos + n).is_some_and(|w| w.iter().copied().eq(s.chars()));
        if found {
            self.pos += n;
        }
        found
    }

    /// The line the parser is on, from 1.
    fn line(&self) -> usize {
        1 + self.chars[..self.pos.min(self.chars.len())].iter().filter(|&&c| c == '\n').count()
    }

    fn error(&self, expected: &str) -> anyhow::Error {
        let found = match self.peek() {
            None => "the end of the file".to_owned(),
            Some('\n') => "the end of the line".to_owned(),
            Some(c) => format!("'{c}'"),
        };
        anyhow::anyhow!("line {}: expected {expected}, found {found}", self.line())
    }

    /// Skips spaces, tabs and comments, and line endings too when `newlines`.
    fn space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' | '\r' => self.pos += 1,
                '\n' if newlines => self.pos += 1,
                '#' => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Option<String> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            self.pos += 1;
        }
        (self.pos > start).then(|| self.chars[start..self.pos].iter().collect())
    }

    /// Alternatives up to the end of the rule (or of the group, when `nested`).
    fn alternatives(&mut self, nested: bool) -> Result<Vec<Vec<Item>>> {
        let mut alternatives = vec![self.sequence(nested)?];
        while self.eat('|') {
            self.space(true);
            alternatives.push(self.sequence(nested)?);
        }
        Ok(alternatives)
    }

    fn sequence(&mut self, nested: bool) -> Result<Vec<Item>> {
        let mut items = Vec::new();
        loop {
            let atom = match self.peek() {
                Some('"') => {
                    self.pos += 1;
                    Atom::Literal(self.literal()?)
                }
                Some('[') => {
                    self.pos += 1;
                    self.class()?
                }
                Some('.') => {
                    self.pos += 1;
                    Atom::Any
                }
                Some('(') => {
                    self.pos += 1;
                    self.depth += 1;
                    if self.depth > MAX_DEPTH {
                        bail!("line {}: groups nested more than {MAX_DEPTH} deep", self.line());
                    }
                    self.space(true);
                    let group = self.alternatives(true)?;
                    self.depth -= 1;
                    self.space(true);
                    if !self.eat(')') {
                        return Err(self.error("')'"));
                    }
                    Atom::Group(group)
                }
                Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_' => {
                    // A name followed by `::=` begins the next rule.
                    let start = self.pos;
                    let name = self.name().unwrap_or_default();
                    let after = self.pos;
                    self.space(false);
                    if self.eat_str("::=") {
                        self.pos = start;
                        break;
                    }
                    self.pos = after;
                    Atom::Rule(name)
                }
                _ => break,
            };
            let repeat = self.repeat()?;
            items.push(Item { atom, repeat });
            self.space(nested);
        }
        Ok(items)
    }

    fn repeat(&mut self) -> Result<Option<(u32, Option<u32>)>> {
        let simple = match self.peek() {
            Some('*') => Some((0, None)),
            Some('+') => Some((1, None)),
            Some('?') => Some((0, Some(1))),
            Some('{') => None,
            _ => return Ok(None),
        };
        self.pos += 1;
        if simple.is_some() {
            return Ok(simple);
        }
        self.space(false);
        let min = self.number()?.unwrap_or(0);
        self.space(false);
        let max = if self.eat(',') {
            self.space(false);
            self.number()?
        } else {
            Some(min)
        };
        self.space(false);
        if !self.eat('}') {
            return Err(self.error("'}'"));
        }
        if let Some(max) = max.filter(|&max| max < min) {
            bail!("line {}: the repetition {{{min},{max}}} has its maximum below its minimum", self.line());
        }
        Ok(Some((min, max)))
    }

    fn number(&mut self) -> Result<Option<u32>> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if self.pos == start {
            return Ok(None);
        }
        let digits: String = self.chars[start..self.pos].iter().collect();
        digits
            .parse()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("line {}: the repetition count {digits} is too large", self.line()))
    }

    /// A string literal's characters, after its opening quote.
    fn literal(&mut self) -> Result<String> {
        let mut s = String::new();
        loop {
            match self.peek() {
                None | Some('\n') => bail!("line {}: a string is not closed", self.line()),
                Some('"') => {
                    self.pos += 1;
                    return Ok(s);
                }
                Some('\\') => {
                    self.pos += 1;
                    s.push(self.escape()?);
                }
                Some(c) => {
                    self.pos += 1;
                    s.push(c);
                }
            }
        }
    }

    /// A character class's ranges, after its opening bracket.
    fn class(&mut self) -> Result<Atom> {
        let negated = self.eat('^');
        let mut ranges = Vec::new();
        loop {
            let first = match self.peek() {
                None | Some('\n') => bail!("line {}: a character class is not closed", self.line()),
                Some(']') => {
                    self.pos += 1;
                    return Ok(Atom::Class(negated, ranges));
                }
                Some('\\') => {
                    self.pos += 1;
                    self.escape()?
                }
                Some(c) => {
                    self.pos += 1;
                    c
                }
            };
            let last = if self.peek() == Some('-') && self.chars.get(self.pos + 1).is_some_and(|&c| c != ']')
            {
                self.pos += 1;
                match self.next() {
                    Some('\\') => self.escape()?,
                    Some(c) => c,
                    None => return Err(self.error("the end of a range")),
                }
            } else {
                first
            };
            if last < first {
                bail!("line {}: the range {first:?}-{last:?} is empty", self.line());
            }
            ranges.push((first, last));
        }
    }

    /// The character of an escape, after its backslash.
    fn escape(&mut self) -> Result<char> {
        let hex = |p: &mut Self, n: usize| -> Result<char> {
            let digits: String = (0..n).filter_map(|_| p.next()).collect();
            u32::from_str_radix(&digits, 16)
                .ok()
                .filter(|_| digits.len() == n)
                .and_then(char::from_u32)
                .ok_or_else(|| {
                    anyhow::anyhow!("line {}: '{digits}' is not a character's {n} hex digits", p.line())
                })
        };
        Ok(match self.next() {
            Some('n') => '\n',
            Some('r') => '\r',
            Some('t') => '\t',
            Some('x') => hex(self, 2)?,
            Some('u') => hex(self, 4)?,
            Some('U') => hex(self, 8)?,
            Some(c @ ('\\' | '"' | '[' | ']' | '-' | '^' | '/')) => c,
            _ => return Err(self.error("an escape (\\n, \\r, \\t, \\\\, \\\", \\[, \\], \\xHH, \\uHHHH)")),
        })
    }
}

/// Lark names for the rules: a name Lark reads as a rule (lower case, digits, `-`, `_`, not
/// starting with a digit) stays; others (and `start`, which is Lark's) get one that cannot
/// clash.
fn lark_names<'a>(names: impl Iterator<Item = &'a str>) -> HashMap<&'a str, String> {
    let names: Vec<&str> = names.collect();
    let mut out = HashMap::new();
    for (i, &name) in names.iter().enumerate() {
        let fine = name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
            && name != "start";
        let lark = if fine {
            name.to_owned()
        } else {
            let base: String = name
                .to_ascii_lowercase()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            format!("gbnf{i}-{base}")
        };
        out.insert(name, lark);
    }
    out
}

fn write_alternatives(alternatives: &[Vec<Item>], names: &HashMap<&str, String>) -> Result<String> {
    let written: Result<Vec<String>> = alternatives.iter().map(|seq| write_sequence(seq, names)).collect();
    Ok(written?.join(" | "))
}

fn write_sequence(items: &[Item], names: &HashMap<&str, String>) -> Result<String> {
    if items.is_empty() {
        // An empty alternative: the empty string.
        return Ok("\"\"".to_owned());
    }
    let mut parts = Vec::with_capacity(items.len());
    for item in items {
        let mut part = match &item.atom {
            Atom::Rule(name) => match names.get(name.as_str()) {
                Some(lark) => lark.clone(),
                None => bail!("the rule '{name}' is used but not defined"),
            },
            Atom::Literal(s) => Value::String(s.clone()).to_string(),
            Atom::Class(negated, ranges) => {
                let mut re = String::from(if *negated { "/[^" } else { "/[" });
                for &(a, b) in ranges {
                    let _ = write!(re, "\\x{{{:x}}}", a as u32);
                    if b != a {
                        let _ = write!(re, "-\\x{{{:x}}}", b as u32);
                    }
                }
                re.push_str("]/");
                re
            }
            Atom::Any => "/(?s:.)/".to_owned(),
            Atom::Group(alternatives) => format!("({})", write_alternatives(alternatives, names)?),
        };
        match item.repeat {
            None => {}
            Some((0, None)) => part.push('*'),
            Some((1, None)) => part.push('+'),
            Some((0, Some(1))) => part.push('?'),
            Some((min, None)) => part.push_str(&format!("{{{min},}}")),
            Some((min, Some(max))) if min == max => part.push_str(&format!("{{{min}}}")),
            Some((min, Some(max))) => part.push_str(&format!("{{{min},{max}}}")),
        }
        parts.push(part);
    }
    Ok(parts.join(" "))
}
