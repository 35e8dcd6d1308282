//! Configuration: the raw, serde-shaped [`Config`] read with figment (built-in defaults, then the TOML
//! file, then `RUSTMAIL_*` environment variables with `__` between nested keys), and its validation into
//! typed [`Settings`] (see `settings.rs`). `Config::default()` is the one home of every default value,
//! and it is also the development default that `rustmail serve` runs without a file. The account
//! directory is built here too (see `directory.rs`), so that `accounts` does not depend on this module.

mod directory;
pub mod outbound;
mod settings;

pub use directory::SecretFiles;
pub use settings::{Endpoint, ListenerSpec, Protocol, Settings};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Everything that can go wrong while reading or validating the configuration. Each variant names the
/// key at fault so that an administrator knows what to edit.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("{0}")]
    Parse(Box<figment::Error>),
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The name this server gives itself in greetings and `Received:` headers (default: the system hostname).
    pub hostname: Option<String>,
    /// The domains whose mail is delivered here.
    pub domains: Vec<String>,
    /// Where mailboxes and the spool live.
    pub storage_root: PathBuf,
    pub listen: Listen,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub auth: Auth,
    pub outbound: outbound::OutboundConfig,
    /// address → account.
    pub accounts: BTreeMap<String, AccountConfig>,
    /// The account that receives `postmaster@` of every local domain without such an address of its
    /// own (RFC 5321 §4.5.1); default: the first account in address order.
    pub postmaster: Option<String>,
    /// Local domain → account receiving mail for that domain's unknown addresses (default: none).
    pub catch_all: BTreeMap<String, String>,
    /// `user+tag@domain` is delivered to `user@domain`; `""` turns sub-addressing off.
    pub subaddress_separator: String,
    /// IP addresses of this server: `user@[address]` is then local, for the first of `domains`.
    /// Empty (the default): every address literal is foreign, so refused.
    pub address_literals: Vec<std::net::IpAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: None,
            domains: vec!["localhost".into()],
            storage_root: PathBuf::from("rustmail-data"),
            listen: Listen::default(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            auth: Auth::default(),
            outbound: outbound::OutboundConfig::default(),
            accounts: BTreeMap::new(),
            postmaster: None,
            catch_all: BTreeMap::new(),
            subaddress_separator: "+".into(),
            address_literals: Vec::new(),
        }
    }
}

/// Endpoints per listener: `"address:port"` to bind, or `"systemd:NAME"` for the inherited socket whose
/// `FileDescriptorName=` is NAME.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    pub smtp: Vec<String>,
    pub pop3: Vec<String>,
    pub submission: Vec<String>,
    pub submissions: Vec<String>,
    pub pop3s: Vec<String>,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            smtp: vec!["127.0.0.1:2525".into()],
            pop3: vec!["127.0.0.1:1110".into()],
            submission: vec![],
            submissions: vec![],
            pop3s: vec![],
        }
    }
}

/// The certificate chain (leaf first) and private key, PEM. Without them there is no TLS: no STARTTLS,
/// no STLS, and the `submission`, `submissions` and `pop3s` listeners cannot be used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub certificate: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent connections over all listeners; one more gets a temporary refusal.
    pub max_connections: usize,
    /// Concurrent connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Largest accepted message in octets (CRLF form), advertised as `SIZE`.
    pub max_message_size: u64,
    /// Recipients per SMTP transaction (RFC 5321 §4.5.3.1.8: at least 100).
    pub max_recipients: usize,
    /// Longest text line in a message, CRLF included, at least RFC 5321's 1000 (§4.5.3.1.6). Absent
    /// (the default): no limit, lines of any length are stored byte-exact, because mail clients do
    /// send lines over 998 octets and refusing them bounces wanted mail. Memory stays bounded either
    /// way: long lines are streamed in pieces.
    pub max_line_length: Option<usize>,
    /// Longest SMTP command line, CRLF included: at least RFC 5321's 512 (§4.5.3.1.4) plus the 526
    /// octets that the MAIL parameters SIZE= and AUTH= may add (RFC 1870, RFC 4954).
    pub max_command_length: usize,
    /// Protocol errors in one session before it is closed with `421`.
    pub max_errors: u32,
    /// Wait for the next SMTP command (RFC 5321 §4.5.3.2.7: at least 5 minutes).
    pub command_timeout_secs: u64,
    /// Wait for the next chunk of DATA (RFC 5321 §4.5.3.2.5: at least 3 minutes).
    pub data_timeout_secs: u64,
    /// Total lifetime of one SMTP session.
    pub session_timeout_secs: u64,
    /// POP3 inactivity timeout (RFC 1939 §3: at least 10 minutes).
    pub pop3_idle_timeout_secs: u64,
    /// How long a graceful stop waits for sessions to reach a safe point.
    pub shutdown_timeout_secs: u64,
    /// A TLS handshake (implicit TLS, STARTTLS, STLS) must complete within this.
    pub tls_handshake_timeout_secs: u64,
    /// Octets per second a message upload (DATA, BDAT) or a POP3 download must keep up on average:
    /// a transfer of N octets may take its timeout plus N / this many seconds, and no longer.
    pub min_data_rate: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_connections_per_ip: 20,
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_line_length: None,
            max_command_length: 2048,
            max_errors: 20,
            command_timeout_secs: 300,
            data_timeout_secs: 300,
            session_timeout_secs: 3600,
            pop3_idle_timeout_secs: 600,
            shutdown_timeout_secs: 30,
            tls_handshake_timeout_secs: 10,
            min_data_rate: 500,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// Allow passwords over unencrypted connections from non-loopback peers. Off: until TLS exists,
    /// remote POP3 logins are refused unless this is set explicitly.
    pub allow_unencrypted_remote: bool,
    /// Allow passwords over unencrypted connections from loopback (the development default needs it;
    /// turn it off where local users should not be able to watch the loopback interface).
    pub allow_plaintext_loopback: bool,
    /// Delay before answering a failed login, the same for unknown users and wrong passwords (at
    /// most 60000).
    pub failure_delay_ms: u64,
    /// Failed logins in one session before it is closed.
    pub max_failures: u32,
    /// Failed logins from one address within 15 minutes after which every login from it is refused
    /// until the 15 minutes have passed. Each failure from an address also doubles its delay.
    pub max_failures_per_ip: u32,
    /// RFC 2449 LOGIN-DELAY: seconds an account must wait between two POP3 logins (0: no limit).
    pub pop3_login_delay_secs: u64,
    /// Submission: an account may use only its own addresses (and aliases, and their +tags) as
    /// envelope sender. Off: any sender, for setups where users legitimately send as shared addresses.
    pub restrict_senders: bool,
}

