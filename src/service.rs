//! The `TaskService` implementation: validate the request, work out the time limit, call the
//! controller, read its reply, and hand every outcome to `status`. Every unary RPC takes the one
//! generic path ([`TaskGateway::unary`]); a handler only says which method it calls with which
//! port and bin, and what a success reply becomes. The request ID, the span, the metrics and the
//! access line are the call layer's (`call`); a handler only leaves it what it learned.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use tonic::{Request, Response, Status};

use crate::call::{CallNotes, CallScope};
use tonic::metadata::MetadataValue;
use uuid::Uuid;

use crate::codec::{Call, CaseStateReply, DecodeError, Element, Reply};
use crate::domain::{BIN_ID_RANGE, CaseSignal, CaseState, PORT_ID_RANGE};
use crate::fault;
use crate::idempotency::{self, Answer, Claim, Ending, Method, Params, Store, Verdict};
use crate::metrics::{IdempotencyMetrics, Metrics};
use crate::proto::task_service_server::TaskService;
use crate::proto::{
    self, CaseCancelRequest, CaseCancelResponse, CaseExtractRequest, CaseExtractResponse,
    CaseGetStateRequest, CaseGetStateResponse, REPLAYED_HEADER, WatchCaseEventsRequest,
};
use crate::protocol::{GRPC_TIMEOUT_NAME, parse_grpc_timeout};
use crate::request_id::RequestId;
use crate::status::{self, CallContext, CallError, RetryPolicy, Violation};
use crate::upstream::{self, Upstream, UpstreamError};
use crate::watch::{ReceivedEvent, Subscription, WatchEnd, Watches};

/// The gateway's `TaskService`: cheap to clone, shared by every connection.
#[derive(Debug, Clone)]
pub(crate) struct TaskGateway {
    /// The controller client; its pool is shared by every call.
    upstream: Upstream,
    /// The cap on one controller call, whatever the caller's deadline.
    upstream_timeout: Duration,
    /// What goes into `RetryInfo`.
    retry: RetryPolicy,
    /// One permit per call allowed in flight; a call that finds none is shed at once, because
    /// queueing would only make every caller's deadline expire together.
    in_flight: Arc<Semaphore>,
    /// The case-event watches, unless the gateway runs without a Log Publisher.
    watches: Option<Watches>,
    /// What the gateway remembers of each CaseExtract and CaseCancel `request_id`. Kept here,
    /// not in a layer as work every call needs is: only these two RPCs take one, and what a
    /// repeat does depends on how the controller answered, which only the handler knows.
    idempotency: Store,
    /// The idempotency store's series.
    idempotency_metrics: IdempotencyMetrics,
}

/// The message's `request_id` field: the idempotency key of CaseExtract and CaseCancel.
struct IdempotencyKey {
    method: Method,
    text: String,
}

/// How a repeat was answered without calling the controller again: the value of the
/// [`REPLAYED_HEADER`] header.
#[derive(Debug, Clone, Copy)]
enum Replayed {
    /// From the store: the first call's answer.
    Stored,
    /// After an unknown outcome, from the port's state, which shows the first call accepted.
    Resolved,
}

/// A call with an idempotency key, as [`TaskGateway::call_once`] needs it.
struct Once<'a> {
    context: &'a CallContext,
    params: Params,
    request_id: Uuid,
    /// When the gateway received the call: the caller's deadline counts from then.
    started: Instant,
    caller_deadline: Option<Duration>,
}

/// The events of one WatchCaseEvents call, ending with the status that ends it.
type CaseEventStream = Pin<Box<dyn Stream<Item = Result<proto::CaseEvent, Status>> + Send>>;

// === impl TaskGateway ===

