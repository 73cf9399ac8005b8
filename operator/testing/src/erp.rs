//! Simulated external systems for tests, benchmarks and demos: an in-process
//! ERP (plus the payments platform and the ERP ledger of the examples) over
//! real HTTP on a loopback port, and the sending side of the webhooks that
//! warehouse and shop systems post to the gateway.
//!
//! ```text
//! GET  /orders/{orderId}                         seeded orders (seed_order)
//! GET  /sales-orders/{orderId}                   the same orders (returns-to-credit)
//! GET  /purchase-orders/{poNumber}               seeded purchase orders
//! POST /invoices                                 Idempotency-Key       → invoiceId INV-000001…
//! GET  /invoices                                 all invoices (array)
//! GET  /invoices?externalRef={ref}               the first invoice with that externalRef, else 404
//! GET  /invoices/{invoiceId}
//! POST /credit-notes                             no idempotency keys   → number CN-000001…
//! GET  /credit-notes/{number}
//! GET  /credit-notes/by-reference/{reference}    by externalReference, else 404
//! POST /warehouses/{warehouse}/stock-adjustments X-Idempotency-Key     → documentNumber SA-000001…
//! POST /vendors/{vendorId}/payment-approvals     Idempotency-Key       → approvalId PA-000001…
//! POST /oauth2/token                             client credentials (enable_oauth2)
//! GET  /health, /ping, /status                   the examples' Connector probes: 200
//! ```
//!
//! Money never passes through a float: seeded prices are written as JSON
//! numbers with exactly the seeded digits, and a created document's response
//! repeats the request body's fields with their original JSON text.
//!
//! Every request passes one gate, in this order: it is counted
//! ([`SimErp::requests`]) and logged ([`SimErp::recent_requests`]); it
//! waits for the longest matching [`SimErp::delay`]; the first queued fault
//! whose prefix matches the path is consumed (faults of one prefix run in
//! the order they were queued); the auth check answers 401; the route
//! answers. Path prefixes are plain string prefixes of the request path,
//! without the query.
//!
//! The sim runs on the tokio runtime that called [`SimErp::start`] and stops
//! when the [`SimErp`] is dropped. Its control methods are synchronous and
//! never block on a request in flight.

use std::collections::{HashMap, VecDeque};
use std::error::Error;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use sha2::Sha256;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// The header a replayed idempotent request is answered with (value `true`).
pub const REPLAYED_HEADER: &str = "Idempotency-Replayed";
/// How many requests [`SimErp::recent_requests`] keeps.
pub const REQUEST_LOG_LIMIT: usize = 1024;
/// The largest request body the sim reads.
const BODY_LIMIT: usize = 16 * 1024 * 1024;

// ---------------------------------------------------------------------------
// Seeded data
// ---------------------------------------------------------------------------

/// A customer order, served at `GET /orders/{orderId}` and
/// `GET /sales-orders/{orderId}` as
/// `{"orderId", "customerId", "currency", "lines": [{"sku", "qty", "unitPrice"}]}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    pub currency: String,
    pub lines: Vec<OrderLine>,
}

/// A purchase order, served at `GET /purchase-orders/{poNumber}` as
/// `{"poNumber", "vendorId", "currency", "lines": [{"sku", "qty", "unitPrice"}]}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PurchaseOrder {
    pub po_number: String,
    pub vendor_id: String,
    pub currency: String,
    pub lines: Vec<OrderLine>,
}

/// One line of an [`Order`] or [`PurchaseOrder`].
///
/// `unit_price` is decimal text (`"19.90"`, `"0.1204"`); it is served as a
/// JSON number with exactly these digits. From JSON (the `sim-erp --orders`
/// file) `unitPrice` may be a string or a number; a number keeps its text.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderLine {
    pub sku: String,
    pub qty: i64,
    #[serde(deserialize_with = "decimal_text")]
    pub unit_price: String,
}

impl OrderLine {
    pub fn new(sku: impl Into<String>, qty: i64, unit_price: impl Into<String>) -> OrderLine {
        OrderLine {
            sku: sku.into(),
            qty,
            unit_price: unit_price.into(),
        }
    }
}

/// What a `sim-erp --orders FILE` holds: either a plain array of orders, or
/// `{"orders": [...], "purchaseOrders": [...]}` (both optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seed {
    pub orders: Vec<Order>,
    pub purchase_orders: Vec<PurchaseOrder>,
}

