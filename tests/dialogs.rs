//! The dialog corpus: every file in tests/dialogs/ is one SMTP or POP3 session played against the real
//! binary, each with a fresh server and state directory, each its own test (`cargo test --test dialogs
//! -- NAME` runs one). A scenario file is a list of steps:
//!
//! ```text
//! # Guards: what this scenario protects against (free text; lines starting with # are comments)
//! # config: limits.command_timeout_secs = 1   (a setting for this dialog's server; repeatable)
//! # port: smtp | pop3                     (default: smtp)
//! # split: bytes                          (C:/R: go out one octet per write, to test reassembly)
//! C: EHLO client.example                  send the line with CRLF
//! R: a\n.\nMAIL FROM:<x@y>\r\n            send raw bytes: escapes \r \n \t \0 \\ \xNN, nothing appended
//! S: 250 2.1.0                            read one reply; its last line must start with this
//! S= 250 2.0.0 OK                         read one reply; its last line must be exactly this
//! S@0.8-2.5: 421 4.4.2                    the reply must arrive between 0.8 and 2.5 s after the
//!                                         previous step ended (timeouts are timed, not just seen)
//! S: (closed)                             the server must close the connection now (EOF or reset;
//!                                         still open after 10 s is a failure)
//! W: 1.5                                  wait this many seconds
//! I: ehlo                                 the steps of tests/dialogs/include/ehlo.steps, with {1},
//! I: relay-probe <a@b>                    {2}… replaced by the words after the name
//! M: alice@example.test 1                 after the session: messages in that account's new/
//! L: relay denied                         after the session: the server log contains this text
//! ```
//! POP3 replies are single lines, except after `C: LIST`, `C: UIDL`, `C: CAPA`, `C: RETR n`, `C: TOP n m`
//! (multi-line when +OK), whose body is read up to the lone dot.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

