//! Cases as `ExceptionCase`s in the cluster.
//!
//! ```text
//! worker: create ExceptionCase (spec written once; blocking and escalation window as annotations)
//!         + status {state: Open, deadline}
//! approver: kubectl tallyman approve → one decision appended to spec.decisions
//!           (the chart's admission policy checks who may)
//! worker (watch): settle() the decisions against the policy → status {state, approvals, …}
//!                 a final case → resume the instance → condition Resumed=True
//! ```
//!
//! Status writes carry the resourceVersion they were computed from, so two
//! replicas settling the same change cannot overwrite each other: the loser
//! gets a conflict and the next watch event shows it the winner's status.
//!
//! The replica whose status write wins also records the change as an Event
//! on the ExceptionCase (`Approved`, `Rejected`, `Escalated`, `Expired`,
//! `Resumed`), so `kubectl describe exceptioncase` tells its story.

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::Resource;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::{WatchStreamExt, watcher};
use tallyman_api::v1alpha1::{CaseDecision, CaseState, ExceptionCase, ExceptionCaseStatus};
use tallyman_core::engine::CaseRequest;
use tallyman_core::policy;

use super::{BoxFuture, CaseRecord, CaseStore, DecideError};
use crate::Error;

/// Label of every case with the workflow that opened it.
pub const WORKFLOW_LABEL: &str = "tallyman.dev/workflow";
const BLOCKING_ANNOTATION: &str = "tallyman.dev/blocking";
const WINDOW_ANNOTATION: &str = "tallyman.dev/escalation-window-ms";
/// Status condition set once the instance took the outcome.
pub const RESUMED: &str = "Resumed";
const ATTEMPTS: usize = 8;

/// The ExceptionCases of one namespace.
#[derive(Clone)]
pub struct KubeCases {
    api: Api<ExceptionCase>,
    namespace: String,
    recorder: Recorder,
}

