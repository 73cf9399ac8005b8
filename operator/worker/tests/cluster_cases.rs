//! A worker whose cases are ExceptionCases: the real worker on a real
//! nats-server, the real `kube::Client` against the fake API server (with
//! watches), decisions appended the way `kubectl tallyman approve` does.

mod support;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use support::*;
use tallyman_api::v1alpha1::{CaseState, ExceptionCase};
use tallyman_core::engine::Status;
use tallyman_testing::erp::{OrderLine, SimErp};
use tallyman_testing::kubeapi::{FakeApi, Key};
use tallyman_testing::nats::NatsServer;
use tallyman_worker::CaseBackend;

const NS: &str = "finance";

/// Append one decision under a test of the decisions seen, as the plugin does.
async fn append(cases: &Api<ExceptionCase>, name: &str, decision: serde_json::Value) {
    let seen = cases.get(name).await.unwrap().spec.decisions;
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/decisions", "value": seen},
        {"op": "add", "path": "/spec/decisions/-", "value": decision},
    ]))
    .unwrap();
    cases
        .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .unwrap();
}

/// The Workflow `name` as the API server holds it (its uid, its status),
/// for the worker's status.instances and Events.
fn seed_workflow(kube: &FakeApi, name: &str) -> serde_json::Value {
    kube.seed(
        Key::new("tallyman.dev/v1alpha1", "workflows", NS, name),
        json!({"apiVersion": "tallyman.dev/v1alpha1", "kind": "Workflow",
               "metadata": {"name": name, "namespace": NS},
               "spec": {}}),
    )
}

