//! The Connector reconciler: dereference (the namespace's Connectors) →
//! validate → build (the namespace's gateway) → apply (or prune) → probe →
//! update_status (`Ready`, `Reachable`, `webhookUrl`).

pub mod gateway;
pub mod probe;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use tallyman_api::v1alpha1::{Connector, ConnectorStatus};

use crate::conditions::{self, REACHABLE, READY};
use crate::context::{Context, key_of};
use crate::error::Error;
use crate::meta;
use crate::validation::{self, as_manifest};
use crate::workflow::RESYNC;

pub const CONTROLLER: &str = "connector";

/// Reconcile one Connector, and the gateway of its namespace.
#[tracing::instrument(skip(c, ctx), fields(ns = c.namespace(), name = c.name_any()))]
pub async fn reconcile(c: Arc<Connector>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = key_of(c.as_ref());
    ctx.measured(CONTROLLER, &key, Box::pin(apply(&c, &ctx)))
        .await
}

pub fn error_policy(c: Arc<Connector>, _error: &Error, ctx: Arc<Context>) -> Action {
    ctx.backoff(&key_of(c.as_ref()))
}

/// The errors of every Connector of a namespace, by name, with field paths.
pub fn findings(all: &[Connector]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in validation::check(all.iter().map(as_manifest).collect()) {
        if f.kind == "Connector" {
            out.entry(f.name.clone()).or_default().push(f.to_string());
        }
    }
    out
}

async fn apply(c: &Connector, ctx: &Context) -> Result<Action, Error> {
    let ns = c
        .namespace()
        .ok_or(Error::Incomplete("metadata.namespace"))?;
    let name = c.name_any();
    let mut all = Api::<Connector>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Read {
            what: format!("the Connectors of namespace {ns}"),
            source,
        })?
        .items;
    all.retain(|c| c.metadata.deletion_timestamp.is_none());
    all.sort_by_key(|c| c.name_any());
    let invalid = findings(&all);
    let served: Vec<&Connector> = all
        .iter()
        .filter(|c| c.spec.webhook.is_some() && !invalid.contains_key(&c.name_any()))
        .collect();
    let client = &ctx.client;
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let budgets = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns);
    let secrets = crate::pods::secret_keys(&ctx.settings.pod_nats, served.iter().map(|c| &c.spec));
    let secrets = crate::pods::secrets_seen(client, &ns, &secrets).await?;
    let pods = match gateway::build(&ns, &served, &ctx.settings, &secrets.hash)? {
        Some(g) => {
            meta::apply(&config_maps, &g.config_map).await?;
            let (live, _) = meta::apply(&deployments, &g.deployment).await?;
            meta::apply(&services, &g.service).await?;
            meta::apply(&budgets, &g.pdb).await?;
            Some(status::GatewayPods::of(&live))
        }
        None => {
            // No webhook left to serve: the gateway goes (pruned by name; it
            // is only ever created under this name by this controller).
            meta::delete_if_present(&budgets, gateway::NAME, &Default::default()).await?;
            meta::delete_if_present(&services, gateway::NAME, &Default::default()).await?;
            meta::delete_if_present(&deployments, gateway::NAME, &Default::default()).await?;
            meta::delete_if_present(&config_maps, gateway::NAME, &Default::default()).await?;
            None
        }
    };
    let own = invalid.get(&name).cloned().unwrap_or_default();
    let probed = match (&c.spec.rest, own.is_empty()) {
        (Some(rest), true) => Some(probe::probe(client, &ns, &name, rest).await),
        _ => None,
    };
    let now = conditions::now();
    let status = status::status(c, &own, probed.as_ref(), &secrets.missing, pods, &now);
    update_status(c, ctx, status).await?;
    Ok(match (&c.spec.rest, own.is_empty()) {
        (Some(rest), true) => Action::requeue(rest.probe.interval.as_std()),
        (_, true) => Action::requeue(RESYNC),
        (_, false) => Action::await_change(),
    })
}

async fn update_status(c: &Connector, ctx: &Context, status: ConnectorStatus) -> Result<(), Error> {
    let old = c.status.clone().unwrap_or_default();
    if old == status {
        return Ok(());
    }
    meta::apply_status(&ctx.client, c, &status).await?;
    for type_ in [READY, REACHABLE] {
        let before = conditions::get(&old.conditions, type_);
        if let Some(after) = conditions::get(&status.conditions, type_)
            && before.is_none_or(|b| b.status != after.status || b.reason != after.reason)
        {
            ctx.publish(
                c,
                Event {
                    type_: if after.status == "True" {
                        EventType::Normal
                    } else {
                        EventType::Warning
                    },
                    reason: after.reason.clone(),
                    note: Some(after.message.clone()),
                    action: "Reconcile".into(),
                    secondary: None,
                },
            )
            .await;
        }
    }
    Ok(())
}
