//! Outbound delivery: the scheduler that takes what the queue holds to the world, retries what met a
//! temporary failure on a backoff schedule, and reports what failed for good to the sender.
//!
//! The queue on disk (`storage::queue`) is the truth; the scheduler keeps a copy in memory, gets new
//! entries from the SMTP driver through [`Outbox::queued`] once they are durable, and writes every
//! state change back before acting on the next. Jobs (`attempt.rs`) run concurrently, one connection
//! each, at most `outbound.max_connections` in all and `max_connections_per_domain` per domain; a job
//! takes up to [`BATCH`] due messages of its domain over one connection.

pub mod attempt;
pub mod client;
pub mod control;
pub mod dane;
pub mod dsn;
pub mod mta_sts;
pub mod route;
pub mod seven_bit;
pub mod tls;
pub mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::accounts::Route;
use crate::config::Settings;
use crate::storage::Store;
use crate::storage::queue::{Entry, Queue, Recipient, State};
use attempt::{Context, JobMessage, Outcome, Results};

/// Messages one job takes over its connection.
pub const BATCH: usize = 20;

/// The recipients a job works on: per queue id, indexes into the entry's recipients.
type Held = Vec<(String, Vec<usize>)>;

/// Every recipient a job held, deferred with `error` (the job panicked or ran out of time).
fn deferred(held: &Held, error: &str) -> Results {
    let outcome = Outcome::Deferred {
        host: None,
        error: error.to_string(),
    };
    held.iter()
        .map(|(id, rcpts)| (id.clone(), attempt::each(rcpts, &outcome)))
        .collect()
}

/// The longest one job (one connection, up to [`BATCH`] messages) may take.
const JOB_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// How soon a failed bounce (a full disk, say) is tried again.
const BOUNCE_RETRY_SECS: u64 = 60;

/// A queued recipient, its domain in the form routing, TLS policies and DKIM keys compare: lower-case
/// A-labels (an address literal lower-cased).
pub fn recipient(address: &str, domain: &str) -> Recipient {
    let domain = crate::accounts::normalize_domain(domain).unwrap_or_else(|| domain.to_lowercase());
    Recipient::new(address, &domain)
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

enum Command {
    Queued(Entry),
    Flush(Option<String>, oneshot::Sender<Result<usize, String>>),
    Remove(String, oneshot::Sender<Result<(), String>>),
}

#[derive(Default)]
struct QueueStats {
    depth: AtomicU64,
    /// Unix time the oldest entry was queued (0: none).
    oldest: AtomicU64,
}

/// The handle the rest of the server holds: the queue to write into, and the scheduler to tell.
pub struct Outbox {
    pub queue: Queue,
    tx: mpsc::UnboundedSender<Command>,
    stats: Arc<QueueStats>,
}

impl Outbox {
    /// Hands a durably queued entry to the scheduler.
    pub fn queued(&self, entry: Entry) {
        let _ = self.tx.send(Command::Queued(entry));
    }

    /// Makes the pending recipients of one entry (or of all) due now; returns how many entries.
    pub async fn flush(&self, id: Option<String>) -> Result<usize, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Flush(id, tx))
            .map_err(|_| "the scheduler is not running".to_string())?;
        rx.await.map_err(|_| "the scheduler stopped".to_string())?
    }

    pub async fn remove(&self, id: String) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Remove(id, tx))
            .map_err(|_| "the scheduler is not running".to_string())?;
        rx.await.map_err(|_| "the scheduler stopped".to_string())?
    }

    /// Queued messages, and the age in seconds of the oldest.
    pub fn depth(&self) -> (u64, Option<u64>) {
        let depth = self.stats.depth.load(Ordering::Relaxed);
        let oldest = self.stats.oldest.load(Ordering::Relaxed);
        (
            depth,
            (depth > 0 && oldest > 0).then(|| now().saturating_sub(oldest)),
        )
    }
}

