//! The step machine on the example manifests, input by input.

use std::path::Path;

use chrono::TimeZone;

use super::*;
use crate::audit::{AuditRecord, verify};
use crate::validate;

fn compiled(example: &str) -> Compiled {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(example);
    let report = validate::validate_paths(&[dir]);
    assert!(!report.has_errors());
    Compiled::new(report.definition("finance", example).unwrap()).unwrap()
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 26, 9, 0, 0).unwrap()
}

fn event(id: &str, ty: &str, data: &str) -> Input {
    Input::Event(Event {
        id: id.into(),
        type_: ty.into(),
        source: "test".into(),
        time: "2026-11-26T09:00:00Z".into(),
        data: data.into(),
    })
}

fn order_created() -> Input {
    event(
        "o-1",
        "order.created",
        r#"{"orderId": "4711", "customerId": "C-1", "channel": "web"}"#,
    )
}

fn shipment(qty_b: u32) -> Input {
    event(
        "s-1",
        "shipment.confirmed",
        &format!(
            r#"{{"orderId": "4711", "shipmentId": "SH-9", "warehouse": "HAM", "confirmedBy": "wms-operator-17",
                "lines": [{{"sku": "A", "qty": 2}}, {{"sku": "B", "qty": {qty_b}}}]}}"#
        ),
    )
}

fn erp_order() -> CallResult {
    CallResult::Response {
        status: 200,
        headers: BTreeMap::new(),
        body: r#"{"orderId": "4711", "customerId": "C-1", "currency": "EUR",
                  "lines": [{"sku": "A", "qty": 2, "unitPrice": "19.99"}, {"sku": "B", "qty": 5, "unitPrice": 0.10}]}"#
            .into(),
        attempts: 1,
    }
}

fn invoice_created() -> CallResult {
    CallResult::Response {
        status: 201,
        headers: BTreeMap::new(),
        body: r#"{"invoiceId": "INV-1", "currency": "EUR", "netAmount": 40.48}"#.into(),
        attempts: 1,
    }
}

fn plan(next: Next) -> CallPlan {
    match next {
        Next::Call(p) => p,
        other => panic!("expected a call, got {other:?}"),
    }
}

fn audits(inst: &Instance) -> Vec<AuditRecord> {
    inst.outbox
        .iter()
        .filter_map(|o| match o {
            Outbound::Audit(a) => Some((**a).clone()),
            _ => None,
        })
        .collect()
}

fn emits(inst: &Instance) -> Vec<(String, String)> {
    inst.outbox
        .iter()
        .filter_map(|o| match o {
            Outbound::Emit { type_, data, .. } => Some((type_.clone(), data.clone())),
            _ => None,
        })
        .collect()
}

/// The wake-ups in the outbox.
fn wakes(inst: &Instance) -> Vec<i64> {
    inst.outbox
        .iter()
        .filter_map(|o| match o {
            Outbound::Wake { due_ms } => Some(*due_ms),
            _ => None,
        })
        .collect()
}

/// Answer the shipment-to-invoice calls `next` asks for (the ERP order,
/// then the invoice) until the instance waits.
fn answer_calls(m: &Machine, inst: &mut Instance, mut next: Next) {
    while let Next::Call(p) = next {
        let result = if p.step == "order" {
            erp_order()
        } else {
            invoice_created()
        };
        next = m.apply(inst, Input::CallDone(result));
    }
}

