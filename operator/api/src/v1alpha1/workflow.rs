//! `Workflow`: one process across systems, run by its workers.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Conditions, Duration, EVENT_TYPE_PATTERN, Expression, conditions_schema};

/// The pattern of a step name: a DNS label.
pub const STEP_NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A process across systems: which events start and feed an instance, how
/// instances are keyed, and the steps each instance runs.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "tallyman.dev",
    version = "v1alpha1",
    kind = "Workflow",
    namespaced,
    status = "WorkflowStatus",
    shortname = "wf",
    category = "tallyman",
    doc = "A Workflow is one process across systems: trigger events correlated into instances by a key, and the steps every instance runs.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Revision", type_ = "string", json_path = ".status.revision"),
    printcolumn(
        name = "Running",
        type_ = "integer",
        json_path = ".status.instances.running"
    ),
    printcolumn(
        name = "Exceptions",
        type_ = "integer",
        json_path = ".status.instances.exceptions"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowSpec {
    /// Which events feed this workflow and how they are grouped into instances.
    pub trigger: Trigger,
    /// Service-level objective of one instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla: Option<Sla>,
    /// The steps every instance runs, in order; names are unique.
    #[schemars(length(min = 1, max = 100), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub steps: Vec<Step>,
    /// Who decides the cases this workflow opens that no ApprovalPolicy
    /// governs. Without it, anyone allowed to update ExceptionCases does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exceptions: Option<Exceptions>,
    /// The worker Deployment that runs this workflow.
    #[serde(default)]
    pub workers: Workers,
}

/// The cases a workflow opens by itself: a call that failed for good
/// (reason `CallFailed`: approve to call again with the same idempotency
/// key, reject to fail the instance) and an SLA breach with
/// `onBreach: Exception` (reason `SlaBreached`: for the record).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Exceptions {
    /// Who decides them, and how many must approve; enforced like an
    /// ApprovalPolicy's approvers (the admission policy and the worker).
    pub approvers: super::Approvers,
}

/// The events of a workflow and their correlation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    /// Event types this workflow consumes, e.g. `shipment.confirmed`.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 128), regex(pattern = EVENT_TYPE_PATTERN)))]
    pub events: Vec<String>,
    /// CEL (string or int) over `event`: the instance key. Events with the
    /// same key belong to the same instance.
    #[schemars(length(min = 1))]
    pub correlate: Expression,
}

/// A service-level objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sla {
    /// An instance should end within this time of its first event.
    pub complete: Duration,
    /// What a breach does besides the audit record and the metric.
    #[serde(default)]
    pub on_breach: SlaBreach,
}

/// What an SLA breach does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SlaBreach {
    /// An audit record and the `tallyman_worker_sla_breaches_total` metric.
    #[default]
    Record,
    /// Also open an ExceptionCase (reason `SlaBreached`) for a person to look at.
    Exception,
}

/// One step. Exactly one of `await`, `call`, `check`, `approval`, `emit`,
/// `set` and `wait` is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.await) ? 1 : 0) + (has(self.call) ? 1 : 0) + (has(self.check) ? 1 : 0) + (has(self.approval) ? 1 : 0) + (has(self.emit) ? 1 : 0) + (has(self.set) ? 1 : 0) + (has(self.wait) ? 1 : 0) == 1").message("set exactly one of await, call, check, approval, emit, set, wait"))]
#[x_kube(validation = Rule::new("!has(self.onFalse) || has(self.check)").message("onFalse is only allowed on a check step"))]
pub struct Step {
    /// Unique within the workflow; a DNS label (lowercase letters, digits, `-`).
    #[schemars(length(min = 1, max = 63), regex(pattern = STEP_NAME_PATTERN))]
    pub name: String,
    /// CEL (bool): the step runs only when this holds; otherwise it is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Expression>,
    /// Wait until every listed event has arrived for this instance.
    #[serde(rename = "await", default, skip_serializing_if = "Option::is_none")]
    pub await_: Option<AwaitStep>,
    /// Invoke a Connector REST action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<CallStep>,
    /// CEL (bool): a condition the instance must meet; `onFalse` says what
    /// happens otherwise (default: the instance fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Expression>,
    /// Route for a `check` that does not hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_false: Option<Route>,
    /// Ask the ApprovalPolicy; pause for people when it says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalStep>,
    /// Publish an event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit: Option<EmitStep>,
    /// Set instance variables (`vars.<name>`), each from a CEL expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<BTreeMap<String, Expression>>,
    /// Pause for a while or until a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<WaitStep>,
}

