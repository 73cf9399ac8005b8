//! The Connector and ApprovalPolicy reconcilers through the real
//! kube::Client against the fake API server.

mod common;

use std::sync::Arc;

use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use tallyman_api::v1alpha1::{ApprovalPolicy, Connector};
use tallyman_controller::conditions::{self, REACHABLE, READY};
use tallyman_controller::connector::{self, gateway};
use tallyman_controller::policy;
use tallyman_testing::erp::SimErp;

async fn reconcile(env: &Env, name: &str) -> kube::runtime::controller::Action {
    let c: Connector = current(env, name).expect("the Connector exists");
    connector::reconcile(Arc::new(c), env.ctx.clone())
        .await
        .expect("reconcile")
}

/// The Connector's Ready condition as stored.
fn ready_of(env: &Env, name: &str) -> Condition {
    let status = current::<Connector>(env, name).unwrap().status.unwrap();
    conditions::get(&status.conditions, READY).unwrap().clone()
}

#[tokio::test]
async fn webhook_connectors_get_one_gateway_and_their_urls() {
    let env = env().await;
    let set = seed_example(&env, "shipment-to-invoice");
    // Without its signing Secret the gateway could not start, and says so.
    reconcile(&env, "wms").await;
    let ready = ready_of(&env, "wms");
    assert_eq!(ready.reason, "SecretsMissing", "{}", ready.message);
    seed_example_secrets(&env, "shipment-to-invoice").await;
    for c in &set.connectors {
        if c.spec.webhook.is_some() {
            reconcile(&env, c.metadata.name.as_deref().unwrap()).await;
        }
    }
    let d = child(&env, "apps/v1", "deployments", gateway::NAME).expect("the gateway Deployment");
    let owners = d["metadata"]["ownerReferences"].as_array().unwrap();
    assert_eq!(
        owners.len(),
        set.connectors
            .iter()
            .filter(|c| c.spec.webhook.is_some())
            .count()
    );
    assert!(child(&env, "v1", "services", gateway::NAME).is_some());
    assert!(child(&env, "v1", "configmaps", gateway::NAME).is_some());
    let pdb = child(&env, "policy/v1", "poddisruptionbudgets", gateway::NAME)
        .expect("the gateway's disruption budget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let wms: Connector = current(&env, "wms").unwrap();
    let status = wms.status.unwrap();
    assert_eq!(
        status.webhook_url.as_deref(),
        Some("http://tallyman-gateway.finance.svc/webhooks/finance/wms/shipments")
    );
    // Nothing serves the webhook until a gateway pod is ready.
    let ready = ready_of(&env, "wms");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "GatewayUnavailable"),
        "{}",
        ready.message
    );
    let deployments: Api<Deployment> = Api::namespaced(env.ctx.client.clone(), NS);
    deployments
        .patch_status(
            gateway::NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 2, "readyReplicas": 1}})),
        )
        .await
        .unwrap();
    reconcile(&env, "wms").await;
    let ready = ready_of(&env, "wms");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Reconciled"),
        "{}",
        ready.message
    );

    // The second Connector's reconcile found the gateway as it wanted it.
    env.api.clear_requests();
    reconcile(&env, "wms").await;
    assert!(env.api.writes().is_empty(), "{:#?}", env.api.writes());
}

#[tokio::test]
async fn the_gateway_goes_when_no_webhook_is_left() {
    let env = env().await;
    let set = seed_example(&env, "shipment-to-invoice");
    reconcile(&env, "wms").await;
    assert!(child(&env, "apps/v1", "deployments", gateway::NAME).is_some());
    let api: Api<Connector> = Api::namespaced(env.ctx.client.clone(), NS);
    for c in &set.connectors {
        if c.spec.webhook.is_some() {
            api.delete(
                c.metadata.name.as_deref().unwrap(),
                &DeleteParams::default(),
            )
            .await
            .unwrap();
        }
    }
    // The fake collects owned objects like the garbage collector would.
    assert!(child(&env, "apps/v1", "deployments", gateway::NAME).is_none());
    assert!(child(&env, "policy/v1", "poddisruptionbudgets", gateway::NAME).is_none());
    // A Connector without a webhook keeps no gateway either.
    reconcile(&env, "erp").await;
    assert!(child(&env, "v1", "services", gateway::NAME).is_none());
}

