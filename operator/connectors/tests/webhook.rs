//! The webhook gateway over real HTTP on 127.0.0.1, with an in-process
//! publisher that records what it is given (the JetStream publisher is
//! tested against a real nats-server in the worker crate).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tallyman_api::v1alpha1::ConnectorSpec;
use tallyman_connectors::StaticSecrets;
use tallyman_connectors::webhook::{
    Gateway, GatewayConfig, PublishError, Published, Publisher, Routes, serve,
};
use tallyman_telemetry::Metrics;
use tallyman_testing::erp::{
    HttpResponse, WebhookSender, WebhookSignature, send, sign_hmac_sha256, sign_timestamped,
    unix_now,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const NS: &str = "finance";
const SECRET: &str = "wms-s3cr3t";

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Stored {
    subject: String,
    id: String,
    payload: Bytes,
}

#[derive(Default)]
struct State {
    stored: Vec<Stored>,
    ids: HashSet<String>,
    /// Publishes still allowed before every further one fails.
    fail_after: Option<usize>,
    /// Never answer (a broker that takes messages but never acknowledges).
    hang: bool,
}

/// Remembers ids like JetStream's duplicate window.
#[derive(Default)]
struct Recorder(Mutex<State>);

impl Recorder {
    fn stored(&self) -> Vec<Stored> {
        self.0.lock().unwrap().stored.clone()
    }
    fn fail_after(&self, n: usize) {
        self.0.lock().unwrap().fail_after = Some(n);
    }
    fn hang(&self) {
        self.0.lock().unwrap().hang = true;
    }
}

impl Publisher for Recorder {
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        msg_id: &'a str,
        payload: Bytes,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Published, PublishError>> + Send + 'a>,
    > {
        Box::pin(async move {
            let hang = {
                let mut s = self.0.lock().unwrap();
                if let Some(n) = s.fail_after.as_mut() {
                    if *n == 0 {
                        return Err(PublishError::Unavailable("broker down".into()));
                    }
                    *n -= 1;
                }
                if !s.hang {
                    let duplicate = !s.ids.insert(msg_id.to_string());
                    if !duplicate {
                        s.stored.push(Stored {
                            subject: subject.to_string(),
                            id: msg_id.to_string(),
                            payload,
                        });
                    }
                    return Ok(Published { duplicate });
                }
                true
            };
            assert!(hang);
            std::future::pending().await
        })
    }
}

struct Harness {
    addr: SocketAddr,
    gateway: Arc<Gateway>,
    recorder: Arc<Recorder>,
    metrics: Arc<Metrics>,
    _stop: oneshot::Sender<()>,
}

impl Harness {
    async fn start(connectors: &[(String, ConnectorSpec)]) -> Harness {
        Self::start_with(connectors, GatewayConfig::default()).await
    }

    async fn start_with(connectors: &[(String, ConnectorSpec)], config: GatewayConfig) -> Harness {
        let routes = Routes::new(NS, connectors, &secrets()).expect("routes compile");
        let recorder = Arc::new(Recorder::default());
        let metrics = Arc::new(Metrics::new());
        let gateway = Gateway::new(routes, recorder.clone(), metrics.clone(), config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(listener, gateway.clone(), async move {
            let _ = stopped.await;
        }));
        Harness {
            addr,
            gateway,
            recorder,
            metrics,
            _stop: stop,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn sender(&self, path: &str, signature: WebhookSignature) -> WebhookSender {
        WebhookSender::new(self.url(path), signature)
    }

    /// The published canonical events, parsed (numbers kept as text).
    fn events(&self) -> Vec<Value> {
        self.recorder
            .stored()
            .iter()
            .map(|s| serde_json::from_slice(&s.payload).unwrap())
            .collect()
    }
}

fn secrets() -> StaticSecrets {
    StaticSecrets::new()
        .with("wms-hook", "secret", SECRET)
        .with("shop-hook", "secret", "shop-s3cr3t\n")
        .with("erp-hook", "token", "erp-t0k3n")
}

fn connector(path: &str, signature: Value, events: Value) -> ConnectorSpec {
    serde_json::from_value(json!({
        "system": "wms",
        "webhook": {"path": path, "signature": signature, "maxBodyBytes": 4096, "events": events}
    }))
    .unwrap()
}

fn hmac_sig() -> Value {
    json!({"scheme": "hmac-sha256", "header": "X-Signature",
           "secretRef": {"name": "wms-hook", "key": "secret"}})
}

fn shipment_events() -> Value {
    json!([{
        "type": "shipment.confirmed",
        "when": "payload.status == 'CONFIRMED'",
        "id": "payload.eventId",
        "data": "{'orderId': payload.orderRef, 'lines': payload.items.map(i, {'sku': i.sku, 'qty': i.quantity, 'price': i.price})}"
    }])
}

/// `wms` (hmac-sha256), `shop` (timestamped), `erp` (token), `open` (none).
fn four_schemes() -> Vec<(String, ConnectorSpec)> {
    vec![
        (
            "wms".into(),
            connector("/shipments", hmac_sig(), shipment_events()),
        ),
        (
            "shop".into(),
            connector(
                "/orders",
                json!({"scheme": "hmac-sha256-timestamped", "header": "X-Shop-Signature",
                       "timestampHeader": "X-Shop-Timestamp", "tolerance": "5m",
                       "secretRef": {"name": "shop-hook", "key": "secret"}}),
                json!([{"type": "order.created", "id": "payload.webhookId"}]),
            ),
        ),
        (
            "erp".into(),
            connector(
                "/po",
                json!({"scheme": "token", "header": "X-ERP-Token",
                       "secretRef": {"name": "erp-hook", "key": "token"}}),
                json!([{"type": "po.created", "id": "payload.messageId",
                        "data": "{'po': payload.po, 'host': headers['host'], 'sawToken': 'x-erp-token' in headers}"}]),
            ),
        ),
        (
            "open".into(),
            connector(
                "/ping",
                json!({"scheme": "none"}),
                json!([{"type": "ping.received"}]),
            ),
        ),
    ]
}

fn wms(h: &Harness) -> WebhookSender {
    h.sender(
        "/webhooks/finance/wms/shipments",
        WebhookSignature::HmacSha256 {
            header: "X-Signature".into(),
            secret: SECRET.into(),
            prefixed: false,
        },
    )
}

fn shop(h: &Harness) -> WebhookSender {
    h.sender(
        "/webhooks/finance/shop/orders",
        WebhookSignature::HmacSha256Timestamped {
            header: "X-Shop-Signature".into(),
            timestamp_header: "X-Shop-Timestamp".into(),
            // The mounted file ends in a newline; the shared secret does not.
            secret: b"shop-s3cr3t".to_vec(),
        },
    )
}

const SHIPMENT: &str = r#"{"eventId": "evt-1", "status": "CONFIRMED", "orderRef": "4711",
    "items": [{"sku": "A-100", "quantity": 3, "price": 19.90}, {"sku": "B-7", "quantity": 1, "price": 1250.10}]}"#;

fn body(r: &HttpResponse) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

fn error_code(r: &HttpResponse) -> String {
    let b = body(r);
    assert!(b["detail"].as_str().is_some_and(|d| !d.is_empty()), "{b}");
    b["error"].as_str().unwrap().to_string()
}

async fn post(h: &Harness, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    send("POST", &h.url(path), headers, Bytes::copy_from_slice(body))
        .await
        .expect("the gateway answers")
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_signature_scheme_is_accepted_when_signed_right() {
    let h = Harness::start(&four_schemes()).await;

    let r = wms(&h).send(SHIPMENT.as_bytes()).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(body(&r), json!({"accepted": 1, "ids": ["evt-1"]}));

    let prefixed = h.sender(
        "/webhooks/finance/wms/shipments",
        WebhookSignature::HmacSha256 {
            header: "X-Signature".into(),
            secret: SECRET.into(),
            prefixed: true,
        },
    );
    let r = prefixed
        .send(SHIPMENT.replace("evt-1", "evt-2").as_bytes())
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());

    let r = shop(&h)
        .send(br#"{"webhookId": "wh-1", "total": 79.60}"#)
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());

    let token = h.sender(
        "/webhooks/finance/erp/po",
        WebhookSignature::Token {
            header: "X-ERP-Token".into(),
            token: "erp-t0k3n".into(),
        },
    );
    let r = token
        .send(br#"{"messageId": "m-1", "po": "PO-1"}"#)
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());

    let none = h.sender("/webhooks/finance/open/ping", WebhookSignature::None);
    let r = none.send(b"{}").await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());

    let stored = h.recorder.stored();
    let subjects: Vec<&str> = stored.iter().map(|s| s.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "tallyman.finance.events.shipment.confirmed",
            "tallyman.finance.events.shipment.confirmed",
            "tallyman.finance.events.order.created",
            "tallyman.finance.events.po.created",
            "tallyman.finance.events.ping.received",
        ]
    );
    let events = h.events();
    // The canonical event: CloudEvents attribute names, the source, the time.
    let first = &events[0];
    assert_eq!(first["id"], "evt-1");
    assert_eq!(first["type"], "shipment.confirmed");
    assert_eq!(first["source"], "finance/wms");
    let time = first["time"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{time}");
    // Deduplicated as this id within this source: another system may use it too.
    assert_eq!(stored[0].id, "finance/wms|evt-1");
    // Decimals digit for digit: the raw text of the published data.
    let raw = String::from_utf8(stored[0].payload.to_vec()).unwrap();
    assert!(
        raw.ends_with(r#""data":{"lines":[{"price":19.90,"qty":3,"sku":"A-100"},{"price":1250.10,"qty":1,"sku":"B-7"}],"orderId":"4711"}}"#),
        "{raw}"
    );
    // Without `data`, the payload itself, exactly.
    let raw = String::from_utf8(stored[2].payload.to_vec()).unwrap();
    assert!(
        raw.ends_with(r#""data":{"total":79.60,"webhookId":"wh-1"}}"#),
        "{raw}"
    );
    // Headers reach CEL, but never the header that carries the token.
    assert_eq!(events[3]["data"]["sawToken"], false);
    assert_eq!(events[3]["data"]["po"], "PO-1");
    assert_eq!(events[3]["data"]["host"], h.addr.to_string());
    // Without `id`, the SHA-256 of the raw body, suffixed with the type.
    let ping_id = events[4]["id"].as_str().unwrap();
    assert_eq!(ping_id.len(), 64 + ":ping.received".len(), "{ping_id}");
    assert!(ping_id.ends_with(":ping.received"), "{ping_id}");
}

#[tokio::test]
async fn forged_truncated_and_unsigned_requests_are_refused_with_401() {
    let h = Harness::start(&four_schemes()).await;
    let path = "/webhooks/finance/wms/shipments";
    let json_ct = ("content-type", "application/json");
    let good = sign_hmac_sha256(SECRET.as_bytes(), SHIPMENT.as_bytes());

    // A forgery: the body changed after signing.
    let forged = SHIPMENT.replace("\"quantity\": 3", "\"quantity\": 30");
    let r = post(
        &h,
        path,
        &[json_ct, ("x-signature", &good)],
        forged.as_bytes(),
    )
    .await;
    assert_eq!((r.status, error_code(&r).as_str()), (401, "bad_signature"));

    // Signed with another secret.
    let wrong = sign_hmac_sha256(b"not-the-secret", SHIPMENT.as_bytes());
    let r = post(
        &h,
        path,
        &[json_ct, ("x-signature", &wrong)],
        SHIPMENT.as_bytes(),
    )
    .await;
    assert_eq!((r.status, error_code(&r).as_str()), (401, "bad_signature"));

    // A truncated body under the full body's signature.
    let cut = &SHIPMENT.as_bytes()[..SHIPMENT.len() - 10];
    let r = post(&h, path, &[json_ct, ("x-signature", &good)], cut).await;
    assert_eq!((r.status, error_code(&r).as_str()), (401, "bad_signature"));

    // No signature at all; a signature that is not hex.
    let r = post(&h, path, &[json_ct], SHIPMENT.as_bytes()).await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "missing_signature")
    );
    let r = post(
        &h,
        path,
        &[json_ct, ("x-signature", "sha256=zz")],
        SHIPMENT.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 401);

    // Timestamped: signed over the body only, or a timestamp changed after signing.
    let shop_path = "/webhooks/finance/shop/orders";
    let body = br#"{"webhookId": "wh-9"}"#;
    let now = unix_now();
    let body_only = sign_hmac_sha256(b"shop-s3cr3t", body);
    let r = post(
        &h,
        shop_path,
        &[
            json_ct,
            ("x-shop-signature", &body_only),
            ("x-shop-timestamp", &now.to_string()),
        ],
        body,
    )
    .await;
    assert_eq!((r.status, error_code(&r).as_str()), (401, "bad_signature"));
    let signed = sign_timestamped(b"shop-s3cr3t", now, body);
    let r = post(
        &h,
        shop_path,
        &[
            json_ct,
            ("x-shop-signature", &signed),
            ("x-shop-timestamp", &(now - 1).to_string()),
        ],
        body,
    )
    .await;
    assert_eq!((r.status, error_code(&r).as_str()), (401, "bad_signature"));
    let r = post(
        &h,
        shop_path,
        &[json_ct, ("x-shop-signature", &signed)],
        body,
    )
    .await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "missing_signature")
    );

    // Token: a wrong or missing token.
    let erp_path = "/webhooks/finance/erp/po";
    let po = br#"{"messageId": "m-9", "po": "PO-9"}"#;
    let r = post(&h, erp_path, &[json_ct, ("x-erp-token", "erp-t0k3")], po).await;
    assert_eq!((r.status, error_code(&r).as_str()), (401, "bad_signature"));
    let r = post(&h, erp_path, &[json_ct], po).await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "missing_signature")
    );

    assert!(
        h.recorder.stored().is_empty(),
        "nothing refused is published"
    );
    let metrics = h.metrics.encode();
    assert!(
        metrics.contains(
            r#"tallyman_gateway_rejected_total{namespace="finance",connector="wms",reason="bad_signature"} 4"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"tallyman_gateway_requests_total{namespace="finance",connector="wms",outcome="rejected"} 5"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_replay_outside_the_tolerance_window_is_refused() {
    let h = Harness::start(&four_schemes()).await;
    let body = br#"{"webhookId": "wh-replay"}"#;
    let now = unix_now();

    let r = shop(&h).send_at(body, now - 6 * 60).await.unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "stale_timestamp")
    );
    let r = shop(&h).send_at(body, now + 6 * 60).await.unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "stale_timestamp")
    );
    assert!(h.recorder.stored().is_empty());

    // Inside the window the same delivery is accepted.
    let r = shop(&h).send_at(body, now - 4 * 60).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
}

