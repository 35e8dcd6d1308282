//! Receiving a message into the spool, and delivering it into Maildirs all at once or not at all.
//!
//! A message smaller than [`IN_MEMORY`] is held in memory until it is complete and never gets a spool
//! file: committed to the journal, it is written once into an unnamed file (`O_TMPFILE`) on the first
//! recipient's file system and linked from there into every `new/`: one directory operation per
//! Maildir, where a spool file took five (each of which can wait for the file system's own journal, and
//! every one of them takes the directory's lock that all connections delivering to that Maildir share).
//! Without `O_TMPFILE` (or without `/proc`, through which the unnamed file is linked) it is written into
//! `tmp/` instead. Larger messages, and any message the journal does not take, go through a spool file.
//!
//! Delivery hard-links the written file into each Maildir, so a message to many local recipients is
//! written once. A Maildir on another file system (or on one without hard links) gets a copy instead,
//! with the same discipline: written in `tmp/`, fsynced, moved into `new/`, `new/` fsynced.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::journal::{self, Journal};
use super::queue::{Entry, Queue};
use super::{create_new, fsync_dir};

/// Messages below this size (LF form) stay in memory until delivery; the SMTP session also writes what
/// it has buffered in chunks of this size, so a connection holds at most about this much.
#[cfg(not(test))]
pub const IN_MEMORY: usize = 256 << 10;
#[cfg(test)]
pub const IN_MEMORY: usize = 4 << 10;

/// A message being received. It is held in memory while it is small; its spool file is created when it
/// outgrows [`IN_MEMORY`] or must be delivered the direct way. Dropped without [`Spool::deliver`], it
/// removes its file.
#[derive(Debug)]
pub struct Spool {
    file: Option<File>,
    /// Every octet so far, while there is no file.
    memory: Vec<u8>,
    path: PathBuf,
    id: String,
    /// Maildir base name (id and host).
    name: String,
    size: u64,
    lines: u64,
    eight_bit: bool,
    delivered: bool,
    /// The store's journal, when it has one: small local deliveries are committed there.
    journal: Option<Arc<journal::Inner>>,
}

impl Spool {
    /// `path` is in the spool; `name` is the Maildir base name (id and host).
    pub(super) fn create(
        path: PathBuf,
        id: String,
        name: String,
        journal: Option<&Journal>,
    ) -> io::Result<Spool> {
        Ok(Spool {
            journal: journal.map(Journal::inner),
            file: None,
            memory: Vec::new(),
            path,
            name,
            id,
            size: 0,
            lines: 0,
            eight_bit: false,
            delivered: false,
        })
    }

    /// The queue id shown in the `250` reply, the `Received:` header and the logs.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The message as stored so far, for a report that returns it: whole (`full`) or its first 64 KiB.
    pub fn original(&self, full: bool) -> Vec<u8> {
        let limit = if full { usize::MAX } else { 64 * 1024 };
        match &self.file {
            None => self.memory[..self.memory.len().min(limit)].to_vec(),
            Some(_) => crate::delivery::read_original(&self.path, full),
        }
    }

    /// Octets written so far (LF form).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Line count (LF) so far: the CRLF size is `size() + lines()`.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Size, line count and 8-bitness as they will be once `more` is appended.
    pub fn stats_with(&self, more: &[u8]) -> (u64, u64, bool) {
        (
            self.size + more.len() as u64,
            self.lines + more.iter().filter(|&&b| b == b'\n').count() as u64,
            self.eight_bit || !more.is_ascii(),
        )
    }

    /// Whether any octet above 127 was written (8BITMIME content).
    pub fn eight_bit(&self) -> bool {
        self.eight_bit
    }

    /// The spool file, created (O_EXCL, 0600) on first use with what memory held.
    fn file(&mut self) -> io::Result<&File> {
        if self.file.is_none() {
            self.file = Some(write_new(&self.path, &self.memory)?);
            self.memory = Vec::new();
        }
        Ok(self.file.as_ref().expect("just created"))
    }

