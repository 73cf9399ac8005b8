//! Structural validation of an object against a CRD's OpenAPI v3 schema, as
//! the API server does it before admission: types, required fields, unknown
//! fields (kubectl's default strict field validation), enums, patterns,
//! bounds and list-map keys. `x-kubernetes-validations` rules are evaluated
//! separately by kube-cel (see [`crate::validate`]).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use regex::Regex;
use serde_json::{Map, Value};

/// One violation at a field path such as `spec.steps[2].call.action`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// Check `value` against `schema`, appending every violation to `errors`.
pub fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let mut err = |message: String| {
        errors.push(FieldError {
            path: path.to_string(),
            message,
        })
    };
    if value.is_null() {
        if !flag(schema, "nullable") && !flag(schema, "x-kubernetes-preserve-unknown-fields") {
            err("must not be null".into());
        }
        return;
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            err(format!(
                "must be an integer or a string, got {}",
                describe(value)
            ));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let type_ok = match ty {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !type_ok {
        err(format!(
            "must be {}, got {}",
            article(ty.unwrap_or("value")),
            describe(value)
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let accepted: Vec<String> = allowed
            .iter()
            .filter(|v| !v.is_null())
            .map(|v| v.to_string())
            .collect();
        err(format!(
            "unsupported value {value}; accepted: {}",
            accepted.join(", ")
        ));
    }
    match value {
        Value::String(s) => check_string(schema, s, &mut err),
        Value::Number(n) => check_number(schema, n, &mut err),
        Value::Array(items) => {
            check_bounds(schema, "Items", items.len(), "items", &mut err);
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
            check_list_keys(schema, items, path, errors);
        }
        Value::Object(map) => check_object(schema, map, path, errors),
        _ => {}
    }
}

fn check_object(
    schema: &Value,
    map: &Map<String, Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    check_bounds(schema, "Properties", map.len(), "entries", &mut |message| {
        errors.push(FieldError {
            path: path.to_string(),
            message,
        })
    });
    let properties = schema.get("properties").and_then(Value::as_object);
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(name) {
                errors.push(FieldError {
                    path: join(path, name),
                    message: "required field is missing".into(),
                });
            }
        }
    }
    let additional = schema.get("additionalProperties");
    let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
    for (key, child) in map {
        if let Some(prop) = properties.and_then(|p| p.get(key)) {
            check(prop, child, &join(path, key), errors);
        } else if let Some(additional) = additional.filter(|a| a.is_object()) {
            check(additional, child, &format!("{path}[{key}]"), errors);
        } else if !preserve && additional != Some(&Value::Bool(true)) {
            let accepted = properties
                .map(|p| p.keys().cloned().collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            errors.push(FieldError {
                path: join(path, key),
                message: if accepted.is_empty() {
                    format!("unknown field {key:?}; this object takes no fields")
                } else {
                    format!("unknown field {key:?}; accepted: {accepted}")
                },
            });
        }
    }
}

fn check_string(schema: &Value, s: &str, err: &mut impl FnMut(String)) {
    let len = s.chars().count();
    check_bounds(schema, "Length", len, "characters", err);
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match cached_regex(pattern) {
            Some(re) if !re.is_match(s) => err(match pattern_hint(pattern) {
                Some(hint) => format!("{s:?} is not {hint}"),
                None => format!("{s:?} does not match the pattern {pattern}"),
            }),
            _ => {}
        }
    }
    if schema.get("format").and_then(Value::as_str) == Some("date-time") && !is_rfc3339(s) {
        err(format!(
            "{s:?} is not an RFC 3339 date-time, e.g. 2026-01-31T12:00:00Z"
        ));
    }
}

fn check_number(schema: &Value, n: &serde_json::Number, err: &mut impl FnMut(String)) {
    let Some(x) = n.as_f64() else { return };
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
        && x < min
    {
        err(format!("{n} is below the minimum {min}"));
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
        && x > max
    {
        err(format!("{n} is above the maximum {max}"));
    }
    let range = match schema.get("format").and_then(Value::as_str) {
        Some("int32") => Some((i32::MIN as f64, i32::MAX as f64)),
        Some("uint32") => Some((0.0, u32::MAX as f64)),
        Some("uint64") | Some("uint") => Some((0.0, u64::MAX as f64)),
        _ => None,
    };
    if let Some((lo, hi)) = range
        && (x < lo || x > hi)
    {
        err(format!("{n} is out of range {lo}..={hi}"));
    }
}

/// `minLength`/`maxLength`, `minItems`/`maxItems`, `minProperties`/`maxProperties`.
fn check_bounds(schema: &Value, what: &str, len: usize, unit: &str, err: &mut impl FnMut(String)) {
    if let Some(min) = schema.get(format!("min{what}")).and_then(Value::as_u64)
        && (len as u64) < min
    {
        err(if min == 1 {
            "must not be empty".to_string()
        } else {
            format!("has {len} {unit}, at least {min} are needed")
        });
    }
    if let Some(max) = schema.get(format!("max{what}")).and_then(Value::as_u64)
        && (len as u64) > max
    {
        err(format!("has {len} {unit}, at most {max} are allowed"));
    }
}

/// `x-kubernetes-list-type: map` (unique keys) and `set` (unique items).
fn check_list_keys(schema: &Value, items: &[Value], path: &str, errors: &mut Vec<FieldError>) {
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut seen: HashMap<Vec<&Value>, usize> = HashMap::new();
            for (i, item) in items.iter().enumerate() {
                let key: Vec<&Value> = keys
                    .iter()
                    .map(|k| item.get(*k).unwrap_or(&Value::Null))
                    .collect();
                if key.iter().any(|v| v.is_null()) {
                    continue;
                }
                if let Some(first) = seen.get(&key) {
                    let shown: Vec<String> = keys
                        .iter()
                        .zip(&key)
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect();
                    errors.push(FieldError {
                        path: format!("{path}[{i}].{}", keys.join(",")),
                        message: format!(
                            "duplicate {}; already used by {path}[{first}], must be unique",
                            shown.join(", ")
                        ),
                    });
                } else {
                    seen.insert(key, i);
                }
            }
        }
        Some("set") => {
            for (i, item) in items.iter().enumerate() {
                if let Some(first) = items[..i].iter().position(|x| x == item) {
                    errors.push(FieldError {
                        path: format!("{path}[{i}]"),
                        message: format!("duplicate value {item}; already at {path}[{first}]"),
                    });
                }
            }
        }
        _ => {}
    }
}

