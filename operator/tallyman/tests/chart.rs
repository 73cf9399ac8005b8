//! The Helm chart as the API server would receive it: `scripts/test-chart
//! --render` renders `charts/tallyman` with Helm's own engine (offline, from
//! the helm-python-sdk wheel) for the default values and for
//! `ci/custom-values.yaml`, and these tests read every rendered object back.
//!
//! Each object must deserialize into its Kubernetes type and serialize back
//! to the same JSON (so a misspelt or misplaced field fails, not only a wrong
//! type), carry the `app.kubernetes.io/*` labels, run restricted, and hold no
//! RBAC wildcard. The CRDs must be the generated ones, and the custom values
//! must rename and relocate everything they claim to.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The template the admission-policy author writes as plain YAML: it has
/// no Helm syntax, so it cannot follow nameOverride or commonLabels.
const ADMISSION_SOURCE: &str = "tallyman/templates/exceptioncase-admission.yaml";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[derive(Clone, Copy, Debug)]
enum Values {
    Default,
    Custom,
}

impl Values {
    const ALL: [Values; 2] = [Values::Default, Values::Custom];

    fn label(self) -> &'static str {
        match self {
            Values::Default => "default",
            Values::Custom => "custom",
        }
    }
    /// What scripts/test-chart renders each values file as.
    fn release(self) -> &'static str {
        match self {
            Values::Default => "tallyman",
            Values::Custom => "acme",
        }
    }
    fn namespace(self) -> &'static str {
        match self {
            Values::Default => "tallyman-system",
            Values::Custom => "finance-platform",
        }
    }
    /// app.kubernetes.io/name (nameOverride).
    fn name(self) -> &'static str {
        match self {
            Values::Default => "tallyman",
            Values::Custom => "ledger",
        }
    }
    /// The prefix of every object name (fullnameOverride).
    fn fullname(self) -> &'static str {
        match self {
            Values::Default => "tallyman",
            Values::Custom => "acme-ledger",
        }
    }
    fn image(self) -> &'static str {
        match self {
            Values::Default => "ghcr.io/tallyman-dev/tallyman:0.1.0",
            Values::Custom => {
                "registry.acme.example/acme/ledger-operator@sha256:3f1b0c1e8a4f6d9b2c7e5a0d4f8b1c3e6a9d2f5b8c1e4a7d0f3b6c9e2a5d8f1b"
            }
        }
    }
    fn common_labels(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Values::Default => &[],
            Values::Custom => &[
                ("acme.example/team", "finance-platform"),
                ("acme.example/cost-center", "4711"),
            ],
        }
    }
    fn common_annotations(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Values::Default => &[],
            Values::Custom => &[("acme.example/owner", "finance-platform@acme.example")],
        }
    }
}

/// One rendered document.
#[derive(Debug)]
struct Object {
    /// The template (or CRD file) it came from, as `helm template` names it.
    source: String,
    value: Value,
}

impl Object {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
    fn id(&self) -> String {
        format!("{} {} ({})", self.kind(), self.name(), self.source)
    }
    fn is_crd(&self) -> bool {
        self.kind() == "CustomResourceDefinition"
    }
    fn typed<T: DeserializeOwned>(&self) -> T {
        serde_json::from_value(self.value.clone())
            .unwrap_or_else(|e| panic!("{} does not parse as its type: {e}", self.id()))
    }
}

/// Renders the chart with Helm into a fresh directory and reads the objects back.
fn render(values: Values) -> Vec<Object> {
    let out = tempfile::tempdir().expect("a temporary directory");
    let status = Command::new("bash")
        .arg(root().join("scripts/test-chart"))
        .arg("--render")
        .env("TALLYMAN_CHART_OUT", out.path())
        .current_dir(root())
        .status()
        .expect("failed to run scripts/test-chart");
    assert!(
        status.success(),
        "scripts/test-chart --render failed: {status}"
    );
    let path = out.path().join(format!("{}.yaml", values.label()));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()));
    let objects = parse(&text);
    assert!(
        objects.len() >= 10,
        "{}: only {} objects rendered",
        values.label(),
        objects.len()
    );
    objects
}

