//! examples/three-way-match through `tallyman dev`: exact payment approvals
//! (net plus tax, one per vendor invoice) on the simulated payments
//! platform, the documents correlated by PO number in any order, and the
//! mismatches decided by the `payment-approval` policy or through the dev API.
//!
//! The example's `payments` Connector fetches its OAuth 2.0 token from
//! `https://login.payments.example.com/oauth2/token`; `--connector-url
//! payments=…` points that at the simulated platform too (same path).

use std::time::Duration;

use tallyman_e2e::dev::DevMode;
use tallyman_e2e::money::money;
use tallyman_e2e::purchasing::Purchase;
use tallyman_e2e::senders::Delivery;
use tallyman_e2e::{DevApi, Senders, start_example};
use tallyman_testing::erp::SimErp;

const NS: &str = "finance";
const WF: &str = "three-way-match";
const WAIT: Duration = Duration::from_secs(60);
const CLIENT_ID: &str = "dummy-tallyman-client-id";
const CLIENT_SECRET: &str = "dummy-payments-client-secret-change-me";
const ACCESS_TOKEN: &str = "sim-payments-access-token";

async fn start(state: &tempfile::TempDir) -> (SimErp, DevMode, DevApi, Senders) {
    start_example(WF, state.path(), "payments", |erp| {
        erp.enable_oauth2(CLIENT_ID, CLIENT_SECRET, ACCESS_TOKEN)
    })
    .await
}

async fn send_all(senders: &Senders, p: &Purchase) {
    assert_eq!(
        senders.send("erp-purchasing", &p.po_created()).await,
        Delivery::Accepted
    );
    assert_eq!(
        senders.send("wms-receiving", &p.goods_receipt()).await,
        Delivery::Accepted
    );
    assert_eq!(
        senders.send("ap-inbox", &p.vendor_invoice()).await,
        Delivery::Accepted
    );
}

/// Exactly one payment approval per vendor invoice, for net plus tax, to
/// the cent, with the invoice's key and the documents it was matched with.
fn assert_paid(erp: &SimErp, purchases: &[&Purchase]) {
    let approvals = erp.payment_approvals();
    for p in purchases {
        let mine: Vec<_> = approvals
            .iter()
            .filter(|d| d.str_field("invoiceId") == Some(p.invoice_id()))
            .collect();
        assert_eq!(mine.len(), 1, "{}: {approvals:?}", p.po_number);
        let a = mine[0];
        assert_eq!(
            a.field("amount"),
            Some(money(p.payable_cents()).as_str()),
            "{}: {}",
            p.po_number,
            a.body
        );
        assert_eq!(
            a.path,
            format!("/vendors/{}/payment-approvals", p.vendor_id)
        );
        assert_eq!(a.idempotency_key, Some(format!("pay-{}", p.invoice_id())));
        assert_eq!(a.str_field("poNumber"), Some(p.po_number.clone()));
        assert_eq!(
            a.str_field("vendorInvoiceNumber"),
            Some(p.vendor_invoice_number())
        );
        assert_eq!(a.str_field("currency").as_deref(), Some(p.invoice_currency));
        assert_eq!(
            a.str_field("dueAt"),
            Some(format!("{}T00:00:00Z", p.due_date))
        );
        assert_eq!(a.str_field("goodsReceiptId"), Some(p.receipt_id()));
        assert_eq!(
            a.str_field("matchedBy").as_deref(),
            Some("tallyman/three-way-match")
        );
    }
}

