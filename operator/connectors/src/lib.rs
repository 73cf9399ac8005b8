//! Connectors: how tallyman talks to the systems around it. No NATS code
//! lives here; the worker and the gateway wrap these types.
//!
//! - [`rest`]: the outbound half, one [`rest::RestClient`] per Connector:
//!   auth from Secrets, a shared token bucket, retries with backoff, custom CAs.
//! - [`secrets`]: where Secret values come from ([`SecretSource`]).

pub mod rest;
pub mod secrets;

pub use secrets::{MountedSecrets, SecretError, SecretSource, StaticSecrets};
