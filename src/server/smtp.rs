//! The SMTP driver: moves bytes between a TCP connection and an [`smtp::Session`], and carries out its
//! events against the store. All decisions are the session's; all waiting and disk I/O are here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;

use super::auth::{Login, check_password};
use super::{Conn, ReadError, Shared, blocking, deadline_in, read_some, start_tls, write_timed};
use crate::config::Protocol;
use crate::smtp::headers::MissingHeaders;
use crate::smtp::reply::{self, Reply};
use crate::smtp::{AuthOutcome, Channel, Envelope, Event, Session};
use crate::storage::Spool;

/// Message bytes are collected up to this size before a write to the spool file.
const SPOOL_WRITE_CHUNK: usize = 256 * 1024;

pub async fn serve(
    mut stream: Conn,
    peer: SocketAddr,
    protocol: Protocol,
    shared: Arc<Shared>,
    busy: bool,
) {
    let settings = shared.settings();
    let limits = &settings.limits;
    let channel = Channel {
        submission: protocol.is_submission(),
        tls: matches!(stream, Conn::Right(_)),
        starttls: settings.tls.is_some(),
    };
    let mut session = Session::new(settings.clone(), peer.ip(), channel);
    if busy {
        session.refuse_busy();
    }
    let session_deadline = deadline_in(limits.session_timeout_secs);
    let write_timeout = Duration::from_secs(limits.command_timeout_secs);
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut message = Message::default();
    let mut stop_seen = false;
    loop {
        // A stop seen during a message applies from the next command on, including commands that
        // were pipelined behind the final dot.
        if !stop_seen && shared.shutdown.is_cancelled() {
            stop_seen = true;
            session.request_shutdown();
        }
        let (used, event) = session.advance(&buf);
        match event {
            Event::MessageLine(line) => {
                message.append(line);
                message.append(b"\n");
                buf.drain(..used);
                if message.pending.len() >= SPOOL_WRITE_CHUNK {
                    message.write_pending().await;
                }
                continue;
            }
            Event::MessagePartial(bytes) => {
                message.append(bytes);
                buf.drain(..used);
                if message.pending.len() >= SPOOL_WRITE_CHUNK {
                    message.write_pending().await;
                }
                continue;
            }
            Event::NeedInput => {}
            Event::MessageStart => {
                buf.drain(..used);
                message.start(&shared, &session).await;
                continue;
            }
            Event::MessageBytes => {
                buf.drain(..used);
                message.append(&session.take_message_bytes());
                if message.pending.len() >= SPOOL_WRITE_CHUNK {
                    message.write_pending().await;
                }
                continue;
            }
            Event::MessageAbort => {
                buf.drain(..used);
                message.discard();
                continue;
            }
            Event::MessageEnd => {
                buf.drain(..used);
                // The tail of a last BDAT chunk (nothing for DATA).
                message.append(&session.take_message_bytes());
                match message.finish(&shared, &session).await {
                    Ok(id) => session.message_stored(Ok(&id)),
                    Err(Refusal::Temporary) => session.message_stored(Err(())),
                    Err(Refusal::Permanent(reply)) => session.message_refused(reply),
                }
                continue;
            }
            Event::StartTls => {
                buf.drain(..used);
                if !buf.is_empty() {
                    // CVE-2011-0411: whatever came in clear after STARTTLS is never executed.
                    tracing::info!(
                        octets = buf.len(),
                        "discarding plaintext sent after STARTTLS"
                    );
                    buf.clear();
                }
                if !write_timed(&mut stream, session.outbox(), write_timeout).await {
                    return;
                }
                session.outbox().clear();
                match start_tls(stream, &settings, write_timeout).await {
                    Some(tls) => stream = tls,
                    None => return,
                }
                session.tls_started();
                continue;
            }
            Event::Authenticate { user, password } => {
                buf.drain(..used);
                let ip = peer.ip().to_canonical();
                let outcome = match check_password(&shared, ip, &user, password).await {
                    Login::Accepted(account) => AuthOutcome::Accepted(account),
                    Login::Rejected => AuthOutcome::Rejected,
                    Login::Throttled => AuthOutcome::Throttled,
                };
                session.auth_result(outcome);
                continue;
            }
            Event::Close => {
                if write_timed(&mut stream, session.outbox(), write_timeout).await {
                    let _ = stream.shutdown().await;
                }
                return;
            }
        }
        // NeedInput: answer everything processed so far in one write, then wait for the client.
        buf.drain(..used);
        if !session.outbox().is_empty() {
            if !write_timed(&mut stream, session.outbox(), write_timeout).await {
                return;
            }
            session.outbox().clear();
        }
        let per_read = Duration::from_secs(if session.in_message() {
            limits.data_timeout_secs
        } else {
            limits.command_timeout_secs
        });
        let timeout = per_read.min(session_deadline.saturating_duration_since(Instant::now()));
        // A stop waits for the message in progress: the session answers 421 at the next command.
        let stop = shared.shutdown.cancelled();
        let watch_stop = !stop_seen && !session.in_message();
        let stop = async move {
            if watch_stop {
                stop.await
            } else {
                std::future::pending().await
            }
        };
        match read_some(&mut stream, &mut buf, timeout, stop).await {
            Ok(Some(0)) => {
                if session.in_message() {
                    tracing::info!("connection closed during DATA; nothing was acknowledged");
                }
                return;
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                stop_seen = true;
                session.request_shutdown();
            }
            Err(ReadError::Timeout) => {
                tracing::info!("timeout");
                session.timed_out();
            }
            Err(ReadError::Io(e)) => {
                tracing::debug!(error = %e, "read failed");
                return;
            }
        }
    }
}

