//! The worker runtime: runs one Workflow on NATS JetStream with the promises
//! of the design — no lost event, no duplicate effect, durable instances,
//! versioned definitions, visible failures, a tamper-evident audit trail.
//!
//! ```text
//! events consumer ─┐  (events taken together: grouped by instance, one commit per group)
//! timers consumer ─┼─▶ process(key, inputs): load (cache, else KV) ─▶ Machine::apply each ─▶ calls
//! case watcher ────┘        ─▶ CAS the instance ─▶ publish its outbox (deduplicated) ─▶ ack
//! ```
//!
//! The broker sits behind this crate; step logic lives in `tallyman_core`.

pub mod audit;
pub mod calls;
pub mod cases;
pub mod counts;
pub mod gateway;
pub mod held;
pub mod names;
pub mod notices;
mod runtime;
pub mod setup;

use std::future::Future;
use std::pin::Pin;

pub use runtime::{ACK_WAIT, CaseBackend, Stats, Tally, Worker, WorkerConfig};
pub use tallyman_core::engine::{CallPlan, CallResult};

/// Errors of the runtime, by the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to set up JetStream: {0}")]
    Setup(String),
    #[error("failed to connect to NATS: {0}")]
    Connect(String),
    #[error("{0}")]
    Store(String),
    #[error("failed to publish: {0}")]
    Publish(String),
    #[error("invalid definition: {0}")]
    Definition(String),
    /// The instance these inputs make cannot be stored at all (larger than
    /// the broker takes in one message): trying again changes nothing, so
    /// the inputs are dead-lettered.
    #[error("{0}")]
    Unstorable(String),
    /// One of the worker's loops (events, timers, cases) ended without a
    /// shutdown: the worker stops rather than stay ready doing nothing.
    #[error("stopped: {0}")]
    Stopped(String),
}

/// Makes the REST calls of `call` steps. The messages that caused a call
/// are kept alive by the worker while it runs (`Worker::keep_alive`).
pub trait Caller: Send + Sync {
    fn call<'a>(
        &'a self,
        plan: &'a CallPlan,
    ) -> Pin<Box<dyn Future<Output = CallResult> + Send + 'a>>;

    /// One attempt, no retries: for a call guarded by a `lookup`, which must
    /// look again before it tries again (the system has no idempotency key
    /// that would recognise a retry of a request it already carried out).
    /// Returns how long to wait before the next attempt when this one failed
    /// in a way worth retrying (5xx, 429, no answer).
    fn call_once<'a>(
        &'a self,
        plan: &'a CallPlan,
    ) -> Pin<Box<dyn Future<Output = (CallResult, Option<std::time::Duration>)> + Send + 'a>> {
        Box::pin(async move { (self.call(plan).await, None) })
    }
}
