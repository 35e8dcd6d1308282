//! SMTP replies as a named vocabulary (RFC 5321 §4.2, enhanced status codes RFC 3463 / RFC 2034), so that
//! handlers say `reply::RELAY_DENIED`, never a bare `550`.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// RFC 3463 enhanced status code; empty for the greeting and EHLO/HELO replies (RFC 2034 §3).
    pub status: &'static str,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn new(code: u16, status: &'static str, text: &'static str) -> Reply {
        Reply {
            code,
            status,
            text: Cow::Borrowed(text),
        }
    }

    pub fn with_text(&self, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            text: text.into(),
            ..self.clone()
        }
    }

    /// Appends the wire form. Multi-line text (separated by `\n`) becomes `code-` continuation lines.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        while let Some(line) = lines.next() {
            let sep = if lines.peek().is_some() { '-' } else { ' ' };
            out.extend_from_slice(format!("{}{}", self.code, sep).as_bytes());
            if !self.status.is_empty() {
                out.extend_from_slice(self.status.as_bytes());
                out.push(b' ');
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

// Positive completions.
pub const OK: Reply = Reply::new(250, "2.0.0", "OK");
pub const SENDER_OK: Reply = Reply::new(250, "2.1.0", "Sender OK");
pub const RECIPIENT_OK: Reply = Reply::new(250, "2.1.5", "Recipient OK");
pub const RESET_OK: Reply = Reply::new(250, "2.0.0", "Reset");
pub const BYE: Reply = Reply::new(221, "2.0.0", "Bye");
/// RFC 5321 §3.5.3: VRFY may answer 252 without confirming anything; we never disclose accounts.
pub const CANNOT_VRFY: Reply = Reply::new(
    252,
    "2.1.5",
    "Cannot VRFY user, but will accept message and attempt delivery",
);
pub const HELP: Reply = Reply::new(
    214,
    "2.0.0",
    "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\nSee RFC 5321",
);
pub const START_DATA: Reply = Reply::new(354, "", "End data with <CR><LF>.<CR><LF>");

pub const AUTH_OK: Reply = Reply::new(235, "2.7.0", "Authentication successful");
pub const READY_FOR_TLS: Reply = Reply::new(220, "2.0.0", "Ready to start TLS");

// Transient failures.
pub const SHUTTING_DOWN: Reply = Reply::new(421, "4.3.2", "Service shutting down, try again later");
pub const TIMEOUT: Reply = Reply::new(421, "4.4.2", "Timeout, closing connection");
pub const SESSION_EXPIRED: Reply = Reply::new(
    421,
    "4.4.2",
    "Session time limit reached, closing connection",
);
pub const TOO_MANY_ERRORS: Reply = Reply::new(421, "4.7.0", "Too many errors, closing connection");
pub const TOO_MANY_CONNECTIONS: Reply =
    Reply::new(421, "4.7.0", "Too many connections, try again later");
pub const STORAGE_FAILED: Reply =
    Reply::new(451, "4.3.0", "Could not store the message, try again later");
/// RFC 3463 4.3.1: the disk (or quota) is full; the client keeps the message and retries.
pub const STORAGE_FULL: Reply =
    Reply::new(452, "4.3.1", "Insufficient system storage, try again later");
pub const TOO_MANY_RECIPIENTS: Reply = Reply::new(452, "4.5.3", "Too many recipients");
/// Closes the connection, hence 421 (RFC 5321 §3.8).
pub const AUTH_THROTTLED: Reply = Reply::new(
    421,
    "4.7.0",
    "Too many failed logins from your address, try again later",
);
pub const TLS_UNAVAILABLE: Reply = Reply::new(454, "4.7.0", "TLS not available");

// Permanent failures.
pub const LINE_TOO_LONG: Reply = Reply::new(500, "5.5.2", "Line too long");
pub const UNRECOGNISED: Reply = Reply::new(500, "5.5.1", "Command not recognised");
pub const SYNTAX: Reply = Reply::new(501, "5.5.4", "Syntax error in parameters");
pub const ADDRESS_SYNTAX: Reply = Reply::new(501, "5.1.3", "Bad address syntax");
pub const NOT_IMPLEMENTED: Reply = Reply::new(502, "5.5.1", "Command not implemented");
pub const BAD_SEQUENCE: Reply = Reply::new(503, "5.5.1", "Bad sequence of commands");
pub const UNKNOWN_USER: Reply = Reply::new(550, "5.1.1", "No such user here");
pub const RELAY_DENIED: Reply = Reply::new(550, "5.7.1", "Relaying denied");
/// The administrator turned outbound delivery off (`outbound.enable = false`).
pub const OUTBOUND_DISABLED: Reply = Reply::new(
    550,
    "5.7.1",
    "This server does not deliver to other domains; local recipients only",
);
pub const BAD_LINE_ENDING: Reply = Reply::new(
    550,
    "5.6.0",
    "Message refused: bare CR or LF; lines must end with CRLF",
);
pub const DATA_LINE_TOO_LONG: Reply = Reply::new(550, "5.6.0", "Message refused: line too long");
/// RFC 5321 §4.2.2 552 "exceeded storage allocation", RFC 3463 5.3.4: the message is larger than the
/// whole file system of the store; retrying cannot help.
pub const LARGER_THAN_STORAGE: Reply =
    Reply::new(552, "5.3.4", "Message too big for this system's storage");
pub const MESSAGE_TOO_BIG: Reply = Reply::new(
    552,
    "5.3.4",
    "Message size exceeds fixed maximum message size",
);
pub const NO_VALID_RECIPIENTS: Reply = Reply::new(554, "5.5.1", "No valid recipients");
/// RFC 6531 §3.5: a UTF-8 address in a transaction that did not declare SMTPUTF8.
pub const NEEDS_SMTPUTF8: Reply = Reply::new(
    553,
    "5.6.7",
    "Non-ASCII address requires the SMTPUTF8 parameter",
);
pub const AUTH_REQUIRED: Reply = Reply::new(530, "5.7.0", "Authentication required");
pub const AUTH_FAILED: Reply = Reply::new(535, "5.7.8", "Authentication credentials invalid");
/// RFC 4954 §6: no password in clear outside TLS.
pub const ENCRYPTION_REQUIRED: Reply = Reply::new(
    538,
    "5.7.11",
    "Encryption required for requested authentication mechanism",
);
pub const AUTH_CANCELLED: Reply = Reply::new(501, "5.7.0", "Authentication cancelled");
pub const AUTH_MALFORMED: Reply = Reply::new(501, "5.5.2", "Cannot decode the response");
pub const AUTH_MECHANISM: Reply = Reply::new(504, "5.5.4", "Unrecognised authentication mechanism");
pub const FROM_NOT_OWNED: Reply = Reply::new(
    553,
    "5.7.1",
    "From: or Sender: names an address not owned by the authenticated account",
);
pub const ORIGINATOR_MALFORMED: Reply = Reply::new(
    554,
    "5.6.0",
    "A submitted message needs exactly one From: naming a mailbox, and at most one Sender:",
);
pub const HEADER_MALFORMED: Reply = Reply::new(
    554,
    "5.6.0",
    "Message refused: a header line is not a valid field (RFC 5322 §2.2)",
);
pub const SENDER_NOT_OWNED: Reply = Reply::new(
    553,
    "5.7.1",
    "Sender address not owned by the authenticated account",
);
pub const PARAMETER_UNKNOWN: Reply = Reply::new(
    555,
    "5.5.4",
    "MAIL/RCPT parameter not recognised or not implemented",
);

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(r: &Reply) -> String {
        let mut out = Vec::new();
        r.write_to(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn single_line_with_enhanced_code() {
        assert_eq!(wire(&RELAY_DENIED), "550 5.7.1 Relaying denied\r\n");
    }

    #[test]
    fn multi_line_uses_dash_continuations() {
        let r = Reply::new(250, "", "").with_text("host\nPIPELINING\nSIZE 10");
        assert_eq!(wire(&r), "250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
    }
}
