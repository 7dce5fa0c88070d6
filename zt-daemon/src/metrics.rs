//! The agent's Prometheus metrics, served as text on `admin.metrics_addr`
//! (default 0.0.0.0:15020) at `/metrics`. The TCP metrics have Istio's shape (`istio_tcp_*` with
//! the `zt_` prefix), so dashboards port over. Labels never carry per-connection values (ports,
//! addresses), so the number of series stays bounded however many connections pass; and a peer's
//! word on its workload name (HBONE baggage) adds at most `PEER_WORKLOADS_PER_IDENTITY` names per
//! verified identity.
use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
    core::Collector,
};

use crate::{
    identity::spiffe::SpiffeId,
    policy::{LoadHealth, PolicyDecision},
};

/// Istio's value for a label zt does not know (a plaintext peer's principal, say).
pub const UNKNOWN: &str = "unknown";

/// Workload names the baggage of one peer identity may put in the TCP labels; beyond, its new
/// names count as `unknown`. Replicas share a name, and a service account rarely serves more than
/// a few workloads, so real peers stay well within it.
pub const PEER_WORKLOADS_PER_IDENTITY: usize = 8;

const TCP_LABELS: [&str; 9] = [
    "reporter",
    "source_principal",
    "destination_principal",
    "source_workload",
    "source_workload_namespace",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
    "connection_security_policy",
];

/// The labels of one connection in the TCP metrics.
pub struct TcpLabels<'a> {
    /// `source` (outbound side) or `destination` (inbound side).
    pub reporter: &'static str,
    pub source_principal: &'a str,
    pub destination_principal: &'a str,
    pub source_workload: &'a str,
    pub source_workload_namespace: &'a str,
    pub destination_workload: &'a str,
    pub destination_workload_namespace: &'a str,
    /// `<name>.<namespace>.svc.cluster.local` when the connection went to a Service's ClusterIP.
    pub destination_service: &'a str,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
}

impl TcpLabels<'_> {
    fn values(&self) -> [&str; 9] {
        [
            self.reporter,
            self.source_principal,
            self.destination_principal,
            self.source_workload,
            self.source_workload_namespace,
            self.destination_workload,
            self.destination_workload_namespace,
            self.destination_service,
            self.connection_security_policy,
        ]
    }
}