impl TaskGateway {
    /// A service that calls `upstream` with the limits in `settings`, and serves case events
    /// from `watches`.
    pub(crate) fn new(
        upstream: Upstream,
        settings: &upstream::Settings,
        watches: Option<Watches>,
        metrics: &Metrics,
    ) -> Self {
        TaskGateway {
            upstream,
            upstream_timeout: settings.timeout,
            retry: RetryPolicy {
                delay: settings.retry_delay,
            },
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight.get())),
            watches,
            idempotency: Store::new(
                settings.idempotency_window,
                settings.idempotency_max_entries,
                metrics.idempotency().entry_gauges(),
            ),
            idempotency_metrics: metrics.idempotency().clone(),
        }
    }

    /// The path of every unary RPC: validate the port and bin `context_of` reads from the
    /// message (and the idempotency key, on the methods that take one), take an in-flight
    /// permit, call the controller within the time limit (at most once per key), turn its
    /// success reply into the response with `read_reply`, leave the call layer its notes, and
    /// hand any failure to `status`. Generic, not boxed: each RPC compiles to its own copy of
    /// this, which does the work CaseExtract's own body did and no more.
    ///
    /// The checks run when this is called, before the future it returns is first polled, which is
    /// at once (the handler awaits it): written as an `async fn`, the future would also hold the
    /// request and the key it has already read for as long as the call lasts.
    fn unary<Message, Output: Default>(
        &self,
        request: Request<Message>,
        context_of: impl FnOnce(Message) -> (CallContext, Option<IdempotencyKey>),
        read_reply: impl FnOnce(&CallContext, Element) -> Result<Output, DecodeError>,
    ) -> impl Future<Output = Result<Response<Output>, Status>> {
        let started = Instant::now();
        let caller_deadline = caller_deadline(&request);
        let scope = call_scope(&request);
        let (context, key) = context_of(request.into_inner());
        // Held until the call ends; dropped with the future if the caller goes away.
        let permit = self.in_flight.try_acquire();
        let mut violations = validate(context.port_id, context.bin_id)
            .err()
            .unwrap_or_default();
        let key = match key.map(|key| (key.method, parse_request_id(&key.text))) {
            Some((method, Ok(Some(request_id)))) => Some((method, request_id)),
            Some((_, Err(violation))) => {
                violations.push(violation);
                None
            }
            Some((_, Ok(None))) | None => None,
        };
        async move {
            let mut replayed = None;
            let (upstream_time, outcome) = match (permit, violations.is_empty()) {
                (Err(_), _) => (None, Err(CallError::Overloaded)),
                (Ok(_), false) => (None, Err(CallError::InvalidArgument(violations))),
                (Ok(_permit), true) => match (key, context.bin_id) {
                    (Some((method, request_id)), Some(bin_id)) => {
                        let params = Params {
                            method,
                            port_id: context.port_id,
                            bin_id,
                        };
                        let once = Once {
                            context: &context,
                            params,
                            request_id,
                            started,
                            caller_deadline,
                        };
                        // Boxed: inline, this rarer path would make every call's future about a
                        // quarter larger (docs/performance.md).
                        Box::pin(self.call_once(
                            &once,
                            &scope.request_id,
                            &mut replayed,
                            read_reply,
                        ))
                        .await
                    }
                    _ => {
                        self.call(&context, &scope.request_id, caller_deadline, read_reply)
                            .await
                    }
                },
            };
            scope.note(CallNotes {
                port_id: Some(context.port_id),
                bin_id: context.bin_id,
                // A replayed fault is counted once, when the controller sent it.
                fault_code: match &outcome {
                    Err(CallError::Fault(code)) if replayed.is_none() => Some(*code),
                    _ => None,
                },
                upstream_time,
                upstream_error: match &outcome {
                    Err(CallError::Upstream(upstream_error)) => Some(upstream_error.kind()),
                    _ => None,
                },
                idempotency_key: key.map(|(_, request_id)| request_id),
                replayed: replayed.map(Replayed::as_str),
            });
            let mut answer = outcome
                .map(Response::new)
                .map_err(|call_error| status::status(&context, &call_error, self.retry));
            if let Some(replayed) = replayed {
                let value = MetadataValue::from_static(replayed.as_str());
                match &mut answer {
                    Ok(response) => response.metadata_mut().insert(REPLAYED_HEADER, value),
                    Err(status) => status.metadata_mut().insert(REPLAYED_HEADER, value),
                };
            }
            answer
        }
    }

    /// Calls the controller at most once for `once.request_id`: the first call with it calls,
    /// a repeat waits for a call in flight, gets the answer the controller gave, or, after an
    /// unknown outcome, reads the port before calling again. Sets `replayed` when the answer
    /// comes without calling the controller's method.
    async fn call_once<Output: Default>(
        &self,
        once: &Once<'_>,
        request_id: &RequestId,
        replayed: &mut Option<Replayed>,
        read_reply: impl FnOnce(&CallContext, Element) -> Result<Output, DecodeError>,
    ) -> (Option<Duration>, Result<Output, CallError>) {
        let key = once.request_id.as_u128();
        let mut first_claim = true;
        // What the port showed when this call is a resend after an unknown outcome.
        let mut resent = None;
        // When a call this one waited for, which ended with an unknown outcome, was sent.
        let mut told_unknown = None;
        loop {
            let (claim, counts) =
                self.idempotency
                    .claim(key, once.params, told_unknown, Instant::now());
            if counts.hit && first_claim {
                self.idempotency_metrics.hit();
            }
            self.idempotency_metrics
                .evicted(counts.evicted_faults, counts.evicted_oks);
            first_claim = false;
            let mut lease = match claim {
                Claim::Call(lease) => lease,
                Claim::Full {
                    max_entries,
                    window,
                } => {
                    self.idempotency_metrics.refused();
                    let full = CallError::IdempotencyTableFull {
                        request_id: once.request_id,
                        max_entries: max_entries.get(),
                        window,
                    };
                    return (None, Err(full));
                }
                Claim::Reused(first) => {
                    let request_id = once.request_id;
                    return (None, Err(CallError::RequestIdReused { request_id, first }));
                }
                Claim::Replay(answer) => {
                    self.idempotency_metrics.replayed();
                    *replayed = Some(Replayed::Stored);
                    return (None, replay(answer));
                }
                Claim::Wait {
                    ending: mut first_call,
                    sent,
                } => {
                    let Some(time_left) = once.time_left(self.upstream_timeout) else {
                        let request_id = once.request_id;
                        return (None, Err(CallError::RequestInProgress { request_id }));
                    };
                    // The ending is taken from the lease, not looked up again: the entry may be
                    // evicted as soon as the first call ends.
                    let ended = first_call.wait_for(Option::is_some);
                    let ending = match tokio::time::timeout(time_left, ended).await {
                        Err(_) => {
                            let request_id = once.request_id;
                            return (None, Err(CallError::RequestInProgress { request_id }));
                        }
                        Ok(Ok(ending)) => ending.unwrap_or(Ending::Unknown),
                        // A lease always sends its ending before it goes; if not, assume the
                        // worst.
                        Ok(Err(_)) => Ending::Unknown,
                    };
                    match ending {
                        Ending::Answered(answer) => {
                            self.idempotency_metrics.replayed();
                            *replayed = Some(Replayed::Stored);
                            return (None, replay(answer));
                        }
                        Ending::Unknown => told_unknown = Some(sent),
                        Ending::NothingSent => {}
                    }
                    continue;
                }
                Claim::Resolve(lease) => match self.read_port(once, request_id).await {
                    Ok(reply) => {
                        let elapsed = lease
                            .unknown_since()
                            .map(|since| since.elapsed())
                            .unwrap_or_default();
                        let verdict = idempotency::judge(
                            once.params,
                            reply.bin_id,
                            reply.case_state,
                            elapsed,
                        );
                        let too_late = match verdict {
                            Verdict::TooLate(elapsed) => Some(elapsed),
                            _ => None,
                        };
                        match verdict {
                            Verdict::NotActed => {
                                self.idempotency_metrics.resolved("not_acted");
                                resent = Some((reply.bin_id, reply.case_state));
                                lease
                            }
                            Verdict::Accepted => {
                                self.idempotency_metrics.resolved("accepted");
                                lease.end(Ending::Answered(Answer::Ok), Instant::now());
                                *replayed = Some(Replayed::Resolved);
                                return (None, Ok(Output::default()));
                            }
                            Verdict::Unclear | Verdict::TooLate(_) => {
                                self.idempotency_metrics.resolved("unresolved");
                                lease.end(Ending::Unknown, Instant::now());
                                let unknown = CallError::OutcomeUnknown {
                                    request_id: once.request_id,
                                    bin_id: reply.bin_id,
                                    case_state: reply.case_state,
                                    too_late,
                                };
                                return (None, Err(unknown));
                            }
                        }
                    }
                    Err(error) => {
                        self.idempotency_metrics.resolved("read_failed");
                        lease.end(Ending::Unknown, Instant::now());
                        let reading = CallError::ReadingThePort {
                            request_id: once.request_id,
                            error: Box::new(error),
                        };
                        return (None, Err(reading));
                    }
                },
            };
            let caller_deadline = once.deadline_left();
            // A caller gone before this point sent nothing, and its lease forgets the id. From
            // here it counts as sent, though `call` first awaits the connection to the
            // controller (and its one retry of a failed connect): a caller gone during the
            // connect leaves the outcome unknown although nothing was sent, the safe side, as
            // the lease cannot see how far the request got.
            lease.sending();
            let (upstream_time, outcome) = self
                .call(once.context, request_id, caller_deadline, read_reply)
                .await;
            lease.end(ending(&outcome), Instant::now());
            if let Some((bin_id, case_state)) = resent {
                // Only an answer of OK settles a resend: any failure leaves the first call's
                // outcome unknown (`idempotency::resent_ending`).
                let outcome = outcome.map_err(|resend| CallError::ResendInconclusive {
                    request_id: once.request_id,
                    bin_id,
                    case_state,
                    resend: Box::new(resend),
                });
                return (upstream_time, outcome);
            }
            return (upstream_time, outcome);
        }
    }
    /// Reads the port of `once` with `case_getstate`, after a call whose outcome was unknown.
    async fn read_port(
        &self,
        once: &Once<'_>,
        request_id: &RequestId,
    ) -> Result<CaseStateReply, CallError> {
        let context = CallContext {
            method: "case_getstate",
            port_id: once.context.port_id,
            bin_id: None,
            reading_after: None,
        };
        let read = |context: &CallContext, params: Element| {
            CaseStateReply::from_params(&params)?.about_port(context.port_id)
        };
        self.call(&context, request_id, once.deadline_left(), read)
            .await
            .1
    }

    /// Calls the controller and reads its success reply with `read_reply`; also returns how long
    /// the controller took, when it was called. A reply `read_reply` refuses is a bad response,
    /// like any other reply the gateway cannot trust.
    async fn call<Output>(
        &self,
        context: &CallContext,
        request_id: &RequestId,
        caller_deadline: Option<Duration>,
        read_reply: impl FnOnce(&CallContext, Element) -> Result<Output, DecodeError>,
    ) -> (Option<Duration>, Result<Output, CallError>) {
        let Some(time_limit) = time_limit(caller_deadline, self.upstream_timeout) else {
            let deadline = caller_deadline.unwrap_or_default();
            return (None, Err(CallError::DeadlineTooShort { deadline }));
        };
        tracing::debug!(
            method = context.method,
            time_limit_ms = time_limit.as_millis() as u64,
            "calling the controller"
        );
        // The parameters every AutoCase method takes, in the documented order, on the stack.
        let port_and_bin;
        let port_only;
        let params: &[(&str, u32)] = match context.bin_id {
            Some(bin_id) => {
                port_and_bin = [("port_id", context.port_id), ("bin_id", bin_id)];
                &port_and_bin
            }
            None => {
                port_only = [("port_id", context.port_id)];
                &port_only
            }
        };
        let call = Call {
            method: context.method,
            params,
        };
        let started = Instant::now();
        let reply = self.upstream.call(&call, request_id, time_limit).await;
        let upstream_time = started.elapsed();
        let outcome = match reply {
            Ok(Reply::Success(params)) => read_reply(context, params)
                .map_err(|error| CallError::Upstream(UpstreamError::BadResponse(error))),
            Ok(Reply::Fault(code)) => Err(CallError::Fault(code)),
            Err(upstream_error) => Err(CallError::Upstream(upstream_error)),
        };
        (Some(upstream_time), outcome)
    }
}

