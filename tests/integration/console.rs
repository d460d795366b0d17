//! The operator console on the gRPC port: the page and its files with the headers a browser
//! needs to run them safely, the settings the page reads, and nothing of it when it is off.

use std::time::Duration;

use reqwest::Response;
use reqwest::header::HeaderMap;

use taskgate::console::{self, CONTENT_SECURITY_POLICY};

use crate::auth::token_file;
use crate::cli::{TaskgateProcess, run};
use crate::support::{Gateway, GatewayBuilder, http_client, unused_address};

fn with_console(builder: GatewayBuilder, ports: &[u32]) -> GatewayBuilder {
    let settings = console::Settings::new(ports.to_vec()).unwrap();
    builder.config(move |config| config.console = Some(settings))
}

async fn get(base: &str, path: &str) -> Response {
    http_client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap()
}

async fn json(response: Response) -> serde_json::Value {
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
        .to_str()
        .unwrap()
}

/// The headers every console response carries, whatever the file.
fn assert_locked_down(headers: &HeaderMap) {
    assert_eq!(
        header(headers, "content-security-policy"),
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
         img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    assert_eq!(header(headers, "x-content-type-options"), "nosniff");
    assert_eq!(header(headers, "referrer-policy"), "no-referrer");
    assert_eq!(header(headers, "x-frame-options"), "DENY");
    assert_eq!(header(headers, "cross-origin-opener-policy"), "same-origin");
    assert_eq!(
        header(headers, "cross-origin-resource-policy"),
        "same-origin"
    );
}

/// The files the page names, as `/console/…` paths, in the order it names them.
fn named_files(page: &str) -> Vec<String> {
    page.split(['"', '\''])
        .filter(|part| part.starts_with("/console/"))
        .map(ToOwned::to_owned)
        .collect()
}

#[tokio::test]
async fn the_page_and_its_files_are_served_locked_down_with_their_types_and_cache_rules() {
    let gateway = with_console(Gateway::builder(), &[1, 2, 3, 4])
        .start()
        .await;
    let base = format!("http://{}", gateway.address);
    let page = get(&base, "/").await;
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(header(&headers, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&headers, "cache-control"), "no-cache");
    assert_locked_down(&headers);
    let page = page.text().await.unwrap();
    let files = named_files(&page);
    let extensions: Vec<&str> = files
        .iter()
        .map(|path| path.rsplit_once('.').unwrap().1)
        .collect();
    assert_eq!(extensions, ["svg", "css", "js", "txt"], "{page}");
    for path in files {
        let response = get(&base, &path).await;
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers();
        let expected_type = match path.rsplit_once('.').unwrap().1 {
            "js" => "text/javascript; charset=utf-8",
            "css" => "text/css; charset=utf-8",
            "txt" => "text/plain; charset=utf-8",
            _ => "image/svg+xml",
        };
        assert_eq!(header(headers, "content-type"), expected_type, "{path}");
        assert_eq!(
            header(headers, "cache-control"),
            "public, max-age=31536000, immutable",
            "{path}"
        );
        assert_locked_down(headers);
    }
    assert_eq!(
        CONTENT_SECURITY_POLICY,
        header(&headers, "content-security-policy")
    );
}

#[tokio::test]
async fn a_name_not_in_the_bundle_is_not_found_and_head_gives_no_body() {
    let gateway = with_console(Gateway::builder(), &[4]).start().await;
    let base = format!("http://{}", gateway.address);
    let missing = get(&base, "/console/console-OLDHASH.js").await;
    assert_eq!(missing.status(), 404);
    assert_locked_down(missing.headers());
    assert_eq!(
        missing.text().await.unwrap(),
        "/console/console-OLDHASH.js is not a file of this gateway's console; the console is at /\n"
    );
    let head = http_client().head(format!("{base}/")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        header(head.headers(), "content-type"),
        "text/html; charset=utf-8"
    );
    assert_eq!(head.bytes().await.unwrap().len(), 0);
}

/// A person who types the folder's name, with or without the slash, is sent to the page.
#[tokio::test]
async fn the_console_folder_redirects_to_the_page() {
    let gateway = with_console(Gateway::builder(), &[4]).start().await;
    let not_following = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in ["/console", "/console/"] {
        let response = not_following
            .get(format!("http://{}{path}", gateway.address))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 308, "{path}");
        assert_eq!(header(response.headers(), "location"), "/", "{path}");
        assert_eq!(header(response.headers(), "cache-control"), "no-cache");
        assert_locked_down(response.headers());
        assert_eq!(response.text().await.unwrap(), "the console is at /\n");
    }
    let followed = get(&format!("http://{}", gateway.address), "/console").await;
    assert_eq!(followed.status(), 200);
    assert_eq!(
        header(followed.headers(), "content-type"),
        "text/html; charset=utf-8"
    );
}

