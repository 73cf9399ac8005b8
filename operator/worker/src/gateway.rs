//! The gateway's JetStream side: [`JetStreamPublisher`] publishes each
//! canonical event with `Nats-Msg-Id` = its id and waits for the `PubAck`;
//! [`serve`] ensures the namespace's streams and serves the webhooks.
//!
//! ```text
//! sender ─POST─▶ tallyman_connectors::webhook::Gateway ─publish─▶ JetStreamPublisher
//!                                                 ◀── PubAck{duplicate} ──┘  (≤ 2 s, else 503)
//! ```
//!
//! A publish that times out may still reach the stream later (the client
//! resends after a reconnect). The sender was answered 503 and retries with
//! the same event id, which JetStream deduplicates within its window
//! ([`crate::setup::DUPLICATE_WINDOW`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    context::{PublishError as NatsPublishError, PublishErrorKind},
    message::PublishMessage,
};
use bytes::Bytes;
use tallyman_connectors::webhook::{
    self, Gateway, GatewayConfig, PublishError, Published, Publisher, Routes,
};
use tallyman_telemetry::Metrics;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::Error;
use crate::names::Names;
use crate::setup;

/// Publishes canonical events to JetStream and reports its acknowledgement.
#[derive(Clone, Debug)]
pub struct JetStreamPublisher {
    js: jetstream::Context,
}

impl JetStreamPublisher {
    /// A publisher on `client` that waits at most `ack_timeout` for each
    /// acknowledgement.
    pub fn new(client: async_nats::Client, ack_timeout: Duration) -> Self {
        let mut js = jetstream::new(client);
        js.set_timeout(ack_timeout);
        Self { js }
    }
}

fn classify(e: NatsPublishError) -> PublishError {
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => PublishError::TooLarge(e.to_string()),
        _ => PublishError::Unavailable(e.to_string()),
    }
}

impl Publisher for JetStreamPublisher {
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        msg_id: &'a str,
        payload: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<Published, PublishError>> + Send + 'a>> {
        Box::pin(async move {
            let message = PublishMessage::build().message_id(msg_id).payload(payload);
            let ack = self
                .js
                .send_publish(subject.to_string(), message)
                .await
                .map_err(classify)?
                .await
                .map_err(classify)?;
            Ok(Published {
                duplicate: ack.duplicate,
            })
        })
    }
}

/// A running gateway.
pub struct Serving {
    /// The bound address (port 0 picks a free one).
    pub addr: SocketAddr,
    /// For [`Gateway::reload`].
    pub gateway: Arc<Gateway>,
    /// Ends after `shutdown` once the requests in flight are answered.
    pub task: JoinHandle<io::Result<()>>,
}

/// Ensures the events stream of `routes`' namespace, binds `addr` and
/// serves the webhooks until `shutdown` completes; requests in flight are
/// then finished.
pub async fn serve(
    addr: SocketAddr,
    routes: Routes,
    client: async_nats::Client,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Serving, Error> {
    serve_with(
        GatewayConfig::default(),
        addr,
        routes,
        client,
        metrics,
        shutdown,
    )
    .await
}

/// [`serve`] with explicit timeouts.
pub async fn serve_with(
    config: GatewayConfig,
    addr: SocketAddr,
    routes: Routes,
    client: async_nats::Client,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Serving, Error> {
    let names = Names::new(routes.namespace(), "");
    setup::ensure_namespace(&jetstream::new(client.clone()), &names).await?;
    let publisher = JetStreamPublisher::new(client, config.publish_timeout);
    let gateway = Gateway::new(routes, Arc::new(publisher), metrics, config);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Setup(format!("failed to bind the gateway to {addr}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Setup(format!("failed to read the gateway's address: {e}")))?;
    let task = tokio::spawn(webhook::serve(listener, gateway.clone(), shutdown));
    tracing::info!(%addr, "serving webhooks");
    Ok(Serving {
        addr,
        gateway,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_publishes_where_the_worker_consumes() {
        let names = Names::new("finance", "shipment-to-invoice");
        assert_eq!(
            webhook::event_subject("finance", "vendor-invoice.received"),
            names.event_subject("vendor-invoice.received")
        );
    }
}
