//! SMTP receiving (RFC 5321 with PIPELINING RFC 2920, SIZE RFC 1870, 8BITMIME RFC 6152 and
//! ENHANCEDSTATUSCODES RFC 2034), as pure parts: command parsing, the DATA reader, the reply vocabulary
//! and the session state machine. The async driver lives in `server::smtp`.

pub mod command;
pub mod data;
pub mod headers;
pub mod reply;
pub mod session;

pub use session::{AuthOutcome, Channel, Envelope, Event, Session};
