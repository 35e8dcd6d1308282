//! Outbound encoding against inbound decoding: a stored message (LF line endings) put in DATA's wire
//! form by the delivery client (src/delivery/wire.rs `data_wire_form`) and read back by the server's
//! DATA reader (src/smtp/data.rs), and in BDAT's form (`crlf_form`) read back by the chunk reader.
//! Properties: no panic; the data ends exactly at the final `.CRLF` (never earlier: no line of the
//! message can end the data or smuggle a command); a message without CR comes back octet for
//! octet (a last line completed); one with a CR is refused as a bare line ending, whatever the chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustmail::delivery::wire::{crlf_form, data_wire_form};
use rustmail::smtp::data::{ChunkReader, DataError, DataReader, DataStep};
use rustmail_fuzz::control;

fn read_data(wire: &[u8], chunk: usize) -> Result<Vec<u8>, DataError> {
    let mut reader = DataReader::new(None, u64::MAX);
    let mut buf = Vec::new();
    let mut fed = 0;
    let mut out = Vec::new();
    loop {
        let (n, step) = reader.step(&buf);
        let result = match step {
            DataStep::NeedMore => None,
            DataStep::Skipped | DataStep::Failed(_) => Some(None),
            DataStep::Partial(p) => {
                out.extend_from_slice(p);
                Some(None)
            }
            DataStep::Line(l) => {
                out.extend_from_slice(l);
                out.push(b'\n');
                Some(None)
            }
            DataStep::End(r) => Some(Some(r)),
        };
        buf.drain(..n);
        match result {
            Some(Some(r)) => {
                assert!(
                    fed == wire.len() && buf.is_empty(),
                    "data ended before the final dot"
                );
                return r.map(|()| out);
            }
            Some(None) => {}
            None => {
                assert!(fed < wire.len(), "the final dot was not seen");
                let end = (fed + chunk).min(wire.len());
                buf.extend_from_slice(&wire[fed..end]);
                fed = end;
            }
        }
    }
}

fn read_chunks(bytes: &[u8], chunk: usize) -> Result<Vec<u8>, DataError> {
    let mut reader = ChunkReader::new(None, u64::MAX);
    let mut out = Vec::new();
    for c in bytes.chunks(chunk) {
        reader.feed(c, &mut out);
    }
    reader.finish(&mut out).map(|()| out)
}

fuzz_target!(|data: &[u8]| {
    let (c, stored) = control(data);
    let chunk = usize::from(c) + 1;
    let mut expected = stored.to_vec();
    if !expected.is_empty() && !expected.ends_with(b"\n") {
        expected.push(b'\n');
    }
    let wire = data_wire_form(b"", stored);
    let bdat = crlf_form(stored);
    for result in [
        read_data(&wire, wire.len()),
        read_data(&wire, chunk),
        read_chunks(&bdat, bdat.len().max(1)),
        read_chunks(&bdat, chunk),
    ] {
        if stored.contains(&b'\r') {
            assert_eq!(result, Err(DataError::BareLineEnding));
        } else {
            assert_eq!(result.as_deref(), Ok(&expected[..]), "round trip failed");
        }
    }
});
