//! The SMTP receiving session (RFC 5321) as a state machine that does no I/O: the driver feeds it bytes
//! with [`Session::advance`] and acts on the [`Event`]s it returns; replies accumulate in an outbox
//! that the driver writes out whenever the session needs more input (so pipelined replies go out in
//! one write, RFC 2920 §3.2).

use std::net::IpAddr;
use std::sync::Arc;

use super::command::{self, Body, Command, MailDsn, Mailbox, ParseError, RcptDsn};
use super::data::{ChunkReader, DataReader, DataStep};
use super::reply::{self, Reply};
use crate::accounts::{Account, Secret};
use crate::config::Settings;

/// What the driver must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// All complete input was used: flush the outbox, then read more.
    NeedInput,
    /// DATA was accepted: open a spool file and write [`Session::trace_headers`] into it.
    MessageStart,
    /// One line of the message (dot-unstuffed, without line ending): append it with a newline.
    MessageLine(&'a [u8]),
    /// Part of a long message line, more of it to follow: append it as is, without a newline.
    MessagePartial(&'a [u8]),
    /// Message bytes already in stored form (BDAT): append [`Session::take_message_bytes`].
    MessageBytes,
    /// The message was refused (its reply follows once the data ends): discard the spool file.
    MessageAbort,
    /// The message is complete: make it durable, then report with [`Session::message_stored`].
    MessageEnd,
    /// Flush the outbox, then switch the connection to TLS and call [`Session::tls_started`]. Any
    /// input already read after the STARTTLS line must be discarded (CVE-2011-0411).
    StartTls,
    /// Verify these credentials (AUTH), then call [`Session::auth_result`].
    Authenticate { user: String, password: Secret },
    /// Flush the outbox and close the connection.
    Close,
}

/// The listener a session runs on, and what its connection already has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Channel {
    /// Message submission (RFC 6409): AUTH offered and required before MAIL; senders checked.
    pub submission: bool,
    /// The connection is encrypted (implicit TLS, or after STARTTLS).
    pub tls: bool,
    /// A certificate is configured, so STARTTLS can be offered.
    pub starttls: bool,
}

/// The driver's verdict on an AUTH exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Accepted(Arc<Account>),
    Rejected,
    /// Too many failures from this address lately.
    Throttled,
}

/// The envelope of the transaction in progress.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    /// `None` for the null reverse-path.
    pub from: Option<Mailbox>,
    pub body: Body,
    /// SMTPUTF8 was declared: UTF-8 addresses are allowed (RFC 6531).
    pub smtputf8: bool,
    /// The authenticated account that submits this message (submission only).
    pub submitter: Option<String>,
    /// Accepted recipients as given.
    pub recipients: Vec<Mailbox>,
    /// Where they deliver, each account once.
    pub mailboxes: Vec<Arc<Account>>,
    /// Recipients at other domains (submission only): queued for outbound delivery, each once, with
    /// what the sender asked of notifications (RFC 3461).
    pub remote: Vec<(Mailbox, RcptDsn)>,
    /// Local recipients whose sender asked to be told of the delivery (`NOTIFY=SUCCESS`).
    pub notify_delivered: Vec<(Mailbox, RcptDsn)>,
    /// RET and ENVID of MAIL (RFC 3461).
    pub dsn: MailDsn,
}

#[derive(Debug)]
enum Mode {
    Command,
    /// Discarding an over-long command line up to its LF.
    DrainCommand,
    Data(DataReader),
    /// Inside a BDAT chunk: `left` octets still belong to it (RFC 3030).
    Chunk {
        left: u64,
        last: bool,
    },
    /// The message is being stored; no input is processed until the driver reports.
    Storing,
    /// Inside an AUTH exchange: the next line is a SASL response, not a command.
    Auth(auth::Step),
    Closed,
}

pub struct Session {
    settings: Arc<Settings>,
    peer: IpAddr,
    channel: Channel,
    /// The account that authenticated (AUTH), for the rest of the session or until STARTTLS.
    account: Option<Arc<Account>>,
    auth_failures: u32,
    /// The EHLO/HELO argument and whether it was EHLO.
    helo: Option<(String, bool)>,
    envelope: Option<Envelope>,
    mode: Mode,
    /// The BDAT transaction in progress: its reader (None between transactions), and whether its data
    /// is being kept (false: the chunks are read and dropped, e.g. after a refusal).
    bdat: Option<ChunkReader>,
    bdat_keep: bool,
    /// The reply that refused the current BDAT transaction: the chunks already sent after it (a
    /// pipelining client cannot stop them) get it too, without counting as client errors.
    bdat_refusal: Option<Reply>,
    /// Stored-form bytes of the current BDAT chunk, for [`Event::MessageBytes`].
    chunk_out: Vec<u8>,
    outbox: Vec<u8>,
    errors: u32,
    /// Command lines (and SASL responses) read so far: a new one starts a new request deadline.
    requests: u64,
    shutdown_requested: bool,
}