impl Seed {
    /// Parses a seed file's text (see [`Seed`]) and checks every price.
    pub fn from_json(text: &str) -> Result<Seed, String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        struct File {
            #[serde(default)]
            orders: Vec<Order>,
            #[serde(default)]
            purchase_orders: Vec<PurchaseOrder>,
        }
        let seed = if text.trim_start().starts_with('[') {
            Seed {
                orders: serde_json::from_str(text).map_err(|e| e.to_string())?,
                purchase_orders: Vec::new(),
            }
        } else {
            let file: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
            Seed {
                orders: file.orders,
                purchase_orders: file.purchase_orders,
            }
        };
        for line in seed
            .orders
            .iter()
            .flat_map(|o| &o.lines)
            .chain(seed.purchase_orders.iter().flat_map(|p| &p.lines))
        {
            check_line(line)?;
        }
        Ok(seed)
    }
}

fn decimal_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let raw = <Box<RawValue>>::deserialize(deserializer)?;
    let text = raw.get();
    let digits = if text.starts_with('"') {
        serde_json::from_str::<String>(text).map_err(de::Error::custom)?
    } else {
        text.to_owned()
    };
    if is_json_number(&digits) {
        Ok(digits)
    } else {
        Err(de::Error::custom(format!(
            "unitPrice {text} is not a decimal number"
        )))
    }
}

fn check_line(line: &OrderLine) -> Result<(), String> {
    if is_json_number(&line.unit_price) {
        Ok(())
    } else {
        Err(format!(
            "unitPrice {:?} of SKU {:?} is not a decimal number",
            line.unit_price, line.sku
        ))
    }
}

/// JSON's number grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn is_json_number(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut i = usize::from(b.first() == Some(&b'-'));
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(c) if c.is_ascii_digit() => i = digits(i),
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        let end = digits(i + 1);
        if end == i + 1 {
            return false;
        }
        i = end;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let end = digits(i);
        if end == i {
            return false;
        }
        i = end;
    }
    i == b.len()
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

fn lines_json(lines: &[OrderLine]) -> String {
    let lines: Vec<String> = lines
        .iter()
        .map(|l| {
            format!(
                r#"{{"sku":{},"qty":{},"unitPrice":{}}}"#,
                json_string(&l.sku),
                l.qty,
                l.unit_price
            )
        })
        .collect();
    format!("[{}]", lines.join(","))
}

fn order_json(o: &Order) -> String {
    format!(
        r#"{{"orderId":{},"customerId":{},"currency":{},"lines":{}}}"#,
        json_string(&o.order_id),
        json_string(&o.customer_id),
        json_string(&o.currency),
        lines_json(&o.lines)
    )
}

fn purchase_order_json(p: &PurchaseOrder) -> String {
    format!(
        r#"{{"poNumber":{},"vendorId":{},"currency":{},"lines":{}}}"#,
        json_string(&p.po_number),
        json_string(&p.vendor_id),
        json_string(&p.currency),
        lines_json(&p.lines)
    )
}

// ---------------------------------------------------------------------------
// Created documents
// ---------------------------------------------------------------------------

/// The kinds of document the sim creates on `POST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// `POST /invoices`, `Idempotency-Key`, id field `invoiceId` (`INV-000001`).
    Invoice,
    /// `POST /credit-notes`, no idempotency keys (like the returns example's
    /// ERP: callers look up `by-reference` first), id field `number` (`CN-000001`).
    CreditNote,
    /// `POST /warehouses/{warehouse}/stock-adjustments`, `X-Idempotency-Key`,
    /// id field `documentNumber` (`SA-000001`).
    StockAdjustment,
    /// `POST /vendors/{vendorId}/payment-approvals`, `Idempotency-Key`, id
    /// field `approvalId` (`PA-000001`), plus `status` and `scheduledFor`.
    PaymentApproval,
}

impl Resource {
    /// The header whose value makes a create idempotent, if this kind has one.
    pub fn idempotency_header(self) -> Option<&'static str> {
        match self {
            Resource::Invoice | Resource::PaymentApproval => Some("Idempotency-Key"),
            Resource::StockAdjustment => Some("X-Idempotency-Key"),
            Resource::CreditNote => None,
        }
    }

    /// The response field carrying the generated id.
    pub fn id_field(self) -> &'static str {
        match self {
            Resource::Invoice => "invoiceId",
            Resource::CreditNote => "number",
            Resource::StockAdjustment => "documentNumber",
            Resource::PaymentApproval => "approvalId",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Resource::Invoice => "INV",
            Resource::CreditNote => "CN",
            Resource::StockAdjustment => "SA",
            Resource::PaymentApproval => "PA",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One created document: an invoice, credit note, stock adjustment or
/// payment approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub resource: Resource,
    /// The generated id (`INV-000001`, …).
    pub id: String,
    /// The idempotency key it was created with, if any.
    pub idempotency_key: Option<String>,
    /// The request path it was created at.
    pub path: String,
    /// The request body, exactly as received.
    pub body: String,
    /// The JSON the create answered (and every replay answers).
    pub response: String,
    fields: Vec<(String, String)>,
}

