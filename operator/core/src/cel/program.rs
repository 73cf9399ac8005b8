//! Compiled expressions: parsed, checked against their scope and rewritten
//! for exact decimals once per definition revision, then evaluated per event
//! against a shared function library.
//!
//! An expression inside the fast evaluator's subset ([`super::fast`]) is
//! evaluated there, over variables bound in its shared form; anything else,
//! and any error, is evaluated by the `cel` interpreter, so both give the
//! same result.

use std::cell::OnceCell;
use std::sync::{Arc, OnceLock};

use kube_cel::KubeCelExt;
use kube_cel::cel::common::ast::IdedExpr;
use kube_cel::cel::context::VariableResolver;
use kube_cel::cel::objects::Value;
use kube_cel::cel::{Context, Program as Parsed};

use super::fast::{self, Val};
use super::json::JsonError;
use super::{ExpressionError, References, Scope, finance};

/// A compiled expression. Cheap to clone; share it across instances.
#[derive(Clone, Debug)]
pub struct Program {
    source: Arc<str>,
    expr: Arc<IdedExpr>,
    refs: Arc<References>,
    /// The fast evaluator's form, when the expression is in its subset.
    fast: Option<Arc<fast::Compiled>>,
}

/// What an expression gave: in the fast evaluator's shared form, or as a
/// CEL value. Either converts to the other; JSON comes out the same.
#[derive(Clone, Debug)]
pub enum Evaluated {
    Fast(Val),
    Cel(Value),
}

impl Evaluated {
    pub fn into_value(self) -> Value {
        match self {
            Evaluated::Fast(v) => v.to_value(),
            Evaluated::Cel(v) => v,
        }
    }

    /// JSON text, decimals with exactly their digits (`json::to_string`).
    pub fn to_json(&self) -> Result<String, JsonError> {
        match self {
            Evaluated::Fast(v) => v.to_json(),
            Evaluated::Cel(v) => super::json::to_string(v),
        }
    }
}

/// Why an evaluation failed, with the expression for context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalError {
    pub expression: String,
    pub message: String,
}

impl std::fmt::Display for EvalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (in `{}`)", self.message, self.expression)
    }
}

impl std::error::Error for EvalError {}

/// The standard, Kubernetes and finance functions, built once per process.
fn library() -> &'static Context<'static> {
    static LIBRARY: OnceLock<Context<'static>> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        let mut ctx = Context::default().with_all();
        finance::register(&mut ctx);
        ctx
    })
}

impl Program {
    /// Parse and check `source` for `scope`, and prepare it for evaluation.
    pub fn compile(source: &str, scope: Scope) -> Result<Self, ExpressionError> {
        let (parsed, refs) = super::compile(source, scope)?;
        Ok(Self::from_parsed(source, &parsed, refs))
    }

    pub(super) fn from_parsed(source: &str, parsed: &Parsed, refs: References) -> Self {
        let mut expr = parsed.expression().clone();
        finance::rewrite(&mut expr);
        let fast = fast::Compiled::new(&expr).map(Arc::new);
        Self {
            source: source.into(),
            expr: Arc::new(expr),
            refs: Arc::new(refs),
            fast,
        }
    }

    /// Whether the fast evaluator covers this expression.
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// The same program, always evaluated by the interpreter (to compare
    /// the two evaluators, in tests and benchmarks).
    pub fn without_fast(&self) -> Program {
        Program {
            fast: None,
            ..self.clone()
        }
    }

    /// The fast evaluator's answer, when it has one: every variable it reads
    /// has a shared form and nothing failed or left its subset.
    fn eval_fast(&self, vars: &Vars) -> Option<Val> {
        let fast = self.fast.as_deref()?;
        fast.eval(&fast_globals(fast, vars)?)
    }

