//! The XML codec: task-interface bytes to and from [`MethodCall`] and [`Reply`], for both sides
//! of the wire (the gateway encodes calls and decodes replies, the simulator does the opposite).
//!
//! It accepts UTF-8 and ISO-8859-1, with or without an XML declaration, and any whitespace. It
//! never expands entities: a DOCTYPE is an error, and only character references and the five
//! predefined entities are resolved. It does no I/O; whoever reads the body caps its size (see
//! [`DEFAULT_MAX_BODY_BYTES`]) before handing it here.
//!
//! Both directions sit on every call's path (`cargo bench` measures them). Encoding writes bytes
//! straight into one exactly sized buffer; decoding recognises the two common replies from their
//! bytes and hands anything else to the full parser, which gives the same answer.

use std::borrow::Cow;

use quick_xml::Reader;
use quick_xml::events::Event;

/// The default cap on a request or response body: task-interface messages are a few hundred
/// bytes, so anything near this is not a reply we understand.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// Valid `port_id` values on every task-interface method.
pub const PORT_ID_RANGE: std::ops::RangeInclusive<u32> = 1..=2000;
/// Valid `bin_id` values on every task-interface method.
pub const BIN_ID_RANGE: std::ops::RangeInclusive<u32> = 1..=4_000_000;

/// A method call on the task interface: `<methodcall><name>…</name><params>…</params></methodcall>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodCall {
    /// The method name, for example `case_extract`.
    pub name: String,
    /// The children of `<params>`, in document order.
    pub params: Vec<Element>,
}

/// A method call to send, borrowed: its name and named integer parameters, the shape of every
/// task-interface command. Encoding one allocates nothing but the output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call<'a> {
    /// The method name, for example `case_extract`.
    pub method: &'a str,
    /// The parameters, in document order.
    pub params: &'a [(&'a str, u32)],
}

/// What the controller answered, decided from the body alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `<response><params…/></response>`: the call succeeded; holds the `<params>` element.
    Success(Element),
    /// `<response><fault><code>N</code></fault></response>`: the controller refused with code N.
    Fault(u32),
}

/// One XML element, reduced to what the task interface uses: a name, text and child elements.
/// Attributes are not part of the interface and are dropped.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// The element name as written, for example `port_id`.
    pub name: String,
    /// The element's text with references resolved; whitespace is kept as sent.
    pub text: String,
    /// Child elements in document order.
    pub children: Vec<Element>,
}

/// Why a body is not a valid task-interface message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body is empty or holds only whitespace, comments and a declaration.
    #[error("the body holds no XML element")]
    Empty,
    /// The encoding named in the Content-Type or the XML declaration is not one we read.
    #[error("unsupported encoding '{0}' (expected UTF-8 or ISO-8859-1)")]
    UnsupportedEncoding(String),
    /// The bytes are not valid in the encoding that applies.
    #[error("the body is not valid {encoding} at byte {offset}")]
    InvalidEncoding {
        /// The encoding the body was read as.
        encoding: &'static str,
        /// The offset of the first bad byte.
        offset: usize,
    },
    /// The XML declaration names a version other than 1.0.
    #[error("unsupported XML version '{0}' (expected 1.0)")]
    UnsupportedVersion(String),
    /// The body is not well-formed XML.
    #[error("malformed XML at byte {position}: {reason}")]
    Malformed {
        /// Where the parser stopped.
        position: u64,
        /// What the parser said.
        reason: String,
    },
    /// The body has a DOCTYPE; it could declare entities, which we never expand.
    #[error("a DOCTYPE is not allowed (entity declarations are never expanded)")]
    Doctype,
    /// An entity reference other than a character reference or `lt`, `gt`, `amp`, `apos`, `quot`.
    #[error(
        "unknown entity '&{0};' (only character references and the five XML entities are allowed)"
    )]
    UnknownEntity(String),
    /// Elements nest deeper than any task-interface message does.
    #[error("elements nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// Text or a second element outside the root element.
    #[error("unexpected content outside the root element <{root}>")]
    OutsideRoot {
        /// The root element's name.
        root: String,
    },
    /// The root element is not the one this message must have.
    #[error("expected root element <{expected}>, found <{found}>")]
    UnexpectedRoot {
        /// The root the message must have.
        expected: &'static str,
        /// The root the body has.
        found: String,
    },
    /// A required child element is missing.
    #[error("<{parent}> has no <{name}>")]
    MissingElement {
        /// The element that should hold it.
        parent: String,
        /// The missing child.
        name: &'static str,
    },
    /// A child element this message does not allow.
    #[error("unexpected element <{name}> in <{parent}>")]
    UnexpectedElement {
        /// The element that holds it.
        parent: String,
        /// The unexpected child.
        name: String,
    },
    /// A child element that may appear only once appears again.
    #[error("<{parent}> has more than one <{name}>")]
    DuplicateElement {
        /// The element that holds it.
        parent: String,
        /// The repeated child.
        name: String,
    },
    /// A response with both `<params>` and `<fault>`: neither success nor failure can be trusted.
    #[error("<response> has both <params> and <fault>")]
    ParamsAndFault,
    /// Non-whitespace text where only child elements may appear.
    #[error("unexpected text '{text}' in <{element}>")]
    UnexpectedText {
        /// The element holding the text.
        element: String,
        /// The text, shortened.
        text: String,
    },
    /// An element that must hold a non-negative decimal integer holds something else.
    #[error("<{element}> holds '{text}', not a non-negative integer")]
    InvalidInteger {
        /// The element.
        element: String,
        /// The text, shortened.
        text: String,
    },
}