// === impl Once ===

impl Once<'_> {
    /// What is left of the caller's deadline, as `call` takes it.
    fn deadline_left(&self) -> Option<Duration> {
        self.caller_deadline
            .map(|deadline| deadline.saturating_sub(self.started.elapsed()))
    }

    /// How long a repeat may wait for the first call, as long as it could call the controller.
    fn time_left(&self, upstream_timeout: Duration) -> Option<Duration> {
        time_limit(self.deadline_left(), upstream_timeout)
    }
}

// === impl Replayed ===

impl Replayed {
    fn as_str(self) -> &'static str {
        match self {
            Replayed::Stored => "stored",
            Replayed::Resolved => "resolved",
        }
    }
}

/// The answer a repeat gets from the store.
fn replay<Output: Default>(answer: Answer) -> Result<Output, CallError> {
    match answer {
        Answer::Ok => Ok(Output::default()),
        Answer::Fault(code) => Err(CallError::Fault(code)),
    }
}

/// What the store keeps of how a call ended. An answer is kept only when the controller gave
/// it and a retry would not change it: fault 1148 and the gateway's own refusals say the
/// controller started nothing, so a repeat calls again, as a retry of them should. A fault
/// whose row says the controller may have acted (codes outside the vendor's list) leaves the
/// outcome unknown, so a repeat reads the port first.
fn ending<Output>(outcome: &Result<Output, CallError>) -> Ending {
    match outcome {
        Ok(_) => Ending::Answered(Answer::Ok),
        Err(CallError::Fault(code)) => {
            let retry = fault::classify(*code).retry();
            if retry.kept_for_repeats() {
                Ending::Answered(Answer::Fault(*code))
            } else if retry.controller_may_have_acted() {
                Ending::Unknown
            } else {
                Ending::NothingSent
            }
        }
        Err(CallError::Upstream(error)) if status::may_have_acted(error) => Ending::Unknown,
        Err(_) => Ending::NothingSent,
    }
}

