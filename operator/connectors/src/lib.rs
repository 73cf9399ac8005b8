//! Connectors: how tallyman talks to the systems around it. No NATS code
//! lives here; the worker and the gateway wrap these types.
//!
//! - [`rest`]: the outbound half, one [`rest::RestClient`] per Connector:
//!   auth from Secrets, a shared token bucket, retries with backoff, custom CAs.
//! - [`webhook`]: the inbound half, the gateway: signatures, limits, CEL
//!   mappings to canonical events, publishing behind a [`webhook::Publisher`].
//! - [`secrets`]: where Secret values come from ([`SecretSource`]).

pub mod rest;
pub mod secrets;
pub mod webhook;

pub use secrets::{MountedSecrets, SecretError, SecretSource, StaticSecrets};
