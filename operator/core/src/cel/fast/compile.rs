//! From the rewritten CEL syntax tree to the evaluator's tree, or nothing
//! when a node is outside the subset.

use std::sync::Arc;

use kube_cel::cel::common::ast::{ComprehensionExpr, EntryExpr, Expr, IdedExpr, LiteralValue};
use rust_decimal::RoundingStrategy;

use super::value::Val;

/// The variables an expression may read, in every scope (`cel::Scope`).
pub(crate) const GLOBALS: &[&str] = &[
    "key",
    "event",
    "events",
    "steps",
    "vars",
    "now",
    "response",
    "payload",
    "headers",
    "facts",
    "reason",
    "workflow",
    "initiator",
];

/// Binary operators as the finance rewrite leaves them (`@tallyman.*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arith {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StrFn {
    Contains,
    StartsWith,
    EndsWith,
}

#[derive(Debug)]
pub(crate) enum Node {
    Lit(Val),
    Global(usize),
    /// A comprehension variable: its slot on the evaluation stack.
    Local(usize),
    Select {
        operand: Box<Node>,
        field: Arc<str>,
        test: bool,
    },
    Index(Box<Node>, Box<Node>),
    List(Vec<Node>),
    Map(Vec<(Node, Node)>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Not(Box<Node>),
    NotStrictlyFalse(Box<Node>),
    Cond(Box<Node>, Box<Node>, Box<Node>),
    In(Box<Node>, Box<Node>),
    Arith(Arith, Box<Node>, Box<Node>),
    Cmp(Cmp, Box<Node>, Box<Node>),
    Neg(Box<Node>),
    Size(Box<Node>),
    Decimal(Box<Node>),
    Sum(Box<Node>),
    Round(Box<Node>, Option<Box<Node>>, RoundingStrategy),
    Abs(Box<Node>),
    Pct(Box<Node>, Box<Node>),
    Within(Box<Node>, Box<Node>, Box<Node>),
    Str(StrFn, Box<Node>, Box<Node>),
    Comprehension(Box<Comprehension>),
    /// `@result + [elems…]` in the step of `map`/`filter`: appends to the
    /// accumulator in place instead of copying it per element.
    Append {
        accu: usize,
        elems: Vec<Node>,
    },
}

#[derive(Debug)]
pub(crate) struct Comprehension {
    pub range: Node,
    pub init: Node,
    /// Stack slots: the accumulator, then the element.
    pub accu: usize,
    pub iter: usize,
    pub cond: Node,
    pub step: Node,
    pub result: Node,
}

/// Namespaces of qualified library functions (`math.abs`, `sets.contains`,
/// …): a call on an identifier of one of these names may resolve to a
/// library function instead of a method, so it is left to the interpreter.
const NAMESPACES: &[&str] = &[
    "base64",
    "format",
    "ip",
    "jsonpatch",
    "lists",
    "math",
    "optional",
    "sets",
    "strings",
];

pub(crate) struct Compiler {
    /// Names bound by enclosing comprehensions; index = stack slot.
    locals: Vec<String>,
    /// Which globals the expression reads.
    pub used: Vec<usize>,
}

impl Compiler {
    pub fn new() -> Self {
        Self {
            locals: Vec::new(),
            used: Vec::new(),
        }
    }

    fn boxed(&mut self, e: &IdedExpr) -> Option<Box<Node>> {
        self.node(e).map(Box::new)
    }

