//! `Connector`: one external system, outbound (REST) and inbound (webhooks).

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    Conditions, Duration, EVENT_TYPE_PATTERN, Expression, SecretKeyRef, conditions_schema,
};

/// One external system: how tallyman calls it (`rest`) and how it calls
/// tallyman (`webhook`). At least one of the two is required.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "tallyman.dev",
    version = "v1alpha1",
    kind = "Connector",
    namespaced,
    status = "ConnectorStatus",
    shortname = "conn",
    category = "tallyman",
    doc = "A Connector describes one external system (ERP, WMS, TMS, eCommerce, payments, ...): the REST actions tallyman may call and the webhooks it accepts.",
    printcolumn(name = "System", type_ = "string", json_path = ".spec.system"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reachable",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Reachable\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.rest) || has(self.webhook)").message("a Connector needs rest, webhook or both"))]
#[serde(rename_all = "camelCase")]
pub struct ConnectorSpec {
    /// The kind of system behind this Connector; used for labels, metrics and
    /// dashboards.
    pub system: System,
    /// Outbound REST API: the actions `call` steps may invoke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rest: Option<RestSpec>,
    /// Inbound webhooks, served by the gateway at
    /// `/webhooks/{namespace}/{connector}{path}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
}

/// The kind of system a Connector stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Erp,
    Wms,
    Tms,
    Ecommerce,
    Accounting,
    Payments,
    Crm,
    Other,
}

/// The outbound half of a Connector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestSpec {
    /// Base URL every action path is appended to; `http` or `https`.
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#\\\\s]+([/?#].*)?$')").message("must be an http:// or https:// URL with a host"))]
    #[schemars(length(min = 1, max = 2048))]
    pub base_url: String,
    /// How requests authenticate. Omit for systems without authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RestAuth>,
    /// Timeout of one attempt, response body included.
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
    /// Client-side token-bucket limit shared by every call of one process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Retries on connect errors, 5xx and 429 (honouring `Retry-After`);
    /// other 4xx answers are never retried.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Extra trust for servers with a private CA, added to the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Reachability probe behind the `Reachable` condition.
    #[serde(default)]
    pub probe: ProbeSpec,
    /// The operations `call` steps may invoke, by name.
    #[x_kube(validation = Rule::new("self.size() >= 1").message("declare at least one action"))]
    pub actions: BTreeMap<String, Action>,
}

fn default_timeout() -> Duration {
    Duration::lit("10s")
}

/// Exactly one authentication scheme.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.bearer) ? 1 : 0) + (has(self.basic) ? 1 : 0) + (has(self.apiKey) ? 1 : 0) + (has(self.oauth2ClientCredentials) ? 1 : 0) == 1").message("set exactly one of bearer, basic, apiKey, oauth2ClientCredentials"))]
pub struct RestAuth {
    /// `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer: Option<BearerAuth>,
    /// `Authorization: Basic <base64(username:password)>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<BasicAuth>,
    /// A static key in a header of your choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeyAuth>,
    /// OAuth 2.0 client-credentials grant; tokens are cached and refreshed
    /// before they expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2_client_credentials: Option<OAuth2ClientCredentials>,
}

/// Bearer-token authentication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BearerAuth {
    /// The Secret key holding the token.
    pub secret_ref: SecretKeyRef,
}

/// HTTP basic authentication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuth {
    /// The Secret key holding the user name.
    pub username: SecretKeyRef,
    /// The Secret key holding the password.
    pub password: SecretKeyRef,
}

/// API-key header authentication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyAuth {
    /// The header carrying the key, e.g. `X-API-Key`.
    #[schemars(length(min = 1, max = 256))]
    pub header: String,
    /// The Secret key holding the API key.
    pub secret_ref: SecretKeyRef,
}

/// OAuth 2.0 client-credentials authentication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2ClientCredentials {
    /// The token endpoint.
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#\\\\s]+([/?#].*)?$')").message("must be an http:// or https:// URL with a host"))]
    #[schemars(length(min = 1, max = 2048))]
    pub token_url: String,
    /// The Secret key holding the client id.
    pub client_id: SecretKeyRef,
    /// The Secret key holding the client secret.
    pub client_secret: SecretKeyRef,
    /// Scopes to request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Audience to request, for providers that need one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

/// A token bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained requests per second.
    #[schemars(range(min = 1, max = 100000))]
    pub requests_per_second: u32,
    /// Requests allowed in a burst; defaults to `requestsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub burst: Option<u32>,
}

/// Retries with exponential backoff and full jitter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts in all, the first included; `1` disables retries.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubled for each further attempt.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff: Duration,
    /// Upper bound of one backoff.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

