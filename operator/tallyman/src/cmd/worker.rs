//! `tallyman worker`: run one Workflow against NATS JetStream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use tallyman_connectors::{MountedSecrets, SecretSource, StaticSecrets};
use tallyman_core::engine::Definition;
use tallyman_telemetry::{Metrics, Readiness};
use tallyman_worker::calls::RestCaller;
use tallyman_worker::{CaseBackend, Worker, WorkerConfig};
use tokio::sync::watch;

use super::manifests;

#[derive(clap::Args)]
pub struct Args {
    /// NATS server URL.
    #[arg(
        long,
        env = "TALLYMAN_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats: String,
    #[command(flatten)]
    nats_auth: super::nats::Auth,
    /// The resolved definition (JSON, as the operator writes it into the
    /// worker's ConfigMap).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["manifests", "workflow"])]
    definition: Option<PathBuf>,
    /// Manifests to resolve the Workflow from (files or directories).
    #[arg(long, value_name = "DIR", requires = "workflow")]
    manifests: Option<PathBuf>,
    /// The Workflow to run, with --manifests.
    #[arg(long, value_name = "NAME")]
    workflow: Option<String>,
    /// Namespace of the Workflow, with --manifests.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Mounted Secrets: DIR/<secret>/<key>. Without it, Secrets come from --manifests.
    #[arg(long, value_name = "DIR")]
    secrets_dir: Option<PathBuf>,
    /// Point a Connector at another base URL: NAME=URL (repeatable).
    #[arg(long = "connector-url", value_name = "NAME=URL")]
    connector_urls: Vec<String>,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, default_value = "0.0.0.0:9090")]
    listen: SocketAddr,
    /// Messages processed concurrently (default: the Workflow's workers.maxInFlight).
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// NATS connections in the pool.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Memory for running instances held between their inputs, estimated,
    /// in MiB; instances beyond it are read from the store when needed.
    #[arg(long, value_name = "MIB", default_value_t = tallyman_worker::held::DEFAULT_BUDGET >> 20)]
    instance_cache_mib: usize,
    /// How long before an unacknowledged message goes to another replica (e.g. 30s).
    #[arg(long, default_value = "30s")]
    ack_wait: tallyman_api::v1alpha1::Duration,
    /// When the workflow's event consumer is first created, start it at the
    /// events published since this time (RFC 3339) instead of every event
    /// the stream holds; the operator passes the Workflow's creation time.
    #[arg(long, value_name = "TIME")]
    events_since: Option<chrono::DateTime<chrono::Utc>>,
    /// Where exception cases live: `jetstream` (a KV bucket; no cluster
    /// needed) or `kubernetes` (ExceptionCases in the Workflow's namespace,
    /// decided with `kubectl tallyman`; the in-cluster or kubeconfig
    /// credentials are used).
    #[arg(long, value_enum, default_value_t = CaseStoreArg::Jetstream, env = "TALLYMAN_CASES")]
    cases: CaseStoreArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CaseStoreArg {
    Jetstream,
    Kubernetes,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    tallyman_telemetry::init_tracing("worker");
    super::block_on(serve(args))?
}

/// `NAME=URL` pairs.
pub fn parse_urls(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((name, url)) if !name.is_empty() && !url.is_empty() => {
                Ok((name.to_string(), url.to_string()))
            }
            _ => bail!("--connector-url takes NAME=URL, got {p:?}"),
        })
        .collect()
}

