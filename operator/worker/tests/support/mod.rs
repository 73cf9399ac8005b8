//! Shared set-up: a real nats-server, the simulated ERP, the example
//! manifests, and helpers to publish events and wait for outcomes.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use tallyman_connectors::StaticSecrets;
use tallyman_core::engine::Definition;
use tallyman_core::manifest;
use tallyman_core::validate::{self, Object};
use tallyman_testing::erp::{Order, OrderLine, SimErp};
use tallyman_testing::nats::NatsServer;
use tallyman_worker::calls::RestCaller;
use tallyman_worker::{Worker, WorkerConfig};
use tokio::sync::watch;

pub fn example_dir(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

/// The example's definition and its Secrets.
pub fn example(name: &str) -> (Definition, StaticSecrets) {
    let dir = example_dir(name);
    let report = validate::validate_paths(std::slice::from_ref(&dir));
    assert!(!report.has_errors(), "{:?}", report.diagnostics);
    let (mut wf, mut conns, mut pols) = (None, Vec::new(), Vec::new());
    for r in report.valid {
        match r.object {
            Object::Workflow(w) => wf = Some(*w),
            Object::Connector(c) => conns.push(*c),
            Object::ApprovalPolicy(p) => pols.push(*p),
            _ => {}
        }
    }
    let def = Definition::resolve(&wf.expect("a workflow"), &conns, &pols).expect("resolves");
    let loaded = manifest::load(&[dir]);
    let secrets =
        StaticSecrets::from_manifests(loaded.documents.iter().map(|d| &d.value), &def.namespace);
    (def, secrets)
}

pub struct Running {
    pub worker: Arc<Worker>,
    pub stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<Result<(), tallyman_worker::Error>>,
}

impl Running {
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.task.await.expect("worker task").expect("worker ran");
    }
}

pub async fn connect(url: &str) -> async_nats::Client {
    async_nats::connect(url).await.expect("connect to nats")
}

pub async fn start(nats: &str, def: &Definition, secrets: &StaticSecrets, erp: &str) -> Running {
    let urls: BTreeMap<String, String> = def
        .connectors
        .keys()
        .map(|k| (k.clone(), erp.to_string()))
        .collect();
    let caller = RestCaller::new(def, secrets, &urls).expect("rest clients");
    let worker = Worker::new(WorkerConfig {
        clients: vec![connect(nats).await, connect(nats).await],
        definition: def.clone(),
        caller: Arc::new(caller),
        max_in_flight: 64,
        metrics: Arc::new(tallyman_telemetry::Metrics::new()),
        ack_wait: tallyman_worker::ACK_WAIT,
    })
    .await
    .expect("worker starts");
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(worker.clone().run(rx));
    Running { worker, stop, task }
}

/// Publish a canonical event the way the gateway does (Nats-Msg-Id = id).
pub async fn publish(js: &jetstream::Context, ns: &str, ty: &str, id: &str, data: &str) {
    let payload = format!(
        r#"{{"id":"{id}","type":"{ty}","source":"test","time":"2026-11-26T09:00:00Z","data":{data}}}"#
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    js.publish_with_headers(
        format!("tallyman.{ns}.events.{ty}"),
        headers,
        Bytes::from(payload),
    )
    .await
    .expect("publish")
    .await
    .expect("acked");
}

pub fn order_data(order: &str) -> String {
    format!(r#"{{"orderId":"{order}","customerId":"C-{order}","channel":"web"}}"#)
}

pub fn shipment_data(order: &str, qty_b: i64) -> String {
    format!(
        r#"{{"orderId":"{order}","shipmentId":"SH-{order}","warehouse":"HAM","confirmedBy":"wms-operator-17",
            "lines":[{{"sku":"A","qty":2}},{{"sku":"B","qty":{qty_b}}}]}}"#
    )
}

/// An order of 2 x A at 19.99 and `qty_b` x B at `price_b`.
pub fn seed_order(erp: &SimErp, order: &str, qty_b: i64, price_b: &str) {
    erp.seed_order(Order {
        order_id: order.to_string(),
        customer_id: format!("C-{order}"),
        currency: "EUR".into(),
        lines: vec![
            OrderLine::new("A", 2, "19.99"),
            OrderLine::new("B", qty_b, price_b),
        ],
    });
}

/// Wait for `cond` or fail after `limit`, saying what was awaited.
pub async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Env {
    pub nats: NatsServer,
    pub erp: SimErp,
    pub def: Definition,
    pub secrets: StaticSecrets,
}

pub async fn env(example_name: &str) -> Env {
    tallyman_telemetry::init_tracing("test");
    let nats = NatsServer::start();
    let erp = SimErp::start().await;
    let (mut def, secrets) = example(example_name);
    // The examples throttle the ERP to its production limit; tests need not wait.
    for c in def.connectors.values_mut() {
        if let Some(rest) = &mut c.rest {
            rest.rate_limit = None;
            rest.retry.initial_backoff = "10ms".parse().unwrap();
            rest.retry.max_backoff = "100ms".parse().unwrap();
        }
    }
    Env {
        nats,
        erp,
        def,
        secrets,
    }
}
