//! The data a `case_getstate` reply carries, read from the `<params>` of a success in either wire
//! format, and written by the simulator.
//!
//! The vendor page shows only the reply's first element, `port_id` (task-interface.md §3.2).
//! The rest is inferred, and kept strict so that a controller that differs is seen, as an
//! `UPSTREAM_BAD_RESPONSE` naming the element, rather than guessed at:
//!
//! - `bin_id` (inferred): the name every task-interface method gives a bin. Optional: absent, or
//!   empty (`<bin_id/>`), means the port names no bin, as when no case operation has run.
//! - `case_state` (inferred): the name of the same field in the Log Publisher's
//!   `AC,port_id,bin_id,case_state` segment; one of the nine vendor state codes, matched
//!   exactly once surrounding whitespace is removed (`CR` is a signal, not a state).
//! - Nothing else: any other element, or one of these twice, is an error, as `<params>` is
//!   everywhere else in the codec.
//! - A reply about another port than the one asked is an error too ([`CaseStateReply::about_port`]).
//!
//! JSON replies read the same way (`{"params":{"port_id":4,"bin_id":101337,"case_state":"ERSO"}}`);
//! a JSON `null` is refused by the JSON layer, as anywhere else.

use super::shape::{distinct_children, expect_no_text, missing, parse_integer, unexpected_element};
use super::{DecodeError, Element, Reply, is_xml_whitespace, shorten};
use crate::domain::{BIN_ID_RANGE, CaseState, PORT_ID_RANGE};

/// What `case_getstate` answers: a port's AutoCase state and the bin it concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaseStateReply {
    /// The port, 1–2000: the one asked about, on a controller that answers correctly.
    pub port_id: u32,
    /// The bin of the port's case operation, when the controller names one.
    pub bin_id: Option<u32>,
    /// The port's case state.
    pub case_state: CaseState,
}

// === impl CaseStateReply ===

impl CaseStateReply {
    /// Reads the `<params>` of a success reply; an error is a reply the gateway cannot trust.
    pub fn from_params(params: &Element) -> Result<Self, DecodeError> {
        expect_no_text(params)?;
        let [port_id, bin_id, case_state] =
            distinct_children(params, ["port_id", "bin_id", "case_state"])?;
        let port_id = port_id.ok_or_else(|| missing(params, "port_id"))?;
        let case_state = case_state.ok_or_else(|| missing(params, "case_state"))?;
        Ok(CaseStateReply {
            port_id: integer_in(port_id, &PORT_ID_RANGE)?,
            bin_id: match bin_id {
                Some(bin_id) if !is_empty(bin_id) => Some(integer_in(bin_id, &BIN_ID_RANGE)?),
                Some(_) | None => None,
            },
            case_state: read_case_state(case_state)?,
        })
    }

    /// This reply, if it is about `asked`, the port the call named: a reply about another port
    /// says nothing about the one asked, and is an error rather than an answer.
    pub fn about_port(self, asked: u32) -> Result<Self, DecodeError> {
        if self.port_id == asked {
            Ok(self)
        } else {
            Err(DecodeError::OtherPort {
                asked,
                answered: self.port_id,
            })
        }
    }

    /// The success reply that carries this, elements in the order `from_params` documents.
    pub fn to_reply(self) -> Reply {
        let mut children = vec![Element::leaf("port_id", self.port_id)];
        if let Some(bin_id) = self.bin_id {
            children.push(Element::leaf("bin_id", bin_id));
        }
        children.push(Element::leaf("case_state", self.case_state.code()));
        Reply::Success(Element {
            name: "params".to_owned(),
            text: String::new(),
            children,
        })
    }
}

fn is_empty(element: &Element) -> bool {
    element.children.is_empty() && element.text.chars().all(is_xml_whitespace)
}

fn integer_in(
    element: &Element,
    range: &std::ops::RangeInclusive<u32>,
) -> Result<u32, DecodeError> {
    let value = parse_integer(element)?;
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(DecodeError::OutOfRange {
            element: element.name.clone(),
            value,
            min: *range.start(),
            max: *range.end(),
        })
    }
}

