//! Differential tests: every expression of the examples, and expressions
//! written to hit the corners (absent fields, wrong types, many decimal
//! digits, division by zero, `&&`/`||` with an erroring side), through the
//! fast evaluator and the `cel` interpreter, over fixtures and random
//! mutations of them. Where the fast evaluator answers, the interpreter
//! must give the same value (same types, same decimal digits); where it
//! says the expression fails, the interpreter must fail too.

use std::path::PathBuf;
use std::sync::Arc;

use kube_cel::cel::objects::{Key, Value};
use proptest::prelude::*;

use super::{Fail, Val};
use crate::cel::finance::as_decimal;
use crate::cel::{Program, Scope, Vars, json};

/// Exactly the same value: same variants, decimals with the same digits.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        (Value::UInt(x), Value::UInt(y)) => x == y,
        (Value::Float(x), Value::Float(y)) => {
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
        }
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Timestamp(x), Value::Timestamp(y)) => x == y && x.offset() == y.offset(),
        (Value::List(x), Value::List(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(v, w)| same(v, w))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.map.len() == y.map.len()
                && x.map
                    .iter()
                    .all(|(k, v)| y.map.get(k).is_some_and(|w| same(v, w)))
        }
        _ => match (as_decimal(a), as_decimal(b)) {
            (Some(x), Some(y)) => x.to_string() == y.to_string(),
            _ => false,
        },
    }
}

/// How the two evaluators compared on one expression.
#[derive(Default, Debug)]
struct Tally {
    agreed_value: usize,
    agreed_error: usize,
    left_to_interpreter: usize,
}

fn check(p: &Program, vars: &Vars, tally: &mut Tally) {
    let (fast, slow) = p.differential(vars);
    match (fast, slow) {
        (Some(Ok(f)), Ok(s)) => {
            assert!(
                same(&f.to_value(), &s),
                "`{}`: fast {f:?}, interpreter {s:?}",
                p.source()
            );
            // The JSON writers agree too.
            if let Ok(text) = json::to_string(&s) {
                assert_eq!(f.to_json().unwrap(), text, "`{}`", p.source());
            }
            tally.agreed_value += 1;
        }
        (Some(Ok(f)), Err(e)) => panic!(
            "`{}`: fast gave {f:?}, the interpreter failed: {}",
            p.source(),
            e.message
        ),
        (Some(Err(Fail::Error)), Ok(s)) => {
            panic!("`{}`: fast failed, the interpreter gave {s:?}", p.source())
        }
        (Some(Err(Fail::Error)), Err(_)) => tally.agreed_error += 1,
        (Some(Err(Fail::Bail)), _) | (None, _) => tally.left_to_interpreter += 1,
    }
    // Whichever path runs, the public API answers as the interpreter does.
    let (_, slow) = p.differential(vars);
    match (p.eval(vars), slow) {
        (Ok(a), Ok(b)) => assert!(same(&a, &b), "`{}`", p.source()),
        // Messages may print a map in hash order: compare error-ness only.
        (Err(_), Err(_)) => {}
        (a, b) => panic!("`{}`: {a:?} vs {b:?}", p.source()),
    }
}

/// Every expression of `examples/`, with the scope it is compiled in.
fn example_expressions() -> Vec<(String, Scope)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let loaded = crate::manifest::load(&[root]);
    assert!(loaded.parse_errors.is_empty() && loaded.read_errors.is_empty());
    let mut out = Vec::new();
    for doc in &loaded.documents {
        let kind = doc.value["kind"].as_str().unwrap_or_default();
        let spec = &doc.value["spec"];
        match kind {
            "Connector" => {
                for e in spec["webhook"]["events"].as_array().into_iter().flatten() {
                    for f in ["when", "id", "data"] {
                        if let Some(s) = e[f].as_str() {
                            out.push((s.to_string(), Scope::Webhook));
                        }
                    }
                }
            }
            "ApprovalPolicy" => {
                for r in spec["rules"].as_array().into_iter().flatten() {
                    if let Some(s) = r["when"].as_str() {
                        out.push((s.to_string(), Scope::Policy));
                    }
                }
            }
            "Workflow" => {
                if let Some(s) = spec["trigger"]["correlate"].as_str() {
                    out.push((s.to_string(), Scope::Correlate));
                }
                workflow_expressions(&spec["steps"], &mut out);
            }
            _ => {}
        }
    }
    out
}

