//! Shipment-to-invoice end to end, as a benchmark (not a timed test):
//! events published to JetStream, correlated order + shipment, GET the
//! order, compare, POST the invoice to the simulated ERP over HTTP, emit
//! invoice.created. Everything on this machine's cores: nats-server, the
//! ERP, the load and 1 or 2 `tallyman worker` processes.
//!
//! ```text
//! cargo bench -p tallyman --bench shipment_to_invoice                 # both worker counts, max rate
//! BENCH_WORKERS=1 BENCH_ORDERS=20000 BENCH_RATE=1500 cargo bench ...  # paced, for latency
//! BENCH_CONNECTIONS=2 ...                                               # NATS connections per worker (4)
//! BENCH_IN_FLIGHT=64 ...                                                # messages in flight per worker (256)
//! BENCH_HOLD=1 BENCH_WORKERS=1 BENCH_ORDERS=20000 cargo bench ...        # memory of held instances
//! BENCH_LATENCIES=FILE ...      # each instance's "sent_ms latency_ms", to see when the slow ones were
//! ```
//!
//! The load and the ERP stand for systems elsewhere; here they share the
//! cores with what is measured, so they run lean: one thread (a
//! current-thread runtime) and mimalloc, as the workers have.
//!
//! Prints instances/s, p50/p99 latency (second event published → the
//! invoice.created event received), CPU seconds and peak RSS per process,
//! the share of the cores busy and the CPU per instance over the timed run,
//! and checks that every order has exactly one invoice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt;
use tallyman_testing::erp::SimErp;
use tallyman_testing::nats::NatsServer;
use tallyman_testing::orders;
use tallyman_testing::procstat::{rss_mib, usage};

const NS: &str = "finance";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The example's manifests without the production rate limit on the ERP.
fn manifests(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shipment-to-invoice");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let text: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("rateLimit:"))
                .collect::<Vec<_>>()
                .join("\n");
            std::fs::write(dir.join(path.file_name().unwrap()), text).unwrap();
        }
    }
    dir.to_path_buf()
}

/// Publishes events to JetStream as the load does: with `Nats-Msg-Id`, up
/// to 256 acknowledgements awaited together.
struct Load {
    js: jetstream::Context,
    pending: Vec<jetstream::context::PublishAckFuture>,
}

impl Load {
    fn new(js: &jetstream::Context) -> Self {
        Self {
            js: js.clone(),
            pending: Vec::with_capacity(256),
        }
    }

    async fn publish(&mut self, ty: &str, id: &str, payload: String) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        self.pending.push(
            self.js
                .publish_with_headers(
                    format!("tallyman.{NS}.events.{ty}"),
                    headers,
                    Bytes::from(payload),
                )
                .await
                .unwrap(),
        );
        if self.pending.len() >= 256 {
            self.flush().await;
        }
    }

    /// Wait for every acknowledgement outstanding.
    async fn flush(&mut self) {
        for ack in self.pending.drain(..) {
            ack.await.unwrap();
        }
    }
}

struct Proc {
    name: String,
    child: Child,
}

