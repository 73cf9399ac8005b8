//! What a Workflow's reconcile reads besides the Workflow: the Connectors
//! and ApprovalPolicies of its namespace (resolution, validation).

use kube::api::{Api, ListParams};
use tallyman_api::v1alpha1::{ApprovalPolicy, Connector};

use crate::error::Error;

/// The objects a Workflow may use.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub connectors: Vec<Connector>,
    pub policies: Vec<ApprovalPolicy>,
}

pub async fn fetch(client: &kube::Client, namespace: &str) -> Result<Inputs, Error> {
    let connectors = Api::<Connector>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Read {
            what: format!("the Connectors of namespace {namespace}"),
            source,
        })?
        .items;
    let policies = Api::<ApprovalPolicy>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Read {
            what: format!("the ApprovalPolicies of namespace {namespace}"),
            source,
        })?
        .items;
    Ok(Inputs {
        connectors,
        policies,
    })
}
