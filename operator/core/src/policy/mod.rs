//! The approval-policy engine: which rule a case falls under, who may decide
//! it, and when it is decided. The same code judges decisions in dev mode,
//! in the JetStream case store and in the cluster's worker, so a finance
//! controller meets the same rules everywhere.
//!
//! ```text
//! facts ──rules (first match)──▶ AutoApprove | AutoReject | RequireApproval{groups, count}
//! decision ──admit──▶ refused (who may not, and why) | recorded ──tally──▶ Open | Approved | Rejected
//! deadline ──expire──▶ Escalated (once, to escalateTo, with a new deadline) | Expired (a rejection)
//! ```

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tallyman_api::v1alpha1::{
    ApprovalPolicySpec, Approvers, CaseDecision, CaseState, Decide, ExceptionCaseSpec,
    ExceptionCaseStatus, ExpiryAction, Verdict,
};

use crate::cel::{EvalError, ExpressionError, Program, Scope, Value, Vars};

/// A policy with its rules compiled once.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    pub name: String,
    pub spec: ApprovalPolicySpec,
    rules: Vec<Program>,
}

/// What a policy says about a case.
#[derive(Clone, Debug, PartialEq)]
pub enum Ruling {
    AutoApprove {
        rule: String,
    },
    AutoReject {
        rule: String,
    },
    RequireApproval {
        rule: String,
        approvers: Approvers,
    },
    /// No rule matched: the case is rejected, so a gap in a policy never lets money through.
    NoRuleMatched,
}

impl CompiledPolicy {
    /// Compile every rule; the error names the field path.
    pub fn compile(
        name: &str,
        spec: &ApprovalPolicySpec,
    ) -> Result<Self, (String, ExpressionError)> {
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Program::compile(&r.when, Scope::Policy)
                    .map_err(|e| (format!("spec.rules[{i}].when"), e))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: name.to_string(),
            spec: spec.clone(),
            rules,
        })
    }

    /// The first rule whose `when` holds decides.
    pub fn evaluate(
        &self,
        facts: &Value,
        reason: &str,
        workflow: &str,
        initiator: &str,
        now: DateTime<Utc>,
    ) -> Result<Ruling, EvalError> {
        let vars = Vars::new()
            .with("facts", facts.clone())
            .with("reason", Value::String(reason.to_string().into()))
            .with("workflow", Value::String(workflow.to_string().into()))
            .with("initiator", Value::String(initiator.to_string().into()))
            .with("now", Value::Timestamp(now.fixed_offset()));
        for (rule, program) in self.spec.rules.iter().zip(&self.rules) {
            if program.eval_bool(&vars)? {
                return Ok(match rule.decide {
                    Decide::AutoApprove => Ruling::AutoApprove {
                        rule: rule.name.clone(),
                    },
                    Decide::AutoReject => Ruling::AutoReject {
                        rule: rule.name.clone(),
                    },
                    Decide::RequireApproval => Ruling::RequireApproval {
                        rule: rule.name.clone(),
                        approvers: rule.approvers.clone().unwrap_or(Approvers {
                            groups: Vec::new(),
                            count: 1,
                        }),
                    },
                });
            }
        }
        Ok(Ruling::NoRuleMatched)
    }

    /// The deadline and escalation a new case gets from this policy.
    pub fn expiry(&self, opened: DateTime<Utc>) -> (Option<DateTime<Utc>>, Option<Approvers>) {
        match &self.spec.expiry {
            None => (None, None),
            Some(e) => {
                let deadline = opened
                    + chrono::Duration::from_std(e.after.as_std()).unwrap_or(chrono::Duration::MAX);
                let escalate_to = (e.then == ExpiryAction::Escalate)
                    .then(|| e.escalate_to.clone())
                    .flatten();
                (Some(deadline), escalate_to)
            }
        }
    }

    /// How long an escalated case may stay open before it expires for good.
    pub fn escalation_window(&self) -> Option<std::time::Duration> {
        self.spec.expiry.as_ref().map(|e| e.after.as_std())
    }
}

/// A Kubernetes `Time` from a UTC instant.
pub fn to_time(t: DateTime<Utc>) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32)
            .unwrap_or(k8s_openapi::jiff::Timestamp::MAX),
    )
}

