//! What an SRE sees of a running worker: health, readiness, metrics, and a
//! poison message that lands in the dead-letter stream without blocking.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use support::*;
use tallyman_testing::erp::SimErp;
use tallyman_testing::nats::NatsServer;

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_metrics_and_a_poison_message() {
    let nats = NatsServer::start();
    let erp = SimErp::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = worker_command(&nats.url())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--connector-url", &format!("erp={}", erp.base_url())])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("tallyman worker starts");
    let start = Instant::now();
    while get(port, "/readyz").map(|(s, _)| s) != Some(200) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the worker never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(port, "/healthz").unwrap().0, 200);
    // The series the alerts watch exist from the start, at zero: the first
    // failure is an increase, not a series appearing.
    let (_, fresh) = get(port, "/metrics").unwrap();
    for line in [
        r#"tallyman_worker_instances_ended_total{namespace="finance",workflow="shipment-to-invoice",outcome="failed"} 0"#,
        r#"tallyman_worker_sla_breaches_total{namespace="finance",workflow="shipment-to-invoice"} 0"#,
        r#"tallyman_worker_dead_letters_total{namespace="finance",workflow="shipment-to-invoice",step="invoice"} 0"#,
        r#"tallyman_worker_dead_letters_total{namespace="finance",workflow="shipment-to-invoice",step="Consume"} 0"#,
    ] {
        assert!(fresh.contains(line), "missing {line} in\n{fresh}");
    }

    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    // A message that is no canonical event: dead-lettered, never blocking.
    js.publish(
        format!("tallyman.{NS}.events.order.created"),
        Bytes::from_static(b"not json"),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    publish_orders(&js, &erp, 3).await;
    wait_all_completed(&js, 3, Duration::from_secs(30)).await;
    assert_one_invoice_per_order(&erp, 3);

    let mut dlq = js
        .get_stream(format!("TALLYMAN_{}_DLQ", NS.to_uppercase()))
        .await
        .unwrap();
    assert_eq!(
        dlq.info().await.unwrap().state.messages,
        1,
        "the poison message is in the dead-letter stream"
    );

    let (status, metrics) = get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    for line in [
        r#"tallyman_worker_instances_started_total{namespace="finance",workflow="shipment-to-invoice"} 3"#,
        r#"tallyman_worker_instances_ended_total{namespace="finance",workflow="shipment-to-invoice",outcome="completed"} 3"#,
        r#"tallyman_worker_events_received_total{namespace="finance",workflow="shipment-to-invoice",type="shipment.confirmed"} 3"#,
        // The poison message, counted where the alert looks.
        r#"tallyman_worker_dead_letters_total{namespace="finance",workflow="shipment-to-invoice",step="Consume"} 1"#,
        // Sampled every 5 s, so the value depends on when: present is enough.
        r#"tallyman_worker_held_instances{namespace="finance",workflow="shipment-to-invoice"} "#,
        r#"tallyman_worker_held_instance_bytes{namespace="finance",workflow="shipment-to-invoice"} "#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    assert!(
        metrics.contains("tallyman_worker_call_duration_seconds_bucket"),
        "{metrics}"
    );
    // Each executed step once per instance, calls included; the await
    // waits, it does not execute.
    for step in [
        "order",
        "price-lines",
        "quantities-match",
        "invoice",
        "done",
    ] {
        let line = format!(
            r#"tallyman_worker_step_duration_seconds_count{{namespace="finance",workflow="shipment-to-invoice",step="{step}"}} 3"#
        );
        assert!(
            metrics.contains(&line),
            "missing {line} in
{metrics}"
        );
    }
    assert!(
        !metrics.contains(r#"step_duration_seconds_count{namespace="finance",workflow="shipment-to-invoice",step="both-arrived""#),
        "{metrics}"
    );

    // Stopped while a call is in flight: not ready, but still answering
    // (503) until the message is done, then exit 0.
    erp.delay("/invoices", Duration::from_millis(2000));
    let invoices = erp.requests("/invoices");
    // Orders 0–2 again are dropped by the broker as duplicates: one new.
    publish_orders(&js, &erp, 4).await;
    let start = Instant::now();
    while erp.requests("/invoices") == invoices {
        assert!(start.elapsed() < Duration::from_secs(20), "no invoice call");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let worker = WorkerProcess(child);
    worker.sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get(port, "/readyz").map(|(s, _)| s),
        Some(503),
        "draining: not ready, still answering"
    );
    let status = worker.exit_within(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
    assert_one_invoice_per_order(&erp, 4);
}
