//! The agent's Prometheus metrics (DESIGN.md §8), served as text on `admin.metrics_addr`
//! (default 0.0.0.0:15020) at `/metrics`. Labels never carry per-connection values (ports,
//! addresses), so the number of series stays bounded however many connections pass.
use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::policy::PolicyDecision;

pub struct Metrics {
    registry: Registry,
    /// `zt_policy_decisions_total{action, reason}`: every authorization decision.
    policy_decisions: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let policy_decisions = IntCounterVec::new(
            Opts::new(
                "zt_policy_decisions_total",
                "Authorization decisions, by action (allow, deny) and reason (policy, default, mtls_required).",
            ),
            &["action", "reason"],
        )
        .expect("static metric definition");
        let build_info = IntGauge::with_opts(
            Opts::new("zt_build_info", "zt build; the value is always 1.")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .expect("static metric definition");
        build_info.set(1);
        for metric in [
            Box::new(policy_decisions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(build_info),
        ] {
            registry
                .register(metric)
                .expect("each metric is registered once");
        }
        Self {
            registry,
            policy_decisions,
        }
    }

    pub fn count_decision(&self, decision: &PolicyDecision) {
        let action = if decision.is_allowed() {
            "allow"
        } else {
            "deny"
        };
        self.policy_decisions
            .with_label_values(&[action, decision.reason.as_str()])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a metric family error would be a bug here.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
