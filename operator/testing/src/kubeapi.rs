//! A small HTTP-level fake of the Kubernetes API server, driven through the
//! real `kube::Client`, for tests of call sequences: server-side apply,
//! status, finalizers, conflicts, API errors.
//!
//! ```text
//! kube::Client ──HTTP──▶ FakeApi (127.0.0.1:<free port>)
//!                          objects: (group/version, resource, namespace, name) → JSON
//!                          log:     every request (method, path, query, content type)
//!                          faults:  the next N matching requests answer 409 / 500 / …
//!                          answers: fixed responses for a method and path (e.g. SelfSubjectReview)
//! ```
//!
//! ```no_run
//! # async fn demo() {
//! use tallyman_testing::kubeapi::FakeApi;
//! let api = FakeApi::start().await;
//! let client = api.client();
//! // … run code under test with `client` …
//! assert!(api.writes().is_empty(), "{:#?}", api.writes());
//! # }
//! ```
//!
//! What it models, on purpose no more:
//! - `GET` one object, `LIST` a collection (namespaced or across namespaces)
//!   with `labelSelector` terms `k=v`, `k==v`, `k!=v`, `k` and `!k`, and
//!   `fieldSelector=metadata.name=…`.
//! - `POST` create (`409 AlreadyExists`; `generateName` honoured), `PUT`
//!   replace (`409 Conflict` when `metadata.resourceVersion` is stale),
//!   `PATCH` as server-side apply (`application/apply-patch+yaml`: creates,
//!   or merges objects recursively and replaces lists; no field ownership),
//!   JSON merge patch (also used for strategic merge patch) and JSON patch.
//! - `status` is a subresource of every kind: writes to the object keep the
//!   stored status, writes to `…/status` change only the status.
//! - `resourceVersion` is a global counter bumped only when a write changed
//!   the stored object, so a no-op apply is observable as such; `generation`
//!   moves when anything besides `metadata` and `status` changes.
//! - `DELETE` sets `deletionTimestamp` (and bumps `generation`) while
//!   finalizers remain; the object goes when the last finalizer is removed.
//!   Objects owned (by uid) by a removed object are removed too (garbage
//!   collection, immediate).
//! - Watches (`?watch=true`): the changes after the given `resourceVersion`
//!   (kept for the life of the fake), then live ones, filtered by
//!   `labelSelector` and `fieldSelector=metadata.name=…`; no bookmarks. A
//!   controller can run against the fake as against a cluster.
//! - No admission, no defaulting, no schema, no field ownership.
//!
//! Driving it from a test:
//! - [`FakeApi::seed`] stores an object as if created (uid, resourceVersion,
//!   generation 1); [`FakeApi::object`] and [`FakeApi::objects`] read the
//!   store without a request in the log.
//! - [`FakeApi::fail_next`]`("PATCH", "/apis/apps/v1/namespaces/ns/deployments", 409, 1)`
//!   makes the next such request fail without touching the store.
//! - [`FakeApi::answer`]`("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", 201, body)`
//!   answers a request that is not about stored objects (who am I, version).
//! - [`FakeApi::requests`], [`FakeApi::writes`] and [`FakeApi::clear_requests`]
//!   assert call sequences ("the second reconcile writes nothing").

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// One request as the fake saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// The raw query string, e.g. `fieldManager=tallyman-operator&force=true`.
    pub query: String,
    pub content_type: Option<String>,
}

impl Request {
    /// Whether the request asks to change something (`POST`, `PUT`, `PATCH`, `DELETE`).
    pub fn is_write(&self) -> bool {
        !matches!(self.method.as_str(), "GET" | "HEAD")
    }
}

