//! examples/returns-to-credit through `tallyman dev`: exact credit notes by
//! inspection grade in the simulated ERP, damaged returns decided through the
//! dev API under the `return-credit-approval` policy, and the `lookup` that
//! keeps an ERP without idempotency keys from booking a credit twice.

use std::time::Duration;

use tallyman_e2e::dev::DevMode;
use tallyman_e2e::money::{money, quoted, raw_objects};
use tallyman_e2e::returns::Return;
use tallyman_e2e::senders::Delivery;
use tallyman_e2e::{DevApi, Senders, start_example};
use tallyman_testing::erp::SimErp;

const NS: &str = "finance";
const WF: &str = "returns-to-credit";
const WAIT: Duration = Duration::from_secs(60);

async fn start(state: &tempfile::TempDir) -> (SimErp, DevMode, DevApi, Senders) {
    // erp-sales authenticates with basic auth from erp-sales-credentials.
    start_example(WF, state.path(), "erp-sales", |erp| {
        erp.require_basic("svc-tallyman", "dummy-erp-sales-password-change-me")
    })
    .await
}

/// Exactly one credit note per credited return: its reference, order,
/// customer, currency, lines and total to the cent.
fn assert_credited(erp: &SimErp, returns: &[&Return]) {
    let notes = erp.credit_notes();
    for r in returns {
        let mine: Vec<_> = notes
            .iter()
            .filter(|d| d.str_field("externalReference") == Some(r.reference()))
            .collect();
        assert_eq!(mine.len(), 1, "{}: {notes:?}", r.rma);
        let note = mine[0];
        assert_eq!(
            note.field("totalAmount"),
            Some(money(r.credit_cents()).as_str()),
            "{}: {}",
            r.rma,
            note.body
        );
        assert_eq!(note.str_field("salesOrder"), Some(r.order_id.clone()));
        assert_eq!(note.str_field("customerId"), Some(r.customer_id.clone()));
        assert_eq!(note.str_field("currency").as_deref(), Some("EUR"));
        let lines = raw_objects(&note.body, "lines");
        let expected = r.credit_lines();
        assert_eq!(lines.len(), expected.len(), "{}: {}", r.rma, note.body);
        for (got, want) in lines.iter().zip(&expected) {
            assert_eq!(got["sku"], quoted(want.sku), "{}", note.body);
            assert_eq!(got["quantity"], want.qty.to_string(), "{}", note.body);
            assert_eq!(got["unitPrice"], want.unit_price, "{}", note.body);
            assert_eq!(got["creditRate"], want.rate, "{}", note.body);
            assert_eq!(got["amount"], want.amount, "{}", note.body);
        }
    }
}

