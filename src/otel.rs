//! Distributed tracing: W3C trace context from the caller through the gateway to the
//! controller, and spans exported over OTLP, gRPC or HTTP (issue 22).
//!
//! Off unless an OTLP endpoint is given (`--otlp-endpoint`, or `OTEL_EXPORTER_OTLP_ENDPOINT`).
//! Off, no exporter, no tracer and no OpenTelemetry layer exist: the call layer only looks for a
//! `traceparent` header, and when a caller sends a valid one, passes it (and its `tracestate`)
//! to the controller unchanged and names its trace id in the access line.
//!
//! On, tracing-opentelemetry turns the spans made for tracing (`SPAN_TARGET`, which the log
//! never shows) into OpenTelemetry spans: the call layer makes each call's server span, under
//! the caller's `traceparent`, beside the call's log span; the controller POST is a client span
//! under it (`upstream`), whose context the POST carries; a WatchCaseEvents stream is its call's
//! span, for the stream's life; each Log Publisher connection is a span of its own. Spans are
//! sampled parent-based, always on for a root, unless `OTEL_TRACES_SAMPLER` says otherwise, and exported in batches by a task of their own from a bounded queue
//! (`export`): a call never waits for the collector, and a span that finds the queue full is
//! dropped and counted (`taskgate_spans_dropped_total`).

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanLimits};
use tonic::codegen::http::{HeaderMap, HeaderName, HeaderValue};
use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;
use url::Url;

use crate::config::redact_url;

mod export;

pub(crate) use export::dropped_spans;

/// The W3C header that names the caller's trace and span.
pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The target of the spans made for tracing alone: the OpenTelemetry layer sees only these, and
/// the log never does, so their attributes stay out of log lines.
pub(crate) const SPAN_TARGET: &str = "taskgate::otel::span";

/// The target of the log lines about tracing (the exporter starting, a collector failing), which
/// `RUST_LOG` filters as any other.
pub const LOG_TARGET: &str = "taskgate::otel";

/// The standard variable for the endpoint of every OTLP signal, read when `--otlp-endpoint` is
/// not given.
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The standard variable for the endpoint of traces alone, which wins over
/// [`OTEL_EXPORTER_OTLP_ENDPOINT`] as every OpenTelemetry SDK has it.
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// The `service.name` of the spans when neither `OTEL_SERVICE_NAME` nor
/// `OTEL_RESOURCE_ATTRIBUTES` names one.
const SERVICE_NAME: &str = "taskgate";

/// The semantic conventions the spans' attributes follow (`rpc.grpc.status_code`, `error.type`,
/// `http.request.resend_count`, `client.address`, …).
const SCHEMA_URL: &str = "https://opentelemetry.io/schemas/1.27.0";

/// The installed exporter, once [`start`] has run in this process.
static INSTALLED: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Exports spans while it lives; [`Exporting::layer`] is what the log's subscriber adds.
#[derive(Debug)]
pub struct Exporting {
    provider: SdkTracerProvider,
    /// The collector, for the log.
    endpoint: Url,
    /// How spans travel to it, for the log.
    protocol: OtlpProtocol,
    /// The sampler in force, for the log.
    sampling: Sampling,
}

