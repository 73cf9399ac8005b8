//! The step machine: pure, deterministic given its inputs and the clock.
//!
//! ```text
//!            ┌──────────── Input::Event / Timer / CaseResolved ────────────┐
//!            ▼                                                             │
//!   load Instance ─▶ Machine::apply ─▶ Next::Call(plan) ─▶ runtime calls ─▶ Input::CallDone
//!                         │
//!                         └─▶ Next::Idle ─▶ runtime stores the Instance (CAS), then publishes
//!                                           its outbox (audit, emits, cases, timers), then acks
//! ```
//!
//! The machine never performs I/O. Calls are the only effect needed before
//! the state is stored; they carry deterministic idempotency keys, so a
//! crash between a call and the store repeats the call with the same key.
//! Everything else goes through the instance's outbox with a deterministic
//! identity and is published after the store.

mod definition;
mod instance;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use kube_cel::cel::objects::{Key, Map};
use sha2::{Digest, Sha256};
use tallyman_api::v1alpha1::{Approvers, EndState};

pub use definition::*;
pub use instance::*;

use crate::audit::{AuditKind, Link};
use crate::cel::fast::Val;
use crate::cel::{EvalError, Evaluated, Program, Value, Vars, finance, json};
use crate::policy::Ruling;

/// What wakes an instance.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    Event(Event),
    /// The instance's scheduled wake-up: fire every armed timer that is due.
    Wake,
    Timer {
        token: String,
    },
    CaseResolved {
        name: String,
        approved: bool,
        detail: String,
        /// How it was decided: recorded in the instance's audit chain when
        /// the instance takes the outcome.
        history: CaseHistory,
    },
    CallDone(CallResult),
    LookupDone(CallResult),
}

/// What happened to a case before its outcome reached the instance: each
/// person's decision, its escalation and its expiry, one audit record each.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CaseHistory {
    pub decisions: Vec<tallyman_api::v1alpha1::CaseDecision>,
    /// The groups it was escalated to, when it was.
    pub escalated_to: Option<Vec<String>>,
    /// Nobody decided it in time.
    pub expired: bool,
}

/// What the runtime must do next for this instance.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Nothing until the next input: store the state.
    Idle,
    /// Perform this call, then apply `Input::CallDone`.
    Call(CallPlan),
    /// Look up an earlier result, then apply `Input::LookupDone`.
    Lookup(CallPlan),
}

/// A REST call to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallPlan {
    pub step: String,
    pub connector: String,
    pub action: String,
    pub params: BTreeMap<String, String>,
    /// JSON text of the request body.
    pub body: Option<String>,
    pub idempotency_key: String,
}

/// What a call came back with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallResult {
    Response {
        status: u16,
        headers: BTreeMap<String, String>,
        /// The raw body text.
        body: String,
        attempts: u32,
    },
    Failed {
        message: String,
        status: Option<u16>,
        attempts: u32,
    },
}

/// Runs one instance's steps on one compiled definition.
pub struct Machine<'a> {
    def: &'a Compiled,
    now: DateTime<Utc>,
    /// `now` in RFC 3339 (milliseconds, `Z`), the time of every audit
    /// record of this machine: formatted once, shared by the records.
    now_text: Arc<str>,
    /// The identity every audit record repeats, shared by the records.
    ids: std::cell::RefCell<AuditIds>,
    /// Parsed event data, responses and variables, reused across the
    /// expressions of one apply instead of parsed per expression.
    cache: std::cell::RefCell<Values>,
    /// Steps that ran to completion in this apply, with how long each took
    /// (the worker's `step_duration` metric; calls are timed by the worker).
    timings: std::cell::RefCell<Vec<(usize, std::time::Duration)>>,
    /// The maps of the variables bound last, see [`Machine::vars`].
    memo: std::cell::RefCell<VarsMemo>,
    /// How often this machine entered each call step (by index): a `goTo`
    /// loop through a call with no wait in it would call for ever.
    call_entries: std::cell::RefCell<Vec<(usize, usize)>>,
}

/// An instance's event data, responses and variables parsed into the
/// evaluator's shared form (cloning one is a reference count), so every
/// expression of an apply reads the same parsed data. A worker keeps them
/// with an instance it holds in memory ([`Machine::with_values`]), so the
/// next input parses only what is new. Each entry is checked against the
/// instance's JSON text before use: a stale entry is parsed again.
#[derive(Default)]
pub struct Values {
    /// Event type → (the event, its value).
    events: std::collections::HashMap<String, (Event, Val)>,
    /// Step name → (response text, `{"response": value}`).
    responses: std::collections::HashMap<String, (String, Val)>,
    /// Variable name → (JSON text, value).
    vars: std::collections::HashMap<String, (String, Val)>,
}

impl Values {
    /// Add `other`'s entries, replacing those of the same name.
    pub fn merge(&mut self, other: Values) {
        self.events.extend(other.events);
        self.responses.extend(other.responses);
        self.vars.extend(other.vars);
    }
}

/// The parsed value of `text`, from `cache` when `tag` (the text itself or
/// an id that identifies it) is unchanged.
/// How a kept text is read: as JSON (events, answers) or as a value the
/// instance stored ([`json::parse_stored`]).
type Reader = fn(&[u8]) -> Result<Val, json::JsonError>;

fn cached(
    cache: &mut std::collections::HashMap<String, (String, Val)>,
    name: &str,
    tag: &str,
    (text, parse): (&str, Reader),
    what: &str,
    wrap: impl FnOnce(Val) -> Val,
) -> Step<Val> {
    if let Some((t, v)) = cache.get(name)
        && t == tag
    {
        return Ok(v.clone());
    }
    let v = parse(text.as_bytes()).map(wrap).map_err(|e| EvalError {
        expression: what.to_string(),
        message: e.0,
    })?;
    cache.insert(name.to_string(), (tag.to_string(), v.clone()));
    Ok(v)
}

