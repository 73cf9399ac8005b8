//! The outbound half of a Connector: one [`RestClient`] per Connector,
//! built from its `spec.rest`.
//!
//! ```text
//! call(action, params, body, key)
//!   └─ attempt 1..=retry.maxAttempts ── backoff (full jitter, Retry-After floor) ──┐
//!        auth header (static, or the cached OAuth2 token)                          │
//!        token bucket (shared by every clone)                                      │
//!        one exchange within spec.timeout ── 2xx → Response                        │
//!                                         ── 3xx, 4xx (not 408/429) → Rejected     │
//!                                         ── 5xx, 408, 429, connect, timeout ──────┘
//! ```
//!
//! Bodies travel as text both ways: the request body is JSON the caller
//! already wrote, the response body is handed back untouched so the engine
//! parses it without losing a digit (`tallyman_core::cel::json::parse`).
//! Logs name the connector, action, status and attempt, never a body, a
//! header value or a Secret.

mod auth;
mod limit;
mod path;
mod retry;
mod transport;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::Full;
use tallyman_api::v1alpha1::{HttpMethod, RestSpec};

use self::auth::{Auth, AuthError, TokenSerial};
use self::limit::TokenBucket;
use self::path::PathTemplate;
use self::retry::Backoff;
use self::transport::{Exchange, ExchangeError, HttpClient, exchange};
use crate::secrets::{SecretError, SecretSource};

pub use self::retry::MAX_RETRY_AFTER;
pub use self::transport::MAX_BODY_BYTES;

/// The response headers a [`Response`] keeps, by lowercase name.
pub const KEPT_HEADERS: [&str; 6] = [
    "content-type",
    "location",
    "etag",
    "retry-after",
    "x-request-id",
    "idempotency-replayed",
];

/// One invocation of an action.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallRequest {
    /// The action's name in `spec.rest.actions`.
    pub action: String,
    /// Values for the path's `{name}` placeholders, percent-encoded when
    /// filled in. Names the path does not use are ignored.
    pub params: BTreeMap<String, String>,
    /// JSON text, sent as is with `Content-Type: application/json`.
    pub body: Option<String>,
    /// Sent in the action's idempotency header; ignored by actions that
    /// declare none.
    pub idempotency_key: Option<String>,
}

impl CallRequest {
    pub fn new(action: impl Into<String>) -> Self {
        Self {
            action: action.into(),
            ..Self::default()
        }
    }

    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.insert(name.into(), value.into());
        self
    }

    pub fn body(mut self, json: impl Into<String>) -> Self {
        self.body = Some(json.into());
        self
    }

    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// A successful (below 400) answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Lowercase names; only those in [`KEPT_HEADERS`].
    pub headers: BTreeMap<String, String>,
    /// The body as received (invalid UTF-8 replaced), for
    /// `tallyman_core::cel::json::parse`.
    pub body: String,
    /// Requests sent, the successful one included.
    pub attempts: u32,
}

/// Why a call did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// A 4xx other than 408 and 429: the system refused the request as it
    /// stands. Never retried.
    #[error("rejected with HTTP {status} after {attempts} attempt(s)")]
    Rejected {
        status: u16,
        body: String,
        attempts: u32,
    },
    /// Attempts used up on connect errors, timeouts, 5xx, 408 and 429.
    #[error("gave up after {attempts} attempt(s): {last}")]
    Exhausted { attempts: u32, last: String },
    /// The call cannot be made: unknown action, missing param, bad URL.
    #[error("invalid call: {0}")]
    Invalid(String),
    /// No credential could be obtained: the OAuth2 token endpoint refused
    /// the client. Never retried.
    #[error("failed to authenticate: {0}")]
    Auth(String),
}

