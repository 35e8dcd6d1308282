//! The DATA reader (RFC 5321 §4.1.1.4, §4.5.2): splits the message into lines, removes dot-stuffing,
//! finds the end of data, and enforces the size limit and, when one is configured, the line-length
//! limit.
//!
//! Policy against SMTP smuggling (CVE-2023-51764 family): the end of data is `CRLF . CRLF` and nothing
//! else. A bare CR or bare LF anywhere in the message makes the whole message invalid, but reading goes
//! on until the real `CRLF . CRLF`, so `LF . LF`, `CR . CR`, `LF . CRLF`, `CRLF . LF` and the like are
//! swallowed as (rejected) message content and can never end the data or start a second transaction.
//! Likewise an over-long line or an oversized message is read to its end before the rejection is sent.
//!
//! Long lines: by default a line may be of any length (mail clients send lines over RFC 5321's 998
//! octets, and refusing them bounces wanted mail). A line that has no LF after [`PIECE`] octets is
//! handed out in pieces ([`DataStep::Partial`]), so the unconsumed input stays under [`PIECE`] octets
//! whatever the line length. The start-of-line rules (dot-unstuffing, the final dot) apply only at the
//! real start of a line, never at the start of a piece; a piece never ends in CR, which is kept back
//! because it may be the CR of the line's CRLF.

