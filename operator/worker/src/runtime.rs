//! The processing loop: one input at a time per instance, any replica, any
//! order, with compare-and-set on the instance's KV revision.

use std::collections::HashMap;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, kv, message::PublishMessage as Publish};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use sha2_free::short_id;
use tallyman_core::engine::{
    CallPlan, CallResult, CaseHistory, Compiled, Definition, Delivered, Event, Input, Instance,
    Machine, Next, Outbound, Values, id_prefix,
};
use tallyman_telemetry::{
    CallLabels, EventLabels, ExceptionLabels, InstanceEndLabels, InstanceOutcome, Metrics,
    StatusClass, WorkflowLabels,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{Instrument, debug, error, info, warn};

use crate::cases::{CaseRecord, CaseStore, KubeCases, KvCases};
use crate::counts::{self, Counts};
use crate::held::{Held, HeldInstances};
use crate::names::{Names, kv_key};
use crate::setup::{self, Handles};
use crate::{Caller, Error};

/// How a worker runs.
pub struct WorkerConfig {
    /// NATS connections to use (a small pool spreads the load; about 4 is best on 2 cores).
    pub clients: Vec<async_nats::Client>,
    pub definition: Definition,
    pub caller: Arc<dyn Caller>,
    /// Messages processed concurrently.
    pub max_in_flight: usize,
    pub metrics: Arc<Metrics>,
    /// How long the broker waits for an ack before it redelivers a message
    /// to another replica (calls that retry keep their message alive).
    pub ack_wait: Duration,
    /// Where exception cases live.
    pub cases: CaseBackend,
    /// Memory for running instances held between their inputs (estimated;
    /// see [`crate::held`]).
    pub instance_cache_bytes: usize,
    /// Where the workflow's event consumer starts when it is created: at
    /// the first event published at or after this time (the operator passes
    /// the Workflow's creation time, so a Workflow deleted and created
    /// again does not replay the namespace's history). `None`: every event
    /// the stream holds.
    pub events_since: Option<DateTime<Utc>>,
}

/// Where a worker keeps its exception cases.
#[derive(Clone, Default)]
pub enum CaseBackend {
    /// A JetStream KV bucket per namespace (dev mode, no cluster).
    #[default]
    JetStream,
    /// `ExceptionCase`s in the cluster, decided with `kubectl tallyman`.
    Kubernetes(kube::Client),
}

/// The default ack wait.
pub const ACK_WAIT: Duration = Duration::from_secs(30);

/// Counters for tests, status and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub events: AtomicU64,
    pub duplicates: AtomicU64,
    pub started: AtomicU64,
    pub completed: AtomicU64,
    pub rejected: AtomicU64,
    pub failed: AtomicU64,
    pub exceptions: AtomicU64,
    pub conflicts: AtomicU64,
    pub dead_letters: AtomicU64,
    pub timers: AtomicU64,
    /// Events applied in the same commit as an earlier one of their instance.
    pub coalesced: AtomicU64,
}

impl Stats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Instances by state and cases opened, as stored ([`Worker::tally`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub running: u64,
    pub completed: u64,
    pub rejected: u64,
    pub failed: u64,
    pub exceptions: u64,
}

/// One Workflow's runtime.
pub struct Worker {
    names: Names,
    js: Vec<jetstream::Context>,
    next_js: AtomicU64,
    current: Arc<Compiled>,
    revisions: Mutex<HashMap<String, Arc<Compiled>>>,
    handles: Handles,
    cases: Arc<dyn CaseStore>,
    caller: Arc<dyn Caller>,
    /// The last stored revision and state of recently seen running
    /// instances, so a write needs no read unless another replica wrote in
    /// between, with their parsed values for the next input.
    cache: Mutex<HeldInstances>,
    /// One lock per instance key being processed, so two messages for the
    /// same instance in this process go one after the other instead of
    /// racing into a compare-and-set conflict (and repeating their calls).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    max_in_flight: usize,
    /// One permit per message in flight, events and timers alike: at most
    /// `max_in_flight` are processed at once, and on shutdown every one is
    /// finished before the worker stops.
    slots: Arc<Semaphore>,
    /// The acknowledgement floors last read of the events and the timers
    /// consumers (stream sequences; they only grow).
    ack_floors: [AtomicU64; 2],
    /// How long the broker waits for an ack before redelivering.
    ack_wait: Duration,
    /// The largest instance the broker stores in one message (its
    /// `max_payload`, less room for the subject and headers).
    max_state: usize,
    /// What of `stats` is already added to the shared counters.
    flushed: tokio::sync::Mutex<Flushed>,
    /// In a cluster: the Workflow whose `status.instances` the counters go to.
    workflows: Option<kube::Api<tallyman_api::v1alpha1::Workflow>>,
    /// In a cluster: Events on that Workflow for failures SREs should see.
    notices: Option<Arc<crate::notices::Notices>>,
    pub stats: Arc<Stats>,
    metrics: Arc<Metrics>,
    labels: WorkflowLabels,
}

/// The wire form of a canonical event; `data` stays raw JSON text.
#[derive(Deserialize)]
struct WireEvent<'a> {
    id: String,
    #[serde(rename = "type")]
    type_: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    time: String,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

/// What the counters compare an input's result with.
#[derive(Clone, Copy)]
struct Before {
    running: bool,
    sla_breached: bool,
}

impl Before {
    /// A new instance, before its first event.
    const NEW: Before = Before {
        running: true,
        sla_breached: false,
    };

    fn of(inst: &Instance) -> Before {
        Before {
            running: inst.is_running(),
            sla_breached: inst.sla_breached,
        }
    }
}

/// The payload of a timer message.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TimerMsg {
    key: String,
    token: String,
    due_ms: i64,
    /// For case deadlines: the case to expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    case: Option<String>,
}

/// How often a replica adds its counts to the shared counters.
const COUNTS_FLUSH: Duration = Duration::from_secs(1);
/// How often, at most, the Workflow's `status.instances` is written.
const COUNTS_PUBLISH: Duration = Duration::from_secs(5);
const CAS_ATTEMPTS: usize = 32;

/// What of a worker's counts is in the shared counters.
struct Flushed {
    done: Counts,
    /// An addition (its number, and the counts it brings `done` to) that
    /// failed in a way that leaves open whether it was stored.
    pending: Option<(u64, Counts)>,
    /// This worker among every writer of the counters: a process and a
    /// moment, and which Worker of the process.
    writer: String,
    seq: u64,
}

impl Flushed {
    fn new() -> Self {
        static WORKERS: AtomicU64 = AtomicU64::new(0);
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Flushed {
            done: Counts::default(),
            pending: None,
            writer: format!(
                "{:x}-{started:x}-{}",
                std::process::id(),
                WORKERS.fetch_add(1, Ordering::Relaxed)
            ),
            seq: 0,
        }
    }

