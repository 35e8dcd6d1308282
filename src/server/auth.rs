//! Login throttling shared by every protocol that takes passwords: failures are counted per client
//! address over a sliding window; each failure doubles the delay before the answer, and past a limit
//! every login from that address is refused until the window has passed, even a correct one (otherwise
//! the limit would only slow a guesser down). Also the RFC 2449 LOGIN-DELAY bookkeeping per account.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Shared;
use crate::accounts::{Account, Directory, Secret};

/// How long failures are remembered.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// The growing delay stops growing here.
const MAX_DELAY: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct LoginThrottle {
    /// Client address (IPv6: its /64) → its recent failures.
    failures: Mutex<HashMap<IpAddr, Failures>>,
    /// Account → time of its last successful login.
    last_login: Mutex<HashMap<String, Instant>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// Verifications under way: they count against the limit until they are decided, so that parallel
    /// attempts cannot all slip past it.
    pending: u32,
    last: Instant,
}

/// Whom a limit applies to: the address, or for IPv6 its /64, since one host commonly holds a whole /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

impl LoginThrottle {
    /// Starts a login attempt from `ip`, or refuses it when the address has `max` failures (counting
    /// the attempts still under way) in the window. A started attempt must be [`finish`](Self::finish)ed.
    pub fn begin(&self, ip: IpAddr, now: Instant, max: u32) -> bool {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        // Forget addresses whose failures are older than the window, so the map cannot grow without bound.
        map.retain(|_, f| f.pending > 0 || now.duration_since(f.last) < WINDOW);
        let entry = map.entry(address_key(ip)).or_insert(Failures {
            count: 0,
            pending: 0,
            last: now,
        });
        if entry.count + entry.pending >= max {
            return false;
        }
        entry.pending += 1;
        true
    }

    /// Ends an attempt begun with [`begin`](Self::begin); returns the delay to wait before answering a
    /// failure (it doubles with every failure of the address, up to a cap). The window slides: failures
    /// are forgotten 15 minutes after the last one.
    pub fn finish(&self, ip: IpAddr, now: Instant, success: bool, base: Duration) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(address_key(ip)).or_insert(Failures {
            count: 0,
            pending: 1,
            last: now,
        });
        entry.pending = entry.pending.saturating_sub(1);
        if success {
            return Duration::ZERO;
        }
        entry.count += 1;
        entry.last = now;
        let doublings = entry.count.saturating_sub(1).min(16);
        base.saturating_mul(1 << doublings).min(MAX_DELAY.max(base))
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
        .begin(ip, Instant::now(), settings.auth.max_failures_per_ip)
    {
        tracing::warn!(user = %shown_user, "login refused: too many failures from {ip}");
        return Login::Throttled;
    }
    let Ok(slot) = shared.auth_slots.acquire().await else {
        shared
            .logins
            .finish(ip, Instant::now(), true, Duration::ZERO);
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
    let delay = shared
        .logins
        .finish(ip, Instant::now(), account.is_some(), base);
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
        assert!(t.begin(ip, now, u32::MAX));
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
        assert!(!t.begin(IP, now, 9), "nine failures reach a limit of nine");
        assert!(t.begin(IP, now, 10));
    }

    #[test]
    fn parallel_attempts_count_against_the_limit() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        assert!(t.begin(IP, now, 2) && t.begin(IP, now, 2));
        assert!(
            !t.begin(IP, now, 2),
            "two verifications under way use up a limit of two"
        );
        t.finish(IP, now, true, Duration::ZERO);
        assert!(t.begin(IP, now, 2), "a success frees its place");
    }

    #[test]
    fn the_window_slides_from_the_last_failure() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        let base = Duration::from_millis(1);
        fail(&t, IP, now, base);
        fail(&t, IP, now + WINDOW - Duration::from_secs(60), base);
        assert!(
            !t.begin(IP, now + WINDOW, 2),
            "the second failure is still recent"
        );
        assert!(t.begin(IP, now + WINDOW * 2, 2));
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(t.begin(other, now, 1), "counted per address");
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        fail(&t, a, now, Duration::ZERO);
        assert!(!t.begin(b, now, 1), "same /64");
        assert!(t.begin(c, now, 1), "another /64");
        assert_eq!(address_key("::ffff:192.0.2.1".parse().unwrap()), IP);
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
