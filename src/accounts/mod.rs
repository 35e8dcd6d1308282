//! Accounts: who receives mail here and who may log in. `address` holds the address syntax (the
//! normal form of domains, what a configured address may look like), `directory` the account
//! directory and the routing of recipients, `passwords` the hash formats and their verification.
//! Nothing here reads the configuration: `config` builds the directory, so the dependency runs one
//! way only (config → accounts).

mod address;
mod directory;
mod passwords;

pub use address::{is_valid_domain, normalize_domain, split_config_address};
pub use directory::{Directory, Route};
pub(crate) use passwords::dummy_hash;
pub use passwords::{Secret, check_hash, generate_password, hash_password};

use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, Eq)]
pub struct Account {
    /// Canonical (lower-case) address, also the POP3 user name.
    pub address: String,
    pub local: String,
    pub domain: String,
    password_hash: String,
    apop_secret: Option<String>,
}

/// By hand, so that neither the password hash nor the APOP secret (kept in clear) reaches a log line
/// or a panic message through `{:?}` of an account, a route or a session.
impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("address", &self.address)
            .field("local", &self.local)
            .field("domain", &self.domain)
            .field("password_hash", &"<redacted>")
            .field(
                "apop_secret",
                &self.apop_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Account {
    /// The account `local@domain` (both already in normal form, see [`split_config_address`]).
    pub(crate) fn new(
        local: String,
        domain: String,
        password_hash: String,
        apop_secret: Option<String>,
    ) -> Account {
        Account {
            address: format!("{local}@{domain}"),
            local,
            domain,
            password_hash,
            apop_secret,
        }
    }

    /// The account's Maildir, relative to the storage root: `mail/<domain>/<local>`.
    pub fn maildir(&self) -> PathBuf {
        Path::new("mail").join(&self.domain).join(&self.local)
    }
}