type Step<T> = Result<T, EvalError>;

/// How many steps one input may run before the instance must wait: three
/// times the longest straight path (a workflow has at most 100 steps), few
/// enough that the failed instance, with the audit records of every step
/// it ran, still fits one broker message.
pub const STEP_BUDGET: usize = 300;

/// How often one commit may enter the same call step: once per input that
/// let the instance go round a loop with a wait in it (at most 64 inputs
/// are applied in one commit), more only in a loop with no wait at all.
pub const CALL_BUDGET: usize = 100;

impl<'a> Machine<'a> {
    pub fn new(def: &'a Compiled, now: DateTime<Utc>) -> Self {
        Self::with_values(def, now, Values::default())
    }

    /// A machine that starts from values parsed by an earlier machine of
    /// the same instance (see [`Values`]).
    pub fn with_values(def: &'a Compiled, now: DateTime<Utc>, values: Values) -> Self {
        Self {
            def,
            now,
            now_text: now.to_rfc3339_opts(SecondsFormat::Millis, true).into(),
            ids: std::cell::RefCell::new(AuditIds {
                namespace: def.def.namespace.as_str().into(),
                workflow: def.def.workflow.as_str().into(),
                key: "".into(),
                revision: "".into(),
            }),
            cache: std::cell::RefCell::new(values),
            timings: Default::default(),
            memo: Default::default(),
            call_entries: Default::default(),
        }
    }

    /// The parsed values, for the next machine of the same instance.
    pub fn into_values(self) -> Values {
        self.cache.into_inner()
    }

    /// The steps this machine executed since the last call, by name, with
    /// their execution time: `check`, `set`, `emit`, an `approval` the
    /// policy decided at once, a `wait` already due. Steps that wait for
    /// events, timers or people, and calls (timed by the caller), are not
    /// in it.
    pub fn take_step_timings(&self) -> Vec<(&'a str, std::time::Duration)> {
        self.timings
            .borrow_mut()
            .drain(..)
            .map(|(i, d)| (self.def.steps[i].name.as_str(), d))
            .collect()
    }

    /// The time from here on: a worker moves it past each call it made,
    /// so what follows (timers, `now`, audit records) counts from when the
    /// answer came, not from when the input did.
    pub fn set_now(&mut self, now: DateTime<Utc>) {
        self.now = now;
        self.now_text = now.to_rfc3339_opts(SecondsFormat::Millis, true).into();
    }

    /// `millis` from now, in epoch milliseconds; a duration too long to
    /// count (the schema takes any number of hours) is as far as it goes,
    /// not a wrap into the past that would fire at once.
    fn after(&self, millis: u128) -> i64 {
        self.now_ms()
            .saturating_add(i64::try_from(millis).unwrap_or(i64::MAX))
    }

    fn now_ms(&self) -> i64 {
        self.now.timestamp_millis()
    }

    /// Apply one input and run until the instance blocks.
    pub fn apply(&self, inst: &mut Instance, input: Input) -> Next {
        let next = self.apply_input(inst, input);
        if next == Next::Idle {
            self.rearm(inst);
        }
        next
    }

    /// Drop timers nothing waits for any more and schedule the earliest of
    /// the rest, when it changed. A wake-up still in the outbox is not
    /// published yet (several inputs applied in one commit): the current
    /// timers supersede it.
    fn rearm(&self, inst: &mut Instance) {
        inst.outbox.retain(|o| !matches!(o, Outbound::Wake { .. }));
        let live = |token: &String| {
            inst.sla_timer.as_ref() == Some(token)
                || match &inst.wait {
                    Some(Wait::Events { timer: Some(t) }) | Some(Wait::Timer { timer: t }) => {
                        t == token
                    }
                    _ => false,
                }
        };
        let stale: Vec<String> = inst.timers.keys().filter(|t| !live(t)).cloned().collect();
        for t in stale {
            inst.timers.remove(&t);
        }
        if !inst.is_running() {
            inst.timers.clear();
        }
        let earliest = inst.timers.values().min().copied();
        if let Some(due_ms) = earliest
            && earliest != inst.wake_ms
        {
            inst.outbox.push(Outbound::Wake { due_ms });
        }
        inst.wake_ms = earliest;
    }

    fn apply_input(&self, inst: &mut Instance, input: Input) -> Next {
        inst.updated_ms = self.now_ms();
        if inst.audit_seq == 0 {
            self.start(inst);
        }
        if input == Input::Wake {
            // Fire every due timer, earliest first, then run.
            inst.wake_ms = None;
            let mut due: Vec<(i64, String)> = inst
                .timers
                .iter()
                .filter(|(_, d)| **d <= self.now_ms())
                .map(|(t, d)| (*d, t.clone()))
                .collect();
            due.sort();
            for (_, token) in due {
                inst.timers.remove(&token);
                let next = self.apply_input(inst, Input::Timer { token });
                if next != Next::Idle {
                    return next;
                }
            }
            return Next::Idle;
        }
        match self.handle(inst, input).and_then(|n| match n {
            Some(next) => Ok(next),
            None => self.run(inst),
        }) {
            Ok(next) => next,
            Err(e) => {
                let step = self.step_name(inst);
                let reason = format!("step {step}: {e}");
                let msg_id = format!("{}/dlq/{}", self.id_prefix(inst), inst.next_seq());
                inst.outbox.push(Outbound::DeadLetter {
                    msg_id,
                    step,
                    reason: reason.clone(),
                });
                self.end(inst, EndState::Failed, reason);
                Next::Idle
            }
        }
    }

    fn start(&self, inst: &mut Instance) {
        self.audit(
            inst,
            AuditKind::InstanceStarted,
            None,
            serde_json::json!({}),
        );
        if let Some(sla) = self.def.sla {
            let due = self.after(sla.as_millis());
            let token = self.timer(inst, due);
            inst.sla_due_ms = Some(due);
            inst.sla_timer = Some(token);
        }
    }

