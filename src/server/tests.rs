//! The real drivers over an in-memory pipe, on a paused clock: deadlines are checked to the second
//! without waiting for them.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;

use super::conn::Connection;
use super::{Shared, serve};
use crate::config::{AccountConfig, Config, Protocol, Settings};
use crate::storage::Store;

const PEER: &str = "127.0.0.1:40000";

fn settings(root: &std::path::Path, edit: impl FnOnce(&mut Config)) -> Settings {
    static HASH: OnceLock<String> = OnceLock::new();
    let hash = HASH
        .get_or_init(|| crate::accounts::hash_password(b"pw"))
        .clone();
    let mut config = Config {
        hostname: Some("mx.example.org".into()),
        domains: vec!["example.org".into()],
        storage_root: root.to_path_buf(),
        accounts: BTreeMap::from([(
            "alice@example.org".into(),
            AccountConfig {
                password_hash: Some(hash),
                ..AccountConfig::default()
            },
        )]),
        ..Config::default()
    };
    config.auth.failure_delay_ms = 1;
    edit(&mut config);
    Settings::from_config(config).unwrap()
}

struct Harness {
    _dir: tempfile::TempDir,
    shared: Arc<Shared>,
}

impl Harness {
    fn new(edit: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path(), edit);
        let store = Store::open(dir.path(), "mx.example.org").unwrap();
        let queue = crate::storage::queue::Queue::open(dir.path()).unwrap();
        let (outbox, _scheduler) = crate::delivery::new(queue);
        Harness {
            _dir: dir,
            shared: Arc::new(Shared::new(settings, Arc::new(store), outbox)),
        }
    }

    /// Starts a session of `protocol` and returns the client's end of the pipe (`buffer`: the pipe's
    /// capacity, small to model a client that does not read).
    fn connect(
        &self,
        protocol: Protocol,
        buffer: usize,
    ) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(buffer);
        let task = tokio::spawn(serve(
            Connection::plain(server),
            PEER.parse().unwrap(),
            protocol,
            self.shared.clone(),
            false,
            None,
        ));
        (client, task)
    }

    /// Stores `body` (LF line ends, as stored) for alice.
    fn deliver_body(&self, body: &[u8]) {
        let settings = self.shared.settings();
        let account = settings.directory.account("alice@example.org").unwrap();
        let maildir = self.shared.store.ensure_maildir(account).unwrap();
        let mut spool = self.shared.store.spool().unwrap();
        spool.append(body).unwrap();
        spool.deliver(&[maildir], None).unwrap();
    }

    /// Stores a message of `size` octets for alice.
    fn deliver(&self, size: usize) {
        let mut body = b"Subject: big\n\n".to_vec();
        while body.len() < size {
            body.extend_from_slice(
                b"0123456789012345678901234567890123456789012345678901234567890123456789\n",
            );
        }
        self.deliver_body(&body);
    }
}

/// Reads until `needle` appears in what was read; returns all of it.
async fn read_until(client: &mut DuplexStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = client.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before {needle:?}; got {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends `bytes` one at a time, each `gap` after the previous one, until the server closes.
/// Returns the time from the first byte to the close and everything the server sent meanwhile.
async fn trickle(client: DuplexStream, bytes: &[u8], gap: Duration) -> (Duration, String) {
    let (mut rx, mut tx) = tokio::io::split(client);
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = rx.read_to_end(&mut got).await;
        (Instant::now(), String::from_utf8_lossy(&got).into_owned())
    });
    for &b in bytes.iter().cycle() {
        if reader.is_finished() || tx.write_all(&[b]).await.is_err() {
            break;
        }
        tokio::time::sleep(gap).await;
    }
    let (closed, got) = reader.await.unwrap();
    (closed - start, got)
}

#[tokio::test(start_paused = true)]
async fn smtp_command_trickled_byte_by_byte_is_cut_at_the_command_timeout() {
    // Before per-request deadlines, each byte restarted the 300 s timeout: the slot was held until
    // the one-hour session limit.
    let h = Harness::new(|_| {});
    let (mut client, _task) = h.connect(Protocol::Smtp, 1 << 16);
    read_until(&mut client, "220 ").await;
    let (held, got) = trickle(client, b"EHLO client.example.org", Duration::from_secs(299)).await;
    assert!(got.contains("421 4.4.2 Timeout"), "{got}");
    assert_eq!(held.as_secs(), 300, "held {held:?}");
}

