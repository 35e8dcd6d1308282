//! The POP3 session (RFC 1939, CAPA from RFC 2449, response codes from RFC 3206) as a state machine
//! without I/O. The driver feeds bytes to [`Session::advance`], performs the [`Event`]s (check a login,
//! stream a message, apply deletions) and reports back; replies accumulate in the outbox.
//!
//! Deletions are only ever applied on QUIT from the TRANSACTION state (RFC 1939 §6): a dropped
//! connection, a timeout or a server stop leaves the mailbox as it was.

use std::sync::Arc;

use crate::config::Settings;

pub use crate::accounts::Secret;

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Flush the outbox and read more input.
    NeedInput,
    /// Flush the outbox, then call [`Session::advance`] again on the input that is left: listings are
    /// large for a short command, so pipelined LIST/UIDL must not pile up in memory.
    Flush,
    /// Verify these credentials, lock and list the mailbox, then call [`Session::login_result`].
    Login {
        user: String,
        credential: Credential,
    },
    /// Open message `index` (0-based), call [`Session::retrieve_started`], then stream it through a
    /// [`super::wire::Encoder`] with `top` (None for RETR).
    Retrieve { index: usize, top: Option<u64> },
    /// Apply these deletions (0-based indexes), then call [`Session::update_result`].
    Update { delete: Vec<usize> },
    /// STLS (RFC 2595): flush the outbox, discard any input read after the command, switch to TLS,
    /// then call [`Session::tls_started`].
    StartTls,
    /// Flush the outbox and close.
    Close,
}

/// How a client proves who it is.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential {
    /// USER/PASS or SASL PLAIN: the password itself.
    Password(Secret),
    /// APOP (RFC 1939 §7): the hex MD5 of the greeting's timestamp followed by the shared secret.
    Apop { digest: String },
}

/// A message as the session needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub uid: String,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFailure {
    BadCredentials,
    /// RFC 2449 LOGIN-DELAY: the account logged in too recently.
    TooSoon,
    /// Too many failed logins from this address lately.
    Throttled,
    InUse,
    ServerError,
}

#[derive(Debug)]
enum State {
    Authorization {
        user: Option<String>,
    },
    /// `AUTH PLAIN` without an initial response: waiting for it after `+ ` (RFC 5034 §4).
    SaslPlain,
    /// Waiting for the driver's verdict on a login.
    Verifying,
    Transaction,
    /// Waiting for the driver to apply deletions.
    Update,
    Closed,
}

pub struct Session {
    settings: Arc<Settings>,
    /// USER/PASS may be used on this connection (TLS, loopback, or allowed by config).
    plaintext_ok: bool,
    /// The greeting's `<timestamp@host>` when APOP is offered.
    apop_banner: Option<String>,
    /// STLS can be offered (a certificate exists and the connection is not TLS yet).
    stls: bool,
    state: State,
    messages: Vec<Listing>,
    deleted: Vec<bool>,
    outbox: Vec<u8>,
    draining: bool,
    errors: u32,
    auth_failures: u32,
    /// Command lines read whole; a new one starts a new request deadline in the driver.
    requests: u64,
}

/// Outbox size past which replies are written out before more pipelined commands are answered.
const OUTBOX_FLUSH: usize = 256 * 1024;

/// RFC 2449 §4: 255 octets for a command line; we allow more for long passwords.
const MAX_LINE: usize = 512;

impl Session {
    /// `apop_banner`: the `<…>` timestamp to put in the greeting when APOP is offered (RFC 1939 §7).
    pub fn new(
        settings: Arc<Settings>,
        plaintext_ok: bool,
        stls: bool,
        apop_banner: Option<String>,
    ) -> Session {
        let mut s = Session {
            settings,
            plaintext_ok,
            apop_banner,
            stls,
            state: State::Authorization { user: None },
            messages: Vec::new(),
            deleted: Vec::new(),
            outbox: Vec::new(),
            draining: false,
            errors: 0,
            auth_failures: 0,
            requests: 0,
        };
        let greeting = match &s.apop_banner {
            Some(banner) => format!("rustmail POP3 server ready {banner}"),
            None => "rustmail POP3 server ready".to_string(),
        };
        s.ok(&greeting);
        s
    }

    pub fn refuse_busy(&mut self) {
        self.outbox.clear();
        self.close_with("-ERR [SYS/TEMP] too many connections, try again later");
    }

    pub fn outbox(&mut self) -> &mut Vec<u8> {
        &mut self.outbox
    }

