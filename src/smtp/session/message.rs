//! The message of a transaction: DATA (RFC 5321 §4.1.1.4) and BDAT chunks (RFC 3030), the end of a
//! message as the driver reports it, the submission header policy and the trace headers.

use std::net::IpAddr;

use super::{Event, Mode, Session};
use crate::smtp::data::{ChunkReader, DataError, DataReader};
use crate::smtp::headers::{SenderFields, SenderProblem};
use crate::smtp::reply::{self, Reply};

impl Session {
    /// The driver's report on storing the message announced by [`Event::MessageEnd`]: its queue id,
    /// or the temporary reply for why it could not be stored (not a client error).
    pub fn message_stored(&mut self, result: Result<&str, Reply>) {
        self.envelope = None;
        self.bdat = None;
        self.mode = Mode::Command;
        match result {
            Ok(id) => self.reply(reply::OK.with_text(format!("OK, queued as {id}"))),
            Err(refusal) => self.reply(refusal),
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
                    SenderProblem::BadHeader => reply::HEADER_MALFORMED,
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

    pub(super) fn data(&mut self) -> Option<Event<'static>> {
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
    pub(super) fn bdat(&mut self, size: u64, last: bool) -> Option<Event<'static>> {
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
    pub(super) fn chunk_bytes(
        &mut self,
        bytes: &[u8],
        end: bool,
        last: bool,
    ) -> Option<Event<'static>> {
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
                if last {
                    // The refused transaction is over: later chunks are judged on their own.
                    self.bdat_refusal = None;
                }
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
    pub(super) fn data_refused(&mut self, error: DataError) -> Reply {
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
}
