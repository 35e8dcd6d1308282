//! Validation of a raw [`Config`] into [`Settings`]: parsed endpoints, checked limits, the loaded account
//! directory. Nothing starts from a `Config` directly, so a value that passes here is safe to use.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::{Auth, Config, ConfigError, Limits, SecretFiles};
use crate::accounts::{self, Directory};
use crate::tls::Tls;
use std::sync::Arc;

/// The protocols a listener can speak. The names follow RFC 8314 so that STARTTLS (`smtp`, `submission`,
/// `pop3`) and implicit TLS (`submissions`, `pop3s`) cannot be confused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Smtp,
    Pop3,
    Submission,
    Submissions,
    Pop3s,
}

impl Protocol {
    pub const ALL: [Protocol; 5] = [
        Protocol::Smtp,
        Protocol::Pop3,
        Protocol::Submission,
        Protocol::Submissions,
        Protocol::Pop3s,
    ];

    /// The listener's key under `[listen]`, also the default `FileDescriptorName=` of its socket.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Smtp => "smtp",
            Protocol::Pop3 => "pop3",
            Protocol::Submission => "submission",
            Protocol::Submissions => "submissions",
            Protocol::Pop3s => "pop3s",
        }
    }

    /// Listeners that cannot work without a certificate.
    pub fn needs_tls(self) -> bool {
        matches!(
            self,
            Protocol::Submission | Protocol::Submissions | Protocol::Pop3s
        )
    }

    /// TLS from the first byte (RFC 8314), rather than after STARTTLS/STLS.
    pub fn implicit_tls(self) -> bool {
        matches!(self, Protocol::Submissions | Protocol::Pop3s)
    }

    /// Message submission (RFC 6409): authentication required, senders checked.
    pub fn is_submission(self) -> bool {
        matches!(self, Protocol::Submission | Protocol::Submissions)
    }

    pub fn is_pop3(self) -> bool {
        matches!(self, Protocol::Pop3 | Protocol::Pop3s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Bind(SocketAddr),
    Systemd(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub protocol: Protocol,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub hostname: String,
    pub storage_root: PathBuf,
    /// Only listeners with at least one endpoint.
    pub listeners: Vec<ListenerSpec>,
    pub limits: Limits,
    pub auth: Auth,
    /// Present when `[tls]` names a certificate and key.
    pub tls: Option<Arc<Tls>>,
    /// Local domains, accounts and aliases.
    pub directory: Directory,
    /// Delivery to other domains.
    pub outbound: Arc<super::outbound::Outbound>,
}

impl Settings {
    pub fn from_config(config: Config) -> Result<Settings, ConfigError> {
        Settings::from_config_with(config, SecretFiles::Read)
    }

    /// Like [`Settings::from_config`]; with [`SecretFiles::Skip`] the `password_hash_file`s are not
    /// read (for checks at build time, where the secrets do not exist yet).
    pub fn from_config_with(config: Config, secrets: SecretFiles) -> Result<Settings, ConfigError> {
        let hostname = match &config.hostname {
            Some(h) => h.clone(),
            None => system_hostname(),
        };
        if !accounts::is_valid_domain(&hostname) {
            return Err(ConfigError::invalid(
                "hostname",
                format!("{hostname:?} is not a valid domain name"),
            ));
        }
        let mut domains = BTreeSet::new();
        for (i, d) in config.domains.iter().enumerate() {
            let normal = accounts::normalize_domain(d).ok_or_else(|| {
                ConfigError::invalid(
                    format!("domains[{i}]"),
                    format!("{d:?} is not a valid domain name"),
                )
            })?;
            domains.insert(normal);
        }
        if domains.is_empty() {
            return Err(ConfigError::invalid(
                "domains",
                "at least one local domain is needed",
            ));
        }
        if config.storage_root.as_os_str().is_empty() {
            return Err(ConfigError::invalid("storage_root", "must not be empty"));
        }
        validate_limits(&config.limits)?;
        validate_auth(&config.auth)?;
        let tls = match (&config.tls.certificate, &config.tls.key) {
            // Build-time checks have no certificate yet (ACME, credentials): only the paths are checked.
            (Some(cert), Some(key)) if secrets == SecretFiles::Skip => {
                for (name, path) in [("tls.certificate", cert), ("tls.key", key)] {
                    if !path.is_absolute() {
                        return Err(ConfigError::invalid(
                            name,
                            format!("{} is not an absolute path", path.display()),
                        ));
                    }
                }
                None
            }
            (Some(cert), Some(key)) => Some(Arc::new(Tls::load(cert, key)?)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "tls.key",
                    "tls.certificate needs its key",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "tls.certificate",
                    "tls.key needs its certificate",
                ));
            }
        };
        let have_tls = config.tls.certificate.is_some() && config.tls.key.is_some();
        let listeners = parse_listeners(&config.listen, have_tls)?;
        let directory = Directory::from_config(&config, &domains, secrets)?;
        let outbound = super::outbound::Outbound::from_config(&config.outbound, secrets)?;
        Ok(Settings {
            outbound,
            hostname,
            storage_root: config.storage_root,
            listeners,
            limits: config.limits,
            auth: config.auth,
            tls,
            directory,
        })
    }
}