    /// How many command lines have been read whole (see the SMTP session's `requests`).
    pub fn requests(&self) -> u64 {
        self.requests
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Server stop or timeout: close without applying deletions.
    pub fn abort(&mut self, why: &str) {
        self.close_with(&format!("-ERR [SYS/TEMP] {why}; no messages deleted"));
    }

    pub fn advance(&mut self, input: &[u8]) -> (usize, Event) {
        let mut used = 0;
        loop {
            if self.outbox.len() >= OUTBOX_FLUSH && used < input.len() {
                return (used, Event::Flush);
            }
            match self.state {
                State::Closed => return (used, Event::Close),
                State::Verifying | State::Update => return (used, Event::NeedInput),
                _ => {}
            }
            let rest = &input[used..];
            let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
                if self.draining || rest.len() >= MAX_LINE {
                    self.draining = true;
                    return (input.len(), Event::NeedInput);
                }
                return (used, Event::NeedInput);
            };
            used += lf + 1;
            self.requests += 1;
            if std::mem::take(&mut self.draining) || lf + 1 > MAX_LINE {
                self.error("-ERR line too long");
                continue;
            }
            let line = rest[..lf].strip_suffix(b"\r").unwrap_or(&rest[..lf]);
            if let Some(event) = self.command(line) {
                return (used, event);
            }
        }
    }

    pub fn login_result(&mut self, result: Result<Vec<Listing>, LoginFailure>) {
        match result {
            Ok(messages) => {
                let total: u64 = messages.iter().map(|m| m.size).sum();
                self.ok(&format!(
                    "maildrop has {} messages ({total} octets)",
                    messages.len()
                ));
                self.deleted = vec![false; messages.len()];
                self.messages = messages;
                self.state = State::Transaction;
            }
            Err(failure) => {
                self.state = State::Authorization { user: None };
                match failure {
                    LoginFailure::BadCredentials => {
                        self.auth_failures += 1;
                        if self.auth_failures >= self.settings.auth.max_failures {
                            self.close_with(
                                "-ERR [AUTH] invalid user name or password; too many failures",
                            );
                        } else {
                            self.line("-ERR [AUTH] invalid user name or password");
                        }
                    }
                    LoginFailure::TooSoon => {
                        self.line("-ERR [LOGIN-DELAY] minimum time between logins not yet reached")
                    }
                    LoginFailure::Throttled => self.close_with(
                        "-ERR [AUTH] too many failed logins from your address; try again later",
                    ),
                    LoginFailure::InUse => {
                        self.line("-ERR [IN-USE] mailbox is in use by another session")
                    }
                    LoginFailure::ServerError => {
                        self.line("-ERR [SYS/TEMP] cannot open the mailbox, try again later")
                    }
                }
            }
        }
    }

    /// After [`Event::Retrieve`]: whether the message could be opened.
    pub fn retrieve_started(&mut self, index: usize, opened: bool) {
        if opened {
            let size = self.messages[index].size;
            self.ok(&format!("{size} octets"));
        } else {
            self.line("-ERR [SYS/TEMP] message cannot be read now");
        }
    }

    /// After [`Event::Update`].
    pub fn update_result(&mut self, ok: bool) {
        if ok {
            let n = self.deleted.iter().filter(|&&d| d).count();
            self.close_with(&format!("+OK rustmail signing off ({n} messages deleted)"));
        } else {
            self.close_with("-ERR [SYS/TEMP] some deleted messages were not removed");
        }
    }

    fn command(&mut self, line: &[u8]) -> Option<Event> {
        let Ok(line) = std::str::from_utf8(line) else {
            self.error("-ERR command must be ASCII");
            return self.closed_event();
        };
        let (verb, args) = line.split_once(' ').unwrap_or((line, ""));
        let verb = verb.to_ascii_uppercase();
        let args: Vec<&str> = args.split(' ').filter(|a| !a.is_empty()).collect();
        if verb == "CAPA" && !matches!(self.state, State::SaslPlain) {
            self.capa();
            return None;
        }
        match self.state {
            State::SaslPlain => self.sasl_plain_response(line),
            State::Authorization { .. } => self.authorization(&verb, &args, line),
            State::Transaction => self.transaction(&verb, &args),
            _ => None,
        }
    }