fn read_case_state(element: &Element) -> Result<CaseState, DecodeError> {
    if let Some(child) = element.children.first() {
        return Err(unexpected_element(element, child));
    }
    let code = element.text.trim_matches(is_xml_whitespace);
    CaseState::from_code(code).ok_or_else(|| DecodeError::UnknownCaseState(shorten(code)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::WireFormat;

    /// Decodes a reply body and reads it as `case_getstate`'s.
    fn read(format: WireFormat, body: &str) -> Result<CaseStateReply, DecodeError> {
        match format.decode_reply(body.as_bytes(), None)? {
            Reply::Success(params) => CaseStateReply::from_params(&params),
            Reply::Fault(code) => panic!("fault {code} for {body}"),
        }
    }

    /// Checks `params`, the inside of `<params>`, as XML.
    fn check_xml(params: &str, expected: Result<CaseStateReply, DecodeError>) {
        let body = format!("<?xml version=\"1.0\"?><response><params>{params}</params></response>");
        assert_eq!(read(WireFormat::Xml, &body), expected, "{body}");
    }

    /// Checks `params`, the inside of the `params` object, as JSON.
    fn check_json(params: &str, expected: Result<CaseStateReply, DecodeError>) {
        let body = format!("{{\"params\":{{{params}}}}}");
        assert_eq!(read(WireFormat::Json, &body), expected, "{body}");
    }

    fn reply(port_id: u32, bin_id: Option<u32>, case_state: CaseState) -> CaseStateReply {
        CaseStateReply {
            port_id,
            bin_id,
            case_state,
        }
    }

    fn out_of_range(
        element: &str,
        value: u32,
        range: std::ops::RangeInclusive<u32>,
    ) -> DecodeError {
        DecodeError::OutOfRange {
            element: element.to_owned(),
            value,
            min: *range.start(),
            max: *range.end(),
        }
    }

    #[test]
    fn the_issue_example_in_both_formats() {
        let erso = reply(4, Some(101337), CaseState::Erso);
        check_xml(
            "<port_id>4</port_id><bin_id>101337</bin_id><case_state>ERSO</case_state>",
            Ok(erso),
        );
        check_xml(
            "\n  <port_id> 4 </port_id>\r\n  <bin_id>\n101337\n</bin_id>\n  <case_state>\tERSO </case_state>\n",
            Ok(erso),
        );
        check_xml(
            "<case_state>ERSO</case_state><bin_id>101337</bin_id><port_id>4</port_id>",
            Ok(erso),
        );
        check_json(
            r#""port_id":4,"bin_id":101337,"case_state":"ERSO""#,
            Ok(erso),
        );
        // The reply's `response` wrapper is optional in JSON, as for every reply.
        assert_eq!(
            read(
                WireFormat::Json,
                r#"{"response":{"params":{"port_id":4,"case_state":"ERSO","bin_id":101337}}}"#
            ),
            Ok(erso)
        );
    }

    #[test]
    fn bin_id_is_optional() {
        let noop = reply(3, None, CaseState::Noop);
        check_xml(
            "<port_id>3</port_id><case_state>NOOP</case_state>",
            Ok(noop),
        );
        check_xml(
            "<port_id>3</port_id><bin_id/><case_state>NOOP</case_state>",
            Ok(noop),
        );
        check_xml(
            "<port_id>3</port_id><bin_id> </bin_id><case_state>NOOP</case_state>",
            Ok(noop),
        );
        check_json(r#""port_id":3,"case_state":"NOOP""#, Ok(noop));
        check_json(r#""port_id":3,"bin_id":"","case_state":"NOOP""#, Ok(noop));
    }

    #[test]
    fn every_state_reads() {
        for case_state in CaseState::ALL {
            let code = case_state.code();
            check_xml(
                &format!(
                    "<port_id>2000</port_id><bin_id>4000000</bin_id><case_state>{code}</case_state>"
                ),
                Ok(reply(2000, Some(4_000_000), case_state)),
            );
        }
    }

    #[test]
    fn a_reply_lacking_what_is_required_is_an_error() {
        let missing = |name| DecodeError::MissingElement {
            parent: "params".to_owned(),
            name,
        };
        check_xml("", Err(missing("port_id")));
        check_xml("<case_state>ERSO</case_state>", Err(missing("port_id")));
        check_xml(
            "<port_id>4</port_id><bin_id>1</bin_id>",
            Err(missing("case_state")),
        );
        check_json(r#""port_id":4"#, Err(missing("case_state")));
        // An empty <params/> takes the codec's shortcut and still reaches the same check.
        assert_eq!(
            read(WireFormat::Xml, "<response><params/></response>"),
            Err(missing("port_id"))
        );
    }

    #[test]
    fn values_that_are_not_what_the_element_holds() {
        let unknown = |code: &str| Err(DecodeError::UnknownCaseState(code.to_owned()));
        for code in ["", "CR", "erso", "Erso", "ERSO1", "E RSO", "ÉRSO", "ECAN"] {
            check_xml(
                &format!("<port_id>4</port_id><case_state>{code}</case_state>"),
                unknown(code),
            );
        }
        check_json(r#""port_id":4,"case_state":7"#, unknown("7"));
        let invalid = |element: &str, text: &str| {
            Err(DecodeError::InvalidInteger {
                element: element.to_owned(),
                text: text.to_owned(),
            })
        };
        for text in [
            "x",
            "-4",
            "+4",
            "4.0",
            "0x4",
            "4294967296",
            "99999999999999999999",
            "٤",
        ] {
            check_xml(
                &format!("<port_id>{text}</port_id><case_state>NOOP</case_state>"),
                invalid("port_id", text),
            );
            check_xml(
                &format!(
                    "<port_id>4</port_id><bin_id>{text}</bin_id><case_state>NOOP</case_state>"
                ),
                invalid("bin_id", text),
            );
        }
        check_json(
            r#""port_id":"four","case_state":"NOOP""#,
            invalid("port_id", "four"),
        );
        check_json(
            r#""port_id":4.5,"case_state":"NOOP""#,
            invalid("port_id", "4.5"),
        );
        check_xml(
            "<port_id>0</port_id><case_state>NOOP</case_state>",
            Err(out_of_range("port_id", 0, PORT_ID_RANGE)),
        );
        check_xml(
            "<port_id>2001</port_id><case_state>NOOP</case_state>",
            Err(out_of_range("port_id", 2001, PORT_ID_RANGE)),
        );
        check_xml(
            "<port_id>4</port_id><bin_id>0</bin_id><case_state>NOOP</case_state>",
            Err(out_of_range("bin_id", 0, BIN_ID_RANGE)),
        );
        check_json(
            r#""port_id":4,"bin_id":4000001,"case_state":"NOOP""#,
            Err(out_of_range("bin_id", 4_000_001, BIN_ID_RANGE)),
        );
    }

    #[test]
    fn a_reply_about_another_port_is_an_error() {
        let erso = reply(4, Some(101337), CaseState::Erso);
        assert_eq!(erso.about_port(4), Ok(erso));
        let error = erso.about_port(5).unwrap_err();
        assert_eq!(
            error,
            DecodeError::OtherPort {
                asked: 5,
                answered: 4
            }
        );
        assert_eq!(
            error.to_string(),
            "<port_id> holds 4, but the call asked about port 5"
        );
    }

    #[test]
    fn other_elements_are_refused_not_ignored() {
        let unexpected = |parent: &str, name: &str| {
            Err(DecodeError::UnexpectedElement {
                parent: parent.to_owned(),
                name: name.to_owned(),
            })
        };
        check_xml(
            "<port_id>4</port_id><state>ERSO</state>",
            unexpected("params", "state"),
        );
        check_xml(
            "<port_id>4</port_id><case_state>ERSO</case_state><timestamp>1</timestamp>",
            unexpected("params", "timestamp"),
        );
        check_xml(
            "<port_id>4</port_id><case_state><code>ERSO</code></case_state>",
            unexpected("case_state", "code"),
        );
        check_xml(
            "<port_id>4</port_id><case_state>ERSO</case_state><case_state>ECMP</case_state>",
            Err(DecodeError::DuplicateElement {
                parent: "params".to_owned(),
                name: "case_state".to_owned(),
            }),
        );
        check_json(
            r#""port_id":4,"bin_id":[1,2],"case_state":"ERSO""#,
            Err(DecodeError::DuplicateElement {
                parent: "params".to_owned(),
                name: "bin_id".to_owned(),
            }),
        );
        check_json(
            r#""port_id":4,"bin_id":null,"case_state":"NOOP""#,
            Err(DecodeError::UnexpectedText {
                element: "bin_id".to_owned(),
                text: "null".to_owned(),
            }),
        );
    }

    #[test]
    fn the_simulators_replies_read_back() {
        for case_state in CaseState::ALL {
            for bin_id in [None, Some(1), Some(4_000_000)] {
                let sent = reply(1, bin_id, case_state);
                for format in [WireFormat::Xml, WireFormat::Json] {
                    let body = format.encode_reply(&sent.to_reply());
                    let body = String::from_utf8(body).unwrap();
                    assert_eq!(read(format, &body), Ok(sent), "{body}");
                }
            }
        }
        assert_eq!(
            WireFormat::Xml.encode_reply(&reply(4, Some(101337), CaseState::Erso).to_reply()),
            b"<?xml version=\"1.0\"?>\n<response>\n  <params>\n    <port_id>4</port_id>\n    \
              <bin_id>101337</bin_id>\n    <case_state>ERSO</case_state>\n  </params>\n</response>\n"
        );
        assert_eq!(
            WireFormat::Json.encode_reply(&reply(4, None, CaseState::Noop).to_reply()),
            br#"{"params":{"port_id":4,"case_state":"NOOP"}}"#
        );
    }
}
