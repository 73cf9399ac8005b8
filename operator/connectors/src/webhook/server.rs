//! The HTTP side: one handler for every path, the answers, the metrics.
//!
//! A request takes the current [`Routes`] when it arrives and keeps them to
//! the end, so a reload never changes the rules under a request in flight.
//! Publishing all events of a request runs concurrently; the answer is 2xx
//! only when every one was acknowledged, else 503 and the sender retries the
//! whole request (each event is deduplicated by its id).

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures_util::future::join_all;
use http_body_util::BodyExt;
use tallyman_api::v1alpha1::SignatureScheme;
use tallyman_telemetry::{GatewayOutcome, GatewayRejectLabels, GatewayRequestLabels, Metrics};
use tokio::net::TcpListener;

use super::routes::{CanonicalEvent, Route, Routes};
use super::{PublishError, Publisher};

/// How the gateway waits.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// How long one publish may wait for the broker's acknowledgement
    /// before the request is answered 503.
    pub publish_timeout: Duration,
    /// How long reading a body may take (slow senders hold a connection).
    pub body_timeout: Duration,
    /// How long a request's head may take to arrive: a client that opens
    /// connections and trickles headers would otherwise hold them forever.
    pub header_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            publish_timeout: Duration::from_secs(2),
            body_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// A refused request: the status, a short code (also the metric reason)
/// and a sentence for the sender. Answered as `{"error", "detail"}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    status: StatusCode,
    code: &'static str,
    detail: String,
    retry_after: Option<u32>,
}

impl Rejection {
    pub(crate) fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The short code, e.g. `bad_signature`; bounded, so also the
    /// `reason` label of `tallyman_gateway_rejected_total`.
    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    fn unavailable(detail: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                detail,
            )
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.code, "detail": self.detail});
        let mut response = json_response(self.status, &body);
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        response
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// What a verified request came to.
enum Answer {
    /// Every event acknowledged; `duplicates` of them were already stored.
    Accepted { ids: Vec<String>, duplicates: usize },
    /// Every event was already stored.
    Duplicate { ids: Vec<String> },
    /// No `when` held: nothing to publish, nothing to retry.
    Ignored,
}

impl Answer {
    fn into_response(self) -> Response {
        match self {
            Answer::Ignored => json_response(
                StatusCode::OK,
                &serde_json::json!({"accepted": 0, "ids": []}),
            ),
            Answer::Accepted { ids, duplicates } => {
                let mut body = serde_json::json!({"accepted": ids.len(), "ids": ids});
                if duplicates > 0 {
                    body["duplicates"] = duplicates.into();
                }
                json_response(StatusCode::ACCEPTED, &body)
            }
            Answer::Duplicate { ids } => json_response(
                StatusCode::OK,
                &serde_json::json!({"duplicate": true, "ids": ids}),
            ),
        }
    }
}

/// The webhook gateway of one namespace.
pub struct Gateway {
    routes: RwLock<Arc<Routes>>,
    publisher: Arc<dyn Publisher>,
    metrics: Arc<Metrics>,
    config: GatewayConfig,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("routes", &self.routes().paths())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(
        routes: Routes,
        publisher: Arc<dyn Publisher>,
        metrics: Arc<Metrics>,
        config: GatewayConfig,
    ) -> Arc<Gateway> {
        let gateway = Gateway {
            routes: RwLock::new(Arc::new(Routes::empty(routes.namespace()))),
            publisher,
            metrics,
            config,
        };
        gateway.reload(routes);
        Arc::new(gateway)
    }

    /// Serves `routes` from now on. Requests in flight finish with the
    /// routes they started with.
    pub fn reload(&self, routes: Routes) {
        let previous = self.routes();
        for path in routes.paths() {
            if let Some(route) = routes.get(path) {
                // Once when a Connector starts being served unsigned, not
                // on every reload.
                let was_unsigned = previous
                    .get(path)
                    .is_some_and(|r| r.scheme() == SignatureScheme::None);
                if route.scheme() == SignatureScheme::None && !was_unsigned {
                    tracing::warn!(
                        namespace = route.namespace(),
                        connector = route.connector(),
                        path,
                        "webhook signature scheme is none: anyone who can reach the gateway can send these events"
                    );
                }
                // Series exist from the start, so rate() and increase() see
                // the first event of each outcome rise from zero.
                for outcome in [
                    GatewayOutcome::Accepted,
                    GatewayOutcome::Duplicate,
                    GatewayOutcome::Rejected,
                ] {
                    let _ = self
                        .metrics
                        .gateway
                        .requests
                        .get_or_create(&request_labels(route, outcome));
                }
            }
        }
        tracing::info!(
            namespace = routes.namespace(),
            webhooks = routes.len(),
            "serving webhooks"
        );
        let routes = Arc::new(routes);
        match self.routes.write() {
            Ok(mut current) => *current = routes,
            // A panic while holding the lock cannot leave a half-written Arc.
            Err(poisoned) => *poisoned.into_inner() = routes,
        }
    }

