//! The ValidatingAdmissionPolicy the chart ships for ExceptionCases
//! (`charts/tallyman/templates/exceptioncase-admission.yaml`), evaluated the
//! way the API server evaluates it, against the AdmissionReview requests in
//! `tests/admission/`.
//!
//! ```text
//! AdmissionReview ─resourceRules─▶ matched? ─matchConditions─▶ judged? ─variables─▶ validations (first refusal wins)
//! ```
//!
//! The API server binds `object`, `oldObject` and `request` (the request
//! without its objects), then `variables` (each variable sees those before
//! it); every refusal is one of the policy's messages, and the tests assert
//! the exact words a finance controller reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::{
    NamedRuleWithOperations, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use kube_cel::KubeCelExt;
use kube_cel::cel::objects::{Key, Map, Value};
use kube_cel::cel::{Context, Program};
use serde::Deserialize;
use tallyman_api::v1alpha1::ExceptionCase;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The policy and binding as the chart ships them.
fn manifests() -> (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding) {
    let path = repo().join("charts/tallyman/templates/exceptioncase-admission.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let (mut policy, mut binding) = (None, None);
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_json::Value::deserialize(doc).unwrap();
        match value["kind"].as_str() {
            Some("ValidatingAdmissionPolicy") => {
                policy = Some(serde_json::from_value(value).unwrap())
            }
            Some("ValidatingAdmissionPolicyBinding") => {
                binding = Some(serde_json::from_value(value).unwrap())
            }
            other => panic!(
                "unexpected document of kind {other:?} in {}",
                path.display()
            ),
        }
    }
    (policy.unwrap(), binding.unwrap())
}

/// What the API server does with a request.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The resource rules do not select the request.
    NotMatched,
    /// Selected, but a matchCondition is false: the policy does not judge it.
    NotJudged,
    Admitted,
    Refused(String),
}

fn review(fixture: &str) -> serde_json::Value {
    let path = repo().join(format!("operator/core/tests/admission/{fixture}.yaml"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()));
    let review: serde_json::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(review["kind"], "AdmissionReview", "{fixture}");
    review["request"].clone()
}

fn admit(fixture: &str) -> Outcome {
    let (policy, binding) = manifests();
    let spec = policy.spec.unwrap();
    let binding = binding.spec.unwrap();
    assert_eq!(
        binding.policy_name.as_deref(),
        Some("tallyman-exceptioncase-decisions")
    );
    // Emulated here only as far as the binding uses it: a binding that
    // narrows the match would need its own emulation.
    assert!(binding.match_resources.is_none() && binding.param_ref.is_none());
    assert!(spec.param_kind.is_none());

    let request = review(fixture);
    let rules = spec
        .match_constraints
        .and_then(|m| m.resource_rules)
        .unwrap_or_default();
    if !rules.iter().any(|r| rule_matches(r, &request)) {
        return Outcome::NotMatched;
    }

    let mut ctx = Context::default().with_all();
    ctx.add_variable_from_value("object", to_cel(&request["object"]));
    ctx.add_variable_from_value("oldObject", to_cel(&request["oldObject"]));
    let mut bare = request.clone();
    let bare_map = bare.as_object_mut().unwrap();
    bare_map.remove("object");
    bare_map.remove("oldObject");
    ctx.add_variable_from_value("request", to_cel(&bare));

    // failurePolicy Fail: an expression that errors refuses the request.
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
    for condition in spec.match_conditions.unwrap_or_default() {
        match eval(&ctx, &condition.expression) {
            Ok(Value::Bool(true)) => {}
            Ok(Value::Bool(false)) => return Outcome::NotJudged,
            other => {
                return Outcome::Refused(format!("matchCondition {}: {other:?}", condition.name));
            }
        }
    }

    // The API server evaluates variables lazily; eagerly here, so an error in
    // any variable refuses, which is stricter: the policy's variables must
    // be total on every request.
    let mut variables = HashMap::new();
    for variable in spec.variables.unwrap_or_default() {
        let mut scope = ctx.new_inner_scope();
        scope.add_variable_from_value("variables", map(variables.clone()));
        match eval(&scope, &variable.expression) {
            Ok(value) => {
                variables.insert(variable.name, value);
            }
            Err(e) => return Outcome::Refused(format!("variable {}: {e}", variable.name)),
        }
    }
    ctx.add_variable_from_value("variables", map(variables));

    for validation in spec.validations.unwrap_or_default() {
        match eval(&ctx, &validation.expression) {
            Ok(Value::Bool(true)) => {}
            Ok(Value::Bool(false)) => {
                // The API server falls back to `message` when the
                // messageExpression fails or gives an empty or multi-line string.
                let from_expression = validation
                    .message_expression
                    .as_deref()
                    .map(|m| eval(&ctx, m).unwrap_or_else(|e| panic!("{m}: {e}")))
                    .and_then(|v| match v {
                        Value::String(s) if !s.trim().is_empty() && !s.contains('\n') => {
                            Some(s.to_string())
                        }
                        _ => None,
                    });
                let message = from_expression
                    .or(validation.message)
                    .unwrap_or_else(|| format!("failed expression: {}", validation.expression));
                return Outcome::Refused(message);
            }
            other => {
                return Outcome::Refused(format!(
                    "expression '{}' resulted in error: {other:?}",
                    validation.expression
                ));
            }
        }
    }
    Outcome::Admitted
}

