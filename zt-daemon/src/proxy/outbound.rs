//! Outbound: the pod's 127.0.0.1:15001 and [::1]:15001 listeners receive every TCP connect the
//! pod's applications make (rewritten by connect4/6). The original destination comes from the
//! map that sockops keyed by (netns cookie, source port); `route::plan` decides where it goes (a
//! Service's endpoint, the tunnel, plaintext egress or a refusal). A meshed destination is
//! reached over an HBONE stream presenting the workload's SVID and requiring the destination's
//! identity. Without an identity provider the node only captures, and forwards in plain TCP.
//! Upstream sockets are made inside the pod's netns, so traffic leaves with the pod's address.
use std::{
    future::{pending, ready},
    net::SocketAddr,
    pin::pin,
    sync::Arc,
    time::Instant,
};

use futures_util::future::Either;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::{
    copy::CloseReason,
    enrollment::LocalWorkload,
    identity::spiffe::SpiffeId,
    proxy::{
        AccessRecord, Admission, Direction, Identities, ProxyContext, accept_loop, access,
        relay_and_log,
        route::{self, Refusal, Route, RouteInputs},
        same_node,
    },
    tunnel::{
        client::{EarlyBytes, open_tunnel},
        error::TunnelError,
    },
};

pub async fn serve(listener: TcpListener, workload: Arc<LocalWorkload>, ctx: Arc<ProxyContext>) {
    accept_loop(
        listener,
        "outbound",
        Admission::WorkloadPermit,
        workload,
        ctx,
        |stream, peer, w, c| async move { handle(stream, peer, &w, &c).await },
    )
    .await
}

async fn handle(app: TcpStream, peer: SocketAddr, workload: &LocalWorkload, ctx: &ProxyContext) {
    let started = Instant::now();
    let Some(dst) = ctx.dsts.original_dst(workload.netns_cookie, peer.port()) else {
        // Not captured by us (e.g. something connected to 15001 directly): refuse.
        warn!(workload = %workload.id, %peer, "outbound connection without an original destination; closing");
        return;
    };
    let id = &workload.id;
    let egress = ctx.egress();
    let plan = route::plan(
        dst,
        &id.namespace,
        &RouteInputs {
            directory: &ctx.directory,
            egress: &egress,
            tunnel: ctx.tunnel.is_some(),
        },
    );
    // Held until the connection ends: the endpoint's count of open connections.
    let _lease = plan.lease;
    let plain = AccessRecord {
        direction: Direction::Outbound,
        workload,
        peer,
        original_dst: dst,
        service: plan.service,
        // The endpoint, when it is not the original destination (a Service's).
        upstream: plan.endpoint.filter(|e| *e != dst),
        identities: Identities::NONE,
        peer_workload: None,
        decision: None,
        sent_with_connect: 0,
        node_local: None,
        started,
    };
    match (plan.route, &ctx.tunnel) {
        (Route::Tunnel { endpoint, identity }, Some(tunnel)) => {
            if let Some(splicer) = &ctx.splicer
                && let Some(ends) = same_node::Ends::find(workload, endpoint, &identity, ctx)
            {
                return Box::pin(same_node::serve(app, ends, plain, splicer, tunnel, ctx)).await;
            }
            let mut early = EarlyBytes::new(&app);
            // Boxed, as every future that ends before the relay starts: a connection's task then
            // holds only what its relay needs while the connection is open (idle memory).
            let opened = Box::pin(open_tunnel(
                workload, tunnel, endpoint, &identity, &mut early,
            ))
            .await;
            let (sent_with_connect, failed) = (early.sent(), early.failed.take());
            // What went early is kept for a retry only: not for the connection's life.
            drop(early);
            match opened {
                Ok((stream, source, peer_workload)) => {
                    let record = AccessRecord {
                        identities: Identities {
                            source: Some(source),
                            destination: Some(identity),
                        },
                        peer_workload,
                        sent_with_connect,
                        ..plain
                    };
                    // An application that reset while its CONNECT was answered resets the
                    // stream too: not a clean end.
                    let interrupt = pin!(match failed {
                        Some(_) => Either::Left(ready(CloseReason::DownstreamReset)),
                        None => Either::Right(pending()),
                    });
                    relay_and_log(&record, app, stream, ctx, interrupt).await;
                }
                Err(e) if e.relay_reset_by_destination() => {
                    debug!(workload = %id, original_dst = %dst, %endpoint, destination_identity = %identity, "the destination reset the connection before answering");
                    let record = AccessRecord {
                        identities: Identities {
                            source: workload_identity(workload),
                            destination: Some(identity),
                        },
                        sent_with_connect,
                        ..plain
                    };
                    access::reset_before_answer(&record, app, ctx);
                }
                Err(e) => {
                    if let Some(reason) = e.handshake_failure() {
                        ctx.metrics.handshake_failed(reason);
                    }
                    warn!(workload = %id, original_dst = %dst, %endpoint, destination_identity = %identity, error = %e, "HBONE connect failed");
                    let close = match e {
                        TunnelError::Refused(..) => CloseReason::TunnelRefused,
                        _ => CloseReason::TunnelFailed,
                    };
                    let record = AccessRecord {
                        identities: Identities {
                            source: workload_identity(workload),
                            destination: Some(identity),
                        },
                        ..plain
                    };
                    access::refuse(&record, app, close, ctx);
                }
            }
        }
        (Route::Refuse(Refusal::NoEndpoints), _) => {
            warn!(workload = %id, original_dst = %dst, service = ?plain.service.as_ref().map(ToString::to_string), "refused: the Service has no ready endpoint");
            access::refuse(&plain, app, CloseReason::NoEndpoints, ctx);
        }
        (Route::Refuse(Refusal::EgressDenied), _) => {
            warn!(workload = %id, original_dst = %dst, "refused: outside the mesh, and the egress policy does not allow it");
            access::refuse(&plain, app, CloseReason::EgressDenied, ctx);
        }
        (Route::Passthrough { endpoint } | Route::Tunnel { endpoint, .. }, _) => {
            match workload.connect(endpoint, ctx.connect_timeout).await {
                Ok(upstream) => relay_and_log(&plain, app, upstream, ctx, pin!(pending())).await,
                Err(e) => {
                    warn!(workload = %id, original_dst = %dst, %endpoint, error = %e, "outbound connect failed");
                    access::refuse(&plain, app, CloseReason::ConnectFailed, ctx);
                }
            }
        }
    }
}

/// The identity `workload`'s current certificate names, if it has one.
fn workload_identity(workload: &LocalWorkload) -> Option<SpiffeId> {
    workload
        .svid
        .as_ref()
        .and_then(|s| s.get())
        .map(|s| s.id().clone())
}