    /// Appends LF-terminated text (no CR: the SMTP session refuses messages with bare CR).
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.file.is_none() && self.memory.len() + bytes.len() < IN_MEMORY {
            self.memory.extend_from_slice(bytes);
        } else {
            self.file()?.write_all(bytes)?;
        }
        self.size += bytes.len() as u64;
        self.lines += bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        self.eight_bit |= !bytes.is_ascii();
        Ok(())
    }

    /// Makes the message durable in every Maildir and, when given, in the outbound queue with its
    /// entry; or in none of them.
    pub fn deliver(self, maildirs: &[PathBuf], queued: Option<(&Queue, &Entry)>) -> io::Result<()> {
        self.deliver_with(maildirs, queued, hard_link, true)
    }

    /// [`Spool::deliver`] with link(2) injected, so that tests can play a file system that refuses it,
    /// and `unnamed`: whether it may try `O_TMPFILE` (a test of a file system without it says no).
    fn deliver_with(
        mut self,
        maildirs: &[PathBuf],
        queued: Option<(&Queue, &Entry)>,
        link: Link,
        unnamed: bool,
    ) -> io::Result<()> {
        let name = format!("{},S={},W={}", self.name, self.size, self.size + self.lines);
        if queued.is_none()
            && self.size <= journal::MAX_MESSAGE
            && !maildirs.is_empty()
            && let Some(journal) = self.journal.clone()
            && self.deliver_journalled(&journal, maildirs, &name, link, unnamed)?
        {
            return Ok(());
        }
        self.file()?.sync_all()?;
        // Queued first: a failure after it takes the entry back out (a crash leaves a duplicate for the
        // remote recipients of a message the client will send again, never a loss).
        if let Some((queue, entry)) = queued {
            queue.enqueue(&self.path, entry)?;
        }
        let mut done: Vec<PathBuf> = Vec::new();
        for dir in maildirs {
            match deliver_into(&self.path, dir, &name, link) {
                Ok(path) => done.push(path),
                Err(e) => {
                    if let Some((queue, entry)) = queued {
                        let _ = queue.remove(&entry.id);
                    }
                    take_back(&done);
                    return Err(e);
                }
            }
        }
        self.delivered = true;
        let _ = fs::remove_file(&self.path);
        Ok(())
    }

    /// Commits the message to the journal (durable once this returns `Ok(true)`), links it into every
    /// Maildir and leaves the fsyncs there to the journal's settling thread. `Ok(false)`: not
    /// journalled (no room, or a Maildir that cannot be hard-linked into), nothing done: deliver it the
    /// direct way. A failure after the commit takes the links back out and cancels the commit.
    fn deliver_journalled(
        &mut self,
        journal: &journal::Inner,
        maildirs: &[PathBuf],
        name: &str,
        link: Link,
        unnamed: bool,
    ) -> io::Result<bool> {
        let in_memory = self.file.is_none();
        let seq = if in_memory {
            journal.commit(maildirs, name, &self.memory)?
        } else {
            let mut body = vec![0; self.size as usize];
            self.file()?.read_exact_at(&mut body, 0)?;
            journal.commit(maildirs, name, &body)?
        };
        let Some(seq) = seq else {
            return Ok(false);
        };
        // Whatever way this returns (a panic included) without handing the message to the settling
        // thread, the commit is cancelled: a commit left open would hold back every checkpoint.
        let commit = Uncommitted { journal, seq };
        // The file every new/ links to (a complete file: linking it is as atomic for readers as the
        // move from tmp/): the spool file; or, held in memory, an unnamed file on the first Maildir's
        // file system; or one written into its tmp/, whose new/ it goes into last (a file system
        // without hard links can only rename it).
        let tmp = maildirs[0].join("tmp");
        let unnamed = if in_memory && unnamed {
            write_unnamed(&tmp, &self.memory)?
        } else {
            None
        };
        let through_proc = unnamed.is_some();
        let (file, source, named_in_first) = match unnamed {
            Some((file, path)) => (file, path, false),
            None if in_memory => {
                let path = tmp.join(name);
                (write_new(&path, &self.memory)?, path, true)
            }
            None => (self.file()?.try_clone()?, self.path.clone(), false),
        };
        let others = if named_in_first {
            &maildirs[1..]
        } else {
            maildirs
        };
        let mut done: Vec<PathBuf> = Vec::new();
        let mut linked = others.iter().try_for_each(|dir| {
            let new = dir.join("new").join(name);
            link(&source, &new)?;
            done.push(new);
            Ok(())
        });
        if named_in_first {
            let new = maildirs[0].join("new").join(name);
            linked = linked.and_then(|()| publish(&source, &new, link));
            if linked.is_ok() {
                done.push(new);
            }
            let _ = fs::remove_file(&source);
        }
        if let Err(e) = linked {
            take_back(&done);
            // ENOENT through /proc: a /proc that does not show this process's descriptors (or a
            // Maildir gone); the direct way then delivers, or fails with the Maildir's own error.
            let retry = cannot_link(&e) || (through_proc && e.kind() == io::ErrorKind::NotFound);
            return if retry { Ok(false) } else { Err(e) };
        }
        std::mem::forget(commit);
        journal.settle(seq, file, name, maildirs);
        self.delivered = true;
        if !in_memory {
            let _ = fs::remove_file(&self.path);
        }
        Ok(true)
    }
}

