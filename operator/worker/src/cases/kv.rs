//! Cases in a JetStream KV bucket: one JSON record per case, changed only
//! by compare-and-set. Dev mode's store, and the worker's outside a cluster.

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tallyman_api::v1alpha1::CaseDecision;
use tallyman_core::engine::CaseRequest;
use tallyman_core::policy;

use super::{BoxFuture, CaseRecord, CaseStore, DecideError};
use crate::Error;

/// The KV-backed case store of one namespace.
#[derive(Clone)]
pub struct KvCases {
    pub(crate) store: kv::Store,
    namespace: String,
}

const CAS_ATTEMPTS: usize = 16;

impl KvCases {
    pub fn new(store: kv::Store, namespace: &str) -> Self {
        Self {
            store,
            namespace: namespace.to_string(),
        }
    }

    /// Record a new case; opening the same case twice is a no-op.
    pub async fn open(&self, req: &CaseRequest, now: DateTime<Utc>) -> Result<CaseRecord, Error> {
        let record = CaseRecord::opened(req, &self.namespace, now);
        match self.store.create(&record.name, encode(&record)?).await {
            Ok(_) => Ok(record),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(self
                .get(&record.name)
                .await?
                .map(|(r, _)| r)
                .unwrap_or(record)),
            Err(e) => Err(Error::Store(format!(
                "failed to open case {}: {e}",
                record.name
            ))),
        }
    }

    pub async fn get(&self, name: &str) -> Result<Option<(CaseRecord, u64)>, Error> {
        match self.store.entry(name).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                Ok(Some((decode(&entry.value)?, entry.revision)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(Error::Store(format!("failed to read case {name}: {e}"))),
        }
    }

    /// Every case of the namespace.
    pub async fn list(&self) -> Result<Vec<CaseRecord>, Error> {
        let mut keys = self
            .store
            .keys()
            .await
            .map_err(|e| Error::Store(format!("failed to list cases: {e}")))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| Error::Store(format!("failed to list cases: {e}")))?;
            if let Some((record, _)) = self.get(&key).await? {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.opened.cmp(&b.opened).then(a.name.cmp(&b.name)));
        Ok(out)
    }

    /// Change a case with compare-and-set; `change` returns `Ok(None)` when
    /// there is nothing to write.
    async fn modify<E>(
        &self,
        name: &str,
        mut change: impl FnMut(&mut CaseRecord) -> Result<bool, E>,
    ) -> Result<Option<CaseRecord>, E>
    where
        E: From<Error>,
    {
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut record, revision)) = self.get(name).await? else {
                return Ok(None);
            };
            if !change(&mut record)? {
                return Ok(Some(record));
            }
            match self.store.update(name, encode(&record)?, revision).await {
                Ok(_) => return Ok(Some(record)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => {
                    return Err(Error::Store(format!("failed to update case {name}: {e}")).into());
                }
            }
        }
        Err(Error::Store(format!("case {name} keeps changing under us")).into())
    }

    /// Add one person's decision, if the policy admits it, and tally.
    pub async fn decide(
        &self,
        name: &str,
        decision: CaseDecision,
        now: DateTime<Utc>,
    ) -> Result<CaseRecord, DecideError> {
        let result = self
            .modify(name, |record| {
                // A deadline that passed is applied before anyone decides.
                if let Some(status) =
                    policy::expire(&record.spec, &record.status, record.window(), now)
                {
                    record.status = status;
                }
                policy::admit(&record.spec, &record.status, &decision)
                    .map_err(DecideError::Refused)?;
                record.spec.decisions.push(decision.clone());
                let (state, approvals) = policy::tally(&record.spec, &record.status);
                record.status.approvals = approvals;
                if state != record.status.state {
                    record.status.state = state;
                    record.status.resolved_at = Some(policy::to_time(now));
                    record.status.message = Some(format!("{state:?} by {}", decision.approver));
                }
                Ok::<_, DecideError>(true)
            })
            .await?;
        result.ok_or_else(|| DecideError::NotFound(name.to_string()))
    }

    /// Apply the deadline: escalate or expire. Returns the case when it changed.
    pub async fn expire(
        &self,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<CaseRecord>, Error> {
        let mut changed = false;
        let record = self
            .modify(name, |record| {
                changed = false;
                if let Some(status) =
                    policy::expire(&record.spec, &record.status, record.window(), now)
                {
                    record.status = status;
                    changed = true;
                }
                Ok::<_, Error>(changed)
            })
            .await?;
        Ok(record.filter(|_| changed))
    }

    /// Note that the instance took the case's outcome.
    pub async fn mark_resumed(&self, name: &str) -> Result<(), Error> {
        self.modify(name, |record| {
            let change = !record.resumed;
            record.resumed = true;
            Ok::<_, Error>(change)
        })
        .await
        .map(|_| ())
    }
}

fn encode(record: &CaseRecord) -> Result<Bytes, Error> {
    serde_json::to_vec(record)
        .map(Bytes::from)
        .map_err(|e| Error::Store(format!("failed to encode case: {e}")))
}

fn decode(bytes: &[u8]) -> Result<CaseRecord, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("failed to decode case: {e}")))
}

impl CaseStore for KvCases {
    fn open<'a>(
        &'a self,
        req: &'a CaseRequest,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<CaseRecord, Error>> {
        Box::pin(KvCases::open(self, req, now))
    }

    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<CaseRecord>, Error>> {
        Box::pin(async move { Ok(KvCases::get(self, name).await?.map(|(r, _)| r)) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<CaseRecord>, Error>> {
        Box::pin(KvCases::list(self))
    }

    fn decide<'a>(
        &'a self,
        name: &'a str,
        decision: CaseDecision,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<CaseRecord, DecideError>> {
        Box::pin(KvCases::decide(self, name, decision, now))
    }

    fn expire<'a>(
        &'a self,
        name: &'a str,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Option<CaseRecord>, Error>> {
        Box::pin(KvCases::expire(self, name, now))
    }

    fn mark_resumed<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(KvCases::mark_resumed(self, name))
    }

    fn watch(&self) -> BoxFuture<'_, Result<BoxStream<'static, CaseRecord>, Error>> {
        Box::pin(async move {
            let watch = self
                .store
                .watch_with_history(">")
                .await
                .map_err(|e| Error::Setup(format!("failed to watch cases: {e}")))?;
            let records = watch.filter_map(|entry| async move {
                let entry = entry.ok()?;
                if entry.operation != kv::Operation::Put {
                    return None;
                }
                decode(&entry.value).ok()
            });
            Ok(records.boxed())
        })
    }
}
