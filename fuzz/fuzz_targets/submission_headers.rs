//! The submission header pass (src/smtp/headers.rs: Message-ID/Date added, From/Sender collected,
//! RFC 6409 §8.3, RFC 5322 §3.6). The first octet picks a piece size. Properties: no panic; the same
//! output and sender fields however the message is split; the output is the message with only
//! the missing fields inserted, once, where the header ends; the fields kept are bounded (two values
//! of each, 4 KiB each); `check` never panics and refuses what it found malformed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustmail::smtp::headers::{MissingHeaders, SenderFields, SenderProblem};
use rustmail_fuzz::control;

const ID: &str = "<fuzz-id@mx.example.org>";
const DATE: &str = "Thu, 26 Nov 2026 10:00:00 +0000";

fn pass(message: &[u8], piece: usize) -> (Vec<u8>, SenderFields) {
    let mut f = MissingHeaders::new(ID.into(), DATE.into());
    let mut out = Vec::new();
    for chunk in message.chunks(piece) {
        f.push(chunk, &mut out);
    }
    f.finish(&mut out);
    (out, f.senders().clone())
}

fuzz_target!(|data: &[u8]| {
    let (c, message) = control(data);
    let piece = usize::from(c) + 1;
    let (out, senders) = pass(message, message.len().max(1));
    assert_eq!(
        pass(message, piece),
        (out.clone(), senders.clone()),
        "piece {piece}"
    );

    // The output is the message with the missing lines inserted at one place.
    let id_line = format!("Message-ID: {ID}\n");
    let date_line = format!("Date: {DATE}\n");
    let added = out.len() - message.len();
    let inserted: Vec<u8> = [
        (added == id_line.len() || added == id_line.len() + date_line.len()).then_some(&id_line),
        (added == date_line.len() || added == id_line.len() + date_line.len())
            .then_some(&date_line),
    ]
    .into_iter()
    .flatten()
    .flat_map(|s| s.bytes())
    .collect();
    assert_eq!(inserted.len(), added, "{added} octets added");
    assert!(
        (0..=message.len()).any(|i| out[..i] == message[..i]
            && out[i..i + added] == inserted[..]
            && out[i + added..] == message[i..]),
        "the message was changed, not only completed"
    );

    assert!(senders.from.len() <= 2 && senders.sender.len() <= 2);
    assert!(senders.from.len() <= senders.from_count);
    assert!(senders.sender.len() <= senders.sender_count);
    for value in senders.from.iter().chain(&senders.sender) {
        // Kept values are at most 4096 octets, which lossy UTF-8 may widen to three octets each.
        assert!(
            value.len() <= 3 * 4096,
            "kept a value of {} octets",
            value.len()
        );
    }
    let verdict = senders.check(|_, _| true);
    if senders.malformed {
        assert_eq!(verdict, Err(SenderProblem::BadHeader));
    }
    if senders.oversized || senders.from_count != 1 || senders.sender_count > 1 {
        assert!(verdict.is_err());
    }
    if verdict.is_ok() {
        assert_eq!(senders.check(|_, _| false), Err(SenderProblem::NotOwned));
    }
});
