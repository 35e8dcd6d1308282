//! The client side of SMTP, without I/O: replies as servers send them (RFC 5321 §4.2), the
//! extensions an EHLO reply offers, and a stored message turned into DATA's wire form.

/// One complete reply: its code and its text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The reply on one line, for logs, the queue and bounces: `550 5.1.1 No such user`. What the
    /// peer wrote is untrusted: control characters become spaces, and the text stops at 500 characters.
    pub fn text(&self) -> String {
        let text: String = self
            .lines
            .join(" / ")
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(500)
            .collect();
        format!("{} {text}", self.code)
    }
}

/// Why input is not a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

/// Replies longer than this (all lines) are a broken or hostile server.
pub const MAX_REPLY: usize = 64 * 1024;

/// Takes one complete reply off the front of `input`: `Ok(None)` until it is all there, else the
/// reply and the octets it used.
pub fn parse_reply(input: &[u8]) -> Result<Option<(Reply, usize)>, Malformed> {
    let mut used = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let Some(end) = input[used..].iter().position(|&b| b == b'\n') else {
            return if input.len() > MAX_REPLY {
                Err(Malformed("reply too long".into()))
            } else {
                Ok(None)
            };
        };
        let line = &input[used..used + end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        used += end + 1;
        if used > MAX_REPLY {
            return Err(Malformed("reply too long".into()));
        }
        let text = String::from_utf8_lossy(line);
        if line.len() < 3
            || !line[..3].iter().all(u8::is_ascii_digit)
            || !(b'2'..=b'5').contains(&line[0])
        {
            return Err(Malformed(format!(
                "not a reply line: {:?}",
                truncate(&text)
            )));
        }
        let this: u16 = text[..3].parse().expect("three digits");
        if code.is_some_and(|c| c != this) {
            return Err(Malformed(format!(
                "reply code changed within a reply: {:?}",
                truncate(&text)
            )));
        }
        code = Some(this);
        let (more, rest) = match line.get(3) {
            None => (false, ""),
            Some(b' ') => (false, &text[4..]),
            Some(b'-') => (true, &text[4..]),
            Some(_) => {
                return Err(Malformed(format!(
                    "bad reply separator: {:?}",
                    truncate(&text)
                )));
            }
        };
        lines.push(rest.to_string());
        if !more {
            return Ok(Some((Reply { code: this, lines }, used)));
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// What an EHLO reply offers (RFC 5321 §4.1.1.1; the keywords are case-insensitive).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub esmtp: bool,
    pub starttls: bool,
    pub pipelining: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    /// RFC 3461 DSN: the peer takes NOTIFY/ORCPT/RET/ENVID and reports from then on.
    pub dsn: bool,
    /// SIZE with a limit (RFC 1870); `Some(0)` means no fixed limit.
    pub size: Option<u64>,
    pub auth: Vec<String>,
}

impl Capabilities {
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities {
            esmtp: true,
            ..Capabilities::default()
        };
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "STARTTLS" => caps.starttls = true,
                "PIPELINING" => caps.pipelining = true,
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "DSN" => caps.dsn = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "AUTH" => caps.auth = words.map(|w| w.to_ascii_uppercase()).collect(),
                _ => {}
            }
        }
        caps
    }

    /// Whether a message of `size` octets is over the server's declared limit.
    pub fn refuses_size(&self, size: u64) -> bool {
        self.size.is_some_and(|limit| limit > 0 && size > limit)
    }
}

