//! The HTTP endpoint every process serves for Kubernetes and Prometheus:
//! `/healthz` (liveness), `/readyz` (readiness), `/metrics` (OpenMetrics).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::metrics::{CONTENT_TYPE, Metrics};

/// Whether the process should receive work, answered on `/readyz`. Starts
/// not ready; clones share one flag.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_ready(&self, ready: bool) {
        // Nothing is published through the flag but itself, so Relaxed suffices.
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to bind the telemetry server to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("failed to read the telemetry server's local address")]
    LocalAddr(#[source] io::Error),
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    ready: Readiness,
}

/// Binds `addr` (port 0 picks a free port) and serves until `shutdown`
/// completes, then finishes the requests in flight. Returns the bound address
/// and the server task, whose result is the server's I/O outcome.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, JoinHandle<io::Result<()>>), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let local = listener.local_addr().map_err(Error::LocalAddr)?;
    let server = axum::serve(listener, router(metrics, ready)).with_graceful_shutdown(shutdown);
    let task = tokio::spawn(async move { server.await });
    tracing::info!(addr = %local, "serving /healthz, /readyz and /metrics");
    Ok((local, task))
}

/// `/healthz`, `/readyz` and `/metrics`, for a process that serves them on
/// a listener of its own making (dev mode serves them beside its API).
pub fn router(metrics: Arc<Metrics>, ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { metrics, ready })
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.ready.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics.encode(),
    )
}