/// The scheduler, before it runs.
pub struct Scheduler {
    queue: Queue,
    rx: mpsc::UnboundedReceiver<Command>,
    stats: Arc<QueueStats>,
}

/// A channel pair: the handle, and the scheduler to run with [`Scheduler::run`].
pub fn new(queue: Queue) -> (Outbox, Scheduler) {
    let (tx, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(QueueStats::default());
    (
        Outbox {
            queue: queue.clone(),
            tx,
            stats: stats.clone(),
        },
        Scheduler { queue, rx, stats },
    )
}

/// What the scheduler reads from the running server.
pub struct Env {
    pub settings: Arc<dyn Fn() -> Arc<Settings> + Send + Sync>,
    pub store: Arc<Store>,
    pub shutdown: CancellationToken,
}

struct Running {
    queue: Queue,
    stats: Arc<QueueStats>,
    env: Env,
    ctx: Option<Arc<Context>>,
    entries: HashMap<String, Entry>,
    /// (queue id, domain) pairs a job is working on.
    in_flight: HashSet<(String, String)>,
    busy: HashMap<String, usize>,
    /// Entries whose state changed since they were last written.
    dirty: HashSet<String>,
    /// When a failure report that could not be made is tried again, per entry.
    bounce_retry: HashMap<String, u64>,
    /// When setting up delivery (the resolver) was last tried, while it has not worked.
    setup_tried: u64,
    jobs: JoinSet<(String, Results)>,
    /// What each running job holds, to be released if it panics.
    job_info: HashMap<tokio::task::Id, (String, Held)>,
}

impl Scheduler {
    pub async fn run(self, env: Env) {
        let settings = (env.settings)();
        let ctx = setup(&self.queue, &settings).await;
        let queue = self.queue.clone();
        let loaded = tokio::task::spawn_blocking(move || queue.load())
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        let entries = match loaded {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the queue");
                Vec::new()
            }
        };
        if !entries.is_empty() {
            tracing::info!(queued = entries.len(), "outbound queue loaded");
        }
        if !settings.outbound.enable && !entries.is_empty() {
            tracing::warn!(
                queued = entries.len(),
                "outbound.enable is false: queued messages wait until it is set again"
            );
        }
        let mut running = Running {
            queue: self.queue,
            stats: self.stats,
            env,
            ctx,
            entries: entries.into_iter().map(|e| (e.id.clone(), e)).collect(),
            in_flight: HashSet::new(),
            busy: HashMap::new(),
            dirty: HashSet::new(),
            bounce_retry: HashMap::new(),
            setup_tried: now(),
            jobs: JoinSet::new(),
            job_info: HashMap::new(),
        };
        // Entries finished before a crash (their removal did not happen) are removed now.
        running.dirty = running
            .entries
            .values()
            .filter(|e| e.is_done())
            .map(|e| e.id.clone())
            .collect();
        running.persist().await;
        let mut rx = self.rx;
        loop {
            if running.ctx.is_none() && now() >= running.setup_tried + 60 {
                running.setup_tried = now();
                running.ctx = setup(&running.queue, &(running.env.settings)()).await;
            }
            if running.bounce_pending().await {
                running.persist().await;
            }
            running.dispatch();
            let wake = running.next_wake();
            let sleep = tokio::time::sleep(Duration::from_secs(wake.saturating_sub(now()).max(1)));
            tokio::select! {
                command = rx.recv() => match command {
                    Some(command) => running.command(command).await,
                    None => break,
                },
                Some(done) = running.jobs.join_next_with_id(), if !running.jobs.is_empty() => {
                    match done {
                        Ok((id, (domain, results))) => {
                            running.job_info.remove(&id);
                            running.apply(&domain, results).await;
                        }
                        Err(e) => {
                            // A bug, not the peer: release what the job held and try again later.
                            tracing::error!(error = %e, "a delivery job failed");
                            if let Some((domain, held)) = running.job_info.remove(&e.id()) {
                                let results = deferred(&held, "451 4.3.0 internal error during delivery");
                                running.apply(&domain, results).await;
                            }
                        }
                    }
                }
                () = sleep => {}
                () = running.env.shutdown.cancelled() => break,
            }
        }
        // Jobs still running are dropped: their recipients stay pending on disk and are tried again
        // after the restart (a message the peer took just before may then arrive twice).
        running.jobs.abort_all();
    }
}

