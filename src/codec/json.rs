//! The JSON variant of the task interface, read into the same [`Element`] trees as XML so that
//! both formats pass the very same structural checks.
//!
//! The vendor documents only the JSON request (`{"method":…,"params":{…}}`); replies are read as
//! the XML shapes' equivalents, with or without a top-level `response` wrapper.

use std::cell::Cell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::{DecodeError, Element, MAX_DEPTH, MethodCall, Reply, shorten};

/// Parses a JSON reply into a `response` element.
pub(super) fn response_root(body: &[u8], charset: Option<&str>) -> Result<Element, DecodeError> {
    let object = parse_object(body, charset, "response")?;
    let inner = match object.get("response") {
        Some(Value::Object(inner)) if object.len() == 1 => inner,
        _ => &object,
    };
    object_element("response", inner, 1)
}

/// Parses a JSON method call into a `methodcall` element with `name` and `params` children.
pub(super) fn methodcall_root(body: &[u8], charset: Option<&str>) -> Result<Element, DecodeError> {
    let object = parse_object(body, charset, "methodcall")?;
    let mut children = Vec::new();
    for (key, value) in &object {
        let child = match (key.as_str(), value) {
            ("method", Value::String(name)) => Element::leaf("name", name),
            ("method", other) => {
                return Err(DecodeError::UnexpectedText {
                    element: "method".to_owned(),
                    text: shorten(&other.to_string()),
                });
            }
            ("params", value) => value_element("params", value, 1)?,
            (other, _) => {
                return Err(DecodeError::UnexpectedElement {
                    parent: "methodcall".to_owned(),
                    name: shorten(other),
                });
            }
        };
        children.push(child);
    }
    Ok(Element {
        name: "methodcall".to_owned(),
        text: String::new(),
        children,
    })
}

/// Encodes a method call as `{"method":…,"params":{…}}`.
pub(super) fn encode_method_call(method_call: &MethodCall) -> Vec<u8> {
    let mut object = Map::new();
    object.insert("method".to_owned(), Value::String(method_call.name.clone()));
    object.insert("params".to_owned(), children_value(&method_call.params));
    Value::Object(object).to_string().into_bytes()
}

/// Encodes a reply as `{"params":{…}}` or `{"fault":{"code":N}}`.
pub(super) fn encode_reply(reply: &Reply) -> Vec<u8> {
    let mut object = Map::new();
    match reply {
        Reply::Success(params) => {
            object.insert("params".to_owned(), children_value(&params.children));
        }
        Reply::Fault(code) => {
            let mut fault = Map::new();
            fault.insert("code".to_owned(), Value::from(*code));
            object.insert("fault".to_owned(), Value::Object(fault));
        }
    }
    Value::Object(object).to_string().into_bytes()
}

/// JSON is UTF-8 (RFC 8259); a charset naming anything else is refused rather than guessed at.
/// `root` names the element the object becomes, for an error about a key in it.
fn parse_object(
    body: &[u8],
    charset: Option<&str>,
    root: &str,
) -> Result<Map<String, Value>, DecodeError> {
    if let Some(charset) = charset
        && !matches!(
            charset.trim().to_ascii_lowercase().as_str(),
            "utf-8" | "utf8"
        )
    {
        return Err(DecodeError::UnsupportedEncoding(shorten(charset)));
    }
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::Empty);
    }
    let duplicate = Cell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = UniqueKeys {
        parent: root,
        duplicate: &duplicate,
    }
    .deserialize(&mut deserializer)
    .and_then(|value| deserializer.end().map(|()| value));
    if let Some(error) = duplicate.take() {
        return Err(error);
    }
    match parsed {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(DecodeError::Malformed {
            position: 0,
            reason: format!("expected a JSON object, found {}", kind(&other)),
        }),
        Err(error) => Err(DecodeError::Malformed {
            position: error.column() as u64,
            reason: format!("invalid JSON at line {}: {error}", error.line()),
        }),
    }
}

/// Reads a JSON value as serde_json's `Value` does, except that an object naming a key twice is
/// refused: `Value` keeps the last, so `{"fault":{"code":2001},"fault":{"code":1148}}` would read
/// as fault 1148, where XML's `<fault>` twice is an error. The refusal is left in `duplicate`,
/// naming the key and its parent as the element tree would.
struct UniqueKeys<'a> {
    /// The element an object read here becomes, or holds, for an array.
    parent: &'a str,
    duplicate: &'a Cell<Option<DecodeError>>,
}

