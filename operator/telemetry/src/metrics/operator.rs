//! The operator: reconcilers of the tallyman resources.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::labels::{ControllerLabels, ReconcileErrorLabels};
use super::{HistogramFamily, Registrar};

/// `tallyman_operator_*`.
#[derive(Clone, Debug)]
pub struct OperatorMetrics {
    pub reconciles: Family<ControllerLabels, Counter>,
    /// Failed reconciles, by the error's `metric_label()`.
    pub reconcile_errors: Family<ReconcileErrorLabels, Counter>,
    pub reconcile_duration: HistogramFamily<ControllerLabels>,
}

impl OperatorMetrics {
    pub(super) fn register(r: &mut Registrar) -> Self {
        Self {
            reconciles: r.counter(
                "tallyman_operator_reconciles",
                "Reconciles run, successful or not",
            ),
            reconcile_errors: r.counter(
                "tallyman_operator_reconcile_errors",
                "Reconciles that failed, by reason",
            ),
            reconcile_duration: r.seconds(
                "tallyman_operator_reconcile_duration",
                "Time of one reconcile",
            ),
        }
    }
}
