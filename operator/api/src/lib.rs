//! The tallyman custom resources, `tallyman.dev/v1alpha1`.
//!
//! Rust types are the single source of truth: `tallyman crdgen` renders the
//! CRDs in `crds/` from them, the reference in `docs/reference/crds.md` is
//! generated from their doc comments, and `tallyman validate` checks manifests
//! against the same schemas. No I/O lives here.

pub mod v1alpha1;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every tallyman resource.
pub const GROUP: &str = "tallyman.dev";

/// Every CRD tallyman serves, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![
        v1alpha1::Connector::crd(),
        v1alpha1::Workflow::crd(),
        v1alpha1::ApprovalPolicy::crd(),
        v1alpha1::ExceptionCase::crd(),
    ]
}
