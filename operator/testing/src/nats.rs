//! A private, real `nats-server` per test, with JetStream on file storage.
//!
//! ```text
//! <temp dir>/              removed when the NatsServer is dropped
//!   store/                 -sd: JetStream file storage, kept across restart()
//!   nats-server.log        stdout and stderr of every run, appended
//!   nats-server.conf       -c: only for NatsServer::start_secured()
//! ```
//!
//! The server listens on a loopback port picked once at start and kept for
//! the life of the value, so `restart()` after `kill()` looks to a client
//! like the same broker coming back. Failures panic with the log's tail:
//! the temp dir is gone by the time anyone could read the file.
//!
//! The binary is `$TALLYMAN_NATS_SERVER`, else
//! `<workspace>/.tools/bin/nats-server` (put there by `scripts/install-nats`),
//! else `nats-server` on `PATH`.
//!
//! [`NatsServer::start_secured`] starts one that requires TLS and NATS
//! credentials files (operator mode), and [`NatsSecrets`] with the files a
//! client needs for it.
//!
//! The methods block (start and restart for up to 10 s while the server
//! comes up), which is fine at the top of a `#[tokio::test]`.

use std::env;
use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

mod secured;

pub use secured::NatsSecrets;

/// The environment variable naming the `nats-server` binary to run.
pub const SERVER_ENV: &str = "TALLYMAN_NATS_SERVER";

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);
/// Logged once JetStream is up and the client listener accepts connections.
const READY_LINE: &str = "Server is ready";
/// Another process may take the port between our probe and the server's bind.
const START_ATTEMPTS: usize = 3;
const LOG_TAIL_LINES: usize = 40;

/// A running (or stopped, restartable) `nats-server` of this test's own.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    store: PathBuf,
    log: PathBuf,
    /// `-c`, passed on every run so `restart()` keeps TLS and auth.
    config: Option<PathBuf>,
    child: Option<Child>,
    // Only held to be removed, after Drop has killed the server.
    _dir: TempDir,
}

impl NatsServer {
    /// Starts a server with JetStream on a free loopback port and a fresh
    /// store, and returns once it accepts connections.
    ///
    /// # Panics
    /// When no binary is found or the server does not come up within 10 s.
    pub fn start() -> NatsServer {
        NatsServer::start_with(|_| None)
    }

