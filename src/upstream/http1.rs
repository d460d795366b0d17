//! The HTTP/1.1 exchange with the controller: one POST written with one write, one reply read
//! with its framing checked, on a keep-alive connection the pool hands out.
//!
//! The gateway asks one thing of HTTP/1.1, so this module speaks only that: a request whose head
//! was made once at startup, and a reply whose head `httparse` parses and whose body is framed as
//! RFC 9112 §6.3 says, capped at the configured size. What decides whether a connection may carry
//! the next call is here too: only a reply read to its end, framed without ambiguity, with nothing
//! after it and no `Connection: close`, leaves its connection reusable.
//!
//! It replaces hyper's HTTP/1.1 client, which the gateway drove inside the call: measured with
//! callgrind at one call in flight, the whole controller call (`Upstream::call`, timer and codec
//! included) went from 22.8k instructions to 6.7k, the gateway from 101.6k to 84.0k a call, and
//! its CPU per call at 128 in flight by 15 % (hyper's dispatcher, its request and header maps,
//! the body channel and its buffers). The parsing is plain functions with unit tests and a fuzz
//! target (`fuzz_api::http1_reply`); the socket work is [`Connection`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::codec;

/// The longest reply head read (status line and headers, each `1xx` head on its own), so a peer
/// that never ends its head costs bounded memory.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The most header lines a reply head may have, as hyper allows.
const MAX_HEADERS: usize = 100;

/// Bytes asked of the socket at a time; a controller reply is a few hundred bytes.
const READ_CHUNK: usize = 4 * 1024;

/// The most each buffer of an idle connection keeps between calls.
const KEPT_BUFFER_BYTES: usize = 2 * READ_CHUNK;

/// A connection failure while sending the request or reading the reply. Its text follows "the
/// connection to the controller failed: ".
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    /// The socket failed: a reset, a broken pipe, a TLS alert.
    #[error(transparent)]
    Io(io::Error),
    /// The controller closed the connection before its reply was complete.
    #[error("closed before the reply's {0} was complete")]
    Closed(Part),
    /// Bytes that are not an HTTP/1.1 reply.
    #[error(transparent)]
    Malformed(#[from] Malformed),
}

/// Which part of the reply was being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The status line and headers.
    Head,
    /// The body.
    Body,
}

/// Why a reply is not HTTP/1.1 the gateway can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Malformed {
    /// `httparse` refused the head.
    #[error("the reply head is not valid HTTP/1.1: {0}")]
    Head(httparse::Error),
    /// The head did not end within [`MAX_HEAD_BYTES`].
    #[error("the reply head is longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLong,
    /// `101 Switching Protocols`, which the gateway never asks for.
    #[error("the reply switches protocols, which the gateway did not ask for")]
    SwitchingProtocols,
    /// A Content-Length that is not a decimal number.
    #[error("the reply's Content-Length '{0}' is not a number of bytes")]
    ContentLength(String),
    /// Content-Length values that disagree: which one frames the body cannot be known.
    #[error("the reply has two different Content-Lengths, {0} and {1}")]
    ContentLengths(u64, u64),
    /// Transfer-Encoding in an HTTP/1.0 reply, whose framing RFC 9112 §6.1 says is faulty.
    #[error("the reply is HTTP/1.0 with a Transfer-Encoding")]
    TransferEncodingInHttp10,
    /// A chunked body that breaks the chunked coding.
    #[error("the reply's chunked body is malformed: {0}")]
    Chunked(&'static str),
}

/// How a reply's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// After this many bytes.
    Length(u64),
    /// With the last chunk of the chunked coding, and its trailers.
    Chunked,
    /// When the controller closes the connection.
    UntilClose,
}

