//! What worker and gateway pods share: restricted pod security, the mounted
//! Secrets, the NATS URL and credentials, probes on the telemetry port.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    HTTPGetAction, PodSecurityContext, Probe, SeccompProfile, SecretVolumeSource, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tallyman_api::v1alpha1::ConnectorSpec;

use tallyman_api::v1alpha1::SecretKeyRef;

use crate::context::{PodNats, Settings};

/// Where Secrets are mounted, one directory per Secret: `<dir>/<name>/<key>`.
pub const SECRETS_DIR: &str = "/var/run/tallyman/secrets";
/// The port of `/healthz`, `/readyz` and `/metrics` in every pod.
pub const TELEMETRY_PORT: i32 = 9090;
/// The non-root user every pod runs as (the distroless `nonroot` user).
pub const USER: i64 = 65532;

/// The Secrets a pod mounts, by name, with the keys it reads from each.
pub type SecretKeys = BTreeMap<String, BTreeSet<String>>;

/// [`SecretKeys`] of a pod: those of its NATS credentials and CA, and
/// those a set of Connectors reads.
pub fn secret_keys<'a>(
    nats: &PodNats,
    connectors: impl IntoIterator<Item = &'a ConnectorSpec>,
) -> SecretKeys {
    let mut refs: Vec<&SecretKeyRef> = [&nats.creds, &nats.ca].into_iter().flatten().collect();
    for c in connectors {
        if let Some(rest) = &c.rest {
            if let Some(auth) = &rest.auth {
                if let Some(b) = &auth.bearer {
                    refs.push(&b.secret_ref);
                }
                if let Some(b) = &auth.basic {
                    refs.extend([&b.username, &b.password]);
                }
                if let Some(k) = &auth.api_key {
                    refs.push(&k.secret_ref);
                }
                if let Some(o) = &auth.oauth2_client_credentials {
                    refs.extend([&o.client_id, &o.client_secret]);
                }
            }
            if let Some(tls) = &rest.tls {
                refs.push(&tls.ca_secret_ref);
            }
        }
        if let Some(s) = c
            .webhook
            .as_ref()
            .and_then(|w| w.signature.secret_ref.as_ref())
        {
            refs.push(s);
        }
    }
    let mut keys = SecretKeys::new();
    for r in refs {
        keys.entry(r.name.clone())
            .or_default()
            .insert(r.key.clone());
    }
    keys
}

/// The Secrets a pod mounts, by name: those of its NATS credentials and
/// CA, and those a set of Connectors reads.
pub fn secret_names<'a>(
    nats: &PodNats,
    connectors: impl IntoIterator<Item = &'a ConnectorSpec>,
) -> BTreeSet<String> {
    secret_keys(nats, connectors).into_keys().collect()
}

/// What the Secrets a pod mounts are like now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretsSeen {
    /// A hash of their data (a missing Secret hashes as missing): it
    /// changes when any of them is rotated, created or deleted.
    pub hash: String,
    /// Those that do not exist (a pod that mounts them cannot start), and
    /// keys a pod reads that its Secret does not have, as `secret: key k`.
    pub missing: Vec<String>,
}

