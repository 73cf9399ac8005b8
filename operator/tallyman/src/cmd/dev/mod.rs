//! `tallyman dev`: the same manifests as for `kubectl apply`, run on one
//! machine without a cluster.
//!
//! ```text
//! manifests ─validate─▶ Set ─┬─ per namespace with webhook Connectors: a Gateway ─┐
//!                            └─ per Workflow: a Worker (RestCaller, KV cases)    │
//! one listener: /webhooks/{ns}/… ─▶ that namespace's Gateway ─publish─▶ JetStream ◀┘
//!               /dev/cases, /dev/status ─▶ the case stores and the workers
//! NATS: --nats URL, else a private nats-server with its store in --state-dir
//! ```
//!
//! Everything durable lives in JetStream, so a restart with the same state
//! directory resumes the instances, timers and cases where they were.

mod api;
pub mod client;
mod nats;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use async_nats::jetstream;
use tallyman_api::v1alpha1::ConnectorSpec;
use tallyman_connectors::StaticSecrets;
use tallyman_connectors::webhook::{Gateway, GatewayConfig, Routes};
use tallyman_core::validate::Object;
use tallyman_telemetry::{Metrics, Readiness};
use tallyman_worker::calls::RestCaller;
use tallyman_worker::gateway::JetStreamPublisher;
use tallyman_worker::names::Names;
use tallyman_worker::{ACK_WAIT, Worker, WorkerConfig};
use tokio::sync::watch;

use super::manifests;
use super::worker::{parse_urls, shutdown_signal};

#[derive(clap::Args)]
pub struct Args {
    /// The manifests to run (files or directories): Workflows, Connectors,
    /// ApprovalPolicies and the Secrets they reference.
    #[arg(long, value_name = "DIR")]
    manifests: PathBuf,
    /// A NATS server with JetStream to use; without it dev mode starts a
    /// private nats-server with its store in --state-dir.
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// Credentials and CA for the NATS of --nats.
    #[command(flatten)]
    nats_auth: super::nats::Auth,
    /// Where webhooks, the /dev/ API and /metrics are served.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where the private nats-server keeps its JetStream store; the same
    /// directory on the next start resumes every instance.
    #[arg(long, value_name = "DIR", default_value = ".tallyman/dev")]
    state_dir: PathBuf,
    /// Point a Connector at a local system: NAME=URL (repeatable).
    #[arg(long = "connector-url", value_name = "NAME=URL")]
    connector_urls: Vec<String>,
    /// Answer /dev/ requests from other hosts too (it trusts the approver
    /// named in a request: never on a shared network).
    #[arg(long)]
    allow_remote_dev_api: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    tallyman_telemetry::init_tracing("dev");
    // Validate before anything starts: an invalid set never touches NATS.
    let set = manifests::load_valid(std::slice::from_ref(&args.manifests))?;
    let urls = parse_urls(&args.connector_urls)?;
    for name in urls.keys() {
        let known = set
            .report
            .valid
            .iter()
            .any(|r| &r.name == name && matches!(r.object, Object::Connector(_)));
        if !known {
            bail!("--connector-url names {name:?}, which is no Connector among the manifests");
        }
    }
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("failed to create {}", args.state_dir.display()))?;
    let mut private = None;
    let nats_url = match &args.nats {
        Some(url) => url.clone(),
        None => {
            let server = nats::PrivateNats::start(&args.state_dir)?;
            let url = server.url();
            private = Some(server);
            url
        }
    };
    let result = super::block_on(serve(args, set, urls, nats_url));
    // Stopped after every worker and the gateway let go of it.
    if let Some(mut server) = private {
        server.stop();
    }
    result?
}

/// The webhook Connectors of each namespace.
fn connectors_by_namespace(set: &manifests::Set) -> BTreeMap<String, Vec<(String, ConnectorSpec)>> {
    let mut by_ns: BTreeMap<String, Vec<(String, ConnectorSpec)>> = BTreeMap::new();
    for r in &set.report.valid {
        if let Object::Connector(c) = &r.object
            && c.spec.webhook.is_some()
        {
            by_ns
                .entry(r.namespace.clone())
                .or_default()
                .push((r.name.clone(), c.spec.clone()));
        }
    }
    by_ns
}

