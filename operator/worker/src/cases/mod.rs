//! Exception cases: where an instance waits for people.
//!
//! ```text
//! worker ─open─▶ CaseStore ◀─decisions─ people (dev API / kubectl + admission policy)
//!   ▲                │
//!   └── watch: a decided, expired or escalated case resumes its instance
//! ```
//!
//! Two stores with one contract: [`KvCases`] keeps a JSON record per case in
//! a JetStream KV bucket (dev mode, tests, installations without a cluster
//! API); [`KubeCases`] keeps each case as an `ExceptionCase` in the cluster,
//! where approvers decide with `kubectl tallyman` and the admission policy
//! checks who they are. Both judge decisions with the same policy engine
//! (`tallyman_core::policy`).

mod kube;
mod kv;

use std::future::Future;
use std::pin::Pin;

use chrono::{DateTime, Utc};
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tallyman_api::v1alpha1::{
    CaseDecision, CaseSegregation, CaseState, ExceptionCaseSpec, ExceptionCaseStatus,
};
use tallyman_core::engine::CaseRequest;
use tallyman_core::policy::{self, Refusal};

pub use self::kube::{KubeCases, settle};
pub use kv::KvCases;

use crate::Error;

/// A case as the worker sees it: the ExceptionCase spec and status, plus
/// what the worker needs to resume the instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseRecord {
    pub name: String,
    pub namespace: String,
    pub opened: String,
    pub spec: ExceptionCaseSpec,
    pub status: ExceptionCaseStatus,
    /// Whether the instance waits for this case.
    pub blocking: bool,
    pub escalation_window_ms: Option<u64>,
    /// Set once the instance has taken the outcome.
    #[serde(default)]
    pub resumed: bool,
}

impl CaseRecord {
    pub fn is_final(&self) -> bool {
        !policy::is_open(&self.status)
    }

    pub fn approved(&self) -> bool {
        self.status.state == CaseState::Approved
    }

    /// The case a request opens, as first stored.
    pub fn opened(req: &CaseRequest, namespace: &str, now: DateTime<Utc>) -> CaseRecord {
        let deadline = req
            .deadline_ms
            .and_then(DateTime::<Utc>::from_timestamp_millis)
            .map(policy::to_time);
        CaseRecord {
            name: req.name.clone(),
            namespace: namespace.to_string(),
            opened: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            spec: ExceptionCaseSpec {
                workflow: req.workflow.clone(),
                key: req.key.clone(),
                revision: req.revision.clone(),
                reason: req.reason.clone(),
                facts: req.facts.clone(),
                initiator: req.initiator.clone(),
                policy: req.policy.clone(),
                rule: req.rule.clone(),
                required: req.required.clone(),
                segregation_of_duties: CaseSegregation {
                    exclude_initiator: req.exclude_initiator,
                    distinct_approvers: req.distinct_approvers,
                },
                deadline: deadline.clone(),
                escalate_to: req.escalate_to.clone(),
                decisions: Vec::new(),
            },
            status: ExceptionCaseStatus {
                deadline,
                ..Default::default()
            },
            blocking: req.blocking,
            escalation_window_ms: req.escalation_window_ms,
            resumed: false,
        }
    }

    fn window(&self) -> Option<std::time::Duration> {
        self.escalation_window_ms
            .map(std::time::Duration::from_millis)
    }
}

/// Why a decision did not go through.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("no case named {0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(Refusal),
    #[error(transparent)]
    Store(#[from] Error),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a namespace's cases live.
pub trait CaseStore: Send + Sync {
    /// Record a new case; opening the same case twice is a no-op that
    /// returns the stored one.
    fn open<'a>(
        &'a self,
        req: &'a CaseRequest,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<CaseRecord, Error>>;

    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<CaseRecord>, Error>>;

    /// Every case of the namespace, oldest first.
    fn list(&self) -> BoxFuture<'_, Result<Vec<CaseRecord>, Error>>;

    /// Add one person's decision, if the policy admits it, and tally. The
    /// caller vouches for the approver's identity.
    fn decide<'a>(
        &'a self,
        name: &'a str,
        decision: CaseDecision,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<CaseRecord, DecideError>>;

    /// Apply the deadline: escalate or expire. Returns the case when it changed.
    fn expire<'a>(
        &'a self,
        name: &'a str,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Option<CaseRecord>, Error>>;

    /// Note that the instance took the case's outcome.
    fn mark_resumed<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>>;

    /// Every case as stored now, then every change, for as long as the
    /// stream is polled: a final case the instance has not taken yet is
    /// what the worker acts on.
    fn watch(&self) -> BoxFuture<'_, Result<BoxStream<'static, CaseRecord>, Error>>;
}
