//! The simulated ERP over real HTTP: idempotency, exact digits, injected
//! faults, auth, the other examples' resources, webhook signing and the
//! `sim-erp` binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use tallyman_testing::erp::{
    HttpResponse, Order, OrderLine, PurchaseOrder, REPLAYED_HEADER, SimErp, WebhookSender,
    WebhookSignature, send, sign_hmac_sha256, sign_timestamped,
};

const INVOICE_BODY: &str = r#"{"orderId":"4711","customerId":"C-1001","currency":"EUR","lines":[{"sku":"A-100","quantity":3,"unitPrice":19.90,"netAmount":59.70}],"netAmount":59.70}"#;

async fn get(sim: &SimErp, path: &str) -> HttpResponse {
    send("GET", &sim.url(path), &[], "").await.expect("GET")
}

async fn post(sim: &SimErp, path: &str, headers: &[(&str, &str)], body: &str) -> HttpResponse {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send("POST", &sim.url(path), &all, body.to_owned())
        .await
        .expect("POST")
}

/// Reads one top-level field's JSON text without going through a float.
fn raw_field(response: &HttpResponse, name: &str) -> String {
    let fields: std::collections::HashMap<String, Box<RawValue>> =
        response.json().expect("a JSON object");
    fields
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {}", response.text()))
        .get()
        .to_owned()
}

fn order_4711() -> Order {
    Order {
        order_id: "4711".into(),
        customer_id: "C-1001".into(),
        currency: "EUR".into(),
        lines: vec![
            OrderLine::new("A-100", 3, "19.90"),
            OrderLine::new("B-7", 10, "0.10"),
            OrderLine::new("C-1", 1, "123456789012345678.000000001"),
        ],
    }
}

