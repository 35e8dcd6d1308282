//! Durable storage: a spool for messages being received and one standard Maildir per account.
//!
//! Layout under the storage root:
//! ```text
//! spool/                          messages being received; never acknowledged, emptied at start
//! mail/<domain>/<local>/{tmp,new,cur}   one Maildir per account, readable by Dovecot, mutt, …
//! ```
//! Delivery (the meaning of SMTP's `250`): the spooled message is fsynced, hard-linked into each
//! recipient's `tmp/`, renamed into `new/`, and `new/` is fsynced; only then is the message acknowledged.
//! A failure removes what was already linked, so the client's retry never meets a half delivery.
//!
//! Messages are stored with LF line endings, as Maildir readers expect. File names follow the Maildir
//! convention `<secs>.M<usec>P<pid>Q<seq>.<host>,S=<octets>,W=<octets in CRLF form>` (the `S=`/`W=` fields
//! as Dovecot writes them), so POP3 sizes are known without opening the file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::accounts::Account;

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
        let path = self.spool_dir().join(&id);
        Ok(Spool {
            file: create_new(&path)?,
            path,
            name: format!("{id}.{}", self.host),
            id,
            size: 0,
            lines: 0,
            delivered: false,
        })
    }
}

/// A message being received. Dropped without [`Spool::deliver`], it removes itself.
#[derive(Debug)]
pub struct Spool {
    file: File,
    path: PathBuf,
    id: String,
    /// Maildir base name (id and host).
    name: String,
    size: u64,
    lines: u64,
    delivered: bool,
}