impl Running {
    fn update_stats(&self) {
        self.stats
            .depth
            .store(self.entries.len() as u64, Ordering::Relaxed);
        let oldest = self
            .entries
            .values()
            .map(|e| e.queued_at)
            .min()
            .unwrap_or(0);
        self.stats.oldest.store(oldest, Ordering::Relaxed);
    }

    /// When something is due next (pending recipients not in a job, of domains with a free connection
    /// slot: a job that ends wakes the loop anyway, so what waits for a slot need not be polled).
    fn next_wake(&self) -> u64 {
        let mut wake = now() + 3600;
        let outbound = (self.env.settings)().outbound.clone();
        let slots_free = self.jobs.len() < outbound.max_connections;
        for entry in self.entries.values() {
            for r in entry.pending() {
                let domain_free = self.busy.get(&r.domain).copied().unwrap_or(0)
                    < outbound.max_connections_per_domain;
                if slots_free
                    && domain_free
                    && !self
                        .in_flight
                        .contains(&(entry.id.clone(), r.domain.clone()))
                {
                    wake = wake.min(r.next_attempt);
                }
            }
            if entry.report_due() {
                wake = wake.min(now() + BOUNCE_RETRY_SECS);
            }
            if let Some(at) = entry.warning_at(outbound.delay_warning_secs) {
                // A warning that could not be written waits for the retry of reports, as a bounce
                // does: without this the loop would wake at once, again and again.
                let retry = self.bounce_retry.get(&entry.id).copied().unwrap_or(0);
                wake = wake.min(at.max(retry));
            }
        }
        wake
    }

