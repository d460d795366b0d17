//! Bearer-token authentication for the task service.
//!
//! Tokens come from a file, one per line, and are reloaded on SIGHUP and whenever the file
//! changes (a Kubernetes Secret's update, where nothing sends SIGHUP). Only SHA-256 digests are
//! kept in memory and every comparison runs in constant time over all of them, so neither the
//! timing nor the length of a guess tells anything about a token. A token never appears in a log
//! line or an error message: errors name the file and the line number only.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderValue, header::AUTHORIZATION};
use tonic::server::NamedService;
use tower::Service;

use crate::call::CallScope;
use crate::regular_file::{self, FileError};
use crate::shutdown::Hangups;

/// A token file, loaded and checked.
#[derive(Debug, Clone)]
pub struct TokenFile {
    /// Where the tokens were read from, to read them again on SIGHUP.
    path: PathBuf,
    /// The tokens' digests.
    tokens: Arc<Tokens>,
    /// The file's version just before it was read: the change watcher starts from it, so a
    /// change made after the read, even before the watcher starts, is reloaded. The watcher
    /// then keeps its own: a SIGHUP's reload of a change it has not yet seen is reloaded, and
    /// logged, once more when it sees it.
    version: Option<FileVersion>,
}

/// Why a token file cannot be used. Never carries a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file cannot be read, or is not a regular file.
    #[error("cannot read auth tokens file {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why; in the message, so not also a `source`.
        cause: FileError,
    },
    /// A line holds something that cannot be sent in an `authorization` header.
    #[error("auth tokens file {path}, line {line}: a token must be printable ASCII without spaces")]
    InvalidToken {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
    },
    /// The file has no tokens, which would lock every caller out.
    #[error("auth tokens file {path} has no tokens (one per line; # starts a comment)")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The reload's thread ended before it read the file: the process is stopping.
    #[error("the reload was interrupted: {0}")]
    Interrupted(String),
}

/// The digests of the accepted tokens. Its `Debug` shows only how many there are: even a digest
/// would let a weak token be guessed offline.
struct Tokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "Tokens({} redacted)", self.digests.len())
    }
}

/// Checks the `authorization` header of each task call against the current tokens.
#[derive(Debug, Clone)]
pub(crate) struct Authenticator {
    /// The tokens now in force; replaced whole on reload, so a check never sees half a file.
    current: Arc<RwLock<TokenFile>>,
    /// Held from a reload's read to its store: a SIGHUP and a change seen at once would
    /// otherwise race, and the one that read the older file could store it last.
    reloading: Arc<Mutex<()>>,
}

// === impl TokenFile ===

impl TokenFile {
    /// Reads and checks a token file.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        // Looked at before the read: a change during the read then shows as a new version.
        let version = file_version_now(path);
        let text = regular_file::read_to_string(path).map_err(|cause| TokenFileError::Read {
            path: path.to_owned(),
            cause,
        })?;
        let tokens = parse_tokens(&text).map_err(|line| TokenFileError::InvalidToken {
            path: path.to_owned(),
            line,
        })?;
        if tokens.digests.is_empty() {
            return Err(TokenFileError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(TokenFile {
            path: path.to_owned(),
            tokens: Arc::new(tokens),
            version,
        })
    }

    /// The file the tokens came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many tokens the file holds.
    pub fn len(&self) -> usize {
        self.tokens.digests.len()
    }

    /// Whether the file holds no tokens; a loaded file never does.
    pub fn is_empty(&self) -> bool {
        self.tokens.digests.is_empty()
    }
}

/// Parses token lines; on a bad line returns its 1-based number.
fn parse_tokens(text: &str) -> Result<Tokens, usize> {
    let mut digests = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let token = line.trim();
        if token.is_empty() || token.starts_with('#') {
            continue;
        }
        if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(index + 1);
        }
        digests.push(digest(token.as_bytes()));
    }
    Ok(Tokens { digests })
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

// === impl Tokens ===

impl Tokens {
    /// Whether `candidate` is one of the tokens, in time that depends only on the number of
    /// tokens.
    fn accepts(&self, candidate: &[u8]) -> bool {
        let candidate = digest(candidate);
        let mut matched = subtle::Choice::from(0);
        for token in &self.digests {
            matched |= token.ct_eq(&candidate);
        }
        matched.into()
    }
}

// === impl Authenticator ===

