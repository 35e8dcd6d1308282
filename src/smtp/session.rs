//! The SMTP receiving session (RFC 5321) as a state machine that does no I/O: the driver feeds it bytes
//! with [`Session::advance`] and acts on the [`Event`]s it returns; replies accumulate in an outbox
//! that the driver writes out whenever the session needs more input (so pipelined replies go out in
//! one write, RFC 2920 §3.2).

use std::net::IpAddr;
use std::sync::Arc;

use super::command::{self, Body, Command, Mailbox, ParseError};
use super::data::{ChunkReader, DataError, DataReader, DataStep};
use super::headers::{SenderFields, SenderProblem};
use super::reply::{self, Reply};
use crate::accounts::{Account, Route, Secret};
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
        if matches!(self.mode, Mode::Command | Mode::DrainCommand) {
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

    /// The driver's report on storing the message announced by [`Event::MessageEnd`].
    pub fn message_stored(&mut self, result: Result<&str, ()>) {
        self.envelope = None;
        self.bdat = None;
        self.mode = Mode::Command;
        match result {
            Ok(id) => self.reply(reply::OK.with_text(format!("OK, queued as {id}"))),
            Err(()) => self.reply(reply::STORAGE_FAILED),
        }
    }

    /// The message announced by [`Event::MessageEnd`] was refused after all (its content broke a rule
    /// only visible at the end, such as a forged From: on submission): nothing was stored.
    pub fn message_refused(&mut self, refusal: Reply) {
        self.envelope = None;
        self.bdat = None;
        self.mode = Mode::Command;
        self.error(refusal);
    }

    /// Submission (RFC 6409 §8): the message's `From:`/`Sender:` as the header pass saw them must be
    /// well formed and, with `auth.restrict_senders`, name only the account's own addresses. Decided
    /// with this session's own settings and account, so a reload in between cannot open it up; a
    /// session without an account (impossible on submission) is refused, never waved through.
    pub fn check_submission_headers(&self, senders: &SenderFields) -> Result<(), Reply> {
        let Some(account) = &self.account else {
            return Err(reply::FROM_NOT_OWNED);
        };
        let restrict = self.settings.auth.restrict_senders;
        let directory = &self.settings.directory;
        match senders
            .check(|local, domain| !restrict || directory.may_send_as(account, local, domain))
        {
            Ok(()) => Ok(()),
            Err(problem) => {
                tracing::info!(account = %account.address, ?problem, "From:/Sender: refused");
                Err(match problem {
                    SenderProblem::Malformed => reply::ORIGINATOR_MALFORMED,
                    SenderProblem::NotOwned => reply::FROM_NOT_OWNED,
                })
            }
        }
    }

    /// `Return-Path:` and `Received:` (RFC 5321 §4.4) for the current transaction, LF-terminated.
    pub fn trace_headers(&self, id: &str, date: &str) -> String {
        let envelope = self.envelope.as_ref();
        let from = envelope
            .and_then(|e| e.from.as_ref())
            .map_or("", |m| m.raw.as_str());
        let (helo, esmtp) = self.helo.clone().unwrap_or_default();
        // RFC 3848 / RFC 6531 §4.3 protocol names: S for TLS, A for an authenticated submitter.
        let base = match (esmtp, envelope.is_some_and(|e| e.smtputf8)) {
            (_, true) => "UTF8SMTP",
            (true, false) => "ESMTP",
            (false, false) => "SMTP",
        };
        let with = format!(
            "{base}{}{}",
            if self.channel.tls { "S" } else { "" },
            if envelope.is_some_and(|e| e.submitter.is_some()) {
                "A"
            } else {
                ""
            }
        );
        let peer = match self.peer {
            IpAddr::V4(ip) => format!("[{ip}]"),
            IpAddr::V6(ip) => format!("[IPv6:{ip}]"),
        };
        // Naming the recipient only when there is one keeps Bcc recipients private.
        let for_clause = match envelope.map(|e| e.recipients.as_slice()) {
            Some([only]) => format!("\n\tfor <{}>", only.raw),
            _ => String::new(),
        };
        format!(
            "Return-Path: <{from}>\nReceived: from {helo} ({peer})\n\tby {host} (rustmail) with {with} id {id}{for_clause};\n\t{date}\n",
            host = self.settings.hostname,
        )
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
            } => self.mail(from, size, body, smtputf8),
            Command::Rcpt(to) => self.rcpt(to),
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
                "{host}\nPIPELINING\nSIZE {}\n8BITMIME\nSMTPUTF8\nCHUNKING\nENHANCEDSTATUSCODES",
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

    fn mail(&mut self, from: Option<Mailbox>, size: Option<u64>, body: Body, smtputf8: bool) {
        if self.helo.is_none() {
            return self.error(reply::BAD_SEQUENCE.with_text("Send EHLO or HELO first"));
        }
        if self.envelope.is_some() {
            return self.error(reply::BAD_SEQUENCE.with_text("Nested MAIL command"));
        }
        // RFC 1870 §6.2: refuse a declared size over the limit at once.
        if size.is_some_and(|s| s > self.settings.limits.max_message_size) {
            return self.error(reply::MESSAGE_TOO_BIG);
        }
        if from.as_ref().is_some_and(Mailbox::is_utf8) && !smtputf8 {
            return self.error(reply::NEEDS_SMTPUTF8);
        }
        // RFC 6409 §4.3, §8.1: submission needs a login, and the sender must be the account's own.
        if self.channel.submission {
            let Some(account) = &self.account else {
                return self.error(reply::AUTH_REQUIRED);
            };
            let owned = !self.settings.auth.restrict_senders
                || from.as_ref().is_some_and(|f| {
                    self.settings
                        .directory
                        .may_send_as(account, &f.local, &f.domain)
                });
            if !owned {
                tracing::info!(account = %account.address, from = ?from.as_ref().map(|f| &f.raw), "sender not owned");
                return self.error(reply::SENDER_NOT_OWNED);
            }
        }
        self.envelope = Some(Envelope {
            from,
            body,
            smtputf8,
            submitter: self.account.as_ref().map(|a| a.address.clone()),
            ..Envelope::default()
        });
        self.reply(reply::SENDER_OK);
    }

    fn rcpt(&mut self, to: Mailbox) {
        let Some(envelope) = self.envelope.as_ref() else {
            return self.error(reply::BAD_SEQUENCE.with_text("Send MAIL first"));
        };
        if envelope.recipients.len() >= self.settings.limits.max_recipients {
            return self.reply(reply::TOO_MANY_RECIPIENTS);
        }
        if to.is_utf8() && !envelope.smtputf8 {
            return self.error(reply::NEEDS_SMTPUTF8);
        }
        let directory = &self.settings.directory;
        let route = if to.is_address_literal() {
            directory.route_literal(&to.local, &to.domain)
        } else if to.domain.is_empty() {
            // `<Postmaster>` (RFC 5321 §4.1.1.3) means the postmaster of our primary domain.
            directory.route(&to.local, directory.primary_domain())
        } else {
            directory.route(&to.local, &to.domain)
        };
        let accounts = match route {
            Route::NotLocal if self.account.is_some() => {
                return self.reply(reply::OUTBOUND_UNAVAILABLE);
            }
            Route::NotLocal => {
                tracing::info!(rcpt = %to.raw, reply = 550, "relay denied for <{}>", to.raw);
                return self.error(reply::RELAY_DENIED);
            }
            Route::Unknown => {
                tracing::info!(rcpt = %to.raw, reply = 550, "unknown recipient <{}>", to.raw);
                return self.error(reply::UNKNOWN_USER);
            }
            Route::Local(accounts) => accounts,
        };
        let envelope = self.envelope.as_mut().expect("checked above");
        for account in accounts {
            if !envelope.mailboxes.contains(&account) {
                envelope.mailboxes.push(account);
            }
        }
        envelope.recipients.push(to);
        self.reply(reply::RECIPIENT_OK);
    }

    fn data(&mut self) -> Option<Event<'static>> {
        match &self.envelope {
            None => self.error(reply::BAD_SEQUENCE.with_text("Send MAIL first")),
            // RFC 3030 §3: DATA and BDAT do not mix in one transaction.
            Some(_) if self.bdat.is_some() => {
                self.error(reply::BAD_SEQUENCE.with_text("DATA after BDAT"))
            }
            // RFC 2920 §3.1: after a pipelined group in which every RCPT failed, DATA gets 554.
            Some(e) if e.recipients.is_empty() => self.error(reply::NO_VALID_RECIPIENTS),
            Some(_) => {
                let limits = &self.settings.limits;
                self.mode = Mode::Data(DataReader::new(
                    limits.max_line_length,
                    limits.max_message_size,
                ));
                self.reply(reply::START_DATA);
                return Some(Event::MessageStart);
            }
        }
        self.is_closed().then_some(Event::Close)
    }

    /// BDAT: the chunk's octets are always read (RFC 3030 §3: even when refused), then answered.
    fn bdat(&mut self, size: u64, last: bool) -> Option<Event<'static>> {
        if size > self.settings.limits.max_message_size {
            // Reading the chunk to stay in step (RFC 3030 §3) could mean reading 2^64 - 1 octets:
            // refuse the message for good and close instead (no 421: that would invite a retry).
            tracing::info!(size, "BDAT chunk over the message size limit, closing");
            let abort = self.bdat.take().is_some() && self.bdat_keep;
            self.envelope = None;
            self.reply(reply::MESSAGE_TOO_BIG);
            self.mode = Mode::Closed;
            return Some(if abort {
                Event::MessageAbort
            } else {
                Event::Close
            });
        }
        self.mode = Mode::Chunk { left: size, last };
        if self.bdat.is_some() {
            return None;
        }
        let limits = &self.settings.limits;
        self.bdat = Some(ChunkReader::new(
            limits.max_line_length,
            limits.max_message_size,
        ));
        self.bdat_keep = self
            .envelope
            .as_ref()
            .is_some_and(|e| !e.recipients.is_empty());
        if self.bdat_keep {
            return Some(Event::MessageStart);
        }
        None
    }

    /// Handles octets of the current chunk; `end`: they complete it.
    fn chunk_bytes(&mut self, bytes: &[u8], end: bool, last: bool) -> Option<Event<'static>> {
        let keep = self.bdat_keep;
        let reader = self
            .bdat
            .as_mut()
            .expect("a chunk belongs to a BDAT transaction");
        let mut newly_failed = false;
        if keep {
            newly_failed = reader.feed(bytes, &mut self.chunk_out).is_some();
        }
        let failed = reader.error();
        if !end {
            return if newly_failed {
                self.chunk_out.clear();
                Some(Event::MessageAbort)
            } else if self.chunk_out.is_empty() {
                None
            } else {
                Some(Event::MessageBytes)
            };
        }
        self.mode = Mode::Command;
        if !keep {
            // No transaction to add to: the chunk was read to stay in step, and is refused.
            self.bdat = None;
            if let Some(refusal) = self.bdat_refusal.clone() {
                self.reply(refusal);
                return None;
            }
            match &self.envelope {
                None => self.error(reply::BAD_SEQUENCE.with_text("Send MAIL first")),
                Some(_) => self.error(reply::NO_VALID_RECIPIENTS),
            }
            return self.is_closed().then_some(Event::Close);
        }
        if let Some(error) = failed {
            self.chunk_out.clear();
            self.bdat = None;
            self.bdat_refusal = Some(self.data_refused(error));
            return Some(Event::MessageAbort)
                .filter(|_| newly_failed)
                .or_else(|| self.is_closed().then_some(Event::Close));
        }
        if last {
            let reader = self.bdat.as_mut().expect("checked above");
            if let Err(error) = reader.finish(&mut self.chunk_out) {
                self.chunk_out.clear();
                self.bdat = None;
                self.bdat_refusal = Some(self.data_refused(error));
                return Some(Event::MessageAbort);
            }
            // The remaining bytes go out with the end: the driver appends them before storing.
            self.mode = Mode::Storing;
            return Some(Event::MessageEnd);
        }
        self.reply(reply::OK.with_text("Chunk received"));
        if self.chunk_out.is_empty() {
            None
        } else {
            Some(Event::MessageBytes)
        }
    }

    /// Refuses the message; returns the reply given.
    fn data_refused(&mut self, error: DataError) -> Reply {
        self.envelope = None;
        self.mode = Mode::Command;
        tracing::info!(?error, "message refused: {error:?}");
        let reply = match error {
            DataError::BareLineEnding => reply::BAD_LINE_ENDING,
            DataError::LineTooLong => reply::DATA_LINE_TOO_LONG,
            DataError::TooBig => reply::MESSAGE_TOO_BIG,
        };
        self.error(reply.clone());
        reply
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

#[path = "session_auth.rs"]
mod auth;

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