/// What the gateway reads from a reply head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    /// The status.
    pub(crate) status: StatusCode,
    /// How the body ends.
    pub(crate) framing: Framing,
    /// Whether the connection may carry another request once the body is read: HTTP/1.1, no
    /// `Connection: close`, and framing that leaves no doubt where the next reply begins (both
    /// Transfer-Encoding and Content-Length may be a response-splitting attempt).
    pub(crate) reusable: bool,
    /// Where the Content-Type's charset parameter is in the head's bytes, if it has one.
    pub(crate) charset: Option<std::ops::Range<usize>>,
}

/// Why a reply's body was not read.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// It is longer than the cap: announced so, or found so while reading.
    TooLarge,
    /// The connection failed or the body broke its framing.
    Transport(TransportError),
}

/// Why an exchange produced no reply.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// Writing failed before a byte of the request left: another connection may carry it.
    NotSent(io::Error),
    /// The connection failed after the request may have been written.
    Failed(TransportError),
}

/// A reply, borrowed from the connection that read it.
#[derive(Debug)]
pub(crate) struct Answer<'a> {
    /// The HTTP status.
    pub(crate) status: StatusCode,
    /// The Content-Type's charset parameter.
    pub(crate) charset: Option<&'a str>,
    /// The body, or why it could not be read.
    pub(crate) body: Result<&'a [u8], BodyError>,
    /// Whether the connection may carry the next call.
    pub(crate) reusable: bool,
}

/// The bytes of every request head up to the Content-Length value, made once from the URL and
/// the wire format; a call adds its length, its request ID and its body.
#[derive(Debug, Clone)]
pub(crate) struct RequestHead {
    prefix: Box<[u8]>,
}

/// One keep-alive connection to the controller, with its buffers, which live as long as it does
/// so a call allocates nothing for its I/O. Dropping it (a cancelled call) closes it.
#[derive(Debug)]
pub(crate) struct Connection {
    io: Io,
    /// The request being written.
    request: Vec<u8>,
    /// Bytes read and not yet consumed.
    read: Vec<u8>,
    /// The reply's body.
    body: Vec<u8>,
    /// The reply's charset parameter.
    charset: String,
}

/// A TCP connection, or TLS over one.
#[derive(Debug)]
pub(crate) enum Io {
    /// http://
    Tcp(TcpStream),
    /// https://
    Tls(Box<TlsStream<TcpStream>>),
}

// === impl Part ===

impl std::fmt::Display for Part {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Part::Head => "head",
            Part::Body => "body",
        })
    }
}

// === impl RequestHead ===

impl RequestHead {
    /// The head for POSTs to `target` (path and query) on `host`, with these headers, in the
    /// order hyper sent them before.
    pub(crate) fn new(
        target: &str,
        host: &str,
        user_agent: &str,
        content_type: &str,
        accept: &str,
    ) -> Self {
        let prefix = format!(
            "POST {target} HTTP/1.1\r\nhost: {host}\r\nuser-agent: {user_agent}\r\n\
             content-type: {content_type}\r\naccept: {accept}\r\ncontent-length: "
        );
        RequestHead {
            prefix: prefix.into_bytes().into_boxed_slice(),
        }
    }

    /// Appends the whole request to `out`. `request_id` is printable ASCII (`RequestId` keeps
    /// nothing else), so it cannot end the header line.
    pub(crate) fn write(&self, out: &mut Vec<u8>, request_id: &[u8], body: &[u8]) {
        const ID: &[u8] = b"\r\nx-request-id: ";
        let mut length = itoa::Buffer::new();
        let length = length.format(body.len()).as_bytes();
        out.reserve(
            self.prefix.len() + length.len() + ID.len() + request_id.len() + 4 + body.len(),
        );
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(length);
        out.extend_from_slice(ID);
        out.extend_from_slice(request_id);
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
    }
}

// === impl Connection ===

impl Connection {
    /// A connection over `io`, with no buffers yet.
    pub(crate) fn new(io: Io) -> Self {
        Connection {
            io,
            request: Vec::new(),
            read: Vec::new(),
            body: Vec::new(),
            charset: String::new(),
        }
    }

