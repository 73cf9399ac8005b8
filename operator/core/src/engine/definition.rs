//! A Workflow resolved with the Connectors and ApprovalPolicies it uses, its
//! revision (a content hash), and its compiled form: every expression parsed,
//! checked and rewritten once per revision, never per event.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tallyman_api::v1alpha1::{
    ApprovalPolicy, ApprovalPolicySpec, ApprovalStep, Connector, ConnectorSpec, EmitStep, EndState,
    Outcome, Route, Workflow, WorkflowSpec,
};

use crate::cel::{Program, Scope};
use crate::policy::CompiledPolicy;

/// What a worker runs: the Workflow and the parts of the Connectors and
/// Policies it uses. Secrets stay references.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Definition {
    pub namespace: String,
    pub workflow: String,
    pub spec: WorkflowSpec,
    pub connectors: BTreeMap<String, ConnectorSpec>,
    pub policies: BTreeMap<String, ApprovalPolicySpec>,
}

impl Definition {
    /// Resolve `workflow` against the objects of its namespace.
    pub fn resolve(
        workflow: &Workflow,
        connectors: &[Connector],
        policies: &[ApprovalPolicy],
    ) -> Result<Self, String> {
        let namespace = workflow
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = workflow.metadata.name.clone().unwrap_or_default();
        let in_ns = |ns: &Option<String>| ns.as_deref().unwrap_or("default") == namespace;
        let mut def = Definition {
            namespace: namespace.clone(),
            workflow: name,
            spec: workflow.spec.clone(),
            connectors: BTreeMap::new(),
            policies: BTreeMap::new(),
        };
        let want_policy = |p: &str, def: &mut Definition| -> Result<(), String> {
            let found = policies
                .iter()
                .find(|x| in_ns(&x.metadata.namespace) && x.metadata.name.as_deref() == Some(p))
                .ok_or_else(|| format!("ApprovalPolicy {namespace}/{p} not found"))?;
            def.policies.insert(p.to_string(), found.spec.clone());
            Ok(())
        };
        let steps = workflow.spec.steps.clone();
        for step in &steps {
            if let Some(call) = &step.call {
                let found = connectors
                    .iter()
                    .find(|c| {
                        in_ns(&c.metadata.namespace)
                            && c.metadata.name.as_deref() == Some(&call.connector)
                    })
                    .ok_or_else(|| {
                        format!("Connector {}/{} not found", def.namespace, call.connector)
                    })?;
                def.connectors
                    .insert(call.connector.clone(), found.spec.clone());
            }
            for approval in approvals_of(step) {
                want_policy(&approval.policy, &mut def)?;
            }
        }
        Ok(def)
    }

    /// The content hash new instances are pinned to: the first 10 hex digits
    /// of the SHA-256 of the definition's JSON (sorted keys).
    pub fn revision(&self) -> String {
        let value = serde_json::to_value(self).expect("a definition serializes");
        let text = serde_json::to_string(&value).expect("a definition serializes");
        let digest = Sha256::digest(text.as_bytes());
        hex::encode(&digest[..5])
    }
}

fn approvals_of(step: &tallyman_api::v1alpha1::Step) -> Vec<&ApprovalStep> {
    let mut out = Vec::new();
    out.extend(step.approval.as_ref());
    out.extend(step.on_false.as_ref().and_then(|r| r.approval.as_ref()));
    out.extend(
        step.await_
            .as_ref()
            .and_then(|a| a.on_timeout.as_ref())
            .and_then(|r| r.approval.as_ref()),
    );
    out.extend(
        step.call
            .as_ref()
            .and_then(|c| c.on_failure.as_ref())
            .and_then(|r| r.approval.as_ref()),
    );
    out
}

/// A definition ready to run.
#[derive(Debug)]
pub struct Compiled {
    pub def: Arc<Definition>,
    pub revision: String,
    pub correlate: Program,
    pub steps: Vec<CStep>,
    pub policies: BTreeMap<String, CompiledPolicy>,
    pub sla: Option<std::time::Duration>,
    pub sla_exception: bool,
}

#[derive(Debug)]
pub struct CStep {
    pub name: String,
    pub when: Option<Program>,
    pub kind: CKind,
}