impl Authenticator {
    /// Checks calls against `token_file`.
    pub(crate) fn new(token_file: TokenFile) -> Self {
        Authenticator {
            current: Arc::new(RwLock::new(token_file)),
            reloading: Arc::default(),
        }
    }

    /// Reads the token file again. On failure the old tokens stay in force.
    pub(crate) fn reload(&self) -> Result<usize, TokenFileError> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let path = self.snapshot().path;
        let token_file = TokenFile::load(&path)?;
        let count = token_file.len();
        // Every writer replaces the whole value, so a poisoned lock still holds a valid one.
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = token_file;
        Ok(count)
    }

    fn snapshot(&self) -> TokenFile {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether an `authorization` header value carries an accepted bearer token.
    fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(token) = authorization.and_then(bearer_token) else {
            return false;
        };
        self.snapshot().tokens.accepts(token)
    }
}

/// The task service behind the bearer-token check when there is a token file. Without one,
/// calls go straight to the service: nothing converts their headers into gRPC metadata only to
/// let them all through.
#[derive(Debug, Clone)]
pub(crate) struct Guarded<S> {
    inner: S,
    authenticator: Option<Authenticator>,
}

/// The future of a [`Guarded`] call: the service's, or the refusal.
#[derive(Debug)]
pub(crate) enum GuardedFuture<F> {
    /// The token was accepted, or none is needed.
    Passed(F),
    /// The call was refused; taken once polled.
    Refused(Option<http::Response<Body>>),
}

// === impl Guarded ===

impl<S> Guarded<S> {
    /// `inner`, checked by `authenticator` if there is one.
    pub(crate) fn new(inner: S, authenticator: Option<Authenticator>) -> Self {
        Guarded {
            inner,
            authenticator,
        }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Guarded<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = GuardedFuture<S::Future>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(authenticator) = &self.authenticator {
            let authorization = request.headers().get(AUTHORIZATION);
            if !authenticator.accepts(authorization.map(HeaderValue::as_bytes)) {
                let has_authorization = authorization.is_some();
                let request = tonic::Request::from_http(request);
                tracing::warn!(
                    request_id = request
                        .extensions()
                        .get::<CallScope>()
                        .map(|scope| tracing::field::display(&scope.request_id)),
                    peer = request.remote_addr().map(tracing::field::display),
                    has_authorization,
                    "refused a call without a valid bearer token"
                );
                return GuardedFuture::Refused(Some(crate::status::unauthenticated().into_http()));
            }
        }
        GuardedFuture::Passed(self.inner.call(request))
    }
}

// === impl GuardedFuture ===

impl<F, E> Future for GuardedFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>> + Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            GuardedFuture::Passed(future) => Pin::new(future).poll(context),
            GuardedFuture::Refused(response) => Poll::Ready(Ok(response
                .take()
                .unwrap_or_else(|| crate::status::unauthenticated().into_http()))),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty()).then_some(token)
}

/// How often the token file is looked at (its metadata only) to reload it when it changes.
const CHANGE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// What tells one version of a file from the next without reading it: a Kubernetes Secret update
/// swaps a symlink to a new file (another inode), an editor writes a new length or modification
/// time.
type FileVersion = (std::time::SystemTime, u64, u64, u64);

/// The file's [`FileVersion`] now; `None` while the file cannot be looked at.
fn file_version_now(path: &Path) -> Option<FileVersion> {
    let metadata = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let (device, inode) = {
        use std::os::unix::fs::MetadataExt as _;
        (metadata.dev(), metadata.ino())
    };
    #[cfg(not(unix))]
    let (device, inode) = (0, 0);
    Some((metadata.modified().ok()?, metadata.len(), device, inode))
}

/// [`file_version_now`] on a blocking thread, since a file system (a network one) may take its
/// time, and the runtime's threads are the calls'.
async fn file_version(path: &Path) -> Option<FileVersion> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || file_version_now(&path))
        .await
        .ok()?
}

/// Reloads the tokens whenever the file changes, looking every [`CHANGE_CHECK_INTERVAL`]. A
/// change that does not load (a half-written file, a file gone) is logged once and the old
/// tokens stay in force until the next change loads.
pub(crate) async fn reload_on_change(authenticator: Authenticator) {
    let mut seen = authenticator.snapshot().version;
    let mut ticker = tokio::time::interval(CHANGE_CHECK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match reload_if_changed(&authenticator, &mut seen).await {
            None => {}
            Some(Ok(count)) => tracing::info!(
                tokens = count,
                "the token file changed; reloaded auth tokens"
            ),
            Some(Err(error)) => tracing::error!(
                cause = %error,
                "the token file changed; auth tokens not reloaded, the old ones stay in force"
            ),
        }
    }
}

