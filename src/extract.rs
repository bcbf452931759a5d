//! `-x/--extract`: only the contents of the answer's first fenced code block, streamed as they
//! arrive. A fence is a line that starts with three or more backticks (an info string such as
//! `jq` may follow the opening one); the block ends at a line that starts with as many
//! backticks and has nothing else but white space, as llm's `-x` reads it.
//!
//! Invariant: whatever the chunking of the text, the concatenated output is the same, and text
//! is held back only while it could still be the closing fence (or, before the block, the
//! opening one).

/// Where the filter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Looking for the opening fence; the current line is held until it ends.
    Before,
    /// Inside the block, whose fence has this many backticks; `at_line_start`: the held text
    /// (if any) starts a line.
    Inside { fence: usize },
    /// The block has closed: the rest is dropped.
    After,
}

/// The filter of one answer.
#[derive(Debug, Clone)]
pub struct Extract {
    state: State,
    /// Text of the current line not decided yet.
    held: String,
    /// Whether `held` starts at the start of a line.
    line_start: bool,
}

impl Default for Extract {
    fn default() -> Self {
        Self::new()
    }
}

impl Extract {
    pub fn new() -> Self {
        Self { state: State::Before, held: String::new(), line_start: true }
    }

    /// Whether the block has closed: nothing more will be written.
    pub fn closed(&self) -> bool {
        self.state == State::After
    }

    /// Whether a block was opened.
    pub fn found(&self) -> bool {
        self.state != State::Before
    }

    /// Takes the next piece of the answer; returns the block's text it completes.
    pub fn push(&mut self, text: &str) -> String {
        let mut out = String::new();
        for c in text.chars() {
            self.step(c, &mut out);
        }
        // Inside the block, text that can no longer be the closing fence goes out now.
        if let State::Inside { fence } = self.state
            && !self.held.is_empty()
            && !(self.line_start && could_close(&self.held, fence))
        {
            out.push_str(&self.held);
            self.held.clear();
            self.line_start = false;
        }
        out
    }

    fn step(&mut self, c: char, out: &mut String) {
        match self.state {
            State::After => {}
            State::Before => {
                if c != '\n' {
                    self.held.push(c);
                    return;
                }
                let ticks = self.held.bytes().take_while(|&b| b == b'`').count();
                if ticks >= 3 && !self.held[ticks..].contains('`') {
                    self.state = State::Inside { fence: ticks };
                }
                self.held.clear();
                self.line_start = true;
            }
            State::Inside { fence } => {
                if c != '\n' {
                    self.held.push(c);
                    return;
                }
                if self.line_start && closes(&self.held, fence) {
                    self.state = State::After;
                    self.held.clear();
                    return;
                }
                out.push_str(&self.held);
                out.push('\n');
                self.held.clear();
                self.line_start = true;
            }
        }
    }

    /// The end of the answer: inside a block that never closed, the text held back (a last line
    /// that is the closing fence without its newline counts as one).
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.held);
        match self.state {
            State::Inside { fence } if !(self.line_start && closes(&rest, fence)) => rest,
            _ => String::new(),
        }
    }
}

/// Whether `line` (without its newline) closes a block opened with `fence` backticks.
fn closes(line: &str, fence: usize) -> bool {
    let ticks = line.bytes().take_while(|&b| b == b'`').count();
    ticks >= fence && line[ticks..].trim().is_empty()
}

/// Whether a line that starts with `start` could still turn out to close the block.
fn could_close(start: &str, fence: usize) -> bool {
    let ticks = start.bytes().take_while(|&b| b == b'`').count();
    if ticks == start.len() {
        return true;
    }
    ticks >= fence && start[ticks..].trim().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The output for `text` fed in pieces of `size` characters, and at the end.
    fn run(text: &str, size: usize) -> (String, bool) {
        let mut x = Extract::new();
        let chars: Vec<char> = text.chars().collect();
        let mut out = String::new();
        for piece in chars.chunks(size) {
            out.push_str(&x.push(&piece.iter().collect::<String>()));
        }
        out.push_str(&x.finish());
        (out, x.found())
    }

    #[test]
    fn the_first_block_is_extracted_whatever_the_chunking() {
        let cases = [
            ("Here:\n```jq\n.a | .b\n```\nThat's it.", ".a | .b\n", true),
            ("```\none\n\ntwo\n```", "one\n\ntwo\n", true),
            (
                "```py\nx = '``'\n`` not a fence\n````\nafter\n```\nsecond\n```",
                "x = '``'\n`` not a fence\n",
                true,
            ),
            ("a\n````md\n```\ninner\n```\n````\n", "```\ninner\n```\n", true),
            ("no block at all", "", false),
            ("```\nnever closed\nlast", "never closed\nlast", true),
            ("inline ```code``` is no fence\n```\nx\n```  \n", "x\n", true),
        ];
        for (text, expected, found) in cases {
            for size in 1..=text.chars().count() {
                assert_eq!(run(text, size), (expected.to_string(), found), "{text:?} in pieces of {size}");
            }
        }
    }

    #[test]
    fn text_streams_unless_it_could_be_the_closing_fence() {
        let mut x = Extract::new();
        assert_eq!(x.push("```sh\nls -"), "ls -");
        assert_eq!(x.push("l\n`"), "l\n");
        assert_eq!(x.push("`x"), "``x");
        assert_eq!(x.push("\n```"), "\n");
        assert!(!x.closed());
        assert_eq!(x.push("\nrest"), "");
        assert!(x.closed());
    }
}
