//! `tallyman gateway` as a process: serves the examples' webhooks into a
//! real nats-server, picks up changed manifests on SIGHUP, and stops
//! cleanly on SIGTERM.

mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tallyman_testing::erp::{HttpResponse, WebhookSender, WebhookSignature, send};
use tallyman_testing::nats::NatsServer;

const SHIPMENT: &str = r#"{"eventId": "evt-88121", "id": "SHP-5531", "orderRef": "4711", "status": "CONFIRMED",
 "warehouse": "DE-HAM-1", "carrier": "DHL", "confirmedBy": "j.smith",
 "items": [{"sku": "A-100", "quantity": 3}]}"#;

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Gateway {
    child: Child,
    port: u16,
}

impl Gateway {
    fn start(nats: &str, manifests: &Path) -> Gateway {
        Gateway::start_with(nats, manifests, &[])
    }

    /// [`Gateway::start`] with more environment variables.
    fn start_with(nats: &str, manifests: &Path, env: &[(&str, &Path)]) -> Gateway {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_tallyman"))
            .args(["gateway", "--nats", nats, "--namespace", "finance"])
            .arg("--manifests")
            .arg(manifests)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--metrics-listen",
                "127.0.0.1:0",
                "--reload-interval",
                "0s",
            ])
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tallyman gateway starts");
        Gateway { child, port }
    }

    fn wms(&self, secret: &str) -> WebhookSender {
        WebhookSender::new(
            format!(
                "http://127.0.0.1:{}/webhooks/finance/wms/shipments",
                self.port
            ),
            WebhookSignature::HmacSha256 {
                header: "X-Signature".into(),
                secret: secret.as_bytes().to_vec(),
                prefixed: false,
            },
        )
    }

    /// Waits until the gateway answers HTTP.
    async fn ready(&self) {
        let url = format!("http://127.0.0.1:{}/", self.port);
        let start = Instant::now();
        while send("GET", &url, &[], bytes::Bytes::new()).await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the gateway did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIG{name} was not delivered");
    }

    fn terminate(mut self, limit: Duration) -> ExitStatus {
        self.signal("TERM");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "no exit within {limit:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn post(sender: &WebhookSender, body: &str) -> HttpResponse {
    sender
        .send(body.as_bytes())
        .await
        .expect("the gateway answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_reloads_on_sighup_and_stops_on_sigterm() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shipment-to-invoice");
    for file in [
        "connectors.yaml",
        "secrets.yaml",
        "workflow.yaml",
        "policy.yaml",
    ] {
        std::fs::copy(examples.join(file), dir.path().join(file)).unwrap();
    }
    let gw = Gateway::start(&nats.url(), dir.path());
    gw.ready().await;

    let old = "dummy-wms-signing-secret-change-me";
    let r = post(&gw.wms(old), SHIPMENT).await;
    assert_eq!(r.status, 202, "{}", r.text());

    // The WMS secret is rotated in the manifests; SIGHUP swaps it in.
    let secrets = std::fs::read_to_string(dir.path().join("secrets.yaml")).unwrap();
    std::fs::write(
        dir.path().join("secrets.yaml"),
        secrets.replace(old, "rotated-wms-secret"),
    )
    .unwrap();
    gw.signal("HUP");
    let second = SHIPMENT.replace("evt-88121", "evt-2");
    let start = Instant::now();
    loop {
        let r = post(&gw.wms("rotated-wms-secret"), &second).await;
        if r.status == 202 {
            break;
        }
        assert_eq!(r.status, 401, "{}", r.text());
        assert!(start.elapsed() < Duration::from_secs(10), "never reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = post(&gw.wms(old), &SHIPMENT.replace("evt-88121", "evt-3")).await;
    assert_eq!(r.status, 401, "the old secret no longer works");

    // Invalid manifests are refused; the gateway keeps serving.
    std::fs::write(dir.path().join("broken.yaml"), "kind: Connector\nspec: [").unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = post(&gw.wms("rotated-wms-secret"), SHIPMENT).await;
    assert_eq!(r.status, 200, "a duplicate of the first: {}", r.text());

    let status = gw.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status}");

    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let info = js
        .get_stream("TALLYMAN_FINANCE_EVENTS")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(info.state.messages, 2);
}

/// As in a pod the operator configured for a secured broker: the
/// credentials file and the CA named by the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_publishes_to_a_broker_that_requires_credentials_and_tls() {
    let (nats, secrets) = NatsServer::start_secured();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shipment-to-invoice");
    let gw = Gateway::start_with(
        &nats.url(),
        &examples,
        &[
            ("TALLYMAN_NATS_CREDS", secrets.creds()),
            ("TALLYMAN_NATS_CA", secrets.ca()),
        ],
    );
    gw.ready().await;
    let r = post(&gw.wms("dummy-wms-signing-secret-change-me"), SHIPMENT).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let mut stream = support::secured_jetstream(&nats, &secrets)
        .await
        .get_stream("TALLYMAN_FINANCE_EVENTS")
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    let status = gw.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status}");
}
