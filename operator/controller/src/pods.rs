//! What worker and gateway pods share: restricted pod security, the mounted
//! Secrets, the NATS URL, probes on the telemetry port.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    HTTPGetAction, PodSecurityContext, Probe, SeccompProfile, SecretVolumeSource, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tallyman_api::v1alpha1::ConnectorSpec;

/// Where Secrets are mounted, one directory per Secret: `<dir>/<name>/<key>`.
pub const SECRETS_DIR: &str = "/var/run/tallyman/secrets";
/// The port of `/healthz`, `/readyz` and `/metrics` in every pod.
pub const TELEMETRY_PORT: i32 = 9090;
/// The non-root user every pod runs as (the distroless `nonroot` user).
pub const USER: i64 = 65532;

/// The Secrets a set of Connectors reads, by name.
pub fn secret_names<'a>(
    connectors: impl IntoIterator<Item = &'a ConnectorSpec>,
) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for c in connectors {
        if let Some(rest) = &c.rest {
            if let Some(auth) = &rest.auth {
                if let Some(b) = &auth.bearer {
                    names.insert(b.secret_ref.name.clone());
                }
                if let Some(b) = &auth.basic {
                    names.insert(b.username.name.clone());
                    names.insert(b.password.name.clone());
                }
                if let Some(k) = &auth.api_key {
                    names.insert(k.secret_ref.name.clone());
                }
                if let Some(o) = &auth.oauth2_client_credentials {
                    names.insert(o.client_id.name.clone());
                    names.insert(o.client_secret.name.clone());
                }
            }
            if let Some(tls) = &rest.tls {
                names.insert(tls.ca_secret_ref.name.clone());
            }
        }
        if let Some(s) = c
            .webhook
            .as_ref()
            .and_then(|w| w.signature.secret_ref.as_ref())
        {
            names.insert(s.name.clone());
        }
    }
    names
}

/// A hash of the data of the Secrets `names` (a missing Secret hashes as
/// missing): it changes when any of them is rotated, created or deleted.
pub async fn secrets_hash(
    client: &kube::Client,
    namespace: &str,
    names: &BTreeSet<String>,
) -> Result<String, crate::error::Error> {
    use sha2::{Digest, Sha256};
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), namespace);
    let mut h = Sha256::new();
    for name in names {
        let secret = api
            .get_opt(name)
            .await
            .map_err(|source| crate::error::Error::Read {
                what: format!("Secret {namespace}/{name}"),
                source,
            })?;
        h.update(name.as_bytes());
        h.update([0]);
        match secret {
            Some(s) => {
                // BTreeMap: keys in a stable order.
                for (k, v) in s.data.unwrap_or_default() {
                    h.update(k.as_bytes());
                    h.update([0]);
                    h.update(&v.0);
                    h.update([0]);
                }
            }
            None => h.update(b"\x01missing"),
        }
    }
    Ok(hex::encode(&h.finalize()[..8]))
}

/// One read-only volume per Secret at `SECRETS_DIR/<name>`. Volume names are
/// numbered: a Secret's name may be longer than a volume name may be.
pub fn secret_volumes(names: &BTreeSet<String>) -> (Vec<Volume>, Vec<VolumeMount>) {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let volume = format!("secret-{i}");
            (
                Volume {
                    name: volume.clone(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(name.clone()),
                        default_mode: Some(0o440),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                VolumeMount {
                    name: volume,
                    mount_path: format!("{SECRETS_DIR}/{name}"),
                    read_only: Some(true),
                    ..Default::default()
                },
            )
        })
        .unzip()
}

/// A pod's volumes: its [`secret_volumes`], the ConfigMap `config_map`
/// read-only at `dir` (volume `volume`), and an empty `/tmp` (the root
/// filesystem is read-only; some libraries still want a /tmp).
pub fn volumes(
    secrets: &BTreeSet<String>,
    volume: &str,
    config_map: String,
    dir: &str,
) -> (Vec<Volume>, Vec<VolumeMount>) {
    let (mut volumes, mut mounts) = secret_volumes(secrets);
    volumes.push(Volume {
        name: volume.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map,
            ..Default::default()
        }),
        ..Default::default()
    });
    mounts.push(VolumeMount {
        name: volume.into(),
        mount_path: dir.into(),
        read_only: Some(true),
        ..Default::default()
    });
    volumes.push(Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    mounts.push(VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..Default::default()
    });
    (volumes, mounts)
}

/// Non-root, no privilege escalation, no capabilities, read-only root
/// filesystem, seccomp `RuntimeDefault`: the `restricted` Pod Security Standard.
pub fn container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(USER),
        run_as_group: Some(USER),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(USER),
        run_as_group: Some(USER),
        fs_group: Some(USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        period_seconds: Some(10),
        ..Default::default()
    }
}

/// A tallyman container: `args` after the image's entrypoint, the NATS URL
/// in the environment, probes and the telemetry port.
pub fn container(name: &str, image: &str, args: Vec<String>, nats_url: &str) -> Container {
    Container {
        name: name.into(),
        image: Some(image.into()),
        args: Some(args),
        env: Some(vec![EnvVar {
            name: "TALLYMAN_NATS_URL".into(),
            value: Some(nats_url.into()),
            ..Default::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: TELEMETRY_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        liveness_probe: Some(http_probe("/healthz")),
        readiness_probe: Some(http_probe("/readyz")),
        security_context: Some(container_security()),
        ..Default::default()
    }
}

/// `prometheus.io/*` annotations, so a plain Prometheus finds the pods.
pub fn scrape_annotations() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("prometheus.io/scrape".into(), "true".into()),
        ("prometheus.io/port".into(), TELEMETRY_PORT.to_string()),
        ("prometheus.io/path".into(), "/metrics".into()),
    ])
}
