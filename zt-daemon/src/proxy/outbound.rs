//! Outbound: the pod's 127.0.0.1:15001 and [::1]:15001 listeners receive every TCP connect the
//! pod's applications make (rewritten by connect4/6). The original destination comes from the
//! map that sockops keyed by (netns cookie, source port); `route::plan` decides where it goes (a
//! Service's endpoint, the tunnel, plaintext egress or a refusal). A meshed destination is
//! reached over an HBONE stream presenting the workload's SVID and requiring the destination's
//! identity. Without an identity provider the node only captures, and forwards in plain TCP.
//! Upstream sockets are made inside the pod's netns, so traffic leaves with the pod's address.
use std::{future::pending, net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};
use zt_common::HBONE_PORT;

use crate::{
    identity::{
        spiffe::SpiffeId,
        svid::LeafFacts,
        tls::{SvidSlot, client_config},
    },
    proxy::{
        AccessRecord, Admission, Direction, Identities, ProxyContext, Tunnel, accept_loop,
        connect_in_pod,
        copy::{CloseReason, RelayOutcome},
        hbone::{self, H2Stream, SessionCertificate, SessionCertificates, TunnelError},
        log_access,
        pool::{Dialled, Lease, PoolKey},
        relay_and_log, reset,
        route::{self, Refusal, Route, RouteInputs},
    },
    workload::{LocalWorkload, WorkloadId},
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
    let Some(dst) = ctx.dsts.get(workload.netns_cookie, peer.port()) else {
        // Not captured by us (e.g. something connected to 15001 directly): refuse.
        warn!(workload = %workload.workload.id, %peer, "outbound connection without an original destination; closing");
        return;
    };
    let id = &workload.workload.id;
    let egress = ctx.egress();
    let plan = route::plan(
        dst,
        &id.namespace,
        &RouteInputs {
            directory: &ctx.directory,
            egress: &egress,
            tunnel: ctx.tunnel.is_some(),
            load: &ctx.endpoint_load,
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
        started,
    };
    match (plan.route, &ctx.tunnel) {
        (Route::Tunnel { endpoint, identity }, Some(tunnel)) => {
            match open_tunnel(workload, tunnel, endpoint, &identity).await {
                Ok((stream, source, peer_workload)) => {
                    let record = AccessRecord {
                        identities: Identities {
                            source: Some(source),
                            destination: Some(identity),
                        },
                        peer_workload,
                        ..plain
                    };
                    relay_and_log(record, app, stream, ctx, pending()).await;
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
                            source: workload
                                .svid
                                .as_ref()
                                .and_then(|s| s.get())
                                .map(|s| s.id().clone()),
                            destination: Some(identity),
                        },
                        ..plain
                    };
                    refuse(&record, app, close, ctx);
                }
            }
        }
        (Route::Refuse(Refusal::NoEndpoints), _) => {
            warn!(workload = %id, original_dst = %dst, service = ?plain.service.as_ref().map(ToString::to_string), "refused: the Service has no ready endpoint");
            refuse(&plain, app, CloseReason::NoEndpoints, ctx);
        }
        (Route::Refuse(Refusal::EgressDenied), _) => {
            warn!(workload = %id, original_dst = %dst, "refused: outside the mesh, and the egress policy does not allow it");
            refuse(&plain, app, CloseReason::EgressDenied, ctx);
        }
        (Route::Passthrough { endpoint } | Route::Tunnel { endpoint, .. }, _) => {
            match connect_in_pod(workload, endpoint).await {
                Ok(upstream) => relay_and_log(plain, app, upstream, ctx, pending()).await,
                Err(e) => {
                    warn!(workload = %id, original_dst = %dst, %endpoint, error = %e, "outbound connect failed");
                    refuse(&plain, app, CloseReason::ConnectFailed, ctx);
                }
            }
        }
    }
}

/// Resets a captured connection that was never relayed, counts it, and writes its access-log
/// line.
fn refuse(record: &AccessRecord<'_>, app: TcpStream, close: CloseReason, ctx: &ProxyContext) {
    reset(app);
    ctx.metrics.outbound_refused(close.as_str());
    log_access(record, &RelayOutcome::refused(close));
}

