//! Durable storage: a spool for messages being received and one standard Maildir per account.
//!
//! Layout under the storage root:
//! ```text
//! .rustmail.lock                  held (flock) by the instance using this root: one instance per root
//! spool/                          messages being received; never acknowledged, emptied at start
//! mail/<domain>/<local>/{tmp,new,cur}   one Maildir per account, readable by Dovecot, mutt, …
//! journal/                       the delivery journal (`journal.rs`): segments of committed messages
//! ```
//! Delivery (the meaning of SMTP's `250`): a small message for local recipients only is committed to
//! the journal (one `fdatasync` shared by every message committed meanwhile), then hard-linked into
//! each recipient's `tmp/` and `new/`; the journal's settling thread makes the Maildir copies durable
//! shortly after and a restart replays what it had not. Any other message is delivered directly: the
//! spooled message is fsynced, hard-linked into each recipient's `tmp/` (or copied there and fsynced,
//! if the Maildir is on another file system), moved into `new/`, and `new/` is fsynced (one fsync
//! shared by the deliveries waiting for it: group commit). Either way the message is acknowledged only
//! once it survives a power cut. A failure removes what was already delivered, so the client's retry
//! never meets a half delivery.
//!
//! Messages are stored with LF line endings, as Maildir readers expect. File names follow the Maildir
//! convention `<secs>.M<usec>P<pid>Q<seq>.<host>,S=<octets>,W=<octets in CRLF form>` (the `S=`/`W=` fields
//! as Dovecot writes them), so POP3 sizes are known without opening the file.
//!
//! This file holds the [`Store`] (the layout, and the helpers every part shares); receiving and delivery
//! are in `spool.rs`, the journal in `journal.rs`, reading and changing a Maildir as POP3 does in
//! `maildir.rs`.

mod group_sync;
mod journal;
mod maildir;
pub mod queue;
mod spool;

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::accounts::Account;

pub use maildir::{
    MailboxLock, STALE_TMP, StoredMessage, clean_tmp, expunge, lock, mark_seen, scan, take_new,
};
pub use spool::{IN_MEMORY, Spool};

#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// The host part of Maildir names, with `/`, `:` and `,` escaped as the Maildir convention asks.
    host: String,
    seq: AtomicU64,
    /// Group commit of small local deliveries (`journal.rs`). Dropped before the lock.
    journal: Option<journal::Journal>,
    /// Held for the life of the store: see [`lock_root`].
    _lock: Flock<File>,
}

impl Store {
    /// Opens (creating if needed) the storage root, empties the spool and checks that it is writable.
    /// Fails if another instance has the root open.
    pub fn open(root: &Path, hostname: &str) -> io::Result<Store> {
        ensure_dir_all(root)?;
        let mut store = Store {
            _lock: lock_root(root)?,
            journal: None,
            root: root.to_path_buf(),
            host: hostname
                .replace('/', "\\057")
                .replace(':', "\\072")
                .replace(',', "\\054"),
            seq: AtomicU64::new(0),
        };
        for dir in [store.spool_dir(), root.join("mail")] {
            ensure_dir(&dir)?;
        }
        for entry in fs::read_dir(store.spool_dir())? {
            // Leftovers of a crash during DATA: never acknowledged, so safe to drop.
            let _ = fs::remove_file(entry?.path());
        }
        store.probe()?;
        // After the probe: a store that cannot be written is refused for that, with its message. The
        // replay of what a crash left unsettled must succeed, or acknowledged mail could be missing.
        let (journal, replayed) = journal::Journal::open(root).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot open or replay the delivery journal {}: {e}",
                    root.join("journal").display()
                ),
            )
        })?;
        if replayed > 0 {
            tracing::warn!(
                replayed,
                "the delivery journal put back {replayed} message copies a crash had left unsettled"
            );
        }
        store.journal = Some(journal);
        Ok(store)
    }

    /// Returns once every message acknowledged so far is durable in its Maildirs without the journal:
    /// POP3 calls it before deleting, so that a crash never brings deleted mail back.
    pub fn barrier(&self) -> io::Result<()> {
        self.journal
            .as_ref()
            .map_or(Ok(()), |j| j.inner().barrier())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn spool_dir(&self) -> PathBuf {
        self.root.join("spool")
    }

    /// Proves the store is writable and the disk answers: write, fsync and remove a small file.
    /// A full file system (or quota) is not a broken store: the disk answered, SMTP says `452 4.3.1`
    /// until space returns, and POP3 must keep working so that users can make room. Refusing to start,
    /// or failing the watchdog's health check, would only turn a full disk into a restart loop.
    pub fn probe(&self) -> io::Result<()> {
        let path = self
            .spool_dir()
            .join(format!(".probe-{}", std::process::id()));
        let result = create_new(&path).and_then(|mut file| {
            let written = file.write_all(b"ok\n").and_then(|()| file.sync_all());
            let removed = fs::remove_file(&path);
            written.and(removed)
        });
        match result {
            Err(e) if is_full(&e) => {
                tracing::warn!(root = %self.root.display(), "the storage is full: new mail gets 452 4.3.1 until space returns");
                let _ = fs::remove_file(&path);
                Ok(())
            }
            other => other,
        }
    }

    /// Whether a message of `size` octets can never be stored: it is larger than the whole file system
    /// holding the storage root, so no amount of freed space helps (SMTP then says 552, not 452).
    /// Quotas are not known here: a quota that is full stays a temporary refusal.
    pub fn never_fits(&self, size: u64) -> bool {
        nix::sys::statvfs::statvfs(&self.root).is_ok_and(|fs| {
            // fsblkcnt_t and c_ulong are u64 on 64-bit Linux; `as` keeps 32-bit targets building.
            #[allow(clippy::unnecessary_cast)]
            let total = (fs.blocks() as u64).saturating_mul(fs.fragment_size() as u64);
            total > 0 && size >= total
        })
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
            ensure_dir(&path)?;
        }
        Ok(dir)
    }

    /// Starts receiving a message into the spool (its file is created at the first write).
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
        Spool::create(self.spool_dir().join(&id), id, name, self.journal.as_ref())
    }
}

