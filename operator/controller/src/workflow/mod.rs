//! The Workflow reconciler: dereference → validate → build → apply →
//! update_status, behind the `tallyman.dev/jetstream` finalizer.
//!
//! ```text
//! Workflow ─┬─ Connectors, ApprovalPolicies of the namespace (dereference)
//!           ├─ validate: Definition, or Ready=False InvalidSpec/InvalidReference
//!           ├─ build: ConfigMap, ServiceAccount, Role, RoleBinding, Deployment, PDB
//!           ├─ JetStream: streams, consumers, buckets (ensured)
//!           ├─ apply: server-side apply, skipped when nothing changes
//!           └─ status: conditions, revision, workers; Events on transitions
//! ```

pub mod build;
pub mod dereference;
pub mod jetstream;
pub mod status;
pub mod validate;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tallyman_api::v1alpha1::{Step, Workflow, WorkflowSpec, WorkflowStatus};

use crate::conditions::{self, READY};
use crate::context::{Context, key_of};
use crate::error::{Error, from_finalizer};
use crate::meta;

/// Guards the JetStream objects of a Workflow: removed before the Workflow goes.
pub const FINALIZER: &str = "tallyman.dev/jetstream";
/// The controller's name in metrics, logs and Events.
pub const CONTROLLER: &str = "workflow";
/// Drift is corrected at least this often.
pub const RESYNC: Duration = Duration::from_secs(300);

/// Reconcile one Workflow.
#[tracing::instrument(skip(wf, ctx), fields(ns = wf.namespace(), name = wf.name_any()))]
pub async fn reconcile(wf: Arc<Workflow>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = key_of(wf.as_ref());
    ctx.measured(CONTROLLER, &key, async {
        let ns = wf
            .namespace()
            .ok_or(Error::Incomplete("metadata.namespace"))?;
        let api: Api<Workflow> = Api::namespaced(ctx.client.clone(), &ns);
        let what = format!("Workflow {ns}/{}", wf.name_any());
        finalizer(&api, FINALIZER, wf, |event| async {
            match event {
                // Boxed: the pipeline's future is large, and a reconcile
                // runs on a worker thread's stack.
                Finalizer::Apply(wf) => Box::pin(apply(&wf, &ctx)).await,
                Finalizer::Cleanup(wf) => Box::pin(cleanup(&wf, &ctx)).await,
            }
        })
        .await
        .map_err(|e| from_finalizer(what, e))
    })
    .await
}

/// Requeue with per-object exponential backoff.
pub fn error_policy(wf: Arc<Workflow>, _error: &Error, ctx: Arc<Context>) -> Action {
    ctx.backoff(&key_of(wf.as_ref()))
}

async fn apply(wf: &Workflow, ctx: &Context) -> Result<Action, Error> {
    let ns = wf
        .namespace()
        .ok_or(Error::Incomplete("metadata.namespace"))?;
    let name = wf.name_any();
    let inputs = dereference::fetch(&ctx.client, &ns).await?;
    let now = conditions::now();
    let def = match validated(wf, &inputs, ctx) {
        Ok(def) => def,
        Err(invalid) => {
            let status = status::invalid(wf, &invalid, &now);
            update_status(wf, ctx, status).await?;
            // Nothing to retry until someone changes the Workflow or what it uses.
            return Ok(Action::await_change());
        }
    };
    let secrets = crate::pods::secret_keys(&ctx.settings.pod_nats, def.connectors.values());
    let secrets = crate::pods::secrets_seen(&ctx.client, &ns, &secrets).await?;
    let children = build::build(wf, &def, &ctx.settings, &secrets.hash)?;
    jetstream::ensure(&ctx.jetstream, &def, build::events_since(wf))
        .await
        .map_err(|message| Error::JetStream {
            what: format!("Workflow {ns}/{name}"),
            message,
        })?;
    let client = &ctx.client;
    meta::apply(
        &Api::<ConfigMap>::namespaced(client.clone(), &ns),
        &children.config_map,
    )
    .await?;
    meta::apply(
        &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
        &children.service_account,
    )
    .await?;
    meta::apply(
        &Api::<Role>::namespaced(client.clone(), &ns),
        &children.role,
    )
    .await?;
    meta::apply(
        &Api::<RoleBinding>::namespaced(client.clone(), &ns),
        &children.role_binding,
    )
    .await?;
    let (deployment, _) = meta::apply(
        &Api::<Deployment>::namespaced(client.clone(), &ns),
        &children.deployment,
    )
    .await?;
    meta::apply(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns),
        &children.pdb,
    )
    .await?;
    let status = status::running(
        wf,
        &def.revision(),
        Some(&deployment),
        &secrets.missing,
        &now,
    );
    update_status(wf, ctx, status).await?;
    Ok(Action::requeue(RESYNC))
}

