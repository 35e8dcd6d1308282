//! TLS with rustls: the certificate chain and key come from PEM files named in the configuration (paths
//! that work with systemd credentials and ACME-managed files); TLS 1.2 and 1.3 only, with rustls' modern
//! cipher suites (no CBC, no RSA key exchange). The validated settings carry the rustls configuration
//! (certificate material, not runtime state: the server makes its acceptor from it per handshake), so
//! a reload swaps it atomically and sessions keep the one they started with.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ConfigError;

/// Certificates that expire within this many days get a warning from `check-config` and at load.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

#[derive(Clone)]
pub struct Tls {
    /// The rustls server configuration: this chain and key, TLS 1.3 and 1.2 only.
    pub config: Arc<ServerConfig>,
    /// The leaf certificate's notAfter, as Unix seconds.
    pub not_after: i64,
    /// The leaf certificate's subject, for messages.
    pub subject: String,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl Tls {
    /// Reads and checks the chain (leaf first) and its private key.
    pub fn load(certificate: &Path, key: &Path) -> Result<Tls, ConfigError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
            .and_then(|certs| certs.collect())
            .map_err(|e| {
                ConfigError::invalid(
                    "tls.certificate",
                    format!(
                        "cannot read certificates from {}: {e}",
                        certificate.display()
                    ),
                )
            })?;
        let Some(leaf) = chain.first() else {
            return Err(ConfigError::invalid(
                "tls.certificate",
                format!("{} holds no certificate", certificate.display()),
            ));
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| {
            ConfigError::invalid(
                "tls.certificate",
                format!("the first certificate cannot be parsed: {e}"),
            )
        })?;
        let not_after = parsed.validity().not_after.timestamp();
        let subject = parsed.subject().to_string();
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            ConfigError::invalid(
                "tls.key",
                format!("cannot read a private key from {}: {e}", key.display()),
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ConfigError::invalid("tls", e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                ConfigError::invalid("tls.key", format!("does not fit the certificate ({e})"))
            })?;
        Ok(Tls {
            config: Arc::new(config),
            not_after,
            subject,
        })
    }

    /// A warning when the certificate has expired or expires within [`EXPIRY_WARNING_DAYS`].
    pub fn expiry_warning(&self, now_unix: i64) -> Option<String> {
        let days = (self.not_after - now_unix).div_euclid(86_400);
        if self.not_after <= now_unix {
            Some(format!(
                "the TLS certificate ({}) has expired",
                self.subject
            ))
        } else if days < EXPIRY_WARNING_DAYS {
            Some(format!(
                "the TLS certificate ({}) expires in {days} days",
                self.subject
            ))
        } else {
            None
        }
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A self-signed ECDSA P-256 certificate for `name` (subject and DNS name), valid from an hour ago for
/// `days`: (certificate, key) as PEM files in `dir`. Made in Rust (rcgen) rather than by the `openssl`
/// program, which the Nix build sandbox, where `cargo test` runs, does not have.
#[cfg(test)]
pub(crate) fn test_certificate(
    dir: &Path,
    name: &str,
    days: u32,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().expect("a P-256 key");
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("a DNS name");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days.into());
    let cert = params.self_signed(&key).expect("a self-signed certificate");
    let (cert_path, key_path) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).expect("certificate written");
    std::fs::write(&key_path, key.serialize_pem()).expect("key written");
    (cert_path, key_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_certificate as make_cert;

    /// Handshakes in memory with a rustls client that offers only `version`; the version agreed on.
    async fn handshake(
        tls: &Tls,
        cert: &Path,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Option<rustls::ProtocolVersion> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(cert).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (a, b) = tokio::io::duplex(1 << 16);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = rustls::pki_types::ServerName::try_from("mx.example.org").unwrap();
        let (server, client) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
        server.ok()?;
        client.ok()?.get_ref().1.protocol_version()
    }

    #[tokio::test]
    async fn the_server_speaks_tls_1_3_and_1_2_and_nothing_older() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = make_cert(dir.path(), "mx.example.org", 90);
        let tls = Tls::load(&cert, &key).unwrap();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            assert_eq!(
                handshake(&tls, &cert, version).await,
                Some(version.version),
                "{:?}",
                version.version
            );
        }
        // TLS 1.0 and 1.1 cannot be configured in rustls at all (it implements neither): what a
        // client that insists on them meets is checked end to end with openssl s_client.
        assert_eq!(
            rustls::ALL_VERSIONS
                .iter()
                .map(|v| v.version)
                .collect::<Vec<_>>(),
            [
                rustls::ProtocolVersion::TLSv1_3,
                rustls::ProtocolVersion::TLSv1_2
            ]
        );
    }

    #[test]
    fn loads_a_matching_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = make_cert(dir.path(), "mx.example.org", 90);
        let tls = Tls::load(&cert, &key).unwrap();
        assert!(tls.subject.contains("mx.example.org"));
        assert_eq!(tls.expiry_warning(now_unix()), None);
    }

    #[test]
    fn mismatched_key_names_tls_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = make_cert(dir.path(), "a", 90);
        let (_, other_key) = make_cert(dir.path(), "b", 90);
        match Tls::load(&cert, &other_key) {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "tls.key"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unreadable_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = make_cert(dir.path(), "a", 90);
        let missing = dir.path().join("missing.pem");
        assert!(
            matches!(Tls::load(&missing, &key), Err(ConfigError::Invalid { key, .. }) if key == "tls.certificate")
        );
        assert!(
            matches!(Tls::load(&cert, &missing), Err(ConfigError::Invalid { key, .. }) if key == "tls.key")
        );
        assert!(
            matches!(Tls::load(&key, &key), Err(ConfigError::Invalid { key, .. }) if key == "tls.certificate")
        );
    }

    #[test]
    fn expiry_within_14_days_warns() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = make_cert(dir.path(), "soon", 10);
        let tls = Tls::load(&cert, &key).unwrap();
        let warning = tls.expiry_warning(now_unix()).unwrap();
        assert!(
            warning.contains("expires in 9 days") || warning.contains("expires in 10 days"),
            "{warning}"
        );
        assert!(
            tls.expiry_warning(tls.not_after + 1)
                .unwrap()
                .contains("has expired")
        );
    }
}
