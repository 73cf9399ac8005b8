//! `tallyman gateway`: serve a namespace's webhook Connectors, publishing
//! canonical events to JetStream.
//!
//! The manifests are read and validated like `tallyman validate`. They are
//! read again on SIGHUP and every `--reload-interval`; a changed set (specs
//! or Secret values) is swapped in without dropping requests in flight, an
//! invalid one is logged and the running set kept.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tallyman_api::v1alpha1::ConnectorSpec;
use tallyman_connectors::webhook::Routes;
use tallyman_connectors::{MountedSecrets, SecretSource, StaticSecrets};
use tallyman_core::validate::Object;
use tallyman_telemetry::{Metrics, Readiness};
use tokio::sync::watch;

use super::manifests;
use super::worker::shutdown_signal;

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
    /// Manifests holding the Connectors (files or directories).
    #[arg(long, value_name = "DIR")]
    manifests: PathBuf,
    /// The namespace whose webhook Connectors to serve.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Where webhooks are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Mounted Secrets: DIR/<secret>/<key>. Without it, Secrets come from --manifests.
    #[arg(long, value_name = "DIR")]
    secrets_dir: Option<PathBuf>,
    /// How often to re-read the manifests and Secrets (0s: only on SIGHUP).
    #[arg(long, default_value = "30s")]
    reload_interval: tallyman_api::v1alpha1::Duration,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    tallyman_telemetry::init_tracing("gateway");
    super::block_on(serve(args))?
}

/// The namespace's webhook Connectors, compiled.
fn load(args: &Args) -> anyhow::Result<Routes> {
    let set = manifests::load_valid(std::slice::from_ref(&args.manifests))?;
    let connectors: Vec<(String, ConnectorSpec)> = set
        .report
        .valid
        .iter()
        .filter(|r| r.namespace == args.namespace)
        .filter_map(|r| match &r.object {
            Object::Connector(c) => Some((r.name.clone(), c.spec.clone())),
            _ => None,
        })
        .collect();
    let secrets: Box<dyn SecretSource> = match &args.secrets_dir {
        Some(dir) => Box::new(MountedSecrets::new(dir.clone())),
        None => Box::new(StaticSecrets::from_manifests(
            set.documents(),
            &args.namespace,
        )),
    };
    Ok(Routes::new(&args.namespace, &connectors, secrets.as_ref())?)
}

async fn serve(args: Args) -> anyhow::Result<ExitCode> {
    // Listened for from the start: a pod stopped while it still waits for
    // NATS exits cleanly, not by the signal.
    let mut shutdown = std::pin::pin!(shutdown_signal());
    let connected = tokio::select! {
        biased;
        () = &mut shutdown => None,
        connected = connect(&args) => Some(connected?),
    };
    let Some((routes, client)) = connected else {
        tracing::info!("stopped while starting; nothing was in flight");
        return Ok(ExitCode::SUCCESS);
    };
    let metrics = Arc::new(Metrics::new());
    let ready = Readiness::new();
    let (stop, stopped) = watch::channel(false);
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (_, telemetry) = tallyman_telemetry::serve(
        args.metrics_listen,
        metrics.clone(),
        ready.clone(),
        wait(stopped.clone()),
    )
    .await?;
    let serving =
        tallyman_worker::gateway::serve(args.listen, routes, client, metrics, wait(stopped))
            .await?;
    let mut fingerprint = serving.gateway.routes().fingerprint();
    ready.set_ready(true);

    let interval = args.reload_interval.as_std();
    let mut tick = (!interval.is_zero()).then(|| {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("failed to install the SIGHUP handler")?;
    loop {
        #[cfg(unix)]
        let hup = hangup.recv();
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = &mut shutdown => break,
            _ = async {
                match tick.as_mut() {
                    Some(tick) => {
                        tick.tick().await;
                    }
                    None => std::future::pending().await,
                }
            } => {}
            _ = hup => tracing::info!("SIGHUP: reading the manifests again"),
        }
        match load(&args) {
            Ok(routes) if routes.fingerprint() != fingerprint => {
                fingerprint = routes.fingerprint();
                serving.gateway.reload(routes);
            }
            Ok(_) => {}
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "the manifests are not valid; still serving the previous webhooks"
            ),
        }
    }
    tracing::info!("shutting down: answering the requests in flight");
    ready.set_ready(false);
    let _ = stop.send(true);
    serving
        .task
        .await
        .context("the gateway task failed")?
        .context("the gateway server failed")?;
    let _ = telemetry.await;
    Ok(ExitCode::SUCCESS)
}

/// The webhooks of the manifests, and the NATS connection they publish to.
async fn connect(args: &Args) -> anyhow::Result<(Routes, async_nats::Client)> {
    let routes = load(args)?;
    if routes.is_empty() {
        tracing::warn!(
            namespace = %args.namespace,
            "no webhook Connector in this namespace yet; every request is answered 404"
        );
    }
    tracing::info!(url = %args.nats, "connecting to NATS");
    let client = args
        .nats_auth
        .connect(&args.nats, format!("tallyman-gateway/{}", args.namespace))
        .await?;
    Ok((routes, client))
}