    /// Handle the input; `Some(next)` short-circuits the run loop.
    fn handle(&self, inst: &mut Instance, input: Input) -> Step<Option<Next>> {
        match input {
            Input::Event(ev) => {
                let key = ev.dedup_key();
                if inst.has_applied(&key) {
                    return Ok(Some(Next::Idle));
                }
                inst.applied.push_back(key);
                while inst.applied.len() > APPLIED_IDS {
                    inst.applied.pop_front();
                }
                if !inst.is_running() {
                    return Ok(Some(Next::Idle));
                }
                self.audit(
                    inst,
                    AuditKind::EventApplied,
                    None,
                    serde_json::json!({"id": ev.id, "type": ev.type_}),
                );
                inst.woke_by = Some(ev.type_.clone());
                inst.events.insert(ev.type_.clone(), ev);
                if let Some(Wait::Events { .. }) = inst.wait
                    && self.awaited_present(inst)
                {
                    inst.wait = None;
                    self.complete_step(inst, serde_json::json!({}));
                }
                Ok(None)
            }
            Input::Timer { token } => {
                if inst.sla_timer.as_deref() == Some(&token) {
                    inst.sla_timer = None;
                    if inst.is_running() && !inst.sla_breached {
                        inst.sla_breached = true;
                        self.audit(inst, AuditKind::SlaBreached, None, serde_json::json!({}));
                        if self.def.sla_exception {
                            inst.sla_case = Some(self.open_info_case(inst, "SlaBreached"));
                        }
                    }
                    return Ok(Some(Next::Idle));
                }
                match inst.wait.clone() {
                    Some(Wait::Events { timer: Some(t) }) if t == token => {
                        inst.wait = None;
                        self.audit(
                            inst,
                            AuditKind::TimerFired,
                            Some(self.step_name(inst)),
                            serde_json::json!({"timeout": true}),
                        );
                        let route = match &self.current(inst).kind {
                            CKind::Await { on_timeout, .. } => on_timeout.as_ref(),
                            _ => None,
                        };
                        self.take_route(
                            inst,
                            route,
                            Phase::OnTimeout,
                            "the awaited events did not arrive in time",
                        )?;
                        Ok(None)
                    }
                    Some(Wait::Timer { timer }) if timer == token => {
                        inst.wait = None;
                        self.audit(
                            inst,
                            AuditKind::TimerFired,
                            Some(self.step_name(inst)),
                            serde_json::json!({}),
                        );
                        self.complete_step(inst, serde_json::json!({}));
                        Ok(None)
                    }
                    _ => Ok(Some(Next::Idle)),
                }
            }
            Input::CaseResolved {
                name,
                approved,
                detail,
                history,
            } => match inst.wait.clone() {
                Some(Wait::Case { name: n, during }) if n == name => {
                    inst.wait = None;
                    self.record_decision(inst, &name, approved, &detail, &history);
                    if approved {
                        self.approved(inst, during)?;
                    } else {
                        self.rejected(inst, during)?;
                    }
                    Ok(None)
                }
                Some(Wait::FailedCall { case }) if case == name => {
                    inst.wait = None;
                    self.record_decision(inst, &name, approved, &detail, &history);
                    if !approved {
                        self.end(
                            inst,
                            EndState::Failed,
                            format!("the failed call was not retried: {detail}"),
                        );
                    }
                    // Approved: the run loop plans the call again.
                    Ok(None)
                }
                // The breached SLA's case, for the record: its decision
                // joins the chain (running or ended), nothing moves on.
                _ if inst.sla_case.as_deref() == Some(name.as_str()) => {
                    inst.sla_case = None;
                    self.record_decision(inst, &name, approved, &detail, &history);
                    Ok(Some(Next::Idle))
                }
                _ => Ok(Some(Next::Idle)),
            },
            Input::CallDone(result) => self.call_done(inst, result).map(|_| None),
            Input::Wake => Ok(Some(Next::Idle)),
            Input::LookupDone(result) => {
                let CKind::Call(call) = &self.current(inst).kind else {
                    return Ok(Some(Next::Idle));
                };
                // An answer that is JSON the engine cannot read exactly (a
                // number no 28-digit decimal holds) would be kept as text,
                // and every field of it would read as false: "not there",
                // and the call made again. It cannot answer instead.
                let unreadable = match &result {
                    CallResult::Response { body, .. } if looks_like_json(body) => {
                        json::parse_fast(body.as_bytes()).err()
                    }
                    _ => None,
                };
                let result = match (result, unreadable) {
                    (
                        CallResult::Response {
                            status, attempts, ..
                        },
                        Some(why),
                    ) => CallResult::Failed {
                        message: format!(
                            "its answer (HTTP {status}) is JSON that cannot be read exactly: {why}"
                        ),
                        status: None,
                        attempts,
                    },
                    (result, _) => result,
                };
                let found = match (&result, &call.lookup) {
                    (CallResult::Response { .. }, Some(lookup)) => {
                        let mut vars = self.vars(inst)?;
                        vars.set_fast("response", response_val(&result));
                        lookup.found.eval_bool(&vars)?
                    }
                    _ => false,
                };
                if found {
                    self.call_done(inst, result)?;
                    return Ok(None);
                }
                match result {
                    // No answer, or a refusal other than "not there": nobody
                    // knows whether an earlier attempt went through, and
                    // calling again could do it twice. The call fails
                    // instead (a person may retry it, which looks up again).
                    CallResult::Failed {
                        message,
                        status,
                        attempts,
                    } if !matches!(status, Some(404 | 410)) => {
                        self.call_done(
                            inst,
                            CallResult::Failed {
                                message: format!("the lookup before the call failed: {message}"),
                                status,
                                attempts,
                            },
                        )?;
                        Ok(None)
                    }
                    _ => Ok(Some(Next::Call(self.plan(inst, call, false)?))),
                }
            }
        }
    }

