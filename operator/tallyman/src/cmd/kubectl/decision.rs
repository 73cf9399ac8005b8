//! One person's decision on a case, and the JSON patch that records it.
//!
//! ```text
//! SelfSubjectReview ─▶ Me{username, groups} ─┐
//! case as stored ────────────────────────────┴─▶ CaseDecision ─▶ [test decisions, add /spec/decisions/-]
//! ```
//!
//! The patch tests the decisions it was built on, so a decision someone else
//! recorded in between fails the patch instead of being lost; the admission
//! policy then judges the retry against the new list.

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use serde_json::{Value, json};
use tallyman_api::v1alpha1::{CaseDecision, CaseState, ExceptionCase, Verdict};
use tallyman_core::policy;

use super::render;

/// Who the API server says the caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Me {
    pub username: String,
    pub groups: Vec<String>,
}

impl Me {
    /// From the answer to a SelfSubjectReview.
    pub fn from_review(review: &SelfSubjectReview) -> Result<Me, String> {
        let user = review.status.as_ref().and_then(|s| s.user_info.as_ref());
        match user.and_then(|u| u.username.clone()) {
            Some(username) if !username.is_empty() => Ok(Me {
                username,
                groups: user.and_then(|u| u.groups.clone()).unwrap_or_default(),
            }),
            _ => Err(
                "the API server did not say who you are (SelfSubjectReview without a username); \
                 decisions are recorded under the name the API server authenticates"
                    .into(),
            ),
        }
    }
}

/// The decision `me` adds: in the groups of theirs that the case's approvers
/// in force name (the escalation's once escalated). When they have none,
/// the groups stay empty and the admission policy says who may decide.
pub fn decision(
    case: &ExceptionCase,
    me: &Me,
    verdict: Verdict,
    comment: Option<&str>,
) -> CaseDecision {
    let needed = policy::required(&case.spec, &render::status(case));
    CaseDecision {
        approver: me.username.clone(),
        groups: needed
            .groups
            .iter()
            .filter(|g| me.groups.contains(g))
            .cloned()
            .collect(),
        decision: verdict,
        comment: comment
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from),
    }
}

/// The decisions of the case as stored, exactly as the API server sent them
/// (`test` compares JSON, so they are not round-tripped through types).
pub fn stored_decisions(case: &Value) -> Option<&Value> {
    case.pointer("/spec/decisions")
}

/// Append `decision`, on condition that the decisions are still those of
/// `case` (or, when the list is missing, that nothing changed at all).
pub fn patch(case: &Value, decision: &CaseDecision) -> json_patch::Patch {
    let decision = serde_json::to_value(decision).expect("a decision serializes");
    let ops = match stored_decisions(case) {
        Some(current) => json!([
            {"op": "test", "path": "/spec/decisions", "value": current},
            {"op": "add", "path": "/spec/decisions/-", "value": decision},
        ]),
        None => json!([
            {"op": "test", "path": "/metadata/resourceVersion",
             "value": case.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null)},
            {"op": "add", "path": "/spec/decisions", "value": [decision]},
        ]),
    };
    serde_json::from_value(ops).expect("well-formed JSON patch operations")
}

/// After a refused patch: did someone else change the decisions since the
/// patch was built (so build it again), or was the decision itself refused?
pub fn lost_race(sent_on: &Value, now: &Value) -> bool {
    stored_decisions(sent_on) != stored_decisions(now)
}

