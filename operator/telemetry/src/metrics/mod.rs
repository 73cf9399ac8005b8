//! The metric families of every process, in one [`Registry`].
//!
//! Families are typed fields; a series is created on first use:
//!
//! ```
//! # use tallyman_telemetry::{Metrics, WorkflowLabels};
//! let metrics = Metrics::new();
//! let wf = WorkflowLabels::new("shop", "shipment-to-invoice");
//! metrics.worker.instances_started.get_or_create(&wf).inc();
//! assert!(metrics.encode().contains(
//!     r#"tallyman_worker_instances_started_total{namespace="shop",workflow="shipment-to-invoice"} 1"#
//! ));
//! ```
//!
//! A family clones cheaply and shares its series, so a hot path can keep the
//! family, or the series handle returned by `get_or_create_owned`, instead of
//! building labels per message.
//!
//! The encoder leaves out families without series. Create the series an
//! alert watches at start (`get_or_create` without incrementing: dead letters
//! per step, failed outcomes, error status classes), or `increase()` misses
//! the first event, which makes a series appear at 1 rather than rise from 0.

mod gateway;
mod labels;
mod operator;
mod worker;

use std::fmt::Debug;
use std::hash::Hash;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

pub use gateway::GatewayMetrics;
pub use labels::{
    CallLabels, ConnectorLabels, ControllerLabels, EventLabels, ExceptionLabels, GatewayOutcome,
    GatewayRejectLabels, GatewayRequestLabels, InstanceEndLabels, InstanceOutcome,
    ReconcileErrorLabels, StatusClass, StepLabels, WorkflowLabels,
};
pub use operator::OperatorMetrics;
pub use worker::WorkerMetrics;

/// The content type of [`Metrics::encode`]'s output (OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A histogram family; every series gets [`latency_buckets`].
pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Bucket bounds in seconds: 0.5 ms doubling to ~16 s (16 buckets), so
/// sub-millisecond KV writes and multi-second ERP calls both resolve.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 16)
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// Every metric family of tallyman. Build it once per process and share it
/// (`Arc<Metrics>`); each process fills its own component's families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `(name as scraped, type)` of each family, for the docs check: the
    /// encoder leaves out families without series.
    #[cfg(test)]
    families: Vec<(String, &'static str)>,
    pub worker: WorkerMetrics,
    pub gateway: GatewayMetrics,
    pub operator: OperatorMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registrar::default();
        let worker = WorkerMetrics::register(&mut r);
        let gateway = GatewayMetrics::register(&mut r);
        let operator = OperatorMetrics::register(&mut r);
        Self {
            registry: r.registry,
            #[cfg(test)]
            families: r.families,
            worker,
            gateway,
            operator,
        }
    }

    /// Every family with at least one series, in OpenMetrics text ending in
    /// `# EOF`; serve it with [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail, and no label value here fails to encode.
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding metrics into a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What a label struct must be for a [`Family`] to hold it.
trait LabelSet: Clone + Debug + Hash + Eq + EncodeLabelSet + Send + Sync + 'static {}

impl<T: Clone + Debug + Hash + Eq + EncodeLabelSet + Send + Sync + 'static> LabelSet for T {}

/// Registers families and remembers their scraped names.
#[derive(Default)]
struct Registrar {
    registry: Registry,
    families: Vec<(String, &'static str)>,
}

impl Registrar {
    /// `name` without `_total`, which encoding appends.
    fn counter<L: LabelSet>(&mut self, name: &str, help: &str) -> Family<L, Counter> {
        let family = Family::default();
        self.registry.register(name, help, family.clone());
        self.families.push((format!("{name}_total"), "counter"));
        family
    }

    fn gauge<L: LabelSet>(&mut self, name: &str, help: &str) -> Family<L, Gauge> {
        let family = Family::default();
        self.registry.register(name, help, family.clone());
        self.families.push((name.to_string(), "gauge"));
        family
    }

    /// A latency histogram; `name` without `_seconds`, which the unit
    /// appends.
    fn seconds<L: LabelSet>(&mut self, name: &str, help: &str) -> HistogramFamily<L> {
        let family = HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        self.registry
            .register_with_unit(name, help, Unit::Seconds, family.clone());
        self.families.push((format!("{name}_seconds"), "histogram"));
        family
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn workflow() -> WorkflowLabels {
        WorkflowLabels::new("shop", "shipment-to-invoice")
    }

    #[test]
    fn families_without_series_are_left_out() {
        assert_eq!(Metrics::new().encode(), "# EOF\n");
    }

    #[test]
    fn every_family_is_named_for_its_component_and_unit() {
        let metrics = Metrics::new();
        assert_eq!(metrics.families.len(), 24);
        for (name, kind) in &metrics.families {
            assert!(
                [
                    "tallyman_worker_",
                    "tallyman_gateway_",
                    "tallyman_operator_"
                ]
                .iter()
                .any(|p| name.starts_with(p)),
                "{name}"
            );
            match *kind {
                "counter" => assert!(name.ends_with("_total"), "{name}"),
                "histogram" => assert!(name.ends_with("_seconds"), "{name}"),
                _ => {}
            }
        }
    }

    /// Table rows `| `tallyman_…` | type | …` of docs/metrics.md.
    fn documented() -> BTreeSet<(String, String)> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/metrics.md");
        let text = std::fs::read_to_string(path).expect("docs/metrics.md");
        text.lines()
            .filter_map(|l| {
                let mut cells = l.split('|').map(str::trim).skip(1);
                let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
                let kind = cells.next()?;
                name.starts_with("tallyman_")
                    .then(|| (name.to_string(), kind.to_string()))
            })
            .collect()
    }