/// The idempotency key in a message's `request_id`, as [`idempotency::parse_key`] reads it; the
/// violation quotes at most 40 characters of it.
fn parse_request_id(text: &str) -> Result<Option<Uuid>, Violation> {
    idempotency::parse_key(text).map_err(|error| {
        const MAX_QUOTED_CHARS: usize = 40;
        let shown = match error {
            idempotency::KeyError::Nil => text.to_owned(),
            idempotency::KeyError::NotAUuid => {
                let mut quoted: String = text.chars().take(MAX_QUOTED_CHARS).collect();
                if quoted.len() < text.len() {
                    quoted.push('…');
                }
                format!("{quoted:?}")
            }
        };
        Violation {
            field: "request_id",
            description: format!("request_id {shown} {error}"),
        }
    })
}

/// The call context and idempotency key of a method that takes a port, a bin and a `request_id`.
fn keyed(
    method: Method,
    port_id: u32,
    bin_id: u32,
    request_id: String,
) -> (CallContext, Option<IdempotencyKey>) {
    let context = CallContext {
        method: method.name(),
        port_id,
        bin_id: Some(bin_id),
        reading_after: None,
    };
    let key = IdempotencyKey {
        method,
        text: request_id,
    };
    (context, Some(key))
}

#[tonic::async_trait]
impl TaskService for TaskGateway {
    async fn case_extract(
        &self,
        request: Request<CaseExtractRequest>,
    ) -> Result<Response<CaseExtractResponse>, Status> {
        let context_of =
            |CaseExtractRequest {
                 port_id,
                 bin_id,
                 request_id,
             }| keyed(Method::CaseExtract, port_id, bin_id, request_id);
        // `case_extract` has no response parameters; whatever `<params>` holds is not read.
        self.unary(request, context_of, |_, _| Ok(CaseExtractResponse {}))
            .await
    }

