//! Incremental server-sent-events parsing. Network reads split the stream anywhere (inside a
//! line, between `\r` and `\n`, inside a UTF-8 character), so bytes are buffered until a whole
//! event (terminated by a blank line) is available. Only `data:` fields matter for the OpenAI
//! streaming API; comments (`: ping`) and other fields are skipped.

/// Buffers a byte stream and yields the data of each complete event.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// `data:` lines of the event being assembled, joined with `\n`.
    data: Option<String>,
    /// The previous chunk ended with `\r`: a following `\n` belongs to the same line break.
    after_cr: bool,
}

impl SseParser {
    /// An empty parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed the next bytes read from the connection; returns the data of every event that became
    /// complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(&mut events),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut events);
                }
                _ => self.line.push(b),
            }
        }
        events
    }

    /// Call at end of stream: returns a last event that was not followed by a blank line (some
    /// servers close the connection right after the final `data:` line).
    pub fn finish(&mut self) -> Option<String> {
        if !self.line.is_empty() {
            let mut events = Vec::new();
            self.end_line(&mut events);
            debug_assert!(events.is_empty());
        }
        self.data.take()
    }

    fn end_line(&mut self, events: &mut Vec<String>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                events.push(data);
            }
            return;
        }
        let text = String::from_utf8_lossy(&line);
        if text.starts_with(':') {
            return;
        }
        let (field, value) = match text.find(':') {
            Some(i) => {
                let v = &text[i + 1..];
                (&text[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&text[..], ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str =
        "data: {\"a\":1}\n\n: keep-alive\n\nevent: x\ndata: {\"b\":\"é\"}\n\ndata: [DONE]\n\n";

    fn all_at_once(s: &[u8]) -> Vec<String> {
        let mut p = SseParser::new();
        let mut v = p.push(s);
        v.extend(p.finish());
        v
    }

    #[test]
    fn whole_stream() {
        assert_eq!(
            all_at_once(STREAM.as_bytes()),
            vec!["{\"a\":1}", "{\"b\":\"é\"}", "[DONE]"]
        );
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let bytes = STREAM.as_bytes();
        let want = all_at_once(bytes);
        for cut in 0..=bytes.len() {
            let mut p = SseParser::new();
            let mut got = p.push(&bytes[..cut]);
            got.extend(p.push(&bytes[cut..]));
            got.extend(p.finish());
            assert_eq!(got, want, "split at {cut}");
        }
    }

    #[test]
    fn byte_by_byte_with_crlf() {
        let crlf = STREAM.replace('\n', "\r\n");
        let mut p = SseParser::new();
        let mut got = Vec::new();
        for b in crlf.as_bytes() {
            got.extend(p.push(std::slice::from_ref(b)));
        }
        got.extend(p.finish());
        assert_eq!(got, all_at_once(STREAM.as_bytes()));
    }

    #[test]
    fn bare_cr_line_endings() {
        assert_eq!(all_at_once(b"data: x\r\rdata: y\r\r"), vec!["x", "y"]);
    }

    #[test]
    fn multi_line_data_and_missing_final_blank_line() {
        assert_eq!(
            all_at_once(b"data: a\ndata: b\n\ndata:c"),
            vec!["a\nb", "c"]
        );
    }

    #[test]
    fn comments_only_yield_nothing() {
        assert!(all_at_once(b": ping\n\n: ping\n\n").is_empty());
    }
}
