//! What every reconcile shares: the API client, JetStream, the settings of
//! the children, Events, metrics and the per-object error backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::{Client, Resource};
use tallyman_api::v1alpha1::SecretKeyRef;
use tallyman_telemetry::{ControllerLabels, Metrics, ReconcileErrorLabels};

use crate::error::Error;

/// How children are configured, from `tallyman operator`'s flags.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The image of worker and gateway pods.
    pub image: String,
    /// Given to worker and gateway pods as `TALLYMAN_NATS_URL`.
    pub nats_url: String,
    /// What worker and gateway pods authenticate to NATS with.
    pub pod_nats: PodNats,
}

/// The NATS credentials file and CA bundle of worker and gateway pods: keys
/// of Secrets in each pod's own namespace (a pod mounts no other
/// namespace's Secrets), mounted like a Connector's Secrets and named to
/// the process by `TALLYMAN_NATS_CREDS` and `TALLYMAN_NATS_CA`. A rotated
/// Secret rolls the pods, as a Connector's does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodNats {
    pub creds: Option<SecretKeyRef>,
    pub ca: Option<SecretKeyRef>,
}

/// `name` and `key` checked as a Secret's name and data key must be: a DNS
/// subdomain, and `[-._a-zA-Z0-9]+`. `flag` names the setting in the error.
pub fn secret_key_ref(flag: &str, name: &str, key: &str) -> Result<SecretKeyRef, String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{flag}: {name:?} is not a Secret name (a DNS subdomain: lower case letters, digits, '-' and '.')"
        ));
    }
    if key.is_empty()
        || key.len() > 253
        || key == "."
        || key == ".."
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        return Err(format!(
            "{flag}: {key:?} is not a Secret key (letters, digits, '-', '_' and '.')"
        ));
    }
    Ok(SecretKeyRef {
        name: name.into(),
        key: key.into(),
    })
}

/// Shared by every reconcile of every controller.
pub struct Context {
    pub client: Client,
    pub jetstream: async_nats::jetstream::Context,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object, for [`Context::backoff`].
    failures: Mutex<HashMap<String, u32>>,
    /// The last validation of each Workflow, by the hash of its inputs:
    /// validation is pure and costs milliseconds, a resync should not.
    pub(crate) validated: Mutex<HashMap<String, (String, Validated)>>,
}

/// What validating a Workflow gave.
pub(crate) type Validated =
    Result<tallyman_core::engine::Definition, crate::workflow::validate::Invalid>;

/// First retry after a failure; doubled per further failure.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Retries never wait longer than this.
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);

impl Context {
    pub fn new(
        client: Client,
        jetstream: async_nats::jetstream::Context,
        settings: Settings,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: crate::meta::FIELD_MANAGER.into(),
                instance,
            },
        );
        Self {
            client,
            jetstream,
            settings,
            recorder,
            metrics,
            failures: Mutex::new(HashMap::new()),
            validated: Mutex::new(HashMap::new()),
        }
    }

    /// The requeue after a failed reconcile of `key`: 1 s, 2 s, 4 s, … up to
    /// [`BACKOFF_CAP`], per object, so one broken object does not slow others.
    pub fn backoff(&self, key: &str) -> Action {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        Action::requeue(backoff_delay(*n))
    }

    /// Forget the failures of `key` after a success.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Publish an Event about `obj`. A failure is logged, not returned: the
    /// reconcile itself went as it went.
    pub async fn publish<K: Resource<DynamicType = ()>>(&self, obj: &K, event: Event) {
        self.publish_about(&obj.object_ref(&()), event).await;
    }

    /// [`Context::publish`] by reference. The note is cut to what the API
    /// server takes (1 kB), or the whole Event would be refused.
    pub async fn publish_about(&self, reference: &ObjectReference, event: Event) {
        tallyman_worker::notices::publish(&self.recorder, event, reference).await;
    }

    /// Run one reconcile, counting it, timing it and classifying its error.
    pub async fn measured<F>(
        &self,
        controller: &'static str,
        key: &str,
        f: F,
    ) -> Result<Action, Error>
    where
        F: std::future::Future<Output = Result<Action, Error>>,
    {
        let labels = ControllerLabels { controller };
        let start = Instant::now();
        let result = f.await;
        let m = &self.metrics.operator;
        m.reconciles.get_or_create(&labels).inc();
        m.reconcile_duration
            .get_or_create(&labels)
            .observe(start.elapsed().as_secs_f64());
        match &result {
            Ok(_) => self.succeeded(key),
            Err(e) => {
                m.reconcile_errors
                    .get_or_create(&ReconcileErrorLabels {
                        controller,
                        reason: e.metric_label(),
                    })
                    .inc();
            }
        }
        result
    }
}

/// The wait after `failures` consecutive failures (1 or more).
pub fn backoff_delay(failures: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_CAP)
}

/// The key of an object for backoff bookkeeping.
pub fn key_of<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let secs: Vec<u64> = (1..=12).map(|n| backoff_delay(n).as_secs()).collect();
        assert_eq!(&secs[..4], &[1, 2, 4, 8]);
        assert_eq!(secs[8], 256);
        assert_eq!(secs[9..], [300, 300, 300]);
        assert_eq!(backoff_delay(u32::MAX), BACKOFF_CAP);
    }
}
