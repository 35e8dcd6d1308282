//! The header pass of submission: RFC 6409 §8.3, a submission server adds `Message-ID:` and `Date:` to a
//! message that lacks them; and the `From:` and `Sender:` fields are collected (with bounded memory), so
//! that an account cannot put someone else's address there either. Works on the stored form (LF line
//! endings) as it streams by, in pieces of any size. Field names are matched as RFC 5322 §4.5 says
//! receivers must read them, with optional white space before the colon (`From :`). The addresses are
//! read with `mail-parser`, the policy is [`SenderFields::check`].

use mail_parser::{Address, HeaderValue, MessageParser};

/// Longest `From:`/`Sender:` value kept (a longer one is refused as unreadable).
const MAX_SENDER_HEADER: usize = 4096;
/// Longest field name looked at; longer names are no field we care about.
const MAX_NAME: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    From,
    Sender,
    Other,
}

#[derive(Debug)]
pub struct MissingHeaders {
    /// Still inside the header section.
    in_header: bool,
    /// Octets of the current line so far.
    line_len: usize,
    /// The current line's field name so far (until its colon).
    name: Vec<u8>,
    /// The colon of the current field was seen.
    named: bool,
    /// White space followed the name: only the colon may come now.
    name_ended: bool,
    /// The name is longer than any we look for.
    name_too_long: bool,
    saw_message_id: bool,
    saw_date: bool,
    message_id: String,
    date: String,
    /// The field the current line (and its continuation lines) belongs to.
    field: Field,
    current: Vec<u8>,
    senders: SenderFields,
}

/// What the header pass saw of `From:` and `Sender:`: how many of each, and the unfolded values of
/// the first two of each (a third changes nothing: two already break the rule).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SenderFields {
    pub from: Vec<String>,
    pub sender: Vec<String>,
    pub from_count: usize,
    pub sender_count: usize,
    /// A value was too long to keep.
    pub oversized: bool,
    /// A header line was no `name: value` field (nor a continuation).
    pub malformed: bool,
}

/// Why a submitted message's originator fields are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderProblem {
    /// A header line that is not a field (a bad name, no colon, control characters).
    BadHeader,
    /// Not exactly one `From:` with at least one mailbox, more than one `Sender:`, or unreadable.
    Malformed,
    /// An address there does not belong to the account.
    NotOwned,
}

impl SenderFields {
    /// RFC 5322 §3.6: exactly one `From:` holding at least one mailbox, at most one `Sender:`, both
    /// readable; and every address in them must satisfy `owned(local, domain)`.
    pub fn check(&self, owned: impl Fn(&str, &str) -> bool) -> Result<(), SenderProblem> {
        if self.malformed {
            return Err(SenderProblem::BadHeader);
        }
        if self.oversized || self.from_count != 1 || self.sender_count > 1 {
            return Err(SenderProblem::Malformed);
        }
        let mut addresses = mailboxes("From", &self.from[0]).ok_or(SenderProblem::Malformed)?;
        if let Some(sender) = self.sender.first() {
            let sender = mailboxes("Sender", sender).ok_or(SenderProblem::Malformed)?;
            if sender.len() != 1 {
                return Err(SenderProblem::Malformed);
            }
            addresses.extend(sender);
        }
        let all_owned = addresses.iter().all(|address| {
            address
                .rsplit_once('@')
                .is_some_and(|(local, domain)| owned(local, domain))
        });
        if all_owned {
            Ok(())
        } else {
            Err(SenderProblem::NotOwned)
        }
    }
}

/// The addr-specs of one field's value, read by mail-parser; `None` when it names no mailbox (an
/// empty group such as `"ceo@example.org":;` included) or something that is not an address.
fn mailboxes(name: &str, value: &str) -> Option<Vec<String>> {
    let raw = format!("{name}:{value}\r\n\r\n");
    let message = MessageParser::new().parse_headers(raw.as_bytes())?;
    let header = message.headers().first()?;
    let addrs: Vec<_> = match &header.value {
        HeaderValue::Address(Address::List(list)) => list.iter().collect(),
        HeaderValue::Address(Address::Group(groups)) => {
            groups.iter().flat_map(|g| g.addresses.iter()).collect()
        }
        _ => return None,
    };
    let mut out = Vec::new();
    for addr in addrs {
        let address = addr.address.as_deref()?.trim();
        if !address.contains('@') {
            return None;
        }
        out.push(address.to_string());
    }
    (!out.is_empty()).then_some(out)
}

