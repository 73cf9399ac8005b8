//! Validation of objects read from the cluster, exactly as `tallyman
//! validate` checks manifests: the same schemas and CEL rules, then the
//! checks across the set (expressions compile in their scope, references
//! resolve). Secrets are not read by the operator: every Secret reference is
//! treated as managed elsewhere, and a missing one shows on the pods.

use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;
use tallyman_core::manifest::{Document, Loaded};
use tallyman_core::validate::{self, EXTERNAL_SECRETS_ANNOTATION, Report};

/// One error, located by kind, name and field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub kind: String,
    pub name: String,
    /// e.g. `spec.steps[1].call.action`; empty for the whole object.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// An object as a manifest: what a person wrote, not what the server added.
pub fn as_manifest<K: Serialize>(object: &K) -> Value {
    let mut v = serde_json::to_value(object).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
        if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.retain(|k, _| {
                matches!(k.as_str(), "name" | "namespace" | "labels" | "annotations")
            });
            if o.get("kind").and_then(Value::as_str) == Some("Connector") {
                let meta = o["metadata"].as_object_mut().expect("checked above");
                let annotations = meta
                    .entry("annotations")
                    .or_insert_with(|| Value::Object(Default::default()));
                if let Some(a) = annotations.as_object_mut() {
                    a.insert(EXTERNAL_SECRETS_ANNOTATION.into(), "true".into());
                }
            }
        }
    }
    v
}

/// The errors of a set of objects (manifests from [`as_manifest`]).
pub fn check(objects: Vec<Value>) -> Vec<Finding> {
    let documents = objects
        .into_iter()
        .enumerate()
        .map(|(i, value)| Document {
            file: PathBuf::from("cluster"),
            index: i + 1,
            line: 1,
            value,
        })
        .collect();
    let report: Report = validate::validate_loaded(Loaded {
        documents,
        parse_errors: Vec::new(),
        read_errors: Vec::new(),
    });
    report
        .errors()
        .map(|d| Finding {
            kind: d.kind.clone().unwrap_or_default(),
            name: d.name.clone().unwrap_or_default(),
            path: d.path.clone(),
            message: d.message.clone(),
        })
        .collect()
}
