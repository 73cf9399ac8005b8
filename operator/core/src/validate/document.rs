//! One document at a time: identity, apiVersion/kind, metadata, the CRD
//! schema and its `x-kubernetes-validations`, then the typed resource.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::OnceLock;

use kube::CustomResourceExt;
use regex::Regex;
use serde_json::Value;
use tallyman_api::v1alpha1::{ApprovalPolicy, Connector, ExceptionCase, Workflow};

use super::{DEFAULT_NAMESPACE, Diagnostic, Severity};
use crate::manifest::Document;
use crate::schema::{self, FieldError};

/// Where a resource was written.
#[derive(Clone, Debug)]
pub struct Origin {
    pub file: PathBuf,
    pub index: usize,
    pub line: usize,
}

/// A document that parsed as one of the kinds tallyman reads.
#[derive(Clone, Debug)]
pub struct Resource {
    pub origin: Origin,
    pub namespace: String,
    pub name: String,
    pub object: Object,
}

/// The typed content of a [`Resource`].
#[derive(Clone, Debug)]
pub enum Object {
    Connector(Box<Connector>),
    Workflow(Box<Workflow>),
    ApprovalPolicy(Box<ApprovalPolicy>),
    ExceptionCase(Box<ExceptionCase>),
    /// A core/v1 Secret: only its keys matter here, never its values.
    Secret {
        keys: BTreeSet<String>,
    },
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Connector(_) => "Connector",
            Object::Workflow(_) => "Workflow",
            Object::ApprovalPolicy(_) => "ApprovalPolicy",
            Object::ExceptionCase(_) => "ExceptionCase",
            Object::Secret { .. } => "Secret",
        }
    }
}

impl Resource {
    /// A diagnostic about this resource at `path`.
    pub fn diagnostic(
        &self,
        severity: Severity,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic {
            severity,
            file: self.origin.file.display().to_string(),
            document: self.origin.index,
            line: self.origin.line,
            kind: Some(self.object.kind().to_string()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            path: path.into(),
            message: message.into(),
        }
    }
}

struct KindSchema {
    kind: &'static str,
    /// `openAPIV3Schema` of the served version.
    schema: Value,
    compiled: kube_cel::CompiledSchema,
}

/// Checks documents against the CRDs of this build; built once per run.
pub struct Checker {
    kinds: Vec<KindSchema>,
    cel: kube_cel::Validator,
}

const API_VERSION: &str = "tallyman.dev/v1alpha1";
const ROOT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];

impl Checker {
    pub fn new() -> Self {
        let crds = [
            ("Connector", Connector::crd()),
            ("Workflow", Workflow::crd()),
            ("ApprovalPolicy", ApprovalPolicy::crd()),
            ("ExceptionCase", ExceptionCase::crd()),
        ];
        let kinds = crds
            .into_iter()
            .map(|(kind, crd)| {
                let schema = crd.spec.versions[0]
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .map(|s| serde_json::to_value(s).expect("CRD schema serializes"))
                    .expect("every tallyman CRD has a schema");
                let compiled = kube_cel::compile_schema(&schema);
                KindSchema {
                    kind,
                    schema,
                    compiled,
                }
            })
            .collect();
        Self {
            kinds,
            cel: kube_cel::Validator::new(),
        }
    }