impl Document {
    /// The JSON text of a top-level field of the request body, exactly as
    /// sent: `field("netAmount") == Some("79.60")`, `field("orderId") ==
    /// Some("\"4711\"")`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A top-level string field of the request body, unquoted.
    pub fn str_field(&self, name: &str) -> Option<String> {
        serde_json::from_str(self.field(name)?).ok()
    }
}

/// A JSON object as its fields' raw JSON text, in order.
struct RawObject(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = RawObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject, A::Error> {
                let mut fields = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    fields.push((k, v));
                }
                Ok(RawObject(fields))
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

#[derive(Default)]
struct Store {
    docs: Vec<Document>,
    by_key: HashMap<String, usize>,
}

// ---------------------------------------------------------------------------
// Faults, auth, the request log
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum FaultKind {
    /// Answer with this status without reaching the route.
    Fail(StatusCode),
    /// Let the route do its work, then answer with this status instead.
    FailAfter(StatusCode),
    /// 429 with `Retry-After: secs`.
    RateLimit(u64),
}

struct Fault {
    prefix: String,
    /// Only requests of this method (any method when `None`).
    method: Option<String>,
    remaining: usize,
    kind: FaultKind,
}

enum Auth {
    /// The exact `Authorization` header value required.
    Authorization(String),
    ApiKey {
        header: String,
        value: String,
    },
}

struct OAuth2 {
    client_id: String,
    client_secret: String,
    access_token: String,
}

/// One request as the sim received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Header names are lowercase.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// What the sim answered.
    pub status: u16,
}

impl RecordedRequest {
    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[derive(Default)]
struct SimState {
    orders: HashMap<String, Order>,
    purchase_orders: HashMap<String, PurchaseOrder>,
    stores: [Store; 4],
    duplicates_prevented: usize,
    idempotency_mismatches: usize,
    faults: Vec<Fault>,
    delays: Vec<(String, Duration)>,
    auth: Option<Auth>,
    oauth2: Option<OAuth2>,
    requests: HashMap<String, usize>,
    log: VecDeque<RecordedRequest>,
}

type Shared = Arc<Mutex<SimState>>;

fn lock(shared: &Mutex<SimState>) -> MutexGuard<'_, SimState> {
    // A panicking test thread must not take every later assertion with it.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// SimErp
// ---------------------------------------------------------------------------

/// The running simulated ERP. Stops serving when dropped.
pub struct SimErp {
    addr: SocketAddr,
    state: Shared,
    _shutdown: oneshot::Sender<()>,
}

impl fmt::Debug for SimErp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimErp").field("addr", &self.addr).finish()
    }
}

impl SimErp {
    /// Starts the sim on a free loopback port (`127.0.0.1:0`).
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start() -> SimErp {
        SimErp::start_on("127.0.0.1:0".parse().expect("a socket address"))
            .await
            .expect("binding a loopback port for the simulated ERP")
    }

