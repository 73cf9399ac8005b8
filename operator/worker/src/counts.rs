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
//! exact. An addition whose reply is lost is tried again under its id: the
//! stored counts keep each writer's last addition (for a day), so a repeat
//! is not counted twice however late it comes, and the broker drops one
//! within two minutes before it is even read.

use std::collections::BTreeMap;
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

/// How long the counts remember a writer's last addition: a repeat later
/// than that (a replica cut off from the broker for a day) counts again.
const WRITER_KEPT_MS: i64 = 24 * 60 * 60 * 1000;

/// The most writers remembered (the latest): a fleet restarting in a loop
/// does not grow the entry without bound within the day.
const WRITERS_KEPT: usize = 256;

/// The stored entry: the totals, and each writer's last addition.
#[derive(Default, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    counts: Counts,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    writers: BTreeMap<String, Added>,
}

/// A writer's last addition: its number, and when it was stored.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Added {
    seq: u64,
    at_ms: i64,
}

impl Stored {
    /// Add `delta` as addition `seq` of `writer`, made at `now_ms`, and
    /// forget writers not heard from for [`WRITER_KEPT_MS`]. False, and
    /// nothing changed, when that addition is in already.
    fn add(&mut self, delta: &Counts, writer: &str, seq: u64, now_ms: i64) -> bool {
        if self.writers.get(writer).is_some_and(|a| a.seq >= seq) {
            return false;
        }
        self.writers
            .retain(|w, a| w == writer || now_ms - a.at_ms < WRITER_KEPT_MS);
        self.writers
            .insert(writer.to_string(), Added { seq, at_ms: now_ms });
        while self.writers.len() > WRITERS_KEPT {
            let oldest = self
                .writers
                .iter()
                .min_by_key(|(_, a)| a.at_ms)
                .map(|(w, _)| w.clone())
                .expect("not empty");
            self.writers.remove(&oldest);
        }
        self.counts = self.counts.plus(delta);
        true
    }
}

fn parse(workflow: &str, value: &[u8]) -> Result<Stored, Error> {
    serde_json::from_slice(value)
        .map_err(|e| Error::Store(format!("the counts of {workflow} are not readable: {e}")))
}

/// The stored totals of `workflow` (zero when none were stored yet).
pub async fn read(store: &kv::Store, workflow: &str) -> Result<Counts, Error> {
    match store.entry(workflow).await {
        Ok(Some(e)) if e.operation == kv::Operation::Put => Ok(parse(workflow, &e.value)?.counts),
        Ok(_) => Ok(Counts::default()),
        Err(e) => Err(Error::Store(format!(
            "failed to read the counts of {workflow}: {e}"
        ))),
    }
}

/// Add `delta` to `workflow`'s counts, once: addition `seq` of `writer`
/// (numbered from 1). Tried again after a lost reply, it is not counted
/// twice: the broker drops a second write with the same `Nats-Msg-Id`
/// within the bucket's duplicate window (two minutes), and later the
/// stored entry's record of the writer's last addition says it is in.
/// Returns the totals after it.
pub async fn add(
    js: &jetstream::Context,
    store: &kv::Store,
    workflow: &str,
    delta: &Counts,
    writer: &str,
    seq: u64,
) -> Result<Counts, Error> {
    let id = format!("counts/{workflow}/{writer}/{seq}");
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
        let (mut stored, revision) = match &entry {
            Some(e) if e.operation == kv::Operation::Put => {
                (parse(workflow, &e.value)?, e.revision)
            }
            // No entry (or a deleted one): expect the one read, or none.
            Some(e) => (Stored::default(), e.revision),
            None => (Stored::default(), 0),
        };
        let current = stored.counts;
        if !stored.add(delta, writer, seq, chrono::Utc::now().timestamp_millis()) {
            // Added before, its reply lost: `current` has it already.
            return Ok(current);
        }
        let bytes = Bytes::from(serde_json::to_vec(&stored).expect("counts serialize"));
        let publish = PublishMessage::build()
            .message_id(&id)
            .expected_last_subject_sequence(revision)
            .payload(bytes);
        let acked = match js.send_publish(subject.clone(), publish).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            // The broker dropped it as a repeat within its window: the
            // first write is in (its record lost to an older worker's
            // write) or still on its way, so `current` may be short of it
            // until the next flush.
            Ok(ack) if ack.duplicate => return Ok(current),
            Ok(_) => return Ok(stored.counts),
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

    #[test]
    fn a_writers_addition_counts_once_and_old_writers_are_forgotten() {
        let one = Counts {
            started: 1,
            ..Counts::default()
        };
        let mut stored = Stored::default();
        let day = WRITER_KEPT_MS;
        assert!(stored.add(&one, "a", 1, 0));
        assert!(stored.add(&one, "b", 1, 10));
        assert!(!stored.add(&one, "a", 1, day), "a repeat, however late");
        assert_eq!(stored.counts.started, 2);
        // A day after b's last addition, a's next one forgets b.
        assert!(stored.add(&one, "a", 2, day + 10));
        assert_eq!(stored.writers.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(stored.counts.started, 3);
        // Within the day, only the latest writers are kept.
        for w in 0..WRITERS_KEPT + 5 {
            assert!(stored.add(&one, &format!("w{w:03}"), 1, day + 20 + w as i64));
        }
        assert_eq!(stored.writers.len(), WRITERS_KEPT);
        assert!(!stored.writers.contains_key("a") && !stored.writers.contains_key("w000"));
        assert!(
            stored
                .writers
                .contains_key(&format!("w{:03}", WRITERS_KEPT + 4))
        );
        // What older workers wrote (no writers) reads, and what this one
        // writes reads as counts for them.
        let old: Stored = serde_json::from_str(
            r#"{"started":4,"completed":1,"rejected":0,"failed":0,"exceptions":0}"#,
        )
        .unwrap();
        assert!(old.writers.is_empty());
        let text = serde_json::to_string(&stored).unwrap();
        assert_eq!(
            serde_json::from_str::<Counts>(&text).unwrap(),
            stored.counts
        );
    }
}
