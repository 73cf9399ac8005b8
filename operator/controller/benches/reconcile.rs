//! Reconcile 1,000 Workflows against the fake API server: time to converge
//! them all (finalizer, children, JetStream objects, status), the latency of
//! one reconcile, a no-op resync of all of them, and the operator's peak RSS.
//!
//! ```sh
//! cargo bench -p tallyman-controller --bench reconcile
//! BENCH_WORKFLOWS=200 BENCH_CONCURRENCY=8 cargo bench -p tallyman-controller --bench reconcile
//! ```
//!
//! The fake API server runs in a child process (this binary, re-executed),
//! so the peak RSS measured here is the reconciling side alone; nats-server
//! is a real broker in its own process.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use kube::api::{Api, ListParams, PostParams};
use tallyman_api::v1alpha1::{ApprovalPolicy, Connector, Workflow};
use tallyman_controller::{Context, Settings, fixtures, workflow};
use tallyman_telemetry::Metrics;
use tallyman_testing::kubeapi::FakeApi;
use tallyman_testing::nats::NatsServer;
use tallyman_testing::procstat;

const CHILD_ENV: &str = "TALLYMAN_BENCH_FAKE_API";
const NS: &str = "finance";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    if std::env::var_os(CHILD_ENV).is_some() {
        runtime.block_on(serve_fake());
    } else {
        runtime.block_on(bench());
    }
}

/// Child: serve the fake until the parent closes our stdin.
async fn serve_fake() {
    let api = FakeApi::start().await;
    println!("{}", api.url());
    std::io::stdout().flush().expect("stdout");
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await
    .expect("stdin reader");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn timed_pass(
    api: &Api<Workflow>,
    names: &[String],
    ctx: &Arc<Context>,
    concurrency: usize,
) -> (Duration, Vec<Duration>) {
    let start = Instant::now();
    let mut latencies: Vec<Duration> = stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            let ctx = ctx.clone();
            async move {
                let wf = api.get(&name).await.expect("get the Workflow");
                let t = Instant::now();
                workflow::reconcile(Arc::new(wf), ctx)
                    .await
                    .unwrap_or_else(|e| panic!("reconcile {name}: {e}"));
                t.elapsed()
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let total = start.elapsed();
    latencies.sort();
    (total, latencies)
}

async fn global_resource_version(client: &kube::Client) -> String {
    Api::<Workflow>::namespaced(client.clone(), NS)
        .list(&ListParams::default().limit(1))
        .await
        .expect("list")
        .metadata
        .resource_version
        .unwrap_or_default()
}

async fn bench() {
    let count = env_usize("BENCH_WORKFLOWS", 1000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 16);

    let mut child = Command::new(std::env::current_exe().expect("this binary"))
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the fake API server");
    let mut url = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut url)
        .expect("the fake's URL");
    let config = kube::Config::new(url.trim().parse().expect("a URL"));
    let client = kube::Client::try_from(config).expect("a client");
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    let ctx = Arc::new(Context::new(
        client.clone(),
        js,
        Settings {
            image: "tallyman:bench".into(),
            nats_url: "nats://nats:4222".into(),
            pod_nats: Default::default(),
        },
        Arc::new(Metrics::new()),
        Some("bench".into()),
    ));

    let set = fixtures::example("shipment-to-invoice");
    let pp = PostParams::default();
    for c in &set.connectors {
        Api::<Connector>::namespaced(client.clone(), NS)
            .create(&pp, c)
            .await
            .expect("seed");
    }
    for p in &set.policies {
        Api::<ApprovalPolicy>::namespaced(client.clone(), NS)
            .create(&pp, p)
            .await
            .expect("seed");
    }
    let workflows: Api<Workflow> = Api::namespaced(client.clone(), NS);
    let names: Vec<String> = (0..count).map(|i| format!("s2i-{i:04}")).collect();
    for name in &names {
        let mut wf = set.workflows[0].clone();
        wf.metadata.name = Some(name.clone());
        workflows.create(&pp, &wf).await.expect("seed");
    }

    // Converge: the first reconcile of each adds the finalizer, the second
    // ensures the JetStream objects, applies the six children and the status.
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (t_finalizers, _) = timed_pass(&workflows, &names, &ctx, concurrency).await;
    let (t_apply, apply) = timed_pass(&workflows, &names, &ctx, concurrency).await;
    let before = global_resource_version(&client).await;
    let (t_noop, noop) = timed_pass(&workflows, &names, &ctx, concurrency).await;
    let after = global_resource_version(&client).await;
    assert_eq!(before, after, "the no-op pass wrote something");

    // The pure steps alone, on one thread, for the cost breakdown.
    let t = Instant::now();
    let rounds = 50;
    for _ in 0..rounds {
        let def = workflow::validate::validate(&set.workflows[0], &set.connectors, &set.policies)
            .expect("valid");
        std::hint::black_box(def);
    }
    let validate_ms = ms(t.elapsed()) / rounds as f64;
    // Of which: the fixed cost of one validation run with no document (the
    // CRD schemas and their CEL rules compiled).
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(tallyman_core::validate::validate_loaded(Default::default()));
    }
    let setup_ms = ms(t.elapsed()) / rounds as f64;
    let def = workflow::validate::validate(&set.workflows[0], &set.connectors, &set.policies)
        .expect("valid");
    let mut wf = set.workflows[0].clone();
    wf.metadata.uid = Some("uid".into());
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(workflow::build::build(&wf, &def, &ctx.settings, "h").expect("build"));
    }
    let build_ms = ms(t.elapsed()) / rounds as f64;

    let (cpu, rss) = procstat::usage(std::process::id());
    let (fake_cpu, fake_rss) = procstat::usage(child.id());
    let (nats_cpu, nats_rss) = nats.pid().map(procstat::usage).unwrap_or_default();
    drop(child.stdin.take());
    let _ = child.wait();

    println!("{count} Workflows, {concurrency} reconciles in flight");
    println!(
        "converge: {:.2} s (finalizers {:.2} s + apply {:.2} s), {:.0} Workflows/s",
        (t_finalizers + t_apply).as_secs_f64(),
        t_finalizers.as_secs_f64(),
        t_apply.as_secs_f64(),
        count as f64 / (t_finalizers + t_apply).as_secs_f64()
    );
    println!(
        "apply reconcile: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(percentile(&apply, 0.5)),
        ms(percentile(&apply, 0.99)),
        ms(*apply.last().expect("some"))
    );
    println!(
        "no-op resync: {:.2} s, p50 {:.1} ms, p99 {:.1} ms, writes 0",
        t_noop.as_secs_f64(),
        ms(percentile(&noop, 0.5)),
        ms(percentile(&noop, 0.99))
    );
    println!(
        "pure steps, one thread: validate {validate_ms:.1} ms (of which schema setup {setup_ms:.1} ms), build {build_ms:.2} ms per Workflow"
    );
    println!("operator: {cpu:.1} s CPU, peak RSS {rss:.0} MiB");
    println!("fake API server: {fake_cpu:.1} s CPU, peak RSS {fake_rss:.0} MiB");
    println!("nats-server: {nats_cpu:.1} s CPU, peak RSS {nats_rss:.0} MiB");
}
