//! One record per connection: who and where it was, how it was decided and how it ended; it
//! counts the connection in the TCP metrics and writes its access-log line.
use std::{future::Future, net::SocketAddr, pin::Pin, time::Instant};

use tracing::info;

use super::{Direction, ProxyContext};
use crate::copy;
use crate::{
    enrollment::LocalWorkload,
    identity::spiffe::SpiffeId,
    metrics::{self, Metrics, TcpLabels},
    policy::PolicyDecision,
    services::ServiceName,
    workload::WorkloadId,
};

/// The identities on both ends of a connection, when it went through the tunnel.
#[derive(Clone)]
pub(crate) struct Identities {
    pub source: Option<SpiffeId>,
    pub destination: Option<SpiffeId>,
}

impl Identities {
    pub const NONE: Identities = Identities {
        source: None,
        destination: None,
    };
}

/// The two ways a connection between two pods of this node goes without TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeLocal {
    /// Accepted by the agent, which spliced its two sockets in the kernel.
    Spliced,
    /// Pod to pod, past the agent, under a grant the agent gave (`mtls.same_node = "direct"`).
    Direct,
}

impl NodeLocal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Spliced => "spliced",
            Self::Direct => "direct",
        }
    }
}

/// Who and where a relayed connection is, for its access-log line.
pub(crate) struct AccessRecord<'a> {
    pub direction: Direction,
    pub workload: &'a LocalWorkload,
    pub peer: SocketAddr,
    pub original_dst: SocketAddr,
    /// The Service `original_dst` is a ClusterIP of, if it is one.
    pub service: Option<std::sync::Arc<ServiceName>>,
    /// Where the connection went when that is not `original_dst` alone (a Service's endpoint).
    pub upstream: Option<SocketAddr>,
    pub identities: Identities,
    /// The workload at the other end, when its agent said (HBONE baggage).
    pub peer_workload: Option<WorkloadId>,
    /// The authorization decision; inbound only (policy is enforced at the destination).
    pub decision: Option<PolicyDecision>,
    /// What the source had sent when its tunnel stream was opened, which went with the CONNECT
    /// rather than through the relay.
    pub sent_with_connect: u64,
    /// How a same-node connection went (identities known, no TLS); `None` for any other.
    pub node_local: Option<NodeLocal>,
    pub started: Instant,
}

impl AccessRecord<'_> {
    /// Whether policy allowed the connection (outbound connections are not authorized here).
    pub fn is_allowed(&self) -> bool {
        self.decision
            .as_ref()
            .is_none_or(PolicyDecision::is_allowed)
    }

    /// (source, destination) workloads.
    fn workloads(&self) -> (Option<&WorkloadId>, Option<&WorkloadId>) {
        let local = Some(&self.workload.id);
        match self.direction {
            Direction::Outbound => (local, self.peer_workload.as_ref()),
            Direction::Inbound => (self.peer_workload.as_ref(), local),
        }
    }

    /// Istio's `connection_security_policy`, plus `node_local` for a connection spliced in the
    /// kernel: both identities are known, but no TLS was spoken.
    fn security_policy(&self) -> &'static str {
        let both = self.identities.source.is_some() && self.identities.destination.is_some();
        match (both, self.node_local.is_some()) {
            (true, true) => "node_local",
            (true, false) => "mutual_tls",
            (false, _) => "none",
        }
    }

    /// Counts the connection in the TCP metrics: opened, or closed with its bytes.
    pub(super) fn count(&self, metrics: &Metrics, closed: Option<&copy::RelayOutcome>) {
        // Principals as Istio's metrics write them: the whole SPIFFE ID.
        let principal = |id: &Option<SpiffeId>| {
            id.as_ref()
                .map_or_else(|| metrics::UNKNOWN.to_owned(), SpiffeId::to_string)
        };
        let (source_principal, destination_principal) = (
            principal(&self.identities.source),
            principal(&self.identities.destination),
        );
        let (source, destination) = self.workloads();
        // The peer's workload name is its own word (baggage): bounded per verified identity.
        let peer_is_source = matches!(self.direction, Direction::Inbound);
        let peer_identity = if peer_is_source {
            &self.identities.source
        } else {
            &self.identities.destination
        };
        let peer_admitted = match (peer_identity, &self.peer_workload) {
            (Some(id), Some(w)) => metrics.admit_peer_workload(id, &w.name),
            _ => true,
        };
        let admitted = |is_peer: bool| !is_peer || peer_admitted;
        fn name(w: Option<&WorkloadId>, admitted: bool) -> &str {
            match w {
                Some(w) if admitted => w.name.as_str(),
                _ => metrics::UNKNOWN,
            }
        }
        fn namespace(w: Option<&WorkloadId>) -> &str {
            w.map_or(metrics::UNKNOWN, |w| w.namespace.as_str())
        }
        let service = self.service.as_ref().map(ToString::to_string);
        let labels = TcpLabels {
            reporter: match self.direction {
                Direction::Outbound => "source",
                Direction::Inbound => "destination",
            },
            source_principal: &source_principal,
            destination_principal: &destination_principal,
            source_workload: name(source, admitted(peer_is_source)),
            source_workload_namespace: namespace(source),
            destination_workload: name(destination, admitted(!peer_is_source)),
            destination_workload_namespace: namespace(destination),
            destination_service: service.as_deref().unwrap_or(metrics::UNKNOWN),
            connection_security_policy: self.security_policy(),
        };
        match closed {
            None => metrics.connection_opened(&labels),
            // `sent` is what the downstream (the source) sent: the request.
            Some(o) => metrics.connection_closed(&labels, o.sent, o.received),
        }
    }
}

