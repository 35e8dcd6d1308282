//! The envelope of a transaction: MAIL (the sender, its parameters, submission's sending rights) and
//! RCPT (routing each recipient: local, unknown, or foreign and so refused).

use super::{Envelope, Session};
use crate::accounts::Route;
use crate::smtp::command::{Body, MailDsn, Mailbox, RcptDsn};
use crate::smtp::reply;

impl Session {
    pub(super) fn mail(
        &mut self,
        from: Option<Mailbox>,
        size: Option<u64>,
        body: Body,
        smtputf8: bool,
        dsn: MailDsn,
    ) {
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
            dsn,
            ..Envelope::default()
        });
        self.reply(reply::SENDER_OK);
    }

    pub(super) fn rcpt(&mut self, to: Mailbox, dsn: RcptDsn) {
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
            Route::NotLocal if self.account.is_some() && self.settings.outbound.enable => {
                let envelope = self.envelope.as_mut().expect("checked above");
                // Local parts are case-sensitive (RFC 5321 §2.4): only the very same address repeats.
                if !envelope.remote.iter().any(|(m, _)| m.raw == to.raw) {
                    envelope.remote.push((to.clone(), dsn));
                }
                envelope.recipients.push(to);
                return self.reply(reply::RECIPIENT_OK);
            }
            Route::NotLocal if self.account.is_some() => {
                tracing::info!(rcpt = %to.raw, reply = 550, "outbound delivery is off: <{}>", to.raw);
                return self.error(reply::OUTBOUND_DISABLED);
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
        if dsn.notify.is_some_and(|n| n.success) {
            envelope.notify_delivered.push((to.clone(), dsn));
        }
        for account in accounts {
            if !envelope.mailboxes.contains(&account) {
                envelope.mailboxes.push(account);
            }
        }
        envelope.recipients.push(to);
        self.reply(reply::RECIPIENT_OK);
    }
}
