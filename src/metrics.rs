//! Prometheus metrics, named `verigate_<area>_<thing>_<unit>`. Labels are bounded enums or route
//! names, never raw paths or addresses. Every labelled series a dashboard uses is pre-set to 0
//! at start-up, so a fresh daemon shows zeros rather than gaps.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::verification::Method;

/// Verification events counted by `verigate_verifications_total{event}`.
pub const EVENTS: [&str; 8] = [
    "created",
    "verified",
    "expired",
    "canceled",
    "superseded",
    "locked",
    "delivery_failed",
    "resent",
];
/// Code-check results counted by `verigate_code_checks_total{result}`.
pub const CHECK_RESULTS: [&str; 6] = [
    "verified",
    "invalid",
    "locked",
    "expired",
    "closed",
    "not_found",
];
/// Delivery outcomes counted by `verigate_outbox_attempts_total{lane,outcome}`.
/// `unreadable`: an entry that cannot be decoded, taken out of the due index (`outbox::worker`).
/// `stale`: an attempt ended after its entry had changed (its lease ran out, or an operator
/// retried it), and its outcome was not recorded over the newer state.
pub const OUTCOMES: [&str; 6] = [
    "delivered",
    "retry",
    "failed",
    "dropped",
    "unreadable",
    "stale",
];

/// All metrics of the daemon.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by listener, route and status.
    pub http_requests: IntCounterVec,
    /// HTTP latency by listener and route.
    pub http_duration: HistogramVec,
    /// Verification lifecycle events by event and method.
    pub verifications: IntCounterVec,
    /// Code checks by result.
    pub code_checks: IntCounterVec,
    /// Confirm-page fetches before the confirming POST.
    pub prefetches: IntCounter,
    /// Delivery attempts by lane and outcome.
    pub outbox_attempts: IntCounterVec,
    /// Scheduled entries by lane (refreshed on scrape).
    pub outbox_depth: IntGaugeVec,
    /// Age of the oldest due entry, seconds (refreshed on scrape).
    pub outbox_oldest_due: IntGaugeVec,
    /// Delivery latency, accepted → handed over.
    pub delivery_latency: HistogramVec,
    /// Store group commits.
    pub store_commits: IntCounter,
    /// Operations in store group commits.
    pub store_ops: IntCounter,
    /// Requests shed because of overload.
    pub http_shed: IntCounterVec,
    /// Open connections by listener.
    pub http_connections: IntGaugeVec,
}

/// Metric registration failure (a bug: duplicate names).
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct Error(#[from] prometheus::Error);

impl Metrics {
    /// Creates and registers every metric, pre-setting known label values to zero.
    ///
    /// # Errors
    /// Duplicate registration (a bug).
    pub fn new() -> Result<Self, Error> {
        let registry = Registry::new_custom(Some("verigate".into()), None)?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by listener, route and status",
            ),
            &["listener", "route", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time to produce a response head",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["listener", "route"],
        )?;
        let verifications = IntCounterVec::new(
            Opts::new("verifications_total", "Verification lifecycle events"),
            &["event", "method"],
        )?;
        let code_checks = IntCounterVec::new(
            Opts::new("code_checks_total", "Code checks by result"),
            &["result"],
        )?;
        let prefetches = IntCounter::new(
            "confirm_prefetches_total",
            "Confirm-page GET/HEAD fetches before the confirming POST (mail scanners)",
        )?;
        let outbox_attempts = IntCounterVec::new(
            Opts::new(
                "outbox_attempts_total",
                "Delivery attempts by lane and outcome",
            ),
            &["lane", "outcome"],
        )?;
        let outbox_depth = IntGaugeVec::new(
            Opts::new("outbox_depth", "Scheduled outbox entries by lane"),
            &["lane"],
        )?;
        let outbox_oldest_due = IntGaugeVec::new(
            Opts::new(
                "outbox_oldest_due_age_seconds",
                "Age of the oldest due outbox entry",
            ),
            &["lane"],
        )?;
        let delivery_latency = HistogramVec::new(
            HistogramOpts::new("outbox_delivery_latency_seconds", "Accepted to handed over")
                .buckets(vec![
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0, 900.0,
                ]),
            &["lane"],
        )?;
        let store_commits = IntCounter::new("store_commits_total", "Group commits to the store")?;
        let store_ops = IntCounter::new("store_ops_total", "Write operations in group commits")?;
        let http_shed = IntCounterVec::new(
            Opts::new(
                "http_overloaded_total",
                "Requests answered 503 because of overload",
            ),
            &["listener"],
        )?;
        let http_connections = IntGaugeVec::new(
            Opts::new("http_connections", "Open HTTP connections by listener"),
            &["listener"],
        )?;
        for c in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(verifications.clone()),
            Box::new(code_checks.clone()),
            Box::new(prefetches.clone()),
            Box::new(outbox_attempts.clone()),
            Box::new(outbox_depth.clone()),
            Box::new(outbox_oldest_due.clone()),
            Box::new(delivery_latency.clone()),
            Box::new(store_commits.clone()),
            Box::new(store_ops.clone()),
            Box::new(http_shed.clone()),
            Box::new(http_connections.clone()),
        ] {
            registry.register(c)?;
        }
        for e in EVENTS {
            for m in Method::ALL {
                verifications.with_label_values(&[e, m.as_str()]);
            }
        }
        for r in CHECK_RESULTS {
            code_checks.with_label_values(&[r]);
        }
        for lane in ["email", "callback"] {
            for o in OUTCOMES {
                outbox_attempts.with_label_values(&[lane, o]);
            }
            outbox_depth.with_label_values(&[lane]);
            outbox_oldest_due.with_label_values(&[lane]);
            delivery_latency.with_label_values(&[lane]);
        }
        for l in ["api", "public"] {
            http_shed.with_label_values(&[l]);
            http_connections.with_label_values(&[l]);
        }
        Ok(Metrics {
            registry,
            http_requests,
            http_duration,
            verifications,
            code_checks,
            prefetches,
            outbox_attempts,
            outbox_depth,
            outbox_oldest_due,
            delivery_latency,
            store_commits,
            store_ops,
            http_shed,
            http_connections,
        })
    }

    /// Counts a verification event.
    pub fn event(&self, event: &str, method: Method) {
        self.verifications
            .with_label_values(&[event, method.as_str()])
            .inc();
    }

    /// The registry, for other modules to add their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
