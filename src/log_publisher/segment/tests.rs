//! Unit tests of the segment parser: a line in, a `Segment` or a `SegmentError` out.

use super::*;
use crate::domain::CaseState;

fn check(line: &[u8], expected: Result<Segment, SegmentError>) {
    assert_eq!(
        parse_segment(line),
        expected,
        "line {:?}",
        String::from_utf8_lossy(line)
    );
}

fn autocase(line: &str, port_id: u32, bin_id: Option<u32>, signal: CaseSignal) -> Segment {
    Segment::AutoCase {
        event: CaseEvent {
            port_id,
            bin_id,
            signal,
        },
        raw: line.to_owned(),
    }
}

fn state(case_state: CaseState) -> CaseSignal {
    CaseSignal::State(case_state)
}

fn other(kind: &str, raw: &str) -> Result<Segment, SegmentError> {
    Ok(Segment::Other {
        kind: kind.to_owned(),
        raw: raw.to_owned(),
    })
}

fn malformed(line: &str, problem: AcProblem) -> Result<Segment, SegmentError> {
    Err(SegmentError {
        line: line.to_owned(),
        problem,
    })
}

/// An `AC` line that must be refused for `problem`.
fn check_malformed(line: &str, problem: AcProblem) {
    check(line.as_bytes(), malformed(line, problem));
}

#[test]
fn the_documented_examples() {
    check(
        b"AC,5,10001,EREQ",
        Ok(autocase(
            "AC,5,10001,EREQ",
            5,
            Some(10001),
            state(CaseState::Ereq),
        )),
    );
    check(
        b"AC,5,10001,ECMP",
        Ok(autocase(
            "AC,5,10001,ECMP",
            5,
            Some(10001),
            state(CaseState::Ecmp),
        )),
    );
    check(
        b"AC,5,10001,CR",
        Ok(autocase(
            "AC,5,10001,CR",
            5,
            Some(10001),
            CaseSignal::CancelRequest,
        )),
    );
}

#[test]
fn every_state_and_the_range_ends() {
    for case_state in CaseState::ALL {
        let line = format!("AC,2000,4000000,{}", case_state.code());
        check(
            line.as_bytes(),
            Ok(autocase(&line, 2000, Some(4_000_000), state(case_state))),
        );
    }
    check(
        b"AC,1,1,NOOP",
        Ok(autocase("AC,1,1,NOOP", 1, Some(1), state(CaseState::Noop))),
    );
    // Inferred: an empty bin field names no bin.
    check(
        b"AC,5,,NOOP",
        Ok(autocase("AC,5,,NOOP", 5, None, state(CaseState::Noop))),
    );
    // Leading zeros are still decimal.
    check(
        b"AC,005,0010001,ERSO",
        Ok(autocase(
            "AC,005,0010001,ERSO",
            5,
            Some(10001),
            state(CaseState::Erso),
        )),
    );
}

#[test]
fn other_segments_are_kept_by_tag() {
    check(b"BD,10001,330,AC", other("BD", "BD,10001,330,AC"));
    check(b"AL,NOC", other("AL", "AL,NOC"));
    check(b"XY", other("XY", "XY"));
    check(b"", other("", ""));
    check(b",,,", other("", ",,,"));
    // The tag is matched exactly: these are not AC segments, whatever follows.
    check(b"ac,5,10001,EREQ", other("ac", "ac,5,10001,EREQ"));
    check(b" AC,5,10001,EREQ", other(" AC", " AC,5,10001,EREQ"));
    check(b"ACX,5,10001,EREQ", other("ACX", "ACX,5,10001,EREQ"));
    check(b"AC ,5,10001,EREQ", other("AC ", "AC ,5,10001,EREQ"));
    // Bytes that are not UTF-8 are replaced in what is kept, never an error.
    check(b"\xFFZ,1", other("\u{FFFD}Z", "\u{FFFD}Z,1"));
    check("ÆØ,å".as_bytes(), other("ÆØ", "ÆØ,å"));
}

#[test]
fn field_counts_other_than_four() {
    let count = |line: &str, found| check_malformed(line, AcProblem::FieldCount { found });
    count("AC", 1);
    count("AC,", 2);
    count("AC,5", 2);
    count("AC,5,10001", 3);
    count("AC,5,10001,EREQ,", 5);
    count("AC,5,10001,EREQ,extra", 5);
    count("AC,5,10001,EREQ,2024-12-25T12:00:00Z,7", 6);
    count("AC,,,,,,,,,,,,", 13);
}

