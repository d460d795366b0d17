//! Entry points for `fuzz/`, whose targets can only reach the public API, and for the test that
//! replays their committed corpora on stable (`tests/integration/fuzz_corpus.rs`). Not a stable
//! API: hidden from the docs and changed with the fuzz targets. It exists so that crate-private
//! parsers (`grpc-timeout`, the full reply parser, the simulator's request decoding) can be
//! fuzzed without making them public.
//!
//! Each check takes the fuzzer's bytes, runs one parser (or an encoder and its decoder) on them
//! and panics when an invariant breaks; an input that is merely invalid is a normal outcome. A
//! fuzz target and the corpus test call the same check, so a crash found by one is replayed by
//! the other.

use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;

use crate::codec::{self, Call, CaseStateReply, Element, MethodCall, Reply, WireFormat};
use crate::config::{self, AccessLog, limits};
use crate::log::LogFormat;
use crate::log_publisher::lines::{DEFAULT_MAX_LINE_BYTES, LineSplitter};
use crate::log_publisher::segment::{self, AUTOCASE_TAG, Segment};
use crate::simulator::http::{decode_request, reply_content_type};
use crate::simulator::layout::Layout;
use crate::simulator::port::PortTable;
use crate::simulator::{self, Outcome};

/// One fuzz target: its name (the file `fuzz/fuzz_targets/<name>.rs` and the folder
/// `fuzz/corpus/<name>/`) and its check.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The target's name, as `cargo fuzz run` takes it.
    pub name: &'static str,
    /// Runs one input; panics when an invariant breaks.
    pub check: fn(&[u8]),
}

/// Every fuzz target, so the corpus test replays each one's corpus and finds a target without
/// one.
pub const TARGETS: &[Target] = &[
    Target {
        name: "xml_reply",
        check: xml_reply,
    },
    Target {
        name: "json_reply",
        check: json_reply,
    },
    Target {
        name: "call_round_trip",
        check: call_round_trip,
    },
    Target {
        name: "config_toml",
        check: config_toml,
    },
    Target {
        name: "layout_toml",
        check: layout_toml,
    },
    Target {
        name: "simulator_request",
        check: simulator_request,
    },
    Target {
        name: "log_publisher",
        check: log_publisher,
    },
    Target {
        name: "grpc_timeout",
        check: grpc_timeout,
    },
];

/// The charsets a reply is decoded with: the first input byte picks one, the rest is the body.
const CHARSETS: [Option<&str>; 8] = [
    None,
    Some("utf-8"),
    Some("UTF8"),
    Some("iso-8859-1"),
    Some(" latin1 "),
    Some("us-ascii"),
    Some("utf-16"),
    Some(""),
];

/// An XML controller reply, as the gateway decodes it.
///
/// - A success needs `params` in the bytes, a fault `fault` and `code`: element names cannot be
///   written with references, and every supported charset writes ASCII as ASCII.
/// - What it decodes to, encoded again as the simulator would, decodes to the same reply.
pub fn xml_reply(data: &[u8]) {
    let (charset, body) = split_charset(data);
    let Ok(reply) = WireFormat::Xml.decode_reply(body, charset) else {
        return;
    };
    match &reply {
        Reply::Success(_) => assert!(contains(body, b"params"), "a success without params"),
        Reply::Fault(_) => assert!(contains(body, b"fault") && contains(body, b"code")),
    }
    check_reply_encodes_back(&reply, WireFormat::Xml);
    check_reply_encodes_back(&reply, WireFormat::Json);
}

/// A JSON controller reply, as the gateway decodes it: a success or a fault only when the JSON
/// object (or its lone `response` member) has a `params` or `fault` member, and what it decodes
/// to, encoded again, decodes to the same reply.
pub fn json_reply(data: &[u8]) {
    let (charset, body) = split_charset(data);
    let Ok(reply) = WireFormat::Json.decode_reply(body, charset) else {
        return;
    };
    let text = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let value: serde_json::Value =
        serde_json::from_slice(text).expect("a decoded reply is valid JSON");
    let object = value.as_object().expect("a decoded reply is a JSON object");
    let inner = match object.get("response") {
        Some(serde_json::Value::Object(inner)) if object.len() == 1 => inner,
        _ => object,
    };
    match &reply {
        Reply::Success(_) => assert!(inner.contains_key("params"), "a success without params"),
        Reply::Fault(_) => assert!(inner.contains_key("fault"), "a fault without fault"),
    }
    // Names taken from JSON keys need not be XML names, so only JSON is written back.
    check_reply_encodes_back(&reply, WireFormat::Json);
}