    /// The number of the next addition to the counters.
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

/// One instance's events from one batch, applied in one commit.
struct Group {
    key: String,
    inputs: Vec<Input>,
    msgs: Vec<Arc<jetstream::Message>>,
    permits: Vec<OwnedSemaphorePermit>,
    parsed: Values,
}

mod sha2_free {
    /// A short, stable id for a timer token (schedule subjects need one token).
    pub fn short_id(s: &str) -> String {
        // FNV-1a 64: stable across processes and versions, no extra dependency.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in s.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        format!("{h:016x}")
    }
}

impl Worker {
    /// Ensure the broker side and store this revision's definition.
    pub async fn new(config: WorkerConfig) -> Result<Arc<Self>, Error> {
        let compiled = Compiled::new(config.definition.clone()).map_err(|errors| {
            Error::Definition(
                errors
                    .iter()
                    .map(|(path, e)| format!("{path}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        let names = Names::new(&config.definition.namespace, &config.definition.workflow);
        if config.clients.is_empty() {
            return Err(Error::Connect("no NATS connection given".into()));
        }
        let max_state = config.clients[0]
            .server_info()
            .max_payload
            .saturating_sub(4096);
        let js: Vec<_> = config.clients.into_iter().map(jetstream::new).collect();
        let handles = setup::ensure(
            &js[0],
            &names,
            &compiled.def.spec.trigger.events,
            (config.max_in_flight as i64 * 4).max(1024),
            config.ack_wait,
            config.events_since,
        )
        .await?;
        let definition =
            serde_json::to_vec(&config.definition).map_err(|e| Error::Definition(e.to_string()))?;
        handles
            .definitions
            .put(
                format!("{}.{}", names.workflow, compiled.revision),
                Bytes::from(definition),
            )
            .await
            .map_err(|e| Error::Store(format!("failed to store the definition: {e}")))?;
        info!(
            namespace = %names.namespace,
            workflow = %names.workflow,
            revision = %compiled.revision,
            "worker ready"
        );
        let current = Arc::new(compiled);
        let mut revisions = HashMap::new();
        revisions.insert(current.revision.clone(), current.clone());
        let (cases, workflows, notices): (Arc<dyn CaseStore>, _, _) = match config.cases {
            CaseBackend::JetStream => (
                Arc::new(KvCases::new(handles.cases.clone(), &names.namespace)),
                None,
                None,
            ),
            CaseBackend::Kubernetes(client) => (
                Arc::new(KubeCases::new(client.clone(), &names.namespace)),
                Some(kube::Api::namespaced(client.clone(), &names.namespace)),
                Some(Arc::new(crate::notices::Notices::new(
                    client,
                    &names.namespace,
                    &names.workflow,
                ))),
            ),
        };
        let labels = WorkflowLabels::new(&config.definition.namespace, &config.definition.workflow);
        expose_alert_series(&config.metrics, &labels, &current);
        Ok(Arc::new(Self {
            names,
            js,
            next_js: AtomicU64::new(0),
            current,
            revisions: Mutex::new(revisions),
            handles,
            cases,
            caller: config.caller,
            cache: Mutex::new(HeldInstances::new(config.instance_cache_bytes)),
            locks: Mutex::new(HashMap::new()),
            max_in_flight: config.max_in_flight.max(1),
            slots: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            ack_floors: [AtomicU64::new(0), AtomicU64::new(0)],
            ack_wait: config.ack_wait,
            max_state,
            flushed: tokio::sync::Mutex::new(Flushed::new()),
            workflows,
            notices,
            stats: Arc::new(Stats::default()),
            labels,
            metrics: config.metrics,
        }))
    }

    pub fn revision(&self) -> &str {
        &self.current.revision
    }

    /// The workflow's namespace and name, and the NATS names derived from them.
    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn cases(&self) -> &Arc<dyn CaseStore> {
        &self.cases
    }

    /// At most this many event messages are taken from the consumer at
    /// once: a quarter of the messages in flight, so a batch waits for a
    /// few slots only.
    fn max_batch(&self) -> usize {
        (self.max_in_flight / 4).clamp(1, 64)
    }

    fn js(&self) -> &jetstream::Context {
        let n = self.next_js.fetch_add(1, Ordering::Relaxed) as usize;
        &self.js[n % self.js.len()]
    }

    /// Run until `shutdown` turns true; in-flight messages finish first.
    ///
    /// Should one of its loops end by itself (its consumer was deleted, a
    /// watch ended, a task panicked), the others are stopped the same way
    /// and the error returned: a worker that no longer consumes must not
    /// stay ready; its process exits and is started again.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> Result<(), Error> {
        let (stop, stopping) = watch::channel(false);
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(self.clone().consume_events(stopping.clone()));
        loops.spawn(self.clone().consume_timers(stopping.clone()));
        loops.spawn(self.clone().watch_cases(stopping.clone()));
        loops.spawn(self.clone().watch_lag(stopping.clone()));
        loops.spawn(self.clone().keep_counts(stopping.clone()));
        let mut failed: Option<Error> = None;
        loop {
            let ended = tokio::select! {
                // A dropped sender stops the worker too, as it always has.
                _ = shutdown.wait_for(|s| *s), if !*stop.borrow() => {
                    let _ = stop.send(true);
                    continue;
                }
                ended = loops.join_next() => ended,
            };
            let Some(ended) = ended else { break };
            let result = match ended {
                Ok(result) => result,
                Err(e) => Err(Error::Stopped(format!("a worker task panicked: {e}"))),
            };
            let early = !*stop.borrow();
            match result {
                Err(e) => {
                    if early {
                        error!(error = %e, "the worker stops: one of its loops ended");
                    }
                    failed.get_or_insert(e);
                }
                Ok(()) if early => {
                    failed.get_or_insert(Error::Stopped("a worker loop ended by itself".into()));
                }
                Ok(()) => {}
            }
            let _ = stop.send(true);
        }
        // Both loops have stopped taking slots: wait for the messages in
        // flight. (Waiting in either loop could deadlock: a drain queued
        // before the other loop's next slot, while that loop holds part of
        // a batch, would wait for that part for ever.)
        self.drain().await;
        // The messages in flight are done: count them too, however the
        // worker stops.
        if let Err(e) = self.flush_counts().await {
            warn!(error = %e, "failed to store the last instance counts");
        }
        if let Some(e) = failed {
            return Err(e);
        }
        info!(workflow = %self.names.workflow, "worker stopped");
        Ok(())
    }

    async fn consume_events(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let mut messages = self
            .handles
            .events
            .stream()
            .max_messages_per_batch(self.max_in_flight.min(512))
            .messages()
            .await
            .map_err(|e| Error::Setup(format!("failed to consume events: {e}")))?;
        let slots = self.slots.clone();
        // Why the stream ended, when it does: the last error it gave.
        let mut last_error = String::from("the stream ended");
        loop {
            let msg = tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                msg = messages.next() => msg,
            };
            let Some(msg) = msg else { break };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    if failed(&self.handles.events, "event", e, &mut last_error).await {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            // What else has arrived goes along, so an instance's events that
            // arrived together are applied in one commit. Taken before
            // waiting for slots: while every slot is busy, the messages
            // delivered meanwhile make one batch instead of one each.
            let mut ready = vec![msg];
            let mut ended = false;
            while ready.len() < self.max_batch() {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => ready.push(m),
                    Some(Some(Err(e))) => {
                        warn!(error = %e, "event consumer error");
                        last_error = e.to_string();
                        break;
                    }
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            let mut batch = Vec::with_capacity(ready.len());
            for m in ready {
                let permit = slots.clone().acquire_owned().await.expect("semaphore open");
                batch.push((m, permit));
            }
            let this = self.clone();
            tokio::spawn(this.handle_batch(batch));
            if ended {
                break;
            }
        }
        Err(Error::Stopped(format!(
            "the event consumer {} ended: {last_error}",
            self.names.events_consumer()
        )))
    }

    /// Wait until every message in flight, event or timer, is stored and
    /// acknowledged (or handed back).
    async fn drain(&self) {
        let _ = self.slots.acquire_many(self.max_in_flight as u32).await;
    }

    /// Add what this process counted since the last flush to the shared
    /// counters; the new totals, or `None` when there was nothing to add.
    /// An addition that failed without saying whether it was stored is
    /// tried again first, under its id, with what it held.
    async fn flush_counts(&self) -> Result<Option<Counts>, Error> {
        let mut flushed = self.flushed.lock().await;
        let mut total = self.add_pending(&mut flushed).await?;
        let now = Counts::of(&self.stats);
        if now != flushed.done {
            flushed.pending = Some((flushed.next_seq(), now));
            total = self.add_pending(&mut flushed).await?;
        }
        Ok(total)
    }

    /// Add the pending addition of `flushed`, under its id; the totals
    /// after it, or `None` when none is pending. Failed, it stays pending.
    async fn add_pending(&self, flushed: &mut Flushed) -> Result<Option<Counts>, Error> {
        let Some((seq, upto)) = flushed.pending else {
            return Ok(None);
        };
        let delta = upto.since(&flushed.done);
        let (wf, writer) = (&self.names.workflow, &flushed.writer);
        let total = counts::add(self.js(), &self.handles.counts, wf, &delta, writer, seq).await?;
        flushed.done = upto;
        flushed.pending = None;
        Ok(Some(total))
    }

    /// The shared counters, kept current; in a cluster also the Workflow's
    /// `status.instances` (at most every few seconds, when it changed).
    async fn keep_counts(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let mut published: Option<Counts> = None;
        let mut last = std::time::Instant::now() - COUNTS_PUBLISH;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                _ = tokio::time::sleep(COUNTS_FLUSH) => {}
            }
            let added = match self.flush_counts().await {
                Ok(added) => added,
                Err(e) => {
                    warn!(error = %e, "failed to store instance counts; trying again");
                    continue;
                }
            };
            let Some(api) = &self.workflows else { continue };
            if last.elapsed() < COUNTS_PUBLISH {
                continue;
            }
            // The totals our add returned, else (nothing to add here) what
            // the other replicas added meanwhile.
            let total = match added {
                Some(t) => t,
                None => match counts::read(&self.handles.counts, &self.names.workflow).await {
                    Ok(t) => t,
                    Err(e) => {
                        warn!(error = %e, "failed to read instance counts");
                        continue;
                    }
                },
            };
            if published == Some(total) {
                continue;
            }
            let patch = serde_json::json!({"status": {"instances": {
                "running": total.running(),
                "completed": total.completed,
                "rejected": total.rejected,
                "failed": total.failed,
                "exceptions": total.exceptions,
            }}});
            last = std::time::Instant::now();
            match api
                .patch_status(
                    &self.names.workflow,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => published = Some(total),
                Err(e) => warn!(error = %e, "failed to write the Workflow's status.instances"),
            }
        }
    }

    /// Every 5 s: the consumer's lag (`tallyman_worker_consumer_pending`)
    /// and the instances held in memory (`tallyman_worker_held_*`).
    async fn watch_lag(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> Result<(), Error> {
        let mut consumer = self.handles.events.clone();
        loop {
            if let Ok(info) = consumer.info().await {
                self.metrics
                    .worker
                    .consumer_pending
                    .get_or_create(&self.labels)
                    .set(info.num_pending as i64);
            }
            let (held, bytes) = self.held();
            let w = &self.metrics.worker;
            w.held_instances
                .get_or_create(&self.labels)
                .set(held as i64);
            w.held_instance_bytes
                .get_or_create(&self.labels)
                .set(bytes as i64);
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Decode and correlate a batch of event messages, then apply each
    /// instance's events in one commit, instances side by side.
    async fn handle_batch(self: Arc<Self>, batch: Vec<(jetstream::Message, OwnedSemaphorePermit)>) {
        let started = std::time::Instant::now();
        let mut groups: Vec<Group> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (msg, permit) in batch {
            self.stats.events.fetch_add(1, Ordering::Relaxed);
            let Some((key, ev, parsed)) = self.decode(&msg).await else {
                continue;
            };
            let msg = Arc::new(msg);
            match index.get(&key) {
                Some(&i) => {
                    let g = &mut groups[i];
                    g.inputs.push(Input::Event(ev));
                    g.msgs.push(msg);
                    g.permits.push(permit);
                    g.parsed.merge(parsed);
                }
                None => {
                    index.insert(key.clone(), groups.len());
                    groups.push(Group {
                        key,
                        inputs: vec![Input::Event(ev)],
                        msgs: vec![msg],
                        permits: vec![permit],
                        parsed,
                    });
                }
            }
        }
        let mut groups = groups.into_iter();
        let last = groups.next_back();
        for group in groups {
            let this = self.clone();
            tokio::spawn(async move { this.handle_group(group, started).await });
        }
        if let Some(group) = last {
            self.handle_group(group, started).await;
        }
    }

    /// The event in `msg` and the key of its instance; `None` when it can
    /// never be processed (it is dead-lettered).
    async fn decode(&self, msg: &jetstream::Message) -> Option<(String, Event, Values)> {
        let ev = match wire_event(msg) {
            Ok(ev) => ev,
            Err(e) => {
                self.poison(msg, &format!("not a canonical event: {e}"))
                    .await;
                return None;
            }
        };
        self.metrics
            .worker
            .events_received
            .get_or_create(&EventLabels {
                namespace: self.labels.namespace.clone(),
                workflow: self.labels.workflow.clone(),
                r#type: ev.type_.clone(),
            })
            .inc();
        let mut parsed = Values::default();
        match Machine::correlate_into(&self.current, &ev, &mut parsed) {
            Ok(key) => Some((key, ev, parsed)),
            Err(e) => {
                self.poison(msg, &format!("event {} does not correlate: {e}", ev.id))
                    .await;
                None
            }
        }
    }

    /// Apply one instance's events, then ack them all, or, when they could
    /// not be stored, have them all redelivered.
    async fn handle_group(&self, group: Group, started: std::time::Instant) {
        let Group {
            key,
            inputs,
            msgs,
            permits,
            parsed,
        } = group;
        match self.process_parsed(&key, &inputs, &msgs, parsed).await {
            // Together too large to store: each on its own, so only an
            // event that cannot be stored alone is dead-lettered. Their
            // calls are made again, with the same idempotency keys.
            Err(Error::Unstorable(_)) if msgs.len() > 1 => {
                debug!(
                    key,
                    "events too large to store together; applying them one by one"
                );
                // The others are kept alive meanwhile; after one that is to
                // be tried again, the rest are too, so they stay in order.
                // Boxed: rare, and as large as the common path's future.
                let mut one_by_one = Box::pin(async {
                    // One input per message, in the same order.
                    for (n, (msg, input)) in msgs.iter().zip(&inputs).enumerate() {
                        let alone = std::slice::from_ref(msg);
                        let one = std::slice::from_ref(input);
                        let result = self
                            .process_parsed(&key, one, alone, Values::default())
                            .await;
                        let again = matches!(&result, Err(e) if !matches!(e, Error::Unstorable(_)));
                        self.settle(&key, alone, result).await;
                        if again {
                            let behind =
                                Error::Store("an earlier event of its instance failed".into());
                            self.settle(&key, &msgs[n + 1..], Err(behind)).await;
                            break;
                        }
                    }
                });
                self.keep_alive(&msgs, one_by_one.as_mut()).await;
            }
            result => self.settle(&key, &msgs, result).await,
        }
        let duration = self
            .metrics
            .worker
            .message_duration
            .get_or_create(&self.labels);
        for _ in &msgs {
            duration.observe(started.elapsed().as_secs_f64());
        }
        drop(permits);
    }

    /// Messages handed back to be delivered again: an SRE's only sign of
    /// one that can never be processed (its instance unreadable, its
    /// definition revision gone) short of the logs.
    fn count_retried(&self, n: usize) {
        self.metrics
            .worker
            .messages_retried
            .get_or_create(&self.labels)
            .inc_by(n as u64);
    }

    /// Acknowledge `msgs` after `result`, dead-letter them when they cannot
    /// be stored, or have them redelivered.
    async fn settle(&self, key: &str, msgs: &[Arc<jetstream::Message>], result: Result<(), Error>) {
        match result {
            Ok(()) => {
                for msg in msgs {
                    if let Err(e) = msg.ack().await {
                        warn!(error = %e, "failed to ack an event");
                    }
                }
            }
            Err(Error::Unstorable(reason)) => {
                for msg in msgs {
                    self.poison(msg, &reason).await;
                }
            }
            Err(e) => {
                warn!(key, error = %e, "events not processed; they will be redelivered");
                self.count_retried(msgs.len());
                for msg in msgs {
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                }
            }
        }
    }

    /// A message that can never be processed goes to the dead-letter subject
    /// and is acknowledged, so it never blocks the consumer.
    async fn poison(&self, msg: &jetstream::Message, reason: &str) {
        warn!(reason, "dead-lettering a message");
        if let Some(notices) = &self.notices {
            notices.send(vec![crate::notices::poison(&self.names.dlq_subject())]);
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            "Tallyman-Reason",
            reason.replace(['\r', '\n'], " ").as_str(),
        );
        headers.insert("Tallyman-Subject", msg.subject.as_str());
        let published = self
            .js()
            .publish_with_headers(self.names.dlq_subject(), headers, msg.payload.clone())
            .await;
        let stored = match published {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if stored {
            // Counted once it is there: a publish that failed is tried
            // again with the redelivery, and counted then.
            self.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .worker
                .dead_letters
                .get_or_create(&self.labels.step(CONSUME))
                .inc();
            let _ = msg.ack().await;
        } else {
            self.count_retried(1);
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                .await;
        }
    }

    /// Apply `input` to the instance `key`: load, run, store with
    /// compare-and-set (retrying on conflict), publish the outbox.
    pub(crate) async fn process(
        &self,
        key: &str,
        input: Input,
        msg: Option<Arc<jetstream::Message>>,
    ) -> Result<(), Error> {
        let msgs: Vec<_> = msg.into_iter().collect();
        self.process_parsed(key, std::slice::from_ref(&input), &msgs, Values::default())
            .await
    }

    /// [`Worker::process`] for inputs in order, applied in one commit, with
    /// values parsed already (the events' data, parsed to correlate them).
    async fn process_parsed(
        &self,
        key: &str,
        inputs: &[Input],
        msgs: &[Arc<jetstream::Message>],
        parsed: Values,
    ) -> Result<(), Error> {
        let lock = self
            .locks
            .lock()
            .expect("locks lock")
            .entry(key.to_string())
            .or_default()
            .clone();
        let span = tracing::debug_span!(
            "instance",
            namespace = %self.names.namespace,
            workflow = %self.names.workflow,
            key,
            event = match inputs.first() {
                Some(Input::Event(e)) => e.id.as_str(),
                _ => "",
            },
            inputs = inputs.len(),
        );
        let work = pin!(
            async {
                let _serial = lock.lock().await;
                self.process_locked(key, inputs, parsed, delivered(msgs))
                    .await
            }
            .instrument(span)
        );
        let result = self.keep_alive(msgs, work).await;
        let mut locks = self.locks.lock().expect("locks lock");
        // The map and this function hold the only references: nobody waits.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(key);
        }
        result
    }

    /// Run `work` for `msgs`, telling the broker they are in progress every
    /// third of the ack wait: while they wait for their instance's lock
    /// behind a slow call, or a call of theirs takes long, they are not
    /// redelivered to another replica.
    ///
    /// `work` is pinned by the caller: moved in, it would be one more copy
    /// of a large future in every message's task.
    async fn keep_alive<T>(
        &self,
        msgs: &[Arc<jetstream::Message>],
        mut work: Pin<&mut impl Future<Output = T>>,
    ) -> T {
        if msgs.is_empty() {
            return work.await;
        }
        let every = (self.ack_wait / 3).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                _ = tokio::time::sleep(every) => {
                    for m in msgs {
                        let _ = m.ack_with(AckKind::Progress).await;
                    }
                }
            }
        }
    }

    async fn process_locked(
        &self,
        key: &str,
        inputs: &[Input],
        mut parsed: Values,
        delivered: Option<Delivered>,
    ) -> Result<(), Error> {
        let Some(first_input) = inputs.first() else {
            return Ok(());
        };
        let kv_key = kv_key(key);
        // An event for an instance this process does not hold is most often
        // the first of a new instance: try to create it without reading
        // first (one broker request less). Only for a lone event that leaves
        // the new instance idle, so nothing is called on that assumption; a
        // conflict reads the stored instance and runs the event again.
        let mut assume_new = inputs.len() == 1 && matches!(first_input, Input::Event(_));
        // The instance's scheduled wake-up is among the inputs.
        let fired = inputs.contains(&Input::Wake);
        for _ in 0..CAS_ATTEMPTS {
            // Taken out, not copied: the instance lock keeps every other
            // message for this key waiting until it is put back.
            let cached = self.cache.lock().expect("cache lock").take(key);
            // Held since this process wrote it: another replica (a timer
            // or a case it took, the other event of an order) may have
            // written since. Checked before the first call, so no call is
            // made from a state the store no longer has.
            let mut unconfirmed = cached.is_some();
            let mut probed = None;
            // Whether the instance is assumed new without having read it.
            let mut unread = false;
            let mut values = std::mem::take(&mut parsed);
            let (mut inst, revision) = match cached {
                Some(mut held) => {
                    held.values.merge(values);
                    values = held.values;
                    (held.inst, Some(held.revision))
                }
                None => {
                    let machine = Machine::with_values(
                        &self.current,
                        Utc::now(),
                        std::mem::take(&mut values),
                    );
                    let mut fresh =
                        Instance::new(key, &self.current.revision, Utc::now().timestamp_millis());
                    let first = assume_new.then(|| machine.apply(&mut fresh, first_input.clone()));
                    let stored = match first {
                        Some(Next::Idle) => {
                            unread = true;
                            None
                        }
                        // Boxed, like the other reads off the common path:
                        // the task of every message would carry their
                        // futures otherwise.
                        _ => Box::pin(self.load(key, &kv_key)).await?,
                    };
                    match stored {
                        Some((inst, rev)) => {
                            // Entries are checked against the stored instance.
                            values = machine.into_values();
                            (inst, Some(rev))
                        }
                        // Only an event starts an instance.
                        None if !matches!(first_input, Input::Event(_)) => return Ok(()),
                        None => {
                            let next = match first {
                                Some(next) => next,
                                None => machine.apply(&mut fresh, first_input.clone()),
                            };
                            probed = Some((machine, next));
                            (fresh, None)
                        }
                    }
                }
            };
            if fired && inputs.len() == 1 && !inst.is_running() {
                // A wake-up left scheduled for an ended instance (its
                // removal failed, or raced a late firing) has nothing to do:
                // the instance stays as it was stored, unwritten.
                return Ok(());
            }
            let new = revision.is_none();
            // The wake-up the broker holds for the instance: none for a new
            // one, nor after the one that is firing now.
            let scheduled = match (&probed, fired) {
                (None, false) => inst.wake_ms,
                _ => None,
            };
            let compiled = match probed {
                Some(_) => self.current.clone(),
                None => self.compiled(&inst.revision).await?,
            };
            // `first`: the first input's result when it is applied already
            // (to a new instance).
            let (mut machine, before, mut first) = match probed {
                Some((machine, next)) => (machine, Before::NEW, Some(next)),
                None => {
                    let before = Before::of(&inst);
                    inst.clear_outbox();
                    let machine = Machine::with_values(&compiled, Utc::now(), values);
                    (machine, before, None)
                }
            };
            // Call steps' execution time: their calls, retries and lookups.
            let mut call_steps: Vec<(String, Duration)> = Vec::new();
            let mut applied = 0;
            let mut stale = false;
            for input in inputs {
                let next = match first.take() {
                    Some(next) => next,
                    None => {
                        if let Input::Event(ev) = input
                            && inst.has_applied(&ev.dedup_key())
                        {
                            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                            self.metrics
                                .worker
                                .events_duplicate
                                .get_or_create(&self.labels)
                                .inc();
                            continue;
                        }
                        machine.apply(&mut inst, input.clone())
                    }
                };
                applied += 1;
                if unconfirmed && matches!(next, Next::Call(_) | Next::Lookup(_)) {
                    if Box::pin(self.stored_revision(&kv_key)).await? != revision {
                        stale = true;
                        break;
                    }
                    unconfirmed = false;
                }
                machine = self
                    .run_calls(machine, &compiled, &mut inst, next, &mut call_steps)
                    .await;
            }
            if stale {
                // The held copy is stale: nothing was called from it (the
                // loop stopped at the first call), so read the store and
                // apply the inputs again.
                assume_new = false;
                self.count_conflict();
                debug!(key, "held instance is stale; reading it");
                continue;
            }
            if applied == 0 {
                // Nothing new: every event was applied before.
                return Ok(());
            }
            self.observe_steps(machine.take_step_timings(), call_steps);
            inst.settle_wake(scheduled, fired);
            inst.delivered = delivered.clone();
            inst.seal_audits(&self.msg_prefix(key))
                .map_err(|e| Error::Store(e.to_string()))?;
            let bytes =
                Bytes::from(serde_json::to_vec(&inst).map_err(|e| Error::Store(e.to_string()))?);
            let stored = bytes.len();
            if stored > self.max_state {
                return Err(Error::Unstorable(format!(
                    "instance {key} would be {stored} bytes, more than the broker stores in one message ({} bytes): a call's answer or an event is too large to keep",
                    self.max_state
                )));
            }
            // Unread: revision 0 (no entry yet) fails at once when one
            // exists, where `create` would read it first to tell a deleted
            // entry from a live one.
            let written = match revision.or(unread.then_some(0)) {
                Some(rev) => self
                    .handles
                    .instances
                    .update(&kv_key, bytes, rev)
                    .await
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    }),
                None => self
                    .handles
                    .instances
                    .create(&kv_key, bytes)
                    .await
                    .map_err(|e| {
                        (
                            e.kind() == kv::CreateErrorKind::AlreadyExists,
                            e.to_string(),
                        )
                    }),
            };
            match written {
                Ok(new_revision) => {
                    self.count(&inst, new, before);
                    if applied > 1 {
                        let more = applied as u64 - 1;
                        self.stats.coalesced.fetch_add(more, Ordering::Relaxed);
                        self.metrics
                            .worker
                            .events_coalesced
                            .get_or_create(&self.labels)
                            .inc_by(more);
                    }
                    self.publish_outbox(&inst, new_revision).await?;
                    self.remember(key, new_revision, inst, machine.into_values(), stored);
                    return Ok(());
                }
                // Assumed new, but stored already: read it. Not a race (a
                // replica not holding an instance meets it this way, e.g.
                // the second event of an order on the other replica), so
                // not counted as a conflict.
                Err((true, _)) if unread => {
                    assume_new = false;
                    debug!(key, "instance exists; reading it");
                    continue;
                }
                Err((true, _)) => {
                    assume_new = false;
                    self.count_conflict();
                    debug!(key, "instance changed under us; retrying");
                    continue;
                }
                Err((false, e)) => {
                    return Err(Error::Store(format!("failed to store instance {key}: {e}")));
                }
            }
        }
        Err(Error::Store(format!(
            "instance {key} kept changing; giving up for now"
        )))
    }

    /// Make the calls `next` asks for, and apply their results, until the
    /// instance waits for its next input.
    async fn run_calls<'m>(
        &self,
        mut machine: Machine<'m>,
        compiled: &Compiled,
        inst: &mut Instance,
        mut next: Next,
        call_steps: &mut Vec<(String, Duration)>,
    ) -> Machine<'m> {
        // The lookup guarding the call about to be made, and the
        // attempts of that call so far: every retry looks up first.
        let mut guard: Option<(CallPlan, u32)> = None;
        loop {
            let step_started = std::time::Instant::now();
            let calling = match &next {
                Next::Call(plan) | Next::Lookup(plan) => Some(plan.step.clone()),
                Next::Idle => None,
            };
            next = match next {
                Next::Idle => break,
                Next::Call(plan) => match guard.take().filter(|(l, _)| l.step == plan.step) {
                    None => {
                        let (result, _) = self.timed_call(&plan, false).await;
                        machine.set_now(Utc::now());
                        machine.apply(inst, Input::CallDone(result))
                    }
                    Some((lookup, attempts)) => {
                        let (result, retry_in) = self.timed_call(&plan, true).await;
                        machine.set_now(Utc::now());
                        let attempts = attempts + 1;
                        let retry = compiled
                            .def
                            .connectors
                            .get(&plan.connector)
                            .and_then(|c| c.rest.as_ref())
                            .map(|r| r.retry.clone())
                            .unwrap_or_default();
                        match retry_in {
                            Some(wait) if attempts < retry.max_attempts => {
                                let wait = backoff(wait, attempts, retry.max_backoff.as_std());
                                tokio::time::sleep(wait).await;
                                let (found, _) =
                                    self.timed_call(&lookup, false).await;
                                machine.set_now(Utc::now());
                                guard = Some((lookup, attempts));
                                machine.apply(inst, Input::LookupDone(found))
                            }
                            Some(_) => machine.apply(
                                inst,
                                Input::CallDone(CallResult::Failed {
                                    message: format!(
                                        "gave up after {attempts} attempts, each after a lookup that found nothing"
                                    ),
                                    status: None,
                                    attempts,
                                }),
                            ),
                            None => machine.apply(inst, Input::CallDone(result)),
                        }
                    }
                },
                Next::Lookup(plan) => {
                    let (result, _) = self.timed_call(&plan, false).await;
                    machine.set_now(Utc::now());
                    guard = Some((plan, 0));
                    machine.apply(inst, Input::LookupDone(result))
                }
            };
            if let Some(step) = calling {
                let spent = step_started.elapsed();
                match call_steps.iter_mut().find(|(s, _)| *s == step) {
                    Some((_, total)) => *total += spent,
                    None => call_steps.push((step, spent)),
                }
            }
        }
        machine
    }

