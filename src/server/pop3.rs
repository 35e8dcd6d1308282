//! The POP3 driver: moves bytes between a TCP connection and a [`pop3::Session`], verifies logins off
//! the async workers, holds the mailbox lock for the session, streams messages, applies deletions.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncReadExt;

use super::auth::{self, Login};
use super::conn::{self, Connection, Deadlines, Input, Io};
use super::smtp::REFUSAL_TIMEOUT;
use super::{Shared, blocking};
use crate::config::Protocol;
use crate::pop3::wire::Encoder;
use crate::pop3::{Credential, Event, Listing, LoginFailure, Session};
use crate::storage::{self, MailboxLock};

/// The open maildrop: the lock is held, and released, with it.
struct Maildrop {
    dir: PathBuf,
    paths: Vec<PathBuf>,
    /// Messages read whole (RETR), by index: flagged Seen when the session ends, in one batch.
    seen: Vec<bool>,
    /// Held until the Seen flags are set, so that the next session sees the files where they stay.
    lock: Option<MailboxLock>,
    /// Small messages read ahead, by index, with the one a RETR asked for (see [`READ_AHEAD`]).
    ahead: Vec<(usize, Vec<u8>)>,
}

impl Drop for Maildrop {
    /// A session that ends without QUIT (dropped, timed out, stopped) still flags what it retrieved as
    /// Seen, off the async workers; QUIT does it in UPDATE, before its answer. The lock is released after.
    fn drop(&mut self) {
        let lock = self.lock.take();
        let paths = self.take_seen(&[]);
        if paths.is_empty() {
            return;
        }
        tokio::task::spawn_blocking(move || {
            mark_all_seen(paths);
            drop(lock);
        });
    }
}

impl Maildrop {
    /// The paths of the messages retrieved whole and not in `deleted`; forgets them.
    fn take_seen(&mut self, deleted: &[usize]) -> Vec<PathBuf> {
        let mut seen = std::mem::take(&mut self.seen);
        for &i in deleted {
            seen[i] = false;
        }
        (0..seen.len())
            .filter(|&i| seen[i])
            .map(|i| self.paths[i].clone())
            .collect()
    }
}

fn mark_all_seen(paths: Vec<PathBuf>) {
    for path in paths {
        if let Err(e) = storage::mark_seen(&path) {
            tracing::warn!(error = %e, "cannot flag a message as seen");
        }
    }
}

pub async fn serve<S: Io>(
    mut conn: Connection<S>,
    peer: SocketAddr,
    protocol: Protocol,
    shared: Arc<Shared>,
    busy: bool,
) {
    let settings = shared.settings();
    let ip = peer.ip();
    let tls = conn.is_tls();
    debug_assert_eq!(tls, protocol == Protocol::Pop3s);
    let plaintext_ok = settings.auth.password_allowed(tls, ip);
    let banner = settings
        .directory
        .offers_apop()
        .then(|| apop_banner(&settings.hostname));
    let stls = !tls && settings.tls.is_some();
    let mut session = Session::new(settings.clone(), plaintext_ok, stls, banner.clone());
    if busy {
        session.refuse_busy();
        Box::pin(conn.close(session.outbox(), conn::after(REFUSAL_TIMEOUT))).await;
        return;
    }
    let limits = &settings.limits;
    let idle = Duration::from_secs(limits.pop3_idle_timeout_secs);
    let mut deadlines = Deadlines::new(
        Duration::from_secs(limits.session_timeout_secs),
        idle,
        idle,
        limits.min_data_rate,
    );
    let handshake = Duration::from_secs(limits.tls_handshake_timeout_secs);
    let mut maildrop: Option<Maildrop> = None;
    loop {
        let (used, event) = session.advance(conn.pending());
        conn.consume(used);
        match event {
            Event::NeedInput => {}
            Event::Flush => {
                if !flush(&mut conn, &mut session, deadlines.reply()).await {
                    return;
                }
                continue;
            }
            Event::Login { user, credential } => {
                let result =
                    Box::pin(login(&shared, &user, credential, banner.as_deref(), ip)).await;
                session.login_result(result.map(|(drop, listing)| {
                    maildrop = Some(drop);
                    listing
                }));
                continue;
            }
            Event::Retrieve { index, top } => {
                let drop = maildrop.as_mut().expect("RETR only after login");
                if !Box::pin(retrieve(
                    &mut conn,
                    &mut session,
                    drop,
                    index,
                    top,
                    &deadlines,
                ))
                .await
                {
                    return;
                }
                if top.is_none() {
                    shared.stats.retrieved.fetch_add(1, Ordering::Relaxed);
                    drop.seen[index] = true;
                }
                continue;
            }
            Event::StartTls => {
                if !flush(&mut conn, &mut session, deadlines.reply()).await {
                    return;
                }
                let Some(tls) = &settings.tls else { return };
                // The core discards whatever came in clear after STLS.
                if !Box::pin(conn.upgrade(&tls.config, handshake, "STLS")).await {
                    return;
                }
                session.tls_started();
                continue;
            }
            Event::Update { delete } => {
                let drop = maildrop.as_mut().expect("UPDATE only after login");
                let dir = drop.dir.clone();
                let paths: Vec<PathBuf> = delete.iter().map(|&i| drop.paths[i].clone()).collect();
                let seen = drop.take_seen(&delete);
                let count = paths.len();
                let store = shared.store.clone();
                let result = Box::pin(blocking(move || {
                    mark_all_seen(seen);
                    if paths.is_empty() {
                        Ok(())
                    } else {
                        // A message deleted before the journal settled it would come back after a
                        // crash: wait for that first (at once when nothing is waiting).
                        store.barrier()?;
                        storage::expunge(&dir, &paths)
                    }
                }))
                .await;
                match &result {
                    Ok(()) => tracing::info!(deleted = count, "mailbox updated"),
                    Err(e) => tracing::error!(error = %e, "deleting messages failed"),
                }
                session.update_result(result.is_ok());
                continue;
            }
            Event::Close => {
                Box::pin(conn.close(session.outbox(), deadlines.reply())).await;
                return;
            }
        }
        if !flush(&mut conn, &mut session, deadlines.reply()).await {
            return;
        }
        let deadline = deadlines.next_read(session.requests(), false, conn.received);
        match conn.read(deadline.at, shared.shutdown.cancelled()).await {
            Input::Data => {}
            Input::Eof | Input::Failed => return, // dropped: nothing is deleted
            Input::Stopped => session.abort("server shutting down"),
            Input::Timeout if deadline.session_limit => session.abort("session time limit reached"),
            Input::Timeout => session.abort("idle timeout"),
        }
    }
}

