//! Label sets. Every value is bounded: names declared in manifests
//! (namespace, workflow, step, connector, action, event type, exception
//! reason), a fixed enum, or a `&'static str` from code (`metric_label()` of
//! an error), which a formatted string cannot be without leaking. Keys, ids
//! and amounts never appear.

use std::fmt::{self, Write};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

/// `{namespace, workflow}`: the unit a worker Deployment runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct WorkflowLabels {
    pub namespace: String,
    pub workflow: String,
}

impl WorkflowLabels {
    pub fn new(namespace: impl Into<String>, workflow: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            workflow: workflow.into(),
        }
    }

    /// These labels with a step.
    pub fn step(&self, step: &str) -> StepLabels {
        StepLabels {
            namespace: self.namespace.clone(),
            workflow: self.workflow.clone(),
            step: step.to_string(),
        }
    }
}

/// `{namespace, workflow, type}`: `type` is the event type the trigger
/// declares, e.g. `shipment.dispatched`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EventLabels {
    pub namespace: String,
    pub workflow: String,
    pub r#type: String,
}

/// `{namespace, workflow, outcome}` for instances that ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct InstanceEndLabels {
    pub namespace: String,
    pub workflow: String,
    pub outcome: InstanceOutcome,
}

/// `{namespace, workflow, step}`: `step` is the step name in the Workflow.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StepLabels {
    pub namespace: String,
    pub workflow: String,
    pub step: String,
}

/// `{namespace, workflow, connector, action, status_class}` for one outbound
/// HTTP attempt.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CallLabels {
    pub namespace: String,
    pub workflow: String,
    pub connector: String,
    pub action: String,
    pub status_class: StatusClass,
}

/// `{namespace, workflow, reason}`: `reason` is the exception reason the
/// Workflow declares, e.g. `QuantityMismatch`, or `SlaBreached`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ExceptionLabels {
    pub namespace: String,
    pub workflow: String,
    pub reason: String,
}

/// `{namespace, connector}`: a webhook Connector served by the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnectorLabels {
    pub namespace: String,
    pub connector: String,
}

/// `{namespace, connector, outcome}` for one webhook request.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GatewayRequestLabels {
    pub namespace: String,
    pub connector: String,
    pub outcome: GatewayOutcome,
}

/// `{namespace, connector, reason}`: `reason` is the rejection error's
/// `metric_label()`, e.g. `bad_signature`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GatewayRejectLabels {
    pub namespace: String,
    pub connector: String,
    pub reason: &'static str,
}

/// `{controller}`, e.g. `workflow`, `connector`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

/// `{controller, reason}`: `reason` is the reconcile error's
/// `metric_label()`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReconcileErrorLabels {
    pub controller: &'static str,
    pub reason: &'static str,
}

/// How an instance ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InstanceOutcome {
    Completed,
    Rejected,
    Failed,
}

impl InstanceOutcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            InstanceOutcome::Completed => "completed",
            InstanceOutcome::Rejected => "rejected",
            InstanceOutcome::Failed => "failed",
        }
    }
}

/// What the gateway answered a webhook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GatewayOutcome {
    /// Verified and published (JetStream acknowledged).
    Accepted,
    /// Verified; JetStream already had the event id.
    Duplicate,
    /// Refused; the reason is counted in `tallyman_gateway_rejected_total`.
    Rejected,
}

impl GatewayOutcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            GatewayOutcome::Accepted => "accepted",
            GatewayOutcome::Duplicate => "duplicate",
            GatewayOutcome::Rejected => "rejected",
        }
    }
}

/// The class of an HTTP status, `2xx` … `5xx`, or `error` when no response
/// came (connect failure, timeout, TLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatusClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
    NoResponse,
}

impl StatusClass {
    /// The class of `status`; codes outside 100–599 count as `5xx`, the class
    /// an SRE watches for broken servers.
    pub const fn from_status(status: u16) -> Self {
        match status {
            100..=199 => StatusClass::Informational,
            200..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirection,
            400..=499 => StatusClass::ClientError,
            _ => StatusClass::ServerError,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            StatusClass::Informational => "1xx",
            StatusClass::Success => "2xx",
            StatusClass::Redirection => "3xx",
            StatusClass::ClientError => "4xx",
            StatusClass::ServerError => "5xx",
            StatusClass::NoResponse => "error",
        }
    }
}

macro_rules! encode_as_str {
    ($($ty:ty),*) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}

encode_as_str!(InstanceOutcome, GatewayOutcome, StatusClass);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(StatusClass::from_status(204).as_str(), "2xx");
        assert_eq!(StatusClass::from_status(302).as_str(), "3xx");
        assert_eq!(StatusClass::from_status(429).as_str(), "4xx");
        assert_eq!(StatusClass::from_status(503).as_str(), "5xx");
        assert_eq!(StatusClass::from_status(101).as_str(), "1xx");
        assert_eq!(StatusClass::from_status(999).as_str(), "5xx");
    }
}