/// [`validate::validate`], remembered per Workflow for as long as its
/// inputs (its spec, and the specs of its namespace's Connectors and
/// ApprovalPolicies) stay the same.
fn validated(
    wf: &Workflow,
    inputs: &dereference::Inputs,
    ctx: &Context,
) -> crate::context::Validated {
    let named = |name: &Option<String>, spec: serde_json::Value| json!([name, spec]);
    let key = key_of(wf);
    let fingerprint = meta::hash_json(&json!([
        named(
            &wf.metadata.name,
            serde_json::to_value(&wf.spec).unwrap_or_default()
        ),
        inputs
            .connectors
            .iter()
            .map(|c| named(
                &c.metadata.name,
                serde_json::to_value(&c.spec).unwrap_or_default()
            ))
            .collect::<Vec<_>>(),
        inputs
            .policies
            .iter()
            .map(|p| named(
                &p.metadata.name,
                serde_json::to_value(&p.spec).unwrap_or_default()
            ))
            .collect::<Vec<_>>(),
    ]));
    let lock = || ctx.validated.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((seen, result)) = lock().get(&key)
        && *seen == fingerprint
    {
        return result.clone();
    }
    let result = validate::validate(wf, &inputs.connectors, &inputs.policies);
    lock().insert(key, (fingerprint, result.clone()));
    result
}

/// Write `status` unless the Workflow already shows it; publish an Event
/// when `Ready` changes status or reason.
async fn update_status(wf: &Workflow, ctx: &Context, status: WorkflowStatus) -> Result<(), Error> {
    let old = wf.status.clone().unwrap_or_default();
    if old == status {
        return Ok(());
    }
    meta::apply_status(&ctx.client, wf, &status).await?;
    let before = conditions::get(&old.conditions, READY);
    let after = conditions::get(&status.conditions, READY);
    if let Some(after) = after
        && before.is_none_or(|b| b.status != after.status || b.reason != after.reason)
    {
        let type_ = if after.status == "True" || after.reason == conditions::REASON_ROLLING_OUT {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.publish(
            wf,
            Event {
                type_,
                reason: after.reason.clone(),
                note: Some(after.message.clone()),
                action: "Reconcile".into(),
                secondary: None,
            },
        )
        .await;
    }
    Ok(())
}

async fn cleanup(wf: &Workflow, ctx: &Context) -> Result<Action, Error> {
    let ns = wf
        .namespace()
        .ok_or(Error::Incomplete("metadata.namespace"))?;
    let name = wf.name_any();
    stop_workers(wf, ctx, &ns, &name).await?;
    jetstream::cleanup(&ctx.jetstream, &ns, &name)
        .await
        .map_err(|message| Error::Cleanup {
            what: format!("Workflow {ns}/{name}"),
            message,
        })?;
    ctx.publish(
        wf,
        Event {
            type_: EventType::Normal,
            reason: conditions::REASON_CLEANED_UP.into(),
            note: Some("removed the JetStream consumers and the instances bucket".into()),
            action: "Cleanup".into(),
            secondary: None,
        },
    )
    .await;
    ctx.validated
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key_of(wf));
    // The children go with the Workflow: they are owned by it.
    Ok(Action::await_change())
}

