//! 8-bit mail for a server that does not offer 8BITMIME: converted to 7 bit, as RFC 6152 §3 lets a
//! relay do, instead of bounced. Each MIME leaf part holding 8-bit octets is re-encoded (text as
//! quoted-printable, anything else as base64) and its `Content-Transfer-Encoding` rewritten; multipart
//! bodies keep their boundaries, preambles and other parts octet for octet; an attached message
//! (`message/rfc822`) is converted inside. What cannot be converted without changing its meaning is
//! refused (the caller bounces it as before): 8-bit octets in a header (that needs SMTPUTF8), in a
//! multipart's preamble or epilogue, in content already declared base64 or quoted-printable (it is
//! broken), under an unknown encoding, or nesting deeper than [`MAX_DEPTH`].
//!
//! Input and output are the stored form (LF line endings), before DKIM signing, so the signature
//! covers what is sent.

use base64::Engine;

/// Multipart and message nesting followed at most.
pub const MAX_DEPTH: usize = 32;

/// The message in 7 bit, or `None` when it cannot be converted (see the module text).
pub fn seven_bit(stored: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(stored.len() + stored.len() / 4);
    entity(stored, "text/plain", true, &[], &mut out)?;
    Some(out)
}

fn is_8bit(bytes: &[u8]) -> bool {
    bytes.iter().any(|&b| b >= 0x80 || b == 0)
}

/// One MIME entity (header block, blank line, body) appended to `out` in 7 bit. `message`: the
/// entity is a message (it gets `MIME-Version`); `boundaries`: those of the enclosing multiparts
/// (their number is the depth).
fn entity(
    input: &[u8],
    default_type: &str,
    message: bool,
    boundaries: &[&str],
    out: &mut Vec<u8>,
) -> Option<()> {
    if boundaries.len() > MAX_DEPTH {
        return None;
    }
    if !is_8bit(input) {
        out.extend_from_slice(input);
        return Some(());
    }
    let (header, body) = split_header(input);
    if is_8bit(header) {
        return None;
    }
    // Two Content-Type (or encoding) fields: receivers may read either; not ours to guess.
    let fields = Fields::parse(header)?;
    let content_type = fields
        .content_type
        .as_deref()
        .map(media_type)
        .unwrap_or_else(|| default_type.to_string());
    let encoding = fields
        .encoding
        .as_deref()
        .map(|e| e.trim().to_ascii_lowercase());
    let identity = matches!(encoding.as_deref(), None | Some("7bit" | "8bit" | "binary"));
    if !identity {
        // 8-bit octets under base64 or quoted-printable: broken content, not ours to repair.
        return None;
    }
    let boundary = content_type
        .starts_with("multipart/")
        .then(|| fields.content_type.as_deref().and_then(boundary))
        .flatten();
    if boundary.is_some() || content_type == "message/rfc822" {
        // The inside becomes 7 bit, so the container is 7 bit too.
        push_header(
            out,
            header,
            fields.encoding.is_some().then_some("7bit"),
            message,
        );
        let mut inner = boundaries.to_vec();
        return match &boundary {
            Some(boundary) => {
                inner.push(boundary);
                let inner_default = if content_type == "multipart/digest" {
                    "message/rfc822"
                } else {
                    "text/plain"
                };
                multipart(body, boundary, inner_default, &inner, out)
            }
            None => {
                // An attached message: a level of nesting without a boundary of its own.
                inner.push("");
                entity(body, "text/plain", true, &inner, out)
            }
        };
    }
    if content_type.starts_with("multipart/") || content_type.starts_with("message/") {
        // A multipart without a boundary, or message/global and kin: 8-bit by definition.
        return None;
    }
    // The content as it was sent: CRLF line endings (the stored form has LF).
    let canonical = super::wire::crlf_form(body);
    let qp = content_type
        .starts_with("text/")
        .then(|| quoted_printable::encode(&canonical))
        // A soft line break can start a line with an enclosing delimiter ("--boundary"), which
        // would end the part early: such text goes as base64, which has no '-'.
        .filter(|qp| !starts_a_line_with_a_delimiter(qp, boundaries));
    let (name, encoded) = match qp {
        Some(qp) => ("quoted-printable", qp),
        None => ("base64", base64_lines(&canonical)),
    };
    push_header(out, header, Some(name), message);
    // Back to the stored form, ending in LF where the content did.
    let mut last = 0;
    for (i, &b) in encoded.iter().enumerate() {
        if b == b'\n' && i > 0 && encoded[i - 1] == b'\r' {
            out.extend_from_slice(&encoded[last..i - 1]);
            last = i;
        }
    }
    out.extend_from_slice(&encoded[last..]);
    if body.ends_with(b"\n") && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    Some(())
}

