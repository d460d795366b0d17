//! Method calls of one shape (a method and its parameter names) differ only in their numbers, so
//! the bytes around the numbers are laid out once, by the encoder itself, and kept per thread:
//! encoding a call is then a few copies into a buffer of the right size.
//!
//! The layout is never written twice: a template is the encoder's output for the shape with a
//! marker byte where each number goes, cut at the markers.

use std::cell::RefCell;

use super::xml::encode_method_call;
use super::{Call, Element, MethodCall};

/// Stands where a number will go; it cannot be in a call the encoder wrote, so finding exactly
/// one per parameter proves the cut is right.
const MARKER: u8 = 0x01;

/// Shapes a thread keeps; calls of any other shape are encoded from scratch.
const MAX_TEMPLATES: usize = 32;

/// The bytes of every call of one shape, but its numbers.
#[derive(Debug)]
struct Template {
    method: String,
    names: Vec<String>,
    /// The text before the first number, between numbers, and after the last.
    segments: Vec<Vec<u8>>,
    /// Their total length.
    fixed: usize,
}

impl Template {
    /// The template of `call`'s shape; `None` if the shape itself holds the marker byte.
    fn new(call: &Call<'_>) -> Option<Template> {
        let marker = char::from(MARKER).to_string();
        let shape = MethodCall {
            name: call.method.to_owned(),
            params: call
                .params
                .iter()
                .map(|(name, _)| Element::leaf(name, &marker))
                .collect(),
        };
        let document = encode_method_call(&shape);
        let segments: Vec<Vec<u8>> = document
            .split(|byte| *byte == MARKER)
            .map(<[u8]>::to_vec)
            .collect();
        if segments.len() != call.params.len() + 1 {
            return None;
        }
        Some(Template {
            method: call.method.to_owned(),
            names: call
                .params
                .iter()
                .map(|(name, _)| (*name).to_owned())
                .collect(),
            fixed: segments.iter().map(Vec::len).sum(),
            segments,
        })
    }

    fn fits(&self, call: &Call<'_>) -> bool {
        self.method == call.method
            && self.names.len() == call.params.len()
            && self
                .names
                .iter()
                .zip(call.params)
                .all(|(name, (param, _))| name == param)
    }

    /// `call`, whose shape this is, in a buffer of exactly its size.
    fn encode(&self, call: &Call<'_>) -> Vec<u8> {
        let digits: usize = call
            .params
            .iter()
            .map(|(_, value)| decimal_length(*value))
            .sum();
        let mut out = Vec::with_capacity(self.fixed + digits);
        let mut buffer = itoa::Buffer::new();
        for (segment, (_, value)) in self.segments.iter().zip(call.params) {
            out.extend_from_slice(segment);
            out.extend_from_slice(buffer.format(*value).as_bytes());
        }
        if let Some(last) = self.segments.last() {
            out.extend_from_slice(last);
        }
        out
    }
}

fn decimal_length(value: u32) -> usize {
    value.checked_ilog10().map_or(1, |log| log as usize + 1)
}

/// Encodes `call` from its shape's template, made on this thread's first call of that shape.
pub(super) fn encode_call(call: &Call<'_>) -> Option<Vec<u8>> {
    thread_local! {
        static TEMPLATES: RefCell<Vec<Template>> = const { RefCell::new(Vec::new()) };
    }
    TEMPLATES.with(|templates| {
        let mut templates = templates.try_borrow_mut().ok()?;
        if let Some(template) = templates.iter().find(|template| template.fits(call)) {
            return Some(template.encode(call));
        }
        if templates.len() >= MAX_TEMPLATES {
            return None;
        }
        let template = Template::new(call)?;
        let encoded = template.encode(call);
        templates.push(template);
        Some(encoded)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_lengths() {
        for value in [0, 9, 10, 99, 100, 101_337, 4_000_000, u32::MAX] {
            assert_eq!(decimal_length(value), value.to_string().len(), "{value}");
        }
    }

    #[test]
    fn a_shape_holding_the_marker_has_no_template() {
        let call = Call {
            method: "odd\u{1}name",
            params: &[("port_id", 4)],
        };
        assert!(Template::new(&call).is_none());
    }
}