/// Why a client could not be built from a spec.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid baseUrl {0:?}: must be an http:// or https:// URL with a host and no query")]
    BaseUrl(String),
    #[error("invalid tokenUrl {0:?}: must be an http:// or https:// URL with a host")]
    TokenUrl(String),
    #[error("failed to read a credential")]
    Secret(#[from] SecretError),
    #[error("unusable {what}: {reason}")]
    Credential { what: &'static str, reason: String },
    #[error("invalid header name {header:?}: {reason}")]
    Header { header: String, reason: String },
    #[error("invalid action {action:?}: {reason}")]
    Action { action: String, reason: String },
    #[error("invalid probe path {0:?}")]
    ProbePath(String),
    #[error("failed to set up TLS: {0}")]
    Tls(String),
}

/// The REST client of one Connector. Clones share the rate limiter, the
/// token cache and the connection pool.
#[derive(Clone)]
pub struct RestClient {
    inner: Arc<Inner>,
}

struct Inner {
    connector: String,
    base: String,
    actions: BTreeMap<String, CompiledAction>,
    auth: Auth,
    timeout: Duration,
    backoff: Backoff,
    limiter: Option<TokenBucket>,
    probe: Uri,
    user_agent: HeaderValue,
    http: HttpClient,
}

struct CompiledAction {
    method: Method,
    path: PathTemplate,
    idempotency: Option<HeaderName>,
}

impl std::fmt::Debug for RestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestClient")
            .field("connector", &self.inner.connector)
            .field("base", &self.inner.base)
            .finish_non_exhaustive()
    }
}

/// What one attempt came to, short of an answer to return.
enum Failure {
    /// Worth another attempt; the floor is the server's `Retry-After`.
    Retry {
        reason: String,
        floor: Option<Duration>,
    },
    /// Final.
    Stop(CallError),
}

