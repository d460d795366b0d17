//! One Log Publisher line to a typed [`Segment`]: a tag naming the event, then its parameters,
//! separated by commas (task-interface.md §3.3a). Only the AutoCase `AC` segment is read
//! (`AC,port_id,bin_id,case_state`, §3.3); every other tag is kept by name so it can be skipped.
//!
//! The parser is strict about what is documented, so a controller that sends something else is
//! seen (the line is an error naming the field) rather than guessed at:
//!
//! - the tag is exactly `AC`, upper case, with nothing around it; any other tag, `ac` included,
//!   is another segment;
//! - an `AC` segment has exactly four fields: a fifth is an error, not ignored;
//! - `port_id` and `bin_id` are decimal digits only (no sign, no spaces) within the task
//!   interface's ranges, 1–2000 and 1–4 000 000;
//! - `case_state` is one of the nine vendor state codes or `CR`, matched exactly.
//!
//! Inferred, as the vendor documents no segment without a bin: an empty `bin_id` field
//! (`AC,5,,NOOP`) means the segment names no bin, the most plausible form of a NOOP that follows
//! no operation. `0` is not read that way: it is outside the bin range, so it is an error.
//!
//! The simulator's Log Publisher writes segments with [`encode_autocase`], so both sides of the
//! stream share one definition of the format. This module does no I/O.

use crate::codec::shorten;
use crate::domain::{BIN_ID_RANGE, CaseEvent, CaseSignal, PORT_ID_RANGE};

/// The tag of the AutoCase segment.
pub const AUTOCASE_TAG: &str = "AC";

/// One Log Publisher segment, as read from one line (CRLF removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// An AutoCase `AC` segment: a port's case operation changed state, or the port asks for
    /// the operation to be cancelled (`CR`).
    AutoCase {
        /// What the segment says.
        event: CaseEvent,
        /// The line as received. A valid `AC` line is ASCII, so this is exact.
        raw: String,
    },
    /// Any other segment (`BD`, `AL`, …), and an empty line: kept only so it can be counted and
    /// skipped.
    Other {
        /// The tag: the text before the first comma, or the whole line if it has none.
        kind: String,
        /// The line as received; bytes that are not UTF-8 are replaced, as it is only logged.
        raw: String,
    },
}

/// An `AC` line that is not a valid AutoCase segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed AC segment '{line}': {problem}")]
pub struct SegmentError {
    /// The line, shortened, as text (lossy).
    pub line: String,
    /// What is wrong with it.
    pub problem: AcProblem,
}

/// What is wrong with an `AC` line; each field's text is kept, shortened, as text (lossy).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcProblem {
    /// Not four comma-separated fields.
    #[error("{found} fields, expected 4 (AC,port_id,bin_id,case_state)")]
    FieldCount {
        /// How many fields the line has.
        found: usize,
    },
    /// `port_id` is not a decimal integer in 1–2000.
    #[error("port_id '{0}' is not an integer in 1-2000")]
    PortId(String),
    /// `bin_id` is neither empty nor a decimal integer in 1–4 000 000.
    #[error("bin_id '{0}' is neither empty nor an integer in 1-4000000")]
    BinId(String),
    /// `case_state` is not a vendor state code or `CR`.
    #[error(
        "case_state '{0}' is not one of NOOP, EREQ, ERSO, ECMP, IREQ, IRTR, ICRC, ICIN, ICMP or CR"
    )]
    CaseState(String),
}

/// Reads one line, CRLF already removed and its length already capped by the caller.
///
/// Only an `AC` line can be an error: any other line is a [`Segment::Other`], whatever it holds.
pub fn parse_segment(line: &[u8]) -> Result<Segment, SegmentError> {
    let mut fields = line.split(|&byte| byte == b',');
    // `split` always yields at least one field, the empty one for an empty line.
    let tag = fields.next().unwrap_or_default();
    if tag != AUTOCASE_TAG.as_bytes() {
        return Ok(Segment::Other {
            kind: String::from_utf8_lossy(tag).into_owned(),
            raw: String::from_utf8_lossy(line).into_owned(),
        });
    }
    let malformed = |problem| SegmentError {
        line: shorten(&String::from_utf8_lossy(line)),
        problem,
    };
    let (Some(port_id), Some(bin_id), Some(case_state), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(malformed(AcProblem::FieldCount {
            found: line.split(|&byte| byte == b',').count(),
        }));
    };
    let port_id = parse_id(port_id, &PORT_ID_RANGE)
        .ok_or_else(|| malformed(AcProblem::PortId(field_text(port_id))))?;
    let bin_id = if bin_id.is_empty() {
        None
    } else {
        Some(
            parse_id(bin_id, &BIN_ID_RANGE)
                .ok_or_else(|| malformed(AcProblem::BinId(field_text(bin_id))))?,
        )
    };
    let signal = std::str::from_utf8(case_state)
        .ok()
        .and_then(CaseSignal::from_code)
        .ok_or_else(|| malformed(AcProblem::CaseState(field_text(case_state))))?;
    Ok(Segment::AutoCase {
        event: CaseEvent {
            port_id,
            bin_id,
            signal,
        },
        // Every field was checked to be ASCII digits or a code, so the line is ASCII.
        raw: String::from_utf8_lossy(line).into_owned(),
    })
}

/// Writes an event as an `AC` segment, without the CRLF that ends its line: `AC,5,10001,EREQ`,
/// or `AC,5,,NOOP` when it names no bin. [`parse_segment`] reads it back as the same event.
pub fn encode_autocase(event: &CaseEvent) -> String {
    let bin_id = event.bin_id.map(|bin_id| bin_id.to_string());
    format!(
        "{AUTOCASE_TAG},{},{},{}",
        event.port_id,
        bin_id.as_deref().unwrap_or(""),
        event.signal.code()
    )
}

/// A decimal id within `range`: ASCII digits only, so no sign, space or other script's digits.
fn parse_id(field: &[u8], range: &std::ops::RangeInclusive<u32>) -> Option<u32> {
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // ASCII digits are UTF-8; a value past `u32` does not parse and is out of range anyway.
    let value: u32 = std::str::from_utf8(field).ok()?.parse().ok()?;
    range.contains(&value).then_some(value)
}

fn field_text(field: &[u8]) -> String {
    shorten(&String::from_utf8_lossy(field))
}

#[cfg(test)]
mod tests;
