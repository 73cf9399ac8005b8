//! Dev mode's HTTP surface on one listener:
//!
//! | path | what |
//! |---|---|
//! | `/webhooks/{namespace}/{connector}{path}` | the namespace's gateway, exactly as in a cluster |
//! | `GET /dev/cases` | every case, oldest first (`?state=Open` filters) |
//! | `GET /dev/cases/{name}` | one case |
//! | `POST /dev/cases/{name}/decisions` | `{"decision", "approver", "groups", "comment"}`; 403 with the reason when the policy refuses |
//! | `GET /dev/status` | per-workflow counters, the NATS URL, the webhook URLs |
//! | `/healthz`, `/readyz`, `/metrics` | as on every tallyman process |
//!
//! `/dev/` answers loopback clients only unless dev mode was started with
//! `--allow-remote-dev-api`: it takes an approver's name on trust, which only
//! the cluster's admission policy may check for real.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, get, post};
use serde::{Deserialize, Serialize};
use tallyman_api::v1alpha1::{Approvers, CaseDecision, CaseState, Verdict};
use tallyman_connectors::webhook::Gateway;
use tallyman_worker::Worker;
use tallyman_worker::cases::{CaseRecord, CaseStore, DecideError};

/// What the API serves from.
pub struct Dev {
    pub workers: Vec<Arc<Worker>>,
    /// One case store per namespace that runs a workflow.
    pub cases: BTreeMap<String, Arc<dyn CaseStore>>,
    pub gateways: HashMap<String, Arc<Gateway>>,
    pub nats_url: String,
    pub webhooks: Vec<String>,
    pub allow_remote: bool,
}

pub fn router(dev: Arc<Dev>) -> Router<()> {
    let api = Router::new()
        .route("/dev/cases", get(list_cases))
        .route("/dev/cases/{name}", get(get_case))
        .route("/dev/cases/{name}/decisions", post(decide))
        .route("/dev/status", get(status))
        .route_layer(middleware::from_fn_with_state(dev.clone(), loopback_only));
    Router::new()
        .route("/webhooks/{*rest}", any(webhook))
        .merge(api)
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "nothing is served at this path: webhooks are under /webhooks/{namespace}/{connector}{path}, the dev API under /dev/",
            )
        })
        .with_state(dev)
}

fn error(status: StatusCode, code: &str, detail: impl Into<String>) -> Response {
    json(
        status,
        &serde_json::json!({"error": code, "detail": detail.into()}),
    )
}

fn json(status: StatusCode, value: &impl Serialize) -> Response {
    let body = serde_json::to_vec(value).expect("API values serialize");
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn loopback_only(
    State(dev): State<Arc<Dev>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if dev.allow_remote || peer.ip().is_loopback() {
        return next.run(request).await;
    }
    error(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "the /dev/ API answers only on loopback (request from {}); start dev mode with --allow-remote-dev-api to open it",
            peer.ip()
        ),
    )
}

/// `/webhooks/{namespace}/…` goes to that namespace's gateway, which
/// answers every path under it (404 included) as the cluster's does.
async fn webhook(State(dev): State<Arc<Dev>>, request: Request) -> Response {
    let namespace = request
        .uri()
        .path()
        .strip_prefix("/webhooks/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_string();
    match dev.gateways.get(&namespace) {
        Some(gateway) => gateway.handle(request).await,
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no webhook Connector in namespace {namespace:?}"),
        ),
    }
}

/// A case as the dev API shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseView<'a> {
    name: &'a str,
    namespace: &'a str,
    workflow: &'a str,
    key: &'a str,
    reason: &'a str,
    state: CaseState,
    initiator: &'a str,
    facts: &'a serde_json::Map<String, serde_json::Value>,
    decisions: &'a [CaseDecision],
    policy: &'a str,
    rule: &'a str,
    required: &'a Approvers,
    approvals: u32,
    escalated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    escalate_to: Option<&'a Approvers>,
    opened: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    deadline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resolved_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

impl<'a> CaseView<'a> {
    pub fn of(c: &'a CaseRecord) -> Self {
        let time = |t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| {
            serde_json::to_value(t)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
        };
        CaseView {
            name: &c.name,
            namespace: &c.namespace,
            workflow: &c.spec.workflow,
            key: &c.spec.key,
            reason: &c.spec.reason,
            state: c.status.state,
            initiator: &c.spec.initiator,
            facts: &c.spec.facts,
            decisions: &c.spec.decisions,
            policy: &c.spec.policy,
            rule: &c.spec.rule,
            required: &c.spec.required,
            approvals: c.status.approvals,
            escalated: c.status.escalated,
            escalate_to: c.spec.escalate_to.as_ref(),
            opened: &c.opened,
            deadline: c.status.deadline.as_ref().and_then(time),
            resolved_at: c.status.resolved_at.as_ref().and_then(time),
            message: c.status.message.as_deref(),
        }
    }
}

#[derive(Deserialize)]
struct CaseQuery {
    namespace: Option<String>,
    state: Option<String>,
}

async fn list_cases(State(dev): State<Arc<Dev>>, Query(q): Query<CaseQuery>) -> Response {
    let mut all = Vec::new();
    for (namespace, cases) in &dev.cases {
        if q.namespace.as_ref().is_some_and(|n| n != namespace) {
            continue;
        }
        match cases.list().await {
            Ok(list) => all.extend(list),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()),
        }
    }
    if let Some(state) = &q.state {
        all.retain(|c| format!("{:?}", c.status.state).eq_ignore_ascii_case(state));
    }
    all.sort_by(|a, b| a.opened.cmp(&b.opened).then(a.name.cmp(&b.name)));
    let views: Vec<CaseView> = all.iter().map(CaseView::of).collect();
    json(StatusCode::OK, &views)
}

