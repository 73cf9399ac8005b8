//! JSON in and out of CEL without losing a digit.
//!
//! `serde_json` reads every number with a fraction as an `f64`; amounts must
//! not pass through a float. This reader turns integers into `int` (or
//! `uint` above `i64::MAX`) and every number with a fraction or an exponent
//! into a `decimal` holding exactly the digits written; the writer prints a
//! decimal with exactly the digits it holds (`1250.10` stays `1250.10`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

use kube_cel::cel::objects::{Key, Map, Value};

use super::finance::{as_decimal, decimal_from_f64, decimal_value, parse_decimal};

/// Why a JSON text or a value could not be converted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonError(pub String);

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JsonError {}

/// Nesting beyond this is refused, so hostile input cannot exhaust the stack.
const MAX_DEPTH: usize = 128;

/// Parse JSON text into a CEL value.
pub fn parse(text: &[u8]) -> Result<Value, JsonError> {
    parse_into(text)
}

/// Parse JSON text into the evaluator's shared form
/// ([`super::fast::Val`]): the same numbers, strings and errors as
/// [`parse`], without going through a CEL value.
pub fn parse_fast(text: &[u8]) -> Result<super::fast::Val, JsonError> {
    parse_into(text)
}

/// Parse the text of a value the instance keeps ([`super::fast::Val::to_stored_json`]):
/// JSON, in which a timestamp is written `timestamp("<RFC 3339>")`.
pub fn parse_stored(text: &[u8]) -> Result<super::fast::Val, JsonError> {
    parse_with(text, true)
}

fn parse_into<B: Build>(text: &[u8]) -> Result<B, JsonError> {
    parse_with(text, false)
}

fn parse_with<B: Build>(text: &[u8], stored: bool) -> Result<B, JsonError> {
    let mut p = Parser {
        s: text,
        i: 0,
        stored,
    };
    p.ws();
    let v = p.value::<B>(0, &mut Vec::new(), false)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(p.error("trailing characters after the JSON value"));
    }
    Ok(v)
}

