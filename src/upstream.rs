//! The controller client: one `reqwest::Client` that POSTs a method call, reads the reply with a
//! size cap while it arrives, and sorts every transport outcome into an `UpstreamError`.
//!
//! It never sends a request twice when it may have reached the controller. Only a failed connect
//! is tried once more, by us; reqwest's own retries are off. Below reqwest, hyper-util's pool
//! resends a request only when it was never written: the kept-alive connection it was given
//! closed before hyper began to write it (`retry_canceled_requests`). A connection whose reply
//! was not read whole (too large, timed out) is pooled only once hyper has read the rest its
//! framing gives, if that has already arrived; otherwise, and when a reply is cut short or badly
//! framed, it is closed. Either way no call reads another call's reply.
//! The whole call runs inside the caller's future, so dropping that future (a cancelled RPC)
//! drops the HTTP request, and hyper closes its connection.
//!
//! The POST carries the call's trace context (`crate::otel`): when spans are exported, a client
//! span under the call's server span, which the `traceparent` names; when not, the caller's own
//! `traceparent` and `tracestate`, unchanged. Without either, nothing is added.

use std::num::NonZeroUsize;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST, HeaderMap, HeaderValue};
use hyper::{StatusCode, Uri};
use opentelemetry::Context;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::sync::watch;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use url::Url;

use crate::codec::{Call, DecodeError, Reply, WireFormat, charset_of};
use crate::config::{
    ConfigError, defaults, limits, parse_upstream_proxy, redact_url, refuse_credentials,
    shown_proxy,
};
use crate::error_chain::error_chain;
use crate::request_id::RequestId;
use crate::tls::UpstreamTls;

/// Idle pooled connections are not used after this long, before the shortest common server
/// keep-alive (5 s for Apache and Node, 130 s for Kestrel), so a request is not written onto a
/// connection the controller is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Sent on every call, so the controller's logs can tell the gateway from other clients.
const USER_AGENT: &str = concat!("taskgate/", env!("CARGO_PKG_VERSION"));

/// How the gateway calls the controller: where, in which format, and within which limits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The controller's task-interface URL, for example `http://10.0.0.5:44000/api/v2/task`.
    pub url: Url,
    /// Whether the controller is spoken to in XML (documented) or JSON.
    pub format: WireFormat,
    /// The longest the gateway waits for one controller reply, whatever the caller's deadline;
    /// also the longest any connect to the controller may take.
    pub timeout: Duration,
    /// The delay put in `RetryInfo` when a retry is safe (fault 1148, controller unreachable,
    /// HTTP 503 or 429).
    pub retry_delay: Duration,
    /// The largest controller reply body the gateway reads before giving up on it.
    pub max_response_bytes: NonZeroUsize,
    /// How many task calls may be in flight at once, each holding at most one controller
    /// connection; more are refused with RESOURCE_EXHAUSTED rather than queued.
    pub max_in_flight: NonZeroUsize,
    /// How long a CaseExtract or CaseCancel `request_id` is remembered after its call ended.
    pub idempotency_window: Duration,
    /// How many `request_id`s are remembered at most; only answered ones are evicted.
    pub idempotency_max_entries: NonZeroUsize,
    /// HTTPS to the controller: its CA and a client certificate, when they are not the defaults.
    pub tls: UpstreamTls,
    /// The HTTP forward proxy every controller call goes through (`--upstream-proxy`), if the
    /// operator named one; proxy variables in the environment are never used.
    pub proxy: Option<Url>,
}

/// A client for one controller's task interface.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    /// Keeps the connections alive between calls; cheap to clone, one pool for all clones.
    client: reqwest::Client,
    /// The task-interface endpoint every method call is POSTed to.
    url: Url,
    /// Replies longer than this are refused without being read further.
    max_response_bytes: usize,
    /// XML (documented) or JSON, for requests and replies alike.
    format: WireFormat,
    /// Whether an HTTP status may be a proxy's rather than the controller's: any call through
    /// `--upstream-proxy`. An https:// call crosses it in a tunnel, but a proxy that inspects TLS
    /// (its CA given as `--upstream-ca`) answers inside it.
    proxied: bool,
    /// Whether a client span is made for each POST, fixed when the client is built.
    exporting: bool,
    /// The shutdown grace once it has run out: a call still waiting for the controller then
    /// stops waiting and says so. `None` until then, and for ever without a server.
    grace_ran_out: watch::Receiver<Option<Duration>>,
}