    /// Starts the sim on `addr` (port 0 picks a free one).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<SimErp> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state: Shared = Arc::default();
        let router = router(state.clone());
        let (shutdown, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                // Resolves when the SimErp (and so the sender) is dropped.
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                eprintln!("simulated ERP stopped: {e}");
            }
        });
        Ok(SimErp {
            addr,
            state,
            _shutdown: shutdown,
        })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash: a Connector's
    /// `rest.baseUrl`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `base_url()` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    fn state(&self) -> MutexGuard<'_, SimState> {
        lock(&self.state)
    }

    // --- seeding ----------------------------------------------------------

    /// Adds or replaces an order (by `order_id`).
    ///
    /// # Panics
    /// When a `unit_price` is not decimal text.
    pub fn seed_order(&self, order: Order) {
        for line in &order.lines {
            check_line(line).unwrap_or_else(|e| panic!("seed_order {}: {e}", order.order_id));
        }
        self.state().orders.insert(order.order_id.clone(), order);
    }

    /// Adds or replaces a purchase order (by `po_number`).
    ///
    /// # Panics
    /// When a `unit_price` is not decimal text.
    pub fn seed_purchase_order(&self, po: PurchaseOrder) {
        for line in &po.lines {
            check_line(line)
                .unwrap_or_else(|e| panic!("seed_purchase_order {}: {e}", po.po_number));
        }
        self.state()
            .purchase_orders
            .insert(po.po_number.clone(), po);
    }

    /// Seeds everything in `seed`.
    pub fn seed(&self, seed: Seed) {
        for order in seed.orders {
            self.seed_order(order);
        }
        for po in seed.purchase_orders {
            self.seed_purchase_order(po);
        }
    }

    // --- inspection -------------------------------------------------------

    /// Every invoice created, in order.
    pub fn invoices(&self) -> Vec<Document> {
        self.documents(Resource::Invoice)
    }

    pub fn invoice_count(&self) -> usize {
        self.state().stores[Resource::Invoice.index()].docs.len()
    }

    /// Every credit note created, in order.
    pub fn credit_notes(&self) -> Vec<Document> {
        self.documents(Resource::CreditNote)
    }

    /// Every stock-adjustment posting created, in order.
    pub fn stock_adjustments(&self) -> Vec<Document> {
        self.documents(Resource::StockAdjustment)
    }

    /// Every payment approval created, in order.
    pub fn payment_approvals(&self) -> Vec<Document> {
        self.documents(Resource::PaymentApproval)
    }

    /// Every document of one kind created, in order.
    pub fn documents(&self, resource: Resource) -> Vec<Document> {
        self.state().stores[resource.index()].docs.clone()
    }

    /// Creates answered from an earlier request with the same idempotency
    /// key instead of creating a second document, over all kinds.
    pub fn duplicates_prevented(&self) -> usize {
        self.state().duplicates_prevented
    }

    /// Of those replays, how many came with a body that differs (byte for
    /// byte) from the first request's: a caller that reuses a key for a
    /// different document. They are still answered with the first document.
    pub fn idempotency_mismatches(&self) -> usize {
        self.state().idempotency_mismatches
    }

    /// Requests received whose path starts with `path_prefix` (`"/"` for
    /// all), whatever they were answered with.
    pub fn requests(&self, path_prefix: &str) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|(path, _)| path.starts_with(path_prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// The last [`REQUEST_LOG_LIMIT`] requests, oldest first.
    pub fn recent_requests(&self) -> Vec<RecordedRequest> {
        self.state().log.iter().cloned().collect()
    }

    /// Zeroes the request counters and empties the request log.
    pub fn reset_requests(&self) {
        let mut state = self.state();
        state.requests.clear();
        state.log.clear();
    }

    // --- failure injection ------------------------------------------------

    /// The next `n` requests under `path_prefix` are answered with `status`
    /// (e.g. 503) without reaching the route: nothing is created.
    pub fn fail_next(&self, path_prefix: &str, n: usize, status: u16) {
        self.push_fault(path_prefix, n, FaultKind::Fail(status_code(status)));
    }

    /// The next `n` requests under `path_prefix` do reach the route (an
    /// invoice is created, a replay is counted) but are answered with
    /// `status`: the response lost after the commit, the case idempotency
    /// keys exist for.
    pub fn fail_next_after_commit(&self, path_prefix: &str, n: usize, status: u16) {
        self.push_fault(path_prefix, n, FaultKind::FailAfter(status_code(status)));
    }

    /// The next `n` requests under `path_prefix` are answered 429 with
    /// `Retry-After: retry_after_secs`.
    pub fn rate_limit_next(&self, path_prefix: &str, n: usize, retry_after_secs: u64) {
        self.push_fault(path_prefix, n, FaultKind::RateLimit(retry_after_secs));
    }

    /// [`SimErp::fail_next`] for requests of one method only (e.g. the
    /// `POST` under a prefix that also serves `GET` lookups); requests of
    /// other methods pass the fault by.
    pub fn fail_next_on(&self, method: &str, path_prefix: &str, n: usize, status: u16) {
        self.push_method_fault(method, path_prefix, n, FaultKind::Fail(status_code(status)));
    }

    /// [`SimErp::fail_next_after_commit`] for requests of one method only:
    /// `fail_next_after_commit_on("POST", "/credit-notes", 1, 503)` books the
    /// credit note and loses the answer, while the `GET
    /// /credit-notes/by-reference/…` lookups around it are answered as usual.
    pub fn fail_next_after_commit_on(
        &self,
        method: &str,
        path_prefix: &str,
        n: usize,
        status: u16,
    ) {
        self.push_method_fault(
            method,
            path_prefix,
            n,
            FaultKind::FailAfter(status_code(status)),
        );
    }

    fn push_fault(&self, prefix: &str, n: usize, kind: FaultKind) {
        if n > 0 {
            self.state().faults.push(Fault {
                prefix: prefix.to_owned(),
                method: None,
                remaining: n,
                kind,
            });
        }
    }

    fn push_method_fault(&self, method: &str, prefix: &str, n: usize, kind: FaultKind) {
        if n > 0 {
            self.state().faults.push(Fault {
                prefix: prefix.to_owned(),
                method: Some(method.to_ascii_uppercase()),
                remaining: n,
                kind,
            });
        }
    }

    /// Every request under `path_prefix` waits `delay` before it is
    /// answered (the longest matching prefix counts); `Duration::ZERO`
    /// removes the delay.
    pub fn delay(&self, path_prefix: &str, delay: Duration) {
        let mut state = self.state();
        state.delays.retain(|(p, _)| p != path_prefix);
        if !delay.is_zero() {
            state.delays.push((path_prefix.to_owned(), delay));
        }
    }

    /// Drops every queued fault and delay (not the auth settings).
    pub fn reset_faults(&self) {
        let mut state = self.state();
        state.faults.clear();
        state.delays.clear();
    }

    // --- auth -------------------------------------------------------------

    /// From now on every request needs `Authorization: Bearer <token>`, else 401.
    pub fn require_bearer(&self, token: &str) {
        self.state().auth = Some(Auth::Authorization(format!("Bearer {token}")));
    }

    /// From now on every request needs HTTP basic auth with these
    /// credentials, else 401.
    pub fn require_basic(&self, username: &str, password: &str) {
        let credentials = BASE64.encode(format!("{username}:{password}"));
        self.state().auth = Some(Auth::Authorization(format!("Basic {credentials}")));
    }

    /// From now on every request needs `header: value`, else 401.
    pub fn require_api_key(&self, header: &str, value: &str) {
        self.state().auth = Some(Auth::ApiKey {
            header: header.to_owned(),
            value: value.to_owned(),
        });
    }

    /// `POST /oauth2/token` (OAuth 2.0 client credentials; client
    /// authentication by HTTP basic or form fields) issues `access_token`,
    /// and every other request needs it as bearer token from now on.
    pub fn enable_oauth2(&self, client_id: &str, client_secret: &str, access_token: &str) {
        self.require_bearer(access_token);
        self.state().oauth2 = Some(OAuth2 {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            access_token: access_token.to_owned(),
        });
    }

    /// No auth check any more (and no token endpoint).
    pub fn clear_auth(&self) {
        let mut state = self.state();
        state.auth = None;
        state.oauth2 = None;
    }
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or_else(|_| panic!("{status} is not an HTTP status"))
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

fn router(state: Shared) -> Router {
    Router::new()
        .route("/orders/{id}", get(get_order))
        .route("/sales-orders/{id}", get(get_order))
        .route("/purchase-orders/{id}", get(get_purchase_order))
        .route("/invoices", post(create_invoice).get(list_invoices))
        .route("/invoices/{id}", get(get_invoice))
        .route("/credit-notes", post(create_credit_note))
        .route("/credit-notes/{id}", get(get_credit_note))
        .route(
            "/credit-notes/by-reference/{reference}",
            get(find_credit_note),
        )
        .route(
            "/warehouses/{warehouse}/stock-adjustments",
            post(create_stock_adjustment),
        )
        .route(
            "/vendors/{vendor}/payment-approvals",
            post(create_payment_approval),
        )
        .route("/oauth2/token", post(oauth2_token))
        .route("/health", get(probe))
        .route("/ping", get(probe))
        .route("/status", get(probe))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(status: StatusCode, message: &str) -> Response {
    json_response(
        status,
        format!(
            r#"{{"error":{},"status":{}}}"#,
            json_string(message),
            status.as_u16()
        ),
    )
}

/// Counting, logging, delays, faults and auth, in that order.
async fn gate(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(body) => body,
        Err(_) => return error_response(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    let path = parts.uri.path().to_owned();
    let (delay, fault, authorized) = {
        let mut s = lock(&state);
        *s.requests.entry(path.clone()).or_default() += 1;
        let delay = s
            .delays
            .iter()
            .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, d)| *d);
        let fault = s
            .faults
            .iter_mut()
            .find(|f| {
                f.remaining > 0
                    && path.starts_with(f.prefix.as_str())
                    && f.method
                        .as_deref()
                        .is_none_or(|m| m.eq_ignore_ascii_case(parts.method.as_str()))
            })
            .map(|f| {
                f.remaining -= 1;
                f.kind
            });
        s.faults.retain(|f| f.remaining > 0);
        let authorized = path == "/oauth2/token"
            || match &s.auth {
                None => true,
                Some(Auth::Authorization(expected)) => {
                    parts
                        .headers
                        .get(header::AUTHORIZATION)
                        .map(|v| v.as_bytes())
                        == Some(expected.as_bytes())
                }
                Some(Auth::ApiKey { header, value }) => {
                    parts.headers.get(header.as_str()).map(|v| v.as_bytes())
                        == Some(value.as_bytes())
                }
            };
        (delay, fault, authorized)
    };
    let record = RecordedRequest {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
        status: 0,
    };

    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let response = match fault {
        Some(FaultKind::Fail(status)) => error_response(status, "injected fault"),
        Some(FaultKind::RateLimit(secs)) => {
            let mut r = error_response(StatusCode::TOO_MANY_REQUESTS, "rate limited");
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            r
        }
        _ if !authorized => {
            let mut r = error_response(StatusCode::UNAUTHORIZED, "unauthorized");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="sim-erp""#),
            );
            r
        }
        _ => {
            let response = next.run(Request::from_parts(parts, Body::from(body))).await;
            match fault {
                Some(FaultKind::FailAfter(status)) => {
                    error_response(status, "injected fault after commit")
                }
                _ => response,
            }
        }
    };

    let mut s = lock(&state);
    if s.log.len() >= REQUEST_LOG_LIMIT {
        s.log.pop_front();
    }
    s.log.push_back(RecordedRequest {
        status: response.status().as_u16(),
        ..record
    });
    response
}

