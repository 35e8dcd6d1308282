//! The async server's lifecycle: listeners and their accept loops (admission happens there, before
//! any work), reload on SIGHUP, graceful stop on SIGTERM/SIGINT within `limits.shutdown_timeout_secs`,
//! readiness, status and watchdog notifications. Connection I/O is in [`conn`]; the protocol drivers in
//! `smtp` and `pop3`.

mod admission;
mod auth;
pub mod conn;
pub mod listeners;
mod pop3;
mod smtp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{ConfigError, Protocol, Settings};
use crate::storage::Store;
use crate::storage::queue::Queue;
use crate::systemd::{self, InheritedSocket, NotifyState};
use admission::{Admission, Handshake, Verdict};
use conn::Connection;

/// Re-reads the configuration for a reload (the same sources as at start).
pub type Reloader = Box<dyn Fn() -> Result<Settings, ConfigError> + Send + Sync>;

/// What the server is told from outside: in production by signals, in tests by a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Reload,
    Stop,
}

/// State shared by every task. The settings are swapped whole on reload; each connection keeps the
/// snapshot it started with.
pub struct Shared {
    settings: RwLock<Arc<Settings>>,
    store: Arc<Store>,
    outbox: Arc<crate::delivery::Outbox>,
    stats: Stats,
    admission: Arc<Admission>,
    /// Password verifications running at once: argon2 takes 19 MiB and a core each, so a flood of
    /// logins must queue here instead of exhausting memory through the blocking pool.
    auth_slots: tokio::sync::Semaphore,
    logins: auth::LoginThrottle,
    deliveries: Arc<Deliveries>,
    shutdown: CancellationToken,
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    delivered: AtomicU64,
    retrieved: AtomicU64,
}

impl Shared {
    pub fn new(settings: Settings, store: Arc<Store>, outbox: crate::delivery::Outbox) -> Shared {
        Shared {
            settings: RwLock::new(Arc::new(settings)),
            store,
            outbox: Arc::new(outbox),
            stats: Stats::default(),
            admission: Arc::default(),
            logins: auth::LoginThrottle::default(),
            auth_slots: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
            deliveries: Arc::default(),
            shutdown: CancellationToken::new(),
        }
    }

    fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn status(&self) -> String {
        let (queued, oldest) = self.outbox.depth();
        let oldest = oldest.map_or(String::new(), |age| format!(", oldest {}", age_text(age)));
        format!(
            "{} sessions active, {} messages delivered, {} retrieved, {queued} queued{oldest}",
            self.admission.served(),
            self.stats.delivered.load(Ordering::Relaxed),
            self.stats.retrieved.load(Ordering::Relaxed),
        )
    }
}

/// Deliveries between their first link and their last fsync. A stop waits for them (so that no
/// message is left in some recipients' Maildirs and not others) and then closes the gate, so that
/// none can start after the stop looked.
#[derive(Default)]
struct Deliveries {
    state: Mutex<(usize, bool)>,
    idle: tokio::sync::Notify,
}

struct DeliveryGuard(Arc<Deliveries>);

impl Deliveries {
    /// Counts a delivery in before it starts; `None` once the server is past its stop.
    fn begin(self: &Arc<Self>) -> Option<DeliveryGuard> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.1 {
            return None;
        }
        s.0 += 1;
        Some(DeliveryGuard(self.clone()))
    }

    /// Waits (at most `within`) until no delivery runs, then refuses new ones. Returns how many were
    /// still running at the deadline.
    async fn close(&self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let idle = self.idle.notified();
            {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if s.0 == 0 || tokio::time::Instant::now() >= deadline {
                    s.1 = true;
                    return s.0;
                }
            }
            let _ = tokio::time::timeout_at(deadline, idle).await;
        }
    }
}

impl Drop for DeliveryGuard {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 -= 1;
        if s.0 == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Runs the server until SIGTERM/SIGINT (SIGHUP reloads). `inherited` are the sockets systemd passed;
/// `watchdog` the interval systemd expects pings at.
pub async fn run(
    settings: Settings,
    reloader: Reloader,
    inherited: Vec<InheritedSocket>,
    watchdog: Option<Duration>,
) -> anyhow::Result<()> {
    // Signal handlers are installed before READY=1, so that a SIGHUP right after start is not fatal.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let control = tokio::select! {
                _ = hup.recv() => Control::Reload,
                _ = term.recv() => Control::Stop,
                _ = int.recv() => Control::Stop,
            };
            if tx.send(control).await.is_err() {
                return;
            }
        }
    });
    run_with(settings, reloader, inherited, watchdog, rx).await
}

