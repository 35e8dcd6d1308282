//! Delivery status notifications (RFC 3464): the report sent to the envelope sender when recipients
//! failed for good, when they are still undelivered after a while (a delay warning), or, when the sender asked (RFC 3461 `NOTIFY=SUCCESS`), when they were delivered or
//! relayed to a server that sends no notifications itself. It returns the original message's header
//! (RFC 6522 `text/rfc822-headers`), or the whole message when the sender asked (`RET=FULL`).

use crate::smtp::command::xtext_decode;
use crate::storage::queue::Entry;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    /// Delivered into a local mailbox.
    Delivered,
    /// Handed to a server that does not offer DSN: no further notification will come.
    Relayed,
    /// Not delivered yet, still being tried until `retry_until` (Unix time).
    Delayed {
        retry_until: u64,
    },
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
            Action::Delayed { .. } => "delayed",
        }
    }
}

/// One recipient in a report.
pub struct Notice<'a> {
    pub address: &'a str,
    /// `ORCPT=` as the sender gave it (`rfc822;xtext`).
    pub orcpt: Option<&'a str>,
    pub action: Action,
    /// The reply or the reason, e.g. `550 5.1.1 No such user` (failures), or what accepted it.
    pub error: &'a str,
    /// The host that said so, when one did.
    pub host: Option<&'a str>,
    /// The message stayed in the queue too long (the error is then the last one seen).
    pub expired: bool,
}

/// The report in stored form (LF line endings), `From:` the mailer daemon of `hostname`. `full`:
/// `original` is the whole message (RET=FULL), else its header is returned.
pub fn report(
    hostname: &str,
    entry: &Entry,
    notices: &[Notice<'_>],
    original: &[u8],
    date: &str,
    boundary: &str,
) -> Vec<u8> {
    let arrival = rfc2822(entry.queued_at);
    let failures = notices
        .iter()
        .filter(|n| n.action == Action::Failed)
        .count();
    let delays = notices
        .iter()
        .filter(|n| matches!(n.action, Action::Delayed { .. }))
        .count();
    let (subject, summary) = if failures > 0 {
        (
            "Undelivered Mail Returned to Sender",
            format!(
                "Your message could not be delivered to {} of its recipients. It will not be retried.",
                if failures == 1 { "one" } else { "some" }
            ),
        )
    } else if delays > 0 {
        (
            "Delayed Mail (still being retried)",
            format!(
                "Your message has not been delivered to {} of its recipients yet. It is still being \
                 tried; you will be told if it fails for good. There is nothing you need to do.",
                if delays == 1 { "one" } else { "some" }
            ),
        )
    } else {
        (
            "Delivery Status Notification (success)",
            "Your message was delivered, as you asked to be told.".to_string(),
        )
    };
    let mut text = format!("This is the mail system at {hostname}.\n\n{summary}\n\n");
    for n in notices {
        let why = match n.action {
            Action::Failed if n.expired => format!(
                "it could not be delivered in time; the last attempt said: {}",
                n.error
            ),
            Action::Failed => n.error.to_string(),
            Action::Delivered => "delivered to the mailbox".to_string(),
            Action::Relayed => {
                "relayed to a server that sends no delivery notifications".to_string()
            }
            Action::Delayed { retry_until } => format!(
                "not delivered yet, tried until {}; the last attempt said: {}",
                rfc2822(retry_until),
                n.error
            ),
        };
        let by = n
            .host
            .map(|h| format!(" (reported by {h})"))
            .unwrap_or_default();
        text.push_str(&format!("<{}>: {}{by}\n", n.address, one_line(&why)));
    }
    let mut status = format!("Reporting-MTA: dns; {hostname}\n");
    if let Some(envid) = &entry.envid {
        status.push_str(&format!("Original-Envelope-Id: {}\n", xtext_decode(envid)));
    }
    status.push_str(&format!("Arrival-Date: {arrival}\n"));
    for n in notices {
        let code = match n.action {
            Action::Failed if n.expired => "4.4.7".to_string(),
            Action::Failed => {
                // Action: failed needs a permanent status, whatever class the peer's text claimed.
                let code = status_code(n.error);
                code.strip_prefix("4.")
                    .map_or(code.clone(), |rest| format!("5.{rest}"))
            }
            Action::Delivered | Action::Relayed => "2.0.0".to_string(),
            // Still being tried: a temporary status, whatever the peer's text claimed.
            Action::Delayed { .. } => {
                let code = status_code(n.error);
                code.strip_prefix("5.")
                    .map_or(code.clone(), |rest| format!("4.{rest}"))
            }
        };
        if let Some((kind, address)) = n.orcpt.and_then(|o| o.split_once(';')) {
            status.push_str(&format!(
                "\nOriginal-Recipient: {kind}; {}",
                xtext_decode(address)
            ));
        }
        // RFC 6533: a UTF-8 address is of type utf-8, not rfc822.
        let kind = if n.address.is_ascii() {
            "rfc822"
        } else {
            "utf-8"
        };
        status.push_str(&format!(
            "\nFinal-Recipient: {kind}; {}\nAction: {}\nStatus: {code}\n",
            n.address,
            n.action.name()
        ));
        if let Some(host) = n.host {
            status.push_str(&format!("Remote-MTA: dns; {host}\n"));
        }
        if let Action::Delayed { retry_until } = n.action {
            status.push_str(&format!("Will-Retry-Until: {}\n", rfc2822(retry_until)));
        }
        if matches!(n.action, Action::Failed | Action::Delayed { .. }) {
            // A reply of the peer is an smtp diagnostic; our own reasons (DNS, connections) are not.
            let error = one_line(n.error);
            let is_reply = error.len() >= 3 && error.as_bytes()[..3].iter().all(u8::is_ascii_digit);
            let diagnostic = if is_reply { "smtp" } else { "x-rustmail" };
            status.push_str(&format!(
                "Diagnostic-Code: {diagnostic}; {}\n",
                fold(&error)
            ));
        }
    }
    let status_type = if status.is_ascii() {
        "message/delivery-status"
    } else {
        "message/global-delivery-status"
    };
    let full = entry.ret_full == Some(true);
    let returned = if full {
        original
    } else {
        header_block(original)
    };
    let utf8 = !text.is_ascii() || !returned.is_ascii();
    let returned_type = match (full, original.is_ascii()) {
        (true, true) => "message/rfc822",
        (true, false) => "message/global",
        (false, _) => "text/rfc822-headers",
    };
    let mut out = format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\n\
         To: <{to}>\n\
         Subject: {subject}\n\
         Date: {date}\n\
         Message-ID: <{id}.dsn@{hostname}>\n\
         Auto-Submitted: auto-replied\n\
         MIME-Version: 1.0\n\
         Content-Type: multipart/report; report-type=delivery-status;\n\tboundary=\"{boundary}\"\n\
         \n\
         This is a delivery status notification (RFC 3464) in MIME format.\n\
         \n\
         --{boundary}\n\
         Content-Type: text/plain; charset=utf-8\n\
         Content-Transfer-Encoding: {cte}\n\
         \n\
         {text}\n\
         --{boundary}\n\
         Content-Type: {status_type}\n\
         \n\
         {status}\n\
         --{boundary}\n\
         Content-Type: {returned_type}\n\
         Content-Transfer-Encoding: {cte}\n\
         \n",
        to = entry.from,
        id = entry.id,
        cte = if utf8 { "8bit" } else { "7bit" },
    )
    .into_bytes();
    out.extend_from_slice(returned);
    if !returned.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(format!("\n--{boundary}--\n").as_bytes());
    out
}