async fn not_found(request: Request) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("no route for {}", request.uri().path()),
    )
}

async fn probe() -> Response {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#.to_owned())
}

async fn get_order(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    match lock(&state).orders.get(&id) {
        Some(order) => json_response(StatusCode::OK, order_json(order)),
        None => error_response(StatusCode::NOT_FOUND, &format!("no order {id}")),
    }
}

async fn get_purchase_order(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    match lock(&state).purchase_orders.get(&id) {
        Some(po) => json_response(StatusCode::OK, purchase_order_json(po)),
        None => error_response(StatusCode::NOT_FOUND, &format!("no purchase order {id}")),
    }
}

async fn create_invoice(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    create(
        &state,
        Resource::Invoice,
        "/invoices",
        Vec::new(),
        &headers,
        &body,
    )
}

async fn create_credit_note(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    create(
        &state,
        Resource::CreditNote,
        "/credit-notes",
        Vec::new(),
        &headers,
        &body,
    )
}

async fn create_stock_adjustment(
    State(state): State<Shared>,
    Path(warehouse): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/warehouses/{warehouse}/stock-adjustments");
    let extra = vec![("warehouse", json_string(&warehouse))];
    create(
        &state,
        Resource::StockAdjustment,
        &path,
        extra,
        &headers,
        &body,
    )
}

