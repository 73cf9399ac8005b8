//! Dev-only helpers for tallyman's tests. Never a dependency of a shipped
//! crate: only `[dev-dependencies]` name it.
//!
//! - [`nats`]: a private, real `nats-server` with JetStream per test.

pub mod nats;
