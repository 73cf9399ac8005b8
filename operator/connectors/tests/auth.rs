//! Every auth scheme against a server that checks it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{Recorded, Reply, rest_spec, serve};
use serde_json::json;
use tallyman_connectors::StaticSecrets;
use tallyman_connectors::rest::{CallError, CallRequest, RestClient};

fn get_order() -> CallRequest {
    CallRequest::new("getOrder").param("orderId", "4711")
}

fn ok_when(
    check: impl Fn(&Recorded) -> bool + Send + Sync + 'static,
) -> impl Fn(&Recorded) -> Reply + Send + Sync + 'static {
    move |r| {
        if check(r) {
            Reply::json(200, r#"{"ok":true}"#)
        } else {
            Reply::status(401)
        }
    }
}

fn spec_with_auth(base: &str, auth: serde_json::Value) -> tallyman_api::v1alpha1::RestSpec {
    rest_spec(json!({
        "baseUrl": base,
        "auth": auth,
        "retry": {"maxAttempts": 1},
        "actions": {"getOrder": {"method": "GET", "path": "/orders/{orderId}"}},
    }))
}

#[tokio::test]
async fn bearer_token_from_a_secret() {
    let api = serve(ok_when(|r| {
        r.header("authorization") == Some("Bearer t0k3n")
    }))
    .await;
    // Files written by `kubectl create secret --from-file` end in a newline.
    let secrets = StaticSecrets::new().with("erp-token", "token", "t0k3n\n");
    let spec = spec_with_auth(
        &api.url(),
        json!({"bearer": {"secretRef": {"name": "erp-token", "key": "token"}}}),
    );
    let client = RestClient::new("erp", &spec, &secrets).unwrap();

    let resp = client.call(&get_order(), &|_, _| {}).await.unwrap();
    assert_eq!(resp.status, 200);

    let wrong = StaticSecrets::new().with("erp-token", "token", "other");
    let client = RestClient::new("erp", &spec, &wrong).unwrap();
    let err = client.call(&get_order(), &|_, _| {}).await.unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Rejected {
                status: 401,
                attempts: 1,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn basic_credentials_from_two_secret_keys() {
    let expected = format!("Basic {}", BASE64.encode("svc-tallyman:pa:ss w0rd"));
    let api = serve(ok_when(move |r| {
        r.header("authorization") == Some(expected.as_str())
    }))
    .await;
    let secrets = StaticSecrets::new()
        .with("erp-basic", "username", "svc-tallyman")
        .with("erp-basic", "password", "pa:ss w0rd");
    let spec = spec_with_auth(
        &api.url(),
        json!({"basic": {
            "username": {"name": "erp-basic", "key": "username"},
            "password": {"name": "erp-basic", "key": "password"},
        }}),
    );
    let client = RestClient::new("erp", &spec, &secrets).unwrap();
    assert_eq!(
        client.call(&get_order(), &|_, _| {}).await.unwrap().status,
        200
    );
}

#[tokio::test]
async fn api_key_in_a_header_of_our_choice() {
    let api = serve(ok_when(|r| {
        r.header("x-api-key") == Some("k-123") && r.header("authorization").is_none()
    }))
    .await;
    let secrets = StaticSecrets::new().with("wms", "apiKey", "k-123");
    let spec = spec_with_auth(
        &api.url(),
        json!({"apiKey": {"header": "X-API-Key", "secretRef": {"name": "wms", "key": "apiKey"}}}),
    );
    let client = RestClient::new("wms", &spec, &secrets).unwrap();
    assert_eq!(
        client.call(&get_order(), &|_, _| {}).await.unwrap().status,
        200
    );
}

#[tokio::test]
async fn a_missing_secret_fails_the_build_without_leaking_values() {
    let secrets = StaticSecrets::new().with("erp-token", "other", "t0k3n");
    let spec = spec_with_auth(
        "http://127.0.0.1:1",
        json!({"bearer": {"secretRef": {"name": "erp-token", "key": "token"}}}),
    );
    let err = RestClient::new("erp", &spec, &secrets).unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert_eq!(
        chain,
        r#"failed to read a credential: secret "erp-token" has no key "token""#
    );
}

/// A token endpoint that checks the client and the form, and hands out
/// `token-1`, `token-2`, ... with the given lifetime.
fn token_endpoint(expires_in: u64) -> impl Fn(&Recorded) -> Reply + Send + Sync + 'static {
    let issued = AtomicUsize::new(0);
    let client = format!("Basic {}", BASE64.encode("tallyman:s3cr%2Ft"));
    move |r| {
        let form_ok = r.body
            == "grant_type=client_credentials&scope=invoices%3Awrite+orders%3Aread&audience=https%3A%2F%2Ferp"
            && r.header("content-type") == Some("application/x-www-form-urlencoded");
        if r.method != "POST"
            || r.target != "/oauth/token"
            || r.header("authorization") != Some(client.as_str())
            || !form_ok
        {
            return Reply::json(401, r#"{"error":"invalid_client"}"#);
        }
        let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
        Reply::json(
            200,
            &format!(
                r#"{{"access_token":"token-{n}","token_type":"Bearer","expires_in":{expires_in}}}"#
            ),
        )
    }
}

fn oauth2_spec(api: &str, idp: &str) -> tallyman_api::v1alpha1::RestSpec {
    spec_with_auth(
        api,
        json!({"oauth2ClientCredentials": {
            "tokenUrl": format!("{idp}/oauth/token"),
            "clientId": {"name": "erp-oauth", "key": "clientId"},
            "clientSecret": {"name": "erp-oauth", "key": "clientSecret"},
            "scopes": ["invoices:write", "orders:read"],
            "audience": "https://erp",
        }}),
    )
}

fn oauth2_secrets() -> StaticSecrets {
    StaticSecrets::new()
        .with("erp-oauth", "clientId", "tallyman")
        .with("erp-oauth", "clientSecret", "s3cr/t")
}

/// The API accepts the tokens in `valid`.
fn api_accepting(
    valid: Arc<std::sync::Mutex<Vec<String>>>,
) -> impl Fn(&Recorded) -> Reply + Send + Sync + 'static {
    move |r| {
        let ok = r
            .header("authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
            .is_some_and(|t| valid.lock().unwrap().iter().any(|v| v == t));
        if ok {
            Reply::json(200, "{}")
        } else {
            Reply::status(401)
        }
    }
}

fn tokens(list: &[&str]) -> Arc<std::sync::Mutex<Vec<String>>> {
    Arc::new(std::sync::Mutex::new(
        list.iter().map(|s| s.to_string()).collect(),
    ))
}

#[tokio::test]
async fn oauth2_token_is_fetched_once_for_a_burst_of_calls() {
    let idp = serve(token_endpoint(3600)).await;
    let api = serve(api_accepting(tokens(&["token-1"]))).await;
    let client = RestClient::new(
        "erp",
        &oauth2_spec(&api.url(), &idp.url()),
        &oauth2_secrets(),
    )
    .unwrap();

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let client = client.clone();
        calls.spawn(async move { client.call(&get_order(), &|_, _| {}).await });
    }
    while let Some(result) = calls.join_next().await {
        assert_eq!(result.unwrap().unwrap().status, 200);
    }
    for _ in 0..5 {
        client.call(&get_order(), &|_, _| {}).await.unwrap();
    }
    assert_eq!(idp.count(), 1);
    assert_eq!(api.count(), 25);
}

#[tokio::test]
async fn oauth2_token_is_refreshed_after_it_expires() {
    let idp = serve(token_endpoint(1)).await;
    let api = serve(api_accepting(tokens(&["token-1", "token-2"]))).await;
    let client = RestClient::new(
        "erp",
        &oauth2_spec(&api.url(), &idp.url()),
        &oauth2_secrets(),
    )
    .unwrap();

    client.call(&get_order(), &|_, _| {}).await.unwrap();
    client.call(&get_order(), &|_, _| {}).await.unwrap();
    assert_eq!(idp.count(), 1);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    client.call(&get_order(), &|_, _| {}).await.unwrap();
    assert_eq!(idp.count(), 2);
    assert_eq!(
        api.requests()[2].header("authorization"),
        Some("Bearer token-2")
    );
}

#[tokio::test]
async fn oauth2_token_is_refetched_once_after_a_401() {
    let idp = serve(token_endpoint(3600)).await;
    let valid = tokens(&["token-1"]);
    let api = serve(api_accepting(valid.clone())).await;
    let client = RestClient::new(
        "erp",
        &oauth2_spec(&api.url(), &idp.url()),
        &oauth2_secrets(),
    )
    .unwrap();
    client.call(&get_order(), &|_, _| {}).await.unwrap();

    // The provider revokes token-1 before it expires.
    *valid.lock().unwrap() = vec!["token-2".into()];
    let resp = client.call(&get_order(), &|_, _| {}).await.unwrap();
    assert_eq!(resp.attempts, 2);
    assert_eq!(idp.count(), 2);

    // An API that refuses every token gets one fresh token, not a loop.
    valid.lock().unwrap().clear();
    let err = client.call(&get_order(), &|_, _| {}).await.unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Rejected {
                status: 401,
                attempts: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(idp.count(), 3);
}

#[tokio::test]
async fn callers_behind_a_failing_token_fetch_share_its_answer() {
    // A token endpoint that takes 300 ms to say it is unavailable.
    let idp = serve(|_| Reply::status(503).after(Duration::from_millis(300))).await;
    let api = serve(|_| Reply::json(200, "{}")).await;
    let client = RestClient::new(
        "erp",
        &oauth2_spec(&api.url(), &idp.url()),
        &oauth2_secrets(),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let client = client.clone();
        calls.spawn(async move { client.call(&get_order(), &|_, _| {}).await });
    }
    while let Some(result) = calls.join_next().await {
        assert!(result.unwrap().is_err());
    }
    // One fetch answered all eight, instead of eight fetches in turn.
    assert_eq!(idp.count(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(api.count(), 0);

    // After the cool-down the next caller asks again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(client.call(&get_order(), &|_, _| {}).await.is_err());
    assert_eq!(idp.count(), 2);
}

#[tokio::test]
async fn a_refusing_token_endpoint_is_an_auth_error_without_calling_the_api() {
    let idp = serve(token_endpoint(3600)).await;
    let api = serve(|_| Reply::json(200, "{}")).await;
    let secrets = oauth2_secrets().with("erp-oauth", "clientSecret", "wrong");
    let client = RestClient::new("erp", &oauth2_spec(&api.url(), &idp.url()), &secrets).unwrap();

    let err = client.call(&get_order(), &|_, _| {}).await.unwrap_err();
    assert_eq!(
        err,
        CallError::Auth("token endpoint answered HTTP 401 (invalid_client)".into())
    );
    assert_eq!(api.count(), 0);
}

/// Calls that wait for a token being fetched still go out at the rate
/// limit's pace once it comes: the token is taken before the wait for a
/// slot, so the calls do not hold slots while the token endpoint is slow
/// and then all go at once.
#[tokio::test]
async fn calls_behind_a_slow_token_fetch_keep_the_rate_limit() {
    let slow = token_endpoint(3600);
    let idp = serve(move |r| slow(r).after(Duration::from_millis(1500))).await;
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let times = sent.clone();
    let accept = api_accepting(tokens(&["token-1"]));
    let api = serve(move |r| {
        times.lock().unwrap().push(std::time::Instant::now());
        accept(r)
    })
    .await;
    let mut spec = oauth2_spec(&api.url(), &idp.url());
    spec.rate_limit = serde_json::from_value(json!({"requestsPerSecond": 2, "burst": 1})).unwrap();
    let client = RestClient::new("erp", &spec, &oauth2_secrets()).unwrap();

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let client = client.clone();
        calls.spawn(async move { client.call(&get_order(), &|_, _| {}).await });
    }
    while let Some(result) = calls.join_next().await {
        assert_eq!(result.unwrap().unwrap().status, 200);
    }
    let sent = sent.lock().unwrap();
    assert_eq!(sent.len(), 4);
    for pair in sent.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(400),
            "two calls {gap:?} apart at 2/s"
        );
    }
}