    /// The stored instance `key` and its revision; a crash may have
    /// stopped its last publish, so that is done again unless it is known
    /// to have happened.
    async fn load(&self, key: &str, kv_key: &str) -> Result<Option<(Instance, u64)>, Error> {
        match self.handles.instances.entry(kv_key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => {
                let inst: Instance = serde_json::from_slice(&e.value)
                    .map_err(|err| Error::Store(format!("instance {key} is unreadable: {err}")))?;
                let written_ns = e.created.unix_timestamp_nanos();
                if self.outbox_unpublished(&inst, written_ns).await {
                    self.publish_outbox(&inst, e.revision).await?;
                }
                Ok(Some((inst, e.revision)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(Error::Store(format!("failed to read instance {key}: {e}"))),
        }
    }

    /// Whether the outbox of `inst`, stored at `written_ns` (the broker's
    /// clock), may not have been published. Published again within the
    /// broker's duplicate window it is dropped as a duplicate, so while the
    /// commit is younger than half the window (room for clocks apart) it
    /// is published without asking. Later a copy would be stored again and
    /// its emitted events, dead letters and audit records delivered twice:
    /// then only when the commit's messages are not all acknowledged yet
    /// (a worker acknowledges them after publishing), or nothing says which
    /// they were.
    async fn outbox_unpublished(&self, inst: &Instance, written_ns: i128) -> bool {
        if inst.outbox.is_empty() && inst.audit_batch.is_none() {
            return false;
        }
        let now_ns = i128::from(Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX));
        let half_window = self.handles.dedup_window.as_nanos() as i128 / 2;
        if now_ns.saturating_sub(written_ns) < half_window {
            return true;
        }
        let Some(delivered) = &inst.delivered else {
            return true;
        };
        let consumer = [&self.handles.events, &self.handles.timers]
            .into_iter()
            .zip(&self.ack_floors)
            .find(|(c, _)| c.cached_info().name == delivered.consumer);
        let Some((consumer, known)) = consumer else {
            return true;
        };
        // Read again only when the floor known is not past it yet: a day's
        // wake-ups of instances not in memory ask once, not each.
        if known.load(Ordering::Relaxed) >= delivered.stream_seq {
            return false;
        }
        match consumer.get_info().await {
            Ok(info) => {
                let floor = info.ack_floor.stream_sequence;
                known.fetch_max(floor, Ordering::Relaxed);
                floor < delivered.stream_seq
            }
            Err(e) => {
                warn!(key = %inst.key, error = %e, "cannot tell whether the last outbox was published; publishing it again");
                true
            }
        }
    }

    /// Another replica wrote an instance this process was working on.
    fn count_conflict(&self) {
        self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .worker
            .cas_conflicts
            .get_or_create(&self.labels)
            .inc();
    }

    /// The revision the store holds for an instance now; `None` when it
    /// holds none (never written, deleted or purged).
    async fn stored_revision(&self, kv_key: &str) -> Result<Option<u64>, Error> {
        match self.handles.instances.entry(kv_key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => Ok(Some(e.revision)),
            Ok(_) => Ok(None),
            Err(e) => Err(Error::Store(format!(
                "failed to read instance {kv_key}: {e}"
            ))),
        }
    }

    /// Keep a stored instance for its next message. Ended instances are
    /// not kept (a late duplicate reads the store), nor is an outbox that
    /// is already published.
    fn remember(
        &self,
        key: &str,
        revision: u64,
        mut inst: Instance,
        values: Values,
        stored: usize,
    ) {
        if !inst.is_running() {
            return;
        }
        inst.clear_outbox();
        self.cache
            .lock()
            .expect("cache lock")
            .put(key.to_string(), Held::new(revision, inst, values, stored));
    }

    /// Running instances held in memory and their estimated size in bytes.
    pub fn held(&self) -> (usize, usize) {
        self.cache.lock().expect("cache lock").usage()
    }

    /// One call, timed for `tallyman_worker_call_duration_seconds`; `once`:
    /// one attempt, see [`Caller::call_once`].
    async fn timed_call(&self, plan: &CallPlan, once: bool) -> (CallResult, Option<Duration>) {
        let started = std::time::Instant::now();
        let (result, retry_in) = if once {
            self.caller.call_once(plan).await
        } else {
            (self.caller.call(plan).await, None)
        };
        let (status_class, attempts) = match &result {
            CallResult::Response {
                status, attempts, ..
            } => (StatusClass::from_status(*status), *attempts),
            CallResult::Failed {
                status: Some(s),
                attempts,
                ..
            } => (StatusClass::from_status(*s), *attempts),
            CallResult::Failed { attempts, .. } => (StatusClass::NoResponse, *attempts),
        };
        let labels = CallLabels {
            namespace: self.labels.namespace.clone(),
            workflow: self.labels.workflow.clone(),
            connector: plan.connector.clone(),
            action: plan.action.clone(),
            status_class,
        };
        let w = &self.metrics.worker;
        w.call_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        w.call_attempts
            .get_or_create(&labels)
            .inc_by(attempts as u64);
        (result, retry_in)
    }

    fn count(&self, inst: &Instance, new: bool, before: Before) {
        use tallyman_core::engine::Status;
        let w = &self.metrics.worker;
        if new {
            self.stats.started.fetch_add(1, Ordering::Relaxed);
            w.instances_started.get_or_create(&self.labels).inc();
            w.instances_running.get_or_create(&self.labels).inc();
        }
        if before.running && !inst.is_running() {
            let (c, outcome) = match inst.status {
                Status::Completed => (&self.stats.completed, InstanceOutcome::Completed),
                Status::Rejected => (&self.stats.rejected, InstanceOutcome::Rejected),
                _ => (&self.stats.failed, InstanceOutcome::Failed),
            };
            c.fetch_add(1, Ordering::Relaxed);
            if outcome == InstanceOutcome::Failed {
                warn!(
                    workflow = %self.labels.workflow,
                    key = %inst.key,
                    outcome = "failed",
                    reason = inst.outcome.as_deref().unwrap_or_default(),
                    "instance failed"
                );
            }
            w.instances_running.get_or_create(&self.labels).dec();
            w.instances_ended
                .get_or_create(&InstanceEndLabels {
                    namespace: self.labels.namespace.clone(),
                    workflow: self.labels.workflow.clone(),
                    outcome,
                })
                .inc();
        }
        for o in &inst.outbox {
            match o {
                Outbound::OpenCase(req) => {
                    self.stats.exceptions.fetch_add(1, Ordering::Relaxed);
                    w.exceptions_opened
                        .get_or_create(&ExceptionLabels {
                            namespace: self.labels.namespace.clone(),
                            workflow: self.labels.workflow.clone(),
                            reason: req.reason.clone(),
                        })
                        .inc();
                }
                Outbound::DeadLetter { step, reason, .. } => {
                    // Visible failures: the operator reads the log before
                    // the dead-letter stream.
                    warn!(
                        workflow = %self.labels.workflow,
                        key = %inst.key,
                        step = %step,
                        reason = %reason,
                        "dead-lettered: the step gave up"
                    );
                    self.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
                    w.dead_letters.get_or_create(&self.labels.step(step)).inc();
                }
                _ => {}
            }
        }
        let sla_missed = inst.sla_breached && !before.sla_breached;
        if sla_missed {
            w.sla_breaches.get_or_create(&self.labels).inc();
        }
        if let Some(notices) = &self.notices {
            let failed_at = (before.running && inst.status == Status::Failed).then(|| {
                self.revisions
                    .lock()
                    .expect("revisions lock")
                    .get(&inst.revision)
                    .and_then(|c| c.def.spec.steps.get(inst.step))
                    .map_or_else(|| "end".to_string(), |s| s.name.clone())
            });
            notices.send(crate::notices::notices(
                &inst.outbox,
                sla_missed,
                failed_at.as_deref(),
                &self.names.dlq_subject(),
            ));
        }
    }

    /// `step_duration` for the steps one input executed.
    fn observe_steps(&self, machine: Vec<(&str, Duration)>, calls: Vec<(String, Duration)>) {
        let family = &self.metrics.worker.step_duration;
        let observe = |step: &str, d: Duration| {
            family
                .get_or_create(&self.labels.step(step))
                .observe(d.as_secs_f64());
        };
        for (step, d) in machine {
            observe(step, d);
        }
        for (step, d) in calls {
            observe(&step, d);
        }
    }

    /// The compiled definition of a revision: this worker's, or an older
    /// one from the definitions bucket (a running instance finishes on the
    /// revision it started with).
    async fn compiled(&self, revision: &str) -> Result<Arc<Compiled>, Error> {
        if let Some(c) = self.revisions.lock().expect("revisions lock").get(revision) {
            return Ok(c.clone());
        }
        Box::pin(self.compile_stored(revision)).await
    }

    /// Read the stored definition `revision`, compile it and keep it.
    async fn compile_stored(&self, revision: &str) -> Result<Arc<Compiled>, Error> {
        let entry = self
            .handles
            .definitions
            .get(format!("{}.{revision}", self.names.workflow))
            .await
            .map_err(|e| Error::Store(format!("failed to read definition {revision}: {e}")))?
            .ok_or_else(|| Error::Definition(format!("revision {revision} is not stored")))?;
        let def: Definition = serde_json::from_slice(&entry)
            .map_err(|e| Error::Definition(format!("revision {revision}: {e}")))?;
        let compiled = Arc::new(
            Compiled::new(def)
                .map_err(|e| Error::Definition(format!("revision {revision}: {e:?}")))?,
        );
        self.revisions
            .lock()
            .expect("revisions lock")
            .insert(revision.to_string(), compiled.clone());
        Ok(compiled)
    }

    /// Publish the outbox of the commit stored as `revision`. Every item
    /// has a deterministic message id, so publishing again after a crash is
    /// a duplicate the broker drops. The audit records of one commit travel
    /// in one message (a JSON array, in chain order): one stored write
    /// instead of one per record.
    async fn publish_outbox(&self, inst: &Instance, revision: u64) -> Result<(), Error> {
        if inst.outbox.is_empty() && inst.audit_batch.is_none() {
            return Ok(());
        }
        let js = self.js();
        let prefix = self.msg_prefix(&inst.key);
        let now = Utc::now();
        let mut acks = Vec::with_capacity(4);
        let send =
            |subject: String, msg_id: String, payload: String, headers: Option<HeaderMap>| {
                (subject, message(&msg_id, payload, headers))
            };
        let mut messages = Vec::with_capacity(4);
        // The schedule to remove, once the messages are on their way.
        let mut cancel = None;
        if let Some(batch) = &inst.audit_batch {
            let payload = Bytes::copy_from_slice(batch.records.get().as_bytes());
            messages.push((
                self.names.audit_subject(),
                Publish::build().message_id(&batch.msg_id).payload(payload),
            ));
        }
        // Records not sealed into a batch (stored by an earlier version).
        let audits: Vec<&tallyman_core::audit::AuditRecord> = inst
            .outbox
            .iter()
            .filter_map(|o| match o {
                Outbound::Audit(r) => Some(&**r),
                _ => None,
            })
            .collect();
        if let (Some(first), Some(last)) = (audits.first(), audits.last()) {
            messages.push(send(
                self.names.audit_subject(),
                format!("{prefix}/audit/{}-{}", first.seq, last.seq),
                serde_json::to_string(&audits).map_err(|e| Error::Publish(e.to_string()))?,
                None,
            ));
        }
        for item in &inst.outbox {
            match item {
                Outbound::Audit(_) => {}
                Outbound::Emit { msg_id, type_, data } => {
                    let payload = format!(
                        r#"{{"id":{},"type":{},"source":{},"time":{},"data":{data}}}"#,
                        json_str(msg_id),
                        json_str(type_),
                        json_str(&format!("tallyman/{}/{}", self.names.namespace, self.names.workflow)),
                        json_str(&now.to_rfc3339_opts(SecondsFormat::Millis, true)),
                    );
                    messages.push(send(self.names.event_subject(type_), msg_id.clone(), payload, None));
                }
                Outbound::DeadLetter { msg_id, step, reason } => messages.push(send(
                    self.names.dlq_subject(),
                    msg_id.clone(),
                    serde_json::json!({"workflow": self.names.workflow, "key": inst.key, "step": step, "reason": reason})
                        .to_string(),
                    None,
                )),
                Outbound::Wake { due_ms } => {
                    // One schedule subject per instance: a newer wake-up
                    // replaces the schedule instead of adding one. The id
                    // names the commit: the same time armed again by a later
                    // commit (an SLA after a shorter wait fired) is a new
                    // schedule, not a duplicate the broker would drop.
                    let timer = TimerMsg {
                        key: inst.key.clone(),
                        token: "wake".into(),
                        due_ms: *due_ms,
                        case: None,
                    };
                    let msg_id = format!("{prefix}/wake/{due_ms}/{revision}");
                    messages.push(self.timer_message(&timer, &prefix, &msg_id)?);
                }
                Outbound::CancelWake => {
                    cancel = Some(self.names.timer_schedule_subject(&short_id(&prefix)));
                }
                Outbound::OpenCase(req) => {
                    self.cases.open(req, now).await?;
                    let Some(deadline) = req.deadline_ms else { continue };
                    let timer = TimerMsg {
                        key: inst.key.clone(),
                        token: format!("{prefix}/case/{}", req.name),
                        due_ms: deadline,
                        case: Some(req.name.clone()),
                    };
                    messages.push(self.timer_message(&timer, &timer.token, &timer.token)?);
                }
            }
        }
        for (subject, publish) in messages {
            acks.push(
                js.send_publish(subject, publish)
                    .await
                    .map_err(|e| Error::Publish(e.to_string()))?,
            );
        }
        // Removing a schedule is a request to the broker's API, slower than
        // a publish under load: it runs while the publishes are acknowledged,
        // not before them. A schedule left behind only fires into nothing
        // later (an ended instance is not written): a failure loses nothing.
        let removed = async {
            let Some(subject) = cancel else { return };
            if let Err(e) = self.handles.timers_stream.purge().filter(&subject).await {
                warn!(key = %inst.key, error = %e, "failed to remove a wake-up nobody needs");
            }
        };
        let acked = async {
            for ack in acks {
                ack.await.map_err(|e| Error::Publish(e.to_string()))?;
            }
            Ok(())
        };
        tokio::join!(removed, acked).1
    }

    /// The start of every message id of instance `key`.
    fn msg_prefix(&self, key: &str) -> String {
        id_prefix(&self.names.namespace, &self.names.workflow, key)
    }

    /// Publish a case's timer, keyed (schedule and message id) by its
    /// token, and wait for the broker to store it.
    async fn publish_case_timer(&self, timer: &TimerMsg) -> Result<(), Error> {
        let (subject, publish) = self.timer_message(timer, &timer.token, &timer.token)?;
        self.js()
            .send_publish(subject, publish)
            .await
            .map_err(|e| Error::Publish(e.to_string()))?
            .await
            .map_err(|e| Error::Publish(e.to_string()))?;
        Ok(())
    }

    /// A timer as a message: to the due subject when it is due now, else a
    /// schedule on the subject of `schedule_id` (one schedule per id).
    fn timer_message(
        &self,
        timer: &TimerMsg,
        schedule_id: &str,
        msg_id: &str,
    ) -> Result<(String, Publish), Error> {
        let (subject, headers) = self.schedule(timer.due_ms);
        let payload = serde_json::to_string(timer).map_err(|e| Error::Publish(e.to_string()))?;
        let subject =
            subject.unwrap_or_else(|| self.names.timer_schedule_subject(&short_id(schedule_id)));
        Ok((subject, message(msg_id, payload, headers)))
    }

    /// Where and how to publish a timer due at `due_ms`: straight to the due
    /// subject when it is due now, else as a schedule the server fires.
    fn schedule(&self, due_ms: i64) -> (Option<String>, Option<HeaderMap>) {
        let now = Utc::now().timestamp_millis();
        if due_ms <= now + 1000 {
            return (Some(self.names.timers_due_subject()), None);
        }
        // RFC 3339 ends at year 9999: a timer further out (a duration too
        // long to mean anything) is scheduled there.
        let last = DateTime::<Utc>::from_timestamp(253_402_300_799, 0).expect("9999-12-31");
        let at = DateTime::<Utc>::from_timestamp_millis(due_ms)
            .unwrap_or(last)
            .min(last)
            .to_rfc3339_opts(SecondsFormat::Secs, true);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Schedule", format!("@at {at}").as_str());
        headers.insert(
            "Nats-Schedule-Target",
            self.names.timers_due_subject().as_str(),
        );
        // A fired timer nobody consumes within a week is dropped with the stream's TTL.
        headers.insert("Nats-Schedule-TTL", "168h");
        (None, Some(headers))
    }

    async fn consume_timers(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let mut messages = self
            .handles
            .timers
            .stream()
            .max_messages_per_batch(self.max_in_flight.min(512))
            .messages()
            .await
            .map_err(|e| Error::Setup(format!("failed to consume timers: {e}")))?;
        let mut last_error = String::from("the stream ended");
        loop {
            let msg = tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                msg = messages.next() => msg,
            };
            let msg = match msg {
                None => break,
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    if failed(&self.handles.timers, "timer", e, &mut last_error).await {
                        break;
                    }
                    continue;
                }
            };
            // A day's wake-ups falling due together take turns with the
            // events instead of all loading and calling at once.
            let permit = self
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore open");
            let this = self.clone();
            tokio::spawn(async move {
                this.handle_timer(msg).await;
                drop(permit);
            });
        }
        Err(Error::Stopped(format!(
            "the timer consumer {} ended: {last_error}",
            self.names.timers_consumer()
        )))
    }

