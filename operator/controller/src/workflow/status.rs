//! The status a Workflow should show. Pure: the Workflow, what validation
//! said and the worker Deployment in, the status out. `instances` is the
//! workers' to fill and is kept as found.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tallyman_api::v1alpha1::{WorkerCounts, Workflow, WorkflowStatus};

use crate::conditions::{
    self, DEGRADED, PROGRESSING, READY, REASON_PODS_UNAVAILABLE, REASON_RECONCILED,
    REASON_ROLLING_OUT, REASON_SECRETS_MISSING,
};
use crate::workflow::validate::Invalid;

/// The status of a Workflow whose spec cannot run. The workers (if any) keep
/// running the last good revision, which is what `Degraded` says.
pub fn invalid(wf: &Workflow, why: &Invalid, now: &Time) -> WorkflowStatus {
    let mut status = wf.status.clone().unwrap_or_default();
    let generation = wf.metadata.generation;
    let c = &mut status.conditions;
    conditions::set(
        c,
        READY,
        false,
        why.reason,
        why.message.clone(),
        generation,
        now,
    );
    conditions::set(
        c,
        PROGRESSING,
        false,
        why.reason,
        "nothing is rolled out until the spec is fixed",
        generation,
        now,
    );
    let degraded = match &status.revision {
        Some(r) => {
            format!("the workers keep running revision {r}; fix the spec to roll out changes")
        }
        None => "no revision runs yet; fix the spec".to_string(),
    };
    conditions::set(c, DEGRADED, true, why.reason, degraded, generation, now);
    status.observed_generation = generation;
    status
}

