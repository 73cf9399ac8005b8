//! Checks across the set: every CEL expression compiles in its scope, every
//! reference resolves within the namespace, and what runs together fits.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::OnceLock;

use regex::Regex;
use tallyman_api::v1alpha1::{
    Action, ApprovalPolicy, ApprovalStep, CallStep, Connector, HttpMethod, Outcome, Route,
    SecretKeyRef, SignatureScheme, Step, Workflow,
};

use super::document::{Object, Resource, external_secrets};
use super::{Diagnostic, Severity};
use crate::cel::{self, Scope};

/// Objects of one namespace, by name.
#[derive(Default)]
struct Namespace<'a> {
    connectors: BTreeMap<&'a str, (&'a Resource, &'a Connector)>,
    /// Policies with the facts their rules read.
    policies: BTreeMap<&'a str, BTreeSet<String>>,
    secrets: BTreeMap<&'a str, &'a BTreeSet<String>>,
}

/// `(kind, namespace, name)` of every document, valid or not.
pub type Declared = HashSet<(String, String, String)>;

pub fn check_set(resources: &[Resource], declared: &Declared, out: &mut Vec<Diagnostic>) {
    let mut namespaces: HashMap<&str, Namespace> = HashMap::new();
    let mut seen: HashMap<(&str, &str, &str), &Resource> = HashMap::new();
    for r in resources {
        if let Some(first) = seen.insert((r.object.kind(), &r.namespace, &r.name), r) {
            out.push(r.diagnostic(
                Severity::Error,
                "metadata.name",
                format!(
                    "{} {}/{} is defined twice; also in {} document {}",
                    r.object.kind(),
                    r.namespace,
                    r.name,
                    first.origin.file.display(),
                    first.origin.index
                ),
            ));
        }
        let ns = namespaces.entry(&r.namespace).or_default();
        match &r.object {
            Object::Connector(c) => {
                ns.connectors.insert(&r.name, (r, c));
            }
            Object::ApprovalPolicy(p) => {
                ns.policies.insert(&r.name, facts_read(p));
            }
            Object::Secret { keys } => {
                ns.secrets.insert(&r.name, keys);
            }
            _ => {}
        }
    }
    let empty = Namespace::default();
    let mut webhook_paths: HashMap<(&str, &str), &str> = HashMap::new();
    for r in resources {
        let ns = namespaces.get(r.namespace.as_str()).unwrap_or(&empty);
        let mut cx = Cx {
            r,
            declared,
            out: &mut *out,
        };
        match &r.object {
            Object::Connector(c) => {
                check_connector(&mut cx, c, ns);
                if let Some(hook) = &c.spec.webhook
                    && let Some(other) = webhook_paths.insert((&r.namespace, &hook.path), &r.name)
                {
                    cx.error(
                        "spec.webhook.path",
                        format!(
                            "webhook path {:?} is already used by Connector {other:?} in namespace {:?}; paths must be unique per namespace",
                            hook.path, r.namespace
                        ),
                    );
                }
            }
            Object::Workflow(w) => check_workflow(&mut cx, w, ns),
            Object::ApprovalPolicy(p) => check_policy(&mut cx, p),
            Object::ExceptionCase(_) | Object::Secret { .. } => {}
        }
    }
}

/// The resource being checked and where its findings go.
struct Cx<'a, 'o> {
    r: &'a Resource,
    declared: &'a Declared,
    out: &'o mut Vec<Diagnostic>,
}

impl Cx<'_, '_> {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.out
            .push(self.r.diagnostic(Severity::Error, path, message));
    }

    fn warning(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.out
            .push(self.r.diagnostic(Severity::Warning, path, message));
    }

    /// Whether `kind/name` is declared in this namespace (maybe invalid, and
    /// then reported on its own).
    fn is_declared(&self, kind: &str, name: &str) -> bool {
        self.declared
            .contains(&(kind.to_string(), self.r.namespace.clone(), name.to_string()))
    }

    fn expr(&mut self, path: &str, source: &str, scope: Scope) -> Option<cel::References> {
        match cel::compile(source, scope) {
            Ok((_, refs)) => {
                // Money is never a float: a double literal is binary floating
                // point, so sums and comparisons with it are not exact.
                if let Some(d) = refs.doubles.first() {
                    self.warning(
                        path,
                        format!(
                            "{d} is a CEL double (binary floating point): amounts computed or compared with it are not exact; write decimal('{d}')"
                        ),
                    );
                }
                Some(refs)
            }
            Err(e) => {
                self.error(path, e.0);
                None
            }
        }
    }
}

