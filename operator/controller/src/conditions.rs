//! Status conditions in the standard shape: one helper sets them, so
//! `lastTransitionTime` moves only when the status flips and every condition
//! carries the generation it describes. Reasons are shared with Events.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub use tallyman_api::v1alpha1::condition::*;

/// Worker or gateway pods are being rolled out.
pub const REASON_ROLLING_OUT: &str = "RollingOut";
/// Fewer pods are ready than declared.
pub const REASON_PODS_UNAVAILABLE: &str = "PodsUnavailable";
/// A Secret the pods mount does not exist, so they cannot start.
pub const REASON_SECRETS_MISSING: &str = "SecretsMissing";
/// No pod of the namespace's webhook gateway is ready: no webhook is served.
pub const REASON_GATEWAY_UNAVAILABLE: &str = "GatewayUnavailable";
/// A Connector or ApprovalPolicy the Workflow uses is itself invalid.
pub const REASON_INVALID_REFERENCE: &str = "InvalidReference";
/// The REST endpoint answered the probe below 500.
pub const REASON_PROBE_SUCCEEDED: &str = "ProbeSucceeded";
/// The REST endpoint did not answer, or answered 5xx.
pub const REASON_PROBE_FAILED: &str = "ProbeFailed";
/// The Connector has no REST half to probe.
pub const REASON_NO_REST_ENDPOINT: &str = "NoRestEndpoint";
/// The JetStream consumer and buckets of a deleted Workflow were removed.
pub const REASON_CLEANED_UP: &str = "CleanedUp";

/// Now, at the second: the API server stores condition times at that
/// precision, so a time read back compares equal to the one written.
pub fn now() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// Set condition `type_`, keeping its `lastTransitionTime` unless `status`
/// changes.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.clone();
            }
            c.status = status;
            c.reason = reason.into();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: now.clone(),
        }),
    }
}

/// The condition `type_`, if set.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let t0 = Time(Timestamp::from_second(1_000).unwrap());
        let t1 = Time(Timestamp::from_second(2_000).unwrap());
        let mut c = Vec::new();
        set(&mut c, READY, false, REASON_ROLLING_OUT, "a", Some(1), &t0);
        set(
            &mut c,
            READY,
            false,
            REASON_PODS_UNAVAILABLE,
            "b",
            Some(2),
            &t1,
        );
        assert_eq!(c[0].last_transition_time, t0);
        assert_eq!(
            (c[0].reason.as_str(), c[0].observed_generation),
            (REASON_PODS_UNAVAILABLE, Some(2))
        );
        set(&mut c, READY, true, REASON_RECONCILED, "c", Some(2), &t1);
        assert_eq!(c[0].last_transition_time, t1);
        assert_eq!(c.len(), 1);
    }
}