/// Why tracing cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The endpoint is not an `http://` or `https://` URL.
    #[error(
        "OTLP endpoint '{endpoint}' is not an http:// or https:// URL (for example \
         http://127.0.0.1:4317): {reason}"
    )]
    Endpoint {
        /// The endpoint as given, its credentials masked.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The standard variables ask for a protocol the gateway does not export with.
    #[error("{variable}={value}: spans are exported with grpc or http/protobuf only")]
    Protocol {
        /// The variable that names the protocol.
        variable: &'static str,
        /// Its value.
        value: String,
    },
    /// An entry of `OTEL_EXPORTER_OTLP_HEADERS` (or `…_TRACES_HEADERS`) that the exporter would
    /// drop without a word. Its value is never shown: it is often a key.
    #[error("{variable}: entry {entry} {problem}; values are not shown")]
    Headers {
        /// The variable.
        variable: &'static str,
        /// The entry's place in the list, from 1.
        entry: usize,
        /// What is wrong with it, naming its key when it has a valid one.
        problem: String,
    },
    /// `OTEL_TRACES_SAMPLER` names a sampler the gateway does not have.
    #[error(
        "OTEL_TRACES_SAMPLER={value}: not a supported sampler (always_on, always_off, \
         traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio)"
    )]
    Sampler {
        /// The variable's value.
        value: String,
    },
    /// `OTEL_TRACES_SAMPLER_ARG` is not a ratio a `traceidratio` sampler can use.
    #[error(
        "OTEL_TRACES_SAMPLER_ARG={value}: the ratio of traces to sample must be a number from 0 to 1"
    )]
    SamplerArg {
        /// The variable's value.
        value: String,
    },
    /// `OTEL_TRACES_EXPORTER` names an exporter other than OTLP.
    #[error("OTEL_TRACES_EXPORTER={value}: only otlp (or none, to export nothing) is supported")]
    Exporters {
        /// The variable's value.
        value: String,
    },
    /// The endpoint carries what OTLP does not send: credentials, a query or a fragment.
    #[error(
        "OTLP endpoint '{endpoint}' has {what}, which the exporter would not send; give \
         credentials as headers with OTEL_EXPORTER_OTLP_HEADERS"
    )]
    EndpointExtras {
        /// The endpoint as given, its credentials and query masked.
        endpoint: String,
        /// What it has: "credentials", "a query" or "a fragment".
        what: &'static str,
    },
    /// The exporter could not be built.
    #[error("cannot set up the OTLP exporter for '{endpoint}': {reason}")]
    Exporter {
        /// The endpoint, its credentials masked.
        endpoint: String,
        /// What the exporter said.
        reason: String,
    },
}

/// An OTLP/gRPC endpoint, checked: an `http://` or `https://` URL with a host. An `https://`
/// collector is trusted by the system's roots (or `SSL_CERT_FILE`/`SSL_CERT_DIR`).
pub fn parse_endpoint(raw: &str) -> Result<Url, OtlpError> {
    let invalid = |reason: &str| OtlpError::Endpoint {
        endpoint: redact_url(raw).into_owned(),
        reason: reason.to_owned(),
    };
    let url = Url::parse(raw).map_err(|error| invalid(&error.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("its scheme is neither http nor https"));
    }
    if url.host().is_none() {
        return Err(invalid("it has no host"));
    }
    let what = if !url.username().is_empty() || url.password().is_some() {
        Some("credentials")
    } else if url.query().is_some() {
        Some("a query")
    } else if url.fragment().is_some() {
        Some("a fragment")
    } else {
        None
    };
    if let Some(what) = what {
        // A query may hold a key as well as credentials may.
        let mut masked = Url::parse(&redact_url(raw)).unwrap_or_else(|_| url.clone());
        if masked.query().is_some() {
            masked.set_query(Some("***"));
        }
        return Err(OtlpError::EndpointExtras {
            endpoint: masked.to_string(),
            what,
        });
    }
    Ok(url)
}

