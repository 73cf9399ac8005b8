//! examples/inventory-adjustment through `tallyman dev`: every stock
//! adjustment posted once to the simulated ERP ledger at its exact value and
//! stock-difference account, large ones decided by the
//! `inventory-adjustment-approval` policy or through the dev API, and the
//! ledger's refusals and lost answers.

use std::time::Duration;

use tallyman_e2e::dev::DevMode;
use tallyman_e2e::inventory::Adjustment;
use tallyman_e2e::money::{money, quoted, raw_objects};
use tallyman_e2e::senders::Delivery;
use tallyman_e2e::{DevApi, Senders, start_example};
use tallyman_testing::erp::SimErp;

const NS: &str = "finance";
const WF: &str = "inventory-adjustment";
const WAIT: Duration = Duration::from_secs(60);

async fn start(state: &tempfile::TempDir) -> (SimErp, DevMode, DevApi, Senders) {
    // erp-ledger sends the API key of the erp-ledger-api-key Secret.
    start_example(WF, state.path(), "erp-ledger", |erp| {
        erp.require_api_key("X-API-Key", "dummy-erp-ledger-api-key-change-me")
    })
    .await
}

/// Exactly one posting per adjustment, in its warehouse, with its default
/// idempotency key, account, lines and net value to the cent.
fn assert_posted(erp: &SimErp, adjustments: &[&Adjustment]) {
    let postings = erp.stock_adjustments();
    for a in adjustments {
        let mine: Vec<_> = postings
            .iter()
            .filter(|d| d.str_field("reference") == Some(a.id.clone()))
            .collect();
        assert_eq!(mine.len(), 1, "{}: {postings:?}", a.id);
        let p = mine[0];
        assert_eq!(
            p.field("netValue"),
            Some(money(a.net_cents()).as_str()),
            "{}: {}",
            a.id,
            p.body
        );
        assert_eq!(
            p.path,
            format!("/warehouses/{}/stock-adjustments", a.warehouse)
        );
        assert_eq!(p.idempotency_key, Some(a.posting_key()));
        assert_eq!(
            p.str_field("glAccount").as_deref(),
            Some(a.gl_account()),
            "{}",
            a.id
        );
        assert_eq!(p.str_field("reasonCode").as_deref(), Some(a.reason_code));
        assert_eq!(p.str_field("documentDate").as_deref(), Some(a.timestamp));
        let lines = raw_objects(&p.body, "lines");
        let moving = a.moving();
        assert_eq!(
            lines.len(),
            moving.len(),
            "zero deltas are not posted: {}",
            p.body
        );
        for ((got, (sku, _, delta, cost)), value) in lines.iter().zip(&moving).zip(a.line_values())
        {
            assert_eq!(got["sku"], quoted(sku), "{}", p.body);
            assert_eq!(got["quantity"], delta.to_string(), "{}", p.body);
            // The WMS sends unit costs as text; they pass through as text.
            assert_eq!(got["unitCost"], quoted(cost), "{}", p.body);
            assert_eq!(got["value"], value, "{}", p.body);
        }
    }
}

