//! Manifests as the runtime commands read them: validated exactly like
//! `tallyman validate`, refused with the full error list when invalid.

use std::path::PathBuf;

use anyhow::bail;
use tallyman_core::engine::Definition;
use tallyman_core::manifest::{self, Loaded};
use tallyman_core::validate::{self, Report};

/// A valid set of manifests.
pub struct Set {
    pub loaded_values: Vec<serde_json::Value>,
    pub report: Report,
}

/// Load and validate; any error stops here with every error listed.
pub fn load_valid(paths: &[PathBuf]) -> anyhow::Result<Set> {
    let loaded: Loaded = manifest::load(paths);
    let values: Vec<serde_json::Value> = loaded.documents.iter().map(|d| d.value.clone()).collect();
    let report = validate::validate_loaded(loaded);
    if !report.read_errors.is_empty() || report.has_errors() {
        let mut lines: Vec<String> = report
            .read_errors
            .iter()
            .map(|e| format!("{}: cannot read: {}", e.path.display(), e.message))
            .collect();
        lines.extend(report.errors().map(|d| d.to_string()));
        bail!("the manifests are not valid:\n{}", lines.join("\n"));
    }
    Ok(Set {
        loaded_values: values,
        report,
    })
}

impl Set {
    pub fn documents(&self) -> impl Iterator<Item = &serde_json::Value> {
        self.loaded_values.iter()
    }

    /// The resolved definition of one Workflow.
    pub fn definition(&self, namespace: &str, name: &str) -> anyhow::Result<Definition> {
        self.report
            .definition(namespace, name)
            .map_err(anyhow::Error::msg)
    }
}
