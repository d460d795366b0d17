//! Entry points for `benches/` and measuring tests, which can only reach the public API. Not a
//! stable API: hidden from the docs and changed with them. It exists so that the `status`
//! mapping and the idempotency store can be measured without making them public.

use std::num::NonZeroUsize;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use crate::config::defaults;
use crate::idempotency::{Answer, Claim, Ending, Lease, Method, Params, Store};
use crate::metrics::EntryGauges;
use crate::status::{self, CallContext, CallError, RetryPolicy};
use crate::upstream::UpstreamError;

/// How long after a call was sent the gateway believes a port showing it not acted on
/// (`idempotency::NOT_ACTED_BELIEVED_FOR`), for the chaos controller to run its ports around.
pub const NOT_ACTED_BELIEVED_FOR: Duration = crate::idempotency::NOT_ACTED_BELIEVED_FOR;

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

/// An idempotency store holding `count` entries in flight, its largest state (each holds the
/// watch channel its repeats would wait on): the `request_id`s 0 to `count - 1`, each claimed
/// and its lease forgotten, so that the store alone holds what an entry costs. Kept for as long
/// as the returned value lives.
pub fn idempotency_store_in_flight(count: NonZeroUsize) -> impl std::fmt::Debug {
    idempotency_store(count, |lease, _| std::mem::forget(lease))
}

/// An idempotency store holding `count` answered entries (OK), the state most of a busy table is
/// in: the `request_id`s 0 to `count - 1`, each claimed and its call ended, so that each holds
/// its place in the hash map and in the ordered index of OKs, and no watch channel. Kept for as
/// long as the returned value lives.
pub fn idempotency_store_answered(count: NonZeroUsize) -> impl std::fmt::Debug {
    idempotency_store(count, |lease, now| {
        lease.end(Ending::Answered(Answer::Ok), now);
    })
}

/// A store of `count` entries, the `request_id`s 0 to `count - 1`, each claimed and its lease
/// then given to `settle`.
fn idempotency_store(count: NonZeroUsize, settle: impl Fn(Lease, Instant)) -> Store {
    let store = Store::new(defaults::IDEMPOTENCY_WINDOW, count, EntryGauges::default());
    let params = Params {
        method: Method::CaseExtract,
        port_id: 4,
        bin_id: 101337,
    };
    let now = Instant::now();
    for request_id in 0..count.get() as u128 {
        match store.claim(request_id, params, None, now).0 {
            Claim::Call(lease) => settle(lease, now),
            other => panic!("a new id in a store with room is called, not {other:?}"),
        }
    }
    store
}
