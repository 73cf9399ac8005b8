//! Types shared by several resources: durations, Secret references, CEL
//! expressions and status conditions.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern every duration field accepts: a Kubernetes-style, non-negative
/// duration such as `30s`, `5m`, `1h30m` or `250ms`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// The pattern of an event type: dot-separated lowercase words, e.g.
/// `shipment.confirmed`; it becomes the last tokens of a NATS subject.
pub const EVENT_TYPE_PATTERN: &str =
    r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$";

/// A non-negative duration written the Kubernetes way (`30s`, `5m`, `48h`,
/// `1h30m`, `250ms`). It keeps the text it was written as, so messages and
/// serialized manifests show `5m`, not `300s`.
#[derive(Clone)]
pub struct Duration {
    value: std::time::Duration,
    text: String,
}

impl Duration {
    /// The duration as a `std::time::Duration`.
    pub fn as_std(&self) -> std::time::Duration {
        self.value
    }

    /// Parse a literal known to be valid (defaults in this crate).
    pub(crate) fn lit(text: &str) -> Self {
        text.parse().expect("a valid duration literal")
    }
}

impl PartialEq for Duration {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl Eq for Duration {}

impl FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let d: kube::core::Duration = s
            .parse()
            .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 30s, 5m, 1h30m"))?;
        if d.is_negative() {
            return Err(format!("{s:?} is negative; durations must be positive"));
        }
        Ok(Self {
            value: d.into(),
            text: s.to_string(),
        })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Duration({self})")
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
        })
    }
}

/// A CEL expression. It is compiled once when the definition is loaded; the
/// variables it may use depend on where it stands (see the CRD reference).
pub type Expression = String;

/// A key of a Secret in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the namespace of the referring resource.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Standard status conditions, keyed by `type`.
pub type Conditions = Vec<Condition>;

/// Schema for a list of `metav1.Condition`s, merged by `type` as the API
/// server and server-side apply expect.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

/// Condition types and reasons shared by conditions and Kubernetes Events.
pub mod condition {
    /// The resource is fully reconciled and serving.
    pub const READY: &str = "Ready";
    /// The operator is still rolling out a change.
    pub const PROGRESSING: &str = "Progressing";
    /// The resource works, but not as declared.
    pub const DEGRADED: &str = "Degraded";
    /// A Connector's REST endpoint answered its probe.
    pub const REACHABLE: &str = "Reachable";

    /// The spec was rejected; the message names the field path.
    pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
    /// Everything declared is running.
    pub const REASON_RECONCILED: &str = "Reconciled";
}
