//! The connection core shared by the SMTP and POP3 drivers: it owns the stream and the input buffer,
//! reads until an absolute deadline (or a stop), writes a reply in one flush within a deadline,
//! upgrades to TLS (discarding buffered plaintext itself: the STARTTLS/STLS injection defence lives
//! here and only here) and closes with a bounded TLS shutdown. Generic over the byte stream, so the
//! real drivers run in tests over `tokio::io::duplex`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

/// What a client stream must be: TCP in production, an in-memory pipe in tests.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves once a read may find something (a socket: readable, or closed), so that an idle
    /// connection waits without an input buffer; `first`: nothing has been read from the stream yet.
    /// Resolving early is allowed: the read that follows then waits in the ordinary way.
    fn readable(&self, first: bool) -> impl Future<Output = ()> + Send {
        let _ = first;
        std::future::ready(())
    }
}

impl Io for tokio::net::TcpStream {
    async fn readable(&self, first: bool) {
        // tokio clears a socket's readiness after a read that did not fill the buffer, so later
        // waits are real. Only an accepted socket's first one can be stale (it starts out marked
        // readable): a one-octet peek, which consumes nothing, tells, and its WouldBlock, inside
        // try_io, clears the mark. Bytes, the end of the stream or an error: the read reports them.
        if tokio::net::TcpStream::readable(self).await.is_err() || !first {
            return;
        }
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        let peeked = self.try_io(tokio::io::Interest::READABLE, || {
            socket2::SockRef::from(self).peek(&mut probe)
        });
        if peeked.is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock) {
            let _ = tokio::net::TcpStream::readable(self).await;
        }
    }
}

impl Io for tokio::io::DuplexStream {}

/// Input is read this much at a time (at least).
const READ_CHUNK: usize = 8192;

/// Closing (TLS close_notify, then the linger) takes no longer than this.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Plain TCP, or TLS (implicit, or after STARTTLS/STLS); `None` only once an upgrade has failed.
type Stream<S> = Option<Either<S, Box<TlsStream<S>>>>;

/// Why [`Connection::read`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// New bytes are in [`Connection::pending`].
    Data,
    /// The peer closed its side.
    Eof,
    /// The stop future resolved first.
    Stopped,
    /// The deadline passed.
    Timeout,
    /// The read failed (reset, TLS error).
    Failed,
}

pub struct Connection<S> {
    stream: Stream<S>,
    /// Bytes read; those before `start` were consumed by the session already.
    input: Vec<u8>,
    start: usize,
    /// Bytes read in all.
    pub received: u64,
}

impl<S: Io> Connection<S> {
    pub fn plain(stream: S) -> Connection<S> {
        Connection {
            stream: Some(Either::Left(stream)),
            // Allocated when input arrives: most of an idle connection's memory was this buffer.
            input: Vec::new(),
            start: 0,
            received: 0,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Some(Either::Right(_)))
    }

    /// The input not yet consumed.
    pub fn pending(&self) -> &[u8] {
        &self.input[self.start..]
    }