fn parse(text: &str) -> Vec<Object> {
    text.split("\n---\n")
        .map(|doc| {
            let source = doc
                .lines()
                .find_map(|l| l.strip_prefix("# Source: "))
                .unwrap_or_else(|| panic!("a document without a # Source line:\n{doc}"))
                .to_string();
            let value: Value = serde_yaml::from_str(doc)
                .unwrap_or_else(|e| panic!("{source} is not YAML: {e}\n{doc}"));
            assert!(value.is_object(), "{source} is not one object");
            Object { source, value }
        })
        .collect()
}

/// `value` deserializes into `T`, and serializing that gives `value` back:
/// a field the type does not know, or in the wrong place, is lost on the
/// way and shows up as a difference.
fn round_trip<T: DeserializeOwned + Serialize>(object: &Object) {
    let typed: T = object.typed();
    let back = serde_json::to_value(&typed).expect("serializes");
    if let Some(path) = first_difference(&object.value, &back, String::new()) {
        panic!(
            "{} does not survive its Kubernetes type: {path} differs (a field the type does not have, or a wrong shape)",
            object.id()
        );
    }
}

fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(v), Some(w)) => first_difference(v, w, p),
                    _ => Some(p),
                }
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{path}[{i}]"))),
        (Value::Number(x), Value::Number(y)) => (x.as_f64() != y.as_f64()).then_some(path),
        _ => (a != b).then_some(path),
    }
}

/// Parses every object as its own type; a kind this list does not know fails,
/// so a new template is also a new line here.
fn check_types(objects: &[Object]) {
    for o in objects {
        let api = o.value["apiVersion"].as_str().unwrap_or_default();
        match (api, o.kind()) {
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                round_trip::<CustomResourceDefinition>(o)
            }
            ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(o),
            ("v1", "Service") => round_trip::<Service>(o),
            ("v1", "ConfigMap") => round_trip::<ConfigMap>(o),
            ("apps/v1", "Deployment") => round_trip::<Deployment>(o),
            ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(o),
            ("networking.k8s.io/v1", "NetworkPolicy") => round_trip::<NetworkPolicy>(o),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(o),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                round_trip::<ClusterRoleBinding>(o)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(o),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(o),
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
                round_trip::<ValidatingAdmissionPolicy>(o)
            }
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
                round_trip::<ValidatingAdmissionPolicyBinding>(o)
            }
            // The Prometheus Operator's kinds are not in k8s-openapi: their
            // shape is checked by `monitoring_objects`.
            ("monitoring.coreos.com/v1", "ServiceMonitor" | "PodMonitor" | "PrometheusRule") => {
                monitoring_object(o)
            }
            _ => panic!("{}: unexpected apiVersion {api}", o.id()),
        }
    }
}