    /// People decided a case of the instance (or its deadline did): audit
    /// each decision, the escalation and the expiry, then the outcome.
    fn record_decision(
        &self,
        inst: &mut Instance,
        case: &str,
        approved: bool,
        detail: &str,
        history: &CaseHistory,
    ) {
        let step = self.step_name(inst);
        for d in &history.decisions {
            let mut note = serde_json::json!({
                "case": case,
                "approver": d.approver,
                "groups": d.groups,
                "decision": match d.decision {
                    tallyman_api::v1alpha1::Verdict::Approve => "Approve",
                    tallyman_api::v1alpha1::Verdict::Reject => "Reject",
                },
            });
            if let Some(comment) = &d.comment {
                note["comment"] = serde_json::Value::from(comment.as_str());
            }
            self.audit(inst, AuditKind::DecisionRecorded, Some(step.clone()), note);
        }
        if let Some(to) = &history.escalated_to {
            self.audit(
                inst,
                AuditKind::CaseEscalated,
                Some(step.clone()),
                serde_json::json!({"case": case, "to": to}),
            );
        }
        if history.expired {
            self.audit(
                inst,
                AuditKind::CaseExpired,
                Some(step.clone()),
                serde_json::json!({"case": case}),
            );
        }
        let kind = if approved {
            AuditKind::CaseApproved
        } else {
            AuditKind::CaseRejected
        };
        self.audit(
            inst,
            kind,
            Some(self.step_name(inst)),
            serde_json::json!({"case": case, "detail": detail}),
        );
    }

    /// Run steps until the instance waits, needs a call, or ends. A
    /// `goTo` back to steps that complete at once (an `await` whose events
    /// arrived already, a `check` that fails again) would run for ever: the
    /// instance fails visibly after [`STEP_BUDGET`] steps without a wait.
    fn run(&self, inst: &mut Instance) -> Step<Next> {
        let mut budget = STEP_BUDGET;
        loop {
            if !inst.is_running() || inst.wait.is_some() {
                return Ok(Next::Idle);
            }
            if budget == 0 {
                return Err(EvalError {
                    expression: format!("goTo {}", self.step_name(inst)),
                    message: format!(
                        "ran {STEP_BUDGET} steps without waiting for anything: a goTo loop whose steps complete at once"
                    ),
                });
            }
            budget -= 1;
            if inst.step >= self.def.steps.len() {
                self.end(inst, EndState::Completed, String::new());
                return Ok(Next::Idle);
            }
            let s = self.current(inst);
            let (index, started) = (inst.step, std::time::Instant::now());
            if let Some(when) = &s.when
                && !when.eval_bool(&self.vars(inst)?)?
            {
                self.audit(
                    inst,
                    AuditKind::StepSkipped,
                    Some(s.name.clone()),
                    serde_json::json!({}),
                );
                inst.step += 1;
                continue;
            }
            match &s.kind {
                CKind::Await { timeout, .. } => {
                    if self.awaited_present(inst) {
                        self.complete_step(inst, serde_json::json!({}));
                    } else {
                        let timer = timeout.map(|t| self.timer(inst, self.after(t.as_millis())));
                        inst.wait = Some(Wait::Events { timer });
                    }
                }
                CKind::Call(call) => {
                    let entered = {
                        let mut entries = self.call_entries.borrow_mut();
                        match entries.iter_mut().find(|(i, _)| *i == index) {
                            Some((_, n)) => {
                                *n += 1;
                                *n
                            }
                            None => {
                                entries.push((index, 1));
                                1
                            }
                        }
                    };
                    if entered > CALL_BUDGET {
                        return Err(EvalError {
                            expression: format!("call {}", s.name),
                            message: format!(
                                "entered {CALL_BUDGET} times in one commit without waiting for anything: a goTo loop through a call"
                            ),
                        });
                    }
                    return Ok(if call.lookup.is_some() {
                        Next::Lookup(self.plan(inst, call, true)?)
                    } else {
                        Next::Call(self.plan(inst, call, false)?)
                    });
                }
                CKind::Check { cond, on_false } => {
                    if cond.eval_bool(&self.vars(inst)?)? {
                        self.complete_step(inst, serde_json::json!({"check": true}));
                    } else {
                        self.audit(
                            inst,
                            AuditKind::CheckFailed,
                            Some(s.name.clone()),
                            serde_json::json!({}),
                        );
                        self.take_route(
                            inst,
                            on_false.as_ref(),
                            Phase::OnFalse,
                            "the check did not hold",
                        )?;
                    }
                }
                CKind::Approval(a) => self.ask(inst, a, Phase::Step)?,
                CKind::Emit(e) => {
                    self.emit(inst, e)?;
                    self.complete_step(inst, serde_json::json!({}));
                }
                CKind::Set(vars) => {
                    let env = self.vars(inst)?;
                    let mut values = Vec::new();
                    for (name, program) in vars {
                        let value = program.evaluate(&env)?;
                        values.push((name.clone(), stored_json(program, value)?));
                    }
                    let mut cache = self.cache.borrow_mut();
                    for (name, (text, value)) in values {
                        // The next expression reads the value, not its text.
                        if let Some(v) = value
                            && v.stored_stable()
                        {
                            cache.vars.insert(name.clone(), (text.clone(), v));
                        }
                        inst.vars.insert(name, text);
                    }
                    drop(cache);
                    self.complete_step(inst, serde_json::json!({}));
                }
                CKind::Wait { for_, until } => {
                    let due = match (for_, until) {
                        (Some(d), _) => self.after(d.as_millis()),
                        (None, Some(u)) => match u.eval(&self.vars(inst)?)? {
                            Value::Timestamp(t) => t.timestamp_millis(),
                            other => {
                                return Err(EvalError {
                                    expression: u.source().to_string(),
                                    message: format!(
                                        "wait.until must give a timestamp, got {other:?}"
                                    ),
                                });
                            }
                        },
                        (None, None) => self.now_ms(),
                    };
                    if due <= self.now_ms() {
                        self.complete_step(inst, serde_json::json!({}));
                    } else {
                        let timer = self.timer(inst, due);
                        inst.wait = Some(Wait::Timer { timer });
                    }
                }
            }
            let waits = matches!(s.kind, CKind::Await { .. }) || inst.wait.is_some();
            if !waits {
                self.timings.borrow_mut().push((index, started.elapsed()));
            }
        }
    }

