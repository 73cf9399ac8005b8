//! A namespace's webhook Connectors, compiled once: one [`Route`] per
//! Connector with a `webhook`, keyed by the path it is served at.
//!
//! ```text
//! Routes{namespace}
//!   "/webhooks/finance/wms/shipments" ─▶ Route{verifier, maxBodyBytes, events[]}
//!                                              events[i] = {type, subject, when?, id?, data?}
//! ```
//!
//! [`Route::process`] is everything between the raw body and the canonical
//! events, with no I/O: verify, parse, map. The HTTP layer and the fuzzing
//! tests call the same function.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use axum::http::{HeaderMap, HeaderName, StatusCode};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use sha2::{Digest, Sha256};
use tallyman_api::v1alpha1::{ConnectorSpec, SignatureScheme, WebhookSpec};
use tallyman_core::cel::{Env, EvalError, Program, Scope, Value, Vars, json};
use tallyman_telemetry::ConnectorLabels;

use super::server::Rejection;
use super::signature::{SignatureError, Verifier};
use crate::secrets::{SecretError, SecretSource};

/// Where a namespace's events of `event_type` are published; the same
/// name the worker consumes (`tallyman_worker::names`).
pub fn event_subject(namespace: &str, event_type: &str) -> String {
    format!("tallyman.{namespace}.events.{event_type}")
}

/// Why a namespace's webhook Connectors could not be compiled. Names the
/// Connector and field, never a Secret value.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("failed to compile connector {connector} {field}: {message}")]
    Expression {
        connector: String,
        field: String,
        message: String,
    },
    #[error("failed to read the signing secret of connector {connector}")]
    Secret {
        connector: String,
        #[source]
        source: SecretError,
    },
    #[error("failed to build the webhook of connector {connector}: {reason}")]
    Invalid { connector: String, reason: String },
}

/// One `events[]` entry, compiled.
#[derive(Debug)]
struct CompiledEvent {
    type_: String,
    subject: String,
    when: Option<Program>,
    id: Option<Program>,
    data: Option<Program>,
}

/// One webhook Connector, ready to serve.
#[derive(Debug)]
pub struct Route {
    namespace: String,
    connector: String,
    path: String,
    source: String,
    scheme: SignatureScheme,
    verifier: Verifier,
    max_body_bytes: u64,
    events: Vec<CompiledEvent>,
    /// Whether any expression reads `headers`; the map is built only then.
    needs_headers: bool,
    pub(crate) labels: ConnectorLabels,
}

/// One canonical event, ready to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalEvent {
    /// The event's `id`.
    pub id: String,
    /// The dedup identity sent as `Nats-Msg-Id`: the id within this
    /// Connector (`tallyman_core::engine::dedup_key`), so equal ids from two
    /// systems are two events.
    pub msg_id: String,
    pub event_type: String,
    /// `tallyman.<namespace>.events.<type>`.
    pub subject: String,
    /// `{"id","type","source","time","data"}` as JSON text; `data` written
    /// with the lossless writer, so decimals keep every digit.
    pub payload: Bytes,
}

/// A namespace's compiled webhook Connectors.
#[derive(Debug)]
pub struct Routes {
    namespace: String,
    by_path: HashMap<String, Arc<Route>>,
    fingerprint: [u8; 32],
}

/// Event ids travel as a NATS header: printable, bounded.
const MAX_ID_BYTES: usize = 256;
/// CEL errors quote values; keep the 422 answer readable.
const MAX_DETAIL_CHARS: usize = 1000;