/// The namespace holding case `name`: the one asked for, else the only one
/// that has it.
async fn find(dev: &Dev, name: &str, namespace: Option<&str>) -> Result<CaseRecord, Response> {
    let mut found = Vec::new();
    for (ns, cases) in &dev.cases {
        if namespace.is_some_and(|n| n != ns) {
            continue;
        }
        match cases.get(name).await {
            Ok(Some(record)) => found.push(record),
            Ok(None) => {}
            Err(e) => {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store",
                    e.to_string(),
                ));
            }
        }
    }
    match found.len() {
        0 => Err(error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no case named {name}"),
        )),
        1 => Ok(found.remove(0)),
        _ => Err(error(
            StatusCode::CONFLICT,
            "ambiguous",
            format!("several namespaces have a case named {name}; add ?namespace=NS"),
        )),
    }
}

async fn get_case(
    State(dev): State<Arc<Dev>>,
    Path(name): Path<String>,
    Query(q): Query<CaseQuery>,
) -> Response {
    match find(&dev, &name, q.namespace.as_deref()).await {
        Ok(record) => json(StatusCode::OK, &CaseView::of(&record)),
        Err(response) => response,
    }
}

/// The body of `POST /dev/cases/{name}/decisions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    pub decision: Verdict,
    pub approver: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub comment: Option<String>,
}

async fn decide(
    State(dev): State<Arc<Dev>>,
    Path(name): Path<String>,
    Query(q): Query<CaseQuery>,
    body: Bytes,
) -> Response {
    let body: DecisionBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!(
                    "expected {{\"decision\": \"Approve\"|\"Reject\", \"approver\": \"...\", \"groups\": [...], \"comment\": \"...\"}}: {e}"
                ),
            );
        }
    };
    let record = match find(&dev, &name, q.namespace.as_deref()).await {
        Ok(r) => r,
        Err(response) => return response,
    };
    let cases = &dev.cases[&record.namespace];
    let decision = CaseDecision {
        approver: body.approver.trim().to_string(),
        groups: body.groups,
        decision: body.decision,
        comment: body.comment.filter(|c| !c.trim().is_empty()),
    };
    match cases.decide(&name, decision, chrono::Utc::now()).await {
        Ok(record) => {
            tracing::info!(
                case = %record.name,
                state = ?record.status.state,
                "decision recorded"
            );
            json(StatusCode::OK, &CaseView::of(&record))
        }
        Err(DecideError::Refused(refusal)) => {
            error(StatusCode::FORBIDDEN, "refused", refusal.to_string())
        }
        Err(DecideError::NotFound(_)) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no case named {name}"),
        ),
        Err(DecideError::Store(e)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string())
        }
    }
}

#[derive(Serialize)]
struct WorkflowStatus<'a> {
    namespace: &'a str,
    name: &'a str,
    revision: &'a str,
    #[serde(flatten)]
    tally: tallyman_worker::Tally,
}

async fn status(State(dev): State<Arc<Dev>>) -> Response {
    let mut workflows = Vec::new();
    for worker in &dev.workers {
        let tally = match worker.tally().await {
            Ok(t) => t,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()),
        };
        workflows.push(WorkflowStatus {
            namespace: &worker.names().namespace,
            name: &worker.names().workflow,
            revision: worker.revision(),
            tally,
        });
    }
    json(
        StatusCode::OK,
        &serde_json::json!({
            "nats": dev.nats_url,
            "webhooks": dev.webhooks,
            "workflows": workflows,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn dev(allow_remote: bool) -> Arc<Dev> {
        Arc::new(Dev {
            workers: Vec::new(),
            cases: BTreeMap::new(),
            gateways: HashMap::new(),
            nats_url: "nats://127.0.0.1:4222".into(),
            webhooks: Vec::new(),
            allow_remote,
        })
    }

    async fn get(dev: Arc<Dev>, from: &str, path: &str) -> (StatusCode, serde_json::Value) {
        let mut request = Request::builder().uri(path).body(Body::empty()).unwrap();
        request
            .extensions_mut()
            .insert(ConnectInfo(from.parse::<SocketAddr>().unwrap()));
        let response = router(dev).oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn the_dev_api_answers_loopback_only_unless_opened() {
        for from in ["127.0.0.1:5000", "[::1]:5000"] {
            let (status, body) = get(dev(false), from, "/dev/status").await;
            assert_eq!(status, StatusCode::OK, "{from}: {body}");
            assert_eq!(body["nats"], "nats://127.0.0.1:4222");
        }
        let (status, body) = get(dev(false), "192.0.2.7:5000", "/dev/cases").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body["error"], "forbidden");
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("--allow-remote-dev-api"),
            "{body}"
        );
        let (status, _) = get(dev(true), "192.0.2.7:5000", "/dev/cases").await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn webhooks_of_unknown_namespaces_and_other_paths_are_json_404s() {
        let (status, body) = get(dev(false), "192.0.2.7:5000", "/webhooks/nowhere/shop/x").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["detail"].as_str().unwrap().contains("nowhere"));
        let (status, body) = get(dev(false), "127.0.0.1:5000", "/elsewhere").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "not_found");
        let (status, _) = get(dev(false), "127.0.0.1:5000", "/dev/cases/none").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
