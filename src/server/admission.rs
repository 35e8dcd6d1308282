//! Admission, decided in the accept loop before any work (no TLS handshake, no task): a connection is
//! served, refused with a short temporary error, or closed at once.
//!
//! - Served while fewer than `limits.max_connections` are served in total and fewer than
//!   `limits.max_connections_per_ip` from its address (IPv6: its /64).
//! - Refused (`421` / `-ERR [SYS/TEMP]`, written with a short deadline) while fewer than
//!   [`refusal_allowance`] refusals are under way, so a client over a limit learns why.
//! - Closed without a word beyond that: the number of open client sockets can never exceed
//!   `max_connections + refusal_allowance`, so a flood cannot exhaust file descriptors.
//! - On an implicit-TLS listener (465, 995), served only while fewer than [`handshake_allowance`]
//!   handshakes are under way, closed otherwise: connections that never finish their handshake from
//!   many addresses cannot take the slots port 25's plaintext clients need.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::config::Limits;

/// Refusals in progress at most: enough for honest clients over a limit to hear it, small enough
/// that a flood costs next to nothing.
pub fn refusal_allowance(limits: &Limits) -> usize {
    (limits.max_connections / 8).clamp(8, 64)
}

/// Refusals under way for one address at most: one flooding address cannot take every refusal slot.
pub const REFUSALS_PER_ADDRESS: usize = 2;

/// Implicit-TLS handshakes under way at most: a quarter of `max_connections` (at least one).
pub fn handshake_allowance(limits: &Limits) -> usize {
    (limits.max_connections / 4).max(1)
}

/// Client sockets open at most, served and refused together.
pub fn socket_cap(limits: &Limits) -> usize {
    limits.max_connections + refusal_allowance(limits)
}

#[derive(Default)]
pub struct Admission {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    served: usize,
    refusing: usize,
    /// Served connections per address key.
    per_ip: HashMap<IpAddr, usize>,
    /// Refusals under way per address key.
    refusing_per_ip: HashMap<IpAddr, usize>,
    /// Implicit-TLS handshakes under way (each also counted in `served`).
    handshaking: usize,
}

/// An implicit-TLS handshake under way; its place is counted until it is dropped (handshake done or
/// failed).
pub struct Handshake {
    admission: Arc<Admission>,
}

/// What to do with an accepted socket. A ticket keeps its place counted until it is dropped.
pub enum Verdict {
    Serve(Ticket),
    Refuse(Ticket),
    Close,
}

pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
    served: bool,
}

impl Admission {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides for a connection from `ip` (already reduced with [`super::auth::address_key`]).
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Verdict {
        let mut c = self.counts();
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.served < limits.max_connections && from_ip < limits.max_connections_per_ip {
            c.served += 1;
            *c.per_ip.entry(ip).or_insert(0) += 1;
            return Verdict::Serve(Ticket {
                admission: self.clone(),
                ip,
                served: true,
            });
        }
        let refusing_here = c.refusing_per_ip.get(&ip).copied().unwrap_or(0);
        if c.refusing < refusal_allowance(limits) && refusing_here < REFUSALS_PER_ADDRESS {
            c.refusing += 1;
            *c.refusing_per_ip.entry(ip).or_insert(0) += 1;
            tracing::warn!(
                served = c.served,
                from_ip,
                "connection limit reached, refusing {ip}"
            );
            return Verdict::Refuse(Ticket {
                admission: self.clone(),
                ip,
                served: false,
            });
        }
        Verdict::Close
    }

    /// Takes a handshake place for a served implicit-TLS connection, if one is free.
    pub fn start_handshake(self: &Arc<Self>, limits: &Limits) -> Option<Handshake> {
        let mut c = self.counts();
        if c.handshaking >= handshake_allowance(limits) {
            return None;
        }
        c.handshaking += 1;
        Some(Handshake {
            admission: self.clone(),
        })
    }

    /// Connections being served.
    pub fn served(&self) -> usize {
        self.counts().served
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.admission.counts();
        let map = if self.served {
            c.served -= 1;
            &mut c.per_ip
        } else {
            c.refusing -= 1;
            &mut c.refusing_per_ip
        };
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut c = self.admission.counts();
        c.handshaking -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_ip: usize) -> Limits {
        Limits {
            max_connections: total,
            max_connections_per_ip: per_ip,
            ..Limits::default()
        }
    }

    #[test]
    fn per_address_limit_refuses_then_closes_past_the_allowance() {
        let a = Arc::new(Admission::default());
        let l = limits(100, 2);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let served: Vec<_> = (0..2).map(|_| a.admit(ip, &l)).collect();
        assert!(served.iter().all(|v| matches!(v, Verdict::Serve(_))));
        let refused: Vec<_> = (0..REFUSALS_PER_ADDRESS).map(|_| a.admit(ip, &l)).collect();
        assert!(refused.iter().all(|v| matches!(v, Verdict::Refuse(_))));
        assert!(
            matches!(a.admit(ip, &l), Verdict::Close),
            "one address takes at most {REFUSALS_PER_ADDRESS} refusal slots"
        );
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert!(
            matches!(a.admit(other, &l), Verdict::Serve(_)),
            "another address is still served while one is flooding"
        );
        drop(refused);
        assert!(matches!(a.admit(ip, &l), Verdict::Refuse(_)));
        drop(served);
        assert!(matches!(a.admit(ip, &l), Verdict::Serve(_)));
    }

    #[test]
    fn one_flooding_address_leaves_refusal_slots_for_others() {
        let a = Arc::new(Admission::default());
        let l = limits(1, 1);
        let flood: IpAddr = "192.0.2.66".parse().unwrap();
        let _served = a.admit(flood, &l);
        let _held: Vec<_> = (0..100).map(|_| a.admit(flood, &l)).collect();
        let other: IpAddr = "192.0.2.9".parse().unwrap();
        assert!(
            matches!(a.admit(other, &l), Verdict::Refuse(_)),
            "another client over the limit still hears why"
        );
    }

    #[test]
    fn sockets_never_exceed_the_cap() {
        let a = Arc::new(Admission::default());
        let l = limits(10, 1000);
        // Every address its own: the total cap is what binds.
        let tickets: Vec<_> = (0..1000u32)
            .map(|i| a.admit(IpAddr::from(i.to_be_bytes()), &l))
            .filter(|v| !matches!(v, Verdict::Close))
            .collect();
        assert_eq!(tickets.len(), socket_cap(&l));
        assert_eq!(a.served(), 10);
        drop(tickets);
        assert_eq!(a.served(), 0);
        assert!(a.counts.lock().unwrap().per_ip.is_empty());
    }

    #[test]
    fn unfinished_tls_handshakes_take_at_most_a_quarter_of_the_slots() {
        let a = Arc::new(Admission::default());
        let l = limits(100, 1000);
        let held: Vec<_> = (0..100).filter_map(|_| a.start_handshake(&l)).collect();
        assert_eq!(held.len(), handshake_allowance(&l));
        assert_eq!(held.len(), 25);
        assert!(a.start_handshake(&l).is_none());
        drop(held.into_iter().next());
        assert!(
            a.start_handshake(&l).is_some(),
            "a finished handshake frees its place"
        );
    }
}