/// Opens an HBONE stream to `dst` as `workload`, requiring `expected`: on a pooled connection of
/// this pod to that destination if one is usable, else on a new one. Returns the stream, the
/// source identity it speaks for, and the destination workload if its agent said.
async fn open_tunnel(
    workload: &LocalWorkload,
    tunnel: &Tunnel,
    dst: SocketAddr,
    expected: &SpiffeId,
) -> Result<(H2Stream, SpiffeId, Option<WorkloadId>), TunnelError> {
    let slot = workload.svid.clone().ok_or(TunnelError::NoCertificate)?;
    let source = slot
        .get()
        .map(|s| s.id().clone())
        .ok_or(TunnelError::NoCertificate)?;
    let key = PoolKey {
        source_netns: workload.netns_cookie,
        source_workload: workload.workload.id.clone(),
        source: source.clone(),
        destination: dst.ip(),
        expected: expected.clone(),
    };
    // A reused connection may have broken (or been sent GOAWAY) since its last stream: then
    // once more, on another connection.
    let mut attempts = 2;
    loop {
        attempts -= 1;
        let lease = tunnel
            .pool
            .checkout(&key, || dial(workload, tunnel, slot.clone(), dst, expected))
            .await?;
        let (fresh, connection) = (lease.fresh, lease.connection);
        match open_stream(lease, workload, dst, expected).await {
            Ok((stream, peer)) => return Ok((stream, source, peer)),
            // The peer answered: the connection is fine and asking again would get the same.
            Err(e @ TunnelError::Refused(..)) => return Err(e),
            Err(e) if !fresh && attempts > 0 => {
                debug!(workload = %workload.workload.id, original_dst = %dst, error = %e, "pooled HBONE connection unusable; replacing it");
                tunnel.pool.evict(&key, connection);
            }
            Err(e) => return Err(e),
        }
    }
}

/// A new mutual-TLS HTTP/2 connection from inside the workload's pod to `dst`'s HBONE port,
/// presenting the workload's SVID and requiring `expected`.
async fn dial(
    workload: &LocalWorkload,
    tunnel: &Tunnel,
    slot: SvidSlot,
    dst: SocketAddr,
    expected: &SpiffeId,
) -> Result<Dialled, TunnelError> {
    // Read before the handshake: a rotation during it presents a certificate that lives longer.
    let local = slot.get().ok_or(TunnelError::NoCertificate)?;
    let config = client_config(slot, tunnel.trust.clone(), Some(expected.clone()))?;
    let hbone = SocketAddr::new(dst.ip(), HBONE_PORT);
    let tcp = connect_in_pod(workload, hbone)
        .await
        .map_err(|e| TunnelError::Connect(hbone, e))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = rustls::pki_types::ServerName::IpAddress(dst.ip().into());
    let tls = tokio::time::timeout(
        tunnel.handshake_timeout,
        connector.connect(server_name, tcp),
    )
    .await
    .map_err(|_| TunnelError::HandshakeTimeout)?
    .map_err(TunnelError::Handshake)?;
    let peer_chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    let peer = peer_chain
        .first()
        .and_then(|leaf| LeafFacts::parse(leaf).ok())
        .ok_or(TunnelError::NoServerSvid(hbone))?;
    let peer_certificate = SessionCertificate::peer(&peer, peer_chain);
    let (send, connection) = hbone::client_builder().handshake(tls).await?;
    Ok(Dialled {
        send,
        connection: Box::pin(connection),
        certificates: SessionCertificates {
            local: SessionCertificate::from(&local),
            peer: peer_certificate,
        },
        peer: hbone,
    })
}

/// One CONNECT stream to `dst` on a leased pooled connection, and the destination workload if
/// its agent said.
async fn open_stream(
    lease: Lease,
    workload: &LocalWorkload,
    dst: SocketAddr,
    expected: &SpiffeId,
) -> Result<(H2Stream, Option<WorkloadId>), TunnelError> {
    let mut send_request = lease.send.ready().await?;
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(dst.to_string())
        .header("baggage", hbone::baggage(&workload.workload.id))
        .body(())?;
    let (response, send) = send_request.send_request(request, false)?;
    let response = response.await?;
    if response.status() != http::StatusCode::OK {
        return Err(TunnelError::Refused(dst, response.status()));
    }
    let peer = hbone::peer_workload(response.headers(), expected);
    Ok((
        H2Stream::new(send, response.into_body()).on_pooled(lease.guard),
        peer,
    ))
}
