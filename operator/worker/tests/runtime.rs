//! The worker against a real nats-server and the simulated ERP over HTTP.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;
use tallyman_api::v1alpha1::{CaseDecision, CaseState, Verdict};
use tallyman_core::audit;
use tallyman_core::engine::{Outbound, Status};

const NS: &str = "finance";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_become_exactly_one_invoice_each_despite_duplicates_and_disorder() {
    let env = env("shipment-to-invoice").await;
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    let n = 40;
    for i in 0..n {
        let order = format!("ORD-{i}");
        seed_order(&env.erp, &order, 5, "0.10");
        let (first, second) = if i % 2 == 0 {
            (
                ("order.created", order_data(&order)),
                ("shipment.confirmed", shipment_data(&order, 5)),
            )
        } else {
            (
                ("shipment.confirmed", shipment_data(&order, 5)),
                ("order.created", order_data(&order)),
            )
        };
        publish(&js, NS, first.0, &format!("{}-{i}", first.0), &first.1).await;
        publish(&js, NS, second.0, &format!("{}-{i}", second.0), &second.1).await;
        if i % 5 == 0 {
            // A webhook delivered twice: deduplicated by its id.
            publish(&js, NS, second.0, &format!("{}-{i}", second.0), &second.1).await;
        }
    }
    let stats = run.worker.stats.clone();
    wait_for(
        "every instance to complete",
        Duration::from_secs(30),
        || stats.completed.load(Ordering::Relaxed) == n,
    )
    .await;
    assert_eq!(env.erp.invoice_count(), n as usize, "one invoice per order");
    for invoice in env.erp.invoices() {
        // 2 x 19.99 + 5 x 0.10, digit for digit.
        assert_eq!(
            invoice.field("netAmount"),
            Some("40.48"),
            "{}",
            invoice.body
        );
    }
    let inst = run.worker.instance("ORD-7").await.unwrap().unwrap();
    assert_eq!(inst.status, Status::Completed);
    run.shutdown().await;

    let report = verified_trail(&env.nats.url(), NS).await;
    assert_eq!(report.instances, n as usize);

    // The shared counters hold every instance once (the last flush runs at
    // shutdown), whichever replica counted it.
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    let store = js
        .get_key_value(format!("tallyman_{NS}_counts"))
        .await
        .unwrap();
    let counts = tallyman_worker::counts::read(&store, "shipment-to-invoice")
        .await
        .unwrap();
    assert_eq!((counts.started, counts.completed), (n, n));
    assert_eq!(
        (counts.running(), counts.failed, counts.exceptions),
        (0, 0, 0)
    );
}

/// A replica that does not hold an instance in memory creates it without
/// reading first; when it exists already (another replica, or an event sent
/// again after the broker's deduplication window), the replica reads it and
/// the instance's record of applied events absorbs the repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_the_instance_in_memory_still_applies_an_event_once() {
    let env = env("shipment-to-invoice").await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    seed_order(&env.erp, "ORD-1", 5, "0.10");
    let first = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    publish(&js, NS, "order.created", "o-1", &order_data("ORD-1")).await;
    let stats = first.worker.stats.clone();
    wait_for(
        "the order to start an instance",
        Duration::from_secs(10),
        || stats.started.load(Ordering::Relaxed) == 1,
    )
    .await;
    // The stored state carries the commit's audit records as the message
    // that publishes them, so a crash before the publish loses none.
    let stored = first.worker.instance("ORD-1").await.unwrap().unwrap();
    let batch = stored.audit_batch.expect("the audit records are stored");
    assert_eq!(batch.msg_id, "finance/shipment-to-invoice/ORD-1/audit/1-2");
    let records: Vec<audit::AuditRecord> = serde_json::from_str(batch.records.get()).unwrap();
    assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
    assert!(
        stored
            .outbox
            .iter()
            .all(|o| !matches!(o, Outbound::Audit(_)))
    );
    first.shutdown().await;

    // A new replica: nothing in memory.
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let stats = run.worker.stats.clone();
    publish_again(&js, NS, "order.created", "o-1", &order_data("ORD-1")).await;
    wait_for("the repeat to be absorbed", Duration::from_secs(10), || {
        stats.duplicates.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(
        stats.started.load(Ordering::Relaxed),
        0,
        "not a new instance"
    );
    // Meeting the stored instance is no race: nothing for the conflicts alert.
    assert_eq!(stats.conflicts.load(Ordering::Relaxed), 0);
    publish(
        &js,
        NS,
        "shipment.confirmed",
        "s-1",
        &shipment_data("ORD-1", 5),
    )
    .await;
    wait_for("the instance to complete", Duration::from_secs(10), || {
        stats.completed.load(Ordering::Relaxed) == 1
    })
    .await;
    // Ended instances are not kept in memory: the repeat is read and absorbed.
    publish_again(
        &js,
        NS,
        "shipment.confirmed",
        "s-1",
        &shipment_data("ORD-1", 5),
    )
    .await;
    publish_again(&js, NS, "order.created", "o-1", &order_data("ORD-1")).await;
    wait_for(
        "both repeats to be absorbed",
        Duration::from_secs(10),
        || stats.duplicates.load(Ordering::Relaxed) == 3,
    )
    .await;
    assert_eq!(env.erp.invoice_count(), 1);
    run.shutdown().await;
    let records = audit_of(&env.nats.url(), NS, "ORD-1").await;
    let report = audit::verify(&records);
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(records.first().map(|r| r.seq), Some(1));
    assert_eq!(
        records
            .iter()
            .filter(|r| r.kind == audit::AuditKind::InstanceStarted)
            .count(),
        1
    );
}

/// Events for an instance a replica does not hold are run on it as stored,
/// never on a fresh instance before the store is read: calls are made from
/// the stored state. Here the invoice's key is taken from the shipment, and
/// the source sends both events again after the broker's window, the
/// shipment corrected under the same event id. Run on a fresh instance,
/// the corrected shipment would give a new key and a second invoice; read
/// first, both events are repeats and nothing is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_again_are_judged_against_the_stored_instance_before_any_call() {
    let mut env = env("shipment-to-invoice").await;
    let invoice = env
        .def
        .spec
        .steps
        .iter_mut()
        .find(|s| s.name == "invoice")
        .and_then(|s| s.call.as_mut())
        .expect("the example's invoice step");
    invoice.idempotency_key = Some("'inv-' + events['shipment.confirmed'].data.shipmentId".into());
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    let n = 5;
    // Order i's two events, the shipment as sent first or corrected.
    let events = |i: u64, corrected: bool| {
        let order = format!("ORD-{i}");
        let mut shipment = shipment_data(&order, 5);
        if corrected {
            shipment = shipment.replace("SH-", "SH-CORRECTED-");
        }
        [
            ("order.created", format!("o-{i}"), order_data(&order)),
            ("shipment.confirmed", format!("s-{i}"), shipment),
        ]
    };
    let first = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    for i in 0..n {
        seed_order(&env.erp, &format!("ORD-{i}"), 5, "0.10");
        for (ty, id, data) in events(i, false) {
            publish(&js, NS, ty, &id, &data).await;
        }
    }
    let stats = first.worker.stats.clone();
    wait_for("every order to complete", Duration::from_secs(20), || {
        stats.completed.load(Ordering::Relaxed) == n
    })
    .await;
    first.shutdown().await;
    assert_eq!(env.erp.invoice_count(), n as usize);
    let orders_read = env.erp.requests("/orders");

    // Both events again, back to back while nobody consumes, so that a new
    // replica takes each order's two together.
    for i in 0..n {
        for (ty, id, data) in events(i, true) {
            publish_again(&js, NS, ty, &id, &data).await;
        }
    }
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let stats = run.worker.stats.clone();
    wait_for(
        "every repeat to be absorbed",
        Duration::from_secs(20),
        || stats.duplicates.load(Ordering::Relaxed) == 2 * n,
    )
    .await;
    run.shutdown().await;
    assert_eq!(env.erp.invoice_count(), n as usize, "no second invoice");
    assert_eq!(
        env.erp.requests("/invoices"),
        n as usize,
        "nothing posted again"
    );
    assert_eq!(
        env.erp.requests("/orders"),
        orders_read,
        "nothing called again"
    );
    assert_eq!(stats.started.load(Ordering::Relaxed), 0, "no new instance");
    let report = verified_trail(&env.nats.url(), NS).await;
    assert!(report.is_ok(), "{:?}", report.problems);
}

