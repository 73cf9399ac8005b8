//! Telemetry shared by the worker, gateway and operator processes.
//!
//! ```text
//!  init_tracing("worker") ─▶ stdout: JSON lines in a cluster, text in a terminal
//!
//!  Metrics::new() ─┬─ worker:   tallyman_worker_*    ┐
//!                  ├─ gateway:  tallyman_gateway_*   ├─ one Registry ─▶ GET /metrics
//!                  └─ operator: tallyman_operator_*  ┘
//!  Readiness (a shared flag) ──────────────────────────────────────▶ GET /readyz
//!  the process is up ──────────────────────────────────────────────▶ GET /healthz
//! ```
//!
//! Every family is registered here, once, so that `docs/metrics.md` stays
//! complete (a test compares the two). Label sets are typed structs whose
//! values are bounded: names from manifests, fixed enums, `&'static str`
//! reasons from code.

mod logs;
mod metrics;
mod server;

pub use logs::{LogFormat, init_tracing};
pub use metrics::{
    CONTENT_TYPE, CallLabels, ConnectorLabels, ControllerLabels, EventLabels, ExceptionLabels,
    GatewayMetrics, GatewayOutcome, GatewayRejectLabels, GatewayRequestLabels, HistogramFamily,
    InstanceEndLabels, InstanceOutcome, Metrics, OperatorMetrics, ReconcileErrorLabels,
    StatusClass, StepLabels, WorkerMetrics, WorkflowLabels, latency_buckets,
};
/// Re-exported so callers name metric types without depending on the crate.
pub use prometheus_client;
pub use server::{Error, Readiness, router, serve};