impl Auth {
    /// Whether a password may be sent in clear on a connection: over TLS, from loopback when allowed,
    /// or anywhere when the administrator said so. The one rule for SMTP AUTH and POP3 alike.
    pub fn password_allowed(&self, tls: bool, peer: std::net::IpAddr) -> bool {
        tls || (peer.to_canonical().is_loopback() && self.allow_plaintext_loopback)
            || self.allow_unencrypted_remote
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            allow_unencrypted_remote: false,
            allow_plaintext_loopback: true,
            failure_delay_ms: 1000,
            max_failures: 3,
            max_failures_per_ip: 10,
            pop3_login_delay_secs: 0,
            restrict_senders: true,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountConfig {
    /// A PHC password hash (`$argon2id$…`, from `rustmail hash-password`).
    pub password_hash: Option<String>,
    /// A file holding the hash (e.g. a systemd credential); exclusive with `password_hash`.
    pub password_hash_file: Option<PathBuf>,
    /// Further addresses delivered to this account.
    pub aliases: Vec<String>,
    /// A file holding a shared secret in clear, for POP3 APOP (RFC 1939 §7). Off by default: APOP
    /// keeps the secret out of the connection but needs it stored reversibly, and MD5 is weak.
    pub apop_secret_file: Option<PathBuf>,
}

/// Reads the configuration: defaults, then `path` (which must exist when given), then the environment.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    load_with_env(path, Env::prefixed("RUSTMAIL_").split("__"))
}

fn load_with_env(path: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = path {
        if !path.is_file() {
            return Err(ConfigError::Missing(path.to_path_buf()));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment
        .merge(env)
        .extract()
        .map_err(|e| ConfigError::Parse(Box::new(e)))
}

/// Reads and validates in one step, as `check-config` does.
pub fn load_settings(path: Option<&Path>, secrets: SecretFiles) -> Result<Settings, ConfigError> {
    Settings::from_config_with(load(path)?, secrets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn no_env() -> Env {
        Env::prefixed("RUSTMAIL_TEST_NEVER_SET_")
    }

    #[test]
    fn missing_file_is_an_error() {
        let err =
            load_with_env(Some(Path::new("/nonexistent/rustmail.toml")), no_env()).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let f = file("[limits]\nmax_mesage_size = 5\n");
        let err = load_with_env(Some(f.path()), no_env()).unwrap_err();
        assert!(err.to_string().contains("max_mesage_size"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let f = file("[limits]\nmax_recipients = \"many\"\n");
        let err = load_with_env(Some(f.path()), no_env()).unwrap_err();
        assert!(err.to_string().contains("max_recipients"), "{err}");
    }

    #[test]
    fn file_overrides_defaults_and_keeps_the_rest() {
        let f = file("domains = [\"example.org\"]\n[limits]\nmax_recipients = 7\n");
        let config = load_with_env(Some(f.path()), no_env()).unwrap();
        assert_eq!(config.domains, vec!["example.org"]);
        assert_eq!(config.limits.max_recipients, 7);
        assert_eq!(config.limits.max_line_length, None);
        assert_eq!(config.listen.smtp, vec!["127.0.0.1:2525"]);
    }

    #[test]
    fn line_limit_is_absent_by_default_and_can_be_set() {
        let config = load_with_env(None, no_env()).unwrap();
        assert_eq!(config.limits.max_line_length, None, "no limit by default");
        let f = file("[limits]\nmax_line_length = 1000\n");
        let config = load_with_env(Some(f.path()), no_env()).unwrap();
        assert_eq!(config.limits.max_line_length, Some(1000));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the closure's error type
    fn environment_overrides_nested_keys() {
        let f = file("[limits]\nmax_recipients = 7\n");
        figment::Jail::expect_with(|jail| {
            jail.set_env("RUSTMAIL_T_LIMITS__MAX_RECIPIENTS", "9");
            jail.set_env("RUSTMAIL_T_LISTEN__POP3", "[\"127.0.0.1:1999\"]");
            let env = Env::prefixed("RUSTMAIL_T_").split("__");
            let config = load_with_env(Some(f.path()), env).unwrap();
            assert_eq!(config.limits.max_recipients, 9);
            assert_eq!(config.listen.pop3, vec!["127.0.0.1:1999"]);
            Ok(())
        });
    }

    #[test]
    fn accounts_table_parses() {
        let f = file(
            "domains = [\"example.org\"]\n[accounts.\"alice@example.org\"]\npassword_hash = \"x\"\naliases = [\"a@example.org\"]\n",
        );
        let config = load_with_env(Some(f.path()), no_env()).unwrap();
        let alice = &config.accounts["alice@example.org"];
        assert_eq!(alice.password_hash.as_deref(), Some("x"));
        assert_eq!(alice.aliases, vec!["a@example.org"]);
    }
}
