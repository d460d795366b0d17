//! Which encoding a body is in, and its text: the Content-Type charset, else the XML
//! declaration's encoding, else UTF-8 (RFC 7303 §8), with a UTF-8 byte-order mark overriding
//! both. UTF-8, ISO-8859-1 and US-ASCII are read; anything else is refused, never guessed at.
//!
//! The first layer of the XML codec: it knows nothing of elements beyond the declaration.

use std::borrow::Cow;

use quick_xml::Reader;
use quick_xml::events::Event;

use super::{DecodeError, shorten};

/// The `charset` parameter of a Content-Type value, unquoted.
pub fn charset_of(content_type: &str) -> Option<&str> {
    content_type.split(';').skip(1).find_map(|parameter| {
        let (name, value) = parameter.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| value.trim().trim_matches('"'))
    })
}

/// Strips the UTF-8 byte-order mark and turns the body into text in the encoding that applies:
/// the Content-Type charset, else the XML declaration's encoding, else UTF-8 (RFC 7303 §8).
pub(super) fn decode_text<'a>(
    body: &'a [u8],
    charset: Option<&str>,
) -> Result<Cow<'a, str>, DecodeError> {
    let (body, had_bom) = strip_bom(body);
    let declared = declared_encoding(body)?;
    let label = if had_bom {
        // A byte-order mark is proof of UTF-8, whatever the labels say.
        "utf-8".to_owned()
    } else {
        charset
            .map(str::to_owned)
            .or(declared)
            .unwrap_or_else(|| "utf-8".to_owned())
    };
    match encoding_named(&label) {
        Some(Encoding::Utf8) => std::str::from_utf8(body)
            .map(Cow::Borrowed)
            .map_err(|error| DecodeError::InvalidEncoding {
                encoding: "UTF-8",
                offset: error.valid_up_to(),
            }),
        Some(Encoding::Latin1) => {
            // ISO-8859-1 maps every byte to the Unicode code point of the same value.
            Ok(Cow::Owned(
                body.iter().map(|&byte| char::from(byte)).collect(),
            ))
        }
        Some(Encoding::Ascii) => match body.iter().position(|byte| !byte.is_ascii()) {
            Some(offset) => Err(DecodeError::InvalidEncoding {
                encoding: "US-ASCII",
                offset,
            }),
            // ASCII is valid UTF-8, so this cannot fail.
            None => Ok(Cow::Borrowed(std::str::from_utf8(body).unwrap_or_default())),
        },
        None => Err(DecodeError::UnsupportedEncoding(shorten(&label))),
    }
}

/// The encodings a body may be in.
#[derive(Clone, Copy)]
pub(super) enum Encoding {
    Utf8,
    Latin1,
    Ascii,
}

/// The encoding a charset or declaration label names, if we read it. Labels are matched trimmed
/// and regardless of ASCII case, without allocating: a charset comes with nearly every reply.
pub(super) fn encoding_named(label: &str) -> Option<Encoding> {
    const LABELS: [(&str, Encoding); 10] = [
        ("utf-8", Encoding::Utf8),
        ("utf8", Encoding::Utf8),
        ("iso-8859-1", Encoding::Latin1),
        ("iso8859-1", Encoding::Latin1),
        ("iso_8859-1", Encoding::Latin1),
        ("latin1", Encoding::Latin1),
        ("latin-1", Encoding::Latin1),
        ("l1", Encoding::Latin1),
        ("us-ascii", Encoding::Ascii),
        ("ascii", Encoding::Ascii),
    ];
    let label = label.trim();
    LABELS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(label))
        .map(|&(_, encoding)| encoding)
}

/// The body without a leading UTF-8 byte-order mark, and whether it had one.
pub(crate) fn strip_bom(body: &[u8]) -> (&[u8], bool) {
    match body.strip_prefix(b"\xEF\xBB\xBF") {
        Some(rest) => (rest, true),
        None => (body, false),
    }
}

/// Reads the `encoding` of a leading XML declaration. The declaration is ASCII in every encoding
/// we accept, so it can be read before the body is decoded.
fn declared_encoding(body: &[u8]) -> Result<Option<String>, DecodeError> {
    const SCAN_LIMIT: usize = 1024;
    if !body.starts_with(b"<?xml") {
        return Ok(None);
    }
    let window = &body[..body.len().min(SCAN_LIMIT)];
    let Some(end) = window.windows(2).position(|pair| pair == b"?>") else {
        return Ok(None);
    };
    let Ok(declaration) = std::str::from_utf8(&window[..end + 2]) else {
        return Ok(None);
    };
    let mut reader = Reader::from_str(declaration);
    match reader.read_event() {
        Ok(Event::Decl(decl)) => match decl.encoding() {
            Some(Ok(encoding)) => Ok(Some(encoding.into_owned())),
            Some(Err(error)) => Err(DecodeError::Malformed {
                position: 0,
                reason: error.to_string(),
            }),
            None => Ok(None),
        },
        // Not a declaration after all (`<?xml-stylesheet …?>`); the parser judges the rest.
        _ => Ok(None),
    }
}