#[test]
fn matching_quantities_become_one_invoice() {
    let def = compiled("shipment-to-invoice");
    let m = Machine::new(&def, t0());
    let key = Machine::correlate(
        &def,
        &Event {
            id: "x".into(),
            type_: "order.created".into(),
            source: String::new(),
            time: String::new(),
            data: r#"{"orderId": "4711"}"#.into(),
        },
    )
    .unwrap();
    assert_eq!(key, "4711");
    let mut inst = Instance::new(&key, &def.revision, t0().timestamp_millis());
    assert_eq!(m.apply(&mut inst, order_created()), Next::Idle);
    // Waiting for the shipment is not executing a step.
    assert_eq!(m.take_step_timings(), vec![]);
    assert_eq!(
        inst.wait,
        Some(Wait::Events {
            timer: Some("finance/shipment-to-invoice/4711/timer/2".into())
        })
    );
    let get = plan(m.apply(&mut inst, shipment(5)));
    assert_eq!(
        (get.action.as_str(), get.params["orderId"].as_str()),
        ("getOrder", "4711")
    );
    let post = plan(m.apply(&mut inst, Input::CallDone(erp_order())));
    assert_eq!(post.action, "createInvoice");
    assert_eq!(post.idempotency_key, "inv-4711");
    // Exact decimals in the body: 2 x 19.99 + 5 x 0.10, no float digits.
    let body = post.body.unwrap();
    assert!(body.contains(r#""netAmount":40.48"#), "{body}");
    assert!(body.contains(r#""unitPrice":0.10"#), "{body}");
    assert_eq!(
        m.apply(&mut inst, Input::CallDone(invoice_created())),
        Next::Idle
    );
    assert_eq!(inst.status, Status::Completed);
    // Every step that ran to completion here was timed once, the await (it
    // waited) and the calls (the worker times those) were not.
    let timed: Vec<&str> = m.take_step_timings().iter().map(|(s, _)| *s).collect();
    let expected: Vec<&str> = def
        .steps
        .iter()
        .filter(|s| !matches!(s.kind, CKind::Await { .. } | CKind::Call(_)))
        .map(|s| s.name.as_str())
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(timed, expected);
    let emitted = emits(&inst);
    assert_eq!(emitted.len(), 1);
    assert_eq!(emitted[0].0, "invoice.created");
    assert!(emitted[0].1.contains(r#""invoiceId":"INV-1""#));
    let report = verify(&audits(&inst));
    assert!(report.is_ok(), "{:?}", report.problems);
}

/// CEL programs are compiled with their definition revision, once: running
/// instances through the example's steps (await, calls, sets, the check),
/// the policy and a case compiles nothing more.
#[test]
fn instances_evaluate_programs_compiled_once_per_revision() {
    let compiled_here = || crate::cel::COMPILED.with(|n| n.get());
    let def = compiled("shipment-to-invoice");
    let at_load = compiled_here();
    assert!(
        at_load > 10,
        "the example compiles its expressions: {at_load}"
    );
    for (i, qty_b) in [5, 3, 9, 5, 0].into_iter().enumerate() {
        let m = Machine::new(&def, t0());
        let mut inst = Instance::new(&format!("47{i}"), &def.revision, 0);
        m.apply(&mut inst, order_created());
        let next = m.apply(&mut inst, shipment(qty_b));
        // Matches, an auto-approved and a large variance (policy, case).
        answer_calls(&m, &mut inst, next);
    }
    assert_eq!(compiled_here(), at_load);
}

#[test]
fn events_out_of_order_and_twice_give_the_same_result() {
    let def = compiled("shipment-to-invoice");
    let m = Machine::new(&def, t0());
    let mut inst = Instance::new("4711", &def.revision, 0);
    assert_eq!(
        m.apply(&mut inst, shipment(5)),
        Next::Idle,
        "the shipment alone waits for the order"
    );
    assert_eq!(
        m.apply(&mut inst, shipment(5)),
        Next::Idle,
        "a duplicate changes nothing"
    );
    let seq = inst.audit_seq;
    assert_eq!(m.apply(&mut inst, shipment(5)), Next::Idle);
    assert_eq!(inst.audit_seq, seq);
    let get = plan(m.apply(&mut inst, order_created()));
    assert_eq!(get.action, "getOrder");
    plan(m.apply(&mut inst, Input::CallDone(erp_order())));
    m.apply(&mut inst, Input::CallDone(invoice_created()));
    assert_eq!(inst.status, Status::Completed);
}

#[test]
fn a_tiny_variance_is_auto_approved_and_invoices_what_shipped() {
    let def = compiled("shipment-to-invoice");
    let m = Machine::new(&def, t0());
    let mut inst = Instance::new("4711", &def.revision, 0);
    m.apply(&mut inst, order_created());
    plan(m.apply(&mut inst, shipment(3)));
    // B: 3 of 5 shipped at 0.10: a variance of 0.20, 0.49 % of 40.48.
    let next = m.apply(&mut inst, Input::CallDone(erp_order()));
    let case = inst.outbox.iter().find_map(|o| match o {
        Outbound::OpenCase(c) => Some(c.clone()),
        _ => None,
    });
    match (next, case) {
        // The policy auto-approves under 500.00 and 1 %; 0.20 of 40.48 is 0.49 %.
        (Next::Call(p), None) => {
            assert_eq!(p.action, "createInvoice");
            assert!(p.body.unwrap().contains(r#""netAmount":40.28"#));
        }
        other => panic!("expected the tiny variance to be auto-approved, got {other:?}"),
    }
}

/// The case an instance opens, after `order.created` and a short shipment.
fn variance_case(m: &Machine, inst: &mut Instance) -> CaseRequest {
    m.apply(inst, order_created());
    plan(m.apply(inst, shipment(5)));
    let big = CallResult::Response {
        status: 200,
        headers: BTreeMap::new(),
        body: r#"{"currency": "EUR", "customerId": "C-1",
                  "lines": [{"sku": "A", "qty": 2, "unitPrice": "19.99"}, {"sku": "B", "qty": 9, "unitPrice": "250.00"}]}"#
            .into(),
        attempts: 1,
    };
    assert_eq!(m.apply(inst, Input::CallDone(big)), Next::Idle);
    inst.outbox
        .iter()
        .find_map(|o| match o {
            Outbound::OpenCase(c) => Some((**c).clone()),
            _ => None,
        })
        .expect("a case opened")
}

#[test]
fn a_large_variance_waits_for_people_and_a_rejection_disputes_the_shipment() {
    let def = compiled("shipment-to-invoice");
    let m = Machine::new(&def, t0());
    let mut inst = Instance::new("4711", &def.revision, 0);
    let case = variance_case(&m, &mut inst);
    assert_eq!(case.reason, "QuantityMismatch");
    assert_eq!(case.initiator, "wms-operator-17");
    assert_eq!(case.rule, "controller");
    assert_eq!(case.facts["amount"], serde_json::json!("1000.00"));
    assert_eq!(
        case.deadline_ms,
        Some((t0() + chrono::Duration::hours(48)).timestamp_millis())
    );
    assert!(
        matches!(&inst.wait, Some(Wait::Case { name, during: Phase::OnFalse }) if *name == case.name)
    );
    // Inputs for other cases or stale timers change nothing.
    let seq = inst.audit_seq;
    m.apply(
        &mut inst,
        Input::CaseResolved {
            name: "other".into(),
            approved: true,
            detail: String::new(),
            history: CaseHistory::default(),
        },
    );
    m.apply(
        &mut inst,
        Input::Timer {
            token: "stale".into(),
        },
    );
    assert_eq!(inst.audit_seq, seq);

    let mut approved = inst.clone();
    let p = plan(m.apply(
        &mut approved,
        Input::CaseResolved {
            name: case.name.clone(),
            approved: true,
            detail: "alice".into(),
            history: CaseHistory::default(),
        },
    ));
    assert_eq!(p.action, "createInvoice");

    // How the case was decided goes into the chain, before the outcome.
    use tallyman_api::v1alpha1::{CaseDecision, Verdict};
    let mut expired = inst.clone();
    expired.outbox.clear();
    m.apply(
        &mut expired,
        Input::CaseResolved {
            name: case.name.clone(),
            approved: false,
            detail: "no decision within the deadline".into(),
            history: CaseHistory {
                decisions: vec![CaseDecision {
                    approver: "carol".into(),
                    groups: vec!["cfo-office".into()],
                    decision: Verdict::Approve,
                    comment: Some("fine by me".into()),
                }],
                escalated_to: Some(vec!["cfo-office".into()]),
                expired: true,
            },
        },
    );
    let records: Vec<_> = expired
        .outbox
        .iter()
        .filter_map(|o| match o {
            Outbound::Audit(r) => Some(r),
            _ => None,
        })
        .collect();
    let kinds: Vec<_> = records.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds[..4],
        [
            AuditKind::DecisionRecorded,
            AuditKind::CaseEscalated,
            AuditKind::CaseExpired,
            AuditKind::CaseRejected
        ],
        "{kinds:?}"
    );
    assert_eq!(
        records[0].detail,
        serde_json::json!({"case": case.name, "approver": "carol", "groups": ["cfo-office"],
            "decision": "Approve", "comment": "fine by me"})
    );
    assert_eq!(
        records[1].detail,
        serde_json::json!({"case": case.name, "to": ["cfo-office"]})
    );
    assert!(records.iter().all(|r| r.hash_matches()));

    inst.outbox.clear();
    m.apply(
        &mut inst,
        Input::CaseResolved {
            name: case.name.clone(),
            approved: false,
            detail: "wrong".into(),
            history: CaseHistory::default(),
        },
    );
    assert_eq!(inst.status, Status::Rejected);
    let emitted = emits(&inst);
    assert_eq!(emitted[0].0, "shipment.disputed");
    assert!(emitted[0].1.contains(r#""skus":["B"]"#), "{}", emitted[0].1);
}

#[test]
fn a_case_name_is_the_instances_own() {
    let def = compiled("shipment-to-invoice");
    let m = Machine::new(&def, t0());
    // The same instance, run again from its stored start: the same name.
    let again = |started| variance_case(&m, &mut Instance::new("4711", &def.revision, started));
    assert_eq!(again(1_000).name, again(1_000).name);
    // An instance of the same key started later (its Workflow deleted and
    // created again): a case of its own, not the earlier one's.
    let (first, later) = (again(1_000).name, again(2_000).name);
    assert_ne!(first, later);
    assert!(
        first.starts_with("shipment-to-invoice-4711-quantities-match-"),
        "{first}"
    );
}

/// The shipment-to-invoice definition, to change before compiling.
fn example_def() -> Definition {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shipment-to-invoice");
    let report = validate::validate_paths(&[dir]);
    report.definition("finance", "shipment-to-invoice").unwrap()
}

/// shipment-to-invoice with other steps.
fn with_steps(steps: serde_json::Value) -> Compiled {
    let mut def = example_def();
    def.spec.steps = serde_json::from_value(steps).unwrap();
    Compiled::new(def).unwrap()
}

/// The instance as a worker reads it back: stored as JSON and loaded.
fn reloaded(inst: &Instance) -> Instance {
    serde_json::from_str(&serde_json::to_string(inst).unwrap()).unwrap()
}

fn failure(inst: &Instance) -> String {
    assert_eq!(inst.status, Status::Failed, "{:?}", inst.outcome);
    assert!(
        inst.outbox
            .iter()
            .any(|o| matches!(o, Outbound::DeadLetter { .. })),
        "dead-lettered"
    );
    inst.outcome.clone().unwrap_or_default()
}

#[test]
fn a_goto_loop_with_nothing_to_wait_for_fails_the_instance() {
    // The awaited events arrived already, so the loop never waits.
    let def = with_steps(serde_json::json!([
        {"name": "both", "await": {"events": ["order.created", "shipment.confirmed"]}},
        {"name": "never", "check": "false", "onFalse": {"goTo": "both"}},
    ]));
    let m = Machine::new(&def, t0());
    let mut inst = Instance::new("4711", &def.revision, 0);
    m.apply(&mut inst, order_created());
    assert_eq!(m.apply(&mut inst, shipment(5)), Next::Idle);
    let why = failure(&inst);
    assert!(why.contains("goTo loop"), "{why}");
}

#[test]
fn a_goto_loop_through_a_call_stops_calling() {
    let def = with_steps(serde_json::json!([
        {"name": "both", "await": {"events": ["order.created", "shipment.confirmed"]}},
        {"name": "order", "call": {"connector": "erp", "action": "getOrder", "params": {"orderId": "key"}}},
        {"name": "never", "check": "false", "onFalse": {"goTo": "order"}},
    ]));
    let m = Machine::new(&def, t0());
    let mut inst = Instance::new("4711", &def.revision, 0);
    m.apply(&mut inst, order_created());
    let mut next = m.apply(&mut inst, shipment(5));
    let mut calls = 0;
    while let Next::Call(_) = next {
        calls += 1;
        next = m.apply(&mut inst, Input::CallDone(erp_order()));
    }
    assert_eq!(calls, CALL_BUDGET);
    let why = failure(&inst);
    assert!(why.contains("goTo loop through a call"), "{why}");
}

#[test]
fn a_wait_too_long_to_count_waits_instead_of_firing_at_once() {
    // 3e12 hours in milliseconds passes i64: it used to wrap into the past.
    let def = with_steps(serde_json::json!([
        {"name": "both", "await": {"events": ["order.created", "shipment.confirmed"]}},
        {"name": "pause", "wait": {"for": "3000000000000h"}},
    ]));
    let m = Machine::new(&def, t0());
    let mut inst = Instance::new("4711", &def.revision, 0);
    m.apply(&mut inst, order_created());
    assert_eq!(m.apply(&mut inst, shipment(5)), Next::Idle);
    assert_eq!(inst.status, Status::Running);
    assert_eq!(inst.step, 1, "still pausing");
    assert!(
        inst.wake_ms
            .is_some_and(|due| due > t0().timestamp_millis())
    );
}

#[test]
fn a_missing_shipment_times_out_through_the_route() {
    let def = compiled("shipment-to-invoice");
    let m = Machine::new(&def, t0());
    let mut inst = Instance::new("4711", &def.revision, 0);
    m.apply(&mut inst, order_created());
    let Some(Wait::Events { timer: Some(token) }) = inst.wait.clone() else {
        panic!("{:?}", inst.wait)
    };
    assert_eq!(
        inst.timers.get(&token),
        Some(&(t0() + chrono::Duration::hours(24)).timestamp_millis())
    );
    // One wake-up is scheduled: the SLA (4 h) comes before the await timeout.
    assert_eq!(
        wakes(&inst),
        [(t0() + chrono::Duration::hours(4)).timestamp_millis()]
    );
    // At 4 h the SLA fires, and the next wake-up is the await timeout.
    inst.outbox.clear();
    let sla = Machine::new(&def, t0() + chrono::Duration::hours(4));
    assert_eq!(sla.apply(&mut inst, Input::Wake), Next::Idle);
    assert!(inst.sla_breached);
    assert_eq!(
        wakes(&inst),
        [(t0() + chrono::Duration::hours(24)).timestamp_millis()]
    );
    let later = Machine::new(&def, t0() + chrono::Duration::hours(24));
    assert_eq!(later.apply(&mut inst, Input::Wake), Next::Idle);
    assert_eq!(inst.status, Status::Failed);
    let emitted = emits(&inst);
    assert_eq!(emitted[0].0, "order.unmatched");
    assert!(
        emitted[0].1.contains(r#""missing":["shipment.confirmed"]"#),
        "{}",
        emitted[0].1
    );
}

/// An order of shipment-to-invoice whose first call (GET the order) has
/// failed for good: what the machine answered, and the instance.
fn order_call_failed(m: &Machine) -> (Next, Instance) {
    let mut inst = Instance::new("4711", &m.def.revision, 0);
    m.apply(&mut inst, order_created());
    plan(m.apply(&mut inst, shipment(5)));
    let failed = CallResult::Failed {
        message: "503 Service Unavailable after 6 attempts".into(),
        status: Some(503),
        attempts: 6,
    };
    (m.apply(&mut inst, Input::CallDone(failed)), inst)
}

#[test]
fn a_failed_call_is_dead_lettered_and_retried_on_approval() {
    let def = compiled("shipment-to-invoice");
    let m = Machine::new(&def, t0());
    let (next, mut inst) = order_call_failed(&m);
    assert_eq!(next, Next::Idle);
    assert!(
        inst.outbox
            .iter()
            .any(|o| matches!(o, Outbound::DeadLetter { step, .. } if step == "order"))
    );
    let Some(Wait::FailedCall { case }) = inst.wait.clone() else {
        panic!("{:?}", inst.wait)
    };
    assert_eq!(inst.status, Status::Running);
    let retry = plan(m.apply(
        &mut inst,
        Input::CaseResolved {
            name: case,
            approved: true,
            detail: "ops".into(),
            history: CaseHistory::default(),
        },
    ));
    assert_eq!(retry.action, "getOrder");
}

/// The case a failed call opens, for a definition with `exceptions` as
/// given (`None`: the field left out).
fn failed_call_case(exceptions: Option<Approvers>) -> CaseRequest {
    let mut def = (*compiled("shipment-to-invoice").def).clone();
    def.spec.exceptions =
        exceptions.map(|approvers| tallyman_api::v1alpha1::Exceptions { approvers });
    let def = Compiled::new(def).unwrap();
    let (_, inst) = order_call_failed(&Machine::new(&def, t0()));
    inst.outbox
        .iter()
        .find_map(|o| match o {
            Outbound::OpenCase(c) => Some((**c).clone()),
            _ => None,
        })
        .expect("a CallFailed case")
}

#[test]
fn a_failed_calls_case_is_decided_by_the_workflows_exception_approvers() {
    let four_eyes = Approvers {
        groups: vec!["finance-controllers".into()],
        count: 2,
    };
    let case = failed_call_case(Some(four_eyes.clone()));
    assert_eq!(case.reason, "CallFailed");
    assert_eq!(case.required, four_eyes);
    assert!(case.distinct_approvers);
    // Without the field: anyone allowed to decide, one approval.
    let open = failed_call_case(None);
    assert!(open.required.groups.is_empty());
    assert_eq!(open.required.count, 1);
}

#[test]
fn a_runtime_error_fails_the_instance_visibly() {
    let def = compiled("shipment-to-invoice");
    let m = Machine::new(&def, t0());
    let mut inst = Instance::new("4711", &def.revision, 0);
    m.apply(&mut inst, order_created());
    plan(m.apply(&mut inst, shipment(5)));
    let no_lines = CallResult::Response {
        status: 200,
        headers: BTreeMap::new(),
        body: r#"{"currency": "EUR"}"#.into(),
        attempts: 1,
    };
    assert_eq!(m.apply(&mut inst, Input::CallDone(no_lines)), Next::Idle);
    assert_eq!(inst.status, Status::Failed);
    assert!(
        inst.outcome
            .as_deref()
            .unwrap()
            .starts_with("step price-lines:"),
        "{:?}",
        inst.outcome
    );
    assert!(
        inst.outbox
            .iter()
            .any(|o| matches!(o, Outbound::DeadLetter { .. }))
    );
}

#[test]
fn every_example_compiles() {
    for example in [
        "shipment-to-invoice",
        "three-way-match",
        "returns-to-credit",
        "inventory-adjustment",
    ] {
        let def = compiled(example);
        assert_eq!(def.revision.len(), 10);
    }
}

#[test]
fn a_lookup_without_an_answer_fails_the_call_instead_of_repeating_it() {
    let def = compiled("returns-to-credit");
    let m = Machine::new(&def, t0());
    let mut inst = Instance::new("RMA-1", &def.revision, 0);
    let order = plan(m.apply(
        &mut inst,
        event(
            "r-1",
            "return.received",
            r#"{"rmaNumber": "RMA-1", "orderId": "4711", "customerId": "C-1", "receivedBy": "j.smith",
                "lines": [{"sku": "A-100", "qty": 2}]}"#,
        ),
    ));
    assert_eq!(order.action, "getSalesOrder");
    let sales_order = CallResult::Response {
        status: 200,
        headers: BTreeMap::new(),
        body: r#"{"currency": "EUR", "lines": [{"sku": "A-100", "qty": 2, "unitPrice": 49.90}]}"#
            .into(),
        attempts: 1,
    };
    assert_eq!(m.apply(&mut inst, Input::CallDone(sales_order)), Next::Idle);
    let inspected = event(
        "i-1",
        "return.inspected",
        r#"{"rmaNumber": "RMA-1", "inspectedBy": "m.mueller", "lines": [{"sku": "A-100", "qty": 2, "grade": "A"}]}"#,
    );
    let Next::Lookup(lookup) = m.apply(&mut inst, inspected) else {
        panic!("the credit note is looked up first")
    };
    assert_eq!(lookup.action, "findCreditNote");
    assert_eq!(lookup.params["reference"], "rma-RMA-1");

    // The ERP did not answer: an earlier attempt may have booked the note.
    let no_answer = CallResult::Failed {
        message: "gave up after 4 attempts: HTTP 503".into(),
        status: None,
        attempts: 4,
    };
    assert_eq!(m.apply(&mut inst, Input::LookupDone(no_answer)), Next::Idle);
    let Some(Wait::FailedCall { case }) = inst.wait.clone() else {
        panic!("{:?}", inst.wait)
    };
    assert!(
        inst.outbox
            .iter()
            .any(|o| matches!(o, Outbound::DeadLetter { step, .. } if step == "credit"))
    );

    // A person retries: the lookup comes first again; "not there" lets the call go.
    let again = m.apply(
        &mut inst,
        Input::CaseResolved {
            name: case,
            approved: true,
            detail: "ops".into(),
            history: CaseHistory::default(),
        },
    );
    assert!(matches!(again, Next::Lookup(_)), "{again:?}");
    let not_there = CallResult::Failed {
        message: "HTTP 404: not found".into(),
        status: Some(404),
        attempts: 1,
    };
    let create = plan(m.apply(&mut inst, Input::LookupDone(not_there)));
    assert_eq!(create.action, "createCreditNote");

    // The lookup answered with JSON holding a number no exact decimal
    // holds: kept as text, its fields would read as false ("not there").
    // It could not answer, so the call is not made.
    let mut unreadable = inst.clone();
    unreadable.outbox.clear();
    let odd = CallResult::Response {
        status: 200,
        headers: BTreeMap::new(),
        body: r#"{"externalReference": "rma-RMA-1", "residue": 1.4210854715202004e-14}"#.into(),
        attempts: 1,
    };
    assert_eq!(m.apply(&mut unreadable, Input::LookupDone(odd)), Next::Idle);
    assert!(
        matches!(unreadable.wait, Some(Wait::FailedCall { .. })),
        "{:?}",
        unreadable.wait
    );
}

/// A response as stored (JSON text) and as kept in memory: a body that is
/// not JSON stays a string, an empty one is null, decimals keep their
/// digits, and a value kept in memory is the one its text reads as.
#[test]
fn a_response_in_memory_and_its_stored_text_agree() {
    let cases = [
        (
            r#"{"lines": [{"qty": 2, "unitPrice": "19.99"}, {"qty": 5, "unitPrice": 0.10}]}"#,
            r#"{"lines":[{"qty":2,"unitPrice":"19.99"},{"qty":5,"unitPrice":0.10}]}"#,
            true,
        ),
        // An exponent reads as a decimal without a fraction: written as an
        // integer, so it is not kept parsed.
        (r#"{"n": 1e2}"#, r#"{"n":100}"#, false),
        ("not json", r#""not json""#, true),
        ("  ", "null", true),
        ("[1, 2.50, null]", "[1,2.50,null]", true),
    ];
    for (body, stored_body, stable) in cases {
        let result = CallResult::Response {
            status: 200,
            headers: BTreeMap::from([("etag".to_string(), "\"v1\"".to_string())]),
            body: body.into(),
            attempts: 1,
        };
        let value = response_val(&result);
        let text = value.to_json().unwrap();
        assert_eq!(
            text,
            format!(r#"{{"body":{stored_body},"headers":{{"etag":"\"v1\""}},"status":200}}"#),
            "{body}"
        );
        assert_eq!(value.json_stable(), stable, "{body}");
        if stable {
            let back = json::parse_fast(text.as_bytes()).unwrap();
            assert_eq!(format!("{back:?}"), format!("{value:?}"), "{body}");
        }
    }
}

/// Steps `order` → `invoice` of shipment-to-invoice, one machine per input
/// as the worker runs them; `carry`: each machine starts from the values
/// the previous one parsed.
fn run_inputs(def: &Compiled, inputs: Vec<Input>, carry: bool) -> Instance {
    let mut inst = Instance::new("4711", &def.revision, t0().timestamp_millis());
    let mut values = Values::default();
    for input in inputs {
        let m = if carry {
            // As the worker does: the event parsed to correlate it is reused.
            if let Input::Event(ev) = &input {
                let mut parsed = Values::default();
                assert_eq!(
                    Machine::correlate_into(def, ev, &mut parsed).unwrap(),
                    "4711"
                );
                values.merge(parsed);
            }
            Machine::with_values(def, t0(), std::mem::take(&mut values))
        } else {
            Machine::new(def, t0())
        };
        inst.clear_outbox();
        let next = m.apply(&mut inst, input);
        answer_calls(&m, &mut inst, next);
        values = m.into_values();
    }
    inst
}

/// A value parsed for one event, response or variable is not read for
/// another that replaced it.
#[test]
fn carried_values_are_checked_against_the_instance() {
    use crate::cel::{Program, Scope};
    let def = compiled("shipment-to-invoice");
    let read = Program::compile(
        "[events['shipment.confirmed'].data.shipmentId, steps.order.response.body.n, vars.v]",
        Scope::Step,
    )
    .unwrap();
    let mut inst = Instance::new("4711", &def.revision, t0().timestamp_millis());
    let mut values = Values::default();
    for n in 1..=3 {
        let Input::Event(mut ev) = shipment(5) else {
            unreachable!()
        };
        ev.data = ev.data.replace("SH-9", &format!("SH-{n}"));
        inst.events.insert(ev.type_.clone(), ev);
        inst.responses.insert(
            "order".into(),
            format!(r#"{{"body":{{"n":{n}}},"headers":{{}},"status":200}}"#),
        );
        inst.vars.insert("v".into(), format!("{n}.5"));
        let m = Machine::with_values(&def, t0(), std::mem::take(&mut values));
        let got = read.eval(&m.vars(&inst).unwrap()).unwrap();
        assert_eq!(
            json::to_string(&got).unwrap(),
            format!(r#"["SH-{n}",{n},{n}.5]"#)
        );
        values = m.into_values();
    }
}

#[test]
fn values_carried_between_inputs_change_nothing() {
    let def = compiled("shipment-to-invoice");
    // The second shipment event replaces the first (same type, new data):
    // a value parsed from the first must not be read for it.
    let second = event(
        "s-2",
        "shipment.confirmed",
        r#"{"orderId": "4711", "shipmentId": "SH-10", "warehouse": "HAM", "confirmedBy": "x",
            "lines": [{"sku": "A", "qty": 2}, {"sku": "B", "qty": 5}]}"#,
    );
    let inputs = || vec![shipment(3), second.clone(), order_created()];
    let fresh = run_inputs(&def, inputs(), false);
    let carried = run_inputs(&def, inputs(), true);
    assert_eq!(
        serde_json::to_string(&fresh).unwrap(),
        serde_json::to_string(&carried).unwrap()
    );
    assert_eq!(carried.status, Status::Completed);
    assert!(carried.responses["invoice"].contains("INV-1"));
    assert!(emits(&carried)[0].1.contains(r#""shipmentId":"SH-10""#));
}

#[test]
fn sealing_moves_the_audit_records_into_one_message_written_once() {
    let def = compiled("shipment-to-invoice");
    let m = Machine::new(&def, t0());
    let mut inst = Instance::new("4711", &def.revision, t0().timestamp_millis());
    m.apply(&mut inst, order_created());
    let records = audits(&inst);
    assert!(records.len() >= 2);
    let others = inst.outbox.len() - records.len();
    inst.seal_audits("finance/shipment-to-invoice/4711")
        .unwrap();
    let batch = inst.audit_batch.clone().unwrap();
    assert_eq!(
        batch.msg_id,
        format!(
            "finance/shipment-to-invoice/4711/audit/1-{}",
            records.last().unwrap().seq
        )
    );
    let sealed: Vec<AuditRecord> = serde_json::from_str(batch.records.get()).unwrap();
    assert_eq!(sealed, records, "every record, in chain order");
    assert!(audits(&inst).is_empty());
    assert_eq!(inst.outbox.len(), others, "the wake-up stays");
    // Stored and read back as it is.
    let text = serde_json::to_string(&inst).unwrap();
    let back: Instance = serde_json::from_str(&text).unwrap();
    assert_eq!(back, inst);
    assert!(text.contains(r#""auditBatch":{"msgId""#));
    // Nothing to seal: no batch.
    inst.clear_outbox();
    inst.seal_audits("x").unwrap();
    assert_eq!(inst.audit_batch, None);
}

#[test]
fn inputs_applied_in_one_commit_leave_only_the_wake_up_still_needed() {
    let def = compiled("shipment-to-invoice");
    let m = Machine::new(&def, t0());
    // The order alone arms the SLA: one wake-up, at 4 h.
    let mut inst = Instance::new("4711", &def.revision, 0);
    assert_eq!(m.apply(&mut inst, order_created()), Next::Idle);
    assert_eq!(
        wakes(&inst),
        [(t0() + chrono::Duration::hours(4)).timestamp_millis()]
    );
    // The shipment in the same commit: the instance runs to its end, so
    // the wake-up the order asked for is not published at all.
    let next = m.apply(&mut inst, shipment(5));
    answer_calls(&m, &mut inst, next);
    assert_eq!(inst.status, Status::Completed);
    assert_eq!(wakes(&inst), Vec::<i64>::new());
    // The records of both inputs are in the outbox, in chain order.
    let seqs: Vec<u64> = audits(&inst).iter().map(|r| r.seq).collect();
    assert!(seqs.len() > 3 && seqs.windows(2).all(|w| w[1] == w[0] + 1));
    assert_eq!(seqs[0], 1);

    // A timer that changes twice within a commit: only the last is kept.
    let mut inst = Instance::new("4712", &def.revision, 0);
    m.apply(&mut inst, order_created());
    let at_4h = Machine::new(&def, t0() + chrono::Duration::hours(4));
    assert_eq!(at_4h.apply(&mut inst, Input::Wake), Next::Idle);
    assert!(inst.sla_breached);
    assert_eq!(
        wakes(&inst),
        [(t0() + chrono::Duration::hours(24)).timestamp_millis()]
    );
}

#[test]
fn a_commit_leaves_one_wake_up_to_schedule_or_one_to_cancel() {
    let def = compiled("shipment-to-invoice");
    let m = Machine::new(&def, t0());
    let at_4h = (t0() + chrono::Duration::hours(4)).timestamp_millis();
    let settled = |inst: &mut Instance, scheduled: Option<i64>| -> Vec<Outbound> {
        inst.settle_wake(scheduled, false);
        inst.outbox
            .iter()
            .filter(|o| matches!(o, Outbound::Wake { .. } | Outbound::CancelWake))
            .cloned()
            .collect()
    };
    let complete = |inst: &mut Instance| {
        let next = m.apply(inst, shipment(5));
        answer_calls(&m, inst, next);
        assert_eq!(inst.status, Status::Completed);
    };

    // A new instance left waiting: its SLA is scheduled.
    let mut inst = Instance::new("4711", &def.revision, 0);
    m.apply(&mut inst, order_created());
    assert_eq!(settled(&mut inst, None), [Outbound::Wake { due_ms: at_4h }]);
    // The next commit ends it: the schedule the broker holds is removed.
    inst.clear_outbox();
    complete(&mut inst);
    assert_eq!(settled(&mut inst, Some(at_4h)), [Outbound::CancelWake]);

    // Both events in one commit: nothing scheduled, nothing to remove.
    let mut inst = Instance::new("4712", &def.revision, 0);
    m.apply(&mut inst, order_created());
    complete(&mut inst);
    assert_eq!(settled(&mut inst, None), []);

    // An input that changes nothing about the timers leaves the schedule.
    let mut inst = Instance::new("4713", &def.revision, 0);
    m.apply(&mut inst, order_created());
    inst.settle_wake(None, false);
    inst.clear_outbox();
    let again = event(
        "o-2",
        "order.created",
        r#"{"orderId": "4713", "customerId": "C-1", "channel": "web"}"#,
    );
    assert_eq!(m.apply(&mut inst, again), Next::Idle);
    assert_eq!(settled(&mut inst, Some(at_4h)), []);
}

#[test]
fn a_running_instance_leaves_a_wake_up_it_no_longer_needs_to_fire() {
    // Removing the schedule of a running instance could race a replica
    // that armed a newer one on the same subject and remove that instead;
    // a wake-up nobody needs fires into nothing.
    let mut def = example_def();
    def.spec.sla = None;
    def.spec.trigger.events.push("payment.received".into());
    def.spec.steps = serde_json::from_value(serde_json::json!([
        {"name": "ship", "await": {"events": ["shipment.confirmed"], "timeout": "1h"}},
        {"name": "paid", "await": {"events": ["payment.received"]}},
    ]))
    .unwrap();
    let def = Compiled::new(def).unwrap();
    let m = Machine::new(&def, t0());
    let mut inst = Instance::new("4711", &def.revision, 0);
    let at_1h = (t0() + chrono::Duration::hours(1)).timestamp_millis();
    assert_eq!(m.apply(&mut inst, order_created()), Next::Idle);
    inst.settle_wake(None, false);
    assert_eq!(inst.outbox.last(), Some(&Outbound::Wake { due_ms: at_1h }));
    inst.clear_outbox();
    m.apply(&mut inst, shipment(5));
    assert_eq!(
        (inst.status, inst.step, inst.wake_ms),
        (Status::Running, 1, None)
    );
    inst.settle_wake(Some(at_1h), false);
    assert!(
        !inst
            .outbox
            .iter()
            .any(|o| matches!(o, Outbound::CancelWake)),
        "{:?}",
        inst.outbox
    );
    assert!(inst.wake_left);
    let paid = || event("p-1", "payment.received", r#"{"orderId": "4711"}"#);

    // Ended before it fired: the schedule left behind is removed then.
    let mut ended = inst.clone();
    ended.clear_outbox();
    m.apply(&mut ended, paid());
    assert_eq!(ended.status, Status::Completed);
    ended.settle_wake(None, false);
    assert_eq!(ended.outbox.last(), Some(&Outbound::CancelWake));
    assert!(!ended.wake_left);

    // It fires into nothing: no change but the clock, nothing left.
    let later = Machine::new(&def, t0() + chrono::Duration::hours(1));
    let before = inst.clone();
    inst.clear_outbox();
    assert_eq!(later.apply(&mut inst, Input::Wake), Next::Idle);
    assert_eq!(
        (inst.step, inst.wake_ms, &inst.timers),
        (1, None, &before.timers)
    );
    inst.settle_wake(None, true);
    assert!(!inst.wake_left && inst.outbox.is_empty());
    // Then it ends with nothing scheduled: nothing to remove.
    m.apply(&mut inst, paid());
    assert_eq!(inst.status, Status::Completed);
    inst.clear_outbox();
    inst.settle_wake(None, false);
    assert!(
        !inst
            .outbox
            .iter()
            .any(|o| matches!(o, Outbound::CancelWake))
    );
}

#[test]
fn a_variable_set_again_is_read_with_its_new_value() {
    // Steps read the variables through maps the machine keeps between
    // steps while nothing in them changed; `n` changes value, not name.
    let dir = std::env::temp_dir().join(format!("tallyman-engine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("workflow.yaml"),
        r#"apiVersion: tallyman.dev/v1alpha1
kind: Workflow
metadata: {name: counter, namespace: finance}
spec:
  trigger: {events: [tick], correlate: "event.data.id"}
  steps:
    - name: first
      set: {n: "1"}
    - name: second
      set: {n: "vars.n + 1"}
    - name: third
      set: {seen: "vars.n"}
    - name: done
      emit: {type: counted, data: '{"n": vars.seen, "key": key}'}
"#,
    )
    .unwrap();
    let report = validate::validate_paths(std::slice::from_ref(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!report.has_errors(), "{:?}", report);
    let def = Compiled::new(report.definition("finance", "counter").unwrap()).unwrap();
    let m = Machine::new(&def, t0());
    let mut inst = Instance::new("7", &def.revision, 0);
    assert_eq!(
        m.apply(&mut inst, event("t-1", "tick", r#"{"id": "7"}"#)),
        Next::Idle
    );
    assert_eq!(inst.status, Status::Completed, "{:?}", inst.outcome);
    assert_eq!(
        emits(&inst),
        [("counted".to_string(), r#"{"key":"7","n":2}"#.to_string())]
    );
}

#[test]
fn a_whole_decimal_stays_a_decimal_once_stored() {
    // `decimal(100)` has no fraction: written as `100` it read back as the
    // integer 100, and `vars.net / 3` divided as integers (33).
    let def = with_steps(serde_json::json!([
        {"name": "order", "await": {"events": ["order.created"]}},
        {"name": "net", "set": {
            "net": "decimal(100)",
            "lines": "[decimal(2), decimal('0.50')]",
            "nested": "{'total': decimal(7) * 2}",
        }},
        {"name": "ship", "await": {"events": ["shipment.confirmed"]}},
        {"name": "split", "set": {"third": "round(vars.net / 3, 2)"}},
        {"name": "done", "emit": {"type": "split", "data": concat!(
            "{'third': vars.third, 'net': vars.net, 'lines': vars.lines,",
            " 'half': vars.nested.total / 4}"
        )}},
    ]));
    let mut inst = Instance::new("4711", &def.revision, 0);
    assert_eq!(
        Machine::new(&def, t0()).apply(&mut inst, order_created()),
        Next::Idle
    );
    // As a worker reads it back: stored, loaded, a machine of its own.
    let mut inst = reloaded(&inst);
    assert_eq!(
        Machine::new(&def, t0()).apply(&mut inst, shipment(5)),
        Next::Idle
    );
    assert_eq!(inst.status, Status::Completed, "{:?}", inst.outcome);
    // What leaves the engine is written as before: `100`, not `100.0`.
    assert_eq!(
        emits(&inst),
        [(
            "split".to_string(),
            r#"{"half":3.50,"lines":[2,0.50],"net":100,"third":33.33}"#.to_string()
        )]
    );
}

#[test]
fn a_timestamp_stays_a_timestamp_once_stored() {
    // A deadline kept in a variable was read back as its text, and
    // `wait.until` refused it (it must give a timestamp).
    let def = with_steps(serde_json::json!([
        {"name": "order", "await": {"events": ["order.created"]}},
        {"name": "promise", "set": {
            "due": "now + duration('48h')",
            "both": "{'at': [now]}",
        }},
        {"name": "ship", "await": {"events": ["shipment.confirmed"]}},
        {"name": "late", "set": {"late": "vars.due < now"}},
        {"name": "hold", "wait": {"until": "vars.both.at[0] + duration('49h')"}},
        {"name": "done", "emit": {"type": "promised", "data": "{'due': vars.due, 'late': vars.late}"}},
    ]));
    let mut inst = Instance::new("4711", &def.revision, 0);
    assert_eq!(
        Machine::new(&def, t0()).apply(&mut inst, order_created()),
        Next::Idle
    );
    let mut inst = reloaded(&inst);
    let later = t0() + chrono::Duration::hours(47);
    let next = Machine::new(&def, later).apply(&mut inst, shipment(5));
    assert_eq!(inst.status, Status::Running, "{:?}", inst.outcome);
    assert_eq!(next, Next::Idle);
    let mut inst = reloaded(&inst);
    let due = (t0() + chrono::Duration::hours(49)).timestamp_millis();
    let Some(Wait::Timer { timer }) = inst.wait.clone() else {
        panic!("waits for its timer: {:?}", inst.wait)
    };
    assert_eq!(
        inst.timers[&timer], due,
        "the wait counts from the stored time"
    );
    Machine::new(&def, later).apply(&mut inst, Input::Timer { token: timer });
    assert_eq!(inst.status, Status::Completed, "{:?}", inst.outcome);
    assert_eq!(
        emits(&inst),
        [(
            "promised".to_string(),
            r#"{"due":"2026-11-28T09:00:00+00:00","late":false}"#.to_string()
        )]
    );
}

#[test]
fn a_breached_slas_case_decision_joins_the_chain() {
    // A case for the record resumes nothing, but its decision is audited
    // like any other (it was not: only blocking cases reached the engine).
    use tallyman_api::v1alpha1::{CaseDecision, SlaBreach, Verdict};
    let mut def = example_def();
    def.spec.sla.as_mut().unwrap().on_breach = SlaBreach::Exception;
    let def = Compiled::new(def).unwrap();
    let m = Machine::new(&def, t0());
    let mut inst = Instance::new("4711", &def.revision, 0);
    m.apply(&mut inst, order_created());
    let at_4h = Machine::new(&def, t0() + chrono::Duration::hours(4));
    inst.clear_outbox();
    at_4h.apply(&mut inst, Input::Wake);
    let case = inst
        .outbox
        .iter()
        .find_map(|o| match o {
            Outbound::OpenCase(req) if req.reason == "SlaBreached" => Some(req.name.clone()),
            _ => None,
        })
        .expect("a case for the breach");
    assert!(inst.is_running());
    let waiting = inst.wait.clone();
    inst.clear_outbox();
    let resolved = Input::CaseResolved {
        name: case.clone(),
        approved: true,
        detail: "acknowledged by alice".into(),
        history: CaseHistory {
            decisions: vec![CaseDecision {
                approver: "alice".into(),
                groups: vec!["finance-controllers".into()],
                decision: Verdict::Approve,
                comment: Some("carrier strike".into()),
            }],
            escalated_to: None,
            expired: false,
        },
    };
    assert_eq!(at_4h.apply(&mut inst, resolved.clone()), Next::Idle);
    let kinds: Vec<_> = audits(&inst).iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        [AuditKind::DecisionRecorded, AuditKind::CaseApproved]
    );
    assert_eq!(audits(&inst)[0].detail["approver"], "alice");
    assert_eq!(inst.wait, waiting, "nothing moves on");
    assert_eq!(inst.sla_case, None);
    // Once: the same decision again records nothing.
    inst.clear_outbox();
    at_4h.apply(&mut inst, resolved);
    assert!(audits(&inst).is_empty());
}
