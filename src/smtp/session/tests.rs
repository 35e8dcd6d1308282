//! Dialog tests of the SMTP session: whole transcripts fed in every chunk size, as a network might split them.

use super::*;
use crate::config::{AccountConfig, Config};
use std::collections::BTreeMap;
use std::sync::OnceLock;

fn settings() -> Arc<Settings> {
    static HASH: OnceLock<String> = OnceLock::new();
    let hash = HASH
        .get_or_init(|| crate::accounts::hash_password(b"pw"))
        .clone();
    let account = |aliases: &[&str]| AccountConfig {
        password_hash: Some(hash.clone()),
        aliases: aliases.iter().map(|s| s.to_string()).collect(),
        ..AccountConfig::default()
    };
    let mut config = Config {
        hostname: Some("mx.example.org".into()),
        domains: vec!["example.org".into()],
        accounts: BTreeMap::from([
            (
                "alice@example.org".into(),
                account(&["al@example.org", "postmaster@example.org"]),
            ),
            ("bob@example.org".into(), account(&[])),
        ]),
        ..Config::default()
    };
    config.limits.max_message_size = 200;
    config.limits.max_errors = 6;
    Arc::new(Settings::from_config(config).unwrap())
}

#[derive(Debug, PartialEq)]
struct Transcript {
    replies: String,
    /// Stored messages: (mailboxes, content with LF endings).
    messages: Vec<(Vec<String>, String)>,
    closed: bool,
}

/// Plays the driver: feeds `input` in `chunk`-byte pieces, stores messages in memory.
fn play(input: &[u8], chunk: usize) -> Transcript {
    play_on(settings(), Channel::default(), input, chunk)
}

/// As [`play`], on a given channel. STARTTLS "succeeds" at once; AUTH accepts password "pw" for
/// any account and rejects everything else.
fn play_on(settings: Arc<Settings>, channel: Channel, input: &[u8], chunk: usize) -> Transcript {
    let mut session = Session::new(settings.clone(), "192.0.2.7".parse().unwrap(), channel);
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut message: Option<Vec<u8>> = None;
    let mut t = Transcript {
        replies: String::new(),
        messages: vec![],
        closed: false,
    };
    loop {
        let (n, event) = session.advance(&buf);
        let mut need_input = false;
        match event {
            Event::NeedInput => need_input = true,
            Event::StartTls => {
                // A real client waits for the 220 and the handshake; what follows comes over TLS.
                // (Discarding plaintext read ahead is the driver's job, tested end to end.)
                buf.drain(..n);
                session.tls_started();
                continue;
            }
            Event::Authenticate { user, password } => {
                let account = settings
                    .directory
                    .accounts()
                    .find(|a| a.address == user)
                    .cloned();
                session.auth_result(match account {
                    Some(a) if password.0 == "pw" => AuthOutcome::Accepted(a),
                    _ => AuthOutcome::Rejected,
                });
            }
            Event::MessageStart => message = Some(Vec::new()),
            Event::MessageLine(line) => {
                let m = message.as_mut().unwrap();
                m.extend_from_slice(line);
                m.push(b'\n');
            }
            Event::MessagePartial(bytes) => message.as_mut().unwrap().extend_from_slice(bytes),
            Event::MessageBytes => {
                let bytes = session.take_message_bytes();
                message.as_mut().unwrap().extend_from_slice(&bytes);
            }
            Event::MessageAbort => message = None,
            Event::MessageEnd => {
                let bytes = session.take_message_bytes();
                message.as_mut().unwrap().extend_from_slice(&bytes);
                let mailboxes = session
                    .envelope()
                    .unwrap()
                    .mailboxes
                    .iter()
                    .map(|a| a.address.clone())
                    .collect();
                t.messages.push((
                    mailboxes,
                    String::from_utf8(message.take().unwrap()).unwrap(),
                ));
                session.message_stored(Ok("Q1"));
            }
            Event::Close => t.closed = true,
        }
        buf.drain(..n);
        if t.closed {
            break;
        }
        if need_input {
            if fed >= input.len() {
                break;
            }
            let end = (fed + chunk).min(input.len());
            buf.extend_from_slice(&input[fed..end]);
            fed = end;
        }
    }
    t.replies = String::from_utf8(std::mem::take(session.outbox())).unwrap();
    t
}

