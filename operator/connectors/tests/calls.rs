//! Request shaping, retries and the probe, against real local servers.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Reply, Retries, closed_port, rest_spec, serve};
use serde_json::json;
use tallyman_connectors::StaticSecrets;
use tallyman_connectors::rest::{CallError, CallRequest, RestClient};

fn erp(base: &str, retry: serde_json::Value) -> RestClient {
    let spec = rest_spec(json!({
        "baseUrl": base,
        "timeout": "2s",
        "retry": retry,
        "actions": {
            "getOrder": {"method": "GET", "path": "/orders/{orderId}"},
            "getLines": {"method": "GET", "path": "/orders/{orderId}/lines?sku={sku}&page=1"},
            "createInvoice": {"method": "POST", "path": "/invoices", "idempotency": {"header": "Idempotency-Key"}},
        },
    }));
    RestClient::new("erp", &spec, &StaticSecrets::new()).unwrap()
}

fn fast_retries(max_attempts: u32) -> serde_json::Value {
    json!({"maxAttempts": max_attempts, "initialBackoff": "10ms", "maxBackoff": "50ms"})
}

/// Answers the listed statuses in turn, then 200.
fn statuses(list: &'static [u16]) -> impl Fn(&common::Recorded) -> Reply + Send + Sync + 'static {
    let n = AtomicUsize::new(0);
    move |_| match list.get(n.fetch_add(1, Ordering::SeqCst)) {
        Some(&s) => Reply::status(s),
        None => Reply::json(200, r#"{"id":"INV-1"}"#),
    }
}

#[tokio::test]
async fn post_sends_json_the_idempotency_key_and_our_headers() {
    let api = serve(|_| {
        Reply::json(201, r#"{"id":"INV-1","total":1250.10}"#)
            .header("location", "/invoices/INV-1")
            .header("set-cookie", "s=1")
            .header("x-request-id", "req-9")
    })
    .await;
    let client = erp(&format!("{}/api/v2/", api.url()), fast_retries(1));

    let req = CallRequest::new("createInvoice")
        .body(r#"{"orderId":"4711","amount":1250.10}"#)
        .idempotency_key("shipment-to-invoice/4711/createInvoice");
    let resp = client.call(&req, &|_, _| {}).await.unwrap();

    // The body comes back as sent by the server, digit for digit.
    assert_eq!(resp.status, 201);
    assert_eq!(resp.body, r#"{"id":"INV-1","total":1250.10}"#);
    assert_eq!(resp.attempts, 1);
    let kept: Vec<_> = resp.headers.keys().map(String::as_str).collect();
    assert_eq!(kept, ["content-type", "location", "x-request-id"]);
    assert_eq!(resp.headers["location"], "/invoices/INV-1");

    let seen = &api.requests()[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, "/api/v2/invoices");
    assert_eq!(seen.body, r#"{"orderId":"4711","amount":1250.10}"#);
    assert_eq!(
        seen.header("idempotency-key"),
        Some("shipment-to-invoice/4711/createInvoice")
    );
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("accept"), Some("application/json"));
    assert_eq!(
        seen.header("user-agent"),
        Some(concat!("tallyman/", env!("CARGO_PKG_VERSION")))
    );
}

#[tokio::test]
async fn get_sends_no_content_type_and_no_idempotency_header_without_a_key() {
    let api = serve(|_| Reply::json(200, "{}")).await;
    let client = erp(&api.url(), fast_retries(1));
    client
        .call(
            &CallRequest::new("getOrder").param("orderId", "4711"),
            &|_, _| {},
        )
        .await
        .unwrap();
    client
        .call(&CallRequest::new("createInvoice").body("{}"), &|_, _| {})
        .await
        .unwrap();

    let seen = api.requests();
    assert_eq!(seen[0].target, "/orders/4711");
    assert_eq!(seen[0].header("content-type"), None);
    assert_eq!(seen[1].header("idempotency-key"), None);
}

#[tokio::test]
async fn path_params_are_percent_encoded() {
    let api = serve(|_| Reply::json(200, "[]")).await;
    let client = erp(&api.url(), fast_retries(1));
    let req = CallRequest::new("getLines")
        .param("orderId", "A/B 1?x")
        .param("sku", "x&y=z#ü");
    client.call(&req, &|_, _| {}).await.unwrap();
    assert_eq!(
        api.requests()[0].target,
        "/orders/A%2FB%201%3Fx/lines?sku=x%26y%3Dz%23%C3%BC&page=1"
    );
}

#[tokio::test]
async fn invalid_calls_are_refused_before_sending() {
    let api = serve(|_| Reply::json(200, "{}")).await;
    let client = erp(&api.url(), fast_retries(3));
    let cases = [
        (
            CallRequest::new("deleteEverything"),
            r#"unknown action "deleteEverything""#,
        ),
        (
            CallRequest::new("getOrder"),
            r#"action "getOrder": missing param "orderId""#,
        ),
        (
            CallRequest::new("getOrder").param("orderId", ".."),
            r#"action "getOrder": param "orderId" must not be empty, "." or ".." in a path"#,
        ),
    ];
    for (req, expected) in cases {
        assert_eq!(
            client.call(&req, &|_, _| {}).await,
            Err(CallError::Invalid(expected.into()))
        );
    }
    let bad_key = CallRequest::new("createInvoice").idempotency_key("a\nb");
    assert!(matches!(
        client.call(&bad_key, &|_, _| {}).await,
        Err(CallError::Invalid(_))
    ));
    assert_eq!(api.count(), 0);
}

#[tokio::test]
async fn a_503_then_200_succeeds_on_the_second_attempt() {
    let api = serve(statuses(&[503])).await;
    let client = erp(&api.url(), fast_retries(5));
    let retries = Retries::default();

    let resp = client
        .call(
            &CallRequest::new("createInvoice").body("{}"),
            &retries.hook(),
        )
        .await
        .unwrap();
    assert_eq!((resp.status, resp.attempts), (200, 2));
    assert_eq!(api.count(), 2);
    let seen = retries.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, 2);
    assert!(seen[0].1 <= Duration::from_millis(10));
}

#[tokio::test]
async fn a_429_with_retry_after_waits_at_least_that_long() {
    let n = AtomicUsize::new(0);
    let api = serve(move |_| {
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::status(429).header("retry-after", "1")
        } else {
            Reply::json(200, "{}")
        }
    })
    .await;
    let client = erp(&api.url(), fast_retries(3));
    let retries = Retries::default();

    let started = Instant::now();
    let resp = client
        .call(&CallRequest::new("createInvoice"), &retries.hook())
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(resp.attempts, 2);
    assert_eq!(retries.seen()[0].1, Duration::from_secs(1));
}

#[tokio::test]
async fn a_400_is_rejected_after_one_attempt() {
    let api = serve(|_| Reply::json(400, r#"{"error":"unknown customer"}"#)).await;
    let client = erp(&api.url(), fast_retries(5));
    let retries = Retries::default();

    let err = client
        .call(&CallRequest::new("createInvoice"), &retries.hook())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CallError::Rejected {
            status: 400,
            body: r#"{"error":"unknown customer"}"#.into(),
            attempts: 1,
        }
    );
    assert_eq!(api.count(), 1);
    assert!(retries.seen().is_empty());
}

#[tokio::test]
async fn a_redirect_is_rejected_not_taken_for_an_answer() {
    let api = serve(|_| Reply::status(302)).await;
    let client = erp(&api.url(), fast_retries(5));
    let err = client
        .call(&CallRequest::new("createInvoice"), &|_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Rejected {
                status: 302,
                attempts: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(api.count(), 1);
}

#[tokio::test]
async fn request_timeout_and_throttling_are_retried_other_4xx_are_not() {
    let api = serve(statuses(&[408, 429, 502])).await;
    let client = erp(&api.url(), fast_retries(5));
    let resp = client
        .call(&CallRequest::new("createInvoice"), &|_, _| {})
        .await
        .unwrap();
    assert_eq!(resp.attempts, 4);

    let api = serve(statuses(&[409])).await;
    let client = erp(&api.url(), fast_retries(5));
    let err = client
        .call(&CallRequest::new("createInvoice"), &|_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        CallError::Rejected {
            status: 409,
            attempts: 1,
            ..
        }
    ));
}

/// A 409 to a request with an idempotency key says its first request is
/// still in progress: tried again, the answer is the booking it made.
#[tokio::test]
async fn a_409_to_a_keyed_request_is_retried_for_its_answer() {
    let api = serve(statuses(&[409, 409])).await;
    let client = erp(&api.url(), fast_retries(5));
    let keyed = CallRequest::new("createInvoice").idempotency_key("finance/s2i/4711/invoice");
    let resp = client.call(&keyed, &|_, _| {}).await.unwrap();
    assert_eq!((resp.status, resp.attempts), (200, 3));
    assert_eq!(resp.body, r#"{"id":"INV-1"}"#);
    // Never anything but 409: a conflict, not a request in progress. The
    // call fails as refused, with the system's reason.
    let why = r#"{"error":"invoice INV-7 already booked for this order"}"#;
    let api = serve(move |_| Reply::json(409, why)).await;
    let client = erp(&api.url(), fast_retries(3));
    let err = client.call(&keyed, &|_, _| {}).await.unwrap_err();
    assert_eq!(
        err,
        CallError::Rejected {
            status: 409,
            body: why.into(),
            attempts: 3,
        }
    );
    assert_eq!(api.count(), 3, "every attempt was made");
}

#[tokio::test]
async fn persistent_5xx_exhausts_the_attempts() {
    let api = serve(|_| Reply::status(500)).await;
    let client = erp(&api.url(), fast_retries(3));
    let retries = Retries::default();
    let err = client
        .call(&CallRequest::new("createInvoice"), &retries.hook())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CallError::Exhausted {
            attempts: 3,
            last: "HTTP 500".into()
        }
    );
    assert_eq!(api.count(), 3);
    let attempts: Vec<_> = retries.seen().iter().map(|(a, _)| *a).collect();
    assert_eq!(attempts, [2, 3]);
}

#[tokio::test]
async fn connection_refused_exhausts_max_attempts() {
    let addr = closed_port().await;
    let client = erp(&format!("http://{addr}"), fast_retries(4));
    let retries = Retries::default();
    let err = client
        .call(&CallRequest::new("createInvoice"), &retries.hook())
        .await
        .unwrap_err();
    let CallError::Exhausted { attempts, last } = err else {
        panic!("{err:?}");
    };
    assert_eq!(attempts, 4);
    assert!(last.to_lowercase().contains("connect"), "{last}");
    assert_eq!(retries.seen().len(), 3);
}

#[tokio::test]
async fn a_timed_out_attempt_is_retried() {
    let n = AtomicUsize::new(0);
    let api = serve(move |_| {
        let reply = Reply::json(200, "{}");
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            reply.after(Duration::from_secs(5))
        } else {
            reply
        }
    })
    .await;
    let spec = rest_spec(json!({
        "baseUrl": api.url(),
        "timeout": "200ms",
        "retry": fast_retries(3),
        "actions": {"getOrder": {"method": "GET", "path": "/orders/{orderId}"}},
    }));
    let client = RestClient::new("erp", &spec, &StaticSecrets::new()).unwrap();
    let started = Instant::now();
    let resp = client
        .call(
            &CallRequest::new("getOrder").param("orderId", "1"),
            &|_, _| {},
        )
        .await
        .unwrap();
    assert_eq!(resp.attempts, 2);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn probe_reports_reachable_below_500() {
    let api = serve(|r| {
        if r.target == "/api/health" {
            Reply::status(404)
        } else {
            Reply::status(503)
        }
    })
    .await;
    let spec = |path: &str| {
        rest_spec(json!({
            "baseUrl": format!("{}/api", api.url()),
            "probe": {"path": path},
            "actions": {"getOrder": {"method": "GET", "path": "/orders/{orderId}"}},
        }))
    };
    let client = RestClient::new("erp", &spec("/health"), &StaticSecrets::new()).unwrap();
    assert_eq!(client.probe().await, Ok(404));
    let client = RestClient::new("erp", &spec("/down"), &StaticSecrets::new()).unwrap();
    assert_eq!(
        client.probe().await,
        Err(CallError::Exhausted {
            attempts: 1,
            last: "HTTP 503".into()
        })
    );

    let addr = closed_port().await;
    let spec = rest_spec(json!({
        "baseUrl": format!("http://{addr}"),
        "actions": {"getOrder": {"method": "GET", "path": "/orders/{orderId}"}},
    }));
    let client = RestClient::new("erp", &spec, &StaticSecrets::new()).unwrap();
    assert!(matches!(
        client.probe().await,
        Err(CallError::Exhausted { attempts: 1, .. })
    ));
}

#[tokio::test]
async fn bad_specs_fail_the_build() {
    let build = |json: serde_json::Value| {
        RestClient::new("erp", &rest_spec(json), &StaticSecrets::new())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        build(json!({"baseUrl": "ftp://x", "actions": {"a": {"method": "GET", "path": "/"}}})),
        r#"invalid baseUrl "ftp://x": must be an http:// or https:// URL with a host and no query"#
    );
    assert_eq!(
        build(
            json!({"baseUrl": "http://x", "actions": {"a": {"method": "GET", "path": "/o/{id"}}})
        ),
        r#"invalid action "a": unclosed '{' in path "/o/{id""#
    );
    assert_eq!(
        build(
            json!({"baseUrl": "http://x", "actions": {"a": {"method": "GET", "path": "/", "idempotency": {"header": "Bad Header"}}}})
        ),
        r#"invalid action "a": idempotency header: invalid HTTP header name"#
    );
}

#[tokio::test]
async fn an_oversized_body_is_refused_without_retrying() {
    let huge = "x".repeat(tallyman_connectors::rest::MAX_BODY_BYTES + 1);
    let api = serve(move |_| Reply::json(200, &huge)).await;
    let client = erp(&api.url(), fast_retries(3));
    let err = client
        .call(&CallRequest::new("createInvoice"), &|_, _| {})
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CallError::Exhausted {
            attempts: 1,
            last: "response body larger than 16777216 bytes".into()
        }
    );
    assert_eq!(api.count(), 1);
}
