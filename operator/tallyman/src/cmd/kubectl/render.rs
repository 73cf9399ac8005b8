//! What `kubectl tallyman cases` and `kubectl tallyman describe` print: the
//! words a finance controller reads before deciding. Pure, so the tests pin
//! the layout without a cluster.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;
use tallyman_api::v1alpha1::{ExceptionCase, ExceptionCaseStatus, Verdict};
use tallyman_core::policy;

/// Which cases `cases` lists and how.
#[derive(Clone, Copy, Debug)]
pub struct View {
    /// Closed cases too, not only the ones waiting for people.
    pub all: bool,
    /// A NAMESPACE column, for `-A`.
    pub namespaces: bool,
}

/// The cases as a table, oldest first within a namespace; `None` when no
/// case is shown.
pub fn cases_table(cases: &[ExceptionCase], view: View, now: DateTime<Utc>) -> Option<String> {
    let mut shown: Vec<&ExceptionCase> = cases
        .iter()
        .filter(|c| view.all || policy::is_open(&status(c)))
        .collect();
    if shown.is_empty() {
        return None;
    }
    shown.sort_by(|a, b| {
        (&a.metadata.namespace, created(a), &a.metadata.name).cmp(&(
            &b.metadata.namespace,
            created(b),
            &b.metadata.name,
        ))
    });
    let mut header = vec![
        "NAME",
        "WORKFLOW",
        "KEY",
        "REASON",
        "AMOUNT",
        "APPROVALS",
        "AGE",
        "STATE",
    ];
    if view.namespaces {
        header.insert(0, "NAMESPACE");
    }
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for case in shown {
        let status = status(case);
        let (_, approvals) = policy::tally(&case.spec, &status);
        let needed = policy::required(&case.spec, &status);
        let mut row = vec![
            case.metadata.name.clone().unwrap_or_default(),
            case.spec.workflow.clone(),
            case.spec.key.clone(),
            case.spec.reason.clone(),
            amount(&case.spec.facts),
            format!("{approvals}/{}", needed.count),
            created(case).map_or_else(|| "<unknown>".into(), |t| age(now - t)),
            format!("{:?}", status.state),
        ];
        if view.namespaces {
            row.insert(0, case.metadata.namespace.clone().unwrap_or_default());
        }
        rows.push(row);
    }
    Some(table(&rows))
}

/// Everything a person needs before deciding: the facts, who must approve,
/// what has been decided, the deadline and where the case stands.
pub fn describe(case: &ExceptionCase, now: DateTime<Utc>) -> String {
    let spec = &case.spec;
    let status = status(case);
    let needed = policy::required(spec, &status);
    let (_, approvals) = policy::tally(spec, &status);
    let mut fields: Vec<(&str, String)> = vec![
        ("Name", case.metadata.name.clone().unwrap_or_default()),
        (
            "Namespace",
            case.metadata.namespace.clone().unwrap_or_default(),
        ),
        (
            "Workflow",
            format!("{} (revision {})", spec.workflow, spec.revision),
        ),
        ("Key", spec.key.clone()),
        ("Reason", spec.reason.clone()),
        ("Initiator", spec.initiator.clone()),
        ("Policy", format!("{}, rule {}", spec.policy, spec.rule)),
        ("State", format!("{:?}", status.state)),
        (
            "Approvals",
            format!(
                "{approvals} of {}, from {}",
                needed.count,
                needed.groups.join(" or ")
            ),
        ),
        ("Segregation", segregation(case)),
    ];
    if let Some(deadline) = status.deadline.as_ref().or(spec.deadline.as_ref()) {
        let deadline = policy::from_time(deadline);
        let when = if deadline > now {
            format!("in {}", age(deadline - now))
        } else {
            format!("passed {} ago", age(now - deadline))
        };
        fields.push((
            "Deadline",
            format!(
                "{} ({when})",
                deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        ));
    }
    if let Some(to) = &spec.escalate_to {
        fields.push((
            "Escalates to",
            format!(
                "{} ({} approval{})",
                to.groups.join(" or "),
                to.count,
                if to.count == 1 { "" } else { "s" }
            ),
        ));
    }
    if let Some(message) = &status.message {
        fields.push(("Message", message.clone()));
    }
    if let Some(t) = created(case) {
        fields.push(("Age", age(now - t)));
    }
    // Two spaces after the longest "Key:", as kubectl describe aligns.
    let width = fields.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0) + 2;
    let mut out = String::new();
    for (key, value) in &fields {
        out.push_str(&format!("{:width$}{value}\n", format!("{key}:")));
    }
    out.push_str("Facts:\n");
    if spec.facts.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let rows: Vec<Vec<String>> = spec
            .facts
            .iter()
            .map(|(k, v)| vec![format!("{k}:"), text(v)])
            .collect();
        out.push_str(&indent(&table(&rows)));
    }
    out.push_str("Decisions:\n");
    if spec.decisions.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let mut rows = vec![
            ["APPROVER", "GROUPS", "DECISION", "COMMENT"]
                .map(String::from)
                .to_vec(),
        ];
        for d in &spec.decisions {
            rows.push(vec![
                d.approver.clone(),
                if d.groups.is_empty() {
                    "<none>".into()
                } else {
                    d.groups.join(",")
                },
                match d.decision {
                    Verdict::Approve => "Approve".into(),
                    Verdict::Reject => "Reject".into(),
                },
                d.comment.clone().unwrap_or_default(),
            ]);
        }
        out.push_str(&indent(&table(&rows)));
    }
    out
}

