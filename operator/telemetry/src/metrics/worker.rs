//! The worker: one Workflow run against JetStream.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::labels::{
    CallLabels, EventLabels, ExceptionLabels, InstanceEndLabels, StepLabels, WorkflowLabels,
};
use super::{HistogramFamily, Registrar};

/// `tallyman_worker_*`. Field names are the metric names without prefix and
/// suffix.
#[derive(Clone, Debug)]
pub struct WorkerMetrics {
    /// Events taken from the stream, duplicates included.
    pub events_received: Family<EventLabels, Counter>,
    /// Events whose id the instance had already applied.
    pub events_duplicate: Family<WorkflowLabels, Counter>,
    /// Events applied in the same commit as an earlier event of their instance.
    pub events_coalesced: Family<WorkflowLabels, Counter>,
    pub instances_started: Family<WorkflowLabels, Counter>,
    pub instances_ended: Family<InstanceEndLabels, Counter>,
    /// Instances started and not ended (waiting ones included).
    pub instances_running: Family<WorkflowLabels, Gauge>,
    /// One step's execution, not the time it waits for an event or a person.
    pub step_duration: HistogramFamily<StepLabels>,
    /// One outbound HTTP attempt, request sent to response (or error).
    pub call_duration: HistogramFamily<CallLabels>,
    /// Outbound HTTP attempts, retries included.
    pub call_attempts: Family<CallLabels, Counter>,
    pub exceptions_opened: Family<ExceptionLabels, Counter>,
    pub sla_breaches: Family<WorkflowLabels, Counter>,
    pub dead_letters: Family<StepLabels, Counter>,
    /// Compare-and-set writes of instance state that lost to another writer.
    pub cas_conflicts: Family<WorkflowLabels, Counter>,
    /// Messages handed back for redelivery: they could not be processed now.
    pub messages_retried: Family<WorkflowLabels, Counter>,
    /// Messages the durable consumer has not delivered yet (consumer lag).
    pub consumer_pending: Family<WorkflowLabels, Gauge>,
    /// Running instances held in memory between their inputs.
    pub held_instances: Family<WorkflowLabels, Gauge>,
    /// Their estimated memory, within `--instance-cache-mib`.
    pub held_instance_bytes: Family<WorkflowLabels, Gauge>,
    /// One message, fetch to ack.
    pub message_duration: HistogramFamily<WorkflowLabels>,
}

impl WorkerMetrics {
    pub(super) fn register(r: &mut Registrar) -> Self {
        Self {
            events_received: r.counter(
                "tallyman_worker_events_received",
                "Events the worker took from its stream, duplicates included",
            ),
            events_duplicate: r.counter(
                "tallyman_worker_events_duplicate",
                "Events dropped because their instance had already applied the event id",
            ),
            events_coalesced: r.counter(
                "tallyman_worker_events_coalesced",
                "Events applied in the same commit as an earlier event of their instance",
            ),
            instances_started: r.counter(
                "tallyman_worker_instances_started",
                "Workflow instances started",
            ),
            instances_ended: r.counter(
                "tallyman_worker_instances_ended",
                "Workflow instances ended, by outcome (completed, rejected, failed)",
            ),
            instances_running: r.gauge(
                "tallyman_worker_instances_running",
                "Workflow instances started and not yet ended, waiting ones included",
            ),
            step_duration: r.seconds(
                "tallyman_worker_step_duration",
                "Time to execute one step, excluding waits for events, timers or people",
            ),
            call_duration: r.seconds(
                "tallyman_worker_call_duration",
                "Time of one outbound HTTP attempt, by the class of its status",
            ),
            call_attempts: r.counter(
                "tallyman_worker_call_attempts",
                "Outbound HTTP attempts, retries included, by the class of their status",
            ),
            exceptions_opened: r.counter(
                "tallyman_worker_exceptions_opened",
                "ExceptionCases opened, by reason",
            ),
            sla_breaches: r.counter(
                "tallyman_worker_sla_breaches",
                "Instances that passed their Workflow's SLA deadline",
            ),
            dead_letters: r.counter(
                "tallyman_worker_dead_letters",
                "Messages given up on after their last delivery attempt, by step",
            ),
            cas_conflicts: r.counter(
                "tallyman_worker_cas_conflicts",
                "Instance state writes that lost a compare-and-set race and were retried",
            ),
            messages_retried: r.counter(
                "tallyman_worker_messages_retried",
                "Messages handed back for redelivery because they could not be processed now",
            ),
            consumer_pending: r.gauge(
                "tallyman_worker_consumer_pending",
                "Messages on the stream not yet delivered to the worker's consumer",
            ),
            held_instances: r.gauge(
                "tallyman_worker_held_instances",
                "Running instances held in memory between their inputs",
            ),
            held_instance_bytes: r.gauge(
                "tallyman_worker_held_instance_bytes",
                "Estimated memory of the running instances held between their inputs",
            ),
            message_duration: r.seconds(
                "tallyman_worker_message_duration",
                "Time from fetching one message to acknowledging it",
            ),
        }
    }
}