#[tokio::test]
async fn reachable_follows_the_rest_probe() {
    let env = env().await;
    seed_example(&env, "shipment-to-invoice");
    let erp = SimErp::start().await;
    let api: Api<Connector> = Api::namespaced(env.ctx.client.clone(), NS);
    api.patch(
        "erp",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rest": {"baseUrl": erp.base_url()}}})),
    )
    .await
    .unwrap();
    reconcile(&env, "erp").await;
    let c: Connector = current(&env, "erp").unwrap();
    let r = conditions::get(&c.status.as_ref().unwrap().conditions, REACHABLE)
        .unwrap()
        .clone();
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("True", "ProbeSucceeded"),
        "{}",
        r.message
    );

    // Nothing listens there any more.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    api.patch(
        "erp",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rest": {"baseUrl": closed}}})),
    )
    .await
    .unwrap();
    reconcile(&env, "erp").await;
    let c: Connector = current(&env, "erp").unwrap();
    let r = conditions::get(&c.status.as_ref().unwrap().conditions, REACHABLE)
        .unwrap()
        .clone();
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", "ProbeFailed")
    );
    assert!(r.message.contains(&closed), "{}", r.message);
    assert!(
        env.api
            .writes()
            .iter()
            .any(|w| w.method == "POST" && w.path.ends_with("/events"))
    );
}

#[tokio::test]
async fn an_invalid_connector_is_not_ready_and_not_served() {
    let env = env().await;
    seed_example(&env, "shipment-to-invoice");
    let api: Api<Connector> = Api::namespaced(env.ctx.client.clone(), NS);
    // Two Connectors may not share a webhook path.
    let shop: Connector = current(&env, "shop").unwrap();
    let path = shop.spec.webhook.unwrap().path;
    api.patch(
        "wms",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"webhook": {"path": path}}})),
    )
    .await
    .unwrap();
    let action = reconcile(&env, "wms").await;
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    let wms: Connector = current(&env, "wms").unwrap();
    let status = wms.status.unwrap();
    let r = conditions::get(&status.conditions, READY).unwrap();
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(r.message.contains("spec.webhook.path"), "{}", r.message);
    assert!(status.webhook_url.is_none());
}

#[tokio::test]
async fn approval_policies_are_validated() {
    let env = env().await;
    let set = seed_example(&env, "shipment-to-invoice");
    let name = set.policies[0].metadata.name.clone().unwrap();
    let p: ApprovalPolicy = current(&env, &name).unwrap();
    policy::reconcile(Arc::new(p), env.ctx.clone())
        .await
        .unwrap();
    let p: ApprovalPolicy = current(&env, &name).unwrap();
    assert_eq!(
        conditions::get(&p.status.as_ref().unwrap().conditions, READY)
            .unwrap()
            .status,
        "True"
    );
    env.api.clear_requests();
    policy::reconcile(Arc::new(p), env.ctx.clone())
        .await
        .unwrap();
    assert!(env.api.writes().is_empty(), "{:#?}", env.api.writes());

    let api: Api<ApprovalPolicy> = Api::namespaced(env.ctx.client.clone(), NS);
    let mut rules = serde_json::to_value(&set.policies[0].spec.rules).unwrap();
    rules[0]["when"] = json!("facts.amount <");
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rules": rules}})),
    )
    .await
    .unwrap();
    let p: ApprovalPolicy = current(&env, &name).unwrap();
    policy::reconcile(Arc::new(p), env.ctx.clone())
        .await
        .unwrap();
    let p: ApprovalPolicy = current(&env, &name).unwrap();
    let status = p.status.unwrap();
    let r = conditions::get(&status.conditions, READY).unwrap();
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(
        r.message.starts_with("spec.rules[0].when: "),
        "{}",
        r.message
    );
    assert_eq!(status.observed_generation, Some(2));
}
