//! The outbound queue: messages for other domains, kept until every recipient is delivered or failed.
//!
//! ```text
//! queue/msg/<id>         the message (LF form, as spooled: a hard link of the spool file, or a copy)
//! queue/env/<id>.json    its envelope and per-recipient state; an entry exists iff this file does
//! ```
//! Enqueueing (part of the meaning of `250`): the message file is made durable in `msg/` (fsync of the
//! file, then of `msg/`), then the envelope is written to a temporary name, fsynced, renamed into place
//! and `env/` is fsynced. A crash before the rename leaves a message without an envelope: never
//! acknowledged, removed at the next start. Every state change rewrites the envelope the same way, so
//! it is always either the old state or the new one. A crash between a remote `250` and the rewrite
//! sends that message again: at most a duplicate, never a loss.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{create_new, ensure_dir, fsync_dir};
pub use crate::smtp::command::Notify;

/// What the queue remembers of one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    /// The envelope sender; empty for the null reverse-path (a bounce: never bounced itself).
    pub from: String,
    /// Unix time it was queued.
    pub queued_at: u64,
    /// The account that submitted it, if any.
    #[serde(default)]
    pub submitter: Option<String>,
    /// The transaction declared SMTPUTF8 (or an address needs it): only to peers offering it.
    #[serde(default)]
    pub smtputf8: bool,
    /// The message has octets above 127: only to peers offering 8BITMIME.
    #[serde(default)]
    pub eight_bit: bool,
    /// Size in octets, LF form as stored; `lines` converts it to what is sent (CRLF).
    pub size: u64,
    pub lines: u64,
    /// RFC 3461 RET: a failure report returns the whole message (`Some(true)`) or its header.
    #[serde(default)]
    pub ret_full: Option<bool>,
    /// RFC 3461 ENVID, xtext, passed on and quoted in reports.
    #[serde(default)]
    pub envid: Option<String>,
    pub recipients: Vec<Recipient>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipient {
    /// The address as given in RCPT TO (without angle brackets).
    pub address: String,
    /// Its domain (or address literal, brackets included): where it is delivered.
    pub domain: String,
    pub state: State,
    #[serde(default)]
    pub attempts: u32,
    /// Unix time of the next attempt (pending recipients only).
    #[serde(default)]
    pub next_attempt: u64,
    /// The last reply or failure, for logs, `queue list` and bounces.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The host that gave `last_error` (or that accepted the message).
    #[serde(default)]
    pub last_host: Option<String>,
    /// Failed because the message was queued for longer than `outbound.max_queue_secs`.
    #[serde(default)]
    pub expired: bool,
    /// RFC 3461 NOTIFY as the sender gave it (absent: failures are reported).
    #[serde(default)]
    pub notify: Option<Notify>,
    /// RFC 3461 ORCPT as given (`rfc822;xtext`).
    #[serde(default)]
    pub orcpt: Option<String>,
    /// Delivered to a server without DSN while the sender asked for NOTIFY=SUCCESS: a "relayed"
    /// notice is owed.
    #[serde(default)]
    pub success_due: bool,
    /// The sender was warned that this recipient is delayed (once).
    #[serde(default)]
    pub warned: bool,
}

impl Recipient {
    /// A recipient due at once.
    pub fn new(address: &str, domain: &str) -> Recipient {
        Recipient {
            address: address.to_string(),
            domain: domain.to_ascii_lowercase(),
            state: State::Pending,
            attempts: 0,
            next_attempt: 0,
            last_error: None,
            last_host: None,
            expired: false,
            notify: None,
            orcpt: None,
            success_due: false,
            warned: false,
        }
    }

    /// Whether the sender wants to hear of this recipient's failure (the default when NOTIFY was
    /// not given).
    pub fn reports_failure(&self) -> bool {
        self.notify.is_none_or(|n| n.failure)
    }

    /// Whether a delay warning is owed now for this recipient of a message queued at `queued_at`:
    /// still pending after at least one attempt, `delay_secs` (> 0) after queueing, not warned yet,
    /// and the sender did not leave DELAY out of NOTIFY (absent NOTIFY: warned, as RFC 3461 §5.1
    /// leaves to the MTA).
    pub fn warning_due(&self, queued_at: u64, delay_secs: u64, now: u64) -> bool {
        self.state == State::Pending
            && !self.warned
            && self.attempts > 0
            && delay_secs > 0
            && now >= queued_at.saturating_add(delay_secs)
            && self.notify.is_none_or(|n| n.delay)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Delivered,
    /// Failed for good; `bounced` once the failure report exists (or none is due).
    Failed {
        bounced: bool,
    },
}

impl Entry {
    /// Octets as sent on the wire (CRLF line endings), before dot-stuffing.
    pub fn wire_size(&self) -> u64 {
        self.size + self.lines
    }

