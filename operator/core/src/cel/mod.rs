//! CEL environments: which variables and functions an expression may use
//! where it stands, checked when a definition is loaded, never per event.
//!
//! | scope                | variables                                         |
//! |----------------------|---------------------------------------------------|
//! | `trigger.correlate`  | `event`, `now`                                    |
//! | step expressions     | `key`, `event`, `events`, `steps`, `vars`, `now`  |
//! | `call.lookup.found`  | the step variables and `response`                 |
//! | webhook `events[]`   | `payload`, `headers`, `now`                       |
//! | policy `rules[].when`| `facts`, `reason`, `workflow`, `initiator`, `now` |

pub mod fast;
pub mod finance;
pub mod json;
mod program;

use std::collections::BTreeSet;

use kube_cel::cel::Program as Parsed;
use kube_cel::cel::common::ast::{EntryExpr, Expr, IdedExpr};
pub use kube_cel::cel::objects::Value;
pub use program::{Env, EvalError, Evaluated, Program, Vars};

/// Where an expression stands, and so what it may refer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Correlate,
    Step,
    Lookup,
    Webhook,
    Policy,
}

impl Scope {
    /// The variables an expression in this scope may use.
    pub fn variables(self) -> &'static [&'static str] {
        match self {
            Scope::Correlate => &["event", "now"],
            Scope::Step => &["key", "event", "events", "steps", "vars", "now"],
            Scope::Lookup => &["key", "event", "events", "steps", "vars", "now", "response"],
            Scope::Webhook => &["payload", "headers", "now"],
            Scope::Policy => &["facts", "reason", "workflow", "initiator", "now"],
        }
    }
}

/// The finance library, the same in every expression (DESIGN.md, "Money is
/// never a float").
pub const FINANCE_FUNCTIONS: &[&str] = &[
    "decimal",
    "sum",
    "round",
    "roundHalfUp",
    "abs",
    "pct",
    "within",
];

/// Functions of standard CEL and of the Kubernetes CEL libraries.
const STANDARD_FUNCTIONS: &[&str] = &[
    // cel-spec standard definitions and macros
    "size",
    "has",
    "all",
    "exists",
    "exists_one",
    "map",
    "filter",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "string",
    "bytes",
    "double",
    "int",
    "uint",
    "bool",
    "type",
    "dyn",
    "timestamp",
    "duration",
    "getFullYear",
    "getMonth",
    "getDayOfYear",
    "getDayOfMonth",
    "getDate",
    "getDayOfWeek",
    "getHours",
    "getMinutes",
    "getSeconds",
    "getMilliseconds",
    "max",
    "min",
    "optional.none",
    "optional.of",
    "optional.ofNonZeroValue",
    "value",
    "hasValue",
    "or",
    "orValue",
    // Kubernetes libraries (strings, lists, sets, regex, urls, quantity, math, format, ...)
    "asApproximateFloat",
    "asInteger",
    "base64.decode",
    "base64.encode",
    "charAt",
    "cidr",
    "compareTo",
    "containsCIDR",
    "containsIP",
    "distinct",
    "family",
    "find",
    "findAll",
    "first",
    "flatten",
    "format",
    "indexOf",
    "ip",
    "isCIDR",
    "isGreaterThan",
    "isIP",
    "isInteger",
    "isLessThan",
    "isQuantity",
    "isSemver",
    "isSorted",
    "isURL",
    "join",
    "last",
    "lastIndexOf",
    "lists.range",
    "lowerAscii",
    "math.abs",
    "math.ceil",
    "math.floor",
    "math.greatest",
    "math.least",
    "math.round",
    "math.sign",
    "math.sqrt",
    "math.trunc",
    "quantity",
    "replace",
    "reverse",
    "semver",
    "sets.contains",
    "sets.equivalent",
    "sets.intersects",
    "slice",
    "sort",
    "split",
    "strings.quote",
    "substring",
    "trim",
    "upperAscii",
    "url",
    "getScheme",
    "getHost",
    "getHostname",
    "getPort",
    "getEscapedPath",
    "getQuery",
    "add",
    "sub",
    "sign",
    "isInf",
    "isNaN",
    "isFinite",
    "major",
    "minor",
    "patch",
];

