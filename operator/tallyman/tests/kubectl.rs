//! `kubectl tallyman` as an approver runs it: the `tallyman` binary under
//! the plugin's name (and as `tallyman kubectl`), with a kubeconfig pointing
//! at the fake API server, through the real `kube::Client`.
//!
//! The fake has no admission: where the test needs the admission policy's
//! refusal, it makes the fake answer the PATCH with the Status the API
//! server sends (its wording is pinned by `tallyman-core`'s admission tests).

// kubectl finds plugins by file name; the test installs one as a symlink.
#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};
use tallyman_testing::kubeapi::{FakeApi, Key};

const NS: &str = "finance";
const CASE: &str = "shipment-to-invoice-4711";
const CASES_PATH: &str = "/apis/tallyman.dev/v1alpha1/namespaces/finance/exceptioncases";
const REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/selfsubjectreviews";

struct Cluster {
    api: FakeApi,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A fake cluster whose kubeconfig's current context is namespace
    /// `finance`, signed in as `user` with `groups`.
    async fn start(user: &str, groups: &[&str]) -> Cluster {
        let api = FakeApi::start().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("kubeconfig"),
            format!(
                "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster: {{server: \"{}\"}}
users:
- name: {user}
  user: {{token: not-checked-by-the-fake}}
contexts:
- name: fake
  context: {{cluster: fake, user: {user}, namespace: {NS}}}
current-context: fake
",
                api.url()
            ),
        )
        .unwrap();
        api.answer(
            "POST",
            REVIEW_PATH,
            201,
            json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "SelfSubjectReview",
                "metadata": {"creationTimestamp": null},
                "status": {"userInfo": {"username": user, "groups": groups}},
            }),
        );
        // kubectl finds plugins by file name on PATH; a link is how the
        // tallyman binary is installed as one.
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_tallyman"),
            dir.path().join("kubectl-tallyman"),
        )
        .unwrap();
        Cluster { api, dir }
    }

    fn seed(&self, name: &str, state: &str, decisions: Value) {
        self.api.seed(
            Key::new("tallyman.dev/v1alpha1", "exceptioncases", NS, name),
            case(name, state, decisions),
        );
    }

    fn stored(&self, name: &str) -> Value {
        self.api
            .object(&Key::new(
                "tallyman.dev/v1alpha1",
                "exceptioncases",
                NS,
                name,
            ))
            .unwrap()
    }

    /// Run the plugin, as kubectl would, off the async runtime the fake
    /// serves on.
    async fn plugin(&self, args: &[&str]) -> Output {
        self.run(self.dir.path().join("kubectl-tallyman"), args)
            .await
    }

    /// Run `tallyman kubectl …`.
    async fn tallyman(&self, args: &[&str]) -> Output {
        let args: Vec<&str> = ["kubectl"].iter().chain(args).copied().collect();
        self.run(PathBuf::from(env!("CARGO_BIN_EXE_tallyman")), &args)
            .await
    }

    async fn run(&self, program: PathBuf, args: &[&str]) -> Output {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .env("HOME", self.dir.path())
            .env_remove("KUBERNETES_SERVICE_HOST");
        tokio::task::spawn_blocking(move || cmd.output().expect("the plugin runs"))
            .await
            .unwrap()
    }
}

fn case(name: &str, state: &str, decisions: Value) -> Value {
    json!({
        "apiVersion": "tallyman.dev/v1alpha1",
        "kind": "ExceptionCase",
        "metadata": {"name": name, "namespace": NS},
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
            "deadline": "2099-01-01T00:00:00Z",
            "decisions": decisions,
        },
        "status": {"state": state, "approvals": 0},
    })
}