#[test]
fn bad_ids() {
    let port_ids = [
        "",
        "0",
        "2001",
        "-5",
        "+5",
        " 5",
        "5 ",
        "5.0",
        "0x5",
        "4294967295",
        "4294967296",
        "99999999999999999999999999",
        "５",
    ];
    for port_id in port_ids {
        let line = format!("AC,{port_id},10001,EREQ");
        check_malformed(&line, AcProblem::PortId(port_id.to_owned()));
    }
    for bin_id in ["0", "4000001", "-1", " ", "1e3", "4294967296", "١٢"] {
        let line = format!("AC,5,{bin_id},EREQ");
        check_malformed(&line, AcProblem::BinId(bin_id.to_owned()));
    }
}

#[test]
fn unknown_states() {
    for code in [
        "", "ereq", "Ereq", "EREQ ", " EREQ", "EREQ\r", "EREQ\n", "ECAN", "C", "CRR", "NOOP\0",
        "ÉREQ",
    ] {
        let line = format!("AC,5,10001,{code}");
        check_malformed(&line, AcProblem::CaseState(code.to_owned()));
    }
    // A field that is not UTF-8 is named lossily.
    check(
        b"AC,5,10001,ER\xFFQ",
        malformed(
            "AC,5,10001,ER\u{FFFD}Q",
            AcProblem::CaseState("ER\u{FFFD}Q".to_owned()),
        ),
    );
}

#[test]
fn the_first_bad_field_is_the_one_named() {
    check(
        b"AC,0,0,XX",
        malformed("AC,0,0,XX", AcProblem::PortId("0".to_owned())),
    );
    check(
        b"AC,1,0,XX",
        malformed("AC,1,0,XX", AcProblem::BinId("0".to_owned())),
    );
}

#[test]
fn long_lines_are_shortened_in_errors() {
    let line = format!("AC,5,10001,{}", "E".repeat(5000));
    let Err(error) = parse_segment(line.as_bytes()) else {
        panic!("expected an error");
    };
    assert_eq!(error.line.chars().count(), 41);
    let AcProblem::CaseState(code) = &error.problem else {
        panic!("{error:?}");
    };
    assert_eq!(code.chars().count(), 41);
    assert_eq!(
        error.to_string(),
        format!(
            "malformed AC segment '{}…': case_state '{}…' is not one of NOOP, EREQ, ERSO, ECMP, \
             IREQ, IRTR, ICRC, ICIN, ICMP or CR",
            &line[..40],
            "E".repeat(40)
        )
    );
}

#[test]
fn encoded_events_read_back_as_themselves() {
    let signals = CaseState::ALL
        .into_iter()
        .map(CaseSignal::State)
        .chain([CaseSignal::CancelRequest]);
    for signal in signals {
        for (port_id, bin_id) in [
            (1, Some(1)),
            (5, Some(10001)),
            (2000, Some(4_000_000)),
            (7, None),
        ] {
            let event = CaseEvent {
                port_id,
                bin_id,
                signal,
            };
            let line = encode_autocase(&event);
            check(
                line.as_bytes(),
                Ok(Segment::AutoCase {
                    event,
                    raw: line.clone(),
                }),
            );
        }
    }
    let event = CaseEvent {
        port_id: 5,
        bin_id: Some(10001),
        signal: state(CaseState::Ereq),
    };
    assert_eq!(encode_autocase(&event), "AC,5,10001,EREQ");
    let no_bin = CaseEvent {
        bin_id: None,
        signal: state(CaseState::Noop),
        ..event
    };
    assert_eq!(encode_autocase(&no_bin), "AC,5,,NOOP");
}

/// Bytes from the stream must never panic the parser, and a line that parses as `AC` is kept
/// exactly: every truncation of some valid lines, and every one-byte change of them to a byte
/// that matters to the format (separators, line ends, digits, letters, NUL, non-ASCII), every
/// byte deleted and every byte doubled.
#[test]
fn edited_lines_never_panic() {
    let lines: [&[u8]; 4] = [
        b"AC,5,10001,EREQ",
        b"AC,2000,4000000,CR",
        b"AC,12,,NOOP",
        b"BD,10001,330,AC",
    ];
    let replacements = b",\r\n \x000919AEZcr\x7F\xC3\xFF";
    let parse = |line: &[u8]| {
        if let Ok(Segment::AutoCase { raw, .. }) = parse_segment(line) {
            assert_eq!(raw.as_bytes(), line);
        }
    };
    for line in lines {
        for end in 0..=line.len() {
            parse(&line[..end]);
        }
        for position in 0..line.len() {
            for &byte in replacements {
                let mut edited = line.to_vec();
                edited[position] = byte;
                parse(&edited);
            }
            let mut deleted = line.to_vec();
            deleted.remove(position);
            parse(&deleted);
            let mut doubled = line.to_vec();
            doubled.insert(position, line[position]);
            parse(&doubled);
        }
    }
}
