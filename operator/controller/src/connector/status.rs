//! The status a Connector should show. Pure.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use tallyman_api::v1alpha1::{Connector, ConnectorStatus};

use super::gateway::webhook_url;
use super::probe::Probed;
use crate::conditions::{
    self, REACHABLE, READY, REASON_INVALID_SPEC, REASON_PROBE_FAILED, REASON_PROBE_SUCCEEDED,
    REASON_RECONCILED, REASON_SECRETS_MISSING,
};

/// `errors`: this Connector's validation errors (with field paths);
/// `probed`: the probe's result, when it has a REST half and is valid;
/// `missing_secrets`: Secrets the namespace's gateway pods mount that do
/// not exist (no webhook is served until they do).
pub fn status(
    c: &Connector,
    errors: &[String],
    probed: Option<&Probed>,
    missing_secrets: &[String],
    now: &Time,
) -> ConnectorStatus {
    let mut status = c.status.clone().unwrap_or_default();
    let generation = c.metadata.generation;
    let ns = c.namespace().unwrap_or_default();
    let cs = &mut status.conditions;
    if !errors.is_empty() {
        conditions::set(
            cs,
            READY,
            false,
            REASON_INVALID_SPEC,
            errors.join("; "),
            generation,
            now,
        );
    } else if c.spec.webhook.is_some() && !missing_secrets.is_empty() {
        conditions::set(
            cs,
            READY,
            false,
            REASON_SECRETS_MISSING,
            format!(
                "the gateway pods need what is missing from the Secrets of namespace {ns}: {}",
                missing_secrets.join(", ")
            ),
            generation,
            now,
        );
    } else {
        let message = match &c.spec.webhook {
            Some(w) => format!(
                "webhook served at {}",
                webhook_url(&ns, &c.name_any(), &w.path)
            ),
            None => "valid; used by the Workflows that call it".to_string(),
        };
        conditions::set(cs, READY, true, REASON_RECONCILED, message, generation, now);
    }
    match probed {
        Some(p) => {
            let reason = if p.reachable {
                REASON_PROBE_SUCCEEDED
            } else {
                REASON_PROBE_FAILED
            };
            conditions::set(
                cs,
                REACHABLE,
                p.reachable,
                reason,
                p.message.clone(),
                generation,
                now,
            );
        }
        // Nothing probed (no REST half, or invalid): no claim either way.
        None => cs.retain(|c| c.type_ != REACHABLE),
    }
    status.observed_generation = generation;
    status.webhook_url = match (&c.spec.webhook, errors.is_empty()) {
        (Some(w), true) => Some(webhook_url(&ns, &c.name_any(), &w.path)),
        _ => None,
    };
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use k8s_openapi::jiff::Timestamp;

    fn t() -> Time {
        Time(Timestamp::from_second(1).unwrap())
    }

    fn by_name(name: &str) -> Connector {
        fixtures::example("shipment-to-invoice")
            .connectors
            .into_iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .unwrap()
    }

    #[test]
    fn a_webhook_connector_names_its_url() {
        let c = by_name("wms");
        let s = status(&c, &[], None, &[], &t());
        assert_eq!(
            s.webhook_url.as_deref(),
            Some("http://tallyman-gateway.finance.svc/webhooks/finance/wms/shipments")
        );
        assert_eq!(
            conditions::get(&s.conditions, READY).unwrap().status,
            "True"
        );
        assert!(conditions::get(&s.conditions, REACHABLE).is_none());
    }

    #[test]
    fn a_webhook_is_not_ready_while_the_gateways_secrets_are_missing() {
        let missing = vec!["tallyman-nats".to_string()];
        let s = status(&by_name("wms"), &[], None, &missing, &t());
        let ready = conditions::get(&s.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", REASON_SECRETS_MISSING)
        );
        assert!(
            ready.message.ends_with("namespace finance: tallyman-nats"),
            "{}",
            ready.message
        );
        // A Connector the gateway does not serve is not held up by it.
        let s = status(&by_name("erp"), &[], None, &missing, &t());
        assert_eq!(
            conditions::get(&s.conditions, READY).unwrap().status,
            "True"
        );
    }

    #[test]
    fn the_probe_decides_reachable() {
        let c = by_name("erp");
        let down = Probed {
            reachable: false,
            message: "GET x failed".into(),
        };
        let s = status(&c, &[], Some(&down), &[], &t());
        let r = conditions::get(&s.conditions, REACHABLE).unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", REASON_PROBE_FAILED)
        );
        let up = Probed {
            reachable: true,
            message: "GET x answered 200".into(),
        };
        let mut c2 = c.clone();
        c2.status = Some(s);
        let s = status(&c2, &[], Some(&up), &[], &t());
        assert_eq!(
            conditions::get(&s.conditions, REACHABLE).unwrap().status,
            "True"
        );
    }

    #[test]
    fn errors_make_it_not_ready_and_serve_no_url() {
        let c = by_name("wms");
        let s = status(&c, &["spec.webhook.path: taken".into()], None, &[], &t());
        let r = conditions::get(&s.conditions, READY).unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_str(), r.message.as_str()),
            ("False", "InvalidSpec", "spec.webhook.path: taken")
        );
        assert!(s.webhook_url.is_none());
    }
}