    /// The routes served now.
    pub fn routes(&self) -> Arc<Routes> {
        match self.routes.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Every path goes to [`Gateway::handle`].
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .fallback(
                |State(gateway): State<Arc<Gateway>>, req: Request| async move {
                    gateway.handle(req).await
                },
            )
            .with_state(self.clone())
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request) -> Response {
        let Some(route) = self.routes().get(req.uri().path()).cloned() else {
            tracing::debug!(status = 404, "no webhook at this path");
            return Rejection::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no webhook is served at this path",
            )
            .into_response();
        };
        match self.serve_route(&route, req).await {
            Ok(answer) => {
                let outcome = match &answer {
                    Answer::Duplicate { .. } => GatewayOutcome::Duplicate,
                    // A payload no `when` selects was still received and
                    // handled as the Connector says.
                    Answer::Accepted { .. } | Answer::Ignored => GatewayOutcome::Accepted,
                };
                self.metrics
                    .gateway
                    .requests
                    .get_or_create(&request_labels(&route, outcome))
                    .inc();
                answer.into_response()
            }
            Err(rejection) => {
                self.metrics
                    .gateway
                    .requests
                    .get_or_create(&request_labels(&route, GatewayOutcome::Rejected))
                    .inc();
                self.metrics
                    .gateway
                    .rejected
                    .get_or_create(&GatewayRejectLabels {
                        namespace: route.labels.namespace.clone(),
                        connector: route.labels.connector.clone(),
                        reason: rejection.code(),
                    })
                    .inc();
                tracing::info!(
                    namespace = route.namespace(),
                    connector = route.connector(),
                    status = rejection.status().as_u16(),
                    reason = rejection.code(),
                    "webhook refused"
                );
                rejection.into_response()
            }
        }
    }

    async fn serve_route(&self, route: &Route, req: Request) -> Result<Answer, Rejection> {
        if req.method() != Method::POST {
            return Err(Rejection::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "webhooks are delivered with POST",
            ));
        }
        check_content_type(req.headers())?;
        let max = route.max_body_bytes();
        let declared = content_length(req.headers())?;
        if declared.is_some_and(|n| n > max) {
            return Err(too_large(max));
        }
        let (parts, body) = req.into_parts();
        let body = read_body(body, max, declared, self.config.body_timeout).await?;
        let events = route.process(&parts.headers, &body, Utc::now())?;
        drop(body);
        if events.is_empty() {
            return Ok(Answer::Ignored);
        }
        self.publish(route, &events).await
    }

    async fn publish(&self, route: &Route, events: &[CanonicalEvent]) -> Result<Answer, Rejection> {
        let timeout = self.config.publish_timeout;
        let histogram = self
            .metrics
            .gateway
            .publish_duration
            .get_or_create(&route.labels)
            .clone();
        let results = join_all(events.iter().map(|e| {
            let histogram = histogram.clone();
            async move {
                let started = Instant::now();
                let result = tokio::time::timeout(
                    timeout,
                    self.publisher
                        .publish(&e.subject, &e.msg_id, e.payload.clone()),
                )
                .await;
                if let Ok(Ok(_)) = result {
                    histogram.observe(started.elapsed().as_secs_f64());
                }
                result
            }
        }))
        .await;
        let mut duplicates = 0;
        for (event, result) in events.iter().zip(results) {
            match result {
                Ok(Ok(published)) => duplicates += usize::from(published.duplicate),
                Ok(Err(PublishError::TooLarge(e))) => {
                    tracing::warn!(
                        namespace = route.namespace(),
                        connector = route.connector(),
                        event_type = %event.event_type,
                        error = %e,
                        "event refused by the broker as too large"
                    );
                    return Err(Rejection::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "event_too_large",
                        "an event of this payload is larger than the broker accepts",
                    ));
                }
                Ok(Err(PublishError::Unavailable(e))) => {
                    tracing::warn!(
                        namespace = route.namespace(),
                        connector = route.connector(),
                        event_type = %event.event_type,
                        error = %e,
                        "publish not acknowledged"
                    );
                    return Err(Rejection::unavailable(
                        "the event store did not acknowledge; retry the same request, it is deduplicated by event id",
                    ));
                }
                Err(_) => {
                    tracing::warn!(
                        namespace = route.namespace(),
                        connector = route.connector(),
                        event_type = %event.event_type,
                        timeout_ms = timeout.as_millis() as u64,
                        "publish not acknowledged in time"
                    );
                    return Err(Rejection::unavailable(
                        "the event store did not acknowledge in time; retry the same request, it is deduplicated by event id",
                    ));
                }
            }
        }
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        tracing::debug!(
            namespace = route.namespace(),
            connector = route.connector(),
            events = ids.len(),
            duplicates,
            "webhook accepted"
        );
        if duplicates == ids.len() {
            Ok(Answer::Duplicate { ids })
        } else {
            Ok(Answer::Accepted { ids, duplicates })
        }
    }
}