/// The status of a Workflow whose children were applied, from its
/// Deployment as last seen and the Secrets its pods mount that do not exist.
pub fn running(
    wf: &Workflow,
    revision: &str,
    deployment: Option<&Deployment>,
    missing_secrets: &[String],
    now: &Time,
) -> WorkflowStatus {
    let mut status = wf.status.clone().unwrap_or_default();
    let generation = wf.metadata.generation;
    let desired = wf.spec.workers.replicas;
    let ds = deployment
        .and_then(|d| d.status.clone())
        .unwrap_or_default();
    let ready = ds.ready_replicas.unwrap_or(0);
    let updated = ds.updated_replicas.unwrap_or(0);
    let total = ds.replicas.unwrap_or(0);
    let dep_generation = deployment.and_then(|d| d.metadata.generation);
    let seen = ds.observed_generation.is_some() && ds.observed_generation >= dep_generation;
    let rolled_out = seen && updated >= desired && total <= desired;
    let unavailable = ds
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Available" && c.status == "False")
        .map(|c| c.message.clone().unwrap_or_default());

    let c = &mut status.conditions;
    if rolled_out && ready >= desired {
        conditions::set(
            c,
            READY,
            true,
            REASON_RECONCILED,
            format!("{ready} of {desired} workers ready on revision {revision}"),
            generation,
            now,
        );
    } else if !missing_secrets.is_empty() {
        // Said first: the pods' own Events are one `describe` further away.
        conditions::set(
            c,
            READY,
            false,
            REASON_SECRETS_MISSING,
            format!(
                "{ready} of {desired} workers ready; the worker pods need what is missing from the Secrets of namespace {}: {}",
                wf.metadata.namespace.as_deref().unwrap_or_default(),
                missing_secrets.join(", "),
            ),
            generation,
            now,
        );
    } else {
        let reason = if rolled_out {
            REASON_PODS_UNAVAILABLE
        } else {
            REASON_ROLLING_OUT
        };
        conditions::set(
            c,
            READY,
            false,
            reason,
            format!(
                "{ready} of {desired} workers ready; see `kubectl describe deployment {}`",
                crate::workflow::build::worker_name(
                    wf.metadata.name.as_deref().unwrap_or_default()
                )
            ),
            generation,
            now,
        );
    }
    if rolled_out {
        conditions::set(
            c,
            PROGRESSING,
            false,
            REASON_RECONCILED,
            format!("revision {revision} is rolled out"),
            generation,
            now,
        );
    } else {
        conditions::set(
            c,
            PROGRESSING,
            true,
            REASON_ROLLING_OUT,
            format!("rolling out revision {revision}: {updated} of {desired} workers updated"),
            generation,
            now,
        );
    }
    match unavailable {
        Some(message) => conditions::set(
            c,
            DEGRADED,
            true,
            REASON_PODS_UNAVAILABLE,
            format!("the worker Deployment is not available: {message}"),
            generation,
            now,
        ),
        None => conditions::set(c, DEGRADED, false, REASON_RECONCILED, "", generation, now),
    }
    status.observed_generation = generation;
    status.revision = Some(revision.to_string());
    status.workers = Some(WorkerCounts { desired, ready });
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
    use k8s_openapi::jiff::Timestamp;

    fn t(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn wf() -> Workflow {
        let mut wf = fixtures::example("shipment-to-invoice").workflows[0].clone();
        wf.metadata.generation = Some(3);
        wf.spec.workers.replicas = 2;
        wf
    }

    fn deployment(ready: i32, updated: i32, total: i32) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.generation = Some(5);
        d.status = Some(DeploymentStatus {
            observed_generation: Some(5),
            ready_replicas: Some(ready),
            updated_replicas: Some(updated),
            replicas: Some(total),
            ..Default::default()
        });
        d
    }

    fn cond<'a>(s: &'a WorkflowStatus, type_: &str) -> (&'a str, &'a str) {
        let c = conditions::get(&s.conditions, type_).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn all_workers_ready_is_ready() {
        let s = running(&wf(), "abc", Some(&deployment(2, 2, 2)), &[], &t(1));
        assert_eq!(cond(&s, READY), ("True", REASON_RECONCILED));
        assert_eq!(cond(&s, PROGRESSING), ("False", REASON_RECONCILED));
        assert_eq!(cond(&s, DEGRADED), ("False", REASON_RECONCILED));
        assert_eq!(
            s.workers,
            Some(WorkerCounts {
                desired: 2,
                ready: 2
            })
        );
        assert_eq!(
            (s.revision.as_deref(), s.observed_generation),
            (Some("abc"), Some(3))
        );
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
    }

    #[test]
    fn a_rollout_in_flight_is_progressing() {
        let s = running(&wf(), "abc", Some(&deployment(2, 1, 3)), &[], &t(1));
        assert_eq!(cond(&s, READY), ("False", REASON_ROLLING_OUT));
        assert_eq!(cond(&s, PROGRESSING), ("True", REASON_ROLLING_OUT));
        // A Deployment not yet seen by its controller is rolling out too.
        let s = running(&wf(), "abc", None, &[], &t(1));
        assert_eq!(cond(&s, PROGRESSING), ("True", REASON_ROLLING_OUT));
        assert_eq!(
            s.workers,
            Some(WorkerCounts {
                desired: 2,
                ready: 0
            })
        );
    }

    #[test]
    fn missing_secrets_are_named_until_the_workers_are_ready() {
        let missing = vec!["erp-api-token".to_string(), "tallyman-nats".to_string()];
        let s = running(&wf(), "abc", Some(&deployment(0, 2, 2)), &missing, &t(1));
        assert_eq!(cond(&s, READY), ("False", REASON_SECRETS_MISSING));
        let message = &conditions::get(&s.conditions, READY).unwrap().message;
        assert!(
            message.ends_with("namespace finance: erp-api-token, tallyman-nats"),
            "{message}"
        );
        assert!(message.starts_with("0 of 2 workers ready"), "{message}");
        // Ready workers (e.g. the Secret appeared meanwhile) say so instead.
        let s = running(&wf(), "abc", Some(&deployment(2, 2, 2)), &missing, &t(1));
        assert_eq!(cond(&s, READY), ("True", REASON_RECONCILED));
    }

    #[test]
    fn an_unavailable_deployment_is_degraded() {
        let mut d = deployment(0, 2, 2);
        d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
            type_: "Available".into(),
            status: "False".into(),
            message: Some("Deployment does not have minimum availability.".into()),
            ..Default::default()
        }]);
        let s = running(&wf(), "abc", Some(&d), &[], &t(1));
        assert_eq!(cond(&s, READY), ("False", REASON_PODS_UNAVAILABLE));
        assert_eq!(cond(&s, DEGRADED), ("True", REASON_PODS_UNAVAILABLE));
        assert!(
            conditions::get(&s.conditions, DEGRADED)
                .unwrap()
                .message
                .contains("minimum availability")
        );
    }

    #[test]
    fn an_invalid_spec_says_why_and_keeps_the_running_revision() {
        let mut w = wf();
        w.status = Some(running(&w, "abc", Some(&deployment(2, 2, 2)), &[], &t(1)));
        let why = Invalid {
            reason: conditions::REASON_INVALID_SPEC,
            message: "spec.trigger.correlate: syntax error".into(),
        };
        let s = invalid(&w, &why, &t(2));
        let ready = conditions::get(&s.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert_eq!(ready.message, "spec.trigger.correlate: syntax error");
        assert_eq!(ready.last_transition_time, t(2));
        assert_eq!(s.revision.as_deref(), Some("abc"));
        assert!(
            conditions::get(&s.conditions, DEGRADED)
                .unwrap()
                .message
                .contains("revision abc")
        );
    }

    #[test]
    fn an_unchanged_world_gives_an_unchanged_status() {
        let mut w = wf();
        let d = deployment(2, 2, 2);
        w.status = Some(running(&w, "abc", Some(&d), &[], &t(1)));
        assert_eq!(Some(running(&w, "abc", Some(&d), &[], &t(99))), w.status);
    }
}
