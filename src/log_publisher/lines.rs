//! A byte stream to Log Publisher lines: each segment ends in CRLF (task-interface.md §3.3a), and
//! a line longer than the cap is refused without ever being held whole in memory.
//!
//! Only CRLF ends a line. A lone CR or LF is part of the line, as the documented format has
//! neither inside a segment; a line holding one then fails to parse as a segment and is counted,
//! rather than being cut where the stream might not mean it (inferred: the vendor's samples read
//! with `ReadLine`, which would also split on a lone CR or LF).

use bytes::{Buf, Bytes, BytesMut};

/// The default cap on one line, CRLF excluded. An `AC` segment is about 20 bytes and the
/// documented segments are all short, so a line near this is not a segment we understand.
pub const DEFAULT_MAX_LINE_BYTES: usize = 4096;

/// Cuts CRLF-terminated lines off the front of a buffer that the reader appends to, in the way
/// of a `tokio_util` decoder but without the dependency: read into a `BytesMut`, then call
/// [`LineSplitter::next_line`] until it returns `None`.
#[derive(Debug)]
pub struct LineSplitter {
    /// The longest line returned, CRLF excluded.
    max_line_bytes: usize,
    /// How many bytes at the front of the buffer are known to hold no CRLF, so bytes that arrive
    /// a few at a time are not searched again and again.
    searched: usize,
    /// Whether the front of the buffer belongs to a line already reported as too long; it is
    /// dropped up to and including its CRLF.
    discarding: bool,
}

/// Why a line was not returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line reached the cap without a CRLF. It is reported as soon as that is known, and its
    /// remaining bytes are dropped as they arrive, up to the next CRLF.
    #[error("line longer than {max_line_bytes} bytes, starting '{start}'")]
    TooLong {
        /// The cap the line went past.
        max_line_bytes: usize,
        /// The line's first bytes, as text (lossy), to recognise it in a log.
        start: String,
    },
}

// === impl LineSplitter ===

impl LineSplitter {
    /// A splitter returning lines of at most `max_line_bytes` bytes, CRLF excluded.
    pub fn new(max_line_bytes: usize) -> Self {
        LineSplitter {
            max_line_bytes,
            searched: 0,
            discarding: false,
        }
    }

