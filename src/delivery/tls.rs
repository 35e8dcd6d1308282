//! TLS towards receiving servers. Every handshake checks the certificate against the system's trust
//! store (plus `outbound.tls_trust_file`) and the MX host name; the policy decides what a failed check
//! means: `verified` refuses the connection, `opportunistic` and `required` go on encrypted but record
//! the connection as unverified (RFC 7435: encryption without authentication still beats plain text).
//! A host with usable DANE records (RFC 7672) is checked against them instead, and only them.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use hickory_resolver::proto::rr::rdata::TLSA;

/// How a handshake checks the server's certificate.
#[derive(Debug, Clone)]
pub enum Check {
    /// WebPKI: the trust store and the host name; `require_valid`: a failed check fails the
    /// handshake (else it is only recorded).
    WebPki { require_valid: bool },
    /// DANE: the host's usable TLSA records (never empty); a certificate none matches fails the
    /// handshake.
    Dane(Arc<Vec<TLSA>>),
}

/// Reads the PEM certificates of `outbound.tls_trust_file`.
pub fn read_trust_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// The trust anchors and the verifier built from them (once: loading the system store is slow).
pub struct ClientTls {
    verifier: Option<Arc<WebPkiServerVerifier>>,
}

impl ClientTls {
    pub fn new(trust_file: Option<&Path>) -> ClientTls {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(%error, "reading the system's certificate authorities");
        }
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if let Some(path) = trust_file {
            match read_trust_file(path) {
                Ok(certs) => {
                    roots.add_parsable_certificates(certs);
                }
                Err(error) => tracing::error!(%error, "outbound.tls_trust_file"),
            }
        }
        if added == 0 && trust_file.is_none() {
            tracing::warn!(
                "no system certificate authorities found: outbound TLS can never be verified"
            );
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| tracing::warn!(error = %e, "no certificate verifier: outbound TLS is never verified"))
        .ok();
        ClientTls { verifier }
    }

    /// A configuration for one connection, and the flag its handshake sets when the certificate
    /// passed `check`.
    pub fn connection(&self, check: Check) -> (Arc<ClientConfig>, Arc<AtomicBool>) {
        let verified = Arc::new(AtomicBool::new(false));
        let verifier = Arc::new(Recording {
            inner: self.verifier.clone(),
            check,
            verified: verified.clone(),
        });
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        (Arc::new(config), verified)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Checks the certificate as WebPKI (or DANE) does and records the verdict; lets an invalid one
/// through only when WebPKI was not required. Handshake signatures are always checked (they bind the
/// session to the certificate).
#[derive(Debug)]
struct Recording {
    inner: Option<Arc<WebPkiServerVerifier>>,
    check: Check,
    verified: Arc<AtomicBool>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (verdict, require_valid) = match (&self.check, &self.inner) {
            (Check::Dane(records), _) => (
                super::dane::verify(
                    records,
                    end_entity,
                    intermediates,
                    server_name,
                    now,
                    &provider(),
                )
                .map(|()| ServerCertVerified::assertion()),
                true,
            ),
            (Check::WebPki { require_valid }, Some(inner)) => (
                inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now),
                *require_valid,
            ),
            (Check::WebPki { require_valid }, None) => (
                Err(rustls::Error::General("no trust anchors".into())),
                *require_valid,
            ),
        };
        match verdict {
            Ok(ok) => {
                self.verified.store(true, Ordering::SeqCst);
                Ok(ok)
            }
            Err(e) if require_valid => Err(e),
            Err(_) => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