/// Why the controller client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The upstream URL does not make an HTTP request target.
    #[error("upstream URL '{url}' is not a valid HTTP request target: {reason}")]
    Target {
        /// The URL.
        url: String,
        /// What the HTTP library said.
        reason: String,
    },
    /// The TLS configuration cannot be built (for example, the system has no roots).
    #[error("cannot set up TLS to the controller")]
    Tls(#[source] rustls::Error),
    /// The HTTP client cannot be built.
    #[error("cannot set up the HTTP client for the controller")]
    Build(#[source] TransportError),
    /// The host of an https:// URL cannot be a certificate's name.
    #[error("upstream URL '{url}' has a host that cannot be checked against a TLS certificate")]
    ServerName {
        /// The URL.
        url: String,
    },
}

/// Why the connection to the controller failed: the HTTP client's error and its causes, which
/// [`error_chain`] renders.
pub(crate) type TransportError = Box<dyn std::error::Error + Send + Sync>;

/// A controller call that did not produce a reply we can trust. Its message is the one callers
/// read, so it says the cause itself, which is therefore not also a `source`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// The connection could not be made, twice: nothing was sent.
    #[error(
        "cannot connect to the controller{}: {}",
        if *.proxied { " through --upstream-proxy" } else { "" },
        error_chain(&**.error)
    )]
    Unreachable {
        /// Why the connection failed.
        error: TransportError,
        /// Whether it was the proxy's connection or tunnel that failed, not the controller's.
        proxied: bool,
    },
    /// The connection failed after the request may have been sent.
    #[error("the connection to the controller failed: {}", error_chain(&**.0))]
    ConnectionLost(TransportError),
    /// No complete reply arrived within the time limit.
    #[error("the controller did not answer within {}", humantime::format_duration(*.limit))]
    Timeout {
        /// The limit that ran out.
        limit: Duration,
    },
    /// A non-2xx HTTP status without a fault in the body.
    #[error(
        "{} answered HTTP {status}{}",
        if *.proxied { "--upstream-proxy, or the controller behind it," } else { "the controller" },
        if *.success { " with a success reply in its body" } else { "" }
    )]
    HttpStatus {
        /// The status the controller sent.
        status: StatusCode,
        /// Whether the body is a success reply: the controller says it acted, whatever the
        /// status says.
        success: bool,
        /// Whether the status may be the proxy's (`Upstream::proxied`): a proxy may answer 503
        /// after it passed the request on, so it does not say the controller declined.
        proxied: bool,
    },
    /// A 2xx reply whose body is not a task-interface response.
    #[error("the controller's reply is not a valid response: {0}")]
    BadResponse(DecodeError),
    /// The reply body is longer than the configured cap.
    #[error("the controller's reply is larger than {limit} bytes")]
    ResponseTooLarge {
        /// The cap in bytes.
        limit: usize,
    },
    /// The gateway is shutting down, and its grace ran out before the controller answered.
    #[error(
        "the gateway is shutting down and its grace of {} (--shutdown-grace) ran out before the \
         controller answered",
        humantime::format_duration(*.grace)
    )]
    GraceRanOut {
        /// The shutdown grace.
        grace: Duration,
    },
}

// === impl Settings ===

impl Settings {
    /// The documented defaults, pointed at `url`.
    pub fn new(url: Url) -> Self {
        Settings {
            url,
            format: WireFormat::Xml,
            timeout: defaults::UPSTREAM_TIMEOUT,
            retry_delay: defaults::RETRY_DELAY,
            max_response_bytes: defaults::MAX_RESPONSE_BYTES,
            max_in_flight: defaults::MAX_IN_FLIGHT,
            idempotency_window: defaults::IDEMPOTENCY_WINDOW,
            idempotency_max_entries: defaults::IDEMPOTENCY_MAX_ENTRIES,
            tls: UpstreamTls::default(),
            proxy: None,
        }
    }

