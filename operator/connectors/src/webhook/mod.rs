//! The inbound half of the Connectors: the webhook gateway.
//!
//! ```text
//! POST /webhooks/{namespace}/{connector}{path}
//!   route (404) ─ method (405) ─ Content-Type (415) ─ body ≤ maxBodyBytes (413)
//!   ─ signature over the raw body (401) ─ lossless JSON parse (400)
//!   ─ events[]: when / id / data in CEL (422)
//!   ─ publish every event, Nats-Msg-Id = "<source>|<event id>", await each ack (503)
//!   ─ 202 {"accepted", "ids"}   or 200 {"duplicate": true} when all were known
//! ```
//!
//! [`Routes`] is a namespace's webhook Connectors compiled once: Secrets
//! read, CEL checked and prepared. The [`Gateway`] holds the current
//! `Routes` behind a swap; a request keeps the `Routes` it started with, so
//! [`Gateway::reload`] never disturbs one in flight. Publishing sits behind
//! [`Publisher`]: this crate has no NATS code, the worker crate supplies the
//! JetStream implementation.
//!
//! Logs name the namespace, connector, outcome and reason; never a header
//! value, a body, a CEL error's text (it may quote the payload) or a Secret.

mod routes;
mod server;
mod signature;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

pub use routes::{BuildError, CanonicalEvent, Route, Routes, event_subject};
pub use server::{Gateway, GatewayConfig, Rejection, serve, serve_router};

/// The broker's answer to one publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// The broker already held a message with this id (JetStream `PubAck`
    /// `duplicate: true`): nothing new was stored.
    pub duplicate: bool,
}

/// Why a publish was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No acknowledgement (broker down, timed out, no stream): the sender
    /// should retry, and the retry is deduplicated by the event id.
    #[error("the broker did not acknowledge: {0}")]
    Unavailable(String),
    /// The broker refuses messages this large; retrying will not help.
    #[error("the event is larger than the broker accepts: {0}")]
    TooLarge(String),
}

/// Publishes canonical events and reports the broker's acknowledgement.
/// Answers only once the broker has stored the message (or recognised it
/// as a duplicate); anything else is an error.
pub trait Publisher: Send + Sync + 'static {
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        msg_id: &'a str,
        payload: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<Published, PublishError>> + Send + 'a>>;
}
