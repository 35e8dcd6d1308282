//! The async server: listeners, one task per connection (driving a sans-IO session), reload on SIGHUP,
//! graceful stop on SIGTERM/SIGINT, readiness, status and watchdog notifications.

mod auth;
pub mod listeners;
mod pop3;
mod smtp;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{ConfigError, Protocol, Settings};
use crate::storage::Store;
use crate::systemd::{self, InheritedSocket, NotifyState};

/// A client connection: plain TCP, or TLS (implicit, or after STARTTLS/STLS).
pub type Conn = tokio_util::either::Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

/// Re-reads the configuration for a reload (the same sources as at start).
pub type Reloader = Box<dyn Fn() -> Result<Settings, ConfigError> + Send + Sync>;

/// State shared by every task. The settings are swapped whole on reload; each connection keeps the
/// snapshot it started with.
pub struct Shared {
    settings: RwLock<Arc<Settings>>,
    store: Store,
    stats: Stats,
    /// Open connections per client address, for `limits.max_connections_per_ip`.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Password verifications running at once: argon2 takes 19 MiB and a core each, so a flood of
    /// logins must queue here instead of exhausting memory through the blocking pool.
    auth_slots: tokio::sync::Semaphore,
    logins: auth::LoginThrottle,
    shutdown: CancellationToken,
}

#[derive(Default)]
struct Stats {
    active: AtomicUsize,
    /// Deliveries between their first link and their last fsync: a stop waits for them, so that no
    /// message is left in some recipients' Maildirs and not others.
    delivering: AtomicUsize,
    connections: AtomicU64,
    delivered: AtomicU64,
    retrieved: AtomicU64,
}

impl Shared {
    fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn status(&self) -> String {
        format!(
            "{} sessions active, {} messages delivered, {} retrieved",
            self.stats.active.load(Ordering::Relaxed),
            self.stats.delivered.load(Ordering::Relaxed),
            self.stats.retrieved.load(Ordering::Relaxed),
        )
    }
}