async fn flush<S: Io>(
    conn: &mut Connection<S>,
    session: &mut Session,
    deadline: tokio::time::Instant,
) -> bool {
    let ok = conn.write(session.outbox(), deadline).await;
    session.outbox().clear();
    ok
}

/// The APOP timestamp of a greeting (RFC 1939 §7): unique per connection.
fn apop_banner(hostname: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("<{}.{seq}.{nanos}@{hostname}>", std::process::id())
}

/// Checks the credentials (same cost and same delay whether or not the user exists), with the
/// per-address throttle and LOGIN-DELAY, then locks and lists the mailbox.
async fn login(
    shared: &Arc<Shared>,
    user: &str,
    credential: Credential,
    banner: Option<&str>,
    ip: IpAddr,
) -> Result<(Maildrop, Vec<Listing>), LoginFailure> {
    let settings = shared.settings();
    let shown_user = user.escape_debug().to_string();
    let owned = user.to_string();
    let banner = banner.unwrap_or_default().to_string();
    let verdict = auth::check(shared, ip, user, move |directory| match credential {
        Credential::Password(password) => directory.verify(&owned, password.0.as_bytes()),
        Credential::Apop { digest } => directory.verify_apop(&owned, &banner, &digest),
    })
    .await;
    let account = match verdict {
        Login::Accepted(account) => account,
        Login::Rejected => return Err(LoginFailure::BadCredentials),
        Login::Throttled => return Err(LoginFailure::Throttled),
    };
    let login_delay = Duration::from_secs(settings.auth.pop3_login_delay_secs);
    if !shared
        .logins
        .login_allowed(&account.address, Instant::now(), login_delay)
    {
        tracing::info!(user = %shown_user, "login refused: LOGIN-DELAY");
        return Err(LoginFailure::TooSoon);
    }
    let shared2 = shared.clone();
    let opened = blocking(move || {
        let dir = shared2.store.ensure_maildir(&account)?;
        let Some(lock) = storage::lock(&dir)? else {
            return Ok(None);
        };
        let messages = storage::take_new(&dir, storage::scan(&dir)?)?;
        Ok(Some((dir, lock, messages)))
    })
    .await;
    match opened {
        Ok(Some((dir, lock, messages))) => {
            tracing::info!(user = %shown_user, messages = messages.len(), "logged in: {shown_user}");
            let listing = messages
                .iter()
                .map(|m| Listing {
                    uid: m.uid.clone(),
                    size: m.size,
                })
                .collect();
            let paths: Vec<PathBuf> = messages.into_iter().map(|m| m.path).collect();
            let count = paths.len();
            Ok((
                Maildrop {
                    dir,
                    paths,
                    seen: vec![false; count],
                    lock: Some(lock),
                    ahead: Vec::new(),
                },
                listing,
            ))
        }
        Ok(None) => {
            tracing::info!(user = %shown_user, "mailbox of {shown_user} in use");
            Err(LoginFailure::InUse)
        }
        Err(e) => {
            tracing::error!(user = %shown_user, error = %e, "cannot open mailbox");
            Err(LoginFailure::ServerError)
        }
    }
}

/// A message up to this size is read whole with the `+OK`, and leaves in one write with it.
const HEAD: usize = 64 * 1024;

