//! The operator console (`--console`): one page that shows every port's case state live, calling
//! the task service over gRPC-Web from the gateway's own origin, so it needs no CORS.
//!
//! The page is built from `console/` (Connect-ES, bundled by esbuild) into `console/dist/`, which
//! is committed; `build.rs` lists it and the binary embeds every file, so neither `cargo build`
//! nor the gateway needs Node or a file system for it. The bundle's names carry a hash of their
//! content, so they are cached for good (`immutable`); the page itself, which names them, is
//! revalidated on every load (`no-cache`).
//!
//! It is served in front of every gRPC layer: GET and HEAD of the page, its files and its
//! settings (`/console/config.json`: the ports to show, whether task calls need a token, the
//! deadline of its calls, `--idempotency-window`, a random id of this gateway process, and the
//! fault, gateway-error and code-name tables, so the page shows a fault's meaning and retry
//! advice from the same tables as every status). Any other request goes on to gRPC and gRPC-Web
//! untouched; with the console off there is no layer at all.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{Either, Ready, ready};
use http_body_util::Full;
use tonic::Code;
use tonic::codegen::http::header::{self, HeaderName, HeaderValue};
use tonic::codegen::http::{Method, Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::domain::PORT_ID_RANGE;
use crate::fault::{self, FaultClass};
use crate::gateway_error::{self, GATEWAY_ERRORS};

/// Where the page is served.
pub(crate) const PAGE_PATH: &str = "/";
/// Where the page's settings are served.
pub const CONFIG_PATH: &str = "/console/config.json";
/// Under this path are the bundle's files, each by its name in `console/dist/`.
pub(crate) const FILES_PATH: &str = "/console/";
/// Paths a person may type for the console, answered with a redirect to the page: the folder
/// its files are in, with and without the slash.
pub(crate) const REDIRECTED_PATHS: [&str; 2] = ["/console", FILES_PATH];
/// Sent with every console response: the page loads only the gateway's own files, calls only
/// the gateway, and cannot be framed, so neither an injected script nor another site can act
/// through it. `style-src 'self'` allows no inline style either.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// The bundle, as `build.rs` listed `console/dist/`: each file's name and content.
const FILES: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/console_files.rs"));
/// The page, among [`FILES`]: the one name without a hash, so it is never cached for good.
const PAGE_FILE: &str = "index.html";
/// How much longer than `--upstream-timeout` the page's calls may take: the gateway gives up on
/// the controller up to 100 ms before a caller's deadline (`service::time_limit`), and a call may
/// wait for a connection to the controller before it is sent. With less, a controller that
/// answers within the upstream timeout could still be cut short by the page's own deadline,
/// while the robot may move.
const CALL_DEADLINE_MARGIN: Duration = Duration::from_secs(2);

/// What the console shows, checked: the ports it has a tile for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    ports: Vec<u32>,
}

/// The gateway's times the page needs: its calls' deadline is `upstream` and a margin, and a
/// Repeat with the same key is refused once `idempotency_window` has passed since the first send.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// `--upstream-timeout`.
    pub(crate) upstream: Duration,
    /// `--idempotency-window`.
    pub(crate) idempotency_window: Duration,
}

/// Why console settings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// No port to show: the page would be empty.
    #[error("the console needs at least one port to show (--console-ports)")]
    NoPorts,
    /// A port outside the task interface's range.
    #[error(
        "--console-ports {0} is out of range {min}-{max}: the task interface has no such port",
        min = PORT_ID_RANGE.start(),
        max = PORT_ID_RANGE.end()
    )]
    PortOutOfRange(u32),
    /// A port given twice, which would show two tiles of one port.
    #[error("--console-ports gives port {0} twice")]
    PortTwice(u32),
}

/// Serves the console in front of the gRPC service.
#[derive(Debug, Clone)]
pub(crate) struct ConsoleLayer {
    files: Arc<Files>,
}

/// The service [`ConsoleLayer`] puts in front of another.
#[derive(Debug, Clone)]
pub(crate) struct ConsoleService<S> {
    inner: S,
    files: Arc<Files>,
}

/// Every response the console can give, by path, made once.
#[derive(Debug)]
struct Files {
    by_path: HashMap<String, File>,
}

#[derive(Debug)]
struct File {
    content: Bytes,
    content_type: HeaderValue,
    cache_control: HeaderValue,
}

/// How long a hashed file may be cached: a year, the longest RFC 9111 caches are asked to honour.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Revalidated on every load, so a new gateway's page names its new files at once.
const REVALIDATE: &str = "no-cache";

// === impl Settings ===