    /// Sends the request `head` makes of `request_id` and `body`, and reads the reply, its body
    /// capped at `limit` bytes.
    pub(crate) async fn exchange(
        &mut self,
        head: &RequestHead,
        request_id: &[u8],
        body: &[u8],
        limit: usize,
    ) -> Result<Answer<'_>, ExchangeError> {
        self.request.clear();
        head.write(&mut self.request, request_id, body);
        self.send().await?;
        let head = self.read_head().await.map_err(ExchangeError::Failed)?;
        let body = self.read_body(head.framing, limit).await;
        // Bytes after the reply were not asked for: whatever they are, the next reply cannot be
        // told from them.
        let reusable = head.reusable && body.is_ok() && self.read.is_empty();
        Ok(Answer {
            status: head.status,
            charset: (!self.charset.is_empty()).then_some(self.charset.as_str()),
            body: body.map(|()| self.body.as_slice()),
            reusable,
        })
    }

    /// Lets go of buffers a large reply grew, so an idle connection holds a few KiB, not up to
    /// `--max-response-bytes` twice over.
    pub(crate) fn shrink_buffers(&mut self) {
        for buffer in [&mut self.request, &mut self.read, &mut self.body] {
            if buffer.capacity() > KEPT_BUFFER_BYTES {
                *buffer = Vec::new();
            }
        }
    }

    /// Whether the connection can carry another request: the controller has not closed it or
    /// sent anything unasked. Polled once without waiting; reads nothing while the socket has
    /// not become readable since its last short read.
    pub(crate) fn is_open(&mut self) -> bool {
        let mut probe = [0_u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        let mut context = Context::from_waker(Waker::noop());
        self.read.is_empty()
            && Pin::new(&mut self.io)
                .poll_read(&mut context, &mut probe)
                .is_pending()
    }

    /// Writes the request. A failure before its first byte left is `NotSent` on plain TCP; over
    /// TLS part of a record may have gone, so it is `Failed`.
    async fn send(&mut self) -> Result<(), ExchangeError> {
        let mut written = 0;
        while written < self.request.len() {
            match self.io.write(&self.request[written..]).await {
                Ok(0) => {
                    let error = io::Error::from(io::ErrorKind::WriteZero);
                    return Err(ExchangeError::Failed(TransportError::Io(error)));
                }
                Ok(count) => written += count,
                Err(error) if written == 0 && matches!(self.io, Io::Tcp(_)) => {
                    return Err(ExchangeError::NotSent(error));
                }
                Err(error) => return Err(ExchangeError::Failed(TransportError::Io(error))),
            }
        }
        self.io
            .flush()
            .await
            .map_err(|error| ExchangeError::Failed(TransportError::Io(error)))
    }

    /// Reads heads until the final one (`1xx` heads are skipped) and consumes it.
    async fn read_head(&mut self) -> Result<Head, TransportError> {
        loop {
            match parse_head(&self.read)? {
                Some((length, head)) => {
                    self.charset.clear();
                    if let Some(range) = &head.charset {
                        // `parse_head` found it in text.
                        self.charset.push_str(
                            std::str::from_utf8(&self.read[range.clone()]).unwrap_or_default(),
                        );
                    }
                    self.read.drain(..length);
                    if head.status.is_informational() {
                        continue;
                    }
                    return Ok(head);
                }
                None if self.read.len() >= MAX_HEAD_BYTES => {
                    return Err(Malformed::HeadTooLong.into());
                }
                None => {
                    if self.fill().await.map_err(TransportError::Io)? == 0 {
                        return Err(TransportError::Closed(Part::Head));
                    }
                }
            }
        }
    }

    /// Reads the body into `self.body`, stopping as soon as it passes `limit`.
    async fn read_body(&mut self, framing: Framing, limit: usize) -> Result<(), BodyError> {
        let closed = || BodyError::Transport(TransportError::Closed(Part::Body));
        let io = |error| BodyError::Transport(TransportError::Io(error));
        self.body.clear();
        match framing {
            Framing::Length(length) => {
                let length = usize::try_from(length)
                    .ok()
                    .filter(|length| *length <= limit)
                    .ok_or(BodyError::TooLarge)?;
                while self.read.len() < length {
                    if self.fill().await.map_err(io)? == 0 {
                        return Err(closed());
                    }
                }
                self.body.extend_from_slice(&self.read[..length]);
                self.read.drain(..length);
            }
            Framing::Chunked => {
                let mut decoder = Chunked::default();
                loop {
                    let consumed =
                        decoder
                            .decode(&self.read, &mut self.body, limit)
                            .map_err(|error| match error {
                                ChunkError::TooLarge => BodyError::TooLarge,
                                ChunkError::Malformed(error) => BodyError::Transport(error.into()),
                            })?;
                    self.read.drain(..consumed);
                    if decoder.is_done() {
                        break;
                    }
                    if self.fill().await.map_err(io)? == 0 {
                        return Err(closed());
                    }
                }
            }
            Framing::UntilClose => loop {
                if self.body.len() + self.read.len() > limit {
                    return Err(BodyError::TooLarge);
                }
                self.body.append(&mut self.read);
                if self.fill().await.map_err(io)? == 0 {
                    break;
                }
            },
        }
        Ok(())
    }

    /// Reads what the socket has into `self.read`; 0 at the end of the stream. A TLS peer that
    /// closes without close_notify is an error, not an end: a body framed by the close could
    /// have been cut short by anyone on the path.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.read.capacity() - self.read.len() < READ_CHUNK / 4 {
            self.read.reserve(READ_CHUNK);
        }
        self.io.read_buf(&mut self.read).await
    }
}

