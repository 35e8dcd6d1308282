//! What the fuzz targets share: fixed settings, and drivers that play the part of the async side
//! (`server::smtp`, `server::pop3`) around the pure protocol sessions, recording a transcript that a
//! target can compare between two ways of feeding the same bytes.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use rustmail::config::{AccountConfig, Config, Settings};
use rustmail::{pop3, smtp};

/// The one password the drivers accept.
pub const PASSWORD: &str = "pw";

/// Splits the fuzzer's input into a control byte and the rest.
pub fn control(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&c, rest)) => (c, rest),
        None => (0, &[]),
    }
}

/// Settings like the session unit tests': two accounts with aliases, a small message limit so the
/// size checks are reached, and (variant `strict`) a line-length limit.
pub fn smtp_settings(strict: bool) -> Arc<Settings> {
    static PLAIN: OnceLock<Arc<Settings>> = OnceLock::new();
    static STRICT: OnceLock<Arc<Settings>> = OnceLock::new();
    let cell = if strict { &STRICT } else { &PLAIN };
    cell.get_or_init(|| {
        // Hashed once per process: the drivers decide AUTH themselves, the hash only has to be valid.
        let hash = rustmail::accounts::hash_password(PASSWORD.as_bytes());
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
        config.limits.max_message_size = 2000;
        config.limits.max_errors = 20;
        if strict {
            config.limits.max_line_length = Some(1000);
            config.limits.max_recipients = 100;
        }
        Arc::new(Settings::from_config(config).expect("fuzz settings are valid"))
    })
    .clone()
}

#[derive(Debug, PartialEq, Eq)]
pub struct SmtpTranscript {
    pub replies: Vec<u8>,
    /// Stored messages: (mailboxes, content in stored form, LF line endings).
    pub messages: Vec<(Vec<String>, Vec<u8>)>,
    pub events: Vec<String>,
    pub closed: bool,
    /// The most input left unconsumed while the session asked for more.
    pub max_buffered: usize,
}

/// Plays the SMTP driver: feeds `input` in `chunk`-octet pieces; AUTH succeeds with [`PASSWORD`]
/// for any account; messages are "stored" in memory; STARTTLS "succeeds" at once.
pub fn play_smtp(
    settings: &Arc<Settings>,
    channel: smtp::Channel,
    input: &[u8],
    chunk: usize,
) -> SmtpTranscript {
    let mut session = smtp::Session::new(settings.clone(), "192.0.2.7".parse().unwrap(), channel);
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut message: Option<Vec<u8>> = None;
    let mut t = SmtpTranscript {
        replies: Vec::new(),
        messages: vec![],
        events: vec![],
        closed: false,
        max_buffered: 0,
    };
    loop {
        let (n, event) = session.advance(&buf);
        assert!(n <= buf.len(), "consumed {n} of {} octets", buf.len());
        let mut need_input = false;
        match event {
            smtp::Event::NeedInput => need_input = true,
            smtp::Event::StartTls => {
                // What was read after STARTTLS is discarded by the driver (CVE-2011-0411); a real
                // client only sends more after the handshake, which here is "now".
                t.events.push("starttls".into());
                buf.drain(..n);
                session.tls_started();
                continue;
            }
            smtp::Event::Authenticate { user, password } => {
                t.events.push(format!("auth {user}"));
                let account = settings
                    .directory
                    .accounts()
                    .find(|a| a.address == user)
                    .cloned();
                session.auth_result(match account {
                    Some(a) if password.0 == PASSWORD => smtp::AuthOutcome::Accepted(a),
                    _ => smtp::AuthOutcome::Rejected,
                });
            }
            smtp::Event::MessageStart => {
                assert!(message.is_none(), "MessageStart inside a message");
                message = Some(Vec::new());
            }
            smtp::Event::MessageLine(line) => {
                let m = message.as_mut().expect("MessageLine outside a message");
                m.extend_from_slice(line);
                m.push(b'\n');
            }
            smtp::Event::MessagePartial(bytes) => message
                .as_mut()
                .expect("MessagePartial outside a message")
                .extend_from_slice(bytes),
            smtp::Event::MessageBytes => {
                let bytes = session.take_message_bytes();
                message
                    .as_mut()
                    .expect("MessageBytes outside a message")
                    .extend_from_slice(&bytes);
            }
            smtp::Event::MessageAbort => {
                t.events.push("abort".into());
                message = None;
            }
            smtp::Event::MessageEnd => {
                let bytes = session.take_message_bytes();
                let mut m = message.take().expect("MessageEnd outside a message");
                m.extend_from_slice(&bytes);
                let envelope = session.envelope().expect("MessageEnd without an envelope");
                let mailboxes: Vec<String> = envelope
                    .mailboxes
                    .iter()
                    .map(|a| a.address.clone())
                    .collect();
                assert!(
                    !mailboxes.is_empty() || !envelope.remote.is_empty(),
                    "a message with no recipient was accepted"
                );
                t.messages.push((mailboxes, m));
                session.message_stored(Ok("Q1"));
            }
            smtp::Event::Close => t.closed = true,
        }
        buf.drain(..n);
        if t.closed {
            break;
        }
        if need_input {
            t.max_buffered = t.max_buffered.max(buf.len());
            if fed >= input.len() {
                break;
            }
            let end = (fed + chunk).min(input.len());
            buf.extend_from_slice(&input[fed..end]);
            fed = end;
        }
    }
    t.replies = std::mem::take(session.outbox());
    t
}

