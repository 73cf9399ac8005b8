//! NATS names, derived deterministically from namespace and workflow so
//! that every replica, the gateway and the operator agree on them.
//!
//! | what | name |
//! |---|---|
//! | events | stream `TALLYMAN_<NS>_EVENTS`, subjects `tallyman.<ns>.events.<type>` |
//! | audit | stream `TALLYMAN_<NS>_AUDIT`, subject `tallyman.<ns>.audit.<workflow>` |
//! | dead letters | stream `TALLYMAN_<NS>_DLQ`, subject `tallyman.<ns>.dlq.<workflow>` |
//! | timers | stream `TALLYMAN_<NS>_TIMERS`: schedules on `tallyman.<ns>.timers.<workflow>.at.<id>`, due on `….<workflow>.due` |
//! | instances | KV `tallyman_<ns>_<workflow>` |
//! | cases | KV `tallyman_<ns>_cases` |
//! | definitions | KV `tallyman_<ns>_definitions`, key `<workflow>.<revision>` |
//! | instance counters | KV `tallyman_<ns>_counts`, key `<workflow>` |
//! | consumers | `wf-<workflow>` on events, `timers-<workflow>` on timers |

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub namespace: String,
    pub workflow: String,
}

fn upper(ns: &str) -> String {
    ns.to_uppercase().replace(['-', '.'], "_")
}

impl Names {
    pub fn new(namespace: &str, workflow: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            workflow: workflow.to_string(),
        }
    }

    pub fn events_stream(&self) -> String {
        format!("TALLYMAN_{}_EVENTS", upper(&self.namespace))
    }
    pub fn audit_stream(&self) -> String {
        format!("TALLYMAN_{}_AUDIT", upper(&self.namespace))
    }
    pub fn dlq_stream(&self) -> String {
        format!("TALLYMAN_{}_DLQ", upper(&self.namespace))
    }
    pub fn timers_stream(&self) -> String {
        format!("TALLYMAN_{}_TIMERS", upper(&self.namespace))
    }
    pub fn event_subject(&self, event_type: &str) -> String {
        format!("tallyman.{}.events.{event_type}", self.namespace)
    }
    pub fn events_wildcard(&self) -> String {
        format!("tallyman.{}.events.>", self.namespace)
    }
    pub fn audit_subject(&self) -> String {
        format!("tallyman.{}.audit.{}", self.namespace, self.workflow)
    }
    pub fn audit_wildcard(&self) -> String {
        format!("tallyman.{}.audit.>", self.namespace)
    }
    pub fn dlq_subject(&self) -> String {
        format!("tallyman.{}.dlq.{}", self.namespace, self.workflow)
    }
    pub fn dlq_wildcard(&self) -> String {
        format!("tallyman.{}.dlq.>", self.namespace)
    }
    /// Where timers arrive when they fall due.
    pub fn timers_due_subject(&self) -> String {
        format!("tallyman.{}.timers.{}.due", self.namespace, self.workflow)
    }
    /// The schedule of one timer (one subject per schedule).
    pub fn timer_schedule_subject(&self, id: &str) -> String {
        format!(
            "tallyman.{}.timers.{}.at.{id}",
            self.namespace, self.workflow
        )
    }
    pub fn timers_wildcard(&self) -> String {
        format!("tallyman.{}.timers.>", self.namespace)
    }
    pub fn instances_bucket(&self) -> String {
        format!("tallyman_{}_{}", self.namespace, self.workflow)
    }
    pub fn cases_bucket(&self) -> String {
        format!("tallyman_{}_cases", self.namespace)
    }
    /// Instance counters of every workflow of the namespace, key `<workflow>`.
    pub fn counts_bucket(&self) -> String {
        format!("tallyman_{}_counts", self.namespace)
    }
    pub fn definitions_bucket(&self) -> String {
        format!("tallyman_{}_definitions", self.namespace)
    }
    pub fn events_consumer(&self) -> String {
        format!("wf-{}", self.workflow)
    }
    pub fn timers_consumer(&self) -> String {
        format!("timers-{}", self.workflow)
    }
}

/// An instance key as a KV key: letters, digits, `-` and `_` stay; every
/// other byte becomes `=XX`, so distinct keys stay distinct and readable.
pub fn kv_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    if out.is_empty() { "=".to_string() } else { out }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kv_keys_are_valid_and_distinct() {
        assert_eq!(super::kv_key("4711"), "4711");
        assert_eq!(super::kv_key("PO 1/2"), "PO=201=2F2");
        assert_ne!(super::kv_key("a.b"), super::kv_key("a_b"));
        assert_eq!(super::kv_key("ü"), "=C3=BC");
    }
}
