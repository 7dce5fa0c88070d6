//! Same-node connections under `mtls.same_node = "splice"`: the destination is a meshed pod
//! enrolled on this node, so this agent is both ends' agent. It checks both workloads'
//! certificates as a TLS handshake would (unexpired, not revoked), authorizes the connection as
//! the destination's inbound side would with the source's identity (the one it issued to the pod
//! it accepted the connection from), connects to the application from inside the destination
//! pod, and splices its two sockets in the kernel (`capture::Splicer`, `crate::splice`). A
//! connection the kernel cannot splice (one that already half-closed) is copied like any other.
//! It closes when a policy update denies it, either certificate is revoked, or the destination
//! is removed. Both sides get their access record and metrics, as for a tunnelled connection,
//! with `connection_security_policy = node_local`. Under `"direct"`, an allowed connection also
//! grants its source the path past the agent to the address it dialed (`proxy::direct`).
use std::{
    future::pending,
    net::{IpAddr, SocketAddr},
    pin::pin,
    sync::Arc,
    time::Instant,
};

use tokio::net::TcpStream;
use tracing::{debug, warn};
use zt_common::is_agent_port;

use super::{AccessRecord, Identities, NodeLocal, ProxyContext, access, authorize, log_access};
use crate::{
    capture::{DirectPaths, Splicer},
    copy::{self, CloseReason, RelayOutcome},
    enrollment::LocalWorkload,
    identity::{spiffe::SpiffeId, svid::Svid},
    tunnel::{Tunnel, session::SessionCertificates},
};

/// The two ends of a same-node connection, as the outbound side found them.
pub(super) struct Ends<'a> {
    source: &'a LocalWorkload,
    source_svid: Svid,
    destination: Arc<LocalWorkload>,
    destination_svid: Svid,
    /// The destination address (the application's), after Service resolution.
    endpoint: SocketAddr,
    /// Under `"direct"`, the grant epoch as it was before the ends were looked up: a grant on
    /// what they were then is void if the pods, policy or trust changed since.
    epoch: Option<u64>,
}

impl<'a> Ends<'a> {
    /// Both ends, when `endpoint` is a workload enrolled on this node with the identity the
    /// directory gives it (`identity`), both have certificates, and the port is the
    /// application's (a connection to an agent port takes the tunnel, which refuses it).
    pub fn find(
        source: &'a LocalWorkload,
        endpoint: SocketAddr,
        identity: &SpiffeId,
        ctx: &ProxyContext,
    ) -> Option<Self> {
        if is_agent_port(endpoint.port()) {
            return None;
        }
        let epoch = ctx.direct.as_ref().map(DirectPaths::epoch);
        let ip = endpoint.ip().to_canonical();
        let destination = ctx
            .directory
            .node()
            .enrolled
            .iter()
            .find(|w| w.addresses.contains(&ip))?
            .clone();
        let ends = Self::between(source, destination, endpoint)?;
        (ends.destination_svid.id() == identity).then_some(Self { epoch, ..ends })
    }

    /// The ends of a connection from `source` to `endpoint` in `destination`, when both have
    /// certificates.
    pub fn between(
        source: &'a LocalWorkload,
        destination: Arc<LocalWorkload>,
        endpoint: SocketAddr,
    ) -> Option<Self> {
        let destination_svid = destination.svid.as_ref()?.get()?;
        let source_svid = source.svid.as_ref()?.get()?;
        Some(Self {
            source,
            source_svid,
            destination,
            destination_svid,
            endpoint,
            epoch: None,
        })
    }

    /// The source pod's own address of the destination's family (policy's `ipBlocks` see it):
    /// known from its enrollment, not from a socket it could have bound elsewhere.
    pub fn source_ip(&self) -> Option<IpAddr> {
        let addresses = &self.source.addresses;
        addresses
            .iter()
            .find(|a| a.is_ipv4() == self.endpoint.is_ipv4())
            .or(addresses.first())
            .copied()
    }

    pub fn identities(&self) -> Identities {
        Identities {
            source: Some(self.source_svid.id().clone()),
            destination: Some(self.destination_svid.id().clone()),
        }
    }

    /// The certificates the connection stands on, as a tunnel session's (the destination's
    /// is the local side).
    pub fn certificates(&self) -> SessionCertificates {
        SessionCertificates {
            local: (&self.destination_svid).into(),
            peer: (&self.source_svid).into(),
        }
    }
}

