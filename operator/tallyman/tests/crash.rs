//! Crash tests: real `tallyman worker` processes, a real nats-server, the
//! simulated ERP over HTTP. A process is killed with SIGKILL mid-run; every
//! instance must still complete, with exactly one invoice per order.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use tallyman_testing::erp::{Order, OrderLine, SimErp};
use tallyman_testing::nats::NatsServer;

const NS: &str = "finance";
const WF: &str = "shipment-to-invoice";

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shipment-to-invoice")
}

struct WorkerProcess(Child);

impl WorkerProcess {
    fn start(nats: &str, erp: &str) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_tallyman"))
            .args([
                "worker",
                "--nats",
                nats,
                "--namespace",
                NS,
                "--workflow",
                WF,
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--manifests")
            .arg(examples())
            .args([
                "--connector-url",
                &format!("erp={erp}"),
                "--ack-wait",
                "3s",
                "--max-in-flight",
                "64",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tallyman worker starts");
        Self(child)
    }

    /// SIGKILL: no chance to finish anything.
    fn kill(mut self) {
        self.0.kill().expect("kill -9");
        self.0.wait().expect("reaped");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn publish_orders(js: &jetstream::Context, erp: &SimErp, n: usize) {
    for i in 0..n {
        let order = format!("ORD-{i}");
        erp.seed_order(Order {
            order_id: order.clone(),
            customer_id: format!("C-{i}"),
            currency: "EUR".into(),
            lines: vec![
                OrderLine::new("A", 2, "19.99"),
                OrderLine::new("B", 5, "0.10"),
            ],
        });
        for (ty, data) in [
            (
                "order.created",
                format!(r#"{{"orderId":"{order}","customerId":"C-{i}","channel":"web"}}"#),
            ),
            (
                "shipment.confirmed",
                format!(
                    r#"{{"orderId":"{order}","shipmentId":"SH-{i}","warehouse":"HAM","confirmedBy":"wms-7","lines":[{{"sku":"A","qty":2}},{{"sku":"B","qty":5}}]}}"#
                ),
            ),
        ] {
            let id = format!("{ty}-{i}");
            let payload = format!(
                r#"{{"id":"{id}","type":"{ty}","source":"test","time":"2026-11-26T09:00:00Z","data":{data}}}"#
            );
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            // Before a worker has created the stream, a publish may find none: retry.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let stored = match js
                    .publish_with_headers(
                        format!("tallyman.{NS}.events.{ty}"),
                        headers.clone(),
                        Bytes::from(payload.clone()),
                    )
                    .await
                {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                };
                if stored {
                    break;
                }
                assert!(Instant::now() < deadline, "could not publish {id}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Count instances by status from the KV bucket.
async fn statuses(js: &jetstream::Context, n: usize) -> (usize, usize) {
    let Ok(kv) = js.get_key_value(format!("tallyman_{NS}_{WF}")).await else {
        return (0, n);
    };
    let mut completed = 0;
    let mut other = 0;
    for i in 0..n {
        match kv.get(format!("ORD-{i}")).await {
            Ok(Some(bytes)) => {
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                if v["status"] == "Completed" {
                    completed += 1;
                } else {
                    other += 1;
                }
            }
            _ => other += 1,
        }
    }
    (completed, other)
}

async fn wait_all_completed(js: &jetstream::Context, n: usize, limit: Duration) {
    let start = Instant::now();
    loop {
        let (completed, _) = statuses(js, n).await;
        if completed == n {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "only {completed} of {n} instances completed after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_invoices(erp: &SimErp, at_least: usize) {
    let start = Instant::now();
    while erp.invoice_count() < at_least {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no progress: {} invoices",
            erp.invoice_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_one_invoice_per_order(erp: &SimErp, n: usize) {
    let invoices = erp.invoices();
    let mut orders: Vec<String> = invoices
        .iter()
        .filter_map(|i| i.str_field("orderId"))
        .collect();
    orders.sort();
    orders.dedup();
    assert_eq!(orders.len(), n, "every order invoiced");
    assert_eq!(invoices.len(), n, "no order invoiced twice");
    for i in &invoices {
        assert_eq!(i.field("netAmount"), Some("40.48"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_loses_nothing_and_duplicates_nothing() {
    let nats = NatsServer::start();
    let erp = SimErp::start().await;
    let n = 300;
    let first = WorkerProcess::start(&nats.url(), &erp.base_url());
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    publish_orders(&js, &erp, n).await;
    wait_invoices(&erp, 60).await;
    first.kill();
    let in_flight = n - erp.invoice_count();
    assert!(in_flight > 0, "the kill came too late to test anything");
    let _second = WorkerProcess::start(&nats.url(), &erp.base_url());
    wait_all_completed(&js, n, Duration::from_secs(90)).await;
    assert_one_invoice_per_order(&erp, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_racing_on_one_consumer_invoice_each_order_once() {
    let nats = NatsServer::start();
    let erp = SimErp::start().await;
    let n = 300;
    let _a = WorkerProcess::start(&nats.url(), &erp.base_url());
    let b = WorkerProcess::start(&nats.url(), &erp.base_url());
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    publish_orders(&js, &erp, n).await;
    wait_invoices(&erp, 100).await;
    b.kill();
    wait_all_completed(&js, n, Duration::from_secs(90)).await;
    assert_one_invoice_per_order(&erp, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_run_loses_nothing() {
    let mut nats = NatsServer::start();
    let erp = SimErp::start().await;
    let n = 300;
    let _worker = WorkerProcess::start(&nats.url(), &erp.base_url());
    {
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        publish_orders(&js, &erp, n).await;
    }
    wait_invoices(&erp, 60).await;
    nats.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.restart();
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    wait_all_completed(&js, n, Duration::from_secs(120)).await;
    assert_one_invoice_per_order(&erp, n);
}
