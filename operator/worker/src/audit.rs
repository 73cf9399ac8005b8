//! Reading the audit stream back, for `tallyman audit verify`.

use std::ops::RangeInclusive;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use tallyman_core::audit::AuditRecord;

use crate::Error;
use crate::names::Names;

/// What the audit stream holds, as read back.
#[derive(Debug, Default)]
pub struct Trail {
    /// Every audit record, in stream order.
    pub records: Vec<AuditRecord>,
    /// Messages that do not parse, with their stream sequence: a verifier
    /// counts them as modified.
    pub unreadable: Vec<(u64, String)>,
    /// Stream sequences with no message: removed from the stream. A chain
    /// shows a removed record as a gap, except when the removed message held
    /// the whole chain (an instance that ran to its end in one commit), so
    /// the stream's own sequence is checked too.
    pub removed: Vec<RangeInclusive<u64>>,
    /// The stream was created later than the namespace's audit stream was
    /// first: it was deleted and made again, and every record from before
    /// is gone. `(first, this one)`, in nanoseconds since the epoch.
    pub recreated: Option<(i128, i128)>,
    /// The stream has limits (age, count or size) and they removed its
    /// oldest messages: it now begins at this stream sequence. Chains that
    /// began before it lost their first records by retention.
    pub retained_from: Option<u64>,
}

/// The audit records of a namespace (or of one workflow), in stream order.
/// The whole stream is read either way, so a removed message is found
/// whichever workflow it belonged to.
pub async fn read(
    client: async_nats::Client,
    namespace: &str,
    workflow: Option<&str>,
) -> Result<Trail, Error> {
    let js = jetstream::new(client);
    let names = Names::new(namespace, workflow.unwrap_or("*"));
    let failed =
        |e: &dyn std::fmt::Display| Error::Store(format!("failed to read the audit stream: {e}"));
    let mut stream = js
        .get_stream(names.audit_stream())
        .await
        .map_err(|e| Error::Store(format!("no audit stream {}: {e}", names.audit_stream())))?;
    let info = stream.info().await.map_err(|e| failed(&e))?;
    let last = info.state.last_sequence;
    // The stream keeps every message unless it was given limits; with
    // limits, old messages leave from the front and only gaps after the
    // first count.
    let unlimited = info.config.max_age.is_zero()
        && info.config.max_messages <= 0
        && info.config.max_bytes <= 0;
    let mut expected = if unlimited {
        1
    } else {
        info.state.first_sequence
    };
    let mut trail = Trail {
        retained_from: (!unlimited && info.state.first_sequence > 1)
            .then_some(info.state.first_sequence),
        ..Trail::default()
    };
    let created = info.created.unix_timestamp_nanos();
    // Absent where the stream predates the record of its creation.
    if let Ok(counts) = js.get_key_value(names.counts_bucket()).await
        && let Ok(Some(first)) = counts.get(crate::setup::AUDIT_CREATED_KEY).await
    {
        let first: i128 = std::str::from_utf8(&first)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                Error::Store(format!(
                    "the record of when {} was created is unreadable",
                    names.audit_stream()
                ))
            })?;
        if first != created {
            trail.recreated = Some((first, created));
        }
    }
    if last == 0 {
        return Ok(trail);
    }
    let mut consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: names.audit_wildcard(),
            ..Default::default()
        })
        .await
        .map_err(|e| failed(&e))?;
    let pending = consumer.info().await.map_err(|e| failed(&e))?.num_pending;
    let mut messages = consumer.messages().await.map_err(|e| failed(&e))?;
    let wanted = workflow.map(|_| names.audit_subject());
    let mut read = 0;
    while read < pending {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
        let Ok(Some(Ok(msg))) = next else {
            return Err(Error::Store(format!(
                "the audit stream stopped answering after {read} of {pending} messages"
            )));
        };
        read += 1;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        if seq > expected {
            trail.removed.push(expected..=seq - 1);
        }
        expected = expected.max(seq + 1);
        if wanted.as_deref().is_some_and(|s| msg.subject.as_str() != s) {
            continue;
        }
        // One message holds the records of one commit, in chain order.
        match serde_json::from_slice::<Vec<AuditRecord>>(&msg.payload) {
            Ok(batch) => trail.records.extend(batch),
            Err(e) => match serde_json::from_slice::<AuditRecord>(&msg.payload) {
                Ok(r) => trail.records.push(r),
                Err(_) => trail.unreadable.push((seq, e.to_string())),
            },
        }
    }
    if expected <= last {
        trail.removed.push(expected..=last);
    }
    Ok(trail)
}