    fn authorization(&mut self, verb: &str, args: &[&str], line: &str) -> Option<Event> {
        match verb {
            "USER" if !self.plaintext_ok => {
                self.error(
                    "-ERR [AUTH] plaintext authentication is not allowed on this connection",
                );
            }
            "USER" if args.len() == 1 => {
                self.state = State::Authorization {
                    user: Some(args[0].to_string()),
                };
                // Same answer for every name: nothing is disclosed before the password is checked.
                self.ok("send PASS");
            }
            "PASS" => {
                let State::Authorization { user: Some(user) } = &mut self.state else {
                    self.error("-ERR USER first");
                    return self.closed_event();
                };
                let user = std::mem::take(user);
                // RFC 1939 §7: the password is the rest of the line and may contain spaces.
                let password = line.get(5..).unwrap_or("").to_string();
                return Some(self.login(user, Credential::Password(Secret(password))));
            }
            "APOP" if self.apop_banner.is_none() => self.error("-ERR APOP is not offered"),
            "APOP" if args.len() == 2 => {
                let digest = args[1].to_ascii_lowercase();
                return Some(self.login(args[0].to_string(), Credential::Apop { digest }));
            }
            "APOP" => self.error("-ERR syntax: APOP name digest"),
            // RFC 5034: AUTH without a mechanism lists them (as RFC 1734 servers did).
            "AUTH" if args.is_empty() => {
                self.outbox
                    .extend_from_slice(b"+OK SASL mechanisms follow\r\n");
                if self.plaintext_ok {
                    self.outbox.extend_from_slice(b"PLAIN\r\n");
                }
                self.outbox.extend_from_slice(b".\r\n");
            }
            "AUTH" if !args[0].eq_ignore_ascii_case("PLAIN") => {
                self.error("-ERR unsupported SASL mechanism")
            }
            "AUTH" if !self.plaintext_ok => {
                self.error("-ERR [AUTH] plaintext authentication is not allowed on this connection")
            }
            "AUTH" if args.len() == 2 => return self.sasl_plain(args[1]),
            "AUTH" if args.len() == 1 => {
                self.state = State::SaslPlain;
                self.outbox.extend_from_slice(b"+ \r\n");
            }
            "AUTH" => self.error("-ERR syntax: AUTH mechanism [initial-response]"),
            "QUIT" => self.close_with("+OK rustmail signing off"),
            "STLS" if self.stls && args.is_empty() => {
                self.ok("Begin TLS negotiation");
                return Some(Event::StartTls);
            }
            "STLS" => self.error("-ERR TLS is not available on this connection"),
            "USER" => self.error("-ERR syntax: USER name"),
            _ => self.error("-ERR unknown command or not allowed before login"),
        }
        self.closed_event()
    }

    /// After the STLS handshake: passwords may now be sent, and the USER state starts over.
    pub fn tls_started(&mut self) {
        self.stls = false;
        self.plaintext_ok = true;
        self.state = State::Authorization { user: None };
    }

    fn login(&mut self, user: String, credential: Credential) -> Event {
        self.state = State::Verifying;
        Event::Login { user, credential }
    }

    /// The response line of `AUTH PLAIN` after the `+ ` continuation.
    fn sasl_plain_response(&mut self, line: &str) -> Option<Event> {
        self.state = State::Authorization { user: None };
        if line == "*" {
            self.error("-ERR authentication cancelled");
            return self.closed_event();
        }
        self.sasl_plain(line)
    }

    /// RFC 4616 PLAIN: base64 of `authzid NUL authcid NUL password`.
    fn sasl_plain(&mut self, response: &str) -> Option<Event> {
        match crate::sasl::decode_plain(response) {
            Ok((user, password)) => Some(self.login(user, Credential::Password(Secret(password)))),
            Err(crate::sasl::PlainError::OtherIdentity) => {
                self.error("-ERR [AUTH] authorization identity not allowed");
                self.closed_event()
            }
            Err(crate::sasl::PlainError::Malformed) => {
                self.error("-ERR malformed SASL PLAIN response");
                self.closed_event()
            }
        }
    }