#[tokio::test]
async fn content_type_json_and_mapping_errors_have_their_own_status() {
    let h = Harness::start(&four_schemes()).await;
    let path = "/webhooks/finance/wms/shipments";
    let signed = |b: &[u8]| sign_hmac_sha256(SECRET.as_bytes(), b);

    // 415: not JSON, or no Content-Type.
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let r = post(
            &h,
            path,
            &[
                ("content-type", ct),
                ("x-signature", &signed(SHIPMENT.as_bytes())),
            ],
            SHIPMENT.as_bytes(),
        )
        .await;
        assert_eq!(
            (r.status, error_code(&r).as_str()),
            (415, "unsupported_media_type")
        );
    }
    let r = post(
        &h,
        path,
        &[("x-signature", &signed(SHIPMENT.as_bytes()))],
        SHIPMENT.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 415);
    // `+json` media types are JSON.
    let r = post(
        &h,
        path,
        &[
            ("content-type", "application/vnd.wms.v2+json; charset=utf-8"),
            ("x-signature", &signed(SHIPMENT.as_bytes())),
        ],
        SHIPMENT.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());

    // 400: signed, but not JSON.
    let bad = br#"{"eventId": "evt-3", "status": "CONFIRMED",}"#;
    let r = post(
        &h,
        path,
        &[
            ("content-type", "application/json"),
            ("x-signature", &signed(bad)),
        ],
        bad,
    )
    .await;
    assert_eq!((r.status, error_code(&r).as_str()), (400, "bad_json"));

    // 422: valid JSON the mapping cannot handle; the CEL error is in the detail.
    let no_items = br#"{"eventId": "evt-4", "status": "CONFIRMED", "orderRef": "4711"}"#;
    let r = wms(&h).send(no_items).await.unwrap();
    assert_eq!((r.status, error_code(&r).as_str()), (422, "mapping_failed"));
    let detail = body(&r)["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("shipment.confirmed"), "{detail}");
    assert!(detail.contains("data"), "{detail}");
    assert!(detail.contains("items"), "{detail}");

    // 200 and nothing published: no `when` holds.
    let draft = br#"{"eventId": "evt-5", "status": "DRAFT"}"#;
    let r = wms(&h).send(draft).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(body(&r), json!({"accepted": 0, "ids": []}));

    // 404: unknown connector, unknown path, another namespace; 405: not POST.
    for p in [
        "/webhooks/finance/nope/shipments",
        "/webhooks/finance/wms/other",
        "/webhooks/shop/wms/shipments",
        "/webhooks/finance/wms/shipments/",
        "/",
    ] {
        let r = post(&h, p, &[("content-type", "application/json")], b"{}").await;
        assert_eq!(
            (r.status, error_code(&r).as_str()),
            (404, "not_found"),
            "{p}"
        );
    }
    let r = send("GET", &h.url(path), &[], Bytes::new()).await.unwrap();
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));

    assert_eq!(h.recorder.stored().len(), 1);
}