fn workflow_expressions(v: &serde_json::Value, out: &mut Vec<(String, Scope)>) {
    const SINGLE: &[&str] = &[
        "when",
        "check",
        "data",
        "initiator",
        "idempotencyKey",
        "body",
        "until",
    ];
    const MAPS: &[&str] = &["set", "params", "facts"];
    match v {
        serde_json::Value::Array(items) => items.iter().for_each(|i| workflow_expressions(i, out)),
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("found", serde_json::Value::String(s)) => out.push((s.clone(), Scope::Lookup)),
                    (k, serde_json::Value::String(s)) if SINGLE.contains(&k) => {
                        out.push((s.clone(), Scope::Step))
                    }
                    (k, serde_json::Value::Object(m)) if MAPS.contains(&k) => {
                        for s in m.values().filter_map(|s| s.as_str()) {
                            out.push((s.to_string(), Scope::Lookup));
                        }
                    }
                    _ => workflow_expressions(v, out),
                }
            }
        }
        _ => {}
    }
}

/// One webhook payload holding the fields of every example's webhooks.
const PAYLOAD: &str = r#"{
  "topic": "orders/create", "webhookId": "wh_01HZX",
  "order": {"number": "4711", "channel": "web", "customer": {"id": "C-1001"},
            "currency": "EUR", "totalPrice": "79.60",
            "lineItems": [{"sku": "A-100", "quantity": 3, "price": "19.90"}, {"sku": "B-7", "quantity": 1, "price": 0.1}]},
  "eventId": "evt-88121", "id": "SHP-5531", "orderRef": "4711", "status": "CONFIRMED",
  "warehouse": "DE-HAM-1", "carrier": "DHL", "confirmedBy": "j.smith",
  "items": [{"sku": "A-100", "quantity": 3, "grade": "B"}, {"sku": "B-7", "quantity": 2, "grade": "A"}],
  "kind": "STOCK_ADJUSTMENT", "reasonCode": "SHRINKAGE", "user": "k.meyer", "timestamp": "2025-06-03T08:12:00Z",
  "lines": [{"sku": "TV-55", "location": "H01-01", "delta": -30, "unitCost": "412.50", "received": 1000, "damaged": 3}],
  "eventType": "RETURN_RECEIVED", "rma": "RMA-20931", "customerId": "C-1001", "receivedBy": "j.smith",
  "inspectedBy": "m.mueller",
  "event": "PurchaseOrder.Created", "messageId": "msg-7781",
  "purchaseOrder": {"number": "PO-2025-0815", "vendor": {"id": "V-0042", "name": "Acme Fasteners"},
                    "currency": "EUR", "createdBy": "buyer.jane",
                    "lines": [{"lineNo": 10, "material": "BOLT-M8", "quantity": 1000, "netPrice": "0.12"}]},
  "type": "GOODS_RECEIPT", "poNumber": "PO-2025-0815",
  "documentType": "INVOICE", "documentId": "DOC-552190", "capturedBy": "ap.clerk",
  "invoice": {"number": "ACME-99812", "vendorId": "V-0042", "poReference": "PO-2025-0815",
              "currency": "EUR", "dueDate": "2025-07-02", "netTotal": "120.40", "taxTotal": "22.88",
              "lines": [{"sku": "BOLT-M8", "quantity": 1000, "unitPrice": "0.1204"}]}
}"#;

/// The step variables of every example workflow at once.
const EVENTS: &str = r#"{
  "order.created": {"id": "e1", "type": "order.created", "source": "finance/shop", "time": "t",
    "data": {"orderId": "4711", "channel": "web", "customerId": "C-1001", "currency": "EUR",
             "lines": [{"sku": "A-100", "qty": 3, "unitPrice": 19.90}]}},
  "shipment.confirmed": {"id": "e2", "type": "shipment.confirmed", "source": "finance/wms", "time": "t",
    "data": {"orderId": "4711", "shipmentId": "SHP-5531", "warehouse": "DE-HAM-1", "carrier": "DHL",
             "confirmedBy": "j.smith", "lines": [{"sku": "A-100", "qty": 3}, {"sku": "A-100", "qty": 1}, {"sku": "C-9", "qty": 2}]}},
  "return.received": {"id": "e3", "type": "return.received", "source": "s", "time": "t",
    "data": {"rmaNumber": "RMA-1", "orderId": "4711", "customerId": "C-1001", "receivedBy": "j.smith",
             "lines": [{"sku": "A-100", "qty": 2}]}},
  "return.inspected": {"id": "e4", "type": "return.inspected", "source": "s", "time": "t",
    "data": {"rmaNumber": "RMA-1", "inspectedBy": "m.mueller",
             "lines": [{"sku": "A-100", "qty": 2, "grade": "B"}, {"sku": "C-9", "qty": 1, "grade": "C"}]}},
  "po.created": {"id": "e5", "type": "po.created", "source": "s", "time": "t",
    "data": {"poNumber": "PO-1", "vendorId": "V-0042", "currency": "EUR",
             "lines": [{"lineNo": 10, "sku": "BOLT-M8", "qty": 1000, "unitPrice": "0.12"}]}},
  "goods.received": {"id": "e6", "type": "goods.received", "source": "s", "time": "t",
    "data": {"poNumber": "PO-1", "receiptId": "GR-1", "lines": [{"sku": "BOLT-M8", "qty": 1000}]}},
  "vendor-invoice.received": {"id": "e7", "type": "vendor-invoice.received", "source": "s", "time": "t",
    "data": {"poNumber": "PO-1", "invoiceId": "DOC-1", "vendorInvoiceNumber": "A-1", "currency": "EUR",
             "netTotal": "120.40", "taxTotal": "22.88", "dueAt": "2025-07-02T00:00:00Z", "capturedBy": "ap.clerk",
             "lines": [{"sku": "BOLT-M8", "qty": 1000, "unitPrice": "0.1204"}]}},
  "inventory.adjusted": {"id": "e8", "type": "inventory.adjusted", "source": "s", "time": "t",
    "data": {"adjustmentId": "ADJ-1", "warehouse": "DE-HAM-1", "adjustedBy": "k.meyer", "reasonCode": "SHRINKAGE",
             "lines": [{"sku": "TV-55", "delta": -30, "unitCost": "412.50"}, {"sku": "TV-56", "delta": 2, "unitCost": 0.1}]}}
}"#;

