//! One HTTP exchange: the pooled hyper client over rustls, with a deadline
//! over the whole response and a cap on the body size.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Larger answers are refused rather than held in memory.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

pub(crate) type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What the server answered.
pub(crate) struct Exchange {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// Why no complete answer arrived.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// Connect errors, resets, timeouts: another attempt may succeed.
    Transient(String),
    /// Another attempt would get the same answer.
    TooLarge,
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transient(msg) => f.write_str(msg),
            Self::TooLarge => write!(f, "response body larger than {MAX_BODY_BYTES} bytes"),
        }
    }
}

/// The client every attempt of one Connector goes through.
pub(crate) fn client(timeout: Duration, extra_ca_pem: Option<&[u8]>) -> Result<HttpClient, String> {
    let tls = tls_config(extra_ca_pem)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_timer(TokioTimer::new())
        .build(https))
}

/// The system's roots, Mozilla's (for images without a trust store) and the
/// Connector's own CA bundle.
fn tls_config(extra_ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    roots.add_parsable_certificates(native_roots().iter().cloned());
    if let Some(pem) = extra_ca_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("the CA bundle is not valid PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("the CA bundle holds an unusable certificate: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err("the CA bundle holds no PEM certificate".into());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("failed to set up TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The platform's trust store, read once per process.
fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// Sends one request and reads the whole answer within `timeout`.
pub(crate) async fn exchange(
    http: &HttpClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Exchange, ExchangeError> {
    let attempt = async {
        let resp = http
            .request(req)
            .await
            .map_err(|e| ExchangeError::Transient(chain(&e)))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<LengthLimitError>().is_some() {
                    ExchangeError::TooLarge
                } else {
                    ExchangeError::Transient(format!("failed to read the response: {}", chain(&*e)))
                }
            })?
            .to_bytes();
        Ok(Exchange {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ExchangeError::Transient(format!(
            "no complete response within {timeout:?}"
        ))),
    }
}

/// An error and its sources on one line: hyper's own message alone says
/// little ("client error (Connect)").
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_msg = s.to_string();
        if !msg.ends_with(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    msg
}