    async fn handle_timer(&self, msg: jetstream::Message) {
        // Shared with the calls it leads to: their retries keep it alive.
        let msg = Arc::new(msg);
        let Ok(timer) = serde_json::from_slice::<TimerMsg>(&msg.payload) else {
            self.poison(&msg, "not a timer message").await;
            return;
        };
        let now = Utc::now();
        if timer.due_ms > now.timestamp_millis() {
            // Fired early (clock skew): try again when due.
            let wait = Duration::from_millis((timer.due_ms - now.timestamp_millis()) as u64);
            let _ = msg.ack_with(AckKind::Nak(Some(wait))).await;
            return;
        }
        self.stats.timers.fetch_add(1, Ordering::Relaxed);
        let result = match &timer.case {
            None => {
                self.process(&timer.key, Input::Wake, Some(msg.clone()))
                    .await
            }
            Some(case) => self.case_deadline(&timer, case, now, &msg).await,
        };
        match result {
            Ok(()) => {
                let _ = msg.ack().await;
            }
            Err(Error::Unstorable(reason)) => self.poison(&msg, &reason).await,
            Err(e) => {
                warn!(key = %timer.key, error = %e, "timer not processed; retrying");
                self.count_retried(1);
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }

    /// A case's deadline: escalate (and set the next deadline) or expire
    /// it; or, for a decided case (the replicas' watches announce it as a
    /// timer due at once), resume its instance.
    async fn case_deadline(
        &self,
        timer: &TimerMsg,
        case: &str,
        now: DateTime<Utc>,
        msg: &Arc<jetstream::Message>,
    ) -> Result<(), Error> {
        let record = match self.cases.expire(case, now).await? {
            Some(changed) if changed.is_final() => {
                return self.resume(&changed, Some(msg.clone())).await;
            }
            Some(escalated) => escalated,
            // Applied already: by this timer before a crash cut it short,
            // or on another path (a decision that found the deadline
            // passed, the cluster's watch). Its next deadline may then have
            // no timer yet; scheduling it again is harmless (one schedule
            // per token, the same message id).
            None => match self.cases.get(case).await? {
                Some(open) if !open.is_final() => open,
                Some(decided) => return self.resume(&decided, Some(msg.clone())).await,
                None => return Ok(()),
            },
        };
        if let Some(deadline) = record
            .status
            .deadline
            .as_ref()
            .map(tallyman_core::policy::from_time)
            .filter(|d| d.timestamp_millis() > timer.due_ms)
        {
            let next = TimerMsg {
                key: timer.key.clone(),
                token: format!("{}/escalated", timer.token),
                due_ms: deadline.timestamp_millis(),
                case: Some(case.to_string()),
            };
            self.publish_case_timer(&next).await?;
        }
        Ok(())
    }

    /// Give a decided case's outcome to its instance (once: nothing when it
    /// took it already), or, for a case for the record, its decision.
    async fn resume(
        &self,
        record: &CaseRecord,
        msg: Option<Arc<jetstream::Message>>,
    ) -> Result<(), Error> {
        if record.spec.workflow != self.names.workflow || record.resumed || !record.is_final() {
            return Ok(());
        }
        // A blocking case resumes its instance; a case for the record (a
        // breached SLA) has its decision written into the instance's chain.
        let detail = record.status.message.clone().unwrap_or_default();
        self.process(
            &record.spec.key,
            Input::CaseResolved {
                name: record.name.clone(),
                approved: record.approved(),
                detail,
                history: CaseHistory {
                    decisions: record.spec.decisions.clone(),
                    escalated_to: record
                        .status
                        .escalated
                        .then(|| record.spec.escalate_to.as_ref().map(|to| to.groups.clone()))
                        .flatten(),
                    expired: record.status.state == tallyman_api::v1alpha1::CaseState::Expired,
                },
            },
            msg,
        )
        .await?;
        self.cases.mark_resumed(&record.name).await
    }

    /// Hand a decided case to one replica: a timer message due at once,
    /// with the same message id from every replica's watch, so the broker
    /// stores it once and the timers consumer gives it to one of them. Its
    /// redelivery retries a resume that failed. The publish itself is tried
    /// again until it is stored or the worker stops.
    async fn announce_decided(&self, record: CaseRecord, mut shutdown: watch::Receiver<bool>) {
        let prefix = self.msg_prefix(&record.spec.key);
        let timer = TimerMsg {
            key: record.spec.key.clone(),
            token: format!("{prefix}/case/{}/decided", record.name),
            due_ms: Utc::now().timestamp_millis(),
            case: Some(record.name.clone()),
        };
        let mut wait = Duration::from_millis(200);
        loop {
            let Err(e) = self.publish_case_timer(&timer).await else {
                return;
            };
            warn!(case = %record.name, error = %e, retry_in = ?wait, "failed to hand a decided case on; trying again");
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    /// Watch the case bucket: a decided case resumes its instance, whichever
    /// process decided it.
    async fn watch_cases(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let mut watch = self.cases.watch().await?;
        loop {
            let record = tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                r = watch.next() => r,
            };
            // Decisions would no longer resume their instances.
            let Some(record) = record else {
                return Err(Error::Stopped("the watch on exception cases ended".into()));
            };
            if record.is_final() && !record.resumed && record.spec.workflow == self.names.workflow {
                let this = self.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move { this.announce_decided(record, shutdown).await });
            }
        }
    }

    /// Bytes of the future that handles one group of messages: each is a
    /// task, moved into place whole when spawned. Kept small by boxing what
    /// the common path does not run; a test holds it there.
    #[doc(hidden)]
    pub fn group_task_bytes(&self) -> usize {
        let group = Group {
            key: String::new(),
            inputs: Vec::new(),
            msgs: Vec::new(),
            permits: Vec::new(),
            parsed: Values::default(),
        };
        std::mem::size_of_val(&self.handle_group(group, std::time::Instant::now()))
    }

    /// The workflow's instances by state and the cases it opened, from the
    /// shared counters every replica adds to, plus what this process
    /// counted since its last flush: the same after a restart, current to
    /// the moment in a single process (dev mode's `/dev/status`).
    pub async fn tally(&self) -> Result<Tally, Error> {
        let flushed = self.flushed.lock().await;
        let stored = counts::read(&self.handles.counts, &self.names.workflow).await?;
        let total = stored.plus(&Counts::of(&self.stats).since(&flushed.done));
        Ok(Tally {
            running: total.running(),
            completed: total.completed,
            rejected: total.rejected,
            failed: total.failed,
            exceptions: total.exceptions,
        })
    }

    /// The stored state of an instance, for status pages and tests.
    pub async fn instance(&self, key: &str) -> Result<Option<Instance>, Error> {
        match self.handles.instances.get(kv_key(key)).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Store(e.to_string())),
            Ok(None) => Ok(None),
            Err(e) => Err(Error::Store(e.to_string())),
        }
    }
}

/// The wait before attempt `attempts + 1` of a guarded call: the client's
/// first backoff (jittered, at least any `Retry-After`), doubled per attempt
/// made, capped at the Connector's `maxBackoff` (or the `Retry-After`).
fn backoff(first: Duration, attempts: u32, max: Duration) -> Duration {
    let doubled = first.saturating_mul(1 << attempts.saturating_sub(1).min(16));
    doubled.min(max.max(first))
}

/// A JetStream message with its deduplication id and optional headers.
fn message(msg_id: &str, payload: String, headers: Option<HeaderMap>) -> Publish {
    let mut publish = Publish::build()
        .message_id(msg_id)
        .payload(Bytes::from(payload));
    for (name, values) in headers.iter().flat_map(|h| h.iter()) {
        for v in values {
            publish = publish.header(name.clone(), v.clone());
        }
    }
    publish
}

/// After an error from the `what` consumer: log it, keep it as the last
/// error, and whether the consumer is gone (its loop ends).
async fn failed(
    consumer: &jetstream::consumer::PullConsumer,
    what: &str,
    e: impl std::fmt::Display,
    last_error: &mut String,
) -> bool {
    warn!(error = %e, "{what} consumer error");
    *last_error = e.to_string();
    let gone = gone(consumer).await;
    if gone {
        *last_error = "the consumer no longer exists".into();
    }
    gone
}

/// Whether `consumer` is gone from the broker (deleted, or its stream):
/// pulling from it can only fail from now on. Asked only after an error.
async fn gone(consumer: &jetstream::consumer::PullConsumer) -> bool {
    match consumer.get_info().await {
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            jetstream::context::ConsumerInfoErrorKind::NotFound
                | jetstream::context::ConsumerInfoErrorKind::StreamNotFound
        ),
    }
}