/// With a RETR of a small message, the small messages after it in the listing are read in the same
/// trip to the blocking pool, up to this many and [`READ_AHEAD_OCTETS`] in all: clients download in
/// order (mpop, fetchmail, Thunderbird pipeline their RETRs), and a trip per message was most of
/// the CPU of a download (profile in docs/BENCHMARKS.md). Maildir files never change once delivered,
/// and the session holds the mailbox lock, so what was read ahead is what a RETR would read. The
/// budget bounds the memory of a downloading session (one per mailbox) at twice a RETR's own head.
const READ_AHEAD: usize = 32;
const READ_AHEAD_OCTETS: usize = 128 * 1024;

/// Opens `path` and reads up to [`HEAD`] octets: the file (for the rest), the head, the file's size.
/// The size is the file's own (one statx), and the head is read to exactly that length, so a small
/// message costs one read (read_to_end would stat the file again and read once more to see the end).
/// Maildir files never change once delivered; one that shrank meanwhile is an error.
fn open_head(path: &std::path::Path) -> std::io::Result<(std::fs::File, Vec<u8>, u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut head = vec![0; size.min(HEAD as u64) as usize];
    file.read_exact(&mut head)?;
    Ok((file, head, size))
}

/// Reads the small messages of `paths` (indexes from `first`) whole, in order, within the budget;
/// stops at the first large or unreadable one (its RETR reads it, and reports what fails).
fn read_ahead(first: usize, paths: &[PathBuf]) -> Vec<(usize, Vec<u8>)> {
    let mut ahead = Vec::new();
    let mut budget = READ_AHEAD_OCTETS;
    for (k, path) in paths.iter().enumerate() {
        match open_head(path) {
            Ok((_, head, size))
                if head.len() < HEAD && head.len() as u64 == size && head.len() <= budget =>
            {
                budget -= head.len();
                ahead.push((first + k, head));
            }
            _ => break,
        }
    }
    ahead
}

/// Streams one message; false if the connection must end (the reader is too slow, the write failed,
/// or a file broke midway). The whole response must go out within the idle timeout plus its size at
/// `limits.min_data_rate`, and no write may stall longer than the idle timeout: a reader that takes
/// a byte now and then cannot hold the mailbox lock.
async fn retrieve<S: Io>(
    conn: &mut Connection<S>,
    session: &mut Session,
    drop: &mut Maildrop,
    index: usize,
    top: Option<u64>,
    deadlines: &Deadlines,
) -> bool {
    let path = drop.paths[index].clone();
    let cached = drop
        .ahead
        .iter()
        .position(|(i, _)| *i == index)
        .map(|at| drop.ahead.swap_remove(at).1);
    let opened = match cached {
        // Read whole already: no file to stream from, none needed.
        Some(head) => {
            let size = head.len() as u64;
            Ok((None, head, path, size))
        }
        None => {
            // Open and read the head in one trip to the blocking pool; most messages fit in it whole,
            // and then the +OK, the message and the terminating dot leave in one write.
            let next: Vec<PathBuf> = drop
                .paths
                .iter()
                .skip(index + 1)
                .take(READ_AHEAD)
                .cloned()
                .collect();
            let result = blocking(move || {
                let (file, head, size) = open_head(&path)?;
                let ahead = if head.len() < HEAD {
                    read_ahead(index + 1, &next)
                } else {
                    Vec::new()
                };
                Ok((file, head, path, size, ahead))
            })
            .await;
            result.map(|(file, head, path, size, ahead)| {
                drop.ahead = ahead;
                (Some(file), head, path, size)
            })
        }
    };
    session.retrieve_started(index, opened.is_ok());
    let Ok((file, head, path, size)) = opened else {
        tracing::warn!("message vanished before RETR");
        return flush(conn, session, deadlines.reply()).await;
    };
    // Dot-stuffing and CRLF at most double the size.
    let deadline = deadlines.download(size.saturating_mul(2));
    let mut encoder = Encoder::new(top);
    let mut out = std::mem::take(session.outbox());
    encoder.encode(&head, &mut out);
    // Whole already (what was read ahead is: it has no file), or all that TOP asked for.
    let file = match file {
        Some(file) if head.len() >= HEAD && !encoder.is_done() => file,
        _ => {
            encoder.finish(&mut out);
            return conn.write(&out, deadlines.download_step(deadline)).await;
        }
    };
    // A large message: stream the rest with bounded memory.
    let mut file = tokio::fs::File::from_std(file);
    let mut chunk = vec![0u8; HEAD];
    loop {
        if !conn.write(&out, deadlines.download_step(deadline)).await {
            return false;
        }
        out.clear();
        if encoder.is_done() {
            break;
        }
        let n = match file.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                // The +OK is out already: the only honest end is to drop the connection.
                tracing::error!(error = %e, path = %path.display(), "read failed during RETR");
                return false;
            }
        };
        encoder.encode(&chunk[..n], &mut out);
    }
    encoder.finish(&mut out);
    conn.write(&out, deadlines.download_step(deadline)).await
}
