//! TLS and mutual TLS for gRPC, HTTPS with a client certificate to the controller, and startup
//! errors for bad files; every certificate is made here with rcgen.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use url::Url;

use taskgate::config::{LogPublisherAddress, parse_upstream_url};
use taskgate::proto::task_service_client::TaskServiceClient;
use taskgate::proto::{CaseExtractRequest, WatchCaseEventsRequest};
use taskgate::tls::{ServerTls, TlsError, UpstreamTls};

use crate::support::{Gateway, PROMPTLY, TestFolder, endpoint, error_info, test_folder, within};

/// A CA, a certificate for localhost signed by it, and a client certificate signed by it, as
/// PEM files in a fresh folder, removed with the `Pki`.
pub(crate) struct Pki {
    directory: TestFolder,
}

impl Pki {
    pub(crate) fn new(name: &str) -> Pki {
        let directory = test_folder(&format!("tls-{name}"));
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let pki = Pki { directory };
        pki.write("ca.pem", &ca.as_ref().pem());
        for (name, names) in [
            ("server", vec!["localhost".to_owned()]),
            ("client", vec!["wms".to_owned()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let certificate = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            pki.write(&format!("{name}.pem"), &certificate.pem());
            pki.write(&format!("{name}.key"), &key.serialize_pem());
        }
        pki
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).unwrap();
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.directory.join(name)
    }

    pub(crate) fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    /// A client that trusts the CA and presents no certificate.
    fn client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read("ca.pem")))
            .domain_name("localhost")
    }

    /// A client that trusts the CA and presents the client certificate.
    fn client_tls_with_certificate(&self) -> ClientTlsConfig {
        self.client_tls().identity(Identity::from_pem(
            self.read("client.pem"),
            self.read("client.key"),
        ))
    }
}

async fn tls_channel(
    address: std::net::SocketAddr,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    endpoint(format!("https://{address}"))
        .tls_config(tls)?
        .connect()
        .await
}

fn request() -> CaseExtractRequest {
    CaseExtractRequest {
        port_id: 4,
        bin_id: 101337,
        ..Default::default()
    }
}

#[tokio::test]
async fn grpc_over_tls() {
    let pki = Pki::new("server");
    let server_tls = ServerTls::load(&pki.path("server.pem"), &pki.path("server.key"), None);
    let gateway = Gateway::builder()
        .tls(server_tls.unwrap(), pki.client_tls())
        .start()
        .await;
    gateway.case_extract(4, 101337, None).await.unwrap();

    // A plaintext client gets nowhere.
    let plaintext = endpoint(format!("http://{}", gateway.address))
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        assert!(
            TaskServiceClient::new(channel)
                .case_extract(request())
                .await
                .is_err()
        );
    }
}

/// The CLI reaches a gateway served over TLS at an `https://` address, trusting the system's
/// roots, or only the CA that `SSL_CERT_FILE` names, as here. It said "Connecting to HTTPS
/// without TLS enabled" to every one. A gateway whose certificate that CA did not sign is
/// refused.
#[tokio::test]
async fn the_cli_reaches_a_gateway_over_tls() {
    let pki = Pki::new("cli");
    let server_tls = ServerTls::load(&pki.path("server.pem"), &pki.path("server.key"), None);
    let gateway = Gateway::builder()
        .tls(server_tls.unwrap(), pki.client_tls())
        .start()
        .await;
    let url = format!("https://localhost:{}", gateway.address.port());
    let (code, stdout, stderr) = cli_health(&url, &pki.path("ca.pem"), "5s").await;
    assert_eq!(
        (code, stdout.as_str(), stderr.as_str()),
        (
            Some(0),
            format!("ok: health {url} \"liveness\": SERVING\n").as_str(),
            ""
        )
    );
    let other = Pki::new("cli-other");
    let (code, stdout, stderr) = cli_health(&url, &other.path("ca.pem"), "5s").await;
    assert_eq!((code, stdout.as_str()), (Some(1), ""));
    assert!(
        stderr.starts_with(&format!("error: cannot connect to the gateway at {url}: "))
            && stderr.contains("invalid peer certificate"),
        "{stderr}"
    );
}