// === impl Io ===

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(stream) => Pin::new(stream).poll_read(context, buffer),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_read(context, buffer),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(stream) => Pin::new(stream).poll_write(context, buffer),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write(context, buffer),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(stream) => Pin::new(stream).poll_flush(context),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(context),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(stream) => Pin::new(stream).poll_shutdown(context),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(context),
        }
    }
}

// === reply heads ===

/// Parses the reply head at the start of `bytes`: its length and what it says, or `None` while
/// it is incomplete.
pub(crate) fn parse_head(bytes: &[u8]) -> Result<Option<(usize, Head)>, Malformed> {
    // Left uninitialised for httparse to fill: zeroing 100 slots cost more than parsing a head.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut response, bytes, &mut headers)
        .map_err(Malformed::Head)?;
    let length = match parsed {
        httparse::Status::Complete(length) => length,
        httparse::Status::Partial => return Ok(None),
    };
    // `parse` fills both on `Complete`.
    let (Some(version), Some(status)) = (response.version, response.code) else {
        return Err(Malformed::Head(httparse::Error::Status));
    };
    let status =
        StatusCode::from_u16(status).map_err(|_| Malformed::Head(httparse::Error::Status))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(Malformed::SwitchingProtocols);
    }
    let mut content_length: Option<u64> = None;
    let mut chunked_last = None;
    let mut close = false;
    let mut charset = None;
    for header in response.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            for value in list(header.value) {
                let length = parse_length(value)?;
                match content_length {
                    Some(earlier) if earlier != length => {
                        return Err(Malformed::ContentLengths(earlier, length));
                    }
                    _ => content_length = Some(length),
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // RFC 9112 §6.3: chunked frames the body only as the last coding of all.
            chunked_last = Some(
                list(header.value)
                    .last()
                    .is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked")),
            );
        } else if name.eq_ignore_ascii_case("connection") {
            close |= list(header.value).any(|option| option.eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case("content-type") && charset.is_none() {
            charset = charset_range(bytes, header.value);
        }
    }
    let http11 = version == 1;
    if chunked_last.is_some() && !http11 {
        return Err(Malformed::TransferEncodingInHttp10);
    }
    let framing = match (status.as_u16(), chunked_last, content_length) {
        // RFC 9112 §6.3: no body, whatever the headers say.
        (100..=199 | 204 | 304, _, _) => Framing::Length(0),
        (_, Some(true), _) => Framing::Chunked,
        (_, Some(false), _) => Framing::UntilClose,
        (_, None, Some(length)) => Framing::Length(length),
        (_, None, None) => Framing::UntilClose,
    };
    let unambiguous = !(chunked_last.is_some() && content_length.is_some());
    let reusable = http11 && !close && unambiguous && framing != Framing::UntilClose;
    Ok(Some((
        length,
        Head {
            status,
            framing,
            reusable,
            charset,
        },
    )))
}

/// The elements of a comma-separated header value, without the whitespace around them.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|byte| *byte == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|element| !element.is_empty())
}