/// Serves one same-node connection accepted from `app`; `outbound` is its source-side record.
pub(super) async fn serve(
    app: TcpStream,
    ends: Ends<'_>,
    outbound: AccessRecord<'_>,
    splicer: &Splicer,
    tunnel: &Tunnel,
    ctx: &ProxyContext,
) {
    let started = Instant::now();
    let outbound = AccessRecord {
        identities: ends.identities(),
        peer_workload: Some(ends.destination.id.clone()),
        node_local: Some(NodeLocal::Spliced),
        ..outbound
    };
    // What a TLS handshake between the two would have refused.
    let certificates = ends.certificates();
    if let Err(why) = certificates.check(&tunnel.trust.current(), std::time::SystemTime::now()) {
        ctx.metrics.handshake_failed(why.reason());
        warn!(workload = %ends.source.id, original_dst = %ends.endpoint, reason = %why, "same-node connection refused: {why}");
        access::refuse(&outbound, app, CloseReason::TunnelFailed, ctx);
        return;
    }
    // The destination sees the source pod's address, as the tunnel's inbound side would.
    let source_ip = ends.source_ip().unwrap_or(outbound.peer.ip());
    let (inbound, denied_later) = authorize(
        ctx,
        &ends.destination,
        SocketAddr::new(source_ip, outbound.peer.port()),
        ends.endpoint,
        ends.identities(),
        Some(ends.source.id.clone()),
        started,
    );
    let inbound = AccessRecord {
        node_local: Some(NodeLocal::Spliced),
        ..inbound
    };
    if !inbound.is_allowed() {
        log_access(&inbound, &RelayOutcome::refused(CloseReason::Policy));
        access::refuse(&outbound, app, CloseReason::TunnelRefused, ctx);
        return;
    }
    // The connection counts against the destination's limit, as its tunnel stream would.
    let Some(_permit) = ends.destination.connection_permit() else {
        warn!(workload = %ends.destination.id, source_identity = %ends.source_svid.id(), "same-node connection refused: the destination is at max_connections_per_workload");
        access::refuse(&outbound, app, CloseReason::MaxConnections, ctx);
        return;
    };
    let upstream = match ends
        .destination
        .connect(ends.endpoint, ctx.connect_timeout)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            warn!(workload = %ends.destination.id, original_dst = %ends.endpoint, error = %e, "same-node: application unreachable");
            log_access(&inbound, &RelayOutcome::refused(CloseReason::ConnectFailed));
            access::refuse(&outbound, app, CloseReason::ConnectFailed, ctx);
            return;
        }
    };
    if let (Some(direct), Some(epoch)) = (&ctx.direct, ends.epoch) {
        grant_direct(direct, epoch, &ends, outbound.original_dst);
    }
    let interrupt = pin!(async {
        tokio::select! {
            reason = denied_later => reason,
            reason = revoked(&certificates, tunnel) => reason,
            () = ends.destination.removed() => CloseReason::UpstreamReset,
        }
    });
    outbound.count(&ctx.metrics, None);
    inbound.count(&ctx.metrics, None);
    let outcome = match splicer.splice(&app, &upstream) {
        Ok(splice) => {
            crate::splice::relay(app, upstream, splice, ctx.idle_timeout, interrupt).await
        }
        Err(e) => {
            // Most often the application already half-closed (the kernel splices only
            // established sockets): copy it instead. A failed splice removed what it inserted.
            debug!(workload = %ends.source.id, original_dst = %ends.endpoint, error = %e, "same-node: not spliced, copied");
            copy::relay(app, upstream, ctx.idle_timeout, interrupt).await
        }
    };
    for record in [&outbound, &inbound] {
        record.count(&ctx.metrics, Some(&outcome));
        log_access(record, &outcome);
    }
}

/// Lets the source's next connections to the address it dialed go pod to pod, now that this
/// one was allowed. Not for a Service's address: which endpoint a connection to it reaches is
/// the agent's choice, each time.
fn grant_direct(direct: &DirectPaths, epoch: u64, ends: &Ends<'_>, dialed: SocketAddr) {
    if dialed.ip().to_canonical() != ends.endpoint.ip().to_canonical()
        || dialed.port() != ends.endpoint.port()
    {
        return;
    }
    // The kernel records a granted connection only from the address the grant names: a pod
    // with several of the family (which the kernel may pick among) keeps the agent's path.
    let mut own = ends
        .source
        .addresses
        .iter()
        .filter(|a| a.is_ipv4() == ends.endpoint.ip().to_canonical().is_ipv4());
    let (Some(&source_ip), None) = (own.next(), own.next()) else {
        return;
    };
    match direct.grant(
        ends.source.netns_cookie,
        source_ip,
        ends.endpoint,
        ends.destination.netns_cookie,
        epoch,
    ) {
        Ok(()) => {
            debug!(workload = %ends.source.id, destination = %ends.endpoint, epoch, "same-node: direct path granted")
        }
        // The next connection takes this path again; nothing is lost.
        Err(e) => {
            warn!(workload = %ends.source.id, destination = %ends.endpoint, error = %e, "same-node: direct path not granted")
        }
    }
}

/// Resolves when a trust update revokes either certificate (or they no longer chain to their
/// bundle), as it would close a tunnel connection.
async fn revoked(certificates: &SessionCertificates, tunnel: &Tunnel) -> CloseReason {
    let mut changes = tunnel.trust.subscribe();
    while changes.changed().await.is_ok() {
        let trust = changes.borrow_and_update().clone();
        if let Err(why) = certificates.check(&trust, std::time::SystemTime::now())
            && why.closes_now()
        {
            warn!(close = "policy", reason = %why, "same-node connection closed: {why}");
            return CloseReason::Policy;
        }
    }
    pending().await
}