/// A backlog (a worker that was down, a burst of webhooks) holds several
/// events of one instance: those taken from the consumer together are
/// applied in one commit, so the instance is stored, audited and, when it
/// ends, never scheduled for a wake-up once per event but once in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instances_events_taken_together_are_applied_in_one_commit() {
    let env = env("shipment-to-invoice").await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    // The streams and the consumer exist; nobody consumes.
    start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url())
        .await
        .shutdown()
        .await;
    let n = 30;
    for i in 0..n {
        let order = format!("ORD-{i}");
        seed_order(&env.erp, &order, 5, "0.10");
        let order_event = ("order.created", format!("o-{i}"), order_data(&order));
        let shipment = (
            "shipment.confirmed",
            format!("s-{i}"),
            shipment_data(&order, 5),
        );
        let (first, second) = if i % 2 == 0 {
            (&order_event, &shipment)
        } else {
            (&shipment, &order_event)
        };
        publish(&js, NS, first.0, &first.1, &first.2).await;
        publish(&js, NS, second.0, &second.1, &second.2).await;
        if i % 3 == 0 {
            // Sent again after the broker's window: the instance absorbs it.
            publish_again(&js, NS, first.0, &first.1, &first.2).await;
        }
    }
    let (run, metrics) = start_measured(&env, &env.def).await;
    let stats = run.worker.stats.clone();
    wait_for(
        "every instance to complete",
        Duration::from_secs(30),
        || stats.completed.load(Ordering::Relaxed) == n,
    )
    .await;
    wait_for(
        "every repeat to be absorbed",
        Duration::from_secs(10),
        || stats.duplicates.load(Ordering::Relaxed) == n.div_ceil(3),
    )
    .await;
    run.shutdown().await;
    assert_eq!(env.erp.invoice_count(), n as usize, "one invoice per order");
    for invoice in env.erp.invoices() {
        assert_eq!(
            invoice.field("netAmount"),
            Some("40.48"),
            "{}",
            invoice.body
        );
    }
    let coalesced = stats.coalesced.load(Ordering::Relaxed);
    assert!(coalesced > 0, "the backlog was taken in batches");
    assert!(coalesced <= n, "at most one saved commit per instance");
    let exposed = format!(
        "tallyman_worker_events_coalesced_total{{namespace=\"{NS}\",workflow=\"shipment-to-invoice\"}} {coalesced}\n"
    );
    assert!(metrics.encode().contains(&exposed), "{}", metrics.encode());
    // One audit message per commit: 2 per instance, less one for each
    // instance whose two events shared a commit.
    assert_eq!(
        stream_state(&js, NS, "AUDIT").await.messages,
        2 * n - coalesced
    );
    // A wake-up is scheduled by a commit that leaves the instance waiting
    // (none for an instance that ran to its end in one commit), and
    // removed when the instance ends: none is left to fire.
    let state = stream_state(&js, NS, "TIMERS").await;
    assert_eq!(state.last_sequence, n - coalesced, "schedules written");
    assert_eq!(state.messages, 0, "schedules left");
    let report = verified_trail(&env.nats.url(), NS).await;
    assert_eq!(report.instances, n as usize);
}