/// The identity of a stored object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// `v1` for the core group, else `group/version`.
    pub group_version: String,
    /// The plural resource name, e.g. `deployments`.
    pub resource: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(group_version: &str, resource: &str, namespace: &str, name: &str) -> Self {
        Self {
            group_version: group_version.into(),
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

struct Fault {
    method: String,
    path_prefix: String,
    status: u16,
    remaining: usize,
}

struct Answer {
    method: String,
    path: String,
    status: u16,
    body: Value,
}

/// One change, as a watch reports it.
#[derive(Clone, Debug)]
struct Change {
    resource_version: u64,
    key: Key,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    type_: &'static str,
    object: Value,
}

/// What one watch asks for.
#[derive(Clone)]
struct WatchFilter {
    group_version: String,
    resource: String,
    namespace: String,
    labels: Option<String>,
    name: Option<String>,
}

impl WatchFilter {
    fn matches(&self, c: &Change) -> bool {
        c.key.group_version == self.group_version
            && c.key.resource == self.resource
            && (self.namespace.is_empty() || c.key.namespace == self.namespace)
            && self.name.as_ref().is_none_or(|n| *n == c.key.name)
            && self.labels.as_deref().is_none_or(|l| selects(&c.object, l))
    }
}

#[derive(Default)]
struct Inner {
    objects: BTreeMap<Key, Value>,
    log: Vec<Request>,
    faults: Vec<Fault>,
    answers: Vec<Answer>,
    resource_version: u64,
    uid: u64,
    /// Every change, for watches that start at an older resourceVersion.
    history: Vec<Change>,
    watchers: Vec<tokio::sync::mpsc::UnboundedSender<Change>>,
}

/// The fake API server; it stops when dropped.
pub struct FakeApi {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApi {
    /// Binds a free loopback port and serves until dropped.
    pub async fn start() -> FakeApi {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("local address");
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeApi { addr, inner, task }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A real `kube::Client` talking to this fake (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        let uri: Uri = self.url().parse().expect("a valid URL");
        kube::Client::try_from(kube::Config::new(uri)).expect("a kube client")
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().log.clone()
    }

    /// The requests that ask to change something.
    pub fn writes(&self) -> Vec<Request> {
        self.lock()
            .log
            .iter()
            .filter(|r| r.is_write())
            .cloned()
            .collect()
    }

    /// Forget the requests so far (objects stay).
    pub fn clear_requests(&self) {
        self.lock().log.clear();
    }

    /// The next `times` requests with `method` (e.g. `"PATCH"`, `"*"` for
    /// any) whose path starts with `path_prefix` answer `status` (409, 500,
    /// …) with a Kubernetes `Status` body, and change nothing.
    pub fn fail_next(&self, method: &str, path_prefix: &str, status: u16, times: usize) {
        self.lock().faults.push(Fault {
            method: method.to_uppercase(),
            path_prefix: path_prefix.into(),
            status,
            remaining: times,
        });
    }

    /// Answer every `method` request to exactly `path` with `status` and
    /// `body` instead of the object store, e.g. a `SelfSubjectReview`.
    pub fn answer(&self, method: &str, path: &str, status: u16, body: Value) {
        self.lock().answers.push(Answer {
            method: method.to_uppercase(),
            path: path.into(),
            status,
            body,
        });
    }

    /// The stored object, if any.
    pub fn object(&self, key: &Key) -> Option<Value> {
        self.lock().objects.get(key).cloned()
    }

    /// Every stored object of a resource in a namespace (`""`: all namespaces).
    pub fn objects(&self, group_version: &str, resource: &str, namespace: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|(k, _)| {
                k.group_version == group_version
                    && k.resource == resource
                    && (namespace.is_empty() || k.namespace == namespace)
            })
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Store `object` as if created through the API (metadata filled in).
    pub fn seed(&self, key: Key, object: Value) -> Value {
        let mut inner = self.lock();
        let stored = inner.prepare_create(&key, object);
        inner.objects.insert(key.clone(), stored.clone());
        inner.record("ADDED", key, stored.clone());
        stored
    }
}

/// Where a request points.
struct Target {
    group_version: String,
    namespace: String,
    resource: String,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group_version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ((*v).to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, r, more @ ..] => ((*ns).to_string(), [&[*r][..], more].concat()),
        _ => (String::new(), rest.to_vec()),
    };
    match rest.as_slice() {
        [resource] => Some(Target {
            group_version,
            namespace,
            resource: (*resource).into(),
            name: None,
            status: false,
        }),
        [resource, name] => Some(Target {
            group_version,
            namespace,
            resource: (*resource).into(),
            name: Some((*name).into()),
            status: false,
        }),
        [resource, name, "status"] => Some(Target {
            group_version,
            namespace,
            resource: (*resource).into(),
            name: Some((*name).into()),
            status: true,
        }),
        _ => None,
    }
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(body)).into_response()
}

fn reason_of(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        _ => "Unknown",
    }
}

fn ok(code: StatusCode, v: Value) -> Response {
    (code, axum::Json(v)).into_response()
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
    let query = uri.query().unwrap_or_default().to_string();
    let path = uri.path().to_string();
    let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
    inner.log.push(Request {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type: content_type.clone(),
    });
    if let Some(f) = inner.faults.iter_mut().find(|f| {
        f.remaining > 0
            && (f.method == "*" || f.method == method.as_str())
            && path.starts_with(&f.path_prefix)
    }) {
        f.remaining -= 1;
        let code = f.status;
        return status(code, reason_of(code), format!("injected fault {code}"));
    }
    if let Some(a) = inner
        .answers
        .iter()
        .find(|a| a.method == method.as_str() && a.path == path)
    {
        let code = StatusCode::from_u16(a.status).unwrap_or(StatusCode::OK);
        return ok(code, a.body.clone());
    }
    let Some(target) = parse_path(&path) else {
        return status(404, "NotFound", format!("no route for {path}"));
    };
    let params: BTreeMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    // The message of a 400 when the body does not parse.
    let parse_body = || -> Result<Value, String> {
        // YAML is a superset of JSON: apply patches arrive as either.
        if content_type.as_deref() == Some("application/apply-patch+yaml") {
            serde_json::from_slice(&body).or_else(|_| {
                serde_norway::from_slice(&body).map_err(|e| format!("invalid body: {e}"))
            })
        } else {
            serde_json::from_slice(&body).map_err(|e| format!("invalid body: {e}"))
        }
    };
    match (method.as_str(), &target.name) {
        ("GET", None) => {
            if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
                let filter = WatchFilter {
                    group_version: target.group_version.clone(),
                    resource: target.resource.clone(),
                    namespace: target.namespace.clone(),
                    labels: params.get("labelSelector").cloned(),
                    name: params
                        .get("fieldSelector")
                        .and_then(|f| f.strip_prefix("metadata.name="))
                        .map(str::to_string),
                };
                let since = params
                    .get("resourceVersion")
                    .and_then(|rv| rv.parse().ok())
                    .unwrap_or(inner.resource_version);
                let timeout = params
                    .get("timeoutSeconds")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(300);
                let (backlog, rx) = inner.watch(&filter, since);
                return watch_response(backlog, rx, filter, Duration::from_secs(timeout));
            }
            let name = params
                .get("fieldSelector")
                .and_then(|f| f.strip_prefix("metadata.name="));
            inner.list(
                &target,
                params.get("labelSelector").map(String::as_str),
                name,
            )
        }
        ("GET", Some(name)) => match inner.objects.get(&key(&target, name)) {
            Some(v) => ok(StatusCode::OK, v.clone()),
            None => not_found(&target, name),
        },
        ("POST", None) => match parse_body() {
            Ok(obj) => inner.create(&target, obj),
            Err(m) => status(400, "BadRequest", m),
        },
        ("PUT", Some(name)) => match parse_body() {
            Ok(obj) => inner.replace(&target, name, obj),
            Err(m) => status(400, "BadRequest", m),
        },
        ("PATCH", Some(name)) => match parse_body() {
            Ok(patch) => inner.patch(&target, name, content_type.as_deref(), patch),
            Err(m) => status(400, "BadRequest", m),
        },
        ("DELETE", Some(name)) => inner.delete(&target, name),
        _ => status(
            405,
            "MethodNotAllowed",
            format!("{method} {path} is not supported by the fake"),
        ),
    }
}