    pub fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients.iter().filter(|r| r.state == State::Pending)
    }

    /// Nothing left to do: every recipient delivered, or failed and reported.
    pub fn is_done(&self) -> bool {
        self.recipients.iter().all(|r| match r.state {
            State::Delivered => !r.success_due,
            State::Failed { bounced } => bounced,
            State::Pending => false,
        })
    }

    /// A report to the sender is owed: a failure not reported yet, or a "relayed" notice.
    pub fn report_due(&self) -> bool {
        self.recipients.iter().any(|r| {
            r.state == State::Failed { bounced: false }
                || (r.state == State::Delivered && r.success_due)
        })
    }

    /// When a delay warning falls due (see [`Recipient::warning_due`]), if one ever will: the warning
    /// time, or the recipient's next attempt when that is later (it is owed only after an attempt).
    /// Never for the null sender, who gets no reports.
    pub fn warning_at(&self, delay_secs: u64) -> Option<u64> {
        if self.from.is_empty() || delay_secs == 0 {
            return None;
        }
        self.pending()
            .filter(|r| !r.warned && r.notify.is_none_or(|n| n.delay))
            .map(|r| {
                let at = self.queued_at.saturating_add(delay_secs);
                if r.attempts == 0 {
                    at.max(r.next_attempt)
                } else {
                    at
                }
            })
            .min()
    }

    /// The earliest next attempt of a pending recipient.
    pub fn next_attempt(&self) -> Option<u64> {
        self.pending().map(|r| r.next_attempt).min()
    }
}

/// The queue directories under the storage root.
#[derive(Debug, Clone)]
pub struct Queue {
    msg: PathBuf,
    env: PathBuf,
}

