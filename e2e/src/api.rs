//! The dev API from a test's side: `/dev/status`, `/dev/cases` and
//! decisions, plus waiting on them (conditions, never fixed sleeps).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tallyman_testing::erp::send;

/// A client of one dev mode.
#[derive(Clone, Debug)]
pub struct DevApi {
    base: String,
}

/// One workflow's counters from `/dev/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub running: u64,
    pub completed: u64,
    pub rejected: u64,
    pub failed: u64,
    pub exceptions: u64,
}

impl Counts {
    /// Instances that reached an end state.
    pub fn ended(&self) -> u64 {
        self.completed + self.rejected + self.failed
    }
}

impl DevApi {
    pub fn new(base: &str) -> DevApi {
        DevApi {
            base: base.trim_end_matches('/').to_string(),
        }
    }

    async fn get(&self, path: &str) -> Value {
        let response = send("GET", &format!("{}{path}", self.base), &[], Vec::new())
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(response.status, 200, "GET {path}: {}", response.text());
        response.json().expect("the dev API answers JSON")
    }

    /// Counters of `namespace/workflow`.
    pub async fn counts(&self, namespace: &str, workflow: &str) -> Counts {
        let status = self.get("/dev/status").await;
        let w = status["workflows"]
            .as_array()
            .and_then(|ws| {
                ws.iter()
                    .find(|w| w["namespace"] == namespace && w["name"] == workflow)
            })
            .unwrap_or_else(|| panic!("/dev/status has no {namespace}/{workflow}: {status}"));
        let n = |k: &str| w[k].as_u64().unwrap_or_default();
        Counts {
            running: n("running"),
            completed: n("completed"),
            rejected: n("rejected"),
            failed: n("failed"),
            exceptions: n("exceptions"),
        }
    }

    /// Every case, oldest first.
    pub async fn cases(&self) -> Vec<Value> {
        self.get("/dev/cases")
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Open cases only.
    pub async fn open_cases(&self) -> Vec<Value> {
        self.get("/dev/cases?state=Open")
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Posts a decision; returns the HTTP status and the JSON answer (the
    /// case, or `{error, detail}`).
    pub async fn decide(
        &self,
        case: &str,
        decision: &str,
        approver: &str,
        groups: &[&str],
        comment: Option<&str>,
    ) -> (u16, Value) {
        let body = json!({
            "decision": decision,
            "approver": approver,
            "groups": groups,
            "comment": comment,
        });
        let response = send(
            "POST",
            &format!("{}/dev/cases/{case}/decisions", self.base),
            &[("content-type", "application/json")],
            body.to_string().into_bytes(),
        )
        .await
        .unwrap_or_else(|e| panic!("POST a decision on {case}: {e}"));
        let value = response.json().unwrap_or(Value::Null);
        (response.status, value)
    }

    /// [`DevApi::decide`] that must be taken (200); the case as answered.
    pub async fn decided(
        &self,
        case: &str,
        decision: &str,
        approver: &str,
        groups: &[&str],
        comment: Option<&str>,
    ) -> Value {
        let (status, answer) = self.decide(case, decision, approver, groups, comment).await;
        assert_eq!(status, 200, "{answer}");
        answer
    }

    /// [`DevApi::decide`] that must be refused (403); the reason given.
    pub async fn refused(
        &self,
        case: &str,
        decision: &str,
        approver: &str,
        groups: &[&str],
        comment: Option<&str>,
    ) -> String {
        let (status, answer) = self.decide(case, decision, approver, groups, comment).await;
        assert_eq!(status, 403, "{answer}");
        answer["detail"].as_str().unwrap().to_string()
    }

    /// Polls `/dev/status` until `done` holds for the workflow's counters.
    ///
    /// # Panics
    /// After `timeout`, with the last counters.
    pub async fn wait_for(
        &self,
        namespace: &str,
        workflow: &str,
        timeout: Duration,
        mut done: impl FnMut(&Counts) -> bool,
    ) -> Counts {
        let deadline = Instant::now() + timeout;
        loop {
            let counts = self.counts(namespace, workflow).await;
            if done(&counts) {
                return counts;
            }
            assert!(
                Instant::now() < deadline,
                "{namespace}/{workflow} did not get there within {timeout:?}: {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls `/dev/cases` until a case of `workflow` for instance `key` is in `state`.
    pub async fn wait_for_case(
        &self,
        workflow: &str,
        key: &str,
        state: &str,
        timeout: Duration,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let cases = self.cases().await;
            if let Some(case) = cases
                .iter()
                .find(|c| c["workflow"] == workflow && c["key"] == key && c["state"] == state)
            {
                return case.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {state} case of {workflow} for {key} within {timeout:?}: {cases:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