/// Runs the server until SIGTERM/SIGINT. `inherited` are the sockets systemd passed; `watchdog` the
/// interval systemd expects pings at.
pub async fn run(
    settings: Settings,
    reloader: Reloader,
    inherited: Vec<InheritedSocket>,
    watchdog: Option<Duration>,
) -> anyhow::Result<()> {
    let store = Store::open(&settings.storage_root, &settings.hostname).with_context(|| {
        format!(
            "storage_root {} is not usable",
            settings.storage_root.display()
        )
    })?;
    ensure_maildirs(&store, &settings).context("cannot create the accounts' Maildirs")?;
    let listeners = listeners::open(&settings.listeners, inherited)?;
    let shared = Arc::new(Shared {
        settings: RwLock::new(Arc::new(settings)),
        store,
        stats: Stats::default(),
        per_ip: Mutex::new(HashMap::new()),
        logins: auth::LoginThrottle::default(),
        auth_slots: tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        ),
        shutdown: CancellationToken::new(),
    });
    // Signal handlers are installed before READY=1, so that a SIGHUP right after start is not fatal.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let tracker = TaskTracker::new();
    let live_listeners = Arc::new(AtomicUsize::new(0));
    // Failed accepts in a row, per listener: a listener stuck on EMFILE or a broken socket is not healthy.
    let accept_failures: Arc<Vec<AtomicU32>> =
        Arc::new(listeners.iter().map(|_| AtomicU32::new(0)).collect());
    let expected_listeners = listeners.len();
    for (i, (protocol, listener)) in listeners.into_iter().enumerate() {
        let listener = TcpListener::from_std(listener)?;
        live_listeners.fetch_add(1, Ordering::SeqCst);
        let (shared, tracker2, live) = (shared.clone(), tracker.clone(), live_listeners.clone());
        let failures = accept_failures.clone();
        tokio::spawn(async move {
            accept_loop(listener, protocol, shared, tracker2, &failures[i]).await;
            live.fetch_sub(1, Ordering::SeqCst);
        });
    }
    let accounts = shared.settings().directory.accounts().count();
    warn_expiring_certificate(&shared.settings());
    tracing::info!(accounts, listeners = expected_listeners, "rustmail ready");
    systemd::notify(&[NotifyState::Ready, NotifyState::Status(&shared.status())]);

    if let Some(interval) = watchdog {
        let (shared, live) = (shared.clone(), live_listeners.clone());
        tokio::spawn(watchdog_loop(shared, interval, move || {
            // About five seconds of nothing but failed accepts (they back off 100 ms each).
            live.load(Ordering::SeqCst) == expected_listeners
                && accept_failures
                    .iter()
                    .all(|f| f.load(Ordering::Relaxed) < 50)
        }));
    }
    tokio::spawn(status_loop(shared.clone()));

    loop {
        tokio::select! {
            _ = hup.recv() => reload(&shared, &reloader).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    let deadline = Duration::from_secs(shared.settings().limits.shutdown_timeout_secs);
    tracing::info!(
        sessions = shared.stats.active.load(Ordering::Relaxed),
        ?deadline,
        "stopping"
    );
    systemd::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    shared.shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            sessions = shared.stats.active.load(Ordering::Relaxed),
            "sessions still running at the stop deadline; closing them (nothing they carried was acknowledged)"
        );
    }
    // Deliveries run on the blocking pool and outlive their sessions: let them end (they are bounded
    // by a few fsyncs) rather than exit between two recipients' links.
    let started = std::time::Instant::now();
    while shared.stats.delivering.load(Ordering::SeqCst) > 0
        && started.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    protocol: Protocol,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    failures: &AtomicU32,
) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                failures.store(0, Ordering::Relaxed);
                tracker.spawn(connection(stream, peer, protocol, shared.clone()));
            }
            Err(e) => {
                failures.fetch_add(1, Ordering::Relaxed);
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, listener = protocol.name(), "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Counts a session, overall and for its client address, for as long as it lives.
struct ActiveGuard {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl ActiveGuard {
    /// Returns the guard, the number of sessions and the number from this address (both with this one).
    fn new(shared: Arc<Shared>, ip: IpAddr) -> (ActiveGuard, usize, usize) {
        let active = shared.stats.active.fetch_add(1, Ordering::Relaxed) + 1;
        let from_ip = {
            let mut per_ip = shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = per_ip.entry(ip).or_insert(0);
            *n += 1;
            *n
        };
        (ActiveGuard { shared, ip }, active, from_ip)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.shared.stats.active.fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = self.shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, protocol: Protocol, shared: Arc<Shared>) {
    let id = shared.stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
    // IPv6 clients are counted per /64, which one host commonly holds whole.
    let ip = auth::address_key(peer.ip());
    let (_guard, active, from_ip) = ActiveGuard::new(shared.clone(), ip);
    let limits = shared.settings().limits.clone();
    let busy = active > limits.max_connections || from_ip > limits.max_connections_per_ip;
    let _ = stream.set_nodelay(true);
    let span = tracing::info_span!("conn", id, proto = protocol.name(), peer = %peer);
    async move {
        tracing::debug!("connected");
        if busy {
            tracing::warn!(active, from_ip, "connection limit reached, refusing {peer}");
        }
        let conn = if protocol.implicit_tls() {
            // RFC 8314: TLS from the first byte.
            let timeout = Duration::from_secs(limits.command_timeout_secs);
            match start_tls(Conn::Left(stream), &shared.settings(), timeout).await {
                Some(conn) => conn,
                None => return,
            }
        } else {
            Conn::Left(stream)
        };
        if protocol.is_pop3() {
            pop3::serve(conn, peer, protocol, shared, busy).await
        } else {
            smtp::serve(conn, peer, protocol, shared, busy).await
        }
        tracing::debug!("disconnected");
    }
    .instrument(span)
    .await
}

async fn reload(shared: &Arc<Shared>, reloader: &Reloader) {
    systemd::notify_reloading();
    let current = shared.settings();
    match reloader() {
        Ok(mut new) => {
            if new.storage_root != current.storage_root {
                tracing::warn!(
                    "storage_root changes take effect only after a restart; keeping the current one"
                );
                new.storage_root = current.storage_root.clone();
            }
            if new.listeners != current.listeners {
                tracing::warn!("[listen] changes take effect only after a restart");
            }
            let new = Arc::new(new);
            let (shared2, new2) = (shared.clone(), new.clone());
            match blocking(move || ensure_maildirs(&shared2.store, &new2)).await {
                Ok(()) => {
                    *shared.settings.write().unwrap_or_else(|e| e.into_inner()) = new;
                    let accounts = shared.settings().directory.accounts().count();
                    warn_expiring_certificate(&shared.settings());
                    tracing::info!(accounts, "configuration reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "reload refused, cannot create Maildirs; the previous configuration stays in force")
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "reload refused, the previous configuration stays in force")
        }
    }
    systemd::notify(&[NotifyState::Ready, NotifyState::Status(&shared.status())]);
}

fn warn_expiring_certificate(settings: &Settings) {
    if let Some(warning) = settings
        .tls
        .as_ref()
        .and_then(|t| t.expiry_warning(crate::tls::now_unix()))
    {
        tracing::warn!("{warning}");
    }
}

fn ensure_maildirs(store: &Store, settings: &Settings) -> std::io::Result<()> {
    for account in settings.directory.accounts() {
        store.ensure_maildir(account)?;
    }
    Ok(())
}

/// Pings the watchdog at half its interval, but only after a health check passes: the runtime runs
/// this task, the blocking pool (which does all disk I/O) answers, the store can write and fsync, and
/// every accept loop is alive. A wedged server therefore stops pinging and systemd restarts it.
async fn watchdog_loop(
    shared: Arc<Shared>,
    interval: Duration,
    listeners_alive: impl Fn() -> bool,
) {
    let period = interval / 2;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let shared2 = shared.clone();
        let probe = tokio::time::timeout(period, blocking(move || shared2.store.probe())).await;
        match probe {
            Ok(Ok(())) if listeners_alive() => systemd::notify(&[NotifyState::Watchdog]),
            Ok(Ok(())) => tracing::error!(
                "health check failed: a listener stopped; withholding the watchdog ping"
            ),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "health check failed: storage not writable; withholding the watchdog ping")
            }
            Err(_) => tracing::error!(
                "health check timed out: storage or blocking pool stuck; withholding the watchdog ping"
            ),
        }
    }
}

async fn status_loop(shared: Arc<Shared>) {
    let mut last = String::new();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let status = shared.status();
        if status != last {
            systemd::notify(&[NotifyState::Status(&status)]);
            last = status;
        }
    }
}

/// Runs blocking file-system work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(format!("blocking task failed: {e}"))))
}

