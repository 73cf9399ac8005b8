//! The gateway of a namespace: one Deployment and Service (and a disruption
//! budget) serving every
//! valid webhook Connector of the namespace. Pure.
//!
//! ```text
//! Connectors (webhook) ──owners──▶ ConfigMap tallyman-gateway   connectors.yaml (the Connectors as manifests)
//!                      ──owners──▶ Deployment tallyman-gateway  `tallyman gateway`, Secrets mounted
//!                      ──owners──▶ Service tallyman-gateway     :80 → :8080
//!                      ──owners──▶ PodDisruptionBudget tallyman-gateway  one pod at a time
//! ```
//!
//! Every webhook Connector is an owner (none the controller), so the
//! gateway goes when the last of them goes, and a change to any of them
//! reaches the gateway's reconcile through `.owns()`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ContainerPort, PodSpec, PodTemplateSpec, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use tallyman_api::v1alpha1::Connector;

use crate::context::Settings;
use crate::error::Error;
use crate::meta::{self, CONNECTORS_HASH_ANNOTATION, SECRETS_HASH_ANNOTATION};
use crate::pods;
use crate::validation::as_manifest;

/// The name of the gateway's ConfigMap, Deployment and Service.
pub const NAME: &str = "tallyman-gateway";
/// Where the Connectors are mounted in the gateway.
pub const CONNECTORS_DIR: &str = "/etc/tallyman/connectors";
/// The gateway's webhook port in the pod.
pub const HTTP_PORT: i32 = 8080;
/// Gateway pods: two, so a roll or a drained node does not stop intake.
pub const REPLICAS: i32 = 2;

/// The URL a Connector's webhook is served at inside the cluster.
pub fn webhook_url(namespace: &str, connector: &str, path: &str) -> String {
    format!("http://{NAME}.{namespace}.svc/webhooks/{namespace}/{connector}{path}")
}

#[derive(Clone, Debug)]
pub struct Gateway {
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    pub pdb: PodDisruptionBudget,
}