#[tokio::test]
async fn the_page_reads_its_ports_auth_deadline_and_the_fault_table_from_the_gateway() {
    let gateway = with_console(Gateway::builder(), &[4, 1, 2000])
        .auth_tokens(&["secret"])
        .config(|config| {
            config.upstream.timeout = Duration::from_millis(3500);
            config.upstream.idempotency_window = Duration::from_secs(90);
        })
        .start()
        .await;
    let response = get(&format!("http://{}", gateway.address), console::CONFIG_PATH).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(response.headers(), "content-type"),
        "application/json"
    );
    assert_eq!(header(response.headers(), "cache-control"), "no-cache");
    assert_locked_down(response.headers());
    let config = json(response).await;
    assert_eq!(config["ports"], serde_json::json!([4, 1, 2000]));
    assert_eq!(config["auth"], true);
    // The upstream timeout and 2 s for the gateway's own work: a controller that answers
    // within --upstream-timeout is never cut short by the page's deadline.
    assert_eq!(config["callDeadlineMs"], 5500);
    // How long a Repeat with the same key is answered from the first call.
    assert_eq!(config["idempotencyWindowMs"], 90_000);
    assert_eq!(
        config["faults"]["1148"],
        serde_json::json!({
            "name": "PREVIOUS_ACTION_NOT_COMPLETED",
            "meaning": "New action cannot be started until the previous action has been completed.",
            "advice": "retry after the RetryInfo delay; the controller did not start the action",
            "mayHaveActed": false,
        })
    );
    let row = |reason: &str| {
        config["gatewayErrors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["reason"] == reason)
            .unwrap()
            .clone()
    };
    // Codes by number, as a browser's gRPC-Web client gives them; their names from one table.
    assert_eq!(row("UNAUTHENTICATED")["code"], 16);
    assert_eq!(row("UNAUTHENTICATED")["mayHaveActed"], false);
    assert_eq!(row("UPSTREAM_TIMEOUT")["mayHaveActed"], true);
    // Repeat is offered only where the advice is a repeat with the same request_id.
    assert_eq!(row("REQUEST_IN_PROGRESS")["repeatSameKey"], true);
    assert_eq!(row("UPSTREAM_TIMEOUT")["repeatSameKey"], false);
    assert_eq!(row("SHUTDOWN_GRACE_RAN_OUT")["repeatSameKey"], false);
    // Nor after a failed read of the port where the row says no repeat can settle it.
    assert_eq!(row("SHUTDOWN_GRACE_RAN_OUT")["unsettled"], true);
    assert_eq!(row("UPSTREAM_TIMEOUT")["unsettled"], false);
    // A Repeat's refusal after the key was taken says the gateway took it as new.
    assert_eq!(row("DEADLINE_TOO_SHORT")["keyClaimed"], true);
    assert_eq!(row("OVERLOADED")["keyClaimed"], false);
    assert_eq!(config["codeNames"][16], "UNAUTHENTICATED");
    assert_eq!(config["codeNames"][1], "CANCELLED");
    assert_eq!(config["codeNames"].as_array().unwrap().len(), 17);
}

/// Each gateway process tells the page a random id of its own, so the page can tell a restart
/// (after which a repeated key is a new call) from the same gateway.
#[tokio::test]
async fn each_gateway_process_has_an_instance_id_of_its_own() {
    let mut instances = Vec::new();
    for _ in 0..2 {
        let gateway = with_console(Gateway::builder(), &[4]).start().await;
        let base = format!("http://{}", gateway.address);
        let first = json(get(&base, console::CONFIG_PATH).await).await;
        let again = json(get(&base, console::CONFIG_PATH).await).await;
        assert_eq!(first["instance"], again["instance"]);
        let instance = first["instance"].as_str().unwrap().to_owned();
        assert!(uuid::Uuid::parse_str(&instance).is_ok(), "{instance}");
        instances.push(instance);
    }
    assert_ne!(instances[0], instances[1]);
}