impl Session {
    /// A new session; its greeting is already in the outbox.
    pub fn new(settings: Arc<Settings>, peer: IpAddr, channel: Channel) -> Session {
        let mut session = Session {
            settings,
            peer,
            channel,
            account: None,
            auth_failures: 0,
            helo: None,
            envelope: None,
            mode: Mode::Command,
            bdat: None,
            bdat_keep: false,
            bdat_refusal: None,
            chunk_out: Vec::new(),
            outbox: Vec::new(),
            errors: 0,
            requests: 0,
            shutdown_requested: false,
        };
        let greeting = format!("{} ESMTP rustmail ready", session.settings.hostname);
        session.reply(Reply::new(220, "", "").with_text(greeting));
        session
    }

    /// A session refused because the server is full: one `421` and close.
    pub fn refuse_busy(&mut self) {
        self.outbox.clear();
        self.reply(reply::TOO_MANY_CONNECTIONS);
        self.mode = Mode::Closed;
    }

    pub fn outbox(&mut self) -> &mut Vec<u8> {
        &mut self.outbox
    }

    pub fn envelope(&self) -> Option<&Envelope> {
        self.envelope.as_ref()
    }

    /// True while a message is being received or stored: the connection must not be cut.
    pub fn in_message(&self) -> bool {
        matches!(
            self.mode,
            Mode::Data(_) | Mode::Chunk { .. } | Mode::Storing
        )
    }

