//! The processes against a broker that requires TLS and NATS credentials,
//! given as a pod the operator configured gives them: the files named by
//! `TALLYMAN_NATS_CREDS` and `TALLYMAN_NATS_CA` (the flags `--nats-creds`
//! and `--nats-ca`).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;
use tallyman_testing::erp::SimErp;
use tallyman_testing::nats::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_credentials_and_ca_runs_and_the_audit_verifies() {
    let (nats, secrets) = NatsServer::start_secured();
    let erp = SimErp::start().await;
    let worker = WorkerProcess::start_with(
        &nats.url(),
        &erp.base_url(),
        &[
            ("TALLYMAN_NATS_CREDS", secrets.creds()),
            ("TALLYMAN_NATS_CA", secrets.ca()),
        ],
    );
    let js = secured_jetstream(&nats, &secrets).await;
    let n = 10;
    publish_orders(&js, &erp, n).await;
    wait_all_completed(&js, n, Duration::from_secs(30)).await;
    assert_one_invoice_per_order(&erp, n);
    let status = worker.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status}");

    // An auditor's run, with the flags.
    let verify = |creds: &Path| {
        Command::new(env!("CARGO_BIN_EXE_tallyman"))
            .args(["audit", "verify", "--nats", &nats.url(), "--namespace", NS])
            .arg("--nats-creds")
            .arg(creds)
            .arg("--nats-ca")
            .arg(secrets.ca())
            .output()
            .expect("tallyman audit verify runs")
    };
    let out = verify(secrets.creds());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("of {n} instances")), "{stdout}");
    // A user of an account the broker does not know: refused, and said so.
    let out = verify(secrets.stranger_creds());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("failed to connect to NATS"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_credentials_exits_saying_why() {
    let (nats, secrets) = NatsServer::start_secured();
    let run = |env: &[(&str, &Path)]| {
        worker_command(&nats.url())
            .args(["--listen", "127.0.0.1:0"])
            .envs(env.iter().copied())
            .output()
            .expect("tallyman worker runs")
    };
    let out = run(&[("TALLYMAN_NATS_CA", secrets.ca())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("failed to connect to NATS at"), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("authorization violation"),
        "{stderr}"
    );
    // Credentials but not the broker's CA: the certificate is not trusted.
    let out = run(&[("TALLYMAN_NATS_CREDS", secrets.creds())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
    // A CA file that is not there: named by its flag, before connecting.
    let out = run(&[
        ("TALLYMAN_NATS_CREDS", secrets.creds()),
        ("TALLYMAN_NATS_CA", Path::new("/nonexistent/ca.crt")),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--nats-ca: failed to read /nonexistent/ca.crt"),
        "{stderr}"
    );
}
