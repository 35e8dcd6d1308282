//! Where mail for a domain goes (RFC 5321 §5.1): its MX hosts by preference (hosts of equal
//! preference in random order), the domain itself when it has no MX (the implicit MX), nowhere for a
//! null MX (RFC 7505); then each host's IPv6 and IPv4 addresses. With DANE on, every answer is
//! validated with DNSSEC and each host says whether its name was found securely (RFC 7672 §2.2).

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::rdata::TLSA;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

/// Why there is no host to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// For good: the domain does not exist, or accepts no mail (null MX). Enhanced code, text.
    Permanent(&'static str, String),
    /// DNS did not answer, or answered with a failure: try again later.
    Temporary(String),
}

/// One host to try: its name (for TLS and logs) and where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    /// The MX records that named it (if any) and its addresses were all DNSSEC-signed (RFC 7672
    /// §2.2): only then may its TLSA records be looked up and trusted.
    pub secure: bool,
}

/// A host's TLSA records, as DANE sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tlsa {
    /// None, or not signed: DANE does not apply.
    Absent,
    /// Signed records (possibly none usable: the caller decides).
    Secure(Vec<TLSA>),
}

/// Reads a DNSSEC trust anchor file (DNSKEY records), as `outbound.dnssec_trust_anchor`.
pub fn read_trust_anchor(path: &Path) -> Result<TrustAnchors, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let anchors: TrustAnchors = text
        .parse()
        .map_err(|e| format!("cannot read DNSKEY records from {}: {e}", path.display()))?;
    let has_key = text.lines().any(|line| {
        let line = line.split(';').next().unwrap_or("");
        line.split_whitespace()
            .any(|word| word.eq_ignore_ascii_case("DNSKEY"))
    });
    if !has_key {
        return Err(format!("{} holds no DNSKEY record", path.display()));
    }
    Ok(anchors)
}

/// Whether answers are validated with DNSSEC, and from which trust anchors.
pub enum Dnssec<'a> {
    Off,
    /// The root's built-in keys, or those of the file.
    Validate(Option<&'a Path>),
}

#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
    validating: bool,
}