/// What an expression refers to, beyond what its syntax says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct References {
    /// Free variables (not bound by a comprehension).
    pub variables: BTreeSet<String>,
    /// Named functions and macros (operators excluded).
    pub functions: BTreeSet<String>,
    /// `steps.<name>` and `steps['<name>']`.
    pub steps: BTreeSet<String>,
    /// `events['<type>']`.
    pub events: BTreeSet<String>,
    /// `vars.<name>` and `vars['<name>']`.
    pub vars: BTreeSet<String>,
    /// `facts.<name>` and `facts['<name>']`.
    pub facts: BTreeSet<String>,
    /// Double literals (`0.5`): binary floating point, never exact money.
    pub doubles: Vec<String>,
}

/// Why an expression was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpressionError(pub String);

impl std::fmt::Display for ExpressionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
thread_local! {
    /// Expressions this thread has compiled: the engine's tests check that
    /// running instances evaluates programs and never compiles one.
    pub(crate) static COMPILED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Parse `source` and check its variables and functions against `scope`.
/// Returns the compiled program and what it refers to.
pub fn compile(source: &str, scope: Scope) -> Result<(Parsed, References), ExpressionError> {
    #[cfg(test)]
    COMPILED.with(|n| n.set(n.get() + 1));
    if source.trim().is_empty() {
        return Err(ExpressionError("the expression is empty".into()));
    }
    let program = Parsed::compile(source).map_err(|e| {
        let detail = e
            .errors
            .first()
            .map(|e| e.msg.clone())
            .unwrap_or_else(|| e.to_string());
        ExpressionError(format!("CEL does not compile: {}", detail.trim()))
    })?;
    let mut refs = References::default();
    collect(program.expression(), &mut Vec::new(), &mut refs);
    let allowed = scope.variables();
    let unknown: Vec<&String> = refs
        .variables
        .iter()
        .filter(|v| !allowed.contains(&v.as_str()))
        .collect();
    if let Some(first) = unknown.first() {
        return Err(ExpressionError(format!(
            "CEL refers to an unknown variable {first:?}; available here: {}",
            allowed.join(", ")
        )));
    }
    if let Some(f) = refs.functions.iter().find(|f| !is_known_function(f)) {
        return Err(ExpressionError(format!(
            "CEL calls an unknown function {f:?}; use a standard CEL or Kubernetes CEL function, or one of the finance functions {}",
            FINANCE_FUNCTIONS.join(", ")
        )));
    }
    Ok((program, refs))
}

fn is_known_function(name: &str) -> bool {
    STANDARD_FUNCTIONS.contains(&name) || FINANCE_FUNCTIONS.contains(&name)
}

/// Operators are parsed as calls of names like `_+_`, `!_`, `@in`.
fn is_operator(name: &str) -> bool {
    name.starts_with('_') || name.starts_with('@') || name.starts_with('!') || name.starts_with('-')
}

fn collect(e: &IdedExpr, bound: &mut Vec<String>, refs: &mut References) {
    match &e.expr {
        Expr::Ident(name) => {
            if !name.starts_with('@') && !bound.iter().any(|b| b == name) {
                refs.variables.insert(name.clone());
            }
        }
        Expr::Select(select) => {
            if let Expr::Ident(root) = &select.operand.expr
                && !bound.iter().any(|b| b == root)
            {
                match root.as_str() {
                    "steps" => {
                        refs.steps.insert(select.field.clone());
                    }
                    "vars" => {
                        refs.vars.insert(select.field.clone());
                    }
                    "facts" => {
                        refs.facts.insert(select.field.clone());
                    }
                    _ => {}
                }
            }
            collect(&select.operand, bound, refs);
        }
        Expr::Call(call) => {
            if call.func_name == "_[_]"
                && let (Some(target), Some(index)) = (call.args.first(), call.args.get(1))
                && let (Expr::Ident(root), Expr::Literal(lit)) = (&target.expr, &index.expr)
                && !bound.iter().any(|b| b == root)
                && let kube_cel::cel::common::ast::LiteralValue::String(s) = lit
            {
                let s: &str = s.inner();
                match root.as_str() {
                    "steps" => {
                        refs.steps.insert(s.to_string());
                    }
                    "events" => {
                        refs.events.insert(s.to_string());
                    }
                    "vars" => {
                        refs.vars.insert(s.to_string());
                    }
                    "facts" => {
                        refs.facts.insert(s.to_string());
                    }
                    _ => {}
                }
            }
            if !is_operator(&call.func_name) {
                refs.functions.insert(call.func_name.clone());
            }
            if let Some(target) = &call.target {
                collect(target, bound, refs);
            }
            for arg in &call.args {
                collect(arg, bound, refs);
            }
        }
        Expr::Comprehension(c) => {
            collect(&c.iter_range, bound, refs);
            collect(&c.accu_init, bound, refs);
            let depth = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            collect(&c.loop_cond, bound, refs);
            collect(&c.loop_step, bound, refs);
            collect(&c.result, bound, refs);
            bound.truncate(depth);
        }
        Expr::List(list) => list.elements.iter().for_each(|x| collect(x, bound, refs)),
        Expr::Map(map) => {
            for entry in &map.entries {
                match &entry.expr {
                    EntryExpr::StructField(f) => collect(&f.value, bound, refs),
                    EntryExpr::MapEntry(m) => {
                        collect(&m.key, bound, refs);
                        collect(&m.value, bound, refs);
                    }
                }
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                if let EntryExpr::StructField(f) = &entry.expr {
                    collect(&f.value, bound, refs);
                }
            }
        }
        Expr::Literal(kube_cel::cel::common::ast::LiteralValue::Double(d)) => {
            refs.doubles.push(format!("{:?}", d.inner()));
        }
        Expr::Literal(_) | Expr::Unspecified => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(src: &str, scope: Scope) -> References {
        compile(src, scope).unwrap().1
    }

    #[test]
    fn comprehension_variables_are_bound() {
        let r = refs(
            "events['shipment.confirmed'].data.lines.all(l, steps.order.response.body.lines.exists(o, o.sku == l.sku))",
            Scope::Step,
        );
        assert_eq!(
            r.variables,
            BTreeSet::from(["events".into(), "steps".into()])
        );
        assert_eq!(r.steps, BTreeSet::from(["order".into()]));
        assert_eq!(r.events, BTreeSet::from(["shipment.confirmed".into()]));
    }

    #[test]
    fn unknown_variables_and_functions_are_refused() {
        let e = compile("payload.x == 1", Scope::Step).unwrap_err();
        assert!(e.0.contains("unknown variable \"payload\""), "{e}");
        assert!(e.0.contains("key, event, events, steps, vars, now"), "{e}");
        let e = compile("sume([1, 2]) > 0", Scope::Step).unwrap_err();
        assert!(e.0.contains("unknown function \"sume\""), "{e}");
        let e = compile("facts.amount <", Scope::Policy).unwrap_err();
        assert!(e.0.starts_with("CEL does not compile"), "{e}");
    }

    #[test]
    fn finance_and_kubernetes_functions_are_known() {
        compile(
            "within(decimal(facts.invoice), decimal(facts.po), decimal('0.5')) && facts.sku.lowerAscii() != ''",
            Scope::Policy,
        )
        .unwrap();
        compile(
            "[1, 2].map(x, x * 2).sum() == 6 && has(vars.total)",
            Scope::Step,
        )
        .unwrap();
    }

    #[test]
    fn facts_read_by_a_policy_are_collected() {
        let r = refs(
            "facts.amount < decimal('500') && has(facts.variancePercent) && facts['sku'] != ''",
            Scope::Policy,
        );
        assert_eq!(
            r.facts,
            BTreeSet::from(["amount".into(), "variancePercent".into(), "sku".into()])
        );
    }
}
