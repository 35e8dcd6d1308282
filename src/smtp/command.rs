//! Parsing of one SMTP command line (without its line ending) into a [`Command`], RFC 5321 §4.1.
//! Pure: no I/O, no policy. Errors say which reply the client deserves.

/// A mailbox from a path (RFC 5321 §4.1.2), with its local part decoded (quotes removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub local: String,
    /// A domain name (U-labels allowed, RFC 6531), or an address literal including its brackets.
    pub domain: String,
    /// The mailbox as the client wrote it (source route dropped), for trace headers and logs.
    pub raw: String,
}

impl Mailbox {
    pub fn is_address_literal(&self) -> bool {
        self.domain.starts_with('[')
    }

    /// Non-ASCII: only allowed in a transaction that declared SMTPUTF8 (RFC 6531 §3.4).
    pub fn is_utf8(&self) -> bool {
        !self.raw.is_ascii()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Body {
    #[default]
    SevenBit,
    EightBitMime,
}

/// RFC 3461 §4.3, §4.4: what the sender asked of failure reports for the whole message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailDsn {
    /// `RET=HDRS` (`Some(false)`) or `RET=FULL` (`Some(true)`): return the header only, or all of it.
    pub ret_full: Option<bool>,
    /// `ENVID=`, xtext as given.
    pub envid: Option<String>,
}

/// RFC 3461 §4.1, §4.2: what the sender asked of notifications for one recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptDsn {
    pub notify: Option<Notify>,
    /// `ORCPT=addr-type;xtext`, as given.
    pub orcpt: Option<String>,
}

/// `NOTIFY=`: all false is `NEVER`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    /// The parameter value, as sent on to a next hop that offers DSN.
    pub fn value(&self) -> String {
        let mut words = Vec::new();
        for (on, word) in [
            (self.success, "SUCCESS"),
            (self.failure, "FAILURE"),
            (self.delay, "DELAY"),
        ] {
            if on {
                words.push(word);
            }
        }
        if words.is_empty() {
            "NEVER".into()
        } else {
            words.join(",")
        }
    }
}

/// RFC 3461 §4: xtext, printable ASCII without `+` and `=` but for `+XX` hex escapes.
pub fn is_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c));
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' if hex(b.get(i + 1)) && hex(b.get(i + 2)) => i += 3,
            b'+' | b'=' => return false,
            b'!'..=b'~' => i += 1,
            _ => return false,
        }
    }
    true
}

/// xtext decoded (`+2B` → `+`), for reports; call on valid xtext only.
pub fn xtext_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'+')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    /// `from` is `None` for the null reverse-path `<>`.
    Mail {
        from: Option<Mailbox>,
        size: Option<u64>,
        body: Body,
        /// The SMTPUTF8 parameter (RFC 6531 §3.4).
        smtputf8: bool,
        dsn: MailDsn,
    },
    Rcpt(Mailbox, RcptDsn),
    Data,
    /// RFC 3030 CHUNKING: `size` octets of message follow the command line.
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    /// RFC 3207.
    StartTls,
    /// RFC 4954: `AUTH mechanism [initial-response]`.
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Unknown verb: `500 5.5.1`.
    Unrecognised,
    /// Known verb, bad arguments: `501 5.5.4`.
    Syntax,
    /// Bad mailbox syntax or length: `501 5.1.3`.
    Address,
    /// Unknown MAIL/RCPT parameter: `555 5.5.4`.
    UnknownParameter,
    /// A verb we know of but do not offer (STARTTLS, AUTH, BDAT, …): `502 5.5.1`.
    NotImplemented,
    /// An HTTP request on the SMTP port: a cross-protocol attack, the connection is closed at once.
    HttpVerb,
}

/// RFC 5321 §4.5.3.1: local part 64 octets, domain 255, path 256 (brackets included).
const MAX_LOCAL: usize = 64;
const MAX_DOMAIN: usize = 255;
const MAX_PATH: usize = 256;

pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
    // NUL, other control characters and invalid UTF-8 are syntax errors, never a crash. UTF-8 is
    // allowed in the paths of MAIL and RCPT only (RFC 6531 §3.3).
    let line = std::str::from_utf8(line).map_err(|_| ParseError::Syntax)?;
    if line.chars().any(char::is_control) {
        return Err(ParseError::Syntax);
    }
    let (verb, args) = match line.split_once(' ') {
        Some((v, a)) => (v, a),
        None => (line, ""),
    };
    let verb = verb.to_ascii_uppercase();
    if !line.is_ascii() && verb != "MAIL" && verb != "RCPT" {
        return Err(ParseError::Syntax);
    }
    let no_args = |c: Command| {
        if args.trim().is_empty() {
            Ok(c)
        } else {
            Err(ParseError::Syntax)
        }
    };
    match verb.as_str() {
        "EHLO" => Ok(Command::Ehlo(parse_helo_arg(args)?)),
        "HELO" => Ok(Command::Helo(parse_helo_arg(args)?)),
        "MAIL" => parse_mail(args),
        "RCPT" => parse_rcpt(args),
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        "QUIT" => no_args(Command::Quit),
        "NOOP" => Ok(Command::Noop),
        // RFC 5321 §4.1.1.6, §4.1.1.7: VRFY and EXPN take a string.
        "VRFY" if !args.trim().is_empty() => Ok(Command::Vrfy),
        "EXPN" if !args.trim().is_empty() => Ok(Command::Expn),
        "VRFY" | "EXPN" => Err(ParseError::Syntax),
        "HELP" => Ok(Command::Help),
        "BDAT" => parse_bdat(args),
        "STARTTLS" => no_args(Command::StartTls),
        "AUTH" => parse_auth(args),
        "TURN" | "ETRN" | "ATRN" | "SEND" | "SOML" | "SAML" => Err(ParseError::NotImplemented),
        "GET" | "POST" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "CONNECT" | "PATCH" | "TRACE"
            if !args.is_empty() =>
        {
            Err(ParseError::HttpVerb)
        }
        _ => Err(ParseError::Unrecognised),
    }
}

/// RFC 5321 §4.1.1.1 wants a domain or address literal. Real clients send bare host names with
/// underscores and the like, so any single token of printable ASCII is taken; it is only ever echoed
/// in the `Received:` header, where such a token is harmless.
fn parse_helo_arg(args: &str) -> Result<String, ParseError> {
    let arg = args.trim();
    if arg.is_empty() || arg.len() > MAX_DOMAIN || !arg.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ParseError::Syntax);
    }
    Ok(arg.to_string())
}

fn strip_keyword<'a>(args: &'a str, keyword: &str) -> Option<&'a str> {
    let head = args.get(..keyword.len())?;
    // Tolerate `MAIL FROM: <a@b>`: common in the wild, and unambiguous.
    head.eq_ignore_ascii_case(keyword)
        .then(|| args[keyword.len()..].trim_start_matches(' '))
}

