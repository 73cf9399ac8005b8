//! The webhook gateway against a real nats-server: events land in the
//! namespace's stream exactly once, a stopped broker gets 503 and never
//! 202, and the examples' webhooks feed their workflows.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde::Deserialize;
use serde_json::value::RawValue;
use support::*;
use tallyman_api::v1alpha1::{ConnectorSpec, SignatureScheme};
use tallyman_connectors::webhook::Routes;
use tallyman_connectors::{SecretSource, StaticSecrets};
use tallyman_core::manifest;
use tallyman_core::validate::{self, Object};
use tallyman_testing::erp::{HttpResponse, OrderLine, WebhookSender, WebhookSignature};
use tallyman_testing::nats::NatsServer;
use tallyman_worker::gateway::{Serving, serve};
use tallyman_worker::names::Names;
use tokio::sync::watch;

const NS: &str = "finance";

/// An example's webhook Connectors, their Secrets, and the specs (to sign
/// as each sender would).
fn example_connectors(name: &str) -> (Vec<(String, ConnectorSpec)>, StaticSecrets) {
    let dir = example_dir(name);
    let report = validate::validate_paths(std::slice::from_ref(&dir));
    assert!(!report.has_errors(), "{:?}", report.diagnostics);
    let connectors = report
        .valid
        .into_iter()
        .filter_map(|r| match r.object {
            Object::Connector(c) => Some((r.name, c.spec)),
            _ => None,
        })
        .collect();
    let loaded = manifest::load(&[dir]);
    let secrets = StaticSecrets::from_manifests(loaded.documents.iter().map(|d| &d.value), NS);
    (connectors, secrets)
}

struct Gw {
    serving: Serving,
    _stop: watch::Sender<bool>,
}

impl Gw {
    async fn start(nats: &str, routes: Routes) -> Gw {
        let (stop, mut stopped) = watch::channel(false);
        let serving = serve(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            routes,
            connect(nats).await,
            Arc::new(tallyman_telemetry::Metrics::new()),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        )
        .await
        .expect("the gateway starts");
        Gw {
            serving,
            _stop: stop,
        }
    }

    /// A sender for connector `name`, signing as its spec says.
    fn sender(&self, name: &str, spec: &ConnectorSpec, secrets: &StaticSecrets) -> WebhookSender {
        let hook = spec.webhook.as_ref().expect("a webhook connector");
        let sig = &hook.signature;
        let secret = || {
            let r = sig.secret_ref.as_ref().unwrap();
            secrets.get(&r.name, &r.key).unwrap()
        };
        let header = || sig.header.clone().unwrap();
        let signature = match sig.scheme {
            SignatureScheme::None => WebhookSignature::None,
            SignatureScheme::Token => WebhookSignature::Token {
                header: header(),
                token: String::from_utf8(secret()).unwrap(),
            },
            SignatureScheme::HmacSha256 => WebhookSignature::HmacSha256 {
                header: header(),
                secret: secret(),
                // GitHub-style senders prefix; either form is accepted.
                prefixed: header().eq_ignore_ascii_case("x-hub-signature-256"),
            },
            SignatureScheme::HmacSha256Timestamped => WebhookSignature::HmacSha256Timestamped {
                header: header(),
                timestamp_header: sig.timestamp_header.clone().unwrap(),
                secret: secret(),
            },
        };
        WebhookSender::new(
            format!(
                "http://{}/webhooks/{NS}/{name}{}",
                self.serving.addr, hook.path
            ),
            signature,
        )
    }
}

fn events_stream() -> String {
    Names::new(NS, "").events_stream()
}

async fn stored_count(js: &jetstream::Context) -> u64 {
    js.get_stream(events_stream())
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .messages
}

#[derive(Deserialize)]
struct Canonical<'a> {
    id: String,
    #[serde(rename = "type")]
    type_: String,
    source: String,
    time: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// The last message of the events stream: subject, Nats-Msg-Id, payload.
async fn last_event(js: &jetstream::Context) -> (String, String, bytes::Bytes) {
    let stream = js.get_stream(events_stream()).await.unwrap();
    let seq = stream.get_info().await.unwrap().state.last_sequence;
    let msg = stream.get_raw_message(seq).await.unwrap();
    let msg_id = msg
        .headers
        .get("Nats-Msg-Id")
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    (msg.subject.to_string(), msg_id, msg.payload)
}