    fn current(&self, inst: &Instance) -> &'a CStep {
        &self.def.steps[inst.step.min(self.def.steps.len() - 1)]
    }

    fn step_name(&self, inst: &Instance) -> String {
        self.def
            .steps
            .get(inst.step)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| "end".into())
    }

    fn awaited_present(&self, inst: &Instance) -> bool {
        match &self.current(inst).kind {
            CKind::Await { events, .. } => events.iter().all(|e| inst.events.contains_key(e)),
            _ => false,
        }
    }

    fn complete_step(&self, inst: &mut Instance, detail: serde_json::Value) {
        let name = self.step_name(inst);
        self.audit(inst, AuditKind::StepCompleted, Some(name), detail);
        inst.step += 1;
    }

    fn plan(&self, inst: &Instance, call: &CCall, lookup: bool) -> Step<CallPlan> {
        let vars = self.vars(inst)?;
        let params_of = |params: &[(String, Program)]| -> Step<BTreeMap<String, String>> {
            params
                .iter()
                .map(|(k, p)| Ok((k.clone(), p.eval_key(&vars)?)))
                .collect()
        };
        let (action, params) = match (&call.lookup, lookup) {
            (Some(l), true) => (l.action.clone(), params_of(&l.params)?),
            _ => (call.action.clone(), params_of(&call.params)?),
        };
        let body = match (&call.body, lookup) {
            (Some(b), false) => Some(to_json(b, &b.evaluate(&vars)?)?),
            _ => None,
        };
        let idempotency_key = match &call.idempotency_key {
            Some(k) => k.eval_key(&vars)?,
            None => format!("{}/{}", self.id_prefix(inst), self.step_name(inst)),
        };
        Ok(CallPlan {
            step: self.step_name(inst),
            connector: call.connector.clone(),
            action,
            params,
            body,
            idempotency_key,
        })
    }

    fn call_done(&self, inst: &mut Instance, result: CallResult) -> Step<()> {
        let name = self.step_name(inst);
        match &result {
            CallResult::Response {
                status, attempts, ..
            } => {
                let value = response_val(&result);
                let response = value.to_json().map_err(|e| EvalError {
                    expression: name.clone(),
                    message: e.0,
                })?;
                if value.json_stable() {
                    self.cache.borrow_mut().responses.insert(
                        name.clone(),
                        (response.clone(), Val::map([("response", value)])),
                    );
                }
                inst.responses.insert(name.clone(), response);
                self.audit(
                    inst,
                    AuditKind::CallSucceeded,
                    Some(name),
                    serde_json::json!({"status": status, "attempts": attempts}),
                );
                inst.step += 1;
            }
            CallResult::Failed {
                message,
                status,
                attempts,
            } => {
                self.audit(
                    inst,
                    AuditKind::CallFailed,
                    Some(name.clone()),
                    serde_json::json!({"status": status, "attempts": attempts, "message": message}),
                );
                let CKind::Call(call) = &self.current(inst).kind else {
                    return Ok(());
                };
                if call.on_failure.is_some() {
                    self.take_route(inst, call.on_failure.as_ref(), Phase::OnFailure, message)?;
                } else {
                    // Visible failure: a dead letter, and a case a person can
                    // approve (retry the call) or reject (fail the instance).
                    let msg_id = format!("{}/dlq/{}", self.id_prefix(inst), inst.next_seq());
                    inst.outbox.push(Outbound::DeadLetter {
                        msg_id,
                        step: name.clone(),
                        reason: message.clone(),
                    });
                    self.audit(
                        inst,
                        AuditKind::DeadLettered,
                        Some(name),
                        serde_json::json!({"message": message}),
                    );
                    let case = self.open_info_case(inst, "CallFailed");
                    inst.wait = Some(Wait::FailedCall { case });
                }
            }
        }
        Ok(())
    }

    /// Ask the approval's policy; open a case when people must decide.
    fn ask(&self, inst: &mut Instance, a: &CApproval, during: Phase) -> Step<()> {
        let vars = self.vars(inst)?;
        let mut facts = std::collections::HashMap::new();
        let mut facts_json = serde_json::Map::new();
        for (name, program) in &a.facts {
            let v = program.eval(&vars)?;
            facts_json.insert(name.clone(), fact_json(&v));
            facts.insert(Key::String(Arc::new(name.clone())), v);
        }
        let facts = Value::Map(Map {
            map: Arc::new(facts),
        });
        let initiator = match &a.initiator {
            Some(p) => p.eval_key(&vars)?,
            None => inst
                .woke_by
                .as_ref()
                .and_then(|t| inst.events.get(t))
                .map(|e| e.source.clone())
                .unwrap_or_default(),
        };
        let policy = self.def.policies.get(&a.policy).ok_or_else(|| EvalError {
            expression: a.policy.clone(),
            message: format!(
                "ApprovalPolicy {:?} is not part of the definition",
                a.policy
            ),
        })?;
        let ruling = policy.evaluate(
            &facts,
            &a.reason,
            &self.def.def.workflow,
            &initiator,
            self.now,
        )?;
        let step = Some(self.step_name(inst));
        let (rule, approvers) = match ruling {
            Ruling::RequireApproval { rule, approvers } => (rule, approvers),
            Ruling::AutoApprove { rule } => {
                return self.decided_by_policy(inst, a, during, true, Some(rule));
            }
            Ruling::AutoReject { rule } => {
                return self.decided_by_policy(inst, a, during, false, Some(rule));
            }
            Ruling::NoRuleMatched => return self.decided_by_policy(inst, a, during, false, None),
        };
        let (deadline, escalate_to) = policy.expiry(self.now);
        let sod = &policy.spec.segregation_of_duties;
        let name = self.case_name(inst);
        let request = CaseRequest {
            name: name.clone(),
            workflow: self.def.def.workflow.clone(),
            key: inst.key.clone(),
            revision: inst.revision.clone(),
            reason: a.reason.clone(),
            facts: facts_json,
            initiator,
            policy: a.policy.clone(),
            rule,
            required: approvers,
            exclude_initiator: sod.exclude_initiator,
            distinct_approvers: sod.distinct_approvers,
            deadline_ms: deadline.map(|d| d.timestamp_millis()),
            escalate_to,
            escalation_window_ms: policy.escalation_window().map(|w| w.as_millis() as u64),
            blocking: true,
        };
        self.audit(
            inst,
            AuditKind::CaseOpened,
            step,
            serde_json::json!({"case": name, "policy": a.policy, "rule": request.rule}),
        );
        inst.outbox.push(Outbound::OpenCase(Box::new(request)));
        inst.wait = Some(Wait::Case { name, during });
        Ok(())
    }

    /// The policy decided without people: audit it and go on.
    fn decided_by_policy(
        &self,
        inst: &mut Instance,
        a: &CApproval,
        during: Phase,
        approved: bool,
        rule: Option<String>,
    ) -> Step<()> {
        let kind = if approved {
            AuditKind::CaseApproved
        } else {
            AuditKind::CaseRejected
        };
        self.audit(
            inst,
            kind,
            Some(self.step_name(inst)),
            serde_json::json!({"policy": a.policy, "rule": rule, "auto": true}),
        );
        if approved {
            self.approved(inst, during)
        } else {
            self.rejected(inst, during)
        }
    }

    /// A case with no policy behind it (failed calls, SLA breaches): the
    /// workflow's `exceptions.approvers` decide, else anyone allowed to.
    fn open_info_case(&self, inst: &mut Instance, reason: &str) -> String {
        let name = self.case_name(inst);
        let request = CaseRequest {
            name: name.clone(),
            workflow: self.def.def.workflow.clone(),
            key: inst.key.clone(),
            revision: inst.revision.clone(),
            reason: reason.to_string(),
            facts: serde_json::Map::new(),
            initiator: "tallyman".into(),
            policy: String::new(),
            rule: String::new(),
            // The workflow's own approvers, else anyone allowed to decide.
            required: self.def.def.spec.exceptions.as_ref().map_or(
                Approvers {
                    groups: Vec::new(),
                    count: 1,
                },
                |e| e.approvers.clone(),
            ),
            exclude_initiator: false,
            distinct_approvers: true,
            deadline_ms: None,
            escalate_to: None,
            escalation_window_ms: None,
            blocking: reason != "SlaBreached",
        };
        self.audit(
            inst,
            AuditKind::CaseOpened,
            Some(self.step_name(inst)),
            serde_json::json!({"case": name, "reason": reason}),
        );
        inst.outbox.push(Outbound::OpenCase(Box::new(request)));
        name
    }

    fn approval_of(&self, inst: &Instance, during: Phase) -> Option<&'a CApproval> {
        let kind = &self.current(inst).kind;
        match (during, kind) {
            (Phase::Step, CKind::Approval(a)) => Some(a),
            (Phase::OnFalse, CKind::Check { on_false, .. }) => on_false.as_ref()?.approval.as_ref(),
            (Phase::OnTimeout, CKind::Await { on_timeout, .. }) => {
                on_timeout.as_ref()?.approval.as_ref()
            }
            (Phase::OnFailure, CKind::Call(c)) => c.on_failure.as_ref()?.approval.as_ref(),
            _ => None,
        }
    }

    fn route_of(&self, inst: &Instance, during: Phase) -> Option<&'a CRoute> {
        match (during, &self.current(inst).kind) {
            (Phase::OnFalse, CKind::Check { on_false, .. }) => on_false.as_ref(),
            (Phase::OnTimeout, CKind::Await { on_timeout, .. }) => on_timeout.as_ref(),
            (Phase::OnFailure, CKind::Call(c)) => c.on_failure.as_ref(),
            _ => None,
        }
    }

    fn approved(&self, inst: &mut Instance, during: Phase) -> Step<()> {
        match during {
            Phase::Step => {
                self.complete_step(inst, serde_json::json!({"approved": true}));
                Ok(())
            }
            _ => {
                let route = self.route_of(inst, during);
                self.finish_route(inst, route, "approved")
            }
        }
    }

    fn rejected(&self, inst: &mut Instance, during: Phase) -> Step<()> {
        match self.approval_of(inst, during) {
            Some(a) => self.outcome(inst, &a.on_rejected, "the approval was rejected"),
            None => {
                self.end(inst, EndState::Rejected, "the approval was rejected".into());
                Ok(())
            }
        }
    }

    fn take_route(
        &self,
        inst: &mut Instance,
        route: Option<&'a CRoute>,
        during: Phase,
        why: &str,
    ) -> Step<()> {
        match route {
            None => {
                let step = self.step_name(inst);
                self.end(inst, EndState::Failed, format!("step {step}: {why}"));
                Ok(())
            }
            Some(r) => match &r.approval {
                Some(a) => self.ask(inst, a, during),
                None => self.finish_route(inst, Some(r), why),
            },
        }
    }

    fn finish_route(&self, inst: &mut Instance, route: Option<&'a CRoute>, why: &str) -> Step<()> {
        let Some(r) = route else {
            inst.step += 1;
            return Ok(());
        };
        if let Some(e) = &r.emit {
            self.emit(inst, e)?;
        }
        match (r.go_to, r.end) {
            (Some(to), _) => inst.step = to,
            (None, Some(end)) => {
                let step = self.step_name(inst);
                self.end(inst, end, format!("step {step}: {why}"));
            }
            (None, None) => self.complete_step(inst, serde_json::json!({"routed": true})),
        }
        Ok(())
    }

    fn outcome(&self, inst: &mut Instance, o: &COutcome, why: &str) -> Step<()> {
        if let Some(e) = &o.emit {
            self.emit(inst, e)?;
        }
        match (o.go_to, o.end) {
            (Some(to), _) => inst.step = to,
            (None, end) => {
                let step = self.step_name(inst);
                self.end(
                    inst,
                    end.unwrap_or(EndState::Rejected),
                    format!("step {step}: {why}"),
                );
            }
        }
        Ok(())
    }

    fn emit(&self, inst: &mut Instance, e: &CEmit) -> Step<()> {
        let data = match &e.data {
            Some(p) => to_json(p, &p.evaluate(&self.vars(inst)?)?)?,
            None => json::to_string(&Value::from(std::collections::HashMap::from([(
                "key".to_string(),
                Value::String(Arc::new(inst.key.clone())),
            )])))
            .unwrap_or_default(),
        };
        let msg_id = format!("{}/emit/{}", self.id_prefix(inst), inst.next_seq());
        self.audit(
            inst,
            AuditKind::EventEmitted,
            Some(self.step_name(inst)),
            serde_json::json!({"id": msg_id, "type": e.type_}),
        );
        inst.outbox.push(Outbound::Emit {
            msg_id,
            type_: e.type_.clone(),
            data,
        });
        Ok(())
    }

    fn end(&self, inst: &mut Instance, state: EndState, why: String) {
        inst.status = match state {
            EndState::Completed => Status::Completed,
            EndState::Rejected => Status::Rejected,
            EndState::Failed => Status::Failed,
        };
        inst.wait = None;
        inst.outcome = (!why.is_empty()).then_some(why.clone());
        let kind = match state {
            EndState::Completed => AuditKind::InstanceCompleted,
            EndState::Rejected => AuditKind::InstanceRejected,
            EndState::Failed => AuditKind::InstanceFailed,
        };
        self.audit(inst, kind, None, serde_json::json!({"reason": why}));
    }

    /// Schedule a timer; returns its token.
    fn timer(&self, inst: &mut Instance, due_ms: i64) -> String {
        let token = format!("{}/timer/{}", self.id_prefix(inst), inst.next_seq());
        inst.timers.insert(token.clone(), due_ms);
        token
    }

    fn audit(
        &self,
        inst: &mut Instance,
        kind: AuditKind,
        step: Option<String>,
        detail: serde_json::Value,
    ) {
        let ids = self.ids(inst);
        let record = Link {
            namespace: &ids.namespace,
            workflow: &ids.workflow,
            key: &ids.key,
            revision: &ids.revision,
            last_seq: inst.audit_seq,
            last_hash: &inst.audit_hash,
        }
        .next(self.now_text.clone(), kind, step, detail);
        inst.audit_seq = record.seq;
        inst.audit_hash = record.hash.clone();
        inst.outbox.push(Outbound::Audit(Box::new(record)));
    }

    /// The shared identity strings of `inst`, made again only when the
    /// machine meets another instance.
    fn ids(&self, inst: &Instance) -> std::cell::RefMut<'_, AuditIds> {
        let mut ids = self.ids.borrow_mut();
        if *ids.key != *inst.key || *ids.revision != *inst.revision {
            ids.key = inst.key.as_str().into();
            ids.revision = inst.revision.as_str().into();
        }
        ids
    }

    fn id_prefix(&self, inst: &Instance) -> String {
        id_prefix(&self.def.def.namespace, &self.def.def.workflow, &inst.key)
    }

    /// A DNS-subdomain name for a new case: workflow, key, step, a hash of
    /// the key and the instance's start, counter.
    fn case_name(&self, inst: &mut Instance) -> String {
        let n = inst.next_seq();
        let key: String = inst
            .key
            .to_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        // The instance's start in the hash: an instance of the same key
        // after its Workflow was deleted and created again (its instances
        // gone, the namespace's cases kept) opens cases of its own instead
        // of meeting the earlier instance's, decided long ago.
        let hash = hex::encode(
            &Sha256::digest(format!("{}/{}", inst.key, inst.started_ms).as_bytes())[..3],
        );
        let name = format!(
            "{}-{}-{}-{hash}{n}",
            self.def.def.workflow,
            key.trim_matches('-'),
            self.step_name(inst)
        );
        let mut name: String = name.chars().take(253).collect();
        while name.ends_with('-') {
            name.pop();
        }
        name
    }

    /// The CEL variables of a step expression, in the evaluator's shared
    /// form: the parsed events, responses and variables are shared with the
    /// cache, not copied.
    fn vars(&self, inst: &Instance) -> Step<Vars> {
        let mut cache = self.cache.borrow_mut();
        let mut events = Vec::with_capacity(inst.events.len());
        for (t, ev) in &inst.events {
            let value = match cache.events.get(t) {
                Some((seen, v)) if seen == ev => v.clone(),
                _ => {
                    let data = json::parse_fast(ev.data.as_bytes()).map_err(|e| EvalError {
                        expression: "event data".into(),
                        message: e.0,
                    })?;
                    let v = event_value(ev, data);
                    cache.events.insert(t.clone(), (ev.clone(), v.clone()));
                    v
                }
            };
            events.push((t.as_str(), value));
        }
        let event = inst
            .woke_by
            .as_ref()
            .and_then(|t| events.iter().find(|(n, _)| n == t))
            .map(|(_, v)| v.clone())
            .unwrap_or(Val::Null);
        let mut steps = Vec::with_capacity(inst.responses.len());
        for (name, response) in &inst.responses {
            let value = cached(
                &mut cache.responses,
                name,
                response,
                (response, json::parse_fast),
                "response",
                |v| Val::map([("response", v)]),
            )?;
            steps.push((name.as_str(), value));
        }
        let mut vars = Vec::with_capacity(inst.vars.len());
        for (name, text) in &inst.vars {
            vars.push((
                name.as_str(),
                cached(
                    &mut cache.vars,
                    name,
                    text,
                    (text, json::parse_stored),
                    "variable",
                    |v| v,
                )?,
            ));
        }
        drop(cache);
        let key = Val::Str(self.ids(inst).key.clone());
        let mut memo = self.memo.borrow_mut();
        Ok(Vars::new()
            .with_fast("key", key)
            .with_fast("event", event)
            .with_fast("events", memo_map(&mut memo.events, events))
            .with_fast("steps", memo_map(&mut memo.steps, steps))
            .with_fast("vars", memo_map(&mut memo.vars, vars))
            .with("now", Value::Timestamp(self.now.fixed_offset())))
    }

    /// The instance key an event belongs to.
    pub fn correlate(def: &Compiled, ev: &Event) -> Result<String, EvalError> {
        Self::correlate_into(def, ev, &mut Values::default())
    }

    /// [`Machine::correlate`], keeping the parsed event in `values` for the
    /// machine that applies it.
    pub fn correlate_into(
        def: &Compiled,
        ev: &Event,
        values: &mut Values,
    ) -> Result<String, EvalError> {
        let data = json::parse_fast(ev.data.as_bytes()).map_err(|e| EvalError {
            expression: def.correlate.source().to_string(),
            message: format!("event data is not JSON: {}", e.0),
        })?;
        let value = event_value(ev, data);
        let vars = Vars::new().with_fast("event", value.clone());
        let key = def.correlate.eval_key(&vars)?;
        values.events.insert(ev.type_.clone(), (ev.clone(), value));
        Ok(key)
    }
}