impl Routes {
    /// Compiles every Connector of `namespace` that has a `webhook`: reads
    /// its signing secret, checks and prepares its CEL (`Scope::Webhook`).
    /// Connectors without one are skipped.
    pub fn new(
        namespace: &str,
        connectors: &[(String, ConnectorSpec)],
        secrets: &dyn SecretSource,
    ) -> Result<Routes, BuildError> {
        let mut by_path = HashMap::new();
        let mut fingerprint = Sha256::new();
        fingerprint.update(fingerprint_salt());
        fingerprint.update(namespace.as_bytes());
        let mut names = BTreeSet::new();
        let mut sorted: Vec<&(String, ConnectorSpec)> = connectors.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, spec) in sorted {
            let Some(hook) = &spec.webhook else { continue };
            if !names.insert(name.as_str()) {
                return Err(BuildError::Invalid {
                    connector: name.clone(),
                    reason: "the connector is listed twice".into(),
                });
            }
            let (route, secret) = Route::new(namespace, name, hook, secrets)?;
            fingerprint.update([0]);
            fingerprint.update(name.as_bytes());
            fingerprint.update([0]);
            fingerprint.update(serde_json::to_vec(hook).unwrap_or_default());
            fingerprint.update([0]);
            fingerprint.update(&secret);
            by_path.insert(route.path.clone(), Arc::new(route));
        }
        Ok(Routes {
            namespace: namespace.to_string(),
            by_path,
            fingerprint: fingerprint.finalize().into(),
        })
    }

    /// No routes: every path answers 404.
    pub fn empty(namespace: &str) -> Routes {
        Routes {
            namespace: namespace.to_string(),
            by_path: HashMap::new(),
            fingerprint: [0; 32],
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The route served at `path` (exactly; no query string).
    pub fn get(&self, path: &str) -> Option<&Arc<Route>> {
        self.by_path.get(path)
    }

    /// Every served path, sorted.
    pub fn paths(&self) -> Vec<&str> {
        let mut paths: Vec<&str> = self.by_path.keys().map(String::as_str).collect();
        paths.sort_unstable();
        paths
    }

    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }

    /// Changes whenever a webhook spec or a signing secret changes, so a
    /// reloader can skip swapping in an identical set. Salted per process:
    /// it says nothing about a secret outside it (still: never log it).
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }
}

fn fingerprint_salt() -> &'static [u8; 16] {
    static SALT: OnceLock<[u8; 16]> = OnceLock::new();
    SALT.get_or_init(|| fastrand::u128(..).to_le_bytes())
}

fn header_name(
    connector: &str,
    field: &str,
    value: Option<&str>,
) -> Result<HeaderName, BuildError> {
    let invalid = |reason: String| BuildError::Invalid {
        connector: connector.to_string(),
        reason,
    };
    let value = value.ok_or_else(|| invalid(format!("signature.{field} is required")))?;
    HeaderName::from_bytes(value.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| invalid(format!("signature.{field} {value:?} is not a header name")))
}