    pub fn node(&mut self, e: &IdedExpr) -> Option<Node> {
        Some(match &e.expr {
            Expr::Literal(lit) => Node::Lit(match lit {
                LiteralValue::Boolean(b) => Val::Bool(*b.inner()),
                LiteralValue::Int(i) => Val::Int(*i.inner()),
                LiteralValue::UInt(u) => Val::UInt(*u.inner()),
                LiteralValue::Double(d) => Val::Double(*d.inner()),
                LiteralValue::String(s) => Val::str(s.inner()),
                LiteralValue::Null => Val::Null,
                LiteralValue::Bytes(_) => return None,
            }),
            Expr::Ident(name) => match self.locals.iter().rposition(|l| l == name) {
                Some(slot) => Node::Local(slot),
                None => {
                    let g = GLOBALS.iter().position(|g| g == name)?;
                    if !self.used.contains(&g) {
                        self.used.push(g);
                    }
                    Node::Global(g)
                }
            },
            Expr::Select(s) => Node::Select {
                operand: self.boxed(&s.operand)?,
                field: Arc::from(s.field.as_str()),
                test: s.test,
            },
            Expr::List(l) => {
                if !l.optional_indices.is_empty() {
                    return None;
                }
                Node::List(
                    l.elements
                        .iter()
                        .map(|x| self.node(x))
                        .collect::<Option<_>>()?,
                )
            }
            Expr::Map(m) => {
                let mut entries = Vec::with_capacity(m.entries.len());
                for entry in &m.entries {
                    let EntryExpr::MapEntry(me) = &entry.expr else {
                        return None;
                    };
                    if me.optional {
                        return None;
                    }
                    entries.push((self.node(&me.key)?, self.node(&me.value)?));
                }
                Node::Map(entries)
            }
            Expr::Comprehension(c) => self.comprehension(c)?,
            Expr::Call(call) => {
                let args = &call.args;
                let name = call.func_name.as_str();
                if let Some(target) = &call.target {
                    if let Expr::Ident(prefix) = &target.expr
                        && NAMESPACES.contains(&prefix.as_str())
                    {
                        return None;
                    }
                    return Some(match (name, args.len()) {
                        ("sum", 0) => Node::Sum(self.boxed(target)?),
                        ("size", 0) => Node::Size(self.boxed(target)?),
                        ("contains", 1) => {
                            Node::Str(StrFn::Contains, self.boxed(target)?, self.boxed(&args[0])?)
                        }
                        ("startsWith", 1) => Node::Str(
                            StrFn::StartsWith,
                            self.boxed(target)?,
                            self.boxed(&args[0])?,
                        ),
                        ("endsWith", 1) => {
                            Node::Str(StrFn::EndsWith, self.boxed(target)?, self.boxed(&args[0])?)
                        }
                        _ => return None,
                    });
                }
                match (name, args.len()) {
                    ("_&&_", 2) => Node::And(self.boxed(&args[0])?, self.boxed(&args[1])?),
                    ("_||_", 2) => Node::Or(self.boxed(&args[0])?, self.boxed(&args[1])?),
                    ("!_", 1) => Node::Not(self.boxed(&args[0])?),
                    ("@not_strictly_false", 1) => Node::NotStrictlyFalse(self.boxed(&args[0])?),
                    ("_?_:_", 3) => Node::Cond(
                        self.boxed(&args[0])?,
                        self.boxed(&args[1])?,
                        self.boxed(&args[2])?,
                    ),
                    ("_[_]", 2) => Node::Index(self.boxed(&args[0])?, self.boxed(&args[1])?),
                    ("@in", 2) => Node::In(self.boxed(&args[0])?, self.boxed(&args[1])?),
                    ("@tallyman.add", 2) => {
                        if let Some(append) = self.append(&args[0], &args[1]) {
                            return Some(append);
                        }
                        self.arith(Arith::Add, args)?
                    }
                    ("@tallyman.sub", 2) => self.arith(Arith::Sub, args)?,
                    ("@tallyman.mul", 2) => self.arith(Arith::Mul, args)?,
                    ("@tallyman.div", 2) => self.arith(Arith::Div, args)?,
                    ("@tallyman.lt", 2) => self.cmp(Cmp::Lt, args)?,
                    ("@tallyman.le", 2) => self.cmp(Cmp::Le, args)?,
                    ("@tallyman.gt", 2) => self.cmp(Cmp::Gt, args)?,
                    ("@tallyman.ge", 2) => self.cmp(Cmp::Ge, args)?,
                    ("@tallyman.eq", 2) => self.cmp(Cmp::Eq, args)?,
                    ("@tallyman.ne", 2) => self.cmp(Cmp::Ne, args)?,
                    ("@tallyman.neg", 1) => Node::Neg(self.boxed(&args[0])?),
                    ("size", 1) => Node::Size(self.boxed(&args[0])?),
                    ("decimal", 1) => Node::Decimal(self.boxed(&args[0])?),
                    ("round", 1 | 2) | ("roundHalfUp", 1 | 2) => {
                        let strategy = if name == "round" {
                            RoundingStrategy::MidpointNearestEven
                        } else {
                            RoundingStrategy::MidpointAwayFromZero
                        };
                        let places = match args.get(1) {
                            Some(p) => Some(self.boxed(p)?),
                            None => None,
                        };
                        Node::Round(self.boxed(&args[0])?, places, strategy)
                    }
                    ("abs", 1) => Node::Abs(self.boxed(&args[0])?),
                    ("pct", 2) => Node::Pct(self.boxed(&args[0])?, self.boxed(&args[1])?),
                    ("within", 3) => Node::Within(
                        self.boxed(&args[0])?,
                        self.boxed(&args[1])?,
                        self.boxed(&args[2])?,
                    ),
                    _ => return None,
                }
            }
            Expr::Struct(_) | Expr::Unspecified => return None,
        })
    }