/// Any valid [`Call`] (built from the bytes by [`call_from_bytes`]) encodes, in both formats,
/// to bytes that the simulator's request decoding reads back as the same method call.
pub fn call_round_trip(data: &[u8]) {
    let (method, params) = call_from_bytes(data);
    let params: Vec<(&str, u32)> = params
        .iter()
        .map(|(name, value)| (name.as_str(), *value))
        .collect();
    let call = Call {
        method: &method,
        params: &params,
    };
    let method_call = MethodCall::from(&call);
    let xml = WireFormat::Xml.encode_call(&call);
    for (format, body) in [
        (WireFormat::Xml, xml),
        (WireFormat::Json, WireFormat::Json.encode_call(&call)),
    ] {
        let (decoded_format, decoded) = decode_request(Some(format.content_type()), &body);
        assert_eq!(decoded_format, format);
        let expected = match format {
            WireFormat::Xml => method_call.clone(),
            WireFormat::Json => json_grouped(&method_call),
        };
        assert_eq!(
            decoded,
            Ok(expected),
            "{format:?}: {}",
            String::from_utf8_lossy(&body)
        );
    }
}

/// The serve config file, as far as the library can reach it: the `ServeSettings` type that
/// reads it lives in the binary (`src/cli/serve/settings.rs`), so the text goes through the same
/// TOML parser into a table, and each value of a known key through the library check the binary
/// applies to it. Checks: an upstream URL that passes is http(s) with a host and no
/// credentials, and one that fails never shows its password; an origin that passes is sent as
/// written; a duration or count that passes its bounds is within them.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let table: toml::Table = match toml::from_str(text) {
        Ok(table) => table,
        Err(error) => {
            // What the binary prints for a file that does not parse.
            let _ = config::redact_userinfo(&error.to_string());
            return;
        }
    };
    for (key, value) in &table {
        check_setting(key, value);
    }
}

/// A simulator layout file: a layout that parses has unique ports within range, selected bins
/// within range and a step time, and a simulator can be built from it.
pub fn layout_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(layout) = Layout::from_toml(text) else {
        return;
    };
    assert!(!layout.step_time.is_zero());
    let mut ids: Vec<u32> = layout.ports.iter().map(|port| port.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), layout.ports.len(), "duplicate port ids");
    for port in &layout.ports {
        assert!(crate::domain::PORT_ID_RANGE.contains(&port.id));
        if let Some(bin) = port.selected_bin {
            assert!(crate::domain::BIN_ID_RANGE.contains(&bin));
        }
    }
    let _ = simulator::Simulator::new(&layout);
}

/// A request to the simulator: the first line is its Content-Type header (none without a
/// newline), the rest its body. A method call it decodes is applied to a fresh default port
/// table; the reply, sent with the simulator's Content-Type, decodes on the gateway's side to
/// the same reply.
pub fn simulator_request(data: &[u8]) {
    let (content_type, body) = match data.iter().position(|&byte| byte == b'\n') {
        Some(newline) => {
            let header = axum::http::HeaderValue::from_bytes(&data[..newline]).ok();
            (header, &data[newline + 1..])
        }
        None => (None, data),
    };
    // As the handler reads the header: a value that is not visible ASCII counts as none.
    let content_type = content_type.as_ref().and_then(|value| value.to_str().ok());
    let (format, decoded) = decode_request(content_type, body);
    let Ok(method_call) = decoded else {
        return;
    };
    let layout = Layout::default_layout();
    let mut ports = PortTable::new(&layout.ports, layout.step_time);
    let reply = match simulator::apply(&mut ports, &method_call, Instant::now()) {
        Outcome::Reply(reply) => reply,
        Outcome::NotImplemented(name) => {
            assert_eq!(name, method_call.name);
            assert!(!simulator::METHODS.contains(&name.as_str()));
            return;
        }
    };
    let sent = format.encode_reply(&reply);
    let charset = codec::charset_of(reply_content_type(format));
    let received = format
        .decode_reply(&sent, charset)
        .unwrap_or_else(|error| panic!("the gateway cannot read {reply:?}: {error}"));
    assert_same_reply(&received, &reply);
}

