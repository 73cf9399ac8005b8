//! Compiled expressions: parsed, checked against their scope and rewritten
//! for exact decimals once per definition revision, then evaluated per event
//! against a shared function library.

use std::sync::{Arc, OnceLock};

use kube_cel::KubeCelExt;
use kube_cel::cel::common::ast::IdedExpr;
use kube_cel::cel::context::VariableResolver;
use kube_cel::cel::objects::Value;
use kube_cel::cel::{Context, Program as Parsed};

use super::{ExpressionError, References, Scope, finance};

/// A compiled expression. Cheap to clone; share it across instances.
#[derive(Clone, Debug)]
pub struct Program {
    source: Arc<str>,
    expr: Arc<IdedExpr>,
    refs: Arc<References>,
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
        Self {
            source: source.into(),
            expr: Arc::new(expr),
            refs: Arc::new(refs),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// What the expression refers to.
    pub fn references(&self) -> &References {
        &self.refs
    }

    /// Evaluate with the variables `vars` provides. Only the variables the
    /// expression refers to are bound, each converted once, so a variable
    /// read inside a comprehension is not converted again per element.
    pub fn eval(&self, vars: &dyn VariableResolver) -> Result<Value, EvalError> {
        let mut ctx = library().new_inner_scope();
        for name in &self.refs.variables {
            if let Some(value) = vars.resolve(name) {
                ctx.add_variable_from_value(name.clone(), value);
            }
        }
        Value::resolve(&self.expr, &ctx).map_err(|e| EvalError {
            expression: self.source.to_string(),
            message: e.to_string(),
        })
    }

    /// Evaluate to a bool, or fail saying what came out instead.
    pub fn eval_bool(&self, vars: &dyn VariableResolver) -> Result<bool, EvalError> {
        match self.eval(vars)? {
            Value::Bool(b) => Ok(b),
            other => Err(self.wrong_type("a bool", &other)),
        }
    }

    /// Evaluate to a string key: strings as they are, ints and decimals in
    /// their decimal text (instance keys, idempotency keys, event ids).
    pub fn eval_key(&self, vars: &dyn VariableResolver) -> Result<String, EvalError> {
        key_of(self, self.eval(vars)?)
    }

    fn wrong_type(&self, want: &str, got: &Value) -> EvalError {
        EvalError {
            expression: self.source.to_string(),
            message: format!("expected {want}, got {got:?}"),
        }
    }
}

/// Variables converted once for several evaluations over the same data
/// (the `when`, `id` and `data` of one webhook payload), instead of once per
/// expression: converting a large payload into the interpreter's form is
/// the dominant cost of evaluating against it.
#[derive(Clone)]
pub struct Env {
    ctx: Arc<Context<'static>>,
}

impl Env {
    pub fn new(vars: &Vars) -> Self {
        let mut ctx = library().new_inner_scope();
        for (name, value) in &vars.entries {
            ctx.add_variable_from_value(*name, value.clone());
        }
        Self { ctx: Arc::new(ctx) }
    }
}

impl Program {
    /// Evaluate against variables converted once.
    pub fn eval_env(&self, env: &Env) -> Result<Value, EvalError> {
        Value::resolve(&self.expr, &env.ctx).map_err(|e| EvalError {
            expression: self.source.to_string(),
            message: e.to_string(),
        })
    }

    pub fn eval_bool_env(&self, env: &Env) -> Result<bool, EvalError> {
        match self.eval_env(env)? {
            Value::Bool(b) => Ok(b),
            other => Err(self.wrong_type("a bool", &other)),
        }
    }

    pub fn eval_key_env(&self, env: &Env) -> Result<String, EvalError> {
        key_of(self, self.eval_env(env)?)
    }
}

fn key_of(p: &Program, v: Value) -> Result<String, EvalError> {
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

/// Variables for one evaluation, by name.
#[derive(Default)]
pub struct Vars {
    entries: Vec<(&'static str, Value)>,
}

impl Vars {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, name: &'static str, value: Value) -> Self {
        self.set(name, value);
        self
    }

    pub fn set(&mut self, name: &'static str, value: Value) {
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((name, value)),
        }
    }
}

impl VariableResolver for Vars {
    fn resolve(&self, variable: &str) -> Option<Value> {
        self.entries
            .iter()
            .find(|(n, _)| *n == variable)
            .map(|(_, v)| v.clone())
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