    #[test]
    fn docs_list_every_family_and_nothing_else() {
        let registered: BTreeSet<(String, String)> = Metrics::new()
            .families
            .into_iter()
            .map(|(name, kind)| (name, kind.to_string()))
            .collect();
        let documented = documented();
        let missing: Vec<_> = registered.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&registered).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "docs/metrics.md is out of date\nundocumented: {missing:?}\nno longer registered: {stale:?}"
        );
    }

    #[test]
    fn a_family_appears_with_its_help_type_and_unit_once_it_has_a_series() {
        let metrics = Metrics::new();
        metrics
            .worker
            .step_duration
            .get_or_create(&StepLabels {
                namespace: "shop".into(),
                workflow: "shipment-to-invoice".into(),
                step: "invoice".into(),
            })
            .observe(0.01);
        let text = metrics.encode();
        assert!(text.contains("# TYPE tallyman_worker_step_duration_seconds histogram\n"));
        assert!(text.contains("# UNIT tallyman_worker_step_duration_seconds seconds\n"));
        assert!(text.contains("# HELP tallyman_worker_step_duration_seconds Time to execute"));
    }

    #[test]
    fn series_carry_their_labels() {
        let metrics = Metrics::new();
        let w = &metrics.worker;
        w.events_received
            .get_or_create(&EventLabels {
                namespace: "shop".into(),
                workflow: "shipment-to-invoice".into(),
                r#type: "shipment.dispatched".into(),
            })
            .inc_by(3);
        w.instances_ended
            .get_or_create(&InstanceEndLabels {
                namespace: "shop".into(),
                workflow: "shipment-to-invoice".into(),
                outcome: InstanceOutcome::Rejected,
            })
            .inc();
        w.consumer_pending.get_or_create(&workflow()).set(42);
        w.call_attempts
            .get_or_create(&CallLabels {
                namespace: "shop".into(),
                workflow: "shipment-to-invoice".into(),
                connector: "erp".into(),
                action: "createInvoice".into(),
                status_class: StatusClass::from_status(503),
            })
            .inc();
        metrics
            .gateway
            .rejected
            .get_or_create(&GatewayRejectLabels {
                namespace: "shop".into(),
                connector: "wms".into(),
                reason: "bad_signature",
            })
            .inc();
        metrics
            .operator
            .reconcile_errors
            .get_or_create(&ReconcileErrorLabels {
                controller: "workflow",
                reason: "invalid_spec",
            })
            .inc();

        let text = metrics.encode();
        for line in [
            r#"tallyman_worker_events_received_total{namespace="shop",workflow="shipment-to-invoice",type="shipment.dispatched"} 3"#,
            r#"tallyman_worker_instances_ended_total{namespace="shop",workflow="shipment-to-invoice",outcome="rejected"} 1"#,
            r#"tallyman_worker_consumer_pending{namespace="shop",workflow="shipment-to-invoice"} 42"#,
            r#"tallyman_worker_call_attempts_total{namespace="shop",workflow="shipment-to-invoice",connector="erp",action="createInvoice",status_class="5xx"} 1"#,
            r#"tallyman_gateway_rejected_total{namespace="shop",connector="wms",reason="bad_signature"} 1"#,
            r#"tallyman_operator_reconcile_errors_total{controller="workflow",reason="invalid_spec"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }

    #[test]
    fn histograms_resolve_milliseconds() {
        let metrics = Metrics::new();
        let step = StepLabels {
            namespace: "shop".into(),
            workflow: "shipment-to-invoice".into(),
            step: "invoice".into(),
        };
        metrics
            .worker
            .step_duration
            .get_or_create(&step)
            .observe(0.003);
        let text = metrics.encode();
        let labels = r#"namespace="shop",workflow="shipment-to-invoice",step="invoice""#;
        let bucket = |le: &str| {
            let prefix =
                format!("tallyman_worker_step_duration_seconds_bucket{{le=\"{le}\",{labels}}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no bucket {le}\n{text}"))
                .to_string()
        };
        assert_eq!(bucket("0.0005"), "0");
        assert_eq!(bucket("0.002"), "0");
        assert_eq!(bucket("0.004"), "1");
        assert_eq!(bucket("+Inf"), "1");
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new();
        metrics
            .worker
            .instances_started
            .get_or_create(&WorkflowLabels::new("shop", "a\"b"))
            .inc();
        assert!(metrics.encode().contains(r#"workflow="a\"b""#));
    }
}
