//! Evaluation over [`Val`], with the `cel` interpreter's semantics for
//! the subset (including its quirks: a field of a non-map is `false`,
//! `size` of a string counts bytes, `in` compares strictly by type).

use std::cmp::Ordering;
use std::sync::Arc;

use rust_decimal::Decimal;

use super::compile::{Arith, Cmp, Comprehension, GLOBALS, Node, StrFn};
use super::value::{Val, ValMap};
use crate::cel::finance::{decimal_from_f64, exact_add, exact_mul, exact_sub, parse_decimal};

/// Why the fast path gave no value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fail {
    /// The interpreter fails here too (its message comes from running it).
    Error,
    /// Outside what this evaluator knows for sure: ask the interpreter.
    Bail,
}

type R = Result<Val, Fail>;

pub(crate) type Globals = [Option<Val>; GLOBALS.len()];

pub(crate) struct Eval<'a> {
    globals: &'a Globals,
    stack: Vec<Val>,
}

impl<'a> Eval<'a> {
    pub fn new(globals: &'a Globals) -> Self {
        Self {
            globals,
            stack: Vec::new(),
        }
    }

    pub fn eval(&mut self, n: &Node) -> R {
        match n {
            Node::Lit(v) => Ok(v.clone()),
            Node::Global(g) => self.globals[*g].clone().ok_or(Fail::Error),
            Node::Local(slot) => self.stack.get(*slot).cloned().ok_or(Fail::Bail),
            Node::Select {
                operand,
                field,
                test,
            } => match self.eval(operand)? {
                Val::Map(m) => match (m.get(field), test) {
                    (found, true) => Ok(Val::Bool(found.is_some())),
                    (Some(v), false) => Ok(v.clone()),
                    (None, false) => Err(Fail::Error),
                },
                _ => Ok(Val::Bool(false)),
            },
            Node::Index(operand, index) => {
                let operand = self.eval(operand)?;
                let index = self.eval(index)?;
                index_of(&operand, &index)
            }
            Node::List(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    out.push(self.eval(item)?);
                }
                Ok(Val::List(Arc::new(out)))
            }
            Node::Map(entries) => {
                let mut out = Vec::with_capacity(entries.len());
                for (k, v) in entries {
                    let Val::Str(k) = self.eval(k)? else {
                        return Err(Fail::Bail);
                    };
                    out.push((k, self.eval(v)?));
                }
                Ok(Val::Map(Arc::new(ValMap::from_entries(out))))
            }
            Node::And(a, b) => {
                let left = self.try_bool(a)?;
                if left == Ok(false) {
                    return Ok(Val::Bool(false));
                }
                match (left, self.eval(b)?) {
                    (Ok(true), Val::Bool(r)) => Ok(Val::Bool(r)),
                    (Err(()), Val::Bool(false)) => Ok(Val::Bool(false)),
                    _ => Err(Fail::Error),
                }
            }
            Node::Or(a, b) => {
                let left = self.try_bool(a)?;
                if left == Ok(true) {
                    return Ok(Val::Bool(true));
                }
                match (left, self.eval(b)?) {
                    (Ok(false), Val::Bool(r)) => Ok(Val::Bool(r)),
                    (Err(()), Val::Bool(true)) => Ok(Val::Bool(true)),
                    _ => Err(Fail::Error),
                }
            }
            Node::Not(a) => match self.eval(a)? {
                Val::Bool(b) => Ok(Val::Bool(!b)),
                _ => Err(Fail::Error),
            },
            Node::NotStrictlyFalse(a) => Ok(Val::Bool(self.try_bool(a)?.unwrap_or(true))),
            Node::Cond(c, t, f) => match self.try_bool(c)? {
                Ok(true) => self.eval(t),
                Ok(false) => self.eval(f),
                Err(()) => Err(Fail::Error),
            },
            Node::In(a, b) => {
                let needle = self.eval(a)?;
                match self.eval(b)? {
                    Val::List(items) => Ok(Val::Bool(items.iter().any(|i| strict_eq(i, &needle)))),
                    Val::Map(m) => match needle {
                        Val::Str(k) => Ok(Val::Bool(m.get(&k).is_some())),
                        // The map's keys are all strings.
                        Val::Int(_) | Val::UInt(_) | Val::Bool(_) => Ok(Val::Bool(false)),
                        _ => Err(Fail::Bail),
                    },
                    _ => Err(Fail::Bail),
                }
            }
            Node::Arith(op, a, b) => {
                let a = self.eval(a)?;
                let b = self.eval(b)?;
                arith(*op, a, b)
            }
            Node::Cmp(op, a, b) => {
                let a = self.eval(a)?;
                let b = self.eval(b)?;
                let r = match op {
                    Cmp::Eq => equal(&a, &b),
                    Cmp::Ne => !equal(&a, &b),
                    Cmp::Lt => compare(&a, &b)? == Ordering::Less,
                    Cmp::Le => compare(&a, &b)? != Ordering::Greater,
                    Cmp::Gt => compare(&a, &b)? == Ordering::Greater,
                    Cmp::Ge => compare(&a, &b)? != Ordering::Less,
                };
                Ok(Val::Bool(r))
            }
            Node::Neg(a) => match self.eval(a)? {
                Val::Dec(d) => Ok(Val::Dec(-d)),
                Val::Int(i) => i.checked_neg().map(Val::Int).ok_or(Fail::Error),
                Val::Double(f) => Ok(Val::Double(-f)),
                _ => Err(Fail::Error),
            },
            Node::Size(a) => match self.eval(a)? {
                Val::List(l) => Ok(Val::Int(l.len() as i64)),
                Val::Map(m) => Ok(Val::Int(m.len() as i64)),
                // The interpreter counts bytes, not code points.
                Val::Str(s) => Ok(Val::Int(s.len() as i64)),
                _ => Err(Fail::Error),
            },
            Node::Decimal(a) => match self.eval(a)? {
                Val::Str(s) => parse_decimal(&s).map(Val::Dec).map_err(|_| Fail::Error),
                other => numeric(&other).map(Val::Dec).ok_or(Fail::Error),
            },
            Node::Sum(a) => {
                let Val::List(items) = self.eval(a)? else {
                    return Err(Fail::Error);
                };
                // As `finance::sum`: with a decimal anywhere, all as decimals.
                if items.iter().any(|v| matches!(v, Val::Dec(_))) {
                    let mut acc = Decimal::ZERO;
                    for item in items.iter() {
                        let d = numeric(item).ok_or(Fail::Error)?;
                        acc = exact_add(acc, d).ok_or(Fail::Error)?;
                    }
                    return Ok(Val::Dec(acc));
                }
                let mut rest = items.iter();
                let Some(first) = rest.next() else {
                    return Ok(Val::Int(0));
                };
                rest.try_fold(first.clone(), |acc, item| {
                    arith(Arith::Add, acc, item.clone())
                })
            }
            Node::Round(v, places, strategy) => {
                let v = self.eval(v)?;
                let places = match places {
                    None => 0,
                    Some(p) => match self.eval(p)? {
                        Val::Int(p) if (0..=28).contains(&p) => p as u32,
                        _ => return Err(Fail::Error),
                    },
                };
                let d = numeric(&v).ok_or(Fail::Error)?;
                Ok(Val::Dec(d.round_dp_with_strategy(places, *strategy)))
            }
            Node::Abs(a) => match self.eval(a)? {
                Val::Int(i) => i.checked_abs().map(Val::Int).ok_or(Fail::Error),
                other => numeric(&other)
                    .map(|d| Val::Dec(d.abs()))
                    .ok_or(Fail::Error),
            },
            Node::Pct(p, w) => {
                let p = self.eval(p)?;
                let w = self.eval(w)?;
                match (numeric(&p), numeric(&w)) {
                    (Some(_), Some(w)) if w.is_zero() => Err(Fail::Error),
                    (Some(p), Some(w)) => p
                        .checked_div(w)
                        .and_then(|q| q.checked_mul(Decimal::ONE_HUNDRED))
                        .map(Val::Dec)
                        .ok_or(Fail::Error),
                    _ => Err(Fail::Error),
                }
            }
            Node::Within(a, b, t) => {
                let a = self.eval(a)?;
                let b = self.eval(b)?;
                let t = self.eval(t)?;
                match (numeric(&a), numeric(&b), numeric(&t)) {
                    (Some(a), Some(b), Some(t)) => a
                        .checked_sub(b)
                        .map(|d| Val::Bool(d.abs() <= t.abs()))
                        .ok_or(Fail::Error),
                    _ => Err(Fail::Error),
                }
            }
            Node::Str(f, target, arg) => {
                let target = self.eval(target)?;
                let arg = self.eval(arg)?;
                match (f, target, arg) {
                    (StrFn::Contains, Val::Str(s), Val::Str(a)) => Ok(Val::Bool(s.contains(&*a))),
                    (StrFn::StartsWith, Val::Str(s), Val::Str(a)) => {
                        Ok(Val::Bool(s.starts_with(&*a)))
                    }
                    (StrFn::EndsWith, Val::Str(s), Val::Str(a)) => Ok(Val::Bool(s.ends_with(&*a))),
                    _ => Err(Fail::Bail),
                }
            }
            Node::Comprehension(c) => self.comprehension(c),
            Node::Append { accu, elems } => {
                let mut values = Vec::with_capacity(elems.len());
                for e in elems {
                    values.push(self.eval(e)?);
                }
                let slot = self.stack.get_mut(*accu).ok_or(Fail::Bail)?;
                match std::mem::replace(slot, Val::Null) {
                    Val::List(mut list) => {
                        Arc::make_mut(&mut list).extend(values);
                        Ok(Val::List(list))
                    }
                    other => {
                        *slot = other.clone();
                        arith(Arith::Add, other, Val::List(Arc::new(values)))
                    }
                }
            }
        }
    }

    /// `Ok(b)` for a bool, `Err(())` for an error or another type (which
    /// `&&`, `||` and `?:` treat alike); a bail passes through.
    fn try_bool(&mut self, n: &Node) -> Result<Result<bool, ()>, Fail> {
        match self.eval(n) {
            Ok(Val::Bool(b)) => Ok(Ok(b)),
            Ok(_) | Err(Fail::Error) => Ok(Err(())),
            Err(Fail::Bail) => Err(Fail::Bail),
        }
    }

    fn comprehension(&mut self, c: &Comprehension) -> R {
        let init = self.eval(&c.init)?;
        let range = self.eval(&c.range)?;
        // Map keys come out of a hash map in the interpreter: no order to match.
        let Val::List(items) = range else {
            return Err(Fail::Bail);
        };
        if self.stack.len() != c.accu {
            return Err(Fail::Bail);
        }
        self.stack.push(init);
        self.stack.push(Val::Null);
        let out = self.comprehension_loop(c, &items);
        self.stack.truncate(c.accu);
        out
    }

    fn comprehension_loop(&mut self, c: &Comprehension, items: &[Val]) -> R {
        for item in items {
            match self.try_bool(&c.cond)? {
                Ok(true) => {}
                Ok(false) => break,
                Err(()) => return Err(Fail::Error),
            }
            self.stack[c.iter] = item.clone();
            let accu = self.eval(&c.step)?;
            self.stack[c.accu] = accu;
        }
        self.eval(&c.result)
    }
}

