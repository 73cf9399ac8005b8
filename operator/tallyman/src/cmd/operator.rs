//! `tallyman operator`: reconcile Workflows, Connectors and ApprovalPolicies
//! into workers, gateways and JetStream objects. One replica leads (a
//! Lease); the others wait, ready to take over.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tallyman_controller::Settings;
use tallyman_controller::run::{self, Options};

use super::worker::shutdown_signal;

#[derive(clap::Args)]
pub struct Args {
    /// NATS server URL; also given to worker and gateway pods.
    #[arg(long, env = "TALLYMAN_NATS_URL", default_value = "nats://nats:4222")]
    nats: String,
    /// NATS credentials file (JWT and NKey seed) of the operator.
    #[arg(long, env = "TALLYMAN_NATS_CREDS", value_name = "FILE")]
    nats_creds: Option<PathBuf>,
    /// PEM CA bundle to verify the NATS server's TLS certificate with.
    #[arg(long, env = "TALLYMAN_NATS_CA", value_name = "FILE")]
    nats_ca: Option<PathBuf>,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, default_value = "0.0.0.0:9090")]
    listen: SocketAddr,
    /// The image of the worker and gateway Deployments.
    #[arg(long, env = "TALLYMAN_IMAGE")]
    image: String,
    /// Namespace of the leader Lease (default: the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", value_name = "NS")]
    lease_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(long, default_value = "tallyman-operator", value_name = "NAME")]
    lease_name: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    tallyman_telemetry::init_tracing("operator");
    super::block_on(serve(args))?
}

/// This replica in the Lease and in Events: the pod name, else the host name.
fn identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| format!("tallyman-operator-{}", std::process::id()))
}

async fn serve(args: Args) -> anyhow::Result<ExitCode> {
    let client = kube::Client::try_default()
        .await
        .context("failed to configure the Kubernetes client (in-cluster or KUBECONFIG)")?;
    let mut options = async_nats::ConnectOptions::new().name("tallyman-operator");
    if let Some(creds) = &args.nats_creds {
        options = options
            .credentials_file(creds)
            .await
            .with_context(|| format!("failed to read NATS credentials {}", creds.display()))?;
    }
    if let Some(ca) = &args.nats_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let nats = options
        .connect(&args.nats)
        .await
        .with_context(|| format!("failed to connect to NATS at {}", args.nats))?;
    let lease_namespace = args
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    run::run(
        client,
        async_nats::jetstream::new(nats),
        Settings {
            image: args.image,
            nats_url: args.nats,
        },
        Options {
            listen: args.listen,
            lease_namespace,
            lease_name: args.lease_name,
            identity: identity(),
        },
        shutdown_signal(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