const STEPS: &str = r#"{
  "order": {"response": {"status": 200, "headers": {}, "body": {"customerId": "C-1001", "currency": "EUR",
    "lines": [{"sku": "A-100", "qty": 3, "unitPrice": "19.90"}, {"sku": "C-9", "qty": 2, "unitPrice": 0.1}]}}},
  "invoice": {"response": {"status": 201, "headers": {}, "body": {"invoiceId": "INV-1", "currency": "EUR", "netAmount": 79.60}}},
  "credit": {"response": {"status": 201, "headers": {}, "body": {"number": "CN-1"}}},
  "payment": {"response": {"status": 201, "headers": {}, "body": {"approvalId": "PA-1", "scheduledFor": "2025-07-01"}}},
  "post": {"response": {"status": 201, "headers": {}, "body": {"documentNumber": "D-1"}}}
}"#;

const VARS: &str = r#"{
  "lines": [{"sku": "A-100", "ordered": 3, "shipped": 4, "unitPrice": 19.90, "qty": 2, "grade": "B", "rate": 0.85},
            {"sku": "C-9", "ordered": 2, "shipped": 2, "unitPrice": 0.1, "qty": 1, "grade": "C", "rate": 0.5}],
  "orderValue": 59.90, "shippedValue": 79.80, "varianceValue": 19.90,
  "fullValue": 39.90, "creditAmount": 33.87,
  "quantitiesMatch": true, "currencyMatches": true, "poValue": 120.00, "invoiceNet": 120.40, "payable": 143.28,
  "netValue": -12375.00, "grossValue": 12375.00
}"#;

const FACTS: &str = r#"{"amount": 19.90, "variancePercent": 0.33, "grossValue": 999.99,
  "reasonCode": "CYCLE_COUNT", "skus": ["A-100"]}"#;

const RESPONSE: &str =
    r#"{"status": 200, "headers": {}, "body": {"externalReference": "rma-RMA-1"}}"#;

