//! TLS: certificate and key files for the gRPC server (optionally requiring client
//! certificates) and for HTTPS to the controller (a custom CA, an optional client certificate).
//!
//! Everything is read and checked when the configuration is built, before any port is bound, so
//! a wrong file is a startup error that names the file and says why, never a failed handshake
//! later.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WantsClientCert;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ConfigBuilder, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use rustls_platform_verifier::BuilderVerifierExt as _;
use tokio_rustls::TlsAcceptor;

use crate::regular_file::{self, FileError};

/// The gRPC server's TLS settings, checked.
#[derive(Clone)]
pub struct ServerTls {
    /// The server certificate chain and key, and the client CA when clients must present a
    /// certificate (mTLS).
    config: Arc<ServerConfig>,
    /// Whether a client CA was given.
    requires_client_certificates: bool,
}

/// HTTPS settings for the controller, checked. Empty means the system's roots and no client
/// certificate.
#[derive(Debug, Clone, Default)]
pub struct UpstreamTls {
    /// Built from the files when any were given. Without files the system's roots are loaded
    /// when the client is built, and only for an https:// controller.
    config: Option<Arc<ClientConfig>>,
}

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read, or is not a regular file.
    #[error("cannot read {what} {path}")]
    Read {
        /// The flag that named the file, which says what it was for.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
        /// Why it cannot be read: only the source says it, so a printed chain says it once.
        #[source]
        cause: FileError,
    },
    /// The file holds no PEM certificate.
    #[error("{what} {path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate {
        /// The flag that named the file.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
    },
    /// The file holds no usable PEM private key.
    #[error("{what} {path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    NoPrivateKey {
        /// The flag that named the file.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
        /// What the PEM parser said.
        reason: String,
    },
    /// The files parse but do not work together (for example, the key is not the certificate's).
    #[error("{what}: {reason}")]
    Unusable {
        /// Which files, as their flags and paths.
        what: String,
        /// What the TLS library said.
        reason: String,
    },
}

// === impl ServerTls ===

impl ServerTls {
    /// Reads the server certificate chain and key, and the client CA for mTLS if given.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        let cert_pem = read_certificates("--tls-cert", cert)?;
        let key_pem = read("--tls-key", key)?;
        let key_der = parse_private_key("--tls-key", key, &key_pem)?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|error| unusable("the gRPC server's TLS settings".to_owned(), &error))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let what = || format!("--tls-client-ca {}", path.display());
                let mut roots = RootCertStore::empty();
                for certificate in certificates(&read_certificates("--tls-client-ca", path)?) {
                    roots
                        .add(certificate)
                        .map_err(|error| unusable(what(), &error))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|error| TlsError::Unusable {
                            what: what(),
                            reason: error.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        // This is what checks that the key belongs to the certificate.
        let mut config = builder
            .with_single_cert(certificates(&cert_pem).collect(), key_der)
            .map_err(|error| {
                let what = format!(
                    "--tls-cert {} with --tls-key {}",
                    cert.display(),
                    key.display()
                );
                unusable(what, &error)
            })?;
        // gRPC is HTTP/2; a client that offers no ALPN may still speak HTTP/1.1 (gRPC-Web).
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
            requires_client_certificates: client_ca.is_some(),
        })
    }

    /// The acceptor that runs the server side of each handshake.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.config))
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.requires_client_certificates
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The configuration holds the private key; show only what is safe.
        formatter
            .debug_struct("ServerTls")
            .field(
                "requires_client_certificates",
                &self.requires_client_certificates,
            )
            .finish_non_exhaustive()
    }
}

fn unusable(what: String, error: &rustls::Error) -> TlsError {
    let reason = match error {
        // rustls says "invalid peer certificate", but this one is in a file.
        rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding) => {
            "a certificate's base64 text does not decode to an X.509 certificate".to_owned()
        }
        other => other.to_string(),
    };
    TlsError::Unusable { what, reason }
}

// === impl UpstreamTls ===