#[tokio::test(start_paused = true)]
async fn smtp_data_trickle_is_cut_by_the_minimum_rate() {
    let h = Harness::new(|_| {});
    let (mut client, _task) = h.connect(Protocol::Smtp, 1 << 16);
    read_until(&mut client, "220 ").await;
    client
        .write_all(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        .await
        .unwrap();
    read_until(&mut client, "354 ").await;
    let (held, got) = trickle(client, b"Subject: slow\r\n", Duration::from_secs(299)).await;
    assert!(got.contains("421 4.4.2 Timeout"), "{got}");
    assert_eq!(held.as_secs(), 300, "held {held:?}");
}

#[tokio::test(start_paused = true)]
async fn smtp_session_limit_has_its_own_reply() {
    let h = Harness::new(|c| c.limits.session_timeout_secs = 50);
    let (mut client, _task) = h.connect(Protocol::Smtp, 1 << 16);
    read_until(&mut client, "220 ").await;
    let (held, got) = trickle(client, b"NOOP\r\n", Duration::from_secs(1)).await;
    assert!(
        got.contains("421 4.4.2 Session time limit reached"),
        "{got}"
    );
    assert_eq!(held.as_secs(), 50);
}

#[tokio::test(start_paused = true)]
async fn pop3_command_trickle_is_cut_at_the_idle_timeout() {
    let h = Harness::new(|_| {});
    let (mut client, _task) = h.connect(Protocol::Pop3, 1 << 16);
    read_until(&mut client, "+OK").await;
    let (held, got) = trickle(client, b"USER alice@example.org", Duration::from_secs(599)).await;
    assert!(got.contains("-ERR [SYS/TEMP] idle timeout"), "{got}");
    assert_eq!(held.as_secs(), 600);
}

/// Logs alice in over a pipe of `buffer` octets, sends RETR 1 and then reads `step` octets every 10 s.
/// Returns how long the server kept sending, and checks that the mailbox is free afterwards.
async fn slow_retr(h: &Harness, buffer: usize, step: usize) -> Duration {
    let (mut client, task) = h.connect(Protocol::Pop3, buffer);
    read_until(&mut client, "+OK").await;
    client
        .write_all(b"USER alice@example.org\r\nPASS pw\r\n")
        .await
        .unwrap();
    read_until(&mut client, "maildrop has 1").await;
    client.write_all(b"RETR 1\r\n").await.unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; step];
    let mut ended = None;
    loop {
        if ended.is_none() && task.is_finished() {
            ended = Some(Instant::now());
        }
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => tokio::time::sleep(Duration::from_secs(10)).await,
        }
    }
    // When the server gave up on the client (what it had sent by then still drains from the pipe).
    let held = ended.expect("the server ended the session") - start;
    task.await.unwrap();
    let (mut next, _task) = h.connect(Protocol::Pop3, 1 << 20);
    read_until(&mut next, "+OK").await;
    next.write_all(b"USER alice@example.org\r\nPASS pw\r\nSTAT\r\n")
        .await
        .unwrap();
    let got = read_until(&mut next, "+OK 1 ").await;
    assert!(!got.contains("IN-USE"), "{got}");
    held
}

