//! Property tests of the protocol cores: random input, mapped onto each protocol's alphabet so that
//! it reaches deep states, never panics, and what the driver must keep buffered never grows past the
//! line limit (so a peer cannot make the server hold unbounded input).

use std::sync::Arc;

use proptest::prelude::*;
use rustmail::config::{Config, Settings};
use rustmail::smtp::command;
use rustmail::smtp::data::{DataReader, DataStep};
use rustmail::{pop3, smtp};

fn settings() -> Arc<Settings> {
    Arc::new(Settings::from_config(Config::default()).unwrap())
}

/// Pieces that SMTP and POP3 streams are made of, plus raw bytes.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b".".to_vec()),
        Just(b"\r\n.\r\n".to_vec()),
        Just(b"EHLO x\r\n".to_vec()),
        Just(b"MAIL FROM:<a@b.example>\r\n".to_vec()),
        Just(b"RCPT TO:<demo@localhost>\r\n".to_vec()),
        Just(b"DATA\r\n".to_vec()),
        Just(b"BDAT 5\r\n".to_vec()),
        Just(b"STARTTLS\r\n".to_vec()),
        Just(b"AUTH LOGIN\r\n".to_vec()),
        Just(b"AUTH PLAIN\r\n".to_vec()),
        Just(b"BDAT 3 LAST\r\n".to_vec()),
        Just(
            "MAIL FROM:<jos\u{e9}@b.example> SMTPUTF8\r\n"
                .as_bytes()
                .to_vec()
        ),
        Just(b"USER demo@localhost\r\nPASS x\r\n".to_vec()),
        Just(b"RETR 1\r\nDELE 1\r\nLIST\r\n".to_vec()),
        Just(b"AUTH PLAIN\r\n".to_vec()),
        Just(b"AUTH PLAIN AGEAYg==\r\n".to_vec()),
        Just(b"APOP a 0123\r\n".to_vec()),
        Just(vec![b'x'; 700]),
        Just(vec![b'y'; 1200]),
        Just(vec![b'z'; 9000]),
        Just(
            b"AUTH PLAIN "
                .iter()
                .copied()
                .chain(std::iter::repeat_n(b'A', 13000))
                .collect()
        ),
        proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

/// Feeds `input` to `reader` in chunks as a network would, until the end of data; after each chunk
/// the reader must have left at most `bound` octets unconsumed.
fn read_keeping_at_most(
    mut reader: DataReader,
    input: &[u8],
    chunk: usize,
    bound: usize,
) -> Result<(), TestCaseError> {
    let mut buf = Vec::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let (n, step) = reader.step(&buf);
            let end = matches!(step, DataStep::End(_));
            buf.drain(..n);
            if end {
                // The rest belongs to the SMTP session, not to this message.
                return Ok(());
            }
            if n == 0 {
                break;
            }
        }
        prop_assert!(buf.len() <= bound, "kept {} bytes", buf.len());
    }
    Ok(())
}

