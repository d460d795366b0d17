//! TLS: certificate and key files for the gRPC server (optionally requiring client
//! certificates) and for HTTPS to the controller (a custom CA, an optional client certificate).
//!
//! Everything is read and checked when the configuration is built, before any port is bound, so
//! a wrong file is a startup error that names the file and says why, never a failed handshake
//! later.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WantsClientCert;
use rustls::{ClientConfig, ConfigBuilder, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use rustls_platform_verifier::BuilderVerifierExt as _;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::regular_file::{self, FileError};
use crate::upstream::error_chain;

/// The gRPC server's TLS settings, checked.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server certificate chain and key.
    identity: Identity,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    client_ca: Option<Certificate>,
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
    #[error("cannot read {what} {path}: {cause}")]
    Read {
        /// What the file was for, as its flag.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why; in the message, so not also a `source`.
        cause: FileError,
    },
    /// The file holds no PEM certificate.
    #[error("{what} {path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate {
        /// What the file was for.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The file holds no usable PEM private key.
    #[error("{what} {path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    NoPrivateKey {
        /// What the file was for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the parser said.
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
        let key_pem = read_private_key("--tls-key", key)?;
        let client_ca = client_ca
            .map(|path| read_certificates("--tls-client-ca", path).map(Certificate::from_pem))
            .transpose()?;
        let server_tls = ServerTls {
            identity: Identity::from_pem(cert_pem, key_pem),
            client_ca,
        };
        // Building the acceptor is what checks that the key belongs to the certificate.
        tonic::transport::Server::builder()
            .tls_config(server_tls.config())
            .map_err(|error| TlsError::Unusable {
                what: format!(
                    "--tls-cert {} with --tls-key {}",
                    cert.display(),
                    key.display()
                ),
                reason: error_chain(&error),
            })?;
        Ok(server_tls)
    }

    /// The tonic server configuration.
    pub(crate) fn config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(self.identity.clone());
        match &self.client_ca {
            Some(client_ca) => config.client_ca_root(client_ca.clone()),
            None => config,
        }
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_ca.is_some()
    }
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
                    roots.add(certificate).map_err(|error| TlsError::Unusable {
                        what: format!("--upstream-ca {}", path.display()),
                        reason: error.to_string(),
                    })?;
                }
                config_builder()
                    .map_err(|error| settings_unusable(&error))?
                    .with_root_certificates(roots)
            }
            None => system_roots().map_err(|error| settings_unusable(&error))?,
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
                    .map_err(|error| TlsError::Unusable {
                        what: format!(
                            "--upstream-client-cert {} with --upstream-client-key {}",
                            cert.display(),
                            key.display()
                        ),
                        reason: error.to_string(),
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(UpstreamTls {
            config: Some(http1_only(config)),
        })
    }

    /// The rustls configuration for a controller at an `https` (or plain http) URL.
    pub(crate) fn client_config(&self, https: bool) -> Result<Arc<ClientConfig>, rustls::Error> {
        if let Some(config) = &self.config {
            return Ok(Arc::clone(config));
        }
        let builder = if https {
            system_roots()?
        } else {
            // An http:// controller never starts a handshake, so the system's roots (tens of
            // millions of instructions to load) are not read for it.
            config_builder()?.with_root_certificates(RootCertStore::empty())
        };
        Ok(http1_only(builder.with_no_client_auth()))
    }
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

fn settings_unusable(error: &rustls::Error) -> TlsError {
    TlsError::Unusable {
        what: "the controller's TLS settings".to_owned(),
        reason: error.to_string(),
    }
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
            reason: error.to_string(),
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

/// Reads a PEM file and checks that it holds a private key.
fn read_private_key(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(what, path)?;
    parse_private_key(what, path, &pem)?;
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
        reason: error.to_string(),
    })
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    regular_file::read(path).map_err(|cause| TlsError::Read {
        what,
        path: path.to_owned(),
        cause,
    })
}
