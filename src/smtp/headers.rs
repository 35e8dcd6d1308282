//! RFC 6409 §8.3: a submission server adds `Message-ID:` and `Date:` to a message that lacks them.
//! Works on the stored form (LF line endings) as it streams by, in pieces of any size.

#[derive(Debug)]
pub struct MissingHeaders {
    /// Still inside the header section.
    in_header: bool,
    /// Octets of the current line so far.
    line_len: usize,
    /// The current line's first octets, lower-cased, to recognise the field name.
    prefix: Vec<u8>,
    saw_message_id: bool,
    saw_date: bool,
    message_id: String,
    date: String,
}

impl MissingHeaders {
    pub fn new(message_id: String, date: String) -> MissingHeaders {
        MissingHeaders {
            in_header: true,
            line_len: 0,
            prefix: Vec::with_capacity(11),
            saw_message_id: false,
            saw_date: false,
            message_id,
            date,
        }
    }

    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if !self.in_header {
            out.extend_from_slice(bytes);
            return;
        }
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'\n' {
                if self.line_len == 0 {
                    // The blank line that ends the header: add what is missing just before it.
                    self.add_missing(out);
                    out.extend_from_slice(&bytes[i..]);
                    self.in_header = false;
                    return;
                }
                self.end_line();
            } else {
                if self.prefix.len() < 11 {
                    self.prefix.push(b.to_ascii_lowercase());
                }
                self.line_len += 1;
            }
            out.push(b);
        }
    }

    /// At the end of a message that has no body: the header ends here.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.in_header {
            self.add_missing(out);
            self.in_header = false;
        }
    }

    fn end_line(&mut self) {
        self.saw_message_id |= self.prefix.starts_with(b"message-id:");
        self.saw_date |= self.prefix.starts_with(b"date:");
        self.prefix.clear();
        self.line_len = 0;
    }

    fn add_missing(&mut self, out: &mut Vec<u8>) {
        if !self.saw_message_id {
            out.extend_from_slice(format!("Message-ID: {}\n", self.message_id).as_bytes());
        }
        if !self.saw_date {
            out.extend_from_slice(format!("Date: {}\n", self.date).as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fix(message: &str, piece: usize) -> String {
        let mut f = MissingHeaders::new("<id@mx>".into(), "Thu, 26 Nov 2026 10:00:00 +0000".into());
        let mut out = Vec::new();
        for chunk in message.as_bytes().chunks(piece) {
            f.push(chunk, &mut out);
        }
        f.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    fn every_split(message: &str) -> String {
        let reference = fix(message, message.len().max(1));
        for piece in [1, 2, 3, 7] {
            assert_eq!(fix(message, piece), reference, "piece {piece}");
        }
        reference
    }

    #[test]
    fn adds_both_before_the_blank_line() {
        assert_eq!(
            every_split("Subject: x\n\nbody\nDate: not a header\n"),
            "Subject: x\nMessage-ID: <id@mx>\nDate: Thu, 26 Nov 2026 10:00:00 +0000\n\nbody\nDate: not a header\n"
        );
    }

    #[test]
    fn keeps_existing_ones() {
        let m = "MESSAGE-ID: <a@b>\nDate: Mon, 1 Jan 2026 00:00:00 +0000\nSubject: x\n\nbody\n";
        assert_eq!(every_split(m), m);
        assert_eq!(
            every_split("date: x\n\n"),
            "date: x\nMessage-ID: <id@mx>\n\n"
        );
    }

    #[test]
    fn header_only_message() {
        assert_eq!(
            every_split("Subject: x\n"),
            "Subject: x\nMessage-ID: <id@mx>\nDate: Thu, 26 Nov 2026 10:00:00 +0000\n"
        );
    }
}
