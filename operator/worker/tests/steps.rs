//! The other examples, run for real: every step kind (`await`, `call`,
//! `check`, `approval`, `emit`, `set`, `wait`), `when` guards, call lookups,
//! and the `onFalse`, `onFailure` and `onRejected` routes, against a real
//! nats-server and the simulated ERP, ledger and payments platform.

mod support;

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use support::*;
use tallyman_api::v1alpha1::{CaseState, Verdict};
use tallyman_core::audit::AuditKind;
use tallyman_core::engine::{Status, Wait};
use tallyman_testing::erp::OrderLine;

const NS: &str = "finance";

/// The case opened for an instance.
async fn case_for(run: &Running, key: &str) -> tallyman_worker::cases::CaseRecord {
    let started = std::time::Instant::now();
    loop {
        let cases = run.worker.cases().list().await.unwrap();
        if let Some(case) = cases.into_iter().find(|c| c.spec.key == key) {
            return case;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no case opened for {key}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The kinds of an instance's audit records, with their step.
async fn trail(nats: &str, key: &str) -> Vec<(AuditKind, Option<String>)> {
    audit_of(nats, NS, key)
        .await
        .into_iter()
        .map(|r| (r.kind, r.step))
        .collect()
}

fn has(trail: &[(AuditKind, Option<String>)], kind: AuditKind, step: &str) -> bool {
    trail
        .iter()
        .any(|(k, s)| *k == kind && s.as_deref() == Some(step))
}

// --- inventory-adjustment ---------------------------------------------------

fn adjustment(id: &str, warehouse: &str, reason: &str, user: &str, lines: &str) -> String {
    format!(
        r#"{{"adjustmentId":"{id}","warehouse":"{warehouse}","reasonCode":"{reason}","adjustedBy":"{user}",
            "adjustedAt":"2026-11-26T08:12:00Z","lines":{lines}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_adjustments_are_valued_approved_and_posted_once() {
    let env = env("inventory-adjustment").await;
    env.erp
        .require_api_key("X-API-Key", "dummy-erp-ledger-api-key-change-me");
    // The period of this warehouse is closed: the ledger refuses for good.
    env.erp
        .fail_next("/warehouses/DE-BER-2/stock-adjustments", 1, 422);
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    let ty = "inventory.adjusted";
    // 30 x 412.50 lost: 12375.00, the dual rule; two people must approve.
    let large = adjustment(
        "ADJ-1",
        "DE-HAM-1",
        "SHRINKAGE",
        "k.meyer",
        r#"[{"sku":"TV-55","location":"H01-01","delta":-30,"unitCost":"412.50"}]"#,
    );
    // A recount worth 2 x 412.50 + 3 x 0.35 - 1 x 100 = 726.05 net, 926.05
    // gross: the policy approves it without asking anyone.
    let recount = adjustment(
        "ADJ-2",
        "DE-HAM-1",
        "CYCLE_COUNT",
        "k.meyer",
        r#"[{"sku":"TV-55","location":"H01-02","delta":2,"unitCost":"412.50"},
            {"sku":"CABLE","location":"B02-01","delta":3,"unitCost":"0.35"},
            {"sku":"TV-32","location":"H02-01","delta":-1,"unitCost":"100"}]"#,
    );
    // 2 x 10.00: below 250.00, nobody is asked.
    let small = adjustment(
        "ADJ-3",
        "DE-HAM-1",
        "DAMAGE",
        "k.meyer",
        r#"[{"sku":"MUG","location":"A01-01","delta":-2,"unitCost":"10.00"}]"#,
    );
    let refused = adjustment(
        "ADJ-4",
        "DE-BER-2",
        "UNKNOWN",
        "l.weber",
        r#"[{"sku":"MUG","location":"A01-01","delta":-1,"unitCost":"9.99"}]"#,
    );
    for (id, data) in [
        ("ADJ-1", &large),
        ("ADJ-2", &recount),
        ("ADJ-3", &small),
        ("ADJ-4", &refused),
    ] {
        publish(&js, NS, ty, id, data).await;
    }

    wait_status(&run, "ADJ-2", Status::Completed).await;
    wait_status(&run, "ADJ-3", Status::Completed).await;
    wait_status(&run, "ADJ-4", Status::Failed).await;

    // The large one waits for two different people.
    let case = case_for(&run, "ADJ-1").await;
    assert_eq!(case.spec.reason, "LargeAdjustment");
    assert_eq!(case.spec.rule, "dual");
    assert_eq!(case.spec.facts["grossValue"], "12375.00");
    assert_eq!(case.spec.facts["netValue"], "-12375.00");
    assert_eq!(case.spec.initiator, "k.meyer");
    let cases = run.worker.cases();
    let own = decision("k.meyer", "finance-controllers", Verdict::Approve, None);
    assert!(cases.decide(&case.name, own, Utc::now()).await.is_err());
    let first = decision("alice", "finance-controllers", Verdict::Approve, None);
    let after_one = cases.decide(&case.name, first, Utc::now()).await.unwrap();
    assert_eq!(after_one.status.state, CaseState::Open, "one of two");
    let again = decision("alice", "cfo-office", Verdict::Approve, None);
    assert!(cases.decide(&case.name, again, Utc::now()).await.is_err());
    let second = decision("carol", "cfo-office", Verdict::Approve, None);
    let decided = cases.decide(&case.name, second, Utc::now()).await.unwrap();
    assert_eq!(decided.status.state, CaseState::Approved);
    wait_status(&run, "ADJ-1", Status::Completed).await;

    // One posting per adjustment, in the right account, value to the cent.
    let postings = env.erp.stock_adjustments();
    assert_eq!(postings.len(), 3, "ADJ-4 was refused");
    let posting = |id: &str| {
        postings
            .iter()
            .find(|p| p.str_field("reference").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no posting for {id}"))
    };
    let p1 = posting("ADJ-1");
    assert_eq!(p1.path, "/warehouses/DE-HAM-1/stock-adjustments");
    assert_eq!(p1.field("netValue"), Some("-12375.00"));
    assert_eq!(p1.str_field("glAccount").as_deref(), Some("5420"));
    let p2 = posting("ADJ-2");
    assert_eq!(p2.field("netValue"), Some("726.05"));
    assert_eq!(p2.str_field("glAccount").as_deref(), Some("5400"));
    assert_eq!(posting("ADJ-3").field("netValue"), Some("-20.00"));
    for p in &postings {
        let key = p.idempotency_key.as_deref().unwrap_or_default();
        let reference = p.str_field("reference").unwrap();
        assert!(
            key.ends_with(&format!("/{reference}/posting")),
            "the default key is deterministic per adjustment: {key}"
        );
    }

    // Who was asked, and who not.
    let nats = env.nats.url();
    assert!(has(
        &trail(&nats, "ADJ-1").await,
        AuditKind::CaseApproved,
        "value-approval"
    ));
    let t2 = trail(&nats, "ADJ-2").await;
    assert!(
        has(&t2, AuditKind::CaseApproved, "value-approval"),
        "{t2:?}"
    );
    assert!(!has(&t2, AuditKind::CaseOpened, "value-approval"), "{t2:?}");
    let t3 = trail(&nats, "ADJ-3").await;
    assert!(has(&t3, AuditKind::StepSkipped, "value-approval"), "{t3:?}");

    // The refused posting took onFailure: told the WMS team, ended Failed.
    let inst = run.worker.instance("ADJ-4").await.unwrap().unwrap();
    assert!(inst.outcome.unwrap().contains("HTTP 422"));
    let failed = wait_emitted(&js, NS, "inventory.posting-failed", 1).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["data"]["adjustmentId"], "ADJ-4");
    assert_eq!(failed[0].data_text("netValue"), "-9.99");
    assert_eq!(
        env.erp.requests("/warehouses/DE-BER-2"),
        1,
        "a 422 is not retried"
    );

    let posted = wait_emitted(&js, NS, "inventory.adjustment-posted", 3).await;
    assert_eq!(posted.len(), 3);
    let documents: Vec<String> = posted
        .iter()
        .map(|e| e["data"]["documentNumber"].as_str().unwrap().to_string())
        .collect();
    let mut expected: Vec<String> = postings.iter().map(|p| p.id.clone()).collect();
    let mut got = documents.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "each event names its ledger document");
    run.shutdown().await;
}

// --- three-way-match --------------------------------------------------------

fn purchase_order(po: &str, qty: i64, price: &str) -> String {
    format!(
        r#"{{"poNumber":"{po}","vendorId":"V-0042","vendorName":"Acme Fasteners","currency":"EUR","buyer":"buyer.jane",
            "lines":[{{"lineNo":10,"sku":"BOLT-M8","qty":{qty},"unitPrice":"{price}"}}]}}"#
    )
}

fn goods_receipt(po: &str, qty: i64) -> String {
    format!(
        r#"{{"poNumber":"{po}","receiptId":"GR-{po}","warehouse":"DE-HAM-1","receivedBy":"k.meyer",
            "lines":[{{"sku":"BOLT-M8","qty":{qty}}}]}}"#
    )
}

