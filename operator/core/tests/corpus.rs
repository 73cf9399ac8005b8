//! The invalid-manifest corpus: every file under `tests/invalid/` must be
//! refused with exactly the errors its header announces.
//!
//! Header lines (comments at the top of the fixture):
//!
//! ```text
//! # expect: spec.steps[2].call.action | has no action "createInvoce"
//! # expect: - | malformed YAML          (`-` is the whole document)
//! # expect-line: 7                      (optional: the line of the first error)
//! ```
//!
//! Each `expect` names a field path and a fragment of the message; the
//! fixture must produce one error per `expect`, and no other error.

use std::path::{Path, PathBuf};

use tallyman_core::validate::{self, Severity};

struct Expect {
    path: String,
    fragment: String,
}

fn expectations(text: &str) -> (Vec<Expect>, Option<usize>) {
    let mut expects = Vec::new();
    let mut line = None;
    for l in text.lines().take_while(|l| l.starts_with('#')) {
        if let Some(rest) = l.strip_prefix("# expect:") {
            let (path, fragment) = rest.split_once('|').expect("expect: PATH | FRAGMENT");
            let path = path.trim();
            expects.push(Expect {
                path: if path == "-" {
                    String::new()
                } else {
                    path.to_string()
                },
                fragment: fragment.trim().to_string(),
            });
        } else if let Some(n) = l.strip_prefix("# expect-line:") {
            line = Some(n.trim().parse().expect("expect-line: N"));
        }
    }
    (expects, line)
}

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/invalid exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_invalid_manifest_is_refused_with_its_field_path() {
    let files = fixtures();
    assert!(
        files.len() >= 40,
        "the corpus has {} fixtures, want at least 40",
        files.len()
    );
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("fixture readable");
        let (expects, line) = expectations(&text);
        let name = file.file_name().unwrap().to_string_lossy();
        if expects.is_empty() {
            failures.push(format!("{name}: no `# expect:` header"));
            continue;
        }
        let report = validate::validate_paths(std::slice::from_ref(file));
        let errors: Vec<_> = report.errors().collect();
        let shown = || {
            errors
                .iter()
                .map(|e| format!("    {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        for x in &expects {
            if !errors
                .iter()
                .any(|e| e.path == x.path && e.message.contains(&x.fragment))
            {
                failures.push(format!(
                    "{name}: no error at {:?} containing {:?}; errors were:\n{}",
                    x.path,
                    x.fragment,
                    shown()
                ));
            }
        }
        for e in &errors {
            if !expects
                .iter()
                .any(|x| e.path == x.path && e.message.contains(&x.fragment))
            {
                failures.push(format!("{name}: unexpected error: {e}"));
            }
        }
        if let (Some(want), Some(first)) = (line, errors.first())
            && first.line != want
        {
            failures.push(format!(
                "{name}: first error on line {}, want {want}",
                first.line
            ));
        }
        for e in &errors {
            assert_eq!(e.severity, Severity::Error);
            assert!(e.file.ends_with(&*name), "{e}");
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn the_examples_are_valid() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let report = validate::validate_paths(&[examples]);
    let problems: Vec<String> = report.diagnostics.iter().map(|d| d.to_string()).collect();
    assert!(report.read_errors.is_empty(), "{:?}", report.read_errors);
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    assert!(
        report.resources >= 4 * 4,
        "only {} resources found",
        report.resources
    );
}

/// The report on one file of manifests, written to a directory of its own.
fn validate_one(dir: &str, file: &str, text: &str) -> validate::Report {
    let dir = std::env::temp_dir().join(format!("{dir}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(file), text).unwrap();
    let report = validate::validate_paths(std::slice::from_ref(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
    report
}

#[test]
fn a_double_literal_in_an_expression_is_warned_about_but_valid() {
    let report = validate_one(
        "tallyman-doubles",
        "policy.yaml",
        r#"apiVersion: tallyman.dev/v1alpha1
kind: ApprovalPolicy
metadata: {name: variance, namespace: finance}
spec:
  rules:
    - {name: tiny, when: "facts.amount < decimal('500.00')", decide: AutoApprove}
    - {name: rest, when: "facts.amount < 0.1 + 0.2", decide: AutoReject}
"#,
    );
    assert!(!report.has_errors(), "{:?}", report.diagnostics);
    let warnings: Vec<_> = report.warnings().collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].path, "spec.rules[1].when");
    assert!(
        warnings[0].message.contains("0.1 is a CEL double")
            && warnings[0].message.contains("write decimal('0.1')"),
        "{}",
        warnings[0].message
    );
}

/// `now` moves on between a call and its repeat after a crash. Through a
/// variable, a key or a lookup that reads it is warned about (the variable
/// may have been stored before the call), and so is the body of an action
/// with an idempotency header, directly or not; the event's own time is
/// not.
#[test]
fn a_call_that_reads_the_clock_through_a_variable_is_warned_about() {
    let report = validate_one(
        "tallyman-clock",
        "workflow.yaml",
        r#"apiVersion: tallyman.dev/v1alpha1
kind: Connector
metadata: {name: erp, namespace: finance}
spec:
  system: erp
  rest:
    baseUrl: https://erp.example.com/api
    actions:
      getOrder: {method: GET, path: "/orders/{orderId}"}
      createInvoice: {method: POST, path: /invoices, idempotency: {header: Idempotency-Key}}
      postPayment: {method: POST, path: /payments}
      findPayment: {method: GET, path: "/payments/{ref}"}
---
apiVersion: tallyman.dev/v1alpha1
kind: Workflow
metadata: {name: wf, namespace: finance}
spec:
  trigger: {events: [order.created], correlate: "event.data.orderId"}
  steps:
    - name: dates
      set:
        today: "string(now)"
        booked: "events['order.created'].time"
    - name: due
      set: {due: "timestamp(vars.today) + duration('720h')"}
    - name: order
      call: {connector: erp, action: getOrder, params: {orderId: "key + string(now)"}}
    - name: invoice
      call:
        connector: erp
        action: createInvoice
        idempotencyKey: "'inv-' + key + vars.today"
        body: "{'orderId': key, 'dueDate': string(vars.due), 'bookedAt': vars.booked}"
    - name: again
      call: {connector: erp, action: createInvoice, body: "{'orderId': key, 'at': string(now)}"}
    - name: pay
      call:
        connector: erp
        action: postPayment
        body: "{'orderId': key, 'at': string(now)}"
        lookup: {action: findPayment, params: {ref: "key + vars.today"}, found: "response.status == 200"}
"#,
    );
    assert!(!report.has_errors(), "{:?}", report.diagnostics);
    let warnings: Vec<(String, String)> = report
        .warnings()
        .map(|w| (w.path.clone(), w.message.clone()))
        .collect();
    let paths: Vec<&str> = warnings.iter().map(|(p, _)| p.as_str()).collect();
    // The GET and the payment have no idempotency header: nothing refuses
    // a changed request. `booked` is the event's own time.
    assert_eq!(
        paths,
        [
            "spec.steps[3].call.idempotencyKey",
            "spec.steps[3].call.body",
            "spec.steps[4].call.body",
            "spec.steps[5].call.lookup.params[ref]",
        ],
        "{warnings:?}"
    );
    let stable = "which a step sets from now, so unless the instance is stored between that step and this call";
    assert!(
        warnings[0].1.starts_with("reads vars.today, ")
            && warnings[0].1.contains(stable)
            && warnings[0]
                .1
                .contains("its effect (an invoice, a payment) would happen twice"),
        "{}",
        warnings[0].1
    );
    assert!(
        warnings[1].1.starts_with("reads vars.due, ") && warnings[1].1.contains(stable),
        "{}",
        warnings[1].1
    );
    assert!(
        warnings[2]
            .1
            .starts_with("reads now so a repeat of this call")
            && warnings[2].1.contains("events['<type>'].time"),
        "{}",
        warnings[2].1
    );
    assert!(
        warnings[3]
            .1
            .contains("the lookup of a repeat would not find"),
        "{}",
        warnings[3].1
    );
}