async fn create_payment_approval(
    State(state): State<Shared>,
    Path(vendor): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/vendors/{vendor}/payment-approvals");
    let extra = vec![
        ("vendorId", json_string(&vendor)),
        ("status", json_string("APPROVED")),
    ];
    create(
        &state,
        Resource::PaymentApproval,
        &path,
        extra,
        &headers,
        &body,
    )
}

/// Creates (201) or, for a known idempotency key, replays (200 with
/// `Idempotency-Replayed: true`) a document. The response is the generated
/// fields followed by the request body's other fields, as sent.
fn create(
    state: &Mutex<SimState>,
    resource: Resource,
    path: &str,
    extra: Vec<(&'static str, String)>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let object = match serde_json::from_slice::<RawObject>(body) {
        Ok(object) => object,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("the body is not a JSON object: {e}"),
            );
        }
    };
    let key = match resource.idempotency_header() {
        None => None,
        Some(name) => match headers.get(name).map(|v| v.to_str()) {
            None => None,
            Some(Ok(key)) if !key.is_empty() => Some(key.to_owned()),
            Some(_) => {
                return error_response(StatusCode::BAD_REQUEST, &format!("invalid {name}"));
            }
        },
    };

    let mut s = lock(state);
    let s = &mut *s;
    let store = &mut s.stores[resource.index()];
    if let Some(index) = key.as_ref().and_then(|k| store.by_key.get(k)) {
        let doc = &store.docs[*index];
        let mismatch = doc.body.as_bytes() != body;
        let mut response = json_response(StatusCode::OK, doc.response.clone());
        s.duplicates_prevented += 1;
        s.idempotency_mismatches += usize::from(mismatch);
        response
            .headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
        return response;
    }

    let id = format!("{}-{:06}", resource.id_prefix(), store.docs.len() + 1);
    let mut generated = vec![(resource.id_field(), json_string(&id))];
    generated.extend(extra);
    if resource == Resource::PaymentApproval {
        let due = object
            .0
            .iter()
            .find(|(k, _)| k == "dueAt")
            .map_or("null".to_owned(), |(_, v)| v.get().to_owned());
        generated.push(("scheduledFor", due));
    }
    let mut fields: Vec<String> = generated
        .iter()
        .map(|(k, v)| format!("{}:{v}", json_string(k)))
        .collect();
    fields.extend(
        object
            .0
            .iter()
            .filter(|(k, _)| !generated.iter().any(|(g, _)| g == k))
            .map(|(k, v)| format!("{}:{}", json_string(k), v.get())),
    );
    let response_body = format!("{{{}}}", fields.join(","));
    let location = match resource {
        Resource::Invoice | Resource::CreditNote => Some(format!("{path}/{id}")),
        Resource::StockAdjustment | Resource::PaymentApproval => None,
    };

    let index = store.docs.len();
    store.docs.push(Document {
        resource,
        id,
        idempotency_key: key.clone(),
        path: path.to_owned(),
        body: String::from_utf8_lossy(body).into_owned(),
        response: response_body.clone(),
        fields: object
            .0
            .into_iter()
            .map(|(k, v)| (k, v.get().to_owned()))
            .collect(),
    });
    if let Some(key) = key {
        store.by_key.insert(key, index);
    }
    let mut response = json_response(StatusCode::CREATED, response_body);
    if let Some(location) = location.and_then(|l| HeaderValue::try_from(l).ok()) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn find_doc(
    state: &Mutex<SimState>,
    resource: Resource,
    matches: impl Fn(&Document) -> bool,
) -> Response {
    let s = lock(state);
    match s.stores[resource.index()].docs.iter().find(|d| matches(d)) {
        Some(doc) => json_response(StatusCode::OK, doc.response.clone()),
        None => error_response(StatusCode::NOT_FOUND, "not found"),
    }
}