fn store(what: &str, e: kube::Error) -> Error {
    Error::Store(format!("failed to {what}: {e}"))
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl KubeCases {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            recorder: crate::notices::recorder(client.clone()),
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
        }
    }

    /// Records the change from `before` to the `written` case as an Event
    /// on it, in a task of its own (best effort: a failure is logged).
    fn tell(&self, before: &CaseRecord, written: &ExceptionCase) {
        let after = written.status.clone().unwrap_or_default();
        let Some(event) = transition(&before.status, &after) else {
            return;
        };
        crate::notices::publish_later(&self.recorder, event, written.object_ref(&()));
    }

    /// The ExceptionCase a new case becomes.
    pub fn to_object(record: &CaseRecord) -> ExceptionCase {
        let mut annotations = std::collections::BTreeMap::new();
        annotations.insert(BLOCKING_ANNOTATION.to_string(), record.blocking.to_string());
        if let Some(ms) = record.escalation_window_ms {
            annotations.insert(WINDOW_ANNOTATION.to_string(), ms.to_string());
        }
        let labels = [
            (WORKFLOW_LABEL, record.spec.workflow.as_str()),
            ("app.kubernetes.io/managed-by", "tallyman"),
            ("app.kubernetes.io/part-of", "tallyman"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        ExceptionCase {
            metadata: ObjectMeta {
                name: Some(record.name.clone()),
                namespace: Some(record.namespace.clone()),
                labels: Some(labels),
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: record.spec.clone(),
            status: Some(record.status.clone()),
        }
    }

    /// The worker's view of a stored ExceptionCase.
    pub fn to_record(obj: &ExceptionCase) -> CaseRecord {
        let annotations = obj.metadata.annotations.clone().unwrap_or_default();
        let status = obj.status.clone().unwrap_or_default();
        let resumed = resumed(&status);
        CaseRecord {
            name: obj.metadata.name.clone().unwrap_or_default(),
            namespace: obj.metadata.namespace.clone().unwrap_or_default(),
            opened: obj
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| serde_json::to_value(t).ok())
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            spec: obj.spec.clone(),
            status,
            blocking: annotations
                .get(BLOCKING_ANNOTATION)
                .is_none_or(|v| v != "false"),
            escalation_window_ms: annotations
                .get(WINDOW_ANNOTATION)
                .and_then(|v| v.parse().ok()),
            resumed,
        }
    }

    /// Write `status` over the stored one, if the object is still at the
    /// revision `obj` was read at.
    async fn write_status(
        &self,
        mut obj: ExceptionCase,
        status: ExceptionCaseStatus,
    ) -> Result<ExceptionCase, kube::Error> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        obj.status = Some(status);
        self.api
            .replace_status(&name, &PostParams::default(), &obj)
            .await
    }

    /// Read, change the status with `change` (`None`: nothing to do),
    /// write; again on a conflict.
    async fn update_status(
        &self,
        name: &str,
        mut change: impl FnMut(&CaseRecord) -> Option<ExceptionCaseStatus>,
    ) -> Result<Option<CaseRecord>, Error> {
        for _ in 0..ATTEMPTS {
            let Some(obj) = self
                .api
                .get_opt(name)
                .await
                .map_err(|e| store(&format!("read case {name}"), e))?
            else {
                return Ok(None);
            };
            let before = Self::to_record(&obj);
            let Some(status) = change(&before) else {
                return Ok(None);
            };
            match self.write_status(obj, status).await {
                Ok(written) => {
                    self.tell(&before, &written);
                    return Ok(Some(Self::to_record(&written)));
                }
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(store(&format!("update case {name}"), e)),
            }
        }
        Err(Error::Store(format!("case {name} keeps changing under us")))
    }

    async fn open(&self, req: &CaseRequest, now: DateTime<Utc>) -> Result<CaseRecord, Error> {
        let record = CaseRecord::opened(req, &self.namespace, now);
        let obj = match self
            .api
            .create(&PostParams::default(), &Self::to_object(&record))
            .await
        {
            Ok(created) => created,
            Err(kube::Error::Api(s)) if s.code == 409 => self
                .api
                .get(&record.name)
                .await
                .map_err(|e| store(&format!("read case {}", record.name), e))?,
            Err(e) => return Err(store(&format!("open case {}", record.name), e)),
        };
        // The API server drops the status of a create: write it, unless
        // an earlier attempt (or another replica) already did.
        if obj.status.as_ref().is_some_and(|s| s.deadline.is_some())
            || record.status.deadline.is_none()
        {
            return Ok(Self::to_record(&obj));
        }
        let written = self
            .update_status(&record.name, |stored| {
                (stored.status.deadline.is_none()).then(|| record.status.clone())
            })
            .await?;
        match written {
            Some(r) => Ok(r),
            None => self
                .get(&record.name)
                .await?
                .ok_or_else(|| Error::Store(format!("case {} vanished", record.name))),
        }
    }

    async fn get(&self, name: &str) -> Result<Option<CaseRecord>, Error> {
        Ok(self
            .api
            .get_opt(name)
            .await
            .map_err(|e| store(&format!("read case {name}"), e))?
            .as_ref()
            .map(Self::to_record))
    }

    async fn list(&self) -> Result<Vec<CaseRecord>, Error> {
        let mut out: Vec<CaseRecord> = self
            .api
            .list(&ListParams::default())
            .await
            .map_err(|e| store("list cases", e))?
            .items
            .iter()
            .map(Self::to_record)
            .collect();
        out.sort_by(|a, b| a.opened.cmp(&b.opened).then(a.name.cmp(&b.name)));
        Ok(out)
    }

    /// Append a decision as a trusted caller (tests, tools that have
    /// already authenticated the approver), then settle the case. People
    /// decide with `kubectl tallyman`, through the admission policy.
    async fn decide(
        &self,
        name: &str,
        decision: CaseDecision,
        now: DateTime<Utc>,
    ) -> Result<CaseRecord, DecideError> {
        for _ in 0..ATTEMPTS {
            let Some(obj) = self
                .api
                .get_opt(name)
                .await
                .map_err(|e| store(&format!("read case {name}"), e))?
            else {
                return Err(DecideError::NotFound(name.to_string()));
            };
            let record = Self::to_record(&obj);
            let status = policy::expire(&record.spec, &record.status, record.window(), now)
                .unwrap_or_else(|| record.status.clone());
            policy::admit(&record.spec, &status, &decision).map_err(DecideError::Refused)?;
            let seen = serde_json::to_value(&record.spec.decisions).unwrap_or_default();
            let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
                {"op": "test", "path": "/spec/decisions", "value": seen},
                {"op": "add", "path": "/spec/decisions/-", "value": decision},
            ]))
            .expect("a JSON patch of two operations");
            match self
                .api
                .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
                .await
            {
                Ok(_) => {}
                // Someone else decided in between: judge this one again.
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 422 => continue,
                Err(e) => return Err(store(&format!("decide case {name}"), e).into()),
            }
            return match self.settle(name, now).await? {
                Some(r) => Ok(r),
                None => Ok(self
                    .get(name)
                    .await?
                    .ok_or_else(|| DecideError::NotFound(name.to_string()))?),
            };
        }
        Err(Error::Store(format!("case {name} keeps changing under us")).into())
    }

    /// Bring the status in line with the decisions (and a passed
    /// deadline). Returns the case when its status changed.
    pub async fn settle(
        &self,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<CaseRecord>, Error> {
        self.update_status(name, |r| settle(r, now)).await
    }

    async fn expire(&self, name: &str, now: DateTime<Utc>) -> Result<Option<CaseRecord>, Error> {
        self.update_status(name, |r| {
            policy::expire(&r.spec, &r.status, r.window(), now)
        })
        .await
    }

    async fn mark_resumed(&self, name: &str) -> Result<(), Error> {
        self.update_status(name, |r| {
            if r.resumed {
                return None;
            }
            let mut status = r.status.clone();
            status.conditions.retain(|c| c.type_ != RESUMED);
            status.conditions.push(Condition {
                type_: RESUMED.into(),
                status: "True".into(),
                reason: "InstanceResumed".into(),
                message: format!(
                    "instance {} of {} took the outcome {:?}",
                    r.spec.key, r.spec.workflow, r.status.state
                ),
                last_transition_time: policy::to_time(Utc::now()),
                observed_generation: None,
            });
            Some(status)
        })
        .await
        .map(|_| ())
    }

    /// Cases as they change. An open case whose decisions add up to an
    /// outcome is settled here first; the write comes back as the next
    /// change, final, and goes to the worker.
    fn records(&self) -> BoxStream<'static, CaseRecord> {
        let this = self.clone();
        watcher(self.api.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .filter_map(move |obj| {
                let this = this.clone();
                async move {
                    let obj = match obj {
                        Ok(obj) => obj,
                        Err(e) => {
                            tracing::warn!(error = %e, "watching ExceptionCases failed; retrying");
                            return None;
                        }
                    };
                    let record = Self::to_record(&obj);
                    if record.is_final() {
                        return Some(record);
                    }
                    if let Some(status) = settle(&record, Utc::now()) {
                        match this.write_status(obj, status).await {
                            Ok(written) => this.tell(&record, &written),
                            // A conflict: another replica wrote first; its
                            // write is the next change seen here.
                            Err(e) if is_conflict(&e) => {}
                            Err(e) => tracing::warn!(
                                case = %record.name,
                                error = %e,
                                "failed to record the decisions' outcome"
                            ),
                        }
                    }
                    None
                }
            })
            .boxed()
    }
}