impl Settings {
    /// Settings showing `ports`, in that order: each 1–2000, none twice, at least one.
    pub fn new(ports: Vec<u32>) -> Result<Settings, SettingsError> {
        if ports.is_empty() {
            return Err(SettingsError::NoPorts);
        }
        for (index, &port) in ports.iter().enumerate() {
            if !PORT_ID_RANGE.contains(&port) {
                return Err(SettingsError::PortOutOfRange(port));
            }
            if ports[..index].contains(&port) {
                return Err(SettingsError::PortTwice(port));
            }
        }
        Ok(Settings { ports })
    }

    /// The ports the console shows, in order.
    pub fn ports(&self) -> &[u32] {
        &self.ports
    }
}

// === impl ConsoleLayer ===

impl ConsoleLayer {
    /// The console for `settings`; `auth` tells the page to ask for a bearer token, and
    /// `timeouts` how long its calls may take and how long the gateway remembers their keys.
    pub(crate) fn new(settings: &Settings, auth: bool, timeouts: Timeouts) -> ConsoleLayer {
        let mut by_path = HashMap::new();
        for &(name, content) in FILES {
            let (path, cache_control) = if name == PAGE_FILE {
                (PAGE_PATH.to_owned(), REVALIDATE)
            } else {
                (format!("{FILES_PATH}{name}"), IMMUTABLE)
            };
            by_path.insert(
                path,
                File {
                    content: Bytes::from_static(content),
                    content_type: HeaderValue::from_static(content_type(name)),
                    cache_control: HeaderValue::from_static(cache_control),
                },
            );
        }
        by_path.insert(
            CONFIG_PATH.to_owned(),
            File {
                content: Bytes::from(page_config(settings, auth, timeouts).to_string()),
                content_type: HeaderValue::from_static("application/json"),
                cache_control: HeaderValue::from_static(REVALIDATE),
            },
        );
        ConsoleLayer {
            files: Arc::new(Files { by_path }),
        }
    }
}

impl<S> Layer<S> for ConsoleLayer {
    type Service = ConsoleService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConsoleService {
            inner,
            files: self.files.clone(),
        }
    }
}

// === impl ConsoleService ===

impl<S, B> Service<Request<B>> for ConsoleService<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let method = request.method();
        let path = request.uri().path();
        if method != Method::GET && method != Method::HEAD {
            return Either::Right(self.inner.call(request));
        }
        match self.files.by_path.get(path) {
            Some(file) => Either::Left(ready(Ok(file.response()))),
            None if REDIRECTED_PATHS.contains(&path) => Either::Left(ready(Ok(redirect()))),
            // The console's own folder: a name not in the bundle (an old page's file, a typo).
            None if path.starts_with(FILES_PATH) => Either::Left(ready(Ok(not_found(path)))),
            None => Either::Right(self.inner.call(request)),
        }
    }
}

// === impl File ===

impl File {
    fn response(&self) -> Response<tonic::body::Body> {
        let mut response = Response::new(body(self.content.clone()));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, self.content_type.clone());
        headers.insert(header::CACHE_CONTROL, self.cache_control.clone());
        add_security_headers(headers);
        response
    }
}

fn not_found(path: &str) -> Response<tonic::body::Body> {
    text_response(
        StatusCode::NOT_FOUND,
        format!("{path} is not a file of this gateway's console; the console is at {PAGE_PATH}\n"),
    )
}

/// A permanent redirect to the page that keeps the method (308), so a HEAD stays a HEAD.
fn redirect() -> Response<tonic::body::Body> {
    let mut response = text_response(
        StatusCode::PERMANENT_REDIRECT,
        format!("the console is at {PAGE_PATH}\n"),
    );
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(PAGE_PATH));
    response
}

