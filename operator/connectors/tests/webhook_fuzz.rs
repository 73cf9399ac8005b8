//! Property tests for the webhook path: signature verification and the CEL
//! mappings never panic, whatever the headers and the body, and answer
//! only the statuses a sender can act on.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use chrono::{DateTime, Utc};
use proptest::prelude::*;
use serde_json::json;
use tallyman_api::v1alpha1::ConnectorSpec;
use tallyman_connectors::StaticSecrets;
use tallyman_connectors::webhook::{Route, Routes};
use tallyman_testing::erp::{sign_hmac_sha256, sign_timestamped};

const SECRET: &[u8] = b"fuzz-secret";
const NOW: i64 = 1_780_000_000;

/// A mapping that reaches into the payload in many ways: nested fields,
/// lists, comprehensions, decimals, `has`, headers, string functions.
const DATA: &str = r#"{
  "orderId": payload.order.number,
  "total": decimal(payload.order.total) * 2,
  "lines": payload.items.filter(i, i.qty > 0).map(i, {"sku": i.sku.lowerAscii(), "qty": i.qty, "value": i.qty * i.price}),
  "sum": payload.items.map(i, i.price).sum(),
  "carrier": has(payload.carrier) ? payload.carrier : "unknown",
  "agent": "user-agent" in headers ? headers["user-agent"] : "",
  "at": now
}"#;

fn routes() -> Routes {
    let events = json!([
        {"type": "order.created", "when": "payload.kind == 'order' && size(payload.items) > 0",
         "id": "payload.id", "data": DATA},
        {"type": "order.any", "data": "payload"},
        {"type": "order.keyed", "when": "has(payload.key)", "id": "payload.key"}
    ]);
    let spec = |signature: serde_json::Value| -> ConnectorSpec {
        serde_json::from_value(json!({
            "system": "other",
            "webhook": {"path": "/in", "signature": signature, "events": events}
        }))
        .unwrap()
    };
    let secret_ref = json!({"name": "hook", "key": "secret"});
    let connectors = vec![
        (
            "hmac".to_string(),
            spec(json!({"scheme": "hmac-sha256", "header": "X-Sig", "secretRef": secret_ref})),
        ),
        (
            "ts".to_string(),
            spec(
                json!({"scheme": "hmac-sha256-timestamped", "header": "X-Sig",
                        "timestampHeader": "X-Ts", "secretRef": secret_ref}),
            ),
        ),
        (
            "token".to_string(),
            spec(json!({"scheme": "token", "header": "X-Sig", "secretRef": secret_ref})),
        ),
        ("open".to_string(), spec(json!({"scheme": "none"}))),
    ];
    Routes::new(
        "fuzz",
        &connectors,
        &StaticSecrets::new().with("hook", "secret", SECRET),
    )
    .unwrap()
}

fn route<'a>(routes: &'a Routes, name: &str) -> &'a Route {
    routes.get(&format!("/webhooks/fuzz/{name}/in")).unwrap()
}

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(NOW, 0).unwrap()
}

/// JSON text shaped like the mapping expects, with values of every type in
/// every place (so field access, arithmetic and comprehensions all meet
/// the wrong types too).
fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<u64>().prop_map(|u| u.to_string()),
        "-?[0-9]{1,30}\\.[0-9]{1,30}",
        "-?[0-9]\\.[0-9]{1,5}[eE][+-]?[0-9]{1,3}",
        "[a-zA-Z0-9 .,'\\\\-]{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    let value = leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("sku".to_string()),
                        Just("qty".to_string()),
                        Just("price".to_string()),
                        Just("number".to_string()),
                        Just("total".to_string()),
                        "[a-z]{1,6}"
                    ],
                    inner
                ),
                0..5
            )
            .prop_map(|kv| {
                let fields: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| format!("{}:{v}", serde_json::to_string(&k).unwrap()))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    });
    (
        prop_oneof![Just("\"order\"".to_string()), value.clone()],
        value.clone(),
        value.clone(),
        value.clone(),
        prop::option::of(value),
    )
        .prop_map(|(kind, id, order, items, key)| {
            let key = key.map(|k| format!(",\"key\":{k}")).unwrap_or_default();
            format!(r#"{{"kind":{kind},"id":{id},"order":{order},"items":{items}{key}}}"#)
        })
}

/// A body: shaped JSON, arbitrary bytes, or shaped JSON with a byte changed.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => json_text().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => (json_text(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(t, i, b)| {
            let mut bytes = t.into_bytes();
            let at = i.index(bytes.len());
            bytes[at] = b;
            bytes
        }),
    ]
}

