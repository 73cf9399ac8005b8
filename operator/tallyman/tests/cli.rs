//! The `tallyman` binary as a user runs it: exit codes and output formats.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tallyman(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tallyman"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("tallyman runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn validate_accepts_the_examples() {
    let out = tallyman(&["validate", "examples/"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("all valid"), "{}", stdout(&out));
}

#[test]
fn validate_reports_every_error_with_its_location_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wf.yaml");
    std::fs::write(
        &file,
        "apiVersion: tallyman.dev/v1alpha1\nkind: Workflow\nmetadata: {name: wf}\nspec:\n  trigger: {events: [a.b], correlate: 'event.data.id'}\n  steps:\n    - name: one\n      call: {connector: erp, action: createInvoice}\n    - name: two\n      check: 'payload.ok'\n",
    )
    .unwrap();
    let out = tallyman(&["validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains("wf.yaml:1: error: document 1 (Workflow default/wf): spec.steps[0].call.connector: no Connector \"erp\""),
        "{text}"
    );
    assert!(
        text.contains("spec.steps[1].check: CEL refers to an unknown variable \"payload\""),
        "{text}"
    );
    assert!(text.contains("2 errors"), "{text}");

    let out = tallyman(&["validate", "--output", "json", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json output");
    assert_eq!(json["valid"], false);
    let diags = json["diagnostics"].as_array().unwrap();
    assert_eq!(diags.len(), 2);
    assert_eq!(diags[0]["path"], "spec.steps[0].call.connector");
    assert_eq!(diags[0]["kind"], "Workflow");
    assert_eq!(diags[0]["document"], 1);
    assert_eq!(diags[0]["severity"], "error");
}

#[test]
fn validate_exits_2_when_a_path_cannot_be_read() {
    let out = tallyman(&["validate", "examples/", "no/such/dir"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stdout(&out).contains("no/such/dir: error: cannot read"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn crdgen_prints_all_crds_and_writes_one_file_each() {
    let out = tallyman(&["crdgen"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    for name in [
        "connectors.tallyman.dev",
        "workflows.tallyman.dev",
        "approvalpolicies.tallyman.dev",
        "exceptioncases.tallyman.dev",
    ] {
        assert!(text.contains(&format!("name: {name}")), "{name} missing");
    }
    // Both copies the repository keeps (crds/ and the chart's), at once.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("crds"), dir.path().join("chart/crds"));
    let out = tallyman(&[
        "crdgen",
        "--dir",
        a.to_str().unwrap(),
        "--dir",
        b.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    for d in [&a, &b] {
        let mut files: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "approvalpolicies.tallyman.dev.yaml",
                "connectors.tallyman.dev.yaml",
                "exceptioncases.tallyman.dev.yaml",
                "workflows.tallyman.dev.yaml"
            ]
        );
        for f in &files {
            assert_eq!(
                std::fs::read(a.join(f)).unwrap(),
                std::fs::read(d.join(f)).unwrap()
            );
        }
    }
}

/// A worker or gateway stopped (SIGTERM, as Kubernetes stops a pod) while
/// it still waits for NATS exits 0 and says so, not by the signal. The
/// "broker" here accepts connections and never answers, as one that is
/// still starting can.
#[test]
fn worker_and_gateway_stopped_while_connecting_exit_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nats = format!("nats://{}", silent.local_addr().unwrap());
    let manifests = repo().join("examples/shipment-to-invoice");
    let manifests = manifests.to_str().unwrap();
    let commands: [&[&str]; 2] = [
        &[
            "worker",
            "--nats",
            &nats,
            "--namespace",
            "finance",
            "--workflow",
            "shipment-to-invoice",
            "--manifests",
            manifests,
            "--listen",
            "127.0.0.1:0",
        ],
        &[
            "gateway",
            "--nats",
            &nats,
            "--namespace",
            "finance",
            "--manifests",
            manifests,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    ];
    for args in commands {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tallyman"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .spawn()
            .expect("tallyman runs");
        let (lines, said) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let mut log = Vec::new();
        while !log
            .iter()
            .any(|l: &String| l.contains("connecting to NATS"))
        {
            match said.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => log.push(line),
                Err(e) => panic!("{}: never tried NATS ({e}): {log:#?}", args[0]),
            }
        }
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            // The client gives up on a silent server after 5 s by itself.
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "{}: still running 3 s after SIGTERM",
                args[0]
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        log.extend(said.try_iter());
        assert_eq!(status.code(), Some(0), "{}: {status}: {log:#?}", args[0]);
        assert!(
            log.iter().any(|l| l.contains("stopped while starting")),
            "{}: {log:#?}",
            args[0]
        );
    }
}