/// An `https://` peer that accepts connections and never answers ends the CLI at `--timeout`:
/// the TLS handshake is bounded as the TCP connect is.
#[tokio::test]
async fn the_cli_gives_up_on_a_tls_handshake_at_its_timeout() {
    let pki = Pki::new("cli-silent");
    let (silent, _held) = crate::support::silent_peer().await;
    let url = silent.replacen("http://", "https://", 1);
    let (code, stdout, stderr) = cli_health(&url, &pki.path("ca.pem"), "200ms").await;
    assert_eq!((code, stdout.as_str()), (Some(1), ""));
    assert!(
        stderr.starts_with(&format!("error: cannot connect to the gateway at {url}: ")),
        "{stderr}"
    );
}

/// Runs `taskgate health --service liveness` against `url` with `SSL_CERT_FILE` set to `ca`;
/// its exit code, stdout and stderr.
async fn cli_health(
    url: &str,
    ca: &std::path::Path,
    timeout: &str,
) -> (Option<i32>, String, String) {
    let output = tokio::process::Command::new(crate::cli::BIN)
        .args([
            "health",
            "--gateway",
            url,
            "--service",
            "liveness",
            "--timeout",
            timeout,
        ])
        .env("SSL_CERT_FILE", ca)
        .stdin(std::process::Stdio::null())
        .output();
    let output = within(PROMPTLY, "taskgate health did not exit", output)
        .await
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn mutual_tls_rejects_a_client_without_a_certificate() {
    let pki = Pki::new("mtls");
    let server_tls = ServerTls::load(
        &pki.path("server.pem"),
        &pki.path("server.key"),
        Some(&pki.path("ca.pem")),
    );
    let gateway = Gateway::builder()
        .tls(server_tls.unwrap(), pki.client_tls_with_certificate())
        .start()
        .await;
    gateway.case_extract(4, 101337, None).await.unwrap();

    // The handshake may fail at connect or at the first call, depending on timing.
    match tls_channel(gateway.address, pki.client_tls()).await {
        Err(_) => {}
        Ok(channel) => {
            let status = TaskServiceClient::new(channel)
                .case_extract(request())
                .await
                .unwrap_err();
            assert!(
                matches!(status.code(), Code::Unavailable | Code::Unknown),
                "{status:?}"
            );
        }
    }
}

#[test]
fn bad_tls_files_are_startup_errors_that_name_the_file() {
    let pki = Pki::new("bad");
    let other = Pki::new("other");
    let message = |error: TlsError| error.to_string();

    let missing = pki.path("missing.pem");
    let error = ServerTls::load(&missing, &pki.path("server.key"), None).unwrap_err();
    assert!(message(error).contains(&format!("cannot read --tls-cert {}", missing.display())));

    let error =
        ServerTls::load(&pki.path("server.key"), &pki.path("server.key"), None).unwrap_err();
    assert!(message(error).contains("holds no PEM certificate"));

    let error =
        ServerTls::load(&pki.path("server.pem"), &pki.path("server.pem"), None).unwrap_err();
    assert!(message(error).contains("holds no PEM private key"));

    // A key that is not the certificate's.
    let error =
        ServerTls::load(&pki.path("server.pem"), &other.path("server.key"), None).unwrap_err();
    let text = message(error);
    assert!(
        text.contains("--tls-cert") && text.contains("--tls-key"),
        "{text}"
    );

    // The placeholder of deploy/kubernetes/secret.yaml, left in place.
    let placeholder = pki.path("placeholder.pem");
    std::fs::write(
        &placeholder,
        "-----BEGIN CERTIFICATE-----\nREPLACE WITH THE CONTROLLER'S CA CERTIFICATE\n\
         -----END CERTIFICATE-----\n",
    )
    .unwrap();
    let error = UpstreamTls::load(Some(&placeholder), None, None).unwrap_err();
    assert_eq!(
        message(error),
        format!(
            "--upstream-ca {}: the text between a BEGIN line and its END line is not base64, so \
             it is not a certificate or key (is a placeholder still in place?)",
            placeholder.display()
        )
    );
    let unended = pki.path("unended.pem");
    std::fs::write(&unended, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
    let error = UpstreamTls::load(Some(&unended), None, None).unwrap_err();
    assert_eq!(
        message(error),
        format!(
            "--upstream-ca {}: a section has no end line (-----END CERTIFICATE-----)",
            unended.display()
        )
    );

    let not_x509 = pki.path("not-x509.pem");
    std::fs::write(
        &not_x509,
        "-----BEGIN CERTIFICATE-----\nMIIBkTCB+wIJAKHHIG\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let error = UpstreamTls::load(Some(&not_x509), None, None).unwrap_err();
    assert_eq!(
        message(error),
        format!(
            "--upstream-ca {}: a certificate's base64 text does not decode to an X.509 \
             certificate",
            not_x509.display()
        )
    );

    // The same as the client certificate, which is read by another path.
    let error =
        UpstreamTls::load(None, Some(&not_x509), Some(&pki.path("client.key"))).unwrap_err();
    assert_eq!(
        message(error),
        format!(
            "--upstream-client-cert {} with --upstream-client-key {}: a certificate's base64 \
             text does not decode to an X.509 certificate",
            not_x509.display(),
            pki.path("client.key").display()
        )
    );

    let error = UpstreamTls::load(None, Some(&pki.path("client.pem")), None).unwrap_err();
    assert!(message(error).contains("give both or neither"));

    // A client key that is not the client certificate's.
    let error = UpstreamTls::load(
        Some(&pki.path("ca.pem")),
        Some(&pki.path("client.pem")),
        Some(&other.path("client.key")),
    )
    .unwrap_err();
    let text = message(error);
    assert!(
        text.contains("--upstream-client-cert") && text.contains("--upstream-client-key"),
        "{text}"
    );
}

/// A controller on HTTPS that requires a client certificate from the test CA; it answers every
/// request with an empty success.
async fn https_controller(pki: &Pki) -> std::net::SocketAddr {
    let acceptor = acceptor_requiring_client_certificates(pki);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(stream).await else {
                    return;
                };
                let mut buffer = vec![0_u8; 4096];
                let mut request = Vec::new();
                // The gateway's request is small; read until the end of the XML body.
                while !request.ends_with(b"</methodcall>\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                let body = "<response><params/></response>";
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.flush().await;
            });
        }
    });
    address
}