/// A Content-Length value: decimal digits only, as RFC 9110 §8.6 has it.
fn parse_length(value: &[u8]) -> Result<u64, Malformed> {
    // Quoted short and escaped: the controller may send any bytes, any number of them.
    let invalid = || Malformed::ContentLength(codec::shown(value));
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(invalid());
    }
    value.iter().try_fold(0_u64, |length, digit| {
        length
            .checked_mul(10)
            .and_then(|length| length.checked_add(u64::from(digit - b'0')))
            .ok_or_else(invalid)
    })
}

/// Where the charset parameter of the Content-Type `value` is in `head`, when it is text.
fn charset_range(head: &[u8], value: &[u8]) -> Option<std::ops::Range<usize>> {
    let charset = codec::charset_of(std::str::from_utf8(value).ok()?)?;
    // `charset` is a slice of `value`, which is a slice of `head`; checked all the same, so that
    // a change elsewhere can never turn into a slice out of bounds.
    let start = (charset.as_ptr() as usize).checked_sub(head.as_ptr() as usize)?;
    let range = start..start.checked_add(charset.len())?;
    (range.end <= head.len()).then_some(range)
}

// === chunked bodies ===

/// The chunked coding (RFC 9112 §7.1), decoded as its bytes arrive.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, with this many bytes to come.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk, reading trailer lines (ignored) up to the empty line, having read
    /// this many bytes of them.
    Trailers(usize),
    /// The body has ended.
    Done,
}

/// Why a chunked body cannot be decoded.
#[derive(Debug, PartialEq, Eq)]
enum ChunkError {
    /// The data passed the cap.
    TooLarge,
    /// The coding is broken.
    Malformed(Malformed),
}

impl Chunked {
    /// Decodes what it can of `input` into `out`; returns how many bytes of `input` it used.
    fn decode(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<usize, ChunkError> {
        let malformed = |what| ChunkError::Malformed(Malformed::Chunked(what));
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match *self {
                Chunked::Size => {
                    let Some(end) = find_crlf(rest) else {
                        return if rest.len() > MAX_HEAD_BYTES {
                            Err(malformed("a chunk-size line longer than the longest head"))
                        } else {
                            Ok(used)
                        };
                    };
                    let size = parse_chunk_size(&rest[..end])
                        .ok_or(malformed("a chunk-size line that is not hexadecimal"))?;
                    used += end + 2;
                    *self = if size == 0 {
                        Chunked::Trailers(0)
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(remaining) => {
                    if rest.is_empty() {
                        return Ok(used);
                    }
                    let take = usize::try_from(remaining)
                        .map_or(rest.len(), |remaining| remaining.min(rest.len()));
                    if out.len() + take > limit {
                        return Err(ChunkError::TooLarge);
                    }
                    out.extend_from_slice(&rest[..take]);
                    used += take;
                    let remaining = remaining - take as u64;
                    *self = if remaining == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(remaining)
                    };
                }
                Chunked::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(used);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(malformed("chunk data not followed by CRLF"));
                    }
                    used += 2;
                    *self = Chunked::Size;
                }
                Chunked::Trailers(read) => {
                    let Some(end) = find_crlf(rest) else {
                        return if read + rest.len() > MAX_HEAD_BYTES {
                            Err(malformed("trailers longer than the longest head"))
                        } else {
                            Ok(used)
                        };
                    };
                    used += end + 2;
                    *self = if end == 0 {
                        Chunked::Done
                    } else {
                        Chunked::Trailers(read + end + 2)
                    };
                }
                Chunked::Done => return Ok(used),
            }
        }
    }

    /// Whether the last chunk and the trailers have been read.
    fn is_done(self) -> bool {
        self == Chunked::Done
    }
}