fn alice() -> Value {
    json!({"approver": "alice", "groups": ["finance-controllers"], "decision": "Approve",
           "comment": "variance explained by the carrier's short delivery"})
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases_lists_the_open_cases_of_the_current_namespace() {
    let cluster = Cluster::start("bob", &["finance-controllers"]).await;
    assert!(exists(&cluster.dir.path().join("kubectl-tallyman")));
    cluster.seed(CASE, "Open", json!([alice()]));
    cluster.seed("shipment-to-invoice-4690", "Approved", json!([]));

    let out = cluster.plugin(&["cases"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("NAME   ") && lines[0].ends_with("APPROVALS   AGE   STATE"),
        "{text}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        [row[0], row[1], row[2], row[3], row[4], row[5], row[7]],
        [
            CASE,
            "shipment-to-invoice",
            "4711",
            "QuantityMismatch",
            "12500.00",
            "1/2",
            "Open"
        ],
        "{text}"
    );
    let gets: Vec<_> = cluster
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .map(|r| r.path)
        .collect();
    assert_eq!(gets, [CASES_PATH]);

    let out = cluster.tallyman(&["cases", "--all", "-A"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("shipment-to-invoice-4690"));
    assert!(stdout(&out).starts_with("NAMESPACE   NAME"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_facts_approvals_and_decisions() {
    let cluster = Cluster::start("bob", &["finance-controllers"]).await;
    cluster.seed(CASE, "Open", json!([alice()]));
    let out = cluster.plugin(&["describe", CASE, "-n", NS]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for line in [
        "Approvals:    1 of 2, from finance-controllers or cfo-office",
        "Deadline:     2099-01-01T00:00:00Z (in ",
        "  amount:            12500.00",
        "  alice      finance-controllers   Approve    variance explained by the carrier's short delivery",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_appends_one_decision_as_the_authenticated_user() {
    let cluster = Cluster::start("bob", &["finance-controllers", "system:authenticated"]).await;
    cluster.seed(CASE, "Open", json!([alice()]));

    let out = cluster
        .plugin(&["approve", CASE, "--comment", "quantities confirmed"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "{CASE} approved by bob for finance-controllers: the case is approved; the worker resumes the instance\n"
        )
    );
    assert_eq!(
        cluster.stored(CASE)["spec"]["decisions"],
        json!([alice(), {"approver": "bob", "groups": ["finance-controllers"],
                         "decision": "Approve", "comment": "quantities confirmed"}])
    );
    let writes: Vec<_> = cluster
        .api
        .writes()
        .into_iter()
        .map(|r| (r.method, r.path, r.content_type))
        .collect();
    assert_eq!(
        writes,
        [
            (
                "POST".to_string(),
                REVIEW_PATH.to_string(),
                Some("application/json".to_string())
            ),
            (
                "PATCH".to_string(),
                format!("{CASES_PATH}/{CASE}"),
                Some("application/json-patch+json".to_string())
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_records_the_reason() {
    let cluster = Cluster::start("bob", &["finance-controllers", "cfo-office"]).await;
    cluster.seed(CASE, "Open", json!([]));
    let out = cluster
        .tallyman(&[
            "reject",
            CASE,
            "-m",
            "the delivery note shows 40 units, not 48",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        cluster.stored(CASE)["spec"]["decisions"],
        json!([{"approver": "bob", "groups": ["finance-controllers", "cfo-office"],
                "decision": "Reject", "comment": "the delivery note shows 40 units, not 48"}])
    );

    let out = cluster.plugin(&["reject", CASE]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--comment"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_policys_refusal_reaches_the_user_as_is() {
    let cluster = Cluster::start("carol", &["finance-controllers", "system:authenticated"]).await;
    cluster.seed(CASE, "Open", json!([alice()]));
    let message = format!(
        "exceptioncases.tallyman.dev \"{CASE}\" is forbidden: ValidatingAdmissionPolicy \
         'tallyman-exceptioncase-decisions' with binding 'tallyman-exceptioncase-decisions' \
         denied request: carol raised this exception and may not decide it (segregation of duties); \
         ask another approver"
    );
    cluster.api.answer(
        "PATCH",
        &format!("{CASES_PATH}/{CASE}"),
        422,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": "Invalid", "code": 422}),
    );

    let out = cluster.plugin(&["approve", CASE]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!("Error from server (Invalid): {message}\n")
    );
    assert_eq!(stdout(&out), "");
    // The decisions did not change, so the refusal is final: one PATCH, no retry.
    let patches = cluster
        .api
        .writes()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert_eq!(patches, 1);
    assert_eq!(cluster.stored(CASE)["spec"]["decisions"], json!([alice()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_case_is_reported_in_the_servers_words() {
    let cluster = Cluster::start("bob", &["finance-controllers"]).await;
    let out = cluster
        .plugin(&["approve", "shipment-to-invoice-9999"])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("Error from server (NotFound): "),
        "{}",
        stderr(&out)
    );
    assert!(cluster.api.writes().iter().all(|r| r.method != "PATCH"));
}
