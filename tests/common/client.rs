//! A small line-based client for SMTP and POP3, the one every Rust harness uses.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub struct LineClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LineClient {
    /// Connects with a 10 s read timeout (a reply later than that is a failure, not a wait).
    pub fn connect(addr: impl Into<SocketAddr>) -> LineClient {
        let stream = TcpStream::connect(addr.into()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        LineClient {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// One line with its CRLF; `None` at EOF or on an error (a timeout included).
    pub fn read_line(&mut self) -> Option<String> {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(String::from_utf8_lossy(&line).into_owned()),
        }
    }

    /// One line, which must be there.
    pub fn line(&mut self) -> String {
        self.read_line().expect("a line from the server")
    }

    /// Writes `bytes`; false when the server has closed.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> bool {
        self.writer.write_all(bytes).is_ok()
    }

    pub fn send(&mut self, text: &str) {
        assert!(self.send_bytes(text.as_bytes()), "the server closed");
    }

    /// One SMTP reply, all its lines; `None` when the connection closed first.
    pub fn read_smtp_reply(&mut self) -> Option<String> {
        let mut reply = String::new();
        loop {
            let line = self.read_line()?;
            reply.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(reply);
            }
        }
    }

    pub fn smtp_reply(&mut self) -> String {
        self.read_smtp_reply().expect("an SMTP reply")
    }

    pub fn smtp(&mut self, command: &str) -> String {
        self.send(&format!("{command}\r\n"));
        self.smtp_reply()
    }

    pub fn pop3(&mut self, command: &str) -> String {
        self.send(&format!("{command}\r\n"));
        self.line()
    }

    /// A POP3 multi-line body up to the lone dot (not included).
    pub fn pop3_body(&mut self) -> String {
        let mut body = String::new();
        while let Some(line) = self.read_line() {
            if line == ".\r\n" {
                break;
            }
            body.push_str(&line);
        }
        body
    }

    /// Ok when the server has closed: EOF, or a reset (after a close with unread input). Still open
    /// at the read timeout is an error: a server that keeps the connection must not pass.
    pub fn expect_closed(&mut self) -> Result<(), String> {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) if rest.is_empty() => Ok(()),
            Ok(_) => Err(format!(
                "expected the connection closed, got {:?}",
                String::from_utf8_lossy(&rest)
            )),
            Err(e) if matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe) => {
                Ok(())
            }
            Err(e) => Err(format!(
                "expected the connection closed, but it stayed open ({e})"
            )),
        }
    }
}
