//! Reading the audit stream back, for `tallyman audit verify`.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use tallyman_core::audit::AuditRecord;

use crate::Error;
use crate::names::Names;

/// Every audit record of a namespace (or of one workflow), in stream order.
/// Records that do not parse are returned as errors with their sequence, so
/// a verifier can count them as modified.
pub async fn read(
    client: async_nats::Client,
    namespace: &str,
    workflow: Option<&str>,
) -> Result<(Vec<AuditRecord>, Vec<(u64, String)>), Error> {
    let js = jetstream::new(client);
    let names = Names::new(namespace, workflow.unwrap_or("*"));
    let mut stream = js
        .get_stream(names.audit_stream())
        .await
        .map_err(|e| Error::Store(format!("no audit stream {}: {e}", names.audit_stream())))?;
    let last = stream
        .info()
        .await
        .map_err(|e| Error::Store(format!("failed to read the audit stream: {e}")))?
        .state
        .last_sequence;
    let mut records = Vec::new();
    let mut unreadable = Vec::new();
    if last == 0 {
        return Ok((records, unreadable));
    }
    let mut consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: match workflow {
                Some(_) => names.audit_subject(),
                None => names.audit_wildcard(),
            },
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Store(format!("failed to read the audit stream: {e}")))?;
    let pending = consumer
        .info()
        .await
        .map_err(|e| Error::Store(format!("failed to read the audit stream: {e}")))?
        .num_pending;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Error::Store(format!("failed to read the audit stream: {e}")))?;
    let mut read = 0;
    while read < pending {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
        let Ok(Some(Ok(msg))) = next else {
            return Err(Error::Store(format!(
                "the audit stream stopped answering after {read} of {pending} records"
            )));
        };
        read += 1;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        // One message holds the records of one commit, in chain order.
        match serde_json::from_slice::<Vec<AuditRecord>>(&msg.payload) {
            Ok(batch) => records.extend(batch),
            Err(e) => match serde_json::from_slice::<AuditRecord>(&msg.payload) {
                Ok(r) => records.push(r),
                Err(_) => unreadable.push((seq, e.to_string())),
            },
        }
    }
    Ok((records, unreadable))
}
