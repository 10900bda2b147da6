//! Server-Sent Events framing: bytes in, events and comments out.
//!
//! Lines end with CRLF, LF or CR. Only `event:` and `data:` matter (the upstream sends no `id:` or
//! `retry:`); a line starting with `:` is a comment (the server's `: ping` and `: keep-alive`). A blank
//! line dispatches the event. A line longer than the limit is an error, so a broken server cannot make
//! the agent buffer without bound.

/// One parsed item of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Event { name: String, data: String },
    Comment,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("event stream line longer than {0} bytes")]
pub struct LineTooLong(pub usize);

#[derive(Debug)]
pub struct Parser {
    buf: Vec<u8>,
    name: String,
    data: String,
    has_data: bool,
    max_line: usize,
    /// The previous chunk ended in CR: a leading LF of the next chunk belongs to it.
    after_cr: bool,
}

impl Parser {
    pub fn new(max_line: usize) -> Parser {
        Parser {
            buf: Vec::new(),
            name: String::new(),
            data: String::new(),
            has_data: false,
            max_line,
            after_cr: false,
        }
    }

    /// Feed a chunk; returns the frames it completed.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<Vec<Frame>, LineTooLong> {
        let mut frames = Vec::new();
        if self.after_cr && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        self.after_cr = false;
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.buf.extend_from_slice(&chunk[..pos]);
            let line = std::mem::take(&mut self.buf);
            self.line(&line, &mut frames);
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
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > self.max_line {
            self.buf.clear();
            return Err(LineTooLong(self.max_line));
        }
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
        assert_eq!(p.push(&[b'x'; 17]), Err(LineTooLong(16)));
    }
}