/// A watch: one JSON event per line, until the timeout or the server stops.
fn watch_response(
    backlog: Vec<Change>,
    rx: tokio::sync::mpsc::UnboundedReceiver<Change>,
    filter: WatchFilter,
    timeout: Duration,
) -> Response {
    use futures_util::StreamExt;
    let live =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
            .filter(move |c| std::future::ready(filter.matches(c)));
    let events = futures_util::stream::iter(backlog)
        .chain(live)
        .map(|c| {
            let mut line = serde_json::to_vec(&json!({"type": c.type_, "object": c.object}))
                .expect("JSON values serialize");
            line.push(b'\n');
            Ok::<_, std::convert::Infallible>(Bytes::from(line))
        })
        .take_until(tokio::time::sleep(timeout));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(events),
    )
        .into_response()
}

fn key(t: &Target, name: &str) -> Key {
    Key::new(&t.group_version, &t.resource, &t.namespace, name)
}

fn not_found(t: &Target, name: &str) -> Response {
    status(
        404,
        "NotFound",
        format!("{} {:?} not found", t.resource, name),
    )
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Whether `obj` matches a label selector (`,`-separated terms).
fn selects(obj: &Value, selector: &str) -> bool {
    let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
    let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                label(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                label(k.trim()) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                label(k.trim()).is_none()
            } else {
                label(term).is_some()
            }
        })
}