/// Posts `body`, expects 202, and checks the event it stored.
async fn expect_event(
    js: &jetstream::Context,
    sender: &WebhookSender,
    body: &str,
    (event_type, id, source): (&str, &str, &str),
    data: &str,
) {
    let r = sender.send(body.as_bytes()).await.unwrap();
    assert_eq!(r.status, 202, "{}: {}", sender.url, r.text());
    let answer: serde_json::Value = r.json().unwrap();
    assert_eq!(answer["ids"], serde_json::json!([id]));
    let (subject, msg_id, payload) = last_event(js).await;
    assert_eq!(subject, format!("tallyman.{NS}.events.{event_type}"));
    assert_eq!(msg_id, format!("{source}|{id}"));
    let event: Canonical = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        (
            event.id.as_str(),
            event.type_.as_str(),
            event.source.as_str()
        ),
        (id, event_type, source)
    );
    assert!(
        chrono::DateTime::parse_from_rfc3339(&event.time).is_ok(),
        "{}",
        event.time
    );
    // The data's text exactly: decimals digit for digit, keys sorted.
    assert_eq!(event.data.get(), data, "{event_type}");
}

async fn example_gateway(
    nats: &str,
    name: &str,
) -> (Gw, Vec<(String, ConnectorSpec)>, StaticSecrets) {
    let (connectors, secrets) = example_connectors(name);
    let routes = Routes::new(NS, &connectors, &secrets).expect("the example compiles");
    (Gw::start(nats, routes).await, connectors, secrets)
}

