//! SASL pieces shared by SMTP AUTH (RFC 4954) and POP3 AUTH (RFC 5034): PLAIN (RFC 4616) and the LOGIN
//! mechanism's prompts. Only decoding lives here; the exchanges are the sessions' business.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// The LOGIN mechanism's challenges: base64 of "Username:" and "Password:".
pub const LOGIN_USERNAME: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASSWORD: &str = "UGFzc3dvcmQ6";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainError {
    /// Not base64, not UTF-8, or not three NUL-separated fields.
    Malformed,
    /// An authorization identity other than the user: acting for someone else is not offered.
    OtherIdentity,
}

/// Decodes a PLAIN response (`=` is the empty response) into user and password.
pub fn decode_plain(response: &str) -> Result<(String, String), PlainError> {
    let bytes = decode(response).ok_or(PlainError::Malformed)?;
    let mut fields = bytes
        .split(|&b| b == 0)
        .map(|f| String::from_utf8(f.to_vec()).ok());
    match (fields.next(), fields.next(), fields.next(), fields.next()) {
        (Some(Some(authz)), Some(Some(user)), Some(Some(password)), None) => {
            if authz.is_empty() || authz == user {
                Ok((user, password))
            } else {
                Err(PlainError::OtherIdentity)
            }
        }
        _ => Err(PlainError::Malformed),
    }
}

/// Decodes one base64 response holding UTF-8 text (the LOGIN mechanism's user name or password).
pub fn decode_text(response: &str) -> Option<String> {
    String::from_utf8(decode(response)?).ok()
}

fn decode(response: &str) -> Option<Vec<u8>> {
    if response == "=" {
        return Some(Vec::new());
    }
    STANDARD.decode(response.trim_end()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        STANDARD.encode(s)
    }

    #[test]
    fn plain() {
        assert_eq!(
            decode_plain(&b64("\0alice\0pw d")),
            Ok(("alice".into(), "pw d".into()))
        );
        assert_eq!(
            decode_plain(&b64("alice\0alice\0pw")),
            Ok(("alice".into(), "pw".into()))
        );
        assert_eq!(
            decode_plain(&b64("bob\0alice\0pw")),
            Err(PlainError::OtherIdentity)
        );
        assert_eq!(decode_plain(&b64("alice\0pw")), Err(PlainError::Malformed));
        assert_eq!(decode_plain("!!!"), Err(PlainError::Malformed));
        assert_eq!(decode_plain("="), Err(PlainError::Malformed));
    }

    #[test]
    fn login_prompts_and_text() {
        assert_eq!(decode_text(LOGIN_USERNAME).as_deref(), Some("Username:"));
        assert_eq!(decode_text(LOGIN_PASSWORD).as_deref(), Some("Password:"));
        assert_eq!(decode_text("="), Some(String::new()));
    }
}