fn stream() -> impl Strategy<Value = (Vec<u8>, usize)> {
    (proptest::collection::vec(piece(), 0..40), 1usize..300)
        .prop_map(|(pieces, chunk)| (pieces.concat(), chunk))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn smtp_command_parser_never_panics(line in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = command::parse(&line);
    }

    #[test]
    fn smtp_session_never_panics_and_buffers_at_most_a_line((input, chunk) in stream()) {
        let s = settings();
        // The longest line kept: an AUTH line may be 12288 octets (RFC 4954 §4).
        // A message line is kept whole up to the line limit, or up to a piece when there is none.
        let line = s.limits.max_line_length.unwrap_or(smtp::data::PIECE);
        let cap = line.max(s.limits.max_command_length).max(12288);
        // A submission channel reaches the AUTH states too.
        let channel = smtp::Channel { submission: true, tls: false, starttls: true };
        let mut session = smtp::Session::new(s, "127.0.0.1".parse().unwrap(), channel);
        let mut buf = Vec::new();
        let mut fed = 0;
        loop {
            let (n, event) = session.advance(&buf);
            prop_assert!(n <= buf.len());
            let end = matches!(event, smtp::Event::Close);
            let need = matches!(event, smtp::Event::NeedInput);
            if matches!(event, smtp::Event::StartTls) {
                session.tls_started();
            }
            if matches!(event, smtp::Event::Authenticate { .. }) {
                session.auth_result(smtp::AuthOutcome::Rejected);
            }
            if matches!(event, smtp::Event::MessageBytes) {
                let _ = session.take_message_bytes();
            }
            if matches!(event, smtp::Event::MessageEnd) {
                let _ = session.take_message_bytes();
                session.message_stored(Ok("id"));
            }
            buf.drain(..n);
            if end { break; }
            if need {
                prop_assert!(buf.len() <= cap, "kept {} bytes", buf.len());
                if fed >= input.len() { break; }
                let next = (fed + chunk).min(input.len());
                buf.extend_from_slice(&input[fed..next]);
                fed = next;
            }
        }
    }

    #[test]
    fn data_reader_consumes_everything_it_is_fed((input, chunk) in stream()) {
        // A line may hold one more octet when it starts with a transparency dot.
        read_keeping_at_most(DataReader::new(Some(1000), 10_000), &input, chunk, 1000)?;
    }

    #[test]
    fn data_reader_without_a_line_limit_keeps_less_than_a_piece((input, chunk) in stream()) {
        read_keeping_at_most(DataReader::new(None, 100_000), &input, chunk, smtp::data::PIECE - 1)?;
    }

    #[test]
    fn pop3_session_never_panics_and_buffers_at_most_a_line((input, chunk) in stream()) {
        let mut session = pop3::Session::new(settings(), true, true, Some("<1@x>".into()));
        let mut buf = Vec::new();
        let mut fed = 0;
        loop {
            let (n, event) = session.advance(&buf);
            prop_assert!(n <= buf.len());
            buf.drain(..n);
            match event {
                pop3::Event::Close => break,
                pop3::Event::Flush => session.outbox().clear(),
                pop3::Event::Login { .. } => session.login_result(Ok(vec![pop3::Listing { uid: "u".into(), size: 1 }])),
                pop3::Event::Retrieve { index, .. } => session.retrieve_started(index, true),
                pop3::Event::Update { .. } => session.update_result(true),
                pop3::Event::StartTls => session.tls_started(),
                pop3::Event::NeedInput => {
                    prop_assert!(buf.len() < 512);
                    if fed >= input.len() { break; }
                    let next = (fed + chunk).min(input.len());
                    buf.extend_from_slice(&input[fed..next]);
                    fed = next;
                }
            }
        }
    }

    #[test]
    fn pop3_encoder_output_is_a_valid_multiline_body(input in proptest::collection::vec(piece(), 0..20)) {
        let input = input.concat();
        let mut e = pop3::wire::Encoder::new(None);
        let mut out = Vec::new();
        e.encode(&input, &mut out);
        e.finish(&mut out);
        // Exactly one terminator, at the end; no bare LF anywhere.
        prop_assert!(out.ends_with(b".\r\n"));
        let body = &out[..out.len() - 3];
        prop_assert!(!body.windows(5).any(|w| w == b"\r\n.\r\n") && !body.starts_with(b".\r\n"));
        for (i, &b) in out.iter().enumerate() {
            if b == b'\n' { prop_assert!(i > 0 && out[i - 1] == b'\r'); }
        }
    }

    #[test]
    fn seven_bit_conversion_never_panics_and_yields_only_7bit(
        input in proptest::collection::vec(mime_piece(), 0..24)
    ) {
        let input = input.concat();
        if let Some(out) = rustmail::delivery::seven_bit::seven_bit(&input) {
            prop_assert!(out.iter().all(|&b| b < 0x80 && b != 0));
            if input.iter().all(|&b| b < 0x80 && b != 0) {
                prop_assert_eq!(out, input);
            }
        }
    }
}

/// Pieces of MIME messages (stored form, LF line endings) with 8-bit octets among them.
fn mime_piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"\n".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"Content-Type: multipart/mixed; boundary=b\n".to_vec()),
        Just(b"Content-Type: multipart/digest; boundary=\"b\"\n".to_vec()),
        Just(b"Content-Type: message/rfc822\n".to_vec()),
        Just(b"Content-Type: text/plain\n".to_vec()),
        Just(b"Content-Type: image/png\n".to_vec()),
        Just(b"Content-Transfer-Encoding: 8bit\n".to_vec()),
        Just(b"Content-Transfer-Encoding: base64\n".to_vec()),
        Just(b"\tcontinued\n".to_vec()),
        Just(b"--b\n".to_vec()),
        Just(b"--b--\n".to_vec()),
        Just(b"--b".to_vec()),
        Just("caf\u{e9}".as_bytes().to_vec()),
        Just(vec![0xff, 0x00, b'\r']),
        proptest::collection::vec(any::<u8>(), 0..40),
    ]
}
