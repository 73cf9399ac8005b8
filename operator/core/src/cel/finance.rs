//! The finance library: exact decimals in every expression.
//!
//! Money is never a float. A JSON number with a fraction reaches CEL as a
//! `decimal` holding exactly the digits written (see [`super::json`]), and
//! `decimal(x)` makes one from a string, an int or a double (a double by its
//! shortest decimal text, so `0.1` is exactly 0.1). The arithmetic and
//! comparison operators are rewritten at compile time into functions that
//! compute exactly when either side is a decimal and behave as standard CEL
//! otherwise:
//!
//! | expression | result |
//! |---|---|
//! | `decimal('0.1') + decimal('0.2') == decimal('0.3')` | `true` |
//! | `decimal('19.99') * 3` | `59.97` |
//! | `[a, b, c].sum()` | exact sum; `0` for an empty list |
//! | `round(d, 2)` / `roundHalfUp(d, 2)` | half-even / half-up to 2 places |
//! | `abs(d)` | absolute value |
//! | `pct(part, whole)` | `part / whole * 100` |
//! | `within(a, b, tolerance)` | `abs(a - b) <= abs(tolerance)` |

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use kube_cel::cel::common::ast::{Expr, IdedExpr};
use kube_cel::cel::extractors::{Arguments, This};
use kube_cel::cel::objects::{Opaque, Value};
use kube_cel::cel::{Context, ExecutionError, ResolveResult};
use rust_decimal::{Decimal, RoundingStrategy};

/// A CEL value holding an exact decimal.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Dec(pub Decimal);

impl fmt::Debug for Dec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "decimal({})", self.0)
    }
}

impl Opaque for Dec {
    fn runtime_type_name(&self) -> &str {
        "decimal"
    }
}

/// Wrap a decimal as a CEL value.
pub fn decimal_value(d: Decimal) -> Value {
    Value::Opaque(Arc::new(Dec(d)))
}

/// The decimal inside a CEL value, if it holds one.
pub fn as_decimal(v: &Value) -> Option<Decimal> {
    match v {
        Value::Opaque(o) => o.downcast_ref::<Dec>().map(|d| d.0),
        _ => None,
    }
}

/// A double as the decimal of its shortest round-tripping text.
pub fn decimal_from_f64(f: f64) -> Option<Decimal> {
    if !f.is_finite() {
        return None;
    }
    Decimal::from_str(&f.to_string())
        .or_else(|_| Decimal::from_scientific(&format!("{f:e}")))
        .ok()
}

/// A number of any kind as a decimal, for mixed arithmetic.
fn numeric(v: &Value) -> Option<Decimal> {
    match v {
        Value::Int(i) => Some(Decimal::from(*i)),
        Value::UInt(u) => Some(Decimal::from(*u)),
        Value::Float(f) => decimal_from_f64(*f),
        other => as_decimal(other),
    }
}

/// `x + y` exactly, or `None` when the exact sum does not fit a decimal
/// (rust_decimal would round it to fit, and drop digits without a word).
pub fn exact_add(x: Decimal, y: Decimal) -> Option<Decimal> {
    let r = x.checked_add(y)?;
    // Kept the larger scale: nothing was cut.
    if r.scale() >= x.scale().max(y.scale()) {
        return Some(r);
    }
    let (x, y) = (x.normalize(), y.normalize());
    let scale = x.scale().max(y.scale());
    let aligned = |d: Decimal| {
        d.mantissa()
            .checked_mul(10i128.checked_pow(scale - d.scale())?)
    };
    fits(aligned(x)?.checked_add(aligned(y)?)?, scale).map(|_| r)
}

/// `x - y` exactly (as [`exact_add`]); `0 - 0` is `0`, not `-0`.
pub fn exact_sub(x: Decimal, y: Decimal) -> Option<Decimal> {
    exact_add(x, if y.is_zero() { y } else { -y })
}