/// The consumer and last stream sequence of `msgs`, when they all came
/// from one consumer (a commit's messages always do).
fn delivered(msgs: &[Arc<jetstream::Message>]) -> Option<Delivered> {
    let mut out: Option<Delivered> = None;
    for msg in msgs {
        let info = msg.info().ok()?;
        match &mut out {
            None => {
                out = Some(Delivered {
                    consumer: info.consumer.to_string(),
                    stream_seq: info.stream_sequence,
                })
            }
            Some(d) if d.consumer == info.consumer => {
                d.stream_seq = d.stream_seq.max(info.stream_sequence)
            }
            Some(_) => return None,
        }
    }
    out
}

/// The `step` of dead letters that never reached a step: messages that
/// are not canonical events, do not correlate, or make an instance too
/// large to store (as the `PoisonMessage` Event's action).
const CONSUME: &str = "Consume";

/// Create at zero the series the documented alerts watch, so the first
/// failure after a start is an increase and not a series appearing at 1
/// (which `increase()` does not see).
fn expose_alert_series(metrics: &Metrics, labels: &WorkflowLabels, def: &Compiled) {
    let w = &metrics.worker;
    for outcome in [
        InstanceOutcome::Completed,
        InstanceOutcome::Rejected,
        InstanceOutcome::Failed,
    ] {
        let _ = w.instances_ended.get_or_create(&InstanceEndLabels {
            namespace: labels.namespace.clone(),
            workflow: labels.workflow.clone(),
            outcome,
        });
    }
    let _ = w.sla_breaches.get_or_create(labels);
    let _ = w.messages_retried.get_or_create(labels);
    let _ = w.dead_letters.get_or_create(&labels.step(CONSUME));
    for step in &def.def.spec.steps {
        let _ = w.dead_letters.get_or_create(&labels.step(&step.name));
    }
}

/// The canonical event a message carries.
fn wire_event(msg: &jetstream::Message) -> Result<Event, serde_json::Error> {
    serde_json::from_slice::<WireEvent>(&msg.payload).map(|w| Event {
        id: w.id,
        type_: w.type_,
        source: w.source,
        time: w.time,
        data: w.data.get().to_string(),
    })
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}