/// Locks the storage root for this instance, before the spool is emptied: a second instance on the same
/// root would otherwise delete the messages the first one is receiving. An flock, so the kernel drops it
/// when the process dies and a crash never leaves a stale lock.
fn lock_root(root: &Path) -> io::Result<Flock<File>> {
    let path = root.join(".rustmail.lock");
    match Flock::lock(open_lock_file(&path)?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, Errno::EWOULDBLOCK)) => Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "another rustmail instance uses the storage root {} (it holds the lock on {})",
                root.display(),
                path.display()
            ),
        )),
        Err((_, errno)) => Err(errno.into()),
    }
}

/// Opens a file to flock, creating it owner-only like every file of the store; one that exists already
/// is used as it is.
fn open_lock_file(path: &Path) -> io::Result<File> {
    match create_new(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            OpenOptions::new().write(true).open(path)
        }
        created => created,
    }
}

/// Mail is private: every directory the store creates is 0700 and every file 0600, whatever the umask.
/// The packaged unit sets `UMask=0077`; run any other way, nothing else keeps local users out of the mail.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Creates `path` unless it is a directory already, and makes its creation durable: without the fsync
/// of the parent, a crash could lose a directory that a later acknowledged message went into.
fn ensure_dir(path: &Path) -> io::Result<()> {
    match create_dir(path) {
        Ok(()) => fsync_dir(parent_of(path)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// [`ensure_dir`] for `path` and its missing ancestors (the storage root may be new): owner-only (0700)
/// and durable.
pub fn ensure_dir_all(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        ensure_dir_all(parent)?;
    }
    ensure_dir(path)
}

/// The directory that holds `path` (`.` for a bare relative name such as the default storage root).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Creates one owner-only directory. The umask can only take bits away from the mode asked for, so the
/// directory is never more open than 0700; the chmod gives back owner bits that a strict umask took.
fn create_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(path)?;
    let chmod = fs::set_permissions(path, Permissions::from_mode(DIR_MODE));
    if chmod.is_err() {
        let _ = fs::remove_dir(path);
    }
    chmod
}

/// Creates a new owner-only file (O_EXCL), for writing and reading back; the chmod as in [`create_dir`].
fn create_new(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    if let Err(e) = file.set_permissions(Permissions::from_mode(FILE_MODE)) {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

/// ENOSPC or EDQUOT: the file system or the quota is full.
pub fn is_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Makes the names in `dir` durable: the entries created, renamed or removed there before the call.
/// Concurrent calls for one directory share an fsync (group commit, `group_sync.rs`): sixteen
/// deliveries into one `new/` wait for one or two fsyncs of it rather than for sixteen in a row.
/// Blocks: called on the store's threads only.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    static DIRECTORIES: LazyLock<group_sync::GroupSync> = LazyLock::new(Default::default);
    #[cfg(test)]
    tests::FSYNCED.with_borrow_mut(|dirs| dirs.push(dir.to_path_buf()));
    DIRECTORIES.sync(dir, |dir| File::open(dir)?.sync_all())
}

/// What the tests of every part of the store share, and the tests of the store itself.
#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use super::*;
    use crate::accounts::Directory;
    use crate::config::SecretFiles;
    use crate::config::{AccountConfig, Config};

    thread_local! {
        /// Every directory [`fsync_dir`] was asked to sync on this thread (each test has its own).
        pub(super) static FSYNCED: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
    }

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

    pub(super) fn account(address: &str) -> Arc<Account> {
        let (_, domain) = address.split_once('@').unwrap();
        let unread = AccountConfig {
            password_hash_file: Some("/not-read".into()),
            ..AccountConfig::default()
        };
        let config = Config {
            accounts: BTreeMap::from([(address.to_string(), unread)]),
            ..Config::default()
        };
        let domains = BTreeSet::from([domain.to_string()]);
        let directory = Directory::from_config(&config, &domains, SecretFiles::Skip).unwrap();
        directory.account(address).unwrap().clone()
    }

    /// The permission bits, in octal as `ls -l` users read them.
    fn mode(path: &Path) -> String {
        format!(
            "{:o}",
            fs::metadata(path).unwrap().permissions().mode() & 0o7777
        )
    }

    /// A message that gets a spool file as soon as it is appended.
    pub(super) fn too_large_for_memory() -> Vec<u8> {
        let mut message = vec![b'x'; IN_MEMORY];
        message.push(b'\n');
        message
    }

    /// Sets the process's umask, and puts the previous one back when dropped (even by a failing test).
    struct Umask(libc::mode_t);

    impl Umask {
        fn set(mask: libc::mode_t) -> Umask {
            // SAFETY: umask(2) cannot fail and touches no memory. It is process-wide: tests running
            // meanwhile on other threads create their files more open, which harms no test.
            Umask(unsafe { libc::umask(mask) })
        }
    }

    impl Drop for Umask {
        fn drop(&mut self) {
            // SAFETY: as in Umask::set.
            unsafe { libc::umask(self.0) };
        }
    }

    #[test]
    fn mail_is_private_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        let (maildir, spooled, messages, pop3_lock);
        {
            let _open = Umask::set(0);
            let store = Store::open(&root, "mx.example.org").unwrap();
            maildir = store.ensure_maildir(&account("alice@example.org")).unwrap();
            // One message large enough for a spool file, one written from memory into tmp/.
            let mut spool = store.spool().unwrap();
            spool.append(&too_large_for_memory()).unwrap();
            spooled = mode(&root.join("spool").join(spool.id()));
            spool.deliver(std::slice::from_ref(&maildir), None).unwrap();
            let mut spool = store.spool().unwrap();
            spool.append(b"x\n").unwrap();
            spool.deliver(std::slice::from_ref(&maildir), None).unwrap();
            messages = files(&maildir.join("new"));
            pop3_lock = lock(&maildir).unwrap();
        }
        assert!(pop3_lock.is_some());
        let dirs = [
            "",
            "spool",
            "mail",
            "mail/example.org",
            "mail/example.org/alice",
        ];
        let subs = ["tmp", "new", "cur"].map(|sub| maildir.join(sub));
        for path in dirs.iter().map(|d| root.join(d)).chain(subs) {
            assert_eq!(mode(&path), "700", "{}", path.display());
        }
        assert_eq!(spooled, "600", "the spool file");
        let locks = [
            root.join(".rustmail.lock"),
            maildir.join("rustmail-pop3.lock"),
        ];
        assert_eq!(messages.len(), 2);
        for path in locks.into_iter().chain(messages) {
            assert_eq!(mode(&path), "600", "{}", path.display());
        }
    }

    #[test]
    fn only_a_message_larger_than_the_file_system_never_fits() {
        let (_d, store) = store();
        let fs = nix::sys::statvfs::statvfs(store.root()).unwrap();
        #[allow(clippy::unnecessary_cast)]
        let total = fs.blocks() as u64 * fs.fragment_size() as u64;
        assert!(!store.never_fits(1));
        assert!(!store.never_fits(total - 1));
        assert!(store.never_fits(total));
    }

    #[test]
    fn second_instance_on_one_root_is_refused_and_spares_the_first_ones_spool() {
        let (dir, first) = store();
        let mut receiving = first.spool().unwrap();
        receiving.append(&too_large_for_memory()).unwrap();
        let spooled = dir.path().join("spool").join(receiving.id());

        let err = Store::open(dir.path(), "mx.example.org").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
        let message = err.to_string();
        assert!(message.contains("another rustmail instance"), "{message}");
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(
            spooled.exists(),
            "the first instance's message is still in the spool"
        );

        let maildir = maildir(&first, "a");
        receiving
            .deliver(std::slice::from_ref(&maildir), None)
            .unwrap();
        drop(first);
        Store::open(dir.path(), "mx.example.org").expect("the lock goes with the store");
    }

    #[test]
    fn new_directories_are_made_durable_in_their_parents() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("srv/rustmail");
        FSYNCED.take();
        let store = Store::open(&root, "mx.example.org").unwrap();
        let maildir = store.ensure_maildir(&account("alice@example.org")).unwrap();
        let synced = FSYNCED.take();
        // The directories that gained an entry: the temporary one (srv/), srv/ (the root), the root
        // (spool/, mail/), mail/ (the domain), the domain (the Maildir), the Maildir (tmp/, new/, cur/).
        let parents = [
            dir.path().to_path_buf(),
            root.parent().unwrap().to_path_buf(),
            root.clone(),
            root.join("mail"),
            root.join("mail/example.org"),
            maildir,
        ];
        for parent in parents {
            assert!(
                synced.contains(&parent),
                "{} not in {synced:?}",
                parent.display()
            );
        }
    }

    #[test]
    fn a_relative_root_is_made_durable_in_the_working_directory() {
        assert_eq!(parent_of(Path::new("rustmail-data")), Path::new("."));
        assert_eq!(parent_of(Path::new("state/mail")), Path::new("state"));
        assert_eq!(
            parent_of(Path::new("/var/lib/rustmail")),
            Path::new("/var/lib")
        );
    }
}
