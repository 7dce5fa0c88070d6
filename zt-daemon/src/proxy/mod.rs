//! The data path: accept captured connections in the pod, find where they were going, and carry
//! the bytes. `outbound` serves the pod's 15001 listener, `inbound` its 15006 and 15008
//! listeners, and `copy` moves bytes.
pub mod copy;
pub mod hbone;
pub mod inbound;
pub mod outbound;
pub mod pool;
pub mod route;

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

pub use crate::directory::MeshDirectory;
use crate::{
    ebpf::OriginalDsts,
    egress::EgressPolicy,
    identity::{spiffe::SpiffeId, verify::TrustStore},
    metrics::{self, Metrics, TcpLabels},
    policy::{self, Peer, PolicyDecision, PolicyStore, WorkloadRef},
    services::{EndpointLoad, ServiceName},
    source_limit::SourceLimit,
};

/// What the mTLS tunnel needs; absent when the node has no identity provider (capture only).
pub struct Tunnel {
    pub trust: TrustStore,
    pub handshake_timeout: Duration,
    pub pool: Arc<pool::Pool>,
    /// TLS handshakes pending on this node's HBONE listeners, per source address.
    pub handshakes: SourceLimit,
    pub max_streams_per_connection: u32,
    /// An inbound HBONE connection without streams this long is sent GOAWAY.
    pub hbone_idle_timeout: Duration,
}

/// Shared by every listener of every workload on the node.
pub struct ProxyContext {
    pub dsts: OriginalDsts,
    /// Who is where: meshed pods and Services.
    pub directory: MeshDirectory,
    /// Replaced on config reload.
    pub egress: std::sync::RwLock<Arc<EgressPolicy>>,
    /// Open connections per Service endpoint.
    pub endpoint_load: EndpointLoad,
    pub tunnel: Option<Tunnel>,
    pub policy: PolicyStore,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub idle_timeout: Duration,
    pub max_connections_per_workload: usize,
    /// How long open connections may finish once draining starts.
    pub drain_timeout: Duration,
    /// Set once, on SIGTERM: listeners stop accepting and open connections drain.
    pub draining: tokio::sync::watch::Sender<bool>,
}