/// A case the worker has not written a status for yet is open.
pub fn status(case: &ExceptionCase) -> ExceptionCaseStatus {
    case.status.clone().unwrap_or_default()
}

fn created(case: &ExceptionCase) -> Option<DateTime<Utc>> {
    case.metadata
        .creation_timestamp
        .as_ref()
        .map(policy::from_time)
}

fn segregation(case: &ExceptionCase) -> String {
    let sod = &case.spec.segregation_of_duties;
    let mut rules = Vec::new();
    if sod.exclude_initiator {
        rules.push(format!(
            "{} (the initiator) may not decide",
            case.spec.initiator
        ));
    }
    if sod.distinct_approvers {
        rules.push("every decision from a different person".to_string());
    }
    if rules.is_empty() {
        "none".into()
    } else {
        rules.join("; ")
    }
}

/// `facts.amount` as the worker wrote it: a decimal string, or a number.
fn amount(facts: &serde_json::Map<String, Value>) -> String {
    facts.get("amount").map(text).unwrap_or_default()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A duration the way kubectl prints ages: two units while that is useful,
/// one after.
pub fn age(d: TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    let (m, h, days) = (s / 60, s / 3600, s / 86_400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        match s % 60 {
            0 => format!("{m}m"),
            r => format!("{m}m{r}s"),
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        match m % 60 {
            0 => format!("{h}h"),
            r => format!("{h}h{r}m"),
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        match h % 24 {
            0 => format!("{days}d"),
            r => format!("{days}d{r}h"),
        }
    } else if days < 365 * 2 {
        format!("{days}d")
    } else {
        let years = days / 365;
        match days % 365 {
            r if years < 8 && r > 0 => format!("{years}y{r}d"),
            _ => format!("{years}y"),
        }
    }
}

/// Columns separated by three spaces, as kubectl's tables are.
fn table(rows: &[Vec<String>]) -> String {
    crate::cmd::table::columns(rows, 3)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str, created: &str, status: Value, decisions: Value) -> ExceptionCase {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "tallyman.dev/v1alpha1",
            "kind": "ExceptionCase",
            "metadata": {"name": name, "namespace": "finance", "creationTimestamp": created},
            "spec": {
                "workflow": "shipment-to-invoice",
                "key": name.rsplit('-').next().unwrap(),
                "revision": "5f2c9a1e",
                "reason": "QuantityMismatch",
                "facts": {"amount": "12500.00", "variancePercent": "4.20"},
                "initiator": "carol",
                "policy": "variance-approval",
                "rule": "dual",
                "required": {"groups": ["finance-controllers", "cfo-office"], "count": 2},
                "segregationOfDuties": {"excludeInitiator": true, "distinctApprovers": true},
                "deadline": "2026-11-27T09:14:02Z",
                "escalateTo": {"groups": ["cfo-office"], "count": 1},
                "decisions": decisions,
            },
            "status": status,
        }))
        .unwrap()
    }

    fn now() -> DateTime<Utc> {
        "2026-11-26T10:00:00Z".parse().unwrap()
    }

    fn alice() -> Value {
        serde_json::json!([{"approver": "alice", "groups": ["finance-controllers"], "decision": "Approve",
            "comment": "variance explained by the carrier's short delivery"}])
    }

    fn cases() -> Vec<ExceptionCase> {
        vec![
            case(
                "shipment-to-invoice-4712",
                "2026-11-26T09:58:30Z",
                Value::Null,
                serde_json::json!([]),
            ),
            case(
                "shipment-to-invoice-4711",
                "2026-11-25T09:14:02Z",
                serde_json::json!({"state": "Open", "approvals": 1}),
                alice(),
            ),
            case(
                "shipment-to-invoice-4690",
                "2026-11-20T08:00:00Z",
                serde_json::json!({"state": "Approved", "approvals": 2}),
                serde_json::json!([]),
            ),
        ]
    }

    #[test]
    fn open_cases_oldest_first() {
        let view = View {
            all: false,
            namespaces: false,
        };
        assert_eq!(
            cases_table(&cases(), view, now()).unwrap(),
            "\
NAME                       WORKFLOW              KEY    REASON             AMOUNT     APPROVALS   AGE   STATE
shipment-to-invoice-4711   shipment-to-invoice   4711   QuantityMismatch   12500.00   1/2         24h   Open
shipment-to-invoice-4712   shipment-to-invoice   4712   QuantityMismatch   12500.00   0/2         90s   Open
"
        );
    }

    #[test]
    fn all_cases_across_namespaces() {
        let view = View {
            all: true,
            namespaces: true,
        };
        let table = cases_table(&cases(), view, now()).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE   NAME "), "{table}");
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[1].starts_with("finance     shipment-to-invoice-4690"));
        assert!(lines[1].ends_with("2/2         6d2h   Approved"), "{table}");
    }

    #[test]
    fn no_open_case_shows_nothing() {
        let closed = vec![cases().remove(2)];
        let view = View {
            all: false,
            namespaces: false,
        };
        assert_eq!(cases_table(&closed, view, now()), None);
    }

    #[test]
    fn describe_tells_everything_needed_to_decide() {
        let case = case(
            "shipment-to-invoice-4711",
            "2026-11-25T09:14:02Z",
            serde_json::json!({"state": "Open", "approvals": 1}),
            alice(),
        );
        assert_eq!(
            describe(&case, now()),
            "\
Name:          shipment-to-invoice-4711
Namespace:     finance
Workflow:      shipment-to-invoice (revision 5f2c9a1e)
Key:           4711
Reason:        QuantityMismatch
Initiator:     carol
Policy:        variance-approval, rule dual
State:         Open
Approvals:     1 of 2, from finance-controllers or cfo-office
Segregation:   carol (the initiator) may not decide; every decision from a different person
Deadline:      2026-11-27T09:14:02Z (in 23h)
Escalates to:  cfo-office (1 approval)
Age:           24h
Facts:
  amount:            12500.00
  variancePercent:   4.20
Decisions:
  APPROVER   GROUPS                DECISION   COMMENT
  alice      finance-controllers   Approve    variance explained by the carrier's short delivery
"
        );
    }

    #[test]
    fn an_escalated_case_shows_the_escalation_approvers_and_passed_deadline() {
        let case = case(
            "shipment-to-invoice-4711",
            "2026-11-20T09:14:02Z",
            serde_json::json!({"state": "Escalated", "escalated": true,
                "deadline": "2026-11-26T08:00:00Z", "message": "no decision within the deadline; escalated to cfo-office"}),
            serde_json::json!([]),
        );
        let text = describe(&case, now());
        assert!(
            text.contains("\nApprovals:     0 of 1, from cfo-office\n"),
            "{text}"
        );
        assert!(
            text.contains("\nDeadline:      2026-11-26T08:00:00Z (passed 120m ago)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "\nMessage:       no decision within the deadline; escalated to cfo-office\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("Decisions:\n  <none>\n"), "{text}");
    }

    #[test]
    fn ages_read_like_kubectl() {
        for (secs, want) in [
            (5, "5s"),
            (119, "119s"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (9 * 3600, "9h"),
            (50 * 3600, "2d2h"),
            (10 * 86_400, "10d"),
            (800 * 86_400, "2y70d"),
            (-3, "0s"),
        ] {
            assert_eq!(age(TimeDelta::seconds(secs)), want, "{secs}s");
        }
    }
}
