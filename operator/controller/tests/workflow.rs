//! The Workflow reconciler through the real kube::Client against the fake
//! API server, with a real nats-server for the JetStream objects.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;
use tallyman_api::v1alpha1::{Connector, Workflow};
use tallyman_controller::conditions::{self, READY};
use tallyman_controller::meta::REVISION_ANNOTATION;
use tallyman_controller::workflow::{self, FINALIZER};
use tallyman_worker::names::Names;

const WF: &str = "shipment-to-invoice";

async fn reconcile(env: &Env) -> Result<Action, tallyman_controller::Error> {
    let wf: Workflow = current(env, WF).expect("the Workflow exists");
    workflow::reconcile(Arc::new(wf), env.ctx.clone()).await
}

/// The first reconcile adds the finalizer, the second applies.
async fn settle(env: &Env) {
    reconcile(env).await.expect("first reconcile");
    reconcile(env).await.expect("second reconcile");
}

fn revision_of(env: &Env) -> String {
    let d = child(env, "apps/v1", "deployments", "shipment-to-invoice-worker").unwrap();
    d["spec"]["template"]["metadata"]["annotations"][REVISION_ANNOTATION]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn children_are_created_as_specified() {
    let env = env().await;
    seed_example(&env, "shipment-to-invoice");
    assert_eq!(reconcile(&env).await.unwrap(), Action::await_change());
    let wf: Workflow = current(&env, WF).unwrap();
    assert_eq!(wf.metadata.finalizers, Some(vec![FINALIZER.to_string()]));

    assert_eq!(
        reconcile(&env).await.unwrap(),
        Action::requeue(workflow::RESYNC)
    );
    for (gv, resource, name) in [
        ("v1", "configmaps", "shipment-to-invoice-definition"),
        ("v1", "serviceaccounts", "shipment-to-invoice-worker"),
        (
            "rbac.authorization.k8s.io/v1",
            "roles",
            "shipment-to-invoice-worker",
        ),
        (
            "rbac.authorization.k8s.io/v1",
            "rolebindings",
            "shipment-to-invoice-worker",
        ),
        ("apps/v1", "deployments", "shipment-to-invoice-worker"),
        (
            "policy/v1",
            "poddisruptionbudgets",
            "shipment-to-invoice-worker",
        ),
    ] {
        let obj = child(&env, gv, resource, name).unwrap_or_else(|| panic!("no {resource}/{name}"));
        assert_eq!(
            obj["metadata"]["ownerReferences"][0]["uid"],
            json!(wf.metadata.uid),
            "{resource}"
        );
        assert_eq!(
            obj["metadata"]["labels"]["app.kubernetes.io/part-of"], "tallyman",
            "{resource}"
        );
    }
    // Every write is a server-side apply by the one field manager (Events aside).
    for w in env.api.writes() {
        if w.path.contains("/events")
            || w.content_type.as_deref() == Some("application/json-patch+json")
        {
            continue;
        }
        assert_eq!(w.method, "PATCH", "{w:?}");
        assert_eq!(
            w.content_type.as_deref(),
            Some("application/apply-patch+yaml"),
            "{w:?}"
        );
        assert!(w.query.contains("fieldManager=tallyman-operator"), "{w:?}");
    }

    let wf: Workflow = current(&env, WF).unwrap();
    let status = wf.status.expect("status written");
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.revision.as_deref(), Some(revision_of(&env).as_str()));
    let ready = conditions::get(&status.conditions, READY).unwrap();
    // The fake runs no Deployment controller: the workers never become
    // ready; and the example's Secrets were not applied, which is named.
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "SecretsMissing")
    );
    assert!(ready.message.contains("erp-api-token"), "{}", ready.message);
    assert_eq!(status.workers.unwrap().desired, wf.spec.workers.replicas);

    // The JetStream objects the workers need exist.
    let names = Names::new(NS, WF);
    let mut events = env.js.get_stream(names.events_stream()).await.unwrap();
    let consumer = events
        .consumer_info(names.events_consumer())
        .await
        .expect("the events consumer exists");
    assert_eq!(
        consumer.config.filter_subjects.len(),
        wf.spec.trigger.events.len()
    );
    // It starts at the Workflow's creation: one deleted and created again
    // under this name does not replay the namespace's history, and the
    // workers are told the same.
    let created = wf.metadata.creation_timestamp.clone().unwrap().0;
    assert!(
        matches!(
            consumer.config.deliver_policy,
            async_nats::jetstream::consumer::DeliverPolicy::ByStartTime { start_time }
                if start_time.unix_timestamp() == created.as_second()
        ),
        "{:?}",
        consumer.config.deliver_policy
    );
    let deployment = child(&env, "apps/v1", "deployments", "shipment-to-invoice-worker").unwrap();
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    let args: Vec<&str> = args
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--events-since")
        .expect("{args:?}");
    let since = chrono::DateTime::parse_from_rfc3339(args[at + 1]).unwrap();
    assert_eq!(since.timestamp(), created.as_second());
    env.js
        .get_key_value(names.instances_bucket())
        .await
        .expect("the instances bucket exists");
    let _ = events.info().await.unwrap();
}

