//! Cases as ExceptionCases, through the real `kube::Client` against the
//! fake API server: what a worker writes when it opens a case, how the
//! decisions an approver appends are settled against the policy, deadlines,
//! and conflicts between replicas.

use chrono::{Duration, TimeZone, Utc};
use serde_json::json;
use tallyman_api::v1alpha1::{Approvers, CaseDecision, CaseState, Verdict};
use tallyman_core::engine::CaseRequest;
use tallyman_testing::kubeapi::{FakeApi, Key};
use tallyman_worker::cases::{CaseStore, DecideError, KubeCases, settle};

const NS: &str = "finance";
const GV: &str = "tallyman.dev/v1alpha1";

fn t0() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 26, 9, 0, 0).unwrap()
}

fn request(name: &str) -> CaseRequest {
    let mut facts = serde_json::Map::new();
    facts.insert("amount".into(), json!("178.00"));
    CaseRequest {
        name: name.into(),
        workflow: "shipment-to-invoice".into(),
        key: "4718".into(),
        revision: "23455829e0".into(),
        reason: "QuantityMismatch".into(),
        facts,
        initiator: "j.smith".into(),
        policy: "variance-approval".into(),
        rule: "controller".into(),
        required: Approvers {
            groups: vec!["finance-controllers".into()],
            count: 1,
        },
        exclude_initiator: true,
        distinct_approvers: true,
        deadline_ms: Some((t0() + Duration::hours(48)).timestamp_millis()),
        escalate_to: Some(Approvers {
            groups: vec!["cfo-office".into()],
            count: 1,
        }),
        escalation_window_ms: Some(48 * 3600 * 1000),
        blocking: true,
    }
}

fn decision(who: &str, group: &str, verdict: Verdict) -> CaseDecision {
    CaseDecision {
        approver: who.into(),
        groups: vec![group.into()],
        decision: verdict,
        comment: Some("checked".into()),
    }
}

fn key(name: &str) -> Key {
    Key::new(GV, "exceptioncases", NS, name)
}

#[tokio::test]
async fn opening_a_case_writes_an_exception_case_once() {
    let api = FakeApi::start().await;
    let cases = KubeCases::new(api.client(), NS);
    let opened = cases.open(&request("c-1"), t0()).await.unwrap();
    assert_eq!(opened.status.state, CaseState::Open);
    assert!(opened.status.deadline.is_some());

    let stored = api.object(&key("c-1")).expect("an ExceptionCase");
    assert_eq!(stored["spec"]["workflow"], "shipment-to-invoice");
    assert_eq!(stored["spec"]["initiator"], "j.smith");
    assert_eq!(stored["spec"]["facts"]["amount"], "178.00");
    assert_eq!(
        stored["spec"]["segregationOfDuties"]["excludeInitiator"],
        true
    );
    assert_eq!(
        stored["metadata"]["labels"]["tallyman.dev/workflow"],
        "shipment-to-invoice"
    );
    assert_eq!(
        stored["metadata"]["annotations"]["tallyman.dev/blocking"],
        "true"
    );
    assert_eq!(stored["status"]["state"], "Open");
    assert_eq!(stored["status"]["deadline"], "2026-11-28T09:00:00Z");

    // A retry after a crash opens nothing new and changes nothing.
    api.clear_requests();
    let again = cases
        .open(&request("c-1"), t0() + Duration::minutes(5))
        .await
        .unwrap();
    assert_eq!(again.spec, opened.spec);
    assert_eq!(api.objects(GV, "exceptioncases", NS).len(), 1);
    let writes: Vec<_> = api
        .writes()
        .into_iter()
        .filter(|w| w.method != "POST")
        .collect();
    assert!(writes.is_empty(), "{writes:#?}");

    let record = CaseStore::get(&cases, "c-1").await.unwrap().unwrap();
    assert!(record.blocking);
    assert_eq!(record.escalation_window_ms, Some(48 * 3600 * 1000));
    assert_eq!(CaseStore::list(&cases).await.unwrap().len(), 1);
}