/// Server-side apply, simplified: objects merge recursively, everything
/// else (lists included) is replaced by the patch's value.
fn apply_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        apply_merge(existing, v)
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// RFC 7386 JSON merge patch: `null` removes.
fn merge_patch(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = Value::Object(Map::new());
        }
        let t = target.as_object_mut().expect("made an object above");
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    } else {
        *target = patch.clone();
    }
}

fn without(v: &Value, fields: &[&str]) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        for f in fields {
            o.remove(*f);
        }
    }
    v
}

impl Inner {
    fn next_rv(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    fn prepare_create(&mut self, k: &Key, mut obj: Value) -> Value {
        self.uid += 1;
        let uid = format!("00000000-0000-0000-0000-{:012}", self.uid);
        let rv = self.next_rv();
        if !obj.is_object() {
            obj = json!({});
        }
        let meta = obj
            .as_object_mut()
            .expect("an object")
            .entry("metadata")
            .or_insert_with(|| json!({}));
        if !meta.is_object() {
            *meta = json!({});
        }
        let m = meta.as_object_mut().expect("an object");
        m.insert("name".into(), json!(k.name));
        if !k.namespace.is_empty() {
            m.insert("namespace".into(), json!(k.namespace));
        }
        m.insert("uid".into(), json!(uid));
        m.insert("resourceVersion".into(), json!(rv));
        m.insert("generation".into(), json!(1));
        m.insert("creationTimestamp".into(), json!(now()));
        m.remove("deletionTimestamp");
        obj
    }

    fn list(&self, t: &Target, selector: Option<&str>, name: Option<&str>) -> Response {
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|(k, _)| {
                k.group_version == t.group_version
                    && k.resource == t.resource
                    && (t.namespace.is_empty() || k.namespace == t.namespace)
                    && name.is_none_or(|n| n == k.name)
            })
            .map(|(_, v)| v)
            .filter(|v| selector.is_none_or(|s| selects(v, s)))
            .cloned()
            .collect();
        let kind = items
            .first()
            .and_then(|i| i.get("kind"))
            .and_then(Value::as_str)
            .map(|k| format!("{k}List"))
            .unwrap_or_else(|| "List".into());
        ok(
            StatusCode::OK,
            json!({
                "apiVersion": t.group_version,
                "kind": kind,
                "metadata": {"resourceVersion": self.resource_version.to_string()},
                "items": items,
            }),
        )
    }

    fn create(&mut self, t: &Target, obj: Value) -> Response {
        let name = match obj.pointer("/metadata/name").and_then(Value::as_str) {
            Some(n) => n.to_string(),
            None => match obj
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
            {
                Some(prefix) => format!("{prefix}{:05}", self.uid + 1),
                None => return status(422, "Invalid", "metadata.name is required".into()),
            },
        };
        let k = key(t, &name);
        if self.objects.contains_key(&k) {
            return status(
                409,
                "AlreadyExists",
                format!("{} {name:?} already exists", t.resource),
            );
        }
        let stored = self.prepare_create(&k, obj);
        self.objects.insert(k.clone(), stored.clone());
        self.record("ADDED", k, stored.clone());
        ok(StatusCode::CREATED, stored)
    }