/// A line still without LF is handed out in pieces once this many of its octets have arrived: 8 KiB,
/// the driver's read size, and far above the 1000 octets of ordinary lines, which still come whole.
/// At least 3, so that a piece can never be the start of the final `.CRLF`.
pub const PIECE: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    /// A CR not followed by LF, or an LF not preceded by CR.
    BareLineEnding,
    LineTooLong,
    TooBig,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DataStep<'a> {
    /// No complete line in the input: read more.
    NeedMore,
    /// Bytes were consumed (a line of a rejected message, part of an over-long line) with nothing to report.
    Skipped,
    /// Message line content with no line end yet (a long line, in pieces): more of the same line follows,
    /// ending with a [`DataStep::Line`].
    Partial(&'a [u8]),
    /// One message line (or the rest of one after its pieces), dot-unstuffed, without its CRLF.
    Line(&'a [u8]),
    /// The message just became invalid; lines are no longer handed out, reading continues to the end.
    Failed(DataError),
    /// `CRLF . CRLF` was read: the message is complete (or rejected with the first error seen).
    End(Result<(), DataError>),
}

#[derive(Debug)]
pub struct DataReader {
    /// Longest line, CRLF included; `None`: no limit.
    max_line: Option<usize>,
    max_size: u64,
    size: u64,
    /// The previous line ended with CRLF (true at the start): only then can `.CRLF` end the data.
    after_crlf: bool,
    /// Part of the current line was consumed as pieces: its start is behind us.
    in_line: bool,
    /// Octets of the current line consumed so far, dot-unstuffed, for the line limit.
    line_len: usize,
    /// Inside an over-long line that is being discarded up to its LF.
    draining: bool,
    /// The last byte discarded while draining was CR.
    drained_cr: bool,
    error: Option<DataError>,
}

impl DataReader {
    pub fn new(max_line: Option<usize>, max_size: u64) -> DataReader {
        DataReader {
            max_line,
            max_size,
            size: 0,
            after_crlf: true,
            in_line: false,
            line_len: 0,
            draining: false,
            drained_cr: false,
            error: None,
        }
    }

    /// Reads at most one line (or one piece of a long line) from `input`; returns how many bytes were
    /// consumed and what happened.
    pub fn step<'a>(&mut self, input: &'a [u8]) -> (usize, DataStep<'a>) {
        if self.draining {
            return self.drain(input);
        }
        // RFC 5321 §4.5.2: a leading dot was doubled by the client (at the real start of a line only).
        // RFC 5321 §4.5.3.1.6: the line limit does not count it.
        let stuffing = usize::from(!self.in_line && input.first() == Some(&b'.'));
        match input.iter().position(|&b| b == b'\n') {
            Some(lf) => self.line(input, lf, stuffing),
            None => self.no_line_end(input, stuffing),
        }
    }

    /// Octets received so far, in CRLF form after unstuffing.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether a line of `len` octets (unstuffed, CRLF included if known) is over the limit.
    fn too_long(&self, len: usize) -> bool {
        self.max_line.is_some_and(|max| len > max)
    }

    /// Discarding an over-long line: up to and including its LF.
    fn drain<'a>(&mut self, input: &'a [u8]) -> (usize, DataStep<'a>) {
        let Some(lf) = input.iter().position(|&b| b == b'\n') else {
            if input.is_empty() {
                return (0, DataStep::NeedMore);
            }
            self.drained_cr = input.last() == Some(&b'\r');
            return (input.len(), DataStep::Skipped);
        };
        self.draining = false;
        self.after_crlf = if lf > 0 {
            input[lf - 1] == b'\r'
        } else {
            self.drained_cr
        };
        self.end_line();
        (lf + 1, DataStep::Skipped)
    }

    /// No LF in `input`: wait for more, hand out a piece, or start draining an over-long line.
    fn no_line_end<'a>(&mut self, input: &'a [u8], stuffing: usize) -> (usize, DataStep<'a>) {
        if input.is_empty() {
            return (0, DataStep::NeedMore);
        }
        // Even with nothing after these octets but a LF, the line would be over the limit.
        if self.too_long(self.line_len + input.len() - stuffing + 1) {
            self.drained_cr = input.last() == Some(&b'\r');
            self.draining = true;
            return (input.len(), self.fail(DataError::LineTooLong));
        }
        if input.len() < PIECE {
            return (0, DataStep::NeedMore);
        }
        // A trailing CR stays unconsumed: with the next LF it is the line end, not content.
        let consumed = input.len() - usize::from(input.last() == Some(&b'\r'));
        let piece = &input[stuffing..consumed];
        self.in_line = true;
        self.line_len += piece.len();
        (
            consumed,
            self.content(piece, LineEnd::NotYet, DataStep::Partial(piece)),
        )
    }

    /// A line end at `input[lf]`: the end of data, or the line (or the rest of it after its pieces).
    fn line<'a>(&mut self, input: &'a [u8], lf: usize, stuffing: usize) -> (usize, DataStep<'a>) {
        let consumed = lf + 1;
        let ends_crlf = lf > 0 && input[lf - 1] == b'\r';
        let line = &input[..lf - usize::from(ends_crlf)];
        let starts_clean = self.after_crlf && !self.in_line;
        let line_len = self.line_len + consumed - stuffing;
        self.after_crlf = ends_crlf;
        self.end_line();
        if starts_clean && ends_crlf && line == b"." {
            return (consumed, DataStep::End(self.error.map_or(Ok(()), Err)));
        }
        if self.too_long(line_len) {
            return (consumed, self.fail(DataError::LineTooLong));
        }
        let line = &line[stuffing..];
        let end = if ends_crlf {
            LineEnd::Crlf
        } else {
            LineEnd::BareLf
        };
        (consumed, self.content(line, end, DataStep::Line(line)))
    }

    /// Message content `bytes` (a line or a piece of one) and how it `end`s: checked and counted,
    /// then `step` unless the message failed. Of a bare CR or LF and the octet past the size limit,
    /// the one that comes first in the stream is reported: a long line is checked whole or in
    /// pieces depending on how the network split it, and the reply must not depend on that.
    fn content<'a>(&mut self, bytes: &[u8], end: LineEnd, step: DataStep<'a>) -> DataStep<'a> {
        // Octets that still fit, and the size in CRLF form (a bare LF counts as the CRLF it lacks).
        let room = self.max_size.saturating_sub(self.size);
        let total = bytes.len() as u64 + if end == LineEnd::NotYet { 0 } else { 2 };
        self.size = self.size.saturating_add(total);
        let bare = bytes
            .iter()
            .position(|&b| b == b'\r')
            .or((end == LineEnd::BareLf).then_some(bytes.len()));
        let over = (total > room).then_some(room);
        match (bare, over) {
            (Some(at), Some(over)) if at as u64 >= over => self.fail(DataError::TooBig),
            (Some(_), _) => self.fail(DataError::BareLineEnding),
            (None, Some(_)) => self.fail(DataError::TooBig),
            (None, None) if self.error.is_some() => DataStep::Skipped,
            (None, None) => step,
        }
    }

    fn end_line(&mut self) {
        self.in_line = false;
        self.line_len = 0;
    }

    /// Records the first error (reported once); later ones are only swallowed.
    fn fail(&mut self, error: DataError) -> DataStep<'static> {
        if self.error.is_some() {
            return DataStep::Skipped;
        }
        self.error = Some(error);
        DataStep::Failed(error)
    }
}