fn monitoring_object(o: &Object) {
    let spec = &o.value["spec"];
    match o.kind() {
        "ServiceMonitor" => {
            let endpoints = spec["endpoints"].as_array().expect("endpoints");
            assert!(!endpoints.is_empty(), "{}: no endpoints", o.id());
            for e in endpoints {
                assert_eq!(e["port"], "metrics", "{}", o.id());
                assert_eq!(e["path"], "/metrics", "{}", o.id());
            }
            assert!(spec["selector"]["matchLabels"].is_object(), "{}", o.id());
        }
        "PodMonitor" => {
            let endpoints = spec["podMetricsEndpoints"].as_array().expect("endpoints");
            assert!(!endpoints.is_empty(), "{}: no endpoints", o.id());
            assert!(spec["selector"].is_object(), "{}", o.id());
        }
        "PrometheusRule" => {
            let groups = spec["groups"].as_array().expect("groups");
            for g in groups {
                for rule in g["rules"].as_array().expect("rules") {
                    let alert = rule["alert"].as_str().expect("every rule is an alert");
                    assert!(
                        rule["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                        "{alert}: no expr"
                    );
                    assert!(
                        rule["labels"]["severity"].is_string(),
                        "{alert}: no severity"
                    );
                    assert!(
                        rule["annotations"]["summary"].is_string(),
                        "{alert}: no summary"
                    );
                }
            }
        }
        other => panic!("unexpected monitoring kind {other}"),
    }
}

#[test]
fn every_object_parses_as_its_kubernetes_type() {
    for values in Values::ALL {
        let objects = render(values);
        check_types(&objects);
        let kinds: BTreeSet<&str> = objects.iter().map(Object::kind).collect();
        for kind in [
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Deployment",
            "PodDisruptionBudget",
        ] {
            assert!(kinds.contains(kind), "{}: no {kind}", values.label());
        }
    }
}

fn labels(value: &Value) -> &serde_json::Map<String, Value> {
    value["metadata"]["labels"]
        .as_object()
        .unwrap_or_else(|| panic!("no labels on {}", value["metadata"]["name"]))
}

#[test]
fn every_object_carries_the_recommended_labels() {
    for values in Values::ALL {
        for o in render(values) {
            if o.is_crd() {
                // Shipped byte for byte from crds/ (Helm never templates a
                // chart's crds/ folder); see `crds_are_the_generated_ones`.
                continue;
            }
            let l = labels(&o.value);
            if o.source == ADMISSION_SOURCE {
                assert!(
                    l.keys().any(|k| k.starts_with("app.kubernetes.io/")),
                    "{}: no app.kubernetes.io/* label",
                    o.id()
                );
                continue;
            }
            let mut metas = vec![("object", &o.value)];
            if let Some(template) = o.value["spec"].get("template") {
                metas.push(("pod template", template));
            }
            for (what, meta) in metas {
                let l = labels(meta);
                let get = |k: &str| l.get(k).and_then(Value::as_str);
                assert_eq!(
                    get("app.kubernetes.io/name"),
                    Some(values.name()),
                    "{} {what}",
                    o.id()
                );
                assert_eq!(
                    get("app.kubernetes.io/instance"),
                    Some(values.release()),
                    "{} {what}",
                    o.id()
                );
                assert_eq!(
                    get("app.kubernetes.io/part-of"),
                    Some("tallyman"),
                    "{} {what}",
                    o.id()
                );
                assert_eq!(
                    get("app.kubernetes.io/managed-by"),
                    Some("Helm"),
                    "{} {what}",
                    o.id()
                );
                assert!(
                    get("app.kubernetes.io/version").is_some(),
                    "{} {what}",
                    o.id()
                );
                assert!(
                    get("app.kubernetes.io/component").is_some(),
                    "{} {what}",
                    o.id()
                );
                for (k, v) in values.common_labels() {
                    assert_eq!(get(k), Some(*v), "{} {what}: commonLabels {k}", o.id());
                }
                let annotations = &meta["metadata"]["annotations"];
                for (k, v) in values.common_annotations() {
                    assert_eq!(
                        annotations[k],
                        *v,
                        "{} {what}: commonAnnotations {k}",
                        o.id()
                    );
                }
            }
            // Namespaced objects go to the release namespace (the dashboard
            // may be sent to Grafana's).
            let ns = o.value["metadata"]["namespace"].as_str();
            match o.kind() {
                "ClusterRole" | "ClusterRoleBinding" => assert_eq!(ns, None, "{}", o.id()),
                "ConfigMap" => assert!(ns.is_some(), "{}", o.id()),
                _ => assert_eq!(ns, Some(values.namespace()), "{}", o.id()),
            }
        }
    }
}

/// The restricted Pod Security Standard, and a read-only root filesystem.
fn check_restricted(id: &str, pod: &PodSpec) {
    let psc = pod.security_context.clone().unwrap_or_default();
    assert!(pod.host_network != Some(true), "{id}: hostNetwork");
    assert!(pod.host_pid != Some(true), "{id}: hostPID");
    assert!(pod.host_ipc != Some(true), "{id}: hostIPC");
    for v in pod.volumes.iter().flatten() {
        assert!(v.host_path.is_none(), "{id}: hostPath volume {}", v.name);
    }
    let pod_seccomp = psc.seccomp_profile.as_ref().map(|s| s.type_.as_str());
    let containers = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    for c in containers {
        let id = format!("{id} container {}", c.name);
        let sc = c
            .security_context
            .clone()
            .unwrap_or_else(|| panic!("{id}: no securityContext"));
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{id}: allowPrivilegeEscalation"
        );
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{id}: readOnlyRootFilesystem"
        );
        assert!(sc.privileged != Some(true), "{id}: privileged");
        assert_eq!(
            sc.run_as_non_root.or(psc.run_as_non_root),
            Some(true),
            "{id}: runAsNonRoot"
        );
        assert!(
            sc.run_as_user.or(psc.run_as_user) != Some(0),
            "{id}: runs as uid 0"
        );
        let caps = sc.capabilities.unwrap_or_default();
        assert!(
            caps.drop.iter().flatten().any(|c| c == "ALL"),
            "{id}: capabilities do not drop ALL"
        );
        assert!(
            caps.add.unwrap_or_default().is_empty(),
            "{id}: adds capabilities"
        );
        let seccomp = sc
            .seccomp_profile
            .as_ref()
            .map(|s| s.type_.as_str())
            .or(pod_seccomp);
        assert!(
            matches!(seccomp, Some("RuntimeDefault" | "Localhost")),
            "{id}: seccompProfile {seccomp:?}"
        );
        assert!(
            c.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .is_some(),
            "{id}: no resource requests"
        );
        assert!(
            c.resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .is_some_and(|l| l.contains_key("memory")),
            "{id}: no memory limit"
        );
    }
}

