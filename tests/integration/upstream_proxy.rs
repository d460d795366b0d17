//! `--upstream-proxy` (issue 19, item 1): controller calls go through a forward proxy only when
//! the operator names one, and proxy variables in the environment are never used. The fake
//! controller stands in for the proxy: it records the request line the gateway sent it.

use tokio::process::Command;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::cli::{BIN, TaskgateProcess, run};
use crate::support::{FakeUpstream, Gateway, Script, Seen, error_info};
use taskgate::config::parse_upstream_proxy;

/// A controller address on loopback where nothing listens: a call that reached it directly,
/// rather than through the proxy, would fail as unreachable.
const BEHIND_THE_PROXY: &str = "127.0.0.2:9";

const OK_REPLY: &str = "<response><params/></response>";

/// A gateway that calls `upstream` through `proxy`.
async fn gateway_through(proxy: &FakeUpstream, upstream: &str) -> Gateway {
    let proxy = parse_upstream_proxy(&proxy_url(proxy)).unwrap();
    Gateway::builder()
        .upstream(&upstream.parse().unwrap())
        .config(move |config| config.upstream.proxy = Some(proxy))
        .start()
        .await
}

/// `taskgate case-extract` through `gateway`, which must accept it.
async fn extract_with_the_cli(gateway: &str) {
    let args = ["--port", "4", "--bin", "101337"];
    run(
        &[&["case-extract", "--gateway", gateway][..], &args].concat(),
        0,
    )
    .await;
}

/// The address of the fake that stands in for the proxy, as `--upstream-proxy` takes it.
fn proxy_url(proxy: &FakeUpstream) -> String {
    format!("http://{}", proxy.url.authority())
}

/// The request line and `Host` of the next request the fake saw.
async fn next_request(fake: &mut FakeUpstream) -> (String, String) {
    match fake.next().await {
        Seen::Request {
            request_line,
            headers,
            ..
        } => (request_line, headers["host"].clone()),
        Seen::Closed => panic!("expected a request, saw a closed connection"),
    }
}

#[tokio::test]
async fn an_http_controller_is_called_through_the_proxy() {
    let mut proxy = FakeUpstream::start(Script::ok_xml(OK_REPLY)).await;
    let upstream = format!("http://{BEHIND_THE_PROXY}/api/v2/task");
    let gateway = gateway_through(&proxy, &upstream).await;

    gateway.case_extract(4, 101337, None).await.unwrap();

    // A forward proxy is sent the whole URL, and the controller's own `Host`.
    let (request_line, host) = next_request(&mut proxy).await;
    assert_eq!(request_line, format!("POST {upstream} HTTP/1.1"));
    assert_eq!(host, BEHIND_THE_PROXY);
}

/// A proxy may answer 503 after it passed the POST on (Envoy's "upstream reset before
/// headers"): that is not the controller declining, so it is not UNAVAILABLE, which every retry
/// policy would repeat.
#[tokio::test]
async fn a_503_through_the_proxy_may_have_acted() {
    for status in [503, 429] {
        let proxy = FakeUpstream::start(Script::Respond {
            status,
            content_type: "text/plain",
            body: b"upstream reset before headers".to_vec(),
        })
        .await;
        let gateway =
            gateway_through(&proxy, &format!("http://{BEHIND_THE_PROXY}/api/v2/task")).await;

        let error = gateway.case_extract(4, 101337, None).await.unwrap_err();

        assert_eq!(error.code(), Code::Unknown, "{status}: {error:?}");
        assert_eq!(error_info(&error).reason, "UPSTREAM_HTTP_ERROR");
        assert_eq!(
            error_info(&error).metadata["httpStatus"],
            status.to_string()
        );
        assert!(error.get_details_retry_info().is_none(), "{status}");
        let reason = if status == 503 {
            "503 Service Unavailable"
        } else {
            "429 Too Many Requests"
        };
        assert_eq!(
            error.message(),
            format!(
                "case_extract port 4 bin 101337: --upstream-proxy, or the controller behind it, \
                 answered HTTP {reason}"
            )
        );
    }
}

