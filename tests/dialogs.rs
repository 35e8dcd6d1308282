//! The dialog corpus: every file in tests/dialogs/ is one SMTP or POP3 session played against the real
//! binary, each with a fresh server and state directory. A scenario file is a list of steps:
//!
//! ```text
//! # Guards: what this scenario protects against (free text; lines starting with # are comments)
//! # server: default | timeouts | strict_lines   (the server profile; default: default)
//! # port: smtp | pop3                     (default: smtp)
//! C: EHLO client.example                  send the line with CRLF
//! R: a\n.\nMAIL FROM:<x@y>\r\n            send raw bytes: escapes \r \n \t \0 \\ \xNN, nothing appended
//! S: 250 2.1.0                            read one reply; its last line must start with this
//! S: (closed)                             the server must close the connection now
//! W: 1.5                                  wait this many seconds
//! M: alice@example.test 1                 after the session: messages in that account's new/
//! L: relay denied                         after the session: the server log contains this text
//! ```
//! POP3 replies are single lines, except after `C: LIST`, `C: UIDL`, `C: CAPA`, `C: RETR n`, `C: TOP n m`
//! (multi-line when +OK), whose body is read up to the lone dot.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

mod common;
use common::BIN;

const PASSWORD: &str = "dialog-password";

fn hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| common::hash_password(PASSWORD))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    dir: tempfile::TempDir,
    smtp: u16,
    pop3: u16,
}

impl Server {
    fn start(profile: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let smtp = free_port();
        // The kernel may hand out the same free port twice in a row.
        let pop3 = std::iter::repeat_with(free_port)
            .find(|&p| p != smtp)
            .unwrap();
        let limits = match profile {
            "default" => "command_timeout_secs = 300\n",
            "timeouts" => {
                "command_timeout_secs = 1\ndata_timeout_secs = 1\nsession_timeout_secs = 3\n"
            }
            // The optional RFC 5321 §4.5.3.1.6 line limit (none by default).
            "strict_lines" => "max_line_length = 1000\n",
            other => panic!("unknown server profile {other:?}"),
        };
        let h = hash();
        let config = format!(
            r#"hostname = "mx.example.test"
domains = ["example.test", "other.test", "catchall.test", "bücher.test"]
storage_root = "{root}"
catch_all = {{ "catchall.test" = "bob@example.test" }}
[listen]
smtp = ["127.0.0.1:{smtp}"]
pop3 = ["127.0.0.1:{pop3}"]
[limits]
max_message_size = 20000
max_recipients = 100
max_errors = 8
{limits}
[auth]
failure_delay_ms = 10
[accounts."alice@example.test"]
password_hash = "{h}"
aliases = ["al@example.test", "team@example.test"]
[accounts."bob@example.test"]
password_hash = "{h}"
aliases = ["team@example.test"]
[accounts."josé@bücher.test"]
password_hash = "{h}"
"#,
            root = dir.path().join("state").display(),
        );
        let path = dir.path().join("rustmail.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let server = Server {
            child,
            dir,
            smtp,
            pop3,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", pop3)).is_err() {
            assert!(
                Instant::now() < deadline,
                "server did not start:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn new_messages(&self, address: &str) -> usize {
        let (local, domain) = address.rsplit_once('@').unwrap();
        let domain = match domain {
            "bücher.test" => "xn--bcher-kva.test",
            d => d,
        };
        let dir: PathBuf = self
            .dir
            .path()
            .join("state/mail")
            .join(domain)
            .join(local)
            .join("new");
        std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            let (byte, len) = match b[i + 1] {
                b'r' => (b'\r', 2),
                b'n' => (b'\n', 2),
                b't' => (b'\t', 2),
                b'0' => (0, 2),
                b'\\' => (b'\\', 2),
                b'x' => (
                    u8::from_str_radix(&text[i + 2..i + 4], 16).expect("\\xNN"),
                    4,
                ),
                other => panic!("unknown escape \\{}", other as char),
            };
            out.push(byte);
            i += len;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    pop3: bool,
    /// The last command sent, to know whether a POP3 reply is multi-line.
    last_command: String,
}

impl Session {
    fn read_line(&mut self) -> Option<String> {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(String::from_utf8_lossy(&line).into_owned()),
        }
    }

    /// One whole reply; returns its last line (without CRLF), or None on EOF.
    fn reply(&mut self) -> Option<String> {
        if self.pop3 {
            let first = self.read_line()?;
            let verb = self
                .last_command
                .split(' ')
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            let args = self
                .last_command
                .split(' ')
                .filter(|a| !a.is_empty())
                .count()
                .saturating_sub(1);
            let multi = match verb.as_str() {
                "LIST" | "UIDL" => args == 0,
                "CAPA" | "RETR" | "TOP" => true,
                _ => false,
            };
            if multi && first.starts_with("+OK") {
                while self.read_line()? != ".\r\n" {}
            }
            return Some(first.trim_end().to_string());
        }
        loop {
            let line = self.read_line()?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(line.trim_end().to_string());
            }
        }
    }

    fn expect_closed(&mut self) -> Result<(), String> {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) if rest.is_empty() => Ok(()),
            Ok(_) => Err(format!(
                "expected the connection closed, got {:?}",
                String::from_utf8_lossy(&rest)
            )),
            // A reset after the server closed with unread input is a close too; a timeout is not: the
            // server kept the connection open.
            Err(e) if is_reset(&e) => Ok(()),
            Err(e) => Err(format!(
                "expected the connection closed, but it stayed open ({e})"
            )),
        }
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe)
}