/// The endpoint the standard variables name, if any, with the variable that names it:
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`. Empty counts as
/// unset, as in every SDK.
pub fn endpoint_from_environment() -> Option<(&'static str, String)> {
    [
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
        OTEL_EXPORTER_OTLP_ENDPOINT,
    ]
    .into_iter()
    .filter_map(|name| Some((name, std::env::var(name).ok()?)))
    .find(|(_, value)| !value.trim().is_empty())
}

/// How spans travel to the collector: OTLP over gRPC, or protobuf over HTTP POSTs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// `grpc`, the default: a collector's port 4317.
    Grpc,
    /// `http/protobuf`: a collector's port 4318, at `/v1/traces`.
    HttpProtobuf,
}

impl OtlpProtocol {
    /// The protocol the standard variables name (`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`), `grpc` when they name none. `http/json` is refused rather
    /// than replaced: a collector spoken to in another protocol would refuse every export.
    pub fn from_environment() -> Result<OtlpProtocol, OtlpError> {
        let named = [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ]
        .into_iter()
        .find_map(|variable| {
            let value = std::env::var(variable).ok()?;
            (!value.trim().is_empty()).then_some((variable, value))
        });
        let Some((variable, value)) = named else {
            return Ok(OtlpProtocol::Grpc);
        };
        match value.trim().to_ascii_lowercase().as_str() {
            "grpc" => Ok(OtlpProtocol::Grpc),
            "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
            _ => Err(OtlpError::Protocol { variable, value }),
        }
    }

    /// Where spans are sent for a collector at `endpoint`. Over HTTP, a base URL (the flag's,
    /// or `OTEL_EXPORTER_OTLP_ENDPOINT`'s) gets `v1/traces` after its path, as every SDK does;
    /// an endpoint for traces alone (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is used as it is.
    pub fn traces_url(self, endpoint: &Url, for_traces_alone: bool) -> Url {
        if self == OtlpProtocol::Grpc || for_traces_alone {
            return endpoint.clone();
        }
        let mut url = endpoint.clone();
        let path = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{path}/v1/traces"));
        url
    }

    /// The endpoint a flag or a config file must name for spans to go to `traces_url`: the
    /// inverse of [`OtlpProtocol::traces_url`] for a base URL. `None` over HTTP when no base URL
    /// gives `traces_url`: its path does not end in `/v1/traces`, or does after a `/` that a base
    /// URL's path loses (`/otlp//v1/traces`).
    pub fn base_url(self, traces_url: &Url) -> Option<Url> {
        if self == OtlpProtocol::Grpc {
            return Some(traces_url.clone());
        }
        let mut base = traces_url.clone();
        base.set_path(traces_url.path().strip_suffix("/v1/traces")?);
        (self.traces_url(&base, false) == *traces_url).then_some(base)
    }
}

impl std::fmt::Display for OtlpProtocol {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        })
    }
}

/// Checks `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, which the
/// exporter reads itself: comma-separated `key=value` entries, values percent-encoded. The
/// exporter drops a bad entry silently, and the collector then refuses every export for want of
/// it, so a bad one is refused here, before anything starts.
pub fn check_headers() -> Result<(), OtlpError> {
    for variable in [
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    ] {
        if let Ok(list) = std::env::var(variable) {
            check_header_list(variable, &list)?;
        }
    }
    Ok(())
}

fn check_header_list(variable: &'static str, list: &str) -> Result<(), OtlpError> {
    let entries = list
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty());
    for (index, entry) in entries.enumerate() {
        let refused = |problem: String| OtlpError::Headers {
            variable,
            entry: index + 1,
            problem,
        };
        let Some((key, value)) = entry.split_once('=') else {
            return Err(refused("is not key=value".to_owned()));
        };
        let key = key.trim();
        if HeaderName::from_bytes(key.as_bytes()).is_err() {
            return Err(refused(
                "has a key that is not a valid header name".to_owned(),
            ));
        }
        let raw = value.trim();
        // As the exporter reads it: percent-decoded when that gives UTF-8, else as it is.
        let decoded = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_or_else(|_| raw.to_owned(), |value| value.into_owned());
        if decoded.is_empty() {
            return Err(refused(format!("('{key}') has an empty value")));
        }
        if HeaderValue::from_str(&decoded).is_err() {
            return Err(refused(format!(
                "('{key}') has a value that is not a valid header value once percent-decoded"
            )));
        }
    }
    Ok(())
}

/// The standard variable that turns export off whatever the endpoint, if one does:
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. An exporter other than `otlp` is
/// refused rather than silently replaced.
pub fn export_turned_off_by() -> Result<Option<&'static str>, OtlpError> {
    let disabled = std::env::var("OTEL_SDK_DISABLED")
        .is_ok_and(|value| value.trim().eq_ignore_ascii_case("true"));
    if disabled {
        return Ok(Some("OTEL_SDK_DISABLED=true"));
    }
    let Ok(value) = std::env::var("OTEL_TRACES_EXPORTER") else {
        return Ok(None);
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "otlp" => Ok(None),
        "none" => Ok(Some("OTEL_TRACES_EXPORTER=none")),
        _ => Err(OtlpError::Exporters { value }),
    }
}

/// The sampler in force: `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, checked, or
/// `parentbased_always_on` when the first is unset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Whether a call with a caller's context follows the caller's decision.
    parent_based: bool,
    /// The share of the traces the gateway starts that are sampled, 0 to 1.
    ratio: f64,
    /// Whether the ratio came from `traceidratio` (or `parentbased_traceidratio`).
    by_ratio: bool,
}