    /// Check one document; returns the typed resource when it is one that
    /// tallyman reads and it passed the document-level checks.
    pub fn check(&self, doc: &Document, out: &mut Vec<Diagnostic>) -> Option<Resource> {
        let v = &doc.value;
        let api_version = v.get("apiVersion").and_then(Value::as_str);
        let kind = v.get("kind").and_then(Value::as_str);
        let name = v.pointer("/metadata/name").and_then(Value::as_str);
        let namespace = v
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_NAMESPACE);
        let mut errors: Vec<FieldError> = Vec::new();
        let mut emit = |errors: Vec<FieldError>, kind: Option<&str>| {
            for e in errors {
                out.push(Diagnostic {
                    severity: Severity::Error,
                    file: doc.file.display().to_string(),
                    document: doc.index,
                    line: doc.line,
                    kind: kind.map(str::to_string),
                    namespace: name.map(|_| namespace.to_string()),
                    name: name.map(str::to_string),
                    path: e.path,
                    message: e.message,
                });
            }
        };
        if !v.is_object() {
            emit(
                vec![field(
                    "",
                    format!(
                        "a manifest must be a mapping with apiVersion and kind, got {}",
                        schema::describe(v)
                    ),
                )],
                None,
            );
            return None;
        }
        let (Some(api_version), Some(kind)) = (api_version, kind) else {
            if api_version.is_none() {
                errors.push(field(
                    "apiVersion",
                    "required field is missing; tallyman resources use tallyman.dev/v1alpha1",
                ));
            }
            if kind.is_none() {
                errors.push(field("kind", "required field is missing; accepted: Connector, Workflow, ApprovalPolicy, ExceptionCase, Secret"));
            }
            emit(errors, kind);
            return None;
        };
        let group = api_version.split_once('/').map(|(g, _)| g).unwrap_or("");

        if api_version == "v1" && kind == "Secret" {
            check_metadata(v, &mut errors);
            let keys = secret_keys(v, &mut errors);
            let ok = errors.is_empty();
            emit(errors, Some(kind));
            return ok.then(|| Resource {
                origin: origin(doc),
                namespace: namespace.to_string(),
                name: name.unwrap_or_default().to_string(),
                object: Object::Secret { keys },
            });
        }
        if group != tallyman_api::GROUP {
            // Not ours (a Namespace, a ConfigMap, ...): `kubectl apply` judges it.
            return None;
        }
        let Some(ks) = self.kinds.iter().find(|k| k.kind == kind) else {
            let accepted: Vec<&str> = self.kinds.iter().map(|k| k.kind).collect();
            errors.push(field(
                "kind",
                format!(
                    "unknown kind {kind:?} in {group}; accepted: {}",
                    accepted.join(", ")
                ),
            ));
            emit(errors, None);
            return None;
        };
        if api_version != API_VERSION {
            errors.push(field(
                "apiVersion",
                format!("{api_version:?} is not served; accepted: {API_VERSION}"),
            ));
            emit(errors, Some(kind));
            return None;
        }

        for key in v.as_object().into_iter().flat_map(|m| m.keys()) {
            if !ROOT_FIELDS.contains(&key.as_str()) {
                errors.push(field(
                    key,
                    format!(
                        "unknown field {key:?}; accepted: {}",
                        ROOT_FIELDS.join(", ")
                    ),
                ));
            }
        }
        check_metadata(v, &mut errors);
        let props = &ks.schema["properties"];
        match v.get("spec") {
            Some(spec) => schema::check(&props["spec"], spec, "spec", &mut errors),
            None => errors.push(field("spec", "required field is missing")),
        }
        if let Some(status) = v.get("status") {
            schema::check(&props["status"], status, "status", &mut errors);
        }
        // The API server evaluates CEL rules on the defaulted object. Where
        // the structure is already wrong, a rule may fail only because of
        // that; keep just the rules that evaluated to false there, so every
        // real finding is reported at once without noise.
        let structural_errors = errors.len();
        let root = kube_cel::RootContext {
            api_version: API_VERSION.into(),
            api_group: tallyman_api::GROUP.into(),
            kind: kind.into(),
        };
        if let Err(rule_errors) =
            self.cel
                .validate_compiled_with_context(&ks.compiled, v, None, Some(&root))
        {
            for e in rule_errors.iter() {
                let failed = e.kind == kube_cel::ErrorKind::ValidationFailure;
                if structural_errors == 0 || failed {
                    errors.push(field(
                        &map_keys_in_brackets(&ks.schema, &e.field_path),
                        rule_message(e),
                    ));
                }
            }
        }
        if !errors.is_empty() {
            emit(errors, Some(kind));
            return None;
        }
        let object = match kind {
            "Connector" => typed(v).map(|c| Object::Connector(Box::new(c))),
            "Workflow" => typed(v).map(|w| Object::Workflow(Box::new(w))),
            "ApprovalPolicy" => typed(v).map(|p| Object::ApprovalPolicy(Box::new(p))),
            _ => typed(v).map(|c| Object::ExceptionCase(Box::new(c))),
        };
        match object {
            Ok(object) => Some(Resource {
                origin: origin(doc),
                namespace: namespace.to_string(),
                name: name.unwrap_or_default().to_string(),
                object,
            }),
            Err(e) => {
                emit(vec![e], Some(kind));
                None
            }
        }
    }
}