/// The Log Publisher's line splitter and segment parser. The first byte sets the line cap, the
/// second how the rest of the stream is cut into reads. Checks: the lines do not depend on how
/// the stream was cut; the buffer never holds more than a line at the cap and a CR; a line
/// holds no CRLF and is within the cap; only an `AC` line is an error; an `AC` segment written
/// back reads as the same event.
pub fn log_publisher(data: &[u8]) {
    let (Some(&cap), Some(&cut), Some(stream)) = (data.first(), data.get(1), data.get(2..)) else {
        return;
    };
    let max_line_bytes = match cap {
        255 => DEFAULT_MAX_LINE_BYTES,
        cap => usize::from(cap % 64),
    };
    let whole = split_lines(max_line_bytes, &[stream]);
    let chunk_size = usize::from(cut % 16) + 1;
    let chunks: Vec<&[u8]> = stream.chunks(chunk_size).collect();
    assert_eq!(
        split_lines(max_line_bytes, &chunks),
        whole,
        "cut in reads of {chunk_size}"
    );
    for line in whole.into_iter().flatten() {
        assert!(line.len() <= max_line_bytes);
        assert!(!contains(&line, b"\r\n"));
        match segment::parse_segment(&line) {
            Ok(Segment::AutoCase { event, raw }) => {
                assert_eq!(raw.as_bytes(), line.as_slice());
                let written = segment::encode_autocase(&event);
                assert_eq!(
                    segment::parse_segment(written.as_bytes()),
                    Ok(Segment::AutoCase {
                        event,
                        raw: written.clone()
                    })
                );
            }
            Ok(Segment::Other { kind, .. }) => assert_ne!(kind, AUTOCASE_TAG),
            Err(_) => assert!(line == b"AC" || line.starts_with(b"AC,")),
        }
    }
}

/// The `grpc-timeout` parser against the gRPC spec, written out again here: 1 to 8 ASCII digits
/// and one unit of H, M, S, m, u or n; anything else is refused.
pub fn grpc_timeout(data: &[u8]) {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let expected = value
        .as_bytes()
        .split_last()
        .filter(|(_, digits)| {
            (1..=8).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit)
        })
        .and_then(|(unit, digits)| {
            let amount: u128 = digits
                .iter()
                .fold(0, |sum, digit| sum * 10 + u128::from(digit - b'0'));
            let nanos_per_unit: u128 = match unit {
                b'H' => 3_600_000_000_000,
                b'M' => 60_000_000_000,
                b'S' => 1_000_000_000,
                b'm' => 1_000_000,
                b'u' => 1_000,
                b'n' => 1,
                _ => return None,
            };
            Some(amount * nanos_per_unit)
        });
    let parsed = crate::protocol::parse_grpc_timeout(value).map(|duration| duration.as_nanos());
    assert_eq!(parsed, expected, "{value:?}");
}

// === the calls `call_round_trip` builds ===

/// Characters a method name is made of: the task interface's own, the markup characters the
/// encoder escapes, white space inside the name, and text beyond ASCII.
const METHOD_CHARACTERS: &str = "acex_09-.: \t\n\r<>&'\";#é€\u{10348}";
/// Characters that may start a parameter name (an XML name, as the encoder writes it raw).
const NAME_START: &[u8] = b"abinoprt_";
/// Characters that may follow in a parameter name.
const NAME_REST: &[u8] = b"abdinoprt_019.-";

