//! The client side of the tunnel: an HBONE stream to a destination pod as one of this node's
//! workloads, on a pooled connection of that pod when one is usable, else on a new mutual-TLS
//! HTTP/2 connection dialled from inside the pod (one dial per pool key, `pool`).
use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use tracing::debug;
use zt_common::HBONE_PORT;

use super::{
    Tunnel,
    error::TunnelError,
    hbone,
    pool::{Dialled, Lease, PoolKey},
    session::{SessionCertificate, SessionCertificates},
    stream::H2Stream,
};
use crate::{
    enrollment::LocalWorkload,
    identity::{
        spiffe::SpiffeId,
        svid::LeafFacts,
        tls::{SvidSlot, client_config},
    },
    workload::WorkloadId,
};

/// Opens an HBONE stream to `dst` as `workload`, requiring `expected`: on a pooled connection of
/// this pod to that destination if one is usable, else on a new one. `first` is sent right after
/// the CONNECT's headers, without waiting for the answer. Returns the stream, the source identity
/// it speaks for, and the destination workload if its agent said.
pub async fn open_tunnel(
    workload: &LocalWorkload,
    tunnel: &Tunnel,
    dst: SocketAddr,
    expected: &SpiffeId,
    first: Option<&Bytes>,
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
        match open_stream(lease, workload, dst, expected, first).await {
            Ok((stream, peer)) => return Ok((stream, source, peer)),
            // The peer answered: the connection is fine and asking again would get the same.
            Err(e @ TunnelError::Refused(..)) => return Err(e),
            // Once `first` has gone out, only a stream the peer cannot have processed is tried
            // again: the application's bytes must not arrive twice.
            Err(e) if !fresh && attempts > 0 && (first.is_none() || e.unprocessed()) => {
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
    let tcp = workload
        .connect(hbone)
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

/// One CONNECT stream to `dst` on a leased pooled connection, with `first` right behind its
/// headers, and the destination workload if its agent said.
async fn open_stream(
    lease: Lease,
    workload: &LocalWorkload,
    dst: SocketAddr,
    expected: &SpiffeId,
    first: Option<&Bytes>,
) -> Result<(H2Stream, Option<WorkloadId>), TunnelError> {
    let mut send_request = lease.send.ready().await?;
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(dst.to_string())
        .header("baggage", hbone::baggage(&workload.workload.id))
        .body(())?;
    let (response, mut send) = send_request.send_request(request, false)?;
    if let Some(first) = first {
        // Within the stream's initial window (megabytes), so it goes out with the headers.
        send.reserve_capacity(first.len());
        send.send_data(first.clone(), false)?;
    }
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