impl Sampling {
    /// Reads and checks the standard variables.
    pub fn from_environment() -> Result<Sampling, OtlpError> {
        let variable = |name| {
            std::env::var(name)
                .ok()
                .filter(|value: &String| !value.trim().is_empty())
        };
        Sampling::parse(
            variable("OTEL_TRACES_SAMPLER").as_deref(),
            variable("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )
    }

    fn parse(sampler: Option<&str>, argument: Option<&str>) -> Result<Sampling, OtlpError> {
        // The specification reads the variables' enum values without regard to case.
        let name = sampler.map_or("parentbased_always_on".to_owned(), |name| {
            name.trim().to_ascii_lowercase()
        });
        let (parent_based, root) = match name.strip_prefix("parentbased_") {
            Some(root) => (true, root),
            None => (false, name.as_str()),
        };
        let by_ratio = root == "traceidratio";
        let ratio = match root {
            "always_on" => 1.0,
            "always_off" => 0.0,
            // The specification's default when no ratio is given.
            "traceidratio" => match argument {
                None => 1.0,
                Some(raw) => raw
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|ratio| (0.0..=1.0).contains(ratio))
                    .ok_or_else(|| OtlpError::SamplerArg {
                        value: raw.to_owned(),
                    })?,
            },
            _ => {
                return Err(OtlpError::Sampler {
                    value: sampler.unwrap_or_default().to_owned(),
                });
            }
        };
        Ok(Sampling {
            parent_based,
            ratio,
            by_ratio,
        })
    }

    /// The SDK's sampler for this choice.
    fn sampler(self) -> Sampler {
        let root = if self.by_ratio {
            Sampler::TraceIdRatioBased(self.ratio)
        } else if self.ratio > 0.0 {
            Sampler::AlwaysOn
        } else {
            Sampler::AlwaysOff
        };
        if self.parent_based {
            Sampler::ParentBased(Box::new(root))
        } else {
            root
        }
    }
}

impl std::fmt::Display for Sampling {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parent = if self.parent_based {
            "parentbased_"
        } else {
            ""
        };
        let root = match (self.by_ratio, self.ratio > 0.0) {
            (true, _) => "traceidratio",
            (false, true) => "always_on",
            (false, false) => "always_off",
        };
        write!(formatter, "{parent}{root}")
    }
}

/// Starts exporting spans to `endpoint` in `protocol`, sampled by `sampling`, with the resource
/// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` name. Must be called within the tokio
/// runtime the export task is to run on, before the log's subscriber is installed (it takes
/// [`Exporting::layer`]).
pub fn start(
    endpoint: &Url,
    protocol: OtlpProtocol,
    sampling: Sampling,
) -> Result<Exporting, OtlpError> {
    let resource = resource();
    let collector =
        export::collector(endpoint, protocol, &resource).map_err(|reason| OtlpError::Exporter {
            endpoint: endpoint.to_string(),
            reason,
        })?;
    let processor = export::QueueProcessor::start(collector);
    // Set here, checked: the SDK would replace a sampler it cannot read with always-on, silently.
    let provider = SdkTracerProvider::builder()
        .with_sampler(sampling.sampler())
        // The SDK's defaults, not `OTEL_SPAN_*_LIMIT`: a low limit would silently drop the
        // attributes a call's span gets last, its code and fault among them.
        .with_span_limits(SpanLimits::default())
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let _ = INSTALLED.set(provider.clone());
    Ok(Exporting {
        provider,
        endpoint: endpoint.clone(),
        protocol,
        sampling,
    })
}

/// Whether spans are exported in this process.
pub(crate) fn exporting() -> bool {
    INSTALLED.get().is_some()
}

/// Sends the spans still queued, for at most `within`; then nothing more is exported. Does
/// nothing when nothing is exported.
pub(crate) async fn flush(within: Duration) {
    if INSTALLED.get().is_some() {
        export::flush(within).await;
    }
}

/// The resource the SDK reads from `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, with
/// `service.name` "taskgate" when neither names one (the SDK's own default is
/// "unknown_service"), and `service.version` the gateway's version unless they name one.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let versioned = detected
        .get(&opentelemetry::Key::from_static_str("service.version"))
        .is_some();
    let mut defaults = Vec::new();
    if !named {
        defaults.push(KeyValue::new("service.name", SERVICE_NAME));
    }
    if !versioned {
        defaults.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    }
    // Only what the operator left unnamed is added; the detectors run again, as they are cheap.
    Resource::builder().with_attributes(defaults).build()
}

