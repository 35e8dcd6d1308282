//! The SMTP session (src/smtp/session) fed arbitrary bytes, the DATA and BDAT readers and AUTH
//! included, through a driver like the unit tests'. The first octet picks the channel (submission,
//! TLS, STARTTLS offered), the settings (with or without a line limit) and a chunk size.
//! Properties: no panic; the same transcript whether the input comes whole or in chunks (a network
//! may split it anywhere); what the driver must keep buffered stays under the longest line allowed;
//! the outbox is well-formed SMTP replies; no stored message exceeds the size limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustmail::smtp::{Channel, data::PIECE};
use rustmail_fuzz::{assert_smtp_replies, control, play_smtp, smtp_settings};

fuzz_target!(|data: &[u8]| {
    let (c, input) = control(data);
    let channel = Channel {
        submission: c & 1 != 0,
        tls: c & 2 != 0,
        starttls: c & 4 != 0,
    };
    let settings = smtp_settings(c & 8 != 0);
    let chunk = usize::from(c >> 4) * 3 + 1;
    let whole = play_smtp(&settings, channel, input, input.len().max(1));
    let split = play_smtp(&settings, channel, input, chunk);
    assert_eq!(
        (&whole.replies, &whole.messages, &whole.events, whole.closed),
        (&split.replies, &split.messages, &split.events, split.closed),
        "chunk size {chunk} changed the transcript"
    );

    // An AUTH line may be 12288 octets (RFC 4954 §4); a message line is kept up to the line limit,
    // or up to a piece when there is none.
    let limits = &settings.limits;
    let cap = limits
        .max_line_length
        .unwrap_or(PIECE)
        .max(limits.max_command_length)
        .max(12288);
    assert!(
        split.max_buffered <= cap,
        "kept {} octets",
        split.max_buffered
    );
    assert_smtp_replies(&split.replies);
    for (_, m) in &split.messages {
        // The limit counts CRLF line ends and the stored form has LF ones; BDAT completes a last
        // line that lacks its line end with one more LF.
        assert!(
            m.len() as u64 <= limits.max_message_size + 1,
            "stored {} octets over a limit of {}",
            m.len(),
            limits.max_message_size
        );
    }
});
