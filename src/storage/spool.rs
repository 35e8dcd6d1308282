//! Receiving a message into the spool, and delivering it into Maildirs all at once or not at all.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{create_new, fsync_dir};

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
    /// `path` is in the spool; `name` is the Maildir base name (id and host).
    pub(super) fn create(path: PathBuf, id: String, name: String) -> io::Result<Spool> {
        Ok(Spool {
            file: create_new(&path)?,
            path,
            name,
            id,
            size: 0,
            lines: 0,
            delivered: false,
        })
    }

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

#[cfg(test)]
mod tests {
    use super::super::tests::{files, maildir, store};
    use super::*;

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
}