    async fn case_cancel(
        &self,
        request: Request<CaseCancelRequest>,
    ) -> Result<Response<CaseCancelResponse>, Status> {
        let context_of =
            |CaseCancelRequest {
                 port_id,
                 bin_id,
                 request_id,
             }| keyed(Method::CaseCancel, port_id, bin_id, request_id);
        // Like `case_extract`, `case_cancel` has no response parameters.
        self.unary(request, context_of, |_, _| Ok(CaseCancelResponse {}))
            .await
    }

    async fn case_get_state(
        &self,
        request: Request<CaseGetStateRequest>,
    ) -> Result<Response<CaseGetStateResponse>, Status> {
        let context_of = |CaseGetStateRequest { port_id }| {
            let context = CallContext {
                method: "case_getstate",
                port_id,
                bin_id: None,
                reading_after: None,
            };
            (context, None)
        };
        self.unary(request, context_of, |context, params| {
            let reply = CaseStateReply::from_params(&params)?.about_port(context.port_id)?;
            Ok(CaseGetStateResponse {
                port_id: reply.port_id,
                bin_id: reply.bin_id,
                state: proto_case_state(reply.case_state) as i32,
                raw_state: reply.case_state.code().to_owned(),
            })
        })
        .await
    }

    type WatchCaseEventsStream = CaseEventStream;