    /// Marks the first `n` pending bytes as consumed. (They are dropped at the next read, in one
    /// move: dropping them here, per line, would move the rest of the buffer once per line.)
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.input.len() {
            self.input.clear();
            self.start = 0;
        }
    }

    /// Reads more input, until `deadline` or until `stop` resolves.
    pub async fn read(&mut self, deadline: Instant, stop: impl Future<Output = ()>) -> Input {
        if self.start > 0 {
            self.input.drain(..self.start);
            self.start = 0;
        }
        let read = async {
            match &mut self.stream {
                Some(s) => {
                    if self.input.is_empty() {
                        // Nothing half-read is kept: wait without the buffer (an idle client can
                        // take minutes), then read into a new one. TLS keeps its own buffers, so
                        // a TLS stream gains nothing by waiting first.
                        self.input = Vec::new();
                        if let Either::Left(plain) = s {
                            plain.readable(self.received == 0).await;
                        }
                    }
                    self.input.reserve(READ_CHUNK);
                    s.read_buf(&mut self.input).await
                }
                None => Ok(0),
            }
        };
        tokio::select! {
            r = tokio::time::timeout_at(deadline, read) => match r {
                Ok(Ok(0)) => Input::Eof,
                Ok(Ok(n)) => {
                    self.received += n as u64;
                    Input::Data
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "read failed");
                    Input::Failed
                }
                Err(_) => Input::Timeout,
            },
            () = stop => Input::Stopped,
        }
    }

    /// Writes all of `bytes` (and flushes TLS records) by `deadline`; false if the peer is gone or
    /// does not read fast enough. Without a deadline a client that never reads would hold its
    /// session, and a POP3 mailbox lock, forever.
    pub async fn write(&mut self, bytes: &[u8], deadline: Instant) -> bool {
        if bytes.is_empty() {
            return true;
        }
        let write = async {
            let s = self
                .stream
                .as_mut()
                .ok_or(std::io::ErrorKind::NotConnected)?;
            s.write_all(bytes).await?;
            // TLS buffers records: push them out now.
            s.flush().await
        };
        match tokio::time::timeout_at(deadline, write).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "write failed");
                false
            }
            Err(_) => {
                tracing::info!("peer does not read fast enough, closing");
                false
            }
        }
    }

    /// Switches to TLS within `timeout`. Whatever the client sent in clear after the command that
    /// asked for TLS is discarded, never executed (CVE-2011-0411 and its POP3 cousin). False when the
    /// handshake failed or timed out: the connection is then unusable.
    /// `command` names what asked for TLS, for the log.
    pub async fn upgrade(
        &mut self,
        config: &Arc<rustls::ServerConfig>,
        timeout: Duration,
        command: &str,
    ) -> bool {
        if !self.pending().is_empty() {
            tracing::info!(
                octets = self.pending().len(),
                "discarding plaintext sent after {command}"
            );
            self.input.clear();
            self.start = 0;
        }
        let Some(Either::Left(plain)) = self.stream.take() else {
            return false;
        };
        let acceptor = TlsAcceptor::from(config.clone());
        match tokio::time::timeout(timeout, acceptor.accept(plain)).await {
            Ok(Ok(tls)) => {
                let (_, state) = tls.get_ref();
                tracing::debug!(version = ?state.protocol_version(), cipher = ?state.negotiated_cipher_suite().map(|c| c.suite()), "TLS established");
                self.stream = Some(Either::Right(Box::new(tls)));
                true
            }
            Ok(Err(e)) => {
                tracing::info!(error = %e, "TLS handshake failed");
                false
            }
            Err(_) => {
                tracing::info!(?timeout, "TLS handshake timed out");
                false
            }
        }
    }

    /// Writes the last reply and closes, all bounded: a peer that stops reading cannot hold the task
    /// (nor a server stop) in `write` or in the TLS close_notify. After our side is shut, what the
    /// client still sends is read and dropped for a moment (at most [`LINGER`] octets, within
    /// [`CLOSE_TIMEOUT`]): closing with unread input would make the kernel answer with a reset, and a
    /// client still writing (a refused BDAT chunk, a pipelined group) might never read our reply.
    pub async fn close(mut self, last: &[u8], deadline: Instant) {
        if !self.write(last, deadline).await {
            return;
        }
        let Some(s) = self.stream.as_mut() else {
            return;
        };
        let linger = async {
            if s.shutdown().await.is_err() {
                return;
            }
            let mut drained = 0;
            let mut buf = [0u8; 8192];
            while drained < LINGER {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => drained += n,
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, linger).await;
    }
}

/// Octets read and dropped at most after our side of a connection is closed.
const LINGER: usize = 64 * 1024;

/// The per-request deadlines of one session (Postfix's `smtpd_per_request_deadline` and
/// `smtpd_min_data_rate`): a command must arrive whole within the command timeout of when the server
/// started waiting for it, however the client spreads its bytes; a transfer (a message, or a POP3
/// download) gets its timeout plus the time its size takes at the minimum rate, and must not stall
/// longer than the timeout; nothing outlives the session limit.
pub struct Deadlines {
    session_end: Instant,
    command: Duration,
    transfer: Duration,
    min_rate: u64,
    /// The session's request count when the current command deadline was set.
    request: Option<u64>,
    command_end: Instant,
    /// The transfer in progress: when it started and the bytes received by then.
    transfer_start: Option<(Instant, u64)>,
    /// Bytes received when last looked, and when that count last grew.
    progress: (u64, Instant),
}