fn parse_mail(args: &str) -> Result<Command, ParseError> {
    let rest = strip_keyword(args, "FROM:").ok_or(ParseError::Syntax)?;
    let (from, params) = parse_path(rest, true)?;
    let mut size = None;
    let mut body = Body::default();
    let mut smtputf8 = false;
    let mut dsn = MailDsn::default();
    let mut seen: Vec<String> = Vec::new();
    for param in params.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        let key = key.to_ascii_uppercase();
        // A parameter given twice is ambiguous (which SIZE holds?): refused, as Postfix does.
        if seen.contains(&key) {
            return Err(ParseError::Syntax);
        }
        seen.push(key.clone());
        match key.as_str() {
            // RFC 1870 §3: SIZE=<decimal octets>.
            "SIZE" => {
                let valid = !value.is_empty()
                    && value.len() <= 20
                    && value.bytes().all(|b| b.is_ascii_digit());
                size = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|_| valid)
                        .ok_or(ParseError::Syntax)?,
                );
            }
            // RFC 6152: BODY=7BIT | 8BITMIME.
            "BODY" => {
                body = match value.to_ascii_uppercase().as_str() {
                    "7BIT" => Body::SevenBit,
                    "8BITMIME" => Body::EightBitMime,
                    _ => return Err(ParseError::Syntax),
                }
            }
            // RFC 4954 §5: the submitter identity a client may pass along; informative only.
            "AUTH" if !value.is_empty() => {}
            // RFC 6531 §3.4: a keyword without value.
            "SMTPUTF8" if value.is_empty() && !param.contains('=') => smtputf8 = true,
            // RFC 3461 §4.3: RET=FULL | HDRS.
            "RET" => {
                dsn.ret_full = Some(match value.to_ascii_uppercase().as_str() {
                    "FULL" => true,
                    "HDRS" => false,
                    _ => return Err(ParseError::Syntax),
                })
            }
            // RFC 3461 §4.4: ENVID=xtext, at most 100 characters.
            "ENVID" if !value.is_empty() && value.len() <= 100 && is_xtext(value) => {
                dsn.envid = Some(value.to_string())
            }
            "ENVID" => return Err(ParseError::Syntax),
            _ => return Err(ParseError::UnknownParameter),
        }
    }
    Ok(Command::Mail {
        from,
        size,
        body,
        smtputf8,
        dsn,
    })
}

fn parse_auth(args: &str) -> Result<Command, ParseError> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let mechanism = words.next().ok_or(ParseError::Syntax)?.to_ascii_uppercase();
    let initial = words.next().map(str::to_string);
    if words.next().is_some() {
        return Err(ParseError::Syntax);
    }
    Ok(Command::Auth { mechanism, initial })
}

/// RFC 3030 §2: `BDAT chunk-size [LAST]`.
fn parse_bdat(args: &str) -> Result<Command, ParseError> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let size = words
        .next()
        .filter(|w| w.len() <= 20 && w.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|w| w.parse().ok())
        .ok_or(ParseError::Syntax)?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(ParseError::Syntax),
    };
    if words.next().is_some() {
        return Err(ParseError::Syntax);
    }
    Ok(Command::Bdat { size, last })
}

fn parse_rcpt(args: &str) -> Result<Command, ParseError> {
    let rest = strip_keyword(args, "TO:").ok_or(ParseError::Syntax)?;
    // RFC 5321 §4.1.1.3: `<Postmaster>` without a domain must be accepted.
    if let Some(after) = rest
        .get(..12)
        .filter(|p| p.eq_ignore_ascii_case("<postmaster>"))
        .map(|_| &rest[12..])
    {
        if !after.trim().is_empty() {
            return Err(ParseError::UnknownParameter);
        }
        return Ok(Command::Rcpt(
            Mailbox {
                local: "postmaster".into(),
                domain: String::new(),
                raw: "postmaster".into(),
            },
            RcptDsn::default(),
        ));
    }
    let (to, params) = parse_path(rest, false)?;
    let dsn = parse_rcpt_params(params)?;
    to.map(|to| Command::Rcpt(to, dsn))
        .ok_or(ParseError::Address)
}

/// RFC 3461 §4.1, §4.2: `NOTIFY=NEVER | SUCCESS,FAILURE,DELAY` and `ORCPT=addr-type;xtext`.
fn parse_rcpt_params(params: &str) -> Result<RcptDsn, ParseError> {
    let mut dsn = RcptDsn::default();
    for param in params.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match key.to_ascii_uppercase().as_str() {
            "NOTIFY" if dsn.notify.is_none() => {
                let mut notify = Notify::default();
                let words: Vec<String> = value.split(',').map(str::to_ascii_uppercase).collect();
                if words != ["NEVER"] {
                    for word in &words {
                        let flag = match word.as_str() {
                            "SUCCESS" => &mut notify.success,
                            "FAILURE" => &mut notify.failure,
                            "DELAY" => &mut notify.delay,
                            _ => return Err(ParseError::Syntax),
                        };
                        if *flag {
                            return Err(ParseError::Syntax);
                        }
                        *flag = true;
                    }
                }
                dsn.notify = Some(notify);
            }
            "ORCPT" if dsn.orcpt.is_none() => {
                let valid = value.len() <= 500
                    && value.split_once(';').is_some_and(|(kind, address)| {
                        !kind.is_empty()
                            && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                            && !address.is_empty()
                            && is_xtext(address)
                    });
                if !valid {
                    return Err(ParseError::Syntax);
                }
                dsn.orcpt = Some(value.to_string());
            }
            "NOTIFY" | "ORCPT" => return Err(ParseError::Syntax),
            _ => return Err(ParseError::UnknownParameter),
        }
    }
    Ok(dsn)
}

