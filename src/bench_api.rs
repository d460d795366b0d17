//! Entry points for `benches/`, which can only reach the public API. Not a stable API: hidden
//! from the docs and changed with the benches. It exists so that the `status` mapping can be
//! measured without making `status` public.

use std::time::Duration;

use tonic::Status;

use crate::config::defaults;
use crate::status::{self, CallContext, CallError, RetryPolicy};
use crate::upstream::UpstreamError;

/// The call every mapping below is for.
const CONTEXT: CallContext = CallContext {
    method: "case_extract",
    port_id: 4,
    bin_id: Some(101337),
    reading_after: None,
};

const RETRY: RetryPolicy = RetryPolicy {
    delay: defaults::RETRY_DELAY,
};

/// The status a caller receives when the controller answers a case_extract with fault `code`.
pub fn fault_status(code: u32) -> Status {
    status::status(&CONTEXT, &CallError::Fault(code), RETRY)
}

/// The status a caller receives when the controller does not answer a case_extract within `limit`.
pub fn upstream_timeout_status(limit: Duration) -> Status {
    let timeout = CallError::Upstream(UpstreamError::Timeout { limit });
    status::status(&CONTEXT, &timeout, RETRY)
}