impl RestClient {
    /// Reads the credentials and the CA bundle from `secrets` (once: rebuild
    /// the client to pick up a rotated Secret) and compiles every action.
    pub fn new(
        connector: &str,
        spec: &RestSpec,
        secrets: &dyn SecretSource,
    ) -> Result<Self, BuildError> {
        let base = spec.base_url.trim_end_matches('/').to_string();
        let base_ok = base.parse::<Uri>().ok().is_some_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
        }) && !base.contains(['?', '#']);
        if !base_ok {
            return Err(BuildError::BaseUrl(spec.base_url.clone()));
        }

        let mut actions = BTreeMap::new();
        for (name, action) in &spec.actions {
            let invalid = |reason: String| BuildError::Action {
                action: name.clone(),
                reason,
            };
            let path = PathTemplate::compile(&action.path).map_err(invalid)?;
            let idempotency = action
                .idempotency
                .as_ref()
                .map(|i| HeaderName::try_from(i.header.as_str()))
                .transpose()
                .map_err(|e| invalid(format!("idempotency header: {e}")))?;
            actions.insert(
                name.clone(),
                CompiledAction {
                    method: method(action.method),
                    path,
                    idempotency,
                },
            );
        }

        let probe = format!("{base}{}", spec.probe.path)
            .parse::<Uri>()
            .map_err(|_| BuildError::ProbePath(spec.probe.path.clone()))?;

        let ca = match &spec.tls {
            Some(tls) => Some(secrets.get(&tls.ca_secret_ref.name, &tls.ca_secret_ref.key)?),
            None => None,
        };
        let timeout = spec.timeout.as_std();
        let http = transport::client(timeout, ca.as_deref()).map_err(BuildError::Tls)?;

        Ok(Self {
            inner: Arc::new(Inner {
                connector: connector.to_string(),
                base,
                actions,
                auth: Auth::new(spec.auth.as_ref(), secrets)?,
                timeout,
                backoff: Backoff::new(&spec.retry),
                limiter: spec
                    .rate_limit
                    .as_ref()
                    .map(|r| TokenBucket::new(r.requests_per_second, r.burst)),
                probe,
                user_agent: HeaderValue::from_static(concat!(
                    "tallyman/",
                    env!("CARGO_PKG_VERSION")
                )),
                http,
            }),
        })
    }

    /// The Connector this client belongs to.
    pub fn connector(&self) -> &str {
        &self.inner.connector
    }

    /// Invokes `req.action`, retrying per `spec.retry`. `on_retry(attempt,
    /// delay)` is called before each backoff sleep with the number of the
    /// attempt about to be made (2 for the first retry) and the wait.
    pub async fn call(
        &self,
        req: &CallRequest,
        on_retry: &(dyn Fn(u32, Duration) + Send + Sync),
    ) -> Result<Response, CallError> {
        let inner = &*self.inner;
        let action = inner
            .actions
            .get(&req.action)
            .ok_or_else(|| CallError::Invalid(format!("unknown action {:?}", req.action)))?;
        let url = action
            .path
            .render(&inner.base, &req.params)
            .map_err(|e| CallError::Invalid(format!("action {:?}: {e}", req.action)))?;
        let uri = url.parse::<Uri>().map_err(|e| {
            CallError::Invalid(format!("action {:?}: not a valid URL: {e}", req.action))
        })?;
        let idempotency = match (&action.idempotency, &req.idempotency_key) {
            (Some(header), Some(key)) => Some((
                header.clone(),
                HeaderValue::try_from(key.as_str()).map_err(|_| {
                    CallError::Invalid(
                        "the idempotency key contains characters a header cannot carry".into(),
                    )
                })?,
            )),
            _ => None,
        };
        let body = req.body.clone().map(Bytes::from);

        let mut attempts = 0;
        let mut failures = 0;
        let mut reauthenticated = false;
        loop {
            attempts += 1;
            let mut http_req = Request::new(Full::new(body.clone().unwrap_or_default()));
            *http_req.method_mut() = action.method.clone();
            *http_req.uri_mut() = uri.clone();
            let headers = http_req.headers_mut();
            headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
            headers.insert(USER_AGENT, inner.user_agent.clone());
            if body.is_some() {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            if let Some((name, value)) = &idempotency {
                headers.insert(name.clone(), value.clone());
            }

            let failure = match self.attempt(http_req).await {
                // Only a 2xx: redirects are not followed, and a 3xx (a
                // login page, a moved API) did not do or answer what was
                // asked. A lookup answered so must not read as "not there".
                Ok((answer, _)) if answer.status.is_success() => {
                    return Ok(response(answer, attempts));
                }
                // The token may have been revoked early: one fresh token, once.
                Ok((answer, Some(serial)))
                    if answer.status == StatusCode::UNAUTHORIZED && !reauthenticated =>
                {
                    reauthenticated = true;
                    if let Auth::OAuth2(oauth2) = &inner.auth {
                        oauth2.invalidate(serial).await;
                    }
                    tracing::debug!(
                        connector = %inner.connector,
                        action = %req.action,
                        attempt = attempts,
                        "401 with a cached token; retrying with a fresh one"
                    );
                    continue;
                }
                // A keyed 409 is waited out, except at the last attempt: then
                // it is refused like other 4xx, with the system's answer.
                Ok((answer, _))
                    if retry::retryable_call(
                        answer.status,
                        idempotency.is_some() && failures + 1 < inner.backoff.max_attempts,
                    ) =>
                {
                    Failure::Retry {
                        reason: format!("HTTP {}", answer.status.as_u16()),
                        floor: retry::retry_after(answer.status, &answer.headers),
                    }
                }
                Ok((answer, _)) => Failure::Stop(CallError::Rejected {
                    status: answer.status.as_u16(),
                    body: text(answer.body),
                    attempts,
                }),
                Err(failure) => failure,
            };
            match failure {
                Failure::Stop(CallError::Exhausted { last, .. }) => {
                    return Err(CallError::Exhausted { attempts, last });
                }
                Failure::Stop(e) => return Err(e),
                Failure::Retry { reason, floor } => {
                    failures += 1;
                    if failures >= inner.backoff.max_attempts {
                        return Err(CallError::Exhausted {
                            attempts,
                            last: reason,
                        });
                    }
                    let delay = inner.backoff.delay(failures, floor);
                    tracing::debug!(
                        connector = %inner.connector,
                        action = %req.action,
                        attempt = attempts,
                        reason = %reason,
                        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "call attempt failed; retrying"
                    );
                    on_retry(attempts + 1, delay);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One attempt: credential, rate limit, exchange. Returns the serial of
    /// the OAuth2 token used, if any. The credential comes first: calls
    /// waiting for a slow token fetch hold no slot, so they keep the rate
    /// limit's pace once it comes. (A token that expires during a longer
    /// wait than its refresh margin is refused once and fetched again.)
    async fn attempt(
        &self,
        mut req: Request<Full<Bytes>>,
    ) -> Result<(Exchange, Option<TokenSerial>), Failure> {
        let inner = &*self.inner;
        let serial = match &inner.auth {
            Auth::None => None,
            Auth::Header(name, value) => {
                req.headers_mut().insert(name.clone(), value.clone());
                None
            }
            Auth::OAuth2(oauth2) => {
                let (value, serial) = oauth2
                    .header(&inner.http, &inner.user_agent, inner.timeout)
                    .await
                    .map_err(|e| match e {
                        AuthError::Transient(reason) => Failure::Retry {
                            reason,
                            floor: None,
                        },
                        AuthError::Refused(reason) => Failure::Stop(CallError::Auth(reason)),
                    })?;
                req.headers_mut().insert(http::header::AUTHORIZATION, value);
                Some(serial)
            }
        };
        if let Some(limiter) = &inner.limiter {
            limiter.acquire().await;
        }
        match exchange(&inner.http, req, inner.timeout).await {
            Ok(answer) => Ok((answer, serial)),
            Err(ExchangeError::Transient(reason)) => Err(Failure::Retry {
                reason,
                floor: None,
            }),
            // Attempts are filled in by the caller.
            Err(e @ ExchangeError::TooLarge) => Err(Failure::Stop(CallError::Exhausted {
                attempts: 0,
                last: e.to_string(),
            })),
        }
    }

    /// GETs `baseUrl` + `probe.path` once, without credentials: `Ok(status)`
    /// when the system answered below 500 (reachable), an error otherwise.
    pub async fn probe(&self) -> Result<u16, CallError> {
        let inner = &*self.inner;
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = inner.probe.clone();
        req.headers_mut()
            .insert(ACCEPT, HeaderValue::from_static("application/json"));
        req.headers_mut()
            .insert(USER_AGENT, inner.user_agent.clone());
        if let Some(limiter) = &inner.limiter {
            limiter.acquire().await;
        }
        match exchange(&inner.http, req, inner.timeout).await {
            Ok(answer) if answer.status.is_server_error() => Err(CallError::Exhausted {
                attempts: 1,
                last: format!("HTTP {}", answer.status.as_u16()),
            }),
            Ok(answer) => Ok(answer.status.as_u16()),
            Err(e) => Err(CallError::Exhausted {
                attempts: 1,
                last: e.to_string(),
            }),
        }
    }
}

fn method(m: HttpMethod) -> Method {
    match m {
        HttpMethod::Get => Method::GET,
        HttpMethod::Post => Method::POST,
        HttpMethod::Put => Method::PUT,
        HttpMethod::Patch => Method::PATCH,
        HttpMethod::Delete => Method::DELETE,
    }
}

fn response(answer: Exchange, attempts: u32) -> Response {
    Response {
        status: answer.status.as_u16(),
        headers: kept_headers(&answer.headers),
        body: text(answer.body),
        attempts,
    }
}

fn kept_headers(headers: &HeaderMap) -> BTreeMap<String, String> {
    KEPT_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?;
            Some((
                (*name).to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            ))
        })
        .collect()
}

fn text(body: Bytes) -> String {
    match String::from_utf8(body.into()) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}
