//! DKIM (RFC 6376) keys and signing, with `mail-auth`: RSA-SHA256 (RFC 8301: at least 1024 bits, 2048
//! generated) and Ed25519-SHA256 (RFC 8463). Keys are PKCS#8 PEM files (`rustmail dkim-keygen` writes
//! them); an RSA key may also be PKCS#1 (`openssl genrsa`).

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

/// The header fields signed when present (RFC 6376 §5.4.1's list, less the trace fields). `From` twice
/// and the others once more than they occur ("oversigning", §8.15) would stop fields being added later;
/// `From` is listed twice so that a second `From:` added in transit breaks the signature.
const SIGNED_FIELDS: &[&str] = &[
    "From",
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Sender",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Rsa,
    Ed25519,
}

impl Algorithm {
    /// The `k=` tag of the DNS record.
    pub fn tag(self) -> &'static str {
        match self {
            Algorithm::Rsa => "rsa",
            Algorithm::Ed25519 => "ed25519",
        }
    }
}

enum Key {
    Rsa(RsaKey<Sha256>),
    Ed25519(Ed25519Key),
}

/// One signing key: `selector._domainkey.domain`.
#[derive(Clone)]
pub struct DkimKey {
    pub domain: String,
    pub selector: String,
    key: Arc<Key>,
}

impl std::fmt::Debug for DkimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DkimKey({}._domainkey.{}, {})",
            self.selector,
            self.domain,
            self.algorithm().tag()
        )
    }
}

impl DkimKey {
    /// Reads a PEM private key (PKCS#8 Ed25519 or RSA, or PKCS#1 RSA).
    pub fn load(domain: &str, selector: &str, path: &Path) -> Result<DkimKey, String> {
        let der = PrivateKeyDer::from_pem_file(path)
            .map_err(|e| format!("cannot read a PEM private key from {}: {e}", path.display()))?;
        let key = match &der {
            PrivateKeyDer::Pkcs8(pkcs8) => {
                match Ed25519Key::from_pkcs8_der(pkcs8.secret_pkcs8_der()) {
                    Ok(key) => Key::Ed25519(key),
                    Err(_) => Key::Rsa(RsaKey::from_key_der(der.clone_key()).map_err(|e| {
                        format!(
                            "{} is neither an Ed25519 nor an RSA key: {e}",
                            path.display()
                        )
                    })?),
                }
            }
            _ => Key::Rsa(
                RsaKey::from_key_der(der.clone_key())
                    .map_err(|e| format!("{}: not a usable RSA key: {e}", path.display()))?,
            ),
        };
        Ok(DkimKey {
            domain: domain.to_string(),
            selector: selector.to_string(),
            key: Arc::new(key),
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        match *self.key {
            Key::Rsa(_) => Algorithm::Rsa,
            Key::Ed25519(_) => Algorithm::Ed25519,
        }
    }

    /// The `DKIM-Signature:` field (CRLF-terminated) for `message`, which is in its wire form (CRLF
    /// line endings, not dot-stuffed), signed with relaxed/relaxed canonicalization.
    pub fn sign(&self, message: &[u8]) -> Result<String, String> {
        fn build<T: mail_auth::common::crypto::SigningKey>(
            key: T,
            this: &DkimKey,
            message: &[u8],
        ) -> Result<String, String> {
            let signature = DkimSigner::from_key(key)
                .domain(this.domain.clone())
                .selector(this.selector.clone())
                .headers(SIGNED_FIELDS.iter().copied())
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed)
                .sign(message)
                .map_err(|e| e.to_string())?;
            Ok(without_space_before_the_end(signature.to_header()))
        }
        match &*self.key {
            Key::Rsa(key) => build(KeyRef::Rsa(key), self, message),
            Key::Ed25519(key) => build(KeyRef::Ed25519(key), self, message),
        }
    }
}

/// mail-auth may fold the field just before its final `;` (`b=…\r\n\t;`). RFC 6376 §3.5 has
/// verifiers drop the whitespace around the `b=` value, but some (dkimpy) keep the trailing fold, hash
/// `b= ;` instead of the signed `b=;` and reject the signature: the fold goes.
fn without_space_before_the_end(header: String) -> String {
    match header.strip_suffix(";\r\n") {
        Some(head) => format!("{};\r\n", head.trim_end_matches([' ', '\t', '\r', '\n'])),
        None => header,
    }
}

/// Signing borrows the loaded key: `DkimSigner` takes its key by value.
enum KeyRef<'a> {
    Rsa(&'a RsaKey<Sha256>),
    Ed25519(&'a Ed25519Key),
}

impl mail_auth::common::crypto::SigningKey for KeyRef<'_> {
    type Hasher = Sha256;

    fn sign(&self, input: impl mail_auth::common::headers::Writable) -> mail_auth::Result<Vec<u8>> {
        match self {
            KeyRef::Rsa(key) => key.sign(input),
            KeyRef::Ed25519(key) => key.sign(input),
        }
    }

    fn algorithm(&self) -> mail_auth::common::crypto::Algorithm {
        match self {
            KeyRef::Rsa(key) => key.algorithm(),
            KeyRef::Ed25519(key) => key.algorithm(),
        }
    }
}

/// A new key: its PKCS#8 PEM, and the `p=` value (base64 public key) of the DNS record.
pub fn generate(algorithm: Algorithm) -> Result<(String, String), String> {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let b64 = base64::engine::general_purpose::STANDARD;
    match algorithm {
        Algorithm::Rsa => {
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| e.to_string())?;
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| e.to_string())?;
            let public = rsa::RsaPublicKey::from(&key)
                .to_public_key_der()
                .map_err(|e| e.to_string())?;
            Ok((pem.to_string(), b64.encode(public.as_bytes())))
        }
        Algorithm::Ed25519 => {
            let pkcs8 = Ed25519Key::generate_pkcs8().map_err(|e| e.to_string())?;
            let public = Ed25519Key::from_pkcs8_der(&pkcs8)
                .map_err(|e| e.to_string())?
                .public_key();
            Ok((pkcs8_pem(&pkcs8), b64.encode(public)))
        }
    }
}