/// The gateway of `namespace` for `connectors` (the valid webhook
/// Connectors, in name order); `None` when there are none.
pub fn build(
    namespace: &str,
    connectors: &[&Connector],
    settings: &Settings,
    secrets_hash: &str,
) -> Result<Option<Gateway>, Error> {
    if connectors.is_empty() {
        return Ok(None);
    }
    let owners = connectors
        .iter()
        .map(|c| c.owner_ref(&()).ok_or(Error::Incomplete("metadata.uid")))
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = ObjectMeta {
        name: Some(NAME.into()),
        namespace: Some(namespace.into()),
        labels: Some(meta::labels("gateway", NAME)),
        owner_references: Some(owners),
        ..Default::default()
    };
    let mut docs = Vec::new();
    for c in connectors {
        let yaml = serde_yaml::to_string(&as_manifest(*c)).map_err(|e| Error::Encode {
            what: format!("Connector {}", c.name_any()),
            source: serde::ser::Error::custom(e),
        })?;
        docs.push(yaml);
    }
    let manifests = docs.join("---\n");
    let hash = meta::hash_json(&serde_json::Value::String(manifests.clone()));
    let config_map = ConfigMap {
        metadata: metadata.clone(),
        data: Some(BTreeMap::from([("connectors.yaml".to_string(), manifests)])),
        ..Default::default()
    };

    let secrets = pods::secret_names(&settings.pod_nats, connectors.iter().map(|c| &c.spec));
    let (volumes, mounts) = pods::volumes(&secrets, "connectors", NAME.into(), CONNECTORS_DIR);
    let mut container = pods::container(
        "gateway",
        vec![
            "gateway".into(),
            "--manifests".into(),
            CONNECTORS_DIR.into(),
            "--namespace".into(),
            namespace.into(),
            "--listen".into(),
            format!("0.0.0.0:{HTTP_PORT}"),
            "--metrics-listen".into(),
            format!("0.0.0.0:{}", pods::TELEMETRY_PORT),
            "--secrets-dir".into(),
            pods::SECRETS_DIR.into(),
        ],
        settings,
    );
    container
        .ports
        .get_or_insert_with(Vec::new)
        .push(ContainerPort {
            name: Some("http".into()),
            container_port: HTTP_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        });
    container.volume_mounts = Some(mounts);
    let selector = meta::selector("gateway", NAME);
    let mut annotations = pods::scrape_annotations();
    // New Connectors may mean new Secret mounts, which only a new pod gets.
    annotations.insert(CONNECTORS_HASH_ANNOTATION.into(), hash);
    annotations.insert(SECRETS_HASH_ANNOTATION.into(), secrets_hash.into());
    let deployment = Deployment {
        metadata: metadata.clone(),
        spec: Some(DeploymentSpec {
            replicas: Some(REPLICAS),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(meta::labels("gateway", NAME)),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    security_context: Some(pods::pod_security()),
                    // The gateway needs no API access.
                    automount_service_account_token: Some(false),
                    containers: vec![container],
                    volumes: Some(volumes),
                    termination_grace_period_seconds: Some(30),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    // A node drain takes one gateway pod at a time, so webhooks are always
    // answered.
    let pdb = pods::disruption_budget(metadata.clone(), selector.clone());
    let service = Service {
        metadata,
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Some(Gateway {
        config_map,
        deployment,
        service,
        pdb,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn settings() -> Settings {
        Settings {
            image: "tallyman:test".into(),
            nats_url: "nats://nats:4222".into(),
            pod_nats: Default::default(),
        }
    }

    fn webhook_connectors() -> Vec<Connector> {
        let mut out: Vec<Connector> = fixtures::example("shipment-to-invoice")
            .connectors
            .into_iter()
            .filter(|c| c.spec.webhook.is_some())
            .collect();
        for (i, c) in out.iter_mut().enumerate() {
            c.metadata.uid = Some(format!("uid-{i}"));
        }
        out
    }

    #[test]
    fn the_gateway_connects_to_a_secured_nats_with_secrets_of_its_namespace() {
        let connectors = webhook_connectors();
        let refs: Vec<&Connector> = connectors.iter().collect();
        let g = build("finance", &refs, &pods::secured::settings(settings()), "h0")
            .unwrap()
            .unwrap();
        let pod = g.deployment.spec.unwrap().template.spec.unwrap();
        pods::secured::assert_connects_with_mounted_files(&pod);
    }

    #[test]
    fn a_drain_takes_one_gateway_pod_at_a_time() {
        let connectors = webhook_connectors();
        let refs: Vec<&Connector> = connectors.iter().collect();
        let g = build("finance", &refs, &settings(), "h0").unwrap().unwrap();
        pods::assert_drains_one_at_a_time(&g.pdb, &g.deployment);
        assert_eq!(
            g.pdb.metadata.owner_references.map(|o| o.len()),
            Some(connectors.len())
        );
    }

    #[test]
    fn no_webhook_connector_no_gateway() {
        assert!(build("finance", &[], &settings(), "h0").unwrap().is_none());
    }

    #[test]
    fn the_gateway_serves_every_webhook_connector_with_its_secrets() {
        let connectors = webhook_connectors();
        let refs: Vec<&Connector> = connectors.iter().collect();
        let g = build("finance", &refs, &settings(), "h0").unwrap().unwrap();
        let yaml = &g.config_map.data.as_ref().unwrap()["connectors.yaml"];
        // The gateway reads this file as `tallyman validate` would.
        let mut loaded = tallyman_core::manifest::Loaded::default();
        tallyman_core::manifest::parse_into(
            std::path::Path::new("connectors.yaml"),
            yaml,
            &mut loaded,
        );
        let report = tallyman_core::validate::validate_loaded(loaded);
        assert!(!report.has_errors(), "{:?}", report.diagnostics);
        assert_eq!(report.valid.len(), connectors.len());

        let owners = g.deployment.metadata.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), connectors.len());
        assert!(
            owners
                .iter()
                .all(|o| o.controller.is_none() && o.kind == "Connector")
        );
        let pod = g
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        let mounts = pod.containers[0].volume_mounts.as_ref().unwrap();
        for s in pods::secret_names(&settings().pod_nats, connectors.iter().map(|c| &c.spec)) {
            assert!(
                mounts
                    .iter()
                    .any(|m| m.mount_path == format!("{}/{s}", pods::SECRETS_DIR)),
                "{s}"
            );
        }
        assert_eq!(
            pod.containers[0].security_context,
            Some(pods::container_security())
        );
        let svc = g.service.spec.unwrap();
        assert_eq!(svc.ports.unwrap()[0].port, 80);
        assert_eq!(svc.selector.unwrap(), meta::selector("gateway", NAME));
    }

    #[test]
    fn a_changed_connector_rolls_the_gateway() {
        let mut connectors = webhook_connectors();
        let hash = |cs: &[Connector]| {
            let refs: Vec<&Connector> = cs.iter().collect();
            let g = build("finance", &refs, &settings(), "h0").unwrap().unwrap();
            g.deployment
                .spec
                .unwrap()
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap()[CONNECTORS_HASH_ANNOTATION]
                .clone()
        };
        let before = hash(&connectors);
        connectors[0].spec.webhook.as_mut().unwrap().max_body_bytes = 1;
        assert_ne!(before, hash(&connectors));
    }

    #[test]
    fn webhook_urls_name_service_namespace_connector_and_path() {
        assert_eq!(
            webhook_url("finance", "wms", "/shipments"),
            "http://tallyman-gateway.finance.svc/webhooks/finance/wms/shipments"
        );
    }
}