async fn serve(args: Args) -> anyhow::Result<ExitCode> {
    // Listened for from the start: a pod stopped while it still waits for
    // NATS or JetStream exits cleanly, not by the signal.
    let mut shutdown = std::pin::pin!(shutdown_signal());
    let ready = Readiness::new();
    let (stop, stopped) = watch::channel(false);
    // The telemetry server outlives the drain: /readyz answers 503 (and
    // /metrics counts the last messages) until the worker is done.
    let (stop_http, http_stopped) = watch::channel(false);
    let started = tokio::select! {
        biased;
        () = &mut shutdown => None,
        started = start(args, ready.clone(), http_stopped) => Some(started?),
    };
    let Some((worker, http)) = started else {
        tracing::info!("stopped while starting; nothing was in flight");
        return Ok(ExitCode::SUCCESS);
    };
    ready.set_ready(true);
    let mut task = tokio::spawn(worker.run(stopped));
    // The worker stops by itself when it can no longer consume (its
    // consumer deleted, say): not ready from then on, and the process
    // exits with its error so that it is started again.
    let ran = tokio::select! {
        () = &mut shutdown => {
            tracing::info!("shutting down: finishing the messages in flight");
            ready.set_ready(false);
            let _ = stop.send(true);
            task.await
        }
        ran = &mut task => {
            ready.set_ready(false);
            ran
        }
    };
    let _ = stop_http.send(true);
    let _ = http.await;
    ran??;
    Ok(ExitCode::SUCCESS)
}

/// Everything before the worker takes messages: the definition, the
/// connections, the streams and the telemetry server (stopped by
/// `http_stopped`).
async fn start(
    args: Args,
    ready: Readiness,
    http_stopped: watch::Receiver<bool>,
) -> anyhow::Result<(Arc<Worker>, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let (definition, secrets): (Definition, Box<dyn SecretSource>) =
        match (&args.definition, &args.manifests) {
            (Some(file), _) => {
                let text = std::fs::read(file)
                    .with_context(|| format!("failed to read {}", file.display()))?;
                let def: Definition = serde_json::from_slice(&text)
                    .with_context(|| format!("{} is not a definition", file.display()))?;
                let secrets = MountedSecrets::new(
                    args.secrets_dir
                        .clone()
                        .unwrap_or_else(|| "/var/run/tallyman/secrets".into()),
                );
                (def, Box::new(secrets))
            }
            (None, Some(dir)) => {
                let name = args.workflow.as_deref().expect("clap requires --workflow");
                let set = manifests::load_valid(std::slice::from_ref(dir))?;
                let def = set.definition(&args.namespace, name)?;
                let secrets: Box<dyn SecretSource> = match &args.secrets_dir {
                    Some(d) => Box::new(MountedSecrets::new(d.clone())),
                    None => Box::new(StaticSecrets::from_manifests(
                        set.documents(),
                        &args.namespace,
                    )),
                };
                (def, secrets)
            }
            (None, None) => {
                bail!("give --definition FILE, or --manifests DIR with --workflow NAME")
            }
        };
    let urls = parse_urls(&args.connector_urls)?;
    let caller = RestCaller::new(&definition, secrets.as_ref(), &urls)?;
    tracing::info!(url = %args.nats, "connecting to NATS");
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(
            args.nats_auth
                .connect(
                    &args.nats,
                    format!(
                        "tallyman-worker/{}/{}",
                        definition.namespace, definition.workflow
                    ),
                )
                .await?,
        );
    }
    let metrics = Arc::new(Metrics::new());
    let mut http_stop = http_stopped;
    let (addr, http) =
        tallyman_telemetry::serve(args.listen, metrics.clone(), ready.clone(), async move {
            let _ = http_stop.wait_for(|s| *s).await;
        })
        .await?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    let cases = match args.cases {
        CaseStoreArg::Jetstream => CaseBackend::JetStream,
        CaseStoreArg::Kubernetes => CaseBackend::Kubernetes(
            kube::Client::try_default()
                .await
                .context("failed to connect to the Kubernetes API for ExceptionCases")?,
        ),
    };
    let max_in_flight = args
        .max_in_flight
        .unwrap_or(definition.spec.workers.max_in_flight as usize);
    let worker = Worker::new(WorkerConfig {
        clients,
        definition,
        caller: Arc::new(caller),
        max_in_flight,
        metrics,
        ack_wait: args.ack_wait.as_std(),
        cases,
        instance_cache_bytes: args.instance_cache_mib.saturating_mul(1 << 20),
        events_since: args.events_since,
    })
    .await?;
    Ok((worker, http))
}

/// SIGTERM (Kubernetes) or Ctrl-C (a terminal).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