    /// Checks the settings whose types allow values the gateway cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // `parse_upstream_url` refuses credentials, but library callers may build a `Url` by
        // hand, and every log line that names the upstream prints it whole.
        refuse_credentials(&self.url)?;
        if let Some(proxy) = &self.proxy {
            parse_upstream_proxy(proxy.as_str())?;
            // reqwest's tunnel hands rustls the host with its brackets, which no certificate
            // name matches: every call would fail.
            if self.url.scheme() == "https" && matches!(self.url.host(), Some(url::Host::Ipv6(_))) {
                return Err(ConfigError::InvalidProxy {
                    url: shown_proxy(proxy).to_owned(),
                    reason: format!(
                        "cannot carry calls to an https:// controller at an IPv6 address ({}): \
                         its certificate cannot be checked through the tunnel; give the \
                         controller's name in --upstream",
                        self.url.host_str().unwrap_or_default()
                    ),
                });
            }
        }
        limits::UPSTREAM_TIMEOUT.check(self.timeout)?;
        limits::RETRY_DELAY.check(self.retry_delay)?;
        limits::MAX_IN_FLIGHT.check(self.max_in_flight)?;
        limits::IDEMPOTENCY_WINDOW.check(self.idempotency_window)?;
        limits::IDEMPOTENCY_MAX_ENTRIES.check(self.idempotency_max_entries)?;
        if self.idempotency_max_entries <= self.max_in_flight {
            return Err(ConfigError::IdempotencyEntriesNotAboveInFlight {
                max_entries: self.idempotency_max_entries.get(),
                max_in_flight: self.max_in_flight.get(),
            });
        }
        limits::MAX_RESPONSE_BYTES.check(self.max_response_bytes)?;
        Ok(())
    }
}

// === impl UpstreamError ===

impl UpstreamError {
    /// A fixed word for the kind of failure, for metrics labels.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Unreachable { .. } => "unreachable",
            UpstreamError::ConnectionLost(_) => "connection_lost",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::HttpStatus { .. } => "http_status",
            UpstreamError::BadResponse(_) => "bad_response",
            UpstreamError::ResponseTooLarge { .. } => "response_too_large",
            UpstreamError::GraceRanOut { .. } => "shutdown",
        }
    }
}

// === impl Upstream ===

