//! The telemetry endpoint over a real TCP connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tallyman_telemetry::{CONTENT_TYPE, EventLabels, Metrics, Readiness, serve};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A raw HTTP/1.1 GET, run off the runtime so the server keeps serving.
async fn get(addr: SocketAddr, path: &str) -> Response {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).expect("read response");
        parse(&raw)
    })
    .await
    .unwrap()
}

fn parse(raw: &str) -> Response {
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let response = Response {
        status,
        headers,
        body: body.to_string(),
    };
    assert_eq!(
        response.header("content-length"),
        Some(body.len().to_string().as_str()),
        "expected a sized body"
    );
    response
}

struct Server {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Readiness,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start() -> Server {
    let metrics = Arc::new(Metrics::new());
    let ready = Readiness::new();
    let (stop, stopped) = oneshot::channel::<()>();
    let (addr, task) = serve(
        "127.0.0.1:0".parse().unwrap(),
        metrics.clone(),
        ready.clone(),
        async move {
            let _ = stopped.await;
        },
    )
    .await
    .expect("serve");
    Server {
        addr,
        metrics,
        ready,
        stop,
        task,
    }
}

#[tokio::test]
async fn healthz_answers_ok() {
    let server = start().await;
    let response = get(server.addr, "/healthz").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body, "ok");
}

#[tokio::test]
async fn readyz_follows_the_flag() {
    let server = start().await;
    let before = get(server.addr, "/readyz").await;
    assert_eq!(before.status, 503);
    assert_eq!(before.body, "not ready");

    server.ready.set_ready(true);
    let ready = get(server.addr, "/readyz").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.body, "ready");

    server.ready.set_ready(false);
    assert_eq!(get(server.addr, "/readyz").await.status, 503);
    // Liveness does not depend on readiness.
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
}

#[tokio::test]
async fn metrics_show_an_incremented_counter_with_its_labels() {
    let server = start().await;
    server
        .metrics
        .worker
        .events_received
        .get_or_create(&EventLabels {
            namespace: "shop".into(),
            workflow: "shipment-to-invoice".into(),
            r#type: "shipment.dispatched".into(),
        })
        .inc();

    let response = get(server.addr, "/metrics").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some(CONTENT_TYPE));
    let expected = r#"tallyman_worker_events_received_total{namespace="shop",workflow="shipment-to-invoice",type="shipment.dispatched"} 1"#;
    assert!(
        response.body.lines().any(|l| l == expected),
        "missing {expected} in\n{}",
        response.body
    );
    assert!(response.body.ends_with("# EOF\n"));
}

#[tokio::test]
async fn unknown_paths_are_not_found() {
    let server = start().await;
    assert_eq!(get(server.addr, "/nope").await.status, 404);
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let server = start().await;
    assert_eq!(get(server.addr, "/healthz").await.status, 200);

    server.stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), server.task)
        .await
        .expect("server stops within 10 s")
        .expect("server task does not panic");
    assert!(result.is_ok(), "{result:?}");
    assert!(TcpStream::connect(server.addr).is_err(), "still listening");
}

#[tokio::test]
async fn binding_a_taken_port_is_an_error() {
    let server = start().await;
    let err = serve(
        server.addr,
        Arc::new(Metrics::new()),
        Readiness::new(),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().starts_with("failed to bind"), "{err}");
}
