//! A reader of Server-Sent Events (the WHATWG `text/event-stream` format) as OpenAI-compatible
//! servers send them: `data:` lines (several join with newlines), `event:` names, blank lines
//! ending an event, and `:` comment lines, which servers send as keep-alive pings.

use std::io::{self, BufRead, Read};

/// The longest line accepted. A streamed chunk is a few hundred bytes; a server that sends an
/// endless line must not fill memory.
pub const MAX_LINE: usize = 4 << 20;

/// What one read of the stream gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A complete event: its `event:` name (if any) and its data lines joined with `\n`.
    Event { name: Option<String>, data: String },
    /// A comment line (`: ping`): no data, but proof that the server is alive.
    Comment,
}

/// Reads events from a byte stream.
pub struct SseReader<R> {
    reader: R,
    line: Vec<u8>,
    name: Option<String>,
    data: Option<String>,
}

impl<R: BufRead> SseReader<R> {
    pub fn new(reader: R) -> Self {
        Self { reader, line: Vec::new(), name: None, data: None }
    }

    /// The next event or comment; `None` at the end of the stream. An event not ended by a
    /// blank line before the stream ends is dropped, as the format says.
    pub fn next_item(&mut self) -> io::Result<Option<Item>> {
        loop {
            self.line.clear();
            let n = self.reader.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', &mut self.line)?;
            if n == 0 {
                return Ok(None);
            }
            if self.line.len() > MAX_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "an event-stream line longer than 4 MiB",
                ));
            }
            let line = String::from_utf8_lossy(&self.line);
            let line = line.strip_suffix('\n').unwrap_or(&line);
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.is_empty() {
                match self.data.take() {
                    Some(data) => return Ok(Some(Item::Event { name: self.name.take(), data })),
                    None => {
                        self.name = None;
                        continue;
                    }
                }
            }
            if line.starts_with(':') {
                return Ok(Some(Item::Comment));
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "data" => match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                },
                "event" => self.name = Some(value.to_owned()),
                // `id` and `retry` are for reconnecting browsers; unknown fields are ignored.
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(text: &str) -> Vec<Item> {
        let mut reader = SseReader::new(text.as_bytes());
        let mut items = Vec::new();
        while let Some(item) = reader.next_item().expect("read") {
            items.push(item);
        }
        items
    }

    fn event(name: Option<&str>, data: &str) -> Item {
        Item::Event { name: name.map(str::to_owned), data: data.to_owned() }
    }

    #[test]
    fn events_comments_and_multi_line_data() {
        let stream = ": ping\r\n\r\ndata: {\"a\":1}\n\nevent: error\ndata: line one\ndata:line two\nid: 7\n\n\
                      data: [DONE]\n\ndata: unterminated";
        assert_eq!(
            items(stream),
            [
                Item::Comment,
                event(None, "{\"a\":1}"),
                event(Some("error"), "line one\nline two"),
                event(None, "[DONE]"),
            ]
        );
    }

    #[test]
    fn an_endless_line_is_an_error_not_a_memory_hog() {
        let long = "data: ".to_owned() + &"x".repeat(MAX_LINE + 10);
        let mut reader = SseReader::new(long.as_bytes());
        assert!(reader.next_item().is_err());
    }
}
