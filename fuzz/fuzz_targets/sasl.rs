//! The SASL decoder (src/sasl.rs: PLAIN, RFC 4616, and LOGIN's base64 text). The first octet picks
//! arbitrary text or a round trip. Properties: no panic on any response; what decodes re-encodes to
//! an equivalent response; a PLAIN message built from fields without NUL decodes to its user and
//! password (and an authorization identity other than the user is refused).
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use rustmail::sasl::{PlainError, decode_plain, decode_text};
use rustmail_fuzz::control;

fuzz_target!(|data: &[u8]| {
    let (c, rest) = control(data);
    if c & 1 == 0 {
        let Ok(response) = std::str::from_utf8(rest) else {
            return;
        };
        if let Ok((user, password)) = decode_plain(response) {
            assert!(!user.contains('\0') && !password.contains('\0'));
            let again = STANDARD.encode(format!("\0{user}\0{password}"));
            assert_eq!(decode_plain(&again), Ok((user, password)));
        }
        if let Some(text) = decode_text(response) {
            let again = if text.is_empty() {
                "=".to_string()
            } else {
                STANDARD.encode(&text)
            };
            assert_eq!(decode_text(&again), Some(text));
        }
        return;
    }
    // Three fields from the input, split at its first two 0xff octets (never valid UTF-8 anyway).
    let text = String::from_utf8_lossy(rest).replace('\0', "");
    let mut fields = text.splitn(3, '\u{fffd}');
    let (authz, user, password) = (
        fields.next().unwrap_or(""),
        fields.next().unwrap_or(""),
        fields.next().unwrap_or(""),
    );
    let response = STANDARD.encode(format!("{authz}\0{user}\0{password}"));
    let expected = if authz.is_empty() || authz == user {
        Ok((user.to_string(), password.to_string()))
    } else {
        Err(PlainError::OtherIdentity)
    };
    assert_eq!(decode_plain(&response), expected);
    // A client may end the line with white space (trailing, removed before decoding).
    assert_eq!(decode_plain(&format!("{response} ")), expected);
    assert_eq!(decode_text(&STANDARD.encode(user)).as_deref(), Some(user));
});