fn vendor_invoice(po: &str, qty: i64, net: &str, tax: &str, due: &str) -> String {
    format!(
        r#"{{"poNumber":"{po}","invoiceId":"DOC-{po}","vendorInvoiceNumber":"ACME-{po}","vendorId":"V-0042",
            "currency":"EUR","netTotal":"{net}","taxTotal":"{tax}","dueAt":"{due}","capturedBy":"ap.clerk",
            "lines":[{{"sku":"BOLT-M8","qty":{qty},"unitPrice":"0.1204"}}]}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_way_match_holds_the_payment_until_three_days_before_due() {
    let mut env = env("three-way-match").await;
    let token_url = env.erp.url("/oauth2/token");
    let rest = env.def.connectors.get_mut("payments").unwrap();
    let rest = rest.rest.as_mut().unwrap();
    let oauth2 = rest.auth.as_mut().unwrap();
    oauth2.oauth2_client_credentials.as_mut().unwrap().token_url = token_url;
    env.erp.enable_oauth2(
        "dummy-tallyman-client-id",
        "dummy-payments-client-secret-change-me",
        "payments-token",
    );
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);

    // Due in three days and four seconds (whole seconds, as the AP inbox
    // sends it): the payment is released in about four seconds, not now.
    let due_at = chrono::DateTime::from_timestamp(
        (Utc::now() + chrono::Duration::hours(72) + chrono::Duration::seconds(4)).timestamp(),
        0,
    )
    .unwrap();
    let release = due_at - chrono::Duration::hours(72);
    let due = due_at.to_rfc3339_opts(SecondsFormat::Secs, true);
    // 1000 x 0.12 = 120.00 ordered; 120.40 invoiced is within 0.5 % (0.60).
    // The documents arrive in any order.
    let po = "PO-2026-0815";
    publish(
        &js,
        NS,
        "vendor-invoice.received",
        "doc-1",
        &vendor_invoice(po, 1000, "120.40", "22.88", &due),
    )
    .await;
    publish(&js, NS, "goods.received", "gr-1", &goods_receipt(po, 1000)).await;
    // Overbilled by 20 %: the policy rejects it without asking anyone.
    let over = "PO-2026-0816";
    publish(
        &js,
        NS,
        "po.created",
        "po-2",
        &purchase_order(over, 100, "10.00"),
    )
    .await;
    publish(&js, NS, "goods.received", "gr-2", &goods_receipt(over, 100)).await;
    publish(
        &js,
        NS,
        "vendor-invoice.received",
        "doc-2",
        &vendor_invoice(over, 100, "1200.00", "228.00", &due),
    )
    .await;
    eventually(
        "two documents to arrive",
        Duration::from_secs(10),
        || async {
            run.worker
                .instance(po)
                .await
                .unwrap()
                .is_some_and(|i| i.events.len() == 2)
        },
    )
    .await;
    let inst = run.worker.instance(po).await.unwrap().unwrap();
    assert!(
        matches!(inst.wait, Some(Wait::Events { .. })),
        "two of three documents: still waiting, {:?}",
        inst.wait
    );
    publish(
        &js,
        NS,
        "po.created",
        "po-1",
        &purchase_order(po, 1000, "0.12"),
    )
    .await;

    eventually(
        "the payment to be held",
        Duration::from_secs(10),
        || async {
            run.worker
                .instance(po)
                .await
                .unwrap()
                .is_some_and(|i| matches!(i.wait, Some(Wait::Timer { .. })))
        },
    )
    .await;
    assert!(
        Utc::now() < release,
        "the test was too slow to see the hold"
    );
    assert!(env.erp.payment_approvals().is_empty(), "held, not paid");

    wait_status(&run, po, Status::Completed).await;
    assert!(Utc::now() >= release, "released on time, not early");
    let approvals = env.erp.payment_approvals();
    assert_eq!(
        approvals.len(),
        1,
        "one payment approval; none for the overbilled one"
    );
    let pay = &approvals[0];
    assert_eq!(pay.path, "/vendors/V-0042/payment-approvals");
    assert_eq!(pay.idempotency_key.as_deref(), Some("pay-DOC-PO-2026-0815"));
    // 120.40 net + 22.88 tax.
    assert_eq!(pay.field("amount"), Some("143.28"));
    assert_eq!(
        pay.str_field("goodsReceiptId").as_deref(),
        Some("GR-PO-2026-0815")
    );

    let variance = wait_emitted(&js, NS, "vendor-invoice.price-variance", 1).await;
    assert_eq!(variance.len(), 1);
    assert_eq!(variance[0]["data"]["poNumber"], po);
    assert_eq!(variance[0].data_text("variance"), "0.40");
    let approved = wait_emitted(&js, NS, "payment.approved", 1).await;
    assert_eq!(approved.len(), 1);
    assert_eq!(approved[0]["data"]["paymentApprovalId"], pay.id.as_str());
    assert_eq!(approved[0].data_text("amount"), "143.28");
    assert_eq!(approved[0]["data"]["scheduledFor"], due.as_str());
    let t = trail(&env.nats.url(), po).await;
    assert!(has(&t, AuditKind::TimerFired, "hold-until-due"), "{t:?}");
    assert!(has(&t, AuditKind::StepCompleted, "three-way"), "{t:?}");

    wait_status(&run, over, Status::Rejected).await;
    let disputed = wait_emitted(&js, NS, "vendor-invoice.disputed", 1).await;
    assert_eq!(disputed.len(), 1);
    assert_eq!(disputed[0]["data"]["invoiceId"], "DOC-PO-2026-0816");
    assert!(
        run.worker.cases().list().await.unwrap().is_empty(),
        "nobody was asked"
    );
    let t = trail(&env.nats.url(), over).await;
    assert!(has(&t, AuditKind::CheckFailed, "three-way"), "{t:?}");
    assert!(has(&t, AuditKind::CaseRejected, "three-way"), "{t:?}");
    run.shutdown().await;
}