    /// The next complete line in `buffer`, without its CRLF, removed from the buffer; `None`
    /// when the buffer holds no complete line yet (read more and call again).
    ///
    /// Bytes after the last CRLF stay in the buffer for the next call. When the stream ends,
    /// what is left is an unfinished segment and should be dropped. A splitter belongs to one
    /// buffer and one stream: a new connection takes a new splitter.
    pub fn next_line(&mut self, buffer: &mut BytesMut) -> Option<Result<Bytes, LineError>> {
        loop {
            // A line may end with its CRLF two bytes past the cap, so search that far; while
            // discarding, the whole buffer.
            let limit = if self.discarding {
                buffer.len()
            } else {
                buffer.len().min(self.max_line_bytes.saturating_add(2))
            };
            // `min`: a buffer emptied by its owner must not make the slice below panic.
            let searched = self.searched.min(limit);
            let found = buffer[searched..limit]
                .windows(2)
                .position(|pair| pair == b"\r\n");
            match found {
                Some(offset) => {
                    let end = searched + offset;
                    let mut line = buffer.split_to(end + 2);
                    line.truncate(end);
                    self.searched = 0;
                    if std::mem::take(&mut self.discarding) {
                        continue;
                    }
                    return Some(Ok(line.freeze()));
                }
                None if self.discarding => {
                    // Keep a final CR: it may be the first half of the CRLF that ends the line.
                    let keep = usize::from(buffer.last() == Some(&b'\r'));
                    buffer.advance(buffer.len() - keep);
                    self.searched = 0;
                    return None;
                }
                None if limit == self.max_line_bytes.saturating_add(2) => {
                    // `limit` bytes hold no CRLF, so the line is longer than the cap.
                    const START_BYTES: usize = 40;
                    let start =
                        String::from_utf8_lossy(&buffer[..START_BYTES.min(limit)]).into_owned();
                    self.discarding = true;
                    self.searched = 0;
                    return Some(Err(LineError::TooLong {
                        max_line_bytes: self.max_line_bytes,
                        start,
                    }));
                }
                None => {
                    // The last byte may be a CR whose LF has not arrived: search it again.
                    self.searched = limit.saturating_sub(1);
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one at a time, as reads would deliver them, and collects every line
    /// (as text) or error.
    fn split(max_line_bytes: usize, chunks: &[&[u8]]) -> Vec<Result<String, LineError>> {
        crate::fuzz_api::split_lines(max_line_bytes, chunks)
            .into_iter()
            .map(|line| line.map(|line| String::from_utf8_lossy(&line).into_owned()))
            .collect()
    }

    fn lines(texts: &[&str]) -> Vec<Result<String, LineError>> {
        texts.iter().map(|text| Ok((*text).to_owned())).collect()
    }

    fn too_long(max_line_bytes: usize, start: &str) -> Result<String, LineError> {
        Err(LineError::TooLong {
            max_line_bytes,
            start: start.to_owned(),
        })
    }

    #[test]
    fn crlf_ends_a_line_and_nothing_else_does() {
        assert_eq!(
            split(64, &[b"AC,5,10001,EREQ\r\nBD,1,330,AC\r\n"]),
            lines(&["AC,5,10001,EREQ", "BD,1,330,AC"])
        );
        assert_eq!(split(64, &[b"\r\n\r\n"]), lines(&["", ""]));
        assert_eq!(
            split(64, &[b"a\rb\nc\n\rd\r\n"]),
            lines(&["a\rb\nc\n\rd"]),
            "a lone CR or LF stays in the line"
        );
        assert_eq!(split(64, &[b"no end yet"]), lines(&[]));
        assert_eq!(split(64, &[b""]), lines(&[]));
    }

    #[test]
    fn lines_split_across_reads_are_joined() {
        assert_eq!(
            split(64, &[b"AC,5,1", b"0001,ER", b"EQ\r", b"\nAL,N", b"OC\r\n"]),
            lines(&["AC,5,10001,EREQ", "AL,NOC"])
        );
        // Every way of cutting a stream into two reads gives the same lines.
        let stream: &[u8] = b"AC,5,10001,EREQ\r\n\r\nx\ry\r\nAC,5,10001,ERSO\r\n";
        let expected = split(64, &[stream]);
        for cut in 0..=stream.len() {
            let (first, second) = stream.split_at(cut);
            assert_eq!(split(64, &[first, second]), expected, "cut at {cut}");
        }
        // And byte by byte.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(split(64, &bytes), expected);
    }

    #[test]
    fn a_line_at_the_cap_is_returned() {
        assert_eq!(split(4, &[b"abcd\r\n"]), lines(&["abcd"]));
        assert_eq!(split(4, &[b"abcd", b"\r", b"\n"]), lines(&["abcd"]));
        assert_eq!(split(0, &[b"\r\n"]), lines(&[""]));
    }

    #[test]
    fn an_over_long_line_is_one_error_then_reading_resumes() {
        assert_eq!(
            split(4, &[b"abcde\r\nok\r\n"]),
            vec![too_long(4, "abcde\r"), Ok("ok".to_owned())]
        );
        // Reported as soon as the cap is passed, before its end has arrived.
        assert_eq!(split(4, &[b"abcdef"]), vec![too_long(4, "abcdef")]);
        // Its rest arrives in pieces, with a CR at the end of one read and the LF in the next.
        assert_eq!(
            split(4, &[b"abcdef", b"ghij", b"k\r", b"\nAC\r\n"]),
            vec![too_long(4, "abcdef"), Ok("AC".to_owned())]
        );
        // A lone CR inside the discarded rest does not end it.
        assert_eq!(
            split(4, &[b"abcdef\rgh\r", b"x\r\nok\r\n"]),
            vec![too_long(4, "abcdef"), Ok("ok".to_owned())]
        );
        // Two over-long lines in a row are two errors.
        assert_eq!(
            split(2, &[b"xxxx\r\nyyyy\r\nz\r\n"]),
            vec![too_long(2, "xxxx"), too_long(2, "yyyy"), Ok("z".to_owned())]
        );
    }

    #[test]
    fn a_huge_line_is_never_held_whole() {
        let mut splitter = LineSplitter::new(16);
        let mut buffer = BytesMut::new();
        let mut errors = 0;
        for _ in 0..1000 {
            buffer.extend_from_slice(&[b'x'; 1000]);
            while let Some(line) = splitter.next_line(&mut buffer) {
                assert!(line.is_err());
                errors += 1;
            }
            assert!(buffer.len() <= 1, "{}", buffer.len());
        }
        assert_eq!(errors, 1);
        buffer.extend_from_slice(b"\r\nAC,1,2,NOOP\r\n");
        assert_eq!(
            splitter.next_line(&mut buffer),
            Some(Ok(Bytes::from_static(b"AC,1,2,NOOP")))
        );
        assert_eq!(splitter.next_line(&mut buffer), None);
    }

    #[test]
    fn non_utf8_bytes_pass_through_and_errors_show_them_lossily() {
        let mut splitter = LineSplitter::new(8);
        let mut buffer = BytesMut::from(&b"\xFF\xFEab\r\n"[..]);
        assert_eq!(
            splitter.next_line(&mut buffer),
            Some(Ok(Bytes::from_static(b"\xFF\xFEab")))
        );
        assert_eq!(split(2, &["ææææ\r\n".as_bytes()]), vec![too_long(2, "ææ")]);
    }
}
