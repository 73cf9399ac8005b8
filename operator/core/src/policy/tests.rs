use chrono::TimeZone;
use tallyman_api::v1alpha1::{CaseSegregation, Expiry};

use super::*;
use crate::cel::json;

fn policy() -> CompiledPolicy {
    let spec: ApprovalPolicySpec = serde_yaml::from_str(
        r#"
rules:
  - {name: tiny, when: "facts.amount < 500.0 && facts.variancePercent <= 1.0", decide: AutoApprove}
  - {name: controller, when: "facts.amount < decimal('10000')", decide: RequireApproval,
     approvers: {groups: [finance-controllers], count: 1}}
  - {name: too-big, when: "facts.amount >= decimal('1000000')", decide: AutoReject}
  - {name: dual, when: "true", decide: RequireApproval,
     approvers: {groups: [finance-controllers, cfo-office], count: 2}}
expiry: {after: 48h, then: Escalate, escalateTo: {groups: [cfo-office]}}
"#,
    )
    .unwrap();
    CompiledPolicy::compile("variance-approval", &spec).unwrap()
}

fn facts(amount: &str, pct: &str) -> Value {
    json::parse(format!(r#"{{"amount": {amount}, "variancePercent": {pct}}}"#).as_bytes()).unwrap()
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap()
}

#[test]
fn the_first_matching_rule_decides_on_exact_amounts() {
    let p = policy();
    let rule = |amount, pct| {
        p.evaluate(&facts(amount, pct), "QuantityMismatch", "s2i", "bob", now())
            .unwrap()
    };
    assert_eq!(
        rule("499.99", "1.00"),
        Ruling::AutoApprove {
            rule: "tiny".into()
        }
    );
    // 500.00 is not below 500.0: exact comparison, no float rounding.
    assert!(
        matches!(rule("500.00", "0.10"), Ruling::RequireApproval { rule, approvers } if rule == "controller" && approvers.count == 1)
    );
    assert_eq!(
        rule("1000000.00", "9"),
        Ruling::AutoReject {
            rule: "too-big".into()
        }
    );
    assert!(
        matches!(rule("10000.00", "2"), Ruling::RequireApproval { rule, approvers } if rule == "dual" && approvers.count == 2)
    );
}

#[test]
fn a_policy_without_a_matching_rule_rejects() {
    let spec: ApprovalPolicySpec = serde_yaml::from_str(
        r#"rules: [{name: small, when: "facts.amount < 10", decide: AutoApprove}]"#,
    )
    .unwrap();
    let p = CompiledPolicy::compile("p", &spec).unwrap();
    assert_eq!(
        p.evaluate(&facts("10", "0"), "r", "w", "i", now()).unwrap(),
        Ruling::NoRuleMatched
    );
}

fn case(count: u32) -> ExceptionCaseSpec {
    ExceptionCaseSpec {
        workflow: "shipment-to-invoice".into(),
        key: "4711".into(),
        revision: "r1".into(),
        reason: "QuantityMismatch".into(),
        facts: Default::default(),
        initiator: "bob".into(),
        policy: "variance-approval".into(),
        rule: "dual".into(),
        required: Approvers {
            groups: vec!["finance-controllers".into(), "cfo-office".into()],
            count,
        },
        segregation_of_duties: CaseSegregation {
            exclude_initiator: true,
            distinct_approvers: true,
        },
        deadline: Some(to_time(now() + chrono::Duration::hours(48))),
        escalate_to: Some(Approvers {
            groups: vec!["cfo-office".into()],
            count: 1,
        }),
        decisions: vec![],
    }
}

fn decision(who: &str, groups: &[&str], verdict: Verdict) -> CaseDecision {
    CaseDecision {
        approver: who.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        decision: verdict,
        comment: (verdict == Verdict::Reject).then(|| "wrong count".into()),
    }
}

#[test]
fn segregation_of_duties_refuses_with_a_reason() {
    let mut spec = case(2);
    let status = ExceptionCaseStatus::default();
    let own = admit(
        &spec,
        &status,
        &decision("bob", &["finance-controllers"], Verdict::Approve),
    )
    .unwrap_err();
    assert!(
        own.0
            .contains("bob raised this exception and may not decide it"),
        "{own}"
    );
    let outsider = admit(
        &spec,
        &status,
        &decision("eve", &["warehouse"], Verdict::Approve),
    )
    .unwrap_err();
    assert!(
        outsider
            .0
            .contains("needs membership in one of finance-controllers, cfo-office"),
        "{outsider}"
    );
    spec.decisions.push(decision(
        "alice",
        &["finance-controllers"],
        Verdict::Approve,
    ));
    let twice = admit(
        &spec,
        &status,
        &decision("alice", &["finance-controllers"], Verdict::Approve),
    )
    .unwrap_err();
    assert!(twice.0.contains("already decided"), "{twice}");
    let silent = CaseDecision {
        comment: None,
        ..decision("carol", &["cfo-office"], Verdict::Reject)
    };
    assert!(
        admit(&spec, &status, &silent)
            .unwrap_err()
            .0
            .contains("needs a comment")
    );
    assert!(
        admit(
            &spec,
            &status,
            &decision("carol", &["cfo-office"], Verdict::Approve)
        )
        .is_ok()
    );
}

#[test]
fn two_approvals_approve_and_one_rejection_rejects() {
    let mut spec = case(2);
    let status = ExceptionCaseStatus::default();
    spec.decisions.push(decision(
        "alice",
        &["finance-controllers"],
        Verdict::Approve,
    ));
    assert_eq!(tally(&spec, &status), (CaseState::Open, 1));
    spec.decisions
        .push(decision("carol", &["cfo-office"], Verdict::Approve));
    assert_eq!(tally(&spec, &status), (CaseState::Approved, 2));
    let mut spec = case(2);
    spec.decisions.push(decision(
        "alice",
        &["finance-controllers"],
        Verdict::Approve,
    ));
    spec.decisions
        .push(decision("carol", &["cfo-office"], Verdict::Reject));
    assert_eq!(tally(&spec, &status).0, CaseState::Rejected);
}

#[test]
fn an_expired_case_escalates_once_then_expires() {
    let spec = case(2);
    let open = ExceptionCaseStatus::default();
    let window = Some(std::time::Duration::from_secs(48 * 3600));
    assert_eq!(
        expire(&spec, &open, window, now() + chrono::Duration::hours(47)),
        None
    );
    let escalated = expire(&spec, &open, window, now() + chrono::Duration::hours(48)).unwrap();
    assert_eq!(escalated.state, CaseState::Escalated);
    assert_eq!(required(&spec, &escalated).groups, ["cfo-office"]);
    // After escalation, a finance controller no longer counts; the CFO office does.
    let mut decided = spec.clone();
    decided.decisions.push(decision(
        "alice",
        &["finance-controllers"],
        Verdict::Approve,
    ));
    assert!(
        admit(
            &decided,
            &escalated,
            &decision("dave", &["finance-controllers"], Verdict::Approve)
        )
        .is_err()
    );
    decided
        .decisions
        .push(decision("carol", &["cfo-office"], Verdict::Approve));
    assert_eq!(tally(&decided, &escalated), (CaseState::Approved, 1));
    let expired = expire(
        &spec,
        &escalated,
        window,
        now() + chrono::Duration::hours(96),
    )
    .unwrap();
    assert_eq!(expired.state, CaseState::Expired);
    assert!(
        admit(
            &spec,
            &expired,
            &decision("carol", &["cfo-office"], Verdict::Approve)
        )
        .is_err()
    );
}

/// The test policy with an expiry after `after`, no one to escalate to.
fn expiring_after(after: &str, then: ExpiryAction) -> CompiledPolicy {
    let mut s = policy().spec;
    s.expiry = Some(Expiry {
        after: after.parse().unwrap(),
        then,
        escalate_to: None,
    });
    CompiledPolicy::compile("p", &s).unwrap()
}

#[test]
fn a_policy_without_escalation_expires_directly() {
    let mut spec = case(1);
    spec.escalate_to = None;
    let p = expiring_after("1h", ExpiryAction::Reject);
    let (deadline, escalate) = p.expiry(now());
    assert_eq!(deadline, Some(now() + chrono::Duration::hours(1)));
    assert_eq!(escalate, None);
    let expired = expire(
        &spec,
        &ExceptionCaseStatus::default(),
        None,
        now() + chrono::Duration::hours(49),
    )
    .unwrap();
    assert_eq!(expired.state, CaseState::Expired);
}

#[test]
fn an_expiry_too_long_to_count_is_a_deadline_a_hundred_years_on() {
    // Admitted by the API server (any digits); it used to panic the
    // operator while reading the policy, or opening a case with it.
    let p = expiring_after("9999999999999999h", ExpiryAction::Escalate);
    let (deadline, _) = p.expiry(now());
    let deadline = deadline.unwrap();
    assert_eq!(deadline.years_since(now()), Some(99), "{deadline}");
}

/// A case that expires with decisions on it says whose: too few approvals,
/// or (in the cluster) decisions no worker had settled by the deadline.
/// It does not claim that nobody decided.
#[test]
fn an_expiry_names_the_decisions_that_did_not_settle_the_case() {
    let mut spec = case(2);
    spec.escalate_to = None;
    let open = ExceptionCaseStatus::default();
    let late = now() + chrono::Duration::hours(49);
    let nobody = expire(&spec, &open, None, late).unwrap();
    assert_eq!(
        nobody.message.as_deref(),
        Some("no decision within the deadline; expired, which rejects")
    );
    spec.decisions.push(decision(
        "alice",
        &["finance-controllers"],
        Verdict::Approve,
    ));
    let expired = expire(&spec, &open, None, late).unwrap();
    assert_eq!(expired.state, CaseState::Expired);
    assert_eq!(
        expired.message.as_deref(),
        Some(
            "the deadline passed before the decisions on the case settled it (alice Approve); expired, which rejects"
        )
    );
}