#[tokio::test]
async fn a_second_reconcile_writes_nothing() {
    let env = env().await;
    seed_example(&env, "shipment-to-invoice");
    settle(&env).await;
    env.api.clear_requests();
    reconcile(&env).await.unwrap();
    assert!(env.api.writes().is_empty(), "{:#?}", env.api.writes());
    assert!(!env.api.requests().is_empty(), "it did read");
}

#[tokio::test]
async fn a_changed_connector_rolls_the_workers() {
    let env = env().await;
    let set = seed_example(&env, "shipment-to-invoice");
    settle(&env).await;
    let before = revision_of(&env);
    let rest = set
        .connectors
        .iter()
        .find(|c| c.spec.rest.is_some())
        .unwrap();
    let name = rest.metadata.name.clone().unwrap();
    let connectors: Api<Connector> = Api::namespaced(env.ctx.client.clone(), NS);
    connectors
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"rest": {"baseUrl": "https://erp-next.example.com/api/v3"}}}),
            ),
        )
        .await
        .unwrap();
    env.api.clear_requests();
    reconcile(&env).await.unwrap();
    let after = revision_of(&env);
    assert_ne!(
        before, after,
        "the pod template must change to roll the pods"
    );
    let cm = child(&env, "v1", "configmaps", "shipment-to-invoice-definition").unwrap();
    assert!(
        cm["data"]["definition.json"]
            .as_str()
            .unwrap()
            .contains("erp-next.example.com")
    );
    let wf: Workflow = current(&env, WF).unwrap();
    assert_eq!(wf.status.unwrap().revision, Some(after));
}

#[tokio::test]
async fn ready_workers_make_the_workflow_ready_with_an_event() {
    let env = env().await;
    seed_example(&env, "shipment-to-invoice");
    settle(&env).await;
    let wf: Workflow = current(&env, WF).unwrap();
    let desired = wf.spec.workers.replicas;
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(env.ctx.client.clone(), NS);
    deployments
        .patch_status(
            "shipment-to-invoice-worker",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observedGeneration": 1, "replicas": desired, "updatedReplicas": desired, "readyReplicas": desired}})),
        )
        .await
        .unwrap();
    env.api.clear_requests();
    reconcile(&env).await.unwrap();
    let wf: Workflow = current(&env, WF).unwrap();
    let ready = conditions::get(&wf.status.as_ref().unwrap().conditions, READY)
        .unwrap()
        .clone();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Reconciled")
    );
    assert!(
        env.api
            .writes()
            .iter()
            .any(|w| w.method == "POST" && w.path.ends_with("/events")),
        "{:#?}",
        env.api.writes()
    );
}