fn index_of(operand: &Val, index: &Val) -> R {
    match (operand, index) {
        (Val::List(items), Val::Int(i)) => usize::try_from(*i)
            .ok()
            .and_then(|i| items.get(i))
            .cloned()
            .ok_or(Fail::Error),
        (Val::List(items), Val::UInt(u)) => usize::try_from(*u)
            .ok()
            .and_then(|i| items.get(i))
            .cloned()
            .ok_or(Fail::Error),
        (Val::List(_), _) => Err(Fail::Error),
        (Val::Map(m), Val::Str(k)) => m.get(k).cloned().ok_or(Fail::Error),
        // The map's keys are all strings: no such key.
        (Val::Map(_), Val::Int(_) | Val::UInt(_) | Val::Bool(_)) => Err(Fail::Error),
        _ => Err(Fail::Bail),
    }
}

/// A number of any kind as a decimal (`finance::numeric`).
fn numeric(v: &Val) -> Option<Decimal> {
    match v {
        Val::Int(i) => Some(Decimal::from(*i)),
        Val::UInt(u) => Some(Decimal::from(*u)),
        Val::Double(f) => decimal_from_f64(*f),
        Val::Dec(d) => Some(*d),
        _ => None,
    }
}

fn is_time(v: &Val) -> bool {
    matches!(v, Val::Timestamp(_))
}