fn run(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).unwrap();
    let header = |key: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(&format!("# {key}:"))
                .map(|v| v.trim().to_string())
        })
    };
    let server = Server::start(&header("server").unwrap_or_else(|| "default".into()));
    let pop3 = header("port").as_deref() == Some("pop3");
    let stream =
        TcpStream::connect(("127.0.0.1", if pop3 { server.pop3 } else { server.smtp })).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut s = Session {
        reader: BufReader::new(stream.try_clone().unwrap()),
        writer: stream,
        pop3,
        last_command: String::new(),
    };
    let greeting = s.reply().ok_or("no greeting")?;
    if !greeting.starts_with(if pop3 { "+OK" } else { "220" }) {
        return Err(format!("greeting: {greeting}"));
    }
    let mut after = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let Some((kind, arg)) = line
            .split_once(": ")
            .or_else(|| line.strip_suffix(':').map(|k| (k, "")))
        else {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            return Err(format!("line {n}: cannot read {line:?}"));
        };
        if kind.starts_with('#') {
            continue;
        }
        match kind {
            "C" => {
                s.last_command = arg.to_string();
                // A write may fail once the server has closed; the next S: step tells.
                let _ = s.writer.write_all(format!("{arg}\r\n").as_bytes());
            }
            "R" => {
                let _ = s.writer.write_all(&unescape(arg));
            }
            "S" if arg == "(closed)" => s.expect_closed().map_err(|e| format!("line {n}: {e}"))?,
            "S" => {
                let got = s
                    .reply()
                    .ok_or_else(|| format!("line {n}: connection closed, expected {arg:?}"))?;
                if !got.starts_with(arg) {
                    return Err(format!("line {n}: expected {arg:?}, got {got:?}"));
                }
            }
            "W" => std::thread::sleep(Duration::from_secs_f64(arg.parse().unwrap())),
            "M" | "L" => after.push((n, kind, arg.to_string())),
            other => return Err(format!("line {n}: unknown step {other:?}")),
        }
    }
    drop(s);
    // Deliveries are durable before the 250; the log line may trail it by a moment.
    std::thread::sleep(Duration::from_millis(100));
    for (n, kind, arg) in after {
        match kind {
            "M" => {
                let (address, count) = arg.rsplit_once(' ').unwrap();
                let got = server.new_messages(address);
                if got != count.parse::<usize>().unwrap() {
                    return Err(format!(
                        "line {n}: {address} has {got} new messages, expected {count}"
                    ));
                }
            }
            _ => {
                if !server.log().contains(&arg) {
                    return Err(format!("line {n}: log lacks {arg:?}"));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn dialog_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dialogs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dialog"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "the corpus is in tests/dialogs");
    let mut failures = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        match run(file) {
            Ok(()) => println!("ok   {name}"),
            Err(e) => {
                println!("FAIL {name}: {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dialogs failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}