/// Waiting instances are held in memory within the budget; with no room
/// at all every input reads the store, with the same results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_held_in_memory_stay_within_the_budget() {
    let env = env("shipment-to-invoice").await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    let roomy = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let n = 10;
    for i in 0..n {
        let order = format!("ORD-{i}");
        seed_order(&env.erp, &order, 5, "0.10");
        publish(
            &js,
            NS,
            "order.created",
            &format!("o-{i}"),
            &order_data(&order),
        )
        .await;
    }
    let stats = roomy.worker.stats.clone();
    wait_for("every instance to start", Duration::from_secs(10), || {
        stats.started.load(Ordering::Relaxed) == n
    })
    .await;
    // An instance is counted as started before it is put back in memory.
    wait_for(
        "every waiting instance to be held",
        Duration::from_secs(10),
        || roomy.worker.held().0 == n as usize,
    )
    .await;
    assert!(roomy.worker.held().1 > 0);
    roomy.shutdown().await;

    let tight = start_tuned(
        &env.nats.url(),
        &env.def,
        &env.secrets,
        &env.erp.base_url(),
        |c| c.instance_cache_bytes = 1,
    )
    .await;
    for i in 0..n {
        let order = format!("ORD-{i}");
        publish(
            &js,
            NS,
            "shipment.confirmed",
            &format!("s-{i}"),
            &shipment_data(&order, 5),
        )
        .await;
        // Sent again after the broker's window: the stored instance says so.
        publish_again(
            &js,
            NS,
            "order.created",
            &format!("o-{i}"),
            &order_data(&order),
        )
        .await;
    }
    let stats = tight.worker.stats.clone();
    wait_for(
        "every instance to complete",
        Duration::from_secs(20),
        || {
            stats.completed.load(Ordering::Relaxed) == n
                && stats.duplicates.load(Ordering::Relaxed) == n
        },
    )
    .await;
    assert_eq!(tight.worker.held(), (0, 0));
    assert_eq!(env.erp.invoice_count(), n as usize);
    tight.shutdown().await;
    // Each instance was left waiting once (its SLA scheduled), and its end
    // removed the schedule: none is left to fire hours later.
    let state = stream_state(&js, NS, "TIMERS").await;
    assert_eq!((state.last_sequence, state.messages), (n, 0));
}

/// A breached SLA is audited once and counted once, and the instance still
/// completes when its shipment comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sla_breach_is_recorded_and_counted_once() {
    let env = env("shipment-to-invoice").await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    seed_order(&env.erp, "SLOW", 5, "0.10");
    let mut def = env.def.clone();
    def.spec.sla.as_mut().unwrap().complete = "1s".parse().unwrap();
    let (run, metrics) = start_measured(&env, &def).await;
    publish(&js, NS, "order.created", "o-slow", &order_data("SLOW")).await;
    let labels = tallyman_telemetry::WorkflowLabels::new(NS, "shipment-to-invoice");
    let breaches = || metrics.worker.sla_breaches.get_or_create(&labels).get();
    wait_for("the SLA to be breached", Duration::from_secs(15), || {
        breaches() == 1
    })
    .await;
    publish(
        &js,
        NS,
        "shipment.confirmed",
        "s-slow",
        &shipment_data("SLOW", 5),
    )
    .await;
    let stats = run.worker.stats.clone();
    wait_for("the instance to complete", Duration::from_secs(10), || {
        stats.completed.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(breaches(), 1, "counted once");
    assert!(
        run.worker
            .instance("SLOW")
            .await
            .unwrap()
            .unwrap()
            .sla_breached
    );
    run.shutdown().await;
    let records = audit_of(&env.nats.url(), NS, "SLOW").await;
    assert_eq!(
        records
            .iter()
            .filter(|r| r.kind == audit::AuditKind::SlaBreached)
            .count(),
        1
    );
}

/// A wake-up that fires for an ended instance (left scheduled when its
/// removal failed or raced a late firing) changes nothing and writes
/// nothing: the stored instance keeps its revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_for_an_ended_instance_writes_nothing() {
    let env = env("shipment-to-invoice").await;
    let nats = connect(&env.nats.url()).await;
    let js = async_nats::jetstream::new(nats);
    seed_order(&env.erp, "DONE", 5, "0.10");
    let (run, metrics) = start_measured(&env, &env.def).await;
    publish_order_and_shipment(&js, "DONE", 5).await;
    wait_status(&run, "DONE", Status::Completed).await;
    let names = tallyman_worker::names::Names::new(NS, "shipment-to-invoice");
    let bucket = js.get_key_value(names.instances_bucket()).await.unwrap();
    let stored = || async {
        let entry = bucket.entry(tallyman_worker::names::kv_key("DONE")).await;
        entry.unwrap().expect("stored").revision
    };
    let revision = stored().await;
    let fired = run.worker.stats.timers.load(Ordering::Relaxed);
    let now = chrono::Utc::now().timestamp_millis();
    let wake = serde_json::json!({"key": "DONE", "token": "wake", "dueMs": now});
    js.publish(names.timers_due_subject(), wake.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let stats = run.worker.stats.clone();
    wait_for("the wake-up to be handled", Duration::from_secs(10), || {
        stats.timers.load(Ordering::Relaxed) > fired
    })
    .await;
    // Shutting down waits for the timer in flight.
    run.shutdown().await;
    assert_eq!(stored().await, revision);
    // Handled, not handed back for another try.
    let labels = tallyman_telemetry::WorkflowLabels::new(NS, "shipment-to-invoice");
    let retried = metrics.worker.messages_retried.get_or_create(&labels).get();
    assert_eq!(retried, 0);
}

/// An SLA armed again by a later commit, after a shorter timer replaced
/// it and fired, still fires: the wake-up for the same time is a new
/// schedule, not a duplicate of the first one for the broker to drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sla_armed_again_after_a_shorter_wait_fired_still_fires() {
    let env = env("shipment-to-invoice").await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    let mut def = with_steps(
        &env.def,
        serde_json::json!([
            {"name": "ordered", "await": {"events": ["order.created"]}},
            {"name": "shipped", "await": {"events": ["shipment.confirmed"]}},
            {"name": "pause", "wait": {"for": "3s"}},
            {"name": "cancelled", "await": {"events": ["order.cancelled"]}},
        ]),
    );
    // Both times later than a second ahead, so both are schedules (on the
    // instance's one schedule subject), not messages due at once.
    def.spec.sla.as_mut().unwrap().complete = "8s".parse().unwrap();
    def.spec.trigger.events.push("order.cancelled".into());
    let (run, metrics) = start_measured(&env, &def).await;
    let step = |run: &Running| {
        let worker = run.worker.clone();
        async move {
            worker
                .instance("REARM")
                .await
                .unwrap()
                .map(|i| i.step)
                .unwrap_or_default()
        }
    };
    // The SLA's wake-up is armed alone...
    publish(&js, NS, "order.created", "o-rearm", &order_data("REARM")).await;
    eventually(
        "the instance to wait for its shipment",
        Duration::from_secs(10),
        || {
            let step = step(&run);
            async move { step.await == 1 }
        },
    )
    .await;
    // ...then replaced by the pause's, which fires; the SLA's is armed again.
    publish(
        &js,
        NS,
        "shipment.confirmed",
        "s-rearm",
        &shipment_data("REARM", 5),
    )
    .await;
    eventually("the pause to end", Duration::from_secs(10), || {
        let step = step(&run);
        async move { step.await == 3 }
    })
    .await;
    let labels = tallyman_telemetry::WorkflowLabels::new(NS, "shipment-to-invoice");
    let breaches = || metrics.worker.sla_breaches.get_or_create(&labels).get();
    wait_for("the SLA to be breached", Duration::from_secs(15), || {
        breaches() == 1
    })
    .await;
    run.shutdown().await;
}

