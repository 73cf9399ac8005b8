//! examples/shipment-to-invoice through `tallyman dev`: exact invoices in the
//! simulated ERP, the variance case decided through the dev API under the
//! policy's rules, and a restart of dev mode mid-run.

use std::time::Duration;

use tallyman_e2e::dev::DevMode;
use tallyman_e2e::senders::Delivery;
use tallyman_e2e::shipment::{Batch, Shipment, amount};
use tallyman_e2e::{DevApi, Senders, start_example};
use tallyman_testing::erp::SimErp;

const NS: &str = "finance";
const WF: &str = "shipment-to-invoice";
const WAIT: Duration = Duration::from_secs(60);

async fn start(state: &tempfile::TempDir) -> (SimErp, DevMode, DevApi, Senders) {
    start_example(WF, state.path(), "erp", |erp| {
        erp.require_bearer("dummy-erp-bearer-token-change-me")
    })
    .await
}

/// Exactly one invoice per order, for the shipped quantities at the ERP's
/// prices, to the cent.
fn assert_invoiced(erp: &SimErp, shipments: &[&Shipment]) {
    let invoices = erp.invoices();
    for s in shipments {
        let mine: Vec<_> = invoices
            .iter()
            .filter(|d| d.str_field("orderId").as_deref() == Some(s.order_id.as_str()))
            .collect();
        assert_eq!(mine.len(), 1, "order {}: {mine:?}", s.order_id);
        assert_eq!(
            mine[0].field("netAmount"),
            Some(amount(s.shipped_cents()).as_str()),
            "order {}",
            s.order_id
        );
        assert_eq!(
            mine[0].idempotency_key.as_deref(),
            Some(format!("inv-{}", s.order_id).as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_is_invoiced_exactly_and_exceptions_follow_the_policy() {
    let state = tempfile::tempdir().unwrap();
    let (erp, mut dev, api, senders) = start(&state).await;
    let batch = Batch::new();
    let disputed = Shipment {
        order_id: "4790".into(),
        ordered: vec![("B-200", 40, "149.00")],
        shipped: vec![("B-200", 30)],
        confirmed_by: "k.meyer",
    };
    for s in batch.all().into_iter().chain([&disputed]) {
        s.seed(&erp);
    }

    for s in batch
        .matching
        .iter()
        .chain([&batch.tiny_variance, &batch.needs_approval, &disputed])
    {
        assert_eq!(
            senders.send("shop", &s.order_created()).await,
            Delivery::Accepted
        );
        assert_eq!(
            senders.send("wms", &s.shipment_confirmed()).await,
            Delivery::Accepted
        );
    }
    // Out of order: the shipment first.
    let late = &batch.out_of_order;
    assert_eq!(
        senders.send("wms", &late.shipment_confirmed()).await,
        Delivery::Accepted
    );
    assert_eq!(
        senders.send("shop", &late.order_created()).await,
        Delivery::Accepted
    );
    // Duplicates: the same deliveries again are absorbed by the gateway.
    assert_eq!(
        senders
            .send("wms", &batch.matching[3].shipment_confirmed())
            .await,
        Delivery::Duplicate
    );
    assert_eq!(
        senders
            .send("shop", &batch.matching[3].order_created())
            .await,
        Delivery::Duplicate
    );
    // A draft shipment is not for finance: no event, no instance.
    let mut draft = batch.matching[0].shipment_confirmed();
    draft["status"] = "DRAFT".into();
    draft["eventId"] = "evt-draft".into();
    assert_eq!(senders.send("wms", &draft).await, Delivery::Ignored);

    let automatic = batch.matching.len() as u64 + 2;
    api.wait_for(NS, WF, WAIT, |c| {
        c.completed == automatic && c.exceptions == 2
    })
    .await;

    // 4718: variance 178.00 (18.74 %) needs one finance controller.
    let case = api
        .wait_for_case(WF, &batch.needs_approval.order_id, "Open", WAIT)
        .await;
    let name = case["name"].as_str().unwrap();
    assert_eq!(case["reason"], "QuantityMismatch");
    assert_eq!(case["initiator"], "j.smith");
    assert_eq!(case["facts"]["amount"], "178.00");
    assert_eq!(case["facts"]["variancePercent"], "18.74");
    assert_eq!(case["facts"]["skus"], serde_json::json!(["D-400"]));
    assert_eq!(case["rule"], "controller");
    // The confirmer may not approve their own variance.
    assert!(
        api.refused(name, "Approve", "j.smith", &["finance-controllers"], None)
            .await
            .contains("segregation of duties")
    );
    // Someone outside the approving groups may not either.
    assert!(
        api.refused(name, "Approve", "s.sales", &["sales"], None)
            .await
            .contains("finance-controllers")
    );
    assert_eq!(
        api.decided(
            name,
            "Approve",
            "m.weber",
            &["finance-controllers"],
            Some("damaged in picking")
        )
        .await["state"],
        "Approved"
    );
    // Decided cases take no more decisions.
    let (status, _) = api
        .decide(
            name,
            "Reject",
            "a.other",
            &["finance-controllers"],
            Some("no"),
        )
        .await;
    assert_eq!(status, 403);

    // 4790: 10 of 40 missing, 1490.00 (25 %): a controller rejects it.
    let case = api
        .wait_for_case(WF, &disputed.order_id, "Open", WAIT)
        .await;
    let name = case["name"].as_str().unwrap();
    assert_eq!(case["facts"]["amount"], "1490.00");
    let (status, answer) = api
        .decide(name, "Reject", "m.weber", &["finance-controllers"], None)
        .await;
    assert_eq!(status, 403, "a rejection needs a comment: {answer}");
    assert_eq!(
        api.decided(
            name,
            "Reject",
            "m.weber",
            &["finance-controllers"],
            Some("the customer was promised 40; chase the warehouse")
        )
        .await["state"],
        "Rejected"
    );

    let all = batch.all().len() as u64;
    let counts = api
        .wait_for(NS, WF, WAIT, |c| c.completed == all && c.rejected == 1)
        .await;
    assert_eq!(counts.running, 0);
    assert_eq!(counts.failed, 0);

    assert_invoiced(&erp, &batch.all());
    assert_eq!(
        erp.invoice_count(),
        batch.all().len(),
        "no invoice for the disputed order"
    );
    assert!(
        erp.invoices()
            .iter()
            .all(|d| d.str_field("orderId").as_deref() != Some("4790"))
    );
    dev.verify_and_stop(NS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_dev_mode_mid_run_loses_and_repeats_nothing() {
    let state = tempfile::tempdir().unwrap();
    let (erp, mut dev, api, senders) = start(&state).await;
    let batch = Batch::new();
    for s in batch.all() {
        s.seed(&erp);
    }
    // Invoices take a while, so instances are mid-call when dev mode stops.
    erp.delay("/invoices", Duration::from_millis(150));
    let (first, second) = batch.matching.split_at(8);
    for s in first.iter().chain([&batch.needs_approval]) {
        senders.send("shop", &s.order_created()).await;
        senders.send("wms", &s.shipment_confirmed()).await;
    }
    // The second half has only its orders before the restart.
    for s in second {
        senders.send("shop", &s.order_created()).await;
    }
    api.wait_for_case(WF, &batch.needs_approval.order_id, "Open", WAIT)
        .await;

    dev.restart();
    let (api, senders) = (dev.api(), dev.senders());

    // The case opened before the restart is still there and still open.
    let case = api
        .wait_for_case(WF, &batch.needs_approval.order_id, "Open", WAIT)
        .await;
    // Deliveries the first run stored are recognised as duplicates.
    assert_eq!(
        senders.send("shop", &first[0].order_created()).await,
        Delivery::Duplicate
    );
    for s in second {
        assert_eq!(
            senders.send("wms", &s.shipment_confirmed()).await,
            Delivery::Accepted
        );
    }
    let (status, answer) = api
        .decide(
            case["name"].as_str().unwrap(),
            "Approve",
            "m.weber",
            &["finance-controllers"],
            None,
        )
        .await;
    assert_eq!(status, 200, "{answer}");

    let expected: Vec<&Shipment> = batch
        .matching
        .iter()
        .chain([&batch.needs_approval])
        .collect();
    let n = expected.len() as u64;
    let counts = api.wait_for(NS, WF, WAIT, |c| c.completed == n).await;
    assert_eq!((counts.running, counts.failed), (0, 0));
    assert_invoiced(&erp, &expected);
    assert_eq!(erp.invoice_count(), expected.len());
    dev.verify_and_stop(NS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_event_ids_from_two_systems_are_two_events() {
    let state = tempfile::tempdir().unwrap();
    let (erp, mut dev, api, senders) = start(&state).await;
    let s = Shipment::matching("4801", vec![("A-100", 2, "19.90")]);
    s.seed(&erp);
    // The shop's webhook id and the WMS's event id happen to be equal.
    let mut order = s.order_created();
    order["webhookId"] = "77".into();
    let mut shipment = s.shipment_confirmed();
    shipment["eventId"] = "77".into();
    assert_eq!(senders.send("shop", &order).await, Delivery::Accepted);
    assert_eq!(senders.send("wms", &shipment).await, Delivery::Accepted);
    // Each is still deduplicated within its own system.
    assert_eq!(senders.send("wms", &shipment).await, Delivery::Duplicate);
    api.wait_for(NS, WF, WAIT, |c| c.completed == 1).await;
    assert_invoiced(&erp, &[&s]);
    dev.stop();
}