/// Parses `<[@route,...:]mailbox>` (or `<>` when `null_ok`) and returns the rest of the line.
fn parse_path(s: &str, null_ok: bool) -> Result<(Option<Mailbox>, &str), ParseError> {
    let b = s.as_bytes();
    if b.first() != Some(&b'<') {
        return Err(ParseError::Syntax);
    }
    if b.get(1) == Some(&b'>') {
        return if null_ok {
            Ok((None, rest_after(s, 2)?))
        } else {
            Err(ParseError::Address)
        };
    }
    let mut i = 1;
    // RFC 5321 §4.1.1.3 / Appendix C: a source route must be accepted and should be ignored.
    if b.get(i) == Some(&b'@') {
        let colon = s[i..].find(':').ok_or(ParseError::Address)? + i;
        for hop in s[i..colon].split(',') {
            let domain = hop.strip_prefix('@').ok_or(ParseError::Address)?;
            if !crate::accounts::is_valid_domain(domain) {
                return Err(ParseError::Address);
            }
        }
        i = colon + 1;
    }
    let start = i;
    let local = if b.get(i) == Some(&b'"') {
        parse_quoted(b, &mut i)?
    } else {
        let begin = i;
        // RFC 6531 §3.3: UTF-8 characters extend atext.
        while i < b.len() && (is_atext(b[i]) || b[i] == b'.' || b[i] >= 0x80) {
            i += 1;
        }
        let atom = &s[begin..i];
        if atom.is_empty() || atom.starts_with('.') || atom.ends_with('.') || atom.contains("..") {
            return Err(ParseError::Address);
        }
        atom.to_string()
    };
    if i - start > MAX_LOCAL || b.get(i) != Some(&b'@') {
        return Err(ParseError::Address);
    }
    i += 1;
    let domain_start = i;
    if b.get(i) == Some(&b'[') {
        let close = s[i..].find(']').ok_or(ParseError::Address)? + i;
        let inner = &s[i + 1..close];
        if inner.is_empty() || inner.bytes().any(|c| matches!(c, b'[' | b'\\' | b' ')) {
            return Err(ParseError::Address);
        }
        i = close + 1;
    } else {
        while i < b.len()
            && (b[i].is_ascii_alphanumeric() || b[i] == b'-' || b[i] == b'.' || b[i] >= 0x80)
        {
            i += 1;
        }
        // U-labels (RFC 6531) are checked through their A-label form.
        if crate::accounts::normalize_domain(&s[domain_start..i]).is_none() {
            return Err(ParseError::Address);
        }
    }
    let domain = &s[domain_start..i];
    if domain.len() > MAX_DOMAIN || b.get(i) != Some(&b'>') || i + 1 > MAX_PATH {
        return Err(ParseError::Address);
    }
    let mailbox = Mailbox {
        local,
        domain: domain.to_string(),
        raw: s[start..i].to_string(),
    };
    Ok((Some(mailbox), rest_after(s, i + 1)?))
}

/// After the closing `>`: end of line, or a space and parameters.
fn rest_after(s: &str, at: usize) -> Result<&str, ParseError> {
    match s.as_bytes().get(at) {
        None => Ok(""),
        Some(b' ') => Ok(&s[at + 1..]),
        Some(_) => Err(ParseError::Syntax),
    }
}

