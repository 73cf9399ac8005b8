//! `run::run` as `tallyman operator` runs it: the Lease, the telemetry
//! endpoint, the controllers' watches, and a clean shutdown that releases
//! the Lease. The fake serves no watches, so the controllers only list.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use tallyman_controller::Settings;
use tallyman_controller::run::{self, Options};
use tallyman_testing::kubeapi::FakeApi;
use tallyman_testing::nats::NatsServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn status_line(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.lines().next().unwrap_or_default().to_string()
}

/// Poll `check` until it holds, for up to 30 s (the suite shares 2 cores).
async fn eventually<F: AsyncFn() -> bool>(what: &str, check: F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tallyman CRDs, established, as the chart installs them.
fn seed_crds(api: &FakeApi) {
    for crd in tallyman_api::all_crds() {
        let name = crd.metadata.name.clone().unwrap();
        let mut v = serde_json::to_value(&crd).unwrap();
        v["status"] =
            serde_json::json!({"conditions": [{"type": "Established", "status": "True"}]});
        api.seed(
            tallyman_testing::kubeapi::Key::new(
                "apiextensions.k8s.io/v1",
                "customresourcedefinitions",
                "",
                &name,
            ),
            v,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leads_serves_health_and_releases_the_lease_on_shutdown() {
    let api = Arc::new(FakeApi::start().await);
    seed_crds(&api);
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(run::run(
        api.client(),
        js,
        Settings {
            image: "tallyman:test".into(),
            nats_url: nats.url(),
            pod_nats: Default::default(),
        },
        Options {
            listen,
            lease_namespace: "tallyman-system".into(),
            lease_name: "tallyman-operator".into(),
            identity: "pod-a".into(),
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let leases: Api<Lease> = Api::namespaced(api.client(), "tallyman-system");
    let holder = async || {
        leases
            .get_opt("tallyman-operator")
            .await
            .unwrap()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    };
    eventually("the Lease", async || {
        holder().await.as_deref() == Some("pod-a")
    })
    .await;
    assert!(status_line(listen, "/healthz").await.contains("200"));
    assert!(status_line(listen, "/readyz").await.contains("200"));
    // The controllers started their watches: each lists its resources.
    eventually("the controllers' lists", async || {
        let r = api.requests();
        ["workflows", "connectors", "approvalpolicies"]
            .iter()
            .all(|res| {
                r.iter().any(|q| {
                    q.method == "GET" && q.path == format!("/apis/tallyman.dev/v1alpha1/{res}")
                })
            })
    })
    .await;

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), operator)
        .await
        .expect("the operator stops on the signal")
        .unwrap()
        .expect("a clean exit");
    assert_eq!(
        holder().await,
        None,
        "the Lease is released for the next leader"
    );
}

/// The whole operator against the fake, which now serves watches: a
/// Workflow converges, and a changed ApprovalPolicy re-resolves it through
/// the watch relation (no polling: the resync is minutes away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_policy_re_resolves_its_workflows_through_the_watch() {
    use kube::api::{Patch, PatchParams};
    use tallyman_api::v1alpha1::{ApprovalPolicy, Workflow};
    use tallyman_testing::kubeapi::Key;

    let api = Arc::new(FakeApi::start().await);
    seed_crds(&api);
    let nats = NatsServer::start();
    let set = tallyman_controller::fixtures::example("shipment-to-invoice");
    let seed = |resource: &str, name: &Option<String>, v: serde_json::Value| {
        api.seed(
            Key::new(
                "tallyman.dev/v1alpha1",
                resource,
                "finance",
                name.as_deref().unwrap(),
            ),
            v,
        );
    };
    for c in &set.connectors {
        seed(
            "connectors",
            &c.metadata.name,
            serde_json::to_value(c).unwrap(),
        );
    }
    for p in &set.policies {
        seed(
            "approvalpolicies",
            &p.metadata.name,
            serde_json::to_value(p).unwrap(),
        );
    }
    let wf = &set.workflows[0];
    seed(
        "workflows",
        &wf.metadata.name,
        serde_json::to_value(wf).unwrap(),
    );
    let name = wf.metadata.name.clone().unwrap();

    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(run::run(
        api.client(),
        js,
        Settings {
            image: "tallyman:test".into(),
            nats_url: nats.url(),
            pod_nats: Default::default(),
        },
        Options {
            listen,
            lease_namespace: "tallyman-system".into(),
            lease_name: "tallyman-operator".into(),
            identity: "pod-a".into(),
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let workflows: Api<Workflow> = Api::namespaced(api.client(), "finance");
    let revision = async || {
        workflows
            .get(&name)
            .await
            .unwrap()
            .status
            .and_then(|s| s.revision)
    };
    eventually("the first revision", async || revision().await.is_some()).await;
    let first = revision().await.unwrap();
    let policy = set.policies[0].metadata.name.clone().unwrap();
    let mut spec = serde_json::to_value(&set.policies[0].spec).unwrap();
    spec["expiry"]["after"] = serde_json::json!("72h");
    Api::<ApprovalPolicy>::namespaced(api.client(), "finance")
        .patch(
            &policy,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": spec})),
        )
        .await
        .unwrap();
    eventually("a new revision", async || {
        revision().await.is_some_and(|r| r != first)
    })
    .await;
    let d = api
        .object(&Key::new(
            "apps/v1",
            "deployments",
            "finance",
            &format!("{name}-worker"),
        ))
        .unwrap();
    assert_eq!(
        d["spec"]["template"]["metadata"]["annotations"]["tallyman.dev/revision"],
        serde_json::json!(revision().await.unwrap())
    );
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), operator)
        .await
        .expect("the operator stops on the signal")
        .unwrap()
        .expect("a clean exit");
}
