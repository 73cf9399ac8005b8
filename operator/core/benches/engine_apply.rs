//! The step machine's share of one shipment-to-invoice instance, without
//! the broker and the ERP: what the worker's CPU does between taking an
//! order's two events and storing the instance.
//!
//! ```sh
//! cargo bench -p tallyman-core --bench engine_apply
//! BENCH_ITERATIONS=200 valgrind --tool=callgrind target/release/deps/engine_apply-…   # instructions
//! ```
//!
//! Per instance, as `tallyman worker` does for an order whose two events
//! arrived together: correlate both events (parsing their data), apply them
//! to a new instance in one machine, answer the ERP's `getOrder` and
//! `createInvoice` with the bodies and headers the simulated ERP sends,
//! settle the wake-up, seal the audit records into one message and
//! serialize the instance for the store. The payloads are those of the
//! `shipment_to_invoice` benchmark. Wall-clock time per instance is
//! printed; under load, count instructions with callgrind instead (a run
//! with `BENCH_ITERATIONS=0` gives the fixed cost).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use chrono::Utc;
use tallyman_core::engine::{
    CallResult, Compiled, Event, Input, Instance, Machine, Next, Status, Values, id_prefix,
};
use tallyman_core::validate;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn compiled() -> Compiled {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/shipment-to-invoice");
    let report = validate::validate_paths(&[dir]);
    assert!(!report.has_errors(), "the example does not validate");
    let def = report
        .definition("finance", "shipment-to-invoice")
        .expect("resolves");
    Compiled::new(def).expect("compiles")
}

/// The two events of order `i`, as the benchmark's load publishes them.
fn events(i: usize) -> [Event; 2] {
    let order = format!("ORD-{i}");
    let event = |ty: &str, data: String| Event {
        id: format!("{ty}-{i}"),
        type_: ty.into(),
        source: "bench".into(),
        time: "2026-11-26T09:00:00Z".into(),
        data,
    };
    [
        event(
            "order.created",
            format!(r#"{{"orderId":"{order}","customerId":"C-{i}","channel":"web"}}"#),
        ),
        event(
            "shipment.confirmed",
            format!(
                r#"{{"orderId":"{order}","shipmentId":"SH-{i}","warehouse":"HAM","confirmedBy":"wms-7","lines":[{{"sku":"A","qty":2}},{{"sku":"B","qty":5}}]}}"#
            ),
        ),
    ]
}

/// What the simulated ERP answers: the order, or the invoice (the posted
/// body with its new id).
fn answer(action: &str, i: usize, body: Option<&str>) -> CallResult {
    let headers = BTreeMap::from([("content-type".to_string(), "application/json".to_string())]);
    let (status, body) = match action {
        "getOrder" => (
            200,
            format!(
                r#"{{"orderId":"ORD-{i}","customerId":"C-{i}","currency":"EUR","lines":[{{"sku":"A","qty":2,"unitPrice":"19.99"}},{{"sku":"B","qty":5,"unitPrice":"4.50"}}]}}"#
            ),
        ),
        "createInvoice" => {
            let posted = body.expect("the invoice has a body");
            (
                201,
                format!(r#"{{"invoiceId":"INV-{i:06}",{}"#, &posted[1..]),
            )
        }
        other => panic!("the example calls no {other}"),
    };
    CallResult::Response {
        status,
        headers,
        body,
        attempts: 1,
    }
}

/// One instance from its two events to the bytes the worker stores.
fn instance(def: &Compiled, i: usize) -> usize {
    let mut values = Values::default();
    let inputs: Vec<Input> = events(i)
        .into_iter()
        .map(|ev| {
            let key = Machine::correlate_into(def, &ev, &mut values).expect("correlates");
            assert_eq!(key, format!("ORD-{i}"));
            Input::Event(ev)
        })
        .collect();
    let key = format!("ORD-{i}");
    let now = Utc::now();
    let machine = Machine::with_values(def, now, values);
    let mut inst = Instance::new(&key, &def.revision, now.timestamp_millis());
    for input in inputs {
        let mut next = machine.apply(&mut inst, input);
        while let Next::Call(plan) | Next::Lookup(plan) = next {
            let result = answer(&plan.action, i, plan.body.as_deref());
            next = machine.apply(&mut inst, Input::CallDone(result));
        }
    }
    assert_eq!(inst.status, Status::Completed, "{:?}", inst.outcome);
    inst.settle_wake(None, false);
    inst.seal_audits(&id_prefix(&def.def.namespace, &def.def.workflow, &key))
        .expect("seals");
    let bytes = serde_json::to_vec(&inst).expect("serializes");
    black_box(machine.into_values());
    bytes.len()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is read from the line.
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let def = compiled();
    // Warm up, and check the instance completes.
    let stored = instance(&def, 0);
    let started = Instant::now();
    for i in 1..=iterations {
        black_box(instance(&def, i));
    }
    let elapsed = started.elapsed();
    if iterations > 0 {
        println!(
            "engine_apply: {iterations} instances in {:.2?}: {:.1} µs per instance ({stored} bytes stored each)",
            elapsed,
            elapsed.as_secs_f64() * 1e6 / iterations as f64
        );
    }
}