/// RFC 5321 §4.1.2 Quoted-string: qtextSMTP (and UTF-8, RFC 6531) or a backslash pair. Returns the
/// decoded content.
fn parse_quoted(b: &[u8], i: &mut usize) -> Result<String, ParseError> {
    *i += 1;
    let mut out = Vec::new();
    loop {
        match b.get(*i) {
            Some(b'"') => {
                *i += 1;
                // Whole UTF-8 sequences were copied from a valid UTF-8 line, so this cannot fail.
                let out = String::from_utf8(out).map_err(|_| ParseError::Address)?;
                return if out.is_empty() {
                    Err(ParseError::Address)
                } else {
                    Ok(out)
                };
            }
            Some(b'\\') => match b.get(*i + 1) {
                Some(&c) if (32..=126).contains(&c) => {
                    out.push(c);
                    *i += 2;
                }
                _ => return Err(ParseError::Address),
            },
            Some(&c) if (32..=126).contains(&c) || c >= 0x80 => {
                out.push(c);
                *i += 1;
            }
            _ => return Err(ParseError::Address),
        }
    }
}

/// RFC 5322 §3.2.3 atext.
fn is_atext(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c)
}

#[cfg(test)]
mod dsn_tests {
    use super::*;

    #[test]
    fn dsn_parameters_parse_and_bad_ones_are_syntax_errors() {
        let Ok(Command::Mail { dsn, .. }) =
            parse(b"MAIL FROM:<a@b.example> RET=hdrs ENVID=QQ314159+2B1")
        else {
            panic!()
        };
        assert_eq!(dsn.ret_full, Some(false));
        assert_eq!(dsn.envid.as_deref(), Some("QQ314159+2B1"));
        let Ok(Command::Rcpt(_, dsn)) =
            parse(b"RCPT TO:<c@d.example> NOTIFY=SUCCESS,failure ORCPT=rfc822;c+40d.example")
        else {
            panic!()
        };
        assert_eq!(
            dsn.notify,
            Some(Notify {
                success: true,
                failure: true,
                delay: false
            })
        );
        assert_eq!(dsn.orcpt.as_deref(), Some("rfc822;c+40d.example"));
        assert_eq!(xtext_decode("c+40d.example"), "c@d.example");
        let Ok(Command::Rcpt(_, dsn)) = parse(b"RCPT TO:<c@d.example> NOTIFY=NEVER") else {
            panic!()
        };
        assert_eq!(dsn.notify, Some(Notify::default()));
        assert_eq!(dsn.notify.unwrap().value(), "NEVER");
        for bad in [
            "MAIL FROM:<a@b.example> RET=ALL",
            "MAIL FROM:<a@b.example> ENVID=a=b",
            "MAIL FROM:<a@b.example> ENVID=+4",
            "RCPT TO:<c@d.example> NOTIFY=NEVER,SUCCESS",
            "RCPT TO:<c@d.example> NOTIFY=SUCCESS,SUCCESS",
            "RCPT TO:<c@d.example> NOTIFY=SOMETIMES",
            "RCPT TO:<c@d.example> ORCPT=c@d.example",
            "RCPT TO:<c@d.example> ORCPT=rfc822;",
            "RCPT TO:<c@d.example> NOTIFY=FAILURE NOTIFY=FAILURE",
        ] {
            assert_eq!(parse(bad.as_bytes()), Err(ParseError::Syntax), "{bad}");
        }
        assert_eq!(
            parse(b"RCPT TO:<c@d.example> FOO=1"),
            Err(ParseError::UnknownParameter)
        );
    }

