//! Login throttling shared by every protocol that takes passwords: failures are counted per client
//! address over a sliding window; each failure doubles the delay before the answer, and past a limit
//! every login from that address is refused until the window has passed, even a correct one (otherwise
//! the limit would only slow a guesser down). Also the RFC 2449 LOGIN-DELAY bookkeeping per account.
//!
//! Only failures count. Attempts still being verified are bounded separately: when the failures plus
//! the attempts in flight reach the limit, a new attempt waits until one of them is decided, then looks
//! again. So guessers in parallel cannot pass the limit (the eleventh guess against a limit of ten waits
//! for the first ten, and is refused once they have failed), while parallel logins with the right
//! password (a mail client opening several connections at once) all get through.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::Shared;
use crate::accounts::{Account, Directory, Secret};

/// How long failures are remembered.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// The growing delay stops growing here.
const MAX_DELAY: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct LoginThrottle {
    /// Client address (IPv6: its /64) → its recent failures. A std Mutex: it is never held across an
    /// await, and every critical section is a map lookup.
    failures: Mutex<HashMap<IpAddr, Failures>>,
    /// Notified whenever an attempt is decided, so that waiting attempts look again. One for all
    /// addresses: a wake-up costs a map lookup, and waiters are bounded by the connection limits.
    decided: Notify,
    /// Account → time of its last successful login.
    last_login: Mutex<HashMap<String, Instant>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// Verifications under way. They are not failures, but new attempts wait while failures plus
    /// these reach the limit, so that parallel attempts cannot all slip past it.
    pending: u32,
    last: Instant,
}

/// What [`LoginThrottle::try_begin`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// The attempt may verify; it must be [`finish`](LoginThrottle::finish)ed.
    Started,
    /// Attempts in flight could still reach the limit: wait for one to be decided, then try again.
    Wait,
    /// The address has reached the limit of failures in the window.
    Refused,
}

/// Whom a limit applies to: the address, or for IPv6 its /64, since one host commonly holds a whole /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

impl LoginThrottle {
    /// Decides whether a login attempt from `ip` may start now, given `max` failures allowed in the
    /// window: refused once the address has `max` failures, told to wait while its failures and the
    /// attempts under way together reach `max`.
    pub fn try_begin(&self, ip: IpAddr, now: Instant, max: u32) -> Begin {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        // Forget addresses whose failures are older than the window, so the map cannot grow without bound.
        map.retain(|_, f| f.pending > 0 || now.duration_since(f.last) < WINDOW);
        let entry = map.entry(address_key(ip)).or_insert(Failures {
            count: 0,
            pending: 0,
            last: now,
        });
        if entry.count >= max {
            return Begin::Refused;
        }
        if entry.count.saturating_add(entry.pending) >= max {
            return Begin::Wait;
        }
        entry.pending += 1;
        Begin::Started
    }

    /// [`try_begin`](Self::try_begin), waiting as long as it says so. `true`: the attempt started.
    pub async fn begin(&self, ip: IpAddr, max: u32) -> bool {
        loop {
            // Registered before the look, so that a decision between the look and the wait is not missed.
            let decided = self.decided.notified();
            match self.try_begin(ip, Instant::now(), max) {
                Begin::Started => return true,
                Begin::Refused => return false,
                Begin::Wait => decided.await,
            }
        }
    }

    /// Ends an attempt that [`try_begin`](Self::try_begin) started; returns the delay to wait before
    /// answering a failure (it doubles with every failure of the address, up to a cap). The window
    /// slides: failures are forgotten 15 minutes after the last one.
    pub fn finish(&self, ip: IpAddr, now: Instant, success: bool, base: Duration) -> Duration {
        let delay = {
            let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let entry = map.entry(address_key(ip)).or_insert(Failures {
                count: 0,
                pending: 1,
                last: now,
            });
            entry.pending = entry.pending.saturating_sub(1);
            if success {
                Duration::ZERO
            } else {
                entry.count = entry.count.saturating_add(1);
                entry.last = now;
                let doublings = entry.count.saturating_sub(1).min(16);
                base.saturating_mul(1 << doublings).min(MAX_DELAY.max(base))
            }
        };
        self.decided.notify_waiters();
        delay
    }