#[tokio::test]
async fn decisions_are_judged_by_the_policy_and_settle_the_status() {
    let api = FakeApi::start().await;
    let cases = KubeCases::new(api.client(), NS);
    cases.open(&request("c-2"), t0()).await.unwrap();
    let now = t0() + Duration::hours(1);

    // The initiator may not decide their own exception.
    match CaseStore::decide(
        &cases,
        "c-2",
        decision("j.smith", "finance-controllers", Verdict::Approve),
        now,
    )
    .await
    {
        Err(DecideError::Refused(r)) => {
            assert!(r.to_string().contains("segregation of duties"), "{r}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let decided = CaseStore::decide(
        &cases,
        "c-2",
        decision("m.weber", "finance-controllers", Verdict::Approve),
        now,
    )
    .await
    .unwrap();
    assert_eq!(decided.status.state, CaseState::Approved);
    assert_eq!(decided.status.approvals, 1);
    assert_eq!(
        decided.status.message.as_deref(),
        Some("Approved by m.weber")
    );
    let stored = api.object(&key("c-2")).unwrap();
    assert_eq!(stored["spec"]["decisions"][0]["approver"], "m.weber");
    assert_eq!(stored["status"]["state"], "Approved");
    assert!(
        CaseStore::decide(
            &cases,
            "c-2",
            decision("a.other", "finance-controllers", Verdict::Reject),
            now
        )
        .await
        .is_err()
    );
}

#[tokio::test]
async fn a_decision_that_bypassed_admission_does_not_count() {
    let api = FakeApi::start().await;
    let cases = KubeCases::new(api.client(), NS);
    cases.open(&request("c-3"), t0()).await.unwrap();
    // Written straight into the spec, as if no admission policy guarded it:
    // the initiator approves, then someone outside the groups, then a
    // controller rejects.
    let mut stored = api.object(&key("c-3")).unwrap();
    stored["spec"]["decisions"] = json!([
        {"approver": "j.smith", "groups": ["finance-controllers"], "decision": "Approve"},
        {"approver": "s.sales", "groups": ["sales"], "decision": "Approve"},
        {"approver": "m.weber", "groups": ["finance-controllers"], "decision": "Reject", "comment": "short shipment not agreed"},
    ]);
    api.seed(key("c-3"), stored);

    let record = CaseStore::get(&cases, "c-3").await.unwrap().unwrap();
    let status = settle(&record, t0() + Duration::hours(1)).expect("the decisions change the case");
    assert_eq!(status.state, CaseState::Rejected);
    assert_eq!(status.approvals, 0);
    let message = status.message.unwrap();
    assert!(message.starts_with("Rejected by m.weber"), "{message}");
    assert!(
        message.contains("j.smith: j.smith raised this exception"),
        "{message}"
    );
    assert!(
        message.contains("s.sales: deciding this case needs membership"),
        "{message}"
    );

    let settled = cases
        .settle("c-3", t0() + Duration::hours(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(settled.status.state, CaseState::Rejected);
    // Settled once; nothing more to write.
    assert!(
        cases
            .settle("c-3", t0() + Duration::hours(2))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn deadlines_escalate_then_expire_and_conflicts_are_retried() {
    let api = FakeApi::start().await;
    let cases = KubeCases::new(api.client(), NS);
    cases.open(&request("c-4"), t0()).await.unwrap();
    assert!(
        CaseStore::expire(&cases, "c-4", t0() + Duration::hours(47))
            .await
            .unwrap()
            .is_none()
    );

    // Another replica wrote the status just before: the first write
    // conflicts and is done again on the fresh object.
    api.fail_next(
        "PUT",
        "/apis/tallyman.dev/v1alpha1/namespaces/finance/exceptioncases/c-4/status",
        409,
        1,
    );
    let escalated = CaseStore::expire(&cases, "c-4", t0() + Duration::hours(48))
        .await
        .unwrap()
        .expect("escalated");
    assert_eq!(escalated.status.state, CaseState::Escalated);
    assert!(escalated.status.escalated);
    // Escalated: the CFO office decides now, not the controllers.
    let refused = CaseStore::decide(
        &cases,
        "c-4",
        decision("m.weber", "finance-controllers", Verdict::Approve),
        t0() + Duration::hours(50),
    )
    .await;
    assert!(
        matches!(refused, Err(DecideError::Refused(_))),
        "{refused:?}"
    );

    let expired = CaseStore::expire(&cases, "c-4", t0() + Duration::hours(97))
        .await
        .unwrap()
        .expect("expired");
    assert_eq!(expired.status.state, CaseState::Expired);
    assert!(expired.is_final());

    assert!(!expired.resumed);
    CaseStore::mark_resumed(&cases, "c-4").await.unwrap();
    let record = CaseStore::get(&cases, "c-4").await.unwrap().unwrap();
    assert!(record.resumed);
    let stored = api.object(&key("c-4")).unwrap();
    assert_eq!(stored["status"]["conditions"][0]["type"], "Resumed");
    api.clear_requests();
    CaseStore::mark_resumed(&cases, "c-4").await.unwrap();
    assert!(api.writes().is_empty(), "{:#?}", api.writes());
}