#[tokio::test]
async fn deletion_runs_the_finalizer() {
    let env = env().await;
    seed_example(&env, "shipment-to-invoice");
    settle(&env).await;
    // What the workers counted for this Workflow.
    let names = Names::new(NS, WF);
    let counts = env
        .js
        .get_key_value(names.counts_bucket())
        .await
        .expect("the counts bucket is ensured with the Workflow");
    tallyman_worker::counts::add(
        &env.js,
        &counts,
        WF,
        &tallyman_worker::counts::Counts {
            started: 3,
            completed: 3,
            ..Default::default()
        },
        "test",
        1,
    )
    .await
    .unwrap();
    let api: Api<Workflow> = Api::namespaced(env.ctx.client.clone(), NS);
    api.delete(WF, &DeleteParams::default()).await.unwrap();
    let wf: Workflow = current(&env, WF).expect("held by the finalizer");
    assert!(wf.metadata.deletion_timestamp.is_some());

    reconcile(&env).await.unwrap();
    assert!(
        current::<Workflow>(&env, WF).is_none(),
        "the finalizer was removed"
    );
    assert!(child(&env, "apps/v1", "deployments", "shipment-to-invoice-worker").is_none());
    let events = env.js.get_stream(names.events_stream()).await.unwrap();
    assert!(
        events.consumer_info(names.events_consumer()).await.is_err(),
        "consumer removed"
    );
    assert!(
        env.js
            .get_key_value(names.instances_bucket())
            .await
            .is_err(),
        "bucket removed"
    );
    assert!(
        tallyman_worker::counts::read(&counts, WF)
            .await
            .unwrap()
            .is_zero(),
        "a Workflow created again under this name counts from zero"
    );
    // The namespace's shared streams stay for the other Workflows.
    assert!(env.js.get_stream(names.audit_stream()).await.is_ok());
    // Cleaning up what is already gone succeeds.
    workflow::jetstream::cleanup(&env.js, NS, WF).await.unwrap();
}

/// The workers stop before their consumers go: a worker whose consumer is
/// removed under it exits, and started again it would set the consumers
/// and the bucket up afresh, left behind once the Workflow is gone. While
/// the worker Deployment is still being deleted (its pods stopping), the
/// finalizer waits.
#[tokio::test]
async fn deletion_waits_for_the_workers_before_removing_their_consumers() {
    let env = env().await;
    seed_example(&env, "shipment-to-invoice");
    settle(&env).await;
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(env.ctx.client.clone(), NS);
    let worker = "shipment-to-invoice-worker";
    // What the garbage collector's foreground deletion holds it with
    // while the pods stop.
    deployments
        .patch(
            worker,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["foregroundDeletion"]}})),
        )
        .await
        .unwrap();
    let api: Api<Workflow> = Api::namespaced(env.ctx.client.clone(), NS);
    api.delete(WF, &DeleteParams::default()).await.unwrap();

    let waiting = reconcile(&env).await.expect_err("waits for the workers");
    assert!(
        matches!(waiting, tallyman_controller::Error::WorkersStopping(_)),
        "{waiting}"
    );
    let held = child(&env, "apps/v1", "deployments", worker).expect("still stopping");
    assert!(held["metadata"]["deletionTimestamp"].is_string(), "{held}");
    let names = Names::new(NS, WF);
    let events = env.js.get_stream(names.events_stream()).await.unwrap();
    assert!(
        events.consumer_info(names.events_consumer()).await.is_ok(),
        "the consumer stays while the workers stop"
    );
    assert!(
        current::<Workflow>(&env, WF).is_some(),
        "the finalizer stays"
    );
    // Asked again, the Deployment is not deleted a second time.
    let deletes = |env: &Env| {
        env.api
            .requests()
            .iter()
            .filter(|r| r.method == "DELETE" && r.path.ends_with(worker))
            .count()
    };
    assert_eq!(deletes(&env), 1);
    reconcile(&env).await.expect_err("still waiting");
    assert_eq!(deletes(&env), 1);

    // The pods are gone: the garbage collector lets the Deployment go.
    deployments
        .patch(
            worker,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    reconcile(&env).await.unwrap();
    assert!(
        current::<Workflow>(&env, WF).is_none(),
        "the finalizer was removed"
    );
    assert!(
        events.consumer_info(names.events_consumer()).await.is_err(),
        "consumer removed"
    );
}

