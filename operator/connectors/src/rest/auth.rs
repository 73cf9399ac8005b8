//! Credentials from Secrets, turned into one request header.
//!
//! Static schemes (bearer, basic, API key) are read once, when the client is
//! built. OAuth 2.0 client credentials keep one cached token behind an async
//! mutex: the caller holding the lock fetches, everyone else waits for that
//! token instead of fetching their own.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use tallyman_api::v1alpha1::SecretKeyRef;
use tallyman_api::v1alpha1::{OAuth2ClientCredentials, RestAuth};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::BuildError;
use super::retry::retryable;
use super::transport::{ExchangeError, HttpClient, exchange};
use crate::secrets::SecretSource;

/// Tokens refresh this long before they expire at the latest...
const REFRESH_MARGIN: Duration = Duration::from_secs(30);
/// ...or this part of their lifetime before, whichever is earlier.
const REFRESH_FRACTION: u32 = 10;
/// The lifetime assumed when the token endpoint does not say.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

pub(crate) enum Auth {
    None,
    Header(HeaderName, HeaderValue),
    OAuth2(Box<OAuth2>),
}

/// Why no credential could be had for an attempt.
pub(crate) enum AuthError {
    /// The token endpoint was unreachable, slow, throttling or failing.
    Transient(String),
    /// The token endpoint refused; retrying will not help.
    Refused(String),
}

impl Auth {
    pub(crate) fn new(
        spec: Option<&RestAuth>,
        secrets: &dyn SecretSource,
    ) -> Result<Self, BuildError> {
        let Some(spec) = spec else {
            return Ok(Self::None);
        };
        if let Some(bearer) = &spec.bearer {
            let token = secret_text(secrets, &bearer.secret_ref, "bearer token")?;
            return Ok(Self::Header(
                AUTHORIZATION,
                sensitive(format!("Bearer {token}"), "bearer token")?,
            ));
        }
        if let Some(basic) = &spec.basic {
            let user = secret_text(secrets, &basic.username, "basic username")?;
            let password = secret_text(secrets, &basic.password, "basic password")?;
            let encoded = BASE64.encode(format!("{user}:{password}"));
            return Ok(Self::Header(
                AUTHORIZATION,
                sensitive(format!("Basic {encoded}"), "basic credentials")?,
            ));
        }
        if let Some(api_key) = &spec.api_key {
            let name =
                HeaderName::try_from(api_key.header.as_str()).map_err(|e| BuildError::Header {
                    header: api_key.header.clone(),
                    reason: e.to_string(),
                })?;
            let key = secret_text(secrets, &api_key.secret_ref, "API key")?;
            return Ok(Self::Header(name, sensitive(key, "API key")?));
        }
        if let Some(oauth2) = &spec.oauth2_client_credentials {
            return Ok(Self::OAuth2(Box::new(OAuth2::new(oauth2, secrets)?)));
        }
        Ok(Self::None)
    }
}

/// A Secret value as header text. Files made with `kubectl create secret
/// --from-file` often end in a newline that is no part of the credential.
fn secret_text(
    secrets: &dyn SecretSource,
    r: &SecretKeyRef,
    what: &'static str,
) -> Result<String, BuildError> {
    let mut value = secrets.get(&r.name, &r.key)?;
    while value.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
        value.pop();
    }
    String::from_utf8(value).map_err(|_| BuildError::Credential {
        what,
        reason: "not UTF-8".into(),
    })
}

fn sensitive(value: String, what: &'static str) -> Result<HeaderValue, BuildError> {
    let mut v = HeaderValue::try_from(value).map_err(|_| BuildError::Credential {
        what,
        reason: "contains characters a header cannot carry".into(),
    })?;
    v.set_sensitive(true);
    Ok(v)
}

pub(crate) struct OAuth2 {
    token_url: Uri,
    client_auth: HeaderValue,
    form: Bytes,
    cached: Mutex<Option<Token>>,
    /// The last fetch that failed for a moment, and why: callers queued
    /// behind it do not each ask the token endpoint again, one timeout
    /// after another, but share its answer for [`FETCH_COOL_DOWN`].
    failed: std::sync::Mutex<Option<(Instant, String)>>,
}

/// How long a token fetch that failed for a moment answers for the
/// callers behind it.
const FETCH_COOL_DOWN: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct Token {
    header: HeaderValue,
    refresh_at: Instant,
    expires_at: Instant,
    /// Tells a stale 401 (for a token already replaced) from a fresh one.
    serial: u64,
}

/// The token an attempt used, to invalidate exactly that one on a 401.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TokenSerial(u64);

impl OAuth2 {
    fn new(spec: &OAuth2ClientCredentials, secrets: &dyn SecretSource) -> Result<Self, BuildError> {
        let token_url = spec
            .token_url
            .parse::<Uri>()
            .ok()
            .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
            .ok_or_else(|| BuildError::TokenUrl(spec.token_url.clone()))?;
        // RFC 6749 §2.3.1: id and secret are form-encoded before the basic
        // encoding.
        let id = secret_text(secrets, &spec.client_id, "OAuth2 client id")?;
        let secret = secret_text(secrets, &spec.client_secret, "OAuth2 client secret")?;
        let id: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
        let secret: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        let client_auth = sensitive(
            format!("Basic {}", BASE64.encode(format!("{id}:{secret}"))),
            "OAuth2 client credentials",
        )?;
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if !spec.scopes.is_empty() {
            form.append_pair("scope", &spec.scopes.join(" "));
        }
        if let Some(audience) = &spec.audience {
            form.append_pair("audience", audience);
        }
        Ok(Self {
            token_url,
            client_auth,
            form: Bytes::from(form.finish()),
            cached: Mutex::new(None),
            failed: std::sync::Mutex::new(None),
        })
    }