/// `x * y` exactly, or `None` when the exact product does not fit a
/// decimal.
pub fn exact_mul(x: Decimal, y: Decimal) -> Option<Decimal> {
    let r = x.checked_mul(y)?;
    if r.scale() == x.scale() + y.scale() {
        return Some(r);
    }
    // Digits and a power of ten each, trailing zeros moved into the power
    // (an integer's too: 10^12 is 1 × 10^12), so the digits multiply
    // within an i128 whenever the product can fit.
    let (mx, ex) = digits(x);
    let (my, ey) = digits(y);
    let (m, e) = (mx.checked_mul(my)?, ex + ey);
    let exact = if e >= 0 {
        fits(m.checked_mul(10i128.checked_pow(e as u32)?)?, 0)
    } else {
        fits(m, e.unsigned_abs())
    };
    exact.map(|_| r)
}

/// `d` as digits × 10^exponent, the digits without trailing zeros.
fn digits(d: Decimal) -> (i128, i32) {
    let (mut m, mut e) = (d.mantissa(), -(d.scale() as i32));
    while m != 0 && m % 10 == 0 {
        m /= 10;
        e += 1;
    }
    (m, e)
}

/// The decimal `mantissa / 10^scale`, when one holds it exactly.
fn fits(mut mantissa: i128, mut scale: u32) -> Option<Decimal> {
    while scale > 0 && mantissa % 10 == 0 {
        mantissa /= 10;
        scale -= 1;
    }
    Decimal::try_from_i128_with_scale(mantissa, scale).ok()
}

/// Why exact arithmetic gave no result.
const INEXACT: &str = "overflow, or more digits than a decimal holds (28): round an operand first";

fn err(function: &str, message: impl ToString) -> ExecutionError {
    ExecutionError::function_error(function, message)
}

/// Both sides as decimals when at least one is a decimal.
fn decimal_pair(
    name: &str,
    a: &Value,
    b: &Value,
) -> Result<Option<(Decimal, Decimal)>, ExecutionError> {
    if as_decimal(a).is_none() && as_decimal(b).is_none() {
        return Ok(None);
    }
    match (numeric(a), numeric(b)) {
        (Some(x), Some(y)) => Ok(Some((x, y))),
        _ => Err(err(
            name,
            format!("cannot combine {a:?} and {b:?}: both must be numbers"),
        )),
    }
}

const OPERATORS: &[(&str, &str)] = &[
    ("_+_", "@tallyman.add"),
    ("_-_", "@tallyman.sub"),
    ("_*_", "@tallyman.mul"),
    ("_/_", "@tallyman.div"),
    ("_<_", "@tallyman.lt"),
    ("_<=_", "@tallyman.le"),
    ("_>_", "@tallyman.gt"),
    ("_>=_", "@tallyman.ge"),
    ("_==_", "@tallyman.eq"),
    ("_!=_", "@tallyman.ne"),
    ("-_", "@tallyman.neg"),
];

