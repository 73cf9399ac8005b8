//! The errors of every reconciler, one variant per pipeline step. An invalid
//! spec is not an error: it is a status (`Ready=False, reason=InvalidSpec`)
//! and the reconcile succeeds, waiting for the next change.

/// Why a reconcile failed; each is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read {what}")]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to apply {what}")]
    Apply {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to delete {what}")]
    Delete {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to update the status of {what}")]
    Status {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to update the finalizer of {what}")]
    Finalizer {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to ensure the JetStream objects of {what}: {message}")]
    JetStream { what: String, message: String },
    #[error("failed to remove the JetStream objects of {what}: {message}")]
    Cleanup { what: String, message: String },
    /// Not a failure: the Workflow's worker pods are still stopping, and
    /// its consumers stay until they have (retried with backoff).
    #[error("waiting for the workers of {0} to stop before removing their consumers")]
    WorkersStopping(String),
    #[error("failed to encode {what}")]
    Encode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("object without {0}")]
    Incomplete(&'static str),
}

impl Error {
    /// A bounded label for `tallyman_operator_reconcile_errors_total` and the
    /// reason of the Warning Event. A 409 from the API server is its own
    /// label: it means someone else wrote first and the retry will read again.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Read { source, .. }
            | Error::Apply { source, .. }
            | Error::Delete { source, .. }
            | Error::Status { source, .. }
            | Error::Finalizer { source, .. }
                if is_conflict(source) =>
            {
                "Conflict"
            }
            Error::Read { .. } => "ReadFailed",
            Error::Apply { .. } => "ApplyFailed",
            Error::Delete { .. } => "DeleteFailed",
            Error::Status { .. } => "StatusFailed",
            Error::Finalizer { .. } => "FinalizerFailed",
            Error::JetStream { .. } => "JetStreamFailed",
            Error::Cleanup { .. } => "CleanupFailed",
            Error::WorkersStopping(_) => "WorkersStopping",
            Error::Encode { .. } => "EncodeFailed",
            Error::Incomplete(_) => "IncompleteObject",
        }
    }

    /// Not a failure: the reconcile waits for something that takes its
    /// time (a deletion's workers stopping).
    pub fn is_waiting(&self) -> bool {
        matches!(self, Error::WorkersStopping(_))
    }

    /// The type of the Event a failed reconcile makes: a Warning, except
    /// for waiting, which is how a deletion goes.
    pub fn event_type(&self) -> kube::runtime::events::EventType {
        if self.is_waiting() {
            kube::runtime::events::EventType::Normal
        } else {
            kube::runtime::events::EventType::Warning
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Whether the API server answered 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Flatten the finalizer helper's error into ours: the reconcile's own
/// error passes through, so its label stays precise.
pub fn from_finalizer(what: String, e: kube::runtime::finalizer::Error<Error>) -> Error {
    use kube::runtime::finalizer::Error as F;
    match e {
        F::ApplyFailed(e) | F::CleanupFailed(e) => e,
        F::AddFinalizer(source) | F::RemoveFinalizer(source) => Error::Finalizer { what, source },
        F::UnnamedObject => Error::Incomplete("metadata.name"),
        F::InvalidFinalizer => Error::Incomplete("a valid finalizer name"),
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::events::EventType;

    use super::*;

    #[test]
    fn only_waiting_for_workers_is_a_normal_event() {
        let waiting = Error::WorkersStopping("Workflow finance/s2i".into());
        assert!(waiting.is_waiting());
        assert_eq!(waiting.event_type(), EventType::Normal);
        assert_eq!(waiting.metric_label(), "WorkersStopping");
        let failed = Error::Cleanup {
            what: "Workflow finance/s2i".into(),
            message: "broker unreachable".into(),
        };
        assert!(!failed.is_waiting());
        assert_eq!(failed.event_type(), EventType::Warning);
    }
}