impl Resolver {
    /// The system's resolver configuration, or `servers` when given.
    pub fn new(servers: &[std::net::SocketAddr], dnssec: Dnssec<'_>) -> Result<Resolver, String> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if servers.is_empty() {
            TokioResolver::builder(provider)
                .map_err(|e| format!("cannot read /etc/resolv.conf: {e}"))?
        } else {
            let name_servers = servers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), name_servers),
                provider,
            )
        };
        // Names are looked up as given, never under a search domain.
        builder.options_mut().ndots = 0;
        let validating = match dnssec {
            Dnssec::Off => false,
            Dnssec::Validate(None) => {
                builder.options_mut().validate = true;
                true
            }
            Dnssec::Validate(Some(path)) => {
                builder = builder.with_trust_anchor(Arc::new(read_trust_anchor(path)?));
                true
            }
        };
        let inner = builder.build().map_err(|e| e.to_string())?;
        Ok(Resolver { inner, validating })
    }

    /// The hosts to try for `domain`, most preferred first. An address literal (`[192.0.2.1]`,
    /// `[IPv6:2001:db8::1]`) is its own single host.
    pub async fn hosts(&self, domain: &str) -> Result<Vec<Host>, NoRoute> {
        if let Some(literal) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
            // The tag is case-insensitive (RFC 5321 §4.1.3), and queued domains are lower-cased.
            let ip = match literal.get(..5) {
                Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => &literal[5..],
                _ => literal,
            };
            let ip = ip.parse::<IpAddr>().map_err(|_| {
                NoRoute::Permanent("5.1.2", format!("bad address literal {domain}"))
            })?;
            return Ok(vec![Host {
                name: ip.to_string(),
                addresses: vec![ip],
                secure: false,
            }]);
        }
        let ascii = idna::domain_to_ascii(domain).map_err(|_| {
            NoRoute::Permanent("5.1.2", format!("{domain} is not a valid domain name"))
        })?;
        let name = fqdn(&ascii)?;
        let (names, mx_secure) = match self.inner.mx_lookup(name.clone()).await {
            Ok(lookup) => {
                let secure = self.all_secure(&name, lookup.answers(), RecordType::MX);
                let mut mx: Vec<(u16, Name)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.clone())),
                        _ => None,
                    })
                    .collect();
                if mx.is_empty() {
                    (vec![name], true)
                } else if mx.len() == 1 && mx[0].1.is_root() {
                    return Err(NoRoute::Permanent(
                        "5.1.10",
                        format!("{domain} accepts no mail (null MX, RFC 7505)"),
                    ));
                } else {
                    order_by_preference(&mut mx, rand_u64());
                    let names = mx
                        .into_iter()
                        .filter(|(_, n)| !n.is_root())
                        .map(|(_, n)| n)
                        .collect();
                    (names, secure)
                }
            }
            Err(e) if negative(&e).is_some_and(|n| n.nx) => {
                return Err(NoRoute::Permanent(
                    "5.1.2",
                    format!("{domain} does not exist (NXDOMAIN)"),
                ));
            }
            // The domain exists without an MX: the implicit MX is the domain itself, secure when
            // the denial of the MX records and its address records are.
            Err(e) if negative(&e).is_some() => {
                (vec![name], negative(&e).is_some_and(|n| n.secure))
            }
            Err(e) => {
                return Err(NoRoute::Temporary(format!(
                    "DNS MX lookup for {domain} failed: {e}"
                )));
            }
        };
        let mut hosts = Vec::new();
        let mut last_error = None;
        for name in names {
            let shown = name.to_ascii().trim_end_matches('.').to_string();
            match self.addresses(&name).await {
                Ok((addresses, secure)) if !addresses.is_empty() => hosts.push(Host {
                    name: shown,
                    addresses,
                    secure: mx_secure && secure,
                }),
                Ok(_) => last_error = Some(format!("{shown} has no address")),
                Err(e) => last_error = Some(e),
            }
        }
        if hosts.is_empty() {
            return Err(NoRoute::Temporary(
                last_error.unwrap_or_else(|| format!("no host for {domain}")),
            ));
        }
        Ok(hosts)
    }

    /// One named host (a smarthost): an IP address as it is, else its AAAA and A records.
    pub async fn host(&self, name: &str) -> Result<Host, NoRoute> {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(Host {
                name: name.to_string(),
                addresses: vec![ip],
                secure: false,
            });
        }
        let ascii = idna::domain_to_ascii(name)
            .map_err(|_| NoRoute::Temporary(format!("{name} is not a valid host name")))?;
        match self.addresses(&fqdn(&ascii)?).await {
            Ok((addresses, secure)) if !addresses.is_empty() => Ok(Host {
                name: name.to_string(),
                addresses,
                secure,
            }),
            Ok(_) => Err(NoRoute::Temporary(format!("{name} has no address"))),
            Err(e) => Err(NoRoute::Temporary(e)),
        }
    }

    /// The TXT records of `name`, each joined from its strings; none when the name or the records do
    /// not exist.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, String> {
        let ascii =
            idna::domain_to_ascii(name).map_err(|_| format!("{name} is not a valid name"))?;
        let name = fqdn(&ascii).map_err(|e| format!("{e:?}"))?;
        match self.inner.txt_lookup(name).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|part| String::from_utf8_lossy(part).into_owned())
                            .collect(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) if negative(&e).is_some() => Ok(Vec::new()),
            Err(e) => Err(format!("TXT lookup failed: {e}")),
        }
    }

    /// The TLSA records of the SMTP service at `host` (`_PORT._tcp.HOST`, RFC 7672 §2.2.3); only
    /// meaningful for a [`Host::secure`] host. A lookup that fails, or whose answer is bogus, is an
    /// error: the host must then not be used (§2.2), as an attacker could have caused it.
    pub async fn tlsa(&self, host: &str, port: u16) -> Result<Tlsa, String> {
        if !self.validating {
            return Ok(Tlsa::Absent);
        }
        let name = Name::from_ascii(format!("_{port}._tcp.{}.", host.trim_end_matches('.')))
            .map_err(|e| format!("{host}: no TLSA name: {e}"))?;
        match self.inner.lookup(name.clone(), RecordType::TLSA).await {
            Ok(lookup) => {
                if !self.all_secure(&name, lookup.answers(), RecordType::TLSA) {
                    return Ok(Tlsa::Absent);
                }
                Ok(Tlsa::Secure(
                    lookup
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::TLSA(tlsa) => Some(tlsa.clone()),
                            _ => None,
                        })
                        .collect(),
                ))
            }
            // Only a signed denial says there are none: the host is secure, so its TLSA records
            // would be signed too, and an unsigned "none" is what an attacker would answer.
            Err(e) if negative(&e).is_some_and(|n| n.secure) => Ok(Tlsa::Absent),
            Err(e) if negative(&e).is_some() => Err(format!(
                "TLSA lookup for {host}: a denial not proven by DNSSEC"
            )),
            Err(e) => Err(format!("TLSA lookup for {host} failed: {e}")),
        }
    }

    /// Whether there are records of `kind` for `name` among `answers` and every answer (a CNAME
    /// leading to them included) is DNSSEC-signed; never when not validating. An unsigned CNAME to
    /// a signed zone of an attacker's must not pass, nor records of another name whose CNAME the
    /// resolver's cache left out (it answers an alias with the target's cached records alone).
    fn all_secure(&self, name: &Name, answers: &[Record], kind: RecordType) -> bool {
        let aliased = answers.iter().any(|r| r.record_type() == RecordType::CNAME);
        self.validating
            && answers.iter().any(|r| r.record_type() == kind)
            && answers.iter().all(|r| match r.record_type() {
                RecordType::RRSIG => true,
                t if t == kind && !aliased && r.name != *name => false,
                _ => r.proof == Proof::Secure,
            })
    }

    /// AAAA then A records of `name`, and whether all of them were signed.
    async fn addresses(&self, name: &Name) -> Result<(Vec<IpAddr>, bool), String> {
        let mut addresses = Vec::new();
        let mut errors = Vec::new();
        let mut secure = true;
        for kind in [RecordType::AAAA, RecordType::A] {
            match self.inner.lookup(name.clone(), kind).await {
                Ok(lookup) => {
                    secure &= self.all_secure(name, lookup.answers(), kind);
                    addresses.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        _ => None,
                    }));
                }
                Err(e) if negative(&e).is_some() => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        if addresses.is_empty() && !errors.is_empty() {
            return Err(format!(
                "address lookup for {name} failed: {}",
                errors.join("; ")
            ));
        }
        Ok((addresses, secure && self.validating))
    }
}