#[test]
fn every_pod_runs_restricted() {
    for values in Values::ALL {
        let objects = render(values);
        let mut pods = 0;
        for o in &objects {
            if o.kind() == "Deployment" {
                let d: Deployment = o.typed();
                let pod = d
                    .spec
                    .and_then(|s| s.template.spec)
                    .expect("a pod template");
                check_restricted(&o.id(), &pod);
                pods += 1;
            }
        }
        assert!(pods > 0, "{}: no pod template rendered", values.label());
    }
}

fn rules(o: &Object) -> Vec<PolicyRule> {
    match o.kind() {
        "ClusterRole" => o.typed::<ClusterRole>().rules.unwrap_or_default(),
        "Role" => o.typed::<Role>().rules.unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn grants(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups.iter().flatten().any(|g| g == group)
            && r.resources.iter().flatten().any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
            && r.resource_names.as_ref().is_none_or(Vec::is_empty)
    })
}

#[test]
fn rbac_is_least_privilege_without_wildcards() {
    for values in Values::ALL {
        let objects = render(values);
        for o in &objects {
            for r in rules(o) {
                let fields = [
                    r.api_groups.clone().unwrap_or_default(),
                    r.resources.clone().unwrap_or_default(),
                    r.verbs.clone(),
                    r.resource_names.clone().unwrap_or_default(),
                    r.non_resource_urls.clone().unwrap_or_default(),
                ];
                for s in fields.iter().flatten() {
                    assert!(!s.contains('*'), "{}: wildcard in rule {r:?}", o.id());
                }
                for v in &r.verbs {
                    assert!(
                        !["escalate", "bind", "impersonate", "deletecollection"]
                            .contains(&v.as_str()),
                        "{}: verb {v} in {r:?}",
                        o.id()
                    );
                }
                if r.resources.iter().flatten().any(|x| x == "secrets") {
                    assert_eq!(
                        r.verbs,
                        ["get", "list", "watch"],
                        "{}: Secrets are read-only",
                        o.id()
                    );
                }
            }
            if o.kind() == "ClusterRoleBinding" || o.kind() == "RoleBinding" {
                let subjects = o.value["subjects"].as_array().expect("subjects");
                for s in subjects {
                    assert_eq!(s["kind"], "ServiceAccount", "{}: binds {s}", o.id());
                    assert_eq!(s["namespace"], values.namespace(), "{}", o.id());
                }
            }
        }

        let cluster = objects
            .iter()
            .find(|o| o.kind() == "ClusterRole")
            .expect("a ClusterRole");
        let cluster_rules = rules(cluster);
        // The operator creates worker Roles with these; without `escalate`
        // the API server lets it only if it holds them itself.
        for (group, resource, verbs) in [
            (
                "tallyman.dev",
                "exceptioncases",
                &["get", "list", "watch", "create"][..],
            ),
            (
                "tallyman.dev",
                "exceptioncases/status",
                &["update", "patch"][..],
            ),
            ("", "events", &["create", "patch"][..]),
            ("events.k8s.io", "events", &["create", "patch"][..]),
            // Workers write their Workflow's status.instances.
            ("tallyman.dev", "workflows/status", &["patch"][..]),
        ] {
            for verb in verbs {
                assert!(
                    grants(&cluster_rules, group, resource, verb),
                    "{}: the operator must hold {verb} {group}/{resource} to grant it to workers",
                    cluster.id()
                );
            }
        }
        for (group, resource) in [
            ("tallyman.dev", "workflows"),
            ("apps", "deployments"),
            ("rbac.authorization.k8s.io", "roles"),
            ("rbac.authorization.k8s.io", "rolebindings"),
            ("policy", "poddisruptionbudgets"),
            ("", "configmaps"),
        ] {
            assert!(
                grants(&cluster_rules, group, resource, "watch"),
                "{group}/{resource}"
            );
        }
        assert!(
            !grants(&cluster_rules, "coordination.k8s.io", "leases", "update"),
            "leases belong in the namespaced Role, not the ClusterRole"
        );

        // Leader election: the namespaced Role may touch only the Lease the
        // operator is told to use.
        let deployment: Deployment = operator_deployment(&objects);
        let args = operator_container(&deployment)
            .args
            .clone()
            .unwrap_or_default();
        let lease = args
            .iter()
            .find_map(|a| a.strip_prefix("--lease-name="))
            .expect("--lease-name");
        let role = objects.iter().find(|o| o.kind() == "Role").expect("a Role");
        let role_rules = rules(role);
        assert!(grants(
            &role_rules,
            "coordination.k8s.io",
            "leases",
            "create"
        ));
        assert!(role_rules.iter().any(|r| {
            r.resource_names.as_deref() == Some(&[lease.to_string()][..])
                && r.verbs.contains(&"update".to_string())
                && r.verbs.contains(&"get".to_string())
        }));
    }
}