/// [`run`] with its signals as an input.
pub async fn run_with(
    settings: Settings,
    reloader: Reloader,
    inherited: Vec<InheritedSocket>,
    watchdog: Option<Duration>,
    mut control: mpsc::Receiver<Control>,
) -> anyhow::Result<()> {
    let store = Store::open(&settings.storage_root, &settings.hostname).with_context(|| {
        format!(
            "storage_root {} is not usable",
            settings.storage_root.display()
        )
    })?;
    ensure_maildirs(&store, &settings).context("cannot create the accounts' Maildirs")?;
    let queue = Queue::open(store.root()).context("cannot open the outbound queue")?;
    // Without it `rustmail queue flush|remove` cannot reach the server, but mail still flows: not a
    // reason to refuse to start (a storage root path too long for a Unix socket, say).
    let control_socket = crate::delivery::control::listen(store.root())
        .map_err(|e| {
            let path = crate::delivery::control::socket_path(store.root());
            tracing::warn!(path = %path.display(), error = %e, "no control socket: `rustmail queue flush` and `remove` cannot reach this server");
        })
        .ok();
    let listeners = listeners::open(&settings.listeners, inherited)?;
    raise_fd_limit(admission::socket_cap(&settings.limits));
    let store = Arc::new(store);
    let (outbox, scheduler) = crate::delivery::new(queue);
    let shared = Arc::new(Shared::new(settings, store.clone(), outbox));
    {
        let env = crate::delivery::Env {
            settings: {
                let shared = shared.clone();
                Arc::new(move || shared.settings())
            },
            store,
            shutdown: shared.shutdown.clone(),
        };
        tokio::spawn(scheduler.run(env));
        if let Some(socket) = control_socket {
            tokio::spawn(crate::delivery::control::serve(
                socket,
                shared.outbox.clone(),
                shared.shutdown.clone(),
            ));
        }
    }

    let tracker = TaskTracker::new();
    let live_listeners = Arc::new(AtomicUsize::new(0));
    // Failed accepts in a row, per listener: a listener whose socket is broken is not healthy.
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

    while let Some(Control::Reload) = control.recv().await {
        reload(&shared, &reloader).await;
    }

    // The stop: sessions get the configured time to reach a safe point; deliveries already running
    // get what is left of it, plus a few seconds (the units' TimeoutStopSec leaves 15).
    let timeout = Duration::from_secs(shared.settings().limits.shutdown_timeout_secs);
    let deadline = conn::after(timeout);
    tracing::info!(sessions = shared.admission.served(), ?timeout, "stopping");
    systemd::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    shared.shutdown.cancel();
    tracker.close();
    if tokio::time::timeout_at(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            sessions = shared.admission.served(),
            "sessions still running at the stop deadline; closing them (nothing they carried was acknowledged)"
        );
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let running = shared.deliveries.close(left + Duration::from_secs(5)).await;
    if running > 0 {
        tracing::error!(running, "deliveries still running at the stop deadline");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Raises the soft limit on open files to the hard one (systemd's default soft limit is 1024, the
/// hard one much higher), and says so when even that is below what admission may hold open.
fn raise_fd_limit(sockets: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
        tracing::warn!(soft, hard, "cannot raise the open-files limit");
    }
    let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s);
    // Each session may hold a spool file and a Maildir file (a copy) or a mailbox lock and a message
    // besides its socket, plus listeners and logs.
    let needed = 3 * sockets as u64 + 64;
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            "the open-files limit is below what limits.max_connections may need; lower it or raise LimitNOFILE"
        );
    }
}

/// Accept errors that say the process (or system) is out of something, not that the listener broke.
fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

/// Accept errors about the one connection being accepted (it went away before we took it).
fn connection_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(
            libc_errno::EPROTO
                | libc_errno::EPERM
                | libc_errno::ENETDOWN
                | libc_errno::EHOSTUNREACH
        )
    )
}

mod libc_errno {
    use nix::errno::Errno;
    pub const EMFILE: i32 = Errno::EMFILE as i32;
    pub const ENFILE: i32 = Errno::ENFILE as i32;
    pub const ENOBUFS: i32 = Errno::ENOBUFS as i32;
    pub const ENOMEM: i32 = Errno::ENOMEM as i32;
    pub const EPROTO: i32 = Errno::EPROTO as i32;
    pub const EPERM: i32 = Errno::EPERM as i32;
    pub const ENETDOWN: i32 = Errno::ENETDOWN as i32;
    pub const EHOSTUNREACH: i32 = Errno::EHOSTUNREACH as i32;
}

