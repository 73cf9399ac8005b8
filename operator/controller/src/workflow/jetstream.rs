//! The JetStream objects of a Workflow: ensured on every apply (idempotent,
//! shared code with the workers so both name and configure them alike),
//! removed by the finalizer. Removal succeeds when they are already gone.
//!
//! Removed on delete: the events consumer `wf-<wf>`, the timers consumer
//! `timers-<wf>`, the instances bucket and the workflow's keys in the
//! namespace's definitions and counts buckets. The namespace's streams and
//! its cases bucket are shared by every Workflow of the namespace and stay.

use async_nats::jetstream::{self, consumer};
use futures_util::TryStreamExt;
use tallyman_core::engine::Definition;
use tallyman_worker::names::Names;

/// The consumer's limit of unacknowledged messages, as the workers set it.
fn max_ack_pending(def: &Definition) -> i64 {
    (def.spec.workers.max_in_flight as i64 * 4).max(1024)
}

/// Ensure the streams, consumers and buckets; a changed `trigger.events`
/// updates the events consumer's filter, which the workers do not do.
pub async fn ensure(
    js: &jetstream::Context,
    def: &Definition,
    events_since: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<(), String> {
    let names = Names::new(&def.namespace, &def.workflow);
    let handles = tallyman_worker::setup::ensure(
        js,
        &names,
        &def.spec.trigger.events,
        max_ack_pending(def),
        tallyman_worker::ACK_WAIT,
        events_since,
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut events = handles.events;
    let want: Vec<String> = def
        .spec
        .trigger
        .events
        .iter()
        .map(|t| names.event_subject(t))
        .collect();
    let info = events.info().await.map_err(|e| e.to_string())?;
    let mut have = info.config.filter_subjects.clone();
    if have.is_empty() && !info.config.filter_subject.is_empty() {
        have.push(info.config.filter_subject.clone());
    }
    let mut sorted_want = want.clone();
    sorted_want.sort();
    have.sort();
    if have != sorted_want {
        let mut config: consumer::Config = info.config.clone();
        config.filter_subject = String::new();
        config.filter_subjects = want;
        js.update_consumer_on_stream(config, names.events_stream())
            .await
            .map_err(|e| {
                format!(
                    "failed to update the filter of {}: {e}",
                    names.events_consumer()
                )
            })?;
    }
    Ok(())
}

fn gone(e: &jetstream::Error) -> bool {
    let code = e.error_code();
    code == jetstream::ErrorCode::CONSUMER_NOT_FOUND
        || code == jetstream::ErrorCode::STREAM_NOT_FOUND
}

/// Remove what belongs to this Workflow alone.
pub async fn cleanup(
    js: &jetstream::Context,
    namespace: &str,
    workflow: &str,
) -> Result<(), String> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    use async_nats::jetstream::stream::ConsumerErrorKind;
    let names = Names::new(namespace, workflow);
    for (consumer, stream) in [
        (names.events_consumer(), names.events_stream()),
        (names.timers_consumer(), names.timers_stream()),
    ] {
        match js.delete_consumer_from_stream(&consumer, &stream).await {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ConsumerErrorKind::JetStream(ref j) if gone(j)) => {}
            Err(e) => return Err(format!("failed to delete consumer {consumer}: {e}")),
        }
    }
    // A KV bucket is the stream KV_<bucket>.
    let bucket = names.instances_bucket();
    match js.delete_stream(format!("KV_{bucket}")).await {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j) if gone(j)) => {}
        Err(e) => return Err(format!("failed to delete bucket {bucket}: {e}")),
    }
    let definitions = names.definitions_bucket();
    if let Ok(store) = js.get_key_value(&definitions).await {
        let prefix = format!("{workflow}.");
        let keys: Vec<String> = match store.keys().await {
            Ok(keys) => keys
                .try_filter(|k| futures_util::future::ready(k.starts_with(&prefix)))
                .try_collect()
                .await
                .map_err(|e| format!("failed to list {definitions}: {e}"))?,
            Err(e) => return Err(format!("failed to list {definitions}: {e}")),
        };
        for key in keys {
            store
                .purge(&key)
                .await
                .map_err(|e| format!("failed to purge {definitions}/{key}: {e}"))?;
        }
    }
    // A Workflow created again under this name counts from zero.
    let counts = names.counts_bucket();
    if let Ok(store) = js.get_key_value(&counts).await {
        store
            .purge(workflow)
            .await
            .map_err(|e| format!("failed to purge {counts}/{workflow}: {e}"))?;
    }
    Ok(())
}