    /// The `Authorization` header to send, fetching a token when none is
    /// fresh. Concurrent callers share one fetch.
    pub(crate) async fn header(
        &self,
        http: &HttpClient,
        user_agent: &HeaderValue,
        timeout: Duration,
    ) -> Result<(HeaderValue, TokenSerial), AuthError> {
        let mut cached = self.cached.lock().await;
        if let Some(t) = cached.as_ref().filter(|t| Instant::now() < t.refresh_at) {
            return Ok((t.header.clone(), TokenSerial(t.serial)));
        }
        let serial = cached.as_ref().map_or(1, |t| t.serial + 1);
        let recent = self
            .failed
            .lock()
            .expect("failed lock")
            .as_ref()
            .filter(|(at, _)| at.elapsed() < FETCH_COOL_DOWN)
            .map(|(_, why)| why.clone());
        let fetched = match recent {
            Some(why) => Err(AuthError::Transient(why)),
            None => self.fetch(http, user_agent, timeout, serial).await,
        };
        if let Err(AuthError::Transient(why)) = &fetched {
            let mut failed = self.failed.lock().expect("failed lock");
            if failed
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() >= FETCH_COOL_DOWN)
            {
                *failed = Some((Instant::now(), why.clone()));
            }
        }
        match fetched {
            Ok(token) => {
                let out = (token.header.clone(), TokenSerial(token.serial));
                *cached = Some(token);
                *self.failed.lock().expect("failed lock") = None;
                Ok(out)
            }
            // A token due for refresh but not yet expired still serves while
            // the token endpoint has a bad moment.
            Err(AuthError::Transient(msg)) => {
                match cached.as_ref().filter(|t| Instant::now() < t.expires_at) {
                    Some(t) => Ok((t.header.clone(), TokenSerial(t.serial))),
                    None => Err(AuthError::Transient(msg)),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Forgets the token a 401 was answered to, unless it was replaced since.
    pub(crate) async fn invalidate(&self, used: TokenSerial) {
        let mut cached = self.cached.lock().await;
        // The token stays, expired, so the next one gets the next serial.
        if let Some(t) = cached.as_mut().filter(|t| t.serial == used.0) {
            t.refresh_at = Instant::now();
            t.expires_at = t.refresh_at;
        }
    }

    async fn fetch(
        &self,
        http: &HttpClient,
        user_agent: &HeaderValue,
        timeout: Duration,
        serial: u64,
    ) -> Result<Token, AuthError> {
        let mut req = Request::new(Full::new(self.form.clone()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.token_url.clone();
        let h = req.headers_mut();
        h.insert(AUTHORIZATION, self.client_auth.clone());
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        h.insert(ACCEPT, HeaderValue::from_static("application/json"));
        h.insert(USER_AGENT, user_agent.clone());

        let fetched_at = Instant::now();
        let answer = exchange(http, req, timeout).await.map_err(|e| match e {
            ExchangeError::Transient(msg) => AuthError::Transient(format!("token endpoint: {msg}")),
            e @ ExchangeError::TooLarge => AuthError::Refused(format!("token endpoint: {e}")),
        })?;
        if retryable(answer.status) {
            return Err(AuthError::Transient(format!(
                "token endpoint answered HTTP {}",
                answer.status.as_u16()
            )));
        }
        let json: Option<serde_json::Value> = serde_json::from_slice(&answer.body).ok();
        if !answer.status.is_success() {
            // The OAuth error code ("invalid_client") helps and holds no
            // secret; the rest of the body is not repeated.
            let code = json
                .as_ref()
                .and_then(|j| j.get("error"))
                .and_then(|e| e.as_str())
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            return Err(AuthError::Refused(format!(
                "token endpoint answered HTTP {}{code}",
                answer.status.as_u16()
            )));
        }
        let access_token = json
            .as_ref()
            .and_then(|j| j.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                AuthError::Refused("token endpoint answered without an access_token".into())
            })?;
        let lifetime = json
            .as_ref()
            .and_then(|j| j.get("expires_in"))
            .and_then(|e| {
                e.as_u64()
                    .or_else(|| e.as_str().and_then(|s| s.trim().parse().ok()))
            })
            .map_or(DEFAULT_LIFETIME, Duration::from_secs);
        let header = HeaderValue::try_from(format!("Bearer {access_token}"))
            .map(|mut v| {
                v.set_sensitive(true);
                v
            })
            .map_err(|_| {
                AuthError::Refused("token endpoint answered an unusable access_token".into())
            })?;
        Ok(Token {
            header,
            refresh_at: fetched_at + lifetime.saturating_sub(refresh_margin(lifetime)),
            expires_at: fetched_at + lifetime,
            serial,
        })
    }
}

/// How long before expiry a token is replaced: 30 s or a tenth of its
/// lifetime, whichever is more, but never more than half of it, so
/// short-lived tokens are still reused.
fn refresh_margin(lifetime: Duration) -> Duration {
    REFRESH_MARGIN
        .max(lifetime / REFRESH_FRACTION)
        .min(lifetime / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_margins() {
        let s = Duration::from_secs;
        assert_eq!(refresh_margin(s(3600)), s(360));
        assert_eq!(refresh_margin(s(120)), s(30));
        assert_eq!(refresh_margin(s(40)), s(20));
        assert_eq!(refresh_margin(s(1)), Duration::from_millis(500));
        assert_eq!(refresh_margin(Duration::ZERO), Duration::ZERO);
    }
}