/// The strings every audit record of a machine's instance repeats (the key
/// is also its `key` variable).
struct AuditIds {
    namespace: Arc<str>,
    workflow: Arc<str>,
    key: Arc<str>,
    revision: Arc<str>,
}

/// The maps the last [`Machine::vars`] bound, reused while they hold the
/// same entries: a step changes one of them at most, and building a map
/// costs its keys and its entries.
#[derive(Default)]
struct VarsMemo {
    events: Option<Val>,
    steps: Option<Val>,
    vars: Option<Val>,
}

/// `entries` (sorted by name, as an instance's maps iterate) as a map:
/// `last` itself when every entry is the same value as there.
fn memo_map(last: &mut Option<Val>, entries: Vec<(&str, Val)>) -> Val {
    if let Some(Val::Map(map)) = last
        && map.len() == entries.len()
        && map
            .iter()
            .zip(&entries)
            .all(|((k, v), (name, value))| **k == **name && v.is_same(value))
    {
        return Val::Map(map.clone());
    }
    let map = Val::map(entries);
    *last = Some(map.clone());
    map
}

fn event_value(ev: &Event, data: Val) -> Val {
    Val::map([
        ("id", Val::str(&ev.id)),
        ("type", Val::str(&ev.type_)),
        ("source", Val::str(&ev.source)),
        ("time", Val::str(&ev.time)),
        ("data", data),
    ])
}