fn assert_not_posted(erp: &SimErp, a: &Adjustment) {
    assert!(
        erp.stock_adjustments()
            .iter()
            .all(|d| d.str_field("reference") != Some(a.id.clone())),
        "{} must not reach the books: {:?}",
        a.id,
        erp.stock_adjustments()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjustments_are_posted_at_their_exact_value_and_large_ones_follow_the_policy() {
    let state = tempfile::tempdir().unwrap();
    let (erp, mut dev, api, senders) = start(&state).await;

    // 3 × 4.99 lost: -14.97, below 250.00, nobody asked.
    let small = Adjustment::new(
        "ADJ-2026-0001",
        "SHRINKAGE",
        vec![("SOCK-1", "K02-11", -3, "4.99")],
    );
    // +5 × 20.00 − 1 × 412.50 = -312.50 net, 512.50 gross; a recount below
    // 1,000.00 the policy approves by itself. The zero line is not posted.
    let recount = Adjustment::new(
        "ADJ-2026-0002",
        "CYCLE_COUNT",
        vec![
            ("SCREW-4", "A01-03", 5, "20.00"),
            ("TV-55", "H01-01", -1, "412.50"),
            ("CABLE-2", "B02-07", 0, "3.00"),
        ],
    );
    // An unknown reason goes to suspense account 5499.
    let unknown = Adjustment::new(
        "ADJ-2026-0003",
        "THEFT",
        vec![("PHONE-9", "S01-01", -2, "19.99")],
    );
    // A gain: +3 × 7.15 = 21.45.
    let gain = Adjustment::new(
        "ADJ-2026-0004",
        "CYCLE_COUNT",
        vec![("BULB-E27", "L04-02", 3, "7.15")],
    );
    // Another warehouse, its own ledger path.
    let mut munich = Adjustment::new(
        "ADJ-2026-0005",
        "DAMAGE",
        vec![("MUG-1", "M01-01", -4, "6.25")],
    );
    munich.warehouse = "DE-MUC-2";
    // 5 × 412.50 damaged: 2,062.50 needs one inventory or finance controller.
    let damaged = Adjustment::new(
        "ADJ-2026-0006",
        "DAMAGE",
        vec![("TV-55", "H01-01", -5, "412.50")],
    );
    // 30 × 412.50 shrinkage: 12,375.00 needs two people.
    let write_off = Adjustment::new(
        "ADJ-2026-0007",
        "SHRINKAGE",
        vec![("TV-55", "H01-02", -30, "412.50")],
    );
    assert_eq!(recount.net_cents(), -31250);
    assert_eq!(recount.gross_cents(), 51250);

    let automatic = [&small, &recount, &unknown, &gain, &munich];
    for a in automatic.iter().copied().chain([&damaged, &write_off]) {
        assert_eq!(
            senders.send("wms-inventory", &a.payload()).await,
            Delivery::Accepted
        );
    }
    // The WMS redelivers: absorbed.
    assert_eq!(
        senders.send("wms-inventory", &small.payload()).await,
        Delivery::Duplicate
    );
    // A recount that changed nothing: no event, no instance.
    let nothing = Adjustment::new(
        "ADJ-2026-0008",
        "CYCLE_COUNT",
        vec![("SOCK-1", "K02-11", 0, "4.99")],
    );
    assert_eq!(
        senders.send("wms-inventory", &nothing.payload()).await,
        Delivery::Ignored
    );

    let counts = api
        .wait_for(NS, WF, WAIT, |c| c.completed == 5 && c.exceptions == 2)
        .await;
    assert_eq!((counts.running, counts.failed, counts.rejected), (2, 0, 0));
    assert_posted(&erp, &automatic);
    assert_eq!(erp.stock_adjustments().len(), 5);

    // ADJ-2026-0006: one controller.
    let case = api.wait_for_case(WF, &damaged.id, "Open", WAIT).await;
    let name = case["name"].as_str().unwrap();
    assert_eq!(case["reason"], "LargeAdjustment");
    assert_eq!(case["rule"], "controller");
    assert_eq!(case["initiator"], "k.meyer");
    assert_eq!(case["facts"]["grossValue"], "2062.50");
    assert_eq!(case["facts"]["netValue"], "-2062.50");
    assert_eq!(case["facts"]["reasonCode"], "DAMAGE");
    assert_eq!(case["facts"]["warehouse"], "DE-HAM-1");
    assert_eq!(case["facts"]["lines"], 1);
    // The user who booked it may not approve it.
    assert!(
        api.refused(name, "Approve", "k.meyer", &["inventory-controllers"], None)
            .await
            .contains("segregation of duties")
    );
    assert!(
        api.refused(name, "Approve", "s.sales", &["sales"], None)
            .await
            .contains("inventory-controllers")
    );
    assert_eq!(
        api.decided(name, "Approve", "i.ctrl", &["inventory-controllers"], None)
            .await["state"],
        "Approved"
    );

    // ADJ-2026-0007: two different people from finance or the CFO office.
    let case = api.wait_for_case(WF, &write_off.id, "Open", WAIT).await;
    let name = case["name"].as_str().unwrap();
    assert_eq!(case["rule"], "dual");
    assert_eq!(case["facts"]["grossValue"], "12375.00");
    assert_eq!(case["required"]["count"], 2);
    let (status, answer) = api
        .decide(name, "Approve", "m.weber", &["finance-controllers"], None)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["state"].as_str(), answer["approvals"].as_u64()),
        (Some("Open"), Some(1))
    );
    assert!(
        api.refused(name, "Approve", "m.weber", &["finance-controllers"], None)
            .await
            .contains("different person")
    );
    // Inventory controllers may approve 2,062.50 but not 12,375.00.
    assert!(
        api.refused(name, "Approve", "i.ctrl", &["inventory-controllers"], None)
            .await
            .contains("cfo-office")
    );
    assert_not_posted(&erp, &write_off);
    assert_eq!(
        api.decided(
            name,
            "Approve",
            "c.fo",
            &["cfo-office"],
            Some("stocktake confirmed")
        )
        .await["state"],
        "Approved"
    );

    let counts = api.wait_for(NS, WF, WAIT, |c| c.completed == 7).await;
    assert_eq!((counts.running, counts.failed, counts.rejected), (0, 0, 0));
    let all: Vec<&Adjustment> = automatic
        .iter()
        .copied()
        .chain([&damaged, &write_off])
        .collect();
    assert_posted(&erp, &all);
    assert_eq!(erp.stock_adjustments().len(), 7);
    assert_eq!(erp.duplicates_prevented(), 0);

    dev.verify_and_stop(NS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_adjustments_and_refused_postings_never_reach_the_books_and_a_lost_answer_posts_once()
 {
    let state = tempfile::tempdir().unwrap();
    let (erp, mut dev, api, senders) = start(&state).await;
    // 2 × 412.50 damaged: a controller rejects it (the WMS reverses it).
    let rejected = Adjustment::new(
        "ADJ-2026-0101",
        "DAMAGE",
        vec![("TV-55", "H01-01", -2, "412.50")],
    );
    // The Munich ledger period is closed: 422, for good.
    let mut closed_period = Adjustment::new(
        "ADJ-2026-0102",
        "SHRINKAGE",
        vec![("MUG-1", "M01-01", -1, "6.25")],
    );
    closed_period.warehouse = "DE-MUC-2";
    // The Berlin ledger posts, then the answer is lost; the retry carries the
    // same idempotency key and gets the first posting back.
    let mut lost_answer = Adjustment::new(
        "ADJ-2026-0103",
        "CYCLE_COUNT",
        vec![("SOCK-1", "B01-01", 12, "4.99")],
    );
    lost_answer.warehouse = "DE-BER-3";
    erp.fail_next("/warehouses/DE-MUC-2/", 1, 422);
    erp.fail_next_after_commit("/warehouses/DE-BER-3/", 1, 503);
    for a in [&rejected, &closed_period, &lost_answer] {
        assert_eq!(
            senders.send("wms-inventory", &a.payload()).await,
            Delivery::Accepted
        );
    }

    let case = api.wait_for_case(WF, &rejected.id, "Open", WAIT).await;
    let name = case["name"].as_str().unwrap();
    assert_eq!(case["rule"], "controller");
    assert_eq!(case["facts"]["grossValue"], "825.00");
    let (status, answer) = api
        .decide(name, "Reject", "m.weber", &["finance-controllers"], None)
        .await;
    assert_eq!(status, 403, "a rejection needs a comment: {answer}");
    assert!(answer["detail"].as_str().unwrap().contains("comment"));
    assert_eq!(
        api.decided(
            name,
            "Reject",
            "m.weber",
            &["finance-controllers"],
            Some("the TVs are in returns, not damaged")
        )
        .await["state"],
        "Rejected"
    );

    let counts = api.wait_for(NS, WF, WAIT, |c| c.ended() == 3).await;
    assert_eq!(
        (
            counts.completed,
            counts.rejected,
            counts.failed,
            counts.running
        ),
        (1, 1, 1, 0),
        "{counts:?}\n{}",
        dev.tail()
    );
    assert_not_posted(&erp, &rejected);
    assert_not_posted(&erp, &closed_period);
    assert_posted(&erp, &[&lost_answer]);
    assert_eq!(money(lost_answer.net_cents()), "59.88");
    assert_eq!(erp.stock_adjustments().len(), 1);
    // The retry after the lost answer was a replay, not a second posting.
    assert_eq!(erp.duplicates_prevented(), 1);
    assert_eq!(erp.requests("/warehouses/DE-BER-3/"), 2);
    // A 422 is final: no retry.
    assert_eq!(erp.requests("/warehouses/DE-MUC-2/"), 1);
    // Only the rejected adjustment needed a person; the refused posting
    // took its onFailure route instead of opening a CallFailed case.
    assert_eq!(counts.exceptions, 1);

    dev.verify_and_stop(NS);
}
