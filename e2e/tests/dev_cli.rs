//! `tallyman dev` as a user meets it: refusing invalid manifests before
//! anything starts, saying how to get a nats-server, and the `tallyman
//! cases` / `approve` / `reject` commands against a running dev mode.

use std::process::{Command, Output};
use std::time::Duration;

use tallyman_e2e::dev::tallyman_bin;
use tallyman_e2e::shipment::{Batch, amount};
use tallyman_e2e::{example, start_example, workspace};

const WF: &str = "shipment-to-invoice";

fn tallyman(args: &[&str]) -> Output {
    Command::new(tallyman_bin())
        .args(args)
        .output()
        .expect("tallyman runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn dev_mode_refuses_invalid_manifests_with_every_error_before_starting_anything() {
    let state = tempfile::tempdir().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    // Two mistakes in two files: both are reported.
    for (file, fixture) in [
        ("a.yaml", "013-unknown-spec-field.yaml"),
        ("b.yaml", "009-invalid-metadata-name.yaml"),
    ] {
        std::fs::copy(
            workspace()
                .join("operator/core/tests/invalid")
                .join(fixture),
            manifests.path().join(file),
        )
        .unwrap();
    }
    let out = tallyman(&[
        "dev",
        "--manifests",
        manifests.path().to_str().unwrap(),
        "--state-dir",
        state.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the manifests are not valid"), "{stderr}");
    assert!(
        stderr.contains("a.yaml") && stderr.contains("b.yaml"),
        "{stderr}"
    );
    assert!(
        !state.path().join("jetstream").exists(),
        "no nats-server was started"
    );
}

#[test]
fn without_a_nats_server_dev_mode_says_how_to_get_one() {
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(tallyman_bin())
        .args(["dev", "--manifests"])
        .arg(example(WF))
        .arg("--state-dir")
        .arg(state.path())
        .args(["--listen", "127.0.0.1:0"])
        .env("TALLYMAN_NATS_SERVER", state.path().join("no-such-binary"))
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("scripts/install-nats"), "{stderr}");
    assert!(stderr.contains("--nats URL"), "{stderr}");
}

#[test]
fn a_connector_url_for_an_unknown_connector_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(tallyman_bin())
        .args(["dev", "--manifests"])
        .arg(example(WF))
        .arg("--state-dir")
        .arg(state.path())
        .args(["--connector-url", "erpp=http://127.0.0.1:1"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("\"erpp\""), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases_approve_and_reject_work_from_the_terminal() {
    let state = tempfile::tempdir().unwrap();
    let (erp, mut dev, api, senders) = start_example(WF, state.path(), "erp", |_| {}).await;
    let s = Batch::new().needs_approval;
    s.seed(&erp);
    senders.send("shop", &s.order_created()).await;
    senders.send("wms", &s.shipment_confirmed()).await;
    let case = api
        .wait_for_case(WF, &s.order_id, "Open", Duration::from_secs(60))
        .await;
    let name = case["name"].as_str().unwrap().to_string();
    let url = dev.url().to_string();

    let out = tallyman(&["cases", "--url", &url]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with(&name))
        .unwrap_or_else(|| panic!("{stdout}"));
    for cell in [
        "finance",
        WF,
        "4718",
        "QuantityMismatch",
        "178.00",
        "0/1",
        "Open",
    ] {
        assert!(row.contains(cell), "{cell} in {row}");
    }

    let out = tallyman(&[
        "approve",
        &name,
        "--as",
        "j.smith",
        "--group",
        "finance-controllers",
        "--url",
        &url,
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("segregation of duties"), "{stderr}");

    let out = tallyman(&[
        "reject",
        &name,
        "--as",
        "m.weber",
        "--group",
        "finance-controllers",
        "--url",
        &url,
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--comment"), "{stderr}");

    let out = tallyman(&[
        "approve",
        &name,
        "--as",
        "m.weber",
        "--group",
        "finance-controllers",
        "--comment",
        "damaged in picking",
        "--url",
        &url,
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("the case is now Approved"), "{stdout}");

    api.wait_for("finance", WF, Duration::from_secs(60), |c| c.completed == 1)
        .await;
    let out = tallyman(&["cases", "--url", &url]);
    assert_eq!(text(&out).0.trim(), "no open cases");
    let invoices = erp.invoices();
    assert_eq!(invoices.len(), 1);
    assert_eq!(
        invoices[0].field("netAmount"),
        Some(amount(s.shipped_cents()).as_str())
    );
    dev.stop();
}
