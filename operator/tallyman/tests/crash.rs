//! Crash tests: real `tallyman worker` processes, a real nats-server, the
//! simulated ERP over HTTP. A process is killed with SIGKILL (or stopped with
//! SIGTERM) mid-run; every instance must still complete, with exactly one
//! invoice per order.

mod support;

use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
use support::*;
use tallyman_testing::erp::SimErp;
use tallyman_testing::nats::NatsServer;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_exits_cleanly_and_the_next_one_finishes() {
    let nats = NatsServer::start();
    let erp = SimErp::start().await;
    // Slow invoices, so the stop comes while many are in flight, and more
    // orders than a few rounds of 64 messages in flight finish, so that
    // some are still waiting when the stop comes even on a busy machine
    // (with 100, a CI run under load once saw all of them done first).
    erp.delay("/invoices", Duration::from_millis(200));
    let n = 300;
    let first = WorkerProcess::start(&nats.url(), &erp.base_url());
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    publish_orders(&js, &erp, n).await;
    wait_invoices(&erp, 10).await;
    let status = first.terminate(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "a graceful stop exits 0: {status}");
    let (completed, _) = statuses(&js, n).await;
    assert!(completed < n, "the stop came too late to test anything");
    assert_eq!(
        erp.invoice_count(),
        completed,
        "what finished before the stop was stored: no invoice without its state"
    );
    let _second = WorkerProcess::start(&nats.url(), &erp.base_url());
    wait_all_completed(&js, n, Duration::from_secs(60)).await;
    assert_one_invoice_per_order(&erp, n);
}

/// A worker that can no longer consume (its consumer deleted by hand)
/// exits with an error, so Kubernetes starts it again, instead of staying
/// ready; started again, it finishes the orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_consumer_is_deleted_exits_and_its_successor_finishes() {
    let nats = NatsServer::start();
    let erp = SimErp::start().await;
    let first = WorkerProcess::start(&nats.url(), &erp.base_url());
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let consumer = format!("wf-{WF}");
    let events = loop {
        if let Ok(stream) = js
            .get_stream(format!("TALLYMAN_{}_EVENTS", NS.to_uppercase()))
            .await
            && stream.consumer_info(&consumer).await.is_ok()
        {
            break stream;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    events.delete_consumer(&consumer).await.expect("deleted");
    let status = first.exit_within(Duration::from_secs(20));
    assert!(!status.success(), "exited with {status}");
    let _second = WorkerProcess::start(&nats.url(), &erp.base_url());
    publish_orders(&js, &erp, 20).await;
    wait_all_completed(&js, 20, Duration::from_secs(60)).await;
    assert_one_invoice_per_order(&erp, 20);
}

/// Timers live in the broker: orders whose shipment never comes, their
/// worker killed with SIGKILL while they wait, time out when due and take
/// their `onTimeout` route on the next worker, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn await_timeouts_fire_after_their_worker_was_killed() {
    let nats = NatsServer::start();
    let erp = SimErp::start().await;
    // The example, waiting 3 s for both events instead of a day.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            if text.contains("kind: Workflow") {
                assert!(text.contains("timeout: 24h"), "the example's await changed");
            }
            let text = text.replace("timeout: 24h", "timeout: 3s");
            std::fs::write(dir.path().join(path.file_name().unwrap()), text).unwrap();
        }
    }
    let n = 50;
    let first = WorkerProcess::start_from(
        worker_command_from(&nats.url(), dir.path()),
        &erp.base_url(),
        &[],
    );
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    publish_events(&js, &erp, n, &["order.created"]).await;
    // Every order waits for its shipment, its timeout scheduled.
    let started = std::time::Instant::now();
    while with_status(&js, n, "Running").await < n {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "orders not stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill();
    let fired = emitted_so_far(&js, "order.unmatched").await;
    assert!(fired < n, "the kill came too late to test anything");
    // Due while no worker runs.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _second = WorkerProcess::start_from(
        worker_command_from(&nats.url(), dir.path()),
        &erp.base_url(),
        &[],
    );
    let unmatched = wait_emitted(&js, "order.unmatched", n, Duration::from_secs(60)).await;
    assert_eq!(unmatched.len(), n, "no timeout fired twice");
    let mut orders: Vec<String> = unmatched
        .iter()
        .map(|e| e["data"]["orderId"].as_str().unwrap().to_string())
        .collect();
    orders.sort();
    orders.dedup();
    assert_eq!(orders.len(), n, "each order timed out once");
    assert_eq!(erp.requests("/orders"), 0, "nothing called");
    assert_eq!(erp.invoice_count(), 0);
}