    /// RFC 2449 LOGIN-DELAY: whether `account` may log in now (then its clock restarts).
    pub fn login_allowed(&self, account: &str, now: Instant, delay: Duration) -> bool {
        let mut map = self.last_login.lock().unwrap_or_else(|e| e.into_inner());
        if delay.is_zero() {
            return true;
        }
        map.retain(|_, at| now.duration_since(*at) < delay);
        if map.contains_key(account) {
            return false;
        }
        map.insert(account.to_string(), now);
        true
    }
}

/// An attempt in flight. Dropped before [`finish`](InFlight::finish) (the session went away during the
/// verification), it gives its place back without counting a failure, so that it cannot keep the
/// address waiting for ever.
struct InFlight<'a> {
    throttle: &'a LoginThrottle,
    ip: IpAddr,
    done: bool,
}

impl InFlight<'_> {
    fn finish(mut self, success: bool, base: Duration) -> Duration {
        self.done = true;
        self.throttle.finish(self.ip, Instant::now(), success, base)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.throttle
                .finish(self.ip, Instant::now(), true, Duration::ZERO);
        }
    }
}

/// The outcome of a login attempt, for any protocol.
pub enum Login {
    Accepted(Arc<Account>),
    Rejected,
    Throttled,
}

/// Checks credentials with everything around it: the per-address lock-out, at most one verification
/// per core, the doubling delay after a failure (counted from the start of the verification, so that a
/// failure takes the same time whoever the user is), and a log line that names the user, never the secret.
pub async fn check(
    shared: &Arc<Shared>,
    ip: IpAddr,
    user: &str,
    verify: impl FnOnce(&Directory) -> Option<Arc<Account>> + Send + 'static,
) -> Login {
    let settings = shared.settings();
    let shown_user = user.escape_debug().to_string();
    if !shared
        .logins
        .begin(ip, settings.auth.max_failures_per_ip)
        .await
    {
        tracing::warn!(user = %shown_user, "login refused: too many failures from {ip}");
        return Login::Throttled;
    }
    let attempt = InFlight {
        throttle: &shared.logins,
        ip,
        done: false,
    };
    let Ok(slot) = shared.auth_slots.acquire().await else {
        return Login::Rejected;
    };
    let verifier = settings.clone();
    // The delay of a failure runs from here, so the answer comes after the same time whatever the
    // verification cost: unknown users, argon2 accounts with other parameters, bcrypt and SHA-512-crypt
    // accounts all look alike as long as verifying takes less than the delay.
    let started = tokio::time::Instant::now();
    let account = tokio::task::spawn_blocking(move || verify(&verifier.directory))
        .await
        .ok()
        .flatten();
    drop(slot);
    let base = Duration::from_millis(settings.auth.failure_delay_ms);
    let delay = attempt.finish(account.is_some(), base);
    match account {
        Some(account) => Login::Accepted(account),
        None => {
            tracing::warn!(user = %shown_user, "login failed for {shown_user}");
            // `sleep` rather than `sleep_until(started + delay)`: it cannot overflow the clock.
            tokio::time::sleep(delay.saturating_sub(started.elapsed())).await;
            Login::Rejected
        }
    }
}