/// A valid call from arbitrary bytes: a method of up to 24 characters with no white space at
/// either end (the decoder trims it), and up to 7 parameters, each an XML name of up to 12
/// characters and any `u32`. Missing bytes read as zero, so every input is a call.
pub fn call_from_bytes(data: &[u8]) -> (String, Vec<(String, u32)>) {
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next().unwrap_or(0);
    let method_length = usize::from(next() % 25);
    let characters: Vec<char> = METHOD_CHARACTERS.chars().collect();
    let method: String = (0..method_length)
        .map(|_| characters[usize::from(next()) % characters.len()])
        .collect();
    let method = method.trim().to_owned();
    let param_count = usize::from(next() % 8);
    let params = (0..param_count)
        .map(|_| {
            let name_length = usize::from(next() % 12) + 1;
            let mut name = String::with_capacity(name_length);
            name.push(char::from(
                NAME_START[usize::from(next()) % NAME_START.len()],
            ));
            for _ in 1..name_length {
                name.push(char::from(NAME_REST[usize::from(next()) % NAME_REST.len()]));
            }
            let value = u32::from_le_bytes([next(), next(), next(), next()]);
            (name, value)
        })
        .collect();
    (method, params)
}

/// A method call as its JSON form reads back: a JSON object has one member per name, so
/// parameters that share a name come back together, where the first of them stood.
pub fn json_grouped(method_call: &MethodCall) -> MethodCall {
    let mut params: Vec<Element> = Vec::with_capacity(method_call.params.len());
    for param in &method_call.params {
        if params.iter().any(|done| done.name == param.name) {
            continue;
        }
        params.extend(method_call.params_named(&param.name).cloned());
    }
    MethodCall {
        name: method_call.name.clone(),
        params,
    }
}

// === helpers of the checks ===

