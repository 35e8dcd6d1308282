//! One SMTP client connection to a receiving server: connect, greeting, EHLO (HELO for servers that
//! do not know it), STARTTLS, commands and replies, each within a timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::tls::{Check, ClientTls};
use super::wire::{Capabilities, Reply, parse_reply};

/// What the connection's encryption was, for the log line of each attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsState {
    None,
    /// Encrypted; the certificate did not verify for the host name.
    Unverified,
    /// Encrypted with a certificate valid for the host name.
    Verified,
    /// Encrypted with a certificate the host's DNSSEC-signed TLSA records match (RFC 7672).
    Dane,
}

impl TlsState {
    pub fn is_encrypted(self) -> bool {
        self != TlsState::None
    }

    pub fn name(self) -> &'static str {
        match self {
            TlsState::None => "none",
            TlsState::Unverified => "unverified",
            TlsState::Verified => "verified",
            TlsState::Dane => "dane",
        }
    }
}

/// Why the conversation cannot go on.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The connection broke, timed out or the server spoke nonsense: try again (elsewhere, later).
    Connection(String),
    /// The server answered a session command (greeting, EHLO, STARTTLS) negatively.
    Refused(Reply),
}

impl Failure {
    pub fn text(&self) -> String {
        match self {
            Failure::Connection(text) => text.clone(),
            Failure::Refused(reply) => reply.text(),
        }
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Only during the STARTTLS handshake.
    Gone,
}

pub struct Client {
    stream: Stream,
    buf: Vec<u8>,
    timeout: Duration,
    pub host: String,
    pub tls: TlsState,
    pub caps: Capabilities,
}

impl Client {
    /// Connects and reads the greeting, which must be 220 (RFC 5321 §3.1). With `implicit_tls`
    /// (a smarthost on port 465, RFC 8314), the TLS handshake comes first.
    pub async fn connect(
        addr: SocketAddr,
        host: &str,
        connect_timeout: Duration,
        command_timeout: Duration,
        implicit_tls: Option<(&ClientTls, bool)>,
    ) -> Result<Client, Failure> {
        let tcp = match timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Err(Failure::Connection(format!(
                    "connect to {host} [{}]: {e}",
                    addr.ip()
                )));
            }
            Err(_) => {
                return Err(Failure::Connection(format!(
                    "connect to {host} [{}]: timed out",
                    addr.ip()
                )));
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut client = Client {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            timeout: command_timeout,
            host: host.to_string(),
            tls: TlsState::None,
            caps: Capabilities::default(),
        };
        if let Some((tls, require_valid)) = implicit_tls {
            client
                .handshake(tls, Check::WebPki { require_valid })
                .await?;
        }
        let greeting = client.read_reply().await?;
        if greeting.code != 220 {
            return Err(Failure::Refused(greeting));
        }
        Ok(client)
    }

