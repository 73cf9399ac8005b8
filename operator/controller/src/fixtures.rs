//! The manifests in `examples/` as typed objects, for tests and the bench:
//! the examples are fixtures, so they cannot rot.

use std::path::PathBuf;

use tallyman_api::v1alpha1::{ApprovalPolicy, Connector, Workflow};

/// Every example directory.
pub const EXAMPLES: &[&str] = &[
    "inventory-adjustment",
    "returns-to-credit",
    "shipment-to-invoice",
    "three-way-match",
];

/// The objects of one example.
#[derive(Clone, Debug, Default)]
pub struct Example {
    pub workflows: Vec<Workflow>,
    pub connectors: Vec<Connector>,
    pub policies: Vec<ApprovalPolicy>,
}

/// Read `examples/<name>`.
///
/// # Panics
/// When the example is missing or a manifest does not parse as its kind.
pub fn example(name: &str) -> Example {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    let loaded = tallyman_core::manifest::load(&[dir]);
    assert!(
        loaded.read_errors.is_empty() && loaded.parse_errors.is_empty(),
        "example {name} does not read"
    );
    let mut out = Example::default();
    for doc in loaded.documents {
        let v = doc.value;
        let what = format!("{}: {}", doc.file.display(), doc.index);
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("Workflow") => out.workflows.push(serde_json::from_value(v).expect(&what)),
            Some("Connector") => out.connectors.push(serde_json::from_value(v).expect(&what)),
            Some("ApprovalPolicy") => out.policies.push(serde_json::from_value(v).expect(&what)),
            _ => {}
        }
    }
    out
}
