//! Shared by the process tests: real `tallyman worker` processes against a
//! real nats-server and the simulated ERP, orders to publish, outcomes to
//! wait for.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use tallyman_testing::erp::SimErp;
use tallyman_testing::nats::{NatsSecrets, NatsServer};
use tallyman_testing::orders;

pub const NS: &str = "finance";
pub const WF: &str = "shipment-to-invoice";

pub fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shipment-to-invoice")
}

/// `tallyman worker` on the example's Workflow against `nats`, from the
/// manifests; the caller adds where it listens and the rest.
pub fn worker_command(nats: &str) -> Command {
    worker_command_from(nats, &examples())
}

/// [`worker_command`] from the manifests in `dir`.
pub fn worker_command_from(nats: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyman"));
    cmd.args([
        "worker",
        "--nats",
        nats,
        "--namespace",
        NS,
        "--workflow",
        WF,
    ])
    .arg("--manifests")
    .arg(dir);
    cmd
}

/// A JetStream client of a broker from [`NatsServer::start_secured`].
pub async fn secured_jetstream(nats: &NatsServer, secrets: &NatsSecrets) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .credentials_file(secrets.creds())
        .await
        .expect("the creds file reads")
        .add_root_certificates(secrets.ca().to_path_buf())
        .require_tls(true)
        .connect(nats.url())
        .await
        .expect("the test connects");
    jetstream::new(client)
}

pub struct WorkerProcess(pub Child);

impl WorkerProcess {
    pub fn start(nats: &str, erp: &str) -> Self {
        Self::start_with(nats, erp, &[])
    }

    /// [`WorkerProcess::start`] with more environment variables.
    pub fn start_with(nats: &str, erp: &str, env: &[(&str, &Path)]) -> Self {
        Self::start_from(worker_command(nats), erp, env)
    }

    /// A worker from `command` ([`worker_command`] or
    /// [`worker_command_from`]), set up as [`WorkerProcess::start`] does.
    pub fn start_from(mut command: Command, erp: &str, env: &[(&str, &Path)]) -> Self {
        let child = command
            .args(["--listen", "127.0.0.1:0"])
            .args([
                "--connector-url",
                &format!("erp={erp}"),
                "--ack-wait",
                "3s",
                "--max-in-flight",
                "64",
            ])
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tallyman worker starts");
        Self(child)
    }

    /// SIGTERM, as Kubernetes stops a pod; the exit status, or a failed
    /// test when the process is still running after `limit`.
    pub fn terminate(self, limit: Duration) -> ExitStatus {
        self.sigterm();
        self.exit_within(limit)
    }

    /// Send SIGTERM and go on.
    pub fn sigterm(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM was not delivered");
    }

    /// The exit status, or a failed test when the process is still running
    /// after `limit`.
    pub fn exit_within(mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().expect("the worker's status") {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "the worker did not exit within {limit:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(mut self) {
        self.0.kill().expect("kill -9");
        self.0.wait().expect("reaped");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn publish_orders(js: &jetstream::Context, erp: &SimErp, n: usize) {
    publish_events(js, erp, n, &["order.created", "shipment.confirmed"]).await;
}

/// [`publish_orders`] for the events of `types` only.
pub async fn publish_events(js: &jetstream::Context, erp: &SimErp, n: usize, types: &[&str]) {
    for i in 0..n {
        erp.seed_order(orders::order(i));
    }
    publish_events_only(js, n, types).await;
}

/// [`publish_events`] without seeding the ERP: the test seeds its own orders.
pub async fn publish_events_only(js: &jetstream::Context, n: usize, types: &[&str]) {
    for i in 0..n {
        for (ty, id, payload) in orders::events(i, "test") {
            if !types.contains(&ty) {
                continue;
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            // Before a worker has created the stream, a publish may find none: retry.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let stored = match js
                    .publish_with_headers(
                        format!("tallyman.{NS}.events.{ty}"),
                        headers.clone(),
                        Bytes::from(payload.clone()),
                    )
                    .await
                {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                };
                if stored {
                    break;
                }
                assert!(Instant::now() < deadline, "could not publish {id}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Count instances by status from the KV bucket: completed, and the rest
/// (not stored yet included).
pub async fn statuses(js: &jetstream::Context, n: usize) -> (usize, usize) {
    let completed = with_status(js, n, "Completed").await;
    (completed, n - completed)
}

/// How many of the `n` orders' instances are stored with `status`.
pub async fn with_status(js: &jetstream::Context, n: usize, status: &str) -> usize {
    let Ok(kv) = js.get_key_value(format!("tallyman_{NS}_{WF}")).await else {
        return 0;
    };
    let mut found = 0;
    for i in 0..n {
        if let Ok(Some(bytes)) = kv.get(format!("ORD-{i}")).await {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            found += usize::from(v["status"] == status);
        }
    }
    found
}

pub async fn wait_all_completed(js: &jetstream::Context, n: usize, limit: Duration) {
    let start = Instant::now();
    loop {
        let (completed, _) = statuses(js, n).await;
        if completed == n {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "only {completed} of {n} instances completed after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn wait_invoices(erp: &SimErp, at_least: usize) {
    let start = Instant::now();
    while erp.invoice_count() < at_least {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no progress: {} invoices",
            erp.invoice_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn assert_one_invoice_per_order(erp: &SimErp, n: usize) {
    assert_invoiced_once(erp, n, "40.48");
}

/// Each of the `n` orders invoiced once, each for `net`.
pub fn assert_invoiced_once(erp: &SimErp, n: usize, net: &str) {
    let invoices = erp.invoices();
    let mut orders: Vec<String> = invoices
        .iter()
        .filter_map(|i| i.str_field("orderId"))
        .collect();
    orders.sort();
    orders.dedup();
    assert_eq!(orders.len(), n, "every order invoiced");
    assert_eq!(invoices.len(), n, "no order invoiced twice");
    for i in &invoices {
        assert_eq!(i.field("netAmount"), Some(net));
    }
}
