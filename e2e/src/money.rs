//! Exact money for the scenarios' expectations: integer cents, rounding as
//! the workflows' `round` (half-even) and `roundHalfUp` do, and the raw JSON
//! text of the numbers a document carried (never through a float).

use std::collections::BTreeMap;

use serde_json::value::RawValue;

/// "19.90" → 1990, "-412.5" → -41250.
///
/// # Panics
/// On more than two decimal places or text that is no decimal.
pub fn cents(decimal: &str) -> i64 {
    let (sign, digits) = match decimal.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, decimal),
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    assert!(
        frac.len() <= 2,
        "{decimal} has more than two decimal places"
    );
    let frac = format!("{frac:0<2}");
    sign * (whole.parse::<i64>().expect("whole units") * 100 + frac.parse::<i64>().expect("cents"))
}

/// 77170 → "771.70", -1497 → "-14.97", -5 → "-0.05".
pub fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

/// `value / divisor`, rounded half to even (CEL `round`).
pub fn div_half_even(value: i64, divisor: i64) -> i64 {
    assert!(divisor > 0);
    let q = value.div_euclid(divisor);
    let r = value.rem_euclid(divisor);
    match (2 * r).cmp(&divisor) {
        std::cmp::Ordering::Less => q,
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal => q + (q & 1),
    }
}

/// `value / divisor`, rounded half away from zero (CEL `roundHalfUp`).
pub fn div_half_up(value: i64, divisor: i64) -> i64 {
    assert!(divisor > 0);
    let q = value.abs() / divisor;
    let r = value.abs() % divisor;
    let q = if 2 * r >= divisor { q + 1 } else { q };
    value.signum() * q
}

/// The objects of the top-level array `field` of a JSON document, each as
/// its fields' raw JSON text: `[{"sku": "\"A-100\"", "amount": "39.80"}]`.
///
/// # Panics
/// When `field` is missing or not an array of objects.
pub fn raw_objects(json: &str, field: &str) -> Vec<BTreeMap<String, String>> {
    let top: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let array = top
        .get(field)
        .unwrap_or_else(|| panic!("no {field} in {json}"));
    let items: Vec<BTreeMap<String, Box<RawValue>>> = serde_json::from_str(array.get())
        .unwrap_or_else(|e| panic!("{field} is no array of objects ({e}): {json}"));
    items
        .into_iter()
        .map(|o| {
            o.into_iter()
                .map(|(k, v)| (k, v.get().to_string()))
                .collect()
        })
        .collect()
}

/// A JSON string's raw text: `quoted("A-100") == "\"A-100\""`.
pub fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_cents_and_rounding() {
        assert_eq!(cents("19.90"), 1990);
        assert_eq!(cents("-412.5"), -41250);
        assert_eq!(cents("149"), 14900);
        assert_eq!(money(-1497), "-14.97");
        assert_eq!(money(-5), "-0.05");
        assert_eq!(money(0), "0.00");
        // 10.285 → 10.28 (even), 10.455 → 10.46, 2.505 → 2.51 half-up.
        assert_eq!(div_half_even(102_850, 100), 1028);
        assert_eq!(div_half_even(104_550, 100), 1046);
        assert_eq!(div_half_even(-102_850, 100), -1028);
        assert_eq!(div_half_up(2_505, 10), 251);
        assert_eq!(div_half_up(-2_505, 10), -251);
        assert_eq!(div_half_even(2_505, 10), 250);
        let raw = raw_objects(r#"{"lines":[{"a":19.90,"b":"x"}],"n":1}"#, "lines");
        assert_eq!(raw[0]["a"], "19.90");
        assert_eq!(raw[0]["b"], quoted("x"));
    }
}