/// [`SecretsSeen`] of the Secrets `keys` of `namespace`.
pub async fn secrets_seen(
    client: &kube::Client,
    namespace: &str,
    keys: &SecretKeys,
) -> Result<SecretsSeen, crate::error::Error> {
    use sha2::{Digest, Sha256};
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), namespace);
    let mut h = Sha256::new();
    let mut missing = Vec::new();
    for (name, wanted) in keys {
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
                // `stringData` too: the API server folds it into `data`, a
                // fake may not.
                let has = |k: &String| {
                    s.data.as_ref().is_some_and(|d| d.contains_key(k))
                        || s.string_data.as_ref().is_some_and(|d| d.contains_key(k))
                };
                for k in wanted.iter().filter(|k| !has(k)) {
                    missing.push(format!("{name}: key {k}"));
                }
                // BTreeMap: keys in a stable order.
                for (k, v) in s.data.unwrap_or_default() {
                    h.update(k.as_bytes());
                    h.update([0]);
                    h.update(&v.0);
                    h.update([0]);
                }
            }
            None => {
                h.update(b"\x01missing");
                missing.push(name.clone());
            }
        }
    }
    Ok(SecretsSeen {
        hash: hex::encode(&h.finalize()[..8]),
        missing,
    })
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
/// and the files of its credentials and CA (mounted with
/// [`secret_volumes`]) in the environment, probes and the telemetry port.
pub fn container(name: &str, args: Vec<String>, settings: &Settings) -> Container {
    let var = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let mut env = vec![var("TALLYMAN_NATS_URL", settings.nats_url.clone())];
    let file = |k: &SecretKeyRef| format!("{SECRETS_DIR}/{}/{}", k.name, k.key);
    if let Some(creds) = &settings.pod_nats.creds {
        env.push(var("TALLYMAN_NATS_CREDS", file(creds)));
    }
    if let Some(ca) = &settings.pod_nats.ca {
        env.push(var("TALLYMAN_NATS_CA", file(ca)));
    }
    Container {
        name: name.into(),
        image: Some(settings.image.clone()),
        args: Some(args),
        env: Some(env),
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

/// The disruption budget of the pods `selector` picks: one at a time may
/// go. A pod that is not ready (crash-looping, waiting for a Secret) does
/// no work, so it may always go: with the default policy, pods that all
/// fail would block every node drain.
pub fn disruption_budget(
    metadata: ObjectMeta,
    selector: BTreeMap<String, String>,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..Default::default()
        }),
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

/// What the worker and gateway tests check of their disruption budget: one
/// pod at a time, any pod that is not ready at any time, and the pods of
/// `deployment`.
#[cfg(test)]
pub(crate) fn assert_drains_one_at_a_time(
    pdb: &PodDisruptionBudget,
    deployment: &k8s_openapi::api::apps::v1::Deployment,
) {
    let spec = pdb.spec.as_ref().unwrap();
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
    // Pods that are not ready may always be evicted: workers that all
    // crash-loop must not block node drains.
    assert_eq!(
        spec.unhealthy_pod_eviction_policy.as_deref(),
        Some("AlwaysAllow")
    );
    assert_eq!(
        spec.selector.as_ref().unwrap().match_labels,
        deployment.spec.as_ref().unwrap().selector.match_labels
    );
}

/// What the worker and gateway tests check of a pod that connects to a
/// secured NATS.
#[cfg(test)]
pub(crate) mod secured {
    use k8s_openapi::api::core::v1::PodSpec;

    use super::*;

    /// Settings whose pods use the credentials in Secret `nats-user` (key
    /// `user.creds`) and the CA in Secret `nats-ca` (key `ca.crt`).
    pub fn settings(mut base: Settings) -> Settings {
        base.pod_nats = PodNats {
            creds: Some(
                crate::context::secret_key_ref("creds", "nats-user", "user.creds").unwrap(),
            ),
            ca: Some(crate::context::secret_key_ref("ca", "nats-ca", "ca.crt").unwrap()),
        };
        base
    }

    /// `pod`'s container names files that a volume of the right Secret
    /// provides, in `TALLYMAN_NATS_CREDS` and `TALLYMAN_NATS_CA`.
    pub fn assert_connects_with_mounted_files(pod: &PodSpec) {
        let container = &pod.containers[0];
        let env = container.env.as_ref().unwrap();
        let mounts = container.volume_mounts.as_ref().unwrap();
        let volumes = pod.volumes.as_ref().unwrap();
        for (var, secret, key) in [
            ("TALLYMAN_NATS_CREDS", "nats-user", "user.creds"),
            ("TALLYMAN_NATS_CA", "nats-ca", "ca.crt"),
        ] {
            let file = env
                .iter()
                .find(|e| e.name == var)
                .and_then(|e| e.value.clone())
                .unwrap_or_else(|| panic!("{var} is not set"));
            assert_eq!(file, format!("{SECRETS_DIR}/{secret}/{key}"));
            let mount = mounts
                .iter()
                .find(|m| file.starts_with(&format!("{}/", m.mount_path)))
                .unwrap_or_else(|| panic!("no volume is mounted where {file} is"));
            assert_eq!(mount.read_only, Some(true));
            let volume = volumes.iter().find(|v| v.name == mount.name).unwrap();
            assert_eq!(
                volume
                    .secret
                    .as_ref()
                    .and_then(|s| s.secret_name.as_deref()),
                Some(secret),
                "{file}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            image: "tallyman:test".into(),
            nats_url: "tls://nats:4222".into(),
            pod_nats: PodNats::default(),
        }
    }

    #[test]
    fn without_nats_secrets_the_pod_has_only_the_url() {
        let c = container("worker", vec![], &settings());
        let names: Vec<&str> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(names, ["TALLYMAN_NATS_URL"]);
        assert!(secret_names(&PodNats::default(), []).is_empty());
    }

    #[test]
    fn nats_secrets_are_mounted_with_the_connectors_secrets() {
        let s = secured::settings(settings());
        let names = secret_names(&s.pod_nats, []);
        assert_eq!(
            names.iter().map(String::as_str).collect::<Vec<_>>(),
            ["nats-ca", "nats-user"]
        );
        // One Secret for both: one mount.
        let one = PodNats {
            creds: Some(crate::context::secret_key_ref("c", "nats", "user.creds").unwrap()),
            ca: Some(crate::context::secret_key_ref("c", "nats", "ca.crt").unwrap()),
        };
        assert_eq!(secret_names(&one, []).len(), 1);
    }

    #[test]
    fn every_key_a_pod_reads_is_listed_under_its_secret() {
        let set = crate::fixtures::example("shipment-to-invoice");
        let keys = secret_keys(
            &secured::settings(settings()).pod_nats,
            set.connectors.iter().map(|c| &c.spec),
        );
        assert_eq!(
            keys["nats-user"],
            BTreeSet::from(["user.creds".to_string()])
        );
        assert_eq!(keys["nats-ca"], BTreeSet::from(["ca.crt".to_string()]));
        // The example's Connectors: the ERP's bearer token and the webhook
        // signing Secrets, each with the key its Connector names.
        let erp = set
            .connectors
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some("erp"))
            .unwrap();
        let token = &erp
            .spec
            .rest
            .as_ref()
            .unwrap()
            .auth
            .as_ref()
            .unwrap()
            .bearer
            .as_ref()
            .unwrap()
            .secret_ref;
        assert!(keys[&token.name].contains(&token.key), "{keys:?}");
        assert_eq!(
            keys.keys().cloned().collect::<BTreeSet<_>>(),
            secret_names(
                &secured::settings(settings()).pod_nats,
                set.connectors.iter().map(|c| &c.spec)
            )
        );
    }

    #[test]
    fn secret_names_and_keys_are_checked_with_the_flag_named() {
        for (secret, key) in [
            ("Upper", "k"),
            ("-lead", "k"),
            ("a..b", "k"),
            ("", "k"),
            ("ok", ""),
            ("ok", "a/b"),
            ("ok", ".."),
        ] {
            let err =
                crate::context::secret_key_ref("--pod-nats-creds-secret", secret, key).unwrap_err();
            assert!(err.starts_with("--pod-nats-creds-secret: "), "{err}");
        }
        assert!(crate::context::secret_key_ref("f", "nats.tallyman-1", "user_1.creds").is_ok());
    }
}
