//! CEL evaluation of the shipment-to-invoice example, the `cel` interpreter
//! against the fast evaluator (`tallyman_core::cel::fast`).
//!
//! ```sh
//! cargo bench -p tallyman-core --bench cel_eval
//! BENCH_ONLY=gateway BENCH_PATH=fast BENCH_ITERATIONS=500 valgrind --tool=callgrind target/release/deps/cel_eval-…
//! ```
//!
//! - `gateway`: what `Route::process` evaluates for one webhook of the
//!   `wms` Connector: parse the ~1 KiB body (28 items, as the
//!   `gateway_ingest` benchmark sends), bind it, `when`, `id`, `data` and
//!   the `data` JSON.
//! - `worker`: the expressions of one instance after both events and the
//!   order lookup arrived: parse the event data and the response as the
//!   engine's cache does, bind the step variables per step, evaluate the
//!   `price-lines` and `totals` sets, the `quantities-match` check, the
//!   invoice's idempotency key and body, and the `done` emit (JSON texts).
//!
//! `BENCH_PATH` is `interpreter`, `fast` or both (default); wall-clock
//! times are printed per iteration. Under load, count instructions with
//! callgrind instead (a run with `BENCH_ITERATIONS=0` gives the fixed cost).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use chrono::{DateTime, Utc};
use tallyman_core::cel::fast::Val;
use tallyman_core::cel::{Env, Program, Scope, Value, Vars, json};

