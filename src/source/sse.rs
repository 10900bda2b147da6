//! Server-Sent Events framing: bytes in, events and comments out.
//!
//! Lines end with CRLF, LF or CR. Only `event:` and `data:` matter (the upstream sends no `id:` or
//! `retry:`); a line starting with `:` is a comment (the server's `: ping` and `: keep-alive`). A blank
//! line dispatches the event. An event larger than the limit (its name, all its `data:` lines so far and
//! the line being read, together) is an error, so a broken server cannot make the agent buffer without
//! bound, neither with one endless line nor with endless `data:` lines and no blank line.

/// One parsed item of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Event { name: String, data: String },
    Comment,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("event stream: one event is larger than {0} bytes")]
pub struct EventTooLarge(pub usize);

#[derive(Debug)]
pub struct Parser {
    buf: Vec<u8>,
    name: String,
    data: String,
    has_data: bool,
    max_event: usize,
    /// The previous chunk ended in CR: a leading LF of the next chunk belongs to it.
    after_cr: bool,
}

impl Parser {
    /// A parser refusing events larger than `max_event` bytes.
    pub fn new(max_event: usize) -> Parser {
        Parser {
            buf: Vec::new(),
            name: String::new(),
            data: String::new(),
            has_data: false,
            max_event,
            after_cr: false,
        }
    }

    /// Bytes held for the event being read.
    fn pending(&self) -> usize {
        self.name.len() + self.data.len() + self.buf.len()
    }

    /// Forget the event being read (after an error; the connection is dropped).
    fn reset(&mut self) {
        self.buf = Vec::new();
        self.name = String::new();
        self.data = String::new();
        self.has_data = false;
        self.after_cr = false;
    }

    /// Feed a chunk; returns the frames it completed. Errors (and forgets the event being read) when the
    /// event being read grows past the limit.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<Vec<Frame>, EventTooLarge> {
        let mut frames = Vec::new();
        if self.after_cr && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        self.after_cr = false;
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.buf.extend_from_slice(&chunk[..pos]);
            let line = std::mem::take(&mut self.buf);
            self.line(&line, &mut frames);
            if self.pending() > self.max_event {
                self.reset();
                return Err(EventTooLarge(self.max_event));
            }
            let is_cr = chunk[pos] == b'\r';
            chunk = &chunk[pos + 1..];
            if is_cr {
                if chunk.first() == Some(&b'\n') {
                    chunk = &chunk[1..];
                } else if chunk.is_empty() {
                    self.after_cr = true;
                }
            }
        }
        if self.pending() + chunk.len() > self.max_event {
            self.reset();
            return Err(EventTooLarge(self.max_event));
        }
        self.buf.extend_from_slice(chunk);
        Ok(frames)
    }

    fn line(&mut self, line: &[u8], frames: &mut Vec<Frame>) {
        if line.is_empty() {
            if self.has_data || !self.name.is_empty() {
                let name = std::mem::take(&mut self.name);
                frames.push(Frame::Event {
                    name: if name.is_empty() {
                        "message".into()
                    } else {
                        name
                    },
                    data: std::mem::take(&mut self.data),
                });
            }
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            frames.push(Frame::Comment);
            return;
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text.as_ref(), ""),
        };
        match field {
            "event" => self.name = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {} // id, retry and unknown fields: not used by this server
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_framing_split_anywhere() {
        let stream = b"event: connected\r\ndata: {\"subscription_id\": \"abc\"}\r\n\r\n: ping - 2026\r\n\r\nevent: updated\r\ndata: {\"key\": \"k\"}\r\n\r\n";
        for split in 0..stream.len() {
            let mut p = Parser::new(1024);
            let mut frames = p.push(&stream[..split]).unwrap();
            frames.extend(p.push(&stream[split..]).unwrap());
            assert_eq!(
                frames,
                vec![
                    Frame::Event {
                        name: "connected".into(),
                        data: "{\"subscription_id\": \"abc\"}".into()
                    },
                    Frame::Comment,
                    Frame::Event {
                        name: "updated".into(),
                        data: "{\"key\": \"k\"}".into()
                    },
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn lf_only_multiline_data_and_limits() {
        let mut p = Parser::new(16);
        let frames = p.push(b"data: a\ndata: b\n\n").unwrap();
        assert_eq!(
            frames,
            vec![Frame::Event {
                name: "message".into(),
                data: "a\nb".into()
            }]
        );
        assert_eq!(p.push(&[b'x'; 17]), Err(EventTooLarge(16)));
    }

    #[test]
    fn the_limit_counts_every_data_line_of_one_event() {
        // Lines of 10 bytes each, under the limit of 32 alone, but not together.
        let mut p = Parser::new(32);
        assert_eq!(p.push(b"data: 0123456789\n").unwrap(), vec![]);
        assert_eq!(p.push(b"data: 0123456789\n").unwrap(), vec![]);
        assert_eq!(
            p.push(b"data: 0123456789\ndata: 0123456789\n"),
            Err(EventTooLarge(32))
        );
        // The same lines as separate events pass, however many.
        let mut p = Parser::new(32);
        for _ in 0..100 {
            assert_eq!(p.push(b"data: 0123456789\n\n").unwrap().len(), 1);
        }
        // The pending line counts with the data before it.
        let mut p = Parser::new(32);
        p.push(b"event: updated\ndata: 0123456789\n").unwrap();
        assert_eq!(p.push(&[b'x'; 16]), Err(EventTooLarge(32)));
        // After an error, the parser starts clean.
        assert_eq!(
            p.push(b"data: ok\n\n").unwrap(),
            vec![Frame::Event {
                name: "message".into(),
                data: "ok".into()
            }]
        );
    }
}