impl Route {
    fn new(
        namespace: &str,
        connector: &str,
        hook: &WebhookSpec,
        secrets: &dyn SecretSource,
    ) -> Result<(Route, Vec<u8>), BuildError> {
        let sig = &hook.signature;
        let secret = match (sig.scheme, &sig.secret_ref) {
            (SignatureScheme::None, _) => Vec::new(),
            (_, None) => {
                return Err(BuildError::Invalid {
                    connector: connector.to_string(),
                    reason: "signature.secretRef is required unless the scheme is none".into(),
                });
            }
            (_, Some(r)) => {
                let mut value =
                    secrets
                        .get(&r.name, &r.key)
                        .map_err(|source| BuildError::Secret {
                            connector: connector.to_string(),
                            source,
                        })?;
                // `kubectl create secret --from-file` often leaves a newline
                // that is no part of the shared secret (as for REST auth).
                while value.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
                    value.pop();
                }
                if value.is_empty() {
                    return Err(BuildError::Invalid {
                        connector: connector.to_string(),
                        reason: format!("key {:?} of secret {:?} is empty", r.key, r.name),
                    });
                }
                value
            }
        };
        let verifier = match sig.scheme {
            SignatureScheme::None => Verifier::None,
            SignatureScheme::Token => Verifier::Token {
                header: header_name(connector, "header", sig.header.as_deref())?,
                digest: Verifier::token_digest(&secret),
            },
            SignatureScheme::HmacSha256 => Verifier::Hmac {
                header: header_name(connector, "header", sig.header.as_deref())?,
                mac: Verifier::hmac(&secret),
            },
            SignatureScheme::HmacSha256Timestamped => Verifier::Timestamped {
                header: header_name(connector, "header", sig.header.as_deref())?,
                timestamp_header: header_name(
                    connector,
                    "timestampHeader",
                    sig.timestamp_header.as_deref(),
                )?,
                mac: Verifier::hmac(&secret),
                tolerance: sig.tolerance.as_std(),
            },
        };
        let compile = |i: usize, field: &str, src: &Option<String>| {
            src.as_deref()
                .map(|s| {
                    Program::compile(s, Scope::Webhook).map_err(|e| BuildError::Expression {
                        connector: connector.to_string(),
                        field: format!("spec.webhook.events[{i}].{field}"),
                        message: e.to_string(),
                    })
                })
                .transpose()
        };
        let mut events = Vec::with_capacity(hook.events.len());
        let mut needs_headers = false;
        for (i, e) in hook.events.iter().enumerate() {
            let compiled = CompiledEvent {
                type_: e.type_.clone(),
                subject: event_subject(namespace, &e.type_),
                when: compile(i, "when", &e.when)?,
                id: compile(i, "id", &e.id)?,
                data: compile(i, "data", &e.data)?,
            };
            needs_headers |= [&compiled.when, &compiled.id, &compiled.data]
                .into_iter()
                .flatten()
                .any(|p| p.references().variables.contains("headers"));
            events.push(compiled);
        }
        let route = Route {
            namespace: namespace.to_string(),
            connector: connector.to_string(),
            path: format!("/webhooks/{namespace}/{connector}{}", hook.path),
            source: format!("{namespace}/{connector}"),
            scheme: sig.scheme,
            verifier,
            max_body_bytes: hook.max_body_bytes,
            events,
            needs_headers,
            labels: ConnectorLabels {
                namespace: namespace.to_string(),
                connector: connector.to_string(),
            },
        };
        Ok((route, secret))
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn connector(&self) -> &str {
        &self.connector
    }

