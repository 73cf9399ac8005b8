//! A `tallyman dev` process: started on a free port with a state directory
//! of the caller's, stopped with SIGINT (what Ctrl-C sends), restartable on
//! the same state.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The `tallyman` binary built beside this test or demo binary.
pub fn tallyman_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the running binary has a path");
    // target/<profile>/demo or target/<profile>/deps/<test>-<hash>.
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(format!("tallyman{}", std::env::consts::EXE_SUFFIX));
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "no tallyman binary beside {}: build it first (`cargo build -p tallyman`; \
         `cargo nextest run --workspace` builds it too)",
        exe.display()
    )
}

/// How to start dev mode.
#[derive(Clone, Debug)]
pub struct DevOptions {
    pub manifests: PathBuf,
    pub state_dir: PathBuf,
    /// `--connector-url NAME=URL` pairs.
    pub connector_urls: Vec<(String, String)>,
}

impl DevOptions {
    /// `examples/<name>` with its state in `<state>/dev`, each named
    /// Connector pointed at `url`.
    pub fn example(name: &str, state: &Path, connectors: &[(&str, &str)]) -> DevOptions {
        DevOptions {
            manifests: crate::example(name),
            state_dir: state.join("dev"),
            connector_urls: connectors
                .iter()
                .map(|(c, url)| (c.to_string(), url.to_string()))
                .collect(),
        }
    }
}

/// A running (or stopped) `tallyman dev`.
pub struct DevMode {
    options: DevOptions,
    child: Option<Child>,
    url: String,
    nats: String,
    log: PathBuf,
}

impl DevMode {
    /// Starts dev mode and waits until it serves.
    ///
    /// # Panics
    /// When it exits or is not serving within 60 s (with its log's tail).
    pub fn start(options: DevOptions) -> DevMode {
        fs::create_dir_all(&options.state_dir).expect("the state dir can be created");
        let log = options.state_dir.join("dev.log");
        let mut dev = DevMode {
            options,
            child: None,
            url: String::new(),
            nats: String::new(),
            log,
        };
        dev.spawn();
        dev
    }

    fn spawn(&mut self) {
        let ready_file = self.options.state_dir.join("dev.json");
        let _ = fs::remove_file(&ready_file);
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("the dev log can be opened");
        let err = out.try_clone().expect("a log handle clones");
        let mut cmd = Command::new(tallyman_bin());
        cmd.arg("dev")
            .arg("--manifests")
            .arg(&self.options.manifests)
            .arg("--state-dir")
            .arg(&self.options.state_dir)
            .args(["--listen", "127.0.0.1:0"])
            .env("TALLYMAN_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (name, url) in &self.options.connector_urls {
            cmd.arg("--connector-url").arg(format!("{name}={url}"));
        }
        let mut child = cmd.spawn().expect("tallyman dev starts");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("tallyman dev exited with {status}:\n{}", self.tail());
            }
            if let Ok(text) = fs::read_to_string(&ready_file)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            {
                self.url = v["url"].as_str().unwrap_or_default().to_string();
                self.nats = v["nats"].as_str().unwrap_or_default().to_string();
                self.child = Some(child);
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "tallyman dev was not serving within {READY_TIMEOUT:?}:\n{}",
                    self.tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:PORT` (changes across restarts).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A client of this run's dev API (the URL changes across restarts).
    pub fn api(&self) -> crate::DevApi {
        crate::DevApi::new(&self.url)
    }

    /// The webhook senders of this run's manifests, at this run's URL.
    pub fn senders(&self) -> crate::Senders {
        crate::Senders::from_manifests(&self.options.manifests, &self.url)
    }

    /// The private nats-server's URL.
    pub fn nats_url(&self) -> &str {
        &self.nats
    }

    pub fn state_dir(&self) -> &Path {
        &self.options.state_dir
    }

    /// Ctrl-C: SIGINT, then wait for a clean exit (status 0).
    ///
    /// # Panics
    /// When it does not exit, or exits with a failure.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return,
                Ok(Some(status)) => panic!("tallyman dev exited with {status}:\n{}", self.tail()),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = child.kill();
                    panic!(
                        "tallyman dev did not stop within {STOP_TIMEOUT:?} of Ctrl-C:\n{}",
                        self.tail()
                    );
                }
            }
        }
    }

    /// Stop, then start again on the same state directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The last lines dev mode printed.
    pub fn tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Runs `tallyman audit verify` against this dev mode's NATS; returns
    /// whether the chains verified and what it printed.
    pub fn audit_verify(&self, namespace: &str) -> (bool, String) {
        let output = Command::new(tallyman_bin())
            .args([
                "audit",
                "verify",
                "--nats",
                &self.nats,
                "--namespace",
                namespace,
            ])
            .output()
            .expect("tallyman audit verify runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    /// The end of a scenario: every audit chain of `namespace` verifies,
    /// then dev mode stops cleanly.
    pub fn verify_and_stop(&mut self, namespace: &str) {
        let (verified, report) = self.audit_verify(namespace);
        assert!(verified, "{report}");
        self.stop();
    }
}

impl Drop for DevMode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A clean stop also stops its private nats-server; after a
            // panic, SIGINT still gives it the chance to.
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
