//! `GET /v1/operator/stats`: this process's pipeline figures for the dashboard's operator view,
//! read from its own Prometheus registry (the same numbers as `/metrics` on the admin listener).
//! A process that runs one component reports that component's figures; across replicas, use
//! Prometheus and the Grafana dashboard in `deploy/`.

use std::collections::BTreeMap;

use axum::Json;
use prometheus::proto::{MetricFamily, MetricType};
use serde::Serialize;
use utoipa::ToSchema;

/// Pipeline figures since this process started.
#[derive(Debug, Serialize, ToSchema)]
pub struct OperatorStats {
    /// Ingested events by outcome: accepted, duplicate, rejected.
    pub events: BTreeMap<String, u64>,
    /// Events the aggregator rolled up into the store.
    pub aggregated_events: u64,
    /// Records on the log not yet processed, by consumer (aggregator, enforcer), over all
    /// partitions.
    pub consumer_lag: BTreeMap<String, u64>,
    /// Customers the enforcer holds in memory.
    pub customers_in_memory: u64,
    /// Quota decisions by decision (allow, warn, block), over every protocol.
    pub decisions: BTreeMap<String, u64>,
    /// Stripe meter event attempts by outcome.
    pub billing_reports: BTreeMap<String, u64>,
}

/// Sums of `name`'s samples, by the value of `label`.
fn by_label(families: &[MetricFamily], name: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for family in families.iter().filter(|f| f.name() == name) {
        for m in family.get_metric() {
            let key = m
                .get_label()
                .iter()
                .find(|l| l.name() == label)
                .map(|l| l.value().to_owned())
                .unwrap_or_default();
            *out.entry(key).or_default() += value(family, m);
        }
    }
    out
}

/// Sum of `name`'s samples.
fn total(families: &[MetricFamily], name: &str) -> u64 {
    families
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter().map(move |m| value(f, m)))
        .sum()
}

fn value(family: &MetricFamily, m: &prometheus::proto::Metric) -> u64 {
    let v = match family.get_field_type() {
        MetricType::COUNTER => m.get_counter().get_value(),
        _ => m.get_gauge().get_value(),
    };
    v.max(0.0) as u64
}

/// This process's pipeline figures (dashboard operator view).
#[utoipa::path(
    get,
    path = "/v1/operator/stats",
    tag = "operator",
    responses((status = 200, description = "Figures since this process started", body = OperatorStats))
)]
pub async fn stats() -> Json<OperatorStats> {
    let families = prometheus::gather();
    Json(OperatorStats {
        events: by_label(&families, "tally_ingest_events_total", "outcome"),
        aggregated_events: total(&families, "tally_aggregator_events_total"),
        consumer_lag: by_label(&families, "tally_log_consumer_lag", "consumer"),
        customers_in_memory: total(&families, "tally_enforcer_customers"),
        decisions: by_label(&families, "tally_enforcer_decisions_total", "decision"),
        billing_reports: by_label(&families, "tally_billing_reports_total", "outcome"),
    })
}