impl<'de> DeserializeSeed<'de> for UniqueKeys<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueKeys<'_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, flag: bool) -> Result<Value, E> {
        Ok(Value::Bool(flag))
    }

    fn visit_i64<E>(self, number: i64) -> Result<Value, E> {
        Ok(Value::from(number))
    }

    fn visit_u64<E>(self, number: u64) -> Result<Value, E> {
        Ok(Value::from(number))
    }

    fn visit_f64<E>(self, number: f64) -> Result<Value, E> {
        // serde_json reads no NaN or infinity, so this is always a number.
        Ok(Number::from_f64(number).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, text: &str) -> Result<Value, E> {
        Ok(Value::String(text.to_owned()))
    }

    fn visit_string<E>(self, text: String) -> Result<Value, E> {
        Ok(Value::String(text))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(UniqueKeys { ..self })? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                self.duplicate.set(Some(DecodeError::DuplicateElement {
                    parent: shorten(self.parent),
                    name: shorten(&key),
                }));
                return Err(A::Error::custom("a key named twice"));
            }
            let value = map.next_value_seed(UniqueKeys {
                parent: &key,
                duplicate: self.duplicate,
            })?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

fn object_element(
    name: &str,
    object: &Map<String, Value>,
    depth: usize,
) -> Result<Element, DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    let mut children = Vec::new();
    for (key, value) in object {
        match value {
            // An array stands for a repeated element, as in `<bins><bin_id/><bin_id/></bins>`.
            Value::Array(items) => {
                for item in items {
                    if let Value::Array(_) = item {
                        return Err(DecodeError::UnexpectedElement {
                            parent: shorten(key),
                            name: "array".to_owned(),
                        });
                    }
                    children.push(value_element(key, item, depth + 1)?);
                }
            }
            value => children.push(value_element(key, value, depth + 1)?),
        }
    }
    Ok(Element {
        name: name.to_owned(),
        text: String::new(),
        children,
    })
}

fn value_element(name: &str, value: &Value, depth: usize) -> Result<Element, DecodeError> {
    match value {
        Value::Object(object) => object_element(name, object, depth),
        Value::String(text) => Ok(Element::leaf(name, text)),
        Value::Number(number) => Ok(Element::leaf(name, number)),
        Value::Bool(flag) => Ok(Element::leaf(name, flag)),
        Value::Null | Value::Array(_) => Err(DecodeError::UnexpectedText {
            element: shorten(name),
            text: kind(value).to_owned(),
        }),
    }
}

