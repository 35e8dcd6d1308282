//! The DATA reader (RFC 5321 §4.1.1.4, §4.5.2): splits the message into lines, removes dot-stuffing,
//! finds the end of data, and enforces the line-length and size limits.
//!
//! Policy against SMTP smuggling (CVE-2023-51764 family): the end of data is `CRLF . CRLF` and nothing
//! else. A bare CR or bare LF anywhere in the message makes the whole message invalid, but reading goes
//! on until the real `CRLF . CRLF`, so `LF . LF`, `CR . CR`, `LF . CRLF`, `CRLF . LF` and the like are
//! swallowed as (rejected) message content and can never end the data or start a second transaction.
//! Likewise an over-long line or an oversized message is read to its end before the rejection is sent.

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
    /// One message line, dot-unstuffed, without its CRLF.
    Line(&'a [u8]),
    /// The message just became invalid; lines are no longer handed out, reading continues to the end.
    Failed(DataError),
    /// `CRLF . CRLF` was read: the message is complete (or rejected with the first error seen).
    End(Result<(), DataError>),
}

#[derive(Debug)]
pub struct DataReader {
    max_line: usize,
    max_size: u64,
    size: u64,
    /// The previous line ended with CRLF (true at the start): only then can `.CRLF` end the data.
    after_crlf: bool,
    /// Inside an over-long line that is being discarded up to its LF.
    draining: bool,
    /// The last byte discarded while draining was CR.
    drained_cr: bool,
    error: Option<DataError>,
}

impl DataReader {
    pub fn new(max_line: usize, max_size: u64) -> DataReader {
        DataReader {
            max_line,
            max_size,
            size: 0,
            after_crlf: true,
            draining: false,
            drained_cr: false,
            error: None,
        }
    }

    /// Reads at most one line from `input`; returns how many bytes were consumed and what happened.
    pub fn step<'a>(&mut self, input: &'a [u8]) -> (usize, DataStep<'a>) {
        let Some(lf) = input.iter().position(|&b| b == b'\n') else {
            // RFC 5321 §4.5.3.1.6: the limit does not count a dot doubled for transparency.
            let max = self.max_line + usize::from(input.first() == Some(&b'.'));
            if input.is_empty() || !(self.draining || input.len() >= max) {
                return (0, DataStep::NeedMore);
            }
            // Over-long line: discard what we have, keep discarding up to the LF.
            self.drained_cr = input.last() == Some(&b'\r');
            let first = !self.draining;
            self.draining = true;
            let step = if first {
                self.fail(DataError::LineTooLong)
            } else {
                DataStep::Skipped
            };
            return (input.len(), step);
        };
        let consumed = lf + 1;
        let ends_crlf = if lf > 0 {
            input[lf - 1] == b'\r'
        } else {
            self.draining && self.drained_cr
        };
        if self.draining {
            self.draining = false;
            self.after_crlf = ends_crlf;
            return (consumed, DataStep::Skipped);
        }
        let line = &input[..lf - usize::from(lf > 0 && ends_crlf)];
        let starts_clean = self.after_crlf;
        self.after_crlf = ends_crlf;
        if starts_clean && ends_crlf && line == b"." {
            return (consumed, DataStep::End(self.error.map_or(Ok(()), Err)));
        }
        if consumed > self.max_line + usize::from(input[0] == b'.') {
            return (consumed, self.fail(DataError::LineTooLong));
        }
        if !ends_crlf || line.contains(&b'\r') {
            return (consumed, self.fail(DataError::BareLineEnding));
        }
        // RFC 5321 §4.5.2: a leading dot was doubled by the client; remove one.
        let line = line.strip_prefix(b".").unwrap_or(line);
        self.size = self.size.saturating_add(line.len() as u64 + 2);
        if self.size > self.max_size {
            return (consumed, self.fail(DataError::TooBig));
        }
        if self.error.is_some() {
            return (consumed, DataStep::Skipped);
        }
        (consumed, DataStep::Line(line))
    }

    /// Octets received so far, in CRLF form after unstuffing.
    pub fn size(&self) -> u64 {
        self.size
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

/// The reader of BDAT chunks (RFC 3030): chunks are delimited by their declared size, so there is no
/// dot-stuffing and no end-of-data line, but the message is held to the same rules as with DATA: lines
/// end with CRLF (a bare CR or LF refuses the message), no line is longer than the limit, and the whole
/// is no larger than the size limit. A line may span chunks, so the state lives across them.
#[derive(Debug)]
pub struct ChunkReader {
    max_line: usize,
    max_size: u64,
    size: u64,
    /// Octets of the current line so far (a pending CR included).
    line_len: usize,
    prev_cr: bool,
    error: Option<DataError>,
}

impl ChunkReader {
    pub fn new(max_line: usize, max_size: u64) -> ChunkReader {
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
        self.size = self.size.saturating_add(chunk.len() as u64);
        if self.size > self.max_size {
            return self.fail(DataError::TooBig);
        }
        for &b in chunk {
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
            if self.line_len + 1 + usize::from(!self.prev_cr) > self.max_line {
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

    /// Feeds `input` in chunks of `chunk` bytes (as a network would) and collects what comes out.
    fn run(
        input: &[u8],
        chunk: usize,
        max_line: usize,
        max_size: u64,
    ) -> (Vec<Vec<u8>>, Option<Result<(), DataError>>, usize) {
        let mut reader = DataReader::new(max_line, max_size);
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        let mut fed = 0;
        let mut total_consumed = 0;
        loop {
            let (n, step) = reader.step(&buf);
            let mut end = None;
            match step {
                DataStep::Line(l) => lines.push(l.to_vec()),
                DataStep::End(r) => end = Some(r),
                _ => {}
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
                let end = (fed + chunk).min(input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
        }
    }

    const CHUNKS: [usize; 9] = [1, 2, 3, 4, 7, 16, 64, 512, 4096];

    fn for_all_chunks(
        input: &[u8],
        max_line: usize,
        max_size: u64,
    ) -> (Vec<Vec<u8>>, Option<Result<(), DataError>>, usize) {
        let reference = run(input, input.len().max(1), max_line, max_size);
        for chunk in CHUNKS {
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

    #[test]
    fn size_counts_crlf_after_unstuffing() {
        let mut r = DataReader::new(1000, 100);
        let (_, _) = r.step(b"..ab\r\n");
        assert_eq!(r.size(), 5);
    }

    fn chunks(
        message: &[u8],
        split: usize,
        max_line: usize,
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

    fn all_splits(
        message: &[u8],
        max_line: usize,
        max_size: u64,
    ) -> (Vec<u8>, Result<(), DataError>) {
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