/// The transcript, after checking that every chunk size gives the same one.
fn dialog(input: &str) -> Transcript {
    let reference = play(input.as_bytes(), input.len());
    for chunk in [1, 2, 3, 5, 8, 13, 64, 512] {
        assert_eq!(
            play(input.as_bytes(), chunk),
            reference,
            "chunk size {chunk}"
        );
    }
    reference
}

fn codes(t: &Transcript) -> Vec<String> {
    t.replies
        .lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| l[..3].to_string())
        .collect()
}

const HELLO: &str = "EHLO client.example\r\n";

#[test]
fn greeting_and_ehlo_advertise_extensions() {
    let t = dialog(HELLO);
    assert!(t.replies.starts_with("220 mx.example.org ESMTP"));
    for ext in [
        "250-PIPELINING",
        "250-SIZE 200",
        "250-8BITMIME",
        "250 ENHANCEDSTATUSCODES",
    ] {
        assert!(t.replies.contains(ext), "{ext} missing: {}", t.replies);
    }
}

#[test]
fn pipelined_delivery_with_dot_unstuffing() {
    let t = dialog(
        "EHLO c\r\nMAIL FROM:<x@remote.example> BODY=8BITMIME\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n\
         Subject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
    );
    assert_eq!(codes(&t), ["220", "250", "250", "250", "354", "250", "221"]);
    assert_eq!(
        t.messages,
        vec![(
            vec!["alice@example.org".into()],
            "Subject: hi\n\n.dot\n".into()
        )]
    );
    assert!(t.closed);
}

#[test]
fn alias_and_account_deliver_once() {
    let t = dialog(&format!(
        "{HELLO}MAIL FROM:<>\r\nRCPT TO:<AL@Example.ORG>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nx\r\n.\r\n"
    ));
    assert_eq!(
        t.messages[0].0,
        vec![
            "alice@example.org".to_string(),
            "bob@example.org".to_string()
        ]
    );
}

#[test]
fn relay_and_unknown_user_refused() {
    let t = dialog(&format!(
        "{HELLO}MAIL FROM:<a@b.example>\r\nRCPT TO:<someone@elsewhere.example>\r\nRCPT TO:<nobody@example.org>\r\n\
         RCPT TO:<u@[127.0.0.1]>\r\nRCPT TO:<\"alice@elsewhere.example\"@example.org>\r\nDATA\r\n"
    ));
    assert!(t.replies.contains("550 5.7.1"));
    assert!(t.replies.contains("550 5.1.1"));
    assert_eq!(
        codes(&t),
        ["220", "250", "250", "550", "550", "550", "550", "554"]
    );
    assert!(t.messages.is_empty());
}

#[test]
fn postmaster_without_domain_is_routed() {
    let t = dialog(&format!(
        "{HELLO}MAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\nx\r\n.\r\n"
    ));
    assert_eq!(t.messages[0].0, vec!["alice@example.org".to_string()]);
}

#[test]
fn sequence_errors() {
    let t = dialog(
        "MAIL FROM:<a@b.example>\r\nEHLO c\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nMAIL FROM:<>\r\nMAIL FROM:<>\r\n",
    );
    assert_eq!(codes(&t), ["220", "503", "250", "503", "503", "250", "503"]);
}

#[test]
fn rset_and_ehlo_reset_the_transaction() {
    let t = dialog(&format!(
        "{HELLO}MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nRSET\r\nDATA\r\nMAIL FROM:<>\r\nEHLO again\r\nRCPT TO:<bob@example.org>\r\n"
    ));
    assert_eq!(
        codes(&t),
        [
            "220", "250", "250", "250", "250", "503", "250", "250", "503"
        ]
    );
}

#[test]
fn recipient_cap() {
    // The default cap is the RFC 5321 §4.5.3.1.8 minimum of 100, the lowest the config accepts.
    let rcpts: String = (0..100)
        .map(|i| format!("RCPT TO:<alice+{i}@example.org>\r\n"))
        .collect();
    let t = dialog(&format!(
        "{HELLO}MAIL FROM:<>\r\n{rcpts}RCPT TO:<bob@example.org>\r\n"
    ));
    assert!(
        t.replies.ends_with("452 4.5.3 Too many recipients\r\n"),
        "{}",
        t.replies
    );
}