/// Where the first CRLF in `bytes` starts.
fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|pair| pair == b"\r\n")
}

/// A chunk-size line: hexadecimal digits, then optionally whitespace and chunk extensions
/// (ignored). `None` when it is anything else or does not fit 64 bits.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line
        .iter()
        .take_while(|byte| byte.is_ascii_hexdigit())
        .count();
    let extensions = line[digits..].trim_ascii_start();
    if digits == 0 || digits > 16 || !(extensions.is_empty() || extensions[0] == b';') {
        return None;
    }
    let digits = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(digits, 16).ok()
}

// === fuzzing ===

/// The invariants `fuzz_api::http1_reply` checks on any bytes: see there.
pub(crate) fn check_reply_bytes(data: &[u8]) {
    if let Ok(Some((length, head))) = parse_head(data) {
        assert!(length <= data.len(), "a head longer than its bytes");
        if let Some(charset) = &head.charset {
            assert!(charset.end <= length, "a charset outside the head");
        }
        assert_eq!(parse_head(&data[..length]), Ok(Some((length, head))));
        // Every shorter cut of a complete head is incomplete, never a different answer.
        let step = (length / 256).max(1);
        for cut in (0..length).step_by(step) {
            assert_eq!(
                parse_head(&data[..cut]),
                Ok(None),
                "cut at {cut} of {length}"
            );
        }
    }
    for limit in [16, usize::MAX] {
        let whole = decode_in_pieces(&[data], limit);
        for cut in [
            1,
            data.len() / 3,
            data.len() / 2,
            data.len().saturating_sub(1),
        ] {
            let (first, second) = data.split_at(cut.min(data.len()));
            assert_eq!(
                decode_in_pieces(&[first, second], limit),
                whole,
                "cut at {cut}"
            );
        }
    }
}