impl UpstreamTls {
    /// Reads the controller's CA and the client certificate and key, each if given. A client
    /// certificate needs its key and a key needs its certificate.
    pub fn load(
        ca: Option<&Path>,
        client_cert: Option<&Path>,
        client_key: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let identity = match (client_cert, client_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(TlsError::Unusable {
                    what: "--upstream-client-cert and --upstream-client-key".to_owned(),
                    reason: "give both or neither".to_owned(),
                });
            }
        };
        if ca.is_none() && identity.is_none() {
            return Ok(UpstreamTls::default());
        }
        let builder = match ca {
            Some(path) => {
                let pem = read_certificates("--upstream-ca", path)?;
                let mut roots = RootCertStore::empty();
                for certificate in certificates(&pem) {
                    roots.add(certificate).map_err(|error| {
                        unusable(format!("--upstream-ca {}", path.display()), &error)
                    })?;
                }
                config_builder()
                    .map_err(|error| unusable("the controller's TLS settings".to_owned(), &error))?
                    .with_root_certificates(roots)
            }
            None => system_roots()
                .map_err(|error| unusable("the controller's TLS settings".to_owned(), &error))?,
        };
        let config = match identity {
            Some((cert, key)) => {
                let chain =
                    certificates(&read_certificates("--upstream-client-cert", cert)?).collect();
                let key_pem = read("--upstream-client-key", key)?;
                let key_der = parse_private_key("--upstream-client-key", key, &key_pem)?;
                // This is what checks that the key belongs to the certificate.
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|error| {
                        let what = format!(
                            "--upstream-client-cert {} with --upstream-client-key {}",
                            cert.display(),
                            key.display()
                        );
                        unusable(what, &error)
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(UpstreamTls {
            config: Some(http1_only(config)),
        })
    }

    /// The rustls configuration for the controller's Log Publisher over TLS: the same trust and
    /// client certificate as the task interface, without its HTTP ALPN.
    pub(crate) fn stream_config(&self) -> Result<Arc<ClientConfig>, rustls::Error> {
        let mut config = (*self.client_config()?).clone();
        config.alpn_protocols.clear();
        Ok(Arc::new(config))
    }

    /// The rustls configuration for a controller at an `https` URL. Only asked for one: the
    /// system's roots take tens of millions of instructions to load.
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>, rustls::Error> {
        if let Some(config) = &self.config {
            return Ok(Arc::clone(config));
        }
        Ok(http1_only(system_roots()?.with_no_client_auth()))
    }
}

/// A client configuration that trusts no server, for an HTTP client that must never speak TLS
/// (one that only ever calls an http:// controller): it costs nothing to build, where the
/// system's roots are slow to load and may be missing.
pub(crate) fn trusting_nothing() -> Result<Arc<ClientConfig>, rustls::Error> {
    let config = config_builder()?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    Ok(http1_only(config))
}

/// A client configuration builder on the aws-lc-rs provider that tonic's TLS already uses.
fn config_builder() -> Result<ConfigBuilder<ClientConfig, rustls::WantsVerifier>, rustls::Error> {
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
}

/// Offers only HTTP/1.1 in ALPN: the client speaks nothing else to the controller.
fn http1_only(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Trusts the platform's roots, read once here.
fn system_roots() -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, rustls::Error> {
    config_builder()?.with_platform_verifier()
}

/// The certificates in a PEM file that [`read_certificates`] has already checked.
fn certificates(pem: &[u8]) -> impl Iterator<Item = CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem).flatten()
}

/// Reads a PEM file and checks that it holds at least one certificate and nothing broken.
fn read_certificates(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(what, path)?;
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        certificate.map_err(|error| TlsError::Unusable {
            what: format!("{what} {}", path.display()),
            reason: pem_problem(&error),
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(pem)
}

fn parse_private_key(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| TlsError::NoPrivateKey {
        what,
        path: path.to_owned(),
        reason: pem_problem(&error),
    })
}

/// What is wrong with a PEM file, in its own terms: the parser's words give bytes as numbers
/// (`[45, 45, …]`) and a base64 error as a character's position.
fn pem_problem(error: &pem::Error) -> String {
    match error {
        pem::Error::Base64Decode(_) => "the text between a BEGIN line and its END line is not \
             base64, so it is not a certificate or key (is a placeholder still in place?)"
            .to_owned(),
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "a section has no end line (-----END {}-----)",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "a BEGIN line is malformed: {:?}",
            String::from_utf8_lossy(line)
        ),
        other => other.to_string(),
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    regular_file::read(path).map_err(|cause| TlsError::Read {
        what,
        path: path.to_owned(),
        cause,
    })
}