/// Delete the Workflow's worker Deployment, its pods first (foreground),
/// and wait for it to be gone: a worker whose consumer is removed under it
/// exits, and started again it would set the consumers and the instances
/// bucket up afresh before the Workflow is gone, leaving them behind.
async fn stop_workers(wf: &Workflow, ctx: &Context, ns: &str, name: &str) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let worker = build::worker_name(name);
    let read = |source| Error::Read {
        what: format!("Deployment {ns}/{worker}"),
        source,
    };
    let Some(d) = api.get_opt(&worker).await.map_err(read)? else {
        return Ok(());
    };
    // Only our own: a Deployment of that name the Workflow does not own
    // is left alone.
    let uid = wf.metadata.uid.as_deref();
    if !d
        .owner_references()
        .iter()
        .any(|o| Some(o.uid.as_str()) == uid)
    {
        return Ok(());
    }
    if d.metadata.deletion_timestamp.is_none() {
        let foreground = kube::api::DeleteParams::foreground();
        // Deleted at once (no pods), or gone before we asked.
        if !meta::delete_if_present(&api, &worker, &foreground).await?
            || api.get_opt(&worker).await.map_err(read)?.is_none()
        {
            return Ok(());
        }
    }
    Err(Error::WorkersStopping(format!("Workflow {ns}/{name}")))
}

/// The Connectors and ApprovalPolicies a Workflow names.
pub fn references(spec: &WorkflowSpec) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut connectors = BTreeSet::new();
    let mut policies = BTreeSet::new();
    let route_policy = |r: Option<&tallyman_api::v1alpha1::Route>| {
        r.and_then(|r| r.approval.as_ref())
            .map(|a| a.policy.clone())
    };
    for Step {
        call,
        approval,
        on_false,
        await_,
        ..
    } in &spec.steps
    {
        if let Some(c) = call {
            connectors.insert(c.connector.clone());
            policies.extend(route_policy(c.on_failure.as_ref()));
        }
        policies.extend(route_policy(on_false.as_ref()));
        policies.extend(route_policy(
            await_.as_ref().and_then(|a| a.on_timeout.as_ref()),
        ));
        policies.extend(approval.as_ref().map(|a| a.policy.clone()));
    }
    (connectors, policies)
}

/// The Workflows to reconcile when `kind` `namespace/name` changes: those
/// of the same namespace that name it. Used by the watch relations, so a
/// changed Connector or ApprovalPolicy re-resolves exactly its dependents.
pub fn dependents<'a>(
    workflows: impl IntoIterator<Item = &'a Workflow>,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Vec<ObjectRef<Workflow>> {
    workflows
        .into_iter()
        .filter(|w| w.namespace().as_deref() == Some(namespace))
        .filter(|w| {
            let (connectors, policies) = references(&w.spec);
            match kind {
                "Connector" => connectors.contains(name),
                "ApprovalPolicy" => policies.contains(name),
                _ => false,
            }
        })
        .map(ObjectRef::from_obj)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    #[test]
    fn references_name_every_connector_and_policy_used() {
        let set = fixtures::example("shipment-to-invoice");
        let wf = &set.workflows[0];
        let def = validate::validate(wf, &set.connectors, &set.policies).unwrap();
        let (connectors, policies) = references(&wf.spec);
        assert_eq!(connectors, def.connectors.keys().cloned().collect());
        assert_eq!(policies, def.policies.keys().cloned().collect());
    }

    #[test]
    fn a_change_maps_to_the_workflows_of_its_namespace_that_use_it() {
        let mut all = Vec::new();
        for e in fixtures::EXAMPLES {
            all.extend(fixtures::example(e).workflows);
        }
        let mut elsewhere = all[0].clone();
        elsewhere.metadata.namespace = Some("other".into());
        all.push(elsewhere);
        let (connectors, policies) = references(&all[0].spec);
        let c = connectors.iter().next().unwrap();
        let hit = dependents(&all, "Connector", "finance", c);
        assert!(
            hit.iter()
                .any(|r| Some(r.name.as_str()) == all[0].metadata.name.as_deref())
        );
        assert!(
            hit.iter()
                .all(|r| r.namespace.as_deref() == Some("finance"))
        );
        let p = policies.iter().next().unwrap();
        assert!(!dependents(&all, "ApprovalPolicy", "finance", p).is_empty());
        assert!(dependents(&all, "ApprovalPolicy", "finance", "no-such-policy").is_empty());
        assert!(dependents(&all, "Connector", "nowhere", c).is_empty());
    }
}