fn eval(ctx: &Context<'_>, expression: &str) -> Result<Value, String> {
    let program = Program::compile(expression).map_err(|e| format!("{expression}: {e}"))?;
    program
        .execute(ctx)
        .map_err(|e| format!("{expression}: {e}"))
}

/// `resources` entries as admission registration reads them: `name` is the
/// resource without subresources, `name/sub` one subresource, `*` every
/// resource and `*/*` everything.
fn rule_matches(rule: &NamedRuleWithOperations, request: &serde_json::Value) -> bool {
    let has = |list: &Option<Vec<String>>, value: &str| {
        list.as_ref()
            .is_some_and(|l| l.iter().any(|x| x == "*" || x == value))
    };
    let resource = &request["resource"];
    let name = resource["resource"].as_str().unwrap();
    let sub = request["subResource"].as_str().unwrap_or("");
    let wanted = if sub.is_empty() {
        name.to_string()
    } else {
        format!("{name}/{sub}")
    };
    let resource_matches = rule.resources.iter().flatten().any(|r| {
        r == &wanted
            || r == "*/*"
            || (r == "*" && sub.is_empty())
            || (!sub.is_empty() && (r == &format!("*/{sub}") || r == &format!("{name}/*")))
    });
    assert!(
        rule.resource_names.is_none(),
        "resourceNames are not emulated"
    );
    has(&rule.api_groups, resource["group"].as_str().unwrap())
        && has(&rule.api_versions, resource["version"].as_str().unwrap())
        && has(&rule.operations, request["operation"].as_str().unwrap())
        && resource_matches
}

/// JSON as the API server hands it to CEL: integers are ints, other numbers
/// doubles, a missing `oldObject` (a CREATE) null.
fn to_cel(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Value::Int)
            .or_else(|| n.as_u64().map(Value::UInt))
            .unwrap_or_else(|| Value::Float(n.as_f64().unwrap())),
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => {
            Value::List(Arc::new(items.iter().map(to_cel).collect()))
        }
        serde_json::Value::Object(fields) => {
            map(fields.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect())
        }
    }
}

fn map(fields: HashMap<String, Value>) -> Value {
    Value::Map(Map {
        map: Arc::new(
            fields
                .into_iter()
                .map(|(k, v)| (Key::String(Arc::new(k)), v))
                .collect(),
        ),
    })
}

fn refused(fixture: &str) -> String {
    match admit(fixture) {
        Outcome::Refused(message) => message,
        other => panic!("{fixture}: expected a refusal, got {other:?}"),
    }
}

#[test]
fn an_approval_by_a_second_controller_is_admitted() {
    assert_eq!(admit("good-approval"), Outcome::Admitted);
}

#[test]
fn a_rejection_with_a_reason_is_admitted() {
    assert_eq!(admit("good-rejection"), Outcome::Admitted);
}

#[test]
fn a_case_without_status_yet_is_open() {
    assert_eq!(admit("good-before-status"), Outcome::Admitted);
}

#[test]
fn an_escalated_case_takes_decisions_from_the_escalation_groups() {
    assert_eq!(admit("escalated-approval"), Outcome::Admitted);
    assert_eq!(
        refused("escalated-wrong-group"),
        "deciding this case needs membership in one of cfo-office; bob decides as finance-controllers"
    );
}

#[test]
fn the_initiator_may_not_approve_their_own_exception() {
    assert_eq!(
        refused("own-approval"),
        "carol raised this exception and may not decide it (segregation of duties); ask another approver"
    );
}