mod common;
use common::BIN;
use common::client::LineClient;
use common::config::Config;

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
    /// A server with the corpus' base configuration, changed by `overrides` (`table.key = value` or
    /// `key = value`, TOML values).
    fn start(overrides: &[String]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let smtp = free_port();
        // The kernel may hand out the same free port twice in a row.
        let pop3 = std::iter::repeat_with(free_port)
            .find(|&p| p != smtp)
            .unwrap();
        let h = hash();
        let mut config = Config::new(
            dir.path(),
            &["example.test", "other.test", "catchall.test", "bücher.test"],
        );
        config
            .set("catch_all", r#"{ "catchall.test" = "bob@example.test" }"#)
            .set("listen.smtp", &format!(r#"["127.0.0.1:{smtp}"]"#))
            .set("listen.pop3", &format!(r#"["127.0.0.1:{pop3}"]"#))
            .set("limits.max_message_size", "20000")
            .set("limits.max_errors", "8");
        for line in overrides {
            config.set_line(line);
        }
        config
            .account(
                "alice@example.test",
                h,
                &["al@example.test", "team@example.test"],
            )
            .account("bob@example.test", h, &["team@example.test"])
            .account("josé@bücher.test", h, &[]);
        let path = config.write(dir.path());
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        // DIALOG_SERVER_BIN runs the corpus against another build (e.g. to show a check failing on
        // an older or deliberately broken server).
        let bin = std::env::var("DIALOG_SERVER_BIN").unwrap_or_else(|_| BIN.to_string());
        let child = Command::new(bin)
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

    /// Messages in the account's new/; an error when that Maildir does not exist (a wrong path must
    /// not count as "no messages").
    fn new_messages(&self, address: &str) -> Result<usize, String> {
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
        std::fs::read_dir(&dir)
            .map(|d| d.count())
            .map_err(|e| format!("{}: {e}", dir.display()))
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

/// The client side of a dialog: the shared line client, plus what it takes to know where a POP3
/// reply ends.
struct Session {
    client: LineClient,
    pop3: bool,
    /// The last command sent, to know whether a POP3 reply is multi-line.
    last_command: String,
}

impl Session {
    /// One whole reply; returns its last line (without CRLF), or None on EOF.
    fn reply(&mut self) -> Option<String> {
        if !self.pop3 {
            let reply = self.client.read_smtp_reply()?;
            return reply.lines().last().map(|l| l.trim_end().to_string());
        }
        let first = self.client.read_line()?;
        let mut words = self.last_command.split(' ').filter(|a| !a.is_empty());
        let verb = words.next().unwrap_or("").to_ascii_uppercase();
        let args = words.count();
        let multi = match verb.as_str() {
            "LIST" | "UIDL" => args == 0,
            "CAPA" | "RETR" | "TOP" => true,
            _ => false,
        };
        if multi && first.starts_with("+OK") {
            while self.client.read_line()? != ".\r\n" {}
        }
        Some(first.trim_end().to_string())
    }
}

/// The steps of a dialog file, includes expanded: (line number in the file, step kind, argument).
fn steps(corpus: &Path, text: &str) -> Result<Vec<(usize, String, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed = match line.strip_prefix("S= ") {
            Some(arg) => Some(("S=", arg)),
            None => line
                .split_once(": ")
                .or_else(|| line.strip_suffix(':').map(|k| (k, ""))),
        };
        let Some((kind, arg)) = parsed else {
            return Err(format!("line {n}: cannot read {line:?}"));
        };
        let kind = kind.to_string();
        if kind == "I" {
            let mut words = arg.split(' ');
            let name = words.next().unwrap_or_default();
            let include = corpus.join("include").join(format!("{name}.steps"));
            let mut body = std::fs::read_to_string(&include)
                .map_err(|e| format!("line {n}: include {}: {e}", include.display()))?;
            for (i, word) in words.enumerate() {
                body = body.replace(&format!("{{{}}}", i + 1), word);
            }
            if body.contains("{1}") {
                return Err(format!("line {n}: include {name} needs arguments"));
            }
            for (_, kind, arg) in steps(corpus, &body)? {
                out.push((n, kind, arg));
            }
            continue;
        }
        out.push((n, kind, arg.to_string()));
    }
    Ok(out)
}

fn run(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).unwrap();
    let header = |key: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(&format!("# {key}:"))
                .map(|v| v.trim().to_string())
        })
    };
    if header("server").is_some() {
        return Err("'# server:' profiles are gone: use '# config: key = value' lines".into());
    }
    let overrides: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# config:").map(|v| v.trim().to_string()))
        .collect();
    let steps = steps(path.parent().unwrap(), &text)?;
    let server = Server::start(&overrides);
    let pop3 = header("port").as_deref() == Some("pop3");
    let split = header("split").as_deref() == Some("bytes");
    let port = if pop3 { server.pop3 } else { server.smtp };
    let mut s = Session {
        client: LineClient::connect(([127, 0, 0, 1], port)),
        pop3,
        last_command: String::new(),
    };
    let greeting = s.reply().ok_or("no greeting")?;
    if !greeting.starts_with(if pop3 { "+OK" } else { "220" }) {
        return Err(format!("greeting: {greeting}"));
    }
    let send = |s: &mut Session, bytes: &[u8]| {
        // A write may fail once the server has closed; the next S: step tells.
        if split {
            for b in bytes {
                if !s.client.send_bytes(std::slice::from_ref(b)) {
                    break;
                }
            }
        } else {
            s.client.send_bytes(bytes);
        }
    };
    let mut after = Vec::new();
    let mut step_ended = Instant::now();
    for (n, kind, arg) in steps {
        let arg = arg.as_str();
        match kind.as_str() {
            "C" => {
                s.last_command = arg.to_string();
                send(&mut s, format!("{arg}\r\n").as_bytes());
            }
            "R" => send(&mut s, &unescape(arg)),
            "S" if arg == "(closed)" => s
                .client
                .expect_closed()
                .map_err(|e| format!("line {n}: {e}"))?,
            "S" | "S=" => {
                let got = s
                    .reply()
                    .ok_or_else(|| format!("line {n}: connection closed, expected {arg:?}"))?;
                let matches = if kind == "S=" {
                    got == arg
                } else {
                    got.starts_with(arg)
                };
                if !matches {
                    return Err(format!("line {n}: expected {arg:?}, got {got:?}"));
                }
            }
            timed if timed.starts_with("S@") => {
                let (lo, hi) = timed[2..]
                    .split_once('-')
                    .and_then(|(lo, hi)| Some((lo.parse::<f64>().ok()?, hi.parse::<f64>().ok()?)))
                    .ok_or_else(|| format!("line {n}: S@LO-HI wants two numbers of seconds"))?;
                let got = s
                    .reply()
                    .ok_or_else(|| format!("line {n}: connection closed, expected {arg:?}"))?;
                let took = step_ended.elapsed().as_secs_f64();
                if !got.starts_with(arg) {
                    return Err(format!("line {n}: expected {arg:?}, got {got:?}"));
                }
                if !(lo..=hi).contains(&took) {
                    return Err(format!(
                        "line {n}: {got:?} came after {took:.2} s, expected between {lo} and {hi} s"
                    ));
                }
            }
            "W" => std::thread::sleep(Duration::from_secs_f64(arg.parse().unwrap())),
            "M" | "L" => after.push((n, kind.clone(), arg.to_string())),
            other => return Err(format!("line {n}: unknown step {other:?}")),
        }
        step_ended = Instant::now();
    }
    drop(s);
    // Deliveries are durable before the 250; the log line may trail it by a moment.
    std::thread::sleep(Duration::from_millis(100));
    for (n, kind, arg) in after {
        match kind.as_str() {
            "M" => {
                let (address, count) = arg.rsplit_once(' ').unwrap();
                let got = server.new_messages(address)?;
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

/// One test per dialog file.
fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dialogs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dialog"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "the corpus is in tests/dialogs");
    // The password hash is made once, before the tests run in parallel.
    hash();
    let trials = files
        .into_iter()
        .map(|file| {
            let name = file.file_stem().unwrap().to_string_lossy().into_owned();
            libtest_mimic::Trial::test(name, move || run(&file).map_err(Into::into))
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