/// An https:// controller is reached through a CONNECT tunnel; a proxy that refuses the tunnel
/// has sent nothing on, so the call is UNAVAILABLE, safe to repeat.
#[tokio::test]
async fn a_refused_tunnel_to_an_https_controller_is_unreachable() {
    let mut proxy = FakeUpstream::start(Script::Respond {
        status: 403,
        content_type: "text/plain",
        body: b"CONNECT to this port is not allowed".to_vec(),
    })
    .await;
    let gateway = gateway_through(&proxy, &format!("https://{BEHIND_THE_PROXY}/api/v2/task")).await;

    let error = gateway.case_extract(4, 101337, None).await.unwrap_err();

    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
    assert_eq!(error_info(&error).reason, "UPSTREAM_UNREACHABLE");
    assert!(
        error.message().starts_with(
            "case_extract port 4 bin 101337: cannot connect to the controller through \
             --upstream-proxy: "
        ),
        "{}",
        error.message()
    );
    let (request_line, _) = next_request(&mut proxy).await;
    assert_eq!(request_line, format!("CONNECT {BEHIND_THE_PROXY} HTTP/1.1"));
}

/// The proxy variables every HTTP library reads are set to a proxy that would answer the call;
/// the gateway still calls the controller directly, as the README promises.
#[tokio::test]
async fn proxy_variables_in_the_environment_are_never_used() {
    let mut proxy = FakeUpstream::start(Script::ok_xml(OK_REPLY)).await;
    let mut controller = FakeUpstream::start(Script::ok_xml(OK_REPLY)).await;
    let proxy_url = proxy_url(&proxy);
    let mut command = Command::new(BIN);
    command.args([
        "serve",
        "--upstream",
        controller.url.as_str(),
        "--listen",
        "127.0.0.1:0",
    ]);
    for variable in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        command.env(variable, &proxy_url);
    }
    command.env_remove("NO_PROXY").env_remove("no_proxy");
    let process =
        TaskgateProcess::start_serving(TaskgateProcess::spawn_command(&mut command)).await;

    extract_with_the_cli(&process.gateway).await;

    let (request_line, _) = next_request(&mut controller).await;
    assert_eq!(request_line, "POST /api/v2/task HTTP/1.1");
    assert_eq!(proxy.requests_so_far(), 0);
}

#[tokio::test]
async fn the_proxy_is_named_in_the_listening_line_and_refused_with_the_simulator() {
    let mut proxy = FakeUpstream::start(Script::ok_xml(OK_REPLY)).await;
    let proxy_url = proxy_url(&proxy);
    // NO_PROXY is a rule for the environment's proxies, which the gateway never takes: the
    // proxy it is given carries every call.
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--upstream"])
        .arg(format!("http://{BEHIND_THE_PROXY}/api/v2/task"))
        .args(["--upstream-proxy", &proxy_url, "--listen", "127.0.0.1:0"])
        .env("NO_PROXY", "*")
        .env("no_proxy", "*");
    let mut process =
        TaskgateProcess::start_serving(TaskgateProcess::spawn_command(&mut command)).await;
    assert!(
        process
            .log
            .contains(&format!("upstream_proxy={proxy_url} ")),
        "{}",
        process.log
    );
    // Health probes the next hop, and says which it probed: a proxy that accepts connections
    // says nothing of the controller behind it.
    let probed = "upstream proxy reachable; health SERVING";
    let line = match process.log.lines().find(|line| line.contains(probed)) {
        Some(line) => line.to_owned(),
        None => process.wait_for_line(probed).await,
    };
    assert!(
        line.ends_with(&format!(
            "host=127.0.0.1 port={}",
            proxy.url.port().unwrap()
        )),
        "{line}"
    );
    extract_with_the_cli(&process.gateway).await;
    let (request_line, _) = next_request(&mut proxy).await;
    assert!(
        request_line.starts_with("POST http://127.0.0.2:9/"),
        "{request_line}"
    );

    let (_, stderr) = run(&["serve", "--simulator", "--upstream-proxy", &proxy_url], 2).await;
    assert_eq!(
        stderr,
        "error: --upstream-proxy and --simulator cannot both be given: the simulator is reached \
         on loopback\n"
    );
    let (_, stderr) = run(
        &[
            "serve",
            "--upstream-proxy",
            "http://user:S3cr3t@127.0.0.1:3128",
        ],
        2,
    )
    .await;
    assert!(
        stderr.starts_with(
            "error: --upstream-proxy 'http://user:***@127.0.0.1:3128' has credentials, which are \
             never sent"
        ),
        "{stderr}"
    );
}
