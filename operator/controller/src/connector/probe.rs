//! `Reachable`: one GET of `rest.baseUrl` + `probe.path`, with the
//! Connector's own REST client (its timeout, TLS settings and rate limit).
//! The probe sends no credentials, so the operator reads no credential
//! Secret: only a CA bundle (`rest.tls.caSecretRef`) is read, when set.

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use tallyman_api::v1alpha1::RestSpec;
use tallyman_connectors::rest::RestClient;
use tallyman_connectors::{SecretError, SecretSource};

/// What a probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probed {
    pub reachable: bool,
    pub message: String,
}

/// Credentials are never sent by a probe; the client is still built with
/// something in their place. The CA bundle is real.
struct ProbeSecrets {
    ca: Option<(String, String, Vec<u8>)>,
}

impl SecretSource for ProbeSecrets {
    fn get(&self, name: &str, key: &str) -> Result<Vec<u8>, SecretError> {
        match &self.ca {
            Some((n, k, v)) if n == name && k == key => Ok(v.clone()),
            _ => Ok(b"unused-by-the-probe".to_vec()),
        }
    }
}

pub async fn probe(
    client: &kube::Client,
    namespace: &str,
    connector: &str,
    rest: &RestSpec,
) -> Probed {
    let url = format!("{}{}", rest.base_url.trim_end_matches('/'), rest.probe.path);
    let ca = match &rest.tls {
        Some(tls) => {
            let r = &tls.ca_secret_ref;
            let secret = Api::<Secret>::namespaced(client.clone(), namespace)
                .get(&r.name)
                .await;
            match secret.map(|s| s.data.unwrap_or_default().remove(&r.key)) {
                Ok(Some(v)) => Some((r.name.clone(), r.key.clone(), v.0)),
                Ok(None) => {
                    return Probed {
                        reachable: false,
                        message: format!(
                            "Secret {:?} has no key {:?} (the CA bundle of rest.tls)",
                            r.name, r.key
                        ),
                    };
                }
                Err(e) => {
                    return Probed {
                        reachable: false,
                        message: format!("failed to read the CA bundle Secret {:?}: {e}", r.name),
                    };
                }
            }
        }
        None => None,
    };
    let rest_client = match RestClient::new(connector, rest, &ProbeSecrets { ca }) {
        Ok(c) => c,
        Err(e) => {
            return Probed {
                reachable: false,
                message: format!("cannot probe {url}: {e}"),
            };
        }
    };
    match rest_client.probe().await {
        Ok(code) => Probed {
            reachable: true,
            message: format!("GET {url} answered {code}"),
        },
        Err(e) => Probed {
            reachable: false,
            message: format!("GET {url} failed: {e}; check rest.baseUrl, DNS and network policies"),
        },
    }
}