    /// EHLO, or HELO when the server refuses EHLO as unknown (then no extension is used).
    pub async fn hello(&mut self, name: &str) -> Result<(), Failure> {
        let reply = self.command(&format!("EHLO {name}")).await?;
        if reply.code == 250 {
            self.caps = Capabilities::from_ehlo(&reply);
            return Ok(());
        }
        if !reply.is_permanent() {
            return Err(Failure::Refused(reply));
        }
        let reply = self.command(&format!("HELO {name}")).await?;
        if reply.code != 250 {
            return Err(Failure::Refused(reply));
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    /// STARTTLS (RFC 3207), the handshake (its certificate checked as `check` says), and EHLO again.
    pub async fn starttls(
        &mut self,
        tls: &ClientTls,
        check: Check,
        name: &str,
    ) -> Result<(), Failure> {
        let reply = self.command("STARTTLS").await?;
        if reply.code != 220 {
            return Err(Failure::Refused(reply));
        }
        if !self.buf.is_empty() {
            // Octets after the 220, before the handshake: injected into the plain text stream.
            return Err(Failure::Connection(
                "data sent before the TLS handshake (injection?)".into(),
            ));
        }
        self.handshake(tls, check).await?;
        self.hello(name).await
    }

    /// The TLS handshake on the plain connection, recording whether the certificate verified.
    async fn handshake(&mut self, tls: &ClientTls, check: Check) -> Result<(), Failure> {
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(Failure::Connection(
                "STARTTLS on an encrypted connection".into(),
            ));
        };
        let dane = matches!(check, Check::Dane(_));
        let (config, verified) = tls.connection(check);
        let server_name =
            rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
                Failure::Connection(format!("{}: not a TLS server name: {e}", self.host))
            })?;
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&config));
        let stream = match timeout(self.timeout, connector.connect(server_name, tcp)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                let why = if dane {
                    " (DANE: the certificate must match its TLSA records)"
                } else {
                    ""
                };
                return Err(Failure::Connection(format!(
                    "TLS handshake with {}{why}: {e}",
                    self.host
                )));
            }
            Err(_) => {
                return Err(Failure::Connection(format!(
                    "TLS handshake with {}: timed out",
                    self.host
                )));
            }
        };
        self.stream = Stream::Tls(Box::new(stream));
        self.tls = if dane {
            // A DANE handshake only succeeds with a matching certificate.
            TlsState::Dane
        } else if verified.load(Ordering::SeqCst) {
            TlsState::Verified
        } else {
            TlsState::Unverified
        };
        Ok(())
    }

    /// AUTH PLAIN (RFC 4616), or LOGIN where PLAIN is not offered, after TLS only.
    pub async fn authenticate(&mut self, username: &str, password: &str) -> Result<(), Failure> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        if !self.tls.is_encrypted() {
            return Err(Failure::Connection("no AUTH without TLS".into()));
        }
        let reply = if self.caps.auth.iter().any(|m| m == "PLAIN") {
            let token = b64.encode(format!("\0{username}\0{password}"));
            self.command(&format!("AUTH PLAIN {token}")).await?
        } else if self.caps.auth.iter().any(|m| m == "LOGIN") {
            let first = self.command("AUTH LOGIN").await?;
            if first.code != 334 {
                return Err(Failure::Refused(first));
            }
            let second = self.command(&b64.encode(username)).await?;
            if second.code != 334 {
                return Err(Failure::Refused(second));
            }
            self.command(&b64.encode(password)).await?
        } else {
            return Err(Failure::Connection(format!(
                "{} offers neither AUTH PLAIN nor AUTH LOGIN",
                self.host
            )));
        };
        if reply.code != 235 {
            return Err(Failure::Refused(reply));
        }
        Ok(())
    }

    /// Sends one command line and reads its reply.
    pub async fn command(&mut self, line: &str) -> Result<Reply, Failure> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.read_reply().await
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        let host = self.host.clone();
        let written = match &mut self.stream {
            Stream::Plain(s) => timeout(self.timeout, s.write_all(bytes)).await,
            Stream::Tls(s) => {
                timeout(self.timeout, async {
                    s.write_all(bytes).await?;
                    s.flush().await
                })
                .await
            }
            Stream::Gone => return Err(Failure::Connection("connection lost".into())),
        };
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::Connection(format!("writing to {host}: {e}"))),
            Err(_) => Err(Failure::Connection(format!("writing to {host}: timed out"))),
        }
    }

    /// The message content: each 64 KiB piece must be taken within the command timeout, so a large
    /// message to a slow (but moving) peer is not cut off by one overall limit.
    pub async fn send_data(&mut self, payload: &[u8]) -> Result<(), Failure> {
        for piece in payload.chunks(64 * 1024) {
            self.send(piece).await?;
        }
        Ok(())
    }

    /// The reply to the final dot: RFC 5321 §4.5.3.2.6 gives it 10 minutes (content checks run then).
    pub async fn read_final_reply(&mut self) -> Result<Reply, Failure> {
        self.read_reply_within(self.timeout.max(Duration::from_secs(600)))
            .await
    }

    pub async fn read_reply(&mut self) -> Result<Reply, Failure> {
        self.read_reply_within(self.timeout).await
    }

    async fn read_reply_within(&mut self, limit: Duration) -> Result<Reply, Failure> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match parse_reply(&self.buf) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(e) => return Err(Failure::Connection(format!("{}: {}", self.host, e.0))),
            }
            let mut chunk = [0u8; 4096];
            let read = match &mut self.stream {
                Stream::Plain(s) => tokio::time::timeout_at(deadline, s.read(&mut chunk)).await,
                Stream::Tls(s) => tokio::time::timeout_at(deadline, s.read(&mut chunk)).await,
                Stream::Gone => return Err(Failure::Connection("connection lost".into())),
            };
            match read {
                Ok(Ok(0)) => {
                    return Err(Failure::Connection(format!(
                        "{} closed the connection",
                        self.host
                    )));
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => {
                    return Err(Failure::Connection(format!(
                        "reading from {}: {e}",
                        self.host
                    )));
                }
                Err(_) => {
                    return Err(Failure::Connection(format!(
                        "{} did not answer in time",
                        self.host
                    )));
                }
            }
        }
    }

    /// QUIT, reading the reply briefly; the connection closes either way.
    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(5), self.command("QUIT")).await;
        if let Stream::Tls(s) = &mut self.stream {
            let _ = timeout(Duration::from_secs(1), s.shutdown()).await;
        }
    }
}