    fn transaction(&mut self, verb: &str, args: &[&str]) -> Option<Event> {
        match (verb, args.len()) {
            ("STAT", 0) => {
                let (n, octets) = self
                    .live()
                    .fold((0, 0), |(n, o), (_, m)| (n + 1, o + m.size));
                self.ok(&format!("{n} {octets}"));
            }
            ("LIST", 0) => self.listing(|i, m| format!("{} {}", i + 1, m.size)),
            ("UIDL", 0) => self.listing(|i, m| format!("{} {}", i + 1, m.uid)),
            ("LIST", 1) => {
                if let Some(i) = self.message_arg(args[0]) {
                    self.ok(&format!("{} {}", i + 1, self.messages[i].size));
                }
            }
            ("UIDL", 1) => {
                if let Some(i) = self.message_arg(args[0]) {
                    self.ok(&format!("{} {}", i + 1, self.messages[i].uid));
                }
            }
            ("RETR", 1) => {
                let index = self.message_arg(args[0])?;
                return Some(Event::Retrieve { index, top: None });
            }
            ("TOP", 2) => {
                let index = self.message_arg(args[0])?;
                let lines = Some(args[1])
                    .filter(|a| a.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|a| a.parse::<u64>().ok());
                let Some(lines) = lines else {
                    self.error("-ERR syntax: TOP msg n");
                    return self.closed_event();
                };
                return Some(Event::Retrieve {
                    index,
                    top: Some(lines),
                });
            }
            ("DELE", 1) => {
                if let Some(i) = self.message_arg(args[0]) {
                    self.deleted[i] = true;
                    self.ok(&format!("message {} deleted", i + 1));
                }
            }
            ("RSET", 0) => {
                self.deleted.iter_mut().for_each(|d| *d = false);
                self.ok(&format!("maildrop has {} messages", self.messages.len()));
            }
            ("NOOP", 0) => self.ok(""),
            ("QUIT", 0) => {
                // Always through UPDATE, even with nothing to delete: the driver also settles the
                // Seen flags there, before the answer and before the mailbox is unlocked.
                let delete: Vec<usize> = (0..self.deleted.len())
                    .filter(|&i| self.deleted[i])
                    .collect();
                self.state = State::Update;
                return Some(Event::Update { delete });
            }
            ("STAT" | "LIST" | "UIDL" | "RETR" | "TOP" | "DELE" | "RSET" | "NOOP" | "QUIT", _) => {
                self.error("-ERR wrong number of arguments")
            }
            ("USER" | "PASS" | "APOP" | "AUTH", _) => self.error("-ERR already logged in"),
            _ => self.error("-ERR unknown command"),
        }
        self.closed_event()
    }

    /// Messages not marked as deleted, with their 0-based index.
    fn live(&self) -> impl Iterator<Item = (usize, &Listing)> {
        self.messages
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.deleted[*i])
    }

    fn listing(&mut self, line: impl Fn(usize, &Listing) -> String) {
        let mut text = format!("+OK {} messages\r\n", self.live().count());
        for (i, m) in self.live() {
            text.push_str(&line(i, m));
            text.push_str("\r\n");
        }
        text.push_str(".\r\n");
        self.outbox.extend_from_slice(text.as_bytes());
    }

    /// Parses a message number; answers `-ERR` itself when it names no live message.
    fn message_arg(&mut self, arg: &str) -> Option<usize> {
        // RFC 1939: a message number is digits only (Rust's parse would take "+1").
        let index = Some(arg)
            .filter(|a| a.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|a| a.parse::<usize>().ok())
            .and_then(|n| n.checked_sub(1))
            .filter(|&i| i < self.messages.len() && !self.deleted[i]);
        if index.is_none() {
            self.error("-ERR no such message");
        }
        index
    }

    fn capa(&mut self) {
        let mut text = String::from("+OK capability list follows\r\nTOP\r\nUIDL\r\n");
        if self.stls && matches!(self.state, State::Authorization { .. }) {
            text.push_str("STLS\r\n");
        }
        if self.plaintext_ok {
            text.push_str("USER\r\nSASL PLAIN\r\n");
        }
        // RFC 2449 §6.5/6.7: rustmail never deletes mail by itself; LOGIN-DELAY when configured.
        text.push_str("EXPIRE NEVER\r\n");
        let delay = self.settings.auth.pop3_login_delay_secs;
        if delay > 0 {
            text.push_str(&format!("LOGIN-DELAY {delay}\r\n"));
        }
        text.push_str(
            "RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nIMPLEMENTATION rustmail\r\n.\r\n",
        );
        self.outbox.extend_from_slice(text.as_bytes());
    }

    fn closed_event(&self) -> Option<Event> {
        self.is_closed().then_some(Event::Close)
    }

    fn ok(&mut self, text: &str) {
        if text.is_empty() {
            self.line("+OK");
        } else {
            self.line(&format!("+OK {text}"));
        }
    }

    fn line(&mut self, text: &str) {
        self.outbox.extend_from_slice(text.as_bytes());
        self.outbox.extend_from_slice(b"\r\n");
    }

    fn error(&mut self, text: &str) {
        self.line(text);
        self.errors += 1;
        if self.errors >= self.settings.limits.max_errors {
            self.close_with("-ERR too many errors, closing");
        }
    }

    fn close_with(&mut self, text: &str) {
        if !self.is_closed() {
            self.line(text);
            self.state = State::Closed;
        }
    }
}

#[cfg(test)]
mod tests;