/// Feeds `pieces` to a chunked decoder as a socket would deliver them: what it decoded (only on
/// success: a failure leaves a partial body), whether it ended, and how many bytes it used.
fn decode_in_pieces(pieces: &[&[u8]], limit: usize) -> Result<(Vec<u8>, bool, usize), ChunkError> {
    let mut decoder = Chunked::default();
    let (mut pending, mut out, mut used) = (Vec::new(), Vec::new(), 0);
    for piece in pieces {
        pending.extend_from_slice(piece);
        let consumed = decoder.decode(&pending, &mut out, limit)?;
        assert!(
            consumed <= pending.len(),
            "used more bytes than it was given"
        );
        assert!(out.len() <= limit, "decoded past the cap");
        pending.drain(..consumed);
        used += consumed;
    }
    Ok((out, decoder.is_done(), used))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<(usize, Head)>, Malformed> {
        parse_head(text.as_bytes())
    }

    fn complete(text: &str) -> Head {
        let (length, head) = head(text).unwrap().unwrap();
        assert_eq!(length, text.len());
        head
    }

    #[test]
    fn the_request_is_what_hyper_sent() {
        let head = RequestHead::new(
            "/api/v2/task",
            "127.0.0.1:47999",
            "taskgate/0.1.0",
            "application/xml",
            "application/xml, text/xml",
        );
        let mut out = Vec::new();
        head.write(&mut out, b"e2b88ae1-940a-4b9c-bb8f-e6c1b44aaba7", b"<x/>");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /api/v2/task HTTP/1.1\r\nhost: 127.0.0.1:47999\r\nuser-agent: taskgate/0.1.0\r\n\
             content-type: application/xml\r\naccept: application/xml, text/xml\r\n\
             content-length: 4\r\nx-request-id: e2b88ae1-940a-4b9c-bb8f-e6c1b44aaba7\r\n\r\n<x/>"
        );
    }

    #[test]
    fn heads_are_framed_as_rfc_9112_says() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
                Framing::Length(12),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, CHUNKED\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                Framing::UntilClose,
                false,
            ),
            // Transfer-Encoding wins, but the connection is not trusted with another call.
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 7\r\n\r\n",
                Framing::Chunked,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Framing::UntilClose, false),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n",
                Framing::Length(3),
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 3\r\n\r\n",
                Framing::Length(3),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n",
                Framing::Length(3),
                false,
            ),
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n",
                Framing::Length(0),
                true,
            ),
            ("HTTP/1.1 100 Continue\r\n\r\n", Framing::Length(0), true),
        ];
        for (text, framing, reusable) in cases {
            let head = complete(text);
            assert_eq!(
                (head.framing, head.reusable),
                (framing, reusable),
                "{text:?}"
            );
        }
    }

    #[test]
    fn the_charset_is_found_in_the_head() {
        let text = "HTTP/1.1 200 OK\r\nContent-Type: text/xml; charset=\"ISO-8859-1\"\r\nContent-Length: 0\r\n\r\n";
        let range = complete(text).charset.unwrap();
        assert_eq!(&text[range], "ISO-8859-1");
        assert_eq!(
            complete("HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\n\r\n").charset,
            None
        );
    }

    #[test]
    fn an_incomplete_head_waits_for_more() {
        assert_eq!(head("HTTP/1.1 200 OK\r\nContent-Len").unwrap(), None);
        assert_eq!(head("").unwrap(), None);
    }

    #[test]
    fn heads_that_cannot_be_framed_are_refused_with_their_cause() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 9\r\n\r\n",
                "the reply has two different Content-Lengths, 7 and 9",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 7, 8\r\n\r\n",
                "the reply has two different Content-Lengths, 7 and 8",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: +7\r\n\r\n",
                "the reply's Content-Length '+7' is not a number of bytes",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
                "the reply's Content-Length '99999999999999999999' is not a number of bytes",
            ),
            // What the controller sent is quoted short and escaped, however long or binary.
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\u{ff}2345678901234567890123456789012345\r\n\r\n",
                "the reply's Content-Length '1\\xc3\\xbf23456789012345678901234567890…' is not a \
                 number of bytes",
            ),
            (
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                "the reply is HTTP/1.0 with a Transfer-Encoding",
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                "the reply switches protocols, which the gateway did not ask for",
            ),
            (
                "HTTP/1.1 099 Low\r\n\r\n",
                "the reply head is not valid HTTP/1.1: invalid response status",
            ),
            (
                "garbage\r\n\r\n",
                "the reply head is not valid HTTP/1.1: invalid HTTP version",
            ),
            (
                "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
                "the reply head is not valid HTTP/1.1: invalid header name",
            ),
        ];
        for (text, message) in cases {
            assert_eq!(head(text).unwrap_err().to_string(), message, "{text:?}");
        }
    }

    /// A connection that read a large reply keeps no large buffer once it is idle, and one that
    /// read a reply with bytes after it is not reusable.
    #[tokio::test]
    async fn idle_connections_keep_small_buffers_and_unasked_bytes_end_reuse() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let large = "x".repeat(60_000);
        let replies = [
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{large}",
                large.len()
            ),
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1".to_owned(),
        ];
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            for reply in replies {
                let mut request = [0_u8; 1024];
                let _ = stream.read(&mut request).await.unwrap();
                stream.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let stream = TcpStream::connect(address).await.unwrap();
        let mut connection = Connection::new(Io::Tcp(stream));
        let head = RequestHead::new("/", "localhost", "test", "application/xml", "*/*");

        let answer = connection
            .exchange(&head, b"id", b"<x/>", 65_536)
            .await
            .unwrap();
        assert_eq!(answer.body.unwrap().len(), 60_000);
        assert!(answer.reusable);
        connection.shrink_buffers();
        for buffer in [&connection.request, &connection.read, &connection.body] {
            assert!(
                buffer.capacity() <= KEPT_BUFFER_BYTES,
                "{}",
                buffer.capacity()
            );
        }

        let answer = connection
            .exchange(&head, b"id", b"<x/>", 65_536)
            .await
            .unwrap();
        assert_eq!(answer.body.unwrap(), b"ok");
        assert!(
            !answer.reusable,
            "bytes after the reply left the connection reusable"
        );
        server.await.unwrap();
    }

    fn decode_all(pieces: &[&str], limit: usize) -> Result<(String, usize), ChunkError> {
        let mut decoder = Chunked::default();
        let mut out = Vec::new();
        let mut pending = Vec::new();
        for piece in pieces {
            pending.extend_from_slice(piece.as_bytes());
            let used = decoder.decode(&pending, &mut out, limit)?;
            pending.drain(..used);
        }
        assert!(decoder.is_done(), "not done after {pieces:?}");
        Ok((String::from_utf8(out).unwrap(), pending.len()))
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let body = "5\r\nhello\r\n7;name=value\r\n, world\r\n0\r\nTrailer: x\r\n\r\n";
        assert_eq!(
            decode_all(&[body], 100).unwrap(),
            ("hello, world".to_owned(), 0)
        );
        for split in 0..=body.len() {
            let pieces = [&body[..split], &body[split..]];
            assert_eq!(
                decode_all(&pieces, 100).unwrap().0,
                "hello, world",
                "split at {split}"
            );
        }
        let bytes: Vec<String> = body.chars().map(String::from).collect();
        let bytes: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(decode_all(&bytes, 100).unwrap().0, "hello, world");
        // What follows the body is left for the caller to see.
        assert_eq!(
            decode_all(&["0\r\n\r\nHTTP/1.1"], 100).unwrap(),
            (String::new(), 8)
        );
    }

    #[test]
    fn chunked_bodies_stop_at_the_cap_and_at_broken_coding() {
        assert_eq!(
            decode_all(&["5\r\nhello\r\n0\r\n\r\n"], 4),
            Err(ChunkError::TooLarge)
        );
        assert_eq!(
            decode_all(&["5\r\nhello\r\n0\r\n\r\n"], 5).unwrap().0,
            "hello"
        );
        let malformed = |text: &str| {
            let mut out = Vec::new();
            match Chunked::default().decode(text.as_bytes(), &mut out, 100) {
                Err(ChunkError::Malformed(error)) => error.to_string(),
                other => panic!("{text:?}: {other:?}"),
            }
        };
        assert_eq!(
            malformed("x\r\n"),
            "the reply's chunked body is malformed: a chunk-size line that is not hexadecimal"
        );
        assert_eq!(
            malformed("\r\n"),
            "the reply's chunked body is malformed: a chunk-size line that is not hexadecimal"
        );
        assert_eq!(
            malformed("5 x\r\n"),
            "the reply's chunked body is malformed: a chunk-size line that is not hexadecimal"
        );
        assert_eq!(
            malformed("11111111111111111\r\n"),
            "the reply's chunked body is malformed: a chunk-size line that is not hexadecimal"
        );
        assert_eq!(
            malformed("5\r\nhelloXY"),
            "the reply's chunked body is malformed: chunk data not followed by CRLF"
        );
        let long_line = "5".repeat(MAX_HEAD_BYTES + 1);
        assert_eq!(
            malformed(&long_line),
            "the reply's chunked body is malformed: a chunk-size line longer than the longest head"
        );
    }
}