/// A stored message (LF line endings) in DATA's wire form: CRLF line endings, a dot doubled at the
/// start of a line (RFC 5321 §4.5.2), a last line completed, and the final `.` line.
pub fn data_wire_form(prefix: &[u8], stored: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + stored.len() + stored.len() / 32 + 8);
    out.extend_from_slice(prefix);
    let mut at_line_start = true;
    for &b in stored {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        if b == b'\n' {
            out.extend_from_slice(b"\r\n");
            at_line_start = true;
        } else {
            out.push(b);
            at_line_start = false;
        }
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The stored message without the `Return-Path:` field local delivery put first: it belongs to the
/// final delivery, and a relay must not send it on (RFC 5321 §4.4).
pub fn without_return_path(stored: &[u8]) -> &[u8] {
    let name = b"return-path:";
    if stored.len() >= name.len() && stored[..name.len()].eq_ignore_ascii_case(name) {
        return match stored.iter().position(|&b| b == b'\n') {
            Some(end) => &stored[end + 1..],
            None => b"",
        };
    }
    stored
}

/// The message as DKIM signs it (CRLF line endings, not dot-stuffed).
pub fn crlf_form(stored: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(stored.len() + stored.len() / 32);
    for &b in stored {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_replies_are_joined_and_partial_ones_wait() {
        let input = b"250-mx.example Hello\r\n250-SIZE 1000\r\n250 STARTTLS\r\n220 next";
        let (reply, used) = parse_reply(input).unwrap().unwrap();
        assert_eq!(reply.code, 250);
        assert_eq!(
            reply.lines,
            vec!["mx.example Hello", "SIZE 1000", "STARTTLS"]
        );
        assert_eq!(&input[used..], b"220 next");
        assert_eq!(parse_reply(b"250-first\r\n250 sec").unwrap(), None);
        assert_eq!(parse_reply(b"250\r\n").unwrap().unwrap().0.lines, vec![""]);
    }

    #[test]
    fn reply_text_is_one_bounded_line_without_control_characters() {
        let reply = Reply {
            code: 550,
            lines: vec!["5.1.1 no \x1b[31muser".into(), "x".repeat(2000)],
        };
        let text = reply.text();
        assert!(text.starts_with("550 5.1.1 no  [31muser / xxx"), "{text}");
        assert!(!text.chars().any(char::is_control));
        assert!(text.len() <= 504);
    }

    #[test]
    fn garbage_and_changing_codes_are_malformed() {
        assert!(parse_reply(b"hello\r\n").is_err());
        assert!(parse_reply(b"250-a\r\n251 b\r\n").is_err());
        assert!(parse_reply(b"250xa\r\n").is_err());
        assert!(parse_reply(b"650 no\r\n").is_err());
        assert!(parse_reply(&vec![b'2'; MAX_REPLY + 1]).is_err());
    }

    #[test]
    fn ehlo_keywords_are_case_insensitive_with_size_and_auth() {
        let reply = Reply {
            code: 250,
            lines: vec![
                "mx.example".into(),
                "size 2048".into(),
                "8bitmime".into(),
                "Pipelining".into(),
                "AUTH plain LOGIN".into(),
            ],
        };
        let caps = Capabilities::from_ehlo(&reply);
        assert!(caps.pipelining && caps.eight_bit_mime && !caps.starttls && !caps.smtputf8);
        assert_eq!(caps.size, Some(2048));
        assert!(caps.refuses_size(2049) && !caps.refuses_size(2048));
        assert_eq!(caps.auth, vec!["PLAIN", "LOGIN"]);
        let unlimited = Capabilities::from_ehlo(&Reply {
            code: 250,
            lines: vec!["mx".into(), "SIZE".into()],
        });
        assert!(!unlimited.refuses_size(u64::MAX));
    }

    #[test]
    fn wire_form_stuffs_dots_uses_crlf_and_ends_with_the_dot_line() {
        assert_eq!(
            data_wire_form(b"X: 1\r\n", b"a\n.b\n..\nc"),
            b"X: 1\r\na\r\n..b\r\n...\r\nc\r\n.\r\n"
        );
        assert_eq!(data_wire_form(b"", b""), b".\r\n");
        assert_eq!(data_wire_form(b"", b".\n"), b"..\r\n.\r\n");
        assert_eq!(crlf_form(b"a\nb\n"), b"a\r\nb\r\n");
    }

    #[test]
    fn our_return_path_is_not_sent_on() {
        assert_eq!(
            without_return_path(b"Return-Path: <a@b>\nReceived: x\n\nbody\n"),
            b"Received: x\n\nbody\n"
        );
        assert_eq!(
            without_return_path(b"Subject: s\n\nReturn-Path: no\n"),
            b"Subject: s\n\nReturn-Path: no\n"
        );
    }
}