/// Plain words for the patterns tallyman's CRDs use.
fn pattern_hint(pattern: &str) -> Option<&'static str> {
    use tallyman_api::v1alpha1::{DURATION_PATTERN, EVENT_TYPE_PATTERN, STEP_NAME_PATTERN};
    if pattern == DURATION_PATTERN {
        Some("a duration; use e.g. 30s, 5m, 1h30m, 250ms")
    } else if pattern == STEP_NAME_PATTERN {
        Some(
            "a DNS label; use lowercase letters, digits and '-', starting and ending with a letter or digit, e.g. create-invoice",
        )
    } else if pattern == EVENT_TYPE_PATTERN {
        Some("an event type; use dot-separated lowercase words, e.g. shipment.confirmed")
    } else if pattern == "^[A-Z][A-Za-z0-9]*$" {
        Some("an UpperCamelCase word, e.g. QuantityMismatch")
    } else {
        None
    }
}

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool).unwrap_or(false)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn article(ty: &str) -> String {
    match ty {
        "object" => "an object".into(),
        "array" => "a list".into(),
        "integer" => "an integer".into(),
        other => format!("a {other}"),
    }
}

/// A short description of a JSON value's type, for messages.
pub fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn is_rfc3339(s: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
            .expect("valid regex")
    })
    .is_match(s)
}

/// Schema patterns are few and fixed; compile each once per process.
fn cached_regex(pattern: &str) -> Option<Regex> {
    static CACHE: OnceLock<Mutex<HashMap<String, Option<Regex>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .entry(pattern.to_string())
        .or_insert_with(|| Regex::new(pattern).ok())
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors(schema: Value, value: Value) -> Vec<FieldError> {
        let mut errs = Vec::new();
        check(&schema, &value, "spec", &mut errs);
        errs
    }

    #[test]
    fn types_required_and_unknown_fields() {
        let schema = json!({"type": "object", "required": ["a"], "properties": {
            "a": {"type": "integer"}, "b": {"type": "string", "enum": ["x", "y"]}}});
        let errs = errors(schema.clone(), json!({"a": "1", "b": "z", "c": true}));
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["spec.a", "spec.b", "spec.c"]);
        assert!(errs[0].message.contains("must be an integer, got a string"));
        assert!(errs[1].message.contains(r#"accepted: "x", "y""#));
        assert!(
            errs[2]
                .message
                .contains("unknown field \"c\"; accepted: a, b")
        );
        let errs = errors(schema, json!({}));
        assert_eq!(errs[0].path, "spec.a");
        assert_eq!(errs[0].message, "required field is missing");
    }

    #[test]
    fn maps_lists_and_bounds() {
        let schema = json!({"type": "object", "properties": {
            "m": {"type": "object", "additionalProperties": {"type": "string", "minLength": 2}},
            "l": {"type": "array", "maxItems": 2, "x-kubernetes-list-type": "map",
                  "x-kubernetes-list-map-keys": ["name"],
                  "items": {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]+$"}}}},
            "n": {"type": "integer", "minimum": 1}}});
        let errs = errors(
            schema,
            json!({"m": {"k": "x"}, "l": [{"name": "a"}, {"name": "a"}, {"name": "B"}], "n": 0}),
        );
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.l",
                "spec.l[2].name",
                "spec.l[1].name",
                "spec.m[k]",
                "spec.n"
            ]
        );
        assert!(errs[0].message.contains("at most 2"));
        assert!(errs[2].message.contains("already used by spec.l[0]"));
    }

    #[test]
    fn null_is_refused_unless_nullable() {
        assert_eq!(errors(json!({"type": "string"}), Value::Null).len(), 1);
        assert!(errors(json!({"type": "string", "nullable": true}), Value::Null).is_empty());
    }
}