#[test]
fn declared_size_over_limit_refused_at_mail() {
    let t = dialog(&format!(
        "{HELLO}MAIL FROM:<> SIZE=201\r\nMAIL FROM:<> SIZE=200\r\n"
    ));
    assert_eq!(codes(&t), ["220", "250", "552", "250"]);
}

#[test]
fn oversized_message_refused_after_reading_to_the_end() {
    let big = "x".repeat(150);
    let t = dialog(&format!(
        "{HELLO}MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n{big}\r\n{big}\r\nRSET\r\n.\r\nNOOP\r\n"
    ));
    assert!(t.messages.is_empty());
    assert_eq!(codes(&t), ["220", "250", "250", "250", "354", "552", "250"]);
}

#[test]
fn smuggling_bare_lf_is_neither_end_of_data_nor_a_new_transaction() {
    let t = dialog(&format!(
        "{HELLO}MAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nhello\n.\nMAIL FROM:<evil@b.example>\r\n\
         RCPT TO:<alice@example.org>\r\nDATA\r\nsmuggled\r\n.\r\nNOOP\r\n"
    ));
    assert!(
        t.messages.is_empty(),
        "nothing may be delivered: {:?}",
        t.messages
    );
    assert_eq!(codes(&t), ["220", "250", "250", "250", "354", "550", "250"]);
    assert!(t.replies.contains("550 5.6.0"));
}

#[test]
fn smuggling_bare_cr_refused() {
    let t = dialog(&format!(
        "{HELLO}MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\na\r.\rb\r\n.\r\n"
    ));
    assert!(t.messages.is_empty());
    assert!(
        t.replies
            .ends_with("550 5.6.0 Message refused: bare CR or LF; lines must end with CRLF\r\n")
    );
}

#[test]
fn overlong_command_is_drained_then_refused() {
    let long = format!("NOOP {}RSET\r\nNOOP\r\n", "x".repeat(2100));
    let t = dialog(&long);
    assert_eq!(codes(&t), ["220", "500", "250"]);
    assert!(t.replies.contains("500 5.5.2 Line too long"));
}

#[test]
fn too_many_errors_close_the_session() {
    let t = dialog(&"BOGUS\r\n".repeat(10));
    assert_eq!(
        codes(&t),
        ["220", "500", "500", "500", "500", "500", "500", "421"]
    );
    assert!(t.closed);
}