/// Elements deeper than this are refused; the deepest documented message nests five levels.
pub const MAX_DEPTH: usize = 32;

/// How method calls and replies are written on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireFormat {
    /// The documented XML format.
    #[default]
    Xml,
    /// The JSON variant: `{"method":…,"params":{…}}` and `{"params":{}}` / `{"fault":{"code":N}}`,
    /// with or without a top-level `response` wrapper.
    Json,
}

/// Decodes a controller reply. `charset` is the Content-Type charset parameter, if any.
pub fn decode_reply(body: &[u8], charset: Option<&str>) -> Result<Reply, DecodeError> {
    match common_reply(body, charset) {
        Some(reply) => Ok(reply),
        None => parse_reply(body, charset),
    }
}

/// Decodes a reply with the full parser, skipping the shortcut for common replies: what
/// [`decode_reply`] does for any other reply, and the baseline its shortcut is measured against.
pub(crate) fn parse_reply(body: &[u8], charset: Option<&str>) -> Result<Reply, DecodeError> {
    reply_from_response(&parse_document(body, charset)?)
}

/// Decodes a method call, as the simulated controller receives it.
pub fn decode_method_call(body: &[u8], charset: Option<&str>) -> Result<MethodCall, DecodeError> {
    method_call_from_element(&parse_document(body, charset)?)
}

/// The checks every reply passes, whichever format it came in.
fn reply_from_response(response: &Element) -> Result<Reply, DecodeError> {
    expect_root(response, "response")?;
    expect_no_text(response)?;
    let [params, fault] = distinct_children(response, ["params", "fault"])?;
    match (params, fault) {
        (Some(params), None) => {
            expect_no_text(params)?;
            Ok(Reply::Success(params.clone()))
        }
        (None, Some(fault)) => {
            expect_no_text(fault)?;
            let [code] = distinct_children(fault, ["code"])?;
            let code = code.ok_or_else(|| missing(fault, "code"))?;
            Ok(Reply::Fault(parse_integer(code)?))
        }
        (Some(_), Some(_)) => Err(DecodeError::ParamsAndFault),
        (None, None) => Err(missing(response, "params")),
    }
}

/// The checks every method call passes, whichever format it came in.
fn method_call_from_element(methodcall: &Element) -> Result<MethodCall, DecodeError> {
    expect_root(methodcall, "methodcall")?;
    expect_no_text(methodcall)?;
    let [name, params] = distinct_children(methodcall, ["name", "params"])?;
    let name = name.ok_or_else(|| missing(methodcall, "name"))?;
    if let Some(child) = name.children.first() {
        return Err(unexpected_element(name, child));
    }
    let params = params.ok_or_else(|| missing(methodcall, "params"))?;
    expect_no_text(params)?;
    Ok(MethodCall {
        name: name.text.trim().to_owned(),
        params: params.children.clone(),
    })
}