impl Upstream {
    /// Builds the shared client for the configured controller.
    pub(crate) fn new(settings: &Settings) -> Result<Self, ClientError> {
        let url = settings.url.clone();
        let invalid = |reason: String| ClientError::Target {
            url: url.to_string(),
            reason,
        };
        // reqwest would refuse such a URL on every call, as it makes this same `Uri` of it;
        // refusing it here names it at startup.
        let uri = Uri::try_from(url.as_str()).map_err(|error| invalid(error.to_string()))?;
        let tls = match url.scheme() {
            "https" => {
                if server_name(&url).is_none() {
                    return Err(ClientError::ServerName {
                        url: url.to_string(),
                    });
                }
                settings.tls.client_config()
            }
            // This client calls the one configured URL and follows no redirect, so an http://
            // controller never needs TLS, nor the system's roots that reqwest would load.
            "http" => crate::tls::trusting_nothing(),
            _ => return Err(invalid("its scheme is not http or https".to_owned())),
        }
        .map_err(ClientError::Tls)?;
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(settings.format.content_type()),
        );
        headers.insert(ACCEPT, HeaderValue::from_static(settings.format.accept()));
        // hyper-util's client writes `Host` from the request's URI on every call unless the
        // request has one (a `format!` and a header parse each time); this is the same value,
        // made once.
        headers.insert(HOST, host_header(&uri).map_err(invalid)?);
        let mut builder = reqwest::Client::builder()
            .http1_only()
            .tls_backend_preconfigured(ClientConfig::clone(&tls))
            // A proxy from the environment would send robot commands somewhere the operator
            // did not name; a redirect would replay a POST there.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none());
        if let Some(proxy) = &settings.proxy {
            let proxy = reqwest::Proxy::all(proxy.as_str())
                .map_err(|error| ClientError::Build(Box::new(error)))?;
            builder = builder.proxy(proxy);
        }
        let client = builder
            // Our own retry of a failed connect (`send`) is the only retry. `never()` alone still
            // copies every request (its headers and extensions) in case of a retry it would then
            // refuse; with no retry allowed, the copy is not made.
            .retry(reqwest::retry::never().max_retries_per_request(0))
            .tcp_nodelay(true)
            // A call that finds no idle connection starts a connect, and takes another call's
            // connection instead if that one comes back first; hyper-util then finishes the
            // connect for the pool, with no call left to time it. This ends such a connect as a
            // call's own would end (a call's limit is never longer), rather than after the
            // kernel's two minutes of SYN retries against a controller slow to accept.
            // hyper-util gives each address of a name its share of it, so a call to a name with
            // several addresses moves on from one that does not answer, and can fail
            // UPSTREAM_UNREACHABLE (nothing sent) when none does, before its own limit. Not
            // tower's `TimeoutLayer` as a connector layer instead: reqwest then boxes and clones
            // its connector for every call, 6.3k instructions a call (callgrind).
            .connect_timeout(settings.timeout)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(settings.max_in_flight.get())
            .user_agent(USER_AGENT)
            .default_headers(headers)
            .build()
            .map_err(|error| ClientError::Build(Box::new(error)))?;
        Ok(Upstream {
            client,
            url,
            max_response_bytes: settings.max_response_bytes.get(),
            format: settings.format,
            proxied: settings.proxy.is_some(),
            exporting: crate::otel::exporting(),
            grace_ran_out: watch::channel(None).1,
        })
    }

    /// Makes calls stop waiting for the controller once `grace_ran_out` holds the shutdown
    /// grace, which the server sets when the grace runs out with calls in flight.
    pub(crate) fn stop_waiting_on(&mut self, grace_ran_out: watch::Receiver<Option<Duration>>) {
        self.grace_ran_out = grace_ran_out;
    }

    /// The endpoint this client calls.
    pub(crate) fn url(&self) -> &Url {
        &self.url
    }

    /// POSTs `call` and returns the controller's reply, giving up after `time_limit`.
    pub(crate) async fn call(
        &self,
        call: &Call<'_>,
        request_id: &RequestId,
        time_limit: Duration,
    ) -> Result<Reply, UpstreamError> {
        if !self.exporting {
            // The caller's context, if it sent one, rides with the call (`call`).
            let mut trace_headers = HeaderMap::new();
            Context::map_current(|context| crate::otel::inject(context, &mut trace_headers));
            let mut attempt = Attempt::Passed(trace_headers);
            return self
                .timed_post(call, request_id, time_limit, &mut attempt)
                .await;
        }
        let mut attempt = Attempt::Traced(self.client_span(0));
        let reply = self
            .timed_post(call, request_id, time_limit, &mut attempt)
            .await;
        if let (Err(error), Attempt::Traced(span)) = (&reply, &attempt) {
            // A non-2xx status is its own `error.type`, recorded with the status.
            if !matches!(error, UpstreamError::HttpStatus { .. }) {
                span.record("error.type", error.kind());
            }
            span.record("otel.status_code", "error");
        }
        reply
    }

    /// The client span of one attempt at the POST: the first, or the retry after a failed
    /// connect (`resend_count` 1). Made under the current span, the call's server span.
    fn client_span(&self, resend_count: i64) -> tracing::Span {
        tracing::info_span!(
            target: crate::otel::SPAN_TARGET,
            "POST",
            otel.kind = "client",
            http.request.method = "POST",
            http.request.resend_count = (resend_count > 0).then_some(resend_count),
            server.address = self.url.host_str(),
            // As signed integers: tracing-opentelemetry records unsigned ones as text.
            server.port = self.url.port_or_known_default().map(i64::from),
            url.full = %redact_url(self.url.as_str()),
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        )
    }

    async fn timed_post(
        &self,
        call: &Call<'_>,
        request_id: &RequestId,
        time_limit: Duration,
        attempt: &mut Attempt,
    ) -> Result<Reply, UpstreamError> {
        let post = tokio::time::timeout(time_limit, self.post(call, request_id, attempt));
        tokio::select! {
            // A reply that is ready wins over a grace running out at the same moment.
            biased;
            posted = post => posted.map_err(|_| UpstreamError::Timeout { limit: time_limit })?,
            grace = grace_ran_out(self.grace_ran_out.clone()) => {
                Err(UpstreamError::GraceRanOut { grace })
            }
        }
    }

    async fn post(
        &self,
        call: &Call<'_>,
        request_id: &RequestId,
        attempt: &mut Attempt,
    ) -> Result<Reply, UpstreamError> {
        let body = Bytes::from(self.format.encode_call(call));
        let mut response = self.send(body, request_id, attempt).await?;
        let status = response.status();
        if let Attempt::Traced(span) = attempt {
            span.record("http.response.status_code", i64::from(status.as_u16()));
            // The HTTP conventions: a client span fails on any 4xx or 5xx, its `error.type`
            // the status code, whether or not a fault came with it.
            if status.is_client_error() || status.is_server_error() {
                span.record("error.type", status.as_str());
                span.record("otel.status_code", "error");
            }
        }
        // Copied out: reading the body borrows the response.
        let content_type = response.headers().get(CONTENT_TYPE).cloned();
        let charset = content_type
            .as_ref()
            .and_then(|value| value.to_str().ok())
            .and_then(charset_of);
        let body = read_capped(&mut response, self.max_response_bytes).await;
        if !status.is_success() {
            // A fault is the controller's answer whatever status carries it; anything else under
            // a non-2xx status is not a reply we can act on. A success reply under one still says
            // the controller acted, so a status that means "declined" must not be believed.
            return match body.map(|body| self.format.decode_reply(&body, charset)) {
                Ok(Ok(Reply::Fault(code))) => Ok(Reply::Fault(code)),
                Ok(Ok(Reply::Success(_))) => Err(UpstreamError::HttpStatus {
                    status,
                    success: true,
                    proxied: self.proxied,
                }),
                _ => Err(UpstreamError::HttpStatus {
                    status,
                    success: false,
                    proxied: self.proxied,
                }),
            };
        }
        let body = body.map_err(|error| match error {
            BodyError::TooLarge => UpstreamError::ResponseTooLarge {
                limit: self.max_response_bytes,
            },
            BodyError::Transport(error) => UpstreamError::ConnectionLost(boxed(error)),
        })?;
        self.format
            .decode_reply(&body, charset)
            .map_err(UpstreamError::BadResponse)
    }

    /// Sends the request and waits for the reply's head. A failed connect is tried once more,
    /// since nothing was sent; any other failure may have reached the controller.
    async fn send(
        &self,
        body: Bytes,
        request_id: &RequestId,
        attempt: &mut Attempt,
    ) -> Result<reqwest::Response, UpstreamError> {
        let send_once = |trace_headers: HeaderMap| {
            let request = self
                .client
                .post(self.url.clone())
                .header(crate::request_id::HEADER, request_id.header_value());
            let request = if trace_headers.is_empty() {
                request
            } else {
                request.headers(trace_headers)
            };
            request.body(body.clone()).send()
        };
        match send_once(attempt.trace_headers()).await {
            Err(error) if error.is_connect() => {
                tracing::debug!(cause = %error_chain(&error), "connect failed; trying once more");
                if let Attempt::Traced(span) = attempt {
                    span.record("error.type", "unreachable");
                    span.record("otel.status_code", "error");
                    // The retry is a request of its own: a span of its own, which ends this one.
                    *span = self.client_span(1);
                }
                send_once(attempt.trace_headers()).await
            }
            sent => sent,
        }
        .map_err(|error| {
            if error.is_connect() {
                UpstreamError::Unreachable {
                    error: boxed(error),
                    proxied: self.proxied,
                }
            } else {
                UpstreamError::ConnectionLost(boxed(error))
            }
        })
    }
}

