//! The SMTP command parser (src/smtp/command.rs) on arbitrary lines. Properties: no panic; the verb is
//! case-insensitive (flipping its case never changes the result); a parsed mailbox respects the
//! RFC 5321 §4.5.3.1 limits and is taken from the line itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustmail::smtp::command::{Command, Mailbox, parse};

fn check_mailbox(line: &[u8], m: &Mailbox) {
    assert!(m.raw.len() < 256, "path of {} octets", m.raw.len());
    assert!(m.domain.len() <= 255, "domain of {} octets", m.domain.len());
    assert!(
        m.local.len() <= 64,
        "local part of {} octets",
        m.local.len()
    );
    assert!(!m.local.is_empty() || m.raw.starts_with('"'), "{m:?}");
    if m.domain.is_empty() {
        // RFC 5321 §4.1.1.3: `RCPT TO:<Postmaster>` needs no domain.
        assert!(m.local.eq_ignore_ascii_case("postmaster"), "{m:?}");
    } else {
        assert!(m.raw.ends_with(&format!("@{}", m.domain)), "{m:?}");
    }
    // `raw` is the path as written, except `<Postmaster>`, which is normalised to lower case.
    let line = String::from_utf8_lossy(line).to_lowercase();
    assert!(
        line.contains(&m.raw.to_lowercase()),
        "raw {:?} is not in the line",
        m.raw
    );
}

fuzz_target!(|line: &[u8]| {
    let result = parse(line);
    match &result {
        Ok(Command::Mail { from: Some(m), .. }) | Ok(Command::Rcpt(m, _)) => check_mailbox(line, m),
        Ok(Command::Ehlo(h)) | Ok(Command::Helo(h)) => {
            assert!(!h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_graphic()))
        }
        _ => {}
    }
    // The verb (up to the first space) in the other case gives the same answer.
    let verb_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let mut flipped = line.to_vec();
    for b in &mut flipped[..verb_end] {
        if b.is_ascii_alphabetic() {
            *b ^= 0x20;
        }
    }
    assert_eq!(parse(&flipped), result, "verb case changed the result");
});
