//! The real binary under emulated systemd socket activation: sockets bound here and passed as fds 3, 4
//! with LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID, a NOTIFY_SOCKET bound at a path, and WATCHDOG_USEC.
//! The configured SMTP address is unusable (TEST-NET-1, not on this host), so the test passes only if
//! the inherited sockets are what serves.

use std::io::Read;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

mod common;
use common::client::LineClient;
use common::config::Config;
use common::{BIN, hash_password as hash};

const PASSWORD: &str = "correct horse battery staple";

/// The test configuration with `listen` (a `[listen]` table, or nothing) appended.
fn write_config(dir: &Path, listen: &str) -> PathBuf {
    let mut config = Config::new(dir, &["example.test"]);
    for line in listen.lines().filter(|l| l.contains('=')) {
        config.set_line(&format!("listen.{line}"));
    }
    config.account("alice@example.test", &hash(PASSWORD), &[]);
    config.write(dir)
}

struct Server {
    child: Child,
    notify: UnixDatagram,
    seen: Vec<String>,
    log: PathBuf,
}

/// Starts `rustmail serve` with `sockets` passed as fds 3, 4, … named `names`.
fn start(
    dir: &Path,
    config: &Path,
    sockets: &[&TcpListener],
    names: &str,
    watchdog_usec: Option<u64>,
) -> Server {
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let log = dir.join("server.log");
    let fds: Vec<i32> = sockets.iter().map(|s| s.as_raw_fd()).collect();
    let mut cmd = Command::new("sh");
    // LISTEN_PID must be the pid of the process that reads it: the shell's, which exec keeps.
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("WATCHDOG_USEC")
        .env_remove("JOURNAL_STREAM")
        .stdout(std::fs::File::create(dir.join("stdout.log")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap());
    // As systemd does: no LISTEN_* variables at all when no socket is passed.
    if fds.is_empty() {
        cmd.env_remove("LISTEN_FDS").env_remove("LISTEN_FDNAMES");
    } else {
        cmd.env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names);
    }
    if let Some(usec) = watchdog_usec {
        cmd.env("WATCHDOG_USEC", usec.to_string());
    }
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Copy out of the way first, so that placing one fd cannot overwrite another.
            let mut high = Vec::new();
            for &fd in &fds {
                let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high.push(h);
            }
            for (i, &h) in high.iter().enumerate() {
                // dup2 leaves the new descriptor without FD_CLOEXEC: it survives exec.
                if libc::dup2(h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Server {
        child: cmd.spawn().unwrap(),
        notify,
        seen: Vec::new(),
        log,
    }
}

impl Server {
    /// Waits for a notification message containing `needle`; returns it.
    fn wait_notify(&mut self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if msg.contains(needle) {
                    return msg;
                }
            }
        }
        panic!(
            "no {needle:?} within {timeout:?}; seen {:?}; log:\n{}",
            self.seen,
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!(
            "server did not exit within {timeout:?}; log:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

#[test]
fn inherited_sockets_serve_with_readiness_watchdog_reload_and_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    // SMTP's configured address is unusable: it is served through the socket named "smtp" only.
    let config = write_config(
        dir.path(),
        "[listen]\nsmtp = [\"192.0.2.1:25\"]\npop3 = [\"systemd:pop3\"]\n",
    );
    let (smtp, pop3) = (listener(), listener());
    let (smtp_addr, pop3_addr) = (smtp.local_addr().unwrap(), pop3.local_addr().unwrap());
    let mut server = start(
        dir.path(),
        &config,
        &[&smtp, &pop3],
        "smtp:pop3",
        Some(400_000),
    );
    drop((smtp, pop3)); // the server holds its own copies now

    // READY=1 arrives before any client has connected.
    server.wait_notify("READY=1", Duration::from_secs(10));
    server.wait_notify("WATCHDOG=1", Duration::from_secs(2));
    server.wait_notify("WATCHDOG=1", Duration::from_secs(2));

    let mut c = LineClient::connect(smtp_addr);
    assert!(c.smtp_reply().starts_with("220 mx.example.test"));
    assert!(
        c.smtp("EHLO client.test")
            .contains("250 ENHANCEDSTATUSCODES")
    );
    assert!(c.smtp("MAIL FROM:<sender@remote.test>").starts_with("250"));
    assert!(c.smtp("RCPT TO:<alice@example.test>").starts_with("250"));
    assert!(c.smtp("DATA").starts_with("354"));
    c.send("Subject: activation\r\n\r\n..dotted\r\n");
    assert!(c.smtp(".").starts_with("250 2.0.0"));
    assert!(c.smtp("QUIT").starts_with("221"));

    let mut p = LineClient::connect(pop3_addr);
    assert!(p.line().starts_with("+OK"));
    assert!(p.pop3("USER alice@example.test").starts_with("+OK"));
    assert!(
        p.pop3(&format!("PASS {PASSWORD}"))
            .starts_with("+OK maildrop has 1 messages")
    );
    assert!(p.pop3("RETR 1").starts_with("+OK"));
    let body = p.pop3_body();
    assert!(
        body.starts_with("Return-Path: <sender@remote.test>\r\nReceived: from client.test"),
        "{body}"
    );
    assert!(
        body.ends_with("Subject: activation\r\n\r\n..dotted\r\n"),
        "dot-stuffed on the wire: {body}"
    );
    assert!(p.pop3("QUIT").starts_with("+OK"));

    server.wait_notify("1 messages delivered", Duration::from_secs(5));

    // Reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
    server.signal(libc::SIGHUP);
    let reloading = server.wait_notify("RELOADING=1", Duration::from_secs(5));
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    server.wait_notify("READY=1", Duration::from_secs(5));

    server.signal(libc::SIGTERM);
    server.wait_notify("STOPPING=1", Duration::from_secs(5));
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        server.log_text()
    );
}

#[test]
fn stop_waits_for_the_message_in_progress_then_answers_421() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[listen]\nsmtp = [\"systemd:smtp\"]\npop3 = []\n",
    );
    let smtp = listener();
    let addr = smtp.local_addr().unwrap();
    let mut server = start(dir.path(), &config, &[&smtp], "smtp", None);
    server.wait_notify("READY=1", Duration::from_secs(10));

    let mut c = LineClient::connect(addr);
    c.smtp_reply();
    c.smtp("EHLO client.test");
    c.smtp("MAIL FROM:<>");
    c.smtp("RCPT TO:<alice@example.test>");
    assert!(c.smtp("DATA").starts_with("354"));
    c.send("Subject: in flight\r\n\r\nfirst half\r\n");
    server.signal(libc::SIGTERM);
    server.wait_notify("STOPPING=1", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    c.send("second half\r\n");
    assert!(
        c.smtp(".").starts_with("250"),
        "the DATA transfer is never cut"
    );
    assert!(c.smtp("NOOP").starts_with("421 4.3.2"));
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success());
    let new = dir.path().join("state/mail/example.test/alice/new");
    let files: Vec<_> = std::fs::read_dir(new).unwrap().collect();
    assert_eq!(files.len(), 1, "the acknowledged message is stored");
}

fn expect_start_failure(listen: &str, sockets: &[&TcpListener], names: &str, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), listen);
    let mut server = start(dir.path(), &config, sockets, names, None);
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "must refuse to start");
    let log = server.log_text();
    assert!(log.contains(needle), "expected {needle:?} in:\n{log}");
    let mut buf = [0u8; 256];
    assert!(
        server.notify.recv(&mut buf).is_err(),
        "no READY=1 from a server that failed to start"
    );
}

