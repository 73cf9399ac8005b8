//! A fake API server, a real nats-server and a Context over both.

#![allow(dead_code)]

use std::sync::Arc;

use kube::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tallyman_controller::{Context, PodNats, Settings, fixtures};
use tallyman_telemetry::Metrics;
use tallyman_testing::kubeapi::{FakeApi, Key};
use tallyman_testing::nats::NatsServer;

pub const NS: &str = "finance";
pub const CRD_GV: &str = "tallyman.dev/v1alpha1";

pub struct Env {
    pub api: FakeApi,
    pub nats: NatsServer,
    pub ctx: Arc<Context>,
    pub js: async_nats::jetstream::Context,
}

pub async fn env() -> Env {
    env_with(PodNats::default()).await
}

/// An [`env`] whose pods use `pod_nats` to connect.
pub async fn env_with(pod_nats: PodNats) -> Env {
    let nats = NatsServer::start();
    let api = FakeApi::start().await;
    let js = async_nats::jetstream::new(
        async_nats::connect(nats.url())
            .await
            .expect("connect to nats-server"),
    );
    let ctx = Arc::new(Context::new(
        api.client(),
        js.clone(),
        Settings {
            image: "ghcr.io/tallyman-dev/tallyman:test".into(),
            nats_url: "nats://nats.tallyman:4222".into(),
            pod_nats,
        },
        Arc::new(Metrics::new()),
        Some("test-pod".into()),
    ));
    Env { api, nats, ctx, js }
}

pub fn plural(kind: &str) -> &'static str {
    match kind {
        "Workflow" => "workflows",
        "Connector" => "connectors",
        "ApprovalPolicy" => "approvalpolicies",
        other => panic!("no plural for {other}"),
    }
}

/// Store `obj` in the fake, as `kubectl apply` would have created it.
pub fn seed<K: Resource<DynamicType = ()> + Serialize>(env: &Env, obj: &K) {
    let kind = K::kind(&());
    let name = obj.meta().name.clone().unwrap();
    let ns = obj.meta().namespace.clone().unwrap_or(NS.into());
    env.api.seed(
        Key::new(CRD_GV, plural(&kind), &ns, &name),
        serde_json::to_value(obj).unwrap(),
    );
}

/// Seed every object of an example.
pub fn seed_example(env: &Env, name: &str) -> fixtures::Example {
    let set = fixtures::example(name);
    for c in &set.connectors {
        seed(env, c);
    }
    for p in &set.policies {
        seed(env, p);
    }
    for w in &set.workflows {
        seed(env, w);
    }
    set
}

/// Store the example's Secrets in the fake, as `kubectl apply -f
/// secrets.yaml` would.
pub async fn seed_example_secrets(env: &Env, name: &str) {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
        .join("secrets.yaml");
    let loaded = tallyman_core::manifest::load(&[file]);
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(env.ctx.client.clone(), NS);
    for doc in loaded
        .documents
        .iter()
        .filter(|d| d.value["kind"] == "Secret")
    {
        api.create(
            &Default::default(),
            &serde_json::from_value(doc.value.clone()).unwrap(),
        )
        .await
        .unwrap();
    }
}

/// The object as the fake holds it now.
pub fn current<K: Resource<DynamicType = ()> + DeserializeOwned>(
    env: &Env,
    name: &str,
) -> Option<K> {
    let kind = K::kind(&());
    env.api
        .object(&Key::new(CRD_GV, plural(&kind), NS, name))
        .map(|v| serde_json::from_value(v).unwrap())
}

pub fn child(env: &Env, gv: &str, resource: &str, name: &str) -> Option<serde_json::Value> {
    env.api.object(&Key::new(gv, resource, NS, name))
}
