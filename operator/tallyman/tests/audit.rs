//! `tallyman audit verify` as an auditor runs it, on the audit stream of a
//! real run: an intact trail verifies; a removed or a forged record is named,
//! and the exit code says so.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use support::*;
use tallyman_testing::erp::SimErp;
use tallyman_testing::nats::NatsServer;

const AUDIT_STREAM: &str = "TALLYMAN_FINANCE_AUDIT";

/// A few orders run to completion by a real worker, which then stops.
async fn small_run() -> (NatsServer, jetstream::Context) {
    let nats = NatsServer::start();
    let erp = SimErp::start().await;
    let worker = WorkerProcess::start(&nats.url(), &erp.base_url());
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let n = 3;
    // Two commits per instance (events taken together would share one):
    // the orders, then, once each is stored with its first records, the
    // shipments.
    publish_events(&js, &erp, n, &["order.created"]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stored = match js.get_stream(AUDIT_STREAM).await {
            Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        };
        if stored >= n as u64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the orders were not started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish_events(&js, &erp, n, &["shipment.confirmed"]).await;
    wait_all_completed(&js, n, Duration::from_secs(30)).await;
    assert_one_invoice_per_order(&erp, n);
    let status = worker.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    (nats, js)
}

fn verify(nats: &NatsServer, json: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyman"));
    cmd.args(["audit", "verify", "--nats", &nats.url(), "--namespace", NS]);
    if json {
        cmd.args(["--output", "json"]);
    }
    cmd.output().expect("tallyman audit verify runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn report(nats: &NatsServer) -> serde_json::Value {
    let out = verify(nats, true);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// Every message of the audit stream: its stream sequence and the records
/// it holds (one record, or the records of one commit as an array).
async fn audit_messages(js: &jetstream::Context) -> Vec<(u64, Vec<serde_json::Value>)> {
    let mut stream = js.get_stream(AUDIT_STREAM).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(msg) = stream.get_raw_message(seq).await {
            let records = match serde_json::from_slice(&msg.payload).unwrap() {
                serde_json::Value::Array(batch) => batch,
                one => vec![one],
            };
            out.push((seq, records));
        }
    }
    out
}

/// The stream sequence of the message holding `key`'s record `seq`, the
/// records of that message, and where among them the record is.
async fn find(
    js: &jetstream::Context,
    key: &str,
    seq: u64,
) -> (u64, Vec<serde_json::Value>, usize) {
    for (stream_seq, records) in audit_messages(js).await {
        if let Some(i) = records
            .iter()
            .position(|r| r["key"] == key && r["seq"] == seq)
        {
            return (stream_seq, records, i);
        }
    }
    panic!("no record {seq} of {key}")
}

/// Publish records to the audit subject in the form the worker uses: one
/// record alone, several as an array.
async fn publish_audit(js: &jetstream::Context, msg_id: &str, records: &[serde_json::Value]) {
    let payload = match records {
        [one] => serde_json::to_vec(one),
        many => serde_json::to_vec(many),
    }
    .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    js.publish_with_headers(
        format!("tallyman.{NS}.audit.{WF}"),
        headers,
        Bytes::from(payload),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// A worker that reads an instance back publishes its last commit's outbox
/// again (a crash may have cut it short); after the broker's duplicate
/// window the audit stream stores that batch a second time. Identical
/// records stored again are counted, not reported as tampering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stored_again_after_the_duplicate_window_still_verifies() {
    let (nats, js) = small_run().await;
    let messages = audit_messages(&js).await;
    let records: usize = messages.iter().map(|(_, r)| r.len()).sum();
    let (_, again) = messages.last().unwrap().clone();
    // A new message id stands for the window having passed.
    publish_audit(&js, "published-again-later", &again).await;

    let out = verify(&nats, false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!(
            "{} records of 3 instances ({} of them stored again, identical: an outbox published once more): every chain verifies",
            records + again.len(),
            again.len()
        )),
        "{said}"
    );
    let ok = report(&nats);
    assert_eq!(ok["repeated"], again.len());
    assert_eq!(ok["problems"], serde_json::json!([]));

    // A copy that differs is still two records claiming one place.
    let mut changed = again.clone();
    changed[0]["detail"] = serde_json::json!({"forged": true});
    publish_audit(&js, "changed-copy", &changed).await;
    let out = verify(&nats, false);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

/// An audit stream given limits that removed its oldest message: the
/// chain that began there is counted as retention, not reported, and the
/// output says what retention hides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_whose_start_the_streams_limits_removed_still_verifies() {
    let (nats, js) = small_run().await;
    let messages = audit_messages(&js).await;
    let (first_seq, first) = messages[0].clone();
    let key = first[0]["key"].as_str().unwrap().to_string();
    assert!(
        messages[1..]
            .iter()
            .any(|(_, r)| r.iter().any(|x| x["key"] == key)),
        "{key} has records after the first message"
    );
    let mut stream = js.get_stream(AUDIT_STREAM).await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_messages = messages.len() as i64 - 1;
    js.update_stream(config).await.unwrap();
    let after = stream.info().await.unwrap().state.first_sequence;
    assert_eq!(after, first_seq + 1, "the oldest message left");

    let out = verify(&nats, false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!(
            "the audit stream's limits removed its messages before {after}: 1 instances' chains begin after records that left with them"
        )),
        "{said}"
    );
    assert!(said.contains("every chain verifies"), "{said}");
    let json = report(&nats);
    assert_eq!(json["beginAfterRetention"], 1);
    assert_eq!(json["retainedFrom"], after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intact_trail_verifies_and_a_removed_record_is_named() {
    let (nats, js) = small_run().await;
    let messages = audit_messages(&js).await;
    let records: usize = messages.iter().map(|(_, r)| r.len()).sum();
    let out = verify(&nats, false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("every chain verifies"),
        "{}",
        text(&out)
    );
    let ok = report(&nats);
    assert_eq!(ok["instances"], 3);
    assert_eq!(ok["records"], records);
    assert_eq!(ok["problems"], serde_json::json!([]));

    // Someone with access to the stream removes a message from its middle:
    // one that opens an instance's chain (a commit's records travel
    // together, so this is the one message every chain is sure to have
    // before others), not the stream's first.
    let mut cut = None;
    for key in ["ORD-0", "ORD-1", "ORD-2"] {
        let (stream_seq, removed, _) = find(&js, key, 1).await;
        if stream_seq > messages[0].0 {
            cut = Some((key, stream_seq, removed));
            break;
        }
    }
    let (key, stream_seq, removed) = cut.expect("two chains cannot both open the stream");
    assert!(stream_seq < messages[messages.len() - 1].0);
    let gone: Vec<u64> = removed
        .iter()
        .filter(|r| r["key"] == key)
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    let (first, last) = (gone[0], gone[gone.len() - 1]);
    let last_of_key = messages
        .iter()
        .flat_map(|(_, r)| r)
        .filter(|r| r["key"] == key)
        .map(|r| r["seq"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(last < last_of_key, "{key} has records after the cut");
    let stream = js.get_stream(AUDIT_STREAM).await.unwrap();
    assert!(stream.delete_message(stream_seq).await.unwrap());

    let out = verify(&nats, false);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    let at = format!(r#"instance "{key}" record {first}: Missing"#);
    assert!(said.contains(&at), "{said}");
    let missing = if first == last {
        format!("record {first} is missing")
    } else {
        format!("records {first} to {last} are missing")
    };
    assert!(said.contains(&missing), "{said}");
    // The stream's own sequence shows the gap too.
    assert!(
        said.contains(&format!(
            "stream message {stream_seq} was removed from the audit stream"
        )),
        "{said}"
    );
    let broken = report(&nats);
    let problems = broken["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!(problems[0]["key"], key);
    assert_eq!(problems[0]["seq"], first);
    assert_eq!(problems[0]["kind"], "Missing");
    assert_eq!(problems[1]["key"], "");
    assert_eq!(problems[1]["seq"], stream_seq);
    assert_eq!(problems[1]["kind"], "Missing");
}

/// An instance's whole trail removed leaves no chain with a gap to show:
/// the audit stream keeps every message, so its sequence shows the hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_trail_removed_is_found_by_the_streams_sequence() {
    let (nats, js) = small_run().await;
    let messages = audit_messages(&js).await;
    let of_order_1: Vec<u64> = messages
        .iter()
        .filter(|(_, records)| records.iter().any(|r| r["key"] == "ORD-1"))
        .map(|(seq, _)| *seq)
        .collect();
    assert_eq!(of_order_1.len(), 2, "two commits");
    let stream = js.get_stream(AUDIT_STREAM).await.unwrap();
    for seq in &of_order_1 {
        assert!(stream.delete_message(*seq).await.unwrap());
    }

    let out = verify(&nats, false);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(!said.contains("ORD-1"), "no record of it is left: {said}");
    // Adjacent removed messages are named as one range.
    let (a, b) = (of_order_1[0], of_order_1[1]);
    let expected = if b == a + 1 {
        vec![format!("stream messages {a} to {b} were removed")]
    } else {
        vec![
            format!("stream message {a} was removed"),
            format!("stream message {b} was removed"),
        ]
    };
    for e in &expected {
        assert!(said.contains(e), "{e}: {said}");
    }
    let broken = report(&nats);
    assert_eq!(broken["instances"], 2);
    let problems = broken["problems"].as_array().unwrap();
    assert_eq!(problems.len(), expected.len(), "{problems:?}");
    assert_eq!(problems[0]["seq"], a);
    assert!(
        problems
            .iter()
            .all(|p| p["kind"] == "Missing" && p["key"] == "")
    );

    // The same for one Workflow's records: the whole stream is checked.
    let out = Command::new(env!("CARGO_BIN_EXE_tallyman"))
        .args(["audit", "verify", "--nats", &nats.url(), "--namespace", NS])
        .args(["--workflow", WF])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_record_is_reported_as_modified() {
    let (nats, js) = small_run().await;
    assert_eq!(verify(&nats, false).status.code(), Some(0));

    // Replace ORD-2's record 3 with one that says something else, keeping
    // its seq, prev and hash so it still looks like part of the chain (and
    // the records stored with it as they were).
    let (stream_seq, original, i) = find(&js, "ORD-2", 3).await;
    let mut forged = original.clone();
    forged[i]["detail"] = serde_json::json!({"approvedBy": "mallory"});
    assert_ne!(forged, original);
    let stream = js.get_stream(AUDIT_STREAM).await.unwrap();
    assert!(stream.delete_message(stream_seq).await.unwrap());
    publish_audit(&js, "forged-ORD-2-3", &forged).await;

    let out = verify(&nats, false);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(r#"instance "ORD-2" record 3: Modified"#),
        "{said}"
    );
    assert!(said.contains("does not match its hash"), "{said}");
    let broken = report(&nats);
    let problems = broken["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p["key"] == "ORD-2" && p["seq"] == 3 && p["kind"] == "Modified"),
        "{problems:?}"
    );
    // The other chains are intact; the replaced message left a hole in
    // the stream's sequence.
    assert!(
        problems
            .iter()
            .all(|p| p["key"] == "ORD-2" || (p["key"] == "" && p["seq"] == stream_seq)),
        "{problems:?}"
    );
}

/// A stream deleted and made again has no gap in its sequence, so its
/// creation time is checked against the one written down first; a
/// restarted broker keeps the stream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_stream_deleted_and_made_again_is_reported() {
    let (mut nats, js) = small_run().await;
    nats.restart();
    let js = {
        // The old connection may still be reconnecting.
        drop(js);
        jetstream::new(async_nats::connect(nats.url()).await.unwrap())
    };
    let out = verify(&nats, false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    js.delete_stream(AUDIT_STREAM).await.unwrap();
    // The next worker to start makes it again, empty.
    let erp = SimErp::start().await;
    let worker = WorkerProcess::start(&nats.url(), &erp.base_url());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while js.get_stream(AUDIT_STREAM).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker did not make the audit stream again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stopped while it may still be starting: a clean exit all the same.
    let stopped = worker.terminate(Duration::from_secs(10));
    assert!(stopped.success(), "{stopped}");

    let out = verify(&nats, false);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("it was deleted and made again, and every record stored before is gone"),
        "{said}"
    );
    let problems = report(&nats)["problems"].clone();
    assert_eq!(problems.as_array().map(Vec::len), Some(1), "{problems}");
    assert_eq!(problems[0]["kind"], "Missing");
}
