//! XML: text to a generic [`Element`] tree and back, plus the fast path that recognises the two
//! common replies straight from their bytes.
//!
//! It never expands entities: a DOCTYPE is an error, and only character references and the five
//! predefined entities are resolved. Text comes from [`charset`](super::charset); whether a
//! tree is a method call or a reply is for [`shape`](super::shape) to say.

use quick_xml::Reader;
use quick_xml::events::Event;

use super::charset::{decode_text, encoding_named, strip_bom};
use super::{Call, DecodeError, Element, MAX_DEPTH, MethodCall, Reply, is_xml_whitespace, shorten};

/// Encodes a method call in the documented shape, UTF-8, with the bare `<?xml version="1.0"?>`
/// declaration every vendor example sends.
pub(super) fn encode_method_call(method_call: &MethodCall) -> Vec<u8> {
    encode_document(
        "methodcall",
        &[
            Node::leaf("name", &method_call.name),
            Node {
                name: "params",
                text: "",
                children: Children::Elements(&method_call.params),
            },
        ],
    )
}

/// Encodes a call to the same bytes as [`encode_method_call`] of the equivalent [`MethodCall`].
pub(super) fn encode_call(call: &Call<'_>) -> Vec<u8> {
    encode_document(
        "methodcall",
        &[
            Node::leaf("name", call.method),
            Node {
                name: "params",
                text: "",
                children: Children::Integers(call.params),
            },
        ],
    )
}

/// Encodes a reply in the documented shape, as the simulated controller sends it.
pub(super) fn encode_reply(reply: &Reply) -> Vec<u8> {
    match reply {
        Reply::Success(params) => encode_document("response", &[Node::from(params)]),
        Reply::Fault(code) => {
            let fault = Node {
                name: "fault",
                text: "",
                children: Children::Integers(&[("code", *code)]),
            };
            encode_document("response", &[fault])
        }
    }
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
            root: root.name.clone(),
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
                    root: root.name.clone(),
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

// === the fast path for common replies ===

/// Recognises the two replies nearly every call gets, empty `<params>` and a fault code, straight
/// from the bytes: between XML whitespace, after an optional byte-order mark and one of the two
/// declarations controllers send. It decodes no text and builds no events or element tree.
///
/// `None` means "not one of those", never "invalid": [`parse_reply`](super::parse_reply) then decides, so every
/// answer is the full parser's (a unit test compares the two on thousands of variants).
pub(super) fn common_reply(body: &[u8], charset: Option<&str>) -> Option<Reply> {
    const DECLARATIONS: [&[u8]; 2] = [
        b"<?xml version=\"1.0\"?>",
        b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>",
    ];
    let (body, had_bom) = strip_bom(body);
    // An unsupported charset is refused first, unless a byte-order mark overrides it, as in
    // `decode_text`. Past that the encoding does not matter: the shapes below are all ASCII.
    if !had_bom && charset.is_some_and(|label| encoding_named(label).is_none()) {
        return None;
    }
    let body = DECLARATIONS
        .iter()
        .find_map(|declaration| body.strip_prefix(*declaration))
        .unwrap_or(body);
    let mut cursor = Cursor(body);
    cursor.whitespace();
    cursor.eat(b"<response>")?;
    cursor.whitespace();
    let reply = if cursor.eat(b"<params/>").is_some() {
        Reply::empty_success()
    } else if cursor.eat(b"<params>").is_some() {
        let text = cursor.whitespace();
        cursor.eat(b"</params>")?;
        Reply::Success(Element {
            name: "params".to_owned(),
            text: normalize_line_ends(text),
            children: Vec::new(),
        })
    } else {
        cursor.eat(b"<fault>")?;
        cursor.whitespace();
        cursor.eat(b"<code>")?;
        cursor.whitespace();
        let code = decimal(cursor.take_while(|byte| byte.is_ascii_digit()))?;
        cursor.whitespace();
        cursor.eat(b"</code>")?;
        cursor.whitespace();
        cursor.eat(b"</fault>")?;
        Reply::Fault(code)
    };
    cursor.whitespace();
    cursor.eat(b"</response>")?;
    cursor.whitespace();
    cursor.0.is_empty().then_some(reply)
}

/// The unread rest of a body that [`common_reply`] matches byte for byte.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    /// Consumes `expected` if the rest starts with it.
    fn eat(&mut self, expected: &[u8]) -> Option<()> {
        self.0 = self.0.strip_prefix(expected)?;
        Some(())
    }

    /// Consumes and returns the longest run of bytes that `keep` accepts.
    fn take_while(&mut self, keep: impl Fn(u8) -> bool) -> &'a [u8] {
        let end = self
            .0
            .iter()
            .position(|&byte| !keep(byte))
            .unwrap_or(self.0.len());
        let (taken, rest) = self.0.split_at(end);
        self.0 = rest;
        taken
    }

    fn whitespace(&mut self) -> &'a [u8] {
        self.take_while(|byte| is_xml_whitespace(char::from(byte)))
    }
}

/// XML end-of-line handling, as the full parser applies it to text: `\r\n` and a lone `\r` are
/// both read as `\n`.
fn normalize_line_ends(whitespace: &[u8]) -> String {
    let mut text = String::with_capacity(whitespace.len());
    let mut bytes = whitespace.iter().peekable();
    while let Some(&byte) = bytes.next() {
        if byte == b'\r' {
            bytes.next_if_eq(&&b'\n');
            text.push('\n');
        } else {
            text.push(char::from(byte));
        }
    }
    text
}