/// Rewrite the arithmetic and comparison operators of a parsed expression
/// into the decimal-aware functions registered by [`register`].
pub fn rewrite(e: &mut IdedExpr) {
    match &mut e.expr {
        Expr::Call(call) => {
            if let Some((_, to)) = OPERATORS.iter().find(|(from, _)| *from == call.func_name) {
                call.func_name = (*to).to_string();
            }
            if let Some(target) = &mut call.target {
                rewrite(target);
            }
            call.args.iter_mut().for_each(rewrite);
        }
        Expr::Comprehension(c) => {
            rewrite(&mut c.iter_range);
            rewrite(&mut c.accu_init);
            rewrite(&mut c.loop_cond);
            rewrite(&mut c.loop_step);
            rewrite(&mut c.result);
        }
        Expr::Select(s) => rewrite(&mut s.operand),
        Expr::List(l) => l.elements.iter_mut().for_each(rewrite),
        Expr::Map(m) => {
            for entry in &mut m.entries {
                match &mut entry.expr {
                    kube_cel::cel::common::ast::EntryExpr::StructField(f) => rewrite(&mut f.value),
                    kube_cel::cel::common::ast::EntryExpr::MapEntry(me) => {
                        rewrite(&mut me.key);
                        rewrite(&mut me.value);
                    }
                }
            }
        }
        Expr::Struct(s) => {
            for entry in &mut s.entries {
                if let kube_cel::cel::common::ast::EntryExpr::StructField(f) = &mut entry.expr {
                    rewrite(&mut f.value);
                }
            }
        }
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// Register the finance functions and the operator overloads.
pub fn register(ctx: &mut Context<'_>) {
    ctx.add_function("@tallyman.add", |a: Value, b: Value| -> ResolveResult {
        match decimal_pair("+", &a, &b)? {
            Some((x, y)) => exact_add(x, y)
                .map(decimal_value)
                .ok_or_else(|| err("+", INEXACT)),
            None => a + b,
        }
    });
    ctx.add_function("@tallyman.sub", |a: Value, b: Value| -> ResolveResult {
        match decimal_pair("-", &a, &b)? {
            Some((x, y)) => exact_sub(x, y)
                .map(decimal_value)
                .ok_or_else(|| err("-", INEXACT)),
            None => a - b,
        }
    });
    ctx.add_function("@tallyman.mul", |a: Value, b: Value| -> ResolveResult {
        match decimal_pair("*", &a, &b)? {
            Some((x, y)) => exact_mul(x, y)
                .map(decimal_value)
                .ok_or_else(|| err("*", INEXACT)),
            None => a * b,
        }
    });
    ctx.add_function("@tallyman.div", |a: Value, b: Value| -> ResolveResult {
        match decimal_pair("/", &a, &b)? {
            Some((_, y)) if y.is_zero() => Err(err("/", "division by zero")),
            Some((x, y)) => x
                .checked_div(y)
                .map(decimal_value)
                .ok_or_else(|| err("/", "overflow")),
            None => a / b,
        }
    });
    ctx.add_function("@tallyman.neg", |a: Value| -> ResolveResult {
        match as_decimal(&a) {
            Some(x) => Ok(decimal_value(-x)),
            None => match a {
                Value::Int(i) => i
                    .checked_neg()
                    .map(Value::Int)
                    .ok_or_else(|| err("-", "overflow")),
                Value::Float(f) => Ok(Value::Float(-f)),
                other => Err(err("-", format!("cannot negate {other:?}"))),
            },
        }
    });
    ctx.add_function("@tallyman.lt", |a: Value, b: Value| {
        compare(&a, &b).map(|o| o == Ordering::Less)
    });
    ctx.add_function("@tallyman.le", |a: Value, b: Value| {
        compare(&a, &b).map(|o| o != Ordering::Greater)
    });
    ctx.add_function("@tallyman.gt", |a: Value, b: Value| {
        compare(&a, &b).map(|o| o == Ordering::Greater)
    });
    ctx.add_function("@tallyman.ge", |a: Value, b: Value| {
        compare(&a, &b).map(|o| o != Ordering::Less)
    });
    ctx.add_function("@tallyman.eq", |a: Value, b: Value| equal(&a, &b));
    ctx.add_function("@tallyman.ne", |a: Value, b: Value| {
        equal(&a, &b).map(|e| !e)
    });

    ctx.add_function("decimal", |v: Value| -> ResolveResult {
        let d = match &v {
            Value::String(s) => parse_decimal(s).map_err(|e| err("decimal", e))?,
            other => numeric(other)
                .ok_or_else(|| err("decimal", format!("cannot make a decimal of {other:?}")))?,
        };
        Ok(decimal_value(d))
    });
    ctx.add_function(
        "sum",
        |This(list): This<Arc<Vec<Value>>>| -> ResolveResult {
            // With a decimal anywhere, every item counts as a decimal, so
            // the order of the items does not matter.
            if list.iter().any(|v| as_decimal(v).is_some()) {
                let mut acc = Decimal::ZERO;
                for item in list.iter() {
                    let d =
                        numeric(item).ok_or_else(|| err("sum", format!("cannot add {item:?}")))?;
                    acc = exact_add(acc, d).ok_or_else(|| err("sum", INEXACT))?;
                }
                return Ok(decimal_value(acc));
            }
            let mut items = list.iter();
            let Some(first) = items.next() else {
                return Ok(Value::Int(0));
            };
            items.try_fold(first.clone(), |acc, item| acc + item.clone())
        },
    );
    ctx.add_function("round", |Arguments(args): Arguments| {
        rounded("round", &args, RoundingStrategy::MidpointNearestEven)
    });
    ctx.add_function("roundHalfUp", |Arguments(args): Arguments| {
        rounded("roundHalfUp", &args, RoundingStrategy::MidpointAwayFromZero)
    });
    ctx.add_function("abs", |v: Value| -> ResolveResult {
        match v {
            Value::Int(i) => i
                .checked_abs()
                .map(Value::Int)
                .ok_or_else(|| err("abs", "overflow")),
            other => numeric(&other)
                .map(|d| decimal_value(d.abs()))
                .ok_or_else(|| err("abs", format!("abs of {other:?}"))),
        }
    });
    ctx.add_function("pct", |part: Value, whole: Value| -> ResolveResult {
        let (p, w) = (numeric(&part), numeric(&whole));
        match (p, w) {
            (Some(_), Some(w)) if w.is_zero() => Err(err("pct", "the whole is zero")),
            (Some(p), Some(w)) => p
                .checked_div(w)
                .and_then(|q| q.checked_mul(Decimal::ONE_HUNDRED))
                .map(decimal_value)
                .ok_or_else(|| err("pct", "overflow")),
            _ => Err(err("pct", "pct(part, whole) takes two numbers")),
        }
    });
    ctx.add_function(
        "within",
        |a: Value, b: Value, tolerance: Value| -> ResolveResult {
            match (numeric(&a), numeric(&b), numeric(&tolerance)) {
                (Some(a), Some(b), Some(t)) => a
                    .checked_sub(b)
                    .map(|d| Value::Bool(d.abs() <= t.abs()))
                    .ok_or_else(|| err("within", "overflow")),
                _ => Err(err("within", "within(a, b, tolerance) takes three numbers")),
            }
        },
    );
}

fn rounded(name: &str, args: &[Value], strategy: RoundingStrategy) -> ResolveResult {
    let (value, places) = match args {
        [v] => (v, 0),
        [v, Value::Int(p)] if (0..=28).contains(p) => (v, *p as u32),
        _ => {
            return Err(err(
                name,
                format!("{name}(number, places) with places in 0..=28"),
            ));
        }
    };
    let d = numeric(value).ok_or_else(|| err(name, format!("cannot round {value:?}")))?;
    Ok(decimal_value(d.round_dp_with_strategy(places, strategy)))
}

/// Parse decimal text strictly: an optional sign, digits, an optional
/// fraction and an optional exponent; surrounding spaces are allowed.
pub fn parse_decimal(s: &str) -> Result<Decimal, String> {
    let t = s.trim();
    let plain = t.strip_prefix(['+', '-']).unwrap_or(t);
    let valid = !plain.is_empty()
        && plain
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit() || c == '.')
        && plain
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    if !valid {
        return Err(format!("{s:?} is not a decimal number"));
    }
    let parsed = if t.contains(['e', 'E']) {
        Decimal::from_scientific(t).and_then(|d| {
            // It rounds what does not fit; from_str_exact refuses it.
            if significant(t.split(['e', 'E']).next().unwrap_or(t))
                == significant(&d.abs().to_string())
            {
                Ok(d)
            } else {
                Err(rust_decimal::Error::Underflow)
            }
        })
    } else {
        Decimal::from_str_exact(t)
    };
    parsed.map_err(|e| format!("{s:?} is not a decimal number ({e})"))
}

/// The significant digits of a plain number: without sign, point, and
/// leading or trailing zeros ("" for zero).
fn significant(plain: &str) -> String {
    let digits: String = plain.chars().filter(char::is_ascii_digit).collect();
    digits
        .trim_start_matches('0')
        .trim_end_matches('0')
        .to_string()
}

/// Order two values: exactly when either is a decimal, by CEL's rules otherwise.
fn compare(a: &Value, b: &Value) -> Result<Ordering, ExecutionError> {
    match decimal_pair("compare", a, b)? {
        Some((x, y)) => Ok(x.cmp(&y)),
        None => a
            .partial_cmp(b)
            .ok_or_else(|| err("compare", format!("cannot compare {a:?} with {b:?}"))),
    }
}

/// Equality: numerically when either side is a decimal (and the other a
/// number), by CEL's rules otherwise.
fn equal(a: &Value, b: &Value) -> Result<bool, ExecutionError> {
    if as_decimal(a).is_some() || as_decimal(b).is_some() {
        return Ok(match (numeric(a), numeric(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        });
    }
    Ok(a == b)
}