#[derive(Debug)]
pub enum CKind {
    Await {
        events: Vec<String>,
        timeout: Option<std::time::Duration>,
        on_timeout: Option<CRoute>,
    },
    Call(Box<CCall>),
    Check {
        cond: Program,
        on_false: Option<CRoute>,
    },
    Approval(CApproval),
    Emit(CEmit),
    Set(Vec<(String, Program)>),
    Wait {
        for_: Option<std::time::Duration>,
        until: Option<Program>,
    },
}

#[derive(Debug)]
pub struct CCall {
    pub connector: String,
    pub action: String,
    pub params: Vec<(String, Program)>,
    pub body: Option<Program>,
    pub idempotency_key: Option<Program>,
    pub lookup: Option<CLookup>,
    pub on_failure: Option<CRoute>,
}

#[derive(Debug)]
pub struct CLookup {
    pub action: String,
    pub params: Vec<(String, Program)>,
    pub found: Program,
}

#[derive(Debug)]
pub struct CApproval {
    pub policy: String,
    pub reason: String,
    pub initiator: Option<Program>,
    pub facts: Vec<(String, Program)>,
    pub on_rejected: COutcome,
}

#[derive(Debug)]
pub struct CRoute {
    pub approval: Option<CApproval>,
    pub emit: Option<CEmit>,
    pub go_to: Option<usize>,
    pub end: Option<EndState>,
}

#[derive(Debug)]
pub struct COutcome {
    pub emit: Option<CEmit>,
    pub go_to: Option<usize>,
    pub end: Option<EndState>,
}

#[derive(Debug)]
pub struct CEmit {
    pub type_: String,
    pub data: Option<Program>,
}

/// Compilation failures, each with its field path.
pub type CompileErrors = Vec<(String, String)>;

struct Compiler<'a> {
    names: Vec<&'a str>,
    errors: CompileErrors,
}

impl Compiler<'_> {
    fn program(&mut self, path: &str, source: &str, scope: Scope) -> Option<Program> {
        match Program::compile(source, scope) {
            Ok(p) => Some(p),
            Err(e) => {
                self.errors.push((path.to_string(), e.0));
                None
            }
        }
    }

    fn programs(
        &mut self,
        path: &str,
        map: &BTreeMap<String, String>,
        scope: Scope,
    ) -> Vec<(String, Program)> {
        map.iter()
            .filter_map(|(k, v)| {
                Some((k.clone(), self.program(&format!("{path}[{k}]"), v, scope)?))
            })
            .collect()
    }

    fn step_index(&mut self, path: &str, name: &Option<String>) -> Option<usize> {
        let name = name.as_ref()?;
        let found = self.names.iter().position(|n| n == name);
        if found.is_none() {
            self.errors
                .push((path.to_string(), format!("no step named {name:?}")));
        }
        found
    }

    fn emit(&mut self, path: &str, e: &Option<EmitStep>) -> Option<CEmit> {
        let e = e.as_ref()?;
        Some(CEmit {
            type_: e.type_.clone(),
            data: e
                .data
                .as_ref()
                .and_then(|d| self.program(&format!("{path}.data"), d, Scope::Step)),
        })
    }

    fn outcome(&mut self, path: &str, o: Option<&Outcome>) -> COutcome {
        match o {
            None => COutcome {
                emit: None,
                go_to: None,
                end: Some(EndState::Rejected),
            },
            Some(o) => COutcome {
                emit: self.emit(&format!("{path}.emit"), &o.emit),
                go_to: self.step_index(&format!("{path}.goTo"), &o.go_to),
                end: o.end.or(if o.go_to.is_none() {
                    Some(EndState::Rejected)
                } else {
                    None
                }),
            },
        }
    }

    fn approval(&mut self, path: &str, a: &ApprovalStep) -> CApproval {
        CApproval {
            policy: a.policy.clone(),
            reason: a.reason.clone(),
            initiator: a
                .initiator
                .as_ref()
                .and_then(|i| self.program(&format!("{path}.initiator"), i, Scope::Step)),
            facts: self.programs(&format!("{path}.facts"), &a.facts, Scope::Step),
            on_rejected: self.outcome(&format!("{path}.onRejected"), a.on_rejected.as_ref()),
        }
    }

    fn route(&mut self, path: &str, r: Option<&Route>) -> Option<CRoute> {
        let r = r?;
        Some(CRoute {
            approval: r
                .approval
                .as_ref()
                .map(|a| self.approval(&format!("{path}.approval"), a)),
            emit: self.emit(&format!("{path}.emit"), &r.emit),
            go_to: self.step_index(&format!("{path}.goTo"), &r.go_to),
            end: r.end,
        })
    }
}

