//! The POP3 session (src/pop3/session: command parser and state machine) fed arbitrary bytes. The
//! first octet picks plaintext logins allowed, STLS offered, APOP offered and a chunk size.
//! Properties: no panic; the same transcript whether the input comes whole or in chunks; less than
//! one command line (512 octets) ever kept buffered; replies are CRLF lines only; RETR/TOP and the
//! deletions applied at QUIT only name messages that exist, each deletion once (checked in the driver).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustmail_fuzz::{control, play_pop3};

fuzz_target!(|data: &[u8]| {
    let (c, input) = control(data);
    let (plaintext, stls, apop) = (c & 1 != 0, c & 2 != 0, c & 4 != 0);
    let chunk = usize::from(c >> 3) + 1;
    let whole = play_pop3(plaintext, stls, apop, input, input.len().max(1));
    let split = play_pop3(plaintext, stls, apop, input, chunk);
    assert_eq!(
        (&whole.replies, &whole.events, whole.closed),
        (&split.replies, &split.events, split.closed),
        "chunk size {chunk} changed the transcript"
    );
    assert!(
        split.max_buffered < 512,
        "kept {} octets",
        split.max_buffered
    );
    let out = &split.replies;
    assert!(out.ends_with(b"\r\n"), "replies do not end with CRLF");
    for (i, &b) in out.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && out[i - 1] == b'\r', "bare LF in replies at {i}");
        }
    }
});