fn spec<'a>(connectors: &'a [(String, ConnectorSpec)], name: &str) -> &'a ConnectorSpec {
    &connectors.iter().find(|(n, _)| n == name).unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_map_their_readme_payloads_to_the_events_their_workflows_expect() {
    let nats = NatsServer::start();
    let js = jetstream::new(connect(&nats.url()).await);

    // shipment-to-invoice: shop (hmac-sha256-timestamped), wms (hmac-sha256).
    let (gw, conns, secrets) = example_gateway(&nats.url(), "shipment-to-invoice").await;
    let shop = gw.sender("shop", spec(&conns, "shop"), &secrets);
    expect_event(
        &js,
        &shop,
        r#"{"topic": "orders/create", "webhookId": "wh_01HZX",
 "order": {"number": "4711", "channel": "web", "customer": {"id": "C-1001"},
           "currency": "EUR", "totalPrice": "79.60",
           "lineItems": [{"sku": "A-100", "quantity": 3, "price": "19.90"}]}}"#,
        ("order.created", "wh_01HZX", "finance/shop"),
        r#"{"channel":"web","currency":"EUR","customerId":"C-1001","lines":[{"qty":3,"sku":"A-100","unitPrice":"19.90"}],"orderId":"4711","total":"79.60"}"#,
    )
    .await;
    // The same order with JSON numbers for amounts: still every digit.
    expect_event(
        &js,
        &shop,
        r#"{"topic": "orders/create", "webhookId": "wh_01HZY",
 "order": {"number": "4712", "channel": "web", "customer": {"id": "C-1001"},
           "currency": "EUR", "totalPrice": 1250.10,
           "lineItems": [{"sku": "A-100", "quantity": 3, "price": 0.1000}, {"sku": "B-7", "quantity": 1, "price": 12345678901234567.89}]}}"#,
        ("order.created", "wh_01HZY", "finance/shop"),
        r#"{"channel":"web","currency":"EUR","customerId":"C-1001","lines":[{"qty":3,"sku":"A-100","unitPrice":0.1000},{"qty":1,"sku":"B-7","unitPrice":12345678901234567.89}],"orderId":"4712","total":1250.10}"#,
    )
    .await;
    let wms = gw.sender("wms", spec(&conns, "wms"), &secrets);
    expect_event(
        &js,
        &wms,
        r#"{"eventId": "evt-88121", "id": "SHP-5531", "orderRef": "4711", "status": "CONFIRMED",
 "warehouse": "DE-HAM-1", "carrier": "DHL", "confirmedBy": "j.smith",
 "items": [{"sku": "A-100", "quantity": 3}]}"#,
        ("shipment.confirmed", "evt-88121", "finance/wms"),
        r#"{"carrier":"DHL","confirmedBy":"j.smith","lines":[{"qty":3,"sku":"A-100"}],"orderId":"4711","shipmentId":"SHP-5531","warehouse":"DE-HAM-1"}"#,
    )
    .await;
    // A draft shipment is not for finance: answered, nothing stored.
    let before = stored_count(&js).await;
    let r = wms
        .send(br#"{"eventId": "evt-1", "id": "SHP-1", "orderRef": "1", "status": "DRAFT", "items": []}"#)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(stored_count(&js).await, before);

    // inventory-adjustment: wms-inventory (token).
    let (gw, conns, secrets) = example_gateway(&nats.url(), "inventory-adjustment").await;
    let sender = gw.sender("wms-inventory", spec(&conns, "wms-inventory"), &secrets);
    expect_event(
        &js,
        &sender,
        r#"{"kind": "STOCK_ADJUSTMENT", "id": "ADJ-2025-00018", "warehouse": "DE-HAM-1",
 "reasonCode": "SHRINKAGE", "user": "k.meyer", "timestamp": "2025-06-03T08:12:00Z",
 "lines": [{"sku": "TV-55", "location": "H01-01", "delta": -30, "unitCost": "412.50"},
           {"sku": "TV-65", "location": "H01-02", "delta": 0, "unitCost": "599.00"}]}"#,
        ("inventory.adjusted", "ADJ-2025-00018", "finance/wms-inventory"),
        r#"{"adjustedAt":"2025-06-03T08:12:00Z","adjustedBy":"k.meyer","adjustmentId":"ADJ-2025-00018","lines":[{"delta":-30,"location":"H01-01","sku":"TV-55","unitCost":"412.50"}],"reasonCode":"SHRINKAGE","warehouse":"DE-HAM-1"}"#,
    )
    .await;

    // returns-to-credit: wms-returns (hmac-sha256), two types on one path.
    let (gw, conns, secrets) = example_gateway(&nats.url(), "returns-to-credit").await;
    let sender = gw.sender("wms-returns", spec(&conns, "wms-returns"), &secrets);
    expect_event(
        &js,
        &sender,
        r#"{"eventType": "RETURN_RECEIVED", "eventId": "e-1", "rma": "RMA-20931", "orderRef": "4711",
 "customerId": "C-1001", "receivedBy": "j.smith", "items": [{"sku": "A-100", "quantity": 2}]}"#,
        ("return.received", "e-1", "finance/wms-returns"),
        r#"{"customerId":"C-1001","lines":[{"qty":2,"sku":"A-100"}],"orderId":"4711","receivedBy":"j.smith","rmaNumber":"RMA-20931"}"#,
    )
    .await;
    expect_event(
        &js,
        &sender,
        r#"{"eventType": "RETURN_INSPECTED", "eventId": "e-2", "rma": "RMA-20931", "inspectedBy": "m.mueller",
 "items": [{"sku": "A-100", "quantity": 2, "grade": "B"}]}"#,
        ("return.inspected", "e-2", "finance/wms-returns"),
        r#"{"inspectedBy":"m.mueller","lines":[{"grade":"B","qty":2,"sku":"A-100"}],"rmaNumber":"RMA-20931"}"#,
    )
    .await;

    // three-way-match: erp-purchasing (token), wms-receiving (hmac-sha256,
    // prefixed), ap-inbox (hmac-sha256-timestamped).
    let (gw, conns, secrets) = example_gateway(&nats.url(), "three-way-match").await;
    let sender = gw.sender("erp-purchasing", spec(&conns, "erp-purchasing"), &secrets);
    expect_event(
        &js,
        &sender,
        r#"{"event": "PurchaseOrder.Created", "messageId": "msg-7781",
 "purchaseOrder": {"number": "PO-2025-0815", "vendor": {"id": "V-0042", "name": "Acme Fasteners"},
                   "currency": "EUR", "createdBy": "buyer.jane",
                   "lines": [{"lineNo": 10, "material": "BOLT-M8", "quantity": 1000, "netPrice": "0.12"}]}}"#,
        ("po.created", "msg-7781", "finance/erp-purchasing"),
        r#"{"buyer":"buyer.jane","currency":"EUR","lines":[{"lineNo":10,"qty":1000,"sku":"BOLT-M8","unitPrice":"0.12"}],"poNumber":"PO-2025-0815","vendorId":"V-0042","vendorName":"Acme Fasteners"}"#,
    )
    .await;
    let sender = gw.sender("wms-receiving", spec(&conns, "wms-receiving"), &secrets);
    expect_event(
        &js,
        &sender,
        r#"{"type": "GOODS_RECEIPT", "status": "POSTED", "id": "GR-33102", "poNumber": "PO-2025-0815",
 "warehouse": "DE-HAM-1", "receivedBy": "k.meyer",
 "lines": [{"sku": "BOLT-M8", "received": 1000, "damaged": 3}]}"#,
        ("goods.received", "GR-33102", "finance/wms-receiving"),
        r#"{"lines":[{"qty":997,"sku":"BOLT-M8"}],"poNumber":"PO-2025-0815","receiptId":"GR-33102","receivedBy":"k.meyer","warehouse":"DE-HAM-1"}"#,
    )
    .await;
    let sender = gw.sender("ap-inbox", spec(&conns, "ap-inbox"), &secrets);
    expect_event(
        &js,
        &sender,
        r#"{"documentType": "INVOICE", "documentId": "DOC-552190", "capturedBy": "ap.clerk",
 "invoice": {"number": "ACME-99812", "vendorId": "V-0042", "poReference": "PO-2025-0815",
             "currency": "EUR", "dueDate": "2025-07-02", "netTotal": "120.40", "taxTotal": "22.88",
             "lines": [{"sku": "BOLT-M8", "quantity": 1000, "unitPrice": "0.1204"}]}}"#,
        ("vendor-invoice.received", "DOC-552190", "finance/ap-inbox"),
        r#"{"capturedBy":"ap.clerk","currency":"EUR","dueAt":"2025-07-02T00:00:00Z","invoiceId":"DOC-552190","lines":[{"qty":1000,"sku":"BOLT-M8","unitPrice":"0.1204"}],"netTotal":"120.40","poNumber":"PO-2025-0815","taxTotal":"22.88","vendorId":"V-0042","vendorInvoiceNumber":"ACME-99812"}"#,
    )
    .await;
    // The same invoice with JSON numbers.
    expect_event(
        &js,
        &sender,
        r#"{"documentType": "INVOICE", "documentId": "DOC-552191", "capturedBy": "ap.clerk",
 "invoice": {"number": "ACME-99813", "vendorId": "V-0042", "poReference": "PO-2025-0815",
             "currency": "EUR", "dueDate": "2025-07-02", "netTotal": 120.40, "taxTotal": 22.876,
             "lines": [{"sku": "BOLT-M8", "quantity": 1000, "unitPrice": 0.12040}]}}"#,
        ("vendor-invoice.received", "DOC-552191", "finance/ap-inbox"),
        r#"{"capturedBy":"ap.clerk","currency":"EUR","dueAt":"2025-07-02T00:00:00Z","invoiceId":"DOC-552191","lines":[{"qty":1000,"sku":"BOLT-M8","unitPrice":0.12040}],"netTotal":120.40,"poNumber":"PO-2025-0815","taxTotal":22.876,"vendorId":"V-0042","vendorInvoiceNumber":"ACME-99813"}"#,
    )
    .await;
}