    fn arith(&mut self, op: Arith, args: &[IdedExpr]) -> Option<Node> {
        Some(Node::Arith(
            op,
            self.boxed(&args[0])?,
            self.boxed(&args[1])?,
        ))
    }

    fn cmp(&mut self, op: Cmp, args: &[IdedExpr]) -> Option<Node> {
        Some(Node::Cmp(op, self.boxed(&args[0])?, self.boxed(&args[1])?))
    }

    /// `accu + [x, …]` where `accu` is the innermost comprehension's
    /// accumulator (the step of `map` and `filter`).
    fn append(&mut self, left: &IdedExpr, right: &IdedExpr) -> Option<Node> {
        let (Expr::Ident(name), Expr::List(list)) = (&left.expr, &right.expr) else {
            return None;
        };
        // The accumulator is the second-to-last local (the element is last).
        let accu = self.locals.len().checked_sub(2)?;
        if self.locals.get(accu) != Some(name) || !list.optional_indices.is_empty() {
            return None;
        }
        // The elements are evaluated before the accumulator is taken, so
        // one that reads it sees it whole.
        let elems = list
            .elements
            .iter()
            .map(|x| self.node(x))
            .collect::<Option<_>>()?;
        Some(Node::Append { accu, elems })
    }

    fn comprehension(&mut self, c: &ComprehensionExpr) -> Option<Node> {
        // The interpreter binds the element only from the first step on, so
        // a condition or result reading it could see an outer variable.
        if c.iter_var2.is_some()
            || c.iter_var == c.accu_var
            || mentions(&c.loop_cond, &c.iter_var)
            || mentions(&c.result, &c.iter_var)
        {
            return None;
        }
        let init = self.node(&c.accu_init)?;
        let range = self.node(&c.iter_range)?;
        let accu = self.locals.len();
        self.locals.push(c.accu_var.clone());
        self.locals.push(c.iter_var.clone());
        let inner = (|| {
            Some((
                self.node(&c.loop_cond)?,
                self.node(&c.loop_step)?,
                self.node(&c.result)?,
            ))
        })();
        self.locals.truncate(accu);
        let (cond, step, result) = inner?;
        Some(Node::Comprehension(Box::new(Comprehension {
            range,
            init,
            accu,
            iter: accu + 1,
            cond,
            step,
            result,
        })))
    }
}

/// Whether `name` occurs as an identifier anywhere in `e` (shadowing
/// ignored: a conservative answer).
fn mentions(e: &IdedExpr, name: &str) -> bool {
    match &e.expr {
        Expr::Ident(n) => n == name,
        Expr::Select(s) => mentions(&s.operand, name),
        Expr::Call(c) => {
            c.target.as_ref().is_some_and(|t| mentions(t, name))
                || c.args.iter().any(|a| mentions(a, name))
        }
        Expr::List(l) => l.elements.iter().any(|x| mentions(x, name)),
        Expr::Map(m) => m.entries.iter().any(|entry| match &entry.expr {
            EntryExpr::MapEntry(me) => mentions(&me.key, name) || mentions(&me.value, name),
            EntryExpr::StructField(f) => mentions(&f.value, name),
        }),
        Expr::Comprehension(c) => {
            c.iter_var == name
                || c.accu_var == name
                || [
                    &c.iter_range,
                    &c.accu_init,
                    &c.loop_cond,
                    &c.loop_step,
                    &c.result,
                ]
                .into_iter()
                .any(|x| mentions(x, name))
        }
        Expr::Struct(_) => true,
        Expr::Literal(_) | Expr::Unspecified => false,
    }
}
