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
    /// Address → (failures in the window, when the window started).
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    /// Account → time of its last successful login.
    last_login: Mutex<HashMap<String, Instant>>,
}

impl LoginThrottle {
    /// Failures from `ip` in the current window.
    pub fn failures(&self, ip: IpAddr, now: Instant) -> u32 {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&ip) {
            Some(&(n, since)) if now.duration_since(since) < WINDOW => n,
            Some(_) => {
                map.remove(&ip);
                0
            }
            None => 0,
        }
    }

    /// Records a failure; returns the delay to wait before answering it.
    pub fn failed(&self, ip: IpAddr, now: Instant, base: Duration) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        // Forget addresses whose window is over, so the map cannot grow without bound.
        map.retain(|_, (_, since)| now.duration_since(*since) < WINDOW);
        let entry = map.entry(ip).or_insert((0, now));
        entry.0 += 1;
        let doublings = entry.0.saturating_sub(1).min(16);
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
/// per core, the same cost for unknown users (the verifier's job), the doubling delay after a failure,
/// and a log line that names the user and never the secret.
pub async fn check(
    shared: &Arc<Shared>,
    ip: IpAddr,
    user: &str,
    verify: impl FnOnce(&Directory) -> Option<Arc<Account>> + Send + 'static,
) -> Login {
    let settings = shared.settings();
    let shown_user = user.escape_debug().to_string();
    if shared.logins.failures(ip, Instant::now()) >= settings.auth.max_failures_per_ip {
        tracing::warn!(user = %shown_user, "login refused: too many failures from {ip}");
        return Login::Throttled;
    }
    let Ok(slot) = shared.auth_slots.acquire().await else {
        return Login::Rejected;
    };
    let verifier = settings.clone();
    let account = tokio::task::spawn_blocking(move || verify(&verifier.directory))
        .await
        .ok()
        .flatten();
    drop(slot);
    match account {
        Some(account) => Login::Accepted(account),
        None => {
            let base = Duration::from_millis(settings.auth.failure_delay_ms);
            let delay = shared.logins.failed(ip, Instant::now(), base);
            tracing::warn!(user = %shown_user, "login failed for {shown_user}");
            tokio::time::sleep(delay).await;
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

    #[test]
    fn delay_doubles_per_failure_up_to_a_cap() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        let base = Duration::from_millis(500);
        let delays: Vec<u64> = (0..9)
            .map(|_| t.failed(IP, now, base).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(t.failures(IP, now), 9);
    }

    #[test]
    fn failures_are_forgotten_after_the_window() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        t.failed(IP, now, Duration::from_millis(1));
        assert_eq!(t.failures(IP, now + WINDOW - Duration::from_secs(1)), 1);
        assert_eq!(t.failures(IP, now + WINDOW), 0);
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(t.failures(other, now), 0, "counted per address");
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
