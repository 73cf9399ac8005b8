//! Version `v1alpha1` of the tallyman API.
//!
//! ```text
//! Connector ──┐ (call steps, webhooks)
//!             ├──▶ Workflow ──(approval steps)──▶ ApprovalPolicy
//!             │        │
//!             │        └── worker opens ──▶ ExceptionCase ◀── approvers append decisions
//! ```

// `printcolumn(...)` repeats `type_ = ...` by design; clippy reads the
// derive's attribute arguments as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

mod common;
mod connector;
mod exception_case;
mod policy;
mod workflow;

pub use common::*;
pub use connector::*;
pub use exception_case::*;
pub use policy::*;
pub use workflow::*;
