//! Durable storage: a spool for messages being received and one standard Maildir per account.
//!
//! Layout under the storage root:
//! ```text
//! spool/                          messages being received; never acknowledged, emptied at start
//! mail/<domain>/<local>/{tmp,new,cur}   one Maildir per account, readable by Dovecot, mutt, …
//! ```
//! Delivery (the meaning of SMTP's `250`): the spooled message is fsynced, hard-linked into each
//! recipient's `tmp/` (or copied there and fsynced, if the Maildir is on another file system), moved into
//! `new/`, and `new/` is fsynced; only then is the message acknowledged. A failure removes what was
//! already delivered, so the client's retry never meets a half delivery.
//!
//! Messages are stored with LF line endings, as Maildir readers expect. File names follow the Maildir
//! convention `<secs>.M<usec>P<pid>Q<seq>.<host>,S=<octets>,W=<octets in CRLF form>` (the `S=`/`W=` fields
//! as Dovecot writes them), so POP3 sizes are known without opening the file.
//!
//! This file holds the [`Store`] (the layout, and the helpers every part shares); receiving and delivery
//! are in `spool.rs`, reading and changing a Maildir as POP3 does in `maildir.rs`.

mod maildir;
mod spool;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::accounts::Account;

pub use maildir::{MailboxLock, StoredMessage, expunge, lock, mark_seen, scan, take_new};
pub use spool::Spool;

#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// The host part of Maildir names, with `/`, `:` and `,` escaped as the Maildir convention asks.
    host: String,
    seq: AtomicU64,
}

impl Store {
    /// Opens (creating if needed) the storage root, empties the spool and checks that it is writable.
    pub fn open(root: &Path, hostname: &str) -> io::Result<Store> {
        let store = Store {
            root: root.to_path_buf(),
            host: hostname
                .replace('/', "\\057")
                .replace(':', "\\072")
                .replace(',', "\\054"),
            seq: AtomicU64::new(0),
        };
        for dir in [store.spool_dir(), root.join("mail")] {
            fs::create_dir_all(&dir)?;
        }
        for entry in fs::read_dir(store.spool_dir())? {
            // Leftovers of a crash during DATA: never acknowledged, so safe to drop.
            let _ = fs::remove_file(entry?.path());
        }
        store.probe()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn spool_dir(&self) -> PathBuf {
        self.root.join("spool")
    }

    /// Proves the store is writable and the disk answers: write, fsync and remove a small file.
    pub fn probe(&self) -> io::Result<()> {
        let path = self
            .spool_dir()
            .join(format!(".probe-{}", std::process::id()));
        let mut file = create_new(&path)?;
        let result = file.write_all(b"ok\n").and_then(|()| file.sync_all());
        fs::remove_file(&path)?;
        result
    }

    pub fn maildir(&self, account: &Account) -> PathBuf {
        self.root.join(account.maildir())
    }

    /// Creates the account's Maildir if it does not exist yet. Each directory created is made durable
    /// in its parent, so that a message acknowledged into a brand-new Maildir survives a crash.
    pub fn ensure_maildir(&self, account: &Account) -> io::Result<PathBuf> {
        let dir = self.maildir(account);
        if ["cur", "new", "tmp"]
            .iter()
            .all(|sub| dir.join(sub).is_dir())
        {
            return Ok(dir);
        }
        let domain = self.root.join("mail").join(&account.domain);
        for path in [
            domain,
            dir.clone(),
            dir.join("tmp"),
            dir.join("new"),
            dir.join("cur"),
        ] {
            match fs::create_dir(&path) {
                Ok(()) => fsync_dir(path.parent().expect("a Maildir path has a parent"))?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(dir)
    }

    /// Starts receiving a message into the spool.
    pub fn spool(&self) -> io::Result<Spool> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let id = format!(
            // Zero-padded microseconds keep the names of one second in delivery order.
            "{}.M{:06}P{}Q{}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            seq
        );
        let name = format!("{id}.{}", self.host);
        Spool::create(self.spool_dir().join(&id), id, name)
    }
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What the tests of every part of the store share.
#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "mx.example.org").unwrap();
        (dir, store)
    }

    pub(super) fn maildir(store: &Store, name: &str) -> PathBuf {
        let dir = store.root().join("mail/example.org").join(name);
        for sub in ["tmp", "new", "cur"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        dir
    }

    pub(super) fn files(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }
}