fn pkcs8_pem(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    pem
}

/// The TXT record to publish for a key: `selector._domainkey.domain. IN TXT "v=DKIM1; k=…; p=…"`,
/// split into strings of at most 255 octets (RFC 1035 §3.3.14) as DNS zone files need.
pub fn txt_record(domain: &str, selector: &str, algorithm: Algorithm, public: &str) -> String {
    let value = format!("v=DKIM1; k={}; p={public}", algorithm.tag());
    let strings: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", std::str::from_utf8(c).expect("ASCII")))
        .collect();
    format!(
        "{selector}._domainkey.{domain}. IN TXT ( {} )",
        strings.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(algorithm: Algorithm) -> (tempfile::NamedTempFile, String) {
        let (pem, public) = generate(algorithm).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), pem).unwrap();
        (file, public)
    }

    #[test]
    fn generated_keys_load_back_with_their_algorithm_and_sign() {
        for algorithm in [Algorithm::Ed25519, Algorithm::Rsa] {
            let (file, _) = key_file(algorithm);
            let key = DkimKey::load("example.org", "s1", file.path()).unwrap();
            assert_eq!(key.algorithm(), algorithm);
            let header = key
                .sign(b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n")
                .unwrap();
            assert!(header.starts_with("DKIM-Signature: "), "{header}");
            assert!(header.contains("d=example.org"), "{header}");
            assert!(header.contains("s=s1"), "{header}");
            assert!(header.ends_with("\r\n"), "{header:?}");
        }
    }

    #[test]
    fn no_fold_before_the_final_semicolon_whatever_the_length() {
        let (file, _) = key_file(Algorithm::Rsa);
        let key = DkimKey::load("example.org", "s1", file.path()).unwrap();
        for n in 0..40 {
            let message = format!(
                "From: a@example.org\r\nSubject: {}\r\n\r\nbody\r\n",
                "x".repeat(n)
            );
            let header = key.sign(message.as_bytes()).unwrap();
            let end = header.trim_end_matches("\r\n");
            assert!(end.ends_with(';'), "{header:?}");
            let before = end[..end.len() - 1].chars().last().unwrap();
            assert!(!before.is_whitespace(), "{header:?}");
        }
        assert_eq!(
            without_space_before_the_end("a; b=x\r\n\t;\r\n".into()),
            "a; b=x;\r\n"
        );
    }

    #[test]
    fn a_file_that_is_not_a_key_is_refused_with_its_path() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "hello").unwrap();
        let err = DkimKey::load("example.org", "s1", file.path()).unwrap_err();
        assert!(err.contains(&file.path().display().to_string()), "{err}");
    }

    #[test]
    fn long_records_are_split_into_dns_strings() {
        let record = txt_record("example.org", "s1", Algorithm::Rsa, &"A".repeat(400));
        assert!(record.starts_with("s1._domainkey.example.org. IN TXT ( \"v=DKIM1; k=rsa; p="));
        for s in record.split('"').skip(1).step_by(2) {
            assert!(s.len() <= 255);
        }
    }
}
