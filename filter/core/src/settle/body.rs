//! Reads a rule's real cost from a response body as it streams past,
//! without holding the response: a JSON body is copied up to its bound and
//! read at its end; an event stream (`text/event-stream`) is read a line at
//! a time, and the last `data:` event carrying the field wins (LLM APIs send
//! usage in the last event).

use serde_json::Value;

use super::{Observed, MAX_COST};

/// One response body being read for one field.
#[derive(Debug)]
pub struct BodyScan {
    events: bool,
    max: usize,
    /// A JSON body so far, or the current line of a stream.
    buf: Vec<u8>,
    /// Past the bound: a JSON body is unreadable; a stream's line is skipped.
    overflow: bool,
    /// A stream's last event that carried the field.
    found: Observed,
}

impl BodyScan {
    /// A scan of a body whose `content-type` is `content_type`, reading at
    /// most `max` bytes (of the body, or of one stream line).
    pub fn new(content_type: Option<&[u8]>, max: usize) -> BodyScan {
        let events = content_type.is_some_and(|t| {
            t.trim_ascii_start()
                .get(..17)
                .is_some_and(|m| m.eq_ignore_ascii_case(b"text/event-stream"))
        });
        BodyScan {
            events,
            max,
            buf: Vec::new(),
            overflow: false,
            found: Observed::Missing,
        }
    }

    /// The next piece of the body.
    pub fn feed(&mut self, chunk: &[u8], path: &[String]) {
        if !self.events {
            if self.overflow || self.buf.len().saturating_add(chunk.len()) > self.max {
                self.overflow = true;
                self.buf = Vec::new();
            } else {
                self.buf.extend_from_slice(chunk);
            }
            return;
        }
        let mut rest = chunk;
        while let Some(at) = rest.iter().position(|b| *b == b'\n') {
            let (line, after) = rest.split_at(at);
            self.push_line_part(line);
            self.end_line(path);
            rest = after.get(1..).unwrap_or_default();
        }
        self.push_line_part(rest);
    }

    /// The body ended: what it said.
    pub fn finish(mut self, path: &[String]) -> Observed {
        if self.events {
            self.end_line(path);
            return self.found;
        }
        if self.overflow {
            return Observed::Malformed;
        }
        match serde_json::from_slice::<Value>(&self.buf) {
            Ok(value) => field(&value, path),
            // Not JSON (an error page): the value is not there.
            Err(_) => Observed::Missing,
        }
    }

    fn push_line_part(&mut self, part: &[u8]) {
        if self.overflow || self.buf.len().saturating_add(part.len()) > self.max {
            self.overflow = true;
            self.buf.clear();
        } else {
            self.buf.extend_from_slice(part);
        }
    }

    /// A stream line ended: a `data:` line carrying the field is the latest.
    fn end_line(&mut self, path: &[String]) {
        let skipped = std::mem::take(&mut self.overflow);
        let line = std::mem::take(&mut self.buf);
        if skipped {
            return;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        // Cheap test first: most events are deltas without the field.
        let last = path.last().map(String::as_bytes).unwrap_or_default();
        if !data.windows(last.len().max(1)).any(|w| w == last) {
            return;
        }
        if let Ok(value) = serde_json::from_slice::<Value>(data.trim_ascii()) {
            match field(&value, path) {
                Observed::Missing => {}
                said => self.found = said,
            }
        }
    }
}

/// The field at `path` of `value` as a cost.
fn field(value: &Value, path: &[String]) -> Observed {
    let mut at = value;
    for key in path {
        match at.get(key) {
            Some(next) => at = next,
            None => return Observed::Missing,
        }
    }
    match at.as_u64() {
        Some(n) if n <= MAX_COST => Observed::Value(n),
        _ => Observed::Malformed,
    }
}