/// `@tallyman.add` and friends: exact when either side is a decimal,
/// standard CEL otherwise.
fn arith(op: Arith, a: Val, b: Val) -> R {
    if matches!(a, Val::Dec(_)) || matches!(b, Val::Dec(_)) {
        let (Some(x), Some(y)) = (numeric(&a), numeric(&b)) else {
            return Err(Fail::Error);
        };
        let r = match op {
            Arith::Add => exact_add(x, y),
            Arith::Sub => exact_sub(x, y),
            Arith::Mul => exact_mul(x, y),
            Arith::Div if y.is_zero() => None,
            Arith::Div => x.checked_div(y),
        };
        return r.map(Val::Dec).ok_or(Fail::Error);
    }
    if is_time(&a) || is_time(&b) {
        return Err(Fail::Bail);
    }
    match (op, a, b) {
        (Arith::Add, Val::Int(l), Val::Int(r)) => l.checked_add(r).map(Val::Int).ok_or(Fail::Error),
        (Arith::Add, Val::UInt(l), Val::UInt(r)) => {
            l.checked_add(r).map(Val::UInt).ok_or(Fail::Error)
        }
        (Arith::Add, Val::Double(l), Val::Double(r)) => Ok(Val::Double(l + r)),
        (Arith::Add, Val::Str(l), Val::Str(r)) => {
            let mut s = String::with_capacity(l.len() + r.len());
            s.push_str(&l);
            s.push_str(&r);
            Ok(Val::Str(Arc::from(s)))
        }
        (Arith::Add, Val::List(mut l), Val::List(r)) => {
            Arc::make_mut(&mut l).extend(r.iter().cloned());
            Ok(Val::List(l))
        }
        (Arith::Sub, Val::Int(l), Val::Int(r)) => l.checked_sub(r).map(Val::Int).ok_or(Fail::Error),
        (Arith::Sub, Val::UInt(l), Val::UInt(r)) => {
            l.checked_sub(r).map(Val::UInt).ok_or(Fail::Error)
        }
        (Arith::Sub, Val::Double(l), Val::Double(r)) => Ok(Val::Double(l - r)),
        (Arith::Mul, Val::Int(l), Val::Int(r)) => l.checked_mul(r).map(Val::Int).ok_or(Fail::Error),
        (Arith::Mul, Val::UInt(l), Val::UInt(r)) => {
            l.checked_mul(r).map(Val::UInt).ok_or(Fail::Error)
        }
        (Arith::Mul, Val::Double(l), Val::Double(r)) => Ok(Val::Double(l * r)),
        (Arith::Div, Val::Int(l), Val::Int(r)) => {
            if r == 0 {
                Err(Fail::Error)
            } else {
                l.checked_div(r).map(Val::Int).ok_or(Fail::Error)
            }
        }
        (Arith::Div, Val::UInt(l), Val::UInt(r)) => {
            l.checked_div(r).map(Val::UInt).ok_or(Fail::Error)
        }
        (Arith::Div, Val::Double(l), Val::Double(r)) => Ok(Val::Double(l / r)),
        _ => Err(Fail::Error),
    }
}

