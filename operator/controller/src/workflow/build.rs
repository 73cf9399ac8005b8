//! The desired children of a valid Workflow. Pure: the Workflow, its
//! resolved definition and the settings in, objects out.
//!
//! ```text
//! Workflow ──owns──▶ ConfigMap <wf>-definition   definition.json (resolved; Secrets by reference)
//!          ──owns──▶ ServiceAccount/Role/RoleBinding <wf>-worker   ExceptionCases, Events
//!          ──owns──▶ Deployment <wf>-worker   pod template annotated with the revision
//!          ──owns──▶ PodDisruptionBudget <wf>-worker
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{ConfigMap, PodSpec, PodTemplateSpec, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::{Resource, ResourceExt};
use tallyman_api::v1alpha1::Workflow;
use tallyman_core::engine::Definition;

use crate::context::Settings;
use crate::error::Error;
use crate::meta::{self, REVISION_ANNOTATION, SECRETS_HASH_ANNOTATION, WORKFLOW_LABEL};
use crate::pods;

/// Where the definition is mounted in a worker.
pub const DEFINITION_DIR: &str = "/etc/tallyman";
/// The ConfigMap key, and file name, of the definition.
pub const DEFINITION_KEY: &str = "definition.json";

/// The name of the Deployment, ServiceAccount, Role, RoleBinding and PDB.
pub fn worker_name(workflow: &str) -> String {
    format!("{workflow}-worker")
}

/// The name of the ConfigMap holding the definition.
pub fn definition_name(workflow: &str) -> String {
    format!("{workflow}-definition")
}

/// Everything a Workflow owns.
#[derive(Clone, Debug)]
pub struct Children {
    pub config_map: ConfigMap,
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub deployment: Deployment,
    pub pdb: PodDisruptionBudget,
}

fn metadata(wf: &Workflow, name: String) -> Result<ObjectMeta, Error> {
    let owner = wf
        .controller_owner_ref(&())
        .ok_or(Error::Incomplete("metadata.uid"))?;
    let mut labels = meta::labels("worker", &wf.name_any());
    labels.insert(WORKFLOW_LABEL.into(), wf.name_any());
    Ok(ObjectMeta {
        name: Some(name),
        namespace: wf.namespace(),
        labels: Some(labels),
        owner_references: Some(vec![owner]),
        ..Default::default()
    })
}

/// The children of `wf`, running `def`; `secrets_hash` is
/// the hash of [`pods::secrets_seen`] of the Secrets its pods mount.
pub fn build(
    wf: &Workflow,
    def: &Definition,
    settings: &Settings,
    secrets_hash: &str,
) -> Result<Children, Error> {
    let name = wf.name_any();
    let worker = worker_name(&name);
    let revision = def.revision();
    let json = serde_json::to_string_pretty(def).map_err(|source| Error::Encode {
        what: format!("the definition of Workflow {name}"),
        source,
    })?;
    let config_map = ConfigMap {
        metadata: metadata(wf, definition_name(&name))?,
        data: Some(BTreeMap::from([(DEFINITION_KEY.to_string(), json)])),
        ..Default::default()
    };

    let service_account = ServiceAccount {
        metadata: metadata(wf, worker.clone())?,
        ..Default::default()
    };
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|s| s.to_string()).collect()),
        resources: Some(resources.iter().map(|s| s.to_string()).collect()),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    // Only what a worker does in the cluster: open and follow ExceptionCases,
    // record outcomes in their status, and report Events.
    let role = Role {
        metadata: metadata(wf, worker.clone())?,
        rules: Some(vec![
            rule(
                &[tallyman_api::GROUP],
                &["exceptioncases"],
                &["get", "list", "watch", "create"],
            ),
            rule(
                &[tallyman_api::GROUP],
                &["exceptioncases/status"],
                &["update", "patch"],
            ),
            rule(&["", "events.k8s.io"], &["events"], &["create", "patch"]),
            // status.instances: the workers' counters, on their own Workflow only.
            PolicyRule {
                resource_names: Some(vec![wf.name_any()]),
                ..rule(&[tallyman_api::GROUP], &["workflows/status"], &["patch"])
            },
            // Its uid, which its Events name so `kubectl describe` finds them.
            PolicyRule {
                resource_names: Some(vec![wf.name_any()]),
                ..rule(&[tallyman_api::GROUP], &["workflows"], &["get"])
            },
        ]),
    };
    let role_binding = RoleBinding {
        metadata: metadata(wf, worker.clone())?,
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: worker.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: worker.clone(),
            namespace: wf.namespace(),
            ..Default::default()
        }]),
    };

    let selector = meta::selector("worker", &name);
    let secrets = pods::secret_names(&settings.pod_nats, def.connectors.values());
    let (volumes, mounts) = pods::volumes(
        &secrets,
        "definition",
        definition_name(&name),
        DEFINITION_DIR,
    );
    let mut args: Vec<String> = vec![
        "worker".into(),
        "--definition".into(),
        format!("{DEFINITION_DIR}/{DEFINITION_KEY}"),
        "--secrets-dir".into(),
        pods::SECRETS_DIR.into(),
        // Cases become ExceptionCases, decided with `kubectl tallyman`.
        "--cases".into(),
        "kubernetes".into(),
    ];
    if let Some(mib) = instance_cache_mib(wf) {
        args.extend(["--instance-cache-mib".into(), mib.to_string()]);
    }
    // The Workflow's own events: a Workflow deleted and created again
    // under this name starts from its new creation, not from the
    // namespace's history (its instances were removed with it).
    if let Some(since) = events_since(wf) {
        args.extend([
            "--events-since".into(),
            since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ]);
    }
    let mut container = pods::container("worker", args, settings);
    container.resources = wf.spec.workers.resources.clone();
    container.volume_mounts = Some(mounts);
    let mut pod_labels = meta::labels("worker", &name);
    pod_labels.insert(WORKFLOW_LABEL.into(), name.clone());
    let mut annotations = pods::scrape_annotations();
    annotations.insert(REVISION_ANNOTATION.into(), revision);
    annotations.insert(SECRETS_HASH_ANNOTATION.into(), secrets_hash.into());
    let deployment = Deployment {
        metadata: metadata(wf, worker.clone())?,
        spec: Some(DeploymentSpec {
            replicas: Some(wf.spec.workers.replicas),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(worker.clone()),
                    security_context: Some(pods::pod_security()),
                    containers: vec![container],
                    volumes: Some(volumes),
                    // Long enough for the worker to finish its messages in flight.
                    termination_grace_period_seconds: Some(60),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    // Any replica can advance any instance, so one pod at a time may go.
    let pdb = pods::disruption_budget(metadata(wf, worker)?, selector);
    Ok(Children {
        config_map,
        service_account,
        role,
        role_binding,
        deployment,
        pdb,
    })
}

/// With a memory limit on the worker container, half of it for the
/// running instances a worker holds between their inputs (the worker's
/// own default otherwise).
/// Where the Workflow's event consumer starts when it is created: its own
/// creation, so events published before it (a Workflow of the same name
/// deleted earlier, whose instances went with it) are not replayed.
pub fn events_since(wf: &Workflow) -> Option<chrono::DateTime<chrono::Utc>> {
    let created = wf.metadata.creation_timestamp.as_ref()?;
    chrono::DateTime::from_timestamp(created.0.as_second(), 0)
}

fn instance_cache_mib(wf: &Workflow) -> Option<u64> {
    let limit = wf
        .spec
        .workers
        .resources
        .as_ref()?
        .limits
        .as_ref()?
        .get("memory")?;
    let bytes = quantity_bytes(&limit.0)?;
    Some((bytes / 2 / (1 << 20)).max(1))
}

/// A Kubernetes quantity (`512Mi`, `1G`, `1.5Gi`, `268435456`, `1e9`) in
/// bytes, rounded down; `None` when it is not one.
fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "m" => 1e-3,
        exp if exp.starts_with(['e', 'E']) => 10f64.powi(exp[1..].parse().ok()?),
        _ => return None,
    };
    let bytes = number * factor;
    (bytes.is_finite() && bytes >= 0.0).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use crate::workflow::validate::validate;

    fn settings() -> Settings {
        Settings {
            image: "ghcr.io/tallyman-dev/tallyman:test".into(),
            nats_url: "nats://nats:4222".into(),
            pod_nats: Default::default(),
        }
    }

    fn built(example: &str) -> (Workflow, Definition, Children) {
        built_with(example, &settings())
    }

    fn built_with(example: &str, settings: &Settings) -> (Workflow, Definition, Children) {
        let set = fixtures::example(example);
        let mut wf = set.workflows[0].clone();
        wf.metadata.uid = Some("uid-1".into());
        let def = validate(&wf, &set.connectors, &set.policies).unwrap();
        let children = build(&wf, &def, settings, "h0").unwrap();
        (wf, def, children)
    }

    #[test]
    fn workers_connect_to_a_secured_nats_with_secrets_of_their_namespace() {
        let (_, def, children) =
            built_with("shipment-to-invoice", &pods::secured::settings(settings()));
        let pod = children.deployment.spec.unwrap().template.spec.unwrap();
        pods::secured::assert_connects_with_mounted_files(&pod);
        // The Connectors' Secrets are still mounted beside them.
        let mounts = pod.containers[0].volume_mounts.as_ref().unwrap();
        for s in pods::secret_names(&Default::default(), def.connectors.values()) {
            assert!(
                mounts
                    .iter()
                    .any(|m| m.mount_path.ends_with(&format!("/{s}"))),
                "{s}"
            );
        }
    }

    #[test]
    fn held_instances_get_half_the_memory_limit_or_the_worker_default() {
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let (mut wf, _, _) = built("shipment-to-invoice");
        let set_limit = |wf: &mut Workflow, q: Option<&str>| {
            let resources = wf
                .spec
                .workers
                .resources
                .get_or_insert_with(Default::default);
            resources.limits = q.map(|q| BTreeMap::from([("memory".into(), Quantity(q.into()))]));
        };
        for (limit, mib) in [
            (Some("1Gi"), Some(512)),
            (Some("1G"), Some(476)),
            (Some("1.5Gi"), Some(768)),
            (Some("268435456"), Some(128)),
            (Some("1e9"), Some(476)),
            (Some("1Mi"), Some(1)),
            (Some("lots"), None),
            (None, None),
        ] {
            set_limit(&mut wf, limit);
            assert_eq!(instance_cache_mib(&wf), mib, "{limit:?}");
        }
        wf.spec.workers.resources = None;
        assert_eq!(instance_cache_mib(&wf), None);
        let set = fixtures::example("shipment-to-invoice");
        let def = validate(&wf, &set.connectors, &set.policies).unwrap();
        let children = build(&wf, &def, &settings(), "h0").unwrap();
        let pod = children.deployment.spec.unwrap().template.spec.unwrap();
        let args = pod.containers[0].args.clone().unwrap();
        assert!(
            !args.iter().any(|a| a == "--instance-cache-mib"),
            "{args:?}"
        );
    }

    #[test]
    fn the_config_map_holds_the_definition_the_worker_reads() {
        let (_, def, c) = built("shipment-to-invoice");
        let json = &c.config_map.data.as_ref().unwrap()[DEFINITION_KEY];
        let read: Definition = serde_json::from_str(json).unwrap();
        assert_eq!(read, def);
        // Secrets stay references: no value of the example's Secrets is copied.
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/shipment-to-invoice/secrets.yaml");
        let secrets = tallyman_core::manifest::load(&[dir]);
        let mut values = 0;
        for doc in &secrets.documents {
            for v in doc.value["stringData"]
                .as_object()
                .into_iter()
                .flat_map(|m| m.values())
            {
                let v = v.as_str().unwrap();
                values += 1;
                assert!(!json.contains(v), "a Secret's value was copied");
            }
        }
        assert!(values > 0);
        assert!(json.contains("secretRef"));
    }

    #[test]
    fn the_worker_runs_the_definition_with_every_secret_mounted() {
        let (wf, def, c) = built("shipment-to-invoice");
        let spec = c.deployment.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(wf.spec.workers.replicas));
        let pod = spec.template.spec.as_ref().unwrap();
        let container = &pod.containers[0];
        assert_eq!(
            container.args.as_ref().unwrap(),
            &[
                "worker",
                "--definition",
                "/etc/tallyman/definition.json",
                "--secrets-dir",
                "/var/run/tallyman/secrets",
                "--cases",
                "kubernetes",
                // Half of the example's 256Mi limit.
                "--instance-cache-mib",
                "128"
            ]
        );
        assert_eq!(container.resources, wf.spec.workers.resources);
        let env = container.env.as_ref().unwrap();
        assert!(env.iter().any(
            |e| e.name == "TALLYMAN_NATS_URL" && e.value.as_deref() == Some("nats://nats:4222")
        ));
        let secrets = pods::secret_names(&settings().pod_nats, def.connectors.values());
        assert!(!secrets.is_empty());
        let mounts = container.volume_mounts.as_ref().unwrap();
        for s in &secrets {
            let mount = mounts
                .iter()
                .find(|m| m.mount_path == format!("/var/run/tallyman/secrets/{s}"))
                .unwrap_or_else(|| panic!("{s} not mounted"));
            let volume = pod
                .volumes
                .as_ref()
                .unwrap()
                .iter()
                .find(|v| v.name == mount.name)
                .unwrap();
            assert_eq!(
                volume.secret.as_ref().unwrap().secret_name.as_deref(),
                Some(s.as_str())
            );
        }
        let annotations = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap();
        assert_eq!(annotations[REVISION_ANNOTATION], def.revision());
    }

    #[test]
    fn pods_meet_the_restricted_pod_security_standard() {
        let (_, _, c) = built("three-way-match");
        let pod = c.deployment.spec.unwrap().template.spec.unwrap();
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let sc = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(
            sc.capabilities.unwrap().drop.unwrap(),
            vec!["ALL".to_string()]
        );
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    }

    #[test]
    fn the_budget_lets_one_worker_go_and_any_broken_one() {
        let (_, _, c) = built("shipment-to-invoice");
        crate::pods::assert_drains_one_at_a_time(&c.pdb, &c.deployment);
    }

    #[test]
    fn every_child_is_owned_and_labelled() {
        let (wf, _, c) = built("returns-to-credit");
        let metas = [
            &c.config_map.metadata,
            &c.service_account.metadata,
            &c.role.metadata,
            &c.role_binding.metadata,
            &c.deployment.metadata,
            &c.pdb.metadata,
        ];
        for m in metas {
            let owner = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.controller),
                ("Workflow", Some(true))
            );
            assert_eq!(owner.uid, "uid-1");
            let labels = m.labels.as_ref().unwrap();
            assert_eq!(labels["app.kubernetes.io/instance"], wf.name_any());
            assert_eq!(labels["app.kubernetes.io/managed-by"], "tallyman-operator");
            assert_eq!(m.namespace, wf.namespace());
        }
    }

    #[test]
    fn the_role_grants_only_cases_events_and_its_own_workflow() {
        let (_, _, c) = built("inventory-adjustment");
        let rules = c.role.rules.unwrap();
        let mut grants: Vec<(String, String)> = Vec::new();
        for r in &rules {
            for res in r.resources.as_ref().unwrap() {
                for v in &r.verbs {
                    grants.push((res.clone(), v.clone()));
                }
            }
        }
        assert!(grants.contains(&("exceptioncases".into(), "create".into())));
        assert!(grants.contains(&("exceptioncases/status".into(), "patch".into())));
        assert!(grants.contains(&("events".into(), "create".into())));
        assert!(
            grants
                .iter()
                .all(|(res, v)| res.starts_with("exceptioncases")
                    || res == "events" && (v == "create" || v == "patch")
                    || res == "workflows/status" && v == "patch"
                    || res == "workflows" && v == "get")
        );
        // Its own Workflow and its status, no other.
        for resource in ["workflows/status", "workflows"] {
            let own = rules
                .iter()
                .find(|r| r.resources.as_ref().unwrap() == &[resource])
                .unwrap();
            assert_eq!(
                own.resource_names.as_deref(),
                Some(&["inventory-adjustment".to_string()][..]),
                "{resource}"
            );
        }
        assert!(!grants.iter().any(|(_, v)| v == "delete" || v == "*"));
    }

    #[test]
    fn a_changed_connector_changes_the_pod_template() {
        let set = fixtures::example("shipment-to-invoice");
        let mut wf = set.workflows[0].clone();
        wf.metadata.uid = Some("uid-1".into());
        let def = validate(&wf, &set.connectors, &set.policies).unwrap();
        let before = build(&wf, &def, &settings(), "h0").unwrap().deployment;
        let mut connectors = set.connectors.clone();
        for c in &mut connectors {
            if let Some(rest) = &mut c.spec.rest {
                rest.base_url = "https://erp2.example.com/api".into();
            }
        }
        let def2 = validate(&wf, &connectors, &set.policies).unwrap();
        let after = build(&wf, &def2, &settings(), "h0").unwrap().deployment;
        let rev = |d: &Deployment| {
            d.spec
                .as_ref()
                .unwrap()
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap()[REVISION_ANNOTATION]
                .clone()
        };
        assert_ne!(rev(&before), rev(&after));
    }

    #[test]
    fn a_rotated_secret_changes_the_pod_template() {
        let set = fixtures::example("shipment-to-invoice");
        let mut wf = set.workflows[0].clone();
        wf.metadata.uid = Some("uid-1".into());
        let def = validate(&wf, &set.connectors, &set.policies).unwrap();
        let template = |h: &str| {
            build(&wf, &def, &settings(), h)
                .unwrap()
                .deployment
                .spec
                .unwrap()
                .template
        };
        assert_ne!(template("h0"), template("h1"));
        let t = template("h1");
        assert_eq!(
            t.metadata.unwrap().annotations.unwrap()[SECRETS_HASH_ANNOTATION],
            "h1"
        );
    }
}
