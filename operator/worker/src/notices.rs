//! Kubernetes Events on the Workflow for what its SREs should see in
//! `kubectl describe workflow` without reading metrics or the dead-letter
//! stream: a step that gave up, an exception case opened, an SLA missed, a
//! message that cannot be processed, an instance ended Failed. Only in a
//! cluster (cases in
//! Kubernetes); dev mode has its status page.
//!
//! ```text
//! commit ─▶ notices(outbox, SLA newly missed) ─▶ Throttle: each (reason, action)
//!                                                at most once a minute
//!          ─▶ Recorder (a task; best effort) ─▶ events.k8s.io Event, regarding the Workflow
//! ```
//!
//! An Event says *that* it happens, with a note that does not name one
//! instance: the Recorder folds repeats of a (reason, action) into one
//! Event's series, so the first note stands for all. How often is in the
//! metrics (`tallyman_worker_dead_letters_total`,
//! `tallyman_worker_exceptions_opened_total`,
//! `tallyman_worker_sla_breaches_total`); which instances is in the
//! dead-letter stream and the ExceptionCases.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tallyman_api::v1alpha1::Workflow;
use tallyman_core::engine::Outbound;
use tracing::warn;

/// How often, at most, one kind of Event is published.
pub const EVERY: Duration = Duration::from_secs(60);

/// One Event to publish about the Workflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    /// What happened to: the step, the case's reason, ….
    pub action: String,
    pub note: String,
}

/// What one commit should tell the Workflow's readers: its outbox, an SLA
/// it missed, and the step at which it ended the instance `Failed`. Pure.
pub fn notices(
    outbox: &[Outbound],
    sla_missed: bool,
    failed_at: Option<&str>,
    dlq_subject: &str,
) -> Vec<Notice> {
    let mut out = Vec::new();
    for item in outbox {
        match item {
            Outbound::DeadLetter { step, .. } => out.push(Notice {
                warning: true,
                reason: "DeadLettered",
                action: step.clone(),
                note: format!(
                    "step {step} gave up on an instance; it is on {dlq_subject} (a call that gave up also opened a CallFailed ExceptionCase)"
                ),
            }),
            Outbound::OpenCase(req) => out.push(Notice {
                // A case no policy governs is the workflow's own trouble (a
                // failed call, a missed SLA); a policy's case is the policy
                // at work.
                warning: req.policy.is_empty(),
                reason: "ExceptionOpened",
                action: req.reason.clone(),
                note: format!(
                    "an ExceptionCase for {} was opened; kubectl get exceptioncases lists those waiting",
                    req.reason
                ),
            }),
            _ => {}
        }
    }
    // A dead letter says more about why; otherwise the workflow itself
    // ended the instance Failed (an await that timed out, a check that
    // failed with `end: Failed`).
    if let Some(step) = failed_at
        && !out.iter().any(|n| n.reason == "DeadLettered")
    {
        out.push(Notice {
            warning: true,
            reason: "InstanceFailed",
            action: step.to_string(),
            note: format!("an instance ended Failed at step {step}"),
        });
    }
    if sla_missed {
        out.push(Notice {
            warning: true,
            reason: "SlaBreached",
            action: "Complete".into(),
            note: "an instance did not complete within the Workflow's SLA".into(),
        });
    }
    out
}

/// The notice for a message that can never be processed.
pub fn poison(dlq_subject: &str) -> Notice {
    Notice {
        warning: true,
        reason: "PoisonMessage",
        action: "Consume".into(),
        note: format!("a message that cannot be processed went to {dlq_subject}"),
    }
}