    /// Starts jobs for what is due, within the connection limits.
    fn dispatch(&mut self) {
        let settings = (self.env.settings)();
        let outbound = settings.outbound.clone();
        let Some(ctx) = self.ctx.clone() else { return };
        if !outbound.enable {
            return;
        }
        let now = now();
        let mut order: Vec<&Entry> = self.entries.values().collect();
        order.sort_by(|a, b| (a.queued_at, &a.id).cmp(&(b.queued_at, &b.id)));
        let mut due: BTreeMap<String, Vec<JobMessage>> = BTreeMap::new();
        for entry in order {
            let mut by_domain: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
            for (i, r) in entry.recipients.iter().enumerate() {
                if r.state == State::Pending
                    && r.next_attempt <= now
                    && !self
                        .in_flight
                        .contains(&(entry.id.clone(), r.domain.clone()))
                {
                    by_domain.entry(&r.domain).or_default().push(i);
                }
            }
            for (domain, rcpts) in by_domain {
                due.entry(domain.to_string()).or_default().push(JobMessage {
                    entry: entry.clone(),
                    rcpts,
                });
            }
        }
        for (domain, mut messages) in due {
            while !messages.is_empty()
                && self.jobs.len() < outbound.max_connections
                && self.busy.get(&domain).copied().unwrap_or(0)
                    < outbound.max_connections_per_domain
            {
                let rest = messages.split_off(messages.len().min(BATCH));
                let batch = std::mem::replace(&mut messages, rest);
                for m in &batch {
                    self.in_flight.insert((m.entry.id.clone(), domain.clone()));
                }
                *self.busy.entry(domain.clone()).or_default() += 1;
                let (ctx, outbound, helo, job_domain) = (
                    ctx.clone(),
                    outbound.clone(),
                    settings.hostname.clone(),
                    domain.clone(),
                );
                let held: Held = batch
                    .iter()
                    .map(|m| (m.entry.id.clone(), m.rcpts.clone()))
                    .collect();
                let held_by_job = held.clone();
                let handle = self.jobs.spawn(async move {
                    // A peer that answers just slowly enough for every timeout (a tarpit) must not
                    // hold a connection slot for hours: the whole job has a deadline.
                    let run = attempt::run(&ctx, &outbound, &helo, &job_domain, batch);
                    let results = match tokio::time::timeout(JOB_DEADLINE, run).await {
                        Ok(results) => results,
                        Err(_) => {
                            tracing::warn!(domain = %job_domain, "a delivery job took longer than {} minutes: deferred", JOB_DEADLINE.as_secs() / 60);
                            deferred(&held_by_job, "451 4.4.7 delivery took too long")
                        }
                    };
                    (job_domain, results)
                });
                self.job_info.insert(handle.id(), (domain.clone(), held));
            }
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Queued(entry) => {
                // Loaded from disk already (queued just before the scheduler read the queue): the
                // loaded copy may have moved on.
                self.entries.entry(entry.id.clone()).or_insert(entry);
                self.update_stats();
            }
            Command::Flush(id, reply) => {
                let mut count = 0;
                for entry in self.entries.values_mut() {
                    if id.as_ref().is_some_and(|id| *id != entry.id) {
                        continue;
                    }
                    count += 1;
                    for r in &mut entry.recipients {
                        if r.state == State::Pending {
                            r.next_attempt = 0;
                        }
                    }
                }
                let _ = reply.send(match (&id, count) {
                    (Some(id), 0) => Err(format!("no queued message {id}")),
                    _ => Ok(count),
                });
            }
            Command::Remove(id, reply) => {
                let result = if !self.entries.contains_key(&id) {
                    Err(format!("no queued message {id}"))
                } else if self.in_flight.iter().any(|(i, _)| *i == id) {
                    Err(format!(
                        "{id} is being delivered right now; try again in a moment"
                    ))
                } else {
                    let queue = self.queue.clone();
                    let id2 = id.clone();
                    match tokio::task::spawn_blocking(move || queue.remove(&id2)).await {
                        Ok(Ok(())) => {
                            self.entries.remove(&id);
                            self.update_stats();
                            tracing::info!(queue_id = %id, "removed from the queue by the administrator");
                            Ok(())
                        }
                        Ok(Err(e)) => Err(format!("cannot remove {id}: {e}")),
                        Err(e) => Err(e.to_string()),
                    }
                };
                let _ = reply.send(result);
            }
        }
    }

    /// Applies a job's results: recipients delivered, deferred (or expired) or failed; then the
    /// bounces due, and the new state to disk.
    async fn apply(&mut self, domain: &str, results: Results) {
        if let Some(n) = self.busy.get_mut(domain) {
            *n = n.saturating_sub(1);
        }
        let settings = (self.env.settings)();
        let now = now();
        for (id, outcomes) in results {
            self.in_flight.remove(&(id.clone(), domain.to_string()));
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            self.dirty.insert(id.clone());
            let expired_at = entry.queued_at + settings.outbound.max_queue_secs;
            for (i, outcome) in outcomes {
                let r = &mut entry.recipients[i];
                r.attempts += 1;
                match outcome {
                    Outcome::Delivered { host, relayed } => {
                        r.state = State::Delivered;
                        r.last_host = Some(host);
                        r.last_error = None;
                        // RFC 3461 §5.2.2: a peer without DSN ends the chain; we owe the notice.
                        r.success_due = relayed && r.notify.is_some_and(|n| n.success);
                    }
                    Outcome::Failed { host, error } => {
                        r.state = State::Failed { bounced: false };
                        r.last_host = host;
                        r.last_error = Some(error);
                    }
                    Outcome::Deferred { host, error } => {
                        r.last_host = host;
                        r.last_error = Some(error);
                        if now >= expired_at {
                            r.state = State::Failed { bounced: false };
                            r.expired = true;
                        } else {
                            r.next_attempt = now + settings.outbound.retry_interval(r.attempts);
                        }
                    }
                }
            }
        }
        self.bounce_pending().await;
        self.persist().await;
    }