/// What the parser builds: a CEL value, or the evaluator's shared form.
pub(crate) trait Build: Sized {
    fn null() -> Self;
    fn bool(b: bool) -> Self;
    fn int(i: i64) -> Self;
    fn uint(u: u64) -> Self;
    fn decimal(d: rust_decimal::Decimal) -> Self;
    fn timestamp(t: chrono::DateTime<chrono::FixedOffset>) -> Self;
    fn string(s: Cow<'_, str>) -> Self;
    fn list(items: Vec<Self>) -> Self;
    /// A map key, made once per document for the objects of an array.
    type Key: Clone;
    fn key(s: &str) -> Self::Key;
    fn key_str(k: &Self::Key) -> &str;
    /// Entries in the order written; a repeated key keeps its last value.
    fn map(entries: Vec<(Self::Key, Self)>) -> Self;
}

/// At most this many keys of a document are kept for the objects after
/// the first of an array.
const SHARED_KEYS: usize = 64;

/// The key `s`: one already made for an earlier object of an array, or a
/// new one (kept for the next objects when `in_array`).
fn shared_key<B: Build>(keys: &mut Vec<B::Key>, s: &str, in_array: bool) -> B::Key {
    if let Some(k) = keys.iter().find(|k| B::key_str(k) == s) {
        return k.clone();
    }
    let k = B::key(s);
    if in_array && keys.len() < SHARED_KEYS {
        keys.push(k.clone());
    }
    k
}

impl Build for Value {
    fn null() -> Self {
        Value::Null
    }
    fn bool(b: bool) -> Self {
        Value::Bool(b)
    }
    fn int(i: i64) -> Self {
        Value::Int(i)
    }
    fn uint(u: u64) -> Self {
        Value::UInt(u)
    }
    fn decimal(d: rust_decimal::Decimal) -> Self {
        decimal_value(d)
    }
    fn timestamp(t: chrono::DateTime<chrono::FixedOffset>) -> Self {
        Value::Timestamp(t)
    }
    fn string(s: Cow<'_, str>) -> Self {
        Value::String(Arc::new(s.into_owned()))
    }
    fn list(items: Vec<Self>) -> Self {
        Value::List(Arc::new(items))
    }
    type Key = Arc<String>;
    fn key(s: &str) -> Self::Key {
        Arc::new(s.to_owned())
    }
    fn key_str(k: &Self::Key) -> &str {
        k.as_str()
    }
    fn map(entries: Vec<(Self::Key, Self)>) -> Self {
        let map: HashMap<Key, Value> = entries
            .into_iter()
            .map(|(k, v)| (Key::String(k), v))
            .collect();
        Value::Map(Map { map: Arc::new(map) })
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    /// Whether `timestamp("…")` is read as a timestamp.
    stored: bool,
}

impl<'a> Parser<'a> {
    fn error(&self, what: &str) -> JsonError {
        JsonError(format!("invalid JSON at byte {}: {what}", self.i))
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &[u8]) -> bool {
        if self.s[self.i..].starts_with(lit) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    /// `keys`: the keys made for the objects of arrays so far, shared by
    /// the objects that follow (an array of 50 order lines makes its keys
    /// once, not 50 times); `in_array`: whether this value is (inside) an
    /// element of an array.
    fn value<B: Build>(
        &mut self,
        depth: usize,
        keys: &mut Vec<B::Key>,
        in_array: bool,
    ) -> Result<B, JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        match self.s.get(self.i) {
            None => Err(self.error("unexpected end")),
            Some(b'{') => {
                self.i += 1;
                let mut entries = Vec::new();
                self.ws();
                if self.eat(b"}") {
                    return Ok(B::map(entries));
                }
                loop {
                    self.ws();
                    if self.s.get(self.i) != Some(&b'"') {
                        return Err(self.error("expected a string key"));
                    }
                    let key = shared_key::<B>(keys, &self.string()?, in_array);
                    self.ws();
                    if !self.eat(b":") {
                        return Err(self.error("expected ':'"));
                    }
                    self.ws();
                    let v = self.value(depth + 1, keys, in_array)?;
                    entries.push((key, v));
                    self.ws();
                    if self.eat(b",") {
                        continue;
                    }
                    if self.eat(b"}") {
                        return Ok(B::map(entries));
                    }
                    return Err(self.error("expected ',' or '}'"));
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat(b"]") {
                    return Ok(B::list(items));
                }
                loop {
                    self.ws();
                    items.push(self.value(depth + 1, keys, true)?);
                    self.ws();
                    if self.eat(b",") {
                        continue;
                    }
                    if self.eat(b"]") {
                        return Ok(B::list(items));
                    }
                    return Err(self.error("expected ',' or ']'"));
                }
            }
            Some(b'"') => Ok(B::string(self.string()?)),
            Some(b't') if self.eat(b"true") => Ok(B::bool(true)),
            Some(b't') if self.stored && self.eat(b"timestamp(") => {
                if self.s.get(self.i) != Some(&b'"') {
                    return Err(self.error("expected a string in timestamp()"));
                }
                let text = self.string()?;
                let t = chrono::DateTime::parse_from_rfc3339(&text)
                    .map_err(|e| self.error(&format!("timestamp {text:?}: {e}")))?;
                if !self.eat(b")") {
                    return Err(self.error("expected ')'"));
                }
                Ok(B::timestamp(t))
            }
            Some(b'f') if self.eat(b"false") => Ok(B::bool(false)),
            Some(b'n') if self.eat(b"null") => Ok(B::null()),
            Some(c) if *c == b'-' || c.is_ascii_digit() => self.number(),
            Some(_) => Err(self.error("unexpected character")),
        }
    }

    fn number<B: Build>(&mut self) -> Result<B, JsonError> {
        let start = self.i;
        let digits = |p: &mut Self| {
            let from = p.i;
            while p.i < p.s.len() && p.s[p.i].is_ascii_digit() {
                p.i += 1;
            }
            p.i > from
        };
        self.eat(b"-");
        let leading_zero = self.s.get(self.i) == Some(&b'0');
        if !digits(self) {
            return Err(self.error("a number needs digits"));
        }
        if leading_zero && self.i - start > 1 + usize::from(self.s[start] == b'-') {
            return Err(self.error("a number may not start with 0"));
        }
        let mut integral = true;
        if self.eat(b".") {
            integral = false;
            if !digits(self) {
                return Err(self.error("a fraction needs digits"));
            }
        }
        if self.i < self.s.len() && matches!(self.s[self.i], b'e' | b'E') {
            integral = false;
            self.i += 1;
            if self.i < self.s.len() && matches!(self.s[self.i], b'+' | b'-') {
                self.i += 1;
            }
            if !digits(self) {
                return Err(self.error("an exponent needs digits"));
            }
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).expect("ASCII digits");
        if integral {
            if let Ok(i) = text.parse::<i64>() {
                return Ok(B::int(i));
            }
            if let Ok(u) = text.parse::<u64>() {
                return Ok(B::uint(u));
            }
        }
        parse_decimal(text)
            .map(B::decimal)
            .map_err(|_| JsonError(format!("number {text} does not fit a decimal of 28 digits")))
    }

    /// A string; borrowed from the input when it has no escapes.
    fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        self.i += 1; // opening quote
        let text: &'a [u8] = self.s;
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.i < self.s.len()
                && !matches!(self.s[self.i], b'"' | b'\\')
                && self.s[self.i] >= 0x20
            {
                self.i += 1;
            }
            let chunk = std::str::from_utf8(&text[start..self.i])
                .map_err(|_| self.error("invalid UTF-8"))?;
            match self.s.get(self.i) {
                Some(b'"') => {
                    self.i += 1;
                    if out.is_empty() {
                        return Ok(Cow::Borrowed(chunk));
                    }
                    out.push_str(chunk);
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    out.push_str(chunk);
                    self.i += 1;
                    let c = *self
                        .s
                        .get(self.i)
                        .ok_or_else(|| self.error("unfinished escape"))?;
                    self.i += 1;
                    match c {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi) {
                                if !self.eat(b"\\u") {
                                    return Err(self.error("a high surrogate needs a low one"));
                                }
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(self.error("invalid low surrogate"));
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else {
                                hi
                            };
                            out.push(
                                char::from_u32(code)
                                    .ok_or_else(|| self.error("invalid code point"))?,
                            );
                        }
                        _ => return Err(self.error("invalid escape")),
                    }
                }
                Some(_) => return Err(self.error("control character in a string")),
                None => return Err(self.error("unterminated string")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let digits = self
            .s
            .get(self.i..self.i + 4)
            .ok_or_else(|| self.error("short \\u escape"))?;
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(self.error("invalid \\u escape"));
        }
        let text = std::str::from_utf8(digits).expect("hex digits");
        let v = u32::from_str_radix(text, 16).map_err(|_| self.error("invalid \\u escape"))?;
        self.i += 4;
        Ok(v)
    }
}

/// A CEL value as JSON text; decimals with exactly their digits.
pub fn to_string(v: &Value) -> Result<String, JsonError> {
    let mut out = String::new();
    write(v, &mut out)?;
    Ok(out)
}

/// Append a CEL value as JSON text to `out`.
pub fn write(v: &Value, out: &mut String) -> Result<(), JsonError> {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        Value::Float(f) => match decimal_from_f64(*f) {
            Some(d) => {
                let _ = write!(out, "{d}");
            }
            None => return Err(JsonError(format!("{f} has no JSON representation"))),
        },
        Value::String(s) => string(s, out),
        Value::List(items) => {
            out.push('[');
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                write(item, out)?;
            }
            out.push(']');
        }
        Value::Map(map) => {
            // Sorted keys: the same value always gives the same text, which
            // idempotency keys and content hashes rely on.
            let mut entries: Vec<(String, &Value)> = map
                .map
                .iter()
                .map(|(k, v)| {
                    let k = match k {
                        Key::String(s) => s.to_string(),
                        Key::Int(i) => i.to_string(),
                        Key::Uint(u) => u.to_string(),
                        Key::Bool(b) => b.to_string(),
                    };
                    (k, v)
                })
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            out.push('{');
            for (n, (k, v)) in entries.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                string(k, out);
                out.push(':');
                write(v, out)?;
            }
            out.push('}');
        }
        Value::Timestamp(t) => string(&t.to_rfc3339(), out),
        Value::Duration(d) => string(&format!("{}s", d.num_milliseconds() as f64 / 1000.0), out),
        other => match as_decimal(other) {
            Some(d) => {
                let _ = write!(out, "{d}");
            }
            None => return Err(JsonError(format!("{other:?} has no JSON representation"))),
        },
    }
    Ok(())
}

