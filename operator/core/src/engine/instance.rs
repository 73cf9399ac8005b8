//! The durable state of one workflow instance, stored as one JSON document
//! per instance key (JetStream KV, compare-and-set on its revision).
//!
//! Event data, responses and variables are kept as JSON text written by
//! [`crate::cel::json`], so every decimal keeps its digits across restarts.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use tallyman_api::v1alpha1::Approvers;

use crate::audit::{AuditRecord, GENESIS};

/// How many applied event ids an instance remembers for deduplication.
pub const APPLIED_IDS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Running,
    Completed,
    Rejected,
    Failed,
}

/// A canonical event, as the gateway publishes it (CloudEvents attribute names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub time: String,
    /// The event's data as JSON text.
    pub data: String,
}

/// `<namespace>/<workflow>/<key>`: the prefix of every identity an
/// instance produces (message ids of its emits, audit batches, timers).
pub fn id_prefix(namespace: &str, workflow: &str, key: &str) -> String {
    format!("{namespace}/{workflow}/{key}")
}

/// The identity under which an event is deduplicated, by the broker
/// (`Nats-Msg-Id`) and by the instance: its `id` within its `source`, as
/// CloudEvents defines identity. Two systems may well use the same id for
/// different events; `source` (`<namespace>/<connector>`) never contains `|`.
pub fn dedup_key(source: &str, id: &str) -> String {
    format!("{source}|{id}")
}

impl Event {
    pub fn dedup_key(&self) -> String {
        dedup_key(&self.source, &self.id)
    }
}

/// What an instance waits for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "for")]
pub enum Wait {
    /// The events of an `await` step; `timer` is set when it has a timeout.
    Events { timer: Option<String> },
    /// A `wait` step's timer.
    Timer { timer: String },
    /// People deciding a case.
    Case { name: String, during: Phase },
    /// A failed call waiting for a person to retry (approve) or give up (reject).
    FailedCall { case: String },
}

/// Where in a step an approval stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// The step is an `approval` step.
    Step,
    /// The approval of the step's `onFalse` route.
    OnFalse,
    /// The approval of the step's `await.onTimeout` route.
    OnTimeout,
    /// The approval of the step's `call.onFailure` route.
    OnFailure,
}

/// Work to do after the state that produced it is stored: publish, open,
/// schedule. Each item has a deterministic identity, so doing it twice after
/// a crash is harmless.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "do")]
pub enum Outbound {
    Emit {
        msg_id: String,
        #[serde(rename = "type")]
        type_: String,
        /// JSON text of the event's data.
        data: String,
    },
    Audit(Box<AuditRecord>),
    OpenCase(Box<CaseRequest>),
    /// Wake the instance at `due_ms` (its earliest armed timer). One
    /// schedule per instance, replaced as its timers change.
    Wake {
        due_ms: i64,
    },
    /// Remove the instance's schedule: it ended. A wake-up nobody needs
    /// would otherwise fire hours later, and be stored until then.
    CancelWake,
    DeadLetter {
        msg_id: String,
        step: String,
        reason: String,
    },
}

/// A case the instance asks people to decide.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseRequest {
    pub name: String,
    pub workflow: String,
    pub key: String,
    pub revision: String,
    pub reason: String,
    /// Facts as JSON; decimals as strings, so nothing reads them as floats.
    pub facts: serde_json::Map<String, serde_json::Value>,
    pub initiator: String,
    pub policy: String,
    pub rule: String,
    pub required: Approvers,
    pub exclude_initiator: bool,
    pub distinct_approvers: bool,
    pub deadline_ms: Option<i64>,
    pub escalate_to: Option<Approvers>,
    /// How long an escalated case may stay open (the policy's `expiry.after`).
    pub escalation_window_ms: Option<u64>,
    /// Whether the instance waits for the case (an SLA breach case does not).
    pub blocking: bool,
}

/// One workflow instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub key: String,
    pub revision: String,
    pub status: Status,
    /// Index of the current step; equal to the number of steps when done.
    pub step: usize,
    pub wait: Option<Wait>,
    /// The latest event of each type.
    pub events: BTreeMap<String, Event>,
    /// The type of the event that last woke the instance (`event` in CEL).
    pub woke_by: Option<String>,
    /// The [`dedup_key`]s of recently applied events, oldest first.
    pub applied: VecDeque<String>,
    /// Call step name → JSON text `{"status", "headers", "body"}`.
    pub responses: BTreeMap<String, String>,
    /// Variable name → JSON text.
    pub vars: BTreeMap<String, String>,
    pub started_ms: i64,
    pub updated_ms: i64,
    pub sla_due_ms: Option<i64>,
    pub sla_timer: Option<String>,
    pub sla_breached: bool,
    /// The case opened for the breached SLA (`onBreach: Exception`), until
    /// its decision is recorded in the instance's audit chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla_case: Option<String>,
    /// Armed timers: token → due time (unix ms).
    #[serde(default)]
    pub timers: BTreeMap<String, i64>,
    /// The wake-up currently scheduled with the broker.
    #[serde(default)]
    pub wake_ms: Option<i64>,
    /// A wake-up the instance no longer needs may still be scheduled: it
    /// stopped needing one while running (see [`Instance::settle_wake`]),
    /// and it has not fired since. Removed when the instance ends.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wake_left: bool,
    /// Counter behind timer tokens, emit ids and case names.
    pub seq: u64,
    pub audit_seq: u64,
    pub audit_hash: std::sync::Arc<str>,
    /// Why the instance ended, when it did not complete.
    pub outcome: Option<String>,
    pub outbox: Vec<Outbound>,
    /// The audit records of the outbox as the one message that carries
    /// them, see [`Instance::seal_audits`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_batch: Option<AuditBatch>,
    /// The broker messages this commit applied, when they came from one
    /// consumer: a worker acknowledges them only after publishing the
    /// outbox, so once the consumer has acknowledged them all the outbox
    /// needs no publishing again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered: Option<Delivered>,
}