fn assert_unpaid(erp: &SimErp, p: &Purchase) {
    assert!(
        erp.payment_approvals()
            .iter()
            .all(|d| d.str_field("poNumber") != Some(p.po_number.clone())),
        "{} must not be approved for payment: {:?}",
        p.po_number,
        erp.payment_approvals()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_invoices_are_approved_for_payment_exactly_and_mismatches_follow_the_policy() {
    let state = tempfile::tempdir().unwrap();
    let (erp, mut dev, api, senders) = start(&state).await;

    // 1000 × 0.12 = 120.00 billed exactly: pays 120.00 + 22.80.
    let exact = Purchase::matching(
        "PO-2026-0001",
        vec![("BOLT-M8", 1000, "0.12")],
        "120.00",
        "22.80",
    );
    // 1001 × 1.00 = 1,001.00; 1,006.01 is 5.01 above, exactly the tolerance
    // roundHalfUp(5.005, 2) = 5.01 (half-even would make it 5.00, and the
    // mismatch, above the policy's 5.00 `rounding`, would need a person).
    let at_tolerance = Purchase::matching(
        "PO-2026-0002",
        vec![("WASHER-12", 1001, "1.00")],
        "1006.01",
        "191.14",
    );
    // 2000 × 0.0525 = 105.00; 108.00 is outside the 0.53 tolerance but
    // within the policy's 5.00 `rounding` rule: approved by the policy.
    let rounding = Purchase::matching(
        "PO-2026-0003",
        vec![("NUT-M8", 2000, "0.0525")],
        "108.00",
        "20.52",
    );
    // Arrives invoice first, then the goods receipt, then the PO.
    let reversed = Purchase::matching(
        "PO-2026-0004",
        vec![("PIPE-20", 12, "14.35"), ("ELBOW-20", 24, "3.10")],
        "246.60",
        "46.85",
    );
    // One of ten motors arrived damaged: an AP lead decides.
    let mut damaged = Purchase::matching(
        "PO-2026-0005",
        vec![("MOTOR-1", 10, "845.00")],
        "8450.00",
        "1605.50",
    );
    damaged.received = vec![("MOTOR-1", 10, 1)];
    // Billed 15 % above the PO: the policy disputes it by itself.
    let overbilled = Purchase::matching(
        "PO-2026-0006",
        vec![("CABLE-5", 100, "2.00")],
        "230.00",
        "43.70",
    );
    // Due in 2099: held until three days before, no approval yet.
    let mut not_yet_due = Purchase::matching(
        "PO-2026-0007",
        vec![("BOLT-M6", 500, "0.09")],
        "45.00",
        "8.55",
    );
    not_yet_due.due_date = "2099-12-31";

    assert!(exact.three_way() && at_tolerance.three_way() && reversed.three_way());
    assert!(!rounding.three_way() && !damaged.three_way() && !overbilled.three_way());
    assert_eq!(at_tolerance.tolerance_cents(), 501);
    assert_eq!(reversed.po_value_cents(), 24660);

    // The held one first, so it has long reached its timer when the others end.
    send_all(&senders, &not_yet_due).await;
    for p in [&exact, &at_tolerance, &rounding, &damaged, &overbilled] {
        send_all(&senders, p).await;
    }
    assert_eq!(
        senders.send("ap-inbox", &reversed.vendor_invoice()).await,
        Delivery::Accepted
    );
    assert_eq!(
        senders
            .send("wms-receiving", &reversed.goods_receipt())
            .await,
        Delivery::Accepted
    );
    assert_eq!(
        senders.send("erp-purchasing", &reversed.po_created()).await,
        Delivery::Accepted
    );
    // Redeliveries are absorbed by the gateway.
    assert_eq!(
        senders.send("ap-inbox", &exact.vendor_invoice()).await,
        Delivery::Duplicate
    );
    assert_eq!(
        senders.send("erp-purchasing", &exact.po_created()).await,
        Delivery::Duplicate
    );
    assert_eq!(
        senders.send("wms-receiving", &exact.goods_receipt()).await,
        Delivery::Duplicate
    );
    // An unposted goods receipt and an invoice without PO reference are not
    // for this workflow.
    let mut draft = exact.goods_receipt();
    draft["status"] = "DRAFT".into();
    draft["id"] = "GR-DRAFT-1".into();
    assert_eq!(
        senders.send("wms-receiving", &draft).await,
        Delivery::Ignored
    );
    let mut no_po = exact.vendor_invoice();
    no_po["invoice"]
        .as_object_mut()
        .unwrap()
        .remove("poReference");
    no_po["documentId"] = "DOC-NO-PO".into();
    assert_eq!(senders.send("ap-inbox", &no_po).await, Delivery::Ignored);

    let counts = api
        .wait_for(NS, WF, WAIT, |c| {
            c.completed == 4 && c.rejected == 1 && c.exceptions >= 1
        })
        .await;
    assert_eq!(
        counts.running, 2,
        "the damaged and the held one: {counts:?}"
    );
    assert_eq!(counts.failed, 0);
    assert_eq!(
        counts.exceptions, 1,
        "only the damaged one needs a person: {counts:?}"
    );
    assert_paid(&erp, &[&exact, &at_tolerance, &rounding, &reversed]);
    assert_eq!(erp.payment_approvals().len(), 4);
    assert_unpaid(&erp, &overbilled);

    // PO-2026-0005 waits for an AP lead.
    let case = api
        .wait_for_case(WF, &damaged.po_number, "Open", WAIT)
        .await;
    let name = case["name"].as_str().unwrap();
    assert_eq!(case["reason"], "ThreeWayMismatch");
    assert_eq!(case["rule"], "ap-lead");
    assert_eq!(case["initiator"], "ap.clerk");
    assert_eq!(case["facts"]["amount"], "10055.50");
    assert_eq!(case["facts"]["poValue"], "8450.00");
    assert_eq!(case["facts"]["invoiceNet"], "8450.00");
    assert_eq!(case["facts"]["difference"], "0.00");
    assert_eq!(case["facts"]["quantitiesMatch"], false);
    assert_eq!(case["facts"]["currencyMatches"], true);
    assert_eq!(case["facts"]["vendorId"], "V-0042");
    assert_unpaid(&erp, &damaged);
    // The clerk who captured the invoice may not approve paying it.
    assert!(
        api.refused(name, "Approve", "ap.clerk", &["ap-leads"], None)
            .await
            .contains("segregation of duties")
    );
    // Below 25,000.00 it is for AP leads, not treasury.
    assert!(
        api.refused(name, "Approve", "t.treasurer", &["treasury"], None)
            .await
            .contains("ap-leads")
    );
    assert_eq!(
        api.decided(
            name,
            "Approve",
            "l.lead",
            &["ap-leads"],
            Some("vendor replaces the motor")
        )
        .await["state"],
        "Approved"
    );

    let counts = api.wait_for(NS, WF, WAIT, |c| c.completed == 5).await;
    assert_eq!((counts.running, counts.rejected, counts.failed), (1, 1, 0));
    assert_paid(
        &erp,
        &[&exact, &at_tolerance, &rounding, &reversed, &damaged],
    );
    assert_eq!(erp.payment_approvals().len(), 5);
    assert_unpaid(&erp, &overbilled);
    // Still held until 2099-12-28.
    assert_unpaid(&erp, &not_yet_due);
    // One token for every approval (cached), and the bearer was accepted.
    assert_eq!(erp.requests("/oauth2/token"), 1);
    assert!(
        erp.recent_requests()
            .iter()
            .filter(|r| r.uri.contains("/payment-approvals"))
            .all(|r| r.status == 201),
        "{:?}",
        erp.recent_requests()
    );

    dev.verify_and_stop(NS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_mismatches_need_two_people_and_a_rejected_one_is_never_paid() {
    let state = tempfile::tempdir().unwrap();
    let (erp, mut dev, api, senders) = start(&state).await;
    // 100 × 300.00 = 30,000.00 billed 30,450.00 (1.5 % above, tolerance
    // 150.00): payable 36,235.50 needs two of ap-leads / treasury.
    let large = Purchase::matching(
        "PO-2026-0101",
        vec![("STEEL-1", 100, "300.00")],
        "30450.00",
        "5785.50",
    );
    // Invoices a line that was never ordered: an AP lead refuses it.
    let mut extra_line = Purchase::matching(
        "PO-2026-0102",
        vec![("VALVE-3", 10, "50.00")],
        "500.00",
        "95.00",
    );
    extra_line.invoiced.push(("GASKET-3", 10, "0.00"));
    assert_eq!(large.difference_cents(), 45000);
    assert_eq!(large.difference_basis_points(), 150);
    assert!(!extra_line.quantities_match());
    send_all(&senders, &large).await;
    send_all(&senders, &extra_line).await;

    let case = api.wait_for_case(WF, &large.po_number, "Open", WAIT).await;
    let name = case["name"].as_str().unwrap();
    assert_eq!(case["rule"], "treasury");
    assert_eq!(case["facts"]["amount"], "36235.50");
    assert_eq!(case["facts"]["difference"], "450.00");
    assert_eq!(case["facts"]["differencePercent"], "1.50");
    let answer = api
        .decided(name, "Approve", "t.one", &["treasury"], None)
        .await;
    assert_eq!(answer["state"], "Open", "one of two approvals: {answer}");
    assert_eq!(answer["approvals"], 1);
    // The same person twice does not make two approvals.
    assert!(
        api.refused(name, "Approve", "t.one", &["treasury"], None)
            .await
            .contains("different person")
    );
    assert!(
        api.refused(name, "Approve", "ap.clerk", &["ap-leads"], None)
            .await
            .contains("segregation of duties")
    );
    assert_unpaid(&erp, &large);
    let answer = api
        .decided(name, "Approve", "l.lead", &["ap-leads"], None)
        .await;
    assert_eq!(answer["state"], "Approved");
    assert_eq!(answer["approvals"], 2);

    let case = api
        .wait_for_case(WF, &extra_line.po_number, "Open", WAIT)
        .await;
    let name = case["name"].as_str().unwrap();
    assert_eq!(case["rule"], "ap-lead");
    assert_eq!(case["facts"]["amount"], "595.00");
    let (status, answer) = api
        .decide(name, "Reject", "l.lead", &["ap-leads"], None)
        .await;
    assert_eq!(status, 403, "a rejection needs a comment: {answer}");
    assert_eq!(
        api.decided(
            name,
            "Reject",
            "l.lead",
            &["ap-leads"],
            Some("GASKET-3 was never ordered; credit memo requested")
        )
        .await["state"],
        "Rejected"
    );

    let counts = api
        .wait_for(NS, WF, WAIT, |c| c.completed == 1 && c.rejected == 1)
        .await;
    assert_eq!((counts.running, counts.failed), (0, 0));
    assert_paid(&erp, &[&large]);
    assert_unpaid(&erp, &extra_line);
    assert_eq!(erp.payment_approvals().len(), 1);
    dev.verify_and_stop(NS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_approved_case_and_a_held_payment_survive_a_restart_of_dev_mode() {
    let state = tempfile::tempdir().unwrap();
    let (erp, mut dev, api, senders) = start(&state).await;
    // 40 × 750.00 = 30,000.00 billed 30,300.00 (1 % above): two approvers.
    let large = Purchase::matching(
        "PO-2026-0301",
        vec![("BEAM-8", 40, "750.00")],
        "30300.00",
        "5757.00",
    );
    // Same amount, but billed in USD: not for the `rounding` rule.
    let mut dollars = Purchase::matching(
        "PO-2026-0302",
        vec![("PUMP-2", 10, "99.00")],
        "990.00",
        "188.10",
    );
    dollars.invoice_currency = "USD";
    let mut not_yet_due = Purchase::matching(
        "PO-2026-0303",
        vec![("BOLT-M6", 500, "0.09")],
        "45.00",
        "8.55",
    );
    not_yet_due.due_date = "2099-12-31";
    for p in [&not_yet_due, &large, &dollars] {
        send_all(&senders, p).await;
    }
    let case = api.wait_for_case(WF, &large.po_number, "Open", WAIT).await;
    let large_case = case["name"].as_str().unwrap().to_string();
    assert_eq!(case["rule"], "treasury");
    assert_eq!(case["facts"]["amount"], "36057.00");
    let case = api
        .wait_for_case(WF, &dollars.po_number, "Open", WAIT)
        .await;
    let dollars_case = case["name"].as_str().unwrap().to_string();
    assert_eq!(case["rule"], "ap-lead");
    assert_eq!(case["facts"]["currencyMatches"], false);
    assert_eq!(case["facts"]["quantitiesMatch"], true);
    assert_eq!(case["facts"]["difference"], "0.00");
    let answer = api
        .decided(&large_case, "Approve", "t.one", &["treasury"], None)
        .await;
    assert_eq!(answer["approvals"], 1);
    let counts = api.counts(NS, WF).await;
    assert_eq!((counts.running, counts.ended()), (3, 0), "{counts:?}");

    dev.restart();
    let (api, senders) = (dev.api(), dev.senders());

    // The first approval is still there, and still counts against t.one.
    let case = api.wait_for_case(WF, &large.po_number, "Open", WAIT).await;
    assert_eq!(case["approvals"], 1);
    let (status, answer) = api
        .decide(&large_case, "Approve", "t.one", &["treasury"], None)
        .await;
    assert_eq!(status, 403, "{answer}");
    // Deliveries of the first run are still known to the gateway.
    assert_eq!(
        senders.send("ap-inbox", &large.vendor_invoice()).await,
        Delivery::Duplicate
    );
    assert_unpaid(&erp, &large);
    assert_eq!(
        api.decided(&large_case, "Approve", "l.lead", &["ap-leads"], None)
            .await["state"],
        "Approved"
    );
    assert_eq!(
        api.decided(
            &dollars_case,
            "Approve",
            "l.lead",
            &["ap-leads"],
            Some("USD agreed with the vendor")
        )
        .await["state"],
        "Approved"
    );

    let counts = api.wait_for(NS, WF, WAIT, |c| c.completed == 2).await;
    assert_eq!((counts.running, counts.rejected, counts.failed), (1, 0, 0));
    assert_paid(&erp, &[&large, &dollars]);
    assert_eq!(erp.payment_approvals().len(), 2);
    assert_unpaid(&erp, &not_yet_due);
    dev.verify_and_stop(NS);
}
