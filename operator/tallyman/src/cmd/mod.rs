pub mod audit;
pub mod crdgen;
pub mod gateway;
pub mod manifests;
pub mod validate;
pub mod worker;