/// The message being received: its spool file (absent when it could not be created; the failure is
/// reported at the end of DATA as a temporary error) and the bytes not yet written.
#[derive(Default)]
struct Message {
    spool: Option<Spool>,
    failed: bool,
    pending: Vec<u8>,
    /// Submission: adds Message-ID and Date when the message has none.
    fixer: Option<MissingHeaders>,
}

impl Message {
    async fn start(&mut self, shared: &Arc<Shared>, session: &Session) {
        self.discard();
        let shared2 = shared.clone();
        match blocking(move || shared2.store.spool()).await {
            Ok(spool) => {
                let date = chrono::Local::now().to_rfc2822();
                if session.envelope().is_some_and(|e| e.submitter.is_some()) {
                    let id = format!("<{}@{}>", spool.id(), shared.settings().hostname);
                    self.fixer = Some(MissingHeaders::new(id, date.clone()));
                }
                let trace = session.trace_headers(spool.id(), &date);
                self.append(trace.as_bytes());
                self.spool = Some(spool);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot create a spool file");
                self.failed = true;
            }
        }
    }

    async fn write_pending(&mut self) {
        let Some(mut spool) = self.spool.take() else {
            self.pending.clear();
            return;
        };
        let data = std::mem::take(&mut self.pending);
        let (spool, result) = tokio::task::spawn_blocking(move || {
            let r = spool.append(&data);
            (spool, r)
        })
        .await
        .expect("spool writes do not panic");
        match result {
            Ok(()) => self.spool = Some(spool),
            Err(e) => {
                tracing::error!(error = %e, "cannot write the spool file");
                self.failed = true;
                drop_in_background(spool);
            }
        }
    }

    /// Adds message bytes (stored form), through the submission header check when there is one.
    fn append(&mut self, bytes: &[u8]) {
        match &mut self.fixer {
            Some(fixer) => fixer.push(bytes, &mut self.pending),
            None => self.pending.extend_from_slice(bytes),
        }
    }

    fn discard(&mut self) {
        self.pending.clear();
        self.fixer = None;
        self.failed = false;
        if let Some(spool) = self.spool.take() {
            drop_in_background(spool);
        }
    }

    /// Makes the message durable; returns its queue id.
    async fn finish(&mut self, shared: &Arc<Shared>, session: &Session) -> Result<String, Refusal> {
        let envelope = session.envelope().expect("a message has an envelope");
        if let Some(mut fixer) = self.fixer.take() {
            fixer.finish(&mut self.pending);
            if let Err(reply) = check_sender_headers(shared, envelope, &fixer) {
                self.discard();
                return Err(Refusal::Permanent(reply));
            }
        }
        self.write_pending().await;
        let spool = match (self.spool.take(), self.failed) {
            (Some(spool), false) => spool,
            _ => {
                self.discard();
                return Err(Refusal::Temporary);
            }
        };
        let from = envelope
            .from
            .as_ref()
            .map_or(String::new(), |m| m.raw.clone());
        let rcpts: Vec<String> = envelope.recipients.iter().map(|m| m.raw.clone()).collect();
        let accounts = envelope.mailboxes.clone();
        let id = spool.id().to_string();
        let size = spool.size();
        let shared2 = shared.clone();
        let result = blocking(move || {
            shared2.stats.delivering.fetch_add(1, Ordering::SeqCst);
            let delivered = accounts
                .iter()
                .map(|a| shared2.store.ensure_maildir(a))
                .collect::<std::io::Result<Vec<_>>>()
                .and_then(|maildirs| spool.deliver(&maildirs));
            shared2.stats.delivering.fetch_sub(1, Ordering::SeqCst);
            delivered
        })
        .await;
        match result {
            Ok(()) => {
                shared.stats.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(queue_id = %id, from = %from, rcpts = ?rcpts, size, "message accepted: {id} from <{from}> to {} ({size} octets)", rcpts.join(", "));
                Ok(id)
            }
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "delivery failed, answered 451: {id}: {e}");
                Err(Refusal::Temporary)
            }
        }
    }
}

/// Why a complete message was not stored.
enum Refusal {
    /// Storage failed: 451, the client retries.
    Temporary,
    /// The message broke a rule: this reply, final.
    Permanent(Reply),
}

/// Submission: From: and Sender: must name the account's own addresses too, not only MAIL FROM.
fn check_sender_headers(
    shared: &Shared,
    envelope: &Envelope,
    headers: &MissingHeaders,
) -> Result<(), Reply> {
    let settings = shared.settings();
    let Some(account) = envelope
        .submitter
        .as_deref()
        .and_then(|a| settings.directory.account(a))
    else {
        return Ok(());
    };
    if !settings.auth.restrict_senders {
        return Ok(());
    }
    let owned = headers.sender_addresses().is_some_and(|addresses| {
        addresses.iter().all(|address| {
            address.rsplit_once('@').is_some_and(|(local, domain)| {
                settings.directory.may_send_as(account, local, domain)
            })
        })
    });
    if owned {
        Ok(())
    } else {
        tracing::info!(account = %account.address, "From:/Sender: not owned, refused");
        Err(reply::FROM_NOT_OWNED)
    }
}

impl Drop for Message {
    /// A session that ends mid-message (dropped, timed out) leaves its spool file to be removed.
    fn drop(&mut self) {
        self.discard();
    }
}

/// Removing a spool file is disk I/O: keep it off the async workers.
fn drop_in_background(spool: Spool) {
    tokio::task::spawn_blocking(move || drop(spool));
}