impl MissingHeaders {
    pub fn new(message_id: String, date: String) -> MissingHeaders {
        MissingHeaders {
            in_header: true,
            line_len: 0,
            name: Vec::with_capacity(MAX_NAME),
            named: false,
            name_ended: false,
            name_too_long: false,
            saw_message_id: false,
            saw_date: false,
            message_id,
            date,
            field: Field::Other,
            current: Vec::new(),
            senders: SenderFields::default(),
        }
    }

    /// The `From:`/`Sender:` fields seen (complete after [`finish`](Self::finish)).
    pub fn senders(&self) -> &SenderFields {
        &self.senders
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
                if !self.named {
                    // A header line without a colon is no field at all.
                    self.senders.malformed = true;
                }
                self.line_len = 0;
                out.push(b);
                continue;
            }
            if self.line_len == 0 {
                if matches!(b, b' ' | b'\t') {
                    // A continuation line: it belongs to the field before it.
                    self.named = true;
                } else {
                    // A new field starts: the previous one is complete.
                    self.close_field();
                    self.name.clear();
                    self.named = false;
                    self.name_ended = false;
                    self.name_too_long = false;
                }
            }
            self.line_len += 1;
            out.push(b);
            if !self.named {
                // RFC 5322 §3.6.8 and §4.5: field-name = 1*ftext, then any white space, then ":".
                // Anything else is refused (a reader more lenient than this pass, such as one that
                // skips white space inside names, must never see a From: that we did not).
                match b {
                    b':' if self.name.is_empty() && !self.name_too_long => {
                        self.senders.malformed = true;
                        self.named = true;
                    }
                    b':' => {
                        self.named = true;
                        self.start_field();
                    }
                    b' ' | b'\t' => self.name_ended = true,
                    0x21..=0x7e if !self.name_ended => {
                        if self.name.len() < MAX_NAME {
                            self.name.push(b.to_ascii_lowercase());
                        } else {
                            self.name_too_long = true;
                        }
                    }
                    _ => {
                        self.senders.malformed = true;
                        self.named = true;
                    }
                }
                continue;
            }
            if self.field != Field::Other {
                if self.current.len() < MAX_SENDER_HEADER {
                    self.current.push(b);
                } else {
                    self.senders.oversized = true;
                }
            }
        }
    }

    /// The colon of a field was read: which field is it?
    fn start_field(&mut self) {
        let name: &[u8] = if self.name_too_long { b"" } else { &self.name };
        self.field = match name {
            b"from" => Field::From,
            b"sender" => Field::Sender,
            _ => Field::Other,
        };
        self.saw_message_id |= name == b"message-id";
        self.saw_date |= name == b"date";
        match self.field {
            Field::From => self.senders.from_count += 1,
            Field::Sender => self.senders.sender_count += 1,
            Field::Other => {}
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

    fn close_field(&mut self) {
        let kept = match self.field {
            Field::From => &mut self.senders.from,
            Field::Sender => &mut self.senders.sender,
            Field::Other => return,
        };
        if kept.len() < 2 {
            kept.push(String::from_utf8_lossy(&self.current).into_owned());
        }
        self.current.clear();
        self.field = Field::Other;
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

    /// The sender fields of `message`, after a pass in `piece`-octet pieces.
    fn senders(message: &str, piece: usize) -> SenderFields {
        let mut f = MissingHeaders::new("<id@mx>".into(), "d".into());
        let mut out = Vec::new();
        for chunk in message.as_bytes().chunks(piece) {
            f.push(chunk, &mut out);
        }
        f.finish(&mut out);
        assert!(out.starts_with(message.split("\n\n").next().unwrap().as_bytes()));
        f.senders().clone()
    }

    /// The addresses `check` would look at, or the problem.
    fn owned_by_anyone(message: &str) -> Result<Vec<String>, SenderProblem> {
        let mut seen = Vec::new();
        let cell = std::cell::RefCell::new(&mut seen);
        senders(message, 3).check(|l, d| {
            cell.borrow_mut().push(format!("{l}@{d}"));
            true
        })?;
        Ok(seen)
    }

    #[test]
    fn sender_fields_are_collected_across_folds_and_splits() {
        let m = "From: \"Doe, Jane\" <jane@example.org>,\n\tteam@example.org (the team)\nSender: <x@example.org>\nSubject: from: not me\n\nFrom: body@example.org\n";
        for piece in [1, 2, 5, 64] {
            let f = senders(m, piece);
            assert_eq!((f.from_count, f.sender_count), (1, 1), "piece {piece}");
        }
        assert_eq!(
            owned_by_anyone(m).unwrap(),
            ["jane@example.org", "team@example.org", "x@example.org"]
        );
    }

    #[test]
    fn obsolete_space_before_the_colon_is_still_from() {
        // RFC 5322 §4.5.1: receivers must read `From :`; before, it passed the check unread.
        let m = "From : ceo@example.org\nSubject: x\n\nbody\n";
        assert_eq!(owned_by_anyone(m).unwrap(), ["ceo@example.org"]);
        let f = senders("FROM\t: a@b.example\nsender  :c@d.example\n\n", 1);
        assert_eq!((f.from_count, f.sender_count), (1, 1));
    }

    #[test]
    fn from_must_be_there_once_with_a_mailbox() {
        use SenderProblem::Malformed;
        assert_eq!(
            owned_by_anyone("Subject: no from\n\nbody\n"),
            Err(Malformed)
        );
        assert_eq!(
            owned_by_anyone("From: a@b.example\nFrom: ceo@example.org\n\n"),
            Err(Malformed)
        );
        // An empty group names no mailbox (before: it passed, showing "ceo@example.org").
        assert_eq!(
            owned_by_anyone("From: \"ceo@example.org\":;\n\n"),
            Err(Malformed)
        );
        assert_eq!(
            owned_by_anyone("From: no address at all\n\n"),
            Err(Malformed)
        );
        assert_eq!(
            owned_by_anyone("From: a@b.example\nSender: c@d.example\nSender: e@f.example\n\n"),
            Err(Malformed)
        );
        assert_eq!(
            owned_by_anyone("From: Team: a@b.example, c@d.example;\n\n").unwrap(),
            ["a@b.example", "c@d.example"],
            "a group's members are checked"
        );
    }

    #[test]
    fn not_owned_is_its_own_problem() {
        let f = senders("From: Jane <jane@example.org>\n\n", 4);
        assert_eq!(f.check(|l, _| l == "jane"), Ok(()));
        assert_eq!(f.check(|_, _| false), Err(SenderProblem::NotOwned));
    }

    #[test]
    fn field_names_a_lenient_reader_would_take_as_from_are_refused() {
        // Found in review: "From" + 30 spaces + ":" was classed as another field (the name was cut
        // at 32 octets, white space included), and mail-parser reads "Fr om:", ":From:" and
        // "\x0cFrom:" as From:. Each is now a malformed header, refused whole.
        let own = "From: alice@example.org\n";
        // Any amount of white space before the colon is still From: (obsolete syntax): a second one.
        let spaced = format!("{own}From{}: ceo@example.org\n\n", " ".repeat(30));
        assert_eq!(owned_by_anyone(&spaced), Err(SenderProblem::Malformed));
        for forged in [
            "Fr om: ceo@example.org\n".to_string(),
            ":From: ceo@example.org\n".to_string(),
            "\x0cFrom: ceo@example.org\n".to_string(),
            "From\0: ceo@example.org\n".to_string(),
            "no colon on this line\n".to_string(),
        ] {
            let m = format!("{own}{forged}Subject: x\n\nbody\n");
            assert_eq!(
                owned_by_anyone(&m),
                Err(SenderProblem::BadHeader),
                "{forged:?}"
            );
        }
        let long_name = format!("X-{}: fine\n", "n".repeat(100));
        assert!(owned_by_anyone(&format!("{own}{long_name}\nbody\n")).is_ok());
        let spaced = format!("From{}: alice@example.org\n\n", "\t ".repeat(40));
        assert_eq!(owned_by_anyone(&spaced).unwrap(), ["alice@example.org"]);
    }

    #[test]
    fn memory_is_bounded_however_many_from_lines() {
        // Before: every From: value was kept; 25 MiB of "From:x" lines cost ~150 MiB.
        let mut m = String::new();
        for _ in 0..100_000 {
            m.push_str("From: x@y.example\n");
        }
        m.push_str("\nbody\n");
        let f = senders(&m, 8192);
        assert_eq!(f.from_count, 100_000);
        assert_eq!(f.from.len(), 2);
        let long = format!("From: {}@b.example\n\n", "a".repeat(10_000));
        assert!(senders(&long, 100).oversized);
    }

    #[test]
    fn header_only_message() {
        assert_eq!(
            every_split("Subject: x\n"),
            "Subject: x\nMessage-ID: <id@mx>\nDate: Thu, 26 Nov 2026 10:00:00 +0000\n"
        );
    }
}