/// Lets each (reason, action) through at most once per [`EVERY`].
#[derive(Default)]
pub struct Throttle {
    last: HashMap<(&'static str, String), Instant>,
}

impl Throttle {
    pub fn admit(&mut self, notice: &Notice, now: Instant) -> bool {
        let key = (notice.reason, notice.action.clone());
        match self.last.get(&key) {
            Some(at) if now.duration_since(*at) < EVERY => false,
            _ => {
                self.last.insert(key, now);
                true
            }
        }
    }
}

/// The Recorder of a worker's Events: reported by `tallyman-worker`, from
/// its pod (`HOSTNAME`).
pub fn recorder(client: kube::Client) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: "tallyman-worker".into(),
            instance: std::env::var("HOSTNAME").ok(),
        },
    )
}

/// The longest note the API server takes (events.k8s.io/v1: 1 kB).
pub const NOTE_MAX: usize = 1024;

/// `note` cut to [`NOTE_MAX`] bytes at a character boundary, with an
/// ellipsis when cut: a longer one (a case's message listing many
/// decisions) would have the whole Event refused.
pub fn fit_note(note: String) -> String {
    if note.len() <= NOTE_MAX {
        return note;
    }
    let mut end = NOTE_MAX - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

/// Publishes `event` about `regarding`, its note cut to what the API server
/// takes. Best effort: a failure is logged, not returned.
pub async fn publish(recorder: &Recorder, mut event: Event, regarding: &ObjectReference) {
    event.note = event.note.map(fit_note);
    if let Err(e) = recorder.publish(&event, regarding).await {
        warn!(error = %e, reason = %event.reason, "failed to publish an Event");
    }
}

/// [`publish`] in a task of its own: a slow or failing API server holds
/// up nothing.
pub fn publish_later(recorder: &Recorder, event: Event, regarding: ObjectReference) {
    let recorder = recorder.clone();
    tokio::spawn(async move { publish(&recorder, event, &regarding).await });
}

/// Publishes [`Notice`]s as Events regarding one Workflow.
pub struct Notices {
    recorder: Recorder,
    workflows: kube::Api<Workflow>,
    namespace: String,
    workflow: String,
    throttle: Mutex<Throttle>,
    /// The Workflow's uid once read: `kubectl describe` finds Events by it.
    uid: tokio::sync::OnceCell<String>,
}

impl Notices {
    pub fn new(client: kube::Client, namespace: &str, workflow: &str) -> Self {
        Self {
            recorder: recorder(client.clone()),
            workflows: kube::Api::namespaced(client, namespace),
            namespace: namespace.into(),
            workflow: workflow.into(),
            throttle: Mutex::new(Throttle::default()),
            uid: tokio::sync::OnceCell::new(),
        }
    }

    /// Publishes what the throttle lets through, in a task of its own: a
    /// slow or failing API server never holds up an instance.
    pub fn send(self: &std::sync::Arc<Self>, notices: Vec<Notice>) {
        let now = Instant::now();
        let admitted: Vec<Notice> = {
            let mut throttle = self.throttle.lock().expect("throttle lock");
            notices
                .into_iter()
                .filter(|n| throttle.admit(n, now))
                .collect()
        };
        if admitted.is_empty() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let regarding = this.regarding().await;
            for n in admitted {
                let event = Event {
                    type_: if n.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: n.reason.into(),
                    note: Some(n.note),
                    action: n.action,
                    secondary: None,
                };
                publish(&this.recorder, event, &regarding).await;
            }
        });
    }

    async fn regarding(&self) -> ObjectReference {
        // Read until it is known (a failure is tried again with the next
        // Event); without it the Event is still listed by `kubectl get
        // events`, though not by describe.
        let uid = match self
            .uid
            .get_or_try_init(|| async {
                let meta = self.workflows.get_metadata(&self.workflow).await?;
                meta.metadata
                    .uid
                    .ok_or_else(|| kube::Error::Service("the Workflow has no uid".into()))
            })
            .await
        {
            Ok(uid) => Some(uid.clone()),
            Err(e) => {
                warn!(error = %e, "failed to read the Workflow's uid for its Events");
                None
            }
        };
        ObjectReference {
            api_version: Some(Workflow::api_version(&()).into()),
            kind: Some(Workflow::kind(&()).into()),
            name: Some(self.workflow.clone()),
            namespace: Some(self.namespace.clone()),
            uid,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tallyman_core::engine::CaseRequest;

    const DLQ: &str = "tallyman.finance.dlq.shipment-to-invoice";

    /// A case opened for `reason` under `policy` ("": none).
    fn case(reason: &str, policy: &str) -> Outbound {
        Outbound::OpenCase(Box::new(CaseRequest {
            name: "c".into(),
            workflow: "shipment-to-invoice".into(),
            key: "4711".into(),
            revision: "r".into(),
            reason: reason.into(),
            facts: Default::default(),
            initiator: String::new(),
            policy: policy.into(),
            rule: String::new(),
            required: tallyman_api::v1alpha1::Approvers {
                groups: vec!["finance-controllers".into()],
                count: 1,
            },
            exclude_initiator: false,
            distinct_approvers: false,
            deadline_ms: None,
            escalate_to: None,
            escalation_window_ms: None,
            blocking: true,
        }))
    }

    #[test]
    fn a_commit_tells_of_dead_letters_cases_and_a_missed_sla() {
        let outbox = vec![
            Outbound::DeadLetter {
                msg_id: "m".into(),
                step: "invoice".into(),
                reason: "gave up after 5 attempts: 503".into(),
            },
            case("CallFailed", ""),
            case("QuantityMismatch", "variance-approval"),
            Outbound::Wake { due_ms: 1 },
        ];
        let got = notices(&outbox, true, Some("invoice"), DLQ);
        let kinds: Vec<_> = got
            .iter()
            .map(|n| (n.warning, n.reason, n.action.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (true, "DeadLettered", "invoice"),
                (true, "ExceptionOpened", "CallFailed"),
                (false, "ExceptionOpened", "QuantityMismatch"),
                (true, "SlaBreached", "Complete"),
            ]
        );
        // The note stands for every repeat: it names no instance, no error.
        assert_eq!(
            got[0].note,
            format!(
                "step invoice gave up on an instance; it is on {DLQ} (a call that gave up also opened a CallFailed ExceptionCase)"
            )
        );
        assert!(notices(&[Outbound::Wake { due_ms: 1 }], false, None, DLQ).is_empty());
        // Ended Failed by the workflow itself: said as such, with the step.
        let timed_out = notices(&[], false, Some("both-arrived"), DLQ);
        assert_eq!(
            timed_out,
            [Notice {
                warning: true,
                reason: "InstanceFailed",
                action: "both-arrived".into(),
                note: "an instance ended Failed at step both-arrived".into(),
            }]
        );
    }

    #[test]
    fn a_long_note_is_cut_to_what_the_api_server_takes() {
        let short = "Approved by alice".to_string();
        assert_eq!(fit_note(short.clone()), short);
        // Multi-byte characters across the cut: still valid UTF-8.
        let long = "décision ".repeat(200);
        let cut = fit_note(long.clone());
        assert!(cut.len() <= NOTE_MAX, "{}", cut.len());
        assert!(cut.len() > NOTE_MAX - 8);
        assert!(cut.ends_with('…'));
        assert!(long.starts_with(cut.trim_end_matches('…')));
    }

    #[test]
    fn each_kind_goes_out_at_most_once_a_minute() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        let dead = notices(
            &[Outbound::DeadLetter {
                msg_id: "m".into(),
                step: "invoice".into(),
                reason: "r".into(),
            }],
            false,
            None,
            DLQ,
        )
        .remove(0);
        let other_step = Notice {
            action: "order".into(),
            ..dead.clone()
        };
        assert!(t.admit(&dead, t0));
        assert!(!t.admit(&dead, t0 + Duration::from_secs(59)));
        assert!(t.admit(&other_step, t0 + Duration::from_secs(59)));
        assert!(t.admit(&poison(DLQ), t0 + Duration::from_secs(59)));
        assert!(t.admit(&dead, t0 + EVERY));
    }
}
