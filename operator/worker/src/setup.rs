//! Ensure the streams, consumers and buckets a workflow needs. Idempotent:
//! what exists is left as it is, so every replica can run it at start.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};

use crate::Error;
use crate::names::Names;

/// How long the broker remembers message ids for deduplication.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);

/// The handles a worker uses.
pub struct Handles {
    pub instances: kv::Store,
    pub cases: kv::Store,
    pub definitions: kv::Store,
    pub counts: kv::Store,
    pub events: consumer::Consumer<consumer::pull::Config>,
    pub timers: consumer::Consumer<consumer::pull::Config>,
    /// The stream of the schedules, to remove one nobody needs.
    pub timers_stream: stream::Stream,
    /// The shortest duplicate window of the streams an outbox goes to:
    /// published again within it, a message is dropped as a duplicate.
    pub dedup_window: Duration,
}

/// How long `stream` drops a message published again under the same id.
fn dedup_window(stream: &stream::Stream) -> Duration {
    stream.cached_info().config.duplicate_window
}

async fn ensure_stream(
    js: &jetstream::Context,
    name: String,
    subject: String,
    timers: bool,
) -> Result<stream::Stream, Error> {
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![subject],
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        // Timers are scheduled messages (Nats-Schedule) that the server
        // republishes to the workflow's due subject when they fall due.
        allow_message_schedules: timers,
        allow_message_ttl: timers,
        ..Default::default()
    })
    .await
    .map_err(|e| Error::Setup(format!("failed to ensure stream {name}: {e}")))
}

async fn ensure_kv(
    js: &jetstream::Context,
    bucket: String,
    history: i64,
) -> Result<kv::Store, Error> {
    match js.get_key_value(&bucket).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: bucket.clone(),
                history,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Setup(format!("failed to ensure bucket {bucket}: {e}"))),
    }
}

/// The key, in the namespace's counts bucket, of when its audit stream was
/// first created (nanoseconds since the epoch). No Workflow can have this
/// name: `_` is not allowed in one.
pub const AUDIT_CREATED_KEY: &str = "_audit-stream-created";

/// What every workflow of a namespace shares.
pub struct Namespace {
    pub events: stream::Stream,
    /// The shortest duplicate window of its events, audit and dead-letter
    /// streams.
    pub dedup_window: Duration,
    /// The instance counters of its workflows, and when its audit stream
    /// was first made.
    pub counts: kv::Store,
}

/// The streams and the counts bucket shared by every workflow of a
/// namespace (the gateway and the operator ensure the same ones).
pub async fn ensure_namespace(js: &jetstream::Context, names: &Names) -> Result<Namespace, Error> {
    let events = ensure_stream(js, names.events_stream(), names.events_wildcard(), false).await?;
    let audit = ensure_stream(js, names.audit_stream(), names.audit_wildcard(), false).await?;
    let dlq = ensure_stream(js, names.dlq_stream(), names.dlq_wildcard(), false).await?;
    let counts = ensure_kv(js, names.counts_bucket(), 1).await?;
    anchor_audit(&counts, names, &audit).await?;
    let dedup_window = dedup_window(&events)
        .min(dedup_window(&audit))
        .min(dedup_window(&dlq));
    Ok(Namespace {
        events,
        dedup_window,
        counts,
    })
}

/// Write down when the audit stream was created, once: a stream deleted
/// and made again has no gap in its sequence for `audit verify` to find,
/// but a later creation time than the one written down first.
async fn anchor_audit(
    counts: &kv::Store,
    names: &Names,
    audit: &stream::Stream,
) -> Result<(), Error> {
    // As found or made just now: the creation time never changes.
    let created = audit.cached_info().created.unix_timestamp_nanos();
    match counts
        .create(AUDIT_CREATED_KEY, created.to_string().into())
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Setup(format!(
            "failed to record when {} was created: {e}",
            names.audit_stream()
        ))),
    }
}

/// Everything one workflow needs.
pub async fn ensure(
    js: &jetstream::Context,
    names: &Names,
    trigger_events: &[String],
    max_ack_pending: i64,
    ack_wait: Duration,
    events_since: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Handles, Error> {
    let deliver_policy = match events_since {
        None => consumer::DeliverPolicy::All,
        Some(since) => consumer::DeliverPolicy::ByStartTime {
            start_time: async_nats::datetime::from_nanos(
                since.timestamp_nanos_opt().unwrap_or(i64::MAX).into(),
            )
            .map_err(|e| Error::Setup(format!("events since {since}: {e}")))?,
        },
    };
    let Namespace {
        events: events_stream,
        dedup_window: namespace_window,
        counts,
    } = ensure_namespace(js, names).await?;
    let timers_stream =
        ensure_stream(js, names.timers_stream(), names.timers_wildcard(), true).await?;
    let events = events_stream
        .get_or_create_consumer(
            &names.events_consumer(),
            consumer::pull::Config {
                durable_name: Some(names.events_consumer()),
                filter_subjects: trigger_events
                    .iter()
                    .map(|t| names.event_subject(t))
                    .collect(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                max_ack_pending,
                deliver_policy,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| {
            Error::Setup(format!(
                "failed to ensure consumer {}: {e}",
                names.events_consumer()
            ))
        })?;
    let timers = timers_stream
        .clone()
        .get_or_create_consumer(
            &names.timers_consumer(),
            consumer::pull::Config {
                durable_name: Some(names.timers_consumer()),
                filter_subject: names.timers_due_subject(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                max_ack_pending: 100_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| {
            Error::Setup(format!(
                "failed to ensure consumer {}: {e}",
                names.timers_consumer()
            ))
        })?;
    Ok(Handles {
        instances: ensure_kv(js, names.instances_bucket(), 1).await?,
        cases: ensure_kv(js, names.cases_bucket(), 5).await?,
        definitions: ensure_kv(js, names.definitions_bucket(), 1).await?,
        counts,
        events,
        timers,
        dedup_window: namespace_window.min(dedup_window(&timers_stream)),
        timers_stream,
    })
}