fn system_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| accounts::is_valid_domain(h))
        .unwrap_or_else(|| "localhost".into())
}

/// The RFC 5321 §4.5.3.1.4 command line (512 octets with CRLF) plus what the MAIL parameters we
/// advertise may add to it: `SIZE=` 26 octets (RFC 1870 §3 (5)) and `AUTH=` 500 (RFC 4954 §3 item 5).
/// `BODY=` (RFC 6152) and `SMTPUTF8` (RFC 6531) grant no extra length: they fit in the 512.
pub const MIN_COMMAND_LENGTH: usize = 512 + 26 + 500;

/// RFC 5321 §4.5.3.1.8: a server must accept at least 100 recipients per message.
pub const MIN_RECIPIENTS: usize = 100;

/// The longest failure delay accepted. The delay doubles per failure but stops at 30 s or at this base,
/// whichever is larger, so a longer base would hold failed sessions (and their connection slots) open
/// for minutes: a lock-out in disguise, better configured as `auth.max_failures_per_ip`.
pub const MAX_FAILURE_DELAY_MS: u64 = 60_000;

/// The longest timeout accepted: one year.
const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

fn validate_limits(l: &Limits) -> Result<(), ConfigError> {
    let positive: [(&str, u64); 12] = [
        ("limits.max_connections", l.max_connections as u64),
        (
            "limits.max_connections_per_ip",
            l.max_connections_per_ip as u64,
        ),
        ("limits.max_message_size", l.max_message_size),
        ("limits.max_recipients", l.max_recipients as u64),
        ("limits.max_errors", u64::from(l.max_errors)),
        ("limits.command_timeout_secs", l.command_timeout_secs),
        ("limits.data_timeout_secs", l.data_timeout_secs),
        ("limits.session_timeout_secs", l.session_timeout_secs),
        ("limits.pop3_idle_timeout_secs", l.pop3_idle_timeout_secs),
        ("limits.shutdown_timeout_secs", l.shutdown_timeout_secs),
        (
            "limits.tls_handshake_timeout_secs",
            l.tls_handshake_timeout_secs,
        ),
        ("limits.min_data_rate", l.min_data_rate),
    ];
    for (key, value) in positive {
        if value == 0 {
            return Err(ConfigError::invalid(key, "must be greater than 0"));
        }
        // A timeout beyond any sensible wait is a mistake (and near 2^63 s it cannot be added to a
        // clock at all).
        if key.ends_with("_secs") && value > MAX_TIMEOUT_SECS {
            return Err(ConfigError::invalid(
                key,
                format!("must be at most {MAX_TIMEOUT_SECS} (one year)"),
            ));
        }
    }
    // RFC 5321 §4.5.3.1: the minimum maximums every SMTP server must accept.
    if l.max_recipients < MIN_RECIPIENTS {
        return Err(ConfigError::invalid(
            "limits.max_recipients",
            format!("must be at least {MIN_RECIPIENTS} (RFC 5321 §4.5.3.1.8)"),
        ));
    }
    if l.max_line_length.is_some_and(|max| max < 1000) {
        return Err(ConfigError::invalid(
            "limits.max_line_length",
            "must be at least 1000 (RFC 5321 §4.5.3.1.6), or absent for no limit",
        ));
    }
    if l.max_command_length < MIN_COMMAND_LENGTH {
        return Err(ConfigError::invalid(
            "limits.max_command_length",
            format!(
                "must be at least {MIN_COMMAND_LENGTH}: 512 (RFC 5321 §4.5.3.1.4) plus room for the \
                 MAIL parameters SIZE= (26, RFC 1870) and AUTH= (500, RFC 4954)"
            ),
        ));
    }
    Ok(())
}