/// The TLS handshake on a plain connection (implicit TLS, or after STARTTLS/STLS), within `timeout`.
/// `None` when there is no certificate, the client fails the handshake, or it is already TLS.
async fn start_tls(conn: Conn, settings: &Settings, timeout: Duration) -> Option<Conn> {
    let Conn::Left(tcp) = conn else {
        return None;
    };
    let Some(tls) = &settings.tls else {
        tracing::error!(
            "TLS requested, but no certificate is configured (tls.certificate, tls.key)"
        );
        return None;
    };
    match tokio::time::timeout(timeout, tls.acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            let (_, state) = stream.get_ref();
            tracing::debug!(version = ?state.protocol_version(), cipher = ?state.negotiated_cipher_suite().map(|c| c.suite()), "TLS established");
            Some(Conn::Right(stream))
        }
        Ok(Err(e)) => {
            tracing::info!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!("TLS handshake timed out");
            None
        }
    }
}

/// `now + secs`, or a year from now when that does not fit (a huge configured timeout must not panic).
fn deadline_in(secs: u64) -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(secs))
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

/// Writes all of `bytes` within `timeout`; false if the peer is gone or stopped reading. Without the
/// limit, a client that never reads would hold its session (and a POP3 mailbox lock) forever.
async fn write_timed(stream: &mut Conn, bytes: &[u8], timeout: Duration) -> bool {
    use tokio::io::AsyncWriteExt;
    let write = async {
        stream.write_all(bytes).await?;
        // TLS buffers records: push them out now.
        stream.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "write failed");
            false
        }
        Err(_) => {
            tracing::info!("peer stopped reading, closing");
            false
        }
    }
}

/// Reads into `buf` with a deadline, stopping early when `stop` resolves. `Ok(None)` means "stopped".
async fn read_some(
    stream: &mut Conn,
    buf: &mut Vec<u8>,
    timeout: Duration,
    stop: impl Future<Output = ()>,
) -> Result<Option<usize>, ReadError> {
    use tokio::io::AsyncReadExt;
    buf.reserve(8192);
    tokio::select! {
        r = tokio::time::timeout(timeout, stream.read_buf(buf)) => match r {
            Ok(Ok(n)) => Ok(Some(n)),
            Ok(Err(e)) => Err(ReadError::Io(e)),
            Err(_) => Err(ReadError::Timeout),
        },
        () = stop => Ok(None),
    }
}

enum ReadError {
    Io(std::io::Error),
    Timeout,
}
