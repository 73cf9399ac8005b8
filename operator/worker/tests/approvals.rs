//! Exception cases end to end: a quantity variance of the shipment-to-invoice
//! example opens a case; people decide it (or nobody does, and its deadline
//! does); the instance resumes, whichever worker is running by then.
//!
//! Every order here is 2 x A at 19.99 and 9 x B at 250.00, of which 5 x B
//! shipped: a variance of 1000.00, which the example policy's `controller`
//! rule gives to one finance controller. Approved, the invoice is for what
//! shipped: 2 x 19.99 + 5 x 250.00 = 1289.98.

mod support;

use std::time::Duration;

use chrono::Utc;
use support::*;
use tallyman_api::v1alpha1::{CaseState, ExpiryAction, Verdict};
use tallyman_core::audit::AuditKind;
use tallyman_core::engine::Status;
use tallyman_worker::cases::CaseRecord;

const NS: &str = "finance";
const POLICY: &str = "variance-approval";

/// Publish a short shipment for `order` and wait for its case.
async fn open_variance(env: &Env, run: &Running, order: &str) -> CaseRecord {
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    seed_order(&env.erp, order, 9, "250.00");
    publish_order_and_shipment(&js, order, 5).await;
    let started = std::time::Instant::now();
    let case = loop {
        let list = run.worker.cases().list().await.unwrap();
        if let Some(case) = list.into_iter().find(|c| c.spec.key == order) {
            break case;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no case opened for {order}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(case.spec.reason, "QuantityMismatch");
    assert_eq!(case.spec.facts["amount"], serde_json::json!("1000.00"));
    assert_eq!(case.spec.rule, "controller");
    assert_eq!(case.status.state, CaseState::Open);
    let inst = run.worker.instance(order).await.unwrap().unwrap();
    assert_eq!(inst.status, Status::Running, "the instance waits");
    assert_eq!(
        env.erp.invoice_count(),
        0,
        "nothing is invoiced before a decision"
    );
    case
}

/// The workflow's instances bucket as another process sees it, and the
/// key instance `key` is stored under: to change it behind the worker.
async fn stored_instance(env: &Env, key: &str) -> (async_nats::jetstream::kv::Store, String) {
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    let names = tallyman_worker::names::Names::new(NS, "shipment-to-invoice");
    let kv = js.get_key_value(names.instances_bucket()).await.unwrap();
    (kv, tallyman_worker::names::kv_key(key))
}

async fn wait_state(cases: &dyn tallyman_worker::cases::CaseStore, name: &str, state: CaseState) {
    eventually(
        &format!("case {name} to become {state:?}"),
        Duration::from_secs(15),
        || async {
            let record = cases.get(name).await.unwrap().unwrap();
            record.status.state == state
        },
    )
    .await;
}

fn assert_invoiced_as_shipped(env: &Env, order: &str) {
    let invoices = env.erp.invoices();
    assert_eq!(invoices.len(), 1, "exactly one invoice");
    assert_eq!(invoices[0].str_field("orderId").as_deref(), Some(order));
    assert_eq!(invoices[0].field("netAmount"), Some("1289.98"));
}

/// The order's `shipment.disputed` event: published once, naming the SKU
/// that fell short.
/// A finance controller approves `case`; the case as decided.
async fn alice_approves(
    cases: &dyn tallyman_worker::cases::CaseStore,
    case: &CaseRecord,
) -> CaseRecord {
    let approve = decision("alice", "finance-controllers", Verdict::Approve, None);
    cases.decide(&case.name, approve, Utc::now()).await.unwrap()
}

async fn assert_disputed(env: &Env, order: &str) {
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    let disputed = wait_emitted(&js, NS, "shipment.disputed", 1).await;
    assert_eq!(disputed.len(), 1, "{disputed:?}");
    let data = &disputed[0]["data"];
    assert_eq!(data["orderId"], order);
    assert_eq!(data["shipmentId"], format!("SH-{order}"));
    assert_eq!(data["skus"], serde_json::json!(["B"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_given_while_no_worker_runs_resumes_on_the_next_worker() {
    let env = env("shipment-to-invoice").await;
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let case = open_variance(&env, &run, "4720").await;
    run.shutdown().await;

    // A finance controller approves from another process while no worker runs.
    let cases = kv_cases(&env.nats.url(), NS).await;
    let decided = alice_approves(&cases, &case).await;
    assert_eq!(decided.status.state, CaseState::Approved);
    assert!(!decided.resumed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(env.erp.invoice_count(), 0, "no worker, no invoice");

    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    wait_status(&run, "4720", Status::Completed).await;
    assert_invoiced_as_shipped(&env, "4720");
    eventually(
        "the case to be marked resumed",
        Duration::from_secs(5),
        || {
            let cases = cases.clone();
            let name = case.name.clone();
            async move { cases.get(&name).await.unwrap().unwrap().0.resumed }
        },
    )
    .await;
    let kinds: Vec<_> = audit_of(&env.nats.url(), NS, "4720")
        .await
        .iter()
        .map(|r| r.kind)
        .collect();
    assert!(kinds.contains(&AuditKind::CaseOpened), "{kinds:?}");
    assert!(kinds.contains(&AuditKind::CaseApproved), "{kinds:?}");
    assert_eq!(
        kinds.last(),
        Some(&AuditKind::InstanceCompleted),
        "{kinds:?}"
    );
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_approval_escalates_to_the_cfo_office() {
    let mut env = env("shipment-to-invoice").await;
    let expiry = env.def.policies.get_mut(POLICY).unwrap();
    let expiry = expiry.expiry.as_mut().unwrap();
    assert_eq!(expiry.then, ExpiryAction::Escalate);
    expiry.after = "2s".parse().unwrap();
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let case = open_variance(&env, &run, "4721").await;
    let first_deadline = case.status.deadline.clone().expect("a deadline");
    let cases = run.worker.cases().clone();

    wait_state(cases.as_ref(), &case.name, CaseState::Escalated).await;
    let escalated = cases.get(&case.name).await.unwrap().unwrap();
    assert!(escalated.status.escalated);
    let new_deadline = escalated.status.deadline.clone().expect("a new deadline");
    assert!(new_deadline.0 > first_deadline.0, "the deadline moved");
    assert_eq!(env.erp.invoice_count(), 0);

    // Escalated, the case is the CFO office's: a controller no longer decides it.
    let controller = decision("alice", "finance-controllers", Verdict::Approve, None);
    let refused = refusal(cases.as_ref(), &case.name, controller).await;
    assert!(refused.to_string().contains("cfo-office"), "{refused}");
    let cfo = decision("carol", "cfo-office", Verdict::Approve, None);
    let decided = cases.decide(&case.name, cfo, Utc::now()).await.unwrap();
    assert_eq!(decided.status.state, CaseState::Approved);
    assert_eq!(
        decided.spec.decisions.len(),
        1,
        "the refused one is not recorded"
    );

    wait_status(&run, "4721", Status::Completed).await;
    assert_invoiced_as_shipped(&env, "4721");
    run.shutdown().await;
    // The chain tells how: the escalation, carol's decision, the outcome.
    let records = audit_of(&env.nats.url(), NS, "4721").await;
    let at = |kind: AuditKind| records.iter().position(|r| r.kind == kind);
    let decision = &records[at(AuditKind::DecisionRecorded).expect("the decision")];
    assert_eq!(decision.detail["approver"], "carol");
    assert_eq!(decision.detail["groups"], serde_json::json!(["cfo-office"]));
    assert_eq!(decision.detail["decision"], "Approve");
    let escalated = &records[at(AuditKind::CaseEscalated).expect("the escalation")];
    assert_eq!(escalated.detail["to"], serde_json::json!(["cfo-office"]));
    assert!(at(AuditKind::DecisionRecorded) < at(AuditKind::CaseApproved));
    assert_eq!(at(AuditKind::CaseExpired), None);
    assert!(verified_trail(&env.nats.url(), NS).await.is_ok());
}

/// A case escalated by another process before the worker's timer for its
/// first deadline fired still gets a timer for the escalated deadline:
/// nobody decides, so it expires and the shipment is disputed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_escalated_elsewhere_still_expires_at_its_new_deadline() {
    let mut env = env("shipment-to-invoice").await;
    let expiry = env.def.policies.get_mut(POLICY).unwrap();
    let expiry = expiry.expiry.as_mut().unwrap();
    assert_eq!(expiry.then, ExpiryAction::Escalate);
    expiry.after = "2s".parse().unwrap();
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let case = open_variance(&env, &run, "4725").await;
    run.shutdown().await;

    // The first deadline passes while no worker runs, and another process
    // applies it: escalated, with a new deadline.
    let first = tallyman_core::policy::from_time(case.status.deadline.as_ref().unwrap());
    let wait = (first - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    let cases = kv_cases(&env.nats.url(), NS).await;
    let escalated = cases.expire(&case.name, Utc::now()).await.unwrap().unwrap();
    assert_eq!(escalated.status.state, CaseState::Escalated);

    // The worker's timer for the first deadline finds it applied.
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    wait_state(run.worker.cases().as_ref(), &case.name, CaseState::Expired).await;
    wait_status(&run, "4725", Status::Rejected).await;
    assert_disputed(&env, "4725").await;
    assert_eq!(env.erp.invoice_count(), 0);
    run.shutdown().await;
}

/// A resume that fails for a moment (here the instance is unreadable in
/// the store) is tried again, not left until the worker restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_fails_for_a_moment_is_tried_again() {
    let env = env("shipment-to-invoice").await;
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let case = open_variance(&env, &run, "4726").await;
    let (kv, key) = stored_instance(&env, "4726").await;
    let stored = kv.get(&key).await.unwrap().expect("the waiting instance");
    kv.put(&key, "not an instance".into()).await.unwrap();

    let decided = alice_approves(run.worker.cases().as_ref(), &case).await;
    assert_eq!(decided.status.state, CaseState::Approved);
    // The resume cannot read the instance and fails, more than once.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !run.worker
            .cases()
            .get(&case.name)
            .await
            .unwrap()
            .unwrap()
            .resumed,
        "not resumed while the instance is unreadable"
    );

    kv.put(&key, stored).await.unwrap();
    wait_status(&run, "4726", Status::Completed).await;
    assert_invoiced_as_shipped(&env, "4726");
    run.shutdown().await;
}

/// Nothing is called from an instance a worker holds when the store has a
/// newer state: here another replica ended it while this worker held it,
/// waiting for a decision. The approval then finds it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_called_from_a_held_instance_the_store_moved_past() {
    let env = env("shipment-to-invoice").await;
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let case = open_variance(&env, &run, "4727").await;
    let (kv, key) = stored_instance(&env, "4727").await;
    let mut ended: serde_json::Value =
        serde_json::from_slice(&kv.get(&key).await.unwrap().unwrap()).unwrap();
    ended["status"] = serde_json::json!("Rejected");
    kv.put(&key, serde_json::to_vec(&ended).unwrap().into())
        .await
        .unwrap();

    alice_approves(run.worker.cases().as_ref(), &case).await;
    eventually(
        "the case to be resumed",
        Duration::from_secs(10),
        || async {
            run.worker
                .cases()
                .get(&case.name)
                .await
                .unwrap()
                .unwrap()
                .resumed
        },
    )
    .await;
    assert_eq!(
        env.erp.invoice_count(),
        0,
        "no invoice for an instance the store has ended"
    );
    let inst = run.worker.instance("4727").await.unwrap().unwrap();
    assert_eq!(inst.status, Status::Rejected);
    run.shutdown().await;
}

/// With two replicas, a decided case resumes its instance once: one
/// replica makes the call that follows, not both (a connector that looks
/// its bookings up first would otherwise book twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_resume_a_decided_case_once() {
    let env = env("shipment-to-invoice").await;
    let first = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let second = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let case = open_variance(&env, &first, "4728").await;
    // Slow enough that a second resume would start while the first calls.
    env.erp.delay("/invoices", Duration::from_millis(300));
    env.erp.reset_requests();

    alice_approves(first.worker.cases().as_ref(), &case).await;
    wait_status(&first, "4728", Status::Completed).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_invoiced_as_shipped(&env, "4728");
    assert_eq!(env.erp.requests("/invoices"), 1, "one replica calls");
    assert_eq!(env.erp.duplicates_prevented(), 0);
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_nobody_decides_expires_and_disputes_the_shipment() {
    let mut env = env("shipment-to-invoice").await;
    let policy = env.def.policies.get_mut(POLICY).unwrap();
    let expiry = policy.expiry.as_mut().unwrap();
    expiry.after = "2s".parse().unwrap();
    expiry.then = ExpiryAction::Reject;
    expiry.escalate_to = None;
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let case = open_variance(&env, &run, "4722").await;

    wait_state(run.worker.cases().as_ref(), &case.name, CaseState::Expired).await;
    wait_status(&run, "4722", Status::Rejected).await;
    assert_disputed(&env, "4722").await;
    let kinds: Vec<_> = audit_of(&env.nats.url(), NS, "4722")
        .await
        .iter()
        .map(|r| r.kind)
        .collect();
    let expired = kinds.iter().position(|k| *k == AuditKind::CaseExpired);
    let rejected = kinds.iter().position(|k| *k == AuditKind::CaseRejected);
    assert!(expired.is_some() && expired < rejected, "{kinds:?}");
    assert!(!kinds.contains(&AuditKind::DecisionRecorded), "{kinds:?}");
    let inst = run.worker.instance("4722").await.unwrap().unwrap();
    assert!(
        inst.outcome.as_deref().unwrap_or("").contains("rejected"),
        "{:?}",
        inst.outcome
    );
    // Too late to decide now.
    let late = decision("alice", "finance-controllers", Verdict::Approve, None);
    let refused = refusal(run.worker.cases().as_ref(), &case.name, late).await;
    assert!(refused.to_string().contains("Expired"), "{refused}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        env.erp.invoice_count(),
        0,
        "a rejected variance is not invoiced"
    );
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_variance_disputes_the_shipment_and_invoices_nothing() {
    let env = env("shipment-to-invoice").await;
    let run = start(&env.nats.url(), &env.def, &env.secrets, &env.erp.base_url()).await;
    let case = open_variance(&env, &run, "4723").await;
    let cases = run.worker.cases();

    let unexplained = decision("alice", "finance-controllers", Verdict::Reject, None);
    let refused = refusal(cases.as_ref(), &case.name, unexplained).await;
    assert!(refused.to_string().contains("comment"), "{refused}");
    let reject = decision(
        "alice",
        "finance-controllers",
        Verdict::Reject,
        Some("4 x B missing; claim with the carrier"),
    );
    let decided = cases.decide(&case.name, reject, Utc::now()).await.unwrap();
    assert_eq!(decided.status.state, CaseState::Rejected);

    wait_status(&run, "4723", Status::Rejected).await;
    assert_disputed(&env, "4723").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        env.erp.invoice_count(),
        0,
        "a rejected variance is not invoiced"
    );
    let kinds: Vec<_> = audit_of(&env.nats.url(), NS, "4723")
        .await
        .iter()
        .map(|r| r.kind)
        .collect();
    assert!(kinds.contains(&AuditKind::CaseRejected), "{kinds:?}");
    assert!(kinds.contains(&AuditKind::EventEmitted), "{kinds:?}");
    assert_eq!(
        kinds.last(),
        Some(&AuditKind::InstanceRejected),
        "{kinds:?}"
    );
    run.shutdown().await;
}

/// A breached SLA's case resumes nothing, but the decision on it is
/// written into the instance's audit chain, as every decision is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_on_a_breached_slas_case_is_audited() {
    let env = env("shipment-to-invoice").await;
    let mut def = env.def.clone();
    let sla = def.spec.sla.as_mut().unwrap();
    sla.complete = "1s".parse().unwrap();
    sla.on_breach = tallyman_api::v1alpha1::SlaBreach::Exception;
    let run = start(&env.nats.url(), &def, &env.secrets, &env.erp.base_url()).await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    publish(&js, NS, "order.created", "o-late", &order_data("LATE")).await;
    let cases = kv_cases(&env.nats.url(), NS).await;
    let started = std::time::Instant::now();
    let case = loop {
        let open = cases.list().await.unwrap();
        if let Some(c) = open.into_iter().find(|c| c.spec.reason == "SlaBreached") {
            break c;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no case for the SLA"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ack = decision(
        "alice",
        "finance-controllers",
        Verdict::Approve,
        Some("carrier strike"),
    );
    cases.decide(&case.name, ack, Utc::now()).await.unwrap();
    eventually(
        "the decision in the chain",
        Duration::from_secs(15),
        || async {
            audit_of(&env.nats.url(), NS, "LATE")
                .await
                .iter()
                .any(|r| r.kind == AuditKind::DecisionRecorded && r.detail["approver"] == "alice")
        },
    )
    .await;
    let inst = run.worker.instance("LATE").await.unwrap().unwrap();
    assert_eq!(
        inst.status,
        Status::Running,
        "still waiting for its shipment"
    );
    run.shutdown().await;
    let records = audit_of(&env.nats.url(), NS, "LATE").await;
    assert!(tallyman_core::audit::verify(&records).is_ok());
    assert!(records.iter().any(|r| r.kind == AuditKind::CaseApproved));
}