fn request_labels(route: &Route, outcome: GatewayOutcome) -> GatewayRequestLabels {
    GatewayRequestLabels {
        namespace: route.labels.namespace.clone(),
        connector: route.labels.connector.clone(),
        outcome,
    }
}

/// `application/json` or any `application/…+json`, parameters ignored.
fn check_content_type(headers: &HeaderMap) -> Result<(), Rejection> {
    let refuse = || {
        Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the payload as Content-Type: application/json",
        )
    };
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(refuse)?;
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if json { Ok(()) } else { Err(refuse()) }
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Rejection> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| {
                Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "the Content-Length header is not a number",
                )
            }),
    }
}

fn too_large(max: u64) -> Rejection {
    Rejection::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the body is larger than this webhook's limit of {max} bytes"),
    )
}

/// Reads at most `max` bytes, frame by frame: the first frame beyond the
/// limit ends the read, whatever Content-Length said (or without one).
async fn read_body(
    body: Body,
    max: u64,
    declared: Option<u64>,
    timeout: Duration,
) -> Result<Vec<u8>, Rejection> {
    let capacity = declared.unwrap_or(8 * 1024).min(max).min(1 << 20);
    let mut buf = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
    let read = async {
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| {
                Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "unreadable_body",
                    "the body could not be read to its end",
                )
            })?;
            if let Ok(data) = frame.into_data() {
                if (buf.len() + data.len()) as u64 > max {
                    return Err(too_large(max));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => Ok(buf),
        Ok(Err(rejection)) => Err(rejection),
        Err(_) => Err(Rejection::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the body did not arrive within {}s", timeout.as_secs()),
        )),
    }
}

/// Serves `gateway` on `listener` until `shutdown` completes, then finishes
/// the requests in flight.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_router(
        listener,
        gateway.router(),
        gateway.config.header_timeout,
        shutdown,
    )
    .await
}

/// Serves `router` over HTTP/1.1 with keep-alive until `shutdown`
/// completes, then finishes the requests in flight. A request head that
/// has not arrived within `header_timeout` closes its connection (a client
/// trickling headers cannot hold it). Handlers can extract the peer as
/// `ConnectInfo<SocketAddr>`.
pub async fn serve_router(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::extract::ConnectInfo;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: keep serving the
                // connections there are, try again shortly.
                Err(e) => {
                    tracing::warn!(error = %e, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = router.clone().layer(axum::Extension(ConnectInfo(peer)));
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection closed with an error");
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn json_media_types_pass_and_others_are_refused() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/cloudevents+json",
            "application/vnd.shop.v2+json;charset=UTF-8",
        ] {
            assert!(check_content_type(&ct(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "text/json+xml",
            "application/jsonp",
            "",
        ] {
            assert_eq!(
                check_content_type(&ct(bad)).unwrap_err().status(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{bad}"
            );
        }
        assert!(check_content_type(&HeaderMap::new()).is_err());
    }
}