#[test]
fn a_decision_in_someone_elses_name_is_refused() {
    assert_eq!(
        refused("impersonation"),
        "you are signed in as mallory and can record a decision only as yourself, not as bob"
    );
}

#[test]
fn a_decision_may_name_only_the_approvers_own_groups() {
    assert_eq!(
        refused("foreign-group"),
        "bob is not a member of cfo-office; a decision can only name groups its approver belongs to"
    );
}

#[test]
fn earlier_decisions_cannot_be_edited() {
    let changed = "decisions already recorded on this case cannot be changed; add your decision as a new entry instead";
    assert_eq!(refused("edited-decision"), changed);
    assert_eq!(refused("edited-in-place"), changed);
}

#[test]
fn earlier_decisions_cannot_be_removed() {
    assert_eq!(
        refused("removed-decision"),
        "decisions already recorded on this case cannot be removed"
    );
}

#[test]
fn decisions_are_added_one_at_a_time() {
    assert_eq!(
        refused("two-decisions"),
        "add one decision at a time; this update adds 2"
    );
}

#[test]
fn nobody_decides_twice() {
    assert_eq!(
        refused("second-decision"),
        "alice has already decided this case; every decision must come from a different person"
    );
}

#[test]
fn a_closed_case_takes_no_decisions() {
    assert_eq!(
        refused("closed-case"),
        "the case is already Approved; decisions are closed"
    );
}

#[test]
fn a_decision_must_come_from_a_group_the_case_names() {
    assert_eq!(
        refused("not-an-approver"),
        "deciding this case needs membership in one of finance-controllers, cfo-office; eve decides as warehouse"
    );
}

#[test]
fn a_rejection_needs_a_reason() {
    assert_eq!(
        refused("rejection-without-comment"),
        "a rejection needs a comment saying why"
    );
}

#[test]
fn updates_that_leave_decisions_alone_are_not_judged() {
    assert_eq!(admit("label-update"), Outcome::NotJudged);
}

#[test]
fn the_workers_status_writes_and_creates_are_not_matched() {
    assert_eq!(admit("status-update"), Outcome::NotMatched);
    assert_eq!(admit("create"), Outcome::NotMatched);
}

/// The policy checks what `policy::admit` checks, in the same words, so a
/// person meets the same refusal in dev mode and in the cluster.
#[test]
fn refusals_match_the_policy_engine() {
    for fixture in [
        "own-approval",
        "second-decision",
        "closed-case",
        "not-an-approver",
        "rejection-without-comment",
        "escalated-wrong-group",
    ] {
        let request = review(fixture);
        let old: ExceptionCase = serde_json::from_value(request["oldObject"].clone()).unwrap();
        let new: ExceptionCase = serde_json::from_value(request["object"].clone()).unwrap();
        let added = new.spec.decisions.last().unwrap();
        let engine =
            tallyman_core::policy::admit(&old.spec, &old.status.unwrap_or_default(), added)
                .expect_err(fixture);
        assert_eq!(refused(fixture), engine.0, "{fixture}");
    }
    for fixture in [
        "good-approval",
        "good-rejection",
        "good-before-status",
        "escalated-approval",
    ] {
        let request = review(fixture);
        let old: ExceptionCase = serde_json::from_value(request["oldObject"].clone()).unwrap();
        let new: ExceptionCase = serde_json::from_value(request["object"].clone()).unwrap();
        let added = new.spec.decisions.last().unwrap();
        assert_eq!(
            tallyman_core::policy::admit(&old.spec, &old.status.unwrap_or_default(), added),
            Ok(()),
            "{fixture}"
        );
    }
}

/// Every fixture is an ExceptionCase the API server would hold, so a typo in
/// a fixture cannot make a refusal pass for the wrong reason.
#[test]
fn fixtures_are_exception_cases() {
    let dir = repo().join("operator/core/tests/admission");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let fixture = path.file_stem().unwrap().to_str().unwrap().to_string();
        let request = review(&fixture);
        for side in ["object", "oldObject"] {
            if request[side].is_null() {
                assert_eq!(request["operation"], "CREATE", "{fixture}: {side}");
                continue;
            }
            serde_json::from_value::<ExceptionCase>(request[side].clone())
                .unwrap_or_else(|e| panic!("{fixture}: {side}: {e}"));
        }
        seen += 1;
    }
    assert!(seen >= 19, "only {seen} fixtures");
}