/// Whether a line of `encoded` (CRLF lines) begins with `--` and one of `boundaries`.
fn starts_a_line_with_a_delimiter(encoded: &[u8], boundaries: &[&str]) -> bool {
    encoded.split(|&b| b == b'\n').any(|line| {
        line.strip_prefix(b"--").is_some_and(|rest| {
            boundaries
                .iter()
                .any(|b| !b.is_empty() && rest.starts_with(b.as_bytes()))
        })
    })
}

/// The header block (with its last line's LF) and the body after the blank line. An entity that
/// starts with a blank line has no fields; one without a blank line is all header.
fn split_header(input: &[u8]) -> (&[u8], &[u8]) {
    if input.first() == Some(&b'\n') {
        return (b"", &input[1..]);
    }
    match input.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&input[..i + 1], &input[i + 2..]),
        None => (input, b""),
    }
}

/// The header block again, without its `Content-Transfer-Encoding` fields, then the new one (if
/// any), `MIME-Version` for a message when it was missing (it now uses MIME encodings), and the
/// blank line.
fn push_header(out: &mut Vec<u8>, header: &[u8], encoding: Option<&str>, message: bool) {
    let mut has_version = false;
    let mut skipping = false;
    for line in header.split_inclusive(|&b| b == b'\n') {
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation {
            skipping = field_is(line, "content-transfer-encoding");
            has_version |= field_is(line, "mime-version");
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    if !header.is_empty() && !header.ends_with(b"\n") {
        out.push(b'\n');
    }
    if message && !has_version {
        out.extend_from_slice(b"MIME-Version: 1.0\n");
    }
    if let Some(encoding) = encoding {
        out.extend_from_slice(format!("Content-Transfer-Encoding: {encoding}\n").as_bytes());
    }
    out.push(b'\n');
}

fn field_is(line: &[u8], name: &str) -> bool {
    line.len() > name.len()
        && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
        && line[name.len()..]
            .iter()
            .find(|&&b| b != b' ' && b != b'\t')
            == Some(&b':')
}

/// The fields conversion needs, unfolded.
struct Fields {
    content_type: Option<String>,
    encoding: Option<String>,
}

impl Fields {
    /// `None` when a field appears twice.
    fn parse(header: &[u8]) -> Option<Fields> {
        let mut fields = Fields {
            content_type: None,
            encoding: None,
        };
        let text = String::from_utf8_lossy(header);
        let mut current: Option<(String, String)> = None;
        let mut twice = false;
        let mut finish = |field: Option<(String, String)>, fields: &mut Fields| {
            if let Some((name, value)) = field {
                let slot = match name.as_str() {
                    "content-type" => &mut fields.content_type,
                    "content-transfer-encoding" => &mut fields.encoding,
                    _ => return,
                };
                twice |= slot.is_some();
                *slot = Some(value);
            }
        };
        for line in text.lines() {
            if line.starts_with([' ', '\t']) {
                if let Some((_, value)) = current.as_mut() {
                    value.push(' ');
                    value.push_str(line.trim());
                }
                continue;
            }
            finish(current.take(), &mut fields);
            if let Some((name, value)) = line.split_once(':') {
                current = Some((name.trim().to_ascii_lowercase(), value.trim().to_string()));
            }
        }
        finish(current, &mut fields);
        (!twice).then_some(fields)
    }
}

/// `type/subtype` of a Content-Type value, lower-cased.
fn media_type(value: &str) -> String {
    params(value)
        .first()
        .map(|t| t.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// A Content-Type value split at the `;` outside quoted strings (RFC 2045 §5.1).
fn params(value: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let (mut quoted, mut escaped) = (false, false);
    for c in value.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                parts.push(String::new());
                continue;
            }
            _ => {}
        }
        parts.last_mut().expect("never empty").push(c);
    }
    parts
}

/// The `boundary` parameter of a Content-Type value (quoted or not).
fn boundary(value: &str) -> Option<String> {
    for param in params(value).iter().skip(1) {
        let Some((name, v)) = param.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("boundary") {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            return (!v.is_empty()).then(|| v.to_string());
        }
    }
    None
}

/// A multipart body: preamble, parts, epilogue; only the parts change. The LF before a delimiter
/// line belongs to the delimiter (RFC 2046 §5.1.1).
fn multipart(
    body: &[u8],
    boundary: &str,
    default_type: &str,
    boundaries: &[&str],
    out: &mut Vec<u8>,
) -> Option<()> {
    let delimiter = format!("--{boundary}");
    // Offsets of the delimiter lines (start of the line) and whether each closes.
    let mut delimiters = Vec::new();
    let mut at = 0;
    for line in body.split_inclusive(|&b| b == b'\n') {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        if let Some(rest) = content.strip_prefix(delimiter.as_bytes()) {
            let close = rest.starts_with(b"--");
            let rest = if close { &rest[2..] } else { rest };
            if rest.iter().all(|&b| b == b' ' || b == b'\t' || b == b'\r') {
                delimiters.push((at, at + line.len(), close));
            }
        }
        at += line.len();
    }
    let Some(&(first, _, _)) = delimiters.first() else {
        // No part at all: only a preamble.
        return (!is_8bit(body)).then(|| out.extend_from_slice(body));
    };
    if is_8bit(&body[..first]) {
        return None;
    }
    out.extend_from_slice(&body[..first]);
    for (i, &(start, end, close)) in delimiters.iter().enumerate() {
        out.extend_from_slice(&body[start..end]);
        if close {
            let epilogue = &body[end..];
            if is_8bit(epilogue) {
                return None;
            }
            out.extend_from_slice(epilogue);
            return Some(());
        }
        // The part runs to the LF before the next delimiter line, or to the end of the body.
        let (part, rest) = match delimiters.get(i + 1) {
            Some(&(next, _, _)) if next > end => (&body[end..next - 1], &body[next - 1..next]),
            Some(_) => (&body[end..end], &body[end..end]),
            None => (&body[end..], &body[end..end]),
        };
        entity(part, default_type, false, boundaries, out)?;
        out.extend_from_slice(rest);
    }
    Some(())
}

/// Base64 in lines of 76 characters (RFC 2045 §6.8) joined by CRLF.
fn base64_lines(content: &[u8]) -> Vec<u8> {
    let text = base64::engine::general_purpose::STANDARD.encode(content);
    text.as_bytes()
        .chunks(76)
        .collect::<Vec<_>>()
        .join(&b"\r\n"[..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::{MessageParser, MimeHeaders};

    /// The decoded contents of every leaf part, as an independent MIME parser reads them.
    fn leaves(message: &[u8]) -> Vec<(String, Vec<u8>)> {
        let parsed = MessageParser::default().parse(message).expect("parses");
        let mut found = Vec::new();
        collect(&parsed, &mut found);
        found
    }

    fn collect(message: &mail_parser::Message<'_>, found: &mut Vec<(String, Vec<u8>)>) {
        for part in &message.parts {
            let ctype = part
                .content_type()
                .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")))
                .unwrap_or_else(|| "text/plain".into());
            match &part.body {
                mail_parser::PartType::Text(t) | mail_parser::PartType::Html(t) => {
                    found.push((ctype, t.as_bytes().to_vec()))
                }
                mail_parser::PartType::Binary(b) | mail_parser::PartType::InlineBinary(b) => {
                    found.push((ctype, b.to_vec()))
                }
                mail_parser::PartType::Message(m) => collect(m, found),
                mail_parser::PartType::Multipart(_) => {}
            }
        }
    }

    fn assert_7bit_and_same_content(original: &[u8]) -> Vec<u8> {
        let converted = seven_bit(original).expect("converts");
        assert!(
            !is_8bit(&converted),
            "{}",
            String::from_utf8_lossy(&converted)
        );
        let crlf = |m: &[u8]| super::super::wire::crlf_form(m);
        let (before, after) = (leaves(&crlf(original)), leaves(&crlf(&converted)));
        assert!(!before.is_empty());
        assert_eq!(after, before);
        converted
    }

    #[test]
    fn an_8bit_text_message_becomes_quoted_printable_with_the_same_text() {
        let original = "From: a@a.test\nSubject: hi\nContent-Type: text/plain; charset=utf-8\n\
                        Content-Transfer-Encoding: 8bit\n\nGrüße aus a.test\n.leading dot\n"
            .as_bytes();
        let converted = assert_7bit_and_same_content(original);
        let text = String::from_utf8(converted).unwrap();
        assert!(text.contains("MIME-Version: 1.0\n"), "{text}");
        assert!(
            text.contains("Content-Transfer-Encoding: quoted-printable\n"),
            "{text}"
        );
        assert!(!text.contains("8bit"), "{text}");
        assert!(text.contains("Gr=C3=BC=C3=9Fe aus a.test\n"), "{text}");
        assert!(text.starts_with("From: a@a.test\nSubject: hi\n"), "{text}");
    }

    #[test]
    fn only_the_8bit_parts_of_a_multipart_change_and_its_frame_is_kept() {
        let original = "From: a@a.test\nMIME-Version: 1.0\n\
            Content-Type: multipart/mixed; boundary=\"XyZ\"\n\n\
            preamble\n--XyZ\nContent-Type: text/plain\n\nplain ascii\n\
            --XyZ\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n\
            caf\u{e9}\n\
            --XyZ\nContent-Type: application/octet-stream\n\n\u{ff}\u{fe} bytes\n\
            --XyZ\nContent-Type: message/rfc822\n\nSubject: inner\n\nna\u{ef}ve\n\
            --XyZ--\nepilogue\n"
            .as_bytes();
        let converted = assert_7bit_and_same_content(original);
        let text = String::from_utf8(converted).unwrap();
        assert!(
            text.contains("preamble\n--XyZ\nContent-Type: text/plain\n\nplain ascii\n--XyZ\n"),
            "{text}"
        );
        assert!(text.contains("caf=C3=A9\n--XyZ\n"), "{text}");
        assert!(
            text.contains(
                "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "Subject: inner\nMIME-Version: 1.0\nContent-Transfer-Encoding: quoted-printable\n"
            ),
            "the attached message is MIME too: {text}"
        );
        assert!(text.ends_with("--XyZ--\nepilogue\n"), "{text}");
        assert_eq!(text.matches("--XyZ").count(), 5, "{text}");
    }

    #[test]
    fn what_cannot_be_converted_faithfully_is_refused() {
        for original in [
            "Subject: Gr\u{fc}\u{df}e\n\nbody\n",
            "Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\n\u{e9}\n",
            "Content-Type: multipart/mixed; boundary=b\n\npre \u{e9}\n--b\n\nx\n--b--\n",
            "Content-Type: message/global\n\nSubject: x\n\n\u{e9}\n",
            "Content-Transfer-Encoding: x-uuencode\n\n\u{e9}\n",
        ] {
            assert_eq!(seven_bit(original.as_bytes()), None, "{original}");
        }
        let mut deep = String::new();
        for _ in 0..=MAX_DEPTH {
            deep.push_str("Content-Type: message/rfc822\n\n");
        }
        deep.push_str("Subject: x\n\n\u{e9}\n");
        assert_eq!(seven_bit(deep.as_bytes()), None);
    }

    #[test]
    fn a_soft_line_break_never_makes_a_delimiter_line() {
        // Quoted-printable would wrap this line just before "--XyZ--", closing the multipart.
        let line = format!("Gr\u{fc}\u{df}e {}--XyZ--", "y".repeat(59));
        let original = format!(
            "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=XyZ\n\n--XyZ\n\
             Content-Type: text/plain; charset=utf-8\n\n{line}\n--XyZ\n\nafter\n--XyZ--\n"
        );
        let qp = quoted_printable::encode(format!("{line}\r\n").as_bytes());
        assert!(
            starts_a_line_with_a_delimiter(&qp, &["XyZ"]),
            "the case is real"
        );
        // (mail-parser finds delimiters in mid-line too, so it cannot judge this one.)
        let converted = seven_bit(original.as_bytes()).unwrap();
        let text = String::from_utf8(converted).unwrap();
        let delimiters: Vec<&str> = text.lines().filter(|l| l.starts_with("--XyZ")).collect();
        assert_eq!(delimiters, ["--XyZ", "--XyZ", "--XyZ--"], "{text}");
        let (_, part) = text
            .split_once("Content-Transfer-Encoding: base64\n\n")
            .expect("sent as base64");
        let encoded: String = part.lines().take_while(|l| !l.starts_with("--")).collect();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(decoded, line.as_bytes());
    }

    #[test]
    fn parameters_are_split_outside_quotes_and_a_doubled_field_is_refused() {
        let original = "MIME-Version: 1.0\n\
            Content-Type: multipart/mixed; name=\"a;boundary=x\"; boundary=\"real\"\n\n\
            --real\nContent-Type: text/plain\n\ncaf\u{e9}\n--real--\n";
        let text = String::from_utf8(assert_7bit_and_same_content(original.as_bytes())).unwrap();
        assert!(text.contains("caf=C3=A9\n--real--\n"), "{text}");
        let doubled = "Content-Type: text/plain\nContent-Type: image/png\n\ncaf\u{e9}\n";
        assert_eq!(seven_bit(doubled.as_bytes()), None);
    }

    #[test]
    fn a_converted_message_always_declares_mime() {
        let original = "Content-Type: multipart/mixed; boundary=b\n\n--b\n\ncaf\u{e9}\n--b--\n";
        let text = String::from_utf8(assert_7bit_and_same_content(original.as_bytes())).unwrap();
        assert!(
            text.starts_with("Content-Type: multipart/mixed; boundary=b\nMIME-Version: 1.0\n\n"),
            "{text}"
        );
    }

    #[test]
    fn a_7bit_message_is_left_alone() {
        let original = b"Subject: x\nContent-Transfer-Encoding: 7bit\n\nplain\n";
        assert_eq!(seven_bit(original).unwrap(), original.to_vec());
    }
}