impl ProxyContext {
    pub fn egress(&self) -> Arc<EgressPolicy> {
        self.egress
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts draining every listener of every workload.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Resolves once draining has started.
    pub async fn drain_started(&self) {
        let mut draining = self.draining.subscribe();
        let _ = draining.wait_for(|d| *d).await;
    }
}

use tokio::{net::TcpListener, task::JoinSet};
use tracing::{info, warn};

use crate::workload::{LocalWorkload, WorkloadId};

/// Which side of the agent a connection was captured on.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// How a listener admits the connections it accepts.
pub(crate) enum Admission {
    /// Each holds one of the workload's permits (`limits.max_connections_per_workload`) from
    /// accept to close; beyond them, refused.
    WorkloadPermit,
    /// The handler admits it (HBONE: a client that has not authenticated yet must not take
    /// what the workload's own traffic needs).
    ByHandler,
}

/// Accepts on `listener` until the task is aborted or draining starts; each connection runs
/// `handle` in a task that is aborted together with this loop (un-enrollment closes the pod's
/// connections), once `admission` admits it. When draining starts, the listener closes (a
/// successor's listener takes the queued connections) and open connections get
/// `drain_timeout` to finish before they are closed.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    admission: Admission,
    workload: Arc<LocalWorkload>,
    ctx: Arc<ProxyContext>,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, Arc<LocalWorkload>, Arc<ProxyContext>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    let drain_started = ctx.drain_started();
    tokio::pin!(drain_started);
    loop {
        tokio::select! {
            () = &mut drain_started => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    // Dual-stack listeners see IPv4 peers as v4-mapped IPv6; logs and policy
                    // want the address the peer has.
                    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                    let permit = match admission {
                        Admission::WorkloadPermit => match workload.connection_permit() {
                            Some(permit) => Some(permit),
                            None => {
                                warn!(workload = %workload.workload.id, listener = what, %peer, close = "max_connections", "connection refused: workload at its connection limit");
                                reset(stream);
                                continue;
                            }
                        },
                        Admission::ByHandler => None,
                    };
                    let work = handle(stream, peer, workload.clone(), ctx.clone());
                    connections.spawn(async move {
                        work.await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let open = connections.len();
    let finished = tokio::time::timeout(ctx.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        warn!(workload = %workload.workload.id, listener = what, open = connections.len(), close = "drain_timeout", "drain time over; closing open connections");
    } else if open > 0 {
        info!(workload = %workload.workload.id, listener = what, connections = open, "listener drained");
    }
}

/// Connects to `dst` from inside the workload's netns, with the agent's mark.
pub(crate) async fn connect_in_pod(
    workload: &LocalWorkload,
    dst: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    workload
        .netns
        .upstream_socket(dst)
        .await?
        .connect(dst)
        .await
}

/// Closes `stream` with a RST, so the peer sees a failure rather than an empty success.
pub(crate) fn reset(mut stream: tokio::net::TcpStream) {
    copy::Abort::abort(&mut stream);
}

/// The identities on both ends of a connection, when it went through the tunnel.
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

/// Who and where a relayed connection is, for its access-log line.
pub(crate) struct AccessRecord<'a> {
    pub direction: Direction,
    pub workload: &'a LocalWorkload,
    pub peer: SocketAddr,
    pub original_dst: SocketAddr,
    /// The Service `original_dst` is a ClusterIP of, if it is one.
    pub service: Option<ServiceName>,
    /// Where the connection went when that is not `original_dst` alone (a Service's endpoint).
    pub upstream: Option<SocketAddr>,
    pub identities: Identities,
    /// The workload at the other end, when its agent said (HBONE baggage).
    pub peer_workload: Option<WorkloadId>,
    /// The authorization decision; inbound only (policy is enforced at the destination).
    pub decision: Option<PolicyDecision>,
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
        let local = Some(&self.workload.workload.id);
        match self.direction {
            Direction::Outbound => (local, self.peer_workload.as_ref()),
            Direction::Inbound => (self.peer_workload.as_ref(), local),
        }
    }

    fn is_mutual_tls(&self) -> bool {
        self.identities.source.is_some() && self.identities.destination.is_some()
    }

    /// Counts the connection in the TCP metrics: opened, or closed with its bytes.
    fn count(&self, metrics: &Metrics, closed: Option<&copy::RelayOutcome>) {
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
            connection_security_policy: if self.is_mutual_tls() {
                "mutual_tls"
            } else {
                "none"
            },
        };
        match closed {
            None => metrics.connection_opened(&labels),
            // `sent` is what the downstream (the source) sent: the request.
            Some(o) => metrics.connection_closed(&labels, o.sent, o.received),
        }
    }
}

/// Relays until the connection ends or `interrupt` resolves (a policy update that now denies it),
/// then writes its one access-log line.
pub(crate) async fn relay_and_log<D, U>(
    record: AccessRecord<'_>,
    downstream: D,
    upstream: U,
    ctx: &ProxyContext,
    interrupt: impl Future<Output = copy::CloseReason>,
) where
    D: copy::RelaySide,
    U: copy::RelaySide,
{
    record.count(&ctx.metrics, None);
    let outcome = copy::relay(downstream, upstream, ctx.idle_timeout, interrupt).await;
    record.count(&ctx.metrics, Some(&outcome));
    log_access(&record, &outcome);
}

fn id_or_dash(id: Option<&SpiffeId>) -> String {
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
        workload = %record.workload.workload.id,
        source_identity = %id_or_dash(ids.source.as_ref()),
        destination_identity = %id_or_dash(ids.destination.as_ref()),
        source_workload = %workload_name(source_workload),
        destination_workload = %workload_name(destination_workload),
        connection_security_policy = if record.is_mutual_tls() { "mutual_tls" } else { "none" },
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

/// Authorizes an inbound connection from `peer` (with `identities.source` when it came through
/// the tunnel) to `original_dst` on `workload`, under the policies in force, and returns its
/// access record. When allowed, the returned future resolves (close reason `policy`) if a later
/// policy update denies it; when denied, the decision is logged with the policy and rule.
pub(crate) fn authorize<'a>(
    ctx: &ProxyContext,
    workload: &'a LocalWorkload,
    peer_addr: SocketAddr,
    original_dst: SocketAddr,
    identities: Identities,
    peer_workload: Option<WorkloadId>,
    started: Instant,
) -> (
    AccessRecord<'a>,
    impl Future<Output = copy::CloseReason> + 'a,
) {
    let mtls = identities.source.is_some();
    let peer = Peer {
        identity: identities.source.clone(),
        ip: peer_addr.ip().to_canonical(),
    };
    let port = original_dst.port();
    let mut updates = ctx.policy.subscribe();
    let target = WorkloadRef::from(&workload.workload);
    let decision = updates
        .borrow_and_update()
        .decide(&target, &peer, port, mtls);
    ctx.metrics.count_decision(&decision);
    if !decision.is_allowed() {
        warn!(
            workload = %workload.workload.id,
            source_identity = %id_or_dash(peer.identity.as_ref()),
            peer = %peer.ip,
            port,
            action = %decision.action,
            reason = decision.reason.as_str(),
            rule = %decision.rule_ref(),
            "connection denied: {decision}"
        );
    }
    let metrics = ctx.metrics.clone();
    let revoked = async move {
        let decision = policy::denied_by_update(updates, target, &peer, port, mtls).await;
        metrics.count_decision(&decision);
        warn!(
            workload = %workload.workload.id,
            source_identity = %id_or_dash(peer.identity.as_ref()),
            peer = %peer.ip,
            port,
            rule = %decision.rule_ref(),
            close = "policy",
            "open connection closed by a policy update: {decision}"
        );
        copy::CloseReason::Policy
    };
    let record = AccessRecord {
        direction: Direction::Inbound,
        workload,
        peer: peer_addr,
        original_dst,
        service: None,
        upstream: None,
        identities,
        peer_workload,
        decision: Some(decision),
        started,
    };
    (record, revoked)
}
