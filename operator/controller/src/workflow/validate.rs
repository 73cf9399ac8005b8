//! Is the Workflow runnable as declared? Pure: the Workflow and the
//! Connectors and ApprovalPolicies of its namespace in, the resolved
//! definition or a located reason out.

use tallyman_api::v1alpha1::{ApprovalPolicy, Connector, Workflow};
use tallyman_core::engine::{Compiled, Definition};

use crate::conditions::{REASON_INVALID_REFERENCE, REASON_INVALID_SPEC};
use crate::validation::{self, as_manifest};

/// Label values (`app.kubernetes.io/instance`) hold at most 63 characters.
pub const MAX_NAME_LEN: usize = 63;

/// Why a Workflow cannot run, for `Ready=False`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// [`REASON_INVALID_SPEC`] or [`REASON_INVALID_REFERENCE`].
    pub reason: &'static str,
    /// Every problem, each with its field path, `; `-separated.
    pub message: String,
}

fn invalid(reason: &'static str, problems: Vec<String>) -> Invalid {
    Invalid {
        reason,
        message: problems.join("; "),
    }
}

/// Resolve `wf` against its namespace's objects, checking it as `tallyman
/// validate` would. Errors in the Workflow are `InvalidSpec`; errors in a
/// Connector or ApprovalPolicy it uses are `InvalidReference`.
pub fn validate(
    wf: &Workflow,
    connectors: &[Connector],
    policies: &[ApprovalPolicy],
) -> Result<Definition, Invalid> {
    let name = wf.metadata.name.clone().unwrap_or_default();
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            REASON_INVALID_SPEC,
            vec![format!(
                "metadata.name: {} characters; a Workflow's name is a label value of its workers and may have at most {MAX_NAME_LEN}",
                name.len()
            )],
        ));
    }
    let mut objects = vec![as_manifest(wf)];
    objects.extend(connectors.iter().map(as_manifest));
    objects.extend(policies.iter().map(as_manifest));
    let findings = validation::check(objects);
    let own: Vec<String> = findings
        .iter()
        .filter(|f| f.kind == "Workflow" && f.name == name)
        .map(ToString::to_string)
        .collect();
    if !own.is_empty() {
        return Err(invalid(REASON_INVALID_SPEC, own));
    }
    let def = Definition::resolve(wf, connectors, policies)
        .map_err(|e| invalid(REASON_INVALID_SPEC, vec![e]))?;
    let dependencies: Vec<String> = findings
        .iter()
        .filter(|f| match f.kind.as_str() {
            "Connector" => def.connectors.contains_key(&f.name),
            "ApprovalPolicy" => def.policies.contains_key(&f.name),
            _ => false,
        })
        .map(|f| format!("{} {:?} is invalid: {f}", f.kind, f.name))
        .collect();
    if !dependencies.is_empty() {
        return Err(invalid(REASON_INVALID_REFERENCE, dependencies));
    }
    if let Err(errors) = Compiled::new(def.clone()) {
        return Err(invalid(
            REASON_INVALID_SPEC,
            errors
                .into_iter()
                .map(|(path, message)| format!("{path}: {message}"))
                .collect(),
        ));
    }
    Ok(def)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    #[test]
    fn every_example_is_valid_and_resolves_what_it_uses() {
        for example in fixtures::EXAMPLES {
            let set = fixtures::example(example);
            for wf in &set.workflows {
                let def = validate(wf, &set.connectors, &set.policies)
                    .unwrap_or_else(|e| panic!("{example}: {e:?}"));
                assert!(
                    !def.connectors.is_empty(),
                    "{example}: a workflow that calls nothing?"
                );
            }
        }
    }

    #[test]
    fn a_bad_expression_is_invalid_spec_with_its_field_path() {
        let set = fixtures::example("shipment-to-invoice");
        let mut wf = set.workflows[0].clone();
        wf.spec.trigger.correlate = "event.data.orderId +".into();
        let e = validate(&wf, &set.connectors, &set.policies).unwrap_err();
        assert_eq!(e.reason, REASON_INVALID_SPEC);
        assert!(
            e.message.starts_with("spec.trigger.correlate: "),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_missing_connector_is_invalid_spec_at_the_call() {
        let set = fixtures::example("shipment-to-invoice");
        let e = validate(&set.workflows[0], &[], &set.policies).unwrap_err();
        assert_eq!(e.reason, REASON_INVALID_SPEC);
        assert!(e.message.contains(".call.connector"), "{}", e.message);
    }

    #[test]
    fn an_invalid_connector_in_use_is_an_invalid_reference() {
        let set = fixtures::example("shipment-to-invoice");
        let mut connectors = set.connectors.clone();
        let erp = connectors
            .iter_mut()
            .find(|c| c.spec.rest.is_some())
            .expect("the example has a REST connector");
        let rest = erp.spec.rest.as_mut().unwrap();
        rest.retry.initial_backoff = "1h".parse().unwrap();
        let e = validate(&set.workflows[0], &connectors, &set.policies).unwrap_err();
        assert_eq!(e.reason, REASON_INVALID_REFERENCE, "{}", e.message);
        assert!(
            e.message.contains("spec.rest.retry.initialBackoff"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_name_too_long_for_a_label_is_refused() {
        let set = fixtures::example("shipment-to-invoice");
        let mut wf = set.workflows[0].clone();
        wf.metadata.name = Some("w".repeat(64));
        let e = validate(&wf, &set.connectors, &set.policies).unwrap_err();
        assert!(
            e.message.starts_with("metadata.name: 64 characters"),
            "{}",
            e.message
        );
    }
}