/// [`check`] with a password.
pub async fn check_password(
    shared: &Arc<Shared>,
    ip: IpAddr,
    user: &str,
    password: Secret,
) -> Login {
    let owned = user.to_string();
    check(shared, ip, user, move |d| {
        d.verify(&owned, password.0.as_bytes())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn fail(t: &LoginThrottle, ip: IpAddr, now: Instant, base: Duration) -> Duration {
        assert_eq!(t.try_begin(ip, now, u32::MAX), Begin::Started);
        t.finish(ip, now, false, base)
    }

    #[test]
    fn delay_doubles_per_failure_up_to_a_cap() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        let base = Duration::from_millis(500);
        let delays: Vec<u64> = (0..9)
            .map(|_| fail(&t, IP, now, base).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(
            t.try_begin(IP, now, 9),
            Begin::Refused,
            "nine failures reach a limit of nine"
        );
        assert_eq!(t.try_begin(IP, now, 10), Begin::Started);
    }

    #[test]
    fn attempts_in_flight_wait_instead_of_being_refused() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        assert_eq!(t.try_begin(IP, now, 2), Begin::Started);
        assert_eq!(t.try_begin(IP, now, 2), Begin::Started);
        assert_eq!(
            t.try_begin(IP, now, 2),
            Begin::Wait,
            "two verifications under way could still use up a limit of two"
        );
        t.finish(IP, now, true, Duration::ZERO);
        assert_eq!(
            t.try_begin(IP, now, 2),
            Begin::Started,
            "a success frees its place"
        );
    }

    #[test]
    fn successes_never_count_as_failures() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for _ in 0..50 {
            assert_eq!(t.try_begin(IP, now, 1), Begin::Started);
            t.finish(IP, now, true, Duration::ZERO);
        }
        assert_eq!(t.try_begin(IP, now, 1), Begin::Started);
    }

    #[test]
    fn a_waiting_guess_is_refused_once_the_ones_in_flight_fail() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(t.try_begin(IP, now, 10), Begin::Started);
        }
        assert_eq!(t.try_begin(IP, now, 10), Begin::Wait);
        for i in 0..10 {
            t.finish(IP, now, false, Duration::ZERO);
            let expected = if i < 9 { Begin::Wait } else { Begin::Refused };
            assert_eq!(
                t.try_begin(IP, now, 10),
                expected,
                "after {} failures",
                i + 1
            );
        }
    }

    #[test]
    fn the_window_slides_from_the_last_failure() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        let base = Duration::from_millis(1);
        fail(&t, IP, now, base);
        fail(&t, IP, now + WINDOW - Duration::from_secs(60), base);
        assert_eq!(
            t.try_begin(IP, now + WINDOW, 2),
            Begin::Refused,
            "the second failure is still recent"
        );
        assert_eq!(t.try_begin(IP, now + WINDOW * 2, 2), Begin::Started);
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(
            t.try_begin(other, now, 1),
            Begin::Started,
            "counted per address"
        );
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        fail(&t, a, now, Duration::ZERO);
        assert_eq!(t.try_begin(b, now, 1), Begin::Refused, "same /64");
        assert_eq!(t.try_begin(c, now, 1), Begin::Started, "another /64");
        assert_eq!(address_key("::ffff:192.0.2.1".parse().unwrap()), IP);
    }

    #[test]
    fn an_abandoned_attempt_gives_its_place_back() {
        let t = LoginThrottle::default();
        assert!(matches!(t.try_begin(IP, Instant::now(), 1), Begin::Started));
        drop(InFlight {
            throttle: &t,
            ip: IP,
            done: false,
        });
        assert_eq!(t.try_begin(IP, Instant::now(), 1), Begin::Started);
    }

    /// The report: sixteen clients of one address logging in at once with the right password, against
    /// the default limit of ten, all get in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sixteen_parallel_correct_logins_all_succeed() {
        let t = Arc::new(LoginThrottle::default());
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let t = t.clone();
                tokio::spawn(async move {
                    if !t.begin(IP, 10).await {
                        return false;
                    }
                    // A verification that takes a while, so that all sixteen overlap.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    t.finish(IP, Instant::now(), true, Duration::ZERO);
                    true
                })
            })
            .collect();
        for task in tasks {
            assert!(task.await.unwrap(), "a correct login was throttled");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_eleventh_parallel_guess_waits_then_is_refused() {
        let t = Arc::new(LoginThrottle::default());
        for _ in 0..10 {
            assert!(t.begin(IP, 10).await);
        }
        let eleventh = tokio::spawn({
            let t = t.clone();
            async move { t.begin(IP, 10).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!eleventh.is_finished(), "it waits for the ten in flight");
        for _ in 0..10 {
            t.finish(IP, Instant::now(), false, Duration::ZERO);
        }
        let started = tokio::time::timeout(Duration::from_secs(5), eleventh)
            .await
            .expect("decided once the ten have failed")
            .unwrap();
        assert!(
            !started,
            "ten failures reach the limit: the eleventh guess is refused"
        );
    }

    #[test]
    fn login_delay_per_account() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        let delay = Duration::from_secs(60);
        assert!(t.login_allowed("a@x", now, delay));
        assert!(!t.login_allowed("a@x", now + Duration::from_secs(59), delay));
        assert!(t.login_allowed("b@x", now, delay));
        assert!(t.login_allowed("a@x", now + delay, delay));
        assert!(t.login_allowed("a@x", now, Duration::ZERO));
    }
}