impl Default for Checker {
    fn default() -> Self {
        Self::new()
    }
}

/// `(kind, namespace, name)` of any document that declares one.
pub fn identity(doc: &Document) -> Option<(String, String, String)> {
    let v = &doc.value;
    let kind = v.get("kind")?.as_str()?;
    let name = v.pointer("/metadata/name")?.as_str()?;
    let ns = v
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_NAMESPACE);
    Some((kind.to_string(), ns.to_string(), name.to_string()))
}

fn origin(doc: &Document) -> Origin {
    Origin {
        file: doc.file.clone(),
        index: doc.index,
        line: doc.line,
    }
}

fn field(path: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.to_string(),
        message: message.into(),
    }
}

/// kube-cel writes map entries as `actions.getOrder`; tallyman (like the
/// API server's field paths) writes `actions[getOrder]`. Walk the schema to
/// tell map keys from properties.
fn map_keys_in_brackets(schema: &Value, path: &str) -> String {
    let mut out = String::new();
    let mut node = Some(schema);
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, indices) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        let prop = node
            .and_then(|n| n.get("properties"))
            .and_then(|p| p.get(name));
        let map_value = node
            .and_then(|n| n.get("additionalProperties"))
            .filter(|a| a.is_object());
        match (prop, map_value) {
            (None, Some(value)) => {
                out.push_str(&format!("[{name}]"));
                node = Some(value);
            }
            _ => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(name);
                node = prop;
            }
        }
        for _ in indices.matches('[') {
            node = node.and_then(|n| n.get("items"));
        }
        out.push_str(indices);
    }
    out
}

fn rule_message(e: &kube_cel::ValidationError) -> String {
    match e.kind {
        kube_cel::ErrorKind::ValidationFailure => e.message.clone(),
        _ => format!("rule {:?} could not be evaluated: {}", e.rule, e.message),
    }
}

/// Deserialize into the typed resource, locating any failure by field path.
fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        field(if path == "." { "" } else { &path }, e.inner().to_string())
    })
}