impl Spool {
    /// The queue id shown in the `250` reply, the `Received:` header and the logs.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Octets written so far (LF form).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends LF-terminated text (no CR: the SMTP session refuses messages with bare CR).
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        self.lines += bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        Ok(())
    }

    /// Makes the message durable in every Maildir, or in none.
    pub fn deliver(mut self, maildirs: &[PathBuf]) -> io::Result<()> {
        self.file.sync_all()?;
        let name = format!("{},S={},W={}", self.name, self.size, self.size + self.lines);
        let mut done: Vec<PathBuf> = Vec::new();
        for dir in maildirs {
            match link_into(&self.path, dir, &name) {
                Ok(path) => done.push(path),
                Err(e) => {
                    for path in &done {
                        let _ = fs::remove_file(path);
                        if let Some(parent) = path.parent() {
                            let _ = fsync_dir(parent);
                        }
                    }
                    return Err(e);
                }
            }
        }
        self.delivered = true;
        let _ = fs::remove_file(&self.path);
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if !self.delivered {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// tmp/ then new/, as the Maildir protocol has it; with link(2) rather than rename(2), so that a name
/// collision fails (EEXIST) instead of replacing a delivered message.
fn link_into(spooled: &Path, maildir: &Path, name: &str) -> io::Result<PathBuf> {
    let tmp = maildir.join("tmp").join(name);
    let new = maildir.join("new").join(name);
    fs::hard_link(spooled, &tmp)?;
    let linked = fs::hard_link(&tmp, &new);
    let _ = fs::remove_file(&tmp);
    if let Err(e) = linked.and_then(|()| fsync_dir(&maildir.join("new"))) {
        if e.kind() != io::ErrorKind::AlreadyExists {
            let _ = fs::remove_file(&new);
        }
        return Err(e);
    }
    Ok(new)
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

/// A message of a mailbox as POP3 sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub path: PathBuf,
    /// Stable unique id (RFC 1939 §7 UIDL: 1-70 characters 0x21-0x7E).
    pub uid: String,
    /// Size in CRLF form, as POP3 reports it.
    pub size: u64,
}

/// Lists `new/` and `cur/` in delivery order (Maildir names start with the delivery time).
pub fn scan(maildir: &Path) -> io::Result<Vec<StoredMessage>> {
    let mut out = Vec::new();
    for sub in ["new", "cur"] {
        let dir = maildir.join(sub);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.file_type()?.is_file() {
                continue;
            }
            let path = entry.path();
            let size = match wire_size_from_name(&name) {
                Some(size) => size,
                None => wire_size_of_file(&path)?,
            };
            out.push(StoredMessage {
                uid: uid_for(&name),
                path,
                size,
            });
        }
    }
    out.sort_by(|a, b| a.path.file_name().cmp(&b.path.file_name()));
    Ok(out)
}

/// Moves the messages of `new/` to `cur/` with an empty info part (`:2,`), as a Maildir reader does once
/// it has seen them: Dovecot and mutt then show them as old rather than new. UIDs do not change.
pub fn take_new(maildir: &Path, messages: Vec<StoredMessage>) -> io::Result<Vec<StoredMessage>> {
    let new_dir = maildir.join("new");
    let mut moved = false;
    let mut vanished = false;
    let mut out = Vec::with_capacity(messages.len());
    for mut m in messages {
        if m.path.parent() == Some(new_dir.as_path()) {
            let mut name = m.path.file_name().unwrap_or_default().to_os_string();
            name.push(":2,");
            let target = maildir.join("cur").join(name);
            match fs::rename(&m.path, &target) {
                Ok(()) => {
                    m.path = target;
                    moved = true;
                }
                // Another reader moved it meanwhile: a fresh scan finds it where it is now.
                Err(e) if e.kind() == io::ErrorKind::NotFound => vanished = true,
                Err(e) => return Err(e),
            }
        }
        out.push(m);
    }
    if moved {
        fsync_dir(&new_dir)?;
        fsync_dir(&maildir.join("cur"))?;
    }
    if vanished {
        return scan(maildir);
    }
    Ok(out)
}

/// Adds the Seen flag (`S`) to a message in `cur/`, keeping the flags in ASCII order as the Maildir
/// convention asks; returns its new path.
pub fn mark_seen(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let (base, flags) = match name.split_once(":2,") {
        Some((base, flags)) => (base.to_string(), flags.to_string()),
        None => (
            name.split(':').next().unwrap_or(&name).to_string(),
            String::new(),
        ),
    };
    if flags.contains('S') {
        return Ok(path.to_path_buf());
    }
    let mut flags: Vec<char> = flags.chars().chain(['S']).collect();
    flags.sort_unstable();
    let flags: String = flags.into_iter().collect();
    let target = path.with_file_name(format!("{base}:2,{flags}"));
    fs::rename(path, &target)?;
    Ok(target)
}

/// The base name (before `:2,flags` and `,S=…`), which stays the same when a reader moves the file
/// from `new/` to `cur/`; hashed if it is not a valid UIDL.
fn uid_for(name: &str) -> String {
    let base = name.split(':').next().unwrap_or(name);
    let base = base.split(',').next().unwrap_or(base);
    if !base.is_empty() && base.len() <= 70 && base.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        base.to_string()
    } else {
        let digest = Sha256::digest(base.as_bytes());
        digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
    }
}

fn wire_size_from_name(name: &str) -> Option<u64> {
    let base = name.split(':').next()?;
    base.split(',')
        .find_map(|field| field.strip_prefix("W=")?.parse().ok())
}

/// For files other tools delivered: bytes plus a CR for every LF that lacks one.
fn wire_size_of_file(path: &Path) -> io::Result<u64> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut buf = [0u8; 64 * 1024];
    let mut size = 0u64;
    let mut prev_cr = false;
    let mut last = b'\n';
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            // POP3 completes a last line that lacks its newline (see pop3::wire): count that too.
            return Ok(size
                + if last == b'\n' {
                    0
                } else if prev_cr {
                    1
                } else {
                    2
                });
        }
        last = buf[n - 1];
        for &b in &buf[..n] {
            size += if b == b'\n' && !prev_cr { 2 } else { 1 };
            prev_cr = b == b'\r';
        }
    }
}