fn accepted<'k>(names: impl IntoIterator<Item = &'k str>) -> String {
    accepted_or(names, "none are defined")
}

fn accepted_or<'k>(names: impl IntoIterator<Item = &'k str>, none: &str) -> String {
    let names: Vec<&str> = names.into_iter().collect();
    if names.is_empty() {
        none.to_string()
    } else {
        format!("accepted: {}", names.join(", "))
    }
}

fn check_connector(cx: &mut Cx, c: &Connector, ns: &Namespace) {
    let external = external_secrets(cx.r_annotations(c));
    let mut refs: Vec<(String, &SecretKeyRef)> = Vec::new();
    if let Some(rest) = &c.spec.rest {
        if let Some(auth) = &rest.auth {
            if let Some(b) = &auth.bearer {
                refs.push(("spec.rest.auth.bearer.secretRef".into(), &b.secret_ref));
            }
            if let Some(b) = &auth.basic {
                refs.push(("spec.rest.auth.basic.username".into(), &b.username));
                refs.push(("spec.rest.auth.basic.password".into(), &b.password));
            }
            if let Some(k) = &auth.api_key {
                refs.push(("spec.rest.auth.apiKey.secretRef".into(), &k.secret_ref));
            }
            if let Some(o) = &auth.oauth2_client_credentials {
                refs.push((
                    "spec.rest.auth.oauth2ClientCredentials.clientId".into(),
                    &o.client_id,
                ));
                refs.push((
                    "spec.rest.auth.oauth2ClientCredentials.clientSecret".into(),
                    &o.client_secret,
                ));
            }
        }
        if let Some(tls) = &rest.tls {
            refs.push(("spec.rest.tls.caSecretRef".into(), &tls.ca_secret_ref));
        }
        if rest.retry.initial_backoff.as_std() > rest.retry.max_backoff.as_std() {
            cx.error(
                "spec.rest.retry.initialBackoff",
                format!(
                    "initialBackoff {} is longer than maxBackoff {}; it must not be",
                    rest.retry.initial_backoff, rest.retry.max_backoff
                ),
            );
        }
        for (name, action) in &rest.actions {
            if let Err(e) = placeholders(&action.path) {
                cx.error(format!("spec.rest.actions[{name}].path"), e);
            }
        }
    }
    if let Some(hook) = &c.spec.webhook {
        if hook.signature.scheme == SignatureScheme::None {
            cx.warning(
                "spec.webhook.signature.scheme",
                "scheme none accepts unsigned requests from anyone who can reach the gateway; use hmac-sha256, hmac-sha256-timestamped or token",
            );
        }
        if let Some(secret) = &hook.signature.secret_ref {
            refs.push(("spec.webhook.signature.secretRef".into(), secret));
        }
        for (i, event) in hook.events.iter().enumerate() {
            let base = format!("spec.webhook.events[{i}]");
            for (field, source) in [
                ("when", &event.when),
                ("id", &event.id),
                ("data", &event.data),
            ] {
                if let Some(source) = source {
                    cx.expr(&format!("{base}.{field}"), source, Scope::Webhook);
                }
            }
        }
    }
    for (path, secret) in refs {
        if external
            .as_ref()
            .is_none_or(|names| names.contains(&secret.name))
        {
            continue;
        }
        match ns.secrets.get(secret.name.as_str()) {
            Some(keys) if keys.contains(&secret.key) => {}
            Some(keys) => cx.error(
                format!("{path}.key"),
                format!(
                    "Secret {:?} has no key {:?}; {}",
                    secret.name,
                    secret.key,
                    accepted(keys.iter().map(String::as_str))
                ),
            ),
            None if cx.is_declared("Secret", &secret.name) => {}
            None => cx.error(
                format!("{path}.name"),
                format!(
                    "Secret {:?} is not among the manifests of namespace {:?}; add it, or mark it as managed elsewhere with the annotation {}: \"{}\"",
                    secret.name,
                    cx.r.namespace,
                    super::EXTERNAL_SECRETS_ANNOTATION,
                    secret.name
                ),
            ),
        }
    }
}

impl Cx<'_, '_> {
    fn r_annotations<'c>(&self, c: &'c Connector) -> &'c BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        c.metadata.annotations.as_ref().unwrap_or(&EMPTY)
    }
}