/// Where the messages of a commit came from: their consumer, and the
/// stream sequence of the last of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivered {
    pub consumer: String,
    pub stream_seq: u64,
}

/// The audit records of one commit as the message that publishes them: a
/// JSON array in chain order, written once, stored with the instance as it
/// is and published byte for byte.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditBatch {
    pub msg_id: String,
    pub records: Box<serde_json::value::RawValue>,
}

impl PartialEq for AuditBatch {
    fn eq(&self, other: &Self) -> bool {
        self.msg_id == other.msg_id && self.records.get() == other.records.get()
    }
}

impl Instance {
    pub fn new(key: &str, revision: &str, now_ms: i64) -> Self {
        Self {
            key: key.to_string(),
            revision: revision.to_string(),
            status: Status::Running,
            step: 0,
            wait: None,
            events: BTreeMap::new(),
            woke_by: None,
            applied: VecDeque::new(),
            responses: BTreeMap::new(),
            vars: BTreeMap::new(),
            started_ms: now_ms,
            updated_ms: now_ms,
            sla_due_ms: None,
            sla_timer: None,
            sla_breached: false,
            sla_case: None,
            timers: BTreeMap::new(),
            wake_ms: None,
            wake_left: false,
            seq: 0,
            audit_seq: 0,
            audit_hash: GENESIS.into(),
            outcome: None,
            outbox: Vec::new(),
            audit_batch: None,
            delivered: None,
        }
    }

    /// Forget the outbox of the last commit (it is published) before the
    /// next input.
    pub fn clear_outbox(&mut self) {
        self.outbox.clear();
        self.audit_batch = None;
    }

    /// Move the outbox's audit records into one [`AuditBatch`] with the
    /// message id `<id_prefix>/audit/<first seq>-<last seq>`, so they are
    /// serialized once for the store and the audit stream together.
    pub fn seal_audits(&mut self, id_prefix: &str) -> Result<(), serde_json::Error> {
        let mut records = Vec::new();
        for item in std::mem::take(&mut self.outbox) {
            match item {
                Outbound::Audit(r) => records.push(r),
                other => self.outbox.push(other),
            }
        }
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let msg_id = format!("{id_prefix}/audit/{}-{}", first.seq, last.seq);
        self.audit_batch = Some(AuditBatch {
            msg_id,
            records: serde_json::value::to_raw_value(&records)?,
        });
        Ok(())
    }

    /// Settle the wake-up of the inputs applied since the commit that left
    /// `scheduled` with the broker: the outbox ends up with one `Wake` when
    /// the instance needs another, `CancelWake` when it ended with one
    /// scheduled (or left), and nothing when the schedule stays as it is.
    /// A running instance that needs none any more leaves its schedule to
    /// fire into nothing ([`Instance::wake_left`]): removing it could race a
    /// replica that has armed a newer one on the same subject since, and
    /// remove that one instead. `fired`: the scheduled wake-up is one of
    /// the inputs, so nothing is left scheduled.
    pub fn settle_wake(&mut self, scheduled: Option<i64>, fired: bool) {
        self.outbox
            .retain(|o| !matches!(o, Outbound::Wake { .. } | Outbound::CancelWake));
        if fired {
            self.wake_left = false;
        }
        let left = scheduled.is_some() || self.wake_left;
        match self.wake_ms {
            Some(due_ms) if scheduled != Some(due_ms) => {
                // Replaces whatever the subject held.
                self.outbox.push(Outbound::Wake { due_ms });
                self.wake_left = false;
            }
            Some(_) => {}
            None if !self.is_running() => {
                if left {
                    self.outbox.push(Outbound::CancelWake);
                }
                self.wake_left = false;
            }
            None => self.wake_left = left,
        }
    }

    /// Whether an event with this [`dedup_key`] was applied already.
    pub fn has_applied(&self, key: &str) -> bool {
        self.applied.iter().any(|a| a == key)
    }

    pub fn is_running(&self) -> bool {
        self.status == Status::Running
    }

    pub(crate) fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}