async fn run(workers: usize, orders: usize, rate: usize) {
    let nats = NatsServer::start();
    let erp = SimErp::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = manifests(tmp.path());
    let mut procs = Vec::new();
    for w in 0..workers {
        let child = Command::new(env!("CARGO_BIN_EXE_tallyman"))
            .args([
                "worker",
                "--nats",
                &nats.url(),
                "--namespace",
                NS,
                "--workflow",
                "shipment-to-invoice",
            ])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--max-in-flight",
                &env_usize("BENCH_IN_FLIGHT", 256).to_string(),
                "--connections",
                &env_usize("BENCH_CONNECTIONS", 4).to_string(),
            ])
            .arg("--manifests")
            .arg(&dir)
            .args(["--connector-url", &format!("erp={}", erp.base_url())])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("tallyman worker");
        procs.push(Proc {
            name: format!("worker-{w}"),
            child,
        });
    }
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    // Wait for the workers to create the stream.
    while js
        .get_stream(format!("TALLYMAN_{}_EVENTS", NS.to_uppercase()))
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..orders {
        erp.seed_order(orders::order(i));
    }
    if std::env::var_os("BENCH_HOLD").is_some() {
        held_memory(&js, &procs, orders).await;
        for p in &mut procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        return;
    }
    let sent: Arc<Mutex<HashMap<String, Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(orders)));
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::with_capacity(orders)));
    let mut sub = client
        .subscribe(format!("tallyman.{NS}.events.invoice.created"))
        .await
        .unwrap();
    let done = {
        let sent = sent.clone();
        let latencies = latencies.clone();
        let base = Instant::now();
        let mut series = std::env::var_os("BENCH_LATENCIES").map(|path| {
            let mut out =
                std::io::BufWriter::new(std::fs::File::create(&path).unwrap_or_else(|e| {
                    panic!("BENCH_LATENCIES: cannot create {}: {e}", path.display())
                }));
            // When 0 ms was, to line the series up with other recordings.
            let epoch = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            use std::io::Write;
            writeln!(out, "# 0 ms = {:.3} s since the epoch", epoch.as_secs_f64())
                .expect("BENCH_LATENCIES: write");
            out
        });
        tokio::spawn(async move {
            let mut last = Instant::now();
            while latencies.lock().unwrap().len() < orders {
                let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(60), sub.next()).await
                else {
                    break;
                };
                let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
                let order = v["data"]["orderId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if let Some(t) = sent.lock().unwrap().get(&order) {
                    let latency = t.elapsed();
                    latencies.lock().unwrap().push(latency);
                    if let Some(out) = series.as_mut() {
                        use std::io::Write;
                        writeln!(
                            out,
                            "{:.3} {:.3}",
                            t.duration_since(base).as_secs_f64() * 1e3,
                            latency.as_secs_f64() * 1e3
                        )
                        .expect("BENCH_LATENCIES: write");
                    }
                }
                last = Instant::now();
            }
            last
        })
    };
    // CPU from here to the last invoice: what the timed run cost, without
    // start-up, stream creation and seeding the ERP.
    let cpu_now = |procs: &[Proc]| {
        (
            usage(std::process::id()).0,
            nats.pid().map_or(0.0, |pid| usage(pid).0),
            procs.iter().map(|p| usage(p.child.id()).0).sum::<f64>(),
        )
    };
    let cpu_before = cpu_now(&procs);
    let start = Instant::now();
    let mut load = Load::new(&js);
    for i in 0..orders {
        if rate > 0 {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        for (ty, id, payload) in orders::events(i, "bench") {
            if ty == "shipment.confirmed" {
                sent.lock()
                    .unwrap()
                    .insert(format!("ORD-{i}"), Instant::now());
            }
            load.publish(ty, &id, payload).await;
        }
    }
    load.flush().await;
    let published = start.elapsed();
    let last = done.await.unwrap();
    let cpu_after = cpu_now(&procs);
    let elapsed = last.duration_since(start);
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let invoices = erp.invoices();
    let mut ids: Vec<String> = invoices
        .iter()
        .filter_map(|d| d.str_field("orderId"))
        .collect();
    ids.sort();
    ids.dedup();
    println!(
        "workers={workers} orders={orders} rate={} published_in={:.2}s completed={} in {:.2}s => {:.0} instances/s; latency p50={:.1}ms p99={:.1}ms; invoices={} distinct={} duplicates={}",
        if rate == 0 {
            "max".to_string()
        } else {
            format!("{rate}/s")
        },
        published.as_secs_f64(),
        lat.len(),
        elapsed.as_secs_f64(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
        invoices.len(),
        ids.len(),
        invoices.len() - ids.len(),
    );
    // Each commit publishes one audit message; a commit that leaves an
    // instance waiting schedules its wake-up, removed when it ends.
    let state = |stream: &'static str| {
        let js = js.clone();
        async move {
            let name = format!("TALLYMAN_{}_{stream}", NS.to_uppercase());
            let mut stream = js.get_stream(name).await.unwrap();
            stream.info().await.unwrap().state.clone()
        }
    };
    let commits = state("AUDIT").await.messages;
    let timers = state("TIMERS").await;
    println!(
        "  commits={commits} ({:.2} per instance), wake-ups scheduled={} left={}",
        commits as f64 / orders as f64,
        timers.last_sequence,
        timers.messages
    );
    let me = usage(std::process::id());
    println!(
        "  bench process (load + ERP): cpu={:.1}s peak_rss={:.0}MiB",
        me.0, me.1
    );
    if let Some(pid) = nats.pid() {
        let u = usage(pid);
        println!("  nats-server: cpu={:.1}s peak_rss={:.0}MiB", u.0, u.1);
    }
    for p in &mut procs {
        let u = usage(p.child.id());
        println!("  {}: cpu={:.1}s peak_rss={:.0}MiB", p.name, u.0, u.1);
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
    // Over the timed run only. The load and the ERP do the same work per
    // instance in every run, so CPU over theirs compares builds across the
    // machine's speed drifts.
    let bench_cpu = cpu_after.0 - cpu_before.0;
    let broker_cpu = cpu_after.1 - cpu_before.1;
    let workers_cpu = cpu_after.2 - cpu_before.2;
    let per = |cpu: f64| cpu * 1e6 / orders as f64;
    println!(
        "  timed run: {:.0} % of the machine's cores busy; CPU per instance: workers {:.0} µs, nats-server {:.0} µs, load + ERP {:.0} µs; over load + ERP: workers {:.2}, nats-server {:.2}",
        100.0 * (bench_cpu + broker_cpu + workers_cpu)
            / elapsed.as_secs_f64()
            / std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
        per(workers_cpu),
        per(broker_cpu),
        per(bench_cpu),
        workers_cpu / bench_cpu,
        broker_cpu / bench_cpu
    );
    assert_eq!(invoices.len(), orders, "every order invoiced exactly once");
    assert_eq!(ids.len(), orders);
}

/// `BENCH_HOLD=1` (with one worker): only each order's `order.created`, so
/// every instance waits for its shipment and the worker holds it in
/// memory. Prints the worker's resident memory per instance held, also
/// over the size it is stored as (what the `--instance-cache-mib` budget
/// multiplies; the budget must hold them all).
async fn held_memory(js: &jetstream::Context, procs: &[Proc], orders: usize) {
    let pid = procs[0].child.id();
    let before = rss_mib(pid);
    let mut load = Load::new(js);
    for i in 0..orders {
        let [(ty, id, payload), _] = orders::events(i, "bench");
        load.publish(ty, &id, payload).await;
    }
    load.flush().await;
    let names = tallyman_worker::names::Names::new(NS, "shipment-to-invoice");
    let kv = js.get_key_value(names.instances_bucket()).await.unwrap();
    let mut bucket = js
        .get_stream(format!("KV_{}", names.instances_bucket()))
        .await
        .unwrap();
    // The stream's state read afresh each time (the store's status is the
    // info it was opened with).
    while (bucket.info().await.unwrap().state.messages as usize) < orders {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored = kv.get("ORD-0").await.unwrap().map_or(0, |v| v.len());
    // Let the last commits settle into the held set.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_mib(pid);
    let per = (after - before) * 1_048_576.0 / orders as f64;
    println!(
        "held instances: {orders}, stored {stored} bytes each; worker resident memory {before:.1} -> {after:.1} MiB: {per:.0} bytes per instance, {:.1} times the stored size",
        per / stored as f64
    );
}

// The load and the ERP allocate per request: glibc's malloc and free were
// about 15 % of their CPU samples.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    // One thread: two cost the load and the ERP a fifth more CPU per
    // instance (waking and stealing from each other) and competed with the
    // workers and the broker for the two cores.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let orders = env_usize("BENCH_ORDERS", 20_000);
    let rate = env_usize("BENCH_RATE", 0);
    let counts: Vec<usize> = match std::env::var("BENCH_WORKERS") {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => vec![1, 2],
    };
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
    for workers in counts {
        runtime.block_on(run(workers, orders, rate));
    }
}