fn check_metadata(v: &Value, errors: &mut Vec<FieldError>) {
    static LABEL: OnceLock<Regex> = OnceLock::new();
    let subdomain = subdomain_re();
    let label =
        LABEL.get_or_init(|| Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$").expect("valid regex"));
    let Some(meta) = v.get("metadata") else {
        errors.push(field(
            "metadata",
            "required field is missing; set at least metadata.name",
        ));
        return;
    };
    let Some(meta) = meta.as_object() else {
        errors.push(field(
            "metadata",
            format!("must be an object, got {}", schema::describe(meta)),
        ));
        return;
    };
    match meta.get("name") {
        None if meta.contains_key("generateName") => {}
        None => errors.push(field("metadata.name", "required field is missing")),
        Some(Value::String(name)) => {
            if name.len() > 253 || !subdomain.is_match(name) {
                errors.push(field(
                    "metadata.name",
                    format!("{name:?} is not a valid name: lowercase letters, digits, '-' and '.', at most 253 characters, starting and ending with a letter or digit"),
                ));
            }
        }
        Some(other) => errors.push(field(
            "metadata.name",
            format!("must be a string, got {}", schema::describe(other)),
        )),
    }
    match meta.get("namespace") {
        None => {}
        Some(Value::String(ns)) if ns.len() <= 63 && label.is_match(ns) => {}
        Some(other) => errors.push(field(
            "metadata.namespace",
            format!("{other} is not a valid namespace: a DNS label of lowercase letters, digits and '-', at most 63 characters"),
        )),
    }
    for map in ["labels", "annotations"] {
        let Some(entries) = meta.get(map) else {
            continue;
        };
        let Some(entries) = entries.as_object() else {
            errors.push(field(
                &format!("metadata.{map}"),
                "must be a mapping of strings",
            ));
            continue;
        };
        for (k, val) in entries {
            let path = format!("metadata.{map}[{k}]");
            if let Err(why) = label_key(k) {
                errors.push(field(&path, format!("{k:?} is not a valid key: {why}")));
            }
            match val.as_str() {
                None => errors.push(field(
                    &path,
                    format!("must be a string, got {}; quote it", schema::describe(val)),
                )),
                Some(v) if map == "labels" && !is_label_value(v) => errors.push(field(
                    &path,
                    format!("{v:?} is not a valid label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"),
                )),
                Some(_) => {}
            }
        }
    }
}

fn subdomain_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
            .expect("valid regex")
    })
}

fn label_name_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new("^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$").expect("valid regex")
    })
}

/// A label or annotation key: `[prefix/]name`.
fn label_key(key: &str) -> Result<(), &'static str> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let sub = subdomain_re();
        if prefix.len() > 253 || !sub.is_match(prefix) {
            return Err("the prefix before '/' must be a DNS subdomain");
        }
    }
    if name.len() > 63 || !label_name_re().is_match(name) {
        return Err(
            "the name must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
        );
    }
    Ok(())
}

fn is_label_value(v: &str) -> bool {
    v.is_empty() || (v.len() <= 63 && label_name_re().is_match(v))
}

fn is_base64(v: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new("^[A-Za-z0-9+/]*={0,2}$").expect("valid regex"));
    v.len().is_multiple_of(4) && re.is_match(v)
}

fn secret_keys(v: &Value, errors: &mut Vec<FieldError>) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for section in ["data", "stringData"] {
        match v.get(section) {
            None => {}
            Some(Value::Object(m)) => {
                for (k, val) in m {
                    let path = format!("{section}[{k}]");
                    match val.as_str() {
                        None => errors.push(field(
                            &path,
                            format!("must be a string, got {}", schema::describe(val)),
                        )),
                        Some(v) if section == "data" && !is_base64(v) => errors.push(field(
                            &path,
                            "is not base64, as data values must be; put plain text under stringData instead",
                        )),
                        Some(_) => {}
                    }
                    keys.insert(k.clone());
                }
            }
            Some(other) => errors.push(field(
                section,
                format!("must be a mapping, got {}", schema::describe(other)),
            )),
        }
    }
    keys
}

/// The names in a Connector's external-secrets annotation; `None` means all.
pub fn external_secrets(annotations: &BTreeMap<String, String>) -> Option<BTreeSet<String>> {
    match annotations
        .get(super::EXTERNAL_SECRETS_ANNOTATION)
        .map(|s| s.trim())
    {
        Some("true") | Some("*") => None,
        Some(list) => Some(
            list.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        ),
        None => Some(BTreeSet::new()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn map_entries_of_rule_paths_are_bracketed() {
        let schema = json!({"properties": {"spec": {"properties": {
            "actions": {"additionalProperties": {"properties": {"path": {"type": "string"}}}},
            "steps": {"items": {"properties": {"wait": {"type": "object"}}}}}}}});
        assert_eq!(
            super::map_keys_in_brackets(&schema, "spec.actions.getOrder.path"),
            "spec.actions[getOrder].path"
        );
        assert_eq!(
            super::map_keys_in_brackets(&schema, "spec.steps[2].wait"),
            "spec.steps[2].wait"
        );
    }
}
