//! `ApprovalPolicy`: who may let an exception through.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Conditions, Duration, Expression, conditions_schema};

/// Who may let an exception through: rules evaluated in order (first match
/// wins), segregation of duties and what happens when nobody decides.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "tallyman.dev",
    version = "v1alpha1",
    kind = "ApprovalPolicy",
    namespaced,
    status = "ApprovalPolicyStatus",
    shortname = "ap",
    category = "tallyman",
    doc = "An ApprovalPolicy decides who may let an exception through: ordered rules over the case's facts, segregation of duties and expiry.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalPolicySpec {
    /// Evaluated in order; the first rule whose `when` holds decides. A case
    /// no rule matches is rejected.
    #[schemars(length(min = 1, max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub rules: Vec<PolicyRule>,
    /// Who may not approve.
    #[serde(default)]
    pub segregation_of_duties: SegregationOfDuties,
    /// What happens when a case stays open too long. Omitted: cases wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<Expiry>,
}

/// One rule of a policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.decide != 'RequireApproval' || has(self.approvers)").message("approvers is required when decide is RequireApproval"))]
#[x_kube(validation = Rule::new("self.decide == 'RequireApproval' || !has(self.approvers)").message("approvers is only allowed when decide is RequireApproval"))]
pub struct PolicyRule {
    /// Unique within the policy; recorded on the case.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// CEL (bool) over `facts`, `reason`, `workflow` and `initiator`.
    #[schemars(length(min = 1))]
    pub when: Expression,
    /// The decision when this rule matches.
    pub decide: Decide,
    /// Who must approve, for `RequireApproval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvers: Option<Approvers>,
}

/// What a matching rule decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Decide {
    /// Let the instance go on without asking anyone (recorded in the audit).
    AutoApprove,
    /// Reject without asking anyone.
    AutoReject,
    /// Open an ExceptionCase and wait for `approvers`.
    RequireApproval,
}

/// A set of people who may approve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approvers {
    /// An approver must belong to at least one of these groups.
    #[schemars(length(min = 1, max = 32))]
    pub groups: Vec<String>,
    /// Approvals needed; one rejection rejects.
    #[serde(default = "default_count")]
    #[schemars(range(min = 1, max = 10))]
    pub count: u32,
}

fn default_count() -> u32 {
    1
}

/// Segregation-of-duties rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SegregationOfDuties {
    /// The case's initiator may not decide it.
    #[serde(default = "yes")]
    pub exclude_initiator: bool,
    /// Every approval must come from a different person.
    #[serde(default = "yes")]
    pub distinct_approvers: bool,
}

impl Default for SegregationOfDuties {
    fn default() -> Self {
        Self {
            exclude_initiator: true,
            distinct_approvers: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// Expiry of open cases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.then != 'Escalate' || has(self.escalateTo)").message("escalateTo is required when then is Escalate"))]
#[x_kube(validation = Rule::new("self.then == 'Escalate' || !has(self.escalateTo)").message("escalateTo is only allowed when then is Escalate"))]
pub struct Expiry {
    /// Time a case may stay open.
    pub after: Duration,
    /// What happens then.
    pub then: ExpiryAction,
    /// Who decides an escalated case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate_to: Option<Approvers>,
}

/// What happens to an expired case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ExpiryAction {
    /// Hand the case to `escalateTo` (once); a second expiry rejects it.
    Escalate,
    /// Reject the case.
    Reject,
}

/// Observed state of an ApprovalPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalPolicyStatus {
    /// `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Conditions,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
