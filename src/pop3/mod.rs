//! POP3 (RFC 1939, CAPA RFC 2449, response codes RFC 3206), as pure parts: the session state machine
//! and the wire encoder for multi-line replies. The async driver lives in `server::pop3`.

pub mod session;
pub mod wire;

pub use session::{Credential, Event, Listing, LoginFailure, Secret, Session};