#[tokio::test]
async fn same_idempotency_key_twice_creates_one_invoice_and_replays_it() {
    let sim = SimErp::start().await;
    let key = [("Idempotency-Key", "inv-4711")];

    let first = post(&sim, "/invoices", &key, INVOICE_BODY).await;
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(first.header(REPLAYED_HEADER), None);
    assert_eq!(first.header("location"), Some("/invoices/INV-000001"));
    assert_eq!(raw_field(&first, "invoiceId"), r#""INV-000001""#);
    assert_eq!(raw_field(&first, "orderId"), r#""4711""#);
    assert_eq!(raw_field(&first, "currency"), r#""EUR""#);
    assert_eq!(raw_field(&first, "netAmount"), "59.70");

    let second = post(&sim, "/invoices", &key, INVOICE_BODY).await;
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(second.header(REPLAYED_HEADER), Some("true"));
    assert_eq!(second.body, first.body, "the replay is the same invoice");

    assert_eq!(sim.invoice_count(), 1);
    assert_eq!(sim.duplicates_prevented(), 1);
    assert_eq!(sim.idempotency_mismatches(), 0);
    let invoices = sim.invoices();
    assert_eq!(invoices[0].id, "INV-000001");
    assert_eq!(invoices[0].idempotency_key.as_deref(), Some("inv-4711"));
    assert_eq!(invoices[0].body, INVOICE_BODY);
    assert_eq!(invoices[0].field("netAmount"), Some("59.70"));
    assert_eq!(invoices[0].str_field("orderId").as_deref(), Some("4711"));

    // The stored invoice is served by id and by its list.
    let by_id = get(&sim, "/invoices/INV-000001").await;
    assert_eq!(
        (by_id.status, by_id.body.clone()),
        (200, first.body.clone())
    );
    assert_eq!(
        get(&sim, "/invoices").await.text(),
        format!("[{}]", first.text())
    );

    // A key reused for another body is still a replay, but counted.
    let other = INVOICE_BODY.replace("59.70", "59.71");
    let third = post(&sim, "/invoices", &key, &other).await;
    assert_eq!(third.status, 200);
    assert_eq!(raw_field(&third, "netAmount"), "59.70");
    assert_eq!(sim.idempotency_mismatches(), 1);
    assert_eq!(sim.invoice_count(), 1);
}

#[tokio::test]
async fn without_a_key_every_post_creates_an_invoice() {
    let sim = SimErp::start().await;
    for expected in ["INV-000001", "INV-000002"] {
        let response = post(&sim, "/invoices", &[], INVOICE_BODY).await;
        assert_eq!(response.status, 201);
        assert_eq!(raw_field(&response, "invoiceId"), format!("\"{expected}\""));
    }
    assert_eq!(sim.invoice_count(), 2);
    assert_eq!(sim.duplicates_prevented(), 0);

    let bad = post(&sim, "/invoices", &[], "[1, 2]").await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(sim.invoice_count(), 2);
}

#[tokio::test]
async fn seeded_prices_come_back_with_exactly_their_digits() {
    let sim = SimErp::start().await;
    sim.seed_order(order_4711());

    let response = get(&sim, "/orders/4711").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(
        response.text(),
        r#"{"orderId":"4711","customerId":"C-1001","currency":"EUR","lines":[{"sku":"A-100","qty":3,"unitPrice":19.90},{"sku":"B-7","qty":10,"unitPrice":0.10},{"sku":"C-1","qty":1,"unitPrice":123456789012345678.000000001}]}"#
    );

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Line {
        sku: String,
        qty: i64,
        unit_price: Box<RawValue>,
    }
    #[derive(Deserialize)]
    struct OrderBody {
        lines: Vec<Line>,
    }
    let order: OrderBody = response.json().unwrap();
    let prices: Vec<(&str, i64, &str)> = order
        .lines
        .iter()
        .map(|l| (l.sku.as_str(), l.qty, l.unit_price.get()))
        .collect();
    assert_eq!(
        prices,
        vec![
            ("A-100", 3, "19.90"),
            ("B-7", 10, "0.10"),
            ("C-1", 1, "123456789012345678.000000001")
        ]
    );

    // The returns example reads the same order as a sales order.
    let sales = get(&sim, "/sales-orders/4711").await;
    assert_eq!((sales.status, sales.body), (200, response.body));
}

#[tokio::test]
async fn unknown_order_is_404() {
    let sim = SimErp::start().await;
    sim.seed_order(order_4711());
    assert_eq!(get(&sim, "/orders/4712").await.status, 404);
    assert_eq!(get(&sim, "/purchase-orders/PO-1").await.status, 404);
    assert_eq!(get(&sim, "/no/such/route").await.status, 404);
    assert_eq!(sim.requests("/orders/"), 1);
}

#[test]
#[should_panic(expected = "not a decimal number")]
fn seeding_a_price_that_is_no_number_panics() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sim = runtime.block_on(SimErp::start());
    let mut order = order_4711();
    order.lines[0].unit_price = "19,90".into();
    sim.seed_order(order);
}

#[tokio::test]
async fn fail_next_answers_503_twice_then_creates() {
    let sim = SimErp::start().await;
    sim.fail_next("/invoices", 2, 503);
    let key = [("Idempotency-Key", "inv-4711")];

    let statuses = [
        post(&sim, "/invoices", &key, INVOICE_BODY).await.status,
        post(&sim, "/invoices", &key, INVOICE_BODY).await.status,
        post(&sim, "/invoices", &key, INVOICE_BODY).await.status,
    ];
    assert_eq!(statuses, [503, 503, 201]);
    assert_eq!(sim.invoice_count(), 1);
    assert_eq!(sim.requests("/invoices"), 3);
    assert_eq!(sim.requests("/orders"), 0);
    let log: Vec<u16> = sim.recent_requests().iter().map(|r| r.status).collect();
    assert_eq!(log, [503, 503, 201]);
    assert_eq!(
        sim.recent_requests()[0].header("Idempotency-Key"),
        Some("inv-4711")
    );
}

#[tokio::test]
async fn a_fault_after_commit_loses_the_answer_and_the_retry_replays() {
    let sim = SimErp::start().await;
    sim.fail_next_after_commit("/invoices", 1, 502);
    let key = [("Idempotency-Key", "inv-4711")];

    assert_eq!(
        post(&sim, "/invoices", &key, INVOICE_BODY).await.status,
        502
    );
    assert_eq!(
        sim.invoice_count(),
        1,
        "the invoice was created all the same"
    );
    let retry = post(&sim, "/invoices", &key, INVOICE_BODY).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.header(REPLAYED_HEADER), Some("true"));
    assert_eq!(sim.invoice_count(), 1);
    assert_eq!(sim.duplicates_prevented(), 1);
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let sim = SimErp::start().await;
    sim.seed_order(order_4711());
    sim.rate_limit_next("/orders", 1, 7);

    let limited = get(&sim, "/orders/4711").await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), Some("7"));
    assert_eq!(get(&sim, "/orders/4711").await.status, 200);
}