/// The value of ASCII digits as [`parse_integer`](super::parse_integer) reads them; `None` if there are none or the
/// value does not fit a `u32`.
fn decimal(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0_u32, |value, &digit| {
        value.checked_mul(10)?.checked_add(u32::from(digit - b'0'))
    })
}

// === an element tree to XML text ===

/// The declaration every encoded document starts with.
const DECLARATION: &[u8] = b"<?xml version=\"1.0\"?>\n";

/// An element to encode, borrowed, so that the `<methodcall>` or `<response>` envelope can wrap
/// the caller's elements without copying them.
#[derive(Clone, Copy)]
struct Node<'a> {
    name: &'a str,
    text: &'a str,
    children: Children<'a>,
}

/// An element's children: elements of a tree, or the integer parameters of a [`Call`], each
/// written as a leaf holding the number in decimal.
#[derive(Clone, Copy)]
enum Children<'a> {
    Elements(&'a [Element]),
    Integers(&'a [(&'a str, u32)]),
}

impl Children<'_> {
    fn is_empty(self) -> bool {
        match self {
            Children::Elements(elements) => elements.is_empty(),
            Children::Integers(integers) => integers.is_empty(),
        }
    }
}

impl<'a> Node<'a> {
    fn leaf(name: &'a str, text: &'a str) -> Self {
        Node {
            name,
            text,
            children: Children::Elements(&[]),
        }
    }
}

impl<'a> From<&'a Element> for Node<'a> {
    fn from(element: &'a Element) -> Self {
        Node {
            name: &element.name,
            text: &element.text,
            children: Children::Elements(&element.children),
        }
    }
}

/// Where the encoder writes: the output buffer, or a counter that sizes that buffer first. One
/// writer drives both, so the size cannot drift from what is written.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
    fn indent(&mut self, depth: usize);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }

    fn indent(&mut self, depth: usize) {
        self.resize(self.len() + INDENT_WIDTH * depth, b' ');
    }
}

/// Counts the bytes a document will take.
struct Length(usize);

impl Sink for Length {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }

    fn indent(&mut self, depth: usize) {
        self.0 += INDENT_WIDTH * depth;
    }
}

const INDENT_WIDTH: usize = 2;

/// Writes the declaration and a root holding `children`, into a buffer of exactly the right size.
fn encode_document(root: &str, children: &[Node<'_>]) -> Vec<u8> {
    thread_local! {
        /// Where a thread writes documents before copying each out at its exact size: one pass
        /// over the tree instead of one to size the buffer and one to fill it.
        static DOCUMENT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    DOCUMENT.with(|document| match document.try_borrow_mut() {
        Ok(mut document) => {
            document.clear();
            write_document(&mut *document, root, children);
            document.to_vec()
        }
        Err(_) => {
            let mut length = Length(0);
            write_document(&mut length, root, children);
            let mut out = Vec::with_capacity(length.0);
            write_document(&mut out, root, children);
            out
        }
    })
}

fn write_document(sink: &mut impl Sink, root: &str, children: &[Node<'_>]) {
    sink.put(DECLARATION);
    write_tag(sink, b"<", root, b">\n");
    for child in children {
        write_node(sink, *child, 1);
    }
    write_tag(sink, b"</", root, b">\n");
}

fn write_node(sink: &mut impl Sink, node: Node<'_>, depth: usize) {
    sink.indent(depth);
    if node.children.is_empty() && node.text.is_empty() {
        write_tag(sink, b"<", node.name, b"/>\n");
        return;
    }
    write_tag(sink, b"<", node.name, b">");
    if node.children.is_empty() {
        write_escaped(sink, node.text);
    } else {
        sink.put(b"\n");
        match node.children {
            Children::Elements(children) => {
                for child in children {
                    write_node(sink, child.into(), depth + 1);
                }
            }
            Children::Integers(integers) => {
                let mut digits = itoa::Buffer::new();
                for (name, value) in integers {
                    write_node(sink, Node::leaf(name, digits.format(*value)), depth + 1);
                }
            }
        }
        sink.indent(depth);
    }
    write_tag(sink, b"</", node.name, b">\n");
}

fn write_tag(sink: &mut impl Sink, open: &[u8], name: &str, close: &[u8]) {
    sink.put(open);
    sink.put(name.as_bytes());
    sink.put(close);
}

/// Writes text with the escapes of `quick_xml::escape::escape`, which the wire format was first
/// written with: the five markup characters, and `\r`, which a reader's end-of-line handling
/// would otherwise turn into `\n`. Runs without any of them are copied in one go.
fn write_escaped(sink: &mut impl Sink, text: &str) {
    let bytes = text.as_bytes();
    let mut run_start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        // All six are ASCII, so they never occur inside a multi-byte UTF-8 sequence.
        let escaped: &[u8] = match byte {
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'&' => b"&amp;",
            b'\'' => b"&apos;",
            b'"' => b"&quot;",
            b'\r' => b"&#13;",
            _ => continue,
        };
        sink.put(&bytes[run_start..index]);
        sink.put(escaped);
        run_start = index + 1;
    }
    sink.put(&bytes[run_start..]);
}