// === impl Exporting ===

impl Exporting {
    /// Logs where spans go, once the log is set up.
    pub fn log_started(&self) {
        tracing::info!(
            target: LOG_TARGET,
            endpoint = %self.endpoint,
            protocol = %self.protocol,
            sampler = %self.sampling,
            ratio = self.sampling.ratio,
            "exporting spans over OTLP"
        );
    }

    /// The layer that turns the gateway's spans into OpenTelemetry spans.
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: Subscriber + for<'lookup> LookupSpan<'lookup> + Send + Sync,
    {
        let scope = InstrumentationScope::builder("taskgate")
            .with_version(env!("CARGO_PKG_VERSION"))
            .with_schema_url(SCHEMA_URL)
            .build();
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer_with_scope(scope))
            // Events are log lines, which the log has; spans carry what a trace needs.
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_level(false)
            // Busy and idle times per span cost two clock reads at every poll.
            .with_tracked_inactivity(false)
    }
}

/// The context a caller's `traceparent` and `tracestate` name, if the `traceparent` is valid.
/// Only a request that carries one pays for parsing it.
pub(crate) fn caller_context(headers: &HeaderMap) -> Option<Context> {
    let mut traceparents = headers.get_all(&TRACEPARENT).iter();
    let traceparent = traceparents.next()?;
    // Two are no context (W3C: the header is not to be combined), and the SDK's parser reads
    // hex numbers of any length and case, so the shape is checked here first.
    if traceparents.next().is_some() || !well_formed(traceparent.as_bytes()) {
        return None;
    }
    let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    context.span().span_context().is_valid().then_some(context)
}

/// Whether `traceparent` has the W3C shape: `version-traceid-parentid-flags`, in 2, 32, 16 and
/// 2 lowercase hex digits; version `ff` is never valid, and a later version than `00` may carry
/// more after a `-`.
fn well_formed(traceparent: &[u8]) -> bool {
    const SHAPE: [usize; 4] = [2, 32, 16, 2];
    const LENGTH: usize = 2 + 1 + 32 + 1 + 16 + 1 + 2;
    let lowercase_hex = |byte: &u8| byte.is_ascii_digit() || (b'a'..=b'f').contains(byte);
    let (Some(head), rest) = (traceparent.get(..LENGTH), traceparent.get(LENGTH..)) else {
        return false;
    };
    let mut fields = head.split(|&byte| byte == b'-');
    let shaped = SHAPE.iter().all(|&width| {
        fields
            .next()
            .is_some_and(|field| field.len() == width && field.iter().all(lowercase_hex))
    }) && fields.next().is_none();
    let version = &head[..2];
    let more = rest.unwrap_or_default();
    shaped
        && version != b"ff"
        && (more.is_empty() || (version != b"00" && more.first() == Some(&b'-')))
}

/// Adds `traceparent` (and `tracestate`, if there is any) naming `context`'s span to
/// `headers`; nothing when it has none.
pub(crate) fn inject(context: &Context, headers: &mut HeaderMap) {
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(context, &mut HeaderInjector(headers));
    }
}

