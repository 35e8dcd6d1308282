//! `[outbound]`: delivery of mail for other domains (the queue, DNS, transport security, DKIM), raw
//! and validated.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{ConfigError, SecretFiles};
use crate::accounts;
use crate::dkim::DkimKey;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// Deliver what authenticated users send to other domains. Off: such recipients get
    /// `550 5.7.1` and nothing leaves the server.
    pub enable: bool,
    /// DNS servers to ask (`"address"` or `"address:port"`); empty (the default): those of
    /// /etc/resolv.conf.
    pub dns_servers: Vec<String>,
    /// The port receiving servers listen on: 25. Another value only makes sense on a test network.
    pub port: u16,
    /// Transport security towards every domain: `"opportunistic"` (STARTTLS whenever offered, any
    /// certificate; plain text when not offered), `"required"` (STARTTLS or no delivery, any
    /// certificate) or `"verified"` (STARTTLS with a certificate valid for the MX host name).
    pub tls: TlsPolicy,
    /// Per-domain overrides of `tls`, e.g. `{ "bank.example" = "verified" }`.
    pub tls_domains: BTreeMap<String, TlsPolicy>,
    /// More certificate authorities (PEM) trusted for `verified` (and MTA-STS), besides the system's.
    pub tls_trust_file: Option<PathBuf>,
    /// Honour the MTA-STS policies domains publish (RFC 8461): in `enforce` mode, mail goes only to
    /// the MX hosts the policy lists, over TLS verified for their names.
    pub mta_sts: bool,
    /// The HTTPS port policies are fetched from: 443. Another value only makes sense on a test network.
    pub mta_sts_port: u16,
    /// Authenticate MX hosts with DANE (RFC 7672). rustmail then validates every DNS answer with
    /// DNSSEC itself (from the root's trust anchors); where a domain's MX records, the host's address
    /// and its `_25._tcp` TLSA records are all signed, mail goes to that host only over TLS with a
    /// certificate the TLSA records match. A bogus (badly signed) answer defers delivery. Off by
    /// default: it needs DNS servers that pass DNSSEC records on (most do; some home routers do not).
    pub dane: bool,
    /// DNSKEY records (zone-file lines) to trust instead of the root's built-in keys, for a private
    /// DNS root or a test network. Only read with `dane = true`.
    pub dnssec_trust_anchor: Option<PathBuf>,
    /// Waits between attempts for a recipient that got a temporary failure: the n-th retry waits the
    /// n-th value, the last one repeats.
    pub retry_intervals_secs: Vec<u64>,
    /// A message still undelivered this long after it was queued bounces (default 5 days).
    pub max_queue_secs: u64,
    /// A message still undelivered this long after it was queued gets one delay warning to its sender
    /// (RFC 3464 `Action: delayed`; default 4 hours), unless the sender's NOTIFY left DELAY out; 0:
    /// never.
    pub delay_warning_secs: u64,
    /// Connecting to a receiving server, and each of its replies, must take at most this long.
    pub connect_timeout_secs: u64,
    pub command_timeout_secs: u64,
    /// Connections delivering at once, over all destinations.
    pub max_connections: usize,
    /// Connections to one domain at once.
    pub max_connections_per_domain: usize,
    /// Send everything through this relay instead of to each domain's MX (for networks where port 25
    /// is blocked). TLS is always required and verified towards it.
    pub smarthost: Option<SmarthostConfig>,
    /// DKIM signing keys: every outgoing message whose `From:` domain (or envelope sender's domain) has
    /// keys here is signed with each of them.
    pub dkim: Vec<DkimConfig>,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            enable: true,
            dns_servers: Vec::new(),
            port: 25,
            tls: TlsPolicy::Opportunistic,
            tls_domains: BTreeMap::new(),
            tls_trust_file: None,
            mta_sts: true,
            mta_sts_port: 443,
            dane: false,
            dnssec_trust_anchor: None,
            retry_intervals_secs: vec![60, 300, 900, 1800, 3600, 7200, 14400],
            max_queue_secs: 5 * 24 * 3600,
            delay_warning_secs: 4 * 3600,
            connect_timeout_secs: 30,
            command_timeout_secs: 300,
            max_connections: 32,
            max_connections_per_domain: 2,
            smarthost: None,
            dkim: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmarthostConfig {
    pub host: String,
    /// 587 (STARTTLS) by default; 465 with `tls = "implicit"`.
    #[serde(default = "default_smarthost_port")]
    pub port: u16,
    /// `"starttls"` or `"implicit"` (TLS from the first octet, RFC 8314).
    #[serde(default = "default_smarthost_tls")]
    pub tls: SmarthostTls,
    /// Log in with AUTH PLAIN (or LOGIN) as this user, with the password in `password_file`.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

fn default_smarthost_port() -> u16 {
    587
}

fn default_smarthost_tls() -> SmarthostTls {
    SmarthostTls::Starttls
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmarthostTls {
    Starttls,
    Implicit,
}

/// The relay, validated; the password read from its file.
#[derive(Clone)]
pub struct Smarthost {
    pub host: String,
    pub port: u16,
    pub implicit_tls: bool,
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for Smarthost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smarthost")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("implicit_tls", &self.implicit_tls)
            .field("username", &self.credentials.as_ref().map(|c| &c.0))
            .finish()
    }
}

impl Smarthost {
    fn from_config(c: &SmarthostConfig, secrets: SecretFiles) -> Result<Smarthost, ConfigError> {
        let host_ok =
            c.host.parse::<std::net::IpAddr>().is_ok() || accounts::is_valid_domain(&c.host);
        if !host_ok {
            return Err(ConfigError::invalid(
                "outbound.smarthost.host",
                format!("{:?} is not a host name or IP address", c.host),
            ));
        }
        if c.port == 0 {
            return Err(ConfigError::invalid(
                "outbound.smarthost.port",
                "must not be 0",
            ));
        }
        let credentials = match (&c.username, &c.password_file) {
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "outbound.smarthost.password_file",
                    "username and password_file go together",
                ));
            }
            (Some(user), Some(path)) if secrets == SecretFiles::Skip => {
                if !path.is_absolute() {
                    return Err(ConfigError::invalid(
                        "outbound.smarthost.password_file",
                        format!("{} is not an absolute path", path.display()),
                    ));
                }
                Some((user.clone(), String::new()))
            }
            (Some(user), Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::invalid(
                        "outbound.smarthost.password_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let password = text.lines().next().unwrap_or("").to_string();
                if password.is_empty() {
                    return Err(ConfigError::invalid(
                        "outbound.smarthost.password_file",
                        format!("{} holds no password on its first line", path.display()),
                    ));
                }
                Some((user.clone(), password))
            }
        };
        Ok(Smarthost {
            host: c.host.clone(),
            port: c.port,
            implicit_tls: c.tls == SmarthostTls::Implicit,
            credentials,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    Opportunistic,
    Required,
    Verified,
}

impl TlsPolicy {
    pub fn name(self) -> &'static str {
        match self {
            TlsPolicy::Opportunistic => "opportunistic",
            TlsPolicy::Required => "required",
            TlsPolicy::Verified => "verified",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    pub domain: String,
    pub selector: String,
    /// PEM private key (`rustmail dkim-keygen` writes one), e.g. a systemd credential.
    pub key_file: PathBuf,
}

/// `[outbound]`, validated.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub enable: bool,
    /// Empty: the system's resolver configuration.
    pub dns_servers: Vec<SocketAddr>,
    pub port: u16,
    pub tls: TlsPolicy,
    pub tls_domains: BTreeMap<String, TlsPolicy>,
    pub tls_trust_file: Option<PathBuf>,
    pub mta_sts: bool,
    pub mta_sts_port: u16,
    pub dane: bool,
    pub dnssec_trust_anchor: Option<PathBuf>,
    pub retry_intervals_secs: Vec<u64>,
    pub max_queue_secs: u64,
    pub delay_warning_secs: u64,
    pub connect_timeout_secs: u64,
    pub command_timeout_secs: u64,
    pub max_connections: usize,
    pub max_connections_per_domain: usize,
    pub smarthost: Option<Smarthost>,
    /// Absent when the key files were not read ([`SecretFiles::Skip`]).
    pub dkim: Vec<DkimKey>,
}

impl Outbound {
    /// The policy for one destination domain.
    pub fn tls_for(&self, domain: &str) -> TlsPolicy {
        self.tls_domains.get(domain).copied().unwrap_or(self.tls)
    }

    /// The keys signing mail from `domain`.
    pub fn dkim_for<'a>(&'a self, domain: &str) -> impl Iterator<Item = &'a DkimKey> + 'a {
        let domain = domain.to_string();
        self.dkim
            .iter()
            .filter(move |k| k.domain.eq_ignore_ascii_case(&domain))
    }

    /// The wait before retry number `attempts` (1 for the first retry).
    pub fn retry_interval(&self, attempts: u32) -> u64 {
        let i = (attempts.max(1) as usize - 1).min(self.retry_intervals_secs.len() - 1);
        self.retry_intervals_secs[i]
    }

    pub fn from_config(
        config: &OutboundConfig,
        secrets: SecretFiles,
    ) -> Result<Arc<Outbound>, ConfigError> {
        let mut dns_servers = Vec::new();
        for (i, server) in config.dns_servers.iter().enumerate() {
            let addr = server
                .parse::<SocketAddr>()
                .or_else(|_| {
                    server
                        .parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .map_err(|_| {
                    ConfigError::invalid(
                        format!("outbound.dns_servers[{i}]"),
                        format!("{server:?} is not an IP address, or address:port"),
                    )
                })?;
            dns_servers.push(addr);
        }
        for (key, port) in [
            ("outbound.port", config.port),
            ("outbound.mta_sts_port", config.mta_sts_port),
        ] {
            if port == 0 {
                return Err(ConfigError::invalid(key, "must not be 0"));
            }
        }
        let mut tls_domains = BTreeMap::new();
        for (domain, policy) in &config.tls_domains {
            let normal = accounts::normalize_domain(domain).ok_or_else(|| {
                ConfigError::invalid(
                    format!("outbound.tls_domains.{domain}"),
                    "not a valid domain name",
                )
            })?;
            tls_domains.insert(normal, *policy);
        }
        if config.retry_intervals_secs.is_empty() || config.retry_intervals_secs.contains(&0) {
            return Err(ConfigError::invalid(
                "outbound.retry_intervals_secs",
                "needs at least one value, each at least 1",
            ));
        }
        for (key, value) in [
            ("outbound.max_queue_secs", config.max_queue_secs),
            ("outbound.connect_timeout_secs", config.connect_timeout_secs),
            ("outbound.command_timeout_secs", config.command_timeout_secs),
            ("outbound.max_connections", config.max_connections as u64),
            (
                "outbound.max_connections_per_domain",
                config.max_connections_per_domain as u64,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if let (Some(path), SecretFiles::Read) = (&config.tls_trust_file, secrets) {
            crate::delivery::tls::read_trust_file(path)
                .map_err(|e| ConfigError::invalid("outbound.tls_trust_file", e))?;
        }
        if let (true, Some(path), SecretFiles::Read) =
            (config.dane, &config.dnssec_trust_anchor, secrets)
        {
            crate::delivery::route::read_trust_anchor(path)
                .map_err(|e| ConfigError::invalid("outbound.dnssec_trust_anchor", e))?;
        }
        let mut dkim = Vec::new();
        for (i, key) in config.dkim.iter().enumerate() {
            let at = |field: &str| format!("outbound.dkim[{i}].{field}");
            let domain = accounts::normalize_domain(&key.domain)
                .ok_or_else(|| ConfigError::invalid(at("domain"), "not a valid domain name"))?;
            let selector_ok = !key.selector.is_empty()
                && key.selector.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !selector_ok {
                return Err(ConfigError::invalid(
                    at("selector"),
                    format!(
                        "{:?} is not a DNS label (letters, digits, hyphens)",
                        key.selector
                    ),
                ));
            }
            if !key.key_file.is_absolute() && secrets == SecretFiles::Skip {
                return Err(ConfigError::invalid(
                    at("key_file"),
                    format!("{} is not an absolute path", key.key_file.display()),
                ));
            }
            if secrets == SecretFiles::Read {
                dkim.push(
                    DkimKey::load(&domain, &key.selector, &key.key_file)
                        .map_err(|e| ConfigError::invalid(at("key_file"), e))?,
                );
            }
        }
        Ok(Arc::new(Outbound {
            enable: config.enable,
            dns_servers,
            port: config.port,
            tls: config.tls,
            tls_domains,
            tls_trust_file: config.tls_trust_file.clone(),
            mta_sts: config.mta_sts,
            mta_sts_port: config.mta_sts_port,
            dane: config.dane,
            dnssec_trust_anchor: config.dnssec_trust_anchor.clone(),
            retry_intervals_secs: config.retry_intervals_secs.clone(),
            max_queue_secs: config.max_queue_secs,
            delay_warning_secs: config.delay_warning_secs,
            connect_timeout_secs: config.connect_timeout_secs,
            command_timeout_secs: config.command_timeout_secs,
            max_connections: config.max_connections,
            max_connections_per_domain: config.max_connections_per_domain,
            smarthost: config
                .smarthost
                .as_ref()
                .map(|c| Smarthost::from_config(c, secrets))
                .transpose()?,
            dkim,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_servers_take_a_default_port_and_bad_ones_are_named() {
        let config = OutboundConfig {
            dns_servers: vec!["127.0.0.1:5353".into(), "::1".into()],
            ..OutboundConfig::default()
        };
        let o = Outbound::from_config(&config, SecretFiles::Read).unwrap();
        assert_eq!(o.dns_servers[0].port(), 5353);
        assert_eq!(o.dns_servers[1].port(), 53);
        let config = OutboundConfig {
            dns_servers: vec!["resolver".into()],
            ..OutboundConfig::default()
        };
        let err = Outbound::from_config(&config, SecretFiles::Read).unwrap_err();
        assert!(err.to_string().contains("outbound.dns_servers[0]"), "{err}");
    }

    #[test]
    fn a_dnssec_trust_anchor_that_is_not_dnskey_records_is_refused_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("anchor");
        std::fs::write(&bad, ". DNSKEY 257 3 13 not-base64\n").unwrap();
        let config = OutboundConfig {
            dane: true,
            dnssec_trust_anchor: Some(bad.clone()),
            ..OutboundConfig::default()
        };
        let err = Outbound::from_config(&config, SecretFiles::Read).unwrap_err();
        assert!(
            err.to_string().contains("outbound.dnssec_trust_anchor"),
            "{err}"
        );
        // A well-formed DNSKEY record (RSA/SHA-256, as the root's) is taken; an empty file is not.
        let good = dir.path().join("root.key");
        std::fs::write(&good, ROOT_KSK_2024).unwrap();
        let config = OutboundConfig {
            dnssec_trust_anchor: Some(good),
            ..config
        };
        Outbound::from_config(&config, SecretFiles::Read).unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "; nothing\n").unwrap();
        let config = OutboundConfig {
            dnssec_trust_anchor: Some(empty),
            ..config
        };
        let err = Outbound::from_config(&config, SecretFiles::Read).unwrap_err();
        assert!(err.to_string().contains("no DNSKEY record"), "{err}");
        // Without DANE the file is never read.
        let config = OutboundConfig {
            dane: false,
            dnssec_trust_anchor: Some(bad),
            ..OutboundConfig::default()
        };
        Outbound::from_config(&config, SecretFiles::Read).unwrap();
    }

    const ROOT_KSK_2024: &str = ". 172800 IN DNSKEY 257 3 8 AwEAAa96jeuknZlaeSrvyAJj6ZHv28hhOKkx3rLGXVaC6rXTsDc449/cidltpkyGwCJNnOAlFNKF2jBosZBU5eeHspaQWOmOElZsjICMQMC3aeHbGiShvZsx4wMYSjH8e7Vrhbu6irwCzVBApESjbUdpWWmEnhathWu1jo+siFUiRAAxm9qyJNg/wOZqqzL/dL/q8PkcRU5oUKEpUge71M3ej2/7CPqpdVwuMoTvoB+ZOT4YeGyxMvHmbrxlFzGOHOijtzN+u1TQNatX2XBuzZNQ1K+s2CXkPIZo7s6JgZyvaBevYtxPvYLw4z9mR7K2vaF18UYH9Z9GNUUeayffKC73PYc=\n";

    #[test]
    fn retry_intervals_repeat_the_last_value() {
        let o = Outbound::from_config(&OutboundConfig::default(), SecretFiles::Read).unwrap();
        assert_eq!(o.retry_interval(1), 60);
        assert_eq!(o.retry_interval(2), 300);
        assert_eq!(o.retry_interval(50), 14400);
    }

    #[test]
    fn a_missing_dkim_key_names_its_entry() {
        let config = OutboundConfig {
            dkim: vec![DkimConfig {
                domain: "example.org".into(),
                selector: "s1".into(),
                key_file: "/nonexistent/key.pem".into(),
            }],
            ..OutboundConfig::default()
        };
        let err = Outbound::from_config(&config, SecretFiles::Read).unwrap_err();
        assert!(
            err.to_string().contains("outbound.dkim[0].key_file"),
            "{err}"
        );
        assert!(Outbound::from_config(&config, SecretFiles::Skip).is_ok());
    }

    #[test]
    fn a_smarthost_needs_both_credentials_and_a_readable_password() {
        let mut config = OutboundConfig {
            smarthost: Some(SmarthostConfig {
                host: "smtp.provider.example".into(),
                port: 465,
                tls: SmarthostTls::Implicit,
                username: Some("me".into()),
                password_file: None,
            }),
            ..OutboundConfig::default()
        };
        let err = Outbound::from_config(&config, SecretFiles::Read).unwrap_err();
        assert!(
            err.to_string().contains("outbound.smarthost.password_file"),
            "{err}"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "s3cret\n").unwrap();
        config.smarthost.as_mut().unwrap().password_file = Some(file.path().to_path_buf());
        let o = Outbound::from_config(&config, SecretFiles::Read).unwrap();
        let relay = o.smarthost.as_ref().unwrap();
        assert_eq!(relay.credentials, Some(("me".into(), "s3cret".into())));
        assert!(relay.implicit_tls);
        assert!(
            !format!("{relay:?}").contains("s3cret"),
            "the password is never printed"
        );
    }

    #[test]
    fn per_domain_tls_overrides_the_default() {
        let config = OutboundConfig {
            tls_domains: BTreeMap::from([("Bank.Example".into(), TlsPolicy::Verified)]),
            ..OutboundConfig::default()
        };
        let o = Outbound::from_config(&config, SecretFiles::Read).unwrap();
        assert_eq!(o.tls_for("bank.example"), TlsPolicy::Verified);
        assert_eq!(o.tls_for("other.example"), TlsPolicy::Opportunistic);
    }
}