async fn eventually<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(t) = found() {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn eventually_case(
    cases: &Api<ExceptionCase>,
    what: &str,
    mut cond: impl FnMut(&ExceptionCase) -> bool,
) -> ExceptionCase {
    let start = std::time::Instant::now();
    loop {
        if let Some(c) = cases
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .next()
            && cond(&c)
        {
            return c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_decided_in_the_cluster_resumes_its_instance() {
    let nats = NatsServer::start();
    let erp = SimErp::start().await;
    let kube = FakeApi::start().await;
    let (def, secrets) = example("shipment-to-invoice");
    let run = start_with(
        &nats.url(),
        &def,
        &secrets,
        &erp.base_url(),
        CaseBackend::Kubernetes(kube.client()),
    )
    .await;
    let cases: Api<ExceptionCase> = Api::namespaced(kube.client(), NS);
    // The Workflow whose status.instances the worker keeps.
    let workflow = seed_workflow(&kube, "shipment-to-invoice");

    // 5 of 9 × 250.00 shipped: a 1000.00 variance for one controller.
    let js = async_nats::jetstream::new(connect(&nats.url()).await);
    seed_order(&erp, "4800", 9, "250.00");
    publish(&js, NS, "order.created", "o-4800", &order_data("4800")).await;
    publish(
        &js,
        NS,
        "shipment.confirmed",
        "s-4800",
        &shipment_data("4800", 5),
    )
    .await;

    let case = eventually_case(&cases, "the ExceptionCase", |c| {
        c.status.as_ref().is_some_and(|s| s.deadline.is_some())
    })
    .await;
    let name = case.metadata.name.clone().unwrap();
    assert_eq!(case.spec.key, "4800");
    assert_eq!(case.spec.reason, "QuantityMismatch");
    assert_eq!(case.spec.initiator, "wms-operator-17");
    assert_eq!(case.status.as_ref().unwrap().state, CaseState::Open);
    assert_eq!(
        erp.invoice_count(),
        0,
        "nothing is invoiced before a decision"
    );

    // kubectl describe workflow tells of it, and of a message no worker can
    // read, by Events that name the Workflow by its uid.
    js.publish(
        format!("tallyman.{NS}.events.order.created"),
        "not an event".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let uid = workflow["metadata"]["uid"].as_str().unwrap().to_string();
    for (reason, action, kind) in [
        ("ExceptionOpened", "QuantityMismatch", "Normal"),
        ("PoisonMessage", "Consume", "Warning"),
    ] {
        let event = eventually(&format!("a {reason} Event"), || {
            kube.objects("events.k8s.io/v1", "events", NS)
                .into_iter()
                .find(|e| e["reason"] == reason)
        })
        .await;
        assert_eq!(event["action"], action, "{event}");
        assert_eq!(event["type"], kind, "{event}");
        assert_eq!(event["reportingController"], "tallyman-worker", "{event}");
        let regarding = &event["regarding"];
        assert_eq!(
            (
                regarding["kind"].as_str(),
                regarding["name"].as_str(),
                regarding["uid"].as_str()
            ),
            (
                Some("Workflow"),
                Some("shipment-to-invoice"),
                Some(uid.as_str())
            ),
            "{event}"
        );
    }

    // The initiator's own approval, as if no admission policy stopped it:
    // it does not count, and the status says why.
    append(
        &cases,
        &name,
        json!({"approver": "wms-operator-17", "groups": ["finance-controllers"], "decision": "Approve"}),
    )
    .await;
    let ignored = eventually_case(&cases, "the ignored decision noted", |c| {
        c.status
            .as_ref()
            .and_then(|s| s.message.as_deref())
            .is_some_and(|m| m.contains("not counted"))
    })
    .await;
    assert_eq!(ignored.status.as_ref().unwrap().state, CaseState::Open);
    assert_eq!(erp.invoice_count(), 0);

    append(
        &cases,
        &name,
        json!({"approver": "alice", "groups": ["finance-controllers"], "decision": "Approve", "comment": "short-shipped, agreed"}),
    )
    .await;
    let decided = eventually_case(&cases, "the case approved and taken", |c| {
        c.status.as_ref().is_some_and(|s| {
            s.state == CaseState::Approved
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Resumed" && c.status == "True")
        })
    })
    .await;
    let status = decided.status.unwrap();
    assert_eq!(status.approvals, 1);
    assert!(status.resolved_at.is_some());

    // kubectl describe exceptioncase tells its story: approved, then taken
    // by the instance; the ignored decision changed no state and told nothing.
    let case_uid = decided.metadata.uid.clone().unwrap();
    let about_case = |reason: &'static str| {
        let kube = &kube;
        let name = name.clone();
        let case_uid = case_uid.clone();
        move || {
            kube.objects("events.k8s.io/v1", "events", NS)
                .into_iter()
                .filter(|e| e["regarding"]["kind"] == "ExceptionCase")
                .find(|e| {
                    e["reason"] == reason
                        && e["regarding"]["name"] == name.as_str()
                        && e["regarding"]["uid"] == case_uid.as_str()
                })
        }
    };
    let approved = eventually("an Approved Event on the case", about_case("Approved")).await;
    assert!(
        approved["note"]
            .as_str()
            .is_some_and(|n| n.starts_with("Approved by alice")),
        "{approved}"
    );
    assert_eq!(approved["type"], "Normal", "{approved}");
    let resumed = eventually("a Resumed Event on the case", about_case("Resumed")).await;
    assert!(
        resumed["note"]
            .as_str()
            .is_some_and(|n| n.starts_with("instance 4800 of shipment-to-invoice took the outcome")),
        "{resumed}"
    );
    let on_case = kube
        .objects("events.k8s.io/v1", "events", NS)
        .into_iter()
        .filter(|e| e["regarding"]["kind"] == "ExceptionCase")
        .count();
    assert_eq!(on_case, 2, "one Event per change of the case");

    wait_for("the invoice", Duration::from_secs(20), || {
        erp.invoice_count() == 1
    })
    .await;
    let instance = run.worker.instance("4800").await.unwrap().unwrap();
    assert_eq!(instance.status, tallyman_core::engine::Status::Completed);

    // kubectl get workflow shows what happened.
    let start = std::time::Instant::now();
    loop {
        let wf = kube
            .object(&Key::new(
                "tallyman.dev/v1alpha1",
                "workflows",
                NS,
                "shipment-to-invoice",
            ))
            .unwrap();
        if wf["status"]["instances"]
            == json!({"running": 0, "completed": 1, "rejected": 0, "failed": 0, "exceptions": 1})
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "status.instances never showed the completed instance: {}",
            wf["status"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run.shutdown().await;
}

/// A Workflow that ends an instance Failed by its own route (a returned item
/// that was never ordered) says so on the Workflow, with the step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_the_workflow_fails_is_told_on_the_workflow() {
    let env = env("returns-to-credit").await;
    env.erp
        .require_basic("svc-tallyman", "dummy-erp-sales-password-change-me");
    seed_return_order(&env.erp, vec![OrderLine::new("A-100", 2, "49.90")]);
    let kube = FakeApi::start().await;
    let workflow = seed_workflow(&kube, "returns-to-credit");
    let run = start_with(
        &env.nats.url(),
        &env.def,
        &env.secrets,
        &env.erp.base_url(),
        CaseBackend::Kubernetes(kube.client()),
    )
    .await;
    let js = async_nats::jetstream::new(connect(&env.nats.url()).await);
    publish(
        &js,
        NS,
        "return.received",
        "r-9",
        r#"{"rmaNumber":"RMA-9","orderId":"4711","customerId":"C-1001","receivedBy":"j.smith","lines":[{"sku":"Z-999","qty":1}]}"#,
    )
    .await;
    publish(
        &js,
        NS,
        "return.inspected",
        "i-9",
        r#"{"rmaNumber":"RMA-9","inspectedBy":"m.mueller","lines":[{"sku":"Z-999","qty":1,"grade":"A"}]}"#,
    )
    .await;
    wait_status(&run, "RMA-9", Status::Failed).await;
    let event = eventually("an InstanceFailed Event", || {
        kube.objects("events.k8s.io/v1", "events", NS)
            .into_iter()
            .find(|e| e["reason"] == "InstanceFailed")
    })
    .await;
    assert_eq!(event["action"], "on-order", "{event}");
    assert_eq!(event["type"], "Warning", "{event}");
    assert_eq!(
        event["note"], "an instance ended Failed at step on-order",
        "{event}"
    );
    assert_eq!(
        event["regarding"]["uid"], workflow["metadata"]["uid"],
        "{event}"
    );
    run.shutdown().await;
}
