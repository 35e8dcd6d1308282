//! STARTTLS (RFC 3207) and AUTH (RFC 4954: PLAIN, LOGIN) for the SMTP session. Passwords are accepted
//! only where they cannot be read on the way: over TLS, from loopback, or where the configuration allows
//! it explicitly (`auth.allow_unencrypted_remote`).

use super::{AuthOutcome, Event, Mode, Session, reply};
use crate::accounts::Secret;
use crate::sasl::{self, PlainError};
use crate::smtp::reply::Reply;

/// Where an AUTH exchange stands, waiting for the client's next response line.
#[derive(Debug)]
pub(super) enum Step {
    Plain,
    LoginUser,
    LoginPassword(String),
}

impl Session {
    /// Passwords may be sent on this connection.
    pub(super) fn plaintext_ok(&self) -> bool {
        self.settings
            .auth
            .password_allowed(self.channel.tls, self.peer)
    }

    pub(super) fn starttls(&mut self) -> Option<Event<'static>> {
        if self.channel.tls {
            self.error(reply::BAD_SEQUENCE.with_text("TLS already active"));
        } else if !self.channel.starttls {
            self.error(reply::NOT_IMPLEMENTED);
        } else if self.settings.tls.is_none() {
            // The certificate went away in a reload: say so instead of failing the handshake.
            self.reply(reply::TLS_UNAVAILABLE);
        } else {
            self.reply(reply::READY_FOR_TLS);
            return Some(Event::StartTls);
        }
        self.is_closed().then_some(Event::Close)
    }

    /// After the TLS handshake: RFC 3207 §4.2, everything learnt before it is forgotten.
    pub fn tls_started(&mut self) {
        self.channel.tls = true;
        self.helo = None;
        self.envelope = None;
        self.account = None;
        self.bdat = None;
        self.bdat_refusal = None;
        self.mode = Mode::Command;
    }

    pub(super) fn auth(
        &mut self,
        mechanism: &str,
        initial: Option<&str>,
    ) -> Option<Event<'static>> {
        let refusal = if !self.channel.submission {
            // Port 25 takes mail for local users only; logins belong to the submission ports.
            Some(reply::NOT_IMPLEMENTED)
        } else if !self.helo.as_ref().is_some_and(|(_, esmtp)| *esmtp) {
            // RFC 4954 §4: AUTH is an ESMTP extension.
            Some(reply::BAD_SEQUENCE.with_text("Send EHLO first"))
        } else if self.account.is_some() {
            Some(reply::BAD_SEQUENCE.with_text("Already authenticated"))
        } else if self.envelope.is_some() {
            Some(reply::BAD_SEQUENCE.with_text("AUTH is not allowed during a mail transaction"))
        } else if !self.plaintext_ok() {
            Some(reply::ENCRYPTION_REQUIRED)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            self.error(refusal);
            return self.is_closed().then_some(Event::Close);
        }
        match (mechanism, initial) {
            ("PLAIN", Some(response)) => self.plain(response),
            ("PLAIN", None) => self.challenge(Step::Plain, ""),
            ("LOGIN", Some(user)) => self.login_user(user),
            ("LOGIN", None) => self.challenge(Step::LoginUser, sasl::LOGIN_USERNAME),
            _ => {
                self.error(reply::AUTH_MECHANISM);
                self.is_closed().then_some(Event::Close)
            }
        }
    }

    /// The client's answer to a `334` challenge.
    pub(super) fn auth_response(&mut self, step: Step, line: &[u8]) -> Option<Event<'static>> {
        let Ok(line) = std::str::from_utf8(line) else {
            return self.auth_error(reply::AUTH_MALFORMED);
        };
        if line == "*" {
            return self.auth_error(reply::AUTH_CANCELLED);
        }
        match step {
            Step::Plain => self.plain(line),
            Step::LoginUser => self.login_user(line),
            Step::LoginPassword(user) => match sasl::decode_text(line) {
                Some(password) => Some(Event::Authenticate {
                    user,
                    password: Secret(password),
                }),
                None => self.auth_error(reply::AUTH_MALFORMED),
            },
        }
    }

    /// The driver's verdict on [`Event::Authenticate`].
    pub fn auth_result(&mut self, outcome: AuthOutcome) {
        match outcome {
            AuthOutcome::Accepted(account) => {
                tracing::info!(account = %account.address, "authenticated as {}", account.address);
                self.account = Some(account);
                self.reply(reply::AUTH_OK);
            }
            AuthOutcome::Rejected => {
                self.auth_failures += 1;
                self.error(reply::AUTH_FAILED);
                if self.auth_failures >= self.settings.auth.max_failures {
                    self.close_with(reply::TOO_MANY_ERRORS.with_text("Too many failed logins"));
                }
            }
            AuthOutcome::Throttled => self.close_with(reply::AUTH_THROTTLED),
        }
    }

    fn plain(&mut self, response: &str) -> Option<Event<'static>> {
        match sasl::decode_plain(response) {
            Ok((user, password)) => Some(Event::Authenticate {
                user,
                password: Secret(password),
            }),
            Err(PlainError::OtherIdentity) => self.auth_error(reply::AUTH_FAILED),
            Err(PlainError::Malformed) => self.auth_error(reply::AUTH_MALFORMED),
        }
    }

    fn login_user(&mut self, response: &str) -> Option<Event<'static>> {
        match sasl::decode_text(response) {
            Some(user) => self.challenge(Step::LoginPassword(user), sasl::LOGIN_PASSWORD),
            None => self.auth_error(reply::AUTH_MALFORMED),
        }
    }

    fn challenge(&mut self, step: Step, text: &'static str) -> Option<Event<'static>> {
        self.reply(Reply::new(334, "", text));
        self.mode = Mode::Auth(step);
        None
    }

    fn auth_error(&mut self, reply: Reply) -> Option<Event<'static>> {
        self.mode = Mode::Command;
        self.error(reply);
        self.is_closed().then_some(Event::Close)
    }
}