    /// Both evaluators' answers, for the differential tests: the fast one
    /// (`None` when the expression or a variable is outside its subset)
    /// and the interpreter's.
    #[cfg(test)]
    pub(crate) fn differential(
        &self,
        vars: &Vars,
    ) -> (Option<Result<Val, fast::Fail>>, Result<Value, EvalError>) {
        let fast = self
            .fast
            .as_deref()
            .and_then(|f| Some(f.try_eval(&fast_globals(f, vars)?)));
        (fast, self.eval_slow(vars))
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// What the expression refers to.
    pub fn references(&self) -> &References {
        &self.refs
    }

    /// Evaluate with the variables `vars` provides: in the fast evaluator
    /// when it can answer, else in the interpreter.
    pub fn evaluate(&self, vars: &Vars) -> Result<Evaluated, EvalError> {
        match self.eval_fast(vars) {
            Some(v) => Ok(Evaluated::Fast(v)),
            None => self.eval_slow(vars).map(Evaluated::Cel),
        }
    }

    /// Evaluate to a CEL value.
    pub fn eval(&self, vars: &Vars) -> Result<Value, EvalError> {
        self.evaluate(vars).map(Evaluated::into_value)
    }

    /// The interpreter. Only the variables the expression refers to are
    /// bound, each converted once, so a variable read inside a
    /// comprehension is not converted again per element.
    fn eval_slow(&self, vars: &Vars) -> Result<Value, EvalError> {
        let mut ctx = library().new_inner_scope();
        for name in &self.refs.variables {
            if let Some(b) = vars.binding(name) {
                ctx.add_variable_from_value(name.clone(), b.cel().clone());
            }
        }
        Value::resolve(&self.expr, &ctx).map_err(|e| EvalError {
            expression: self.source.to_string(),
            message: e.to_string(),
        })
    }

    /// Evaluate to a bool, or fail saying what came out instead.
    pub fn eval_bool(&self, vars: &Vars) -> Result<bool, EvalError> {
        bool_of(self, self.evaluate(vars)?)
    }

    /// Evaluate to a string key: strings as they are, ints and decimals in
    /// their decimal text (instance keys, idempotency keys, event ids).
    pub fn eval_key(&self, vars: &Vars) -> Result<String, EvalError> {
        key_of(self, self.evaluate(vars)?)
    }

    fn wrong_type(&self, want: &str, got: &Value) -> EvalError {
        EvalError {
            expression: self.source.to_string(),
            message: format!("expected {want}, got {got:?}"),
        }
    }
}

/// Variables shared by several evaluations over the same data (the `when`,
/// `id` and `data` of one webhook payload). The fast evaluator reads them
/// as they are; for the interpreter they are converted once, when an
/// expression first needs it, instead of once per expression.
pub struct Env {
    vars: Vars,
    ctx: OnceCell<Context<'static>>,
}

impl Env {
    pub fn new(vars: &Vars) -> Self {
        Self {
            vars: vars.clone(),
            ctx: OnceCell::new(),
        }
    }

    fn ctx(&self) -> &Context<'static> {
        self.ctx.get_or_init(|| {
            let mut ctx = library().new_inner_scope();
            for b in &self.vars.entries {
                ctx.add_variable_from_value(b.name, b.cel().clone());
            }
            ctx
        })
    }
}

impl Program {
    /// Evaluate against shared variables.
    pub fn evaluate_env(&self, env: &Env) -> Result<Evaluated, EvalError> {
        if let Some(v) = self.eval_fast(&env.vars) {
            return Ok(Evaluated::Fast(v));
        }
        Value::resolve(&self.expr, env.ctx())
            .map(Evaluated::Cel)
            .map_err(|e| EvalError {
                expression: self.source.to_string(),
                message: e.to_string(),
            })
    }

    pub fn eval_env(&self, env: &Env) -> Result<Value, EvalError> {
        self.evaluate_env(env).map(Evaluated::into_value)
    }

    pub fn eval_bool_env(&self, env: &Env) -> Result<bool, EvalError> {
        bool_of(self, self.evaluate_env(env)?)
    }

    pub fn eval_key_env(&self, env: &Env) -> Result<String, EvalError> {
        key_of(self, self.evaluate_env(env)?)
    }
}

/// The variables `fast` reads, in the shared form; `None` when one has none.
fn fast_globals(fast: &fast::Compiled, vars: &Vars) -> Option<fast::Globals> {
    let mut globals: fast::Globals = Default::default();
    for (i, name) in fast.variables() {
        if let Some(b) = vars.binding(name) {
            globals[i] = Some(b.fast()?.clone());
        }
    }
    Some(globals)
}

