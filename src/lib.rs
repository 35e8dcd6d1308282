//! rustmail: a small mail server. SMTP in, durable Maildir storage, POP3 out, native to systemd.
//!
//! The map of the crate, from the edges inwards:
//!
//! | module | role |
//! |---|---|
//! | `config` | raw TOML/env configuration (figment) and its validation into typed `Settings`, the account directory included |
//! | `accounts` | local domains, accounts, aliases, recipient routing, password hashing |
//! | `smtp` | SMTP receiving as pure code: command parser, DATA reader, replies, session state machine |
//! | `pop3` | POP3 as pure code: session state machine, multi-line wire encoder |
//! | `sasl` | SASL PLAIN and LOGIN decoding, shared by SMTP AUTH and POP3 AUTH |
//! | `storage` | the spool and the Maildirs: durable delivery, listing, deletion, mailbox locks |
//! | `server` | the async side: admission in the accept loops, the connection core (deadlines, TLS), the protocol drivers, reload, stop, watchdog |
//! | `systemd` | socket activation, sd_notify, watchdog interval |
//! | `tls` | rustls: certificate and key from PEM files, TLS 1.2/1.3 |
//! | `logging` | journald or stderr |
//! | `dev` | the development default: a demo account with a generated password |
//!
//! The protocol sessions never touch a socket, a file or a clock: they take bytes and return events,
//! which the drivers in `server` carry out. That keeps every protocol decision testable without I/O.

pub mod accounts;
pub mod config;
pub mod delivery;
pub mod dev;
pub mod dkim;
pub mod logging;
pub mod pop3;
pub mod sasl;
pub mod server;
pub mod smtp;
pub mod storage;
pub mod systemd;
pub mod tls;