/// A variance waiting for a person: the worker is killed with SIGKILL,
/// the controller approves while no worker runs, and the next worker
/// resumes each instance and invoices what shipped, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_given_after_their_worker_was_killed_resume_on_the_next() {
    use tallyman_api::v1alpha1::{CaseDecision, Verdict};
    use tallyman_testing::erp::OrderLine;
    let nats = NatsServer::start();
    let erp = SimErp::start().await;
    let n = 10;
    // Ordered 9 x B at 250.00, shipped 5: 1 000.00 short, for a person.
    for i in 0..n {
        let mut order = tallyman_testing::orders::order(i);
        order.lines[1] = OrderLine::new("B", 9, "250.00");
        erp.seed_order(order);
    }
    let first = WorkerProcess::start(&nats.url(), &erp.base_url());
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    publish_events_only(&js, n, &["order.created", "shipment.confirmed"]).await;
    let cases = loop {
        if let Ok(store) = js.get_key_value(format!("tallyman_{NS}_cases")).await {
            break tallyman_worker::cases::KvCases::new(store, NS);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let started = std::time::Instant::now();
    let open = loop {
        let open = cases.list().await.unwrap();
        if open.len() == n {
            break open;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} cases",
            open.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    first.kill();
    assert_eq!(erp.invoice_count(), 0, "nothing invoiced before approval");
    for case in &open {
        let approve = CaseDecision {
            approver: "alice".into(),
            groups: vec!["finance-controllers".into()],
            decision: Verdict::Approve,
            comment: None,
        };
        cases
            .decide(&case.name, approve, chrono::Utc::now())
            .await
            .unwrap();
    }
    let _second = WorkerProcess::start(&nats.url(), &erp.base_url());
    wait_invoices(&erp, n).await;
    // A second copy of one would come within moments.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // What shipped: 2 x 19.99 + 5 x 250.00.
    assert_invoiced_once(&erp, n, "1289.98");
}

/// An ordered consumer of the events of type `ty`, from the first.
async fn events_of(
    js: &jetstream::Context,
    ty: &str,
) -> jetstream::consumer::Consumer<jetstream::consumer::pull::OrderedConfig> {
    js.get_stream(format!("TALLYMAN_{}_EVENTS", NS.to_uppercase()))
        .await
        .unwrap()
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("tallyman.{NS}.events.{ty}"),
            ..Default::default()
        })
        .await
        .unwrap()
}

/// How many events of type `ty` the events stream holds.
async fn emitted_so_far(js: &jetstream::Context, ty: &str) -> usize {
    events_of(js, ty).await.cached_info().num_pending as usize
}

/// The events of type `ty` on the events stream once there are at least
/// `n` (and a second more for any copy), waiting up to `limit`.
async fn wait_emitted(
    js: &jetstream::Context,
    ty: &str,
    n: usize,
    limit: Duration,
) -> Vec<serde_json::Value> {
    let started = std::time::Instant::now();
    loop {
        let pending = emitted_so_far(js, ty).await;
        if pending >= n {
            break;
        }
        assert!(
            started.elapsed() < limit,
            "{pending} of {n} {ty} events after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A second copy of one would arrive within moments.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let consumer = events_of(js, ty).await;
    let all = consumer.cached_info().num_pending as usize;
    let mut messages = consumer.messages().await.unwrap().take(all);
    let mut events = Vec::new();
    while let Some(msg) = messages.next().await {
        events.push(serde_json::from_slice(&msg.unwrap().payload).unwrap());
    }
    events
}