const SHIPMENT: &str = r#"{"eventId": "evt-88121", "id": "SHP-5531", "orderRef": "4711", "status": "CONFIRMED",
 "warehouse": "DE-HAM-1", "carrier": "DHL", "confirmedBy": "j.smith",
 "items": [{"sku": "A-100", "quantity": 3}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_delivered_twice_is_stored_once_and_answered_duplicate() {
    let nats = NatsServer::start();
    let js = jetstream::new(connect(&nats.url()).await);
    let (gw, conns, secrets) = example_gateway(&nats.url(), "shipment-to-invoice").await;
    let wms = gw.sender("wms", spec(&conns, "wms"), &secrets);

    let r = wms.send(SHIPMENT.as_bytes()).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let r = wms.send(SHIPMENT.as_bytes()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let answer: serde_json::Value = r.json().unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"duplicate": true, "ids": ["evt-88121"]})
    );
    assert_eq!(stored_count(&js).await, 1, "one stored event");
}

fn shipment(n: usize) -> String {
    SHIPMENT.replace("evt-88121", &format!("evt-{n}"))
}

async fn send_all(sender: &WebhookSender, bodies: &[String]) -> Vec<HttpResponse> {
    let sends = bodies.iter().map(|b| sender.send(b.as_bytes()));
    futures_util::future::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.expect("the gateway answers"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_nats_server_gets_503_with_retry_after_and_never_202() {
    let mut nats = NatsServer::start();
    let (gw, conns, secrets) = example_gateway(&nats.url(), "shipment-to-invoice").await;
    let wms = gw.sender("wms", spec(&conns, "wms"), &secrets);
    let r = wms.send(shipment(0).as_bytes()).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());

    nats.stop();
    let bodies: Vec<String> = (1..=4).map(shipment).collect();
    let started = Instant::now();
    for r in send_all(&wms, &bodies).await {
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("retry-after"), Some("1"));
        let answer: serde_json::Value = r.json().unwrap();
        assert_eq!(answer["error"], "broker_unavailable");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered within the publish timeout, not left hanging: {:?}",
        started.elapsed()
    );

    nats.restart();
    // The senders retry as told. Each answer is 202, or 200 when the event
    // reached the stream after all (the client resent it on reconnect); the
    // stream holds each event once either way.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending = bodies.clone();
    while !pending.is_empty() {
        assert!(Instant::now() < deadline, "the gateway never recovered");
        let mut still = Vec::new();
        for (body, r) in pending.iter().zip(send_all(&wms, &pending).await) {
            match r.status {
                202 => {}
                200 => {
                    let answer: serde_json::Value = r.json().unwrap();
                    assert_eq!(answer["duplicate"], true);
                }
                503 => still.push(body.clone()),
                other => panic!("unexpected {other}: {}", r.text()),
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let js = jetstream::new(connect(&nats.url()).await);
    assert_eq!(
        stored_count(&js).await,
        5,
        "every event stored exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_through_the_gateway_become_exactly_one_invoice() {
    let env = env("shipment-to-invoice").await;
    env.erp.seed_order(tallyman_testing::erp::Order {
        order_id: "4711".into(),
        customer_id: "C-1001".into(),
        currency: "EUR".into(),
        lines: vec![OrderLine::new("A-100", 3, "19.90")],
    });
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let (gw, conns, secrets) = example_gateway(&env.nats.url(), "shipment-to-invoice").await;
    let shop = gw.sender("shop", spec(&conns, "shop"), &secrets);
    let wms = gw.sender("wms", spec(&conns, "wms"), &secrets);
    let order = r#"{"topic": "orders/create", "webhookId": "wh_01HZX",
 "order": {"number": "4711", "channel": "web", "customer": {"id": "C-1001"},
           "currency": "EUR", "totalPrice": "59.70",
           "lineItems": [{"sku": "A-100", "quantity": 3, "price": "19.90"}]}}"#;
    // Each delivered twice, as senders retry.
    for (sender, body) in [
        (&wms, SHIPMENT),
        (&shop, order),
        (&wms, SHIPMENT),
        (&shop, order),
    ] {
        let r = sender.send(body.as_bytes()).await.unwrap();
        assert!(matches!(r.status, 200 | 202), "{}", r.text());
    }
    let erp = &env.erp;
    wait_for("the invoice", Duration::from_secs(20), || {
        erp.invoice_count() == 1
    })
    .await;
    let invoice = &erp.invoices()[0];
    assert_eq!(
        invoice.field("netAmount"),
        Some("59.70"),
        "{}",
        invoice.body
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(erp.invoice_count(), 1, "never a second invoice");
    run.shutdown().await;
}
