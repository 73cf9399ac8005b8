//! The ApprovalPolicy reconciler: validate → update_status. Workflows that
//! use a policy re-resolve through their own controller's watch relation
//! ([`crate::workflow::dependents`]), not from here.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use tallyman_api::v1alpha1::{ApprovalPolicy, ApprovalPolicyStatus};

use crate::conditions::{self, READY, REASON_INVALID_SPEC, REASON_RECONCILED};
use crate::context::{Context, key_of};
use crate::error::Error;
use crate::meta;
use crate::validation::{self, as_manifest};

pub const CONTROLLER: &str = "approvalpolicy";

/// The errors of a policy, with field paths. Pure.
pub fn validate(p: &ApprovalPolicy) -> Vec<String> {
    validation::check(vec![as_manifest(p)])
        .into_iter()
        .map(|f| f.to_string())
        .collect()
}

/// The status a policy should show. Pure.
pub fn status(p: &ApprovalPolicy, errors: &[String], now: &Time) -> ApprovalPolicyStatus {
    let mut status = p.status.clone().unwrap_or_default();
    let generation = p.metadata.generation;
    if errors.is_empty() {
        conditions::set(
            &mut status.conditions,
            READY,
            true,
            REASON_RECONCILED,
            "valid; Workflows that name it use it",
            generation,
            now,
        );
    } else {
        conditions::set(
            &mut status.conditions,
            READY,
            false,
            REASON_INVALID_SPEC,
            errors.join("; "),
            generation,
            now,
        );
    }
    status.observed_generation = generation;
    status
}

#[tracing::instrument(skip(p, ctx), fields(ns = p.namespace(), name = p.name_any()))]
pub async fn reconcile(p: Arc<ApprovalPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = key_of(p.as_ref());
    ctx.measured(CONTROLLER, &key, async {
        let errors = validate(&p);
        let new = status(&p, &errors, &conditions::now());
        let old = p.status.clone().unwrap_or_default();
        if new != old {
            p.namespace()
                .ok_or(Error::Incomplete("metadata.namespace"))?;
            meta::apply_status(&ctx.client, p.as_ref(), &new).await?;
            let before = conditions::get(&old.conditions, READY);
            if let Some(after) = conditions::get(&new.conditions, READY)
                && before.is_none_or(|b| b.status != after.status)
            {
                ctx.publish(
                    p.as_ref(),
                    Event {
                        type_: if after.status == "True" {
                            EventType::Normal
                        } else {
                            EventType::Warning
                        },
                        reason: after.reason.clone(),
                        note: Some(after.message.clone()),
                        action: "Validate".into(),
                        secondary: None,
                    },
                )
                .await;
            }
        }
        Ok(Action::await_change())
    })
    .await
}

pub fn error_policy(p: Arc<ApprovalPolicy>, _error: &Error, ctx: Arc<Context>) -> Action {
    ctx.backoff(&key_of(p.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn example_policies_are_valid_and_ready() {
        for e in fixtures::EXAMPLES {
            for p in fixtures::example(e).policies {
                let errors = validate(&p);
                assert!(errors.is_empty(), "{e}: {errors:?}");
                let s = status(&p, &errors, &Time(Timestamp::from_second(1).unwrap()));
                assert_eq!(
                    conditions::get(&s.conditions, READY).unwrap().status,
                    "True"
                );
            }
        }
    }

    #[test]
    fn a_rule_that_does_not_compile_is_invalid_spec_at_its_path() {
        let mut p = fixtures::example("shipment-to-invoice").policies[0].clone();
        p.spec.rules[0].when = "facts.amount <".into();
        let errors = validate(&p);
        assert!(
            errors.iter().any(|e| e.starts_with("spec.rules[0].when: ")),
            "{errors:?}"
        );
        let s = status(&p, &errors, &Time(Timestamp::from_second(1).unwrap()));
        let r = conditions::get(&s.conditions, READY).unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", "InvalidSpec")
        );
    }
}