/// The `{name}` placeholders of an action path.
pub fn placeholders(path: &str) -> Result<BTreeSet<String>, String> {
    static NAME: OnceLock<Regex> = OnceLock::new();
    let name_re = NAME.get_or_init(|| Regex::new("^[A-Za-z_][A-Za-z0-9_]*$").expect("valid regex"));
    let mut names = BTreeSet::new();
    let mut rest = path;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(format!("unbalanced '}}' in path {path:?}"));
        }
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(format!("unclosed '{{' in path {path:?}"));
        };
        let name = &after[..close];
        if !name_re.is_match(name) {
            return Err(format!(
                "placeholder {{{name}}} in path {path:?} is not a name; use letters, digits and _"
            ));
        }
        names.insert(name.to_string());
        rest = &after[close + 1..];
    }
    Ok(names)
}

/// What a step's expressions may refer to.
struct StepEnv<'w> {
    trigger_events: &'w [String],
    /// Call steps, by name, with their position.
    calls: BTreeMap<&'w str, usize>,
    step_names: Vec<&'w str>,
    /// Variables, by name, with the position of the first step that sets them.
    vars: BTreeMap<&'w str, usize>,
    /// Variables some step sets from the clock (`now`, or another such
    /// variable): computed again when a step is repeated after a crash.
    clocked: BTreeSet<&'w str>,
}

fn check_workflow(cx: &mut Cx, w: &Workflow, ns: &Namespace) {
    let spec = &w.spec;
    cx.expr(
        "spec.trigger.correlate",
        &spec.trigger.correlate,
        Scope::Correlate,
    );
    let mut seen = BTreeSet::new();
    for (i, event) in spec.trigger.events.iter().enumerate() {
        if !seen.insert(event) {
            cx.error(
                format!("spec.trigger.events[{i}]"),
                format!("event type {event:?} is listed twice"),
            );
        }
    }
    let mut env = StepEnv {
        trigger_events: &spec.trigger.events,
        calls: spec
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.call.is_some())
            .map(|(i, s)| (s.name.as_str(), i))
            .collect(),
        step_names: spec.steps.iter().map(|s| s.name.as_str()).collect(),
        vars: spec
            .steps
            .iter()
            .enumerate()
            .rev()
            .filter_map(|(i, s)| s.set.as_ref().map(|set| (i, set)))
            .flat_map(|(i, set)| set.keys().map(move |k| (k.as_str(), i)))
            .collect(),
        clocked: BTreeSet::new(),
    };
    for set in spec.steps.iter().filter_map(|s| s.set.as_ref()) {
        for (name, source) in set {
            if let Ok((_, refs)) = cel::compile(source, Scope::Step)
                && clock_read(&env, &refs).is_some()
            {
                env.clocked.insert(name.as_str());
            }
        }
    }
    for (i, step) in spec.steps.iter().enumerate() {
        check_step(cx, &env, ns, step, i, &format!("spec.steps[{i}]"));
    }
}

