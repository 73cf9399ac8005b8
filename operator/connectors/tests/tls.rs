//! A private CA from a Secret, against a local rustls server whose
//! certificate that CA issued.

mod common;

use std::sync::Arc;

use common::{Reply, rest_spec, serve_tls};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use tallyman_connectors::StaticSecrets;
use tallyman_connectors::rest::{BuildError, CallError, CallRequest, RestClient};

/// A CA (as PEM) and a server configuration with a `localhost` certificate
/// it issued.
fn private_ca() -> (String, Arc<rustls::ServerConfig>) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    (ca.pem(), Arc::new(server))
}

fn spec(base: &str, with_ca: bool) -> tallyman_api::v1alpha1::RestSpec {
    let mut json = json!({
        "baseUrl": base,
        "retry": {"maxAttempts": 1},
        "actions": {"getOrder": {"method": "GET", "path": "/orders/{orderId}"}},
    });
    if with_ca {
        json["tls"] = json!({"caSecretRef": {"name": "erp-ca", "key": "ca.crt"}});
    }
    rest_spec(json)
}

#[tokio::test]
async fn a_private_ca_from_a_secret_is_trusted() {
    let (ca_pem, server) = private_ca();
    let api = serve_tls(server, |_| Reply::json(200, r#"{"id":"4711"}"#)).await;
    let base = format!("https://localhost:{}", api.addr.port());
    let secrets = StaticSecrets::new().with("erp-ca", "ca.crt", ca_pem);
    let get = CallRequest::new("getOrder").param("orderId", "4711");

    let client = RestClient::new("erp", &spec(&base, true), &secrets).unwrap();
    let resp = client.call(&get, &|_, _| {}).await.unwrap();
    assert_eq!((resp.status, resp.body.as_str()), (200, r#"{"id":"4711"}"#));
    assert_eq!(client.probe().await, Ok(200));

    // Without the CA the same server is not trusted.
    let client = RestClient::new("erp", &spec(&base, false), &secrets).unwrap();
    let err = client.call(&get, &|_, _| {}).await.unwrap_err();
    let CallError::Exhausted { attempts: 1, last } = err else {
        panic!("{err:?}");
    };
    assert!(last.contains("certificate"), "{last}");
    assert_eq!(api.count(), 1 + 1);
}

#[tokio::test]
async fn a_ca_secret_without_a_certificate_fails_the_build() {
    let secrets = StaticSecrets::new().with("erp-ca", "ca.crt", "not a certificate");
    let err = RestClient::new("erp", &spec("https://localhost:1", true), &secrets).unwrap_err();
    assert!(matches!(err, BuildError::Tls(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "failed to set up TLS: the CA bundle holds no PEM certificate"
    );
}
