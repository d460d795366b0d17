//! The codec: task-interface bytes to and from [`MethodCall`] and [`Reply`], for both sides of
//! the wire (the gateway encodes calls and decodes replies, the simulator does the opposite), in
//! either [`WireFormat`]. The methods of [`WireFormat`] are its entry points.
//!
//! It is built in layers, one file each:
//!
//! - `charset`: which encoding a body is in and its text (UTF-8, ISO-8859-1, US-ASCII).
//! - `xml`: XML text to a generic [`Element`] tree and back; never expands entities (a DOCTYPE
//!   is an error).
//! - `json`: the JSON variant, read into the same trees.
//! - `shape`: which trees are a method call or a reply: the checks both formats pass.
//! - `case_state`: the data of a `case_getstate` reply, typed ([`CaseStateReply`]).
//!
//! It accepts any whitespace, and XML with or without a declaration. It does no I/O; whoever
//! reads the body caps its size (see [`DEFAULT_MAX_BODY_BYTES`]) before handing it here.
//!
//! Every call is written by the one encoder and every reply read by quick-xml (or serde_json):
//! there is no second, faster path that could answer differently. `cargo bench` measures both.

mod case_state;
mod charset;
mod json;
mod shape;
mod xml;

pub use case_state::CaseStateReply;
pub use charset::charset_of;
pub(crate) use charset::strip_bom;
pub use shape::parse_integer;

/// The default cap on a request or response body: task-interface messages are a few hundred
/// bytes, so anything near this is not a reply we understand.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// A method call on the task interface: `<methodcall><name>…</name><params>…</params></methodcall>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodCall {
    /// The method name, for example `case_extract`.
    pub name: String,
    /// The children of `<params>`, in document order.
    pub params: Vec<Element>,
}

/// A method call to send, borrowed: its name and named integer parameters, the shape of every
/// task-interface command.
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
    /// An integer outside the range the task interface allows for the element.
    #[error("<{element}> holds {value}, outside {min}-{max}")]
    OutOfRange {
        /// The element.
        element: String,
        /// The value it holds.
        value: u32,
        /// The smallest value allowed.
        min: u32,
        /// The largest value allowed.
        max: u32,
    },
    /// A reply about another port than the one the call asked about.
    #[error("<port_id> holds {answered}, but the call asked about port {asked}")]
    OtherPort {
        /// The port the call asked about.
        asked: u32,
        /// The port the reply is about.
        answered: u32,
    },
    /// A `<case_state>` that holds no AutoCase state code.
    #[error(
        "<case_state> holds '{0}', not one of NOOP, EREQ, ERSO, ECMP, IREQ, IRTR, ICRC, ICIN or ICMP"
    )]
    UnknownCaseState(String),
    /// An element that must hold a non-negative decimal integer holds something else, or one
    /// too large for any task-interface value.
    #[error("<{element}> holds '{text}', not an integer from 0 to {}", u32::MAX)]
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

/// A header value as an error message may quote it: escaped to ASCII and cut short, since it
/// came from a peer: a caller's `grpc-timeout`, a controller's Content-Length.
pub(crate) fn shown(bytes: &[u8]) -> String {
    const MAX_SHOWN: usize = 32;
    let mut text = bytes[..bytes.len().min(MAX_SHOWN)]
        .escape_ascii()
        .to_string();
    if bytes.len() > MAX_SHOWN {
        text.push('…');
    }
    text
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

    /// Encodes a method call. XML is written in UTF-8 with the bare `<?xml version="1.0"?>`
    /// declaration every vendor example sends.
    pub fn encode_method_call(self, method_call: &MethodCall) -> Vec<u8> {
        match self {
            WireFormat::Xml => xml::encode_method_call(method_call),
            WireFormat::Json => json::encode_method_call(method_call),
        }
    }

    /// Encodes a call: the bytes of [`WireFormat::encode_method_call`] of the equivalent
    /// [`MethodCall`].
    pub fn encode_call(self, call: &Call<'_>) -> Vec<u8> {
        self.encode_method_call(&MethodCall::from(call))
    }

    /// Decodes a controller reply. `charset` is the Content-Type charset parameter, if any.
    pub fn decode_reply(self, body: &[u8], charset: Option<&str>) -> Result<Reply, DecodeError> {
        match self {
            WireFormat::Xml => shape::reply_from_response(&xml::parse_document(body, charset)?),
            WireFormat::Json => shape::reply_from_response(&json::response_root(body, charset)?),
        }
    }

    /// Decodes a method call, as the simulated controller receives it.
    pub fn decode_method_call(
        self,
        body: &[u8],
        charset: Option<&str>,
    ) -> Result<MethodCall, DecodeError> {
        match self {
            WireFormat::Xml => {
                shape::method_call_from_element(&xml::parse_document(body, charset)?)
            }
            WireFormat::Json => {
                shape::method_call_from_element(&json::methodcall_root(body, charset)?)
            }
        }
    }

    /// Encodes a reply, as the simulated controller sends it.
    pub fn encode_reply(self, reply: &Reply) -> Vec<u8> {
        match self {
            WireFormat::Xml => xml::encode_reply(reply),
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
        MethodCall {
            name: call.method.to_owned(),
            params: call
                .params
                .iter()
                .map(|(name, value)| Element::leaf(name, value))
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

/// Whitespace as XML defines it, which the shape checks allow around text in both formats.
fn is_xml_whitespace(character: char) -> bool {
    matches!(character, ' ' | '\t' | '\r' | '\n')
}

/// Keeps peer-controlled text in error messages short enough to log.
pub(crate) fn shorten(text: &str) -> String {
    const LIMIT: usize = 40;
    match text.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;