async fn accept_loop(
    listener: TcpListener,
    protocol: Protocol,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    failures: &AtomicU32,
) {
    let mut closed_quietly = 0u64;
    let mut handshakes_capped = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                failures.store(0, Ordering::Relaxed);
                let peer = client_address(peer);
                let key = auth::address_key(peer.ip());
                let limits = &shared.settings().limits;
                let verdict = shared.admission.admit(key, limits);
                let mut handshake = None;
                if protocol.implicit_tls() && matches!(verdict, Verdict::Serve(_)) {
                    handshake = shared.admission.start_handshake(limits);
                    if handshake.is_none() {
                        // Closed without a word, like a connection over the socket cap.
                        handshakes_capped += 1;
                        if handshakes_capped.is_power_of_two() {
                            tracing::warn!(
                                closed = handshakes_capped,
                                listener = protocol.name(),
                                "TLS handshakes under way at their cap (limits.max_connections / 4), closing {peer}"
                            );
                        }
                        continue;
                    }
                }
                match verdict {
                    Verdict::Close => {
                        closed_quietly += 1;
                        if closed_quietly.is_power_of_two() {
                            tracing::warn!(
                                closed = closed_quietly,
                                listener = protocol.name(),
                                "over the connection cap, closing without a reply: {peer}"
                            );
                        }
                    }
                    verdict => {
                        tracker.spawn(connection(
                            stream,
                            peer,
                            protocol,
                            shared.clone(),
                            verdict,
                            handshake,
                        ));
                    }
                }
            }
            Err(e) if out_of_resources(&e) => {
                // Not the listener's fault: back off without spinning, and without failing the
                // watchdog's health check (a restart would not help, and an attacker could cause it).
                tracing::warn!(error = %e, listener = protocol.name(), "accept failed, backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) if connection_gone(&e) => {
                tracing::debug!(error = %e, listener = protocol.name(), "connection gone before accept");
            }
            Err(e) => {
                failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, listener = protocol.name(), "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The handshake of a refused implicit-TLS connection (to send its 421) gets no longer than this.
const REFUSAL_HANDSHAKE: Duration = Duration::from_secs(3);

/// Dual-stack sockets (systemd's default for `[::]:25`) show IPv4 clients as `::ffff:a.b.c.d`: use
/// the plain IPv4 form everywhere (Received:, logs, limits).
fn client_address(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    protocol: Protocol,
    shared: Arc<Shared>,
    verdict: Verdict,
    handshake: Option<Handshake>,
) {
    let (_ticket, busy) = match verdict {
        Verdict::Serve(t) => (t, false),
        Verdict::Refuse(t) => (t, true),
        Verdict::Close => return,
    };
    let id = shared.stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
    let _ = stream.set_nodelay(true);
    let span = tracing::info_span!("conn", id, proto = protocol.name(), peer = %peer);
    serve(
        Connection::plain(stream),
        peer,
        protocol,
        shared,
        busy,
        handshake,
    )
    .instrument(span)
    .await
}

/// Serves one admitted connection (or refuses it, `busy`): implicit TLS first, within the handshake
/// timeout (holding its `handshake` place until then), then the protocol.
///
/// An async fn's state is as large as the largest future it awaits inline, and every connection,
/// idle or not, carries its state: the drivers box the rare, large steps (TLS handshakes, AUTH, the
/// start and end of a message, POP3 login, RETR and UPDATE, closing), so that they cost memory only
/// while they run (`an_idle_connection_carries_a_small_state`).
pub async fn serve<S: conn::Io>(
    mut conn: Connection<S>,
    peer: SocketAddr,
    protocol: Protocol,
    shared: Arc<Shared>,
    busy: bool,
    handshake: Option<Handshake>,
) {
    tracing::debug!("connected");
    let settings = shared.settings();
    if protocol.implicit_tls() {
        // RFC 8314: TLS from the first byte.
        let Some(tls) = &settings.tls else {
            tracing::error!("TLS listener without a certificate (tls.certificate, tls.key)");
            return;
        };
        let mut timeout = Duration::from_secs(settings.limits.tls_handshake_timeout_secs);
        if busy {
            // A refusal is worth a short handshake only.
            timeout = timeout.min(REFUSAL_HANDSHAKE);
        }
        if !Box::pin(conn.upgrade(&tls.config, timeout, "connect")).await {
            return;
        }
    }
    drop(handshake);
    if protocol.is_pop3() {
        pop3::serve(conn, peer, protocol, shared, busy).await
    } else {
        smtp::serve(conn, peer, protocol, shared, busy).await
    }
    tracing::debug!("disconnected");
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
                tracing::warn!(
                    "[listen] changes take effect only after a restart; keeping the current listeners"
                );
                new.listeners = current.listeners.clone();
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
        let maildir = store.ensure_maildir(account)?;
        // What a crash left in tmp/ (a delivery cut off before its move into new/).
        let removed = crate::storage::clean_tmp(&maildir, crate::storage::STALE_TMP);
        if removed > 0 {
            tracing::info!(account = %account.address, removed, "removed stale files from tmp/");
        }
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
/// `95 s`, `12 min`, `3 h`, `2 d`: an age for the status line.
fn age_text(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        7200..172_800 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86400),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(format!("blocking task failed: {e}"))))
}

/// [`blocking`] for the short step on the hot path, a message's delivery: run on this worker thread
/// (`block_in_place`: the runtime hands the worker's other tasks to another thread) rather than sent to
/// the blocking pool, whose hand-off wakes a thread each way (up to milliseconds each on a virtual
/// machine whose idle CPU sleeps, seen under strace). Like a pool task, it cannot be cut short once
/// started. On a current-thread runtime (tests) it goes to the pool.
async fn blocking_inline<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() != RuntimeFlavor::MultiThread {
        return blocking(f).await;
    }
    tokio::task::block_in_place(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)))
        .unwrap_or_else(|_| Err(std::io::Error::other("blocking step panicked")))
}

#[cfg(test)]
mod tests;