/// Encodes a method call in the documented shape, UTF-8, with the bare `<?xml version="1.0"?>`
/// declaration every vendor example sends.
pub fn encode_method_call(method_call: &MethodCall) -> Vec<u8> {
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

/// Encodes a call to the same bytes as [`encode_method_call`] of the equivalent [`MethodCall`],
/// from a template of the call's shape made once per thread (`codec/template.rs`).
pub fn encode_call(call: &Call<'_>) -> Vec<u8> {
    template::encode_call(call).unwrap_or_else(|| encode_call_from_scratch(call))
}

/// [`encode_call`] without a template: the baseline the templates are measured and checked
/// against.
pub(crate) fn encode_call_from_scratch(call: &Call<'_>) -> Vec<u8> {
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
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
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

/// Reads an element's text as a non-negative decimal integer, allowing surrounding whitespace.
pub fn parse_integer(element: &Element) -> Result<u32, DecodeError> {
    let invalid = || DecodeError::InvalidInteger {
        element: element.name.clone(),
        text: shorten(&element.text),
    };
    if let Some(child) = element.children.first() {
        return Err(unexpected_element(element, child));
    }
    let digits = element.text.trim_matches(is_xml_whitespace);
    // `u32::from_str` would also take a leading `+`, which no controller sends.
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(invalid());
    }
    digits.parse().map_err(|_| invalid())
}

/// The `charset` parameter of a Content-Type value, unquoted.
pub fn charset_of(content_type: &str) -> Option<&str> {
    content_type.split(';').skip(1).find_map(|parameter| {
        let (name, value) = parameter.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| value.trim().trim_matches('"'))
    })
}

// === impl WireFormat ===

impl WireFormat {
    /// The Content-Type a body in this format is sent with.
    pub fn content_type(self) -> &'static str {
        match self {
            WireFormat::Xml => "application/xml",
            WireFormat::Json => "application/json",
        }
    }

    /// The Accept header for replies in this format.
    pub fn accept(self) -> &'static str {
        match self {
            WireFormat::Xml => "application/xml, text/xml",
            WireFormat::Json => "application/json",
        }
    }

    /// The format a Content-Type names: JSON for any `…json` type, else XML, the documented one.
    pub fn from_content_type(content_type: Option<&str>) -> Self {
        let essence = content_type
            .and_then(|value| value.split(';').next())
            .map(|essence| essence.trim().to_ascii_lowercase());
        match essence {
            Some(essence) if essence.ends_with("json") => WireFormat::Json,
            _ => WireFormat::Xml,
        }
    }

    /// Encodes a method call.
    pub fn encode_method_call(self, method_call: &MethodCall) -> Vec<u8> {
        match self {
            WireFormat::Xml => encode_method_call(method_call),
            WireFormat::Json => json::encode_method_call(method_call),
        }
    }

    /// Encodes a call.
    pub fn encode_call(self, call: &Call<'_>) -> Vec<u8> {
        match self {
            WireFormat::Xml => encode_call(call),
            // Not the hot path: the tree the JSON encoder takes is built first.
            WireFormat::Json => json::encode_method_call(&MethodCall::from(call)),
        }
    }

    /// Decodes a reply.
    pub fn decode_reply(self, body: &[u8], charset: Option<&str>) -> Result<Reply, DecodeError> {
        match self {
            WireFormat::Xml => decode_reply(body, charset),
            WireFormat::Json => reply_from_response(&json::response_root(body, charset)?),
        }
    }

    /// Decodes a method call.
    pub fn decode_method_call(
        self,
        body: &[u8],
        charset: Option<&str>,
    ) -> Result<MethodCall, DecodeError> {
        match self {
            WireFormat::Xml => decode_method_call(body, charset),
            WireFormat::Json => method_call_from_element(&json::methodcall_root(body, charset)?),
        }
    }

    /// Encodes a reply.
    pub fn encode_reply(self, reply: &Reply) -> Vec<u8> {
        match self {
            WireFormat::Xml => encode_reply(reply),
            WireFormat::Json => json::encode_reply(reply),
        }
    }
}

// === impl MethodCall ===

impl MethodCall {
    /// A call with no parameters yet.
    pub fn new(name: &str) -> Self {
        MethodCall {
            name: name.to_owned(),
            params: Vec::new(),
        }
    }

    /// Adds a parameter holding `value`'s text.
    pub fn with_param(mut self, name: &str, value: impl ToString) -> Self {
        self.params.push(Element::leaf(name, value));
        self
    }

    /// The parameters named `name`, in document order.
    pub fn params_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.params.iter().filter(move |param| param.name == name)
    }
}

impl From<&Call<'_>> for MethodCall {
    fn from(call: &Call<'_>) -> Self {
        let mut digits = itoa::Buffer::new();
        MethodCall {
            name: call.method.to_owned(),
            params: call
                .params
                .iter()
                .map(|(name, value)| Element::leaf(name, digits.format(*value)))
                .collect(),
        }
    }
}

