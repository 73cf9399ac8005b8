//! The systems that send webhooks (shop, WMS, AP inbox, purchasing), built
//! from the same manifests dev mode runs: each webhook Connector becomes a
//! sender that signs the way its `signature` says, with the secret from the
//! manifests' Secret, at `{dev}/webhooks/{namespace}/{connector}{path}`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use tallyman_connectors::{SecretSource, StaticSecrets};
use tallyman_testing::erp::{HttpResponse, WebhookSender, WebhookSignature};

/// What a delivery came to, from the gateway's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// 202: a new event, stored.
    Accepted,
    /// 200 `{"duplicate": true}`: already stored, absorbed.
    Duplicate,
    /// 200 without events: no `when` selected the payload.
    Ignored,
}

/// The webhook senders of a manifest set, by Connector name.
#[derive(Clone, Debug)]
pub struct Senders {
    by_connector: BTreeMap<String, WebhookSender>,
}

impl Senders {
    /// Reads every YAML file under `dir` (as `tallyman dev` does) and builds
    /// a sender per webhook Connector for the dev mode at `base`.
    pub fn from_manifests(dir: &Path, base: &str) -> Senders {
        let docs = documents(dir);
        let mut by_connector = BTreeMap::new();
        for d in docs.iter().filter(|d| d["kind"] == "Connector") {
            let hook = &d["spec"]["webhook"];
            if hook.is_null() {
                continue;
            }
            let ns = namespace(d);
            let name = d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let sig = &hook["signature"];
            let header = sig["header"].as_str().unwrap_or_default().to_string();
            let secret = || {
                let (secret, key) = (
                    sig["secretRef"]["name"].as_str().unwrap_or_default(),
                    sig["secretRef"]["key"].as_str().unwrap_or_default(),
                );
                StaticSecrets::from_manifests(&docs, &ns)
                    .get(secret, key)
                    .unwrap_or_else(|e| panic!("Connector {name}: {e}"))
            };
            let signature = match sig["scheme"].as_str().unwrap_or("none") {
                "hmac-sha256" => WebhookSignature::HmacSha256 {
                    header,
                    secret: secret(),
                    prefixed: false,
                },
                "hmac-sha256-timestamped" => WebhookSignature::HmacSha256Timestamped {
                    header,
                    timestamp_header: sig["timestampHeader"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    secret: secret(),
                },
                "token" => WebhookSignature::Token {
                    header,
                    token: String::from_utf8(secret()).expect("a token is text"),
                },
                _ => WebhookSignature::None,
            };
            let path = hook["path"].as_str().unwrap_or_default();
            let url = format!("{}/webhooks/{ns}/{name}{path}", base.trim_end_matches('/'));
            by_connector.insert(name, WebhookSender::new(url, signature));
        }
        Senders { by_connector }
    }

    /// The sender of Connector `name`.
    pub fn get(&self, name: &str) -> &WebhookSender {
        self.by_connector
            .get(name)
            .unwrap_or_else(|| panic!("no webhook Connector {name}"))
    }

    /// Posts `payload` as Connector `connector`'s system would.
    ///
    /// # Panics
    /// When the gateway refuses it (anything but 200 or 202).
    pub async fn send(&self, connector: &str, payload: &Value) -> Delivery {
        let body = payload.to_string();
        let response = self
            .get(connector)
            .send(body.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("POST to {connector}: {e}"));
        classify(connector, &response)
    }
}

fn classify(connector: &str, response: &HttpResponse) -> Delivery {
    let answer: Value = response.json().unwrap_or(Value::Null);
    match response.status {
        202 => Delivery::Accepted,
        200 if answer["duplicate"] == true => Delivery::Duplicate,
        200 => Delivery::Ignored,
        status => panic!(
            "the gateway refused a delivery of {connector} with {status}: {}",
            response.text()
        ),
    }
}

fn namespace(doc: &Value) -> String {
    doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string()
}

/// Every document under `dir`, read as `tallyman dev` reads them.
fn documents(dir: &Path) -> Vec<Value> {
    let loaded = tallyman_core::manifest::load(&[dir.to_path_buf()]);
    assert!(
        loaded.parse_errors.is_empty() && loaded.read_errors.is_empty(),
        "{} does not load",
        dir.display()
    );
    loaded.documents.into_iter().map(|d| d.value).collect()
}