#[test]
fn systemd_name_without_such_socket_fails_loudly() {
    expect_start_failure(
        "[listen]\nsmtp = [\"systemd:smtp\"]\npop3 = []\n",
        &[],
        "",
        "FileDescriptorName",
    );
}

#[test]
fn inherited_socket_nobody_uses_fails_loudly() {
    let (a, b) = (listener(), listener());
    expect_start_failure(
        "[listen]\nsmtp = [\"systemd:smtp\"]\npop3 = []\n",
        &[&a, &b],
        "smtp:imap",
        "\"imap\"",
    );
}

#[test]
fn zero_listeners_fails_loudly() {
    expect_start_failure("[listen]\nsmtp = []\npop3 = []\n", &[], "", "no listeners");
}

#[test]
fn unusable_bind_address_fails_loudly() {
    expect_start_failure(
        "[listen]\nsmtp = [\"192.0.2.1:25\"]\npop3 = []\n",
        &[],
        "",
        "listen.smtp: cannot listen on 192.0.2.1:25",
    );
}

#[test]
fn sigint_stops_cleanly_and_logs_the_adopted_socket() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[listen]\nsmtp = [\"systemd:smtp\"]\npop3 = []\n",
    );
    let smtp = listener();
    let mut server = start(dir.path(), &config, &[&smtp], "smtp", None);
    server.wait_notify("READY=1", Duration::from_secs(10));
    server.signal(libc::SIGINT);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    let mut log = String::new();
    std::fs::File::open(&server.log)
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("using socket passed by systemd"), "{log}");
}

#[test]
fn watchdog_pings_stop_while_storage_fails_and_resume_after() {
    // The health check writes and fsyncs a probe file in the spool: with the spool gone (even root
    // cannot write there then), pings must stop so that systemd restarts a server that cannot store
    // mail; once it is back, they resume.
    let dir = tempfile::tempdir().unwrap();
    let smtp = listener();
    let config = write_config(
        dir.path(),
        "[listen]\nsmtp = [\"systemd:smtp\"]\npop3 = []\n",
    );
    let mut server = start(dir.path(), &config, &[&smtp], "smtp", Some(400_000));
    drop(smtp);
    server.wait_notify("READY=1", Duration::from_secs(10));
    server.wait_notify("WATCHDOG=1", Duration::from_secs(2));
    let spool = dir.path().join("state/spool");
    std::fs::remove_dir_all(&spool).unwrap();
    // Pings already on their way may still arrive; after that, none for several intervals.
    std::thread::sleep(Duration::from_millis(500));
    let mut buf = [0u8; 4096];
    while server.notify.recv(&mut buf).is_ok() {}
    let quiet_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < quiet_until {
        if let Ok(n) = server.notify.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(
                !msg.contains("WATCHDOG=1"),
                "pinged while storage fails: {msg}"
            );
        }
    }
    assert!(
        server
            .log_text()
            .contains("health check failed: storage not writable"),
        "{}",
        server.log_text()
    );
    std::fs::create_dir(&spool).unwrap();
    server.wait_notify("WATCHDOG=1", Duration::from_secs(3));
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}