/// A negative answer (never a bogus one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Negative {
    /// NXDOMAIN: the name does not exist (else it has no records of the type asked).
    nx: bool,
    /// Proven by signed NSEC or NSEC3 records. An unsigned denial can be forged by anyone on the
    /// path (hickory accepts one whose unsigned SOA belongs to any provably unsigned zone).
    secure: bool,
}

/// The negative answer a lookup error stands for, if it is one.
fn negative(e: &NetError) -> Option<Negative> {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(no)) => Some(Negative {
            nx: no.response_code == ResponseCode::NXDomain,
            secure: no.authorities.as_deref().is_some_and(|records| {
                records.iter().any(|r| {
                    matches!(r.record_type(), RecordType::NSEC | RecordType::NSEC3)
                        && r.proof == Proof::Secure
                })
            }),
        }),
        NetError::Dns(DnsError::Nsec {
            response, proof, ..
        }) if *proof != Proof::Bogus => Some(Negative {
            nx: response.metadata.response_code == ResponseCode::NXDomain,
            secure: false,
        }),
        _ => None,
    }
}

fn fqdn(ascii: &str) -> Result<Name, NoRoute> {
    Name::from_ascii(format!("{}.", ascii.trim_end_matches('.'))).map_err(|e| {
        NoRoute::Permanent("5.1.2", format!("{ascii} is not a valid domain name: {e}"))
    })
}

/// Lowest preference first; hosts of equal preference shuffled (RFC 5321 §5.1), by `seed`.
fn order_by_preference<T>(hosts: &mut [(u16, T)], mut seed: u64) {
    hosts.sort_by_key(|(preference, _)| *preference);
    let mut start = 0;
    while start < hosts.len() {
        let end = start
            + hosts[start..]
                .iter()
                .take_while(|(p, _)| *p == hosts[start].0)
                .count();
        for i in (start + 1..end).rev() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let j = start + (seed >> 33) as usize % (i - start + 1);
            hosts.swap(i, j);
        }
        start = end;
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(1);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preference_orders_and_ties_are_shuffled_within_their_level() {
        let mut seen_first = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let mut hosts = vec![(20, "c"), (10, "a"), (10, "b"), (30, "d")];
            order_by_preference(&mut hosts, seed);
            let prefs: Vec<u16> = hosts.iter().map(|h| h.0).collect();
            assert_eq!(prefs, vec![10, 10, 20, 30]);
            assert_eq!(hosts[2].1, "c");
            seen_first.insert(hosts[0].1);
        }
        assert_eq!(
            seen_first.len(),
            2,
            "both hosts of preference 10 come first sometimes"
        );
    }

    #[tokio::test]
    async fn address_literals_are_their_own_host() {
        let resolver = Resolver::new(&["127.0.0.1:9".parse().unwrap()], Dnssec::Off).unwrap();
        for queued in ["[IPv6:::1]", "[ipv6:::1]"] {
            let hosts = resolver.hosts(queued).await.unwrap();
            assert_eq!(hosts[0].addresses, vec!["::1".parse::<IpAddr>().unwrap()]);
        }
        let hosts = resolver.hosts("[192.0.2.7]").await.unwrap();
        assert_eq!(
            hosts[0].addresses,
            vec!["192.0.2.7".parse::<IpAddr>().unwrap()]
        );
        assert!(matches!(
            resolver.hosts("[nonsense]").await,
            Err(NoRoute::Permanent(..))
        ));
    }
}
