//! Instance counters of a workflow across every replica and restart: what
//! `kubectl get workflow` shows in `status.instances`.
//!
//! ```text
//! replica ─count() after each stored transition─▶ Stats (in memory)
//!         ─every second: the change since the last flush─▶ KV tallyman_<ns>_counts[<workflow>]  (CAS add, with an id)
//!         ─at most every 5 s, in a cluster─▶ Workflow status.instances (merge patch, when it changed)
//! ```
//!
//! A transition is counted once: after the compare-and-set that stored it
//! succeeded. A replica killed between that and its next flush loses up to
//! a second of counts (the instances are not lost, only counted short), so the
//! numbers are for operating, not for accounting; the audit stream is
//! exact. An addition whose reply is lost is tried again under its id, which
//! the broker deduplicates for two minutes: not counted twice.

use std::sync::atomic::Ordering;

use async_nats::jetstream::{self, context::PublishErrorKind, kv, message::PublishMessage};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::runtime::Stats;

/// Totals since the workflow was first deployed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub started: u64,
    pub completed: u64,
    pub rejected: u64,
    pub failed: u64,
    /// Cases opened.
    pub exceptions: u64,
}

impl Counts {
    /// Started and not ended.
    pub fn running(&self) -> u64 {
        self.started
            .saturating_sub(self.completed + self.rejected + self.failed)
    }

    /// What this process counted so far.
    pub fn of(stats: &Stats) -> Counts {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            started: get(&stats.started),
            completed: get(&stats.completed),
            rejected: get(&stats.rejected),
            failed: get(&stats.failed),
            exceptions: get(&stats.exceptions),
        }
    }

    /// `self - earlier`, field by field.
    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            started: self.started - earlier.started,
            completed: self.completed - earlier.completed,
            rejected: self.rejected - earlier.rejected,
            failed: self.failed - earlier.failed,
            exceptions: self.exceptions - earlier.exceptions,
        }
    }

    pub fn plus(&self, other: &Counts) -> Counts {
        Counts {
            started: self.started + other.started,
            completed: self.completed + other.completed,
            rejected: self.rejected + other.rejected,
            failed: self.failed + other.failed,
            exceptions: self.exceptions + other.exceptions,
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Counts::default()
    }
}

const ATTEMPTS: usize = 32;

/// The stored totals of `workflow` (zero when none were stored yet).
pub async fn read(store: &kv::Store, workflow: &str) -> Result<Counts, Error> {
    match store.entry(workflow).await {
        Ok(Some(e)) if e.operation == kv::Operation::Put => serde_json::from_slice(&e.value)
            .map_err(|e| Error::Store(format!("the counts of {workflow} are not readable: {e}"))),
        Ok(_) => Ok(Counts::default()),
        Err(e) => Err(Error::Store(format!(
            "failed to read the counts of {workflow}: {e}"
        ))),
    }
}

/// Add `delta` to `workflow`'s counts, once: `id` names this addition, and
/// the broker drops a second write with the same `Nats-Msg-Id` within the
/// bucket's duplicate window (two minutes). An addition whose reply was
/// lost, tried again under its id, is not counted twice. Returns the
/// totals after it.
pub async fn add(
    js: &jetstream::Context,
    store: &kv::Store,
    workflow: &str,
    delta: &Counts,
    id: &str,
) -> Result<Counts, Error> {
    // What kv::Store::update publishes, with the message id besides.
    let subject = format!(
        "{}{workflow}",
        store.put_prefix.as_deref().unwrap_or(&store.prefix)
    );
    for _ in 0..ATTEMPTS {
        let entry = store
            .entry(workflow)
            .await
            .map_err(|e| Error::Store(format!("failed to read the counts of {workflow}: {e}")))?;
        let (current, revision) = match &entry {
            Some(e) if e.operation == kv::Operation::Put => (
                serde_json::from_slice::<Counts>(&e.value).map_err(|e| {
                    Error::Store(format!("the counts of {workflow} are not readable: {e}"))
                })?,
                e.revision,
            ),
            // No entry (or a deleted one): expect the one read, or none.
            Some(e) => (Counts::default(), e.revision),
            None => (Counts::default(), 0),
        };
        let next = current.plus(delta);
        let bytes = Bytes::from(serde_json::to_vec(&next).expect("counts serialize"));
        let publish = PublishMessage::build()
            .message_id(id)
            .expected_last_subject_sequence(revision)
            .payload(bytes);
        let acked = match js.send_publish(subject.clone(), publish).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            // Added before, its reply lost: `current` has it already.
            Ok(ack) if ack.duplicate => return Ok(current),
            Ok(_) => return Ok(next),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
            Err(e) => {
                return Err(Error::Store(format!(
                    "failed to store the counts of {workflow}: {e}"
                )));
            }
        }
    }
    Err(Error::Store(format!(
        "the counts of {workflow} keep changing under us"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_is_what_started_and_did_not_end() {
        let c = Counts {
            started: 10,
            completed: 6,
            rejected: 1,
            failed: 1,
            exceptions: 3,
        };
        assert_eq!(c.running(), 2);
        let later = Counts {
            started: 12,
            completed: 9,
            ..c
        };
        assert_eq!(
            later.since(&c),
            Counts {
                started: 2,
                completed: 3,
                ..Counts::default()
            }
        );
        assert!(c.since(&c).is_zero());
        assert_eq!(c.plus(&later.since(&c)), later);
    }
}
