//! XML: text to a generic [`Element`] tree (read by quick-xml) and back.
//!
//! It never expands entities: a DOCTYPE is an error, and only character references and the five
//! predefined entities are resolved. Text comes from [`charset`](super::charset); whether a
//! tree is a method call or a reply is for [`shape`](super::shape) to say.

use quick_xml::Reader;
use quick_xml::events::Event;

use super::charset::decode_text;
use super::{DecodeError, Element, MAX_DEPTH, MethodCall, Reply, is_xml_whitespace, shorten};

/// Encodes a method call in the documented shape, UTF-8, with the bare `<?xml version="1.0"?>`
/// declaration every vendor example sends.
pub(super) fn encode_method_call(method_call: &MethodCall) -> Vec<u8> {
    encode_document("methodcall", |out| {
        write_element(out, "name", &method_call.name, &[], 1);
        write_element(out, "params", "", &method_call.params, 1);
    })
}

/// Encodes a reply in the documented shape, as the simulated controller sends it.
pub(super) fn encode_reply(reply: &Reply) -> Vec<u8> {
    encode_document("response", |out| match reply {
        Reply::Success(params) => {
            write_element(out, &params.name, &params.text, &params.children, 1);
        }
        Reply::Fault(code) => {
            write_element(out, "fault", "", &[Element::leaf("code", code)], 1);
        }
    })
}

// === XML text to an element tree ===

/// Parses the whole body into its root element, whatever the element names.
pub(super) fn parse_document(body: &[u8], charset: Option<&str>) -> Result<Element, DecodeError> {
    let text = decode_text(body, charset)?;
    let mut reader = Reader::from_str(&text);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut first_event = true;
    loop {
        let event = reader
            .read_event()
            .map_err(|error| DecodeError::Malformed {
                position: reader.error_position(),
                reason: error.to_string(),
            })?;
        let is_first_event = std::mem::replace(&mut first_event, false);
        match event {
            Event::Decl(decl) => {
                if !is_first_event {
                    return Err(DecodeError::Malformed {
                        position: reader.buffer_position(),
                        reason: "an XML declaration is only allowed at the start".to_owned(),
                    });
                }
                let version = decl.version().map_err(|error| DecodeError::Malformed {
                    position: 0,
                    reason: error.to_string(),
                })?;
                if version != "1.0" {
                    return Err(DecodeError::UnsupportedVersion(shorten(&version)));
                }
            }
            Event::DocType(_) => return Err(DecodeError::Doctype),
            Event::Comment(_) | Event::PI(_) => {}
            Event::Start(start) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(DecodeError::TooDeep);
                }
                let name = element_name(start.name().as_ref(), &reader)?;
                check_single_root(&root)?;
                stack.push(Element {
                    name,
                    ..Element::default()
                });
            }
            Event::Empty(start) => {
                let element = Element {
                    name: element_name(start.name().as_ref(), &reader)?,
                    ..Element::default()
                };
                attach(&mut stack, &mut root, element)?;
            }
            Event::End(_) => {
                // quick-xml checks that end names match, so the stack cannot be empty here.
                if let Some(element) = stack.pop() {
                    attach(&mut stack, &mut root, element)?;
                }
            }
            Event::Text(text) => append_text(&mut stack, &root, &text.xml10_content())?,
            Event::CData(cdata) => append_text(&mut stack, &root, &cdata.xml10_content())?,
            Event::GeneralRef(reference) => {
                let resolved = match reference.resolve_char_ref() {
                    Ok(Some(character)) => character.to_string(),
                    Ok(None) => match &*reference {
                        "lt" => "<".to_owned(),
                        "gt" => ">".to_owned(),
                        "amp" => "&".to_owned(),
                        "apos" => "'".to_owned(),
                        "quot" => "\"".to_owned(),
                        other => return Err(DecodeError::UnknownEntity(shorten(other))),
                    },
                    Err(error) => {
                        return Err(DecodeError::Malformed {
                            position: reader.buffer_position(),
                            reason: error.to_string(),
                        });
                    }
                };
                append_text(&mut stack, &root, &resolved)?;
            }
            Event::Eof => {
                return match (root, stack.last()) {
                    (_, Some(open)) => Err(DecodeError::Malformed {
                        position: reader.buffer_position(),
                        reason: format!("<{}> is never closed", open.name),
                    }),
                    (Some(root), None) => Ok(root),
                    (None, None) => Err(DecodeError::Empty),
                };
            }
        }
    }
}

