//! The header pass of submission: RFC 6409 §8.3, a submission server adds `Message-ID:` and `Date:` to a
//! message that lacks them; and the addresses of `From:` and `Sender:` are collected, so that an
//! account cannot put someone else's address there either. Works on the stored form (LF line endings)
//! as it streams by, in pieces of any size.

/// Longest `From:`/`Sender:` value kept (a longer one is refused as unreadable).
const MAX_SENDER_HEADER: usize = 4096;

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
    /// The current field is From: or Sender: (continuation lines belong to it).
    in_sender_field: bool,
    /// Unfolded values of the From: and Sender: fields.
    sender_fields: Vec<String>,
    current: Vec<u8>,
    /// A sender field was too long to keep.
    oversized: bool,
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
            in_sender_field: false,
            sender_fields: Vec::new(),
            current: Vec::new(),
            oversized: false,
        }
    }

    /// The addresses named by From: and Sender:, or `None` when a field cannot be read.
    pub fn sender_addresses(&self) -> Option<Vec<String>> {
        if self.oversized {
            return None;
        }
        let mut out = Vec::new();
        for field in &self.sender_fields {
            out.extend(mailbox_list(field)?);
        }
        Some(out)
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
                if self.line_len == 0 && !matches!(b, b' ' | b'\t') {
                    // A new field starts: the previous one is complete.
                    self.close_field();
                }
                if self.prefix.len() < 11 {
                    self.prefix.push(b.to_ascii_lowercase());
                    if self.prefix == b"from:" || self.prefix == b"sender:" {
                        self.in_sender_field = true;
                        self.line_len += 1;
                        out.push(b);
                        continue;
                    }
                }
                if self.in_sender_field {
                    if self.current.len() < MAX_SENDER_HEADER {
                        self.current.push(b);
                    } else {
                        self.oversized = true;
                    }
                }
                self.line_len += 1;
            }
            out.push(b);
        }
    }

    /// At the end of a message that has no body: the header ends here.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.close_field();
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

    fn close_field(&mut self) {
        if self.in_sender_field {
            let value = String::from_utf8_lossy(&self.current).into_owned();
            self.sender_fields.push(value);
            self.current.clear();
            self.in_sender_field = false;
        }
    }

    fn add_missing(&mut self, out: &mut Vec<u8>) {
        self.close_field();
        if !self.saw_message_id {
            out.extend_from_slice(format!("Message-ID: {}\n", self.message_id).as_bytes());
        }
        if !self.saw_date {
            out.extend_from_slice(format!("Date: {}\n", self.date).as_bytes());
        }
    }
}

/// The addr-specs of an RFC 5322 mailbox-list (`Name <a@b>, "Q, Name" <c@d>, e@f (comment)`), or
/// `None` when it cannot be read. Group syntax (`team: a@b, c@d;`) contributes its members.
fn mailbox_list(value: &str) -> Option<Vec<String>> {
    let mut elements = Vec::new();
    let (mut current, mut quoted, mut escaped, mut angle, mut comment) =
        (String::new(), false, false, false, 0u32);
    for c in value.chars() {
        if escaped {
            escaped = false;
            current.push(c);
            continue;
        }
        match c {
            '\\' if quoted || comment > 0 => escaped = true,
            '"' if comment == 0 => quoted = !quoted,
            '(' if !quoted => comment += 1,
            ')' if !quoted && comment > 0 => comment -= 1,
            _ if comment > 0 => {}
            '<' if !quoted => {
                angle = true;
                current.push(c);
            }
            '>' if !quoted => {
                angle = false;
                current.push(c);
            }
            ',' | ';' if !quoted && !angle => elements.push(std::mem::take(&mut current)),
            ':' if !quoted && !angle => current.clear(), // a group's display name
            _ => current.push(c),
        }
    }
    if quoted || angle || comment > 0 {
        return None;
    }
    elements.push(current);
    let mut out = Vec::new();
    for element in elements {
        let element = element.trim();
        if element.is_empty() {
            continue;
        }
        let address = match (element.rfind('<'), element.rfind('>')) {
            (Some(open), Some(close)) if open < close => &element[open + 1..close],
            (None, None) => element,
            _ => return None,
        };
        let address = address.trim();
        if !address.contains('@') {
            return None;
        }
        out.push(address.to_string());
    }
    Some(out)
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
    fn sender_fields_are_collected_across_folds_and_splits() {
        let m = "From: \"Doe, Jane\" <jane@example.org>,\n\tteam@example.org (the team)\nSender: <x@example.org>\nSubject: from: not me\n\nFrom: body@example.org\n";
        for piece in [1, 2, 5, 64] {
            let mut f = MissingHeaders::new("<id@mx>".into(), "d".into());
            let mut out = Vec::new();
            for chunk in m.as_bytes().chunks(piece) {
                f.push(chunk, &mut out);
            }
            f.finish(&mut out);
            assert_eq!(
                f.sender_addresses().unwrap(),
                ["jane@example.org", "team@example.org", "x@example.org"],
                "piece {piece}"
            );
        }
    }

    #[test]
    fn mailbox_lists() {
        assert_eq!(mailbox_list("a@b").unwrap(), ["a@b"]);
        assert_eq!(
            mailbox_list("Team: a@b, \"C <c>\" <c@d>;").unwrap(),
            ["a@b", "c@d"]
        );
        assert_eq!(
            mailbox_list("\"quoted@local\"@b").unwrap(),
            ["quoted@local@b"]
        );
        assert!(mailbox_list("Broken <a@b").is_none());
        assert!(mailbox_list("no address at all").is_none());
    }

    #[test]
    fn header_only_message() {
        assert_eq!(
            every_split("Subject: x\n"),
            "Subject: x\nMessage-ID: <id@mx>\nDate: Thu, 26 Nov 2026 10:00:00 +0000\n"
        );
    }
}
