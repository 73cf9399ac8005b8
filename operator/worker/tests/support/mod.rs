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
use tallyman_core::validate;
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
    let def = report.definition("finance", name).expect("resolves");
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
    start_with(
        nats,
        def,
        secrets,
        erp,
        tallyman_worker::CaseBackend::JetStream,
    )
    .await
}

/// [`start`] with the cases kept in `cases`.
pub async fn start_with(
    nats: &str,
    def: &Definition,
    secrets: &StaticSecrets,
    erp: &str,
    cases: tallyman_worker::CaseBackend,
) -> Running {
    start_tuned(nats, def, secrets, erp, |c| c.cases = cases).await
}

/// [`start`] with the configuration changed by `tune`.
pub async fn start_tuned(
    nats: &str,
    def: &Definition,
    secrets: &StaticSecrets,
    erp: &str,
    tune: impl FnOnce(&mut WorkerConfig),
) -> Running {
    let urls: BTreeMap<String, String> = def
        .connectors
        .keys()
        .map(|k| (k.clone(), erp.to_string()))
        .collect();
    let caller = RestCaller::new(def, secrets, &urls).expect("rest clients");
    let mut config = WorkerConfig {
        clients: vec![connect(nats).await, connect(nats).await],
        definition: def.clone(),
        caller: Arc::new(caller),
        max_in_flight: 64,
        metrics: Arc::new(tallyman_telemetry::Metrics::new()),
        ack_wait: tallyman_worker::ACK_WAIT,
        cases: tallyman_worker::CaseBackend::JetStream,
        instance_cache_bytes: tallyman_worker::held::DEFAULT_BUDGET,
        events_since: None,
    };
    tune(&mut config);
    let worker = Worker::new(config).await.expect("worker starts");
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

/// The same event sent again after the broker's deduplication window:
/// without a `Nats-Msg-Id`, so only the instance can tell it applied it.
pub async fn publish_again(js: &jetstream::Context, ns: &str, ty: &str, id: &str, data: &str) {
    let payload = format!(
        r#"{{"id":"{id}","type":"{ty}","source":"test","time":"2026-11-26T09:00:00Z","data":{data}}}"#
    );
    js.publish(format!("tallyman.{ns}.events.{ty}"), Bytes::from(payload))
        .await
        .expect("publish")
        .await
        .expect("acked");
}

/// An order's `order.created` and `shipment.confirmed` (with `qty_b` of B),
/// one after the other, as `o-<order>` and `s-<order>` in namespace finance.
pub async fn publish_order_and_shipment(js: &jetstream::Context, order: &str, qty_b: i64) {
    publish_order(js, order).await;
    publish_shipment(js, order, qty_b).await;
}

/// An order's `order.created`, as `o-<order>` in namespace finance.
pub async fn publish_order(js: &jetstream::Context, order: &str) {
    let id = format!("o-{order}");
    publish(js, "finance", "order.created", &id, &order_data(order)).await;
}

/// An order's `shipment.confirmed` with `qty_b` of B, as `s-<order>` in
/// namespace finance.
pub async fn publish_shipment(js: &jetstream::Context, order: &str, qty_b: i64) {
    let id = format!("s-{order}");
    let shipment = shipment_data(order, qty_b);
    publish(js, "finance", "shipment.confirmed", &id, &shipment).await;
}

/// `def` with other steps (JSON, as in a Workflow's `spec.steps`).
pub fn with_steps(def: &Definition, steps: serde_json::Value) -> Definition {
    let mut def = def.clone();
    def.spec.steps = serde_json::from_value(steps).expect("steps");
    def
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

/// The order the returns example's events refer to: 4711 of customer
/// C-1001, in EUR, with `lines`.
pub fn seed_return_order(erp: &SimErp, lines: Vec<OrderLine>) {
    erp.seed_order(Order {
        order_id: "4711".into(),
        customer_id: "C-1001".into(),
        currency: "EUR".into(),
        lines,
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

/// The case store as another process sees it (`kubectl tallyman`, dev
/// mode): a fresh connection to the namespace's cases bucket.
pub async fn kv_cases(nats: &str, ns: &str) -> tallyman_worker::cases::KvCases {
    let js = jetstream::new(connect(nats).await);
    let store = js
        .get_key_value(format!("tallyman_{ns}_cases"))
        .await
        .expect("the cases bucket exists");
    tallyman_worker::cases::KvCases::new(store, ns)
}

/// One person's decision on a case.
/// Why the case store refuses `decision` on case `name` now.
pub async fn refusal(
    cases: &dyn tallyman_worker::cases::CaseStore,
    name: &str,
    decision: tallyman_api::v1alpha1::CaseDecision,
) -> tallyman_worker::cases::DecideError {
    cases
        .decide(name, decision, chrono::Utc::now())
        .await
        .expect_err("the decision is refused")
}

pub fn decision(
    who: &str,
    group: &str,
    verdict: tallyman_api::v1alpha1::Verdict,
    comment: Option<&str>,
) -> tallyman_api::v1alpha1::CaseDecision {
    tallyman_api::v1alpha1::CaseDecision {
        approver: who.into(),
        groups: vec![group.into()],
        decision: verdict,
        comment: comment.map(str::to_string),
    }
}

/// Wait for an asynchronous `cond` or fail after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An event as published: its JSON, and its text for exact decimals.
#[derive(Debug)]
pub struct Emitted {
    pub json: serde_json::Value,
    pub text: String,
}

impl std::ops::Deref for Emitted {
    type Target = serde_json::Value;
    fn deref(&self) -> &serde_json::Value {
        &self.json
    }
}

impl Emitted {
    /// A field of the event's data as its JSON text, digit for digit
    /// (`serde_json::Value` would read `0.40` as the float 0.4).
    pub fn data_text(&self, field: &str) -> String {
        #[derive(serde::Deserialize)]
        struct Envelope<'a> {
            #[serde(borrow)]
            data: BTreeMap<String, &'a serde_json::value::RawValue>,
        }
        let envelope: Envelope = serde_json::from_str(&self.text).expect("an event");
        envelope
            .data
            .get(field)
            .unwrap_or_else(|| panic!("no {field} in {}", self.text))
            .get()
            .to_string()
    }
}

/// Every event of type `ty` on the namespace's events stream so far,
/// oldest first (the envelope `{id, type, source, time, data}`).
pub async fn emitted(js: &jetstream::Context, ns: &str, ty: &str) -> Vec<Emitted> {
    let mut stream = js
        .get_stream(format!("TALLYMAN_{}_EVENTS", ns.to_uppercase()))
        .await
        .expect("the events stream exists");
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let subject = format!("tallyman.{ns}.events.{ty}");
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(msg) = stream.get_raw_message(seq).await else {
            continue;
        };
        if msg.subject.as_str() == subject {
            let text = String::from_utf8(msg.payload.to_vec()).expect("an event is UTF-8");
            let json = serde_json::from_str(&text).expect("an event is JSON");
            out.push(Emitted { json, text });
        }
    }
    out
}

/// Wait until `n` events of type `ty` were published; return them.
pub async fn wait_emitted(js: &jetstream::Context, ns: &str, ty: &str, n: usize) -> Vec<Emitted> {
    let start = Instant::now();
    loop {
        let events = emitted(js, ns, ty).await;
        if events.len() >= n {
            return events;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "only {} of {n} {ty} events were published",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The namespace's whole audit trail read back and verified: nothing
/// unreadable, no message removed, every chain intact. The report.
pub async fn verified_trail(nats: &str, ns: &str) -> tallyman_core::audit::VerifyReport {
    let trail = tallyman_worker::audit::read(connect(nats).await, ns, None)
        .await
        .expect("the audit stream reads");
    assert!(trail.unreadable.is_empty() && trail.removed.is_empty());
    let report = tallyman_core::audit::verify(&trail.records);
    assert!(report.is_ok(), "{:?}", report.problems);
    report
}

/// The state of the namespace's stream `TALLYMAN_<NS>_<kind>` (`AUDIT`,
/// `TIMERS`, …).
pub async fn stream_state(
    js: &jetstream::Context,
    ns: &str,
    kind: &str,
) -> async_nats::jetstream::stream::State {
    let name = format!("TALLYMAN_{}_{kind}", ns.to_uppercase());
    let mut stream = js.get_stream(name).await.expect("the stream exists");
    stream.info().await.expect("stream info").state.clone()
}

/// The audit records of one instance, in chain order.
pub async fn audit_of(nats: &str, ns: &str, key: &str) -> Vec<tallyman_core::audit::AuditRecord> {
    let trail = tallyman_worker::audit::read(connect(nats).await, ns, None)
        .await
        .expect("the audit stream reads");
    assert!(trail.unreadable.is_empty(), "{:?}", trail.unreadable);
    assert!(trail.removed.is_empty(), "{:?}", trail.removed);
    let mut mine: Vec<_> = trail
        .records
        .into_iter()
        .filter(|r| &*r.key == key)
        .collect();
    mine.sort_by_key(|r| r.seq);
    mine
}

/// Wait until the stored instance `key` has `status`.
pub async fn wait_status(run: &Running, key: &str, status: tallyman_core::engine::Status) {
    eventually(
        &format!("instance {key} to become {status:?}"),
        Duration::from_secs(20),
        || async {
            run.worker
                .instance(key)
                .await
                .unwrap()
                .is_some_and(|i| i.status == status)
        },
    )
    .await;
}