pub(crate) fn string(s: &str, out: &mut String) {
    out.push('"');
    // Runs without an escape are copied whole.
    let mut plain_from = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => "",
            _ => continue,
        };
        // `i` is at an ASCII byte, hence on a char boundary.
        out.push_str(&s[plain_from..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", b);
        } else {
            out.push_str(escape);
        }
        plain_from = i + 1;
    }
    out.push_str(&s[plain_from..]);
    out.push('"');
}

/// A `serde_json` value (already parsed, so its fractions are floats) as a
/// CEL value; each float becomes the decimal of its shortest text.
pub fn from_serde(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                n.as_f64()
                    .and_then(decimal_from_f64)
                    .map_or(Value::Null, decimal_value)
            }
        }
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => {
            Value::List(Arc::new(items.iter().map(from_serde).collect()))
        }
        serde_json::Value::Object(map) => Value::Map(Map {
            map: Arc::new(
                map.iter()
                    .map(|(k, v)| (Key::String(Arc::new(k.clone())), from_serde(v)))
                    .collect(),
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_every_digit() {
        let v = parse(br#"{"qty": 3, "price": 1250.10, "big": 18446744073709551615, "tiny": 1e-2, "s": "a\"\u00e9\ud83d\ude00"}"#)
            .unwrap();
        assert_eq!(
            to_string(&v).unwrap(),
            r#"{"big":18446744073709551615,"price":1250.10,"qty":3,"s":"a\"é😀","tiny":0.01}"#
        );
    }

    #[test]
    fn strings_are_escaped_where_json_requires_it() {
        let mut out = String::new();
        string(
            "plain é😀 \"q\" back\\ nl\n cr\r tab\t bell\u{7} us\u{1f} del\u{7f}",
            &mut out,
        );
        assert_eq!(
            out,
            "\"plain é😀 \\\"q\\\" back\\\\ nl\\n cr\\r tab\\t bell\\u0007 us\\u001f del\u{7f}\""
        );
        let text = to_string(&Value::String(Arc::new("a\u{1}b\"".repeat(3) + "é"))).unwrap();
        assert_eq!(text, r#""a\u0001b\"a\u0001b\"a\u0001b\"é""#);
    }

    #[test]
    fn only_stored_text_has_timestamps() {
        let text = br#"{"due": timestamp("2026-11-28T09:00:00+01:00"), "at": [timestamp("2026-11-28T08:00:00.5Z")]}"#;
        assert!(parse_fast(text).is_err(), "events and answers are JSON");
        assert!(parse(text).is_err());
        let v = parse_stored(text).unwrap();
        assert_eq!(
            v.to_stored_json().unwrap(),
            r#"{"at":[timestamp("2026-11-28T08:00:00.500+00:00")],"due":timestamp("2026-11-28T09:00:00+01:00")}"#
        );
        for bad in [
            &br#"timestamp("2026-11-28")"#[..],
            br#"timestamp(1)"#,
            br#"timestamp("2026-11-28T09:00:00Z""#,
            br#"timestamps("2026-11-28T09:00:00Z")"#,
        ] {
            assert!(
                parse_stored(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn an_exponent_keeps_every_digit_or_is_refused() {
        for (text, read) in [
            ("123.450e1", "1234.50"),
            ("1e28", "10000000000000000000000000000"),
            ("-2.5E-3", "-0.0025"),
            ("0e5", "0"),
            (
                "1.2345678901234567890123456789e3",
                "1234.5678901234567890123456789",
            ),
        ] {
            let v = parse(text.as_bytes()).unwrap();
            assert_eq!(to_string(&v).unwrap(), read, "{text}");
        }
        // Plain, these do not fit 28 digits and are refused; written with an
        // exponent they were rounded.
        for text in [
            "1.2345678901234567890123456789012e3",
            "1.00000000000000000000000000001e0",
            "1e-30",
        ] {
            let e = parse(text.as_bytes()).unwrap_err();
            assert!(
                e.0.contains("does not fit a decimal of 28 digits"),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn malformed_json_is_refused() {
        for bad in [
            &b"{"[..],
            b"[1,]",
            b"{\"a\" 1}",
            b"01x",
            b"\"\\x\"",
            b"1.",
            b"-",
            b"[] []",
            b"01",
            b"-007.5",
            b"[00]",
            b"\"\\u+041\"",
            b"\"\\u-041\"",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        for good in ["0", "-0", "0.5", "-0.5", "0e1", "[0,10,100]", r#""\u00e9""#] {
            assert!(parse(good.as_bytes()).is_ok(), "{good}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(parse(deep.as_bytes()).is_err());
    }
}