fn validate_auth(a: &Auth) -> Result<(), ConfigError> {
    if a.max_failures == 0 {
        return Err(ConfigError::invalid(
            "auth.max_failures",
            "must be at least 1 (there is no \"unlimited\": 0 would act as 1)",
        ));
    }
    if a.max_failures_per_ip == 0 {
        return Err(ConfigError::invalid(
            "auth.max_failures_per_ip",
            "must be at least 1 (0 would refuse every login, even a correct one)",
        ));
    }
    if a.failure_delay_ms > MAX_FAILURE_DELAY_MS {
        return Err(ConfigError::invalid(
            "auth.failure_delay_ms",
            format!(
                "must be at most {MAX_FAILURE_DELAY_MS} (one minute): each failed login holds its \
                 session for this long"
            ),
        ));
    }
    Ok(())
}

fn parse_listeners(
    listen: &super::Listen,
    have_tls: bool,
) -> Result<Vec<ListenerSpec>, ConfigError> {
    let mut out = Vec::new();
    for protocol in Protocol::ALL {
        let raw = match protocol {
            Protocol::Smtp => &listen.smtp,
            Protocol::Pop3 => &listen.pop3,
            Protocol::Submission => &listen.submission,
            Protocol::Submissions => &listen.submissions,
            Protocol::Pop3s => &listen.pop3s,
        };
        if raw.is_empty() {
            continue;
        }
        let key = format!("listen.{}", protocol.name());
        if protocol.needs_tls() && !have_tls {
            return Err(ConfigError::invalid(
                key,
                "this listener needs TLS: set tls.certificate and tls.key",
            ));
        }
        let mut endpoints = Vec::new();
        for (i, text) in raw.iter().enumerate() {
            let endpoint = parse_endpoint(text)
                .map_err(|message| ConfigError::invalid(format!("{key}[{i}]"), message))?;
            // Across all listeners: one address (or socket name) serves one protocol.
            if endpoints.contains(&endpoint)
                || out
                    .iter()
                    .any(|l: &ListenerSpec| l.endpoints.contains(&endpoint))
            {
                return Err(ConfigError::invalid(
                    format!("{key}[{i}]"),
                    format!("{text:?} is listed twice"),
                ));
            }
            endpoints.push(endpoint);
        }
        out.push(ListenerSpec {
            protocol,
            endpoints,
        });
    }
    Ok(out)
}

fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    if let Some(name) = text.strip_prefix("systemd:") {
        let valid = !name.is_empty()
            && name.len() <= 255
            && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        return if valid {
            Ok(Endpoint::Systemd(name.to_string()))
        } else {
            Err(format!(
                "{text:?}: a systemd socket name is 1-255 printable characters without ':'"
            ))
        };
    }
    text.parse::<SocketAddr>().map(Endpoint::Bind).map_err(|_| {
        format!("{text:?} is neither \"address:port\" (IPv6 as \"[::1]:25\") nor \"systemd:NAME\"")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            hostname: Some("mx.example.org".into()),
            domains: vec!["Example.org".into()],
            ..Config::default()
        }
    }

    fn invalid_key(config: Config) -> String {
        match Settings::from_config(config) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid-value error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_validate() {
        let s = Settings::from_config(Config::default()).unwrap();
        assert_eq!(s.listeners.len(), 2);
        assert!(s.directory.is_local_domain("localhost"));
    }

    #[test]
    fn domains_are_lowercased() {
        let s = Settings::from_config(config()).unwrap();
        assert!(s.directory.is_local_domain("example.org"));
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            parse_endpoint("[::]:25").unwrap(),
            Endpoint::Bind("[::]:25".parse().unwrap())
        );
        assert_eq!(
            parse_endpoint("systemd:smtp").unwrap(),
            Endpoint::Systemd("smtp".into())
        );
        assert!(parse_endpoint("localhost:25").is_err());
        assert!(parse_endpoint("systemd:").is_err());
    }

    #[test]
    fn bad_endpoint_names_its_index() {
        let mut c = config();
        c.listen.pop3 = vec!["127.0.0.1:110".into(), "nonsense".into()];
        assert_eq!(invalid_key(c), "listen.pop3[1]");
    }

    #[test]
    fn one_address_for_two_listeners_is_refused() {
        let mut c = config();
        c.listen.smtp = vec!["127.0.0.1:2500".into()];
        c.listen.pop3 = vec!["127.0.0.1:2500".into()];
        assert_eq!(invalid_key(c), "listen.pop3[0]");
    }

    #[test]
    fn tls_listener_without_certificate_is_refused() {
        for protocol in ["submission", "submissions", "pop3s"] {
            let mut c = config();
            match protocol {
                "submission" => c.listen.submission = vec!["127.0.0.1:587".into()],
                "submissions" => c.listen.submissions = vec!["127.0.0.1:465".into()],
                _ => c.listen.pop3s = vec!["127.0.0.1:995".into()],
            }
            assert_eq!(invalid_key(c), format!("listen.{protocol}"));
        }
    }

    #[test]
    fn certificate_without_key_is_refused() {
        let mut c = config();
        c.tls.certificate = Some("/etc/ssl/cert.pem".into());
        assert_eq!(invalid_key(c), "tls.key");
    }

    #[test]
    fn timeouts_over_a_year_are_refused() {
        let mut c = config();
        c.limits.command_timeout_secs = 1 << 62;
        assert_eq!(invalid_key(c), "limits.command_timeout_secs");
        let mut c = config();
        c.limits.session_timeout_secs = 365 * 24 * 3600;
        assert!(Settings::from_config(c).is_ok());
    }

    #[test]
    fn zero_limit_is_refused() {
        let mut c = config();
        c.limits.max_recipients = 0;
        assert_eq!(invalid_key(c), "limits.max_recipients");
    }

    #[test]
    fn line_limit_below_rfc_minimum_is_refused() {
        let mut c = config();
        c.limits.max_line_length = Some(998);
        assert_eq!(invalid_key(c), "limits.max_line_length");
        let mut c = config();
        c.limits.max_line_length = Some(0);
        assert_eq!(invalid_key(c), "limits.max_line_length");
        let mut c = config();
        c.limits.max_line_length = Some(1000);
        Settings::from_config(c).unwrap();
    }

    fn invalid(config: Config) -> (String, String) {
        match Settings::from_config(config) {
            Err(ConfigError::Invalid { key, message }) => (key, message),
            other => panic!("expected an invalid-value error, got {other:?}"),
        }
    }

    #[test]
    fn recipient_limit_below_rfc_minimum_is_refused() {
        let mut c = config();
        c.limits.max_recipients = 99;
        let (key, message) = invalid(c);
        assert_eq!(key, "limits.max_recipients");
        assert!(message.contains("100"), "{message}");
        let mut c = config();
        c.limits.max_recipients = 100;
        Settings::from_config(c).unwrap();
    }

    #[test]
    fn zero_auth_failure_limits_are_refused() {
        let mut c = config();
        c.auth.max_failures = 0;
        assert_eq!(invalid_key(c), "auth.max_failures");
        let mut c = config();
        c.auth.max_failures_per_ip = 0;
        assert_eq!(invalid_key(c), "auth.max_failures_per_ip");
    }

    #[test]
    fn huge_failure_delay_is_refused() {
        let mut c = config();
        c.auth.failure_delay_ms = u64::MAX;
        let (key, message) = invalid(c);
        assert_eq!(key, "auth.failure_delay_ms");
        assert!(message.contains("60000"), "{message}");
        let mut c = config();
        c.auth.failure_delay_ms = MAX_FAILURE_DELAY_MS;
        Settings::from_config(c).unwrap();
    }

    #[test]
    fn command_length_without_room_for_mail_parameters_is_refused() {
        let mut c = config();
        c.limits.max_command_length = 512;
        let (key, message) = invalid(c);
        assert_eq!(key, "limits.max_command_length");
        assert!(message.contains("1038"), "{message}");
        let mut c = config();
        c.limits.max_command_length = 1038;
        Settings::from_config(c).unwrap();
        assert!(
            Config::default().limits.max_command_length >= MIN_COMMAND_LENGTH,
            "the default passes its own check"
        );
    }

    #[test]
    fn empty_domains_refused() {
        let mut c = config();
        c.domains.clear();
        assert_eq!(invalid_key(c), "domains");
    }
}
