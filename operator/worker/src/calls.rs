//! `call` steps over real HTTP: one REST client per Connector of the
//! definition, shared by every instance (one rate limiter, one token cache).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use tallyman_connectors::SecretSource;
use tallyman_connectors::rest::{CallError, CallRequest, RestClient};
use tallyman_core::engine::{CallPlan, CallResult, Definition};

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
                rest.base_url = url.clone();
            }
            let client = RestClient::new(name, &rest, secrets)
                .map_err(|e| Error::Definition(format!("Connector {name}: {e}")))?;
            clients.insert(name.clone(), client);
        }
        Ok(Self { clients })
    }
}

impl Caller for RestCaller {
    fn call<'a>(
        &'a self,
        plan: &'a CallPlan,
        heartbeat: &'a (dyn Fn() + Send + Sync),
    ) -> Pin<Box<dyn Future<Output = CallResult> + Send + 'a>> {
        Box::pin(async move {
            let Some(client) = self.clients.get(&plan.connector) else {
                return CallResult::Failed {
                    message: format!("no REST client for Connector {}", plan.connector),
                    status: None,
                    attempts: 0,
                };
            };
            let request = CallRequest {
                action: plan.action.clone(),
                params: plan.params.clone(),
                body: plan.body.clone(),
                idempotency_key: Some(plan.idempotency_key.clone()),
            };
            match client.call(&request, &|_, _| heartbeat()).await {
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
        })
    }
}