/// Checks that `out` is a sequence of SMTP reply lines (RFC 5321 §4.2): `ddd`, then SP or `-` or
/// nothing, text without CR or LF, CRLF.
pub fn assert_smtp_replies(out: &[u8]) {
    if out.is_empty() {
        return;
    }
    assert!(out.ends_with(b"\r\n"), "replies do not end with CRLF");
    for line in out[..out.len() - 1].split(|&b| b == b'\n') {
        let line = line
            .strip_suffix(b"\r")
            .unwrap_or_else(|| panic!("bare LF in replies"));
        assert!(
            line.len() >= 3
                && line[..3].iter().all(u8::is_ascii_digit)
                && (b'2'..=b'5').contains(&line[0])
                && matches!(line.get(3), None | Some(b' ') | Some(b'-')),
            "not a reply line: {:?}",
            String::from_utf8_lossy(line)
        );
        assert!(!line.contains(&b'\r'), "CR inside a reply line");
    }
}

pub fn pop3_settings() -> Arc<Settings> {
    static S: OnceLock<Arc<Settings>> = OnceLock::new();
    S.get_or_init(|| {
        let mut config = Config::default();
        config.auth.max_failures = 3;
        config.limits.max_errors = 20;
        Arc::new(Settings::from_config(config).expect("fuzz settings are valid"))
    })
    .clone()
}

/// The mailbox every successful POP3 login sees.
pub fn pop3_mailbox() -> Vec<pop3::Listing> {
    [("u1", 100), ("u2", 20), ("u3", 3)]
        .into_iter()
        .map(|(uid, size)| pop3::Listing {
            uid: uid.into(),
            size,
        })
        .collect()
}

#[derive(Debug, PartialEq, Eq)]
pub struct Pop3Transcript {
    pub replies: Vec<u8>,
    /// Events other than NeedInput and Flush (whose timing depends on how input arrives), in order.
    pub events: Vec<String>,
    pub closed: bool,
    pub max_buffered: usize,
}

/// Plays the POP3 driver: password "pw" logs in, "locked" finds the mailbox in use, anything else is
/// refused; messages stream as `<msg N>`.
pub fn play_pop3(
    plaintext_ok: bool,
    stls: bool,
    apop: bool,
    input: &[u8],
    chunk: usize,
) -> Pop3Transcript {
    let banner = apop.then(|| "<1.2@mx.example.org>".to_string());
    let mut s = pop3::Session::new(pop3_settings(), plaintext_ok, stls, banner);
    let mut buf = Vec::new();
    let mut fed = 0;
    let mut messages = 0;
    let mut t = Pop3Transcript {
        replies: Vec::new(),
        events: vec![],
        closed: false,
        max_buffered: 0,
    };
    loop {
        let (n, event) = s.advance(&buf);
        assert!(n <= buf.len(), "consumed {n} of {} octets", buf.len());
        buf.drain(..n);
        match event {
            pop3::Event::Flush => {}
            pop3::Event::NeedInput => {
                t.max_buffered = t.max_buffered.max(buf.len());
                if fed >= input.len() {
                    break;
                }
                let end = (fed + chunk).min(input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            pop3::Event::Login { user, credential } => {
                t.events.push(format!("login {user}"));
                let password = match credential {
                    pop3::Credential::Password(p) => p.0,
                    pop3::Credential::Apop { digest } => format!("apop:{digest}"),
                };
                if password == PASSWORD {
                    messages = pop3_mailbox().len();
                    s.login_result(Ok(pop3_mailbox()));
                } else if password == "locked" {
                    s.login_result(Err(pop3::LoginFailure::InUse));
                } else {
                    s.login_result(Err(pop3::LoginFailure::BadCredentials));
                }
            }
            pop3::Event::Retrieve { index, top } => {
                assert!(index < messages, "RETR of message {index} of {messages}");
                t.events.push(format!("retrieve {index} {top:?}"));
                s.retrieve_started(index, true);
                s.outbox()
                    .extend_from_slice(format!("<msg {index}>\r\n.\r\n").as_bytes());
            }
            pop3::Event::StartTls => {
                t.events.push("starttls".into());
                s.tls_started();
            }
            pop3::Event::Update { delete } => {
                assert!(
                    delete.windows(2).all(|w| w[0] < w[1]),
                    "deletions not unique and ordered: {delete:?}"
                );
                assert!(
                    delete.iter().all(|&i| i < messages),
                    "deletion out of range: {delete:?}"
                );
                t.events.push(format!("update {delete:?}"));
                s.update_result(true);
            }
            pop3::Event::Close => {
                t.closed = true;
                break;
            }
        }
    }
    t.replies = std::mem::take(s.outbox());
    t
}
