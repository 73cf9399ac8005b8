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
    /// The longest duration: 100 years (of 365 days), for ever in practice.
    /// Longer ones are taken as this, so every use stays in range: a date
    /// after now, an `Instant`, nanoseconds in an `i64` (the broker's unit).
    pub const LONGEST: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

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
        // As the CRD's pattern has it (the parser below reads it as zero).
        if s.is_empty() {
            return Err("an empty duration; use e.g. 30s, 5m, 1h30m".into());
        }
        // Before its size is looked at: a long negative one would panic.
        if s.starts_with('-') {
            return Err(format!("{s:?} is negative; durations must be positive"));
        }
        // Longer than a `std::time::Duration` holds (~5.8e11 years), the
        // parser below would panic; the API server admits any digits.
        if approx_secs(s).is_some_and(|secs| secs >= Duration::LONGEST.as_secs_f64()) {
            return Ok(Self {
                value: Duration::LONGEST,
                text: s.to_string(),
            });
        }
        let d: kube::core::Duration = s
            .parse()
            .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 30s, 5m, 1h30m"))?;
        if d.is_negative() {
            return Err(format!("{s:?} is negative; durations must be positive"));
        }
        Ok(Self {
            value: std::time::Duration::from(d).min(Duration::LONGEST),
            text: s.to_string(),
        })
    }
}

/// The seconds a duration literal stands for, roughly (as a float, which
/// does not overflow); `None` when it is not one.
fn approx_secs(s: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, secs) = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("μs", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ]
        .into_iter()
        .find(|(unit, _)| rest.starts_with(unit))?;
        rest = &rest[unit.len()..];
        total += number * secs;
    }
    Some(total)
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

#[cfg(test)]
mod tests {
    use super::Duration;

    #[test]
    fn durations_keep_their_text_and_refuse_what_is_not_one() {
        let d: Duration = "1h30m250ms".parse().unwrap();
        assert_eq!(d.as_std(), std::time::Duration::from_millis(5_400_250));
        assert_eq!(d.to_string(), "1h30m250ms");
        assert_eq!(
            "1.5m".parse::<Duration>().unwrap().as_std(),
            std::time::Duration::from_secs(90)
        );
        for bad in [
            "",
            "5",
            "5d",
            "-5s",
            "1e400h",
            "h",
            "-0s",
            "-99999999999999999999h",
        ] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_duration_past_a_hundred_years_is_a_hundred_years_not_a_panic() {
        // The API server admits any number of digits; parsing one too long
        // for std::time::Duration used to panic the operator's watch.
        for long in [
            "9999999999999999h",
            "99999999999999999999h",
            "1h99999999999999999999999s",
            "5000000000000000h",
            "876001h",
            "+99999999999999999999h",
            "99999999999999999999999999μs",
        ] {
            let d: Duration = long.parse().unwrap();
            assert_eq!(d.as_std(), Duration::LONGEST, "{long}");
            assert_eq!(d.to_string(), long);
        }
        let d: Duration = "876000h".parse().unwrap();
        assert_eq!(d.as_std(), Duration::LONGEST);
        let d: Duration = "875999h".parse().unwrap();
        assert!(d.as_std() < Duration::LONGEST);
        let d: Duration = serde_json::from_value(serde_json::json!("9999999999999999h")).unwrap();
        assert_eq!(d.as_std(), Duration::LONGEST);
        // The broker counts in i64 nanoseconds.
        assert!(i64::try_from(Duration::LONGEST.as_nanos()).is_ok());
    }
}