/// The UTC instant of a Kubernetes `Time`.
pub fn from_time(t: &Time) -> DateTime<Utc> {
    DateTime::from_timestamp(t.0.as_second(), t.0.subsec_nanosecond().max(0) as u32)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Why a decision was refused, in words for the person who tried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Is the case still waiting for people?
pub fn is_open(status: &ExceptionCaseStatus) -> bool {
    matches!(status.state, CaseState::Open | CaseState::Escalated)
}

/// The approvers in force: the spec's, or `escalateTo` once escalated.
pub fn required(spec: &ExceptionCaseSpec, status: &ExceptionCaseStatus) -> Approvers {
    match (&spec.escalate_to, status.escalated) {
        (Some(to), true) => to.clone(),
        _ => spec.required.clone(),
    }
}

/// May `decision` be added to the case? Checks what the admission policy
/// checks in the cluster, except the authenticated identity, which the caller
/// vouches for (dev mode takes it from the request, the cluster from the API
/// server).
pub fn admit(
    spec: &ExceptionCaseSpec,
    status: &ExceptionCaseStatus,
    decision: &CaseDecision,
) -> Result<(), Refusal> {
    if !is_open(status) {
        return Err(Refusal(format!(
            "the case is already {:?}; decisions are closed",
            status.state
        )));
    }
    let who = decision.approver.trim();
    if who.is_empty() {
        return Err(Refusal("a decision needs the approver's user name".into()));
    }
    if spec.segregation_of_duties.exclude_initiator && who == spec.initiator {
        return Err(Refusal(format!(
            "{who} raised this exception and may not decide it (segregation of duties); ask another approver"
        )));
    }
    if spec.segregation_of_duties.distinct_approvers
        && spec.decisions.iter().any(|d| d.approver == who)
    {
        return Err(Refusal(format!(
            "{who} has already decided this case; every decision must come from a different person"
        )));
    }
    let needed = required(spec, status);
    if !needed.groups.is_empty() && !decision.groups.iter().any(|g| needed.groups.contains(g)) {
        return Err(Refusal(format!(
            "deciding this case needs membership in one of {}; {who} decides as {}",
            needed.groups.join(", "),
            if decision.groups.is_empty() {
                "a member of no group".to_string()
            } else {
                decision.groups.join(", ")
            }
        )));
    }
    if decision.decision == Verdict::Reject
        && decision
            .comment
            .as_deref()
            .is_none_or(|c| c.trim().is_empty())
    {
        return Err(Refusal("a rejection needs a comment saying why".into()));
    }
    Ok(())
}

/// The state the decisions add up to. One admitted rejection rejects; the
/// required count of approvals from the groups in force approves.
pub fn tally(spec: &ExceptionCaseSpec, status: &ExceptionCaseStatus) -> (CaseState, u32) {
    if !is_open(status) {
        return (status.state, status.approvals);
    }
    let needed = required(spec, status);
    let counts = |d: &CaseDecision| {
        needed.groups.is_empty() || d.groups.iter().any(|g| needed.groups.contains(g))
    };
    if spec
        .decisions
        .iter()
        .any(|d| d.decision == Verdict::Reject && counts(d))
    {
        let approvals = approvals(spec, &needed);
        return (CaseState::Rejected, approvals);
    }
    let approvals = approvals(spec, &needed);
    if approvals >= needed.count {
        (CaseState::Approved, approvals)
    } else {
        (status.state, approvals)
    }
}

fn approvals(spec: &ExceptionCaseSpec, needed: &Approvers) -> u32 {
    let mut seen = std::collections::BTreeSet::new();
    spec.decisions
        .iter()
        .filter(|d| d.decision == Verdict::Approve)
        .filter(|d| needed.groups.is_empty() || d.groups.iter().any(|g| needed.groups.contains(g)))
        .filter(|d| {
            !spec.segregation_of_duties.distinct_approvers || seen.insert(d.approver.clone())
        })
        .count() as u32
}

/// Apply the policy's expiry at `now`: escalate once when the spec says
/// where to, otherwise (or on the second expiry) expire, which rejects.
/// Returns the new status, or `None` when nothing is due.
pub fn expire(
    spec: &ExceptionCaseSpec,
    status: &ExceptionCaseStatus,
    escalation_window: Option<std::time::Duration>,
    now: DateTime<Utc>,
) -> Option<ExceptionCaseStatus> {
    let deadline = from_time(status.deadline.as_ref().or(spec.deadline.as_ref())?);
    if !is_open(status) || now < deadline {
        return None;
    }
    let mut next = status.clone();
    next.resolved_at = Some(to_time(now));
    // Decisions on the case that did not settle it: too few approvals, or
    // (in the cluster, where a worker settles what admission let in) ones
    // no worker had settled when the deadline passed. Named, so the case
    // does not claim nobody decided.
    let decided = if spec.decisions.is_empty() {
        "no decision within the deadline".to_string()
    } else {
        let who: Vec<String> = spec
            .decisions
            .iter()
            .map(|d| format!("{} {:?}", d.approver, d.decision))
            .collect();
        format!(
            "the deadline passed before the decisions on the case settled it ({})",
            who.join(", ")
        )
    };
    match (&spec.escalate_to, status.escalated, escalation_window) {
        (Some(to), false, Some(window)) => {
            next.state = CaseState::Escalated;
            next.escalated = true;
            next.deadline = Some(to_time(
                now + chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX),
            ));
            next.message = Some(format!("{decided}; escalated to {}", to.groups.join(", ")));
        }
        _ => {
            next.state = CaseState::Expired;
            next.message = Some(format!("{decided}; expired, which rejects"));
        }
    }
    Some(next)
}

#[cfg(test)]
mod tests;