#[tokio::test(start_paused = true)]
async fn pop3_stalled_retr_reader_is_cut_at_the_idle_timeout() {
    let h = Harness::new(|_| {});
    h.deliver(1_000_000);
    // 6.4 octets/s: a 64 KiB write cannot finish within the 600 s idle timeout.
    let held = slow_retr(&h, 4096, 64).await;
    assert!(
        held >= Duration::from_secs(600) && held <= Duration::from_secs(610),
        "held {held:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn pop3_slow_retr_reader_is_cut_by_the_minimum_rate() {
    // Before: every 64 KiB write had its own 600 s timeout, so a reader taking 200 octets/s (each
    // write finishes in time) held the session and the mailbox lock for as long as the message lasted.
    let h = Harness::new(|c| c.limits.session_timeout_secs = 100_000);
    h.deliver(2_000_000);
    let held = slow_retr(&h, 4096, 2000).await;
    // The whole response may take 600 s + 2 x 2 MB at 500 octets/s = 8600 s; at 200 octets/s the
    // 2 MB would take 10,000 s.
    assert!(
        held >= Duration::from_secs(8500) && held <= Duration::from_secs(8610),
        "held {held:?}"
    );
}

#[test]
fn ipv4_clients_of_dual_stack_sockets_are_shown_as_ipv4() {
    let mapped: std::net::SocketAddr = "[::ffff:192.0.2.1]:25".parse().unwrap();
    assert_eq!(super::client_address(mapped).to_string(), "192.0.2.1:25");
    let v6: std::net::SocketAddr = "[2001:db8::1]:25".parse().unwrap();
    assert_eq!(super::client_address(v6), v6);
}

/// Sends one message to alice over a fresh SMTP session and returns it as stored.
async fn send_and_read_back(h: &Harness, data: &str) -> String {
    let (mut client, _task) = h.connect(Protocol::Smtp, 1 << 16);
    read_until(&mut client, "220 ").await;
    client
        .write_all(
            format!("EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n{data}.\r\nQUIT\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    read_until(&mut client, "221 ").await;
    let settings = h.shared.settings();
    let account = settings.directory.account("alice@example.org").unwrap();
    let new = h.shared.store.maildir(account).join("new");
    let file = std::fs::read_dir(new).unwrap().next().unwrap().unwrap();
    std::fs::read_to_string(file.path()).unwrap()
}

#[tokio::test]
async fn first_line_with_leading_white_space_cannot_fold_into_our_received() {
    let h = Harness::new(|_| {});
    let stored = send_and_read_back(
        &h,
        " forged; by trusted.example\r\nSubject: x\r\n\r\nbody\r\n",
    )
    .await;
    let (head, body) = stored.split_once("\n\n").unwrap();
    assert!(
        head.starts_with("Return-Path: <a@b.example>\nReceived: from c"),
        "{stored}"
    );
    assert!(
        !head.contains("forged"),
        "the line folded into Received:\n{stored}"
    );
    assert!(
        body.starts_with(" forged; by trusted.example\nSubject: x\n"),
        "{stored}"
    );
}

#[tokio::test]
async fn an_idle_connection_carries_a_small_state() {
    // Each connection's task holds its whole async state machine, which is as large as the largest
    // future it awaits inline. With TLS, AUTH, a message's start and end inline, that was 10 KB per
    // idle SMTP connection (of ~15 KiB in all); those steps are boxed, so they cost only while they run.
    let h = Harness::new(|_| {});
    for protocol in Protocol::ALL {
        let (_client, server) = tokio::io::duplex(64);
        let shared = h.shared.clone();
        let task = serve(
            Connection::plain(server),
            PEER.parse().unwrap(),
            protocol,
            shared,
            false,
            None,
        );
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= 3072,
            "{protocol:?}: {size} octets of state per connection"
        );
    }
}

#[tokio::test]
async fn pipelined_retrs_give_every_message_exactly_whatever_was_read_ahead() {
    // RETR of a small message reads the small ones after it in the same trip; a large one (here the
    // 21st, 100 KiB) ends a read-ahead and is streamed. Every RETR, in order, again out of order, and
    // TOP, must give exactly the stored message.
    let h = Harness::new(|_| {});
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for i in 0..45 {
        let mut body = format!("Subject: message {i}\n\nThe body of message {i}.\n").into_bytes();
        if i == 20 {
            while body.len() < 100 * 1024 {
                body.extend_from_slice(
                    b"A long line of the one large message in this mailbox, far past the head.\n",
                );
            }
        }
        h.deliver_body(&body);
        bodies.push(body);
    }
    let (mut client, _task) = h.connect(Protocol::Pop3, 1 << 22);
    read_until(&mut client, "+OK").await;
    client
        .write_all(b"USER alice@example.org\r\nPASS pw\r\n")
        .await
        .unwrap();
    read_until(&mut client, "maildrop has 45").await;
    let mut commands = String::new();
    for n in 1..=45 {
        commands.push_str(&format!("RETR {n}\r\n"));
    }
    commands.push_str("RETR 30\r\nRETR 2\r\nTOP 7 0\r\nRETR 44\r\nQUIT\r\n");
    client.write_all(commands.as_bytes()).await.unwrap();
    let got = read_until(&mut client, "signing off").await;
    // Each answer: "+OK ...\r\n", the message in CRLF form, ".\r\n".
    let answers: Vec<Vec<u8>> = got
        .split("\r\n.\r\n")
        .filter(|a| a.contains("+OK") && !a.contains("signing off"))
        .filter_map(|a| a.split_once("+OK").map(|(_, rest)| rest.to_string()))
        .filter_map(|a| {
            a.split_once("\r\n")
                .map(|(_, msg)| format!("{msg}\r\n").replace("\r\n", "\n").into_bytes())
        })
        .collect();
    assert_eq!(answers.len(), 49, "45 + 4 multi-line answers");
    let mut seen = answers[..45].to_vec();
    seen.sort();
    let mut stored = bodies.clone();
    stored.sort();
    assert!(
        seen == stored,
        "the 45 RETRs gave exactly the 45 stored messages"
    );
    assert_eq!(answers[45], answers[29], "RETR 30 again");
    assert_eq!(
        answers[46], answers[1],
        "RETR 2 again, after the read-ahead moved on"
    );
    let head_of_7 = String::from_utf8(answers[6].clone()).unwrap();
    let head_of_7 = head_of_7.split_once("\n\n").unwrap().0;
    assert_eq!(
        String::from_utf8(answers[47].clone()).unwrap(),
        format!("{head_of_7}\n\n")
    );
    assert_eq!(answers[48], answers[43], "RETR 44 again");
}