/// How the octets handed to `DataReader::content` end.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LineEnd {
    /// A piece of a long line: its end is still to come.
    NotYet,
    Crlf,
    BareLf,
}

/// The reader of BDAT chunks (RFC 3030): chunks are delimited by their declared size, so there is no
/// dot-stuffing and no end-of-data line, but the message is held to the same rules as with DATA: lines
/// end with CRLF (a bare CR or LF refuses the message), no line is longer than the limit, and the whole
/// is no larger than the size limit. A line may span chunks, so the state lives across them. Chunks
/// already stream, so a line of any length costs no memory beyond its chunk.
#[derive(Debug)]
pub struct ChunkReader {
    /// Longest line, CRLF included; `None`: no limit.
    max_line: Option<usize>,
    max_size: u64,
    size: u64,
    /// Octets of the current line so far (a pending CR included).
    line_len: usize,
    prev_cr: bool,
    error: Option<DataError>,
}

impl ChunkReader {
    pub fn new(max_line: Option<usize>, max_size: u64) -> ChunkReader {
        ChunkReader {
            max_line,
            max_size,
            size: 0,
            line_len: 0,
            prev_cr: false,
            error: None,
        }
    }

    pub fn error(&self) -> Option<DataError> {
        self.error
    }

    /// Appends the message bytes of `chunk` to `out` in stored form (LF line endings). Returns the
    /// error that this chunk caused, if it is the message's first.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Option<DataError> {
        if self.error.is_some() {
            return None;
        }
        // Octet by octet, so that the first violation in the stream is the one reported however the
        // network split the chunk.
        for &b in chunk {
            self.size += 1;
            if self.size > self.max_size {
                return self.fail(DataError::TooBig);
            }
            match (self.prev_cr, b) {
                (true, b'\n') => {
                    out.push(b'\n');
                    self.line_len = 0;
                    self.prev_cr = false;
                    continue;
                }
                (true, _) | (false, b'\n') => return self.fail(DataError::BareLineEnding),
                (false, b'\r') => self.prev_cr = true,
                (false, _) => out.push(b),
            }
            self.line_len += 1;
            // The limit counts the CRLF: content + CR + LF.
            if self
                .max_line
                .is_some_and(|max| self.line_len + 1 + usize::from(!self.prev_cr) > max)
            {
                return self.fail(DataError::LineTooLong);
            }
        }
        None
    }

    /// After the LAST chunk: a final line without CRLF is completed; a dangling CR is a bare CR.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), DataError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.prev_cr {
            return Err(DataError::BareLineEnding);
        }
        if self.line_len > 0 {
            out.push(b'\n');
        }
        Ok(())
    }

    fn fail(&mut self, error: DataError) -> Option<DataError> {
        self.error = Some(error);
        Some(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reader made of an input: whole lines (pieces joined), the end, the octets consumed.
    type Outcome = (Vec<Vec<u8>>, Option<Result<(), DataError>>, usize);

    /// Feeds `input` in chunks of `chunk` bytes (as a network would) and collects what comes out.
    /// Checks on the way that the reader never asks for more input while holding [`PIECE`] octets.
    fn run(input: &[u8], chunk: usize, max_line: Option<usize>, max_size: u64) -> Outcome {
        let cuts: Vec<usize> = (chunk..input.len()).step_by(chunk).collect();
        run_cuts(input, &cuts, max_line, max_size)
    }

    /// [`run`] with the input cut at these (ascending) offsets.
    fn run_cuts(input: &[u8], cuts: &[usize], max_line: Option<usize>, max_size: u64) -> Outcome {
        let mut reader = DataReader::new(max_line, max_size);
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        let mut current = Vec::new();
        let mut cuts = cuts.iter().copied().chain([input.len()]);
        let mut fed = 0;
        let mut total_consumed = 0;
        loop {
            let (n, step) = reader.step(&buf);
            let mut end = None;
            match step {
                DataStep::Partial(p) => current.extend_from_slice(p),
                DataStep::Line(l) => {
                    current.extend_from_slice(l);
                    lines.push(std::mem::take(&mut current));
                }
                DataStep::End(r) => end = Some(r),
                DataStep::NeedMore => assert!(buf.len() < PIECE, "{} octets kept", buf.len()),
                DataStep::Skipped | DataStep::Failed(_) => {}
            }
            buf.drain(..n);
            total_consumed += n;
            if end.is_some() {
                return (lines, end, total_consumed);
            }
            if n == 0 {
                if fed >= input.len() {
                    return (lines, None, total_consumed);
                }
                let end = cuts.next().unwrap_or(input.len()).clamp(fed, input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
        }
    }

    const CHUNKS: [usize; 9] = [1, 2, 3, 4, 7, 16, 64, 512, 4096];

    /// `max_line`: a number, or `None` for no limit.
    fn for_all_chunks(input: &[u8], max_line: impl Into<Option<usize>>, max_size: u64) -> Outcome {
        across(&CHUNKS, input, max_line.into(), max_size)
    }

    /// The same outcome whichever of these chunk sizes the network uses.
    fn across(chunks: &[usize], input: &[u8], max_line: Option<usize>, max_size: u64) -> Outcome {
        let reference = run(input, input.len().max(1), max_line, max_size);
        for &chunk in chunks {
            assert_eq!(
                run(input, chunk, max_line, max_size),
                reference,
                "chunk size {chunk}"
            );
        }
        reference
    }

    #[test]
    fn plain_message_and_dot_unstuffing() {
        let (lines, end, consumed) = for_all_chunks(
            b"Subject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n",
            1000,
            1 << 20,
        );
        assert_eq!(
            lines,
            vec![
                b"Subject: x".to_vec(),
                b"".to_vec(),
                b".leading dot".to_vec()
            ]
        );
        assert_eq!(end, Some(Ok(())));
        assert_eq!(
            consumed, 32,
            "stops right after the final dot, leaving QUIT unread"
        );
    }

    #[test]
    fn empty_message() {
        let (lines, end, _) = for_all_chunks(b".\r\n", 1000, 100);
        assert!(lines.is_empty());
        assert_eq!(end, Some(Ok(())));
    }

    #[test]
    fn smuggling_forms_never_end_the_data() {
        for form in [
            &b"\n.\n"[..],
            b"\r.\r",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\r\n.\r",
        ] {
            let mut input = b"a".to_vec();
            input.extend_from_slice(form);
            input.extend_from_slice(
                b"MAIL FROM:<evil@x.org>\r\nRCPT TO:<a@b.org>\r\nDATA\r\nsmuggled\r\n.\r\n",
            );
            let (lines, end, consumed) = for_all_chunks(&input, 1000, 1 << 20);
            assert_eq!(end, Some(Err(DataError::BareLineEnding)), "{form:?}");
            assert_eq!(
                consumed,
                input.len(),
                "{form:?}: everything up to the real end is data"
            );
            assert!(lines.iter().all(|l| !l.starts_with(b"MAIL")), "{form:?}");
        }
    }

    #[test]
    fn bare_lf_rejects_the_whole_message() {
        let (_, end, _) = for_all_chunks(b"line one\nline two\r\n.\r\n", 1000, 1 << 20);
        assert_eq!(end, Some(Err(DataError::BareLineEnding)));
    }

    #[test]
    fn overlong_line_is_drained_then_rejected() {
        let mut input = vec![b'x'; 5000];
        input.extend_from_slice(b"\r\nmore\r\n.\r\nNOOP\r\n");
        let (lines, end, consumed) = for_all_chunks(&input, 1000, 1 << 20);
        assert!(lines.is_empty());
        assert_eq!(end, Some(Err(DataError::LineTooLong)));
        assert_eq!(consumed, input.len() - 6);
    }

    #[test]
    fn line_of_exactly_the_limit_is_fine() {
        let mut input = vec![b'x'; 998];
        input.extend_from_slice(b"\r\n.\r\n");
        let (lines, end, _) = for_all_chunks(&input, 1000, 1 << 20);
        assert_eq!(end, Some(Ok(())));
        assert_eq!(lines[0].len(), 998);
        let mut input = vec![b'x'; 999];
        input.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(
            for_all_chunks(&input, 1000, 1 << 20).1,
            Some(Err(DataError::LineTooLong))
        );
    }

    #[test]
    fn transparency_dot_does_not_count_toward_the_line_limit() {
        let mut input = b".".to_vec();
        input.extend_from_slice(&[b'.'; 998]);
        input.extend_from_slice(b"\r\n.\r\n");
        let (lines, end, _) = for_all_chunks(&input, 1000, 1 << 20);
        assert_eq!(end, Some(Ok(())));
        assert_eq!(lines[0].len(), 998);
        let mut input = b"..".to_vec();
        input.extend_from_slice(&[b'x'; 998]);
        input.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(
            for_all_chunks(&input, 1000, 1 << 20).1,
            Some(Err(DataError::LineTooLong))
        );
    }

    #[test]
    fn oversized_message_is_read_to_the_end() {
        let input = b"0123456789\r\n0123456789\r\n.\r\n";
        let (lines, end, consumed) = for_all_chunks(input, 1000, 15);
        assert_eq!(lines.len(), 1);
        assert_eq!(end, Some(Err(DataError::TooBig)));
        assert_eq!(consumed, input.len());
    }

    /// A line of `len` octets with a CR at `cr` (when given), ended by `end`, then the end of data.
    fn line_with_cr(len: usize, cr: Option<usize>, end: &[u8]) -> Vec<u8> {
        let mut line = vec![b'y'; len];
        if let Some(at) = cr {
            line[at] = b'\r';
        }
        [b"Subject: long\r\n\r\n".as_slice(), &line, end, b".\r\n"].concat()
    }

    // Found by the smtp_session fuzz target: a 13 KiB line with a bare CR at octet 8,755, in a message
    // over the 2,000-octet limit, got 550 (bare CR) when it came whole and 552 (too big) when it came
    // in small chunks, because the reader then saw it in pieces and counted the size of the first
    // piece before it reached the CR.
    #[test]
    fn a_bare_cr_past_the_size_limit_is_too_big_however_the_line_is_split() {
        let input = line_with_cr(13_000, Some(8_755), b"\r\n");
        let (_, end, _) = for_all_chunks(&input, None, 2000);
        assert_eq!(end, Some(Err(DataError::TooBig)));
    }

    #[test]
    fn a_bare_cr_before_the_size_limit_is_a_bare_line_ending_however_the_line_is_split() {
        let input = line_with_cr(13_000, Some(100), b"\r\n");
        let (_, end, _) = for_all_chunks(&input, None, 2000);
        assert_eq!(end, Some(Err(DataError::BareLineEnding)));
        let input = line_with_cr(13_000, Some(9_000), b"\r\n");
        let (_, end, _) = for_all_chunks(&input, None, 20_000);
        assert_eq!(end, Some(Err(DataError::BareLineEnding)));
    }

    #[test]
    fn a_long_line_ended_by_a_bare_lf_is_judged_in_stream_order() {
        let input = line_with_cr(13_000, None, b"\n\r\n");
        let (_, end, _) = for_all_chunks(&input, None, 2000);
        assert_eq!(
            end,
            Some(Err(DataError::TooBig)),
            "the size limit comes first"
        );
        let (_, end, _) = for_all_chunks(&input, None, 20_000);
        assert_eq!(end, Some(Err(DataError::BareLineEnding)));
    }

    #[test]
    fn bdat_reports_the_first_violation_in_the_stream_however_the_chunk_is_split() {
        let mut message = vec![b'y'; 3000];
        message[2500] = b'\r';
        assert_eq!(all_splits(&message, None, 2000).1, Err(DataError::TooBig));
        assert_eq!(
            all_splits(&message, None, 4000).1,
            Err(DataError::BareLineEnding)
        );
        message[2500] = b'y';
        message[1000] = b'\n';
        assert_eq!(
            all_splits(&message, None, 2000).1,
            Err(DataError::BareLineEnding)
        );
    }

    #[test]
    fn size_counts_crlf_after_unstuffing() {
        let mut r = DataReader::new(Some(1000), 100);
        let (_, _) = r.step(b"..ab\r\n");
        assert_eq!(r.size(), 5);
    }

    /// Long lines in pieces: every chunking of the network, split on and around piece boundaries.
    const LONG_CHUNKS: [usize; 8] = [
        100,
        1000,
        PIECE - 1,
        PIECE,
        PIECE + 1,
        3 * PIECE,
        65536,
        usize::MAX,
    ];

    fn long_line_runs(input: &[u8], max_line: Option<usize>, max_size: u64) -> Outcome {
        across(&LONG_CHUNKS, input, max_line, max_size)
    }

    /// A line of `len` octets of 8-bit text with dots in it (so that pieces may start with a dot),
    /// and its dot-stuffed wire form with CRLF.
    fn long_line(len: usize, seed: usize) -> (Vec<u8>, Vec<u8>) {
        const ALPHABET: &[u8] = b"x..y \t\xe9=";
        let line: Vec<u8> = (0..len)
            .map(|k| ALPHABET[(k * 7 + seed) % ALPHABET.len()])
            .collect();
        let mut wire = Vec::new();
        if line.first() == Some(&b'.') {
            wire.push(b'.');
        }
        wire.extend_from_slice(&line);
        wire.extend_from_slice(b"\r\n");
        (line, wire)
    }

    #[test]
    fn line_of_100_kb_is_delivered_byte_exact() {
        let (line, wire) = long_line(100_000, 1);
        assert_eq!(
            line[0], b'.',
            "starts with a dot: unstuffed once, at the real start only"
        );
        let mut input = b"Subject: long\r\n\r\n".to_vec();
        input.extend_from_slice(&wire);
        input.extend_from_slice(b"after\r\n.\r\nQUIT\r\n");
        let (lines, end, consumed) = long_line_runs(&input, None, 1 << 20);
        assert_eq!(end, Some(Ok(())));
        assert_eq!(lines.len(), 4);
        assert!(lines[2] == line, "the long line differs");
        assert_eq!(lines[3], b"after");
        assert_eq!(consumed, input.len() - 6);
    }

    #[test]
    fn lines_around_the_piece_size_keep_their_crlf() {
        for len in [
            PIECE - 2,
            PIECE - 1,
            PIECE,
            PIECE + 1,
            2 * PIECE - 1,
            2 * PIECE,
        ] {
            let line = vec![b'x'; len];
            let mut input = line.clone();
            input.extend_from_slice(b"\r\n.\r\n");
            let (lines, end, consumed) = long_line_runs(&input, None, 1 << 20);
            assert_eq!(end, Some(Ok(())), "length {len}");
            assert!(lines == [line.clone()], "length {len}");
            assert_eq!(consumed, input.len());
        }
    }

    #[test]
    fn dots_inside_a_long_line_are_content() {
        // A dot at the start of a piece is not a stuffing dot, and a piece-long line ending in `.`
        // followed by CRLF is a line, not the end of data.
        let dots = vec![b'.'; 3 * PIECE];
        let mut input = b".".to_vec();
        input.extend_from_slice(&dots);
        input.extend_from_slice(b"\r\n");
        input.extend_from_slice(&[b'x'; PIECE]);
        input.extend_from_slice(b".\r\n.\r\n");
        let (lines, end, _) = long_line_runs(&input, None, 1 << 20);
        assert_eq!(end, Some(Ok(())));
        assert_eq!(lines.len(), 2);
        assert!(lines[0] == dots);
        assert_eq!(lines[1].len(), PIECE + 1);
        assert_eq!(lines[1].last(), Some(&b'.'));
    }

    #[test]
    fn smuggling_forms_inside_long_lines_never_end_the_data() {
        for form in [&b"\n.\n"[..], b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"] {
            let mut input = vec![b'a'; 3 * PIECE];
            input.extend_from_slice(form);
            input.extend_from_slice(&[b'b'; 2 * PIECE]);
            input.extend_from_slice(b"\r\nMAIL FROM:<evil@x.org>\r\n.\r\nNOOP\r\n");
            let (_, end, consumed) = long_line_runs(&input, None, 1 << 20);
            assert_eq!(end, Some(Err(DataError::BareLineEnding)), "{form:?}");
            assert_eq!(consumed, input.len() - 6, "{form:?}: read to the real end");
        }
        let mut input = vec![b'a'; 2 * PIECE];
        input.push(b'\r');
        input.extend_from_slice(&[b'b'; 2 * PIECE]);
        input.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(
            long_line_runs(&input, None, 1 << 20).1,
            Some(Err(DataError::BareLineEnding)),
            "a bare CR in the middle of a long line"
        );
    }

    #[test]
    fn long_lines_count_toward_the_size_limit() {
        let mut input = vec![b'x'; 5 * PIECE];
        input.extend_from_slice(b"\r\n.\r\n");
        let (lines, end, consumed) = long_line_runs(&input, None, 3 * PIECE as u64);
        assert!(lines.is_empty());
        assert_eq!(end, Some(Err(DataError::TooBig)));
        assert_eq!(consumed, input.len());
        let mut r = DataReader::new(None, 1 << 20);
        let (n, _) = r.step(&input[..PIECE]);
        assert_eq!(n, PIECE);
        let (_, step) = r.step(b"yz\r\n");
        assert_eq!(step, DataStep::Line(b"yz"));
        assert_eq!(r.size(), PIECE as u64 + 4);
    }

    #[test]
    fn a_configured_line_limit_still_refuses_long_lines() {
        // A limit above the piece size: pieces go out, then the line is refused and drained.
        let limit = 3 * PIECE;
        let mut ok = vec![b'x'; limit - 2];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(long_line_runs(&ok, Some(limit), 1 << 20).1, Some(Ok(())));
        let mut over = vec![b'x'; limit - 1];
        over.extend_from_slice(b"\r\nnext\r\n.\r\nNOOP\r\n");
        let (_, end, consumed) = long_line_runs(&over, Some(limit), 1 << 20);
        assert_eq!(end, Some(Err(DataError::LineTooLong)));
        assert_eq!(consumed, over.len() - 6);
        let mut huge = vec![b'x'; 100_000];
        huge.extend_from_slice(b"\r\n.\r\n");
        let (_, end, _) = long_line_runs(&huge, Some(1000), 1 << 20);
        assert_eq!(end, Some(Err(DataError::LineTooLong)));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Lines of any length, the input cut anywhere: the same lines come out, byte for byte, and
        /// the reader never holds a piece's worth of unconsumed input (checked in `run_cuts`).
        #[test]
        fn any_line_lengths_any_splits_byte_exact(
            lens in proptest::collection::vec(0..3 * PIECE, 1..4),
            seed in 0usize..100,
            cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..12),
        ) {
            let mut input = Vec::new();
            let mut expected = Vec::new();
            for (i, &len) in lens.iter().enumerate() {
                let (line, wire) = long_line(len, seed + i);
                input.extend_from_slice(&wire);
                expected.push(line);
            }
            input.extend_from_slice(b".\r\n");
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(input.len())).collect();
            cuts.sort_unstable();
            let (lines, end, consumed) = run_cuts(&input, &cuts, None, 1 << 20);
            proptest::prop_assert_eq!(end, Some(Ok(())));
            proptest::prop_assert!(lines == expected);
            proptest::prop_assert_eq!(consumed, input.len());
        }
    }

    #[test]
    fn bdat_line_of_any_length_without_a_limit() {
        let mut message = vec![b'y'; 100_000];
        message.extend_from_slice(b"\r\n");
        let (out, end) = all_splits(&message, None, 1 << 20);
        assert_eq!(end, Ok(()));
        assert_eq!(out.len(), 100_001);
        assert_eq!(
            all_splits(&message, 1000, 1 << 20).1,
            Err(DataError::LineTooLong),
            "with a limit, still refused"
        );
    }

    fn chunks(
        message: &[u8],
        split: usize,
        max_line: Option<usize>,
        max_size: u64,
    ) -> (Vec<u8>, Result<(), DataError>) {
        let mut r = ChunkReader::new(max_line, max_size);
        let mut out = Vec::new();
        for c in message.chunks(split.max(1)) {
            r.feed(c, &mut out);
        }
        let end = r.finish(&mut out);
        (if end.is_ok() { out } else { Vec::new() }, end)
    }

    /// `max_line`: a number, or `None` for no limit.
    fn all_splits(
        message: &[u8],
        max_line: impl Into<Option<usize>>,
        max_size: u64,
    ) -> (Vec<u8>, Result<(), DataError>) {
        let max_line = max_line.into();
        let reference = chunks(message, message.len(), max_line, max_size);
        for split in [1, 2, 3, 5, 64] {
            assert_eq!(
                chunks(message, split, max_line, max_size),
                reference,
                "split {split}"
            );
        }
        reference
    }

    #[test]
    fn bdat_stores_lf_lines_without_unstuffing() {
        let (out, end) = all_splits(b"Subject: x\r\n\r\n.not stuffed\r\n.\r\nlast", 1000, 1000);
        assert_eq!(end, Ok(()));
        assert_eq!(out, b"Subject: x\n\n.not stuffed\n.\nlast\n");
    }

    #[test]
    fn bdat_same_rules_as_data() {
        assert_eq!(
            all_splits(b"a\nb\r\n", 1000, 1000).1,
            Err(DataError::BareLineEnding)
        );
        assert_eq!(
            all_splits(b"a\rb\r\n", 1000, 1000).1,
            Err(DataError::BareLineEnding)
        );
        assert_eq!(
            all_splits(b"a\r", 1000, 1000).1,
            Err(DataError::BareLineEnding)
        );
        assert_eq!(
            all_splits(&[b'x'; 20], 10, 1000).1,
            Err(DataError::LineTooLong)
        );
        assert_eq!(
            all_splits(b"0123456789\r\n", 1000, 11).1,
            Err(DataError::TooBig)
        );
    }

    #[test]
    fn bdat_line_of_exactly_the_limit() {
        let mut line = vec![b'x'; 8];
        line.extend_from_slice(b"\r\n");
        assert_eq!(all_splits(&line, 10, 1000).1, Ok(()));
        let mut long = vec![b'x'; 9];
        long.extend_from_slice(b"\r\n");
        assert_eq!(all_splits(&long, 10, 1000).1, Err(DataError::LineTooLong));
    }
}