/// A Unix time as an RFC 5322 date in local time.
fn rfc2822(t: u64) -> String {
    chrono::DateTime::from_timestamp(t as i64, 0)
        .map(|d| d.with_timezone(&chrono::Local).to_rfc2822())
        .unwrap_or_default()
}

/// The header of a stored message: everything before the first empty line.
fn header_block(message: &[u8]) -> &[u8] {
    if message.starts_with(b"\n") {
        return b"";
    }
    match message.windows(2).position(|w| w == b"\n\n") {
        Some(end) => &message[..end + 1],
        None => message,
    }
}

/// A long diagnostic folded into lines of at most 78 characters (RFC 5322 §2.1.1), at spaces.
fn fold(text: &str) -> String {
    let mut out = String::new();
    let mut line = 0;
    for word in text.split(' ') {
        if line > 0 && line + 1 + word.len() > 60 {
            out.push_str("\n ");
            line = 1;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(word);
        line += word.len();
    }
    out
}

fn one_line(text: &str) -> String {
    text.split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The RFC 3463 status of a reply (`550 5.1.1 …` → `5.1.1`), or the class of its code alone.
pub fn status_code(error: &str) -> String {
    let mut words = error.split_ascii_whitespace();
    let basic = words.next().unwrap_or("");
    if let Some(enhanced) = words.next() {
        let parts: Vec<&str> = enhanced.split('.').collect();
        if parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return enhanced.to_string();
        }
    }
    match basic.as_bytes().first() {
        Some(b'4') => "4.0.0".into(),
        _ => "5.0.0".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::queue::{Recipient, State};

    fn entry() -> Entry {
        Entry {
            id: "Q1".into(),
            from: "alice@a.test".into(),
            queued_at: 1_700_000_000,
            submitter: None,
            smtputf8: false,
            eight_bit: false,
            size: 10,
            lines: 2,
            ret_full: None,
            envid: None,
            recipients: vec![Recipient {
                state: State::Failed { bounced: false },
                ..Recipient::new("bob@b.test", "b.test")
            }],
        }
    }

    #[test]
    fn the_report_parses_as_multipart_report_with_status_and_headers() {
        let original = b"From: alice@a.test\nSubject: hello\n\nsecret body\n";
        let failed = [Notice {
            orcpt: None,
            action: Action::Failed,
            address: "bob@b.test",
            error: "550 5.1.1 No such user here",
            host: Some("mx.b.test"),
            expired: false,
        }];
        let report = report(
            "mx.a.test",
            &entry(),
            &failed,
            original,
            "Mon, 1 Jan 2024 00:00:00 +0000",
            "=_b1",
        );
        let text = String::from_utf8(report.clone()).unwrap();
        assert!(text.contains("To: <alice@a.test>\n"));
        assert!(text.contains("Status: 5.1.1\n"));
        assert!(text.contains("Remote-MTA: dns; mx.b.test\n"));
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 No such user here\n"));
        assert!(text.contains("Subject: hello\n"));
        assert!(!text.contains("secret body"), "only the header is returned");
        let parsed = mail_parser::MessageParser::default()
            .parse(&report)
            .unwrap();
        assert_eq!(parsed.parts.len(), 4, "the container and three parts");
        use mail_parser::MimeHeaders;
        let content_type = parsed.root_part().content_type().unwrap();
        assert_eq!(content_type.subtype(), Some("report"));
    }

    #[test]
    fn a_permanent_failure_never_reports_a_temporary_status_and_long_text_is_folded() {
        let error = format!("550 4.2.2 mailbox full {}", "word ".repeat(60));
        let failed = [Notice {
            orcpt: None,
            action: Action::Failed,
            address: "bob@b.test",
            error: &error,
            host: None,
            expired: false,
        }];
        let text = String::from_utf8(report("h", &entry(), &failed, b"", "d", "b")).unwrap();
        assert!(text.contains("Status: 5.2.2\n"), "{text}");
        let diagnostic = text
            .split("Diagnostic-Code:")
            .nth(1)
            .unwrap()
            .split("\n\n")
            .next()
            .unwrap();
        assert!(diagnostic.lines().all(|l| l.len() <= 78), "{diagnostic}");
        assert!(text.lines().all(|l| l.len() <= 998), "{text}");
        let ours = [Notice {
            orcpt: None,
            action: Action::Failed,
            address: "b@c",
            error: "all hosts failed",
            host: None,
            expired: false,
        }];
        let text = String::from_utf8(report("h", &entry(), &ours, b"", "d", "b")).unwrap();
        assert!(
            text.contains("Diagnostic-Code: x-rustmail; all hosts failed"),
            "{text}"
        );
    }

    #[test]
    fn a_delay_warning_is_temporary_says_until_when_and_is_not_a_failure() {
        let delayed = [Notice {
            orcpt: None,
            action: Action::Delayed {
                retry_until: 1_700_432_000,
            },
            address: "bob@b.test",
            // The text of a 5xx reply seen on a pending recipient cannot make the status permanent.
            error: "451 5.7.1 try again later",
            host: Some("mx.b.test"),
            expired: false,
        }];
        let report = report(
            "mx.a.test",
            &entry(),
            &delayed,
            b"Subject: s\n\n",
            "d",
            "=_b",
        );
        let text = String::from_utf8(report).unwrap();
        assert!(text.contains("Subject: Delayed Mail (still being retried)\n"));
        assert!(text.contains("Action: delayed\nStatus: 4.7.1\n"), "{text}");
        assert!(text.contains("Will-Retry-Until: "), "{text}");
        assert!(text.contains("Diagnostic-Code: smtp; 451 5.7.1 try again later\n"));
        assert!(!text.contains("could not be delivered"), "{text}");
    }

    #[test]
    fn status_codes_come_from_the_reply_or_its_class() {
        assert_eq!(status_code("550 5.1.1 No such user"), "5.1.1");
        assert_eq!(status_code("554 no enhanced code"), "5.0.0");
        assert_eq!(status_code("451 4.7.1 greylisted"), "4.7.1");
        assert_eq!(status_code("all hosts failed"), "5.0.0");
    }

    #[test]
    fn expiry_reports_4_4_7_with_the_last_error() {
        let failed = [Notice {
            orcpt: None,
            action: Action::Failed,
            address: "bob@b.test",
            error: "451 4.3.0 try later",
            host: None,
            expired: true,
        }];
        let text = String::from_utf8(report("h", &entry(), &failed, b"", "d", "b")).unwrap();
        assert!(text.contains("Status: 4.4.7\n"), "{text}");
        assert!(
            text.contains("the last attempt said: 451 4.3.0 try later"),
            "{text}"
        );
    }
}
