//! The tallyman domain, with no Kubernetes client and no NATS: manifests as
//! they are written in Git, their validation, and the CEL environments every
//! expression is checked and compiled in.

pub mod audit;
pub mod cel;
pub mod crdgen;
pub mod engine;
pub mod manifest;
pub mod policy;
pub mod reference;
pub mod schema;
pub mod validate;