/// One line on what the decision did, from the case as it now stands.
pub fn outcome(case: &ExceptionCase, decision: &CaseDecision) -> String {
    let name = case.metadata.name.as_deref().unwrap_or_default();
    let verb = match decision.decision {
        Verdict::Approve => "approved",
        Verdict::Reject => "rejected",
    };
    let as_groups = if decision.groups.is_empty() {
        String::new()
    } else {
        format!(" for {}", decision.groups.join(", "))
    };
    let status = render::status(case);
    let needed = policy::required(&case.spec, &status);
    let (state, approvals) = policy::tally(&case.spec, &status);
    let next = match state {
        CaseState::Approved => "the case is approved; the worker resumes the instance".to_string(),
        CaseState::Rejected => "the case is rejected; the worker rejects the instance".to_string(),
        _ => format!(
            "{approvals} of {} approvals; the case waits for more",
            needed.count
        ),
    };
    format!("{name} {verb} by {}{as_groups}: {next}", decision.approver)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(decisions: Value, status: Value) -> Value {
        json!({
            "apiVersion": "tallyman.dev/v1alpha1",
            "kind": "ExceptionCase",
            "metadata": {"name": "shipment-to-invoice-4711", "namespace": "finance", "resourceVersion": "48213"},
            "spec": {
                "workflow": "shipment-to-invoice", "key": "4711", "revision": "5f2c9a1e",
                "reason": "QuantityMismatch", "facts": {"amount": "12500.00"},
                "initiator": "carol", "policy": "variance-approval", "rule": "dual",
                "required": {"groups": ["finance-controllers", "cfo-office"], "count": 2},
                "segregationOfDuties": {"excludeInitiator": true, "distinctApprovers": true},
                "escalateTo": {"groups": ["cfo-office"], "count": 1},
                "decisions": decisions,
            },
            "status": status,
        })
    }

    fn typed(v: &Value) -> ExceptionCase {
        serde_json::from_value(v.clone()).unwrap()
    }

    fn bob() -> Me {
        Me {
            username: "bob".into(),
            groups: vec![
                "finance-controllers".into(),
                "payroll".into(),
                "system:authenticated".into(),
            ],
        }
    }

    #[test]
    fn the_review_names_the_user() {
        let review: SelfSubjectReview = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview",
            "metadata": {},
            "status": {"userInfo": {"username": "bob", "groups": ["finance-controllers", "system:authenticated"]}}
        }))
        .unwrap();
        assert_eq!(
            Me::from_review(&review),
            Ok(Me {
                username: "bob".into(),
                groups: vec!["finance-controllers".into(), "system:authenticated".into()]
            })
        );
        let anonymous: SelfSubjectReview =
            serde_json::from_value(json!({"metadata": {}, "status": {"userInfo": {}}})).unwrap();
        assert!(Me::from_review(&anonymous).is_err());
    }

    #[test]
    fn a_decision_names_only_the_users_groups_the_case_asks_for() {
        let case = typed(&stored(json!([]), json!({"state": "Open"})));
        assert_eq!(
            decision(
                &case,
                &bob(),
                Verdict::Approve,
                Some("  quantities confirmed  ")
            ),
            CaseDecision {
                approver: "bob".into(),
                groups: vec!["finance-controllers".into()],
                decision: Verdict::Approve,
                comment: Some("quantities confirmed".into()),
            }
        );
        assert_eq!(
            decision(&case, &bob(), Verdict::Approve, Some("   ")).comment,
            None
        );
    }

    #[test]
    fn once_escalated_the_escalation_groups_count() {
        let case = typed(&stored(
            json!([]),
            json!({"state": "Escalated", "escalated": true}),
        ));
        let dave = Me {
            username: "dave".into(),
            groups: vec!["cfo-office".into(), "finance-controllers".into()],
        };
        assert_eq!(
            decision(&case, &dave, Verdict::Approve, None).groups,
            vec!["cfo-office".to_string()]
        );
        assert!(
            decision(&case, &bob(), Verdict::Approve, None)
                .groups
                .is_empty()
        );
    }

    #[test]
    fn the_patch_appends_one_decision_to_the_decisions_it_saw() {
        let alice =
            json!({"approver": "alice", "groups": ["finance-controllers"], "decision": "Approve"});
        let before = stored(json!([alice.clone()]), json!({"state": "Open"}));
        let d = decision(&typed(&before), &bob(), Verdict::Approve, None);
        let ops = patch(&before, &d);
        assert_eq!(
            serde_json::to_value(&ops).unwrap(),
            json!([
                {"op": "test", "path": "/spec/decisions", "value": [alice.clone()]},
                {"op": "add", "path": "/spec/decisions/-",
                 "value": {"approver": "bob", "groups": ["finance-controllers"], "decision": "Approve"}},
            ])
        );
        let mut after = before.clone();
        json_patch::patch(&mut after, &ops).unwrap();
        assert_eq!(
            after["spec"]["decisions"],
            json!([alice.clone(), {"approver": "bob", "groups": ["finance-controllers"], "decision": "Approve"}])
        );

        // dave decided between our read and our write: the patch fails
        // rather than recording bob's decision over a list he never saw.
        let mut raced = before.clone();
        raced["spec"]["decisions"] = json!([alice, {"approver": "dave", "groups": ["cfo-office"], "decision": "Reject", "comment": "no"}]);
        let mut attempt = raced.clone();
        assert!(json_patch::patch(&mut attempt, &ops).is_err());
        assert!(lost_race(&before, &raced));
        assert!(!lost_race(&before, &before));
    }

    #[test]
    fn without_a_decisions_list_the_patch_tests_the_resource_version() {
        let mut before = stored(json!([]), json!({"state": "Open"}));
        before["spec"].as_object_mut().unwrap().remove("decisions");
        let d = decision(
            &typed(&before),
            &bob(),
            Verdict::Reject,
            Some("wrong quantity"),
        );
        let ops = patch(&before, &d);
        let mut after = before.clone();
        json_patch::patch(&mut after, &ops).unwrap();
        assert_eq!(after["spec"]["decisions"].as_array().unwrap().len(), 1);
        let mut moved = before.clone();
        moved["metadata"]["resourceVersion"] = json!("48214");
        assert!(json_patch::patch(&mut moved, &ops).is_err());
    }

    #[test]
    fn the_outcome_says_what_happens_next() {
        let alice =
            json!({"approver": "alice", "groups": ["finance-controllers"], "decision": "Approve"});
        let bob_approves =
            json!({"approver": "bob", "groups": ["finance-controllers"], "decision": "Approve"});
        let bob_rejects = json!({"approver": "bob", "groups": ["finance-controllers"], "decision": "Reject", "comment": "40 units, not 48"});
        let one = typed(&stored(json!([alice.clone()]), json!({"state": "Open"})));
        let d: CaseDecision = serde_json::from_value(alice.clone()).unwrap();
        assert_eq!(
            outcome(&one, &d),
            "shipment-to-invoice-4711 approved by alice for finance-controllers: 1 of 2 approvals; the case waits for more"
        );
        let two = typed(&stored(
            json!([alice.clone(), bob_approves.clone()]),
            json!({"state": "Open"}),
        ));
        let d: CaseDecision = serde_json::from_value(bob_approves).unwrap();
        assert_eq!(
            outcome(&two, &d),
            "shipment-to-invoice-4711 approved by bob for finance-controllers: the case is approved; the worker resumes the instance"
        );
        let rejected = typed(&stored(
            json!([alice, bob_rejects.clone()]),
            json!({"state": "Open"}),
        ));
        let d: CaseDecision = serde_json::from_value(bob_rejects).unwrap();
        assert_eq!(
            outcome(&rejected, &d),
            "shipment-to-invoice-4711 rejected by bob for finance-controllers: the case is rejected; the worker rejects the instance"
        );
    }
}
