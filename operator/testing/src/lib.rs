//! Dev-only helpers for tallyman's tests. Never a dependency of a shipped
//! crate: only `[dev-dependencies]` name it.
//!
//! - [`nats`]: a private, real `nats-server` with JetStream per test, plain or
//!   requiring TLS and NATS credentials files.
//! - [`erp`]: a simulated ERP (orders, invoices, credit notes, postings,
//!   payment approvals) over real HTTP with failure injection, and the
//!   signing webhook senders of the WMS and shop side.
//! - [`kubeapi`]: a fake Kubernetes API server for the real `kube::Client`.

pub mod erp;
pub mod kubeapi;
pub mod nats;
pub mod orders;
pub mod procstat;