/// Removes messages (POP3's UPDATE state) and fsyncs the directories, so that a reported deletion is
/// durable. A message already gone (another reader moved or removed it) is not an error.
pub fn expunge(maildir: &Path, paths: &[PathBuf]) -> io::Result<()> {
    let mut first_error = None;
    for path in paths {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Moved from new/ to cur/ by another Maildir reader since the scan: find it by uid.
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let uid = uid_for(&name);
                let moved = scan(maildir)
                    .ok()
                    .and_then(|now| now.into_iter().find(|m| m.uid == uid));
                if let Some(Err(e)) = moved.map(|m| fs::remove_file(&m.path)) {
                    first_error.get_or_insert(e);
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    for sub in ["new", "cur"] {
        if let Err(e) = fsync_dir(&maildir.join(sub)) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// An exclusive POP3 lock on a mailbox: `flock` on a file in the Maildir. The kernel drops it when the
/// process dies, so a crash never leaves a stale lock behind.
#[derive(Debug)]
pub struct MailboxLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Takes the lock, or `None` if another session holds it.
pub fn lock(maildir: &Path) -> io::Result<Option<MailboxLock>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(maildir.join("rustmail-pop3.lock"))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(MailboxLock { _lock: lock })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(io::Error::from(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "mx.example.org").unwrap();
        (dir, store)
    }

    fn maildir(store: &Store, name: &str) -> PathBuf {
        let dir = store.root().join("mail/example.org").join(name);
        for sub in ["tmp", "new", "cur"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        dir
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    #[test]
    fn delivery_lands_in_new_of_every_maildir_with_sizes_in_the_name() {
        let (_d, store) = store();
        let (a, b) = (maildir(&store, "a"), maildir(&store, "b"));
        let mut spool = store.spool().unwrap();
        spool.append(b"Subject: x\n\nbody\n").unwrap();
        spool.deliver(&[a.clone(), b.clone()]).unwrap();
        for dir in [&a, &b] {
            let new = files(&dir.join("new"));
            assert_eq!(new.len(), 1);
            assert_eq!(fs::read(&new[0]).unwrap(), b"Subject: x\n\nbody\n");
            assert!(new[0].to_string_lossy().ends_with(",S=17,W=20"));
            assert!(files(&dir.join("tmp")).is_empty());
        }
        assert!(files(&store.root().join("spool")).is_empty());
    }

    #[test]
    fn failed_delivery_leaves_nothing_in_any_new() {
        let (_d, store) = store();
        let good = maildir(&store, "good");
        let broken = maildir(&store, "broken");
        fs::remove_dir(broken.join("new")).unwrap();
        fs::write(broken.join("new"), b"not a directory").unwrap();
        let mut spool = store.spool().unwrap();
        spool.append(b"x\n").unwrap();
        assert!(spool.deliver(&[good.clone(), broken.clone()]).is_err());
        assert!(files(&good.join("new")).is_empty());
        assert!(files(&good.join("tmp")).is_empty() && files(&broken.join("tmp")).is_empty());
        assert!(files(&store.root().join("spool")).is_empty());
    }

    #[test]
    fn name_collision_never_replaces_a_delivered_message() {
        let (_d, store) = store();
        let dir = maildir(&store, "a");
        let mut spool = store.spool().unwrap();
        spool.append(b"new\n").unwrap();
        let name = format!("{},S=4,W=5", spool.name);
        fs::write(dir.join("new").join(&name), b"delivered earlier\n").unwrap();
        assert!(spool.deliver(std::slice::from_ref(&dir)).is_err());
        assert_eq!(
            fs::read(dir.join("new").join(&name)).unwrap(),
            b"delivered earlier\n"
        );
        assert!(files(&dir.join("tmp")).is_empty());
    }

    #[test]
    fn abandoned_spool_removes_itself() {
        let (_d, store) = store();
        let mut spool = store.spool().unwrap();
        spool.append(b"partial\n").unwrap();
        drop(spool);
        assert!(files(&store.root().join("spool")).is_empty());
    }

    #[test]
    fn scan_sizes_and_uids_for_foreign_files() {
        let (_d, store) = store();
        let dir = maildir(&store, "a");
        fs::write(dir.join("cur/1700000000.foreign.host:2,S"), b"a\r\nb\nc").unwrap();
        let mut spool = store.spool().unwrap();
        spool.append(b"x\n").unwrap();
        spool.deliver(std::slice::from_ref(&dir)).unwrap();
        let msgs = scan(&dir).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].uid, "1700000000.foreign.host");
        assert_eq!(msgs[0].size, 9, "a\\r\\nb\\r\\nc\\r\\n as POP3 sends it");
        assert_eq!(msgs[1].size, 3);
        assert!(msgs[1].uid.ends_with(".mx.example.org"));
    }

    #[test]
    fn take_new_moves_to_cur_and_keeps_uids_and_sizes() {
        let (_d, store) = store();
        let dir = maildir(&store, "a");
        let mut spool = store.spool().unwrap();
        spool.append(b"x\n").unwrap();
        spool.deliver(std::slice::from_ref(&dir)).unwrap();
        let before = scan(&dir).unwrap();
        let after = take_new(&dir, before.clone()).unwrap();
        assert!(files(&dir.join("new")).is_empty());
        assert!(after[0].path.starts_with(dir.join("cur")));
        assert!(after[0].path.to_string_lossy().ends_with(":2,"));
        assert_eq!(
            (after[0].uid.as_str(), after[0].size),
            (before[0].uid.as_str(), before[0].size)
        );
        assert_eq!(scan(&dir).unwrap(), after, "a later scan sees the same");
    }

    #[test]
    fn mark_seen_adds_s_in_order() {
        let (_d, store) = store();
        let dir = maildir(&store, "a");
        for (name, expect) in [
            ("1.a:2,", "1.a:2,S"),
            ("2.b:2,FT", "2.b:2,FST"),
            ("3.c:2,S", "3.c:2,S"),
            ("4.d", "4.d:2,S"),
        ] {
            let path = dir.join("cur").join(name);
            fs::write(&path, b"x\n").unwrap();
            let seen = mark_seen(&path).unwrap();
            assert_eq!(seen.file_name().unwrap().to_string_lossy(), expect);
            assert!(seen.exists());
        }
    }

    #[test]
    fn uid_survives_the_move_to_cur() {
        assert_eq!(
            uid_for("123.M1P2Q3.host,S=5,W=6"),
            uid_for("123.M1P2Q3.host,S=5,W=6:2,S")
        );
        assert_eq!(uid_for(&"x".repeat(100)).len(), 32);
    }

    #[test]
    fn expunge_removes_and_tolerates_moved_files() {
        let (_d, store) = store();
        let dir = maildir(&store, "a");
        fs::write(dir.join("new/1.a.h,S=2"), b"x\n").unwrap();
        fs::write(dir.join("cur/2.b.h,S=2:2,S"), b"y\n").unwrap();
        let msgs = scan(&dir).unwrap();
        // Another reader moves the first one to cur/ meanwhile.
        fs::rename(dir.join("new/1.a.h,S=2"), dir.join("cur/1.a.h,S=2:2,S")).unwrap();
        let paths: Vec<_> = msgs.iter().map(|m| m.path.clone()).collect();
        expunge(&dir, &paths).unwrap();
        assert!(scan(&dir).unwrap().is_empty());
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let (_d, store) = store();
        let dir = maildir(&store, "a");
        let first = lock(&dir).unwrap();
        assert!(first.is_some());
        assert!(lock(&dir).unwrap().is_none());
        drop(first);
        assert!(lock(&dir).unwrap().is_some());
    }
}