async fn list_invoices(State(state): State<Shared>, request: Request) -> Response {
    let external_ref = form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "externalRef")
        .map(|(_, v)| v.into_owned());
    match external_ref {
        Some(reference) => find_doc(&state, Resource::Invoice, |d| {
            d.str_field("externalRef").as_deref() == Some(reference.as_str())
                || d.str_field("externalReference").as_deref() == Some(reference.as_str())
        }),
        None => {
            let s = lock(&state);
            let all: Vec<&str> = s.stores[Resource::Invoice.index()]
                .docs
                .iter()
                .map(|d| d.response.as_str())
                .collect();
            json_response(StatusCode::OK, format!("[{}]", all.join(",")))
        }
    }
}

async fn get_invoice(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    find_doc(&state, Resource::Invoice, |d| d.id == id)
}

async fn get_credit_note(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    find_doc(&state, Resource::CreditNote, |d| d.id == id)
}

async fn find_credit_note(State(state): State<Shared>, Path(reference): Path<String>) -> Response {
    find_doc(&state, Resource::CreditNote, |d| {
        d.str_field("externalReference").as_deref() == Some(reference.as_str())
    })
}

async fn oauth2_token(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let from_basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| BASE64.decode(b64).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|pair| {
            let (id, secret) = pair.split_once(':')?;
            let decode = |s: &str| {
                form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
            };
            Some((decode(id)?, decode(secret)?))
        });
    let client = from_basic.or_else(|| Some((field("client_id")?, field("client_secret")?)));

    let s = lock(&state);
    let Some(oauth2) = &s.oauth2 else {
        return error_response(StatusCode::NOT_FOUND, "no token endpoint configured");
    };
    if field("grant_type").as_deref() != Some("client_credentials") {
        return json_response(
            StatusCode::BAD_REQUEST,
            r#"{"error":"unsupported_grant_type"}"#.to_owned(),
        );
    }
    match client {
        Some((id, secret)) if id == oauth2.client_id && secret == oauth2.client_secret => {
            let mut response = json_response(
                StatusCode::OK,
                format!(
                    r#"{{"access_token":{},"token_type":"Bearer","expires_in":3600}}"#,
                    json_string(&oauth2.access_token)
                ),
            );
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        _ => json_response(
            StatusCode::UNAUTHORIZED,
            r#"{"error":"invalid_client"}"#.to_owned(),
        ),
    }
}

// ---------------------------------------------------------------------------
// The client side: a small HTTP client and webhook senders
// ---------------------------------------------------------------------------

/// Any error of [`send`].
pub type ClientError = Box<dyn Error + Send + Sync>;

/// A response read in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names are lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl HttpResponse {
    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON. Parse into a type with
    /// `Box<serde_json::value::RawValue>` fields to keep numbers' digits.
    pub fn json<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// One HTTP/1.1 request over a fresh connection to a plain `http://` URL;
/// reads the whole response. `Host` is set; `Content-Length` comes from
/// the body.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<HttpResponse, ClientError> {
    let uri: hyper::Uri = url.parse()?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url}: only http:// URLs are supported").into());
    }
    let authority = uri.authority().ok_or("URL without a host")?.clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let stream = TcpStream::connect((host, authority.port_u16().unwrap_or(80))).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });

    let mut request = hyper::Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, authority.as_str());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::new(body.into()))?)
        .await?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Lowercase hex HMAC-SHA256 of `body`: the `hmac-sha256` scheme's header
/// value (the gateway also accepts it prefixed `sha256=`).
pub fn sign_hmac_sha256(secret: &[u8], body: &[u8]) -> String {
    hmac_hex(secret, &[body])
}

/// Lowercase hex HMAC-SHA256 of `"<timestamp>.<raw body>"`: the
/// `hmac-sha256-timestamped` scheme's signature header value;
/// `timestamp` (unix seconds) goes in the timestamp header.
pub fn sign_timestamped(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    hmac_hex(secret, &[timestamp.to_string().as_bytes(), b".", body])
}