// --- returns-to-credit ------------------------------------------------------

fn return_received(rma: &str) -> String {
    format!(
        r#"{{"rmaNumber":"{rma}","orderId":"4711","customerId":"C-1001","receivedBy":"j.smith",
            "lines":[{{"sku":"A-100","qty":2}}]}}"#
    )
}

fn return_inspected(rma: &str, grade: &str) -> String {
    format!(
        r#"{{"rmaNumber":"{rma}","inspectedBy":"m.mueller","lines":[{{"sku":"A-100","qty":2,"grade":"{grade}"}}]}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_note_is_booked_once_even_when_its_answer_is_lost() {
    let env = env("returns-to-credit").await;
    env.erp
        .require_basic("svc-tallyman", "dummy-erp-sales-password-change-me");
    seed_return_order(
        &env.erp,
        vec![
            OrderLine::new("A-100", 2, "49.90"),
            OrderLine::new("B-200", 1, "120.00"),
        ],
    );
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);

    // Opened but resellable (B, 85 %): 2 x 49.90 x 0.85 = 84.83.
    publish(&js, NS, "return.received", "r-1", &return_received("RMA-1")).await;
    publish(
        &js,
        NS,
        "return.inspected",
        "i-1",
        &return_inspected("RMA-1", "B"),
    )
    .await;
    wait_status(&run, "RMA-1", Status::Completed).await;
    let notes = env.erp.credit_notes();
    assert_eq!(notes.len(), 1);
    assert_eq!(
        notes[0].str_field("externalReference").as_deref(),
        Some("rma-RMA-1")
    );
    assert_eq!(notes[0].field("totalAmount"), Some("84.83"));
    assert_eq!(
        env.erp.requests("/credit-notes/by-reference/rma-RMA-1"),
        1,
        "looked up once, found nothing, created"
    );

    // The ERP books the next credit note, but its answer is lost. The first
    // fault is only there so the lookup before the create does not take the
    // second (prefixes match both paths); it answers 404 as the route would.
    env.erp
        .fail_next_after_commit("/credit-notes/by-reference", 1, 404);
    env.erp.fail_next_after_commit("/credit-notes", 1, 503);
    publish(&js, NS, "return.received", "r-2", &return_received("RMA-2")).await;
    publish(
        &js,
        NS,
        "return.inspected",
        "i-2",
        &return_inspected("RMA-2", "A"),
    )
    .await;
    wait_status(&run, "RMA-2", Status::Completed).await;

    let notes = env.erp.credit_notes();
    let for_rma2: Vec<_> = notes
        .iter()
        .filter(|n| n.str_field("externalReference").as_deref() == Some("rma-RMA-2"))
        .collect();
    assert_eq!(for_rma2.len(), 1, "no second credit note for RMA-2");
    assert_eq!(notes.len(), 2);
    // As new (A, 100 %): 2 x 49.90.
    assert_eq!(for_rma2[0].field("totalAmount"), Some("99.80"));
    assert!(
        env.erp.requests("/credit-notes/by-reference/rma-RMA-2") >= 2,
        "the retry looked the note up first"
    );
    let credited = wait_emitted(&js, NS, "credit-note.created", 2).await;
    let rma2 = credited
        .iter()
        .find(|e| e["data"]["rmaNumber"] == "RMA-2")
        .expect("credit-note.created for RMA-2");
    assert_eq!(rma2["data"]["creditNoteNumber"], for_rma2[0].id.as_str());
    assert_eq!(rma2.data_text("amount"), "99.80");
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_note_whose_lookup_gets_no_answer_waits_for_a_person_not_a_second_booking() {
    let env = env("returns-to-credit").await;
    seed_return_order(&env.erp, vec![OrderLine::new("A-100", 2, "49.90")]);
    // The note is booked but the answer is lost, and then the look-ups fail
    // too: nobody can tell whether it exists.
    env.erp
        .fail_next_after_commit("/credit-notes/by-reference", 1, 404);
    env.erp.fail_next_after_commit("/credit-notes", 1, 503);
    env.erp.fail_next("/credit-notes/by-reference", 4, 503);
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    publish(&js, NS, "return.received", "r-3", &return_received("RMA-3")).await;
    publish(
        &js,
        NS,
        "return.inspected",
        "i-3",
        &return_inspected("RMA-3", "A"),
    )
    .await;

    let case = case_for(&run, "RMA-3").await;
    assert_eq!(case.spec.reason, "CallFailed");
    let inst = run.worker.instance("RMA-3").await.unwrap().unwrap();
    assert_eq!(inst.status, Status::Running);
    assert!(
        matches!(inst.wait, Some(Wait::FailedCall { .. })),
        "{:?}",
        inst.wait
    );
    assert_eq!(env.erp.credit_notes().len(), 1, "not booked a second time");

    // The workflow's `exceptions.approvers` decide it, nobody else.
    assert_eq!(
        case.spec.required.groups,
        ["customer-service-leads", "finance-controllers"]
    );
    let outsider = decision("ops", "operations", Verdict::Approve, None);
    let refused = refusal(run.worker.cases().as_ref(), &case.name, outsider).await;
    assert!(
        refused.to_string().contains("customer-service-leads"),
        "{refused}"
    );
    // A controller retries once the ERP answers again: the look-up finds the note.
    let retry = decision("c.jones", "finance-controllers", Verdict::Approve, None);
    run.worker
        .cases()
        .decide(&case.name, retry, Utc::now())
        .await
        .unwrap();
    wait_status(&run, "RMA-3", Status::Completed).await;
    let notes = env.erp.credit_notes();
    assert_eq!(notes.len(), 1, "still one credit note");
    let credited = wait_emitted(&js, NS, "credit-note.created", 1).await;
    assert_eq!(
        credited[0]["data"]["creditNoteNumber"],
        notes[0].id.as_str()
    );
    run.shutdown().await;
}

// --- shipment-to-invoice: calls that time out or give up -------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoice_call_that_times_out_is_retried_with_the_same_key_and_invoices_once() {
    let mut env = env("shipment-to-invoice").await;
    let erp = env.def.connectors.get_mut("erp").unwrap();
    erp.rest.as_mut().unwrap().timeout = "300ms".parse().unwrap();
    seed_order(&env.erp, "4711", 5, "0.10");
    // The ERP answers invoices slower than the worker waits. The sim waits
    // before its route stores anything: an attempt given up on stores
    // nothing, or (if the sim still gets to it) is a replay of its key.
    let slow = Duration::from_millis(600);
    env.erp.delay("/invoices", slow);
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    publish_order_and_shipment(&js, "4711", 5).await;
    // A second attempt arrived: the first one timed out and was retried.
    wait_for("a retry after a timeout", Duration::from_secs(10), || {
        env.erp.requests("/invoices") >= 2
    })
    .await;
    env.erp.delay("/invoices", Duration::ZERO);
    wait_status(&run, "4711", Status::Completed).await;
    // Any attempt the sim still holds has been answered by now.
    tokio::time::sleep(slow).await;

    let invoices = env.erp.invoices();
    assert_eq!(invoices.len(), 1, "one invoice, however many attempts");
    assert_eq!(invoices[0].idempotency_key.as_deref(), Some("inv-4711"));
    // The first two attempts were delayed past the timeout; a later one was answered.
    assert!(env.erp.requests("/invoices") >= 3);
    let posts: Vec<_> = env
        .erp
        .recent_requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.uri == "/invoices")
        .collect();
    assert!(
        posts
            .iter()
            .all(|r| r.header("Idempotency-Key") == Some("inv-4711")),
        "every attempt carries the same key: {posts:?}"
    );
    assert_eq!(
        env.erp.duplicates_prevented(),
        posts.len() - 1,
        "every processed attempt after the first was answered from its key"
    );
    let succeeded = audit_of(&env.nats.url(), NS, "4711")
        .await
        .into_iter()
        .find(|r| r.kind == AuditKind::CallSucceeded && r.step.as_deref() == Some("invoice"))
        .expect("the invoice call succeeded");
    assert!(
        succeeded.detail["attempts"].as_u64() >= Some(3),
        "{succeeded:?}"
    );
    assert_eq!(wait_emitted(&js, NS, "invoice.created", 1).await.len(), 1);
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoice_call_that_runs_out_of_retries_is_dead_lettered_and_opens_a_case() {
    let mut env = env("shipment-to-invoice").await;
    let erp = env.def.connectors.get_mut("erp").unwrap();
    erp.rest.as_mut().unwrap().retry.max_attempts = 3;
    seed_order(&env.erp, "4712", 5, "0.10");
    // More failures than attempts (backoff 10 ms to 100 ms, see `env`).
    env.erp.fail_next("/invoices", 4, 503);
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    publish_order_and_shipment(&js, "4712", 5).await;

    let case = case_for(&run, "4712").await;
    assert_eq!(case.spec.reason, "CallFailed");
    assert_eq!(case.spec.required.groups, ["finance-controllers"]);
    assert_eq!(run.worker.cases().list().await.unwrap().len(), 1);

    eventually("a dead letter", Duration::from_secs(10), || async {
        stream_state(&js, NS, "DLQ").await.messages >= 1
    })
    .await;
    assert_eq!(stream_state(&js, NS, "DLQ").await.messages, 1);
    let names = tallyman_worker::names::Names::new(NS, "shipment-to-invoice");
    let dlq = js.get_stream(names.dlq_stream()).await.unwrap();
    let letter = dlq
        .get_last_raw_message_by_subject(&names.dlq_subject())
        .await
        .unwrap();
    let letter: serde_json::Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(letter["workflow"], "shipment-to-invoice");
    assert_eq!(letter["key"], "4712");
    assert_eq!(letter["step"], "invoice");
    let reason = letter["reason"].as_str().unwrap();
    assert!(
        reason.contains("3 attempts") && reason.contains("503"),
        "{reason}"
    );

    assert_eq!(env.erp.requests("/invoices"), 3, "every attempt, no more");
    assert_eq!(env.erp.invoice_count(), 0);
    let inst = run.worker.instance("4712").await.unwrap().unwrap();
    assert!(
        matches!(inst.wait, Some(Wait::FailedCall { .. })),
        "{inst:?}"
    );
    let t = trail(&env.nats.url(), "4712").await;
    assert!(has(&t, AuditKind::DeadLettered, "invoice"), "{t:?}");
    run.shutdown().await;
}