/// The one Deployment the chart renders: the operator's.
fn operator_deployment(objects: &[Object]) -> Deployment {
    objects
        .iter()
        .find(|o| o.kind() == "Deployment")
        .expect("the operator Deployment")
        .typed()
}

fn operator_container(d: &Deployment) -> &k8s_openapi::api::core::v1::Container {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.iter().find(|c| c.name == "operator"))
        .expect("the operator container")
}

fn env(c: &k8s_openapi::api::core::v1::Container, name: &str) -> Option<String> {
    c.env.iter().flatten().find(|e| e.name == name).map(|e| {
        e.value.clone().unwrap_or_else(|| {
            let field = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
            format!("fieldRef:{}", field.map_or("", |f| f.field_path.as_str()))
        })
    })
}

/// Every `TALLYMAN_*` variable the chart gives the operator is one of its
/// flags (a misspelt one would be ignored without a word).
#[test]
fn the_operator_understands_every_variable_the_chart_sets() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_tallyman"))
        .args(["operator", "--help"])
        .output()
        .expect("tallyman operator --help");
    let help = String::from_utf8_lossy(&help.stdout);
    // Read by the logging set-up of every subcommand, not a flag.
    let not_flags = ["TALLYMAN_LOG_FORMAT"];
    for values in Values::ALL {
        let objects = render(values);
        let d: Deployment = operator_deployment(&objects);
        let c = operator_container(&d);
        for var in c.env.iter().flatten() {
            let name = var.name.as_str();
            if name.starts_with("TALLYMAN_") && !not_flags.contains(&name) {
                assert!(
                    help.contains(&format!("[env: {name}=")),
                    "{}: {name} is not a flag of `tallyman operator`",
                    values.label()
                );
            }
        }
    }
}

#[test]
fn crds_are_the_generated_ones() {
    let generated = root().join("crds");
    let shipped = root().join("charts/tallyman/crds");
    let list = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    };
    let names = list(&generated);
    assert!(!names.is_empty());
    assert_eq!(
        names,
        list(&shipped),
        "charts/tallyman/crds/ must hold exactly the files of crds/: tallyman crdgen --dir crds --dir charts/tallyman/crds"
    );
    for name in &names {
        let a = std::fs::read(generated.join(name)).expect("read");
        let b = std::fs::read(shipped.join(name)).expect("read");
        assert!(
            a == b,
            "charts/tallyman/crds/{name} differs from crds/{name}: tallyman crdgen --dir crds --dir charts/tallyman/crds"
        );
    }
    for values in Values::ALL {
        let rendered: BTreeSet<String> = render(values)
            .iter()
            .filter(|o| o.is_crd())
            .map(|o| {
                let crd: CustomResourceDefinition = o.typed();
                assert_eq!(crd.spec.group, "tallyman.dev");
                format!("{}.yaml", crd.metadata.name.expect("a name"))
            })
            .collect();
        assert_eq!(
            rendered,
            names,
            "{}: the CRDs Helm installs",
            values.label()
        );
    }
}