/// Reloads the tokens if the file's version is no longer `seen`, and makes the version seen.
async fn reload_if_changed(
    authenticator: &Authenticator,
    seen: &mut Option<FileVersion>,
) -> Option<Result<usize, TokenFileError>> {
    let version = file_version(&authenticator.snapshot().path).await;
    if version == *seen {
        return None;
    }
    *seen = version;
    Some(reload_off_the_runtime(authenticator).await)
}

/// Reloads the tokens on each SIGHUP (see [`Hangups`]).
pub(crate) async fn reload_on_sighup(hangups: Hangups, authenticator: Authenticator) {
    hangups
        .handle(move || {
            let authenticator = authenticator.clone();
            tokio::spawn(async move {
                match reload_off_the_runtime(&authenticator).await {
                    Ok(count) => {
                        tracing::info!(tokens = count, "received SIGHUP; reloaded auth tokens");
                    }
                    Err(error) => tracing::error!(
                        cause = %error,
                        "received SIGHUP; auth tokens not reloaded, the old ones stay in force"
                    ),
                }
            });
        })
        .await;
}

/// Reloads the tokens on a blocking thread: reading and hashing a file (on a network file
/// system, perhaps) must not hold a runtime thread, which is the calls'.
async fn reload_off_the_runtime(authenticator: &Authenticator) -> Result<usize, TokenFileError> {
    let authenticator = authenticator.clone();
    match tokio::task::spawn_blocking(move || authenticator.reload()).await {
        Ok(reloaded) => reloaded,
        // The blocking pool is shutting down with the process; the old tokens stay in force.
        Err(error) => Err(TokenFileError::Interrupted(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator(text: &str) -> Authenticator {
        let tokens = parse_tokens(text).unwrap();
        Authenticator::new(TokenFile {
            path: PathBuf::from("tokens"),
            tokens: Arc::new(tokens),
            version: None,
        })
    }

    #[test]
    fn bearer_headers() {
        let authenticator = authenticator("# operators\nsecret-1\n\n  secret-2  \n");
        let check = |header: Option<&str>, expected: bool| {
            assert_eq!(
                authenticator.accepts(header.map(str::as_bytes)),
                expected,
                "{header:?}"
            );
        };
        check(Some("Bearer secret-1"), true);
        check(Some("bearer secret-2"), true);
        check(Some("BEARER secret-1"), true);
        check(Some("Bearer secret-3"), false);
        check(Some("Bearer secret-1 "), false);
        check(Some("Bearer "), false);
        check(Some("Basic secret-1"), false);
        check(Some("secret-1"), false);
        check(Some("Bearer # operators"), false);
        check(None, false);
    }

    #[test]
    fn bad_lines_are_reported_by_number() {
        assert_eq!(parse_tokens("ok\nnot ok\n").unwrap_err(), 2);
        assert_eq!(parse_tokens("é\n").unwrap_err(), 1);
        assert!(
            parse_tokens("# only comments\n\n")
                .unwrap()
                .digests
                .is_empty()
        );
    }

    /// Issue 25: a Secret rotated between startup's load of the token file and the start of
    /// its watcher is reloaded, not missed until the next rotation.
    #[tokio::test]
    async fn a_change_made_before_the_watcher_starts_is_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "old-token\n").unwrap();
        let authenticator = Authenticator::new(TokenFile::load(&path).unwrap());
        // Rotated between the load and the watcher's start: a new length, so a new version
        // whatever the clock's resolution.
        std::fs::write(&path, "rotated-token\n").unwrap();
        let watcher = tokio::spawn(reload_on_change(authenticator.clone()));
        // The watcher's first look is at once; one that took the file's version at its start
        // for the version in force would never reload.
        let reloaded = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while !authenticator.accepts(Some(b"Bearer rotated-token")) {
                tokio::task::yield_now().await;
            }
        })
        .await;
        watcher.abort();
        assert!(reloaded.is_ok(), "the rotated token was never accepted");
        assert!(!authenticator.accepts(Some(b"Bearer old-token")));
    }
}