    async fn watch_case_events(
        &self,
        request: Request<WatchCaseEventsRequest>,
    ) -> Result<Response<Self::WatchCaseEventsStream>, Status> {
        let started = Instant::now();
        let caller_deadline = caller_deadline(&request);
        let scope = call_scope(&request);
        let WatchCaseEventsRequest { port_ids } = request.into_inner();
        // The access line names the port when the watch is of one.
        scope.note(CallNotes {
            port_id: match port_ids.as_slice() {
                [port_id] => Some(*port_id),
                _ => None,
            },
            ..CallNotes::default()
        });
        let violations: Vec<Violation> = port_ids
            .iter()
            .filter_map(|port_id| check_range("port_ids", *port_id, &PORT_ID_RANGE))
            .collect();
        if !violations.is_empty() {
            return Err(status::watch_invalid_ports(&violations));
        }
        let refused = |end| status::watch_ended(&end, self.retry);
        let watches = self
            .watches
            .as_ref()
            .ok_or_else(|| refused(WatchEnd::Disabled))?;
        let subscription = watches.subscribe(port_ids).map_err(refused)?;
        // A client that stops reading stops its stream being polled, so the watch's end must
        // reach the stream from outside.
        crate::connection::end_stream_when(subscription.ending());
        // Ended a little early, as calls are, so the caller hears DEADLINE_REACHED before its
        // own timer ends the stream without details.
        let deadline = caller_deadline.map(|deadline| {
            let ends_at = started + deadline.saturating_sub(deadline_margin(deadline));
            (ends_at, deadline)
        });
        Ok(Response::new(case_event_stream(
            subscription,
            deadline,
            self.retry,
        )))
    }
}

/// The most events a watch's stream hands over without letting its chunk go. The gRPC encoder
/// packs every event that is ready into one chunk of up to 32 KiB, and takes more only once its
/// client has made room for that chunk: a client reading slowly through a small window would
/// then take nothing from its inbox for seconds at a time, and an ended watch's stream, reset
/// once nothing is taken for a moment (`connection::end_stream_when`), would be cut off though
/// its client still reads. About 1 KiB.
const EVENTS_PER_CHUNK: u64 = 16;

/// The events `subscription` yields until it ends or `deadline` (when, and the caller's
/// deadline as sent) passes; then the status that says why, and nothing more.
fn case_event_stream(
    subscription: Subscription,
    deadline: Option<(Instant, Duration)>,
    retry: RetryPolicy,
) -> CaseEventStream {
    let timer = deadline.map(|(at, deadline)| (Box::pin(tokio::time::sleep_until(at)), deadline));
    Box::pin(futures_util::stream::unfold(
        Some((subscription, timer, 0_u64)),
        move |state| async move {
            let (mut subscription, mut timer, mut sent) = state?;
            if sent > 0 && sent % EVENTS_PER_CHUNK == 0 {
                // Lets the encoder send what it has packed.
                tokio::task::yield_now().await;
            }
            let next = match &mut timer {
                Some((sleep, deadline)) => tokio::select! {
                    biased;
                    () = sleep.as_mut() => Err(WatchEnd::DeadlineReached { deadline: *deadline }),
                    next = subscription.next() => next,
                },
                None => subscription.next().await,
            };
            match next {
                Ok(received) => {
                    sent += 1;
                    let event = Ok(proto_case_event(&received));
                    Some((event, Some((subscription, timer, sent))))
                }
                Err(end) => {
                    subscription.ended(&end);
                    Some((Err(status::watch_ended(&end, retry)), None))
                }
            }
        },
    ))
}

/// An event as the contract sends it.
fn proto_case_event(received: &ReceivedEvent) -> proto::CaseEvent {
    let signal = received.event.signal;
    let change = match signal {
        CaseSignal::State(case_state) => {
            proto::case_event::Change::State(proto_case_state(case_state) as i32)
        }
        CaseSignal::CancelRequest => proto::case_event::Change::CancelRequest(true),
    };
    proto::CaseEvent {
        port_id: received.event.port_id,
        bin_id: received.event.bin_id,
        change: Some(change),
        raw_state: signal.code().to_owned(),
        segment: received.segment.clone(),
        received_at: Some(received.received_at.into()),
    }
}

/// The contract's name for a vendor state. A test checks it against the proto's comments, so
/// each value stays the one its comment names.
fn proto_case_state(case_state: CaseState) -> proto::CaseState {
    match case_state {
        CaseState::Noop => proto::CaseState::NoOperation,
        CaseState::Ereq => proto::CaseState::ExtractionRequested,
        CaseState::Erso => proto::CaseState::ExtractionReadyToSend,
        CaseState::Ecmp => proto::CaseState::ExtractionCompleted,
        CaseState::Ireq => proto::CaseState::InsertionRequested,
        CaseState::Irtr => proto::CaseState::InsertionReadyToReceive,
        CaseState::Icrc => proto::CaseState::InsertionCaseReceived,
        CaseState::Icin => proto::CaseState::InsertionCaseInserted,
        CaseState::Icmp => proto::CaseState::InsertionCompleted,
    }
}

