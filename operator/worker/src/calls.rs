//! `call` steps over real HTTP: one REST client per Connector of the
//! definition, shared by every instance (one rate limiter, one token cache).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use tallyman_connectors::SecretSource;
use tallyman_connectors::rest::{CallError, CallRequest, RestClient};
use tallyman_core::engine::{CallPlan, CallResult, Definition};
use tokio::sync::Notify;

use crate::{Caller, Error};

/// The REST clients of a definition's Connectors.
pub struct RestCaller {
    clients: BTreeMap<String, RestClient>,
}

impl RestCaller {
    /// Build a client per Connector; `base_urls` points Connectors elsewhere
    /// (dev mode's `--connector-url NAME=URL`, tests).
    pub fn new(
        def: &Definition,
        secrets: &dyn SecretSource,
        base_urls: &BTreeMap<String, String>,
    ) -> Result<Self, Error> {
        let mut clients = BTreeMap::new();
        for (name, spec) in &def.connectors {
            let Some(rest) = &spec.rest else { continue };
            let mut rest = rest.clone();
            if let Some(url) = base_urls.get(name) {
                // The local system stands in for the whole external one:
                // its OAuth2 token endpoint too, at the same path.
                if let Some(oauth) = rest
                    .auth
                    .as_mut()
                    .and_then(|a| a.oauth2_client_credentials.as_mut())
                {
                    oauth.token_url = redirect(&oauth.token_url, url);
                }
                rest.base_url = url.clone();
            }
            let client = RestClient::new(name, &rest, secrets)
                .map_err(|e| Error::Definition(format!("Connector {name}: {e}")))?;
            clients.insert(name.clone(), client);
        }
        Ok(Self { clients })
    }
}

/// `url`'s path and query on `origin`'s scheme, host and port (and path
/// prefix): `redirect("https://login.example.com/oauth2/token",
/// "http://127.0.0.1:8090")` is `http://127.0.0.1:8090/oauth2/token`.
fn redirect(url: &str, origin: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    format!("{}{path}", origin.trim_end_matches('/'))
}

impl RestCaller {
    fn client(&self, plan: &CallPlan) -> Result<&RestClient, CallResult> {
        self.clients
            .get(&plan.connector)
            .ok_or_else(|| CallResult::Failed {
                message: format!("no REST client for Connector {}", plan.connector),
                status: None,
                attempts: 0,
            })
    }
}

fn request(plan: &CallPlan) -> CallRequest {
    CallRequest {
        action: plan.action.clone(),
        params: plan.params.clone(),
        body: plan.body.clone(),
        idempotency_key: Some(plan.idempotency_key.clone()),
    }
}

impl Caller for RestCaller {
    fn call<'a>(
        &'a self,
        plan: &'a CallPlan,
    ) -> Pin<Box<dyn Future<Output = CallResult> + Send + 'a>> {
        Box::pin(async move {
            let client = match self.client(plan) {
                Ok(c) => c,
                Err(failed) => return failed,
            };
            result(client.call(&request(plan), &|_, _| {}).await)
        })
    }

    fn call_once<'a>(
        &'a self,
        plan: &'a CallPlan,
    ) -> Pin<Box<dyn Future<Output = (CallResult, Option<Duration>)> + Send + 'a>> {
        Box::pin(async move {
            let client = match self.client(plan) {
                Ok(c) => c,
                Err(failed) => return (failed, None),
            };
            // The client retries by itself; it announces a retry before it
            // waits for it, when the failed attempt is over. Stop it there.
            let retry = Mutex::new(None);
            let retrying = Notify::new();
            let on_retry = |_: u32, wait: Duration| {
                *retry.lock().expect("retry lock") = Some(wait);
                retrying.notify_one();
            };
            let request = request(plan);
            tokio::select! {
                biased;
                r = client.call(&request, &on_retry) => (result(r), None),
                _ = retrying.notified() => {
                    let wait = retry.lock().expect("retry lock").take();
                    (
                        CallResult::Failed {
                            message: "the attempt failed and may be retried".into(),
                            status: None,
                            attempts: 1,
                        },
                        wait,
                    )
                }
            }
        })
    }
}

fn result(r: Result<tallyman_connectors::rest::Response, CallError>) -> CallResult {
    match r {
        Ok(r) => CallResult::Response {
            status: r.status,
            headers: r.headers,
            body: r.body,
            attempts: r.attempts,
        },
        Err(CallError::Rejected {
            status,
            body,
            attempts,
        }) => CallResult::Failed {
            message: format!(
                "HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            ),
            status: Some(status),
            attempts,
        },
        Err(CallError::Exhausted { attempts, last }) => CallResult::Failed {
            message: format!("gave up after {attempts} attempts: {last}"),
            status: None,
            attempts,
        },
        Err(e) => CallResult::Failed {
            message: e.to_string(),
            status: None,
            attempts: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::redirect;

    #[test]
    fn a_redirected_connector_takes_its_token_endpoint_along() {
        assert_eq!(
            redirect(
                "https://login.payments.example.com/oauth2/token",
                "http://127.0.0.1:8090"
            ),
            "http://127.0.0.1:8090/oauth2/token"
        );
        assert_eq!(
            redirect(
                "https://idp.example.com/realms/x/token?aud=pay",
                "http://127.0.0.1:9/sim/"
            ),
            "http://127.0.0.1:9/sim/realms/x/token?aud=pay"
        );
        assert_eq!(
            redirect("https://idp.example.com", "http://127.0.0.1:9"),
            "http://127.0.0.1:9"
        );
    }
}