/// `@tallyman.eq`: numerically when either side is a decimal, by the
/// interpreter's `Value` equality otherwise.
fn equal(a: &Val, b: &Val) -> bool {
    if matches!(a, Val::Dec(_)) || matches!(b, Val::Dec(_)) {
        return match (numeric(a), numeric(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        };
    }
    value_eq(a, b)
}

/// `cel::Value`'s `PartialEq`: numbers across int, uint and double;
/// decimals only with decimals (as opaque values).
fn value_eq(a: &Val, b: &Val) -> bool {
    same(a, b, true)
}

/// The interpreter's equality of `in`: same type, then equal.
fn strict_eq(a: &Val, b: &Val) -> bool {
    same(a, b, false)
}

/// Equal values of the same type, and with `across_numbers` also equal
/// numbers of int, uint and double.
fn same(a: &Val, b: &Val, across_numbers: bool) -> bool {
    let eq = |v: &Val, w: &Val| same(v, w, across_numbers);
    match (a, b) {
        (Val::Map(x), Val::Map(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| eq(v, w)))
        }
        (Val::List(x), Val::List(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(v, w)| eq(v, w))
        }
        (Val::Int(x), Val::Int(y)) => x == y,
        (Val::UInt(x), Val::UInt(y)) => x == y,
        (Val::Double(x), Val::Double(y)) => x == y,
        (Val::Str(x), Val::Str(y)) => x == y,
        (Val::Bool(x), Val::Bool(y)) => x == y,
        (Val::Null, Val::Null) => true,
        (Val::Timestamp(x), Val::Timestamp(y)) => x == y,
        (Val::Dec(x), Val::Dec(y)) => x == y,
        _ if !across_numbers => false,
        (Val::Int(x), Val::UInt(y)) => u64::try_from(*x).is_ok_and(|x| x == *y),
        (Val::UInt(x), Val::Int(y)) => i64::try_from(*x).is_ok_and(|x| x == *y),
        (Val::Int(x), Val::Double(y)) => (*x as f64) == *y,
        (Val::Double(x), Val::Int(y)) => *x == (*y as f64),
        (Val::UInt(x), Val::Double(y)) => (*x as f64) == *y,
        (Val::Double(x), Val::UInt(y)) => *x == (*y as f64),
        _ => false,
    }
}