// === impl Reply ===

impl Reply {
    /// A success with empty `<params/>`, the reply of methods without response parameters.
    pub fn empty_success() -> Self {
        Reply::Success(Element {
            name: "params".to_owned(),
            ..Element::default()
        })
    }
}

// === impl Element ===

impl Element {
    /// An element with text and no children.
    pub fn leaf(name: &str, text: impl ToString) -> Self {
        Element {
            name: name.to_owned(),
            text: text.to_string(),
            children: Vec::new(),
        }
    }
}

/// Strips the UTF-8 byte-order mark and turns the body into text in the encoding that applies:
/// the Content-Type charset, else the XML declaration's encoding, else UTF-8 (RFC 7303 §8).
fn decode_text<'a>(body: &'a [u8], charset: Option<&str>) -> Result<Cow<'a, str>, DecodeError> {
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
enum Encoding {
    Utf8,
    Latin1,
    Ascii,
}

/// The encoding a charset or declaration label names, if we read it. Labels are matched trimmed
/// and regardless of ASCII case, without allocating: a charset comes with nearly every reply.
fn encoding_named(label: &str) -> Option<Encoding> {
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
fn strip_bom(body: &[u8]) -> (&[u8], bool) {
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

/// Parses the whole body into its root element.
fn parse_document(body: &[u8], charset: Option<&str>) -> Result<Element, DecodeError> {
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
                let name = start.name().as_ref().to_owned();
                check_single_root(&root)?;
                stack.push(Element {
                    name,
                    ..Element::default()
                });
            }
            Event::Empty(start) => {
                let element = Element {
                    name: start.name().as_ref().to_owned(),
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

/// Recognises the two replies nearly every call gets, empty `<params>` and a fault code, straight
/// from the bytes: between XML whitespace, after an optional byte-order mark and one of the two
/// declarations controllers send. It decodes no text and builds no events or element tree.
///
/// `None` means "not one of those", never "invalid": [`parse_reply`] then decides, so every
/// answer is the full parser's (a unit test compares the two on thousands of variants).
fn common_reply(body: &[u8], charset: Option<&str>) -> Option<Reply> {
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

/// The value of ASCII digits as [`parse_integer`] reads them; `None` if there are none or the
/// value does not fit a `u32`.
fn decimal(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0_u32, |value, &digit| {
        value.checked_mul(10)?.checked_add(u32::from(digit - b'0'))
    })
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

fn expect_root(element: &Element, expected: &'static str) -> Result<(), DecodeError> {
    if element.name == expected {
        Ok(())
    } else {
        Err(DecodeError::UnexpectedRoot {
            expected,
            found: shorten(&element.name),
        })
    }
}

fn expect_no_text(element: &Element) -> Result<(), DecodeError> {
    if element.text.chars().all(is_xml_whitespace) {
        Ok(())
    } else {
        Err(DecodeError::UnexpectedText {
            element: element.name.clone(),
            text: shorten(element.text.trim_matches(is_xml_whitespace)),
        })
    }
}

/// The children of `parent` with the given names, each at most once; any other child is an error.
fn distinct_children<'a, const N: usize>(
    parent: &'a Element,
    names: [&'static str; N],
) -> Result<[Option<&'a Element>; N], DecodeError> {
    let mut found = [None; N];
    for child in &parent.children {
        let Some(index) = names.iter().position(|name| *name == child.name) else {
            return Err(unexpected_element(parent, child));
        };
        if found[index].replace(child).is_some() {
            return Err(DecodeError::DuplicateElement {
                parent: parent.name.clone(),
                name: child.name.clone(),
            });
        }
    }
    Ok(found)
}

fn missing(parent: &Element, name: &'static str) -> DecodeError {
    DecodeError::MissingElement {
        parent: parent.name.clone(),
        name,
    }
}

fn unexpected_element(parent: &Element, child: &Element) -> DecodeError {
    DecodeError::UnexpectedElement {
        parent: parent.name.clone(),
        name: shorten(&child.name),
    }
}

fn is_xml_whitespace(character: char) -> bool {
    matches!(character, ' ' | '\t' | '\r' | '\n')
}

/// Keeps peer-controlled text in error messages short enough to log.
fn shorten(text: &str) -> String {
    const LIMIT: usize = 40;
    match text.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

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

mod json;
mod template;

#[cfg(test)]
mod tests;
