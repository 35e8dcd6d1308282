//! The dot-stuffing encoder of POP3 RETR and TOP (src/pop3/wire.rs, RFC 1939 §3). The first octet
//! picks RETR or TOP n and a chunk size. Properties: no panic; the output does not depend on how the
//! stored message is split into chunks; it is CRLF lines ending with the only lone-dot line;
//! undoing the dot-stuffing gives back the message with its line endings made CRLF (the round trip
//! a client performs); TOP gives a prefix of RETR's lines with at most n body lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustmail::pop3::wire::Encoder;
use rustmail_fuzz::control;

fn encode(input: &[u8], top: Option<u64>, chunk: usize) -> Vec<u8> {
    let mut e = Encoder::new(top);
    let mut out = Vec::new();
    for c in input.chunks(chunk.max(1)) {
        e.encode(c, &mut out);
    }
    e.finish(&mut out);
    out
}

/// What a client reads: the lines before the lone dot, unstuffed. Panics on a malformed body.
fn decode(out: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut rest = out;
    loop {
        let lf = rest
            .iter()
            .position(|&b| b == b'\n')
            .expect("no terminating .CRLF");
        assert!(lf > 0 && rest[lf - 1] == b'\r', "bare LF in the output");
        let line = &rest[..lf - 1];
        rest = &rest[lf + 1..];
        if line == b"." {
            assert!(
                rest.is_empty(),
                "{} octets after the terminating dot",
                rest.len()
            );
            return lines;
        }
        lines.push(line.strip_prefix(b".").unwrap_or(line));
        if line.first() == Some(&b'.') {
            // A stuffed line: the client removes one dot, so the stored line started with a dot.
            assert!(line.len() > 1);
        }
    }
}

/// The stored message's lines as CRLF text lines: LF or CRLF ends a line, a last line without one is
/// completed (a last lone CR counts as its line end).
fn expected(input: &[u8]) -> Vec<&[u8]> {
    let mut lines: Vec<&[u8]> = input
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .collect();
    if input.is_empty() || input.ends_with(b"\n") {
        lines.pop();
    }
    lines
}

fuzz_target!(|data: &[u8]| {
    let (c, input) = control(data);
    let top = (c & 1 != 0).then_some(u64::from(c >> 5));
    let chunk = usize::from((c >> 1) & 0x0f) + 1;
    let retr = encode(input, None, input.len());
    assert_eq!(
        encode(input, None, chunk),
        retr,
        "chunk size {chunk} changed RETR"
    );
    let lines = decode(&retr);
    assert_eq!(lines, expected(input), "RETR does not round-trip");
    // Bounded output: at most one dot and one CR added per line, plus the terminator.
    assert!(retr.len() <= input.len() + 2 * (lines.len() + 1) + 3);
    if let Some(n) = top {
        let t = encode(input, Some(n), input.len());
        assert_eq!(
            encode(input, Some(n), chunk),
            t,
            "chunk size {chunk} changed TOP"
        );
        let top_lines = decode(&t);
        assert!(lines.starts_with(&top_lines), "TOP is not a prefix of RETR");
        // The encoder ends the header at a line of nothing but CRs (a stored line "\r\r\n" too).
        let header = lines.iter().position(|l| l.iter().all(|&b| b == b'\r'));
        match header {
            // The header, the blank line and n body lines (or all there is).
            Some(h) => assert_eq!(top_lines.len(), lines.len().min(h + 1 + n as usize)),
            None => assert_eq!(top_lines, lines, "TOP of a message without body"),
        }
    }
});
