pub mod crdgen;
pub mod validate;
