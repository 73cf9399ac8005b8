//! `tallyman operator`: the telemetry endpoint, the leader Lease, and the
//! three controllers with their watch relations.
//!
//! ```text
//! start ─▶ /healthz /readyz /metrics ─▶ wait for the Lease ─▶ controllers ─┐
//!            (standbys are ready too)        ▲ renew every 3 s             │
//!                                            └─ lost: stop, exit non-zero ◀┘
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::Event;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::runtime::{conditions as wait_conditions, wait::await_condition};
use kube::{Client, Resource, ResourceExt};
use tallyman_api::v1alpha1::{ApprovalPolicy, Connector, Workflow};
use tallyman_telemetry::{Metrics, Readiness};
use tokio::sync::watch;

use crate::context::{Context, Settings};
use crate::error::Error;
use crate::leader::{self, LeaseLock};
use crate::{connector, policy, workflow};

/// Where and as whom the operator runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// `/healthz`, `/readyz`, `/metrics`.
    pub listen: SocketAddr,
    pub lease_namespace: String,
    pub lease_name: String,
    /// This replica in the Lease and in Events (the pod name).
    pub identity: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("failed to serve telemetry")]
    Telemetry(#[from] tallyman_telemetry::Error),
    #[error("lost the leader Lease {0}; exiting so that only one replica reconciles")]
    LostLease(String),
}

/// Run until `shutdown` completes (SIGTERM) or the Lease is lost.
pub async fn run(
    client: Client,
    jetstream: async_nats::jetstream::Context,
    settings: Settings,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let ready = Readiness::new();
    // `halt` stops everything: SIGTERM, or the Lease lost.
    let (halt, halted) = watch::channel(false);
    let on_signal = halt.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = on_signal.send(true);
    });
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|h| *h).await;
    };
    let (_, telemetry) = tallyman_telemetry::serve(
        options.listen,
        metrics.clone(),
        ready.clone(),
        wait(halted.clone()),
    )
    .await?;
    // A standby is healthy and ready: it takes over when the leader goes.
    ready.set_ready(true);

    let lock = Arc::new(LeaseLock::new(
        client.clone(),
        &options.lease_namespace,
        &options.lease_name,
        &options.identity,
        leader::LEASE_DURATION,
    ));
    let lease = format!("{}/{}", options.lease_namespace, options.lease_name);
    tracing::info!(%lease, identity = %options.identity, "waiting for the leader Lease");
    loop {
        if *halted.borrow() {
            let _ = telemetry.await;
            return Ok(());
        }
        match lock.try_acquire_or_renew(Timestamp::now()).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, %lease, "failed to read or write the Lease"),
        }
        let mut h = halted.clone();
        tokio::select! {
            _ = tokio::time::sleep(leader::RETRY_PERIOD) => {}
            _ = h.wait_for(|h| *h) => {}
        }
    }
    tracing::info!(%lease, "leading: starting the controllers");
    let (lost, lost_rx) = watch::channel(false);
    let keeper = {
        let lock = lock.clone();
        let halt = halt.clone();
        let mut halted = halted.clone();
        tokio::spawn(async move {
            let mut renewed = Timestamp::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(leader::RETRY_PERIOD) => {}
                    _ = halted.wait_for(|h| *h) => return,
                }
                let now = Timestamp::now();
                let step_down = match lock.try_acquire_or_renew(now).await {
                    Ok(true) => {
                        renewed = now;
                        false
                    }
                    Ok(false) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "failed to renew the Lease");
                        leader::must_step_down(renewed, now, leader::LEASE_DURATION)
                    }
                };
                if step_down {
                    let _ = lost.send(true);
                    let _ = halt.send(true);
                    return;
                }
            }
        })
    };

    wait_for_crds(&client).await;
    let ctx = Arc::new(Context::new(
        client.clone(),
        jetstream,
        settings,
        metrics,
        Some(options.identity.clone()),
    ));
    let controllers = async {
        tokio::join!(
            workflows(client.clone(), ctx.clone(), wait(halted.clone())),
            connectors(client.clone(), ctx.clone(), wait(halted.clone())),
            policies(client.clone(), ctx.clone(), wait(halted.clone())),
        )
    };
    // A controller stopped before its first list finished waits for a
    // store that never becomes ready (kube-runtime's graceful shutdown):
    // after the grace period, the reconciles in flight are dropped, which
    // is safe, every write being an idempotent apply.
    let grace = async {
        wait(halted.clone()).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        _ = controllers => {}
        _ = grace => tracing::warn!(
            "the controllers did not stop within {SHUTDOWN_GRACE:?} of the signal; stopping them"
        ),
    }
    let _ = halt.send(true);
    let _ = keeper.await;
    if *lost_rx.borrow() {
        return Err(RunError::LostLease(lease));
    }
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "failed to release the Lease; the next leader waits for it to expire");
    }
    ready.set_ready(false);
    let _ = telemetry.await;
    Ok(())
}

/// How long the controllers may finish their reconciles after the signal.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Wait (up to a minute) for the CRDs to be served; the watches would fail
/// and retry before, with noise in the logs. Best effort: without RBAC on
/// CRDs this returns at once.
async fn wait_for_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in tallyman_api::all_crds() {
        let name = crd.name_any();
        let established =
            await_condition(api.clone(), &name, wait_conditions::is_crd_established());
        match tokio::time::timeout(Duration::from_secs(60), established).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(crd = %name, error = %e, "cannot check the CRD; going on"),
            Err(_) => {
                tracing::warn!(crd = %name, "the CRD is not established after 60 s; going on")
            }
        }
    }
}