    /// Store `next` in place of the object at `k` when it differs; bumps
    /// `resourceVersion` (and `generation` for changes outside metadata and
    /// status); removes it when it is being deleted and has no finalizer left.
    fn store(&mut self, k: Key, mut next: Value) -> Response {
        let Some(prev) = self.objects.get(&k).cloned() else {
            return status(
                404,
                "NotFound",
                format!("{} {:?} not found", k.resource, k.name),
            );
        };
        // Identity and server-owned fields are not the client's to change.
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "name",
            "namespace",
        ] {
            match prev.pointer(&format!("/metadata/{f}")) {
                Some(v) => {
                    next["metadata"][f] = v.clone();
                }
                None => {
                    if let Some(m) = next.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove(f);
                    }
                }
            }
        }
        next["metadata"]["resourceVersion"] = prev["metadata"]["resourceVersion"].clone();
        next["metadata"]["generation"] = prev["metadata"]["generation"].clone();
        if next == prev {
            return ok(StatusCode::OK, prev);
        }
        if without(&next, &["metadata", "status"]) != without(&prev, &["metadata", "status"]) {
            let g = prev["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            next["metadata"]["generation"] = json!(g);
        }
        next["metadata"]["resourceVersion"] = json!(self.next_rv());
        let finalizers_left = next
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if next.pointer("/metadata/deletionTimestamp").is_some() && !finalizers_left {
            self.remove(&k);
            return ok(StatusCode::OK, next);
        }
        self.objects.insert(k.clone(), next.clone());
        self.record("MODIFIED", k, next.clone());
        ok(StatusCode::OK, next)
    }

    /// Tell the watches.
    fn record(&mut self, type_: &'static str, key: Key, object: Value) {
        let resource_version = object
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(self.resource_version);
        let change = Change {
            resource_version,
            key,
            type_,
            object,
        };
        self.watchers.retain(|w| w.send(change.clone()).is_ok());
        self.history.push(change);
    }

    /// Register a watch: the changes after `since`, then every new one.
    fn watch(
        &mut self,
        filter: &WatchFilter,
        since: u64,
    ) -> (Vec<Change>, tokio::sync::mpsc::UnboundedReceiver<Change>) {
        let backlog = self
            .history
            .iter()
            .filter(|c| c.resource_version > since && filter.matches(c))
            .cloned()
            .collect();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.watchers.push(tx);
        (backlog, rx)
    }

    /// Remove `k` and, transitively, what it owns.
    fn remove(&mut self, k: &Key) {
        let Some(mut gone) = self.objects.remove(k) else {
            return;
        };
        gone["metadata"]["resourceVersion"] = json!(self.next_rv());
        self.record("DELETED", k.clone(), gone.clone());
        let Some(uid) = gone.pointer("/metadata/uid").and_then(Value::as_str) else {
            return;
        };
        let owned: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, v)| {
                v.pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| {
                        refs.iter()
                            .any(|r| r.get("uid").and_then(Value::as_str) == Some(uid))
                    })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in owned {
            self.remove(&k);
        }
    }

    /// The object as a write to the main resource or to `/status` leaves it.
    fn scoped(&self, t: &Target, prev: &Value, mut next: Value) -> Value {
        if t.status {
            let mut out = prev.clone();
            match next.get_mut("status").map(Value::take) {
                Some(s) => out["status"] = s,
                None => {
                    if let Some(o) = out.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            out
        } else {
            match prev.get("status") {
                Some(s) => next["status"] = s.clone(),
                None => {
                    if let Some(o) = next.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            next
        }
    }

    fn replace(&mut self, t: &Target, name: &str, obj: Value) -> Response {
        let k = key(t, name);
        let Some(prev) = self.objects.get(&k).cloned() else {
            return not_found(t, name);
        };
        if let Some(rv) = obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && Some(rv)
                != prev
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return status(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                    t.resource
                ),
            );
        }
        let next = self.scoped(t, &prev, obj);
        self.store(k, next)
    }

    fn patch(
        &mut self,
        t: &Target,
        name: &str,
        content_type: Option<&str>,
        patch: Value,
    ) -> Response {
        let k = key(t, name);
        let prev = self.objects.get(&k).cloned();
        match (content_type, prev) {
            (Some("application/apply-patch+yaml"), None) => {
                if t.status {
                    return not_found(t, name);
                }
                let mut obj = patch;
                if let Some(o) = obj.as_object_mut() {
                    o.remove("status");
                }
                self.create(t, obj)
            }
            (_, None) => not_found(t, name),
            (Some("application/apply-patch+yaml"), Some(prev)) => {
                let mut next = prev.clone();
                apply_merge(&mut next, &patch);
                let next = self.scoped(t, &prev, next);
                self.store(k, next)
            }
            (
                Some("application/merge-patch+json" | "application/strategic-merge-patch+json"),
                Some(prev),
            ) => {
                let mut next = prev.clone();
                merge_patch(&mut next, &patch);
                let next = self.scoped(t, &prev, next);
                self.store(k, next)
            }
            (Some("application/json-patch+json"), Some(prev)) => {
                let ops: json_patch::Patch = match serde_json::from_value(patch) {
                    Ok(p) => p,
                    Err(e) => return status(400, "BadRequest", format!("invalid JSON patch: {e}")),
                };
                // Like the API server, a `test` for null passes on a field
                // that is absent (how kube adds the first finalizer).
                let ops = json_patch::Patch(
                    ops.0
                        .into_iter()
                        .filter(|op| match op {
                            json_patch::PatchOperation::Test(t) => {
                                !(t.value.is_null() && prev.pointer(t.path.as_str()).is_none())
                            }
                            _ => true,
                        })
                        .collect(),
                );
                let mut next = prev.clone();
                if let Err(e) = json_patch::patch(&mut next, &ops) {
                    // A failed `test` is how optimistic finalizer updates lose a race.
                    return status(422, "Invalid", format!("the JSON patch failed: {e}"));
                }
                let next = self.scoped(t, &prev, next);
                self.store(k, next)
            }
            (other, _) => status(
                415,
                "UnsupportedMediaType",
                format!("unsupported patch type {other:?}"),
            ),
        }
    }

    fn delete(&mut self, t: &Target, name: &str) -> Response {
        let k = key(t, name);
        let Some(prev) = self.objects.get(&k).cloned() else {
            return not_found(t, name);
        };
        let has_finalizers = prev
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if !has_finalizers {
            self.remove(&k);
            return ok(StatusCode::OK, prev);
        }
        if prev.pointer("/metadata/deletionTimestamp").is_some() {
            return ok(StatusCode::OK, prev);
        }
        let mut next = prev;
        next["metadata"]["deletionTimestamp"] = json!(now());
        // As the API server does, so generation-filtered watches see it.
        let g = next["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
        next["metadata"]["generation"] = json!(g);
        next["metadata"]["resourceVersion"] = json!(self.next_rv());
        self.objects.insert(k.clone(), next.clone());
        self.record("MODIFIED", k, next.clone());
        ok(StatusCode::OK, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_group_namespace_resource_and_subresource() {
        let t = parse_path("/apis/apps/v1/namespaces/shop/deployments/w/status").unwrap();
        assert_eq!(
            (
                t.group_version.as_str(),
                t.namespace.as_str(),
                t.resource.as_str()
            ),
            ("apps/v1", "shop", "deployments")
        );
        assert_eq!(t.name.as_deref(), Some("w"));
        assert!(t.status);
        let t = parse_path("/api/v1/configmaps").unwrap();
        assert_eq!((t.group_version.as_str(), t.namespace.as_str()), ("v1", ""));
        assert!(t.name.is_none());
        let t = parse_path("/apis/authentication.k8s.io/v1/selfsubjectreviews").unwrap();
        assert_eq!(t.resource, "selfsubjectreviews");
        assert!(parse_path("/version").is_none());
    }

    #[test]
    fn label_selectors_select() {
        let o = json!({"metadata": {"labels": {"a": "1", "b": "2"}}});
        assert!(selects(&o, "a=1,b==2"));
        assert!(selects(&o, "a,!c"));
        assert!(!selects(&o, "a!=1"));
        assert!(!selects(&o, "c"));
    }

    #[test]
    fn apply_merges_objects_and_replaces_lists() {
        let mut t = json!({"a": {"x": 1, "y": [1, 2]}, "b": 1});
        apply_merge(&mut t, &json!({"a": {"y": [3]}, "c": 2}));
        assert_eq!(t, json!({"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}));
    }

    use futures_util::{StreamExt, TryStreamExt};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{
        Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
    };

    fn config_map(name: &str, data: &str) -> ConfigMap {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {"app": "x"}},
            "data": {"k": data}
        }))
        .unwrap()
    }

    fn rv(c: &ConfigMap) -> String {
        c.metadata.resource_version.clone().unwrap()
    }

    #[tokio::test]
    async fn crud_through_the_real_client() {
        let fake = FakeApi::start().await;
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        let created = api
            .create(&PostParams::default(), &config_map("a", "1"))
            .await
            .unwrap();
        assert!(created.metadata.uid.is_some());
        let e = api
            .create(&PostParams::default(), &config_map("a", "1"))
            .await
            .unwrap_err();
        assert!(matches!(e, kube::Error::Api(s) if s.code == 409));
        api.create(&PostParams::default(), &config_map("b", "2"))
            .await
            .unwrap();
        let listed = api
            .list(&ListParams::default().labels("app=x"))
            .await
            .unwrap();
        assert_eq!(listed.items.len(), 2);
        assert!(
            api.list(&ListParams::default().labels("app=y"))
                .await
                .unwrap()
                .items
                .is_empty()
        );

        // A replace with a stale resourceVersion is a conflict.
        let mut stale = created.clone();
        api.replace("a", &PostParams::default(), &config_map("a", "2"))
            .await
            .unwrap();
        stale.data = Some([("k".to_string(), "3".to_string())].into());
        let e = api
            .replace("a", &PostParams::default(), &stale)
            .await
            .unwrap_err();
        assert!(matches!(e, kube::Error::Api(s) if s.code == 409));

        // A server-side apply that changes nothing leaves resourceVersion as it is.
        let ssa = PatchParams::apply("test").force();
        let one = api
            .patch("c", &ssa, &Patch::Apply(config_map("c", "1")))
            .await
            .unwrap();
        let two = api
            .patch("c", &ssa, &Patch::Apply(config_map("c", "1")))
            .await
            .unwrap();
        assert_eq!(rv(&one), rv(&two));
        let three = api
            .patch("c", &ssa, &Patch::Apply(config_map("c", "2")))
            .await
            .unwrap();
        assert_ne!(rv(&two), rv(&three));

        let merged = api
            .patch(
                "c",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"k": null, "j": "x"}})),
            )
            .await
            .unwrap();
        assert_eq!(
            merged.data.unwrap(),
            [("j".to_string(), "x".to_string())].into()
        );
        assert_eq!(
            fake.writes().iter().filter(|w| w.method == "PATCH").count(),
            4
        );
    }

    #[tokio::test]
    async fn finalizers_hold_deletion_and_owners_take_their_children() {
        let fake = FakeApi::start().await;
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        let mut held = config_map("held", "1");
        held.metadata.finalizers = Some(vec!["x/y".into()]);
        let owner = api.create(&PostParams::default(), &held).await.unwrap();
        let mut child = config_map("child", "1");
        child.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: "held".into(),
                uid: owner.metadata.uid.clone().unwrap(),
                ..Default::default()
            },
        ]);
        api.create(&PostParams::default(), &child).await.unwrap();
        api.delete("held", &DeleteParams::default()).await.unwrap();
        let terminating = api.get("held").await.unwrap();
        assert!(terminating.metadata.deletion_timestamp.is_some());
        api.patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
        assert!(api.get_opt("held").await.unwrap().is_none());
        assert!(
            api.get_opt("child").await.unwrap().is_none(),
            "collected with its owner"
        );
    }

    #[tokio::test]
    async fn faults_and_fixed_answers() {
        let fake = FakeApi::start().await;
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        fake.fail_next("POST", "/api/v1/namespaces/ns/configmaps", 500, 1);
        let e = api
            .create(&PostParams::default(), &config_map("a", "1"))
            .await
            .unwrap_err();
        assert!(matches!(e, kube::Error::Api(s) if s.code == 500));
        assert!(
            fake.objects("v1", "configmaps", "ns").is_empty(),
            "a fault changes nothing"
        );
        api.create(&PostParams::default(), &config_map("a", "1"))
            .await
            .unwrap();

        fake.answer(
            "GET",
            "/version",
            200,
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0"}),
        );
        let v = fake.client().apiserver_version().await.unwrap();
        assert_eq!(v.minor, "33");
    }

    #[tokio::test]
    async fn watches_replay_and_follow_changes() {
        let fake = FakeApi::start().await;
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        let start = api
            .list(&ListParams::default())
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        api.create(&PostParams::default(), &config_map("a", "1"))
            .await
            .unwrap();
        let mut events = api
            .watch(&WatchParams::default(), &start)
            .await
            .unwrap()
            .boxed();
        let first = events.try_next().await.unwrap().unwrap();
        assert!(matches!(first, WatchEvent::Added(c) if c.metadata.name.as_deref() == Some("a")));
        api.delete("a", &DeleteParams::default()).await.unwrap();
        let second = events.try_next().await.unwrap().unwrap();
        assert!(matches!(second, WatchEvent::Deleted(_)));
    }
}
