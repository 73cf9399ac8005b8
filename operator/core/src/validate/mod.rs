//! `tallyman validate`: every manifest checked as the API server would check
//! it (schema and `x-kubernetes-validations`), then the set checked as
//! tallyman will use it (CEL compiles in its scope, references resolve,
//! Secrets exist). Every problem is reported, each with its file, document,
//! resource and field path.

mod document;
mod semantic;

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::manifest::{self, Loaded, ReadError};

pub use document::{Object, Resource};

/// Annotation on a Connector naming Secrets that are managed outside the
/// manifests (`"true"` for all of them, or a comma-separated list of names).
pub const EXTERNAL_SECRETS_ANNOTATION: &str = "tallyman.dev/external-secrets";

/// The namespace of a manifest without `metadata.namespace`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The manifest would be refused or would not run.
    Error,
    /// The manifest runs, but probably not as meant.
    Warning,
}

/// One finding, located as precisely as we can.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: String,
    /// 1-based index of the document in its file.
    pub document: usize,
    /// 1-based line: where the document starts, or where YAML broke.
    pub line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Field path, e.g. `spec.steps[2].call.action`; empty for the whole document.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}: {severity}: document {}",
            self.file, self.line, self.document
        )?;
        match (&self.kind, &self.name) {
            (Some(kind), Some(name)) => write!(
                f,
                " ({kind} {}/{name})",
                self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
            )?,
            (Some(kind), None) => write!(f, " ({kind})")?,
            _ => {}
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

/// The outcome of validating a set of manifests.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Documents read (empty documents excluded).
    pub documents: usize,
    /// tallyman resources and Secrets among them.
    pub resources: usize,
    /// Findings, errors and warnings, in file order.
    pub diagnostics: Vec<Diagnostic>,
    /// Paths that could not be read.
    #[serde(serialize_with = "serialize_read_errors")]
    pub read_errors: Vec<ReadError>,
    /// The resources that passed, for callers that go on to run them.
    #[serde(skip)]
    pub valid: Vec<Resource>,
}

impl Report {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Warning)
    }

    pub fn has_errors(&self) -> bool {
        self.errors().next().is_some()
    }

    /// The resolved definition of the Workflow `namespace/name` among the
    /// valid resources, with the Connectors and ApprovalPolicies of its
    /// namespace (each placed in that namespace, as the manifests may
    /// leave it out).
    pub fn definition(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<crate::engine::Definition, String> {
        let mut workflow = None;
        let mut connectors = Vec::new();
        let mut policies = Vec::new();
        for r in &self.valid {
            if r.namespace != namespace {
                continue;
            }
            match &r.object {
                Object::Workflow(w) if r.name == name => workflow = Some((**w).clone()),
                Object::Connector(c) => connectors.push((**c).clone()),
                Object::ApprovalPolicy(p) => policies.push((**p).clone()),
                _ => {}
            }
        }
        let Some(mut workflow) = workflow else {
            return Err(format!(
                "no Workflow {namespace}/{name} among the manifests"
            ));
        };
        workflow.metadata.namespace = Some(namespace.to_string());
        for c in &mut connectors {
            c.metadata.namespace = Some(namespace.to_string());
        }
        for p in &mut policies {
            p.metadata.namespace = Some(namespace.to_string());
        }
        crate::engine::Definition::resolve(&workflow, &connectors, &policies)
    }
}

fn serialize_read_errors<S: serde::Serializer>(
    errors: &[ReadError],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(errors.len()))?;
    for e in errors {
        seq.serialize_element(&serde_json::json!({
            "path": e.path.display().to_string(),
            "message": e.message,
        }))?;
    }
    seq.end()
}

/// Validate every manifest under `paths`.
pub fn validate_paths(paths: &[PathBuf]) -> Report {
    validate_loaded(manifest::load(paths))
}

/// Validate manifests already read.
pub fn validate_loaded(loaded: Loaded) -> Report {
    let mut report = Report {
        documents: loaded.documents.len(),
        read_errors: loaded.read_errors,
        ..Report::default()
    };
    for e in &loaded.parse_errors {
        report.diagnostics.push(Diagnostic {
            severity: Severity::Error,
            file: e.file.display().to_string(),
            document: e.index,
            line: e.line,
            kind: None,
            namespace: None,
            name: None,
            path: String::new(),
            message: e.message.clone(),
        });
    }
    let checker = document::Checker::new();
    let mut resources = Vec::new();
    for doc in &loaded.documents {
        if let Some(resource) = checker.check(doc, &mut report.diagnostics) {
            resources.push(resource);
        }
    }
    report.resources = resources.len();
    // References to a resource that is declared but invalid are not reported
    // again: its own errors say what to fix.
    let declared = loaded
        .documents
        .iter()
        .filter_map(document::identity)
        .collect();
    semantic::check_set(&resources, &declared, &mut report.diagnostics);
    report.diagnostics.sort_by(|a, b| {
        (&a.file, a.document, a.severity == Severity::Warning).cmp(&(
            &b.file,
            b.document,
            b.severity == Severity::Warning,
        ))
    });
    let failed: std::collections::HashSet<(String, usize)> = report
        .errors()
        .map(|d| (d.file.clone(), d.document))
        .collect();
    report.valid = resources
        .into_iter()
        .filter(|r| !failed.contains(&(r.origin.file.display().to_string(), r.origin.index)))
        .collect();
    report
}