/// A workflow created after events were published (as a Workflow deleted
/// and created again under its name is) starts at its creation: the
/// earlier events are not replayed into new instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_starts_at_the_events_published_since_it_was_created() {
    let env = env("shipment-to-invoice").await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    // The namespace's history, from before.
    let first = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    first.shutdown().await;
    seed_order(&env.erp, "OLD", 5, "0.10");
    publish_order_and_shipment(&js, "OLD", 5).await;
    // The workflow's consumer is made afresh (as after a delete).
    let names = tallyman_worker::names::Names::new(NS, "shipment-to-invoice");
    js.delete_consumer_from_stream(names.events_consumer(), names.events_stream())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let run = start_tuned(
        &env.nats.url(),
        &env.def,
        &env.secrets,
        &env.erp.base_url(),
        |c| c.events_since = Some(since),
    )
    .await;
    seed_order(&env.erp, "NEW", 5, "0.10");
    publish_order_and_shipment(&js, "NEW", 5).await;
    wait_status(&run, "NEW", Status::Completed).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(run.worker.instance("OLD").await.unwrap().is_none());
    assert_eq!(env.erp.invoice_count(), 1);
    run.shutdown().await;
}

/// Messages whose processing outlasts the ack wait (one slow ERP answer)
/// are kept alive: the broker does not redeliver them to be processed a
/// second time, here or on another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_slow_erp_keeps_busy_are_not_redelivered() {
    let env = env("shipment-to-invoice").await;
    let run = start_acking_within_1s(&env, &env.def).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    seed_order(&env.erp, "SLOWERP", 5, "0.10");
    env.erp.delay("/invoices", Duration::from_millis(2500));
    publish_order_and_shipment(&js, "SLOWERP", 5).await;
    wait_status(&run, "SLOWERP", Status::Completed).await;
    // A redelivery would arrive within another ack wait.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stats = &run.worker.stats;
    assert_eq!(
        stats.events.load(Ordering::Relaxed),
        2,
        "each event delivered once"
    );
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 0);
    assert_eq!(env.erp.invoice_count(), 1);
    run.shutdown().await;
}

/// An instance that would outgrow what the broker stores in one message
/// (here: an ERP answer over 1 MiB kept as the step's response) fails
/// visibly: its events are dead-lettered, not redelivered and called
/// again for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_too_large_to_store_is_dead_lettered_not_retried_for_ever() {
    let env = env("shipment-to-invoice").await;
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    env.erp.seed_order(tallyman_testing::erp::Order {
        order_id: "HUGE".into(),
        customer_id: "C".repeat(1_200_000),
        currency: "EUR".into(),
        lines: vec![tallyman_testing::erp::OrderLine::new("A", 2, "19.99")],
    });
    publish_order_and_shipment(&js, "HUGE", 0).await;
    // The events that brought the answer in (both, or the shipment alone
    // when the order was stored before it came) are dead-lettered.
    let stats = run.worker.stats.clone();
    wait_dead_letter(&stats, "the events to be dead-lettered").await;
    // Once, or twice when both came in one batch: applied together, then
    // the shipment alone (the order alone is stored).
    let calls = env.erp.requests("/orders");
    assert!((1..=2).contains(&calls), "{calls}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(env.erp.requests("/orders"), calls, "not called again");
    let stored = run.worker.instance("HUGE").await.unwrap();
    assert!(
        stored
            .as_ref()
            .is_none_or(|i| i.status == Status::Running && i.step == 0),
        "{stored:?}"
    );
    run.shutdown().await;
}