/// Whether the instance has taken the case's outcome.
fn resumed(status: &ExceptionCaseStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == RESUMED && c.status == "True")
}

/// The Event a case's status change makes, if any: a new state, or the
/// instance having taken the outcome. Pure.
pub fn transition(before: &ExceptionCaseStatus, after: &ExceptionCaseStatus) -> Option<Event> {
    let message = after.message.clone();
    let (type_, reason, action, note) = if after.state != before.state {
        match after.state {
            CaseState::Approved => (EventType::Normal, "Approved", "Decide", message),
            CaseState::Rejected => (EventType::Normal, "Rejected", "Decide", message),
            CaseState::Escalated => (EventType::Warning, "Escalated", "Expire", message),
            CaseState::Expired => (EventType::Warning, "Expired", "Expire", message),
            CaseState::Open => return None,
        }
    } else if resumed(after) && !resumed(before) {
        let note = after
            .conditions
            .iter()
            .find(|c| c.type_ == RESUMED)
            .map(|c| c.message.clone());
        (EventType::Normal, "Resumed", "Resume", note)
    } else {
        return None;
    };
    Some(Event {
        type_,
        reason: reason.into(),
        note,
        action: action.into(),
        secondary: None,
    })
}

/// The status the recorded decisions (and the clock) give an open case, or
/// `None` when it stays as it is.
///
/// Decisions arrive through the admission policy, which checks the same
/// rules; they are replayed through `policy::admit` anyway, so a decision
/// that slipped past it (the policy not installed, a create with decisions
/// in it) does not count. Such a decision is named in the status message.
pub fn settle(record: &CaseRecord, now: DateTime<Utc>) -> Option<ExceptionCaseStatus> {
    if record.is_final() {
        return None;
    }
    let mut status = policy::expire(&record.spec, &record.status, record.window(), now)
        .unwrap_or_else(|| record.status.clone());
    if !policy::is_open(&status) {
        // Expired: decisions no longer count.
        return Some(status);
    }
    let mut admitted = record.spec.clone();
    admitted.decisions.clear();
    let mut ignored = Vec::new();
    for d in &record.spec.decisions {
        match policy::admit(&admitted, &status, d) {
            Ok(()) => admitted.decisions.push(d.clone()),
            Err(refusal) => ignored.push(format!("{}: {refusal}", d.approver)),
        }
    }
    let (state, approvals) = policy::tally(&admitted, &status);
    let message = if ignored.is_empty() {
        None
    } else {
        Some(format!("decisions not counted: {}", ignored.join("; ")))
    };
    if state == status.state
        && approvals == status.approvals
        && (message.is_none() || message == status.message)
    {
        return (status != record.status).then_some(status);
    }
    if state != status.state {
        status.resolved_at = Some(policy::to_time(now));
        let by = admitted
            .decisions
            .last()
            .map(|d| d.approver.clone())
            .unwrap_or_default();
        status.message = Some(match &message {
            Some(m) => format!("{state:?} by {by}; {m}"),
            None => format!("{state:?} by {by}"),
        });
    } else if message.is_some() {
        status.message = message;
    }
    status.state = state;
    status.approvals = approvals;
    Some(status)
}