/// The deadline for the next read, and whether it is the session limit that sets it.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
    pub session_limit: bool,
}

impl Deadlines {
    pub fn new(session: Duration, command: Duration, transfer: Duration, min_rate: u64) -> Self {
        let now = Instant::now();
        Deadlines {
            session_end: after(session),
            command,
            transfer,
            min_rate,
            request: None,
            command_end: now,
            transfer_start: None,
            progress: (0, now),
        }
    }

    /// The deadline for the next read. `requests` is the session's count of complete command lines,
    /// `in_transfer` whether message data is being read, `received` the connection's byte count.
    pub fn next_read(&mut self, requests: u64, in_transfer: bool, received: u64) -> Deadline {
        let now = Instant::now();
        if received != self.progress.0 {
            self.progress = (received, now);
        }
        let end = if in_transfer {
            let (start, at_start) = *self.transfer_start.get_or_insert((now, received));
            let allowed = start
                .checked_add(
                    self.transfer
                        .saturating_add(transfer_allowance(received - at_start, self.min_rate)),
                )
                .unwrap_or(self.session_end);
            allowed.min(
                self.progress
                    .1
                    .checked_add(self.transfer)
                    .unwrap_or(self.session_end),
            )
        } else {
            self.transfer_start = None;
            if self.request != Some(requests) {
                self.request = Some(requests);
                self.command_end = now.checked_add(self.command).unwrap_or(self.session_end);
            }
            self.command_end
        };
        Deadline {
            at: end.min(self.session_end),
            session_limit: self.session_end <= end,
        }
    }

    /// A new message begins (DATA accepted, or a first BDAT chunk): its transfer allowance starts now,
    /// even when it was pipelined behind the previous message with no command read in between.
    pub fn new_transfer(&mut self) {
        self.transfer_start = None;
    }

    /// For a reply: the command timeout, within the session limit.
    pub fn reply(&self) -> Instant {
        after(self.command).min(self.session_end)
    }

    /// For sending `octets` of a download: the timeout plus the minimum-rate allowance.
    pub fn download(&self, octets: u64) -> Instant {
        after(
            self.transfer
                .saturating_add(transfer_allowance(octets, self.min_rate)),
        )
        .min(self.session_end)
    }

    /// For one write of a download that must end by `whole`: it must also not stall longer than the
    /// timeout.
    pub fn download_step(&self, whole: Instant) -> Instant {
        after(self.transfer).min(whole)
    }
}