/// A plain-text answer that is not one of the bundle's files, never cached unchecked.
fn text_response(status: StatusCode, text: String) -> Response<tonic::body::Body> {
    let mut response = Response::new(body(Bytes::from(text)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(REVALIDATE));
    add_security_headers(headers);
    response
}

fn add_security_headers(headers: &mut tonic::codegen::http::HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // For browsers that predate `frame-ancestors`.
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // A page on another site that opens the console gets no handle on its window, and cannot
    // load its files into its own.
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
}

fn body(content: Bytes) -> tonic::body::Body {
    tonic::body::Body::new(Full::new(content))
}

/// The content type of a bundle file, by its extension. `build.rs` embeds whatever is in
/// `console/dist/`, so a file of another kind fails the test that checks every one.
fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, extension)| extension) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// What the page needs from the gateway: the ports to show, whether to ask for a token, the
/// deadline of its calls, how long the gateway remembers a key and which process it is (so the
/// page can tell that a Repeat would be a new call: the id is random, and says nothing about the
/// gateway), and what each fault and gateway error means and advises, from the tables every
/// status is built from.
fn page_config(settings: &Settings, auth: bool, timeouts: Timeouts) -> serde_json::Value {
    let fault = |fault_class: FaultClass| {
        serde_json::json!({
            "name": fault_class.reason(),
            "meaning": fault_class.meaning(),
            "advice": fault_class.retry().advice(),
            "mayHaveActed": fault_class.retry().controller_may_have_acted(),
        })
    };
    let faults: serde_json::Map<String, serde_json::Value> = fault::FAULTS
        .iter()
        .map(|known| (known.code.to_string(), fault(FaultClass::Known(known))))
        .collect();
    let gateway_errors: Vec<serde_json::Value> = GATEWAY_ERRORS
        .iter()
        .map(|row| {
            serde_json::json!({
                "reason": row.reason,
                "code": row.code as i32,
                "advice": row.retry.advice(),
                "mayHaveActed": row.retry.controller_may_have_acted(),
                "repeatSameKey": row.retry.repeat_same_key(),
                "unsettled": row.retry.unsettled(),
                "keyClaimed": row.key_claimed,
            })
        })
        .collect();
    // Every gRPC code's name by its number, as the CLI and the logs print it.
    let code_names: Vec<&str> = (0..=Code::Unauthenticated as i32)
        .map(|number| fault::grpc_code_name(Code::from_i32(number)))
        .collect();
    serde_json::json!({
        "ports": settings.ports,
        "auth": auth,
        "callDeadlineMs": call_deadline(timeouts.upstream).as_millis() as u64,
        "idempotencyWindowMs": timeouts.idempotency_window.as_millis() as u64,
        "instance": uuid::Uuid::new_v4().to_string(),
        "faults": faults,
        "unknownFault": fault(FaultClass::Unknown(0)),
        "internalFault": fault(FaultClass::OutOfRange(0)),
        "documentedFaults": [fault::DOCUMENTED_RANGE.start(), fault::DOCUMENTED_RANGE.end()],
        "gatewayDomain": gateway_error::DOMAIN,
        "gatewayErrors": gateway_errors,
        "codeNames": code_names,
    })
}

/// The deadline the page sets on its calls: long enough that the gateway waits the whole
/// `--upstream-timeout` for the controller.
fn call_deadline(upstream_timeout: Duration) -> Duration {
    upstream_timeout.saturating_add(CALL_DEADLINE_MARGIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gateway waits for the controller as long as `--upstream-timeout` allows on a call
    /// with the page's deadline, whatever the timeout.
    #[test]
    fn the_pages_deadline_leaves_the_gateway_its_whole_upstream_timeout() {
        for millis in [10, 100, 1_000, 5_000, 10_000, 600_000] {
            let upstream_timeout = Duration::from_millis(millis);
            let limit =
                crate::service::time_limit(Some(call_deadline(upstream_timeout)), upstream_timeout);
            assert_eq!(limit, Some(upstream_timeout), "{upstream_timeout:?}");
        }
    }

    #[test]
    fn ports_are_checked() {
        assert_eq!(Settings::new(vec![]), Err(SettingsError::NoPorts));
        assert_eq!(
            Settings::new(vec![4, 0]),
            Err(SettingsError::PortOutOfRange(0))
        );
        assert_eq!(
            Settings::new(vec![2001]).unwrap_err().to_string(),
            "--console-ports 2001 is out of range 1-2000: the task interface has no such port"
        );
        assert_eq!(
            Settings::new(vec![4, 3, 4]),
            Err(SettingsError::PortTwice(4))
        );
        assert_eq!(
            Settings::new(vec![4, 1, 2000]).unwrap().ports(),
            [4, 1, 2000]
        );
    }

    /// The README's "Console" section gives the headers as they are sent.
    #[test]
    fn the_readme_states_the_headers() {
        let readme = include_str!("../README.md")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let policy = CONTENT_SECURITY_POLICY
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for sentence in [
            format!("`Content-Security-Policy: {policy}`"),
            format!("| `{CONFIG_PATH}` |"),
            format!("| `{REVALIDATE}` |"),
            format!("| `{IMMUTABLE}` |"),
        ] {
            assert!(
                readme.contains(&sentence),
                "README.md does not say: {sentence}"
            );
        }
    }

    /// Every file of the bundle is served with a type a browser runs or shows under `nosniff`,
    /// and the page is among them.
    #[test]
    fn every_bundle_file_has_a_known_type() {
        assert!(FILES.iter().any(|(name, _)| *name == PAGE_FILE));
        for (name, _) in FILES {
            assert_ne!(content_type(name), "application/octet-stream", "{name}");
        }
    }
}