/// A journal commit not yet handed to the settling thread: cancelled when dropped.
struct Uncommitted<'a> {
    journal: &'a journal::Inner,
    seq: u64,
}

impl Drop for Uncommitted<'_> {
    fn drop(&mut self) {
        self.journal.cancel(self.seq);
    }
}

/// Removes the messages of a delivery that failed part way, durably: a name another delivery's fsync
/// made durable must not come back after a crash.
fn take_back(done: &[PathBuf]) {
    for path in done {
        let _ = fs::remove_file(path);
        if let Some(parent) = path.parent() {
            let _ = fsync_dir(parent);
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if !self.delivered && self.file.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// link(2), or what a test puts in its place.
type Link = fn(&Path, &Path) -> io::Result<()>;

/// tmp/ then new/, as the Maildir protocol has it; with link(2) rather than rename(2), so that a name
/// collision fails (EEXIST) instead of replacing a delivered message. Where the spool file cannot be linked
/// into tmp/, a copy takes its place; everything after that is the same.
fn deliver_into(spooled: &Path, maildir: &Path, name: &str, link: Link) -> io::Result<PathBuf> {
    let tmp = maildir.join("tmp").join(name);
    let new = maildir.join("new").join(name);
    match link(spooled, &tmp) {
        Ok(()) => {}
        Err(e) if cannot_link(&e) => copy_durably(spooled, &tmp)?,
        Err(e) => return Err(e),
    }
    let published = publish(&tmp, &new, link);
    let _ = fs::remove_file(&tmp);
    if let Err(e) = published.and_then(|()| fsync_dir(&maildir.join("new"))) {
        if e.kind() != io::ErrorKind::AlreadyExists {
            let _ = fs::remove_file(&new);
        }
        return Err(e);
    }
    Ok(new)
}

/// link(2) that follows a symbolic link at `from`: `/proc/self/fd/N` names an unnamed file that way
/// (std's hard_link would link the magic link itself, and fail with EXDEV).
fn hard_link(from: &Path, to: &Path) -> io::Result<()> {
    use nix::fcntl::{AT_FDCWD, AtFlags};
    nix::unistd::linkat(AT_FDCWD, from, AT_FDCWD, to, AtFlags::AT_SYMLINK_FOLLOW)
        .map_err(io::Error::from)
}

/// An unnamed file (`O_TMPFILE`, 0600) in `dir` holding `bytes`, and the path that links it
/// (`/proc/self/fd/N`). `None`: the kernel or file system has no unnamed files, or `/proc` is not
/// mounted (a link through it would fail like a missing Maildir); the caller names a file in `tmp/`.
fn write_unnamed(dir: &Path, bytes: &[u8]) -> io::Result<Option<(File, PathBuf)>> {
    use nix::errno::Errno;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    static PROC: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| Path::new("/proc/self/fd").is_dir());
    if !*PROC {
        return Ok(None);
    }
    let opened = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_TMPFILE.bits())
        .mode(super::FILE_MODE)
        .open(dir);
    let mut file = match opened {
        Ok(file) => file,
        Err(e)
            if e.raw_os_error().is_some_and(|code| {
                matches!(
                    Errno::from_raw(code),
                    Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL
                )
            }) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    // As create_new: the umask only takes bits away, the chmod gives back what a strict one took.
    file.set_permissions(fs::Permissions::from_mode(super::FILE_MODE))?;
    file.write_all(bytes)?;
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    Ok(Some((file, path)))
}

/// Whether link(2) failed because this pair of paths can never be hard-linked, rather than for a reason a
/// copy would meet too. EXDEV: the Maildir is on another file system than the spool (a separate mount for
/// mail/ or for one domain). EPERM and EOPNOTSUPP: its file system has no hard links at all (vfat, some
/// FUSE and network file systems); link(2) documents EPERM for that.
pub(super) fn cannot_link(e: &io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|code| {
        matches!(
            Errno::from_raw(code),
            Errno::EXDEV | Errno::EPERM | Errno::EOPNOTSUPP
        )
    })
}

/// Creates `path` (O_EXCL, 0600) holding `bytes`; a failed write removes it.
fn write_new(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let mut file = create_new(path)?;
    if let Err(e) = file.write_all(bytes) {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

/// Writes the spooled message to a new file `tmp` (O_EXCL, 0600) and fsyncs it, so that it is as durable
/// as the spool file a link would have shared. A failed copy removes its partial file.
pub(super) fn copy_durably(spooled: &Path, tmp: &Path) -> io::Result<()> {
    let mut copy = create_new(tmp)?;
    let copied = File::open(spooled)
        .and_then(|mut from| io::copy(&mut from, &mut copy))
        .and_then(|_| copy.sync_all());
    if copied.is_err() {
        let _ = fs::remove_file(tmp);
    }
    copied
}

/// Moves `tmp` to `new`, never replacing a message already there. tmp/ and new/ share a file system, so
/// link(2) works unless that file system has no hard links; then a rename after checking that the name is
/// free. The check and the rename are not atomic, but the name is unique by construction (time, pid,
/// sequence, host): the check only guards against a clock set back.
fn publish(tmp: &Path, new: &Path, link: Link) -> io::Result<()> {
    match link(tmp, new) {
        Err(e) if cannot_link(&e) => {
            if fs::symlink_metadata(new).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists already", new.display()),
                ));
            }
            fs::rename(tmp, new)
        }
        linked => linked,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::super::tests::{files, maildir, store};
    use super::*;

    /// How a test delivers: the public `deliver`, or `deliver_with` a stand-in for link(2).
    type Deliver = fn(Spool, &[PathBuf]) -> io::Result<()>;

    fn by_link(spool: Spool, maildirs: &[PathBuf]) -> io::Result<()> {
        spool.deliver(maildirs, None)
    }

    /// As on a file system without `O_TMPFILE`: a message from memory is written into tmp/.
    fn without_unnamed_files(spool: Spool, maildirs: &[PathBuf]) -> io::Result<()> {
        spool.deliver_with(maildirs, None, hard_link, false)
    }

    fn across_devices(spool: Spool, maildirs: &[PathBuf]) -> io::Result<()> {
        spool.deliver_with(maildirs, None, link_across_devices, true)
    }

    fn without_hard_links(spool: Spool, maildirs: &[PathBuf]) -> io::Result<()> {
        spool.deliver_with(maildirs, None, link_unsupported, false)
    }

    /// The messages every delivery test sends: one held in memory, one with a spool file (both small
    /// enough for the journal), one too large for the journal.
    fn bodies() -> [Vec<u8>; 3] {
        let mut spooled = b"Subject: x\n\n".to_vec();
        spooled.extend(std::iter::repeat_n(b"0123456789abcde\n", IN_MEMORY / 16 + 1).flatten());
        let mut direct = spooled.clone();
        direct.extend(
            std::iter::repeat_n(b"0123456789abcde\n", journal::MAX_MESSAGE as usize / 16).flatten(),
        );
        [b"Subject: x\n\nbody\n".to_vec(), spooled, direct]
    }

    /// Delivers to two Maildirs and checks each got the message whole, named with its sizes; `links`:
    /// how many names the delivered file has (2 when linked into both, 1 for copies).
    fn delivers_into_both(deliver: Deliver, links: u64) {
        for body in bodies() {
            let (_d, store) = store();
            let (a, b) = (maildir(&store, "a"), maildir(&store, "b"));
            let mut spool = store.spool().unwrap();
            spool.append(&body).unwrap();
            deliver(spool, &[a.clone(), b.clone()]).unwrap();
            let lines = body.iter().filter(|&&c| c == b'\n').count();
            for dir in [&a, &b] {
                let new = files(&dir.join("new"));
                assert_eq!(new.len(), 1);
                assert!(fs::read(&new[0]).unwrap() == body, "{} octets", body.len());
                let sizes = format!(",S={},W={}", body.len(), body.len() + lines);
                assert!(new[0].to_string_lossy().ends_with(&sizes));
                assert_eq!(fs::metadata(&new[0]).unwrap().nlink(), links);
                assert!(files(&dir.join("tmp")).is_empty());
            }
            assert!(files(&store.root().join("spool")).is_empty());
        }
    }

    /// A delivery to a good and a broken Maildir fails and leaves nothing anywhere.
    fn failed_delivery_leaves_nothing(deliver: Deliver) {
        for body in bodies() {
            for first_broken in [false, true] {
                let (_d, store) = store();
                let good = maildir(&store, "good");
                let broken = maildir(&store, "broken");
                fs::remove_dir(broken.join("new")).unwrap();
                fs::write(broken.join("new"), b"not a directory").unwrap();
                let mut spool = store.spool().unwrap();
                spool.append(&body).unwrap();
                let mut maildirs = [good.clone(), broken.clone()];
                if first_broken {
                    maildirs.reverse();
                }
                assert!(deliver(spool, &maildirs).is_err());
                assert!(files(&good.join("new")).is_empty());
                assert!(
                    files(&good.join("tmp")).is_empty() && files(&broken.join("tmp")).is_empty()
                );
                assert!(files(&store.root().join("spool")).is_empty());
            }
        }
    }

    /// A message whose name is taken in new/ fails and leaves the one there untouched; the error.
    fn name_collision_keeps_the_delivered_message(deliver: Deliver) -> Vec<io::Error> {
        let mut errors = Vec::new();
        for body in bodies() {
            let (_d, store) = store();
            let dir = maildir(&store, "a");
            let mut spool = store.spool().unwrap();
            spool.append(&body).unwrap();
            let lines = body.iter().filter(|&&c| c == b'\n').count();
            let name = format!("{},S={},W={}", spool.name, body.len(), body.len() + lines);
            fs::write(dir.join("new").join(&name), b"delivered earlier\n").unwrap();
            errors.push(deliver(spool, std::slice::from_ref(&dir)).unwrap_err());
            assert_eq!(
                fs::read(dir.join("new").join(&name)).unwrap(),
                b"delivered earlier\n"
            );
            assert!(files(&dir.join("tmp")).is_empty());
            assert!(files(&store.root().join("spool")).is_empty());
        }
        errors
    }

    #[test]
    fn delivery_lands_in_new_of_every_maildir_with_sizes_in_the_name() {
        delivers_into_both(by_link, 2);
        delivers_into_both(without_unnamed_files, 2);
    }

    #[test]
    fn failed_delivery_leaves_nothing_in_any_new() {
        failed_delivery_leaves_nothing(by_link);
        failed_delivery_leaves_nothing(without_unnamed_files);
    }

    #[test]
    fn name_collision_never_replaces_a_delivered_message() {
        name_collision_keeps_the_delivered_message(by_link);
        name_collision_keeps_the_delivered_message(without_unnamed_files);
    }

    #[test]
    fn abandoned_spool_removes_itself() {
        let (_d, store) = store();
        let mut spool = store.spool().unwrap();
        spool.append(b"partial\n").unwrap();
        drop(spool);
        assert!(files(&store.root().join("spool")).is_empty());
    }

    /// link(2) as when the spool and every Maildir are each on a file system of their own (the file
    /// system of `root/spool/ID` and of `MAILDIR/tmp/NAME` is the grandparent directory; an unnamed
    /// file's is that of the `tmp/` it was made in, which /proc shows as its name).
    fn link_across_devices(from: &Path, to: &Path) -> io::Result<()> {
        let device = |path: &Path| {
            let path = match path.starts_with("/proc/self/fd") {
                true => fs::read_link(path).unwrap(),
                false => path.to_path_buf(),
            };
            path.parent().and_then(Path::parent).map(Path::to_path_buf)
        };
        if device(from) != device(to) {
            return Err(io::Error::from_raw_os_error(
                nix::errno::Errno::EXDEV as i32,
            ));
        }
        hard_link(from, to)
    }

    /// link(2) as on a file system without hard links.
    fn link_unsupported(_: &Path, _: &Path) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(
            nix::errno::Errno::EPERM as i32,
        ))
    }

    #[test]
    fn maildir_on_another_file_system_gets_a_durable_copy() {
        delivers_into_both(across_devices, 1);
        delivers_into_both(without_hard_links, 1);
    }

    #[test]
    fn failed_copy_delivery_leaves_nothing_in_any_new() {
        failed_delivery_leaves_nothing(across_devices);
    }

    #[test]
    fn name_collision_never_replaces_a_delivered_message_without_hard_links() {
        for error in name_collision_keeps_the_delivered_message(without_hard_links) {
            assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        }
    }

    #[test]
    fn one_maildir_without_hard_links_gets_every_message() {
        for body in bodies() {
            let (_d, store) = store();
            let dir = maildir(&store, "a");
            let mut spool = store.spool().unwrap();
            spool.append(&body).unwrap();
            without_hard_links(spool, std::slice::from_ref(&dir)).unwrap();
            let new = files(&dir.join("new"));
            assert_eq!(new.len(), 1);
            assert!(fs::read(&new[0]).unwrap() == body);
            assert!(files(&dir.join("tmp")).is_empty());
            assert!(files(&store.root().join("spool")).is_empty());
        }
    }

    #[test]
    fn only_link_errors_a_copy_avoids_fall_back_to_copying() {
        use nix::errno::Errno;
        for errno in [Errno::EXDEV, Errno::EPERM, Errno::EOPNOTSUPP] {
            assert!(
                cannot_link(&io::Error::from_raw_os_error(errno as i32)),
                "{errno}"
            );
        }
        for errno in [
            Errno::EEXIST,
            Errno::ENOENT,
            Errno::EACCES,
            Errno::ENOSPC,
            Errno::EIO,
        ] {
            assert!(
                !cannot_link(&io::Error::from_raw_os_error(errno as i32)),
                "{errno}"
            );
        }
    }
}
