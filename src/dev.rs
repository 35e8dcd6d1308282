//! The development default that `rustmail serve` runs without `--config`: the built-in defaults
//! (loopback ports, `./rustmail-data`, domain `localhost`) plus a demo account whose password is
//! generated on first start, printed once, and kept only as a hash.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;

use crate::accounts::{generate_password, hash_password};
use crate::config::{AccountConfig, Config};

pub const HASH_FILE: &str = "demo-password.hash";

/// Adds `demo@<first domain>` when no account is configured. With `announce`, tells the user how to
/// log in (the password itself only when it was just generated).
pub fn add_demo_account(config: &mut Config, announce: bool) -> io::Result<()> {
    if !config.accounts.is_empty() {
        return Ok(());
    }
    let domain = config
        .domains
        .first()
        .cloned()
        .unwrap_or_else(|| "localhost".into());
    let address = format!("demo@{domain}");
    // Owner-only like everything the store creates (the demo state holds a password hash and mail).
    crate::storage::ensure_dir_all(&config.storage_root)?;
    let path = config.storage_root.join(HASH_FILE);
    let new_password = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut file) => {
            let password = generate_password();
            file.write_all(format!("{}\n", hash_password(password.as_bytes())).as_bytes())?;
            file.sync_all()?;
            Some(password)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
        Err(e) => return Err(e),
    };
    if announce {
        let mut out = io::stdout().lock();
        writeln!(
            out,
            "rustmail development mode (no --config): SMTP {}, POP3 {}, state in {}",
            config.listen.smtp.join(" "),
            config.listen.pop3.join(" "),
            config.storage_root.display()
        )?;
        writeln!(out, "  demo account: {address}")?;
        match &new_password {
            Some(p) => writeln!(
                out,
                "  password: {p}   (shown only this once; its hash is in {})",
                path.display()
            )?,
            None => writeln!(
                out,
                "  password: shown at first start; delete {} and restart for a new one",
                path.display()
            )?,
        }
        out.flush()?;
    }
    config.accounts.insert(
        address,
        AccountConfig {
            password_hash_file: Some(path),
            ..AccountConfig::default()
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn demo_state_is_owner_only() {
        // Before: the storage root was made with create_dir_all (0755 under the usual umask).
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            storage_root: dir.path().join("a/rustmail-data"),
            ..Config::default()
        };
        add_demo_account(&mut config, false).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&config.storage_root), 0o700);
        assert_eq!(mode(&config.storage_root.join(HASH_FILE)), 0o600);
        assert!(config.accounts.contains_key("demo@localhost"));
    }
}