#[test]
fn the_operator_runs_with_leader_election_probes_and_nats() {
    for values in Values::ALL {
        let objects = render(values);
        let d: Deployment = operator_deployment(&objects);
        let spec = d.spec.as_ref().expect("spec");
        let expected = match values {
            Values::Default => 2,
            Values::Custom => 3,
        };
        assert_eq!(spec.replicas, Some(expected), "{}", values.label());
        let c = operator_container(&d);
        let args = c.args.clone().unwrap_or_default();
        assert_eq!(args.first().map(String::as_str), Some("operator"));
        assert_eq!(
            c.image.as_deref(),
            Some(values.image()),
            "{}: image",
            values.label()
        );
        assert_eq!(env(c, "TALLYMAN_IMAGE").as_deref(), Some(values.image()));
        assert_eq!(
            env(c, "POD_NAME").as_deref(),
            Some("fieldRef:metadata.name")
        );
        assert_eq!(
            env(c, "POD_NAMESPACE").as_deref(),
            Some("fieldRef:metadata.namespace")
        );
        assert!(env(c, "TALLYMAN_NATS_URL").is_some_and(|u| u.contains("://")));

        let port = c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("metrics"))
            .expect("a metrics port")
            .container_port;
        assert!(
            args.contains(&format!("--listen=0.0.0.0:{port}")),
            "{args:?}"
        );
        for (probe, path) in [
            (&c.liveness_probe, "/healthz"),
            (&c.readiness_probe, "/readyz"),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .expect("an HTTP probe");
            assert_eq!(get.path.as_deref(), Some(path));
        }

        let pod = spec.template.spec.as_ref().expect("pod");
        let mounts: Vec<&str> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        match values {
            Values::Default => {
                assert_eq!(env(c, "TALLYMAN_NATS_CREDS"), None);
                assert_eq!(env(c, "TALLYMAN_NATS_CA"), None);
                for var in [
                    "TALLYMAN_POD_NATS_CREDS_SECRET",
                    "TALLYMAN_POD_NATS_CREDS_KEY",
                    "TALLYMAN_POD_NATS_CA_SECRET",
                    "TALLYMAN_POD_NATS_CA_KEY",
                ] {
                    assert_eq!(env(c, var), None, "{var}");
                }
                assert!(pod.image_pull_secrets.is_none());
            }
            Values::Custom => {
                // The credentials and CA Secrets are mounted where the env says.
                let creds = env(c, "TALLYMAN_NATS_CREDS").expect("TALLYMAN_NATS_CREDS");
                let ca = env(c, "TALLYMAN_NATS_CA").expect("TALLYMAN_NATS_CA");
                assert!(creds.ends_with("/operator.creds"), "{creds}");
                assert!(ca.ends_with("/ca.pem"), "{ca}");
                for file in [&creds, &ca] {
                    assert!(
                        mounts.iter().any(|m| file.starts_with(&format!("{m}/"))),
                        "{file} is not under a mount: {mounts:?}"
                    );
                }
                let secrets: BTreeSet<&str> = pod
                    .volumes
                    .iter()
                    .flatten()
                    .filter_map(|v| v.secret.as_ref()?.secret_name.as_deref())
                    .collect();
                assert_eq!(
                    secrets,
                    BTreeSet::from(["ledger-nats-creds", "ledger-nats-ca"])
                );
                // The pods' Secrets are named to the operator, not mounted
                // into it: they live in the Workflows' namespaces.
                for (var, value) in [
                    ("TALLYMAN_POD_NATS_CREDS_SECRET", "ledger-workers-nats"),
                    ("TALLYMAN_POD_NATS_CREDS_KEY", "user.creds"),
                    ("TALLYMAN_POD_NATS_CA_SECRET", "ledger-nats-ca"),
                    ("TALLYMAN_POD_NATS_CA_KEY", "ca.pem"),
                ] {
                    assert_eq!(env(c, var).as_deref(), Some(value), "{var}");
                }
                let pull: Vec<&str> = pod
                    .image_pull_secrets
                    .iter()
                    .flatten()
                    .map(|s| s.name.as_str())
                    .collect();
                assert_eq!(pull, ["acme-registry"]);
                assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
            }
        }
    }
}

