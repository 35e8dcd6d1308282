//! The outbound client's reply parser (src/delivery/wire.rs `parse_reply`, RFC 5321 §4.2) and
//! `Capabilities::from_ehlo`, on what a hostile server might send. Properties: no panic; a reply is
//! taken whole or not at all (every shorter prefix says "need more"), uses only its own lines and
//! never more than MAX_REPLY octets; written back in wire form it parses to the same reply; `text()`
//! has no control characters and is bounded; the EHLO capabilities only name what a line said.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustmail::delivery::wire::{Capabilities, MAX_REPLY, Reply, parse_reply};

fn wire_form(reply: &Reply) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, line) in reply.lines.iter().enumerate() {
        let sep = if i + 1 == reply.lines.len() { ' ' } else { '-' };
        out.extend_from_slice(format!("{}{sep}{line}\r\n", reply.code).as_bytes());
    }
    out
}

fuzz_target!(|input: &[u8]| {
    let Ok(Some((reply, used))) = parse_reply(input) else {
        return;
    };
    assert!(used <= input.len() && used <= MAX_REPLY && input[..used].ends_with(b"\n"));
    assert!((200..600).contains(&reply.code) && !reply.lines.is_empty());
    assert_eq!(parse_reply(&input[..used]), Ok(Some((reply.clone(), used))));
    // Every cut inside the reply (at a line end, or within a line) asks for more.
    for cut in (0..used).filter(|&i| i == 0 || input[i - 1] == b'\n' || i == used - 1) {
        assert_eq!(
            parse_reply(&input[..cut]),
            Ok(None),
            "cut at {cut} of {used}"
        );
    }
    let rewritten = wire_form(&reply);
    assert_eq!(
        parse_reply(&rewritten),
        Ok(Some((reply.clone(), rewritten.len()))),
        "wire form does not parse back"
    );
    let text = reply.text();
    assert!(!text.chars().any(char::is_control) && text.chars().count() <= 4 + 500);

    let caps = Capabilities::from_ehlo(&reply);
    let said = |word: &str| {
        reply.lines.iter().skip(1).any(|l| {
            l.split_ascii_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(word))
        })
    };
    assert_eq!(caps.starttls, said("STARTTLS"));
    assert_eq!(caps.pipelining, said("PIPELINING"));
    assert_eq!(caps.size.is_some(), said("SIZE"));
    assert!(caps.auth.is_empty() || said("AUTH"));
});
