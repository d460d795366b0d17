//! Request IDs: the caller's `x-request-id` when it is usable, else a fresh UUID. The call layer
//! (`call`) takes one for every request, puts it in the call's span and returns it in the
//! response metadata, on errors too; the controller receives it as well.

use std::fmt;

use tonic::codegen::http::HeaderValue;

/// The header carrying the request ID, both ways and towards the controller.
pub(crate) const HEADER: &str = crate::proto::REQUEST_ID_HEADER;

/// The longest caller-supplied ID we keep; a longer one is replaced, not truncated, so that two
/// different IDs never end up the same.
const MAX_LEN: usize = 128;

/// One call's request ID: the caller's, when it is printable ASCII of at most 128 bytes, or a
/// fresh UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestId(HeaderValue);

// === impl RequestId ===

impl RequestId {
    /// Keeps `caller`'s ID when it is usable, else makes a new one.
    pub(crate) fn from_caller(caller: Option<&HeaderValue>) -> Self {
        match caller {
            Some(value) if is_usable(value.as_bytes()) => RequestId(value.clone()),
            _ => RequestId::new(),
        }
    }

    /// A fresh random ID.
    pub(crate) fn new() -> Self {
        let mut text = [0_u8; uuid::fmt::Hyphenated::LENGTH];
        // Written straight into a buffer: `to_string` would go through `core::fmt`.
        uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
        // Owned by the `Bytes`, so that each copy (to the controller, into the response) only
        // counts a reference; bytes copied from a slice are moved to the heap again on first
        // clone. A UUID's text is ASCII hex and dashes, always a valid header value.
        let value = HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text));
        RequestId(value.unwrap_or(HeaderValue::from_static("invalid")))
    }

    /// The ID as a header value.
    pub(crate) fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    /// The ID as text.
    pub(crate) fn as_str(&self) -> &str {
        // Only printable ASCII is ever stored, so this cannot fail.
        self.0.to_str().unwrap_or_default()
    }
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Whether a caller's ID is kept as it is: 1–128 visible ASCII characters. The CLI checks its
/// `--request-id` with this, so an ID the gateway would replace is refused before it is sent.
pub fn is_usable(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.len() <= MAX_LEN && bytes.iter().all(|byte| byte.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(caller: &str, kept: bool) {
        let value = HeaderValue::from_str(caller).unwrap();
        let request_id = RequestId::from_caller(Some(&value));
        assert_eq!(request_id.as_str() == caller, kept, "{caller:?}");
    }

    #[test]
    fn usable_caller_ids_are_kept_and_others_replaced() {
        check("abc-123", true);
        check(&"x".repeat(128), true);
        check(&"x".repeat(129), false);
        check("has space", false);
        check("", false);
        check("tab\there", false);
    }

    #[test]
    fn fresh_ids_are_uuids() {
        let request_id = RequestId::from_caller(None);
        assert_eq!(request_id.as_str().len(), 36);
        assert_ne!(request_id, RequestId::new());
    }
}