fn managed(component: &str) -> watcher::Config {
    watcher::Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={},app.kubernetes.io/component={component}",
        crate::meta::FIELD_MANAGER
    ))
}

async fn workflows(
    client: Client,
    ctx: Arc<Context>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (reader, writer) = reflector::store();
    // Status writes do not change the generation: filtering on it keeps
    // our own status updates from triggering another reconcile.
    let main = watcher(
        Api::<Workflow>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects()
    .predicate_filter(
        predicates::generation.combine(predicates::finalizers),
        Default::default(),
    );
    let by_connector = reader.clone();
    let by_policy = reader.clone();
    let by_secret = reader.clone();
    Controller::for_stream(main, reader)
        .owns(Api::<Deployment>::all(client.clone()), managed("worker"))
        .owns(Api::<ConfigMap>::all(client.clone()), managed("worker"))
        .watches(
            Api::<Connector>::all(client.clone()),
            watcher::Config::default(),
            move |c: Connector| {
                let state = by_connector.state();
                workflow::dependents(
                    state.iter().map(|w| w.as_ref()),
                    "Connector",
                    &c.namespace().unwrap_or_default(),
                    &c.name_any(),
                )
            },
        )
        .watches(
            Api::<ApprovalPolicy>::all(client.clone()),
            watcher::Config::default(),
            move |p: ApprovalPolicy| {
                let state = by_policy.state();
                workflow::dependents(
                    state.iter().map(|w| w.as_ref()),
                    "ApprovalPolicy",
                    &p.namespace().unwrap_or_default(),
                    &p.name_any(),
                )
            },
        )
        // A rotated Secret rolls the workers that mount it. Metadata only:
        // the operator holds no Secret values in memory. Mapped to every
        // Workflow of the namespace; those that do not use it reconcile to
        // a no-op.
        .watches_stream(secret_changes(&client), move |s| {
            let ns = s.namespace().unwrap_or_default();
            by_secret
                .state()
                .iter()
                .filter(|w| w.namespace().as_deref() == Some(ns.as_str()))
                .map(|w| ObjectRef::from_obj(w.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stop)
        .run(workflow::reconcile, workflow::error_policy, ctx.clone())
        .for_each(|r| report(workflow::CONTROLLER, &ctx, r))
        .await;
}

/// Secrets as they change, metadata only.
fn secret_changes(
    client: &Client,
) -> impl futures_util::Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static
{
    // An Api of PartialObjectMeta makes metadata-only requests.
    watcher(
        Api::<PartialObjectMeta<Secret>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects()
}

async fn connectors(
    client: Client,
    ctx: Arc<Context>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    // Generation-filtered like Workflows: a status write (each probe may
    // make one) does not trigger another probe; the probe interval does.
    let (store, writer) = reflector::store();
    let main = watcher(
        Api::<Connector>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());
    let by_secret = store.clone();
    Controller::for_stream(main, store)
        .owns(Api::<Deployment>::all(client.clone()), managed("gateway"))
        .owns(Api::<ConfigMap>::all(client.clone()), managed("gateway"))
        .owns(Api::<Service>::all(client.clone()), managed("gateway"))
        // A rotated signing Secret rolls the gateway of its namespace.
        .watches_stream(secret_changes(&client), move |s| {
            let ns = s.namespace().unwrap_or_default();
            by_secret
                .state()
                .iter()
                .filter(|c| {
                    c.namespace().as_deref() == Some(ns.as_str()) && c.spec.webhook.is_some()
                })
                .map(|c| ObjectRef::from_obj(c.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stop)
        .run(connector::reconcile, connector::error_policy, ctx.clone())
        .for_each(|r| report(connector::CONTROLLER, &ctx, r))
        .await;
}

async fn policies(
    client: Client,
    ctx: Arc<Context>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    Controller::new(
        Api::<ApprovalPolicy>::all(client),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(stop)
    .run(policy::reconcile, policy::error_policy, ctx.clone())
    .for_each(|r| report(policy::CONTROLLER, &ctx, r))
    .await;
}

/// The one place reconcile outcomes are logged and failures become Events.
async fn report<K>(
    controller: &'static str,
    ctx: &Context,
    result: Result<(ObjectRef<K>, Action), controller::Error<Error, watcher::Error>>,
) where
    K: Resource<DynamicType = ()>,
{
    match result {
        Ok((obj, action)) => tracing::debug!(controller, object = %obj, ?action, "reconciled"),
        Err(controller::Error::ReconcilerFailed(e, obj)) => {
            let chain = error_chain(&e);
            if e.is_waiting() {
                tracing::info!(controller, object = %obj, reason = e.metric_label(), "{chain}; asking again with backoff");
            } else {
                tracing::warn!(controller, object = %obj, reason = e.metric_label(), error = %chain, "reconcile failed; retrying with backoff");
            }
            let reference: ObjectReference = (*obj).into();
            let event = Event {
                type_: e.event_type(),
                reason: e.metric_label().into(),
                note: Some(chain),
                action: "Reconcile".into(),
                secondary: None,
            };
            ctx.publish_about(&reference, event).await;
        }
        Err(e) => tracing::warn!(controller, error = %error_chain(&e), "controller error"),
    }
}

/// `error: cause: cause`, as one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
