//! The token bucket, timed against a real server. Its own test binary, so no
//! other test competes for the two cores while it measures.

mod common;

use std::time::{Duration, Instant};

use common::{Reply, rest_spec, serve};
use serde_json::json;
use tallyman_connectors::StaticSecrets;
use tallyman_connectors::rest::{CallRequest, RestClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_calls_at_20_per_second_with_a_burst_of_5() {
    let api = serve(|_| Reply::json(200, "{}")).await;
    let spec = rest_spec(json!({
        "baseUrl": api.url(),
        "rateLimit": {"requestsPerSecond": 20, "burst": 5},
        "actions": {"getOrder": {"method": "GET", "path": "/orders/{orderId}"}},
    }));
    let client = RestClient::new("erp", &spec, &StaticSecrets::new()).unwrap();

    // Clones share one bucket.
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..50 {
        let client = client.clone();
        calls.spawn(async move {
            let req = CallRequest::new("getOrder").param("orderId", i.to_string());
            client.call(&req, &|_, _| {}).await.unwrap();
        });
    }
    calls.join_all().await;
    let elapsed = started.elapsed();

    let expected = Duration::from_secs_f64((50.0 - 5.0) / 20.0);
    assert!(
        elapsed >= expected.mul_f64(0.9) && elapsed <= expected.mul_f64(1.1),
        "50 calls took {elapsed:?}, expected {expected:?} ± 10 %"
    );
    assert_eq!(api.count(), 50);
}