    /// Writes every entry whose state changed; removes those that are done.
    async fn persist(&mut self) {
        let entries: Vec<Entry> = self
            .dirty
            .drain()
            .filter_map(|id| self.entries.get(&id).cloned())
            .collect();
        let queue = self.queue.clone();
        let in_flight: HashSet<String> = self.in_flight.iter().map(|(id, _)| id.clone()).collect();
        let (done, failed) = tokio::task::spawn_blocking(move || {
            let (mut done, mut failed) = (Vec::new(), Vec::new());
            for entry in entries {
                if entry.is_done() && !in_flight.contains(&entry.id) {
                    match queue.remove(&entry.id) {
                        Ok(()) => done.push(entry.id.clone()),
                        Err(e) => {
                            tracing::error!(queue_id = %entry.id, error = %e, "cannot remove a finished queue entry");
                            failed.push(entry.id.clone());
                        }
                    }
                } else if let Err(e) = queue.write(&entry) {
                    tracing::error!(queue_id = %entry.id, error = %e, "cannot save the queue state (a restart may repeat an attempt)");
                    failed.push(entry.id.clone());
                }
            }
            (done, failed)
        })
        .await
        .unwrap_or_default();
        // Written again at the next change (a failure here costs at most a repeated attempt).
        self.dirty.extend(failed);
        for id in done {
            if let Some(entry) = self.entries.remove(&id) {
                tracing::info!(queue_id = %id, from = %entry.from, "left the queue");
            }
        }
        self.update_stats();
    }

    /// Makes the reports that are due, each entry's failed (and delayed) recipients in one report.
    /// Returns whether any entry changed (to be persisted).
    async fn bounce_pending(&mut self) -> bool {
        let now = now();
        let delay = (self.env.settings)().outbound.delay_warning_secs;
        let ids: Vec<String> = self
            .entries
            .values()
            .filter(|e| {
                (e.report_due() || warning_due(e, delay, now))
                    && self.bounce_retry.get(&e.id).is_none_or(|&at| at <= now)
            })
            .map(|e| e.id.clone())
            .collect();
        let changed = !ids.is_empty();
        for id in ids {
            let entry = self.entries[&id].clone();
            let (settings, store, queue) = (
                (self.env.settings)(),
                self.env.store.clone(),
                self.queue.clone(),
            );
            let made =
                tokio::task::spawn_blocking(move || bounce(&settings, &store, &queue, &entry, now))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
            match made {
                Ok(queued) => {
                    self.bounce_retry.remove(&id);
                    self.dirty.insert(id.clone());
                    let entry = self.entries.get_mut(&id).expect("still there");
                    for r in &mut entry.recipients {
                        if r.state == (State::Failed { bounced: false }) {
                            r.state = State::Failed { bounced: true };
                        }
                        if r.warning_due(entry.queued_at, delay, now) {
                            r.warned = true;
                        }
                        r.success_due = false;
                    }
                    if let Some(report) = queued {
                        self.entries.insert(report.id.clone(), report);
                    }
                }
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "cannot create the failure report, trying again in a minute");
                    self.bounce_retry.insert(id, now + BOUNCE_RETRY_SECS);
                }
            }
        }
        changed
    }
}

