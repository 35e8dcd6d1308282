//! Turns a stored message (LF or CRLF line endings) into the body of a POP3 multi-line reply
//! (RFC 1939 §3): CRLF line endings, dot-stuffing, the terminating `.CRLF`, and TOP's cut after the
//! header and N body lines. Streaming: fed chunk by chunk, so memory stays bounded for any message size.

#[derive(Debug)]
pub struct Encoder {
    at_line_start: bool,
    prev_cr: bool,
    /// The current line has something besides a CR (tells the blank line ending the header).
    line_has_content: bool,
    in_body: bool,
    /// For TOP: body lines still to send.
    body_lines_left: Option<u64>,
    done: bool,
}

impl Encoder {
    /// `top`: `None` for RETR (everything), `Some(n)` for TOP (header and n body lines).
    pub fn new(top: Option<u64>) -> Encoder {
        Encoder {
            at_line_start: true,
            prev_cr: false,
            line_has_content: false,
            in_body: false,
            body_lines_left: top,
            done: false,
        }
    }

    /// True once TOP has sent all it should: the rest of the file need not be read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn encode(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + chunk.len() / 32);
        for &b in chunk {
            if self.at_line_start {
                if self.in_body && self.body_lines_left == Some(0) {
                    self.done = true;
                }
                if self.done {
                    return;
                }
                if b == b'.' {
                    out.push(b'.');
                }
                self.at_line_start = false;
            }
            if b == b'\n' {
                if !self.prev_cr {
                    out.push(b'\r');
                }
                out.push(b'\n');
                self.end_line();
            } else {
                out.push(b);
                self.line_has_content |= b != b'\r';
            }
            self.prev_cr = b == b'\r';
        }
    }

    fn end_line(&mut self) {
        if self.in_body {
            if let Some(left) = self.body_lines_left.as_mut() {
                *left = left.saturating_sub(1);
            }
        } else if !self.line_has_content {
            self.in_body = true;
        }
        self.at_line_start = true;
        self.line_has_content = false;
    }

    /// Ends the reply: completes a last line without newline and adds the terminating `.CRLF`.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.at_line_start {
            if self.prev_cr {
                out.push(b'\n');
            } else {
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(b".\r\n");
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(input: &[u8], top: Option<u64>, chunk: usize) -> Vec<u8> {
        let mut e = Encoder::new(top);
        let mut out = Vec::new();
        for c in input.chunks(chunk.max(1)) {
            e.encode(c, &mut out);
        }
        e.finish(&mut out);
        out
    }

    fn all_chunks(input: &[u8], top: Option<u64>) -> Vec<u8> {
        let reference = encode(input, top, input.len());
        for chunk in [1, 2, 3, 7, 64] {
            assert_eq!(encode(input, top, chunk), reference, "chunk {chunk}");
        }
        reference
    }

    #[test]
    fn lf_becomes_crlf_and_dots_are_stuffed() {
        assert_eq!(
            all_chunks(b"a\n.b\n.\nc\n", None),
            b"a\r\n..b\r\n..\r\nc\r\n.\r\n"
        );
    }

    #[test]
    fn crlf_is_kept() {
        assert_eq!(all_chunks(b"a\r\nb\r\n", None), b"a\r\nb\r\n.\r\n");
    }

    #[test]
    fn missing_final_newline_is_completed() {
        assert_eq!(all_chunks(b"a\nb", None), b"a\r\nb\r\n.\r\n");
        assert_eq!(all_chunks(b"", None), b".\r\n");
    }

    #[test]
    fn top_sends_header_and_n_body_lines() {
        let msg = b"H: 1\nH: 2\n\nl1\nl2\nl3\n";
        assert_eq!(all_chunks(msg, Some(0)), b"H: 1\r\nH: 2\r\n\r\n.\r\n");
        assert_eq!(
            all_chunks(msg, Some(2)),
            b"H: 1\r\nH: 2\r\n\r\nl1\r\nl2\r\n.\r\n"
        );
        assert_eq!(all_chunks(msg, Some(99)), all_chunks(msg, None));
        assert_eq!(
            all_chunks(b"H: 1\r\n\r\nbody\r\n", Some(0)),
            b"H: 1\r\n\r\n.\r\n"
        );
    }
}
