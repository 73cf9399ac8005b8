//! `tallyman operator`: reconcile Workflows, Connectors and ApprovalPolicies
//! into workers, gateways and JetStream objects. One replica leads (a
//! Lease); the others wait, ready to take over.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use tallyman_controller::run::{self, Options};
use tallyman_controller::{PodNats, Settings, secret_key_ref};

use super::worker::shutdown_signal;

#[derive(clap::Args)]
pub struct Args {
    /// NATS server URL; also given to worker and gateway pods.
    #[arg(long, env = "TALLYMAN_NATS_URL", default_value = "nats://nats:4222")]
    nats: String,
    /// The operator's own NATS credentials and CA.
    #[command(flatten)]
    nats_auth: super::nats::Auth,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, default_value = "0.0.0.0:9090")]
    listen: SocketAddr,
    /// Secret, in each Workflow's namespace, holding the NATS credentials
    /// file its worker and gateway pods connect with (a pod mounts only
    /// Secrets of its own namespace).
    #[arg(long, env = "TALLYMAN_POD_NATS_CREDS_SECRET", value_name = "NAME")]
    pod_nats_creds_secret: Option<String>,
    /// The key of the credentials file in --pod-nats-creds-secret.
    #[arg(
        long,
        env = "TALLYMAN_POD_NATS_CREDS_KEY",
        value_name = "KEY",
        default_value = "nats.creds"
    )]
    pod_nats_creds_key: String,
    /// Secret, in each Workflow's namespace, holding the PEM CA bundle its
    /// worker and gateway pods verify the NATS server's certificate with
    /// (they then require TLS).
    #[arg(long, env = "TALLYMAN_POD_NATS_CA_SECRET", value_name = "NAME")]
    pod_nats_ca_secret: Option<String>,
    /// The key of the CA bundle in --pod-nats-ca-secret.
    #[arg(
        long,
        env = "TALLYMAN_POD_NATS_CA_KEY",
        value_name = "KEY",
        default_value = "ca.crt"
    )]
    pod_nats_ca_key: String,
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

/// What worker and gateway pods connect to NATS with, from the flags.
fn pod_nats(args: &Args) -> anyhow::Result<PodNats> {
    let key = |flag: &str, secret: &Option<String>, key: &str| {
        secret
            .as_deref()
            .map(|s| secret_key_ref(flag, s, key))
            .transpose()
            .map_err(anyhow::Error::msg)
    };
    Ok(PodNats {
        creds: key(
            "--pod-nats-creds-secret",
            &args.pod_nats_creds_secret,
            &args.pod_nats_creds_key,
        )?,
        ca: key(
            "--pod-nats-ca-secret",
            &args.pod_nats_ca_secret,
            &args.pod_nats_ca_key,
        )?,
    })
}

async fn serve(args: Args) -> anyhow::Result<ExitCode> {
    let pod_nats = pod_nats(&args)?;
    let client = kube::Client::try_default()
        .await
        .context("failed to configure the Kubernetes client (in-cluster or KUBECONFIG)")?;
    let nats = args
        .nats_auth
        .connect(&args.nats, "tallyman-operator".into())
        .await?;
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
            pod_nats,
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
