//! The simulated controller's edges, spoken to directly: the task interface's XML rules and
//! plain-text reasons for requests it cannot take, and the Log Publisher's slots.

use reqwest::StatusCode;
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use taskgate::codec::{DEFAULT_MAX_BODY_BYTES, MethodCall};
use taskgate::simulator::layout::Layout;
use taskgate::simulator::{Simulator, log_publisher};

use crate::support::{CALL_LIMIT, http_client, start_simulator, within};

/// POSTs `body` and returns the status, Content-Type and body text.
async fn post(path: &str, content_type: &str, body: Vec<u8>) -> (StatusCode, String, String) {
    let url = start_simulator(Layout::default_layout()).await;
    let response = http_client()
        .post(url.join(path).unwrap())
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (status, content_type, response.text().await.unwrap())
}

fn case_extract(port_id: &str, bin_id: &str) -> Vec<u8> {
    format!(
        "<?xml version=\"1.0\"?>\n<methodcall>\n  <name>case_extract</name>\n  <params>\n    \
         <port_id>{port_id}</port_id>\n    <bin_id>{bin_id}</bin_id>\n  </params>\n</methodcall>"
    )
    .into_bytes()
}

#[tokio::test]
async fn the_documented_request_gets_the_documented_reply() {
    let (status, content_type, body) = post(
        "/api/v2/task",
        "application/xml",
        case_extract("4", "101337"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/xml; charset=utf-8");
    assert_eq!(
        body,
        "<?xml version=\"1.0\"?>\n<response>\n  <params/>\n</response>\n"
    );
}

#[tokio::test]
async fn faults_are_http_200_with_a_fault_body() {
    let (status, _, body) = post("/api/v2/task", "text/xml", case_extract("4", "x")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        "<?xml version=\"1.0\"?>\n<response>\n  <fault>\n    <code>1010</code>\n  </fault>\n</response>\n"
    );
}

#[tokio::test]
async fn a_latin1_request_is_read() {
    let mut body = b"<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><!-- \xE6 -->".to_vec();
    body.extend(case_extract("4", "101337").split_off(22));
    let (status, _, reply) = post("/api/v2/task", "application/xml", body).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert!(reply.contains("<params/>"), "{reply}");
}

#[tokio::test]
async fn malformed_xml_is_400_with_a_reason() {
    let (status, content_type, body) = post(
        "/api/v2/task",
        "application/xml",
        b"<methodcall><name>".to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(content_type, "text/plain; charset=utf-8");
    assert!(body.starts_with("malformed method call: "), "{body}");

    let doctype = b"<?xml version=\"1.0\"?><!DOCTYPE m [<!ENTITY e \"4\">]><methodcall/>".to_vec();
    let (status, _, body) = post("/api/v2/task", "application/xml", doctype).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("DOCTYPE"), "{body}");

    // The vendor requires the declaration (task-interface.md §1.2).
    let undeclared = case_extract("4", "101337").split_off(22);
    let (status, _, body) = post("/api/v2/task", "application/xml", undeclared).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        "malformed method call: malformed XML at byte 0: the body does not begin with an XML \
         declaration (<?xml version=\"1.0\"?>), which the task interface requires\n"
    );
}

#[tokio::test]
async fn an_unimplemented_method_is_501_with_a_reason() {
    let body = b"<?xml version=\"1.0\"?><methodcall><name>openport</name><params><port_id>4\
                 </port_id></params></methodcall>";
    let (status, _, reason) = post("/api/v2/task", "application/xml", body.to_vec()).await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
    assert_eq!(
        reason,
        "method 'openport' is not implemented by the simulator (it implements: case_extract, \
         case_cancel, case_getstate)\n"
    );
}

#[tokio::test]
async fn an_oversized_body_is_413() {
    let body = vec![b' '; DEFAULT_MAX_BODY_BYTES + 1];
    let (status, _, reason) = post("/api/v2/task", "application/xml", body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        reason,
        format!("the body is larger than {DEFAULT_MAX_BODY_BYTES} bytes\n")
    );
}

#[tokio::test]
async fn other_paths_and_methods_are_refused() {
    let (status, _, reason) = post("/api/v2/bin", "application/xml", case_extract("4", "1")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        reason.contains("the task interface is at /api/v2/task"),
        "{reason}"
    );

    let url = start_simulator(Layout::default_layout()).await;
    let response = http_client().get(url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()["allow"], "POST");
    assert_eq!(
        response.text().await.unwrap(),
        "method GET is not allowed; use POST\n"
    );
}

#[tokio::test]
async fn json_requests_get_json_replies() {
    let body = br#"{"method":"case_extract","params":{"port_id":4,"bin_id":101337}}"#;
    let (status, content_type, reply) =
        post("/api/v2/task", "application/json", body.to_vec()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/json");
    assert_eq!(reply, r#"{"params":{}}"#);
    let body = br#"{"method":"case_extract","params":{"port_id":2,"bin_id":1}}"#;
    let (_, _, reply) = post("/api/v2/task", "application/json", body.to_vec()).await;
    assert_eq!(reply, r#"{"fault":{"code":1099}}"#);
    let (status, _, reason) = post("/api/v2/task", "application/json", b"{oops".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reason.contains("invalid JSON"), "{reason}");
}

/// Issue 20, item 4 (review): clients of the simulator's Log Publisher that stay connected and
/// never read are disconnected once they fall behind, however full their sockets are, so they
/// do not keep their slots: with every slot taken by such clients and events flowing, a new
/// client is soon admitted and receives events.
#[tokio::test]
async fn log_publisher_clients_that_never_read_lose_their_slots() {
    let simulator = Simulator::new(&Layout::default_layout());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(log_publisher::serve(
        listener,
        simulator.clone(),
        std::future::pending(),
    ));
    let mut never_read = Vec::new();
    for _ in 0..log_publisher::MAX_CONNECTIONS {
        let socket = TcpSocket::new_v4().unwrap();
        // A small receive buffer, so that fewer events fill it: the kernel keeps at least 2 KiB.
        socket.set_recv_buffer_size(1024).unwrap();
        never_read.push(socket.connect(address).await.unwrap());
    }
    // Events, one extraction and its cancel (EREQ, CR, NOOP) at a time, for as long as the test
    // runs.
    let extract = MethodCall::new("case_extract")
        .with_param("port_id", 4)
        .with_param("bin_id", 101337);
    let cancel = MethodCall::new("case_cancel")
        .with_param("port_id", 4)
        .with_param("bin_id", 101337);
    let events = tokio::spawn(async move {
        loop {
            simulator.handle(&extract);
            simulator.handle(&cancel);
            tokio::task::yield_now().await;
        }
    });
    within(CALL_LIMIT, "no new client was admitted", async {
        loop {
            // A refused client is closed at once; an admitted one receives the next events.
            let mut client = TcpStream::connect(address).await.unwrap();
            let mut received = Vec::new();
            let mut buffer = [0_u8; 256];
            loop {
                let read = client.read(&mut buffer).await.unwrap();
                if read == 0 {
                    break;
                }
                received.extend_from_slice(&buffer[..read]);
                if received.windows(2).any(|pair| pair == b"\r\n") {
                    let text = String::from_utf8_lossy(&received);
                    assert!(
                        text.starts_with("AC,4,101337,") || text.starts_with("BD,101337,"),
                        "{text}"
                    );
                    return;
                }
            }
        }
    })
    .await;
    events.abort();
}
