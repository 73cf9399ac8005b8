//! The status a Connector should show. Pure.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use tallyman_api::v1alpha1::{Connector, ConnectorStatus};

use super::gateway::{NAME as GATEWAY, webhook_url};
use super::probe::Probed;
use crate::conditions::{
    self, REACHABLE, READY, REASON_GATEWAY_UNAVAILABLE, REASON_INVALID_SPEC, REASON_PROBE_FAILED,
    REASON_PROBE_SUCCEEDED, REASON_RECONCILED, REASON_SECRETS_MISSING,
};

/// The namespace's gateway pods, from its Deployment as last seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatewayPods {
    pub ready: i32,
    pub desired: i32,
}

impl GatewayPods {
    pub fn of(d: &Deployment) -> Self {
        Self {
            ready: d
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0),
            desired: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
        }
    }
}

/// `errors`: this Connector's validation errors (with field paths);
/// `probed`: the probe's result, when it has a REST half and is valid;
/// `missing_secrets`: Secrets the namespace's gateway pods mount that do
/// not exist (no webhook is served until they do); `gateway`: its pods,
/// when the namespace has a gateway (a webhook is served once one of them
/// is ready).
pub fn status(
    c: &Connector,
    errors: &[String],
    probed: Option<&Probed>,
    missing_secrets: &[String],
    gateway: Option<GatewayPods>,
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
    } else if let (Some(_), Some(pods)) = (&c.spec.webhook, gateway.filter(|g| g.ready == 0)) {
        conditions::set(
            cs,
            READY,
            false,
            REASON_GATEWAY_UNAVAILABLE,
            format!(
                "no pod of Deployment {ns}/{GATEWAY} is ready (0 of {}), so the webhook is not served yet; its pods say why",
                pods.desired
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

    /// A gateway with one of its two pods ready.
    const UP: Option<GatewayPods> = Some(GatewayPods {
        ready: 1,
        desired: 2,
    });

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
        let s = status(&c, &[], None, &[], UP, &t());
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
        let s = status(&by_name("wms"), &[], None, &missing, UP, &t());
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
        let s = status(&by_name("erp"), &[], None, &missing, None, &t());
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
        let s = status(&c, &[], Some(&down), &[], None, &t());
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
        let s = status(&c2, &[], Some(&up), &[], None, &t());
        assert_eq!(
            conditions::get(&s.conditions, REACHABLE).unwrap().status,
            "True"
        );
    }

    #[test]
    fn a_webhook_is_not_ready_until_a_gateway_pod_is() {
        let down = Some(GatewayPods {
            ready: 0,
            desired: 2,
        });
        let s = status(&by_name("wms"), &[], None, &[], down, &t());
        let ready = conditions::get(&s.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", REASON_GATEWAY_UNAVAILABLE)
        );
        assert!(
            ready
                .message
                .starts_with("no pod of Deployment finance/tallyman-gateway is ready (0 of 2)"),
            "{}",
            ready.message
        );
        // Where it will be served is known already.
        assert!(s.webhook_url.is_some());
        // Missing Secrets are the reason the pods are not ready: said first.
        let missing = vec!["wms-signing".to_string()];
        let s = status(&by_name("wms"), &[], None, &missing, down, &t());
        assert_eq!(
            conditions::get(&s.conditions, READY).unwrap().reason,
            REASON_SECRETS_MISSING
        );
        // A REST Connector does not wait for the gateway.
        let s = status(&by_name("erp"), &[], None, &[], down, &t());
        assert_eq!(
            conditions::get(&s.conditions, READY).unwrap().status,
            "True"
        );
    }

    #[test]
    fn errors_make_it_not_ready_and_serve_no_url() {
        let c = by_name("wms");
        let s = status(
            &c,
            &["spec.webhook.path: taken".into()],
            None,
            &[],
            UP,
            &t(),
        );
        let r = conditions::get(&s.conditions, READY).unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_str(), r.message.as_str()),
            ("False", "InvalidSpec", "spec.webhook.path: taken")
        );
        assert!(s.webhook_url.is_none());
    }
}