/// Reads W3C headers out of a request's headers.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Writes W3C headers into a request's headers.
struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes an empty `tracestate` when there is none; W3C lets it be left
        // out, and the controller should see one only when the caller sent one.
        if value.is_empty() {
            return;
        }
        // The propagator writes only its own header names and printable values.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                )
            })
            .collect()
    }

    /// A caller's context goes to the controller as it came: same trace, same parent, same
    /// flags and trace state; a malformed `traceparent` is no context at all.
    #[test]
    fn a_callers_context_is_passed_on_unchanged_and_a_bad_one_is_ignored() {
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
        let context = caller_context(&headers(&[
            ("traceparent", traceparent),
            ("tracestate", tracestate),
        ]))
        .unwrap();
        let mut sent = HeaderMap::new();
        inject(&context, &mut sent);
        assert_eq!(sent[&TRACEPARENT], traceparent);
        assert_eq!(sent[&TRACESTATE], tracestate);
        let span = context.span();
        assert_eq!(
            span.span_context().trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "not a traceparent",
            // Short ids, which the SDK's hex parser would pad with zeros.
            "00-1-2-01",
            "00-+1-+2-1",
            // Upper case, a version 00 with more after it, and a sign inside a field.
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319c-+7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
        ] {
            assert!(
                caller_context(&headers(&[("traceparent", bad)])).is_none(),
                "{bad}"
            );
        }
        assert!(caller_context(&headers(&[("tracestate", tracestate)])).is_none());
        // Two traceparents are no context, even two good ones.
        let twice = [("traceparent", traceparent), ("traceparent", traceparent)];
        assert!(caller_context(&headers(&twice)).is_none());
        // A later version may carry more after the four fields, which is ignored.
        let later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-comes-next";
        assert!(caller_context(&headers(&[("traceparent", later)])).is_some());

        // Without a trace state, no `tracestate` is sent.
        let context = caller_context(&headers(&[("traceparent", traceparent)])).unwrap();
        let mut sent = HeaderMap::new();
        inject(&context, &mut sent);
        assert_eq!(sent[&TRACEPARENT], traceparent);
        assert!(!sent.contains_key(&TRACESTATE), "{sent:?}");
    }

    #[test]
    fn endpoints_are_http_or_https_urls_with_a_host() {
        let check = |raw: &str, expected: Option<&str>| {
            let error = parse_endpoint(raw).err().map(|error| error.to_string());
            assert_eq!(error.as_deref(), expected, "{raw}");
        };
        check("http://127.0.0.1:4317", None);
        check("http://collector.observability:4317/", None);
        check("https://collector:4317", None);
        check(
            "127.0.0.1:4317",
            Some(
                "OTLP endpoint '127.0.0.1:4317' is not an http:// or https:// URL (for example \
                 http://127.0.0.1:4317): relative URL without a base",
            ),
        );
        check(
            "grpc://collector:4317",
            Some(
                "OTLP endpoint 'grpc://collector:4317' is not an http:// or https:// URL (for \
                 example http://127.0.0.1:4317): its scheme is neither http nor https",
            ),
        );
        check(
            "http://user:secret@collector:4317",
            Some(
                "OTLP endpoint 'http://user:***@collector:4317/' has credentials, which the \
                 exporter would not send; give credentials as headers with \
                 OTEL_EXPORTER_OTLP_HEADERS",
            ),
        );
        check(
            "http://collector:4318/v1/traces?api_key=s3cret",
            Some(
                "OTLP endpoint 'http://collector:4318/v1/traces?***' has a query, which the \
                 exporter would not send; give credentials as headers with \
                 OTEL_EXPORTER_OTLP_HEADERS",
            ),
        );
    }

    /// A header entry the exporter would drop is refused, naming its place and key, never its
    /// value.
    #[test]
    fn bad_header_entries_are_refused_without_their_values() {
        let check = |list: &str| {
            check_header_list("OTEL_EXPORTER_OTLP_HEADERS", list).map_err(|error| error.to_string())
        };
        assert_eq!(check("api-key=s3cret, x-tenant = wms%2C1 ,"), Ok(()));
        assert_eq!(check(""), Ok(()));
        let refused = |entry: &str| {
            Err(format!(
                "OTEL_EXPORTER_OTLP_HEADERS: entry {entry}; values are not shown"
            ))
        };
        assert_eq!(check("api-key"), refused("1 is not key=value"));
        assert_eq!(
            check("a=1,bad key=s3cret"),
            refused("2 has a key that is not a valid header name")
        );
        assert_eq!(
            check("api-key="),
            refused("1 ('api-key') has an empty value")
        );
        let refusal = check("api-key=s3cret%0Aevil").unwrap_err();
        assert_eq!(
            refusal,
            "OTEL_EXPORTER_OTLP_HEADERS: entry 1 ('api-key') has a value that is not a valid \
             header value once percent-decoded; values are not shown"
        );
        assert!(!refusal.contains("s3cret"));
    }

    /// Over HTTP, a base endpoint gets the traces path after its own, and an endpoint for
    /// traces alone is taken as it is; over gRPC, every endpoint is.
    #[test]
    fn the_traces_url_follows_the_specification() {
        let url = |endpoint: &str, protocol: OtlpProtocol, for_traces_alone| {
            protocol
                .traces_url(&Url::parse(endpoint).unwrap(), for_traces_alone)
                .to_string()
        };
        let http = OtlpProtocol::HttpProtobuf;
        assert_eq!(
            url("http://collector:4318", http, false),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            url("https://collector/otlp/", http, false),
            "https://collector/otlp/v1/traces"
        );
        assert_eq!(
            url("http://collector:4318/custom", http, true),
            "http://collector:4318/custom"
        );
        assert_eq!(
            url("http://collector:4317", OtlpProtocol::Grpc, false),
            "http://collector:4317/"
        );
    }

    /// A traces URL is written back as the base URL that gives it, and only when one does.
    #[test]
    fn a_base_url_gives_back_the_traces_url() {
        let base = |traces_url: &str, protocol: OtlpProtocol| {
            let traces_url = Url::parse(traces_url).unwrap();
            let base = protocol.base_url(&traces_url)?;
            assert_eq!(protocol.traces_url(&base, false), traces_url);
            Some(base.to_string())
        };
        let http = OtlpProtocol::HttpProtobuf;
        for (traces_url, expected) in [
            (
                "http://collector:4318/v1/traces",
                Some("http://collector:4318/"),
            ),
            (
                "https://collector/otlp/v1/traces",
                Some("https://collector/otlp"),
            ),
            ("http://collector:4318/custom", None),
            ("http://collector:4318/v1/traces/", None),
            ("http://collector:4318/otlp//v1/traces", None),
            ("http://collector:4318//v1/traces", None),
            ("http://collector:4318/", None),
        ] {
            assert_eq!(base(traces_url, http).as_deref(), expected, "{traces_url}");
        }
        assert_eq!(
            base("http://collector:4317/custom", OtlpProtocol::Grpc).as_deref(),
            Some("http://collector:4317/custom")
        );
    }

    /// The sampler in force is the one named, with its ratio; anything the gateway cannot
    /// honour exactly is refused, never replaced by another sampler.
    #[test]
    fn the_sampler_is_the_one_named_or_refused() {
        let chosen = |sampler, argument| {
            Sampling::parse(sampler, argument)
                .map(|sampling| format!("{sampling} ratio={}", sampling.ratio))
                .map_err(|error| error.to_string())
        };
        for (sampler, argument, expected) in [
            (None, None, "parentbased_always_on ratio=1"),
            (Some("always_off"), None, "always_off ratio=0"),
            (
                Some("traceidratio"),
                Some("0.25"),
                "traceidratio ratio=0.25",
            ),
            (
                Some("parentbased_traceidratio"),
                Some("0"),
                "parentbased_traceidratio ratio=0",
            ),
            // The specification's default ratio.
            (
                Some("parentbased_traceidratio"),
                None,
                "parentbased_traceidratio ratio=1",
            ),
            (
                Some("parentbased_always_off"),
                Some("0.5"),
                "parentbased_always_off ratio=0",
            ),
            // Names are read without regard to case, as the specification has it.
            (Some(" ALWAYS_OFF "), None, "always_off ratio=0"),
            (
                Some("ParentBased_TraceIdRatio"),
                Some("0.5"),
                "parentbased_traceidratio ratio=0.5",
            ),
        ] {
            assert_eq!(chosen(sampler, argument).as_deref(), Ok(expected));
        }
        let unknown = "not a supported sampler (always_on, always_off, traceidratio, \
                       parentbased_always_on, parentbased_always_off, parentbased_traceidratio)";
        for sampler in [
            "xray",
            "jaeger_remote",
            "parentbased_jaeger_remote",
            "AlwaysOn",
            "parentbased always_on",
        ] {
            assert_eq!(
                chosen(Some(sampler), None),
                Err(format!("OTEL_TRACES_SAMPLER={sampler}: {unknown}"))
            );
        }
        for argument in ["1.5", "-0.1", "ten percent", "NaN"] {
            assert_eq!(
                chosen(Some("traceidratio"), Some(argument)),
                Err(format!(
                    "OTEL_TRACES_SAMPLER_ARG={argument}: the ratio of traces to sample must be a \
                     number from 0 to 1"
                ))
            );
        }
    }
}