/// A TLS server configuration with the test CA's localhost certificate that requires a client
/// certificate from the same CA.
fn acceptor_requiring_client_certificates(pki: &Pki) -> TlsAcceptor {
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let certificates = CertificateDer::pem_file_iter(pki.path("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
    let config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates, key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

/// A gateway calling `url`, trusting `ca`'s CA and presenting `client`'s certificate, if any.
async fn gateway_with_upstream_tls(url: &Url, ca: &Pki, client: Option<(&Pki, &str)>) -> Gateway {
    let client_file =
        |extension: &str| client.map(|(pki, name)| pki.path(&format!("{name}.{extension}")));
    let (cert, key) = (client_file("pem"), client_file("key"));
    let upstream_tls =
        UpstreamTls::load(Some(&ca.path("ca.pem")), cert.as_deref(), key.as_deref()).unwrap();
    Gateway::builder()
        .upstream(url)
        .config(|config| config.upstream.tls = upstream_tls)
        .start()
        .await
}

#[tokio::test]
async fn https_to_the_controller_with_a_client_certificate() {
    let pki = Pki::new("upstream");
    let address = https_controller(&pki).await;
    let url =
        parse_upstream_url(&format!("https://localhost:{}/api/v2/task", address.port())).unwrap();

    let client = Some((&pki, "client"));
    let gateway = gateway_with_upstream_tls(&url, &pki, client).await;
    gateway.case_extract(4, 101337, None).await.unwrap();

    // Without the client certificate the controller refuses the handshake. Under TLS 1.3 the
    // gateway hears of it only after writing the request, so it cannot tell it from a
    // connection lost under a POST: the controller may have acted, as far as it knows.
    let gateway = gateway_with_upstream_tls(&url, &pki, None).await;
    let status = gateway.case_extract(4, 101337, None).await.unwrap_err();
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert_eq!(error_info(&status).reason, "UPSTREAM_CONNECTION_LOST");
    assert!(
        status
            .message()
            .ends_with("received fatal alert: CertificateRequired"),
        "{}",
        status.message()
    );

    // A controller certificate from another CA fails the handshake: nothing was sent.
    let other = Pki::new("upstream-other");
    let gateway = gateway_with_upstream_tls(&url, &other, client).await;
    let status = gateway.case_extract(4, 101337, None).await.unwrap_err();
    assert_eq!(error_info(&status).reason, "UPSTREAM_UNREACHABLE");
    assert!(
        status.message().contains("certificate"),
        "{}",
        status.message()
    );
}

/// The Log Publisher over TLS (`tls://HOST:PORT`), with the upstream's CA and client
/// certificate: a publisher that requires the certificate streams an event to a watcher, and
/// one whose certificate the gateway does not trust is never read (issue 10).
#[tokio::test]
async fn the_log_publisher_over_tls_with_the_upstreams_ca_and_client_certificate() {
    let pki = Pki::new("log-publisher");
    let acceptor = acceptor_requiring_client_certificates(&pki);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Every connection that completes the handshake, for the test to write to.
    let (handshaken, mut publishers) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            if let Ok(stream) = acceptor.accept(stream).await {
                let _ = handshaken.send(stream);
            }
        }
    });
    let upstream_tls = UpstreamTls::load(
        Some(&pki.path("ca.pem")),
        Some(&pki.path("client.pem")),
        Some(&pki.path("client.key")),
    )
    .unwrap();
    let tls_address = LogPublisherAddress {
        host: "localhost".to_owned(),
        port,
        tls: true,
    };
    let address = tls_address.clone();
    let gateway = Gateway::builder()
        .config(move |config| {
            config.upstream.tls = upstream_tls;
            config.log_publisher = Some(address);
        })
        .start()
        .await;
    let mut stream = within(PROMPTLY, "no TLS handshake", publishers.recv())
        .await
        .unwrap();
    let mut events = within(PROMPTLY, "no watch", async {
        loop {
            let request = WatchCaseEventsRequest::default();
            if let Ok(response) = gateway.client.clone().watch_case_events(request).await {
                return response.into_inner();
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    stream.write_all(b"AC,4,101337,EREQ\r\n").await.unwrap();
    let event = within(PROMPTLY, "no event", events.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.segment, "AC,4,101337,EREQ");

    // A gateway that trusts another CA refuses the publisher's certificate: no watch starts,
    // and the refusal says why.
    let other = Pki::new("log-publisher-other");
    let untrusting = UpstreamTls::load(Some(&other.path("ca.pem")), None, None).unwrap();
    let gateway = Gateway::builder()
        .config(move |config| {
            config.upstream.tls = untrusting;
            config.log_publisher = Some(tls_address);
        })
        .start()
        .await;
    let status = within(PROMPTLY, "the handshake did not fail", async {
        loop {
            let request = WatchCaseEventsRequest::default();
            let status = gateway
                .client
                .clone()
                .watch_case_events(request)
                .await
                .unwrap_err();
            if status.message().contains("TLS handshake") {
                return status;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(error_info(&status).reason, "LOG_PUBLISHER_UNAVAILABLE");
    assert!(
        status
            .message()
            .contains(&format!("TLS handshake with tls://localhost:{port} failed")),
        "{}",
        status.message()
    );
}