/// The console takes only GET and HEAD of its own paths: gRPC and gRPC-Web calls go on as
/// before, on the same port.
#[tokio::test]
async fn calls_are_unchanged_with_the_console_on() {
    let gateway = with_console(Gateway::builder(), &[4]).start().await;
    let state = gateway.case_get_state(4).await.unwrap();
    assert_eq!(state.raw_state, "NOOP");
    let post = http_client()
        .post(format!("http://{}/", gateway.address))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 400);
    assert!(post.headers().get("content-security-policy").is_none());
}

/// Off, nothing of the console is served: its paths get what any HTTP/1.1 request that is not
/// gRPC-Web gets.
#[tokio::test]
async fn with_the_console_off_its_paths_are_not_served() {
    let gateway = Gateway::builder().start().await;
    let base = format!("http://{}", gateway.address);
    for path in ["/", console::CONFIG_PATH, "/console/icon.svg"] {
        let response = get(&base, path).await;
        assert_eq!(response.status(), 400, "{path}");
        assert!(
            response.headers().get("content-security-policy").is_none(),
            "{path}"
        );
    }
}

/// `serve --simulator` turns the console on with the layout's ports; `--console=false` turns it
/// off.
#[tokio::test]
async fn the_simulator_turns_the_console_on_with_its_layouts_ports() {
    let on = TaskgateProcess::start(&[]).await;
    let config = json(get(&on.gateway, console::CONFIG_PATH).await).await;
    assert_eq!(config["ports"], serde_json::json!([1, 2, 3, 4]));
    assert_eq!(config["auth"], false);
    let off = TaskgateProcess::start(&["--console=false"]).await;
    assert_eq!(get(&off.gateway, "/").await.status(), 400);
}

#[tokio::test]
async fn console_settings_that_cannot_work_stop_the_gateway_at_startup() {
    let (_, stderr) = run(&["serve", "--console", "--listen", "127.0.0.1:0"], 2).await;
    assert!(
        stderr.contains(
            "--console needs --console-ports, the ports to show (for example --console-ports \
             1,2,3,4); with --simulator they are its layout's"
        ),
        "{stderr}"
    );
    let (_, stderr) = run(
        &[
            "serve",
            "--simulator",
            "--console-ports",
            "4,2001",
            "--listen",
            "127.0.0.1:0",
        ],
        2,
    )
    .await;
    assert!(
        stderr.contains(
            "--console-ports 2001 is out of range 1-2000: the task interface has no such port"
        ),
        "{stderr}"
    );
}

/// A console served without a token file, outside the simulator's test bench, is warned about
/// at startup, as the README asks for one; and the "gateway listening" line says where the page
/// is, or that it is off.
#[tokio::test]
async fn a_console_without_a_token_file_is_warned_about_and_its_address_logged() {
    const WARNING: &str = "the console is on without --auth-tokens-file: anyone whose browser \
                           reaches this port can move a robot through it (README, Console)";
    let upstream = format!("http://{}/api/v2/task", unused_address().await);
    let console = ["--console", "--console-ports", "4"];
    let warned = TaskgateProcess::start_with_upstream(&upstream, &console).await;
    assert!(warned.log.contains(WARNING), "{}", warned.log);
    let listening = warned.log.lines().last().unwrap();
    assert!(
        listening.contains(&format!(" console={}/ ", warned.gateway)),
        "{listening}"
    );

    let tokens = token_file("console", "a-token\n");
    let with_tokens = [
        &console[..],
        &["--auth-tokens-file", tokens.to_str().unwrap()],
    ]
    .concat();
    let quiet = TaskgateProcess::start_with_upstream(&upstream, &with_tokens).await;
    assert!(!quiet.log.contains(WARNING), "{}", quiet.log);
    let simulator = TaskgateProcess::start(&[]).await;
    assert!(!simulator.log.contains(WARNING), "{}", simulator.log);
    let off = TaskgateProcess::start_with_upstream(&upstream, &[]).await;
    assert!(off.log.contains(" console=off "), "{}", off.log);
}
