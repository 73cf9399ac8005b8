//! Webhook gateway ingest, as a benchmark (not a timed test): signed
//! `shipment.confirmed` webhooks of about 1 KiB POSTed to one
//! `tallyman gateway` process over keep-alive HTTP/1.1 connections; each
//! answered 202 only after JetStream acknowledged the event. Everything on
//! this machine's cores: nats-server, the gateway and the load generator.
//!
//! ```text
//! cargo bench -p tallyman --bench gateway_ingest                          # as fast as possible
//! BENCH_RATE=5000 BENCH_WEBHOOKS=100000 cargo bench ... --bench gateway_ingest   # paced, for latency
//! ```
//!
//! Modes: `BENCH_WEBHOOKS` (default 50 000), `BENCH_RATE` (0, the default:
//! as fast as the connections allow; else webhooks/s on a fixed schedule),
//! `BENCH_CONNECTIONS` (default 32).
//!
//! Bodies and their `X-Signature` (hmac-sha256 with the example's `wms`
//! Secret) are built before the clock starts; every body has its own
//! `eventId`. Latency is from handing the request to the connection to the
//! whole response read. Paced runs also report latency from the scheduled
//! send time, which includes waiting for a free connection (so a stalled
//! gateway is not hidden by the load generator slowing down).
//!
//! Prints sent, 202s, other statuses, webhooks/s, p50/p99/max latency, CPU
//! seconds (during the run) and peak RSS of the gateway, nats-server and the
//! load generator, and checks that the events stream holds exactly one
//! message per 202.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper_util::rt::TokioIo;
use tallyman_testing::erp::{send, sign_hmac_sha256};
use tallyman_testing::nats::NatsServer;
use tallyman_testing::procstat::usage;
use tokio::net::TcpStream;

const NS: &str = "finance";
const PATH: &str = "/webhooks/finance/wms/shipments";
const SIGNATURE_HEADER: &str = "x-signature";
/// The size each body is padded up to (and never beyond).
const BODY_BYTES: usize = 1024;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shipment-to-invoice")
}

/// The `wms` Connector's signing secret, from the example's `secrets.yaml`.
fn wms_secret() -> Vec<u8> {
    let text = std::fs::read_to_string(example_dir().join("secrets.yaml")).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = <serde_json::Value as serde::Deserialize>::deserialize(doc).unwrap();
        if v["metadata"]["name"] == "wms-webhook" {
            return v["stringData"]["secret"]
                .as_str()
                .expect("wms-webhook has stringData.secret")
                .as_bytes()
                .to_vec();
        }
    }
    panic!("no Secret wms-webhook in the example's secrets.yaml");
}

/// A `shipment.confirmed` WMS webhook with its own event id, its `items`
/// padded to just under [`BODY_BYTES`].
fn body(i: usize) -> Bytes {
    let head = format!(
        r#"{{"eventId":"bench-evt-{i:08}","id":"SHP-{i:08}","orderRef":"ORD-{i:08}","status":"CONFIRMED","warehouse":"DE-HAM-1","carrier":"DHL","confirmedBy":"bench","items":["#
    );
    let mut text = head;
    let mut n = 0;
    loop {
        let item = format!(
            r#"{}{{"sku":"SKU-{n:05}","quantity":{}}}"#,
            if n == 0 { "" } else { "," },
            n % 9 + 1
        );
        if text.len() + item.len() + 2 > BODY_BYTES && n > 0 {
            break;
        }
        text.push_str(&item);
        n += 1;
    }
    text.push_str("]}");
    Bytes::from(text)
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// What one connection saw.
#[derive(Default)]
struct Tally {
    /// From handing the request to the connection to the response read.
    latencies: Vec<Duration>,
    /// From the scheduled send time (paced runs only).
    from_schedule: Vec<Duration>,
    statuses: BTreeMap<u16, usize>,
    errors: usize,
    last: Option<Instant>,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
}

/// One keep-alive connection taking the next webhook until none is left.
async fn drive(
    addr: SocketAddr,
    mut sender: Sender,
    requests: Arc<Vec<(Bytes, HeaderValue)>>,
    next: Arc<AtomicUsize>,
    start: Instant,
    rate: usize,
) -> Tally {
    let host = HeaderValue::from_str(&addr.to_string()).unwrap();
    let json = HeaderValue::from_static("application/json");
    let mut tally = Tally {
        latencies: Vec::with_capacity(requests.len() / 8),
        ..Tally::default()
    };
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some((body, signature)) = requests.get(i) else {
            break;
        };
        let due = (rate > 0).then(|| start + Duration::from_secs_f64(i as f64 / rate as f64));
        if let Some(due) = due {
            tokio::time::sleep_until(due.into()).await;
        }
        let mut request = hyper::Request::post(PATH)
            .body(Full::new(body.clone()))
            .unwrap();
        let headers = request.headers_mut();
        headers.insert(HOST, host.clone());
        headers.insert(CONTENT_TYPE, json.clone());
        headers.insert(SIGNATURE_HEADER, signature.clone());
        let sent = Instant::now();
        let answered = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            response.into_body().collect().await?;
            Ok::<u16, hyper::Error>(status)
        }
        .await;
        let done = Instant::now();
        match answered {
            Ok(status) => {
                *tally.statuses.entry(status).or_default() += 1;
                tally.latencies.push(done - sent);
                if let Some(due) = due {
                    tally
                        .from_schedule
                        .push(done.saturating_duration_since(due));
                }
            }
            Err(_) => {
                tally.errors += 1;
                sender = connect(addr).await;
            }
        }
        tally.last = Some(done);
    }
    tally
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}