fn bool_of(p: &Program, v: Evaluated) -> Result<bool, EvalError> {
    match v {
        Evaluated::Fast(Val::Bool(b)) | Evaluated::Cel(Value::Bool(b)) => Ok(b),
        other => Err(p.wrong_type("a bool", &other.into_value())),
    }
}

fn key_of(p: &Program, v: Evaluated) -> Result<String, EvalError> {
    let v = match v {
        Evaluated::Fast(Val::Str(s)) => return Ok(s.to_string()),
        Evaluated::Fast(Val::Int(i)) => return Ok(i.to_string()),
        Evaluated::Fast(Val::UInt(u)) => return Ok(u.to_string()),
        Evaluated::Fast(Val::Dec(d)) => return Ok(d.to_string()),
        other => other.into_value(),
    };
    match v {
        Value::String(s) => Ok(s.to_string()),
        Value::Int(i) => Ok(i.to_string()),
        Value::UInt(u) => Ok(u.to_string()),
        other => match finance::as_decimal(&other) {
            Some(d) => Ok(d.to_string()),
            None => Err(p.wrong_type("a string or a number", &other)),
        },
    }
}

/// Variables for one evaluation, by name. Each is given in the CEL form or
/// in the fast evaluator's shared form and converted to the other at most
/// once, when an expression first needs it.
#[derive(Clone, Default)]
pub struct Vars {
    entries: Vec<Binding>,
}

#[derive(Clone)]
struct Binding {
    name: &'static str,
    cel: OnceLock<Value>,
    /// `Some(None)`: the CEL value has no shared form.
    fast: OnceLock<Option<Val>>,
}

impl Binding {
    fn cel(&self) -> &Value {
        self.cel.get_or_init(|| match self.fast.get() {
            Some(Some(v)) => v.to_value(),
            // Never: a binding is made with one of the two forms.
            _ => Value::Null,
        })
    }

    fn fast(&self) -> Option<&Val> {
        self.fast
            .get_or_init(|| self.cel.get().and_then(Val::from_value))
            .as_ref()
    }
}

impl Vars {
    pub fn new() -> Self {
        // Room for every variable of a step expression (key, event,
        // events, steps, vars, now) without growing.
        Self {
            entries: Vec::with_capacity(6),
        }
    }

    pub fn with(mut self, name: &'static str, value: Value) -> Self {
        self.set(name, value);
        self
    }

    /// Bind a variable in the shared form (no conversion unless an
    /// expression outside the fast subset reads it).
    pub fn with_fast(mut self, name: &'static str, value: Val) -> Self {
        self.set_fast(name, value);
        self
    }

    pub fn set(&mut self, name: &'static str, value: Value) {
        self.put(Binding {
            name,
            cel: OnceLock::from(value),
            fast: OnceLock::new(),
        });
    }

    pub fn set_fast(&mut self, name: &'static str, value: Val) {
        self.put(Binding {
            name,
            cel: OnceLock::new(),
            fast: OnceLock::from(Some(value)),
        });
    }

    fn put(&mut self, b: Binding) {
        match self.entries.iter_mut().find(|e| e.name == b.name) {
            Some(entry) => *entry = b,
            None => self.entries.push(b),
        }
    }

    fn binding(&self, name: &str) -> Option<&Binding> {
        self.entries.iter().find(|e| e.name == name)
    }
}