fn default_max_attempts() -> u32 {
    5
}
fn default_initial_backoff() -> Duration {
    Duration::lit("200ms")
}
fn default_max_backoff() -> Duration {
    Duration::lit("30s")
}

/// TLS settings for the outbound connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A PEM bundle of extra CA certificates, trusted besides the system roots.
    pub ca_secret_ref: SecretKeyRef,
}

/// Reachability probe settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeSpec {
    /// Path (relative to `baseUrl`) probed with GET; any answer below 500
    /// counts as reachable.
    #[serde(default = "default_probe_path")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("must start with /"))]
    pub path: String,
    /// How often to probe.
    #[serde(default = "default_probe_interval")]
    pub interval: Duration,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        Self {
            path: default_probe_path(),
            interval: default_probe_interval(),
        }
    }
}

fn default_probe_path() -> String {
    "/".into()
}
fn default_probe_interval() -> Duration {
    Duration::lit("1m")
}

/// One REST operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Action {
    /// HTTP method.
    pub method: HttpMethod,
    /// Path relative to `baseUrl`, with `{param}` placeholders filled from the
    /// `call` step's `params` (percent-encoded); may carry a query string.
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("must start with /"))]
    #[schemars(length(min = 1, max = 2048))]
    pub path: String,
    /// The header that carries the call's idempotency key. Without it, calls
    /// that change state should use `lookup` on the call step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
}

/// HTTP methods an action may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

/// Where an action carries its idempotency key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Idempotency {
    /// Header name, e.g. `Idempotency-Key`.
    #[schemars(length(min = 1, max = 256))]
    pub header: String,
}

/// The inbound half of a Connector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// Path below `/webhooks/{namespace}/{connector}`; unique per namespace.
    #[x_kube(validation = Rule::new("self.matches('^/[A-Za-z0-9._~/-]*$')").message("must start with / and contain only letters, digits and . _ ~ / -"))]
    #[schemars(length(min = 1, max = 256))]
    pub path: String,
    /// How the sender proves the request is theirs.
    pub signature: Signature,
    /// Requests with a larger body are refused with 413 before being read whole.
    #[serde(default = "default_max_body_bytes")]
    #[schemars(range(min = 1, max = 16777216))]
    pub max_body_bytes: u64,
    /// How the payload becomes canonical events; every entry whose `when`
    /// holds produces one event.
    #[schemars(length(min = 1, max = 32))]
    pub events: Vec<WebhookEvent>,
}

fn default_max_body_bytes() -> u64 {
    1024 * 1024
}

/// Webhook signature verification.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.scheme == 'none' || has(self.secretRef)").message("secretRef is required unless scheme is none"))]
#[x_kube(validation = Rule::new("self.scheme == 'none' || has(self.header)").message("header is required unless scheme is none"))]
#[x_kube(validation = Rule::new("self.scheme != 'hmac-sha256-timestamped' || has(self.timestampHeader)").message("timestampHeader is required for scheme hmac-sha256-timestamped"))]
pub struct Signature {
    /// `hmac-sha256`: the header is the lowercase hex HMAC-SHA256 of the raw
    /// body, optionally prefixed `sha256=`. `hmac-sha256-timestamped`: the
    /// same over `"<timestamp>.<raw body>"`, with the timestamp (unix seconds)
    /// in `timestampHeader` and within `tolerance` of now. `token`: the header
    /// equals the secret. `none`: no check (reported as a warning).
    pub scheme: SignatureScheme,
    /// The header carrying the signature or token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The Secret key holding the shared secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// The header carrying the timestamp, for `hmac-sha256-timestamped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_header: Option<String>,
    /// Accepted clock difference for `hmac-sha256-timestamped`; older
    /// requests are refused as replays.
    #[serde(default = "default_tolerance")]
    pub tolerance: Duration,
}

fn default_tolerance() -> Duration {
    Duration::lit("5m")
}

/// Signature schemes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureScheme {
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    #[serde(rename = "hmac-sha256-timestamped")]
    HmacSha256Timestamped,
    Token,
    None,
}

/// One canonical event a webhook payload may produce.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEvent {
    /// Event type, e.g. `shipment.confirmed`; published to
    /// `tallyman.<namespace>.events.<type>`.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 128), regex(pattern = EVENT_TYPE_PATTERN))]
    pub type_: String,
    /// CEL (bool) over `payload` and `headers`: whether this payload produces
    /// this event. Omitted: always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Expression>,
    /// CEL (string) over `payload` and `headers`: the event's dedup identity.
    /// Omitted: a hash of the raw body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Expression>,
    /// CEL over `payload` and `headers` producing the event's `data`.
    /// Omitted: the payload itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Expression>,
}

/// Observed state of a Connector.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorStatus {
    /// `Ready` and `Reachable`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Conditions,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the gateway serves this Connector's webhook inside the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}