impl Queue {
    /// Creates the directories if needed and drops what a crash during enqueueing left behind.
    pub fn open(root: &Path) -> io::Result<Queue> {
        let base = root.join("queue");
        let queue = Queue {
            msg: base.join("msg"),
            env: base.join("env"),
        };
        for dir in [&base, &queue.msg, &queue.env] {
            ensure_dir(dir)?;
        }
        for entry in fs::read_dir(&queue.env)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = fs::remove_file(path);
            }
        }
        for entry in fs::read_dir(&queue.msg)? {
            let entry = entry?;
            let id = entry.file_name().to_string_lossy().into_owned();
            if !queue.env_path(&id).exists() {
                // Never acknowledged: the envelope is written last.
                tracing::info!(queue_id = %id, "removing a message queued without its envelope (crash while receiving)");
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(queue)
    }

    /// Opens the directories of an existing queue for reading (`rustmail queue list`), creating nothing.
    pub fn existing(root: &Path) -> Queue {
        let base = root.join("queue");
        Queue {
            msg: base.join("msg"),
            env: base.join("env"),
        }
    }

    pub fn message_path(&self, id: &str) -> PathBuf {
        self.msg.join(id)
    }

    fn env_path(&self, id: &str) -> PathBuf {
        self.env.join(format!("{id}.json"))
    }

    /// Every entry, oldest first. An envelope that cannot be read is reported and skipped (kept on disk
    /// for the administrator), never deleted.
    pub fn load(&self) -> io::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        let dir = match fs::read_dir(&self.env) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(entries),
            Err(e) => return Err(e),
        };
        for item in dir {
            let path = item?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<Entry>(&bytes).map_err(|e| e.to_string())
                }) {
                Ok(entry) => entries.push(entry),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot read a queue entry; left in place")
                }
            }
        }
        entries.sort_by(|a, b| (a.queued_at, &a.id).cmp(&(b.queued_at, &b.id)));
        Ok(entries)
    }

    /// Queues the spooled message at `spooled` (already fsynced) with `entry`. Either the entry is
    /// durable when this returns `Ok`, or nothing of it remains.
    pub fn enqueue(&self, spooled: &Path, entry: &Entry) -> io::Result<()> {
        let msg = self.message_path(&entry.id);
        match fs::hard_link(spooled, &msg) {
            Ok(()) => {}
            Err(e) if super::spool::cannot_link(&e) => super::spool::copy_durably(spooled, &msg)?,
            Err(e) => return Err(e),
        }
        let written = fsync_dir(&self.msg).and_then(|()| self.write(entry));
        if written.is_err() {
            let _ = fs::remove_file(&msg);
        }
        written
    }

    /// Replaces the entry's envelope, durably and atomically.
    pub fn write(&self, entry: &Entry) -> io::Result<()> {
        let path = self.env_path(&entry.id);
        let tmp = self.env.join(format!("{}.tmp", entry.id));
        let _ = fs::remove_file(&tmp);
        let result = create_new(&tmp).and_then(|mut file| {
            let json = serde_json::to_vec_pretty(entry).map_err(io::Error::other)?;
            file.write_all(&json)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            fsync_dir(&self.env)
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Removes an entry: the envelope first (so a crash leaves an orphan message, removed at start,
    /// rather than an envelope without its message).
    pub fn remove(&self, id: &str) -> io::Result<()> {
        match fs::remove_file(self.env_path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fsync_dir(&self.env)?;
        let _ = fs::remove_file(self.message_path(id));
        Ok(())
    }

    /// Opens the message of an entry for sending.
    pub fn open_message(&self, id: &str) -> io::Result<File> {
        File::open(self.message_path(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> Entry {
        Entry {
            id: id.into(),
            from: "alice@example.org".into(),
            queued_at: 1,
            submitter: Some("alice@example.org".into()),
            smtputf8: false,
            eight_bit: false,
            size: 3,
            lines: 1,
            ret_full: None,
            envid: None,
            recipients: vec![Recipient::new("bob@example.net", "example.net")],
        }
    }

    #[test]
    fn a_delay_warning_is_due_once_after_an_attempt_unless_notify_leaves_delay_out() {
        let mut e = entry("W1");
        e.queued_at = 1000;
        let r = &mut e.recipients[0];
        assert!(
            !r.warning_due(1000, 60, 2000),
            "not before the first attempt"
        );
        r.attempts = 1;
        r.next_attempt = 1300;
        assert!(!r.warning_due(1000, 60, 1059), "not before the delay");
        assert!(r.warning_due(1000, 60, 1060));
        assert!(!r.warning_due(1000, 0, 5000), "0: never");
        r.notify = Some(Notify {
            success: false,
            failure: true,
            delay: false,
        });
        assert!(!r.warning_due(1000, 60, 5000), "NOTIFY=FAILURE only");
        r.notify = None;
        r.warned = true;
        assert!(!r.warning_due(1000, 60, 5000), "once");
        assert_eq!(e.warning_at(60), None);
        e.recipients[0].warned = false;
        assert_eq!(e.warning_at(60), Some(1060));
        e.recipients[0].attempts = 0;
        assert_eq!(e.warning_at(60), Some(1300), "after the first attempt");
        e.from.clear();
        assert_eq!(e.warning_at(60), None, "never to the null sender");
    }

    #[test]
    fn an_entry_survives_reopening_with_its_message() {
        let root = tempfile::tempdir().unwrap();
        let queue = Queue::open(root.path()).unwrap();
        let spooled = root.path().join("spooled");
        fs::write(&spooled, b"hi\n").unwrap();
        queue.enqueue(&spooled, &entry("A1")).unwrap();
        let reopened = Queue::open(root.path()).unwrap();
        assert_eq!(reopened.load().unwrap(), vec![entry("A1")]);
        assert_eq!(fs::read(reopened.message_path("A1")).unwrap(), b"hi\n");
    }

    #[test]
    fn a_message_without_its_envelope_is_dropped_at_start() {
        let root = tempfile::tempdir().unwrap();
        let queue = Queue::open(root.path()).unwrap();
        fs::write(queue.message_path("orphan"), b"x\n").unwrap();
        fs::write(queue.env.join("half.tmp"), b"{").unwrap();
        Queue::open(root.path()).unwrap();
        assert!(!queue.message_path("orphan").exists());
        assert!(!queue.env.join("half.tmp").exists());
    }

    #[test]
    fn a_rewrite_replaces_the_state_and_remove_deletes_both_files() {
        let root = tempfile::tempdir().unwrap();
        let queue = Queue::open(root.path()).unwrap();
        let spooled = root.path().join("spooled");
        fs::write(&spooled, b"hi\n").unwrap();
        let mut e = entry("B2");
        queue.enqueue(&spooled, &e).unwrap();
        e.recipients[0].state = State::Delivered;
        queue.write(&e).unwrap();
        assert!(queue.load().unwrap()[0].is_done());
        queue.remove("B2").unwrap();
        assert!(queue.load().unwrap().is_empty());
        assert!(!queue.message_path("B2").exists());
    }

    #[test]
    fn an_unreadable_envelope_is_skipped_and_kept() {
        let root = tempfile::tempdir().unwrap();
        let queue = Queue::open(root.path()).unwrap();
        fs::write(queue.env_path("bad"), b"not json").unwrap();
        assert!(queue.load().unwrap().is_empty());
        assert!(queue.env_path("bad").exists());
    }
}