/// `{status, headers, body}` in the shared form; a body that is not JSON
/// stays a string.
/// Whether a body is meant as a JSON object or array.
fn looks_like_json(body: &str) -> bool {
    matches!(body.trim_start().as_bytes().first(), Some(b'{' | b'['))
}

fn response_val(result: &CallResult) -> Val {
    let CallResult::Response {
        status,
        headers,
        body,
        ..
    } = result
    else {
        return Val::Null;
    };
    let body = if body.trim().is_empty() {
        Val::Null
    } else {
        json::parse_fast(body.as_bytes()).unwrap_or_else(|_| Val::str(body))
    };
    Val::map([
        ("status", Val::Int(*status as i64)),
        (
            "headers",
            Val::map(headers.iter().map(|(k, v)| (k.as_str(), Val::str(v)))),
        ),
        ("body", body),
    ])
}

fn to_json(program: &Program, v: &Evaluated) -> Step<String> {
    v.to_json().map_err(|e| EvalError {
        expression: program.source().to_string(),
        message: e.0,
    })
}

/// A variable's stored text ([`Val::to_stored_json`]), and the value in the
/// shared form when it has one.
fn stored_json(program: &Program, v: Evaluated) -> Step<(String, Option<Val>)> {
    let shared = match v {
        Evaluated::Fast(v) => Ok(v),
        Evaluated::Cel(cel) => Val::from_value(&cel).ok_or(cel),
    };
    let text = match &shared {
        Ok(v) => v.to_stored_json(),
        Err(cel) => json::to_string(cel),
    };
    let text = text.map_err(|e| EvalError {
        expression: program.source().to_string(),
        message: e.0,
    })?;
    Ok((text, shared.ok()))
}

/// A fact for the case record: decimals as strings (nothing downstream
/// reads them as floats), everything else as JSON.
fn fact_json(v: &Value) -> serde_json::Value {
    if let Some(d) = finance::as_decimal(v) {
        return serde_json::Value::String(d.to_string());
    }
    match v {
        Value::List(items) => serde_json::Value::Array(items.iter().map(fact_json).collect()),
        Value::Map(m) => serde_json::Value::Object(
            m.map
                .iter()
                .map(|(k, v)| {
                    let k = match k {
                        Key::String(s) => s.to_string(),
                        Key::Int(i) => i.to_string(),
                        Key::Uint(u) => u.to_string(),
                        Key::Bool(b) => b.to_string(),
                    };
                    (k, fact_json(v))
                })
                .collect(),
        ),
        other => json::to_string(other)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null),
    }
}

#[cfg(test)]
mod tests;