#[tokio::test]
async fn faults_of_one_prefix_run_in_order_and_reset_clears_them() {
    let sim = SimErp::start().await;
    sim.seed_order(order_4711());
    sim.fail_next("/orders", 1, 500);
    sim.rate_limit_next("/orders", 1, 1);
    sim.fail_next("/invoices", 5, 503);

    assert_eq!(get(&sim, "/orders/4711").await.status, 500);
    assert_eq!(get(&sim, "/orders/4711").await.status, 429);
    assert_eq!(get(&sim, "/orders/4711").await.status, 200);
    sim.reset_faults();
    assert_eq!(post(&sim, "/invoices", &[], INVOICE_BODY).await.status, 201);
}

#[tokio::test]
async fn delay_holds_the_answer_back() {
    let sim = SimErp::start().await;
    sim.seed_order(order_4711());
    sim.delay("/orders", Duration::from_millis(300));

    let started = Instant::now();
    let response = get(&sim, "/orders/4711").await;
    assert_eq!(response.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A client with a shorter timeout gives up.
    let timed_out =
        tokio::time::timeout(Duration::from_millis(50), get(&sim, "/orders/4711")).await;
    assert!(timed_out.is_err());

    sim.delay("/orders", Duration::ZERO);
    let started = Instant::now();
    get(&sim, "/orders/4711").await;
    assert!(started.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn bearer_auth_is_enforced_when_required() {
    let sim = SimErp::start().await;
    sim.seed_order(order_4711());
    sim.require_bearer("s3cret");

    let missing = get(&sim, "/orders/4711").await;
    assert_eq!(missing.status, 401);
    assert!(missing.header("www-authenticate").is_some());
    let wrong = send(
        "GET",
        &sim.url("/orders/4711"),
        &[("authorization", "Bearer nope")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, 401);
    let right = send(
        "GET",
        &sim.url("/orders/4711"),
        &[("authorization", "Bearer s3cret")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(right.status, 200);

    sim.require_api_key("X-API-Key", "k-1");
    assert_eq!(get(&sim, "/ping").await.status, 401);
    let with_key = send("GET", &sim.url("/ping"), &[("x-api-key", "k-1")], "")
        .await
        .unwrap();
    assert_eq!(with_key.status, 200);

    sim.require_basic("erp-user", "pa:ss");
    let basic = send(
        "GET",
        &sim.url("/health"),
        &[("authorization", "Basic ZXJwLXVzZXI6cGE6c3M=")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(basic.status, 200);

    sim.clear_auth();
    assert_eq!(get(&sim, "/orders/4711").await.status, 200);
}

#[tokio::test]
async fn oauth2_client_credentials_issue_the_bearer_token() {
    let sim = SimErp::start().await;
    sim.enable_oauth2("client-1", "secret-1", "tok-1");
    let form = [("content-type", "application/x-www-form-urlencoded")];

    let wrong = send(
        "POST",
        &sim.url("/oauth2/token"),
        &form,
        "grant_type=client_credentials&client_id=client-1&client_secret=nope",
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, 401);

    let token = send(
        "POST",
        &sim.url("/oauth2/token"),
        &form,
        "grant_type=client_credentials&client_id=client-1&client_secret=secret-1&scope=payables.approve",
    )
    .await
    .unwrap();
    assert_eq!(token.status, 200, "{}", token.text());
    assert_eq!(raw_field(&token, "access_token"), r#""tok-1""#);

    let body = r#"{"invoiceId":"DOC-1","amount":143.28,"dueAt":"2025-07-02T00:00:00Z"}"#;
    let path = "/vendors/V-0042/payment-approvals";
    assert_eq!(post(&sim, path, &[], body).await.status, 401);
    let approved = post(
        &sim,
        path,
        &[
            ("authorization", "Bearer tok-1"),
            ("Idempotency-Key", "pay-DOC-1"),
        ],
        body,
    )
    .await;
    assert_eq!(approved.status, 201, "{}", approved.text());
    assert_eq!(raw_field(&approved, "approvalId"), r#""PA-000001""#);
    assert_eq!(raw_field(&approved, "status"), r#""APPROVED""#);
    assert_eq!(raw_field(&approved, "vendorId"), r#""V-0042""#);
    assert_eq!(
        raw_field(&approved, "scheduledFor"),
        r#""2025-07-02T00:00:00Z""#
    );
    assert_eq!(raw_field(&approved, "amount"), "143.28");
}

#[tokio::test]
async fn the_other_examples_resources() {
    let sim = SimErp::start().await;
    sim.seed_purchase_order(PurchaseOrder {
        po_number: "PO-2025-0815".into(),
        vendor_id: "V-0042".into(),
        currency: "EUR".into(),
        lines: vec![OrderLine::new("BOLT-M8", 1000, "0.12")],
    });
    let po = get(&sim, "/purchase-orders/PO-2025-0815").await;
    assert_eq!(
        po.text(),
        r#"{"poNumber":"PO-2025-0815","vendorId":"V-0042","currency":"EUR","lines":[{"sku":"BOLT-M8","qty":1000,"unitPrice":0.12}]}"#
    );

    // Credit notes: no idempotency keys, looked up by external reference.
    let lookup = "/credit-notes/by-reference/rma-RMA-20931";
    assert_eq!(get(&sim, lookup).await.status, 404);
    let credit = r#"{"externalReference":"rma-RMA-20931","salesOrder":"4711","totalAmount":33.83}"#;
    let created = post(&sim, "/credit-notes", &[("Idempotency-Key", "x")], credit).await;
    assert_eq!(created.status, 201);
    assert_eq!(raw_field(&created, "number"), r#""CN-000001""#);
    assert_eq!(raw_field(&created, "totalAmount"), "33.83");
    let found = get(&sim, lookup).await;
    assert_eq!((found.status, found.body), (200, created.body.clone()));
    assert_eq!(
        get(&sim, "/credit-notes/CN-000001").await.body,
        created.body
    );
    // This ERP knows no keys: a second POST books a second credit note.
    let again = post(&sim, "/credit-notes", &[("Idempotency-Key", "x")], credit).await;
    assert_eq!(again.status, 201);
    assert_eq!(sim.credit_notes().len(), 2);

    // Stock adjustments: X-Idempotency-Key, the warehouse from the path.
    let path = "/warehouses/DE-HAM-1/stock-adjustments";
    let posting = r#"{"reference":"ADJ-2025-00018","netValue":-12375.00}"#;
    let key = [(
        "X-Idempotency-Key",
        "inventory-adjustment/ADJ-2025-00018/posting",
    )];
    let first = post(&sim, path, &key, posting).await;
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(raw_field(&first, "documentNumber"), r#""SA-000001""#);
    assert_eq!(raw_field(&first, "warehouse"), r#""DE-HAM-1""#);
    assert_eq!(raw_field(&first, "netValue"), "-12375.00");
    let second = post(&sim, path, &key, posting).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header(REPLAYED_HEADER), Some("true"));
    assert_eq!(sim.stock_adjustments().len(), 1);
    // Idempotency-Key is not this ledger's header.
    post(&sim, path, &[("Idempotency-Key", "k")], posting).await;
    post(&sim, path, &[("Idempotency-Key", "k")], posting).await;
    assert_eq!(sim.stock_adjustments().len(), 3);

    // Invoices found by external reference (the design's findInvoice).
    let invoice = r#"{"externalRef":"inv 4711","netAmount":1.00}"#;
    let created = post(&sim, "/invoices", &[], invoice).await;
    let found = get(&sim, "/invoices?externalRef=inv%204711").await;
    assert_eq!((found.status, found.body), (200, created.body));
    assert_eq!(get(&sim, "/invoices?externalRef=other").await.status, 404);

    for probe in ["/health", "/ping", "/status"] {
        assert_eq!(get(&sim, probe).await.status, 200, "{probe}");
    }
}

#[test]
fn hmac_signatures_match_the_design_formats() {
    // RFC 4231, test case 2.
    assert_eq!(
        sign_hmac_sha256(b"Jefe", b"what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    let body = br#"{"eventId":"evt-88121"}"#;
    assert_eq!(
        sign_timestamped(b"secret", 1_750_000_000, body),
        sign_hmac_sha256(b"secret", br#"1750000000.{"eventId":"evt-88121"}"#)
    );

    let sender = WebhookSender::new(
        "http://127.0.0.1:1/webhooks/finance/shop/orders",
        WebhookSignature::HmacSha256Timestamped {
            header: "X-Shop-Signature".into(),
            timestamp_header: "X-Shop-Timestamp".into(),
            secret: b"secret".to_vec(),
        },
    );
    let headers = sender.headers(body, 1_750_000_000);
    assert!(headers.contains(&("X-Shop-Timestamp".into(), "1750000000".into())));
    assert!(headers.contains(&(
        "X-Shop-Signature".into(),
        sign_timestamped(b"secret", 1_750_000_000, body)
    )));

    let prefixed = WebhookSender::new(
        "http://127.0.0.1:1/x",
        WebhookSignature::HmacSha256 {
            header: "X-Hub-Signature-256".into(),
            secret: b"s".to_vec(),
            prefixed: true,
        },
    );
    let value = format!("sha256={}", sign_hmac_sha256(b"s", body));
    assert!(
        prefixed
            .headers(body, 0)
            .contains(&("X-Hub-Signature-256".into(), value))
    );
}

#[tokio::test]
async fn webhook_sender_posts_signed_bodies() {
    // Any HTTP server records what arrives: the sim's log will do.
    let sim = SimErp::start().await;
    let sender = WebhookSender::new(
        sim.url("/webhooks/finance/wms/shipments"),
        WebhookSignature::HmacSha256 {
            header: "X-Signature".into(),
            secret: b"wms-secret".to_vec(),
            prefixed: false,
        },
    );
    let body = br#"{"eventId":"evt-88121","status":"CONFIRMED"}"#;
    let response = sender.send(body).await.unwrap();
    assert_eq!(response.status, 404);

    let received = &sim.recent_requests()[0];
    assert_eq!(received.method, "POST");
    assert_eq!(received.uri, "/webhooks/finance/wms/shipments");
    assert_eq!(received.body.as_bytes(), body);
    assert_eq!(
        received.header("x-signature"),
        Some(sign_hmac_sha256(b"wms-secret", body).as_str())
    );
    assert_eq!(received.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn the_binary_serves_seeded_orders_and_prints_its_url() {
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("orders.json");
    std::fs::write(
        &orders,
        r#"{"orders": [{"orderId": "4711", "customerId": "C-1001", "currency": "EUR",
                        "lines": [{"sku": "A-100", "qty": 3, "unitPrice": 19.90},
                                  {"sku": "B-7", "qty": 1, "unitPrice": "0.10"}]}],
            "purchaseOrders": []}"#,
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sim-erp"))
        .args(["--listen", "127.0.0.1:0", "--orders"])
        .arg(&orders)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut url = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    let url = url.trim().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url:?}");

    let response = send("GET", &format!("{url}/orders/4711"), &[], "").await;
    child.kill().unwrap();
    child.wait().unwrap();
    let response = response.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        response.text(),
        r#"{"orderId":"4711","customerId":"C-1001","currency":"EUR","lines":[{"sku":"A-100","qty":3,"unitPrice":19.90},{"sku":"B-7","qty":1,"unitPrice":0.10}]}"#
    );
}

#[test]
fn the_binary_refuses_a_bad_seed_file() {
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("orders.json");
    std::fs::write(
        &orders,
        r#"[{"orderId": "1", "customerId": "C", "currency": "EUR",
             "lines": [{"sku": "A", "qty": 1, "unitPrice": "1,5"}]}]"#,
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sim-erp"))
        .args(["--listen", "127.0.0.1:0", "--orders"])
        .arg(&orders)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a decimal number"), "{stderr}");
}
