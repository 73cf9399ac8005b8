//! A second evaluator for the CEL our expressions use, over values that
//! are shared instead of copied.
//!
//! The `cel` interpreter converts each variable it reads between its two
//! value forms (`Value` ↔ `dyn Val`), copying maps and lists whole on every
//! access; over a webhook payload or an instance's events that copying is
//! most of the cost of an expression. This evaluator runs the same rewritten
//! syntax tree over [`Val`], whose lists, maps and strings are
//! reference-counted, so reading `payload.items` costs a pointer copy.
//!
//! ```text
//! IdedExpr (after finance::rewrite) ──compile──▶ Node tree   (None: not in the subset)
//! Node tree + Val variables ──eval──▶ Ok(Val)
//!                                  └─▶ Fail::Error / Fail::Bail ─▶ the `cel` interpreter runs it
//! ```
//!
//! It answers only where it is sure to agree with the interpreter; any
//! error, and anything it does not know (a timestamp in arithmetic, a
//! comprehension over a map, a non-string map key), is left to the
//! interpreter, so results and error messages are the interpreter's.
//!
//! The subset: literals (not bytes); the variables of every scope and
//! comprehension variables; field selection and `has()`; `[]` on lists and
//! maps; list and map literals (string keys); `&&`, `||`, `!`, `?:`; `in`;
//! the rewritten arithmetic and comparisons (`@tallyman.*`); `size`;
//! the macros `all`, `exists`, `exists_one`, `map` (with and without a
//! filter) and `filter` over lists; `contains`, `startsWith`, `endsWith` on
//! strings; and the finance functions `decimal`, `sum`, `round`,
//! `roundHalfUp`, `abs`, `pct`, `within`.

mod compile;
mod eval;
mod value;

#[cfg(test)]
mod tests;

use kube_cel::cel::common::ast::IdedExpr;

pub use value::{Val, ValMap};

pub(crate) use compile::GLOBALS;
pub(crate) use eval::{Fail, Globals};

/// An expression compiled for the fast evaluator.
#[derive(Debug)]
pub(crate) struct Compiled {
    root: compile::Node,
    /// The variables it reads (indexes into [`GLOBALS`]).
    used: Vec<usize>,
}

impl Compiled {
    /// The expression's fast form, when every node is in the subset.
    pub fn new(expr: &IdedExpr) -> Option<Compiled> {
        let mut c = compile::Compiler::new();
        let root = c.node(expr)?;
        Some(Compiled { root, used: c.used })
    }

    /// The names of the variables it reads.
    pub fn variables(&self) -> impl Iterator<Item = (usize, &'static str)> + '_ {
        self.used.iter().map(|i| (*i, GLOBALS[*i]))
    }

    /// The value, or `None` when the interpreter must answer.
    pub fn eval(&self, globals: &Globals) -> Option<Val> {
        self.try_eval(globals).ok()
    }

    pub fn try_eval(&self, globals: &Globals) -> Result<Val, Fail> {
        eval::Eval::new(globals).eval(&self.root)
    }
}
