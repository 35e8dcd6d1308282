//! Passwords: the hash formats rustmail verifies (its own argon2id, and bcrypt and SHA-512-crypt from
//! other servers), hashing and generating passwords, and the secret type that is never printed.

use std::sync::OnceLock;

use argon2::Argon2;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// A password on its way to verification; never printed.
#[derive(PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The password hash formats rustmail verifies: its own argon2 PHC strings, and the crypt(3) formats
/// of other servers and of `mkpasswd`, so that existing hashes can be reused as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    /// `$argon2id$…` (also argon2i/argon2d), PHC format.
    Argon2,
    /// `$2b$…` (also 2a/2y): bcrypt.
    Bcrypt,
    /// `$6$…`: SHA-512-crypt.
    Sha512Crypt,
}

fn scheme_of(hash: &str) -> Option<Scheme> {
    if hash.starts_with("$argon2") {
        Some(Scheme::Argon2)
    } else if ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
        Some(Scheme::Bcrypt)
    } else if hash.starts_with("$6$") {
        Some(Scheme::Sha512Crypt)
    } else {
        None
    }
}

/// Checks a hash's format and parameters, without the cost of a verification (which would slow down
/// every reload).
pub fn check_hash(hash: &str) -> Result<(), String> {
    match scheme_of(hash) {
        Some(Scheme::Argon2) => {
            let parsed =
                PasswordHash::new(hash).map_err(|e| format!("not a PHC password hash ({e})"))?;
            if parsed.hash.is_none() || parsed.salt.is_none() {
                return Err("the hash has no salt or no output".into());
            }
            argon2::Params::try_from(&parsed)
                .map(|_| ())
                .map_err(|e| format!("unusable argon2 parameters ({e})"))
        }
        Some(Scheme::Bcrypt) => hash
            .parse::<bcrypt::HashParts>()
            .map(|_| ())
            .map_err(|e| format!("not a bcrypt hash ({e})")),
        Some(Scheme::Sha512Crypt) => {
            // $6$[rounds=N$]salt$86 characters of crypt base64
            let fields: Vec<&str> = hash.split('$').collect();
            let digest = fields.last().copied().unwrap_or("");
            let ok = (fields.len() == 4 || (fields.len() == 5 && fields[2].starts_with("rounds=")))
                && digest.len() == 86
                && digest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/');
            if ok { Ok(()) } else { Err("not a SHA-512-crypt ($6$) hash".into()) }
        }
        None => Err(
            "unsupported hash format; use argon2id (`rustmail hash-password`), bcrypt ($2b$) or SHA-512-crypt ($6$, `mkpasswd -m sha-512`)"
                .into(),
        ),
    }
}

pub(super) fn verify_password(hash: &str, password: &[u8]) -> bool {
    match scheme_of(hash) {
        Some(Scheme::Argon2) => PasswordHash::new(hash)
            .and_then(|parsed| Argon2::default().verify_password(password, &parsed))
            .is_ok(),
        Some(Scheme::Bcrypt) => bcrypt::verify(password, hash).unwrap_or(false),
        Some(Scheme::Sha512Crypt) => {
            std::str::from_utf8(password).is_ok_and(|p| sha_crypt::sha512_check(p, hash).is_ok())
        }
        None => false,
    }
}

/// A hash with our default parameters, verified against for unknown users so that they cost the same.
pub(crate) fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password(b"rustmail timing equaliser"))
}

/// An argon2id PHC string with the crate's default (OWASP-recommended) parameters and a random salt.
pub fn hash_password(password: &[u8]) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password, &salt)
        .expect("argon2 with default parameters accepts any password")
        .to_string()
}

/// A random password of 16 characters from an unambiguous 32-letter alphabet (80 bits).
pub fn generate_password() -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghjkmnpqrstuvwxyz23456789A";
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    // 256 is a multiple of 32, so `% 32` is unbiased.
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(b % 32)] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_and_sha512_crypt_hashes_from_other_servers_work() {
        let bcrypt_hash = bcrypt::hash("secret", 4).unwrap();
        let sha512 =
            sha_crypt::sha512_simple("secret", &sha_crypt::Sha512Params::new(5000).unwrap())
                .unwrap();
        for hash in [bcrypt_hash, sha512] {
            check_hash(&hash).unwrap();
            assert!(verify_password(&hash, b"secret"), "{hash}");
            assert!(!verify_password(&hash, b"wrong"), "{hash}");
        }
        assert!(check_hash("$6$salt$short").is_err());
        assert!(check_hash("$1$md5$isnotaccepted").is_err());
    }

    #[test]
    fn generated_passwords_differ() {
        let a = generate_password();
        assert_eq!(a.len(), 16);
        assert_ne!(a, generate_password());
    }
}