/// `now + d`, saturating (a huge configured timeout must not panic).
pub fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// How long transferring `octets` may take at `min_rate` octets per second, on top of a base timeout:
/// a message or download must keep a minimum rate (Postfix's `smtpd_min_data_rate`), so a trickle
/// cannot hold a slot for hours.
pub fn transfer_allowance(octets: u64, min_rate: u64) -> Duration {
    Duration::from_secs(octets / min_rate.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_idle_client_over_tcp_is_waited_for_without_an_input_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut conn = Connection::plain(server);
        assert!(
            conn.write(b"220 hello\r\n", after(Duration::from_secs(5)))
                .await
        );
        let idle = after(Duration::from_millis(200));
        assert_eq!(
            conn.read(idle, std::future::pending()).await,
            Input::Timeout
        );
        assert_eq!(conn.input.capacity(), 0, "the wait held a buffer");
        client.write_all(b"EHLO x\r\n").await.unwrap();
        let soon = after(Duration::from_secs(5));
        assert_eq!(conn.read(soon, std::future::pending()).await, Input::Data);
        assert_eq!(conn.pending(), b"EHLO x\r\n");
        conn.consume(8);
        // Idle again after a read: the wait still holds no buffer (and does not peek to know it).
        let idle = after(Duration::from_millis(200));
        assert_eq!(
            conn.read(idle, std::future::pending()).await,
            Input::Timeout
        );
        assert_eq!(conn.input.capacity(), 0, "the second wait held a buffer");
        // The client reads the greeting first: closing with it unread would send a reset, not EOF.
        let mut greeting = [0u8; 11];
        client.read_exact(&mut greeting).await.unwrap();
        drop(client);
        assert_eq!(conn.read(soon, std::future::pending()).await, Input::Eof);
    }

    #[tokio::test(start_paused = true)]
    async fn read_ends_at_the_absolute_deadline_however_often_bytes_trickle() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut conn = Connection::plain(server);
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        let trickle = tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                if client.write_all(b"x").await.is_err() {
                    break;
                }
            }
        });
        let mut reads = 0;
        loop {
            match conn.read(deadline, std::future::pending()).await {
                Input::Data => reads += 1,
                Input::Timeout => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(reads, 3, "three bytes arrived before the deadline");
        assert_eq!(Instant::now() - start, Duration::from_secs(10));
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn write_to_a_peer_that_never_reads_ends_at_the_deadline() {
        let (_client, server) = tokio::io::duplex(1024);
        let mut conn = Connection::plain(server);
        let start = Instant::now();
        let ok = conn
            .write(&vec![b'x'; 1 << 20], start + Duration::from_secs(7))
            .await;
        assert!(!ok);
        assert_eq!(Instant::now() - start, Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn close_is_bounded_when_the_peer_does_not_read() {
        let (_client, server) = tokio::io::duplex(16);
        let conn = Connection::plain(server);
        let start = Instant::now();
        conn.close(&[b'y'; 4096], start + Duration::from_secs(3))
            .await;
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
    }

    /// Session limit `session` s; command and data timeouts 300 s; 500 octets/s.
    fn deadlines(session: u64) -> Deadlines {
        let t = Duration::from_secs(300);
        Deadlines::new(Duration::from_secs(session), t, t, 500)
    }

    #[tokio::test(start_paused = true)]
    async fn command_deadline_runs_from_when_the_server_started_waiting() {
        let mut d = deadlines(3600);
        let start = Instant::now();
        assert_eq!(
            d.next_read(0, false, 0).at,
            start + Duration::from_secs(300)
        );
        // Bytes trickle in but no line completes: the deadline stays.
        tokio::time::advance(Duration::from_secs(299)).await;
        assert_eq!(
            d.next_read(0, false, 1).at,
            start + Duration::from_secs(300)
        );
        // A line completed: the next command gets its own timeout.
        assert_eq!(
            d.next_read(1, false, 2).at,
            start + Duration::from_secs(599)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn transfer_must_keep_the_minimum_rate_and_never_stall_past_the_timeout() {
        let mut d = deadlines(100_000);
        let start = Instant::now();
        assert_eq!(
            d.next_read(5, true, 1000).at,
            start + Duration::from_secs(300)
        );
        // One byte every 299 s: each read is within the stall timeout, but the whole is too slow.
        for i in 1..=3u64 {
            tokio::time::advance(Duration::from_secs(299)).await;
            let at = d.next_read(5, true, 1000 + i).at;
            assert_eq!(at, start + Duration::from_secs(300), "after {i} bytes");
        }
        // A fast client earns time in proportion to what it sent...
        let mut d = deadlines(100_000);
        let start = Instant::now();
        d.next_read(0, true, 0);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            d.next_read(0, true, 1_000_000).at,
            start + Duration::from_secs(310),
            "...but may not stall longer than the timeout"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_session_limit_caps_every_deadline() {
        let mut d = deadlines(100);
        let deadline = d.next_read(0, false, 0);
        assert!(deadline.session_limit);
        assert_eq!(deadline.at, Instant::now() + Duration::from_secs(100));
    }

    #[tokio::test]
    async fn huge_configured_timeouts_do_not_panic_the_deadlines() {
        // Found in review: now + timeout overflowed for a timeout near 2^63 s.
        let huge = Duration::from_secs(u64::MAX / 2);
        let mut d = Deadlines::new(huge, huge, huge, 1);
        let _ = d.next_read(0, false, 0);
        let _ = d.next_read(1, true, 10);
        let _ = d.next_read(1, true, 20);
        let _ = (
            d.reply(),
            d.download(u64::MAX),
            d.download_step(after(huge)),
        );
    }

    #[test]
    fn huge_timeouts_do_not_panic() {
        let _ = after(Duration::from_secs(u64::MAX));
        assert_eq!(transfer_allowance(10_000, 0), Duration::from_secs(10_000));
        assert_eq!(transfer_allowance(10_000, 500), Duration::from_secs(20));
    }
}