/// Child elements as a JSON object: repeated names become arrays, and decimal text becomes a
/// number, since the vendor's JSON example sends `"port_id": 4`.
fn children_value(children: &[Element]) -> Value {
    let mut object = Map::new();
    for child in children {
        let value = if child.children.is_empty() {
            match child.text.parse::<u64>() {
                Ok(number) if child.text.bytes().all(|byte| byte.is_ascii_digit()) => {
                    Value::from(number)
                }
                _ => Value::String(child.text.clone()),
            }
        } else {
            children_value(&child.children)
        };
        match object.get_mut(&child.name) {
            Some(Value::Array(items)) => items.push(value),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, value]);
            }
            None => {
                object.insert(child.name.clone(), value);
            }
        }
    }
    Value::Object(object)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Call, WireFormat};
    use super::*;

    fn check_reply(body: &str, expected: Result<Reply, DecodeError>) {
        assert_eq!(
            WireFormat::Json.decode_reply(body.as_bytes(), None),
            expected,
            "{body}"
        );
    }

    #[test]
    fn reply_shapes_with_and_without_the_wrapper() {
        let success = Ok(Reply::empty_success());
        check_reply(r#"{"params":{}}"#, success.clone());
        check_reply(r#"{"response":{"params":{}}}"#, success.clone());
        check_reply(" \r\n{ \"params\" : { } }\n", success);
        check_reply(r#"{"fault":{"code":1148}}"#, Ok(Reply::Fault(1148)));
        check_reply(
            r#"{"response":{"fault":{"code":1087}}}"#,
            Ok(Reply::Fault(1087)),
        );
    }

    #[test]
    fn other_json_is_a_bad_response() {
        check_reply(
            r#"{"params":{},"fault":{"code":1}}"#,
            Err(DecodeError::ParamsAndFault),
        );
        for code in ["\"soon\"", "-3", "1148.5"] {
            let text = code.trim_matches('"');
            check_reply(
                &format!(r#"{{"fault":{{"code":{code}}}}}"#),
                Err(DecodeError::InvalidInteger {
                    element: "code".to_owned(),
                    text: text.to_owned(),
                }),
            );
        }
        check_reply(
            r#"{"fault":{"code":null}}"#,
            Err(DecodeError::UnexpectedText {
                element: "code".to_owned(),
                text: "null".to_owned(),
            }),
        );
        check_reply(
            r#"{"result":"ok"}"#,
            Err(DecodeError::UnexpectedElement {
                parent: "response".to_owned(),
                name: "result".to_owned(),
            }),
        );
        check_reply(
            "{}",
            Err(DecodeError::MissingElement {
                parent: "response".to_owned(),
                name: "params",
            }),
        );
        check_reply("", Err(DecodeError::Empty));
        assert!(matches!(
            WireFormat::Json.decode_reply(b"[1]", None),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            WireFormat::Json.decode_reply(b"<response/>", None),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            WireFormat::Json.decode_reply(b"{\"params\":{}", None),
            Err(DecodeError::Malformed { .. })
        ));
        assert_eq!(
            WireFormat::Json.decode_reply(b"{\"params\":{}}", Some("iso-8859-1")),
            Err(DecodeError::UnsupportedEncoding("iso-8859-1".to_owned()))
        );
        let deep = format!(
            "{{\"params\":{}{{}}{}}}",
            "{\"a\":".repeat(40),
            "}".repeat(40)
        );
        check_reply(&deep, Err(DecodeError::TooDeep));
    }

    /// A key named twice is refused as XML refuses an element twice, never read as its last
    /// value: `{"fault":{"code":2001},"fault":{"code":1148}}` is not fault 1148, which says
    /// retry, nor a `case_state` of NOOP, which would have a repeat send a call again.
    #[test]
    fn a_key_named_twice_is_a_duplicate_element() {
        fn duplicate<T>(parent: &str, name: &str) -> Result<T, DecodeError> {
            Err(DecodeError::DuplicateElement {
                parent: parent.to_owned(),
                name: name.to_owned(),
            })
        }
        check_reply(
            r#"{"fault":{"code":1009,"code":1148}}"#,
            duplicate("fault", "code"),
        );
        check_reply(
            r#"{"fault":{"code":2001},"fault":{"code":1148}}"#,
            duplicate("response", "fault"),
        );
        check_reply(
            r#"{"response":{"params":{},"params":{}}}"#,
            duplicate("response", "params"),
        );
        check_reply(
            r#"{"params":{"port_id":4,"case_state":"ERSO","case_state":"NOOP"}}"#,
            duplicate("params", "case_state"),
        );
        check_reply(
            r#"{"params":{"bins":[{"bin_id":1,"bin_id":2}]}}"#,
            duplicate("bins", "bin_id"),
        );
        assert_eq!(
            WireFormat::Json.decode_method_call(
                br#"{"method":"case_extract","method":"case_cancel","params":{}}"#,
                None
            ),
            duplicate("methodcall", "method")
        );
    }

    #[test]
    fn the_case_extract_request_is_the_documented_json() {
        let method_call = MethodCall::new("case_extract")
            .with_param("port_id", 4)
            .with_param("bin_id", 101337);
        let body = WireFormat::Json.encode_method_call(&method_call);
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"method":"case_extract","params":{"port_id":4,"bin_id":101337}}"#
        );
        assert_eq!(
            WireFormat::Json.decode_method_call(&body, None),
            Ok(method_call)
        );
    }

    #[test]
    fn a_call_encodes_as_its_method_call_does() {
        let call = Call {
            method: "case_extract",
            params: &[("port_id", 4), ("bin_id", 101337)],
        };
        assert_eq!(
            WireFormat::Json.encode_call(&call),
            WireFormat::Json.encode_method_call(&MethodCall::from(&call))
        );
    }

    #[test]
    fn repeated_params_round_trip_as_arrays() {
        let method_call = MethodCall::new("x")
            .with_param("bin_id", 1)
            .with_param("bin_id", 2)
            .with_param("note", "a\"b");
        let body = WireFormat::Json.encode_method_call(&method_call);
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"method":"x","params":{"bin_id":[1,2],"note":"a\"b"}}"#
        );
        assert_eq!(
            WireFormat::Json.decode_method_call(&body, None),
            Ok(method_call)
        );
    }

    #[test]
    fn replies_encode_without_the_wrapper() {
        let success = WireFormat::Json.encode_reply(&Reply::empty_success());
        assert_eq!(success, br#"{"params":{}}"#);
        let fault = WireFormat::Json.encode_reply(&Reply::Fault(1148));
        assert_eq!(fault, br#"{"fault":{"code":1148}}"#);
    }

    #[test]
    fn method_calls_need_a_string_method() {
        assert_eq!(
            WireFormat::Json.decode_method_call(br#"{"method":7,"params":{}}"#, None),
            Err(DecodeError::UnexpectedText {
                element: "method".to_owned(),
                text: "7".to_owned()
            })
        );
        assert_eq!(
            WireFormat::Json.decode_method_call(br#"{"params":{}}"#, None),
            Err(DecodeError::MissingElement {
                parent: "methodcall".to_owned(),
                name: "name"
            })
        );
    }
}