/// An element's name, if it is an XML name (XML 1.0 §2.3, `Name`). quick-xml reads any bytes up
/// to white space, `/` or `>` as a name, so `< />` had an empty one and `<a\0|&/>` a name no
/// XML has; the encoder could not write either back. Both are not well-formed XML (found by
/// fuzzing `xml_reply`, issue 11).
fn element_name(name: &str, reader: &Reader<&[u8]>) -> Result<String, DecodeError> {
    let mut characters = name.chars();
    let is_name = characters.next().is_some_and(is_name_start)
        && characters.all(|character| {
            is_name_start(character)
                || matches!(character, '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}')
        });
    if !is_name {
        return Err(DecodeError::Malformed {
            position: reader.buffer_position(),
            reason: format!("'{}' is not an element name", shorten(name)),
        });
    }
    Ok(name.to_owned())
}

/// XML 1.0's `NameStartChar`.
fn is_name_start(character: char) -> bool {
    matches!(character,
        ':' | 'A'..='Z' | '_' | 'a'..='z' | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}'
        | '\u{F8}'..='\u{2FF}' | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}'
        | '\u{200C}'..='\u{200D}' | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}'
        | '\u{3001}'..='\u{D7FF}' | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}'
        | '\u{10000}'..='\u{EFFFF}')
}

fn check_single_root(root: &Option<Element>) -> Result<(), DecodeError> {
    match root {
        Some(root) => Err(DecodeError::OutsideRoot {
            root: shorten(&root.name),
        }),
        None => Ok(()),
    }
}

fn attach(
    stack: &mut [Element],
    root: &mut Option<Element>,
    element: Element,
) -> Result<(), DecodeError> {
    match stack.last_mut() {
        Some(parent) => parent.children.push(element),
        None => {
            check_single_root(root)?;
            *root = Some(element);
        }
    }
    Ok(())
}

fn append_text(
    stack: &mut [Element],
    root: &Option<Element>,
    text: &str,
) -> Result<(), DecodeError> {
    match stack.last_mut() {
        Some(element) => element.text.push_str(text),
        None if text.chars().all(is_xml_whitespace) => {}
        None => {
            return Err(match root {
                Some(root) => DecodeError::OutsideRoot {
                    root: shorten(&root.name),
                },
                None => DecodeError::Malformed {
                    position: 0,
                    reason: format!("text '{}' before the root element", shorten(text)),
                },
            });
        }
    }
    Ok(())
}

// === an element tree to XML text ===

/// The declaration every encoded document starts with.
const DECLARATION: &[u8] = b"<?xml version=\"1.0\"?>\n";

const INDENT_WIDTH: usize = 2;

/// Writes the declaration and a root element named `root` around what `children` writes,
/// indented by two spaces a level, as the vendor's examples are.
fn encode_document(root: &str, children: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(DECLARATION);
    write_tag(&mut out, b"<", root, b">\n");
    children(&mut out);
    write_tag(&mut out, b"</", root, b">\n");
    out
}

/// Writes one element at `depth`, from its parts, so that a caller need not build an
/// [`Element`] (and copy what it holds) to write one.
fn write_element(out: &mut Vec<u8>, name: &str, text: &str, children: &[Element], depth: usize) {
    out.resize(out.len() + INDENT_WIDTH * depth, b' ');
    if children.is_empty() && text.is_empty() {
        write_tag(out, b"<", name, b"/>\n");
        return;
    }
    write_tag(out, b"<", name, b">");
    if children.is_empty() {
        write_escaped(out, text);
    } else {
        out.push(b'\n');
        for child in children {
            write_element(out, &child.name, &child.text, &child.children, depth + 1);
        }
        out.resize(out.len() + INDENT_WIDTH * depth, b' ');
    }
    write_tag(out, b"</", name, b">\n");
}

fn write_tag(out: &mut Vec<u8>, open: &[u8], name: &str, close: &[u8]) {
    out.extend_from_slice(open);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(close);
}

/// Writes text with the escapes of `quick_xml::escape::escape`, which the wire format was first
/// written with: the five markup characters, and `\r`, which a reader's end-of-line handling
/// would otherwise turn into `\n`.
fn write_escaped(out: &mut Vec<u8>, text: &str) {
    for byte in text.bytes() {
        // All six are ASCII, so they never occur inside a multi-byte UTF-8 sequence.
        let escaped: &[u8] = match byte {
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'&' => b"&amp;",
            b'\'' => b"&apos;",
            b'"' => b"&quot;",
            b'\r' => b"&#13;",
            _ => {
                out.push(byte);
                continue;
            }
        };
        out.extend_from_slice(escaped);
    }
}