#[tokio::test]
async fn conflicts_and_api_errors_requeue_with_backoff() {
    let env = env().await;
    seed_example(&env, "shipment-to-invoice");
    reconcile(&env).await.unwrap(); // the finalizer
    let wf = Arc::new(current::<Workflow>(&env, WF).unwrap());

    env.api.fail_next(
        "PATCH",
        "/apis/apps/v1/namespaces/finance/deployments",
        409,
        1,
    );
    let e = workflow::reconcile(wf.clone(), env.ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(e.metric_label(), "Conflict");
    assert_eq!(
        workflow::error_policy(wf.clone(), &e, env.ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );

    env.api.fail_next(
        "GET",
        "/apis/tallyman.dev/v1alpha1/namespaces/finance/connectors",
        500,
        1,
    );
    let e = workflow::reconcile(wf.clone(), env.ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(e.metric_label(), "ReadFailed");
    assert_eq!(
        workflow::error_policy(wf.clone(), &e, env.ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );

    env.api.fail_next(
        "PATCH",
        "/apis/tallyman.dev/v1alpha1/namespaces/finance/workflows/shipment-to-invoice/status",
        500,
        1,
    );
    let e = workflow::reconcile(wf.clone(), env.ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(e.metric_label(), "StatusFailed");

    // The retry goes through, and a success resets the backoff.
    reconcile(&env).await.unwrap();
    assert_eq!(
        workflow::error_policy(wf.clone(), &e, env.ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    let metrics = env.ctx.metrics.encode();
    assert!(
        metrics.contains(
            r#"tallyman_operator_reconcile_errors_total{controller="workflow",reason="Conflict"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tallyman_operator_reconciles_total{controller="workflow"} 5"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_invalid_spec_sets_the_condition_and_creates_nothing() {
    let env = env().await;
    let set = fixtures_with_bad_correlate();
    for c in &set.connectors {
        seed(&env, c);
    }
    for p in &set.policies {
        seed(&env, p);
    }
    seed(&env, &set.workflows[0]);
    reconcile(&env).await.unwrap();
    assert_eq!(reconcile(&env).await.unwrap(), Action::await_change());
    let wf: Workflow = current(&env, WF).unwrap();
    let status = wf.status.unwrap();
    let ready = conditions::get(&status.conditions, READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(
        ready.message.starts_with("spec.trigger.correlate: "),
        "{}",
        ready.message
    );
    assert_eq!(status.observed_generation, Some(1));
    assert!(child(&env, "apps/v1", "deployments", "shipment-to-invoice-worker").is_none());
    assert!(
        env.api
            .writes()
            .iter()
            .any(|w| w.method == "POST" && w.path.ends_with("/events"))
    );
    // And it stays quiet until something changes.
    env.api.clear_requests();
    reconcile(&env).await.unwrap();
    assert!(env.api.writes().is_empty(), "{:#?}", env.api.writes());
}

#[tokio::test]
async fn a_long_condition_message_still_makes_an_event() {
    // Forty broken checks: a Ready message of several kB, where the API
    // server takes an Event's note of at most 1 kB.
    let env = env().await;
    let mut set = tallyman_controller::fixtures::example("shipment-to-invoice");
    let check = set.workflows[0]
        .spec
        .steps
        .iter()
        .find(|s| s.check.is_some())
        .unwrap()
        .clone();
    for i in 0..40 {
        let mut broken = check.clone();
        broken.name = format!("prüfung-{i}");
        broken.check = Some("vars.lines.size() >".into());
        set.workflows[0].spec.steps.push(broken);
    }
    for c in &set.connectors {
        seed(&env, c);
    }
    for p in &set.policies {
        seed(&env, p);
    }
    seed(&env, &set.workflows[0]);
    settle(&env).await;
    let wf: Workflow = current(&env, WF).unwrap();
    let ready = conditions::get(&wf.status.unwrap().conditions, READY)
        .unwrap()
        .clone();
    assert_eq!(ready.reason, "InvalidSpec");
    assert!(ready.message.len() > 2048, "{}", ready.message.len());
    let events = env.api.objects("events.k8s.io/v1", "events", NS);
    let note = events
        .iter()
        .find(|e| e["reason"] == "InvalidSpec")
        .and_then(|e| e["note"].as_str())
        .expect("an InvalidSpec Event");
    assert!(note.len() <= 1024, "{}", note.len());
    assert!(note.ends_with('…'), "{note}");
    assert!(ready.message.starts_with(note.trim_end_matches('…')));
}

fn fixtures_with_bad_correlate() -> tallyman_controller::fixtures::Example {
    let mut set = tallyman_controller::fixtures::example("shipment-to-invoice");
    set.workflows[0].spec.trigger.correlate = "event.data.orderId +".into();
    set
}

#[tokio::test]
async fn a_rotated_secret_rolls_the_workers() {
    let env = env().await;
    seed_example(&env, "shipment-to-invoice");
    create_secret(&env, "erp-api-token", json!({"token": "b2xk"})).await;
    settle(&env).await;
    let hash = |env: &Env| {
        let d = child(env, "apps/v1", "deployments", "shipment-to-invoice-worker").unwrap();
        d["spec"]["template"]["metadata"]["annotations"]["tallyman.dev/secrets-hash"].clone()
    };
    let before = hash(&env);
    assert!(before.is_string());
    patch_secret(&env, "erp-api-token", json!({"token": "bmV3"})).await;
    reconcile(&env).await.unwrap();
    assert_ne!(hash(&env), before);
    // The definition did not change: only the Secret's data.
    let wf: Workflow = current(&env, WF).unwrap();
    assert_eq!(wf.status.unwrap().revision, Some(revision_of(&env)));
}

#[tokio::test]
async fn rotated_nats_credentials_roll_the_workers() {
    let env = env_with(tallyman_controller::PodNats {
        creds: Some(
            tallyman_controller::secret_key_ref("t", "tallyman-nats", "nats.creds").unwrap(),
        ),
        ca: None,
    })
    .await;
    seed_example(&env, "shipment-to-invoice");
    settle(&env).await;
    let pod = |env: &Env| {
        child(env, "apps/v1", "deployments", "shipment-to-invoice-worker").unwrap()["spec"]
            ["template"]
            .clone()
    };
    let missing = pod(&env);
    let env_var = missing["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "TALLYMAN_NATS_CREDS")
        .cloned();
    assert_eq!(
        env_var.unwrap()["value"],
        "/var/run/tallyman/secrets/tallyman-nats/nats.creds"
    );
    assert!(
        missing["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "tallyman-nats")
    );
    // The Workflow says what keeps its pods from starting.
    let ready = |env: &Env| {
        let wf: Workflow = current(env, WF).unwrap();
        let c = wf
            .status
            .unwrap()
            .conditions
            .into_iter()
            .find(|c| c.type_ == READY)
            .unwrap();
        (c.reason, c.message)
    };
    let (reason, message) = ready(&env);
    assert_eq!(reason, "SecretsMissing");
    assert!(message.contains("tallyman-nats"), "{message}");
    let hash =
        |t: &serde_json::Value| t["metadata"]["annotations"]["tallyman.dev/secrets-hash"].clone();
    // Created after the workers, under another key: they roll to get it,
    // and the key they read is named.
    create_secret(&env, "tallyman-nats", json!({"user.creds": "b2xk"})).await;
    reconcile(&env).await.unwrap();
    let misnamed = pod(&env);
    assert_ne!(hash(&misnamed), hash(&missing));
    let (reason, message) = ready(&env);
    assert_eq!(reason, "SecretsMissing");
    assert!(
        message.contains("tallyman-nats: key nats.creds"),
        "{message}"
    );
    patch_secret(&env, "tallyman-nats", json!({"nats.creds": "b2xk"})).await;
    reconcile(&env).await.unwrap();
    let created = pod(&env);
    assert_ne!(hash(&created), hash(&misnamed));
    let (reason, message) = ready(&env);
    assert!(!message.contains("tallyman-nats"), "{reason}: {message}");
    // Rotated.
    patch_secret(&env, "tallyman-nats", json!({"nats.creds": "bmV3"})).await;
    reconcile(&env).await.unwrap();
    assert_ne!(hash(&pod(&env)), hash(&created));
}

fn secrets(env: &Env) -> Api<k8s_openapi::api::core::v1::Secret> {
    Api::namespaced(env.ctx.client.clone(), NS)
}

/// A Secret of the namespace with `data` (base64 values), as applied.
async fn create_secret(env: &Env, name: &str, data: serde_json::Value) {
    let secret =
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data});
    secrets(env)
        .create(
            &Default::default(),
            &serde_json::from_value(secret).unwrap(),
        )
        .await
        .unwrap();
}

/// `data` merged into the Secret `name`: a rotation.
async fn patch_secret(env: &Env, name: &str, data: serde_json::Value) {
    secrets(env)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "data": data })),
        )
        .await
        .unwrap();
}
