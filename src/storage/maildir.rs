//! A Maildir as POP3 sees it: listing with sizes and UIDs (RFC 1939 §7 UIDL), taking `new/` into `cur/`,
//! the Seen flag, deletion, and the lock that keeps one POP3 session per mailbox.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{fsync_dir, open_lock_file};

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
/// The Maildir convention (maildir(5), Dovecot): a file in `tmp/` this old is left over from a delivery
/// that never finished, and may be removed.
pub const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(36 * 3600);

/// Removes the files in `tmp/` older than `age` (by modification time); returns how many. Younger ones
/// may belong to another program delivering into the same Maildir right now.
pub fn clean_tmp(maildir: &Path, age: std::time::Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(maildir.join("tmp")) else {
        return 0;
    };
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let stale = entry
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|elapsed| elapsed >= age);
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

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
            let size = match entry.metadata() {
                Ok(meta) => match wire_size_from_name(&name, meta.len()) {
                    Some(size) => size,
                    None => wire_size_of_file(&path)?,
                },
                // Moved or removed by another Maildir reader since the listing: a later scan finds it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
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
///
/// `cur/` is made durable before `new/`: a power cut between the two fsyncs then leaves a message under
/// both names (one file, two links), never under neither. Such a leftover, a message of `new/` whose
/// UID is in `cur/` already, loses its `new/` name here.
pub fn take_new(maildir: &Path, messages: Vec<StoredMessage>) -> io::Result<Vec<StoredMessage>> {
    let new_dir = maildir.join("new");
    let in_cur: HashSet<String> = messages
        .iter()
        .filter(|m| m.path.parent() != Some(new_dir.as_path()))
        .map(|m| m.uid.clone())
        .collect();
    let mut changed = false;
    let mut vanished = false;
    let mut out = Vec::with_capacity(messages.len());
    for mut m in messages {
        if m.path.parent() == Some(new_dir.as_path()) {
            if in_cur.contains(&m.uid) {
                match fs::remove_file(&m.path) {
                    Ok(()) => changed = true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            let mut name = m.path.file_name().unwrap_or_default().to_os_string();
            name.push(":2,");
            let target = maildir.join("cur").join(name);
            match fs::rename(&m.path, &target) {
                Ok(()) => {
                    m.path = target;
                    changed = true;
                }
                // Another reader moved it meanwhile: a fresh scan finds it where it is now.
                Err(e) if e.kind() == io::ErrorKind::NotFound => vanished = true,
                Err(e) => return Err(e),
            }
        }
        out.push(m);
    }
    if changed {
        fsync_dir(&maildir.join("cur"))?;
        fsync_dir(&new_dir)?;
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

/// The size in CRLF form that a Maildir name states (`,W=`), if the name is consistent with the file:
/// other tools name files too, and a wrong `W=` would make LIST lie. Believed only when `S=` is the
/// file's real length `len` and `len <= W <= 2 * len` (converting LF to CRLF adds at most one octet per
/// octet); otherwise the caller reads the file.
fn wire_size_from_name(name: &str, len: u64) -> Option<u64> {
    let base = name.split(':').next()?;
    let field = |key: &str| {
        // The first part is the unique name, not an info field.
        base.split(',')
            .skip(1)
            .find_map(|field| field.strip_prefix(key)?.parse::<u64>().ok())
    };
    let (stated_len, wire) = (field("S=")?, field("W=")?);
    (stated_len == len && (len..=len.saturating_mul(2)).contains(&wire)).then_some(wire)
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
    let file = open_lock_file(&maildir.join("rustmail-pop3.lock"))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(MailboxLock { _lock: lock })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(io::Error::from(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{files, maildir, store};
    use super::*;

    #[test]
    fn stale_tmp_files_are_removed_and_fresh_ones_kept() {
        let (_d, store) = store();
        let dir = maildir(&store, "a");
        let old = dir.join("tmp/1600000000.M1P1Q1.host");
        let fresh = dir.join("tmp/1800000000.M1P1Q2.host");
        fs::write(&old, b"x\n").unwrap();
        fs::write(&fresh, b"y\n").unwrap();
        let long_ago =
            std::time::SystemTime::now() - STALE_TMP - std::time::Duration::from_secs(60);
        fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        assert_eq!(clean_tmp(&dir, STALE_TMP), 1);
        assert!(!old.exists() && fresh.exists());
    }

    #[test]
    fn scan_sizes_and_uids_for_foreign_files() {
        let (_d, store) = store();
        let dir = maildir(&store, "a");
        fs::write(dir.join("cur/1700000000.foreign.host:2,S"), b"a\r\nb\nc").unwrap();
        let mut spool = store.spool().unwrap();
        spool.append(b"x\n").unwrap();
        spool.deliver(std::slice::from_ref(&dir), None).unwrap();
        let msgs = scan(&dir).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].uid, "1700000000.foreign.host");
        assert_eq!(msgs[0].size, 9, "a\\r\\nb\\r\\nc\\r\\n as POP3 sends it");
        assert_eq!(msgs[1].size, 3);
        assert!(msgs[1].uid.ends_with(".mx.example.org"));
    }

    #[test]
    fn scan_ignores_a_lying_w_in_a_foreign_name() {
        let (_d, store) = store();
        let dir = maildir(&store, "a");
        // Six octets in LF form, nine as POP3 sends them.
        let lies = [
            "1700000001.w-too-big.host,S=6,W=999:2,S",
            "1700000002.w-too-small.host,S=6,W=5:2,",
            "1700000003.s-wrong.host,S=5,W=11:2,",
            "1700000004.no-s.host,W=10:2,",
        ];
        for name in lies {
            fs::write(dir.join("cur").join(name), b"a\nb\nc\n").unwrap();
        }
        // Within the bounds the name is believed without reading the file: that is what W= is for.
        fs::write(
            dir.join("cur/1700000005.plausible.host,S=6,W=10:2,"),
            b"a\nb\nc\n",
        )
        .unwrap();
        let sizes: Vec<u64> = scan(&dir).unwrap().iter().map(|m| m.size).collect();
        assert_eq!(sizes, [9, 9, 9, 9, 10]);
    }

    #[test]
    fn take_new_moves_to_cur_and_keeps_uids_and_sizes() {
        let (_d, store) = store();
        let dir = maildir(&store, "a");
        let mut spool = store.spool().unwrap();
        spool.append(b"x\n").unwrap();
        spool.deliver(std::slice::from_ref(&dir), None).unwrap();
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
    fn a_message_left_in_both_new_and_cur_by_a_power_cut_is_listed_once() {
        let (_d, store) = store();
        let dir = maildir(&store, "a");
        let mut spool = store.spool().unwrap();
        spool.append(b"x\n").unwrap();
        spool.deliver(std::slice::from_ref(&dir), None).unwrap();
        let taken = take_new(&dir, scan(&dir).unwrap()).unwrap();
        // What a cut between the fsync of cur/ and the fsync of new/ leaves: the old name too, and
        // the Seen flag a later session gave the cur/ name.
        let seen = mark_seen(&taken[0].path).unwrap();
        let base = seen
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace(":2,S", "");
        fs::hard_link(&seen, dir.join("new").join(&base)).unwrap();
        assert_eq!(scan(&dir).unwrap().len(), 2);

        let listed = take_new(&dir, scan(&dir).unwrap()).unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(
            listed[0].path, seen,
            "the cur/ name, with its flag, is the one that stays"
        );
        assert!(files(&dir.join("new")).is_empty());
        assert_eq!(scan(&dir).unwrap(), listed);
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
