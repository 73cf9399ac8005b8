//! What every child shares: the field manager, the `app.kubernetes.io/*`
//! labels, and the one write path (server-side apply, skipped when the live
//! object already holds what we would write).

use std::collections::BTreeMap;
use std::fmt::Debug;

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::Error;

/// The one field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "tallyman-operator";
/// Hash of what the operator last applied to a child. A field dropped from
/// the desired object changes it, so the drop is applied even though the
/// live object still "contains" everything desired.
pub const APPLIED_HASH_ANNOTATION: &str = "tallyman.dev/applied-hash";
/// On a worker pod template: the definition revision; a new one rolls the pods.
pub const REVISION_ANNOTATION: &str = "tallyman.dev/revision";
/// On a gateway pod template: hash of the namespace's webhook Connectors.
pub const CONNECTORS_HASH_ANNOTATION: &str = "tallyman.dev/connectors-hash";
/// On worker and gateway pod templates: hash of the mounted Secrets' data, so
/// a rotated Secret rolls the pods (they read Secret files once, at start).
pub const SECRETS_HASH_ANNOTATION: &str = "tallyman.dev/secrets-hash";
/// On every worker child: the Workflow it serves.
pub const WORKFLOW_LABEL: &str = "tallyman.dev/workflow";

/// The labels of a child: `component` is `worker` or `gateway`, `instance`
/// the Workflow's name or `gateway`.
pub fn labels(component: &str, instance: &str) -> BTreeMap<String, String> {
    let mut l = selector(component, instance);
    l.insert("app.kubernetes.io/part-of".into(), "tallyman".into());
    l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
    l
}

/// The subset of [`labels`] that selects pods: stable across upgrades.
pub fn selector(component: &str, instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "tallyman".into()),
        ("app.kubernetes.io/instance".into(), instance.into()),
        ("app.kubernetes.io/component".into(), component.into()),
    ])
}

/// A short, stable hash of a JSON value.
pub fn hash_json(v: &Value) -> String {
    let text = serde_json::to_string(v).expect("JSON values serialize");
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

/// Whether `live` holds every field of `desired` with the same value. The
/// API server adds defaults and status; those do not count as a difference.
pub fn contains(live: &Value, desired: &Value) -> bool {
    match (live, desired) {
        (_, Value::Null) => true,
        (Value::Object(l), Value::Object(d)) => d
            .iter()
            .all(|(k, dv)| l.get(k).map_or(dv.is_null(), |lv| contains(lv, dv))),
        (Value::Array(l), Value::Array(d)) => {
            l.len() == d.len() && l.iter().zip(d).all(|(lv, dv)| contains(lv, dv))
        }
        (l, d) => l == d,
    }
}

/// `desired` as JSON, with the hash of itself in [`APPLIED_HASH_ANNOTATION`].
pub fn with_applied_hash<K: Serialize>(desired: &K, what: &str) -> Result<Value, Error> {
    let mut v = serde_json::to_value(desired).map_err(|source| Error::Encode {
        what: what.to_string(),
        source,
    })?;
    let hash = hash_json(&v);
    let meta = v
        .as_object_mut()
        .and_then(|o| o.get_mut("metadata"))
        .and_then(Value::as_object_mut)
        .ok_or(Error::Incomplete("metadata"))?;
    let annotations = meta
        .entry("annotations")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(a) = annotations.as_object_mut() {
        a.insert(APPLIED_HASH_ANNOTATION.into(), Value::String(hash));
    }
    Ok(v)
}

/// What [`apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Unchanged,
    Written,
}

/// Server-side apply `desired` with [`FIELD_MANAGER`], unless the live object
/// already holds it; returns the object as it now is.
pub async fn apply<K>(api: &Api<K>, desired: &K) -> Result<(K, Applied), Error>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let name = desired.name_any();
    let what = format!("{kind} {name}");
    let body = with_applied_hash(desired, &what)?;
    let live = api.get_opt(&name).await.map_err(|source| Error::Read {
        what: what.clone(),
        source,
    })?;
    if let Some(live) = live {
        let live_json = serde_json::to_value(&live).map_err(|source| Error::Encode {
            what: what.clone(),
            source,
        })?;
        if contains(&live_json, &body) {
            return Ok((live, Applied::Unchanged));
        }
    }
    let written = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| Error::Apply { what, source })?;
    Ok((written, Applied::Written))
}

/// Server-side apply `status` to `obj`'s status subresource with
/// [`FIELD_MANAGER`].
pub async fn apply_status<K, S>(client: &kube::Client, obj: &K, status: &S) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + Debug + DeserializeOwned,
    K::DynamicType: Default,
    S: Serialize,
{
    let dt = K::DynamicType::default();
    let kind = K::kind(&dt).to_string();
    let (ns, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&dt),
        "kind": kind,
        "status": status,
    });
    Api::<K>::namespaced(client.clone(), &ns)
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Status {
            what: format!("{kind} {ns}/{name}"),
            source,
        })?;
    Ok(())
}

/// Delete `name` if it exists; whether it did.
pub async fn delete_if_present<K>(
    api: &Api<K>,
    name: &str,
    params: &kube::api::DeleteParams,
) -> Result<bool, Error>
where
    K: Resource + Clone + Debug + DeserializeOwned,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    match api.delete(name, params).await {
        Ok(_) => Ok(true),
        Err(e) if crate::error::is_not_found(&e) => Ok(false),
        Err(source) => Err(Error::Delete {
            what: format!("{kind} {name}"),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_status_added_by_the_server_are_no_difference() {
        let desired = json!({"spec": {"replicas": 2, "template": {"a": [1, {"b": 1}]}}});
        let live = json!({"spec": {"replicas": 2, "strategy": {}, "template": {"a": [1, {"b": 1, "c": 0}]}}, "status": {}});
        assert!(contains(&live, &desired));
        assert!(!contains(
            &json!({"spec": {"replicas": 3}}),
            &json!({"spec": {"replicas": 2}})
        ));
        assert!(!contains(&json!({"a": [1, 2]}), &json!({"a": [1]})));
        assert!(!contains(&json!({}), &json!({"a": 1})));
    }

    #[test]
    fn the_applied_hash_follows_the_content() {
        let a = with_applied_hash(&json!({"metadata": {"name": "x"}, "a": 1}), "x").unwrap();
        let b = with_applied_hash(&json!({"metadata": {"name": "x"}}), "x").unwrap();
        let h = |v: &Value| v["metadata"]["annotations"][APPLIED_HASH_ANNOTATION].clone();
        assert_ne!(h(&a), h(&b));
        assert!(h(&a).is_string());
    }

    #[test]
    fn every_label_of_the_convention_is_set() {
        let l = labels("worker", "shipment-to-invoice");
        for k in ["name", "instance", "component", "part-of", "managed-by"] {
            assert!(l.contains_key(&format!("app.kubernetes.io/{k}")), "{k}");
        }
        assert!(
            selector("worker", "x")
                .iter()
                .all(|(k, v)| l.get(k) == Some(v) || k == "app.kubernetes.io/instance")
        );
    }
}