impl Compiled {
    /// Compile a definition; the revision is computed here.
    pub fn new(def: Definition) -> Result<Self, CompileErrors> {
        let mut c = Compiler {
            names: def.spec.steps.iter().map(|s| s.name.as_str()).collect(),
            errors: Vec::new(),
        };
        let correlate = c.program(
            "spec.trigger.correlate",
            &def.spec.trigger.correlate,
            Scope::Correlate,
        );
        let mut steps = Vec::new();
        for (i, s) in def.spec.steps.iter().enumerate() {
            let path = format!("spec.steps[{i}]");
            let when = s
                .when
                .as_ref()
                .and_then(|w| c.program(&format!("{path}.when"), w, Scope::Step));
            let kind = if let Some(a) = &s.await_ {
                CKind::Await {
                    events: a.events.clone(),
                    timeout: a.timeout.as_ref().map(|t| t.as_std()),
                    on_timeout: c.route(&format!("{path}.await.onTimeout"), a.on_timeout.as_ref()),
                }
            } else if let Some(call) = &s.call {
                let p = format!("{path}.call");
                CKind::Call(Box::new(CCall {
                    connector: call.connector.clone(),
                    action: call.action.clone(),
                    params: c.programs(&format!("{p}.params"), &call.params, Scope::Step),
                    body: call
                        .body
                        .as_ref()
                        .and_then(|b| c.program(&format!("{p}.body"), b, Scope::Step)),
                    idempotency_key: call
                        .idempotency_key
                        .as_ref()
                        .and_then(|k| c.program(&format!("{p}.idempotencyKey"), k, Scope::Step)),
                    lookup: call.lookup.as_ref().and_then(|l| {
                        Some(CLookup {
                            action: l.action.clone(),
                            params: c.programs(
                                &format!("{p}.lookup.params"),
                                &l.params,
                                Scope::Step,
                            ),
                            found: c.program(
                                &format!("{p}.lookup.found"),
                                &l.found,
                                Scope::Lookup,
                            )?,
                        })
                    }),
                    on_failure: c.route(&format!("{p}.onFailure"), call.on_failure.as_ref()),
                }))
            } else if let Some(check) = &s.check {
                match c.program(&format!("{path}.check"), check, Scope::Step) {
                    Some(cond) => CKind::Check {
                        cond,
                        on_false: c.route(&format!("{path}.onFalse"), s.on_false.as_ref()),
                    },
                    None => continue,
                }
            } else if let Some(a) = &s.approval {
                CKind::Approval(c.approval(&format!("{path}.approval"), a))
            } else if let Some(e) = &s.emit {
                CKind::Emit(
                    c.emit(&format!("{path}.emit"), &Some(e.clone()))
                        .expect("emit present"),
                )
            } else if let Some(set) = &s.set {
                CKind::Set(c.programs(&format!("{path}.set"), set, Scope::Step))
            } else if let Some(w) = &s.wait {
                CKind::Wait {
                    for_: w.for_.as_ref().map(|d| d.as_std()),
                    until: w
                        .until
                        .as_ref()
                        .and_then(|u| c.program(&format!("{path}.wait.until"), u, Scope::Step)),
                }
            } else {
                c.errors.push((path, "a step needs a kind".into()));
                continue;
            };
            steps.push(CStep {
                name: s.name.clone(),
                when,
                kind,
            });
        }
        let mut policies = BTreeMap::new();
        for (name, spec) in &def.policies {
            match CompiledPolicy::compile(name, spec) {
                Ok(p) => {
                    policies.insert(name.clone(), p);
                }
                Err((path, e)) => c
                    .errors
                    .push((format!("ApprovalPolicy {name}: {path}"), e.0)),
            }
        }
        if !c.errors.is_empty() {
            return Err(c.errors);
        }
        let revision = def.revision();
        Ok(Self {
            revision,
            correlate: correlate.expect("no errors"),
            steps,
            policies,
            sla: def.spec.sla.as_ref().map(|s| s.complete.as_std()),
            sla_exception: def
                .spec
                .sla
                .as_ref()
                .is_some_and(|s| s.on_breach == tallyman_api::v1alpha1::SlaBreach::Exception),
            def: Arc::new(def),
        })
    }
}