impl VariableResolver for Vars {
    fn resolve(&self, variable: &str) -> Option<Value> {
        self.binding(variable).map(|b| b.cel().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cel::json;

    fn eval(src: &str, vars: &Vars) -> String {
        let p = Program::compile(src, Scope::Step).unwrap();
        json::to_string(&p.eval(vars).unwrap()).unwrap()
    }

    fn event(data: &str) -> Vars {
        let event = json::parse(format!(r#"{{"data": {data}}}"#).as_bytes()).unwrap();
        Vars::new().with("event", event)
    }

    #[test]
    fn point_one_plus_point_two_is_point_three() {
        let v = Vars::new();
        assert_eq!(
            eval("decimal('0.1') + decimal('0.2') == decimal('0.3')", &v),
            "true"
        );
        assert_eq!(eval("decimal('0.1') + decimal('0.2')", &v), "0.3");
        assert_eq!(eval("decimal(0.1) + decimal(0.2)", &v), "0.3");
        // Plain CEL doubles are untouched: this is why money is never a double.
        assert_eq!(eval("0.1 + 0.2 == 0.3", &v), "false");
    }

    #[test]
    fn json_fractions_arrive_as_exact_decimals() {
        let v = event(r#"{"lines": [{"qty": 3, "price": 0.1}, {"qty": 7, "price": 0.2}]}"#);
        assert_eq!(
            eval("event.data.lines.map(l, l.qty * l.price).sum()", &v),
            "1.7"
        );
        assert_eq!(
            eval(
                "event.data.lines[0].price + event.data.lines[1].price == 0.3",
                &v
            ),
            "true"
        );
    }

    #[test]
    fn an_invoice_total_comes_out_to_the_cent() {
        // 250 lines of 19.99 x 3 at 19% VAT, rounded per line and in total.
        let lines: Vec<String> = (0..250)
            .map(|i| format!(r#"{{"sku": "SKU-{i}", "qty": 3, "unitPrice": "19.99"}}"#))
            .collect();
        let v = event(&format!(r#"{{"lines": [{}]}}"#, lines.join(",")));
        assert_eq!(
            eval(
                "round(event.data.lines.map(l, decimal(l.unitPrice) * l.qty).sum(), 2)",
                &v
            ),
            "14992.50"
        );
        assert_eq!(
            eval(
                "roundHalfUp(event.data.lines.map(l, decimal(l.unitPrice) * l.qty * decimal('1.19')).sum(), 2)",
                &v
            ),
            "17841.075"
                .parse::<rust_decimal::Decimal>()
                .unwrap()
                .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
                .to_string()
        );
        assert_eq!(eval("round(decimal('2.345'), 2)", &Vars::new()), "2.34");
        assert_eq!(
            eval("roundHalfUp(decimal('2.345'), 2)", &Vars::new()),
            "2.35"
        );
        assert_eq!(eval("round(decimal('2.355'), 2)", &Vars::new()), "2.36");
    }

    fn fails(src: &str) -> String {
        let p = Program::compile(src, Scope::Step).unwrap();
        p.eval(&Vars::new()).unwrap_err().to_string()
    }

    #[test]
    fn arithmetic_keeps_every_digit_or_fails() {
        // rust_decimal rounds a result that needs more than its 28 digits
        // to fit; an amount must not lose a digit without a word.
        for src in [
            "decimal('10000000000') + decimal('0.0000000000000000001')",
            "decimal('10000000000') - decimal('0.0000000000000000001')",
            "decimal('12345678901234567890.12345678') * decimal('1.19')",
            "decimal('0.000000000000001') * decimal('0.00000000000001')",
            "[decimal('10000000000'), decimal('0.0000000000000000001')].sum()",
        ] {
            assert!(
                fails(src).contains("more digits than a decimal holds"),
                "{src}"
            );
        }
        // Exact results still come out, trailing zeros cut where they must.
        let v = Vars::new();
        assert_eq!(
            eval(
                "decimal('12345678901234567890.1234567') * decimal('1.1')",
                &v
            ),
            "13580246791358024679.13580237"
        );
        assert_eq!(
            eval("decimal('0.3333333333333333333333333333') * 100", &v),
            "33.333333333333333333333333330"
        );
        assert_eq!(
            eval(
                "decimal('1000000000000000000000000000.0') + decimal('0.0')",
                &v
            ),
            "1000000000000000000000000000.0"
        );
        assert_eq!(eval("decimal('0.5') * decimal('0.2')", &v), "0.10");
        assert_eq!(
            eval("decimal('1000000000000') * (decimal(1) / 3)", &v),
            "333333333333.33333333333333330"
        );
        assert_eq!(eval("decimal('0.00') - decimal('0.00')", &v), "0.00");
        assert_eq!(eval("0 - decimal('0.00')", &v), "0.00");
        assert_eq!(eval("decimal('19.99') * 3 - decimal('0.97')", &v), "59.00");
    }

    #[test]
    fn a_sum_does_not_depend_on_the_order_of_its_items() {
        let v = Vars::new();
        assert_eq!(eval("[decimal('1'), 1.5].sum()", &v), "2.5");
        assert_eq!(eval("[1.5, decimal('1')].sum()", &v), "2.5");
        assert_eq!(eval("[2, decimal('0.25'), 1u].sum()", &v), "3.25");
        // Without a decimal, as CEL adds: doubles in floating point.
        assert_eq!(eval("[1.5, 2.5].sum()", &v), "4");
        assert_eq!(eval("[1, 2].sum()", &v), "3");
        assert_eq!(eval("[].sum()", &v), "0");
    }

    #[test]
    fn a_tolerance_taken_from_a_negative_amount_still_holds() {
        // A credit note: the tolerance computed from the reference amount
        // is negative, and equal amounts must still be within it.
        let v = Vars::new();
        let po = "decimal('-100.00')";
        let check =
            |inv: &str| format!("within({inv}, {po}, roundHalfUp({po} * decimal('0.005'), 2))");
        assert_eq!(eval(&check("decimal('-100.00')"), &v), "true");
        assert_eq!(eval(&check("decimal('-100.50')"), &v), "true");
        assert_eq!(eval(&check("decimal('-100.51')"), &v), "false");
    }

    #[test]
    fn a_three_way_match_within_tolerance() {
        let v = event(
            r#"{"po": {"lines": [{"qty": 10, "price": 12.50}, {"qty": 4, "price": 99.95}]},
                "receipt": {"lines": [{"qty": 10}, {"qty": 4}]},
                "invoice": {"total": 525.05}}"#,
        );
        let po_value = "event.data.po.lines.map(l, l.qty * l.price).sum()";
        assert_eq!(eval(po_value, &v), "524.80");
        let check = format!(
            "within(event.data.invoice.total, {po_value}, roundHalfUp({po_value} * decimal('0.005'), 2))"
        );
        assert_eq!(eval(&check, &v), "true"); // 0.25 off, 2.62 allowed
        let tight = format!("within(event.data.invoice.total, {po_value}, decimal('0.10'))");
        assert_eq!(eval(&tight, &v), "false");
        assert_eq!(
            eval(
                &format!("round(pct(abs(event.data.invoice.total - {po_value}), {po_value}), 4)"),
                &v
            ),
            "0.0476"
        );
    }

    #[test]
    fn decimals_compare_with_ints_and_double_literals() {
        let v = Vars::new();
        assert_eq!(eval("decimal('499.99') < 500.0", &v), "true");
        assert_eq!(eval("decimal('500') == 500", &v), "true");
        assert_eq!(eval("decimal('1.10') == decimal('1.1')", &v), "true");
        assert_eq!(eval("-decimal('2.5') < 0", &v), "true");
        assert_eq!(eval("[decimal('1.5'), 2, 0.25].sum()", &v), "3.75");
        assert_eq!(eval("[].sum()", &v), "0");
        assert_eq!(
            eval("1 + 2 == 3 && 'a' + 'b' == 'ab' && [1] + [2] == [1, 2]", &v),
            "true"
        );
    }

    #[test]
    fn an_env_gives_the_same_results_as_vars() {
        let v = event(r#"{"lines": [{"qty": 3, "price": 0.1}, {"qty": 7, "price": 0.2}]}"#);
        let env = Env::new(&v);
        for src in [
            "event.data.lines.map(l, l.qty * l.price).sum()",
            "size(event.data.lines) == 2",
        ] {
            let p = Program::compile(src, Scope::Step).unwrap();
            assert_eq!(p.eval_env(&env).unwrap(), p.eval(&v).unwrap(), "{src}");
        }
    }

    #[test]
    fn bad_decimals_and_division_by_zero_fail_clearly() {
        let p = Program::compile("decimal('12,50')", Scope::Step).unwrap();
        assert!(
            p.eval(&Vars::new())
                .unwrap_err()
                .message
                .contains("is not a decimal number")
        );
        let p = Program::compile("decimal('1') / 0", Scope::Step).unwrap();
        assert!(
            p.eval(&Vars::new())
                .unwrap_err()
                .message
                .contains("division by zero")
        );
    }
}