fn check_step(cx: &mut Cx, env: &StepEnv, ns: &Namespace, step: &Step, i: usize, base: &str) {
    if let Some(when) = &step.when {
        step_expr(cx, env, &format!("{base}.when"), when, i, Scope::Step);
    }
    if let Some(aw) = &step.await_ {
        for (j, event) in aw.events.iter().enumerate() {
            if !env.trigger_events.contains(event) {
                cx.error(
                    format!("{base}.await.events[{j}]"),
                    format!(
                        "event type {event:?} is not among trigger.events, so it never reaches this workflow; {}",
                        accepted(env.trigger_events.iter().map(String::as_str))
                    ),
                );
            }
        }
        if aw.on_timeout.is_some() && aw.timeout.is_none() {
            cx.warning(
                format!("{base}.await.onTimeout"),
                "onTimeout has no effect without a timeout",
            );
        }
        if let Some(route) = &aw.on_timeout {
            check_route(cx, env, ns, route, i, &format!("{base}.await.onTimeout"));
        }
    }
    if let Some(call) = &step.call {
        let path = format!("{base}.call");
        match ns.connectors.get(call.connector.as_str()) {
            None if cx.is_declared("Connector", &call.connector) => {}
            None => cx.error(
                format!("{path}.connector"),
                format!(
                    "no Connector {:?} in namespace {:?}; {}",
                    call.connector,
                    cx.r.namespace,
                    accepted(ns.connectors.keys().copied())
                ),
            ),
            Some((_, conn)) => match &conn.spec.rest {
                None => cx.error(
                    format!("{path}.connector"),
                    format!(
                        "Connector {:?} has no rest section, so it has no actions to call",
                        call.connector
                    ),
                ),
                Some(rest) => {
                    let action = check_action_ref(
                        cx,
                        rest,
                        &call.connector,
                        &call.action,
                        &call.params,
                        &path,
                        i,
                        env,
                    );
                    if let Some(lookup) = &call.lookup {
                        check_action_ref(
                            cx,
                            rest,
                            &call.connector,
                            &lookup.action,
                            &lookup.params,
                            &format!("{path}.lookup"),
                            i,
                            env,
                        );
                        step_expr(
                            cx,
                            env,
                            &format!("{path}.lookup.found"),
                            &lookup.found,
                            i,
                            Scope::Lookup,
                        );
                    }
                    if let Some(action) = action
                        && action.method != HttpMethod::Get
                        && action.idempotency.is_none()
                        && call.lookup.is_none()
                    {
                        cx.warning(
                            format!("{path}.action"),
                            format!(
                                "action {:?} changes state but has no idempotency header and this call has no lookup; a retry after a crash could repeat its effect",
                                call.action
                            ),
                        );
                    }
                    let keyed = action.is_some_and(|a| a.idempotency.is_some());
                    check_call_clock(cx, env, call, keyed, &path);
                }
            },
        }
        if let Some(body) = &call.body {
            step_expr(cx, env, &format!("{path}.body"), body, i, Scope::Step);
        }
        if let Some(key) = &call.idempotency_key {
            step_expr(
                cx,
                env,
                &format!("{path}.idempotencyKey"),
                key,
                i,
                Scope::Step,
            );
        }
        if let Some(route) = &call.on_failure {
            check_route(cx, env, ns, route, i + 1, &format!("{path}.onFailure"));
        }
    }
    if let Some(check) = &step.check {
        step_expr(cx, env, &format!("{base}.check"), check, i, Scope::Step);
        if let Some(route) = &step.on_false {
            check_route(cx, env, ns, route, i, &format!("{base}.onFalse"));
        }
    }
    if let Some(approval) = &step.approval {
        check_approval(cx, env, ns, approval, i, &format!("{base}.approval"));
    }
    if let Some(emit) = &step.emit
        && let Some(data) = &emit.data
    {
        step_expr(cx, env, &format!("{base}.emit.data"), data, i, Scope::Step);
    }
    if let Some(set) = &step.set {
        static IDENT: OnceLock<Regex> = OnceLock::new();
        let ident =
            IDENT.get_or_init(|| Regex::new("^[A-Za-z_][A-Za-z0-9_]*$").expect("valid regex"));
        if set.is_empty() {
            cx.error(
                format!("{base}.set"),
                "sets nothing; give at least one variable",
            );
        }
        for (name, source) in set {
            if !ident.is_match(name) {
                cx.error(
                    format!("{base}.set[{name}]"),
                    format!("variable name {name:?} is not an identifier; use letters, digits and _ so that vars.{name} can be read"),
                );
            }
            step_expr(
                cx,
                env,
                &format!("{base}.set[{name}]"),
                source,
                i,
                Scope::Step,
            );
        }
    }
    if let Some(wait) = &step.wait
        && let Some(until) = &wait.until
    {
        step_expr(
            cx,
            env,
            &format!("{base}.wait.until"),
            until,
            i,
            Scope::Step,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn check_action_ref<'r>(
    cx: &mut Cx,
    rest: &'r tallyman_api::v1alpha1::RestSpec,
    connector: &str,
    action: &str,
    params: &BTreeMap<String, String>,
    path: &str,
    i: usize,
    env: &StepEnv,
) -> Option<&'r Action> {
    let Some(found) = rest.actions.get(action) else {
        cx.error(
            format!("{path}.action"),
            format!(
                "Connector {connector:?} has no action {action:?}; {}",
                accepted(rest.actions.keys().map(String::as_str))
            ),
        );
        return None;
    };
    let wanted = placeholders(&found.path).unwrap_or_default();
    for name in &wanted {
        if !params.contains_key(name) {
            cx.error(
                format!("{path}.params"),
                format!(
                    "action {action:?} (path {:?}) needs a value for {{{name}}}; add params.{name}",
                    found.path
                ),
            );
        }
    }
    for (name, source) in params {
        if !wanted.contains(name) {
            cx.error(
                format!("{path}.params[{name}]"),
                format!(
                    "action {action:?} (path {:?}) has no placeholder {{{name}}}; {}",
                    found.path,
                    accepted(wanted.iter().map(String::as_str))
                ),
            );
        }
        step_expr(
            cx,
            env,
            &format!("{path}.params[{name}]"),
            source,
            i,
            Scope::Step,
        );
    }
    Some(found)
}

fn check_approval(
    cx: &mut Cx,
    env: &StepEnv,
    ns: &Namespace,
    a: &ApprovalStep,
    i: usize,
    path: &str,
) {
    match ns.policies.get(a.policy.as_str()) {
        Some(read) => {
            for fact in read.iter().filter(|f| !a.facts.contains_key(*f)) {
                cx.error(
                    format!("{path}.facts"),
                    format!(
                        "ApprovalPolicy {:?} reads facts.{fact}, which this approval does not provide; {}",
                        a.policy,
                        accepted(a.facts.keys().map(String::as_str))
                    ),
                );
            }
        }
        None if cx.is_declared("ApprovalPolicy", &a.policy) => {}
        None => cx.error(
            format!("{path}.policy"),
            format!(
                "no ApprovalPolicy {:?} in namespace {:?}; {}",
                a.policy,
                cx.r.namespace,
                accepted(ns.policies.keys().copied())
            ),
        ),
    }
    if let Some(initiator) = &a.initiator {
        step_expr(
            cx,
            env,
            &format!("{path}.initiator"),
            initiator,
            i,
            Scope::Step,
        );
    }
    for (name, source) in &a.facts {
        step_expr(
            cx,
            env,
            &format!("{path}.facts[{name}]"),
            source,
            i,
            Scope::Step,
        );
    }
    if let Some(outcome) = &a.on_rejected {
        check_outcome(cx, env, outcome, i, &format!("{path}.onRejected"));
    }
}

fn check_route(cx: &mut Cx, env: &StepEnv, ns: &Namespace, route: &Route, i: usize, path: &str) {
    if let Some(approval) = &route.approval {
        check_approval(cx, env, ns, approval, i, &format!("{path}.approval"));
    }
    check_outcome(
        cx,
        env,
        &Outcome {
            emit: route.emit.clone(),
            go_to: route.go_to.clone(),
            end: route.end,
        },
        i,
        path,
    );
}

fn check_outcome(cx: &mut Cx, env: &StepEnv, outcome: &Outcome, i: usize, path: &str) {
    if let Some(emit) = &outcome.emit
        && let Some(data) = &emit.data
    {
        step_expr(cx, env, &format!("{path}.emit.data"), data, i, Scope::Step);
    }
    if let Some(target) = &outcome.go_to
        && !env.step_names.contains(&target.as_str())
    {
        cx.error(
            format!("{path}.goTo"),
            format!(
                "no step named {target:?}; {}",
                accepted(env.step_names.iter().copied())
            ),
        );
    }
}

/// Compile a step expression and check what it refers to: `steps.<name>`
/// must be a call step that ran before step `i`, `events['<type>']` a
/// trigger event, `vars.<name>` a variable some `set` step sets.
fn step_expr(cx: &mut Cx, env: &StepEnv, path: &str, source: &str, i: usize, scope: Scope) {
    let Some(refs) = cx.expr(path, source, scope) else {
        return;
    };
    for name in &refs.steps {
        if env.calls.get(name.as_str()).is_none_or(|&at| at >= i) {
            let before: Vec<&str> = env
                .calls
                .iter()
                .filter(|(_, at)| **at < i)
                .map(|(n, _)| *n)
                .collect();
            cx.error(
                path,
                format!(
                    "steps.{name} is not a call step that runs before this one, so it has no response here; {}",
                    accepted_or(before, "no call step runs before this one")
                ),
            );
        }
    }
    for event in &refs.events {
        if !env.trigger_events.contains(event) {
            cx.error(
                path,
                format!(
                    "events[{event:?}] is not among trigger.events; {}",
                    accepted(env.trigger_events.iter().map(String::as_str))
                ),
            );
        }
    }
    for var in &refs.vars {
        if env.vars.get(var.as_str()).is_none_or(|&at| at >= i) {
            let before: Vec<&str> = env
                .vars
                .iter()
                .filter(|(_, at)| **at < i)
                .map(|(n, _)| *n)
                .collect();
            cx.error(
                path,
                format!(
                    "vars.{var} is not set by a step before this one; {}",
                    accepted_or(before, "no step before this one sets a variable")
                ),
            );
        }
    }
}

/// How an expression reads the clock.
enum Clock {
    /// `now` itself: different every time the expression is computed.
    Now,
    /// A variable a `set` step computes from the clock: the same on a
    /// repeat only when the instance was stored between that step and
    /// this one (it stopped at an await, a wait or an approval).
    Var(String),
}

impl Clock {
    /// `reads …so …`: what is read, and when it is stable after all.
    fn reads(&self) -> String {
        match self {
            Clock::Now => "reads now so ".into(),
            Clock::Var(v) => format!(
                "reads vars.{v}, which a step sets from now, so unless the instance is stored between that step and this call (it stops at an await, a wait or an approval in between), "
            ),
        }
    }
}

/// Whether an expression reads the clock, and how.
fn clock_read(env: &StepEnv, refs: &cel::References) -> Option<Clock> {
    if refs.variables.contains("now") {
        return Some(Clock::Now);
    }
    refs.vars
        .iter()
        .find(|v| env.clocked.contains(v.as_str()))
        .map(|v| Clock::Var(v.clone()))
}

/// A call repeated after a crash (its outcome was not stored yet) is
/// computed again, and `now` has moved on. A key, or a lookup's params,
/// that read it make the repeat a new request whose effect happens twice:
/// an error when it is `now` itself, a warning through a variable (stored
/// already, it is stable). A keyed request that reads it differs from the
/// first under the same key: a warning.
fn check_call_clock(cx: &mut Cx, env: &StepEnv, call: &CallStep, keyed: bool, path: &str) {
    let read = |source: &str| {
        cel::compile(source, Scope::Step)
            .ok()
            .and_then(|(_, refs)| clock_read(env, &refs))
    };
    let finding = |cx: &mut Cx, at: String, clock: Clock, harm: &str| match clock {
        Clock::Now => cx.error(
            at,
            format!(
                "reads now, which is different when the call is repeated after a crash: {harm}"
            ),
        ),
        Clock::Var(_) => cx.warning(at, format!("{}{harm}", clock.reads())),
    };
    if let Some(key) = &call.idempotency_key
        && let Some(clock) = read(key)
    {
        finding(
            cx,
            format!("{path}.idempotencyKey"),
            clock,
            "a repeat would be a new request under a new key, and its effect (an invoice, a payment) would happen twice; build the key from key and the events' ids",
        );
    }
    if let Some(lookup) = &call.lookup {
        for (name, source) in &lookup.params {
            if let Some(clock) = read(source) {
                finding(
                    cx,
                    format!("{path}.lookup.params[{name}]"),
                    clock,
                    "the lookup of a repeat would not find what the first request made, and its effect would happen twice",
                );
            }
        }
    }
    if !keyed {
        return;
    }
    let params = call
        .params
        .iter()
        .map(|(name, source)| (format!("{path}.params[{name}]"), source));
    for (at, source) in params.chain(call.body.iter().map(|b| (format!("{path}.body"), b))) {
        if let Some(clock) = read(source) {
            cx.warning(
                at,
                format!(
                    "{}a repeat of this call after a crash sends a different request under the same idempotency key, which a system that checks the payload refuses (the IETF idempotency-key draft has it answer 422); take the time from an event, events['<type>'].time",
                    clock.reads()
                ),
            );
        }
    }
}

/// The facts a policy's rules read (rules that do not compile are reported
/// on the policy itself).
fn facts_read(p: &ApprovalPolicy) -> BTreeSet<String> {
    p.spec
        .rules
        .iter()
        .filter_map(|r| cel::compile(&r.when, Scope::Policy).ok())
        .flat_map(|(_, refs)| refs.facts)
        .collect()
}

fn check_policy(cx: &mut Cx, p: &ApprovalPolicy) {
    let mut catch_all: Option<&str> = None;
    for (i, rule) in p.spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        cx.expr(&format!("{path}.when"), &rule.when, Scope::Policy);
        if let Some(earlier) = catch_all {
            cx.warning(
                format!("{path}.name"),
                format!(
                    "rule {:?} is never reached: rule {earlier:?} before it always matches",
                    rule.name
                ),
            );
        } else if rule.when.trim() == "true" {
            catch_all = Some(&rule.name);
        }
    }
}