/// Relays until the connection ends or `interrupt` resolves (a policy update that now denies it),
/// then writes its one access-log line. The record and `interrupt` stay with the caller: each
/// open connection's task then holds one copy of them (see `copy::relay`).
pub(crate) async fn relay_and_log<D, U>(
    record: &AccessRecord<'_>,
    downstream: D,
    upstream: U,
    ctx: &ProxyContext,
    interrupt: Pin<&mut impl Future<Output = copy::CloseReason>>,
) where
    D: copy::RelaySide,
    U: copy::RelaySide,
{
    record.count(&ctx.metrics, None);
    let mut outcome = copy::relay(downstream, upstream, ctx.idle_timeout, interrupt).await;
    outcome.sent += record.sent_with_connect;
    record.count(&ctx.metrics, Some(&outcome));
    log_access(record, &outcome);
}

pub(super) fn id_or_dash(id: Option<&SpiffeId>) -> String {
    id.map_or_else(|| "-".to_owned(), ToString::to_string)
}

/// The access-log line (target `zt::access`) of a connection that ended or was refused.
pub(crate) fn log_access(record: &AccessRecord<'_>, outcome: &copy::RelayOutcome) {
    let ids = &record.identities;
    let (source_workload, destination_workload) = record.workloads();
    let workload_name =
        |w: Option<&WorkloadId>| w.map_or_else(|| "-".to_owned(), ToString::to_string);
    let (decision, rule) = match &record.decision {
        Some(d) => (d.action.to_string(), d.rule_ref()),
        None => ("-".to_owned(), "-".to_owned()),
    };
    info!(
        target: "zt::access",
        direction = record.direction.as_str(),
        workload = %record.workload.id,
        source_identity = %id_or_dash(ids.source.as_ref()),
        destination_identity = %id_or_dash(ids.destination.as_ref()),
        source_workload = %workload_name(source_workload),
        destination_workload = %workload_name(destination_workload),
        connection_security_policy = record.security_policy(),
        same_node = record.node_local.map_or("-", NodeLocal::as_str),
        peer = %record.peer,
        original_dst = %record.original_dst,
        destination_service = %record.service.as_ref().map_or_else(|| "-".to_owned(), ToString::to_string),
        upstream = %record.upstream.map_or_else(|| "-".to_owned(), |u| u.to_string()),
        policy_decision = %decision,
        policy_rule = %rule,
        bytes_sent = outcome.sent,
        bytes_received = outcome.received,
        duration_ms = record.started.elapsed().as_millis() as u64,
        close = %outcome.close,
        "connection closed"
    );
}

/// A tunnelled connection whose destination took what was sent with the CONNECT and then reset
/// before answering: counted and logged as relayed, ended by the upstream's reset, as it would
/// be had the answer come first.
pub(super) fn reset_before_answer(
    record: &AccessRecord<'_>,
    app: tokio::net::TcpStream,
    ctx: &ProxyContext,
) {
    super::reset(app);
    let outcome = copy::RelayOutcome {
        sent: record.sent_with_connect,
        ..copy::RelayOutcome::refused(copy::CloseReason::UpstreamReset)
    };
    record.count(&ctx.metrics, None);
    record.count(&ctx.metrics, Some(&outcome));
    log_access(record, &outcome);
}

/// Resets a captured connection that was never relayed, counts it, and writes its access-log
/// line.
pub(super) fn refuse(
    record: &AccessRecord<'_>,
    app: tokio::net::TcpStream,
    close: copy::CloseReason,
    ctx: &ProxyContext,
) {
    super::reset(app);
    ctx.metrics.outbound_refused(close.as_str());
    log_access(record, &copy::RelayOutcome::refused(close));
}
