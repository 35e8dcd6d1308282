//! Dialog tests of the POP3 session, fed in every chunk size.

use super::*;
use crate::config::Config;

fn settings() -> Arc<Settings> {
    let mut config = Config::default();
    config.auth.max_failures = 2;
    config.limits.max_errors = 5;
    Arc::new(Settings::from_config(config).unwrap())
}

fn mailbox() -> Vec<Listing> {
    vec![
        Listing {
            uid: "u1".into(),
            size: 100,
        },
        Listing {
            uid: "u2".into(),
            size: 20,
        },
        Listing {
            uid: "u3".into(),
            size: 3,
        },
    ]
}

#[derive(Debug, PartialEq)]
struct Transcript {
    replies: String,
    /// Events other than NeedInput, in order.
    events: Vec<String>,
}

/// Plays the driver: logins succeed for password "right", messages "open" and stream as `<msg N>`.
fn play(input: &[u8], chunk: usize, plaintext_ok: bool) -> Transcript {
    let mut s = Session::new(settings(), plaintext_ok, false, None);
    let mut buf = Vec::new();
    let mut fed = 0;
    let mut t = Transcript {
        replies: String::new(),
        events: vec![],
    };
    loop {
        let (n, event) = s.advance(&buf);
        buf.drain(..n);
        match event {
            Event::Flush => t.events.push("flush".into()),
            Event::NeedInput => {
                if fed >= input.len() {
                    break;
                }
                let end = (fed + chunk).min(input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            Event::Login { user, credential } => {
                t.events.push(format!("login {user}"));
                let password = match credential {
                    Credential::Password(p) => p.0,
                    Credential::Apop { digest } => format!("apop:{digest}"),
                };
                if password == "right" || password == "apop:0123abcd" {
                    s.login_result(Ok(mailbox()));
                } else if password == "locked" {
                    s.login_result(Err(LoginFailure::InUse));
                } else {
                    s.login_result(Err(LoginFailure::BadCredentials));
                }
            }
            Event::Retrieve { index, top } => {
                t.events.push(format!("retrieve {index} {top:?}"));
                s.retrieve_started(index, true);
                s.outbox()
                    .extend_from_slice(format!("<msg {index}>\r\n.\r\n").as_bytes());
            }
            Event::StartTls => {
                t.events.push("starttls".into());
                s.tls_started();
            }
            Event::Update { delete } => {
                t.events.push(format!("update {delete:?}"));
                s.update_result(true);
            }
            Event::Close => {
                t.events.push("close".into());
                break;
            }
        }
    }
    t.replies = String::from_utf8(std::mem::take(s.outbox())).unwrap();
    t
}

fn dialog(input: &str) -> Transcript {
    dialog_with(input, true)
}

fn dialog_with(input: &str, plaintext_ok: bool) -> Transcript {
    let reference = play(input.as_bytes(), input.len(), plaintext_ok);
    for chunk in [1, 2, 3, 5, 8, 64] {
        assert_eq!(
            play(input.as_bytes(), chunk, plaintext_ok),
            reference,
            "chunk {chunk}"
        );
    }
    reference
}

const LOGIN: &str = "USER demo@localhost\r\nPASS right\r\n";

#[test]
fn login_stat_list_uidl() {
    let t = dialog(&format!("{LOGIN}STAT\r\nLIST\r\nUIDL 2\r\nLIST 3\r\n"));
    assert_eq!(
        t.replies,
        "+OK rustmail POP3 server ready\r\n+OK send PASS\r\n+OK maildrop has 3 messages (123 octets)\r\n\
         +OK 3 123\r\n+OK 3 messages\r\n1 100\r\n2 20\r\n3 3\r\n.\r\n+OK 2 u2\r\n+OK 3 3\r\n"
    );
    assert_eq!(t.events, ["login demo@localhost"]);
}

#[test]
fn deleted_messages_are_invisible_and_rset_restores() {
    let t = dialog(&format!(
        "{LOGIN}DELE 1\r\nSTAT\r\nRETR 1\r\nDELE 1\r\nUIDL\r\nRSET\r\nSTAT\r\n"
    ));
    assert!(t.replies.contains("+OK 2 23\r\n"));
    assert!(
        t.replies
            .contains("-ERR no such message\r\n-ERR no such message\r\n")
    );
    assert!(
        t.replies
            .contains("+OK 2 messages\r\n2 u2\r\n3 u3\r\n.\r\n")
    );
    assert!(t.replies.ends_with("+OK 3 123\r\n"));
}

#[test]
fn quit_applies_deletions() {
    let t = dialog(&format!("{LOGIN}DELE 2\r\nDELE 3\r\nQUIT\r\n"));
    assert_eq!(t.events, ["login demo@localhost", "update [1, 2]", "close"]);
    assert!(
        t.replies
            .ends_with("+OK rustmail signing off (2 messages deleted)\r\n")
    );
}

#[test]
fn dele_without_quit_keeps_mail() {
    let t = dialog(&format!("{LOGIN}DELE 1\r\n"));
    assert!(!t.events.iter().any(|e| e.starts_with("update")));
    let t = dialog(&format!("{LOGIN}DELE 1\r\nRSET\r\nQUIT\r\n"));
    assert_eq!(t.events, ["login demo@localhost", "update []", "close"]);
}

#[test]
fn abort_applies_no_deletions() {
    let mut s = Session::new(settings(), true, false, None);
    let (_, e) = s.advance(LOGIN.as_bytes());
    assert!(matches!(e, Event::Login { .. }));
    s.login_result(Ok(mailbox()));
    let (_, e) = s.advance(b"DELE 1\r\n");
    assert_eq!(e, Event::NeedInput);
    s.abort("server shutting down");
    let (_, e) = s.advance(b"QUIT\r\n");
    assert_eq!(e, Event::Close);
    assert!(
        String::from_utf8(s.outbox().clone())
            .unwrap()
            .ends_with("-ERR [SYS/TEMP] server shutting down; no messages deleted\r\n")
    );
}

#[test]
fn retr_and_top() {
    let t = dialog(&format!(
        "{LOGIN}RETR 2\r\nTOP 1 5\r\nTOP 1 x\r\nRETR 9\r\n"
    ));
    assert_eq!(
        t.events,
        [
            "login demo@localhost",
            "retrieve 1 None",
            "retrieve 0 Some(5)"
        ]
    );
    assert!(t.replies.contains(
        "+OK 20 octets\r\n<msg 1>\r\n.\r\n+OK 100 octets\r\n<msg 0>\r\n.\r\n-ERR syntax"
    ));
}

#[test]
fn bad_password_gives_auth_code_and_limits_attempts() {
    let t = dialog(
        "USER a@localhost\r\nPASS wrong\r\nUSER a@localhost\r\nPASS wrong\r\nUSER a@localhost\r\n",
    );
    assert!(
        t.replies
            .contains("-ERR [AUTH] invalid user name or password\r\n")
    );
    assert!(t.replies.ends_with("too many failures\r\n"));
    assert_eq!(t.events.last().unwrap(), "close");
}

#[test]
fn locked_mailbox_gives_in_use() {
    let t = dialog("USER a@localhost\r\nPASS locked\r\n");
    assert!(
        t.replies
            .ends_with("-ERR [IN-USE] mailbox is in use by another session\r\n")
    );
}

#[test]
fn pass_keeps_spaces() {
    let t = dialog("USER a@localhost\r\nPASS right with spaces\r\n");
    assert!(
        t.replies.contains("-ERR [AUTH]"),
        "the whole rest of the line is the password"
    );
}

#[test]
fn commands_out_of_state() {
    let t = dialog(&format!("STAT\r\nPASS x\r\n{LOGIN}USER x\r\n"));
    assert!(
        t.replies
            .contains("-ERR unknown command or not allowed before login\r\n-ERR USER first\r\n")
    );
    assert!(t.replies.ends_with("-ERR already logged in\r\n"));
}

#[test]
fn capa_advertises_user_only_when_allowed() {
    let open = dialog("CAPA\r\n");
    assert!(open.replies.contains("\r\nUSER\r\n") && open.replies.contains("RESP-CODES"));
    let closed = dialog_with("CAPA\r\nUSER a@localhost\r\n", false);
    assert!(!closed.replies.contains("\r\nUSER\r\n"));
    assert!(
        closed.replies.ends_with(
            "-ERR [AUTH] plaintext authentication is not allowed on this connection\r\n"
        )
    );
}

#[test]
fn overlong_line_is_swallowed() {
    let t = dialog(&format!("NOOP {}STAT\r\nQUIT\r\n", "x".repeat(600)));
    assert_eq!(
        t.replies,
        "+OK rustmail POP3 server ready\r\n-ERR line too long\r\n+OK rustmail signing off\r\n"
    );
}

#[test]
fn too_many_errors_close() {
    let t = dialog(&"BOGUS\r\n".repeat(8));
    assert!(t.replies.ends_with("-ERR too many errors, closing\r\n"));
    assert_eq!(t.events, ["close"]);
}

#[test]
fn sasl_plain_with_initial_response_and_continuation() {
    // base64("\0demo@localhost\0right") and base64("demo@localhost\0demo@localhost\0right")
    let t = dialog("AUTH PLAIN AGRlbW9AbG9jYWxob3N0AHJpZ2h0\r\nSTAT\r\n");
    assert_eq!(t.events, ["login demo@localhost"]);
    assert!(t.replies.ends_with("+OK 3 123\r\n"));
    let t = dialog("AUTH PLAIN\r\nZGVtb0Bsb2NhbGhvc3QAZGVtb0Bsb2NhbGhvc3QAcmlnaHQ=\r\nSTAT\r\n");
    assert!(
        t.replies.contains("+ \r\n+OK maildrop has 3 messages"),
        "{}",
        t.replies
    );
}

#[test]
fn sasl_plain_refusals() {
    let t = dialog("AUTH PLAIN\r\n*\r\nAUTH PLAIN !!!\r\nAUTH CRAM-MD5\r\nAUTH\r\n");
    assert!(t.replies.contains("-ERR authentication cancelled\r\n"));
    assert!(t.replies.contains("-ERR malformed SASL PLAIN response\r\n"));
    assert!(t.replies.contains("-ERR unsupported SASL mechanism\r\n"));
    assert!(
        t.replies
            .ends_with("+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n")
    );
    // base64("other\0demo@localhost\0right"): acting for someone else is refused.
    let t = dialog("AUTH PLAIN b3RoZXIAZGVtb0Bsb2NhbGhvc3QAcmlnaHQ=\r\n");
    assert!(
        t.replies
            .ends_with("-ERR [AUTH] authorization identity not allowed\r\n")
    );
    let t = dialog_with("AUTH PLAIN AGRlbW9AbG9jYWxob3N0AHJpZ2h0\r\n", false);
    assert!(
        t.events.is_empty(),
        "no plaintext login off loopback without TLS"
    );
}

#[test]
fn apop_only_when_offered_and_banner_in_greeting() {
    let t = dialog("APOP demo@localhost 0123abcd\r\n");
    assert!(t.replies.ends_with("-ERR APOP is not offered\r\n"));
    let mut s = Session::new(settings(), false, false, Some("<1.2@mx>".into()));
    assert!(
        String::from_utf8(s.outbox().clone())
            .unwrap()
            .starts_with("+OK rustmail POP3 server ready <1.2@mx>\r\n")
    );
    let (_, e) = s.advance(b"APOP demo@localhost 0123ABCD\r\n");
    assert_eq!(
        e,
        Event::Login {
            user: "demo@localhost".into(),
            credential: Credential::Apop {
                digest: "0123abcd".into()
            }
        },
        "APOP works without TLS (no password on the wire); the digest is compared in lower case"
    );
}

#[test]
fn capa_lists_sasl_expire_and_login_delay() {
    let t = dialog("CAPA\r\n");
    assert!(
        t.replies.contains("SASL PLAIN\r\nEXPIRE NEVER\r\n"),
        "{}",
        t.replies
    );
    let mut config = Config::default();
    config.auth.pop3_login_delay_secs = 300;
    let mut s = Session::new(
        Arc::new(Settings::from_config(config).unwrap()),
        true,
        false,
        None,
    );
    s.advance(b"CAPA\r\n");
    assert!(
        String::from_utf8(s.outbox().clone())
            .unwrap()
            .contains("LOGIN-DELAY 300\r\n")
    );
}

#[test]
fn login_delay_and_throttle_replies() {
    let mut s = Session::new(settings(), true, false, None);
    s.advance(LOGIN.as_bytes());
    s.login_result(Err(LoginFailure::TooSoon));
    assert!(
        String::from_utf8(s.outbox().clone())
            .unwrap()
            .ends_with("-ERR [LOGIN-DELAY] minimum time between logins not yet reached\r\n")
    );
    assert!(!s.is_closed());
    s.advance(LOGIN.as_bytes());
    s.login_result(Err(LoginFailure::Throttled));
    assert!(s.is_closed());
}

#[test]
fn stls_before_login_only_then_passwords_allowed() {
    let mut s = Session::new(settings(), false, true, None);
    let (_, e) = s.advance(b"CAPA\r\nUSER a@localhost\r\nSTLS\r\nUSER ignored\r\n");
    assert_eq!(e, Event::StartTls);
    let out = String::from_utf8(std::mem::take(s.outbox())).unwrap();
    assert!(
        out.contains("\r\nSTLS\r\n") && !out.contains("\r\nUSER\r\n"),
        "{out}"
    );
    assert!(out.contains("-ERR [AUTH] plaintext authentication is not allowed"));
    assert!(out.ends_with("+OK Begin TLS negotiation\r\n"));
    s.tls_started();
    let (_, e) = s.advance(b"CAPA\r\nSTLS\r\nUSER demo@localhost\r\nPASS right\r\n");
    assert!(matches!(e, Event::Login { .. }));
    let out = String::from_utf8(std::mem::take(s.outbox())).unwrap();
    assert!(
        out.contains("\r\nUSER\r\n") && !out.contains("\r\nSTLS\r\n"),
        "{out}"
    );
    assert!(out.contains("-ERR TLS is not available on this connection"));
}

#[test]
fn pipelined_listings_are_flushed_as_they_grow() {
    let big: Vec<Listing> = (0..5000)
        .map(|i| Listing {
            uid: format!("uid-{i:040}"),
            size: 1000,
        })
        .collect();
    let mut s = Session::new(settings(), true, false, None);
    s.advance(LOGIN.as_bytes());
    s.login_result(Ok(big));
    s.outbox().clear();
    let input = "UIDL\r\n".repeat(20);
    let mut at = 0;
    let mut flushes = 0;
    loop {
        let (n, e) = s.advance(&input.as_bytes()[at..]);
        at += n;
        match e {
            Event::Flush => {
                flushes += 1;
                assert!(s.outbox().len() < 2 * OUTBOX_FLUSH);
                s.outbox().clear();
            }
            Event::NeedInput => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(at, input.len());
    assert!(flushes >= 5, "{flushes}");
}

#[test]
fn message_numbers_and_counts_are_digits_only() {
    // RFC 1939: msg and n are numbers; "+1" was taken as 1 before (Rust's integer parse allows a sign).
    let t =
        dialog("USER a\r\nPASS right\r\nRETR +1\r\nTOP +1 0\r\nTOP 1 +0\r\nDELE +2\r\nRETR 1\r\n");
    assert_eq!(t.events, ["login a", "retrieve 0 None"]);
    assert_eq!(t.replies.matches("-ERR").count(), 4, "{}", t.replies);
}