/// Arbitrary headers, the scheme's own among them.
fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let name = prop_oneof![
        Just("x-sig".to_string()),
        Just("x-ts".to_string()),
        Just("user-agent".to_string()),
        "[a-z][a-z0-9-]{0,12}"
    ];
    let value = prop_oneof![
        "sha256=[0-9a-f]{0,70}".prop_map(String::into_bytes),
        "[0-9]{0,14}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..80),
    ];
    prop::collection::vec((name, value), 0..6)
}

fn header_map(pairs: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        // Only what HTTP can carry reaches the gateway.
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            map.append(k, v);
        }
    }
    map
}

fn check(route: &Route, headers: &HeaderMap, body: &[u8], signed: bool) {
    match route.process(headers, body, now()) {
        Ok(events) => {
            for e in events {
                let event: serde_json::Value =
                    serde_json::from_slice(&e.payload).expect("a canonical event is JSON");
                assert_eq!(event["id"], e.id.as_str());
                assert!(!e.id.is_empty() && !e.id.chars().any(char::is_control));
            }
        }
        Err(r) => {
            let status = r.status().as_u16();
            if signed {
                assert!(matches!(status, 400 | 422), "{status} {}", r.detail());
            } else {
                assert!(matches!(status, 400 | 401 | 422), "{status} {}", r.detail());
            }
        }
    }
}

/// The generators' shape does reach the mapping: a well-formed body maps.
#[test]
fn a_well_formed_body_maps_through_every_event() {
    let routes = routes();
    let body = br#"{"kind":"order","id":"o-1","key":7,"order":{"number":"4711","total":"10.05"},
        "items":[{"sku":"AB","qty":2,"price":1.10},{"sku":"C","qty":0,"price":3}]}"#;
    let mut headers = HeaderMap::new();
    headers.insert("x-sig", HeaderValue::from_bytes(SECRET).unwrap());
    headers.insert("user-agent", HeaderValue::from_static("wms/1"));
    let events = route(&routes, "token")
        .process(&headers, body, now())
        .unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["order.created", "order.any", "order.keyed"]);
    let text = String::from_utf8(events[0].payload.to_vec()).unwrap();
    assert!(
        text.ends_with(r#""data":{"agent":"wms/1","at":"2026-05-28T20:26:40+00:00","carrier":"unknown","lines":[{"qty":2,"sku":"ab","value":2.20}],"orderId":"4711","sum":4.10,"total":20.10}}"#),
        "{text}"
    );
    assert_eq!(events[2].id, "7");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Unsigned or wrongly signed input of any shape: refused or mapped,
    /// never a panic.
    #[test]
    fn arbitrary_headers_and_bodies_never_panic(headers in headers(), body in body()) {
        let routes = routes();
        let headers = header_map(&headers);
        for name in ["hmac", "ts", "token", "open"] {
            check(route(&routes, name), &headers, &body, name == "open");
        }
    }

    /// Correctly signed input reaches the parser and every mapping: 2xx,
    /// 400 or 422, never 401, never a panic.
    #[test]
    fn signed_bodies_reach_the_mappings_without_panicking(body in body(), extra in headers()) {
        let routes = routes();
        let mut headers = header_map(&extra);
        headers.remove("x-sig");
        headers.remove("x-ts");
        let mut hmac = headers.clone();
        hmac.insert("x-sig", HeaderValue::from_str(&sign_hmac_sha256(SECRET, &body)).unwrap());
        check(route(&routes, "hmac"), &hmac, &body, true);

        let mut ts = headers.clone();
        ts.insert("x-ts", HeaderValue::from(NOW));
        ts.insert("x-sig", HeaderValue::from_str(&sign_timestamped(SECRET, NOW as u64, &body)).unwrap());
        check(route(&routes, "ts"), &ts, &body, true);

        let mut token = headers;
        token.insert("x-sig", HeaderValue::from_bytes(SECRET).unwrap());
        check(route(&routes, "token"), &token, &body, true);
    }

    /// A signature holds for exactly the body it was made for.
    #[test]
    fn any_changed_byte_breaks_the_signature(
        body in prop::collection::vec(any::<u8>(), 1..512),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let routes = routes();
        let route = route(&routes, "hmac");
        let mut headers = HeaderMap::new();
        headers.insert("x-sig", HeaderValue::from_str(&sign_hmac_sha256(SECRET, &body)).unwrap());
        let mut changed = body.clone();
        let i = at.index(changed.len());
        changed[i] ^= flip;
        let r = route.process(&headers, &changed, now()).unwrap_err();
        prop_assert_eq!(r.status().as_u16(), 401);
        prop_assert_eq!(r.code(), "bad_signature");
    }
}
