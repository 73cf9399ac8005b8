//! The gateway: webhooks in, canonical events published to JetStream.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::labels::{ConnectorLabels, GatewayRejectLabels, GatewayRequestLabels};
use super::{HistogramFamily, Registrar};

/// `tallyman_gateway_*`.
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    /// Every webhook request, by outcome.
    pub requests: Family<GatewayRequestLabels, Counter>,
    /// Rejected requests, by reason.
    pub rejected: Family<GatewayRejectLabels, Counter>,
    /// Publishing one event until JetStream acknowledged it.
    pub publish_duration: HistogramFamily<ConnectorLabels>,
}

impl GatewayMetrics {
    pub(super) fn register(r: &mut Registrar) -> Self {
        Self {
            requests: r.counter(
                "tallyman_gateway_requests",
                "Webhook requests, by outcome (accepted, duplicate, rejected)",
            ),
            rejected: r.counter(
                "tallyman_gateway_rejected",
                "Webhook requests refused, by reason",
            ),
            publish_duration: r.seconds(
                "tallyman_gateway_publish_duration",
                "Time from publishing an event to JetStream's acknowledgement",
            ),
        }
    }
}