    #[test]
    fn xtext_accepts_printable_ascii_and_hex_escapes_only() {
        assert!(is_xtext("abc+2B+3D!~"));
        assert!(
            !is_xtext("a=b")
                && !is_xtext("a+")
                && !is_xtext("a+2")
                && !is_xtext("a+2b")
                && !is_xtext("é")
        );
        assert!(!is_xtext("a b"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(local: &str, domain: &str, raw: &str) -> Mailbox {
        Mailbox {
            local: local.into(),
            domain: domain.into(),
            raw: raw.into(),
        }
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            parse(b"ehlo client.example"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(parse(b"QuIt"), Ok(Command::Quit));
    }

    #[test]
    fn mail_with_params() {
        assert_eq!(
            parse(b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME"),
            Ok(Command::Mail {
                from: Some(mailbox("a", "b.example", "a@b.example")),
                size: Some(1000),
                body: Body::EightBitMime,
                smtputf8: false,
                dsn: MailDsn::default(),
            })
        );
    }

    #[test]
    fn null_reverse_path() {
        assert_eq!(
            parse(b"MAIL FROM:<>"),
            Ok(Command::Mail {
                from: None,
                size: None,
                body: Body::SevenBit,
                smtputf8: false,
                dsn: MailDsn::default(),
            })
        );
        assert_eq!(parse(b"RCPT TO:<>"), Err(ParseError::Address));
    }

    #[test]
    fn space_after_colon_tolerated() {
        assert!(matches!(
            parse(b"MAIL FROM: <a@b.example>"),
            Ok(Command::Mail { .. })
        ));
    }

    #[test]
    fn missing_brackets_is_syntax_error() {
        assert_eq!(parse(b"MAIL FROM:a@b.example"), Err(ParseError::Syntax));
        assert_eq!(parse(b"RCPT TO:a@b.example"), Err(ParseError::Syntax));
    }

    #[test]
    fn quoted_local_part_is_decoded() {
        assert_eq!(
            parse(br#"RCPT TO:<"john\"doe"@example.org>"#),
            Ok(Command::Rcpt(
                mailbox("john\"doe", "example.org", r#""john\"doe"@example.org"#),
                RcptDsn::default()
            ))
        );
    }

    #[test]
    fn source_route_is_dropped() {
        assert_eq!(
            parse(b"RCPT TO:<@relay.example,@b.example:user@other.example>"),
            Ok(Command::Rcpt(
                mailbox("user", "other.example", "user@other.example"),
                RcptDsn::default()
            ))
        );
    }

    #[test]
    fn address_literal() {
        let Ok(Command::Rcpt(m, _)) = parse(b"RCPT TO:<u@[127.0.0.1]>") else {
            panic!()
        };
        assert!(m.is_address_literal());
    }

    #[test]
    fn postmaster_without_domain() {
        assert_eq!(
            parse(b"RCPT TO:<Postmaster>"),
            Ok(Command::Rcpt(
                mailbox("postmaster", "", "postmaster"),
                RcptDsn::default()
            ))
        );
    }

    #[test]
    fn length_limits() {
        let long_local = format!("RCPT TO:<{}@example.org>", "a".repeat(65));
        assert_eq!(parse(long_local.as_bytes()), Err(ParseError::Address));
        let ok_local = format!("RCPT TO:<{}@example.org>", "a".repeat(64));
        assert!(parse(ok_local.as_bytes()).is_ok());
    }

    #[test]
    fn bad_addresses() {
        for line in [
            "RCPT TO:<user@>",
            "RCPT TO:<@example.org>",
            "RCPT TO:<a..b@example.org>",
            "RCPT TO:<user@example.org.>",
            "RCPT TO:<user@-bad.org>",
            "RCPT TO:<user example.org>",
            "RCPT TO:<user@example.org",
        ] {
            assert!(parse(line.as_bytes()).is_err(), "{line}");
        }
    }

    #[test]
    fn unknown_parameters() {
        assert_eq!(
            parse(b"MAIL FROM:<a@b.org> XFOO=FULL"),
            Err(ParseError::UnknownParameter)
        );
        assert_eq!(
            parse(b"RCPT TO:<a@b.org> XNOTIFY=NEVER"),
            Err(ParseError::UnknownParameter)
        );
        assert_eq!(
            parse(b"MAIL FROM:<a@b.org> SIZE=12x"),
            Err(ParseError::Syntax)
        );
    }

    #[test]
    fn argument_grammar_of_rfc_5321() {
        for line in [
            "VRFY",
            "EXPN ",
            "QUIT now",
            "DATA x",
            "RSET y",
            "STARTTLS z",
            "EHLO",
        ] {
            assert_eq!(parse(line.as_bytes()), Err(ParseError::Syntax), "{line}");
        }
        assert_eq!(parse(b"NOOP any string"), Ok(Command::Noop));
        assert_eq!(parse(b"VRFY alice"), Ok(Command::Vrfy));
        for line in [
            "MAIL FROM:<a@b.example> SIZE=1 SIZE=2",
            "MAIL FROM:<a@b.example> size=1 SIZE=1",
            "MAIL FROM:<a@b.example> BODY=7BIT BODY=8BITMIME",
            "MAIL FROM:<a@b.example> SMTPUTF8 SMTPUTF8",
        ] {
            assert_eq!(parse(line.as_bytes()), Err(ParseError::Syntax), "{line}");
        }
    }

    #[test]
    fn hostile_bytes_are_syntax_errors() {
        assert_eq!(parse(b"NOOP\0"), Err(ParseError::Syntax));
        assert_eq!(parse(b"RSET\x1b[2J"), Err(ParseError::Syntax));
        assert_eq!(
            parse(b"MAIL FROM:<\xff@b.org>"),
            Err(ParseError::Syntax),
            "invalid UTF-8"
        );
        assert_eq!(
            parse("EHLO é.example".as_bytes()),
            Err(ParseError::Syntax),
            "UTF-8 outside paths"
        );
    }

    #[test]
    fn utf8_addresses_and_smtputf8() {
        let Ok(Command::Mail {
            from: Some(from),
            smtputf8: true,
            ..
        }) = parse("MAIL FROM:<josé@münchen.de> SMTPUTF8".as_bytes())
        else {
            panic!()
        };
        assert!(from.is_utf8());
        assert_eq!(
            (from.local.as_str(), from.domain.as_str()),
            ("josé", "münchen.de")
        );
        let Ok(Command::Rcpt(to, _)) = parse("RCPT TO:<\"δοκιμή\"@example.org>".as_bytes())
        else {
            panic!()
        };
        assert_eq!(to.local, "δοκιμή");
        assert_eq!(
            parse(b"MAIL FROM:<a@b.org> SMTPUTF8=yes"),
            Err(ParseError::UnknownParameter)
        );
        assert_eq!(
            parse("RCPT TO:<a@bad_domäin.org>".as_bytes()),
            Err(ParseError::Address)
        );
    }

    #[test]
    fn bdat() {
        assert_eq!(
            parse(b"BDAT 100"),
            Ok(Command::Bdat {
                size: 100,
                last: false
            })
        );
        assert_eq!(
            parse(b"bdat 0 last"),
            Ok(Command::Bdat {
                size: 0,
                last: true
            })
        );
        for bad in [
            "BDAT",
            "BDAT -1",
            "BDAT 1 FIRST",
            "BDAT 1 LAST x",
            "BDAT 99999999999999999999999",
        ] {
            assert_eq!(parse(bad.as_bytes()), Err(ParseError::Syntax), "{bad}");
        }
    }

    #[test]
    fn http_is_recognised() {
        assert_eq!(parse(b"GET / HTTP/1.1"), Err(ParseError::HttpVerb));
        assert_eq!(parse(b"POST /x HTTP/1.0"), Err(ParseError::HttpVerb));
    }

    #[test]
    fn not_offered_extensions() {
        assert_eq!(parse(b"STARTTLS"), Ok(Command::StartTls));
        assert_eq!(parse(b"STARTTLS now"), Err(ParseError::Syntax));
        assert_eq!(
            parse(b"auth plain AGEAYg=="),
            Ok(Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("AGEAYg==".into())
            })
        );
        assert_eq!(parse(b"AUTH"), Err(ParseError::Syntax));
        assert_eq!(parse(b"ETRN example.org"), Err(ParseError::NotImplemented));
    }

    #[test]
    fn data_takes_no_arguments() {
        assert_eq!(parse(b"DATA x"), Err(ParseError::Syntax));
        assert_eq!(parse(b"FOO"), Err(ParseError::Unrecognised));
    }
}