/// The trace context one attempt at the POST carries.
enum Attempt {
    /// Spans are not exported: the caller's context, passed on as it came.
    Passed(HeaderMap),
    /// Spans are exported: the attempt's client span, which the POST names.
    Traced(tracing::Span),
}

impl Attempt {
    /// The `traceparent` (and `tracestate`) this attempt sends.
    fn trace_headers(&self) -> HeaderMap {
        match self {
            Attempt::Passed(headers) => headers.clone(),
            Attempt::Traced(span) => {
                let mut headers = HeaderMap::new();
                crate::otel::inject(&span.context(), &mut headers);
                headers
            }
        }
    }
}

/// Why a reply's body was not read.
#[derive(Debug)]
enum BodyError {
    /// It is longer than the cap: announced so, or found so while reading.
    TooLarge,
    /// The connection failed or the body broke its framing.
    Transport(reqwest::Error),
}

/// The reply's body, read chunk by chunk and given up on as soon as it passes `limit`, so a
/// controller cannot make the gateway hold more. Of a body not read to its end, hyper reads
/// what has already arrived up to the end its framing gives and pools the connection, or else
/// closes it: a connection is pooled only with its reply read whole.
async fn read_capped(response: &mut reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    // hyper reports a Content-Length only for a body framed by it (not chunked).
    let announced = response.content_length().unwrap_or(0);
    if announced > limit as u64 {
        return Err(BodyError::TooLarge);
    }
    // Bounded by the check above; a controller reply is a few hundred bytes.
    let mut body = Vec::with_capacity(announced as usize);
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if chunk.len() > limit - body.len() {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `error`, without the URL reqwest puts in its text: every message already names the
/// controller, and the gateway's own logs print the URL once at startup.
fn boxed(error: reqwest::Error) -> TransportError {
    Box::new(error.without_url())
}

/// The `Host` header hyper-util's client would write for `uri`: its host, with its port unless
/// that is the scheme's default.
fn host_header(uri: &Uri) -> Result<HeaderValue, String> {
    let host = uri.host().ok_or("it names no host")?;
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let value = match uri.port_u16() {
        Some(port) if port != default_port => HeaderValue::try_from(format!("{host}:{port}")),
        _ => HeaderValue::try_from(host),
    };
    value.map_err(|error| format!("its host is not a valid Host header: {error}"))
}

/// The name an https:// controller's certificate must have: its URL's host.
fn server_name(url: &Url) -> Option<ServerName<'static>> {
    match url.host()? {
        url::Host::Domain(domain) => ServerName::try_from(domain.to_owned()).ok(),
        url::Host::Ipv4(address) => Some(ServerName::from(std::net::IpAddr::V4(address))),
        url::Host::Ipv6(address) => Some(ServerName::from(std::net::IpAddr::V6(address))),
    }
}

/// Resolves with the shutdown grace once it has run out; never, if it does not.
async fn grace_ran_out(mut grace_ran_out: watch::Receiver<Option<Duration>>) -> Duration {
    if let Ok(grace) = grace_ran_out.wait_for(Option::is_some).await
        && let Some(grace) = *grace
    {
        return grace;
    }
    // The server is gone, or there never was one: nothing will cut the call off.
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Host` is what hyper-util's client would have written for the URL: the port only when it
    /// is not the scheme's default.
    #[test]
    fn the_host_header_names_the_host_and_any_other_port() {
        let host = |url: &str| host_header(&Uri::try_from(url).unwrap()).unwrap();
        assert_eq!(
            host("http://controller:44000/api/v2/task"),
            "controller:44000"
        );
        assert_eq!(host("http://controller/api/v2/task"), "controller");
        assert_eq!(host("http://controller:80/api/v2/task"), "controller");
        assert_eq!(host("https://controller:443/api/v2/task"), "controller");
        assert_eq!(host("https://controller:80/api/v2/task"), "controller:80");
        assert_eq!(host("http://10.0.0.5:44000/api/v2/task"), "10.0.0.5:44000");
        assert_eq!(host("http://[::1]:44000/api/v2/task"), "[::1]:44000");
        assert_eq!(host("http://[::1]/api/v2/task"), "[::1]");
    }

    /// Through a proxy, an https:// controller must be named: at an IPv6 address every call
    /// would fail its certificate check in reqwest's tunnel. Direct, or over http://, it works.
    #[test]
    fn an_https_controller_at_an_ipv6_address_is_refused_behind_a_proxy() {
        let validate = |url: &str, proxy: Option<&str>| {
            let mut settings = Settings::new(Url::parse(url).unwrap());
            settings.proxy = proxy.map(|proxy| Url::parse(proxy).unwrap());
            settings.validate().err().map(|error| error.to_string())
        };
        let proxy = Some("http://10.0.0.9:3128");
        assert_eq!(
            validate("https://[fd00::5]:44000/api/v2/task", proxy).as_deref(),
            Some(
                "--upstream-proxy 'http://10.0.0.9:3128' cannot carry calls to an https:// \
                 controller at an IPv6 address ([fd00::5]): its certificate cannot be checked \
                 through the tunnel; give the controller's name in --upstream"
            )
        );
        assert_eq!(validate("https://[fd00::5]:44000/api/v2/task", None), None);
        assert_eq!(validate("http://[fd00::5]:44000/api/v2/task", proxy), None);
        assert_eq!(
            validate("https://controller:44000/api/v2/task", proxy),
            None
        );
    }

    /// A URL the client cannot call is refused when the client is built, with the reason.
    #[test]
    fn urls_the_client_cannot_call_are_refused_at_startup() {
        let check = |url: &str, expected: Option<&str>| {
            let settings = Settings::new(Url::parse(url).unwrap());
            let error = Upstream::new(&settings)
                .err()
                .map(|error| error.to_string());
            assert_eq!(error.as_deref(), expected, "{url}");
        };
        check("http://controller:44000/api/v2/task?site=1#top", None);
        check("http://[::1]/api/v2/task", None);
        check(
            "ftp://controller/api/v2/task",
            Some(
                "upstream URL 'ftp://controller/api/v2/task' is not a valid HTTP request target: \
                 its scheme is not http or https",
            ),
        );
    }
}