fn hmac_hex(secret: &[u8], parts: &[&[u8]]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Seconds since the unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// How a webhook sender signs, one variant per Connector
/// `webhook.signature.scheme`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookSignature {
    /// `none`: no signature header.
    None,
    /// `token`: `header: <token>`.
    Token { header: String, token: String },
    /// `hmac-sha256`: `header: <hex>`, or `sha256=<hex>` when `prefixed`.
    HmacSha256 {
        header: String,
        secret: Vec<u8>,
        prefixed: bool,
    },
    /// `hmac-sha256-timestamped`: `timestamp_header: <unix seconds>` and
    /// `header: <hex of "<timestamp>.<body>">`.
    HmacSha256Timestamped {
        header: String,
        timestamp_header: String,
        secret: Vec<u8>,
    },
}

/// The WMS / shop / AP-inbox side of a webhook Connector: posts JSON bodies
/// to a gateway URL, signed as the Connector expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSender {
    /// e.g. `http://127.0.0.1:PORT/webhooks/finance/wms/shipments`.
    pub url: String,
    pub signature: WebhookSignature,
}

impl WebhookSender {
    pub fn new(url: impl Into<String>, signature: WebhookSignature) -> WebhookSender {
        WebhookSender {
            url: url.into(),
            signature,
        }
    }

    /// The headers a delivery of `body` at `timestamp` carries:
    /// `content-type: application/json` and the signature headers.
    pub fn headers(&self, body: &[u8], timestamp: u64) -> Vec<(String, String)> {
        let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
        match &self.signature {
            WebhookSignature::None => {}
            WebhookSignature::Token { header, token } => {
                headers.push((header.clone(), token.clone()));
            }
            WebhookSignature::HmacSha256 {
                header,
                secret,
                prefixed,
            } => {
                let hex = sign_hmac_sha256(secret, body);
                let value = if *prefixed {
                    format!("sha256={hex}")
                } else {
                    hex
                };
                headers.push((header.clone(), value));
            }
            WebhookSignature::HmacSha256Timestamped {
                header,
                timestamp_header,
                secret,
            } => {
                headers.push((timestamp_header.clone(), timestamp.to_string()));
                headers.push((header.clone(), sign_timestamped(secret, timestamp, body)));
            }
        }
        headers
    }

    /// Posts `body`, signed now.
    pub async fn send(&self, body: &[u8]) -> Result<HttpResponse, ClientError> {
        self.send_at(body, unix_now()).await
    }

    /// Posts `body` signed with `timestamp` (for replay-window tests).
    pub async fn send_at(&self, body: &[u8], timestamp: u64) -> Result<HttpResponse, ClientError> {
        let headers = self.headers(body, timestamp);
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        send("POST", &self.url, &headers, Bytes::copy_from_slice(body)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_method_fault_passes_other_methods_by() {
        let erp = SimErp::start().await;
        erp.fail_next_after_commit_on("post", "/credit-notes", 1, 503);
        let lookup = erp.url("/credit-notes/by-reference/rma-1");
        let r = send("GET", &lookup, &[], Vec::new()).await.unwrap();
        assert_eq!(r.status, 404, "the GET does not consume the POST's fault");
        let body = r#"{"externalReference":"rma-1","totalAmount":39.80}"#;
        let r = send("POST", &erp.url("/credit-notes"), &[], body)
            .await
            .unwrap();
        assert_eq!(r.status, 503, "booked, the answer lost");
        assert_eq!(erp.credit_notes().len(), 1);
        let r = send("GET", &lookup, &[], Vec::new()).await.unwrap();
        assert_eq!(r.status, 200);
        let r = send("POST", &erp.url("/credit-notes"), &[], body)
            .await
            .unwrap();
        assert_eq!(r.status, 201, "the fault was used up");

        erp.fail_next_on("GET", "/credit-notes", 1, 502);
        let r = send("POST", &erp.url("/credit-notes"), &[], body)
            .await
            .unwrap();
        assert_eq!(r.status, 201);
        let r = send("GET", &lookup, &[], Vec::new()).await.unwrap();
        assert_eq!(r.status, 502);
        assert_eq!(erp.credit_notes().len(), 3);
    }

    #[test]
    fn json_number_grammar() {
        for ok in [
            "0",
            "0.10",
            "-1",
            "19.90",
            "1e5",
            "1.5E-3",
            "123456789.123456789",
        ] {
            assert!(is_json_number(ok), "{ok}");
        }
        for bad in [
            "", "-", "01", "1.", ".5", "1e", "1,5", "NaN", " 1", "1 ", "+1", "0x10",
        ] {
            assert!(!is_json_number(bad), "{bad}");
        }
    }
}