fn example(kind: &str, name: &str) -> serde_json::Value {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/shipment-to-invoice");
    let loaded = tallyman_core::manifest::load(&[dir]);
    loaded
        .documents
        .into_iter()
        .map(|d| d.value)
        .find(|v| v["kind"] == kind && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the example"))
}

/// The body `gateway_ingest` sends: 28 items, just under 1 KiB.
fn body() -> Vec<u8> {
    let mut text = r#"{"eventId":"bench-evt-00000001","id":"SHP-00000001","orderRef":"ORD-00000001","status":"CONFIRMED","warehouse":"DE-HAM-1","carrier":"DHL","confirmedBy":"bench","items":["#.to_string();
    for n in 0..28 {
        if n > 0 {
            text.push(',');
        }
        text.push_str(&format!(
            r#"{{"sku":"SKU-{n:05}","quantity":{}}}"#,
            n % 9 + 1
        ));
    }
    text.push_str("]}");
    text.into_bytes()
}

struct Gateway {
    when: Program,
    id: Program,
    data: Program,
    body: Vec<u8>,
    now: DateTime<Utc>,
}

impl Gateway {
    fn new() -> Self {
        let c = example("Connector", "wms");
        let e = &c["spec"]["webhook"]["events"][0];
        let p = |f: &str| Program::compile(e[f].as_str().unwrap(), Scope::Webhook).unwrap();
        Gateway {
            when: p("when"),
            id: p("id"),
            data: p("data"),
            body: body(),
            now: Utc::now(),
        }
    }

    fn interpreter(&self) -> Self {
        Gateway {
            when: self.when.without_fast(),
            id: self.id.without_fast(),
            data: self.data.without_fast(),
            body: self.body.clone(),
            now: self.now,
        }
    }

    /// One webhook, as `Route::process` binds and evaluates it.
    fn run(&self, fast: bool) -> (bool, String, String) {
        let vars = if fast {
            Vars::new().with_fast("payload", json::parse_fast(&self.body).unwrap())
        } else {
            Vars::new().with("payload", json::parse(&self.body).unwrap())
        }
        .with("now", Value::Timestamp(self.now.fixed_offset()));
        let env = Env::new(&vars);
        let when = self.when.eval_bool_env(&env).unwrap();
        let id = self.id.eval_key_env(&env).unwrap();
        let data = self.data.evaluate_env(&env).unwrap().to_json().unwrap();
        (when, id, data)
    }
}

const ORDER: &str = r#"{"orderId":"ORD-1","customerId":"C-1","channel":"web"}"#;
const SHIPMENT: &str = r#"{"orderId":"ORD-1","shipmentId":"SH-1","warehouse":"HAM","confirmedBy":"wms-7","lines":[{"sku":"A","qty":2},{"sku":"B","qty":5}]}"#;
const ORDER_RESPONSE: &str = r#"{"status":200,"headers":{},"body":{"orderId":"ORD-1","customerId":"C-1","currency":"EUR","lines":[{"sku":"A","qty":2,"unitPrice":"19.99"},{"sku":"B","qty":5,"unitPrice":"4.50"}]}}"#;
const INVOICE_RESPONSE: &str = r#"{"status":201,"headers":{},"body":{"invoiceId":"INV-1","currency":"EUR","netAmount":"62.48"}}"#;

struct Worker {
    /// Per step: its expressions, with the variable a `set` stores.
    steps: Vec<Vec<(Option<String>, Program)>>,
    now: DateTime<Utc>,
}

impl Worker {
    fn new() -> Self {
        let w = example("Workflow", "shipment-to-invoice");
        let step = |name: &str| {
            w["spec"]["steps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == name)
                .unwrap()
                .clone()
        };
        let p = |src: &serde_json::Value| {
            (
                None,
                Program::compile(src.as_str().unwrap(), Scope::Step).unwrap(),
            )
        };
        let set = |name: &str| -> Vec<(Option<String>, Program)> {
            step(name)["set"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (Some(k.clone()), p(v).1))
                .collect()
        };
        let invoice = step("invoice");
        Worker {
            steps: vec![
                set("price-lines"),
                set("totals"),
                vec![p(&step("quantities-match")["check"])],
                vec![
                    p(&invoice["call"]["idempotencyKey"]),
                    p(&invoice["call"]["body"]),
                ],
                vec![p(&step("done")["emit"]["data"])],
            ],
            now: Utc::now(),
        }
    }

    fn interpreter(&self) -> Self {
        Worker {
            steps: self
                .steps
                .iter()
                .map(|s| {
                    s.iter()
                        .map(|(n, p)| (n.clone(), p.without_fast()))
                        .collect()
                })
                .collect(),
            now: self.now,
        }
    }

    /// One instance's expressions; the JSON texts they give. Like the
    /// engine: each event's data, each response and each variable is parsed
    /// once, and the step variables are bound per step from those values.
    fn run(&self, fast: bool) -> Vec<String> {
        let mut cache = if fast {
            Cache::Fast(Default::default())
        } else {
            Cache::Cel(Default::default())
        };
        cache.event("order.created", ORDER);
        cache.event("shipment.confirmed", SHIPMENT);
        cache.response("order", ORDER_RESPONSE);
        let mut out = Vec::new();
        for (n, programs) in self.steps.iter().enumerate() {
            if n == 4 {
                cache.response("invoice", INVOICE_RESPONSE);
            }
            let bound = cache.bind(self.now);
            let mut set = Vec::new();
            for (name, p) in programs {
                let text = p.evaluate(&bound).unwrap().to_json().unwrap();
                if let Some(name) = name {
                    set.push((name.clone(), text.clone()));
                }
                out.push(text);
            }
            for (name, text) in set {
                cache.var(&name, &text);
            }
        }
        out
    }
}

/// Parsed events (by type), responses (by step) and variables, in one form.
struct Parsed<T> {
    events: Vec<(String, T)>,
    steps: Vec<(String, T)>,
    vars: Vec<(String, T)>,
}

impl<T> Default for Parsed<T> {
    fn default() -> Self {
        Parsed {
            events: Vec::new(),
            steps: Vec::new(),
            vars: Vec::new(),
        }
    }
}

enum Cache {
    Fast(Parsed<Val>),
    Cel(Parsed<Value>),
}

fn cel_map(entries: &[(String, Value)]) -> Value {
    Value::from(
        entries
            .iter()
            .cloned()
            .collect::<std::collections::HashMap<String, Value>>(),
    )
}

impl Cache {
    fn event(&mut self, ty: &str, data: &str) {
        let strings = [
            ("id", "e-1"),
            ("type", ty),
            ("source", "bench"),
            ("time", "t"),
        ];
        match self {
            Cache::Fast(p) => {
                let mut entries: Vec<(&str, Val)> =
                    strings.iter().map(|(k, v)| (*k, Val::str(v))).collect();
                entries.push(("data", json::parse_fast(data.as_bytes()).unwrap()));
                p.events.push((ty.to_string(), Val::map(entries)));
            }
            Cache::Cel(p) => {
                let mut entries: Vec<(String, Value)> = strings
                    .iter()
                    .map(|(k, v)| (k.to_string(), Value::String(v.to_string().into())))
                    .collect();
                entries.push(("data".into(), json::parse(data.as_bytes()).unwrap()));
                p.events.push((ty.to_string(), cel_map(&entries)));
            }
        }
    }

    fn response(&mut self, step: &str, text: &str) {
        match self {
            Cache::Fast(p) => p.steps.push((
                step.to_string(),
                Val::map([("response", json::parse_fast(text.as_bytes()).unwrap())]),
            )),
            Cache::Cel(p) => p.steps.push((
                step.to_string(),
                cel_map(&[("response".into(), json::parse(text.as_bytes()).unwrap())]),
            )),
        }
    }

    fn var(&mut self, name: &str, text: &str) {
        match self {
            Cache::Fast(p) => p
                .vars
                .push((name.to_string(), json::parse_fast(text.as_bytes()).unwrap())),
            Cache::Cel(p) => p
                .vars
                .push((name.to_string(), json::parse(text.as_bytes()).unwrap())),
        }
    }

    /// The step variables, as `Machine::vars` binds them.
    fn bind(&self, now: DateTime<Utc>) -> Vars {
        let now = Value::Timestamp(now.fixed_offset());
        match self {
            Cache::Fast(p) => {
                let event = p.events[1].1.clone();
                let map =
                    |e: &[(String, Val)]| Val::map(e.iter().map(|(k, v)| (k.as_str(), v.clone())));
                Vars::new()
                    .with_fast("key", Val::str("ORD-1"))
                    .with_fast("event", event)
                    .with_fast("events", map(&p.events))
                    .with_fast("steps", map(&p.steps))
                    .with_fast("vars", map(&p.vars))
                    .with("now", now)
            }
            Cache::Cel(p) => Vars::new()
                .with("key", Value::String("ORD-1".to_string().into()))
                .with("event", p.events[1].1.clone())
                .with("events", cel_map(&p.events))
                .with("steps", cel_map(&p.steps))
                .with("vars", cel_map(&p.vars))
                .with("now", now),
        }
    }
}

fn time<T>(label: &str, iterations: usize, f: impl Fn() -> T) {
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(f());
    }
    if iterations > 0 {
        let per = start.elapsed() / iterations as u32;
        println!("{label:<24} {per:>10.2?} per iteration ({iterations} iterations)");
    }
}

fn main() {
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let path = std::env::var("BENCH_PATH").unwrap_or_default();
    let (interpreter, fast) = match path.as_str() {
        "interpreter" => (true, false),
        "fast" => (false, true),
        _ => (true, true),
    };

    if only.is_empty() || only == "gateway" {
        let g = Gateway::new();
        let old = g.interpreter();
        assert!(g.when.is_fast() && g.id.is_fast() && g.data.is_fast());
        // Both paths give the same event.
        assert_eq!(g.run(true), old.run(false));
        if interpreter {
            time("gateway interpreter", iterations, || old.run(false));
        }
        if fast {
            time("gateway fast", iterations, || g.run(true));
        }
    }
    if only.is_empty() || only == "worker" {
        let w = Worker::new();
        let old = w.interpreter();
        assert!(w.steps.iter().flatten().all(|(_, p)| p.is_fast()));
        assert_eq!(w.run(true), old.run(false));
        if interpreter {
            time("worker interpreter", iterations, || old.run(false));
        }
        if fast {
            time("worker fast", iterations, || w.run(true));
        }
    }
}
