//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator
//! replicas never both reconcile. kube 5 ships none; this is the usual
//! protocol, every write guarded by `resourceVersion`:
//!
//! ```text
//! no Lease ───────────────▶ create it, holding it            (409: someone else was first)
//! held by me ─────────────▶ renew: renewTime = now            (409: lost it)
//! held, renewTime + duration < now, or released ─▶ take over: transitions + 1
//! held by another, fresh ─▶ follow
//! ```
//!
//! A leader that cannot renew steps down (the operator exits and restarts)
//! before the Lease can expire for the others.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};

/// One candidate for the Lease `namespace/name`.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// How long a Lease is valid after its last renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often a candidate tries to acquire or renew.
pub const RETRY_PERIOD: Duration = Duration::from_secs(3);

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Acquire or renew at `now`; `Ok(true)` while this candidate leads.
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() == Some(self.identity.as_str()) {
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(secs);
        } else {
            let valid_for = spec
                .lease_duration_seconds
                .map(|s| SignedDuration::from_secs(i64::from(s)))
                .unwrap_or(SignedDuration::from_secs(self.duration.as_secs() as i64));
            let expired = match &spec.renew_time {
                Some(MicroTime(renewed)) => renewed
                    .checked_add(valid_for)
                    .map_or(true, |until| until < now),
                None => true,
            };
            if holder.is_some() && !expired {
                return Ok(false);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(secs);
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        // The resourceVersion read above guards the write: whoever wrote in
        // between wins, and we learn it as a 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the Lease up (on shutdown), so a successor need not wait for it
    /// to expire. Does nothing unless this candidate holds it.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Whether a leader whose last successful renewal was at `renewed` must step
/// down at `now`: before the Lease could expire for the others, with a third
/// of its duration as margin for clock skew and slow requests.
pub fn must_step_down(renewed: Timestamp, now: Timestamp, duration: Duration) -> bool {
    let margin = duration.as_secs_f64() * 2.0 / 3.0;
    now.duration_since(renewed).as_secs_f64() >= margin
}
