//! Crash tests: real `tallyman worker` processes, a real nats-server, the
//! simulated ERP over HTTP. A process is killed with SIGKILL (or stopped with
//! SIGTERM) mid-run; every instance must still complete, with exactly one
//! invoice per order.

mod support;

use std::time::Duration;

use async_nats::jetstream;
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