fn assert_not_credited(erp: &SimErp, r: &Return) {
    assert!(
        erp.credit_notes()
            .iter()
            .all(|d| d.str_field("externalReference") != Some(r.reference())),
        "{} must not be credited: {:?}",
        r.rma,
        erp.credit_notes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_are_credited_by_grade_to_the_cent_and_damaged_goods_follow_the_policy() {
    let state = tempfile::tempdir().unwrap();
    let (erp, mut dev, api, senders) = start(&state).await;

    // As new: 2 × 19.90 = 39.80.
    let as_new = Return::new(
        "RMA-1001",
        "5001",
        vec![("A-100", 3, "19.90"), ("B-200", 1, "149.00")],
        vec![("A-100", 2, "A")],
    );
    // Opened: 2 × 149.00 × 0.85 + 12.10 × 0.85 + 10 × 1.25
    //       = 253.30 + 10.285 + 12.50 = 276.085 → 276.08 (half-even).
    let opened = Return::new(
        "RMA-1002",
        "5002",
        vec![
            ("B-200", 2, "149.00"),
            ("F-600", 1, "12.10"),
            ("C-300", 10, "1.25"),
        ],
        vec![("B-200", 2, "B"), ("F-600", 1, "B"), ("C-300", 10, "A")],
    );
    // Damaged but small: 89.00 × 0.5 = 44.50, the scrap credits nothing;
    // the policy's `small-credit` approves it by itself.
    let small_damage = Return::new(
        "RMA-1003",
        "5003",
        vec![("D-400", 2, "89.00"), ("E-500", 20, "0.35")],
        vec![("D-400", 1, "C"), ("E-500", 4, "D")],
    );
    // Damaged: 10 × 149.00 × 0.5 + 19.90 × 0.85 = 745.00 + 16.915 = 761.915
    // → 761.92: one customer-service lead must approve.
    let damaged = Return::new(
        "RMA-1004",
        "5004",
        vec![("B-200", 12, "149.00"), ("A-100", 1, "19.90")],
        vec![("B-200", 10, "C"), ("A-100", 1, "B")],
    );
    // The inspection arrives before the return: 40 × 1.25 = 50.00.
    let early_inspection = Return::new(
        "RMA-1005",
        "5005",
        vec![("C-300", 40, "1.25")],
        vec![("C-300", 40, "A")],
    );
    // Everything scrapped: closed, nothing booked, nobody asked.
    let scrapped = Return::new(
        "RMA-1006",
        "5006",
        vec![("E-500", 10, "0.35")],
        vec![("E-500", 10, "D")],
    );
    // Two came back of one ordered: not on the order, Failed.
    let unmatched = Return::new(
        "RMA-1007",
        "5007",
        vec![("A-100", 1, "19.90")],
        vec![("A-100", 2, "A")],
    );
    assert_eq!(opened.credit_cents(), 27608);
    assert_eq!(damaged.credit_cents(), 76192);
    let all = [
        &as_new,
        &opened,
        &small_damage,
        &damaged,
        &early_inspection,
        &scrapped,
        &unmatched,
    ];
    for r in all {
        r.seed(&erp);
    }

    for r in [
        &as_new,
        &opened,
        &small_damage,
        &damaged,
        &scrapped,
        &unmatched,
    ] {
        assert_eq!(
            senders.send("wms-returns", &r.received()).await,
            Delivery::Accepted
        );
        assert_eq!(
            senders.send("wms-returns", &r.inspected()).await,
            Delivery::Accepted
        );
    }
    let late = &early_inspection;
    assert_eq!(
        senders.send("wms-returns", &late.inspected()).await,
        Delivery::Accepted
    );
    assert_eq!(
        senders.send("wms-returns", &late.received()).await,
        Delivery::Accepted
    );
    // The WMS redelivers: absorbed by the gateway.
    assert_eq!(
        senders.send("wms-returns", &as_new.received()).await,
        Delivery::Duplicate
    );
    assert_eq!(
        senders.send("wms-returns", &as_new.inspected()).await,
        Delivery::Duplicate
    );
    // An event type no `when` selects: no event, no instance.
    let mut cancelled = as_new.received();
    cancelled["eventType"] = "RETURN_CANCELLED".into();
    cancelled["eventId"] = "evt-cancel-1001".into();
    cancelled["rma"] = "RMA-1999".into();
    assert_eq!(
        senders.send("wms-returns", &cancelled).await,
        Delivery::Ignored
    );

    let counts = api
        .wait_for(NS, WF, WAIT, |c| {
            c.completed == 5 && c.failed == 1 && c.exceptions == 1
        })
        .await;
    assert_eq!(
        counts.running, 1,
        "only the damaged return waits: {counts:?}"
    );
    assert_credited(&erp, &[&as_new, &opened, &small_damage, &early_inspection]);
    assert_eq!(erp.credit_notes().len(), 4, "{:?}", erp.credit_notes());

    // RMA-1004 waits for a customer-service lead.
    let case = api.wait_for_case(WF, &damaged.rma, "Open", WAIT).await;
    let name = case["name"].as_str().unwrap();
    assert_eq!(case["reason"], "DamagedReturn");
    assert_eq!(case["rule"], "customer-service");
    assert_eq!(case["initiator"], "m.mueller");
    assert_eq!(case["facts"]["amount"], "761.92");
    assert_eq!(
        case["facts"]["fullValue"],
        money(damaged.full_value_cents())
    );
    assert_eq!(case["facts"]["damagedSkus"], serde_json::json!(["B-200"]));
    assert_eq!(case["facts"]["orderId"], "5004");
    assert_eq!(case["facts"]["customerId"], "C-5004");
    assert_not_credited(&erp, &damaged);
    // The inspector may not approve the credit for their own inspection.
    assert!(
        api.refused(
            name,
            "Approve",
            "m.mueller",
            &["customer-service-leads"],
            None
        )
        .await
        .contains("segregation of duties")
    );
    // Up to 2,500.00 only customer-service leads decide, not controllers.
    assert!(
        api.refused(name, "Approve", "m.weber", &["finance-controllers"], None)
            .await
            .contains("customer-service-leads")
    );
    assert_eq!(
        api.decided(
            name,
            "Approve",
            "c.lead",
            &["customer-service-leads"],
            Some("packaging damage, our carrier")
        )
        .await["state"],
        "Approved"
    );

    let counts = api.wait_for(NS, WF, WAIT, |c| c.completed == 6).await;
    assert_eq!((counts.running, counts.failed, counts.rejected), (0, 1, 0));
    assert_credited(
        &erp,
        &[&as_new, &opened, &small_damage, &damaged, &early_inspection],
    );
    assert_eq!(erp.credit_notes().len(), 5);
    assert_not_credited(&erp, &scrapped);
    assert_not_credited(&erp, &unmatched);
    // Prices come from the ERP's sales order, once per return that arrived.
    assert_eq!(erp.requests("/sales-orders/"), all.len());

    dev.verify_and_stop(NS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credit_books_nothing_and_a_large_one_needs_the_finance_rule() {
    let state = tempfile::tempdir().unwrap();
    let (erp, mut dev, api, senders) = start(&state).await;
    // 30 × 89.00 × 0.5 = 1,335.00: customer service decides, and refuses.
    let refused = Return::new(
        "RMA-2001",
        "6001",
        vec![("D-400", 30, "89.00")],
        vec![("D-400", 30, "C")],
    );
    // 40 × 149.00 × 0.5 = 2,980.00: above 2,500.00, controllers may decide.
    let large = Return::new(
        "RMA-2002",
        "6002",
        vec![("B-200", 40, "149.00")],
        vec![("B-200", 40, "C")],
    );
    for r in [&refused, &large] {
        r.seed(&erp);
        assert_eq!(
            senders.send("wms-returns", &r.received()).await,
            Delivery::Accepted
        );
        assert_eq!(
            senders.send("wms-returns", &r.inspected()).await,
            Delivery::Accepted
        );
    }

    let case = api.wait_for_case(WF, &refused.rma, "Open", WAIT).await;
    let name = case["name"].as_str().unwrap();
    assert_eq!(case["rule"], "customer-service");
    assert_eq!(case["facts"]["amount"], "1335.00");
    let (status, answer) = api
        .decide(name, "Reject", "c.lead", &["customer-service-leads"], None)
        .await;
    assert_eq!(status, 403, "a rejection needs a comment: {answer}");
    assert!(answer["detail"].as_str().unwrap().contains("comment"));
    assert_eq!(
        api.decided(
            name,
            "Reject",
            "c.lead",
            &["customer-service-leads"],
            Some("damage caused by the customer, photos in the ticket")
        )
        .await["state"],
        "Rejected"
    );

    let case = api.wait_for_case(WF, &large.rma, "Open", WAIT).await;
    let name = case["name"].as_str().unwrap();
    assert_eq!(case["rule"], "finance");
    assert_eq!(case["facts"]["amount"], "2980.00");
    assert!(
        api.refused(name, "Approve", "s.sales", &["sales"], None)
            .await
            .contains("finance-controllers")
    );
    assert_eq!(
        api.decided(name, "Approve", "m.weber", &["finance-controllers"], None)
            .await["state"],
        "Approved"
    );

    let counts = api
        .wait_for(NS, WF, WAIT, |c| c.completed == 1 && c.rejected == 1)
        .await;
    assert_eq!((counts.running, counts.failed), (0, 0));
    assert_credited(&erp, &[&large]);
    assert_not_credited(&erp, &refused);
    assert_eq!(erp.credit_notes().len(), 1);
    dev.verify_and_stop(NS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_note_booked_but_unanswered_is_found_by_its_reference_not_booked_again() {
    let state = tempfile::tempdir().unwrap();
    let (erp, mut dev, api, senders) = start(&state).await;
    let r = Return::new(
        "RMA-3001",
        "7001",
        vec![("A-100", 5, "19.90")],
        vec![("A-100", 5, "B")],
    );
    r.seed(&erp);
    // The ERP books the credit note, then the answer is lost: without an
    // idempotency key only the lookup before the retry prevents a second.
    erp.fail_next_after_commit_on("POST", "/credit-notes", 1, 503);
    assert_eq!(
        senders.send("wms-returns", &r.received()).await,
        Delivery::Accepted
    );
    assert_eq!(
        senders.send("wms-returns", &r.inspected()).await,
        Delivery::Accepted
    );

    let counts = api.wait_for(NS, WF, WAIT, |c| c.ended() == 1).await;
    assert_eq!(counts.completed, 1, "{counts:?}\n{}", dev.tail());
    // 5 × 19.90 × 0.85 = 84.575 → 84.58 (half-even: 7 is odd).
    assert_eq!(r.credit_cents(), 8458);
    assert_credited(&erp, &[&r]);
    assert_eq!(erp.credit_notes().len(), 1);
    let log = erp.recent_requests();
    let posts = log
        .iter()
        .filter(|q| q.method == "POST" && q.uri == "/credit-notes")
        .count();
    let lookups: Vec<u16> = log
        .iter()
        .filter(|q| q.method == "GET" && q.uri == "/credit-notes/by-reference/rma-RMA-3001")
        .map(|q| q.status)
        .collect();
    assert_eq!(posts, 1, "one POST, its answer lost; no second");
    assert_eq!(lookups, vec![404, 200], "a lookup before each attempt");
    assert_eq!(counts.exceptions, 0);
    dev.verify_and_stop(NS);
}