#[test]
fn custom_values_rename_and_relocate_everything() {
    let values = Values::Custom;
    let objects = render(values);
    for o in &objects {
        if o.is_crd() || o.source == ADMISSION_SOURCE {
            continue;
        }
        assert!(
            o.name().starts_with(values.fullname()),
            "{}: fullnameOverride not applied",
            o.id()
        );
        let text = o.value.to_string();
        // Nothing still points at the default registry or repository.
        assert!(
            !text.contains("ghcr.io"),
            "{}: the registry override is not applied",
            o.id()
        );
        assert!(
            !text.contains("tallyman-dev/tallyman:"),
            "{}: default image",
            o.id()
        );
    }
    let kinds: BTreeSet<&str> = objects.iter().map(Object::kind).collect();
    for kind in [
        "NetworkPolicy",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
        "Service",
    ] {
        assert!(kinds.contains(kind), "custom values: no {kind}");
    }
    let sa = objects
        .iter()
        .find(|o| o.kind() == "ServiceAccount")
        .expect("a ServiceAccount");
    assert_eq!(sa.name(), "acme-ledger-operator");
    for o in objects
        .iter()
        .filter(|o| o.kind().ends_with("Binding") && o.source != ADMISSION_SOURCE)
    {
        assert_eq!(
            o.value["subjects"][0]["name"],
            "acme-ledger-operator",
            "{}",
            o.id()
        );
    }
    let dashboard = objects
        .iter()
        .find(|o| o.kind() == "ConfigMap")
        .expect("the dashboard");
    assert_eq!(dashboard.value["metadata"]["namespace"], "monitoring");
    assert_eq!(labels(&dashboard.value)["grafana_dashboard"], "1");

    // The default values render none of the optional objects.
    let kinds: BTreeSet<String> = render(Values::Default)
        .iter()
        .map(|o| o.kind().to_string())
        .collect();
    for kind in [
        "NetworkPolicy",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
    ] {
        assert!(!kinds.contains(kind), "default values render a {kind}");
    }
}

/// Every `tallyman_*` name in `text`, without a histogram's `_bucket`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("tallyman_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        names.insert(name.strip_suffix("_bucket").unwrap_or(name).to_string());
        i = end;
    }
    names
}

#[test]
fn alerts_and_dashboard_use_documented_metrics() {
    let documented =
        std::fs::read_to_string(root().join("docs/metrics.md")).expect("docs/metrics.md");
    let objects = render(Values::Custom);
    let rule = objects
        .iter()
        .find(|o| o.kind() == "PrometheusRule")
        .expect("the PrometheusRule");
    let mut exprs = String::new();
    let mut alerts = BTreeSet::new();
    for g in rule.value["spec"]["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            exprs.push_str(r["expr"].as_str().expect("expr"));
            exprs.push('\n');
            alerts.insert(r["alert"].as_str().expect("alert").to_string());
        }
    }
    for alert in [
        "TallymanSlaBreached",
        "TallymanExceptionsRising",
        "TallymanConsumerLag",
        "TallymanReconcileErrors",
        "TallymanGatewayServerErrors",
    ] {
        assert!(alerts.contains(alert), "no alert {alert}");
    }

    let dashboard = objects
        .iter()
        .find(|o| o.kind() == "ConfigMap")
        .expect("the dashboard");
    let json: Value = serde_json::from_str(
        dashboard.value["data"]["tallyman.json"]
            .as_str()
            .expect("tallyman.json"),
    )
    .expect("the dashboard is JSON");
    let shipped: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("charts/tallyman/dashboards/tallyman.json"))
            .expect("read"),
    )
    .expect("JSON");
    assert_eq!(
        json, shipped,
        "the ConfigMap carries dashboards/tallyman.json"
    );
    let mut queries = String::new();
    for panel in json["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            queries.push_str(t["expr"].as_str().expect("expr"));
            queries.push('\n');
        }
    }
    for (what, text) in [("alerts", &exprs), ("dashboard", &queries)] {
        let names = metric_names(text);
        assert!(names.len() >= 5, "{what}: {names:?}");
        for name in names {
            assert!(
                documented.contains(&format!("`{name}`")),
                "{what} query {name}, which docs/metrics.md does not list"
            );
        }
    }
    // Every documented family is on the dashboard.
    for name in metric_names(&documented) {
        assert!(
            queries.contains(&name),
            "the dashboard does not show {name}"
        );
    }
}