/// The resolver and the trust store for delivery; `None` (logged) when the resolver cannot be made,
/// e.g. /etc/resolv.conf missing early at boot: tried again later.
async fn setup(queue: &Queue, settings: &Settings) -> Option<Arc<Context>> {
    let outbound = settings.outbound.clone();
    let queue = queue.clone();
    let sts_dir = settings.storage_root.join("mta-sts");
    let made = tokio::task::spawn_blocking(move || {
        // DANE needs validated answers; a smarthost is authenticated by WebPKI, never by DANE.
        let dnssec = if outbound.dane && outbound.smarthost.is_none() {
            route::Dnssec::Validate(outbound.dnssec_trust_anchor.as_deref())
        } else {
            route::Dnssec::Off
        };
        let resolver = route::Resolver::new(&outbound.dns_servers, dnssec);
        let tls = tls::ClientTls::new(outbound.tls_trust_file.as_deref());
        let mta_sts = mta_sts::Cache::new(sts_dir, outbound.mta_sts_port);
        (resolver, tls, queue, mta_sts)
    })
    .await;
    match made {
        Ok((Ok(resolver), tls, queue, mta_sts)) => Some(Arc::new(Context {
            queue,
            resolver,
            tls,
            mta_sts,
        })),
        Ok((Err(e), ..)) => {
            tracing::error!(error = %e, "no DNS resolver: outbound mail stays queued; trying again in a minute");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot set up outbound delivery; trying again in a minute");
            None
        }
    }
}

/// Whether `entry` owes its sender a delay warning at `now` (never the null sender).
fn warning_due(entry: &Entry, delay_secs: u64, now: u64) -> bool {
    !entry.from.is_empty()
        && entry
            .recipients
            .iter()
            .any(|r| r.warning_due(entry.queued_at, delay_secs, now))
}

/// Makes the reports `entry` owes durable: failures of recipients whose sender wants them (NOTIFY
/// absent or with FAILURE; RFC 3461), delay warnings due at `now` (NOTIFY absent or with DELAY), and
/// "relayed" notices owed for NOTIFY=SUCCESS. A message from the null sender gets none (RFC 5321
/// §6.1: no bounce of a bounce). Returns the report if it was queued.
fn bounce(
    settings: &Settings,
    store: &Store,
    queue: &Queue,
    entry: &Entry,
    now: u64,
) -> io::Result<Option<Entry>> {
    let outbound = &settings.outbound;
    let failed: Vec<&Recipient> = entry
        .recipients
        .iter()
        .filter(|r| r.state == State::Failed { bounced: false })
        .collect();
    for r in &failed {
        tracing::warn!(
            queue_id = %entry.id, rcpt = %r.address, error = r.last_error.as_deref().unwrap_or(""),
            expired = r.expired, "delivery failed for good: {} to <{}>", entry.id, r.address
        );
    }
    if entry.from.is_empty() {
        tracing::warn!(queue_id = %entry.id, "a failure report could not be delivered; it is not reported again");
        return Ok(None);
    }
    let notices: Vec<dsn::Notice<'_>> = entry
        .recipients
        .iter()
        .filter_map(|r| {
            let action = match r.state {
                State::Failed { bounced: false } if r.reports_failure() => dsn::Action::Failed,
                State::Delivered if r.success_due => dsn::Action::Relayed,
                State::Pending
                    if r.warning_due(entry.queued_at, outbound.delay_warning_secs, now) =>
                {
                    dsn::Action::Delayed {
                        retry_until: entry.queued_at.saturating_add(outbound.max_queue_secs),
                    }
                }
                _ => return None,
            };
            Some(dsn::Notice {
                address: &r.address,
                orcpt: r.orcpt.as_deref(),
                action,
                error: r.last_error.as_deref().unwrap_or("failed"),
                host: r.last_host.as_deref(),
                expired: r.expired,
            })
        })
        .collect();
    if notices.is_empty() {
        tracing::info!(queue_id = %entry.id, "the sender asked for no report (NOTIFY)");
        return Ok(None);
    }
    let original = read_original(&queue.message_path(&entry.id), entry.ret_full == Some(true));
    send_report(settings, store, queue, entry, &notices, &original)
}