/// Checks the documented ranges of `port_id` and, on methods that take one, `bin_id`, reporting
/// every field that is out of range. The proto fields have the task-interface parameters' names.
pub(crate) fn validate(port_id: u32, bin_id: Option<u32>) -> Result<(), Vec<Violation>> {
    let violations: Vec<Violation> = [
        check_range("port_id", port_id, &PORT_ID_RANGE),
        bin_id.and_then(|bin_id| check_range("bin_id", bin_id, &BIN_ID_RANGE)),
    ]
    .into_iter()
    .flatten()
    .collect();
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

fn check_range(
    field: &'static str,
    value: u32,
    range: &std::ops::RangeInclusive<u32>,
) -> Option<Violation> {
    (!range.contains(&value)).then(|| Violation {
        field,
        description: format!(
            "{field} {value} is out of range {}-{}",
            range.start(),
            range.end()
        ),
    })
}

/// Where the handler leaves its notes for the call layer. The layer always sets one; a default
/// only covers a server built without it.
fn call_scope<T>(request: &Request<T>) -> CallScope {
    request
        .extensions()
        .get::<CallScope>()
        .cloned()
        .unwrap_or_default()
}

/// The caller's deadline from the `grpc-timeout` header, if it sent one; `protocol` has refused
/// a malformed one before the call gets here.
fn caller_deadline<T>(request: &Request<T>) -> Option<Duration> {
    AsRef::<tonic::codegen::http::HeaderMap>::as_ref(request.metadata())
        .get(&GRPC_TIMEOUT_NAME)
        .and_then(|value| value.to_str().ok())
        .and_then(parse_grpc_timeout)
}

/// The longest the gateway may wait for the controller: the smaller of the caller's deadline,
/// less a margin so the caller receives our DEADLINE_EXCEEDED before its own clock runs out, and
/// the upstream timeout. `None` when the deadline leaves too little time for any controller to
/// answer, so the caller hears that at once instead of racing tonic's own deadline timer (which
/// answers CANCELLED, not DEADLINE_EXCEEDED).
pub(crate) fn time_limit(
    caller_deadline: Option<Duration>,
    upstream_timeout: Duration,
) -> Option<Duration> {
    // `--upstream-timeout` is never below this, so only a caller's deadline can be too short.
    const MIN_UPSTREAM_TIME: Duration = crate::config::limits::MIN_UPSTREAM_TIME;
    let Some(deadline) = caller_deadline else {
        return Some(upstream_timeout);
    };
    let limit = deadline
        .saturating_sub(deadline_margin(deadline))
        .min(upstream_timeout);
    (limit >= MIN_UPSTREAM_TIME).then_some(limit)
}

/// How much sooner than the caller's deadline the gateway gives up, so its own status (with
/// details) reaches the caller before the caller's clock ends the call: 10 %, at most 100 ms.
fn deadline_margin(deadline: Duration) -> Duration {
    const MAX_MARGIN: Duration = Duration::from_millis(100);
    (deadline / 10).min(MAX_MARGIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fault from the vendor's list is the controller refusing the action, so a repeat
    /// replays it; after any other code the controller may have acted, so a repeat reads the
    /// port first rather than replay an answer that may be wrong.
    #[test]
    fn a_fault_the_controller_may_have_acted_on_is_kept_as_unknown() {
        let ending_of = |code| ending::<()>(&Err(CallError::Fault(code)));
        assert_eq!(ending_of(1148), Ending::NothingSent);
        assert_eq!(ending_of(1149), Ending::Answered(Answer::Fault(1149)));
        for code in [1500, 1999, 2000, 65535] {
            assert_eq!(ending_of(code), Ending::Unknown, "fault {code}");
        }
    }

    fn check_valid(port_id: u32, bin_id: u32, expected_fields: &[&str]) {
        let fields: Vec<&str> = match validate(port_id, Some(bin_id)) {
            Ok(()) => Vec::new(),
            Err(violations) => violations.iter().map(|violation| violation.field).collect(),
        };
        assert_eq!(fields, expected_fields, "port {port_id} bin {bin_id}");
    }

    /// The vendor code each `CaseState` value's comment in the proto starts with
    /// (`` // `ERSO`: … ``), by value name; `None` for a value whose comment names none. Read
    /// from the file itself: the comments are the clients' manual.
    fn proto_state_codes() -> Vec<(String, Option<String>)> {
        let proto = include_str!("../proto/taskgate/v1/task.proto");
        let (_, body) = proto.split_once("\nenum CaseState {").unwrap();
        let (body, _) = body.split_once("\n}").unwrap();
        let mut codes = Vec::new();
        let mut comment_start: Option<&str> = None;
        for line in body.lines().map(str::trim) {
            if let Some(comment) = line.strip_prefix("//") {
                comment_start.get_or_insert(comment.trim());
            } else if let Some((name, _)) = line.split_once(" = ") {
                let code = comment_start
                    .take()
                    .and_then(|comment| comment.strip_prefix('`')?.split_once("`:"))
                    .map(|(code, _)| code.to_owned());
                codes.push((name.to_owned(), code));
            }
        }
        codes
    }

    /// The proto enum and `domain::CaseState` agree one to one: each vendor state maps to the
    /// value whose comment names its code, and every value but UNSPECIFIED names one.
    #[test]
    fn every_vendor_state_is_the_proto_value_that_names_its_code() {
        let codes = proto_state_codes();
        let mut named: Vec<(&str, &str)> = codes
            .iter()
            .filter_map(|(name, code)| Some((name.as_str(), code.as_deref()?)))
            .collect();
        let mut mapped: Vec<(&str, &str)> = CaseState::ALL
            .into_iter()
            .map(|case_state| {
                (
                    proto_case_state(case_state).as_str_name(),
                    case_state.code(),
                )
            })
            .collect();
        named.sort_unstable();
        mapped.sort_unstable();
        assert_eq!(mapped, named);
        let unnamed: Vec<&str> = codes
            .iter()
            .filter(|(_, code)| code.is_none())
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(unnamed, ["CASE_STATE_UNSPECIFIED"]);
    }

    #[test]
    fn case_extract_bounds_are_inclusive() {
        check_valid(1, 1, &[]);
        check_valid(2000, 4_000_000, &[]);
        check_valid(0, 1, &["port_id"]);
        check_valid(2001, 1, &["port_id"]);
        check_valid(1, 0, &["bin_id"]);
        check_valid(1, 4_000_001, &["bin_id"]);
        check_valid(0, 0, &["port_id", "bin_id"]);
        check_valid(u32::MAX, u32::MAX, &["port_id", "bin_id"]);
    }

    #[test]
    fn violation_names_the_value_and_the_range() {
        let violations = validate(2001, Some(5)).unwrap_err();
        assert_eq!(
            violations[0].description,
            "port_id 2001 is out of range 1-2000"
        );
    }

    /// Through the real server, tonic's own deadline timer races this refusal, so the handler is
    /// called directly here. The upstream URL is never contacted: if it were, the code would be
    /// UNAVAILABLE, not DEADLINE_EXCEEDED.
    #[tokio::test]
    async fn a_deadline_too_short_to_call_is_refused_without_calling_the_controller() {
        let url = crate::config::parse_upstream_url("http://127.0.0.1:9/api/v2/task").unwrap();
        let settings = upstream::Settings::new(url);
        let upstream = Upstream::new(&settings).unwrap();
        let gateway = TaskGateway::new(upstream, &settings, None, &Metrics::new());
        let mut request = Request::new(CaseExtractRequest {
            port_id: 4,
            bin_id: 101337,
            request_id: String::new(),
        });
        request
            .metadata_mut()
            .insert("grpc-timeout", "5m".parse().unwrap());
        let status = gateway.case_extract(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            status.message(),
            "case_extract port 4 bin 101337: 5ms left of the caller's deadline leaves less than \
             10ms to call the controller, after the gateway's margin; nothing was sent"
        );
    }

    #[test]
    fn time_limits() {
        let ms = Duration::from_millis;
        let upstream_timeout = Duration::from_secs(10);
        assert_eq!(time_limit(None, upstream_timeout), Some(upstream_timeout));
        assert_eq!(time_limit(Some(ms(500)), upstream_timeout), Some(ms(450)));
        assert_eq!(time_limit(Some(ms(5000)), upstream_timeout), Some(ms(4900)));
        assert_eq!(
            time_limit(Some(ms(60_000)), upstream_timeout),
            Some(upstream_timeout)
        );
        assert_eq!(
            time_limit(Some(ms(12)), upstream_timeout),
            Some(ms(12) - ms(12) / 10)
        );
        assert_eq!(time_limit(Some(ms(11)), upstream_timeout), None);
        assert_eq!(time_limit(Some(ms(1)), upstream_timeout), None);
        assert_eq!(time_limit(Some(Duration::ZERO), upstream_timeout), None);
    }
}