#[test]
fn http_request_closes_at_once() {
    let t = dialog("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(codes(&t), ["220"]);
    assert!(t.closed);
}

#[test]
fn vrfy_discloses_nothing() {
    let t = dialog("VRFY alice\r\nVRFY nobody\r\n");
    assert_eq!(codes(&t), ["220", "252", "252"]);
}

#[test]
fn helo_gets_no_extensions_and_plain_smtp_trace() {
    let mut s = Session::new(
        settings(),
        "2001:db8::1".parse().unwrap(),
        Channel::default(),
    );
    let (_, e) = s.advance(
        b"HELO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n",
    );
    assert_eq!(e, Event::MessageStart);
    let out = String::from_utf8(s.outbox().clone()).unwrap();
    assert!(out.contains("250 mx.example.org\r\n") && !out.contains("PIPELINING"));
    let trace = s.trace_headers("Q9", "Thu, 26 Nov 2026 10:00:00 +0000");
    assert_eq!(
        trace,
        "Return-Path: <a@b.example>\nReceived: from c.example ([IPv6:2001:db8::1])\n\tby mx.example.org (rustmail) with SMTP id Q9\n\tfor <bob@example.org>;\n\tThu, 26 Nov 2026 10:00:00 +0000\n"
    );
}

#[test]
fn shutdown_waits_for_the_message_then_answers_421() {
    let mut s = Session::new(settings(), "192.0.2.7".parse().unwrap(), Channel::default());
    let (n, e) = s.advance(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n");
    assert_eq!((n, e), (55, Event::MessageStart));
    s.request_shutdown();
    assert!(!s.is_closed(), "a DATA transfer is never cut");
    let (_, e) = s.advance(b"x\r\n");
    assert_eq!(e, Event::MessageLine(b"x"));
    let (_, e) = s.advance(b".\r\nNOOP\r\n");
    assert_eq!(e, Event::MessageEnd);
    s.message_stored(Ok("Q1"));
    let (_, e) = s.advance(b"NOOP\r\n");
    assert_eq!(e, Event::Close);
    let out = String::from_utf8(s.outbox().clone()).unwrap();
    assert!(
        out.ends_with(
            "250 2.0.0 OK, queued as Q1\r\n421 4.3.2 Service shutting down, try again later\r\n"
        ),
        "{out}"
    );
}

#[test]
fn storage_failure_is_temporary() {
    let mut s = Session::new(settings(), "192.0.2.7".parse().unwrap(), Channel::default());
    let (_, e) = s.advance(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n.\r\n");
    assert_eq!(e, Event::MessageStart);
    let (_, e) = s.advance(b".\r\n");
    assert_eq!(e, Event::MessageEnd);
    s.message_stored(Err(reply::STORAGE_FAILED));
    assert!(
        String::from_utf8(s.outbox().clone())
            .unwrap()
            .ends_with("451 4.3.0 Could not store the message, try again later\r\n")
    );
}

/// `BDAT` with the chunk that follows it.
fn bdat(chunk: &str, last: bool) -> String {
    format!(
        "BDAT {}{}\r\n{chunk}",
        chunk.len(),
        if last { " LAST" } else { "" }
    )
}

const TX: &str = "EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.org>\r\n";

#[test]
fn bdat_chunks_make_one_message_without_unstuffing() {
    let t = dialog(&format!(
        "{TX}{}{}{}NOOP\r\n",
        bdat("Subject: chunked\r\n\r\n.dot", false),
        bdat(" stays\r\nQUIT\r\n", false),
        bdat(".\r\n", true)
    ));
    assert_eq!(t.messages.len(), 1);
    assert_eq!(t.messages[0].1, "Subject: chunked\n\n.dot stays\nQUIT\n.\n");
    assert_eq!(
        codes(&t),
        ["220", "250", "250", "250", "250", "250", "250", "250"]
    );
    assert!(!t.closed, "QUIT inside a chunk is data, not a command");
}

#[test]
fn bdat_without_recipients_is_read_and_refused() {
    let t = dialog(&format!(
        "EHLO c\r\nMAIL FROM:<>\r\n{}NOOP\r\n",
        bdat("RSET\r\n", true)
    ));
    assert!(t.messages.is_empty());
    assert_eq!(codes(&t), ["220", "250", "250", "554", "250"]);
    let t = dialog(&format!("EHLO c\r\n{}NOOP\r\n", bdat("x\r\n", false)));
    assert_eq!(codes(&t), ["220", "250", "503", "250"]);
}

#[test]
fn bdat_bare_lf_refused_and_stream_stays_in_step() {
    let t = dialog(&format!(
        "{TX}{}NOOP\r\n",
        bdat("a\n.\nMAIL FROM:<x@y.example>\r\n", true)
    ));
    assert!(t.messages.is_empty());
    assert_eq!(codes(&t), ["220", "250", "250", "250", "550", "250"]);
}

#[test]
fn bdat_oversized_refused_across_chunks() {
    let part = "x".repeat(120) + "\r\n";
    let t = dialog(&format!(
        "{TX}{}{}NOOP\r\n",
        bdat(&part, false),
        bdat(&part, true)
    ));
    assert!(t.messages.is_empty());
    assert_eq!(codes(&t), ["220", "250", "250", "250", "250", "552", "250"]);
}

#[test]
fn bdat_and_data_do_not_mix_and_rset_abandons() {
    let t = dialog(&format!(
        "{TX}{}DATA\r\nRSET\r\nNOOP\r\n",
        bdat("x\r\n", false)
    ));
    assert!(t.messages.is_empty());
    assert_eq!(
        codes(&t),
        ["220", "250", "250", "250", "250", "503", "250", "250"]
    );
}

#[test]
fn smtputf8_is_required_for_utf8_addresses() {
    let t = dialog(
        "EHLO c\r\nMAIL FROM:<josé@b.example>\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bøb@example.org>\r\n",
    );
    assert_eq!(codes(&t), ["220", "250", "553", "250", "553"]);
    assert!(t.replies.contains("553 5.6.7"));
    assert!(t.replies.contains("250-SMTPUTF8\r\n250-CHUNKING\r\n"));
    let t = dialog(
        "EHLO c\r\nMAIL FROM:<josé@b.example> SMTPUTF8\r\nRCPT TO:<bøb@example.org>\r\nRCPT TO:<bob+tag@EXAMPLE.org>\r\nDATA\r\nSubject: café\r\n.\r\n",
    );
    assert_eq!(codes(&t), ["220", "250", "250", "550", "250", "354", "250"]);
    assert_eq!(t.messages[0].1, "Subject: café\n");
}

#[test]
fn utf8_trace_header_names_the_protocol() {
    let mut s = Session::new(settings(), "192.0.2.7".parse().unwrap(), Channel::default());
    let (_, e) = s.advance(
        "EHLO c\r\nMAIL FROM:<josé@b.example> SMTPUTF8\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
            .as_bytes(),
    );
    assert_eq!(e, Event::MessageStart);
    assert!(s.trace_headers("Q", "date").contains("with UTF8SMTP id Q"));
    assert!(
        s.trace_headers("Q", "date")
            .starts_with("Return-Path: <josé@b.example>\n")
    );
}

/// Settings with a certificate (made once per test run), for STARTTLS.
fn tls_settings() -> Arc<Settings> {
    static FILES: OnceLock<(std::path::PathBuf, std::path::PathBuf)> = OnceLock::new();
    let (cert, key) = FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        crate::tls::test_certificate(&dir, "mx.example.org", 30)
    });
    let mut s = (*settings()).clone();
    s.tls = Some(Arc::new(crate::tls::Tls::load(cert, key).unwrap()));
    Arc::new(s)
}

const SUBMISSION: Channel = Channel {
    submission: true,
    tls: false,
    starttls: true,
};

fn submission(input: &str) -> Transcript {
    let settings = tls_settings();
    let reference = play_on(settings.clone(), SUBMISSION, input.as_bytes(), input.len());
    for chunk in [1, 3, 64] {
        assert_eq!(
            play_on(settings.clone(), SUBMISSION, input.as_bytes(), chunk),
            reference,
            "chunk {chunk}"
        );
    }
    reference
}

/// base64("\0alice@example.org\0pw")
const ALICE_PLAIN: &str = "AGFsaWNlQGV4YW1wbGUub3JnAHB3";

#[test]
fn port_25_offers_no_auth() {
    let t = dialog(&format!("EHLO c\r\nAUTH PLAIN {ALICE_PLAIN}\r\n"));
    assert!(!t.replies.contains("AUTH PLAIN LOGIN"));
    assert_eq!(codes(&t), ["220", "250", "502"]);
}

#[test]
fn submission_without_tls_offers_starttls_and_refuses_passwords() {
    let t = submission(&format!(
        "EHLO c\r\nAUTH PLAIN {ALICE_PLAIN}\r\nMAIL FROM:<alice@example.org>\r\n"
    ));
    assert!(t.replies.contains(" STARTTLS\r\n"), "{}", t.replies);
    assert!(!t.replies.contains("AUTH PLAIN LOGIN"));
    assert_eq!(codes(&t), ["220", "250", "538", "530"]);
}

#[test]
fn starttls_forgets_what_came_before() {
    let t =
        submission("EHLO c\r\nSTARTTLS\r\nMAIL FROM:<alice@example.org>\r\nEHLO c\r\nSTARTTLS\r\n");
    assert_eq!(codes(&t), ["220", "250", "220", "503", "250", "503"]);
    assert!(t.replies.contains("220 2.0.0 Ready to start TLS"));
    let after = t.replies.rsplit("Ready to start TLS").next().unwrap();
    assert!(
        after.contains("AUTH PLAIN LOGIN") && !after.contains("STARTTLS\r\n"),
        "{after}"
    );
}

#[test]
fn authenticated_submission_rules() {
    let t = submission(&format!(
        "EHLO c\r\nSTARTTLS\r\nEHLO c\r\nMAIL FROM:<alice@example.org>\r\nAUTH PLAIN {ALICE_PLAIN}\r\nAUTH PLAIN {ALICE_PLAIN}\r\n\
         MAIL FROM:<bob@example.org>\r\nMAIL FROM:<>\r\nMAIL FROM:<alice+lists@example.org>\r\n\
         RCPT TO:<friend@remote.example>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nSubject: hi\r\n.\r\n"
    ));
    assert_eq!(
        codes(&t),
        [
            "220", "250", "220", "250", "530", "235", "503", "553", "553", "250", "250", "250",
            "354", "250"
        ]
    );
    assert_eq!(t.messages[0].0, vec!["bob@example.org".to_string()]);
}

#[test]
fn auth_login_exchange_and_cancel() {
    // LOGIN: "YWxpY2VAZXhhbXBsZS5vcmc=" is alice@example.org, "cHc=" is pw.
    let t = submission(
        "EHLO c\r\nSTARTTLS\r\nEHLO c\r\nAUTH LOGIN\r\n*\r\nAUTH LOGIN\r\nYWxpY2VAZXhhbXBsZS5vcmc=\r\ncHc=\r\nMAIL FROM:<alice@example.org>\r\n",
    );
    assert_eq!(
        codes(&t),
        [
            "220", "250", "220", "250", "334", "501", "334", "334", "235", "250"
        ]
    );
    assert!(
        t.replies.contains("334 VXNlcm5hbWU6\r\n") && t.replies.contains("334 UGFzc3dvcmQ6\r\n")
    );
}

#[test]
fn failed_logins_end_the_session() {
    // base64("\0alice@example.org\0wrong")
    let bad = "AGFsaWNlQGV4YW1wbGUub3JnAHdyb25n";
    let t = submission(&format!(
        "EHLO c\r\nSTARTTLS\r\nEHLO c\r\n{}",
        format!("AUTH PLAIN {bad}\r\n").repeat(4)
    ));
    assert_eq!(
        codes(&t),
        ["220", "250", "220", "250", "535", "535", "535", "421"]
    );
    assert!(t.closed);
}

#[test]
fn submission_trace_says_esmtpsa() {
    let settings = tls_settings();
    let mut s = Session::new(
        settings.clone(),
        "192.0.2.7".parse().unwrap(),
        Channel {
            tls: true,
            ..SUBMISSION
        },
    );
    let input = format!("EHLO c\r\nAUTH PLAIN {ALICE_PLAIN}\r\n");
    let (_, e) = s.advance(input.as_bytes());
    let Event::Authenticate { user, .. } = e else {
        panic!("{e:?}")
    };
    let alice = settings
        .directory
        .accounts()
        .find(|a| a.address == user)
        .cloned()
        .unwrap();
    s.auth_result(AuthOutcome::Accepted(alice));
    let (_, e) =
        s.advance(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n");
    assert_eq!(e, Event::MessageStart);
    assert!(s.trace_headers("Q", "date").contains("with ESMTPSA id Q"));
    assert_eq!(
        s.envelope().unwrap().submitter.as_deref(),
        Some("alice@example.org")
    );
}

#[test]
fn long_auth_responses_are_allowed() {
    use base64::Engine as _;
    let password = "p".repeat(2000);
    let token = base64::engine::general_purpose::STANDARD
        .encode(format!("\0alice@example.org\0{password}"));
    let t = submission(&format!(
        "EHLO c\r\nSTARTTLS\r\nEHLO c\r\nAUTH PLAIN {token}\r\nNOOP {}\r\n",
        "x".repeat(2100)
    ));
    assert_eq!(
        codes(&t),
        ["220", "250", "220", "250", "535", "500"],
        "a long AUTH line is read; a long NOOP is not"
    );
}

#[test]
fn sender_restriction_can_be_turned_off() {
    let mut open = (*tls_settings()).clone();
    open.auth.restrict_senders = false;
    let input = format!(
        "EHLO c\r\nSTARTTLS\r\nEHLO c\r\nAUTH PLAIN {ALICE_PLAIN}\r\nMAIL FROM:<bob@example.org>\r\n"
    );
    let t = play_on(Arc::new(open), SUBMISSION, input.as_bytes(), 7);
    assert_eq!(codes(&t), ["220", "250", "220", "250", "235", "250"]);
}

#[test]
fn bdat_chunk_declared_over_the_size_limit_is_refused_at_once_and_closes() {
    // Before: the session set out to read and discard 2^64 - 1 octets, holding the connection until
    // the timeout. Now: 552 at once, and the connection closes without a 421 (no retry invited).
    for tx in [TX.to_string(), format!("{TX}{}", bdat("x\r\n", false))] {
        let t = dialog(&format!("{tx}BDAT 18446744073709551615 LAST\r\nNOOP\r\n"));
        assert!(t.closed);
        assert!(t.messages.is_empty());
        assert!(
            t.replies
                .ends_with("552 5.3.4 Message size exceeds fixed maximum message size\r\n"),
            "{}",
            t.replies
        );
        assert!(!t.replies.contains("421"), "{}", t.replies);
    }
}

#[test]
fn chunks_pipelined_after_a_refused_one_are_not_client_errors() {
    // The test settings close a session after 6 errors. Before: each chunk already in flight after
    // the refused one got 503 and counted, and the session ended with 421 (a temporary code, so the
    // sender retried a permanently bad message for days).
    let mut input = format!("{TX}{}", bdat("bare\nlf\r\n", false));
    for _ in 0..8 {
        input.push_str(&bdat("more\r\n", false));
    }
    input.push_str(&bdat("end\r\n", true));
    input.push_str("NOOP\r\n");
    let t = dialog(&input);
    assert!(!t.closed, "{}", t.replies);
    assert!(!t.replies.contains("421"), "{}", t.replies);
    let got = codes(&t);
    assert_eq!(
        got[4..14],
        ["550"; 10].map(String::from)[..],
        "{}",
        t.replies
    );
    assert_eq!(got.last().unwrap(), "250");
    // A new transaction is judged on its own again.
    let t = dialog(&format!(
        "{TX}{}RSET\r\n{}",
        bdat("bare\nlf\r\n", true),
        bdat("x\r\n", true)
    ));
    assert_eq!(codes(&t)[4..], ["550", "250", "503"].map(String::from)[..]);
}

/// A submission session of alice (authenticated), for the header policy.
fn alice_session(restrict: bool) -> Session {
    let mut settings = (*settings()).clone();
    settings.auth.restrict_senders = restrict;
    let settings = Arc::new(settings);
    let mut s = Session::new(
        settings.clone(),
        "127.0.0.1".parse().unwrap(),
        Channel {
            submission: true,
            tls: true,
            starttls: true,
        },
    );
    let input = format!("EHLO c\r\nAUTH PLAIN {ALICE_PLAIN}\r\n");
    let (_, e) = s.advance(input.as_bytes());
    assert!(matches!(e, Event::Authenticate { .. }));
    let alice = settings.directory.account("alice@example.org").unwrap();
    s.auth_result(AuthOutcome::Accepted(alice.clone()));
    s
}

fn headers_verdict(s: &Session, message: &str) -> Result<(), u16> {
    let mut pass = super::super::headers::MissingHeaders::new("<i@x>".into(), "d".into());
    let mut out = Vec::new();
    pass.push(message.as_bytes(), &mut out);
    pass.finish(&mut out);
    s.check_submission_headers(pass.senders())
        .map_err(|r| r.code)
}

#[test]
fn submission_header_policy_cannot_be_bypassed() {
    let s = alice_session(true);
    assert_eq!(
        headers_verdict(&s, "From: <al@example.org>\n\nhi\n"),
        Ok(())
    );
    // Each of these passed before.
    for forged in [
        "From : ceo@example.org\n\nhi\n",
        "From: \"ceo@example.org\":;\n\nhi\n",
        "Subject: no From at all\n\nhi\n",
        "From: alice@example.org\nFrom: ceo@example.org\n\nhi\n",
    ] {
        assert!(headers_verdict(&s, forged).is_err(), "{forged:?}");
    }
    assert_eq!(
        headers_verdict(&s, "From: bob@example.org\n\nhi\n"),
        Err(553)
    );
    assert_eq!(headers_verdict(&s, "Subject: x\n\nhi\n"), Err(554));
    // Without restrict_senders any address may be used, but the fields must still be well formed.
    let open = alice_session(false);
    assert_eq!(
        headers_verdict(&open, "From: ceo@example.org\n\nhi\n"),
        Ok(())
    );
    assert_eq!(headers_verdict(&open, "Subject: x\n\nhi\n"), Err(554));
}