    /// How many command lines have been read whole: the driver restarts the command deadline when
    /// this changes, so a line trickled in byte by byte still has to complete within the timeout.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The bytes announced by [`Event::MessageBytes`].
    pub fn take_message_bytes(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.chunk_out)
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.mode, Mode::Closed)
    }

    /// The server is stopping: answer `421` now if idle, else at the next command (a message being
    /// received is never cut).
    pub fn request_shutdown(&mut self) {
        self.shutdown_requested = true;
        if matches!(
            self.mode,
            Mode::Command | Mode::DrainCommand | Mode::Auth(_)
        ) {
            self.close_with(reply::SHUTTING_DOWN);
        }
    }

    /// The peer was silent for too long (RFC 5321 §4.5.3.2), or too slow with its command or message.
    pub fn timed_out(&mut self) {
        self.close_with(reply::TIMEOUT);
    }

    /// The session reached `limits.session_timeout_secs`.
    pub fn session_expired(&mut self) {
        self.close_with(reply::SESSION_EXPIRED);
    }

    /// Processes input up to the next event. Returns the bytes consumed and the event.
    pub fn advance<'a>(&mut self, input: &'a [u8]) -> (usize, Event<'a>) {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match &mut self.mode {
                Mode::Closed => return (used, Event::Close),
                Mode::Storing => return (used, Event::NeedInput),
                Mode::Data(reader) => {
                    let (n, step) = reader.step(rest);
                    used += n;
                    match step {
                        DataStep::NeedMore => return (used, Event::NeedInput),
                        DataStep::Skipped => {}
                        DataStep::Line(line) => return (used, Event::MessageLine(line)),
                        DataStep::Partial(bytes) => return (used, Event::MessagePartial(bytes)),
                        DataStep::Failed(_) => return (used, Event::MessageAbort),
                        DataStep::End(Ok(())) => {
                            self.mode = Mode::Storing;
                            return (used, Event::MessageEnd);
                        }
                        DataStep::End(Err(e)) => {
                            self.data_refused(e);
                        }
                    }
                }
                Mode::Chunk { left, last } => {
                    let (left, last) = (*left, *last);
                    let n = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    if n == 0 && left > 0 {
                        return (used, Event::NeedInput);
                    }
                    used += n;
                    let left = left - n as u64;
                    self.mode = Mode::Chunk { left, last };
                    if let Some(event) = self.chunk_bytes(&rest[..n], left == 0, last) {
                        return (used, event);
                    }
                }
                Mode::DrainCommand => match rest.iter().position(|&b| b == b'\n') {
                    Some(lf) => {
                        used += lf + 1;
                        self.requests += 1;
                        self.mode = Mode::Command;
                        self.error(reply::LINE_TOO_LONG);
                    }
                    None => return (input.len(), Event::NeedInput),
                },
                Mode::Command | Mode::Auth(_) => {
                    // RFC 4954 §4: AUTH lines and SASL responses may be up to 12288 octets.
                    let auth_line = matches!(self.mode, Mode::Auth(_))
                        || rest
                            .get(..5)
                            .is_some_and(|v| v.eq_ignore_ascii_case(b"AUTH "));
                    let max = if auth_line {
                        self.settings.limits.max_command_length.max(12288)
                    } else {
                        self.settings.limits.max_command_length
                    };
                    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
                        if rest.len() >= max {
                            // An over-long command: discard it to its end before answering, so
                            // that its tail is never executed as a command of its own.
                            self.mode = Mode::DrainCommand;
                            return (input.len(), Event::NeedInput);
                        }
                        return (used, Event::NeedInput);
                    };
                    used += lf + 1;
                    self.requests += 1;
                    if lf + 1 > max {
                        // An over-long SASL response also ends the AUTH exchange.
                        self.mode = Mode::Command;
                        self.error(reply::LINE_TOO_LONG);
                        continue;
                    }
                    let line = rest[..lf].strip_suffix(b"\r").unwrap_or(&rest[..lf]);
                    let event = match std::mem::replace(&mut self.mode, Mode::Command) {
                        Mode::Auth(step) => self.auth_response(step, line),
                        mode => {
                            self.mode = mode;
                            self.command(line)
                        }
                    };
                    if let Some(event) = event {
                        return (used, event);
                    }
                }
            }
        }
    }

    fn command(&mut self, line: &[u8]) -> Option<Event<'static>> {
        if self.shutdown_requested {
            self.close_with(reply::SHUTTING_DOWN);
            return Some(Event::Close);
        }
        let command = match command::parse(line) {
            Ok(c) => c,
            Err(ParseError::HttpVerb) => {
                tracing::warn!("HTTP request on the SMTP port, closing");
                self.mode = Mode::Closed;
                return Some(Event::Close);
            }
            Err(e) => {
                self.error(match e {
                    ParseError::Unrecognised => reply::UNRECOGNISED,
                    ParseError::Syntax => reply::SYNTAX,
                    ParseError::Address => reply::ADDRESS_SYNTAX,
                    ParseError::UnknownParameter => reply::PARAMETER_UNKNOWN,
                    ParseError::NotImplemented | ParseError::HttpVerb => reply::NOT_IMPLEMENTED,
                });
                return self.is_closed().then_some(Event::Close);
            }
        };
        if !matches!(command, Command::Bdat { .. }) {
            self.bdat_refusal = None;
        }
        // A new transaction, RSET or EHLO ends a BDAT transaction that never got its LAST chunk.
        let abandons_bdat = matches!(
            command,
            Command::Ehlo(_) | Command::Helo(_) | Command::Rset | Command::Quit
        );
        let abort = abandons_bdat && self.bdat.take().is_some() && self.bdat_keep;
        match command {
            Command::Ehlo(name) => self.hello(name, true),
            Command::Helo(name) => self.hello(name, false),
            Command::Mail {
                from,
                size,
                body,
                smtputf8,
                dsn,
            } => self.mail(from, size, body, smtputf8, dsn),
            Command::Rcpt(to, dsn) => self.rcpt(to, dsn),
            Command::Data => return self.data(),
            Command::Bdat { size, last } => return self.bdat(size, last),
            Command::Rset => {
                self.envelope = None;
                self.reply(reply::RESET_OK);
            }
            Command::Noop => self.reply(reply::OK),
            Command::Vrfy => self.reply(reply::CANNOT_VRFY),
            Command::Expn => self.error(reply::NOT_IMPLEMENTED),
            Command::Help => self.reply(reply::HELP),
            Command::StartTls => return self.starttls(),
            Command::Auth { mechanism, initial } => {
                return self.auth(&mechanism, initial.as_deref());
            }
            Command::Quit => {
                self.close_with(reply::BYE);
            }
        }
        if abort {
            // The driver drops the spool file first; Close (if any) comes at the next advance.
            return Some(Event::MessageAbort);
        }
        self.is_closed().then_some(Event::Close)
    }

    fn hello(&mut self, name: String, esmtp: bool) {
        // RFC 5321 §4.1.4: EHLO/HELO in the middle of a transaction resets it.
        self.envelope = None;
        let host = &self.settings.hostname;
        let text = if esmtp {
            let mut text = format!(
                "{host}\nPIPELINING\nSIZE {}\n8BITMIME\nSMTPUTF8\nCHUNKING\nDSN\nENHANCEDSTATUSCODES",
                self.settings.limits.max_message_size
            );
            if self.channel.starttls && !self.channel.tls {
                text.push_str("\nSTARTTLS");
            }
            if self.channel.submission && self.plaintext_ok() {
                text.push_str("\nAUTH PLAIN LOGIN");
            }
            text
        } else {
            host.clone()
        };
        self.helo = Some((name, esmtp));
        self.reply(Reply::new(250, "", "").with_text(text));
    }

    fn reply(&mut self, reply: Reply) {
        reply.write_to(&mut self.outbox);
    }

    /// A refusal; enough of them and the session ends (a client that keeps failing is probing).
    fn error(&mut self, reply: Reply) {
        self.reply(reply);
        self.errors += 1;
        if self.errors >= self.settings.limits.max_errors {
            tracing::info!(errors = self.errors, "too many errors, closing");
            self.close_with(reply::TOO_MANY_ERRORS);
        }
    }

    fn close_with(&mut self, reply: Reply) {
        if !self.is_closed() {
            self.reply(reply);
            self.mode = Mode::Closed;
        }
    }
}

mod auth;
mod message;
mod transaction;

#[cfg(test)]
mod tests;