fn split_charset(data: &[u8]) -> (Option<&'static str>, &[u8]) {
    match data.split_first() {
        Some((&first, body)) => (CHARSETS[usize::from(first) % CHARSETS.len()], body),
        None => (None, data),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Encodes `reply` in `format` and decodes it again: a fault comes back as the same code; a
/// success comes back a success, in XML with the same elements and the same text in every
/// element without children (the text of one with children is the encoder's indentation).
fn check_reply_encodes_back(reply: &Reply, format: WireFormat) {
    let encoded = format.encode_reply(reply);
    let decoded = format.decode_reply(&encoded, None);
    match (reply, &decoded) {
        (Reply::Fault(code), Ok(Reply::Fault(decoded_code))) => assert_eq!(code, decoded_code),
        (Reply::Success(params), Ok(Reply::Success(decoded_params))) => {
            if format == WireFormat::Xml {
                assert_eq!(leaf_text_tree(decoded_params), leaf_text_tree(params));
            }
        }
        _ => panic!(
            "{format:?}: {reply:?} encoded as {} decodes to {decoded:?}",
            String::from_utf8_lossy(&encoded)
        ),
    }
}

/// An element with the text of elements that have children left out.
fn leaf_text_tree(element: &Element) -> Element {
    let children: Vec<Element> = element.children.iter().map(leaf_text_tree).collect();
    let text = if children.is_empty() {
        element.text.clone()
    } else {
        String::new()
    };
    Element {
        name: element.name.clone(),
        text,
        children,
    }
}

/// Whether the gateway read what the simulator sent: the same fault, the same empty success or
/// the same `case_getstate` data.
fn assert_same_reply(received: &Reply, sent: &Reply) {
    match (received, sent) {
        (Reply::Fault(received), Reply::Fault(sent)) => assert_eq!(received, sent),
        (Reply::Success(received), Reply::Success(sent)) => match CaseStateReply::from_params(sent)
        {
            Ok(sent) => assert_eq!(CaseStateReply::from_params(received), Ok(sent)),
            Err(_) => assert_eq!(received, sent),
        },
        _ => panic!("sent {sent:?}, received {received:?}"),
    }
}

/// Feeds `chunks` to a splitter one at a time and collects every line or error; the buffer never
/// holds more than a line at the cap and its CR. The line splitter's unit tests use it too.
pub(crate) fn split_lines(
    max_line_bytes: usize,
    chunks: &[&[u8]],
) -> Vec<Result<Vec<u8>, crate::log_publisher::lines::LineError>> {
    let mut splitter = LineSplitter::new(max_line_bytes);
    let mut buffer = BytesMut::new();
    let mut lines = Vec::new();
    for chunk in chunks {
        buffer.extend_from_slice(chunk);
        while let Some(line) = splitter.next_line(&mut buffer) {
            lines.push(line.map(|line| line.to_vec()));
        }
        assert!(
            buffer.len() <= max_line_bytes + 1,
            "the buffer holds {} bytes",
            buffer.len()
        );
    }
    lines
}

/// Checks one key of a serve config file the way the binary's `resolve` and
/// `Config::validate` do, for the keys whose check the library holds.
fn check_setting(key: &str, value: &toml::Value) {
    match (key, value) {
        ("upstream", toml::Value::String(raw)) => check_upstream_url(raw),
        ("cors_allow_origin", toml::Value::Array(origins)) => {
            for origin in origins.iter().filter_map(toml::Value::as_str) {
                if let Ok(header) = config::parse_cors_origin(origin) {
                    assert_eq!(header.as_bytes(), origin.as_bytes());
                }
            }
        }
        ("access_log", value) => {
            let _ = value.clone().try_into::<AccessLog>();
        }
        ("log_format", value) => {
            let _ = value.clone().try_into::<LogFormat>();
        }
        (key, toml::Value::String(text)) => {
            if let Some(bounds) = duration_bounds(key)
                && let Ok(duration) = humantime::parse_duration(text)
            {
                check_bounds(&bounds, duration);
            }
        }
        (key, toml::Value::Integer(number)) => {
            if let Some(bounds) = count_bounds(key)
                && let Some(count) = usize::try_from(*number)
                    .ok()
                    .and_then(std::num::NonZeroUsize::new)
            {
                check_bounds(&bounds, count);
            }
        }
        _ => {}
    }
}

fn check_upstream_url(raw: &str) {
    match config::parse_upstream_url(raw) {
        Ok(url) => {
            assert!(matches!(url.scheme(), "http" | "https"));
            assert!(url.host_str().is_some_and(|host| !host.is_empty()));
            assert!(url.username().is_empty() && url.password().is_none());
        }
        Err(error) => {
            // A password the URL parser finds must not be in the message.
            if let Some(password) = url::Url::parse(raw)
                .ok()
                .and_then(|url| url.password().map(str::to_owned))
                .filter(|password| password.len() >= 3)
            {
                let message = error.to_string();
                assert!(
                    !message.contains(&format!(":{password}@")),
                    "{raw:?} shows its password in {message:?}"
                );
            }
        }
    }
}

fn check_bounds<T: config::SettingValue + std::fmt::Debug>(bounds: &config::Bounds<T>, value: T) {
    match bounds.check(value) {
        Ok(checked) => {
            assert!(bounds.min <= checked && checked <= bounds.max);
            assert!(checked == value);
        }
        Err(error) => {
            assert!(value < bounds.min || value > bounds.max);
            assert!(error.to_string().contains(bounds.setting));
        }
    }
}

fn duration_bounds(key: &str) -> Option<config::Bounds<Duration>> {
    Some(match key {
        "upstream_timeout" => limits::UPSTREAM_TIMEOUT,
        "retry_delay" => limits::RETRY_DELAY,
        "shutdown_grace" => limits::SHUTDOWN_GRACE,
        "health_interval" => limits::HEALTH_INTERVAL,
        "idempotency_window" => limits::IDEMPOTENCY_WINDOW,
        "handshake_timeout" => limits::HANDSHAKE_TIMEOUT,
        "idle_timeout" => limits::IDLE_TIMEOUT,
        "metrics_header_read_timeout" | "metrics_idle_timeout" | "metrics_body_read_timeout" => {
            limits::HTTP1_TIMEOUT
        }
        _ => return None,
    })
}

fn count_bounds(key: &str) -> Option<config::Bounds<std::num::NonZeroUsize>> {
    Some(match key {
        "max_in_flight" => limits::MAX_IN_FLIGHT,
        "idempotency_max_entries" => limits::IDEMPOTENCY_MAX_ENTRIES,
        "max_connections" | "metrics_max_connections" => limits::MAX_CONNECTIONS,
        "max_health_watches" => limits::MAX_HEALTH_WATCHES,
        "max_response_bytes" => limits::MAX_RESPONSE_BYTES,
        "worker_threads" => limits::WORKER_THREADS,
        _ => return None,
    })
}
