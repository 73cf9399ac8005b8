//! Generated files in the repository are current: `crds/` and the CRD
//! reference. Regenerate with
//! `cargo run -p tallyman -- crdgen --dir crds --dir charts/tallyman/crds` and
//! `cargo run -p tallyman -- crdgen --reference > docs/reference/crds.md`.

use std::path::Path;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[test]
fn crds_directory_is_current() {
    let dir = repo().join("crds");
    let files = tallyman_core::crdgen::files().unwrap();
    for (name, content) in &files {
        let on_disk = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(
            on_disk == *content,
            "crds/{name} is stale; run `cargo run -p tallyman -- crdgen --dir crds --dir charts/tallyman/crds`"
        );
    }
    let count = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(
        count,
        files.len(),
        "crds/ holds files that crdgen does not write"
    );
}

#[test]
fn crd_reference_is_current() {
    let want = tallyman_core::reference::markdown(&tallyman_api::all_crds());
    let on_disk =
        std::fs::read_to_string(repo().join("docs/reference/crds.md")).unwrap_or_default();
    assert!(
        on_disk == want,
        "docs/reference/crds.md is stale; run `cargo run -p tallyman -- crdgen --reference > docs/reference/crds.md`"
    );
}

#[test]
fn every_crd_rule_compiles_as_the_api_server_would_compile_it() {
    for crd in tallyman_api::all_crds() {
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .unwrap(),
        )
        .unwrap();
        let compiled = kube_cel::compile_schema(&schema);
        let errors: Vec<String> = compiled
            .compilation_errors()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", crd.spec.names.kind);
    }
}

/// kube-cel's static analysis of every rule at its own schema node: no
/// variable outside the CRD scope, no cost estimate above the API server's
/// per-rule budget. (A coarse model of the API server's estimator, the best
/// available without a cluster.)
#[test]
fn every_crd_rule_stays_in_scope_and_within_the_cost_budget() {
    fn walk(node: &serde_json::Value, path: &str, findings: &mut Vec<String>, rules: &mut usize) {
        if let Some(list) = node
            .get("x-kubernetes-validations")
            .and_then(|v| v.as_array())
        {
            let compiled = kube_cel::compile_schema(node);
            for rule in list.iter().filter_map(|r| r.get("rule")?.as_str()) {
                *rules += 1;
                for w in
                    kube_cel::analyze_rule(rule, &compiled, kube_cel::ScopeContext::CrdValidation)
                {
                    if !matches!(w.kind, kube_cel::WarningKind::MissingBounds) {
                        findings.push(format!("{path}: {}: {}", rule, w.message));
                    }
                }
            }
        }
        if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
            for (k, v) in props {
                walk(v, &format!("{path}.{k}"), findings, rules);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child) = node.get(key).filter(|c| c.is_object()) {
                walk(child, &format!("{path}[]"), findings, rules);
            }
        }
    }
    let mut findings = Vec::new();
    let mut rules = 0;
    for crd in tallyman_api::all_crds() {
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .unwrap(),
        )
        .unwrap();
        walk(&schema, &crd.spec.names.kind, &mut findings, &mut rules);
    }
    assert!(rules >= 20, "only {rules} rules found; the walk is broken");
    assert!(findings.is_empty(), "\n{}", findings.join("\n"));
}