    /// The full path served: `/webhooks/{namespace}/{connector}{path}`.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn scheme(&self) -> SignatureScheme {
        self.scheme
    }

    pub fn max_body_bytes(&self) -> u64 {
        self.max_body_bytes
    }

    /// Verifies `body` (exactly as received) against `headers`, parses it
    /// and maps it to canonical events, at `now`. An empty list means no
    /// `when` held. No I/O; never panics on any input.
    pub fn process(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Vec<CanonicalEvent>, Rejection> {
        self.verifier
            .verify(headers, body, now.timestamp())
            .map_err(signature_rejection)?;
        // Parsed once into the shared form: expressions in the fast subset
        // read it without copying; others convert it once, when first needed.
        let payload = json::parse_fast(body).map_err(|e| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                format!("the body is not valid JSON: {e}"),
            )
        })?;
        let mut vars = Vars::new()
            .with_fast("payload", payload.clone())
            .with("now", Value::Timestamp(now.fixed_offset()));
        if self.needs_headers {
            vars.set("headers", self.headers_value(headers));
        }
        let env = Env::new(&vars);
        let time = now.to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut body_hash: Option<String> = None;
        let mut events = Vec::new();
        for (i, e) in self.events.iter().enumerate() {
            let failed = |field: &str, message: String| {
                let mut detail = format!("events[{i}] ({}) {field} failed: {message}", e.type_);
                truncate(&mut detail, MAX_DETAIL_CHARS);
                Rejection::new(StatusCode::UNPROCESSABLE_ENTITY, "mapping_failed", detail)
            };
            let eval = |field: &str, e: EvalError| failed(field, e.to_string());
            if let Some(when) = &e.when
                && !when.eval_bool_env(&env).map_err(|err| eval("when", err))?
            {
                continue;
            }
            let id = match &e.id {
                Some(p) => p.eval_key_env(&env).map_err(|err| eval("id", err))?,
                None => {
                    let hash = body_hash.get_or_insert_with(|| hex::encode(Sha256::digest(body)));
                    format!("{hash}:{}", e.type_)
                }
            };
            if id.is_empty() || id.len() > MAX_ID_BYTES || id.chars().any(char::is_control) {
                return Err(failed(
                    "id",
                    format!(
                        "an event id must be 1 to {MAX_ID_BYTES} bytes without control characters"
                    ),
                ));
            }
            if events.iter().any(|x: &CanonicalEvent| x.id == id) {
                return Err(failed(
                    "id",
                    format!(
                        "the id {id:?} is already the id of another event of this payload; ids must differ or the broker drops all but the first"
                    ),
                ));
            }
            let data = match &e.data {
                Some(p) => p
                    .evaluate_env(&env)
                    .map_err(|err| eval("data", err))?
                    .to_json(),
                None => payload.to_json(),
            };
            let data = data.map_err(|err| failed("data", err.to_string()))?;
            events.push(CanonicalEvent {
                payload: canonical(&id, &e.type_, &self.source, &time, &data),
                msg_id: tallyman_core::engine::dedup_key(&self.source, &id),
                id,
                event_type: e.type_.clone(),
                subject: e.subject.clone(),
            });
        }
        Ok(events)
    }

    /// `headers` for CEL: lowercase names, values as text (repeated headers
    /// joined with ", "), without the headers that carry credentials.
    fn headers_value(&self, headers: &HeaderMap) -> Value {
        let secret = self.verifier.secret_header();
        let mut map: HashMap<String, String> = HashMap::with_capacity(headers.len());
        for (name, value) in headers {
            if Some(name) == secret
                || matches!(
                    name.as_str(),
                    "authorization" | "proxy-authorization" | "cookie"
                )
            {
                continue;
            }
            let value = String::from_utf8_lossy(value.as_bytes());
            map.entry(name.as_str().to_string())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert_with(|| value.into_owned());
        }
        Value::from(map)
    }
}

fn signature_rejection(e: SignatureError) -> Rejection {
    let (code, detail) = match e {
        SignatureError::Missing(what) => (
            "missing_signature",
            format!("the request carries no {what} header"),
        ),
        SignatureError::Mismatch => (
            "bad_signature",
            "the signature does not match the body and the shared secret".to_string(),
        ),
        SignatureError::BadTimestamp => (
            "bad_signature",
            "the timestamp header is not unix seconds".to_string(),
        ),
        SignatureError::Stale => (
            "stale_timestamp",
            "the timestamp is outside the accepted window; a replay, or the sender's clock is off"
                .to_string(),
        ),
    };
    Rejection::new(StatusCode::UNAUTHORIZED, code, detail)
}

fn truncate(s: &mut String, max_chars: usize) {
    if let Some((cut, _)) = s.char_indices().nth(max_chars) {
        s.truncate(cut);
        s.push('…');
    }
}

/// `{"id","type","source","time","data"}`; `data` is JSON text already.
fn canonical(id: &str, event_type: &str, source: &str, time: &str, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + id.len() + source.len() + 96);
    let text = |s: &str, out: &mut String| {
        out.push_str(&serde_json::to_string(s).expect("a string always serializes"));
    };
    out.push_str("{\"id\":");
    text(id, &mut out);
    out.push_str(",\"type\":");
    text(event_type, &mut out);
    out.push_str(",\"source\":");
    text(source, &mut out);
    out.push_str(",\"time\":");
    text(time, &mut out);
    out.push_str(",\"data\":");
    out.push_str(data);
    out.push('}');
    Bytes::from(out)
}