async fn serve(
    args: Args,
    set: manifests::Set,
    urls: BTreeMap<String, String>,
    nats_url: String,
) -> anyhow::Result<ExitCode> {
    let mut clients = Vec::new();
    for _ in 0..2 {
        clients.push(
            args.nats_auth
                .connect(&nats_url, "tallyman-dev".into())
                .await?,
        );
    }
    let metrics = Arc::new(Metrics::new());
    let ready = Readiness::new();
    let (stop, stopped) = watch::channel(false);

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    let addr = listener.local_addr()?;

    // Gateways first: the namespace's streams exist before any worker
    // binds its consumer to them.
    let mut gateways = HashMap::new();
    let mut webhooks = Vec::new();
    for (namespace, connectors) in connectors_by_namespace(&set) {
        let secrets = StaticSecrets::from_manifests(set.documents(), &namespace);
        let routes = Routes::new(&namespace, &connectors, &secrets)?;
        tallyman_worker::setup::ensure_namespace(
            &jetstream::new(clients[0].clone()),
            &Names::new(&namespace, ""),
        )
        .await?;
        for path in routes.paths() {
            webhooks.push(format!("http://{addr}{path}"));
        }
        let config = GatewayConfig::default();
        let publisher = JetStreamPublisher::new(clients[1].clone(), config.publish_timeout);
        let gateway = Gateway::new(routes, Arc::new(publisher), metrics.clone(), config);
        gateways.insert(namespace, gateway);
    }

    let mut workers = Vec::new();
    let mut cases = BTreeMap::new();
    for r in &set.report.valid {
        if !matches!(r.object, Object::Workflow(_)) {
            continue;
        }
        let definition = set.definition(&r.namespace, &r.name)?;
        let secrets = StaticSecrets::from_manifests(set.documents(), &r.namespace);
        let caller = RestCaller::new(&definition, &secrets, &urls)?;
        let max_in_flight = definition.spec.workers.max_in_flight as usize;
        let worker = Worker::new(WorkerConfig {
            clients: clients.clone(),
            definition,
            caller: Arc::new(caller),
            max_in_flight,
            metrics: metrics.clone(),
            ack_wait: ACK_WAIT,
            cases: tallyman_worker::CaseBackend::JetStream,
            instance_cache_bytes: tallyman_worker::held::DEFAULT_BUDGET,
            events_since: None,
        })
        .await
        .with_context(|| format!("failed to start the worker of {}/{}", r.namespace, r.name))?;
        cases
            .entry(r.namespace.clone())
            .or_insert_with(|| worker.cases().clone());
        workers.push(worker);
    }

    let dev = Arc::new(api::Dev {
        workers: workers.clone(),
        cases,
        gateways,
        nats_url: nats_url.clone(),
        webhooks: webhooks.clone(),
        allow_remote: args.allow_remote_dev_api,
    });
    let app = api::router(dev).merge(tallyman_telemetry::router(metrics, ready.clone()));
    let mut http_stop = stopped.clone();
    // The gateway's server loop: the same header-read timeout, and the
    // peer address the /dev/ API checks.
    let http = tokio::spawn(tallyman_connectors::webhook::serve_router(
        listener,
        app,
        GatewayConfig::default().header_timeout,
        async move {
            let _ = http_stop.wait_for(|s| *s).await;
        },
    ));
    let mut tasks: tokio::task::JoinSet<_> = workers
        .iter()
        .map(|w| w.clone().run(stopped.clone()))
        .collect();
    ready.set_ready(true);
    print_banner(&args, &nats_url, addr, &webhooks, &workers);
    write_address(&args, addr, &nats_url)?;

    // A worker stops by itself only when it can no longer consume: then
    // dev mode stops too (the other workers finish what they hold), with
    // its error.
    let mut ran = Vec::new();
    tokio::select! {
        () = shutdown_signal() => {
            tracing::info!("shutting down: finishing the requests and messages in flight");
        }
        Some(first) = tasks.join_next() => {
            tracing::error!("a worker stopped by itself; stopping");
            ran.push(first);
        }
    }
    ready.set_ready(false);
    let _ = stop.send(true);
    let _ = http.await;
    while let Some(next) = tasks.join_next().await {
        ran.push(next);
    }
    let _ = std::fs::remove_file(args.state_dir.join("dev.json"));
    for result in ran {
        result.context("a worker panicked")??;
    }
    println!("tallyman dev: stopped");
    Ok(ExitCode::SUCCESS)
}

/// `<state dir>/dev.json`: where this run listens, for scripts and tests
/// (removed on a clean stop).
fn write_address(args: &Args, addr: SocketAddr, nats_url: &str) -> anyhow::Result<()> {
    let path = args.state_dir.join("dev.json");
    let text = serde_json::json!({
        "url": format!("http://{addr}"),
        "nats": nats_url,
        "pid": std::process::id(),
    });
    // Written whole, then renamed: a reader never sees half a file.
    let tmp = args.state_dir.join("dev.json.tmp");
    std::fs::write(&tmp, text.to_string())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("failed to write {}", path.display()))
}

fn print_banner(
    args: &Args,
    nats_url: &str,
    addr: SocketAddr,
    webhooks: &[String],
    workers: &[Arc<Worker>],
) {
    let nats = match &args.nats {
        Some(_) => nats_url.to_string(),
        None => format!(
            "{nats_url} (private; store in {})",
            args.state_dir.join("jetstream").display()
        ),
    };
    let mut out = format!(
        "tallyman dev: running {}\n  NATS       {nats}\n",
        args.manifests.display()
    );
    for (i, url) in webhooks.iter().enumerate() {
        let label = if i == 0 { "webhooks" } else { "" };
        out.push_str(&format!("  {label:<10} {url}\n"));
    }
    for (i, w) in workers.iter().enumerate() {
        let label = if i == 0 { "workflows" } else { "" };
        out.push_str(&format!(
            "  {label:<10} {}/{} (revision {})\n",
            w.names().namespace,
            w.names().workflow,
            w.revision()
        ));
    }
    out.push_str(&format!(
        "  cases      http://{addr}/dev/cases   (tallyman cases, tallyman approve CASE --as USER)\n  status     http://{addr}/dev/status\n  ready: Ctrl-C stops\n"
    ));
    print!("{out}");
}