/// Wait for events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwaitStep {
    /// Event types to wait for; each must be one of `trigger.events`. Events
    /// that arrived earlier count.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 128), regex(pattern = EVENT_TYPE_PATTERN)))]
    pub events: Vec<String>,
    /// Give up after this long (measured from when the step began).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Route taken on timeout (default: the instance fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<Route>,
}

/// Invoke a Connector action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallStep {
    /// Name of a Connector in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub connector: String,
    /// Name of an action of that Connector's `rest.actions`.
    #[schemars(length(min = 1))]
    pub action: String,
    /// CEL values for the action's `{param}` placeholders.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, Expression>,
    /// CEL producing the JSON request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Expression>,
    /// CEL (string) producing the idempotency key; deterministic per instance.
    /// Defaults to `<namespace>/<workflow>/<key>/<step>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<Expression>,
    /// For systems without idempotency keys: look the result up before
    /// (re)trying, and use it when found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup: Option<Lookup>,
    /// Route taken when the call fails for good (retries exhausted or a 4xx).
    /// Default: the message goes to the dead-letter subject and a case opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<Route>,
}

/// A look-up standing in for idempotency keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lookup {
    /// An action of the same Connector that finds an earlier result.
    #[schemars(length(min = 1))]
    pub action: String,
    /// CEL values for the look-up action's placeholders.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, Expression>,
    /// CEL (bool) over `response` (the look-up's answer): whether the earlier
    /// result exists. When it does, it stands as this call's response.
    #[schemars(length(min = 1))]
    pub found: Expression,
}

/// Where an instance goes when a check fails, an await times out or a call
/// fails: optionally ask people, optionally emit, then continue, jump or end.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.goTo) && has(self.end))").message("set goTo or end, not both"))]
pub struct Route {
    /// Ask the ApprovalPolicy first; approval continues the route,
    /// rejection takes `approval.onRejected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalStep>,
    /// Publish an event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit: Option<EmitStep>,
    /// Continue at this step instead of the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub go_to: Option<String>,
    /// End the instance in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<EndState>,
}

/// How a rejected approval ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.goTo) && has(self.end))").message("set goTo or end, not both"))]
pub struct Outcome {
    /// Publish an event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit: Option<EmitStep>,
    /// Continue at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub go_to: Option<String>,
    /// End the instance in this state (default `Rejected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<EndState>,
}

/// End states of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EndState {
    Completed,
    Rejected,
    Failed,
}

/// Ask an ApprovalPolicy whether the instance may go on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalStep {
    /// Name of an ApprovalPolicy in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub policy: String,
    /// Why a person is asked, as a short UpperCamelCase word
    /// (e.g. `QuantityMismatch`); a metric label and printer column.
    #[schemars(length(min = 1, max = 63), regex(pattern = "^[A-Z][A-Za-z0-9]*$"))]
    pub reason: String,
    /// CEL (string): who caused the exception; barred from approving it when
    /// the policy excludes initiators. Default: the source of `event`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator: Option<Expression>,
    /// CEL values recorded on the case and seen by the policy as `facts`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub facts: BTreeMap<String, Expression>,
    /// What a rejection (or an expiry the policy rejects) does; default
    /// `{end: Rejected}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_rejected: Option<Outcome>,
}

/// Publish an event to `tallyman.<namespace>.events.<type>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmitStep {
    /// Event type.
    #[serde(rename = "type")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
    )]
    pub type_: String,
    /// CEL producing the event's `data`. Omitted: `{"key": key}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Expression>,
}

/// Pause an instance; the timer survives restarts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.__for__) != has(self.until)").message("set exactly one of for, until"))]
pub struct WaitStep {
    /// Pause for this long.
    #[serde(rename = "for", default, skip_serializing_if = "Option::is_none")]
    pub for_: Option<Duration>,
    /// CEL (timestamp): pause until this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Expression>,
}

/// The worker Deployment of a workflow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Workers {
    /// Worker pods; any of them can advance any instance.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// Messages one worker processes concurrently.
    #[serde(default = "default_max_in_flight")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_in_flight: u32,
    /// Compute resources of a worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for Workers {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            max_in_flight: default_max_in_flight(),
            resources: None,
        }
    }
}

fn default_replicas() -> i32 {
    1
}
fn default_max_in_flight() -> u32 {
    128
}

/// Observed state of a Workflow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStatus {
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Conditions,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Content hash of the resolved definition new instances start on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Worker availability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkerCounts>,
    /// Instance counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<InstanceCounts>,
}

/// Desired and ready worker pods.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCounts {
    pub desired: i32,
    pub ready: i32,
}

/// Instance counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceCounts {
    pub running: i64,
    pub completed: i64,
    pub rejected: i64,
    pub failed: i64,
    /// Cases opened so far.
    pub exceptions: i64,
}
