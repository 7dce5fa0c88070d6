//! What discovery reports to the rest of the agent: API refusals to readiness, and the objects
//! it could not use, counted and logged.
use std::sync::Arc;

use tracing::{debug, warn};

use crate::{admin::Readiness, metrics::Metrics};

/// What discovery reports to the rest of the agent.
pub struct DiscoveryReport {
    pub readiness: Readiness,
    pub metrics: Arc<Metrics>,
}

/// Logs and counts an object the directory cannot use (or use whole).
pub(super) fn skipped(metrics: &Metrics, kind: &str, reason: &str, namespace: &str, name: &str) {
    metrics
        .discovery_skipped_objects
        .with_label_values(&[kind, reason])
        .inc();
    if reason == "no_ip" {
        // Every pod is like this between scheduling and its sandbox starting.
        debug!(kind, reason, namespace, name, "object not usable yet");
    } else {
        warn!(
            kind,
            reason, namespace, name, "Kubernetes object skipped (or partly used)"
        );
    }
}
