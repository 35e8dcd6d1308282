//! The SMTP driver: moves bytes between a TCP connection and an [`smtp::Session`], and carries out its
//! events against the store. All decisions are the session's; all waiting and disk I/O are here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::auth::{Login, check_password};
use super::conn::{self, Connection, Deadlines, Input, Io};
use super::{Shared, blocking, blocking_inline};
use crate::config::Protocol;
use crate::smtp::headers::MissingHeaders;
use crate::smtp::reply::{self, Reply};
use crate::smtp::{AuthOutcome, Channel, Event, Session};
use crate::storage::queue::Entry;
use crate::storage::{Spool, is_full};

/// Message bytes are collected up to this size before a write to the spool file.
const SPOOL_WRITE_CHUNK: usize = crate::storage::IN_MEMORY;

/// A refused connection gets this long to take its `421`.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve<S: Io>(
    mut conn: Connection<S>,
    peer: SocketAddr,
    protocol: Protocol,
    shared: Arc<Shared>,
    busy: bool,
) {
    let settings = shared.settings();
    let limits = &settings.limits;
    let channel = Channel {
        submission: protocol.is_submission(),
        tls: conn.is_tls(),
        starttls: settings.tls.is_some(),
    };
    let mut session = Session::new(settings.clone(), peer.ip(), channel);
    if busy {
        session.refuse_busy();
        Box::pin(conn.close(session.outbox(), conn::after(REFUSAL_TIMEOUT))).await;
        return;
    }
    let mut deadlines = Deadlines::new(
        Duration::from_secs(limits.session_timeout_secs),
        Duration::from_secs(limits.command_timeout_secs),
        Duration::from_secs(limits.data_timeout_secs),
        limits.min_data_rate,
    );
    let handshake = Duration::from_secs(limits.tls_handshake_timeout_secs);
    let mut message = Message::default();
    let mut stop_seen = false;
    loop {
        // A stop seen during a message applies from the next command on, including commands that
        // were pipelined behind the final dot.
        if !stop_seen && shared.shutdown.is_cancelled() {
            stop_seen = true;
            session.request_shutdown();
        }
        let (used, event) = session.advance(conn.pending());
        match event {
            Event::MessageLine(bytes) | Event::MessagePartial(bytes) => {
                message.append_content(bytes);
                if matches!(event, Event::MessageLine(_)) {
                    message.append(b"\n");
                }
                conn.consume(used);
                if message.pending.len() >= SPOOL_WRITE_CHUNK {
                    Box::pin(message.write_pending()).await;
                }
                continue;
            }
            Event::NeedInput => {}
            Event::MessageStart => {
                conn.consume(used);
                deadlines.new_transfer();
                message.start(&shared, &session);
                continue;
            }
            Event::MessageBytes => {
                conn.consume(used);
                message.append_content(&session.take_message_bytes());
                if message.pending.len() >= SPOOL_WRITE_CHUNK {
                    Box::pin(message.write_pending()).await;
                }
                continue;
            }
            Event::MessageAbort => {
                conn.consume(used);
                message.discard();
                continue;
            }
            Event::MessageEnd => {
                conn.consume(used);
                // The tail of a last BDAT chunk (nothing for DATA).
                message.append_content(&session.take_message_bytes());
                match Box::pin(message.finish(&shared, &session)).await {
                    Ok(id) => session.message_stored(Ok(&id)),
                    Err(Refusal::Temporary) => session.message_stored(Err(reply::STORAGE_FAILED)),
                    Err(Refusal::Full) => session.message_stored(Err(reply::STORAGE_FULL)),
                    Err(Refusal::Permanent(reply)) => session.message_refused(reply),
                }
                continue;
            }
            Event::StartTls => {
                conn.consume(used);
                if !conn.write(session.outbox(), deadlines.reply()).await {
                    return;
                }
                session.outbox().clear();
                let Some(tls) = &settings.tls else { return };
                // The core discards whatever came in clear after STARTTLS (CVE-2011-0411).
                if !Box::pin(conn.upgrade(&tls.config, handshake, "STARTTLS")).await {
                    return;
                }
                session.tls_started();
                continue;
            }
            Event::Authenticate { user, password } => {
                conn.consume(used);
                let outcome =
                    match Box::pin(check_password(&shared, peer.ip(), &user, password)).await {
                        Login::Accepted(account) => AuthOutcome::Accepted(account),
                        Login::Rejected => AuthOutcome::Rejected,
                        Login::Throttled => AuthOutcome::Throttled,
                    };
                session.auth_result(outcome);
                continue;
            }
            Event::Close => {
                Box::pin(conn.close(session.outbox(), deadlines.reply())).await;
                return;
            }
        }
        // NeedInput: answer everything processed so far in one write, then wait for the client.
        conn.consume(used);
        if !conn.write(session.outbox(), deadlines.reply()).await {
            return;
        }
        session.outbox().clear();
        let deadline = deadlines.next_read(session.requests(), session.in_message(), conn.received);
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
        match conn.read(deadline.at, stop).await {
            Input::Data => {}
            Input::Eof | Input::Failed => {
                if session.in_message() {
                    tracing::info!("connection lost during DATA; nothing was acknowledged");
                }
                return;
            }
            Input::Stopped => {
                stop_seen = true;
                session.request_shutdown();
            }
            Input::Timeout if deadline.session_limit => {
                tracing::info!("session time limit reached");
                session.session_expired();
            }
            Input::Timeout => {
                tracing::info!(in_message = session.in_message(), "timeout");
                session.timed_out();
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
    /// What failed was a full file system (or quota): 452 4.3.1 rather than 451 4.3.0.
    full: bool,
    pending: Vec<u8>,
    /// Octets of the message so far (stored form), written or not: a message larger than the whole
    /// file system gets 552 rather than 452.
    received: u64,
    /// Submission: adds Message-ID and Date when the message has none.
    fixer: Option<MissingHeaders>,
    /// The client's first octets were appended (after our trace headers).
    content_started: bool,
}

impl Message {
    /// Starts a message: its queue id and trace headers (no disk I/O: the spool file is created at the
    /// first write).
    fn start(&mut self, shared: &Arc<Shared>, session: &Session) {
        self.discard();
        match shared.store.spool() {
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
                self.full |= is_full(&e);
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
        .unwrap_or_else(|e| panic!("a spool write task failed: {e}"));
        match result {
            Ok(()) => self.spool = Some(spool),
            Err(e) => {
                tracing::error!(error = %e, "cannot write the spool file");
                self.failed = true;
                self.full |= is_full(&e);
                drop_in_background(spool);
            }
        }
    }

    /// Adds the client's message bytes. A message whose first line starts with white space would
    /// fold into our own `Received:` field: such a line cannot begin a header, so the message is
    /// stored as all body (an empty line first), as Postfix's cleanup does.
    fn append_content(&mut self, bytes: &[u8]) {
        if !self.content_started && !bytes.is_empty() {
            self.content_started = true;
            if matches!(bytes[0], b' ' | b'\t') {
                self.append(b"\n");
            }
        }
        self.append(bytes);
    }

    /// Adds message bytes (stored form), through the submission header check when there is one.
    fn append(&mut self, bytes: &[u8]) {
        self.received += bytes.len() as u64;
        match &mut self.fixer {
            Some(fixer) => fixer.push(bytes, &mut self.pending),
            None => self.pending.extend_from_slice(bytes),
        }
    }

    fn discard(&mut self) {
        self.pending.clear();
        self.received = 0;
        self.fixer = None;
        self.content_started = false;
        self.failed = false;
        self.full = false;
        if let Some(spool) = self.spool.take() {
            drop_in_background(spool);
        }
    }

    /// Why a message whose spool file could not be created or written is refused (and forgets it).
    fn storage_refusal(&mut self, shared: &Arc<Shared>) -> Refusal {
        let (full, received) = (self.full, self.received);
        self.discard();
        if full && shared.store.never_fits(received) {
            Refusal::Permanent(reply::LARGER_THAN_STORAGE)
        } else if full {
            Refusal::Full
        } else {
            Refusal::Temporary
        }
    }

    /// Makes the message durable; returns its queue id.
    async fn finish(&mut self, shared: &Arc<Shared>, session: &Session) -> Result<String, Refusal> {
        let envelope = session.envelope().expect("a message has an envelope");
        if let Some(mut fixer) = self.fixer.take() {
            fixer.finish(&mut self.pending);
            if let Err(reply) = session.check_submission_headers(fixer.senders()) {
                self.discard();
                return Err(Refusal::Permanent(reply));
            }
        }
        // The last bytes are written in the same trip to the store as the delivery: one hand-off to
        // a blocking thread per (small) message, not one per step.
        let pending = std::mem::take(&mut self.pending);
        let mut spool = match (self.spool.take(), self.failed) {
            (Some(spool), false) => spool,
            _ => return Err(self.storage_refusal(shared)),
        };
        let received = self.received;
        let from = envelope
            .from
            .as_ref()
            .map_or(String::new(), |m| m.raw.clone());
        let rcpts: Vec<String> = envelope.recipients.iter().map(|m| m.raw.clone()).collect();
        let accounts = envelope.mailboxes.clone();
        let id = spool.id().to_string();
        let (size, lines, eight_bit) = spool.stats_with(&pending);
        // Recipients at other domains: queued, in the same all-or-nothing step as local delivery.
        // The message as the queue and the delivery reports know it.
        let message = Entry {
            id: id.clone(),
            from: from.clone(),
            queued_at: crate::delivery::now(),
            submitter: envelope.submitter.clone(),
            // Needed only when an address, or the header (8-bit then), is UTF-8.
            smtputf8: envelope.from.as_ref().is_some_and(|m| m.is_utf8())
                || envelope.remote.iter().any(|(m, _)| m.is_utf8())
                || (envelope.smtputf8 && eight_bit),
            eight_bit,
            size,
            lines,
            ret_full: envelope.dsn.ret_full,
            envid: envelope.dsn.envid.clone(),
            recipients: Vec::new(),
        };
        let queued = (!envelope.remote.is_empty()).then(|| Entry {
            recipients: envelope
                .remote
                .iter()
                .map(|(m, dsn)| crate::storage::queue::Recipient {
                    notify: dsn.notify,
                    orcpt: dsn.orcpt.clone(),
                    ..crate::delivery::recipient(&m.raw, &m.domain)
                })
                .collect(),
            ..message.clone()
        });
        // RFC 3461 NOTIFY=SUCCESS of local recipients: a "delivered" notice once stored. Not for the
        // null sender, and best effort: the message itself is what must not be lost.
        let notify = (!from.is_empty() && !envelope.notify_delivered.is_empty()).then(|| {
            let rcpts: Vec<_> = envelope
                .notify_delivered
                .iter()
                .map(|(m, dsn)| (m.raw.clone(), dsn.orcpt.clone()))
                .collect();
            (message, rcpts)
        });
        let keep_original = notify.as_ref().map(|(n, _)| n.ret_full == Some(true));
        // Counted in before the blocking task starts, so that a stop cannot miss it.
        let Some(guard) = shared.deliveries.begin() else {
            tracing::warn!(queue_id = %id, "server stopping, answered 451: {id}");
            return Err(Refusal::Temporary);
        };
        let shared2 = shared.clone();
        let entry = queued.clone();
        // Ok(Err(e)): the spool file could not be written; Err(e): the delivery failed.
        let result = blocking_inline(move || {
            let _guard = guard;
            if let Err(e) = spool.append(&pending) {
                return Ok(Err(e));
            }
            let queue = &shared2.outbox.queue;
            // What a NOTIFY=SUCCESS notice returns is read before the spool file goes.
            let original = keep_original.map(|full| spool.original(full));
            accounts
                .iter()
                .map(|a| shared2.store.ensure_maildir(a))
                .collect::<std::io::Result<Vec<_>>>()
                .and_then(|maildirs| spool.deliver(&maildirs, entry.as_ref().map(|e| (queue, e))))
                .map(|()| Ok(original))
        })
        .await;
        let result = match result {
            Ok(Err(e)) => {
                tracing::error!(queue_id = %id, error = %e, "cannot write the spool file");
                self.failed = true;
                self.full = is_full(&e);
                self.received = received;
                return Err(self.storage_refusal(shared));
            }
            Ok(Ok(original)) => Ok(original),
            Err(e) => Err(e),
        };
        if let (Ok(_), Some(entry)) = (&result, queued) {
            shared.outbox.queued(entry);
        }
        if let (Ok(Some(original)), Some((notice, rcpts))) = (&result, notify) {
            let original = original.clone();
            let shared2 = shared.clone();
            let report = blocking(move || {
                let notices: Vec<_> = rcpts
                    .iter()
                    .map(|(address, orcpt)| crate::delivery::dsn::Notice {
                        address,
                        orcpt: orcpt.as_deref(),
                        action: crate::delivery::dsn::Action::Delivered,
                        error: "",
                        host: None,
                        expired: false,
                    })
                    .collect();
                let settings = shared2.settings();
                crate::delivery::send_report(
                    &settings,
                    &shared2.store,
                    &shared2.outbox.queue,
                    &notice,
                    &notices,
                    &original,
                )
            })
            .await;
            match report {
                Ok(Some(queued)) => shared.outbox.queued(queued),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "cannot make the delivery notice (NOTIFY=SUCCESS)")
                }
            }
        }
        match result {
            Ok(_) => {
                shared
                    .stats
                    .delivered
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(queue_id = %id, from = %from, rcpts = ?rcpts, size, "message accepted: {id} from <{from}> to {} ({size} octets)", rcpts.join(", "));
                Ok(id)
            }
            Err(e) if is_full(&e) => {
                tracing::error!(queue_id = %id, error = %e, "delivery failed, storage full, answered 452: {id}: {e}");
                Err(Refusal::Full)
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
    /// The file system or quota is full: 452 4.3.1, the client retries.
    Full,
    /// The message broke a rule: this reply, final.
    Permanent(Reply),
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