/// A timer set after a call counts from when the answer came: a slow ERP
/// does not shorten the wait that follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_after_a_slow_call_counts_from_the_answer() {
    let env = env("shipment-to-invoice").await;
    let def = with_steps(
        &env.def,
        serde_json::json!([
            {"name": "both", "await": {"events": ["order.created", "shipment.confirmed"]}},
            {"name": "order", "call": {"connector": "erp", "action": "getOrder", "params": {"orderId": "key"}}},
            {"name": "pause", "wait": {"for": "3s"}},
        ]),
    );
    let run = start(&env.nats.url(), &def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    seed_order(&env.erp, "LATE", 5, "0.10");
    env.erp.delay("/orders", Duration::from_millis(1500));
    let sent = chrono::Utc::now().timestamp_millis();
    publish_order_and_shipment(&js, "LATE", 5).await;
    let started = std::time::Instant::now();
    let due = loop {
        let inst = run.worker.instance("LATE").await.unwrap();
        if let Some(due) = inst.and_then(|i| (i.step == 2).then_some(i.wake_ms).flatten()) {
            break due;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the instance never paused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        due >= sent + 1500 + 3000,
        "the pause ends {} ms after the events were sent, before the answer came + 3 s",
        due - sent
    );
    wait_status(&run, "LATE", Status::Completed).await;
    run.shutdown().await;
}

/// A wait too long to mean anything is scheduled at the end of what the
/// broker's schedules can name (year 9999), and the commit's messages are
/// acknowledged: not a schedule the broker refuses, redelivered for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_too_long_to_count_is_scheduled_not_refused() {
    let env = env("shipment-to-invoice").await;
    let mut def = with_steps(
        &env.def,
        serde_json::json!([
            {"name": "both", "await": {"events": ["order.created", "shipment.confirmed"]}},
            {"name": "pause", "wait": {"for": "3000000000000h"}},
        ]),
    );
    def.spec.sla = None;
    let run = start(&env.nats.url(), &def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    publish_order_and_shipment(&js, "FAR", 5).await;
    eventually("the instance to pause", Duration::from_secs(10), || {
        let worker = run.worker.clone();
        async move {
            worker
                .instance("FAR")
                .await
                .unwrap()
                .is_some_and(|i| i.step == 1)
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        run.worker.stats.events.load(Ordering::Relaxed),
        2,
        "acknowledged, not redelivered"
    );
    run.shutdown().await;
}

/// A goTo loop with nothing to wait for ends the instance Failed, stored
/// with the audit records of the steps it ran, and frees the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goto_loop_fails_its_instance_and_the_failure_is_stored() {
    let env = env("shipment-to-invoice").await;
    let def = with_steps(
        &env.def,
        serde_json::json!([
            {"name": "both", "await": {"events": ["order.created", "shipment.confirmed"]}},
            {"name": "never", "check": "false", "onFalse": {"goTo": "both"}},
        ]),
    );
    let run = start(&env.nats.url(), &def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    publish_order_and_shipment(&js, "LOOP", 5).await;
    wait_status(&run, "LOOP", Status::Failed).await;
    let inst = run.worker.instance("LOOP").await.unwrap().unwrap();
    assert!(
        inst.outcome.as_deref().unwrap_or("").contains("goTo loop"),
        "{:?}",
        inst.outcome
    );
    run.shutdown().await;
    assert!(verified_trail(&env.nats.url(), NS).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erp_that_fails_and_throttles_still_gets_one_invoice() {
    let env = env("shipment-to-invoice").await;
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    seed_order(&env.erp, "4711", 5, "0.10");
    env.erp.fail_next("/orders", 2, 503);
    env.erp.rate_limit_next("/invoices", 1, 1);
    // The first invoice is created but its answer is lost: the retry must
    // carry the same key and get the same invoice back.
    env.erp.fail_next_after_commit("/invoices", 1, 503);
    publish(&js, NS, "order.created", "o-4711", &order_data("4711")).await;
    publish(
        &js,
        NS,
        "shipment.confirmed",
        "s-4711",
        &shipment_data("4711", 5),
    )
    .await;
    let stats = run.worker.stats.clone();
    wait_for("the instance to complete", Duration::from_secs(20), || {
        stats.completed.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(env.erp.invoice_count(), 1);
    assert!(
        env.erp.duplicates_prevented() >= 1,
        "the retry was answered from the idempotency key"
    );
    assert!(env.erp.requests("/orders") >= 3);
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variance_waits_for_a_second_person_and_then_invoices_what_shipped() {
    let env = env("shipment-to-invoice").await;
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    seed_order(&env.erp, "4712", 9, "250.00");
    publish(&js, NS, "order.created", "o-4712", &order_data("4712")).await;
    publish(
        &js,
        NS,
        "shipment.confirmed",
        "s-4712",
        &shipment_data("4712", 5),
    )
    .await;
    let stats = run.worker.stats.clone();
    wait_for("a case to open", Duration::from_secs(20), || {
        stats.exceptions.load(Ordering::Relaxed) == 1
    })
    .await;
    let cases = run.worker.cases().list().await.unwrap();
    assert_eq!(cases.len(), 1);
    let case = &cases[0];
    assert_eq!(case.spec.reason, "QuantityMismatch");
    assert_eq!(case.spec.facts["amount"], serde_json::json!("1000.00"));
    let decide = |who: &str| CaseDecision {
        approver: who.into(),
        groups: vec!["finance-controllers".into()],
        decision: Verdict::Approve,
        comment: None,
    };
    // Whoever confirmed the shipment may not approve its variance.
    let own = run
        .worker
        .cases()
        .decide(&case.name, decide("wms-operator-17"), chrono::Utc::now())
        .await;
    assert!(own.unwrap_err().to_string().contains("may not decide it"));
    let decided = run
        .worker
        .cases()
        .decide(&case.name, decide("alice"), chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(decided.status.state, CaseState::Approved);
    wait_for("the instance to complete", Duration::from_secs(20), || {
        stats.completed.load(Ordering::Relaxed) == 1
    })
    .await;
    let invoices = env.erp.invoices();
    assert_eq!(invoices.len(), 1);
    // Invoiced as shipped: 2 x 19.99 + 5 x 250.00.
    assert_eq!(invoices[0].field("netAmount"), Some("1289.98"));
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_await_timeout_fires_from_a_scheduled_timer_even_after_a_restart() {
    let mut env = env("shipment-to-invoice").await;
    env.def.spec.steps[0].await_.as_mut().unwrap().timeout = Some("2s".parse().unwrap());
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    publish(&js, NS, "order.created", "o-4713", &order_data("4713")).await;
    let stats = run.worker.stats.clone();
    wait_for("the instance to start", Duration::from_secs(10), || {
        stats.started.load(Ordering::Relaxed) == 1
    })
    .await;
    // The worker goes away; the timer lives in the broker.
    run.shutdown().await;
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let stats = run.worker.stats.clone();
    wait_for("the await to time out", Duration::from_secs(15), || {
        stats.failed.load(Ordering::Relaxed) == 1
    })
    .await;
    let inst = run.worker.instance("4713").await.unwrap().unwrap();
    assert_eq!(inst.status, Status::Failed);
    assert!(inst.outcome.unwrap().contains("did not arrive in time"));
    assert_eq!(env.erp.invoice_count(), 0);
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_instance_finishes_on_the_revision_it_started_with() {
    let env = env("shipment-to-invoice").await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    seed_order(&env.erp, "OLD", 5, "0.10");
    seed_order(&env.erp, "NEW", 5, "0.10");

    // Revision A starts an instance that waits for its shipment.
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let old_revision = run.worker.revision().to_string();
    publish(&js, NS, "order.created", "o-old", &order_data("OLD")).await;
    let stats = run.worker.stats.clone();
    wait_for("the instance to start", Duration::from_secs(10), || {
        stats.started.load(Ordering::Relaxed) == 1
    })
    .await;
    run.shutdown().await;

    // Revision B emits a different event when it is done.
    let mut changed = env.def.clone();
    let last = changed.spec.steps.last_mut().unwrap();
    last.emit.as_mut().unwrap().type_ = "invoice.booked".into();
    let run = start(&env.nats.url(), &changed, &env.secrets, &env.erp.base_url()).await;
    assert_ne!(run.worker.revision(), old_revision);
    publish(
        &js,
        NS,
        "shipment.confirmed",
        "s-old",
        &shipment_data("OLD", 5),
    )
    .await;
    publish_order_and_shipment(&js, "NEW", 5).await;
    let stats = run.worker.stats.clone();
    wait_for(
        "both instances to complete",
        Duration::from_secs(20),
        || stats.completed.load(Ordering::Relaxed) == 2,
    )
    .await;
    let old = run.worker.instance("OLD").await.unwrap().unwrap();
    let new = run.worker.instance("NEW").await.unwrap().unwrap();
    assert_eq!(
        old.revision, old_revision,
        "the old instance kept its revision"
    );
    assert_eq!(new.revision, run.worker.revision());
    let created = emitted(&js, NS, "invoice.created").await;
    let booked = emitted(&js, NS, "invoice.booked").await;
    assert_eq!(created.len(), 1, "the old instance finished on revision A");
    assert_eq!(booked.len(), 1, "the new instance ran revision B");
    assert_eq!(env.erp.invoice_count(), 2);
    run.shutdown().await;
}

/// A stored outbox is published again when an instance is read only while
/// the worker cannot tell it was published: past the broker's duplicate
/// window the copy would be stored, and its events delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_is_published_again_on_reading_only_when_it_may_not_have_been() {
    use async_nats::jetstream::stream;
    use tallyman_worker::names::{Names, kv_key};
    let env = env("shipment-to-invoice").await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    // The namespace's streams with a one-second window, made before any
    // worker (which leaves streams that exist as they are).
    let names = Names::new(NS, "shipment-to-invoice");
    for (name, subjects, timers) in [
        (names.events_stream(), names.events_wildcard(), false),
        (names.audit_stream(), names.audit_wildcard(), false),
        (names.dlq_stream(), names.dlq_wildcard(), false),
        (names.timers_stream(), names.timers_wildcard(), true),
    ] {
        js.create_stream(stream::Config {
            name,
            subjects: vec![subjects],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(1),
            allow_message_schedules: timers,
            allow_message_ttl: timers,
            ..Default::default()
        })
        .await
        .expect("stream");
    }
    let def = with_steps(
        &env.def,
        serde_json::json!([
            {"name": "order", "await": {"events": ["order.created"]}},
            {"name": "seen", "emit": {"type": "order.seen", "data": "{'order': key}"}},
            {"name": "ship", "await": {"events": ["shipment.confirmed"]}},
        ]),
    );
    let first = start(&env.nats.url(), &def, &env.secrets, &env.erp.base_url()).await;
    for order in ["ORD-1", "ORD-2"] {
        publish(&js, NS, "order.created", order, &order_data(order)).await;
    }
    wait_emitted(&js, NS, "order.seen", 2).await;
    first.shutdown().await;
    // ORD-2 as after a crash between storing it and publishing: its
    // message not acknowledged (a sequence the consumer never reached).
    let instances = js
        .get_key_value(names.instances_bucket())
        .await
        .expect("bucket");
    let mut stored: tallyman_core::engine::Instance = serde_json::from_slice(
        &instances
            .get(kv_key("ORD-2"))
            .await
            .unwrap()
            .expect("stored"),
    )
    .unwrap();
    let delivered = stored.delivered.as_mut().expect("its message is recorded");
    assert_eq!(delivered.consumer, names.events_consumer());
    delivered.stream_seq = 1_000_000;
    instances
        .put(kv_key("ORD-2"), serde_json::to_vec(&stored).unwrap().into())
        .await
        .expect("put");
    // Past the window: published again now, a copy would be stored.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let run = start(&env.nats.url(), &def, &env.secrets, &env.erp.base_url()).await;
    let stats = run.worker.stats.clone();
    for order in ["ORD-1", "ORD-2"] {
        publish_shipment(&js, order, 5).await;
    }
    wait_for(
        "both instances to complete",
        Duration::from_secs(10),
        || stats.completed.load(Ordering::Relaxed) == 2,
    )
    .await;
    run.shutdown().await;
    let seen = emitted(&js, NS, "order.seen").await;
    let times = |order: &str| seen.iter().filter(|e| e["data"]["order"] == order).count();
    assert_eq!(times("ORD-1"), 1, "acknowledged, so published: not again");
    assert_eq!(times("ORD-2"), 2, "not acknowledged: published again");
    verified_trail(&env.nats.url(), NS).await;
}

/// A wait of one second, then a GET of the order.
fn pause_then_get(def: &tallyman_core::engine::Definition) -> tallyman_core::engine::Definition {
    let mut def = with_steps(
        def,
        serde_json::json!([
            {"name": "both", "await": {"events": ["order.created", "shipment.confirmed"]}},
            {"name": "pause", "wait": {"for": "1s"}},
            {"name": "order", "call": {"connector": "erp", "action": "getOrder", "params": {"orderId": "key"}}},
        ]),
    );
    def.spec.sla = None;
    def
}

/// On shutdown a timer's work in flight is finished like an event's: the
/// worker stops once the instance it woke is stored, not halfway through
/// the call the timer led to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_timer_in_flight() {
    let env = env("shipment-to-invoice").await;
    let def = pause_then_get(&env.def);
    let run = start(&env.nats.url(), &def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    seed_order(&env.erp, "WOKEN", 5, "0.10");
    env.erp.delay("/orders", Duration::from_millis(1500));
    publish_order_and_shipment(&js, "WOKEN", 5).await;
    wait_for(
        "the woken instance to call",
        Duration::from_secs(10),
        || env.erp.requests("/orders") == 1,
    )
    .await;
    let worker = run.worker.clone();
    run.shutdown().await;
    let inst = worker.instance("WOKEN").await.unwrap().unwrap();
    assert_eq!(
        inst.status,
        Status::Completed,
        "stored before the worker stopped"
    );
    assert_eq!(worker.stats.timers.load(Ordering::Relaxed), 1);
}

/// Timers falling due together take turns with the events for the
/// worker's `max_in_flight`, instead of all loading and calling at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_due_together_stay_within_max_in_flight() {
    let env = env("shipment-to-invoice").await;
    let def = pause_then_get(&env.def);
    let run = start_tuned(
        &env.nats.url(),
        &def,
        &env.secrets,
        &env.erp.base_url(),
        |c| c.max_in_flight = 1,
    )
    .await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    env.erp.delay("/orders", Duration::from_millis(1500));
    for order in ["DUE-1", "DUE-2"] {
        seed_order(&env.erp, order, 5, "0.10");
        publish_order_and_shipment(&js, order, 5).await;
    }
    wait_for("a woken instance to call", Duration::from_secs(10), || {
        env.erp.requests("/orders") == 1
    })
    .await;
    // Both are due by now; the second call waits for the first's answer.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(env.erp.requests("/orders"), 1, "one call at a time");
    for order in ["DUE-1", "DUE-2"] {
        wait_status(&run, order, Status::Completed).await;
    }
    run.shutdown().await;
}

/// Events applied together whose instance would be too large to store are
/// applied one by one: only the one that cannot be stored even alone is
/// dead-lettered, not every event that came along with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_too_large_together_are_applied_one_by_one() {
    let env = env("shipment-to-invoice").await;
    let def = with_steps(
        &env.def,
        serde_json::json!([
            {"name": "order", "await": {"events": ["order.created"]}},
            {"name": "ship", "await": {"events": ["shipment.confirmed"]}},
        ]),
    );
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    publish_big_order_and_shipment(&js).await;
    let run = start(&env.nats.url(), &def, &env.secrets, &env.erp.base_url()).await;
    let stats = run.worker.stats.clone();
    wait_dead_letter(&stats, "a dead letter").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stats.dead_letters.load(Ordering::Relaxed), 1);
    let stored = run
        .worker
        .instance("BIG")
        .await
        .unwrap()
        .expect("the order is applied");
    assert_eq!((stored.status, stored.step), (Status::Running, 1));
    assert!(stored.events.contains_key("order.created"));
    assert_eq!(stream_state(&js, NS, "DLQ").await.messages, 1);
    run.shutdown().await;
}

/// A worker whose messages are redelivered after 1 s unless kept alive.
async fn start_acking_within_1s(env: &Env, def: &tallyman_core::engine::Definition) -> Running {
    start_tuned(
        &env.nats.url(),
        def,
        &env.secrets,
        &env.erp.base_url(),
        |c| c.ack_wait = Duration::from_secs(1),
    )
    .await
}

/// Wait (up to 20 s) for the worker's first dead letter.
async fn wait_dead_letter(stats: &tallyman_worker::Stats, what: &str) {
    wait_for(what, Duration::from_secs(20), || {
        stats.dead_letters.load(Ordering::Relaxed) >= 1
    })
    .await;
}

/// An order and a shipment for `BIG`, 600 kB each: too large to store
/// together, not alone. Published before the worker starts (the streams
/// set up here), so they mostly arrive in one batch; on a busy machine the
/// second can still be on its way when the first is taken.
async fn publish_big_order_and_shipment(js: &async_nats::jetstream::Context) {
    let names = tallyman_worker::names::Names::new(NS, "shipment-to-invoice");
    tallyman_worker::setup::ensure_namespace(js, &names)
        .await
        .expect("streams");
    let big = "x".repeat(600_000);
    let data = format!(r#"{{"orderId": "BIG", "note": "{big}"}}"#);
    publish(js, NS, "order.created", "o-big", &data).await;
    publish(js, NS, "shipment.confirmed", "s-big", &data).await;
}

/// While events too large together are applied one by one, those waiting
/// their turn are reported in progress: a slow call of the first does not
/// get the others redelivered to another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_waiting_their_turn_one_by_one_are_kept_alive() {
    // The one-by-one path needs both events in one batch, which a busy
    // machine does not always give (the second of 600 kB can still be on
    // its way when the first is taken): tried again until it does.
    for _ in 0..3 {
        if big_events_waiting_their_turn().await == 2 {
            return;
        }
    }
    panic!("the two events never came in one batch");
}

/// One run of [`events_waiting_their_turn_one_by_one_are_kept_alive`]:
/// each event delivered once whichever way they came; the calls made (2
/// when both came in one batch: together, then the order alone; 1 when the
/// shipment came a moment later and waited for the order's lock instead).
async fn big_events_waiting_their_turn() -> usize {
    let env = env("shipment-to-invoice").await;
    let def = with_steps(
        &env.def,
        serde_json::json!([
            {"name": "ordered", "await": {"events": ["order.created"]}},
            {"name": "order", "call": {"connector": "erp", "action": "getOrder", "params": {"orderId": "key"}}},
            {"name": "ship", "await": {"events": ["shipment.confirmed"]}},
        ]),
    );
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    seed_order(&env.erp, "BIG", 5, "0.10");
    // Each call outlasts the ack wait: both events wait 2.5 s while applied
    // together, then the shipment again while the order is applied alone.
    env.erp.delay("/orders", Duration::from_millis(2500));
    publish_big_order_and_shipment(&js).await;
    let run = start_acking_within_1s(&env, &def).await;
    let stats = run.worker.stats.clone();
    wait_dead_letter(&stats, "the shipment's dead letter").await;
    // A redelivery would arrive within another ack wait.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        stats.events.load(Ordering::Relaxed),
        2,
        "each event delivered once"
    );
    let calls = env.erp.requests("/orders");
    assert!(calls == 1 || calls == 2, "{calls} calls");
    let stored = run
        .worker
        .instance("BIG")
        .await
        .unwrap()
        .expect("the order is applied");
    assert_eq!((stored.status, stored.step), (Status::Running, 2));
    run.shutdown().await;
    calls
}

/// Every group of messages is a task, and spawning one moves its whole
/// future into place: at 32 KiB (the one-by-one path and the reads off the
/// common path inline) that copy was a tenth of the worker's instructions.
#[tokio::test]
async fn a_message_task_stays_small() {
    let env = env("shipment-to-invoice").await;
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let bytes = run.worker.group_task_bytes();
    assert!(bytes <= 12 * 1024, "a group's task is {bytes} bytes");
    run.shutdown().await;
}

/// A worker whose event consumer is gone consumes nothing: it stops with
/// an error (and its process exits, so Kubernetes restarts it) instead of
/// staying ready. What was in flight is finished and counted first.
#[tokio::test]
async fn a_worker_whose_consumer_is_deleted_stops_with_an_error() {
    let env = env("shipment-to-invoice").await;
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    // One instance in flight when the consumer goes: its invoice is slow.
    seed_order(&env.erp, "LAST", 5, "0.10");
    env.erp.delay("/invoices", Duration::from_millis(1500));
    publish_order_and_shipment(&js, "LAST", 5).await;
    wait_for("the invoice call", Duration::from_secs(10), || {
        env.erp.requests("/invoices") == 1
    })
    .await;
    let ns = env.def.namespace.to_uppercase();
    let stream = js
        .get_stream(format!("TALLYMAN_{ns}_EVENTS"))
        .await
        .expect("events stream");
    stream
        .delete_consumer(&format!("wf-{}", env.def.workflow))
        .await
        .expect("consumer deleted");
    let ended = tokio::time::timeout(Duration::from_secs(20), run.task)
        .await
        .expect("the worker stops on its own");
    let err = ended
        .expect("worker task")
        .expect_err("stops with an error");
    assert!(
        err.to_string()
            .contains("event consumer wf-shipment-to-invoice ended"),
        "{err}"
    );
    // Finished during the drain, counted by the last flush.
    let names = tallyman_worker::names::Names::new(NS, "shipment-to-invoice");
    let counts = js.get_key_value(names.counts_bucket()).await.unwrap();
    let total = tallyman_worker::counts::read(&counts, "shipment-to-invoice")
        .await
        .unwrap();
    assert_eq!(total.completed, 1, "{total:?}");
    assert_eq!(env.erp.invoice_count(), 1);
}

/// A worker on `def` with metrics of its own, to read back.
async fn start_measured(
    env: &Env,
    def: &tallyman_core::engine::Definition,
) -> (Running, std::sync::Arc<tallyman_telemetry::Metrics>) {
    let metrics = std::sync::Arc::new(tallyman_telemetry::Metrics::new());
    let run = start_tuned(
        &env.nats.url(),
        def,
        &env.secrets,
        &env.erp.base_url(),
        |c| c.metrics = metrics.clone(),
    )
    .await;
    (run, metrics)
}

/// `tallyman_worker_messages_retried_total` of the example's Workflow.
fn retried(metrics: &tallyman_telemetry::Metrics) -> u64 {
    let series = format!(
        "tallyman_worker_messages_retried_total{{namespace=\"{NS}\",workflow=\"shipment-to-invoice\"}}"
    );
    let text = metrics.encode();
    let line = text
        .lines()
        .find(|l| l.starts_with(&series))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A poison message whose dead letter cannot be stored (the dead-letter
/// stream is gone) is handed back too, and counted like the others.
#[tokio::test]
async fn a_poison_message_that_cannot_be_dead_lettered_is_counted_as_handed_back() {
    let env = env("shipment-to-invoice").await;
    let (run, metrics) = start_measured(&env, &env.def).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    js.delete_stream(format!("TALLYMAN_{}_DLQ", NS.to_uppercase()))
        .await
        .expect("the dead-letter stream deleted");
    js.publish(
        format!("tallyman.{NS}.events.order.created"),
        "not json".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wait_for(
        "the poison message to be handed back",
        Duration::from_secs(15),
        || retried(&metrics) >= 1,
    )
    .await;
    assert_eq!(run.worker.stats.dead_letters.load(Ordering::Relaxed), 0);
    run.shutdown().await;
}

/// An event whose instance cannot be read is handed back again and again;
/// `tallyman_worker_messages_retried_total` counts it, so an alert can
/// tell an SRE what only the logs said.
#[tokio::test]
async fn an_event_that_cannot_be_processed_is_counted_each_time_it_is_handed_back() {
    let env = env("shipment-to-invoice").await;
    let (run, metrics) = start_measured(&env, &env.def).await;
    let count = || retried(&metrics);
    assert_eq!(count(), 0, "exposed at zero from the start");
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    let kv = js
        .get_key_value(format!("tallyman_{NS}_shipment-to-invoice"))
        .await
        .expect("the instances bucket");
    kv.put("BROKEN", "not an instance".into()).await.unwrap();
    seed_order(&env.erp, "BROKEN", 5, "0.10");
    publish_order(&js, "BROKEN").await;
    wait_for(
        "the event to be handed back twice",
        Duration::from_secs(15),
        || count() >= 2,
    )
    .await;
    assert_eq!(env.erp.requests("/orders"), 0, "nothing called");
    run.shutdown().await;
}

/// An addition to the shared counts whose reply was lost is tried again
/// under the same id, against whatever the counts are by then: the broker
/// drops the repeat, so it is counted once, and the totals returned
/// include it. Tried again after the broker's duplicate window, the stored
/// record of the writer's last addition keeps it from counting twice.
#[tokio::test]
async fn an_addition_to_the_counts_tried_again_is_counted_once() {
    use tallyman_worker::counts::{self, Counts};
    let nats = tallyman_testing::nats::NatsServer::start();
    let js = async_nats::jetstream::new(connect(&nats.url()).await);
    let names = tallyman_worker::names::Names::new(NS, "shipment-to-invoice");
    let ns = tallyman_worker::setup::ensure_namespace(&js, &names)
        .await
        .expect("streams");
    let store = ns.counts;
    let two = Counts {
        started: 2,
        completed: 1,
        ..Default::default()
    };
    let wf = "shipment-to-invoice";
    assert_eq!(
        counts::add(&js, &store, wf, &two, "a", 1).await.unwrap(),
        two
    );
    // Another replica adds meanwhile.
    let one = Counts {
        started: 1,
        ..Default::default()
    };
    let three = two.plus(&one);
    assert_eq!(
        counts::add(&js, &store, wf, &one, "b", 1).await.unwrap(),
        three
    );
    // The first one again: its reply was lost.
    assert_eq!(
        counts::add(&js, &store, wf, &two, "a", 1).await.unwrap(),
        three
    );
    assert_eq!(counts::read(&store, wf).await.unwrap(), three);
    // Again, after the broker has forgotten its id (a window of 100 ms
    // here instead of two minutes).
    let mut bucket = js
        .get_stream(format!("KV_{}", names.counts_bucket()))
        .await
        .unwrap();
    let mut config = bucket.info().await.unwrap().config.clone();
    config.duplicate_window = Duration::from_millis(100);
    js.update_stream(config).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        counts::add(&js, &store, wf, &two, "a", 1).await.unwrap(),
        three
    );
    assert_eq!(counts::read(&store, wf).await.unwrap(), three);
    // The next addition of that replica counts.
    assert_eq!(
        counts::add(&js, &store, wf, &two, "a", 2).await.unwrap(),
        three.plus(&two)
    );
}
