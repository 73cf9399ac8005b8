//! The shared value form: cloning is a reference count, never a copy.

use std::borrow::Cow;
use std::fmt::Write;
use std::sync::Arc;

use chrono::{DateTime, FixedOffset};
use kube_cel::cel::objects::{Key, Map, Value};
use rust_decimal::Decimal;

use crate::cel::finance::{as_decimal, decimal_from_f64, decimal_value};
use crate::cel::json::{self, Build};

/// A value of the fast evaluator. Lists and maps are shared, strings are
/// `Arc<str>`; a JSON fraction is an exact [`Decimal`], as in the `cel` form.
#[derive(Clone, Debug)]
pub enum Val {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    Dec(Decimal),
    Str(Arc<str>),
    List(Arc<Vec<Val>>),
    Map(Arc<ValMap>),
    Timestamp(DateTime<FixedOffset>),
}

/// A map with string keys, sorted by key (so lookups are a binary search
/// and JSON comes out in the sorted order `json::write` uses).
#[derive(Clone, Debug, Default)]
pub struct ValMap(Vec<(Arc<str>, Val)>);

impl ValMap {
    /// From entries in any order; a repeated key keeps its last value, as
    /// a `HashMap` built by inserting them in order would.
    pub fn from_entries(mut entries: Vec<(Arc<str>, Val)>) -> Self {
        // Stable: equal keys stay in insertion order, the last one wins.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        // In place: `later` goes, its value moves into the entry kept.
        entries.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(&mut later.1, &mut kept.1);
            }
            same
        });
        Self(entries)
    }

    pub fn get(&self, key: &str) -> Option<&Val> {
        // Most maps are a JSON object's few fields: a scan (string equality
        // compares bytes only where the lengths match) beats a binary search
        // that orders strings at every probe.
        if self.0.len() <= 8 {
            return self.0.iter().find(|(k, _)| **k == *key).map(|(_, v)| v);
        }
        self.0
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Val)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl Val {
    /// Whether `other` is this very value: the same shared string, list or
    /// map, or an equal scalar written the same way (a decimal's scale
    /// included). A cheap test, never a deep comparison: `false` does not
    /// mean the values differ.
    pub fn is_same(&self, other: &Val) -> bool {
        match (self, other) {
            (Val::Null, Val::Null) => true,
            (Val::Bool(a), Val::Bool(b)) => a == b,
            (Val::Int(a), Val::Int(b)) => a == b,
            (Val::UInt(a), Val::UInt(b)) => a == b,
            (Val::Dec(a), Val::Dec(b)) => a.serialize() == b.serialize(),
            (Val::Str(a), Val::Str(b)) => Arc::ptr_eq(a, b),
            (Val::List(a), Val::List(b)) => Arc::ptr_eq(a, b),
            (Val::Map(a), Val::Map(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    pub fn str(s: &str) -> Val {
        Val::Str(Arc::from(s))
    }

    /// A map from `(key, value)` pairs.
    pub fn map<K: AsRef<str>>(entries: impl IntoIterator<Item = (K, Val)>) -> Val {
        Val::Map(Arc::new(ValMap::from_entries(
            entries
                .into_iter()
                .map(|(k, v)| (Arc::from(k.as_ref()), v))
                .collect(),
        )))
    }

    /// The CEL value this stands for.
    pub fn to_value(&self) -> Value {
        match self {
            Val::Null => Value::Null,
            Val::Bool(b) => Value::Bool(*b),
            Val::Int(i) => Value::Int(*i),
            Val::UInt(u) => Value::UInt(*u),
            Val::Double(f) => Value::Float(*f),
            Val::Dec(d) => decimal_value(*d),
            Val::Str(s) => Value::String(Arc::new(s.to_string())),
            Val::List(items) => Value::List(Arc::new(items.iter().map(Val::to_value).collect())),
            Val::Map(m) => Value::Map(Map {
                map: Arc::new(
                    m.iter()
                        .map(|(k, v)| (Key::String(Arc::new(k.to_string())), v.to_value()))
                        .collect(),
                ),
            }),
            Val::Timestamp(t) => Value::Timestamp(*t),
        }
    }

    /// The shared form of a CEL value, when it has one: maps must have
    /// string keys; bytes, durations and opaque values other than decimals
    /// have none.
    pub fn from_value(v: &Value) -> Option<Val> {
        Some(match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Int(i) => Val::Int(*i),
            Value::UInt(u) => Val::UInt(*u),
            Value::Float(f) => Val::Double(*f),
            Value::String(s) => Val::Str(Arc::from(s.as_str())),
            Value::List(items) => Val::List(Arc::new(
                items.iter().map(Val::from_value).collect::<Option<_>>()?,
            )),
            Value::Map(m) => {
                let mut entries = Vec::with_capacity(m.map.len());
                for (k, v) in m.map.iter() {
                    let Key::String(k) = k else { return None };
                    entries.push((Arc::from(k.as_str()), Val::from_value(v)?));
                }
                Val::Map(Arc::new(ValMap::from_entries(entries)))
            }
            Value::Timestamp(t) => Val::Timestamp(*t),
            other => Val::Dec(as_decimal(other)?),
        })
    }

    /// Whether parsing [`Val::to_json`]'s text gives this value back, so a
    /// value kept in memory reads the same as its stored text after a
    /// restart. Not so for doubles and timestamps, a decimal without a
    /// fraction that fits an integer (its text reads as one) or an
    /// unsigned integer that fits a signed one.
    pub fn json_stable(&self) -> bool {
        self.stable(Form::Sent)
    }

    /// Whether [`json::parse_stored`] gives this value back from
    /// [`Val::to_stored_json`]'s text: as [`Val::json_stable`], every decimal
    /// and timestamp included.
    pub fn stored_stable(&self) -> bool {
        self.stable(Form::Stored)
    }

    fn stable(&self, form: Form) -> bool {
        match self {
            Val::Null | Val::Bool(_) | Val::Int(_) | Val::Str(_) => true,
            Val::UInt(u) => *u > i64::MAX as u64,
            // Sent, a whole decimal reads back as an integer if it fits one.
            Val::Dec(d) => {
                form == Form::Stored
                    || d.scale() > 0
                    || !(Decimal::from(i64::MIN)..=Decimal::from(u64::MAX)).contains(d)
            }
            Val::Timestamp(_) => form == Form::Stored,
            Val::Double(_) => false,
            Val::List(items) => items.iter().all(|v| v.stable(form)),
            Val::Map(m) => m.iter().all(|(_, v)| v.stable(form)),
        }
    }

    /// JSON text, exactly as `json::to_string` writes the CEL value.
    pub fn to_json(&self) -> Result<String, json::JsonError> {
        self.json_in(Form::Sent)
    }

    /// The text of a value the instance keeps (a variable), read back by
    /// [`json::parse_stored`]: as [`Val::to_json`], except that a decimal
    /// without a fraction is written with an exponent (`100e0`), which reads
    /// back as that decimal, and a timestamp as `timestamp("<RFC 3339>")`.
    /// As JSON they would read back as an integer (and `vars.net / 3` would
    /// divide as integers) and a string. Only ever read by the engine; what
    /// leaves it (emitted events, call bodies) is written by [`Val::to_json`].
    pub fn to_stored_json(&self) -> Result<String, json::JsonError> {
        self.json_in(Form::Stored)
    }

    fn json_in(&self, form: Form) -> Result<String, json::JsonError> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        // Written into a buffer kept per thread, then copied once: one
        // allocation of the exact size instead of one per doubling.
        let written = SCRATCH.with_borrow_mut(|out| {
            out.clear();
            self.write_json(out, form).then(|| out.as_str().to_owned())
        });
        if let Some(text) = written {
            Ok(text)
        } else {
            // Only a non-finite double has no JSON; say so in the same words.
            json::to_string(&self.to_value())
        }
    }

    /// Append JSON text; false when a value has no JSON representation.
    fn write_json(&self, out: &mut String, form: Form) -> bool {
        match self {
            Val::Null => out.push_str("null"),
            Val::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Val::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Val::UInt(u) => {
                let _ = write!(out, "{u}");
            }
            // Stored, a double reads back as the decimal it is written as.
            Val::Double(f) => match decimal_from_f64(*f) {
                Some(d) => return Val::Dec(d).write_json(out, form),
                None => return false,
            },
            Val::Dec(d) if form == Form::Stored && d.scale() == 0 => {
                let _ = write!(out, "{d}e0");
            }
            Val::Dec(d) => {
                let _ = write!(out, "{d}");
            }
            Val::Str(s) => json::string(s, out),
            Val::List(items) => {
                out.push('[');
                for (n, item) in items.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    if !item.write_json(out, form) {
                        return false;
                    }
                }
                out.push(']');
            }
            Val::Map(m) => {
                out.push('{');
                for (n, (k, v)) in m.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    json::string(k, out);
                    out.push(':');
                    if !v.write_json(out, form) {
                        return false;
                    }
                }
                out.push('}');
            }
            Val::Timestamp(t) if form == Form::Stored => {
                out.push_str("timestamp(");
                json::string(&t.to_rfc3339(), out);
                out.push(')');
            }
            Val::Timestamp(t) => json::string(&t.to_rfc3339(), out),
        }
        true
    }
}

/// Who reads the JSON text: systems outside (as CEL's JSON has it) or the
/// engine itself, from the instance it stored.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    Sent,
    Stored,
}

impl Build for Val {
    fn null() -> Self {
        Val::Null
    }
    fn bool(b: bool) -> Self {
        Val::Bool(b)
    }
    fn int(i: i64) -> Self {
        Val::Int(i)
    }
    fn uint(u: u64) -> Self {
        Val::UInt(u)
    }
    fn decimal(d: Decimal) -> Self {
        Val::Dec(d)
    }
    fn timestamp(t: DateTime<FixedOffset>) -> Self {
        Val::Timestamp(t)
    }
    fn string(s: Cow<'_, str>) -> Self {
        Val::Str(Arc::from(&*s))
    }
    fn list(items: Vec<Self>) -> Self {
        Val::List(Arc::new(items))
    }
    type Key = Arc<str>;
    fn key(s: &str) -> Self::Key {
        Arc::from(s)
    }
    fn key_str(k: &Self::Key) -> &str {
        k
    }
    fn map(entries: Vec<(Self::Key, Self)>) -> Self {
        Val::Map(Arc::new(ValMap::from_entries(entries)))
    }
}
