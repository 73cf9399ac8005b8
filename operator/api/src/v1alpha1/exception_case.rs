//! `ExceptionCase`: the human loop, in the cluster.
//!
//! A worker writes the spec once; approvers append to `spec.decisions` (the
//! admission policy shipped with the chart checks who may); the worker counts
//! the decisions against the policy and records the outcome in the status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Conditions, conditions_schema};
use super::policy::Approvers;

/// A case a worker opened because an instance needs a person's decision.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "tallyman.dev",
    version = "v1alpha1",
    kind = "ExceptionCase",
    namespaced,
    status = "ExceptionCaseStatus",
    shortname = "case",
    shortname = "cases",
    category = "tallyman",
    doc = "An ExceptionCase is a paused workflow instance waiting for people: the facts, the policy it falls under, and the decisions made so far.",
    printcolumn(name = "Workflow", type_ = "string", json_path = ".spec.workflow"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".spec.reason"),
    printcolumn(name = "Amount", type_ = "string", json_path = ".spec.facts.amount"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.workflow == oldSelf.workflow && self.key == oldSelf.key && self.revision == oldSelf.revision && self.reason == oldSelf.reason && self.facts == oldSelf.facts && self.initiator == oldSelf.initiator && self.policy == oldSelf.policy && self.rule == oldSelf.rule && self.required == oldSelf.required && self.segregationOfDuties == oldSelf.segregationOfDuties && has(self.escalateTo) == has(oldSelf.escalateTo) && (!has(self.escalateTo) || self.escalateTo == oldSelf.escalateTo) && has(self.deadline) == has(oldSelf.deadline) && (!has(self.deadline) || self.deadline == oldSelf.deadline)").message("only spec.decisions may change; the rest of the case is written once by the worker"))]
#[serde(rename_all = "camelCase")]
pub struct ExceptionCaseSpec {
    /// The Workflow whose instance is paused.
    #[schemars(length(min = 1, max = 253))]
    pub workflow: String,
    /// The instance key (the value of `trigger.correlate`).
    #[schemars(length(min = 1))]
    pub key: String,
    /// The definition revision the instance runs on.
    pub revision: String,
    /// Why the case was opened, e.g. `QuantityMismatch`.
    #[schemars(length(min = 1, max = 63))]
    pub reason: String,
    /// The facts the policy saw (amounts are decimal strings).
    #[schemars(schema_with = "free_form_object")]
    pub facts: serde_json::Map<String, serde_json::Value>,
    /// Who caused the exception.
    pub initiator: String,
    /// The ApprovalPolicy that governs the case.
    pub policy: String,
    /// The policy rule that matched.
    pub rule: String,
    /// Approvals the case needs and from whom.
    pub required: Approvers,
    /// Segregation of duties as the policy said when the case opened.
    pub segregation_of_duties: CaseSegregation,
    /// When the policy's expiry applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Time>,
    /// Who decides once the case is escalated (from the policy's expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate_to: Option<Approvers>,
    /// Decisions, appended one at a time by approvers.
    #[serde(default)]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.size() >= oldSelf.size()").message("decisions can only be added, never removed"))]
    pub decisions: Vec<CaseDecision>,
}

fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Segregation of duties recorded on a case.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaseSegregation {
    pub exclude_initiator: bool,
    pub distinct_approvers: bool,
}

/// One person's decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaseDecision {
    /// The deciding user, exactly as the API server authenticates them.
    #[schemars(length(min = 1, max = 253))]
    pub approver: String,
    /// The groups the approver decides in; each must be one of theirs.
    #[serde(default)]
    pub groups: Vec<String>,
    /// `Approve` or `Reject`.
    pub decision: Verdict,
    /// Why; required for a rejection by `kubectl tallyman reject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub comment: Option<String>,
}

/// A person's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Verdict {
    Approve,
    Reject,
}

/// Observed state of a case, written by the worker.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExceptionCaseStatus {
    /// Where the case stands.
    #[serde(default)]
    pub state: CaseState,
    /// Approvals counted so far.
    #[serde(default)]
    pub approvals: u32,
    /// Whether the case was escalated after expiry.
    #[serde(default)]
    pub escalated: bool,
    /// When the case was decided, expired or escalated last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<Time>,
    /// The deadline in force: the spec's, or the escalation's once escalated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Time>,
    /// A sentence on the outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Conditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The life of a case.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum CaseState {
    #[default]
    Open,
    Approved,
    Rejected,
    Escalated,
    Expired,
}
