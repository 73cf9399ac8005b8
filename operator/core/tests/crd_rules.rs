//! CRD rules that `tallyman validate` cannot exercise on single manifests:
//! transition rules, evaluated with the old object as the API server does on
//! an update.

use kube::CustomResourceExt;
use serde_json::{Value, json};
use tallyman_api::v1alpha1::ExceptionCase;

fn schema() -> Value {
    let crd = ExceptionCase::crd();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .unwrap(),
    )
    .unwrap()
}

fn case(decisions: Value) -> Value {
    json!({
        "apiVersion": "tallyman.dev/v1alpha1",
        "kind": "ExceptionCase",
        "metadata": {"name": "shipment-to-invoice-4711", "namespace": "finance"},
        "spec": {
            "workflow": "shipment-to-invoice",
            "key": "4711",
            "revision": "5f2c9a1e",
            "reason": "QuantityMismatch",
            "facts": {"amount": "1250.00", "variancePercent": "2.50"},
            "initiator": "wms-operator-17",
            "policy": "variance-approval",
            "rule": "controller",
            "required": {"groups": ["finance-controllers"], "count": 1},
            "segregationOfDuties": {"excludeInitiator": true, "distinctApprovers": true},
            "deadline": "2026-11-28T12:00:00Z",
            "decisions": decisions
        }
    })
}

fn update(old: &Value, new: &Value) -> Vec<String> {
    match kube_cel::Validator::new().validate(&schema(), new, Some(old)) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .iter()
            .map(|e| format!("{}: {}", e.field_path, e.message))
            .collect(),
    }
}

#[test]
fn appending_a_decision_is_allowed() {
    let old = case(json!([]));
    let new = case(
        json!([{"approver": "alice", "groups": ["finance-controllers"], "decision": "Approve"}]),
    );
    assert_eq!(update(&old, &new), Vec::<String>::new());
}

#[test]
fn the_worker_written_spec_is_immutable() {
    let old = case(json!([]));
    for (field, value) in [
        ("facts", json!({"amount": "1.00"})),
        ("initiator", json!("alice")),
        (
            "required",
            json!({"groups": ["finance-controllers"], "count": 0}),
        ),
        ("deadline", json!("2030-01-01T00:00:00Z")),
        ("reason", json!("Other")),
    ] {
        let mut new = old.clone();
        new["spec"][field] = value;
        let errors = update(&old, &new);
        assert!(
            errors
                .iter()
                .any(|e| e.contains("only spec.decisions may change")),
            "changing spec.{field} was admitted: {errors:?}"
        );
    }
    let mut new = old.clone();
    new["spec"].as_object_mut().unwrap().remove("deadline");
    assert!(
        !update(&old, &new).is_empty(),
        "removing the deadline was admitted"
    );
}

#[test]
fn decisions_are_never_removed() {
    let old = case(
        json!([{"approver": "alice", "groups": ["finance-controllers"], "decision": "Approve"}]),
    );
    let new = case(json!([]));
    let errors = update(&old, &new);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("decisions can only be added")),
        "{errors:?}"
    );
}