async fn run(webhooks: usize, rate: usize, connections: usize) {
    let nats = NatsServer::start();
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let mut gateway: Child = Command::new(env!("CARGO_BIN_EXE_tallyman"))
        .args(["gateway", "--nats", &nats.url(), "--namespace", NS])
        .arg("--manifests")
        .arg(example_dir())
        .args(["--listen", &listen.to_string()])
        .args(["--metrics-listen", &metrics.to_string()])
        .args(["--reload-interval", "0s"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tallyman gateway");
    let ready_url = format!("http://{metrics}/readyz");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = send("GET", &ready_url, &[], Bytes::new()).await
            && r.status == 200
        {
            break;
        }
        assert!(
            gateway.try_wait().unwrap().is_none(),
            "the gateway exited before it was ready"
        );
        assert!(
            Instant::now() < deadline,
            "the gateway was not ready in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Everything the clock does not measure: bodies, signatures, connections.
    let secret = wms_secret();
    let requests: Vec<(Bytes, HeaderValue)> = (0..webhooks)
        .map(|i| {
            let body = body(i);
            let signature =
                HeaderValue::from_str(&format!("sha256={}", sign_hmac_sha256(&secret, &body)))
                    .unwrap();
            (body, signature)
        })
        .collect();
    let sizes = (
        requests.iter().map(|r| r.0.len()).min().unwrap_or(0),
        requests.iter().map(|r| r.0.len()).max().unwrap_or(0),
    );
    let requests = Arc::new(requests);
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(connect(listen).await);
    }
    let nats_pid = nats.pid();
    let before = (
        usage(gateway.id()).0,
        nats_pid.map_or(0.0, |p| usage(p).0),
        usage(std::process::id()).0,
    );

    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|s| {
            tokio::spawn(drive(
                listen,
                s,
                requests.clone(),
                next.clone(),
                start,
                rate,
            ))
        })
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.unwrap();
        all.latencies.extend(t.latencies);
        all.from_schedule.extend(t.from_schedule);
        for (s, n) in t.statuses {
            *all.statuses.entry(s).or_default() += n;
        }
        all.errors += t.errors;
        all.last = all.last.max(t.last);
    }
    let elapsed = all.last.unwrap_or(start).duration_since(start);
    let after = (
        usage(gateway.id()),
        nats_pid.map(usage).unwrap_or_default(),
        usage(std::process::id()),
    );

    let accepted = all.statuses.get(&202).copied().unwrap_or(0);
    let others: Vec<String> = all
        .statuses
        .iter()
        .filter(|(s, _)| **s != 202)
        .map(|(s, n)| format!("{s}×{n}"))
        .collect();
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js
        .get_stream(format!("TALLYMAN_{}_EVENTS", NS.to_uppercase()))
        .await
        .unwrap();
    let stored = stream.cached_info().state.messages;

    all.latencies.sort();
    all.from_schedule.sort();
    let per_sec = all.latencies.len() as f64 / elapsed.as_secs_f64();
    println!(
        "webhooks={webhooks} ({}–{} B) connections={connections} rate={}: sent={} accepted(202)={accepted} other={} errors={} in {:.2}s => {per_sec:.0} webhooks/s",
        sizes.0,
        sizes.1,
        if rate == 0 {
            "max".to_string()
        } else {
            format!("{rate}/s")
        },
        all.latencies.len() + all.errors,
        if others.is_empty() {
            "none".to_string()
        } else {
            others.join(",")
        },
        all.errors,
        elapsed.as_secs_f64(),
    );
    println!(
        "  latency (send → response read): p50={:.2}ms p99={:.2}ms max={:.2}ms",
        pct(&all.latencies, 0.50),
        pct(&all.latencies, 0.99),
        all.latencies
            .last()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1000.0,
    );
    if rate > 0 {
        println!(
            "  latency (scheduled → response read): p50={:.2}ms p99={:.2}ms max={:.2}ms",
            pct(&all.from_schedule, 0.50),
            pct(&all.from_schedule, 0.99),
            all.from_schedule
                .last()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1000.0,
        );
    }
    let n = accepted.max(1) as f64;
    for (name, cpu, rss) in [
        ("gateway", after.0.0 - before.0, after.0.1),
        ("nats-server", after.1.0 - before.1, after.1.1),
        ("load generator", after.2.0 - before.2, after.2.1),
    ] {
        println!(
            "  {name}: cpu={cpu:.1}s ({:.0} µs/webhook, {:.0}% of a core) peak_rss={rss:.0}MiB",
            cpu / n * 1e6,
            cpu / elapsed.as_secs_f64() * 100.0,
        );
    }
    println!("  events stream: {stored} messages");
    let _ = gateway.kill();
    let _ = gateway.wait();
    assert_eq!(
        stored, accepted as u64,
        "the events stream holds exactly one message per 202"
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let webhooks = env_usize("BENCH_WEBHOOKS", 50_000);
    let rate = env_usize("BENCH_RATE", 0);
    let connections = env_usize("BENCH_CONNECTIONS", 32).max(1);
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .unwrap_or("")
            .trim()
    );
    runtime.block_on(run(webhooks, rate, connections));
}