/// `@tallyman.lt` and friends: exactly when either is a decimal, by
/// `cel::Value`'s `PartialOrd` otherwise.
fn compare(a: &Val, b: &Val) -> Result<Ordering, Fail> {
    if matches!(a, Val::Dec(_)) || matches!(b, Val::Dec(_)) {
        return match (numeric(a), numeric(b)) {
            (Some(x), Some(y)) => Ok(x.cmp(&y)),
            _ => Err(Fail::Error),
        };
    }
    let o = match (a, b) {
        (Val::Int(x), Val::Int(y)) => Some(x.cmp(y)),
        (Val::UInt(x), Val::UInt(y)) => Some(x.cmp(y)),
        (Val::Double(x), Val::Double(y)) => x.partial_cmp(y),
        (Val::Str(x), Val::Str(y)) => Some(x.cmp(y)),
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(y)),
        (Val::Null, Val::Null) => Some(Ordering::Equal),
        (Val::Timestamp(x), Val::Timestamp(y)) => Some(x.cmp(y)),
        (Val::Int(x), Val::UInt(y)) => Some(
            u64::try_from(*x)
                .map(|x| x.cmp(y))
                .unwrap_or(Ordering::Less),
        ),
        (Val::UInt(x), Val::Int(y)) => Some(
            i64::try_from(*x)
                .map(|x| x.cmp(y))
                .unwrap_or(Ordering::Greater),
        ),
        (Val::Int(x), Val::Double(y)) => (*x as f64).partial_cmp(y),
        (Val::UInt(x), Val::Double(y)) => (*x as f64).partial_cmp(y),
        (Val::Double(x), Val::Int(y)) => x.partial_cmp(&(*y as f64)),
        (Val::Double(x), Val::UInt(y)) => x.partial_cmp(&(*y as f64)),
        _ => None,
    };
    o.ok_or(Fail::Error)
}