impl CaseStore for KubeCases {
    fn open<'a>(
        &'a self,
        req: &'a CaseRequest,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<CaseRecord, Error>> {
        Box::pin(KubeCases::open(self, req, now))
    }

    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<CaseRecord>, Error>> {
        Box::pin(KubeCases::get(self, name))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<CaseRecord>, Error>> {
        Box::pin(KubeCases::list(self))
    }

    fn decide<'a>(
        &'a self,
        name: &'a str,
        decision: CaseDecision,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<CaseRecord, DecideError>> {
        Box::pin(KubeCases::decide(self, name, decision, now))
    }

    fn expire<'a>(
        &'a self,
        name: &'a str,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Option<CaseRecord>, Error>> {
        Box::pin(KubeCases::expire(self, name, now))
    }

    fn mark_resumed<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(KubeCases::mark_resumed(self, name))
    }

    fn watch(&self) -> BoxFuture<'_, Result<BoxStream<'static, CaseRecord>, Error>> {
        Box::pin(async move { Ok(self.records()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: CaseState, message: &str) -> ExceptionCaseStatus {
        ExceptionCaseStatus {
            state,
            message: Some(message.into()),
            ..Default::default()
        }
    }

    fn told(
        before: &ExceptionCaseStatus,
        after: &ExceptionCaseStatus,
    ) -> Option<(String, String, String)> {
        transition(before, after).map(|e| {
            let kind = match e.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            };
            (kind.to_string(), e.reason, e.note.unwrap_or_default())
        })
    }

    #[test]
    fn each_outcome_and_the_resumption_is_told_once() {
        let open = ExceptionCaseStatus::default();
        let approved = status(CaseState::Approved, "Approved by alice");
        assert_eq!(
            told(&open, &approved),
            Some((
                "Normal".into(),
                "Approved".into(),
                "Approved by alice".into()
            ))
        );
        let escalated = status(
            CaseState::Escalated,
            "no decision within the deadline; escalated to cfo",
        );
        assert_eq!(told(&open, &escalated).unwrap().1, "Escalated");
        assert_eq!(told(&open, &escalated).unwrap().0, "Warning");
        assert_eq!(
            told(&escalated, &status(CaseState::Expired, "expired"))
                .unwrap()
                .1,
            "Expired"
        );
        assert_eq!(
            told(&open, &status(CaseState::Rejected, "Rejected by bob"))
                .unwrap()
                .1,
            "Rejected"
        );
        // A status written again, or a decision that did not count: nothing.
        assert_eq!(told(&approved, &approved), None);
        assert_eq!(
            told(&open, &status(CaseState::Open, "decisions not counted: x")),
            None
        );

        let mut taken = approved.clone();
        taken.conditions.push(Condition {
            type_: RESUMED.into(),
            status: "True".into(),
            reason: "InstanceResumed".into(),
            message: "instance 4800 of shipment-to-invoice took the outcome Approved".into(),
            last_transition_time: policy::to_time(Utc::now()),
            observed_generation: None,
        });
        assert_eq!(
            told(&approved, &taken),
            Some((
                "Normal".into(),
                "Resumed".into(),
                "instance 4800 of shipment-to-invoice took the outcome Approved".into()
            ))
        );
        assert_eq!(told(&taken, &taken), None);
    }
}