/// Writes a report about `entry` to its sender: into the sender's Maildir when the sender is local,
/// else queued with the null sender (the queued entry is returned, for the scheduler).
pub fn send_report(
    settings: &Settings,
    store: &Store,
    queue: &Queue,
    entry: &Entry,
    notices: &[dsn::Notice<'_>],
    original: &[u8],
) -> io::Result<Option<Entry>> {
    let date = chrono::Local::now().to_rfc2822();
    let mut spool = store.spool()?;
    let boundary = format!("=_{}", spool.id());
    let report = dsn::report(
        &settings.hostname,
        entry,
        notices,
        original,
        &date,
        &boundary,
    );
    let received = format!(
        "Return-Path: <>\nReceived: by {} (rustmail) id {};\n\t{date}\n",
        settings.hostname,
        spool.id()
    );
    spool.append(received.as_bytes())?;
    spool.append(&report)?;
    let (local, domain) = entry
        .from
        .rsplit_once('@')
        .unwrap_or((entry.from.as_str(), ""));
    match settings.directory.route(local, domain) {
        Route::Local(accounts) => {
            let maildirs = accounts
                .iter()
                .map(|a| store.ensure_maildir(a))
                .collect::<io::Result<Vec<_>>>()?;
            let id = spool.id().to_string();
            spool.deliver(&maildirs, None)?;
            tracing::info!(queue_id = %entry.id, report = %id, to = %entry.from, "delivery report delivered locally");
            Ok(None)
        }
        Route::Unknown => {
            tracing::warn!(queue_id = %entry.id, to = %entry.from, "the sender is not a local address any more: no report");
            Ok(None)
        }
        Route::NotLocal => {
            let report = Entry {
                id: spool.id().to_string(),
                from: String::new(),
                queued_at: now(),
                submitter: None,
                smtputf8: !entry.from.is_ascii(),
                eight_bit: spool.eight_bit(),
                size: spool.size(),
                lines: spool.lines(),
                ret_full: None,
                envid: None,
                recipients: vec![recipient(&entry.from, domain)],
            };
            spool.deliver(&[], Some((queue, &report)))?;
            tracing::info!(queue_id = %entry.id, report = %report.id, to = %entry.from, "delivery report queued");
            Ok(Some(report))
        }
    }
}

/// An entry as `rustmail queue list` shows it: a line for the message, one per recipient.
pub fn listing(entry: &Entry) -> String {
    let time = |t: u64| {
        chrono::DateTime::from_timestamp(t as i64, 0)
            .map(|d| {
                d.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string()
            })
            .unwrap_or_default()
    };
    let mut out = format!(
        "{}  queued {}  from <{}>  {} octets\n",
        entry.id,
        time(entry.queued_at),
        entry.from,
        entry.wire_size()
    );
    for r in &entry.recipients {
        let state = match r.state {
            State::Pending if r.attempts == 0 => "pending, not tried yet".to_string(),
            State::Pending => format!(
                "deferred, {} attempts, next {}{}",
                r.attempts,
                time(r.next_attempt),
                if r.warned { ", sender warned" } else { "" }
            ),
            State::Delivered => "delivered".to_string(),
            State::Failed { .. } if r.expired => "failed (expired), reported".to_string(),
            State::Failed { bounced } => {
                format!(
                    "failed{}",
                    if bounced {
                        ", reported"
                    } else {
                        ", report pending"
                    }
                )
            }
        };
        let last = match (&r.last_error, &r.last_host) {
            (Some(e), Some(h)) => format!(": {e} ({h})"),
            (Some(e), None) => format!(": {e}"),
            _ => String::new(),
        };
        out.push_str(&format!("    <{}>  {state}{last}\n", r.address));
    }
    out
}

/// The message a report returns: all of it (RET=FULL), or its first 64 KiB (for the header).
pub fn read_original(path: &std::path::Path, full: bool) -> Vec<u8> {
    use std::io::Read;
    let mut head = Vec::new();
    if let Ok(file) = std::fs::File::open(path) {
        let limit = if full { u64::MAX } else { 64 * 1024 };
        let _ = file.take(limit).read_to_end(&mut head);
    }
    head
}