    /// Creates the temp dir, lets `configure` write files into it and name
    /// the config file to run with, then starts the server as `start()`
    /// does. The flags (`-js -sd -a -p`) win over the config file.
    fn start_with(configure: impl FnOnce(&Path) -> Option<PathBuf>) -> NatsServer {
        let binary = find_binary();
        let dir = tempfile::Builder::new()
            .prefix("tallyman-nats-")
            .tempdir()
            .unwrap_or_else(|e| panic!("failed to create a temp dir for nats-server: {e}"));
        let config = configure(dir.path());
        let mut server = NatsServer {
            binary,
            port: 0,
            store: dir.path().join("store"),
            log: dir.path().join("nats-server.log"),
            config,
            child: None,
            _dir: dir,
        };
        for attempt in 1..=START_ATTEMPTS {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => break,
                Err(e) if e.port_in_use && attempt < START_ATTEMPTS => continue,
                Err(e) => server.fail("failed to start", &e.reason),
            }
        }
        server
    }

    /// `nats://127.0.0.1:PORT`, the same across restarts.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr())
    }

    /// The client address, the same across restarts.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (`-sd`), kept across restarts.
    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// The server's combined output, appended across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The config file (`-c`) it runs with, if any.
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// Whether the server process is alive (it may have exited on its own).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) => {
                self.child = None;
                false
            }
            Some(Err(e)) => self.fail("failed to poll", &e.to_string()),
            None => false,
        }
    }

    /// Graceful shutdown: SIGTERM, then waits for the process to exit, so
    /// JetStream has flushed its store. A no-op when it is not running.
    ///
    /// # Panics
    /// When the server has not exited within 10 s (it is then killed).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // std has no SIGTERM and the workspace forbids unsafe code (so no
        // libc::kill): the kill(1) utility sends it.
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let reason = match sent {
                        Ok(status) if status.success() => {
                            format!("did not exit within {STOP_TIMEOUT:?} of SIGTERM")
                        }
                        Ok(status) => {
                            format!("could not be sent SIGTERM: kill exited with {status}")
                        }
                        Err(e) => format!("could not be sent SIGTERM: failed to run kill: {e}"),
                    };
                    self.fail("failed to stop", &reason);
                }
                Err(e) => self.fail("failed to wait for", &e.to_string()),
            }
        }
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Crash: SIGKILL, no chance to flush or say goodbye. A no-op when it is
    /// not running.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Err(e) = child.kill() {
            self.fail("failed to kill", &e.to_string());
        }
        if let Err(e) = child.wait() {
            self.fail("failed to wait for", &e.to_string());
        }
    }

    /// Starts the server again on the same port with the same store, so
    /// file-storage streams, consumers and KV survive. Stops it gracefully
    /// first if it is still running; `kill()` first to restart after a crash.
    ///
    /// # Panics
    /// When the server does not come up within 10 s.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            self.fail("failed to restart", &e.reason);
        }
    }

    /// Runs the binary and waits until this run has logged that it is ready
    /// and the port accepts a TCP connection.
    fn spawn(&mut self) -> Result<(), SpawnError> {
        // Only this run's output counts: the log is appended across restarts.
        let offset = fs::metadata(&self.log).map_or(0, |m| m.len());
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .and_then(|out| Ok((out.try_clone()?, out)))
            .map_err(|e| SpawnError::new(format!("failed to open {}: {e}", self.log.display())))?;
        let mut command = Command::new(&self.binary);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .arg("-js")
            .arg("-sd")
            .arg(&self.store)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.0)
            .stderr(log.1)
            .spawn()
            .map_err(|e| SpawnError::new(format!("failed to run it: {e}")))?;
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(status)) => status,
                Some(Err(e)) => return Err(SpawnError::new(format!("failed to poll it: {e}"))),
                None => unreachable!("the child was just spawned"),
            };
            let output = self.log_since(offset);
            if let Some(status) = exited {
                self.child = None;
                return Err(SpawnError {
                    reason: format!("it exited with {status} before it was ready"),
                    port_in_use: output.contains("address already in use"),
                });
            }
            if output.contains(READY_LINE)
                && TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(SpawnError::new(format!(
                    "it was not ready within {READY_TIMEOUT:?}"
                )));
            }
            thread::sleep(POLL);
        }
    }

    fn log_since(&self, offset: u64) -> String {
        let bytes = fs::read(&self.log).unwrap_or_default();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    fn fail(&self, what: &str, reason: &str) -> ! {
        let all = self.log_since(0);
        let lines: Vec<&str> = all.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        panic!(
            "{what} nats-server ({}) on {}: {reason}\n--- last lines of its log ---\n{tail}",
            self.binary.display(),
            self.addr(),
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct SpawnError {
    reason: String,
    port_in_use: bool,
}

impl SpawnError {
    fn new(reason: String) -> SpawnError {
        SpawnError {
            reason,
            port_in_use: false,
        }
    }
}

/// A port nothing listens on right now; the server binds it a moment later.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("failed to find a free loopback port: {e}"))
}

fn find_binary() -> PathBuf {
    if let Some(path) = env::var_os(SERVER_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{SERVER_ENV}={} is not a file: run scripts/install-nats",
            path.display()
        );
        return path;
    }
    let installed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("operator/testing lives two levels below the workspace root")
        .join(".tools/bin/nats-server");
    if installed.is_file() {
        return installed;
    }
    let on_path = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "nats-server not found (not in ${SERVER_ENV}, at {}, or on PATH): run scripts/install-nats",
            installed.display()
        )
    })
}