/// The variables of every scope, from JSON texts (mutated by the tests).
fn world(texts: &[(&'static str, Val)]) -> Vars {
    let mut vars = Vars::new()
        .with_fast("key", Val::str("4711"))
        .with_fast("reason", Val::str("QuantityMismatch"))
        .with_fast("workflow", Val::str("shipment-to-invoice"))
        .with_fast("initiator", Val::str("j.smith"))
        .with_fast("headers", Val::map([("x-request-id", Val::str("r-1"))]))
        .with(
            "now",
            Value::Timestamp(
                chrono::DateTime::parse_from_rfc3339("2025-06-01T10:00:00+02:00").unwrap(),
            ),
        );
    for (name, v) in texts {
        vars.set_fast(name, v.clone());
    }
    if let Some((_, Val::Map(events))) = texts.iter().find(|(n, _)| *n == "events") {
        let event = events
            .get("shipment.confirmed")
            .cloned()
            .unwrap_or(Val::Null);
        vars.set_fast("event", event);
    }
    vars
}

fn fixtures() -> Vec<(&'static str, Val)> {
    [
        ("payload", PAYLOAD),
        ("events", EVENTS),
        ("steps", STEPS),
        ("vars", VARS),
        ("facts", FACTS),
        ("response", RESPONSE),
    ]
    .into_iter()
    .map(|(n, t)| (n, json::parse_fast(t.as_bytes()).unwrap()))
    .collect()
}

fn compile_all(exprs: &[(String, Scope)]) -> Vec<Program> {
    exprs
        .iter()
        .map(|(s, scope)| {
            Program::compile(s, *scope).unwrap_or_else(|e| panic!("`{s}` does not compile: {e}"))
        })
        .collect()
}

#[test]
fn every_example_expression_is_in_the_fast_subset_or_needs_time() {
    let exprs = example_expressions();
    assert!(exprs.len() > 100, "only {} expressions found", exprs.len());
    let programs = compile_all(&exprs);
    let slow: Vec<&str> = programs
        .iter()
        .filter(|p| !p.is_fast())
        .map(|p| p.source())
        .collect();
    // Timestamps and durations are left to the interpreter.
    assert!(
        slow.iter()
            .all(|s| s.contains("timestamp(") || s.contains("duration(")),
        "{slow:#?}"
    );
}

#[test]
fn example_expressions_agree_on_the_fixtures() {
    let programs = compile_all(&example_expressions());
    let vars = world(&fixtures());
    let mut tally = Tally::default();
    for p in &programs {
        check(p, &vars, &mut tally);
    }
    eprintln!("examples: {tally:?} of {}", programs.len());
    // The fixtures hold what the examples read: most answer in the fast path.
    assert!(
        tally.agreed_value * 10 >= programs.len() * 8,
        "{tally:?} of {}",
        programs.len()
    );
    // Bound in the interpreter's form, the same values give the same answers.
    let event = match &fixtures()[1].1 {
        Val::Map(events) => events.get("shipment.confirmed").unwrap().to_value(),
        _ => unreachable!(),
    };
    let cel = fixtures()
        .into_iter()
        .fold(world(&[]), |v, (n, val)| v.with(n, val.to_value()))
        .with("event", event);
    for p in &programs {
        check(p, &cel, &mut Tally::default());
    }
}

#[test]
fn corner_cases_agree() {
    let lines: Vec<String> = (0..250)
        .map(|i| format!(r#"{{"sku": "SKU-{i}", "qty": 3, "unitPrice": "19.99", "price": 19.99}}"#))
        .collect();
    let many =
        json::parse_fast(format!(r#"{{"lines": [{}]}}"#, lines.join(",")).as_bytes()).unwrap();
    let vars = world(&fixtures()).with_fast("payload", many);
    let mut tally = Tally::default();
    for src in CORNERS {
        let p = Program::compile(src, Scope::Webhook)
            .unwrap_or_else(|e| panic!("`{src}` does not compile: {e}"));
        check(&p, &vars, &mut tally);
    }
    eprintln!("corners: {tally:?}");
    assert!(tally.agreed_error >= 20, "{tally:?}");
    assert!(tally.agreed_value >= 60, "{tally:?}");
}

/// Expressions over `payload` (250 lines of `sku`, `qty`, `unitPrice`,
/// `price`) and `now`.
const CORNERS: &[&str] = &[
    // exact decimals
    "decimal('0.1') + decimal('0.2') == decimal('0.3')",
    "decimal('0.1') + decimal('0.2')",
    "decimal(0.1) + decimal(0.2)",
    "0.1 + 0.2 == 0.3",
    "0.1 + 0.2",
    "round(payload.lines.map(l, decimal(l.unitPrice) * l.qty).sum(), 2)",
    "roundHalfUp(payload.lines.map(l, decimal(l.unitPrice) * l.qty * decimal('1.19')).sum(), 2)",
    "payload.lines.map(l, l.price * l.qty).sum()",
    "payload.lines.map(l, l.qty).sum()",
    "payload.lines.map(l, l.unitPrice).sum()",
    "payload.lines.map(l, double(l.qty)).sum()",
    "[1.5, 2].sum()",
    "[1.5, 2.5].sum()",
    "[decimal('1.5'), 2, 0.25].sum()",
    "[].sum()",
    "[1u, 2u].sum()",
    "['a', 'b'].sum()",
    "[[1], [2]].sum()",
    "'abc'.sum()",
    "decimal('79228162514264337593543950335') + 1",
    "decimal('79228162514264337593543950335') * 2",
    "decimal('12,50')",
    "decimal(' 12.50 ')",
    "decimal('1e3')",
    "decimal(true)",
    "decimal(null)",
    "decimal(1.0e300)",
    "round(decimal('2.345'), 2)",
    "roundHalfUp(decimal('2.345'), 2)",
    "round(2.345, 2)",
    "round(decimal('2.5'))",
    "round(1, 29)",
    "round(1, -1)",
    "round(1, 2u)",
    "round('x', 2)",
    "abs(-9223372036854775807 - 1)",
    "abs(-3)",
    "abs(-3.5)",
    "abs(3u)",
    "abs('x')",
    "pct(1, 3)",
    "pct(1, 0)",
    "pct(decimal('1'), decimal('0.000'))",
    "pct('a', 1)",
    "within(decimal('10.05'), 10, decimal('0.05'))",
    "within(decimal('10.06'), 10, decimal('0.05'))",
    "within(1, 2, 'x')",
    "within(decimal('79228162514264337593543950335'), decimal('-1'), 1)",
    "within(decimal('-100.00'), decimal('-100.40'), decimal('-0.50'))",
    "decimal('10000000000') + decimal('0.0000000000000000001')",
    "decimal('10000000000') - decimal('0.0000000000000000001')",
    "decimal('12345678901234567890.12345678') * decimal('1.19')",
    "decimal('12345678901234567890.1234567') * decimal('1.1')",
    "decimal('0.000000000000001') * decimal('0.00000000000001')",
    "decimal('0.5') * decimal('0.2')",
    "decimal('1000000000000') * (decimal(1) / 3)",
    "decimal('0.00') - decimal('0.00')",
    "0 - decimal('0.00')",
    "[1.5, decimal('1')].sum()",
    "[decimal('1'), 1.5].sum()",
    "[2, decimal('0.25'), 1u].sum()",
    // division by zero and overflow
    "decimal('1') / 0",
    "decimal('1') / decimal('0.00')",
    "1 / 0",
    "1u / 0u",
    "1.0 / 0.0",
    "-1.0 / 0.0",
    "0.0 / 0.0",
    "(0.0 / 0.0) == (0.0 / 0.0)",
    "(0.0 / 0.0) < 1.0",
    "9223372036854775807 + 1",
    "-9223372036854775807 - 2",
    "-(-9223372036854775807 - 1)",
    "9223372036854775807 * 2",
    "(-9223372036854775807 - 1) / -1",
    "18446744073709551615u + 1u",
    "0u - 1u",
    "7 / 2",
    "7u / 2u",
    "-decimal('2.5')",
    "-'x'",
    "-payload.lines[0].qty",
    // ints, uints, doubles and decimals together
    "1 == 1.0",
    "1 == 1u",
    "-1 == 18446744073709551615u",
    "1u == 1.0",
    "decimal('1') == 1",
    "decimal('1.0') == 1.0",
    "decimal('1') == 'x'",
    "decimal('1') != null",
    "[1] == [1.0]",
    "[1] == [1u]",
    "[decimal('1')] == [1]",
    "[decimal('1')] == [decimal('1.00')]",
    "{'a': 1} == {'a': 1u}",
    "{'a': 1} == {'a': 1, 'b': 2}",
    "{'a': [1, 2]} == {'a': [1, 2.0]}",
    "null == null",
    "null == 0",
    "'a' == 'a'",
    "1 < 2u",
    "-1 < 0u",
    "18446744073709551615u > 1",
    "1 < 1.5",
    "1.5 < 2u",
    "'a' < 'b'",
    "false < true",
    "null <= null",
    "[1] < [2]",
    "{'a': 1} < {'a': 2}",
    "1 < 'a'",
    "decimal('1') < 'a'",
    "decimal('0.5') < 1",
    "decimal('499.99') < 500.0",
    "1 + 1u",
    "1 + 1.0",
    "1 + decimal('1')",
    "1.5 + decimal('1')",
    "'a' + 'b'",
    "'a' + 1",
    "[1] + [2]",
    "[1] + 2",
    "{'a': 1} + {'b': 2}",
    "null + 1",
    // in
    "1 in [1u]",
    "1 in [1]",
    "1 in [1.0]",
    "'a' in ['a', 'b']",
    "'a' in {'a': 1}",
    "1 in {'a': 1}",
    "true in {'a': 1}",
    "null in {'a': 1}",
    "decimal('1.0') in [decimal('1')]",
    "decimal('1') in [1]",
    "[1] in [[1]]",
    "[1] in [[1u]]",
    "{'a': 1} in [{'a': 1}]",
    "null in [null]",
    "'a' in 'abc'",
    "1 in null",
    "payload.lines[3].sku in payload.lines.map(l, l.sku)",
    // && and || with an erroring side
    "(1 / 0 == 1) && false",
    "false && (1 / 0 == 1)",
    "(1 / 0 == 1) && true",
    "true && (1 / 0 == 1)",
    "(1 / 0 == 1) || true",
    "true || (1 / 0 == 1)",
    "(1 / 0 == 1) || false",
    "false || (1 / 0 == 1)",
    "'x' && false",
    "'x' && true",
    "true && 'x'",
    "false && 'x'",
    "'x' || true",
    "false || 'x'",
    "true || 'x'",
    "payload.nope == 1 || true",
    "payload.nope == 1 && false",
    "has(payload.nope) && payload.nope == 1",
    "!'x'",
    "!true",
    "!(1 / 0 == 1)",
    "1 ? 2 : 3",
    "true ? 2 : 1 / 0",
    "false ? 1 / 0 : 2",
    "(1 / 0 == 1) ? 1 : 2",
    // absent fields, wrong types
    "has(payload.lines)",
    "has(payload.nope)",
    "has(payload.lines.x)",
    "payload.lines.x",
    "payload.nope",
    "payload.nope.x",
    "has(payload.nope.x)",
    "payload.lines[0].sku.x",
    "has(payload.lines[0].sku.x)",
    "null.x",
    "has(null.x)",
    "{'a': null}.a.b",
    "now.x",
    "decimal('1').x",
    "size(payload.lines)",
    "payload.lines.size()",
    "size('héllo')",
    "size({'a': 1})",
    "size(null)",
    "size(1)",
    "size(now)",
    "[1, 2][1]",
    "[1, 2][1u]",
    "[1, 2][5]",
    "[1, 2][-1]",
    "[1, 2][1.0]",
    "[1, 2]['a']",
    "{'a': 1}['a']",
    "{'a': 1}['b']",
    "{'a': 1}[1]",
    "{'a': 1}[true]",
    "{'a': 1}[1.5]",
    "{'a': 1}[null]",
    "{1: 'a'}[1]",
    "{1: 'a'}",
    "{'a': 1, 'a': 2}",
    "{'a': 1, 'a': 2}.a",
    "{'b': 1, 'a': [2, {'c': decimal('3.10')}]}",
    "'abc'[0]",
    "null[0]",
    "payload.lines[0]",
    "payload.lines[250]",
    "payload['lines'][249]['unitPrice']",
    // macros
    "[1, 2, 3].exists_one(x, x > 1)",
    "[1, 2, 3].exists_one(x, x > 2)",
    "[1, 2, 3].all(x, x > 0)",
    "[1, 'a'].all(x, x > 0)",
    "['a', 1].all(x, x > 0)",
    "[0, 'a'].all(x, x > 0)",
    "['a', 0].all(x, x > 0)",
    "[1, 'a'].exists(x, x == 1)",
    "['a', 1].exists(x, x > 0)",
    "[1, 'a'].exists(x, x > 1)",
    "[].all(x, x)",
    "[].exists(x, x)",
    "[1, 2].all(x, x)",
    "[1, 2, 3].filter(x, x > 1).map(x, x * 10)",
    "[1, 2, 3].map(x, x > 1, x * 10)",
    "[1, 2, 3].map(x, x, x)",
    "[1, 2, 3].filter(x, x)",
    "{'a': 1}.all(k, k == 'a')",
    "size({'a': 1, 'b': 2}.map(k, k))",
    "'abc'.all(c, c == 'a')",
    "null.all(x, x)",
    "[1, 2].map(x, [1, 2].map(y, x * y))",
    "[1, 2].map(x, [3].map(x, x))",
    "payload.lines.map(l, {'sku': l.sku, 'qty': l.qty}).filter(m, m.sku.endsWith('9'))",
    "payload.lines.exists(l, l.sku == 'SKU-249')",
    "payload.lines.all(l, l.qty == 3 && decimal(l.unitPrice) == decimal('19.990'))",
    "payload.lines.filter(l, l.sku.startsWith('SKU-1')).size()",
    "payload.lines.map(l, l.nope)",
    "payload.lines.map(l, has(l.nope))",
    "[payload, payload].map(p, size(p.lines))",
    // strings
    "'abc'.contains('b')",
    "'abc'.startsWith('a')",
    "'abc'.endsWith('c')",
    "'abc'.startsWith(1)",
    "[1].contains(1)",
    "[['a']].map(x, x.contains('a'))",
    "[[1]].map(sets, sets.contains(1))",
    "'rma-' + payload.lines[0].sku",
    // the clock, left to the interpreter where it computes
    "now",
    "now == now",
    "now < now",
    "{'at': now}",
    "[now, 1]",
    "now + 1",
];

/// A random edit of a fixture: which node (by position in a walk) and what
/// to do with it.
fn mutate(v: &Val, target: &mut usize, op: usize) -> Option<Val> {
    if *target == 0 {
        return Some(replacement(op));
    }
    *target -= 1;
    match v {
        Val::List(items) => {
            for (i, item) in items.iter().enumerate() {
                if *target == 0 && op.is_multiple_of(5) {
                    // Drop the element.
                    let mut items = items.as_ref().clone();
                    items.remove(i);
                    return Some(Val::List(Arc::new(items)));
                }
                if let Some(new) = mutate(item, target, op) {
                    let mut items = items.as_ref().clone();
                    items[i] = new;
                    return Some(Val::List(Arc::new(items)));
                }
            }
            None
        }
        Val::Map(m) => {
            let entries: Vec<(Arc<str>, Val)> =
                m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            for (i, (_, item)) in entries.iter().enumerate() {
                if *target == 0 && op.is_multiple_of(3) {
                    // Drop the field.
                    let mut entries = entries.clone();
                    entries.remove(i);
                    return Some(Val::Map(Arc::new(super::ValMap::from_entries(entries))));
                }
                if let Some(new) = mutate(item, target, op) {
                    let mut entries = entries.clone();
                    entries[i].1 = new;
                    return Some(Val::Map(Arc::new(super::ValMap::from_entries(entries))));
                }
            }
            None
        }
        _ => None,
    }
}

fn replacement(op: usize) -> Val {
    let d = |s: &str| Val::Dec(s.parse().unwrap());
    match op % 19 {
        0 => Val::Null,
        1 => Val::Bool(true),
        2 => Val::Int(0),
        3 => Val::Int(-3),
        4 => Val::Int(i64::MAX),
        5 => Val::UInt(u64::MAX),
        6 => Val::Double(0.1),
        7 => Val::Double(f64::NAN),
        8 => d("0.1"),
        9 => d("12345678901234567890.12345678"),
        10 => d("0"),
        11 => d("-19.990"),
        12 => Val::str("A"),
        13 => Val::str(""),
        14 => Val::str("19.99"),
        15 => Val::List(Arc::new(vec![])),
        16 => Val::map::<&str>([]),
        17 => Val::List(Arc::new(vec![Val::Int(1), Val::str("A-100")])),
        _ => Val::map([("sku", Val::str("A-100")), ("qty", Val::Int(3))]),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn example_expressions_agree_on_mutated_fixtures(
        edits in proptest::collection::vec((0usize..6, 0usize..400, 0usize..1000), 1..5)
    ) {
        let mut texts = fixtures();
        for (which, target, op) in edits {
            let (_, v) = &mut texts[which];
            let mut t = target;
            if let Some(new) = mutate(v, &mut t, op) {
                *v = new;
            }
        }
        let vars = world(&texts);
        let mut tally = Tally::default();
        for p in compile_all(&example_expressions()) {
            check(&p, &vars, &mut tally);
        }
    }
}

#[test]
fn payloads_parse_the_same_in_both_forms() {
    for text in [
        PAYLOAD,
        EVENTS,
        STEPS,
        VARS,
        r#"{"a": 1, "a": 2.50, "b": [1e2, -0.0, 18446744073709551615]}"#,
    ] {
        let fast = json::parse_fast(text.as_bytes()).unwrap();
        let cel = json::parse(text.as_bytes()).unwrap();
        assert!(same(&fast.to_value(), &cel));
        assert_eq!(fast.to_json().unwrap(), json::to_string(&cel).unwrap());
        let back = Val::from_value(&cel).unwrap();
        assert_eq!(back.to_json().unwrap(), fast.to_json().unwrap());
    }
    for bad in [&b"{"[..], b"[1,]", b"\"\\x\"", b"1."] {
        assert_eq!(
            json::parse_fast(bad).unwrap_err(),
            json::parse(bad).unwrap_err()
        );
    }
    // Keys sort by their text, as the interpreter's writer sorts them.
    let v = json::parse_fast(br#"{"b": 1, "a": {"d": 2, "c": 3}, "B": 0}"#).unwrap();
    assert_eq!(v.to_json().unwrap(), r#"{"B":0,"a":{"c":3,"d":2},"b":1}"#);
    // A map with a key that is not a string has no shared form.
    let m = Value::Map(kube_cel::cel::objects::Map {
        map: Arc::new([(Key::Int(1), Value::Null)].into_iter().collect()),
    });
    assert!(Val::from_value(&m).is_none());
}

/// `json_stable` says exactly when a value kept in memory reads the same
/// as its JSON text parsed again (the worker keeps parsed values of an
/// instance only then).
#[test]
fn json_stable_means_the_text_parses_back_to_the_same_value() {
    use chrono::TimeZone;
    use rust_decimal::Decimal;
    let ts = chrono::Utc
        .with_ymd_and_hms(2026, 11, 26, 9, 0, 0)
        .unwrap()
        .fixed_offset();
    let scalars = [
        Val::Null,
        Val::Bool(true),
        Val::Int(-7),
        Val::UInt(3),
        Val::UInt(u64::MAX),
        Val::Dec(Decimal::new(1999, 2)),
        Val::Dec(Decimal::new(2, 0)),
        Val::Dec(Decimal::new(20, 1)),
        Val::Dec(Decimal::new(-1, 3)),
        Val::Dec(Decimal::ZERO),
        Val::Dec(Decimal::new(-42, 0)),
        Val::Dec(Decimal::MAX),
        Val::Dec(Decimal::MIN),
        Val::Double(0.5),
        Val::Double(2.0),
        Val::Str("a \"quoted\" é".into()),
        Val::Timestamp(ts),
    ];
    let mut values: Vec<Val> = scalars.to_vec();
    for s in &scalars {
        values.push(Val::List(Arc::new(vec![Val::Int(1), s.clone()])));
        values.push(Val::map([("a", Val::Str("x".into())), ("b", s.clone())]));
    }
    let mut stable = 0;
    for v in &values {
        let text = v.to_json().unwrap();
        let back = json::parse_fast(text.as_bytes()).unwrap();
        let same = format!("{back:?}") == format!("{v:?}");
        assert_eq!(v.json_stable(), same, "{v:?} -> {text} -> {back:?}");
        stable += same as usize;
        // The stored form reads back as often or more, every decimal too.
        let stored = v.to_stored_json().unwrap();
        let back = json::parse_stored(stored.as_bytes()).unwrap();
        let kept = format!("{back:?}") == format!("{v:?}");
        assert_eq!(v.stored_stable(), kept, "{v:?} -> {stored} -> {back:?}");
        assert!(kept || !same, "{v:?} -> {stored}");
        if let Val::Timestamp(_) = v {
            assert!(kept, "{v:?} -> {stored} -> {back:?}");
        } else if let Val::Dec(d) = v {
            assert!(kept, "{v:?} -> {stored} -> {back:?}");
            assert_eq!(stored == text, d.scale() > 0, "{v:?} -> {stored}");
        } else if let Val::Double(_) = v {
            let Val::Dec(d) = back else {
                panic!("{v:?} -> {stored} -> {back:?}")
            };
            assert_eq!(d.to_string(), text, "the decimal it was sent as");
        } else if !["Dec(", "Timestamp(", "Double("]
            .iter()
            .any(|t| format!("{v:?}").contains(t))
        {
            assert_eq!(stored, text, "only decimals are written otherwise");
        }
    }
    // Both answers occur, so the test tells them apart.
    assert!(stable > 0 && stable < values.len());
}

#[test]
fn a_repeated_key_keeps_its_last_value() {
    let map = super::ValMap::from_entries(vec![
        (Arc::from("b"), Val::Int(1)),
        (Arc::from("a"), Val::Int(2)),
        (Arc::from("b"), Val::Int(3)),
        (Arc::from("c"), Val::Int(4)),
        (Arc::from("b"), Val::Int(5)),
    ]);
    let entries: Vec<(String, i64)> = map
        .iter()
        .map(|(k, v)| match v {
            Val::Int(i) => (k.to_string(), *i),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(entries, [("a".into(), 2), ("b".into(), 5), ("c".into(), 4)]);
    assert!(matches!(map.get("b"), Some(Val::Int(5))));
}

#[test]
fn the_same_value_is_the_same_share_or_an_equal_scalar_with_its_digits() {
    let text = Val::str("EUR");
    assert!(text.is_same(&text.clone()));
    assert!(!text.is_same(&Val::str("EUR")), "equal, but another string");
    let map = Val::map([("a", Val::Int(1))]);
    assert!(map.is_same(&map.clone()));
    assert!(!map.is_same(&Val::map([("a", Val::Int(1))])));
    let d = |s: &str| Val::Dec(s.parse().unwrap());
    assert!(d("1.50").is_same(&d("1.50")));
    assert!(!d("1.5").is_same(&d("1.50")), "equal, written differently");
    assert!(Val::Int(3).is_same(&Val::Int(3)));
    assert!(!Val::Int(3).is_same(&Val::UInt(3)));
    assert!(
        !Val::Double(0.5).is_same(&Val::Double(0.5)),
        "never compared"
    );
}

#[test]
fn the_objects_of_an_array_share_their_keys() {
    let doc = json::parse_fast(
        br#"{"orderId": "A-1", "lines": [{"sku": "A", "qty": 1, "tax": {"rate": "0.19"}},
                                          {"sku": "B", "qty": 2, "tax": {"rate": "0.07"}}]}"#,
    )
    .unwrap();
    let Val::Map(doc) = doc else { panic!() };
    let Some(Val::List(lines)) = doc.get("lines") else {
        panic!()
    };
    let (Val::Map(first), Val::Map(second)) = (&lines[0], &lines[1]) else {
        panic!()
    };
    for ((a, _), (b, _)) in first.iter().zip(second.iter()) {
        assert!(Arc::ptr_eq(a, b), "{a} is made twice");
    }
    let rate = |line: &super::ValMap| match line.get("tax") {
        Some(Val::Map(tax)) => tax.iter().next().map(|(k, v)| (k.clone(), v.clone())),
        _ => None,
    };
    let (Some((k1, v1)), Some((k2, v2))) = (rate(first), rate(second)) else {
        panic!()
    };
    assert!(Arc::ptr_eq(&k1, &k2), "nested objects share their keys too");
    assert!(!v1.is_same(&v2));
    // The values stay each object's own.
    assert!(matches!(second.get("sku"), Some(Val::Str(s)) if &**s == "B"));
    assert!(matches!(second.get("qty"), Some(Val::Int(2))));
}