pub struct Metrics {
    registry: Registry,
    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
    tcp_sent: IntCounterVec,
    tcp_received: IntCounterVec,
    policy_decisions: IntCounterVec,
    handshake_failures: IntCounterVec,
    hbone_streams_refused: IntCounterVec,
    /// Binds of the agent's ports refused in enrolled pods (read from the kernel's counters).
    pub denied_binds: IntCounter,
    /// Set at scrape time from the enrolled workloads' certificates.
    pub certificate_expiry: IntGaugeVec,
    pub workloads_enrolled: IntGauge,
    /// Pods whose enrollment failed and that are held fail-closed until it succeeds.
    pub enrollment_failed: IntGauge,
    pub capture_drift: IntGauge,
    pub identity_issue_failures: IntCounter,
    /// SVIDs the issuer took back (SPIRE: an entry deleted, selectors no longer matching).
    pub identity_withdrawals: IntCounter,
    /// The peer workload names admitted to the labels, per verified peer identity.
    peer_workloads: Mutex<HashMap<SpiffeId, HashSet<String>>>,
    /// Policy loads (start, file change, SIGHUP) that failed; the previous set stayed in force.
    pub policy_load_failures: IntCounter,
    /// 1 when the last policy load succeeded, 0 when the files on disk are not in force.
    pub policy_last_load_success: IntGauge,
    /// Kubernetes objects discovery could not use, or not whole, by kind and reason.
    pub discovery_skipped_objects: IntCounterVec,
    /// Failed lists and watches of the Kubernetes API, by resource and verb.
    pub discovery_api_errors: IntCounterVec,
    /// Pods of the cluster in the mesh directory (meshed or not).
    pub directory_pods: IntGauge,
    outbound_refusals: IntCounterVec,
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("static metric definition")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            tcp_opened: counter_vec(
                "zt_tcp_connections_opened_total",
                "TCP connections opened through the agent.",
                &TCP_LABELS,
            ),
            tcp_closed: counter_vec(
                "zt_tcp_connections_closed_total",
                "TCP connections closed through the agent.",
                &TCP_LABELS,
            ),
            tcp_sent: counter_vec(
                "zt_tcp_sent_bytes_total",
                "Bytes sent during the response (destination to source), counted at close.",
                &TCP_LABELS,
            ),
            tcp_received: counter_vec(
                "zt_tcp_received_bytes_total",
                "Bytes received during the request (source to destination), counted at close.",
                &TCP_LABELS,
            ),
            policy_decisions: counter_vec(
                "zt_policy_decisions_total",
                "Authorization decisions, by action (allow, deny) and reason (policy, default, mtls_required, policy_unavailable).",
                &["action", "reason"],
            ),
            handshake_failures: counter_vec(
                "zt_tls_handshake_failures_total",
                "Failed mTLS handshakes on the tunnel, both sides, by reason.",
                &["reason"],
            ),
            hbone_streams_refused: counter_vec(
                "zt_hbone_streams_refused_total",
                "HBONE CONNECT streams refused before reaching the application, by reason (not_connect, no_authority, not_this_pod, max_connections, application_unreachable; policy denials are in zt_policy_decisions_total), and HBONE connections refused because their source holds max_hbone_connections_per_source (source_connections).",
                &["reason"],
            ),
            denied_binds: IntCounter::new(
                "zt_capture_denied_binds_total",
                "Attempts by enrolled pods to bind one of the agent's ports (15001, 15006, 15008), refused by the kernel program.",
            )
            .expect("static metric definition"),
            certificate_expiry: IntGaugeVec::new(
                Opts::new(
                    "zt_certificate_expiry_timestamp_seconds",
                    "When each enrolled workload's current certificate expires (Unix seconds).",
                ),
                &["identity"],
            )
            .expect("static metric definition"),
            workloads_enrolled: gauge("zt_workloads_enrolled", "Workloads enrolled on this node."),
            enrollment_failed: gauge(
                "zt_workloads_enrollment_failed",
                "Pods whose enrollment failed: held fail-closed (connects refused, inbound dropped) until it succeeds.",
            ),
            capture_drift: gauge(
                "zt_capture_drift",
                "Enrolled pods whose capture state in the kernel differs from what the agent wants.",
            ),
            identity_issue_failures: IntCounter::new(
                "zt_identity_issue_failures_total",
                "Failed attempts to issue or renew a workload certificate.",
            )
            .expect("static metric definition"),
            identity_withdrawals: IntCounter::new(
                "zt_identity_withdrawals_total",
                "SVIDs the issuer took back (SPIRE: entry deleted or selectors no longer matching); the identity's connections were closed.",
            )
            .expect("static metric definition"),
            peer_workloads: Mutex::default(),
            policy_load_failures: IntCounter::new(
                "zt_policy_load_failures_total",
                "Policy loads that failed (a file did not parse); the policies in force did not change.",
            )
            .expect("static metric definition"),
            policy_last_load_success: gauge(
                "zt_policy_last_load_success",
                "1 when the last policy load succeeded; 0 when the policy files on disk are not the ones in force.",
            ),
            discovery_skipped_objects: counter_vec(
                "zt_discovery_skipped_objects_total",
                "Kubernetes objects discovery skipped or used in part, by kind (pod, namespace) and reason (no_ip, invalid_ip, invalid_uid, missing_name, invalid_mesh_value, deleted_with_pods).",
                &["kind", "reason"],
            ),
            discovery_api_errors: counter_vec(
                "zt_discovery_api_errors_total",
                "Failed lists and watches of the Kubernetes API (retried with backoff), by resource and verb.",
                &["resource", "verb"],
            ),
            directory_pods: gauge(
                "zt_mesh_directory_pods",
                "Pods of the cluster the mesh directory holds (from Kubernetes discovery), meshed or not.",
            ),
            outbound_refusals: counter_vec(
                "zt_outbound_refusals_total",
                "Outbound connections refused before any byte was relayed, by close reason (no_endpoints, egress_denied, tunnel_refused, tunnel_failed, connect_failed, max_connections).",
                &["reason"],
            ),
            registry,
        };
        let build_info = IntGauge::with_opts(
            Opts::new("zt_build_info", "zt build; the value is always 1.")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .expect("static metric definition");
        build_info.set(1);
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.tcp_opened.clone()),
            Box::new(m.tcp_closed.clone()),
            Box::new(m.tcp_sent.clone()),
            Box::new(m.tcp_received.clone()),
            Box::new(m.policy_decisions.clone()),
            Box::new(m.handshake_failures.clone()),
            Box::new(m.hbone_streams_refused.clone()),
            Box::new(m.denied_binds.clone()),
            Box::new(m.certificate_expiry.clone()),
            Box::new(m.workloads_enrolled.clone()),
            Box::new(m.enrollment_failed.clone()),
            Box::new(m.capture_drift.clone()),
            Box::new(m.identity_issue_failures.clone()),
            Box::new(m.identity_withdrawals.clone()),
            Box::new(m.policy_load_failures.clone()),
            Box::new(m.policy_last_load_success.clone()),
            Box::new(m.discovery_skipped_objects.clone()),
            Box::new(m.discovery_api_errors.clone()),
            Box::new(m.directory_pods.clone()),
            Box::new(m.outbound_refusals.clone()),
            Box::new(build_info),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for c in collectors {
            m.registry
                .register(c)
                .expect("each metric is registered once");
        }
        m
    }

    pub fn outbound_refused(&self, reason: &str) {
        self.outbound_refusals.with_label_values(&[reason]).inc();
    }

    pub fn connection_opened(&self, labels: &TcpLabels<'_>) {
        self.tcp_opened.with_label_values(&labels.values()).inc();
    }

    /// `request` bytes went source → destination, `response` bytes destination → source.
    pub fn connection_closed(&self, labels: &TcpLabels<'_>, request: u64, response: u64) {
        let values = labels.values();
        self.tcp_closed.with_label_values(&values).inc();
        self.tcp_received.with_label_values(&values).inc_by(request);
        self.tcp_sent.with_label_values(&values).inc_by(response);
    }

    /// Whether `name`, which the peer verified as `identity` says is its workload, may be a label
    /// value: it already is one, or the identity has named fewer than
    /// `PEER_WORKLOADS_PER_IDENTITY` workloads.
    pub fn admit_peer_workload(&self, identity: &SpiffeId, name: &str) -> bool {
        let mut names = self
            .peer_workloads
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let known = names.entry(identity.clone()).or_default();
        if known.contains(name) {
            return true;
        }
        if known.len() >= PEER_WORKLOADS_PER_IDENTITY {
            return false;
        }
        known.insert(name.to_owned());
        true
    }

    /// The metrics a policy load reports to.
    pub fn policy_load_health(&self) -> LoadHealth {
        LoadHealth {
            failures: self.policy_load_failures.clone(),
            last_success: self.policy_last_load_success.clone(),
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

    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures.with_label_values(&[reason]).inc();
    }

    pub fn hbone_stream_refused(&self, reason: &'static str) {
        self.hbone_streams_refused
            .with_label_values(&[reason])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_identity_names_a_bounded_number_of_workloads() {
        let metrics = Metrics::new();
        let a: SpiffeId = "spiffe://td/ns/a/sa/x".parse().unwrap();
        let b: SpiffeId = "spiffe://td/ns/b/sa/x".parse().unwrap();
        for i in 0..PEER_WORKLOADS_PER_IDENTITY {
            assert!(metrics.admit_peer_workload(&a, &format!("w{i}")));
        }
        assert!(!metrics.admit_peer_workload(&a, "one-more"));
        // Names already admitted stay admitted; other identities have their own allowance.
        assert!(metrics.admit_peer_workload(&a, "w0"));
        assert!(metrics.admit_peer_workload(&b, "one-more"));
    }
}
