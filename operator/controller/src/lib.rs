//! The tallyman operator: kube-runtime controllers that turn Workflows,
//! Connectors and ApprovalPolicies into workers, gateways and JetStream
//! objects, and report back in status conditions and Events.
//!
//! ```text
//! Workflow ───────▶ workflow::reconcile ──▶ ConfigMap, Deployment, SA/Role/RoleBinding, PDB; JetStream
//!   ▲ watches (dependents)
//! Connector ──────▶ connector::reconcile ─▶ gateway Deployment + Service per namespace; Reachable
//! ApprovalPolicy ─▶ policy::reconcile ────▶ Ready (validated)
//! ```
//!
//! Every reconciler is the same pipeline — dereference → validate → build →
//! apply → update_status — with validate and build pure. Writes are
//! server-side applies by one field manager, skipped when nothing changes.
//! [`run`] wires the controllers behind a [`leader`] Lease.

pub mod conditions;
pub mod connector;
pub mod context;
pub mod error;
#[doc(hidden)]
pub mod fixtures;
pub mod leader;
pub mod meta;
pub mod pods;
pub mod policy;
pub mod run;
pub mod validation;
pub mod workflow;

pub use context::{Context, PodNats, Settings, secret_key_ref};
pub use error::Error;