#[tokio::test]
async fn a_duplicate_delivery_is_answered_200_and_published_once() {
    let h = Harness::start(&four_schemes()).await;
    let r = wms(&h).send(SHIPMENT.as_bytes()).await.unwrap();
    assert_eq!(r.status, 202);
    let r = wms(&h).send(SHIPMENT.as_bytes()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(body(&r), json!({"duplicate": true, "ids": ["evt-1"]}));
    assert_eq!(h.recorder.stored().len(), 1);
    let metrics = h.metrics.encode();
    for outcome in ["accepted", "duplicate"] {
        assert!(
            metrics.contains(&format!(
                r#"tallyman_gateway_requests_total{{namespace="finance",connector="wms",outcome="{outcome}"}} 1"#
            )),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains(
            r#"tallyman_gateway_publish_duration_seconds_count{namespace="finance",connector="wms"} 2"#
        ),
        "{metrics}"
    );
}

/// Several events from one payload; the default id keeps them apart.
fn two_events() -> Vec<(String, ConnectorSpec)> {
    vec![(
        "wms".into(),
        connector(
            "/shipments",
            hmac_sig(),
            json!([
                {"type": "shipment.confirmed", "when": "payload.status == 'CONFIRMED'"},
                {"type": "stock.moved", "data": "{'n': size(payload.items)}"}
            ]),
        ),
    )]
}

#[tokio::test]
async fn one_payload_may_yield_several_events_with_distinct_ids() {
    let h = Harness::start(&two_events()).await;
    let r = wms(&h).send(SHIPMENT.as_bytes()).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let ids: Vec<String> = body(&r)["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    assert_eq!(ids[0][..64], ids[1][..64], "one body, one hash");
    let events = h.events();
    assert_eq!(events[1]["data"], json!({"n": 2}));

    // Two events under one id would lose one to deduplication: refused.
    let same_id = vec![(
        "wms".into(),
        connector(
            "/shipments",
            hmac_sig(),
            json!([{"type": "a.b", "id": "payload.eventId"}, {"type": "c.d", "id": "payload.eventId"}]),
        ),
    )];
    let h = Harness::start(&same_id).await;
    let r = wms(&h).send(SHIPMENT.as_bytes()).await.unwrap();
    assert_eq!((r.status, error_code(&r).as_str()), (422, "mapping_failed"));
    assert!(h.recorder.stored().is_empty());
}

#[tokio::test]
async fn nothing_half_published_is_answered_2xx() {
    let h = Harness::start(&two_events()).await;
    // The first event is acknowledged, the second is not.
    h.recorder.fail_after(1);
    let r = wms(&h).send(SHIPMENT.as_bytes()).await.unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (503, "broker_unavailable")
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(h.recorder.stored().len(), 1);

    // The sender retries: the first is a duplicate, the second is new: 202.
    h.recorder.0.lock().unwrap().fail_after = None;
    let r = wms(&h).send(SHIPMENT.as_bytes()).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(body(&r)["duplicates"], 1);
    assert_eq!(h.recorder.stored().len(), 2);
    let metrics = h.metrics.encode();
    assert!(
        metrics.contains(
            r#"tallyman_gateway_rejected_total{namespace="finance",connector="wms",reason="broker_unavailable"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_broker_that_never_acknowledges_gets_503_after_the_timeout() {
    let config = GatewayConfig {
        publish_timeout: Duration::from_millis(300),
        ..GatewayConfig::default()
    };
    let h = Harness::start_with(&four_schemes(), config).await;
    h.recorder.hang();
    let started = Instant::now();
    let r = wms(&h).send(SHIPMENT.as_bytes()).await.unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (503, "broker_unavailable")
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

/// Writes the request head and `first` body bytes on a raw connection.
async fn raw_request(h: &Harness, path: &str, head: &[(&str, String)], first: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let mut text = format!("POST {path} HTTP/1.1\r\nhost: {}\r\n", h.addr);
    for (k, v) in head {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    stream.write_all(text.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    stream
}

/// Reads until the response head is complete; the status code.
async fn read_status(stream: &mut TcpStream, within: Duration) -> u16 {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(within, async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed before a response: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no response within {within:?}"));
    let text = String::from_utf8_lossy(&buf);
    text[9..12].parse().unwrap()
}

#[tokio::test]
async fn an_oversize_body_is_refused_before_it_is_read_whole() {
    let h = Harness::start(&four_schemes()).await;
    let path = "/webhooks/finance/wms/shipments";

    // Content-Length above maxBodyBytes (4096): refused from the head alone,
    // while the sender has sent none of the body.
    let mut s = raw_request(
        &h,
        path,
        &[
            ("content-type", "application/json".into()),
            ("x-signature", "00".into()),
            ("content-length", "100000000".into()),
        ],
        b"",
    )
    .await;
    assert_eq!(read_status(&mut s, Duration::from_secs(5)).await, 413);

    // No Content-Length (chunked): refused as soon as the limit is passed,
    // while the sender is still sending.
    let mut s = raw_request(
        &h,
        path,
        &[
            ("content-type", "application/json".into()),
            ("x-signature", "00".into()),
            ("transfer-encoding", "chunked".into()),
        ],
        b"",
    )
    .await;
    let chunk = vec![b' '; 1024];
    for _ in 0..5 {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(&chunk).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    // The stream stays open (no final chunk): a gateway that read it whole
    // would never answer.
    assert_eq!(read_status(&mut s, Duration::from_secs(5)).await, 413);

    // A Content-Length within the limit, with the body still coming: the
    // gateway waits for it, then checks the signature.
    let body = SHIPMENT.as_bytes();
    let mut s = raw_request(
        &h,
        path,
        &[
            ("content-type", "application/json".into()),
            ("x-signature", sign_hmac_sha256(SECRET.as_bytes(), body)),
            ("content-length", body.len().to_string()),
        ],
        &body[..10],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&body[10..]).await.unwrap();
    assert_eq!(read_status(&mut s, Duration::from_secs(5)).await, 202);

    assert_eq!(h.recorder.stored().len(), 1);
    let metrics = h.metrics.encode();
    assert!(
        metrics.contains(
            r#"tallyman_gateway_rejected_total{namespace="finance",connector="wms",reason="body_too_large"} 2"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_reload_leaves_requests_in_flight_on_the_routes_they_started_with() {
    let h = Harness::start(&four_schemes()).await;
    let path = "/webhooks/finance/wms/shipments";
    let body = SHIPMENT.as_bytes();

    // A request whose body is still arriving when the reload happens.
    let mut in_flight = raw_request(
        &h,
        path,
        &[
            ("content-type", "application/json".into()),
            ("x-signature", sign_hmac_sha256(SECRET.as_bytes(), body)),
            ("content-length", body.len().to_string()),
        ],
        &body[..10],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The secret is rotated and a new connector added.
    let rotated = StaticSecrets::new()
        .with("wms-hook", "secret", "rotated")
        .with("shop-hook", "secret", "shop-s3cr3t")
        .with("erp-hook", "token", "erp-t0k3n");
    let mut connectors = four_schemes();
    connectors.push((
        "tms".into(),
        connector(
            "/legs",
            json!({"scheme": "none"}),
            json!([{"type": "leg.done"}]),
        ),
    ));
    let old = h.gateway.routes().fingerprint();
    let routes = Routes::new(NS, &connectors, &rotated).unwrap();
    assert_ne!(routes.fingerprint(), old);
    h.gateway.reload(routes);

    in_flight.write_all(&body[10..]).await.unwrap();
    assert_eq!(
        read_status(&mut in_flight, Duration::from_secs(5)).await,
        202,
        "the request in flight keeps the old secret"
    );

    // New requests see the new set.
    let r = wms(&h)
        .send(SHIPMENT.replace("evt-1", "evt-7").as_bytes())
        .await
        .unwrap();
    assert_eq!(r.status, 401, "the old secret no longer works");
    let rotated_sender = h.sender(
        path,
        WebhookSignature::HmacSha256 {
            header: "X-Signature".into(),
            secret: b"rotated".to_vec(),
            prefixed: true,
        },
    );
    let r = rotated_sender
        .send(SHIPMENT.replace("evt-1", "evt-7").as_bytes())
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let r = h
        .sender("/webhooks/finance/tms/legs", WebhookSignature::None)
        .send(b"{}")
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());

    // An identical set has the same fingerprint: nothing to swap.
    let again = Routes::new(NS, &connectors, &rotated).unwrap();
    assert_eq!(again.fingerprint(), h.gateway.routes().fingerprint());
}

#[test]
fn a_bad_connector_set_is_refused_with_the_connector_and_field() {
    let bad_cel = vec![(
        "wms".to_string(),
        connector(
            "/x",
            hmac_sig(),
            json!([{"type": "a.b", "data": "{'x': event.data}"}]),
        ),
    )];
    let e = Routes::new(NS, &bad_cel, &secrets())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("wms") && e.contains("spec.webhook.events[0].data"),
        "{e}"
    );
    assert!(e.contains("unknown variable \"event\""), "{e}");

    let missing_secret = vec![(
        "wms".to_string(),
        connector(
            "/x",
            json!({"scheme": "hmac-sha256", "header": "X-Sig", "secretRef": {"name": "nope", "key": "k"}}),
            json!([{"type": "a.b"}]),
        ),
    )];
    let e = Routes::new(NS, &missing_secret, &secrets()).unwrap_err();
    let text = format!("{e}: {:?}", std::error::Error::source(&e));
    assert!(text.contains("wms") && text.contains("nope"), "{text}");

    let empty_secret = StaticSecrets::new().with("wms-hook", "secret", "\n");
    let e = Routes::new(
        NS,
        &[(
            "wms".to_string(),
            connector("/x", hmac_sig(), json!([{"type": "a.b"}])),
        )],
        &empty_secret,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("empty"), "{e}");

    // Connectors without a webhook are not served.
    let rest_only: ConnectorSpec = serde_json::from_value(json!({
        "system": "erp",
        "rest": {"baseUrl": "https://erp.example.com", "actions": {"get": {"method": "GET", "path": "/x"}}}
    }))
    .unwrap();
    let routes = Routes::new(NS, &[("erp".to_string(), rest_only)], &secrets()).unwrap();
    assert!(routes.is_empty());
    let routes = Routes::new(NS, &four_schemes(), &secrets()).unwrap();
    assert_eq!(
        routes.paths(),
        [
            "/webhooks/finance/erp/po",
            "/webhooks/finance/open/ping",
            "/webhooks/finance/shop/orders",
            "/webhooks/finance/wms/shipments",
        ]
    );
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_cut_off() {
    let config = GatewayConfig {
        header_timeout: Duration::from_millis(300),
        ..GatewayConfig::default()
    };
    let h = Harness::start_with(&four_schemes(), config).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    // Half a request head, then nothing.
    stream
        .write_all(b"POST /webhooks/finance/wms/shipments HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was held for 5 s");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The gateway still serves everyone else.
    let r = wms(&h).send(SHIPMENT.as_bytes()).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
}
