//! Same-node connections under `mtls.same_node = "splice"`: the destination is a meshed pod
//! enrolled on this node, so this agent is both ends' agent. It authorizes the connection as the
//! destination's inbound side would, with the source's identity (the one it issued to the pod it
//! accepted the connection from), connects to the application from inside the destination pod,
//! and splices its two sockets in the kernel (`capture::Splicer`, `crate::splice`). Both sides
//! get their access record and metrics, as for a tunnelled connection, with
//! `connection_security_policy = node_local`.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;
use tracing::warn;

use super::{AccessRecord, Identities, ProxyContext, access, authorize, log_access, reset};
use crate::{
    capture::Splicer,
    copy::{CloseReason, RelayOutcome},
    enrollment::LocalWorkload,
    identity::spiffe::SpiffeId,
};

/// The two ends of a same-node connection, as the outbound side found them.
pub(super) struct Ends<'a> {
    pub source: &'a LocalWorkload,
    pub source_id: SpiffeId,
    pub destination: Arc<LocalWorkload>,
    pub destination_id: SpiffeId,
    /// The destination address (the application's), after Service resolution.
    pub endpoint: SocketAddr,
}

/// Serves one same-node connection accepted from `app`; `outbound` is its source-side record.
pub(super) async fn serve(
    app: TcpStream,
    ends: Ends<'_>,
    outbound: AccessRecord<'_>,
    splicer: &Splicer,
    ctx: &ProxyContext,
) {
    let started = Instant::now();
    let identities = || Identities {
        source: Some(ends.source_id.clone()),
        destination: Some(ends.destination_id.clone()),
    };
    let outbound = AccessRecord {
        identities: identities(),
        peer_workload: Some(ends.destination.workload.id.clone()),
        spliced: true,
        ..outbound
    };
    // The destination sees the source pod's address, as the tunnel's inbound side would.
    let source_ip = ends
        .source
        .addresses
        .iter()
        .find(|a| a.is_ipv4() == ends.endpoint.is_ipv4())
        .or(ends.source.addresses.first())
        .copied()
        .unwrap_or(outbound.peer.ip());
    let (inbound, denied_later) = authorize(
        ctx,
        &ends.destination,
        SocketAddr::new(source_ip, outbound.peer.port()),
        ends.endpoint,
        identities(),
        Some(ends.source.workload.id.clone()),
        started,
    );
    let inbound = AccessRecord {
        spliced: true,
        ..inbound
    };
    if !inbound.is_allowed() {
        log_access(&inbound, &RelayOutcome::refused(CloseReason::Policy));
        access::refuse(&outbound, app, CloseReason::TunnelRefused, ctx);
        return;
    }
    // The connection counts against the destination's limit, as its tunnel stream would.
    let Some(_permit) = ends.destination.connection_permit() else {
        warn!(workload = %ends.destination.workload.id, source_identity = %ends.source_id, "same-node connection refused: the destination is at max_connections_per_workload");
        access::refuse(&outbound, app, CloseReason::TunnelRefused, ctx);
        return;
    };
    let upstream = match ends.destination.connect(ends.endpoint).await {
        Ok(s) => s,
        Err(e) => {
            warn!(workload = %ends.destination.workload.id, original_dst = %ends.endpoint, error = %e, "same-node: application unreachable");
            log_access(&inbound, &RelayOutcome::refused(CloseReason::ConnectFailed));
            access::refuse(&outbound, app, CloseReason::ConnectFailed, ctx);
            return;
        }
    };
    let splice = match splicer.splice(&app, &upstream) {
        Ok(s) => s,
        Err(e) => {
            // A failed splice has removed what it inserted; the sockets close here.
            warn!(workload = %ends.source.workload.id, original_dst = %ends.endpoint, error = %e, "same-node: splicing failed");
            reset(upstream);
            access::refuse(&outbound, app, CloseReason::TunnelFailed, ctx);
            return;
        }
    };
    outbound.count(&ctx.metrics, None);
    inbound.count(&ctx.metrics, None);
    let outcome = crate::splice::relay(app, upstream, splice, ctx.idle_timeout, denied_later).await;
    for record in [&outbound, &inbound] {
        record.count(&ctx.metrics, Some(&outcome));
        log_access(record, &outcome);
    }
}
