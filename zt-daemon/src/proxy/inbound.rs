//! Inbound. sk_lookup steers every TCP connection for the pod's address (except 15008 and the
//! pod's own traffic) to the pod's 15006 listener; 15008 is the HBONE listener.
//!
//! - 15006 (plaintext): with an identity provider and `mtls.mode = strict`, refused; otherwise the
//!   accepted socket's local address is the original destination, and the agent connects to it
//!   from inside the pod over loopback, which sk_lookup lets through.
//! - 15008 (HBONE): mutual TLS presenting the workload's SVID and requiring a client SVID, then
//!   HTTP/2 CONNECT streams. Each stream may only reach this pod's own addresses: the agent is
//!   never an open proxy. Until its handshake completes a client has proven nothing, so what it
//!   holds is bounded per source address (`limits.max_handshakes_per_source`), not by the
//!   workload's connection limit, which the workload's own traffic needs. An established
//!   connection is sent GOAWAY when it idles, when either side's certificate expires, and closed
//!   when either is revoked.
use std::{
    net::{IpAddr, SocketAddr},
    pin::pin,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};
use zt_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use crate::{
    copy::{CloseReason, RelayOutcome},
    enrollment::LocalWorkload,
    identity::{
        spiffe::SpiffeId,
        svid::LeafFacts,
        tls::{ALPN_H2, handshake_failure_reason, server_config},
    },
    proxy::{
        Admission, Identities, ProxyContext, accept_loop, authorize, holding, log_access,
        relay_and_log, reset,
    },
    tunnel::{
        Tunnel, hbone,
        server::{self, ServedConnection, ServerLimits},
        session::{SessionCertificate, SessionCertificates},
        stream::H2Stream,
    },
};

const AGENT_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT];

pub async fn serve_plaintext(
    listener: TcpListener,
    workload: Arc<LocalWorkload>,
    ctx: Arc<ProxyContext>,
) {
    accept_loop(
        listener,
        "inbound",
        Admission::WorkloadPermit,
        workload,
        ctx,
        |stream, peer, w, c| async move { handle_plaintext(stream, peer, &w, &c).await },
    )
    .await
}

pub async fn serve_hbone(
    listener: TcpListener,
    workload: Arc<LocalWorkload>,
    ctx: Arc<ProxyContext>,
) {
    accept_loop(
        listener,
        "hbone",
        Admission::ByHandler,
        workload,
        ctx,
        |stream, peer, w, c| async move {
            match &c.tunnel {
                Some(tunnel) => handle_hbone(stream, peer, &w, tunnel, &c).await,
                None => {
                    debug!(workload = %w.id, %peer, "no identity provider: HBONE refused")
                }
            }
        },
    )
    .await
}

async fn handle_plaintext(
    client: TcpStream,
    peer: SocketAddr,
    workload: &LocalWorkload,
    ctx: &ProxyContext,
) {
    let started = Instant::now();
    let id = &workload.id;
    let dst = match client.local_addr() {
        Ok(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
        Err(e) => {
            warn!(workload = %id, %peer, error = %e, "inbound: no local address");
            return;
        }
    };
    if AGENT_PORTS.contains(&dst.port()) {
        // Forwarding to our own ports would loop.
        warn!(workload = %id, %peer, original_dst = %dst, "inbound to an agent port; closing");
        return;
    }
    // Plaintext has no identity: policy sees only the address, and a STRICT PeerAuthentication
    // (or mtls.mode) refuses it.
    let (record, denied_later) =
        authorize(ctx, workload, peer, dst, Identities::NONE, None, started);
    if !record.is_allowed() {
        log_access(&record, &RelayOutcome::refused(CloseReason::Policy));
        reset(client);
        return;
    }
    let app = match workload.connect(dst, ctx.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            warn!(workload = %id, %peer, original_dst = %dst, error = %e, "inbound: application unreachable");
            reset(client);
            return;
        }
    };
    relay_and_log(&record, client, app, ctx, pin!(denied_later)).await;
}

async fn handle_hbone(
    stream: TcpStream,
    peer: SocketAddr,
    workload: &Arc<LocalWorkload>,
    tunnel: &Tunnel,
    ctx: &Arc<ProxyContext>,
) {
    let id = &workload.id;
    // Logged at debug only: a flood must not flood the log too; the counter tells.
    let Some(unauthenticated) = tunnel.handshakes.try_acquire(peer.ip()) else {
        ctx.metrics.handshake_failed("too_many_handshakes");
        debug!(workload = %id, %peer, "HBONE refused: the source has too many handshakes pending");
        reset(stream);
        return;
    };
    let Some(slot) = workload.svid.clone() else {
        warn!(workload = %id, %peer, "HBONE refused: the workload has no identity");
        return;
    };
    let Some(local_svid) = slot.get() else {
        warn!(workload = %id, %peer, "HBONE refused: the workload has no certificate yet");
        return;
    };
    let config = match server_config(slot, tunnel.trust.clone()) {
        Ok(c) => c,
        Err(e) => {
            warn!(workload = %id, error = %e, "HBONE: TLS configuration");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let tls = match tokio::time::timeout(tunnel.handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = handshake_failure_reason(&e);
            ctx.metrics.handshake_failed(reason);
            warn!(workload = %id, %peer, error = %e, reason, "HBONE: TLS handshake failed");
            return;
        }
        Err(_) => {
            ctx.metrics.handshake_failed("timeout");
            warn!(workload = %id, %peer, "HBONE: TLS handshake timed out");
            return;
        }
    };
    if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
        ctx.metrics.handshake_failed("no_alpn");
        warn!(workload = %id, %peer, "HBONE refused: client did not negotiate ALPN h2");
        return;
    }
    let peer_chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    let peer_leaf = peer_chain
        .first()
        .and_then(|leaf| LeafFacts::parse(leaf).ok());
    let Some(peer_leaf) = peer_leaf else {
        // The verifier already required an SVID; this cannot happen with a completed handshake.
        return;
    };
    let peer_id = peer_leaf.id.clone();
    // A certificate is only good from its own pod: when the mesh knows the source address, it
    // must belong to the identity presented (a stolen key used from elsewhere is refused).
    if let Some(owner) = ctx.directory.lookup(peer.ip())
        && owner != peer_id
    {
        ctx.metrics.handshake_failed("source_address_mismatch");
        warn!(workload = %id, %peer, source_identity = %peer_id, address_owner = %owner, "HBONE refused: the source address belongs to another identity");
        return;
    }
    // Authenticated: from here the connection counts against its source's bound. Not against
    // the workload's connections, which its streams take: a peer holding connections whose
    // streams policy refuses would otherwise use up the workload's budget, outbound included.
    drop(unauthenticated);
    let Some(_established) = tunnel.established.try_acquire(peer.ip()) else {
        ctx.metrics.hbone_stream_refused("source_connections");
        debug!(workload = %id, %peer, source_identity = %peer_id, "HBONE connection refused: its source holds max_hbone_connections_per_source");
        return;
    };
    let certificates = SessionCertificates {
        local: SessionCertificate::from(&local_svid),
        peer: SessionCertificate::peer(&peer_leaf, peer_chain),
    };
    let local_id = Some(local_svid.id().clone());
    info!(workload = %id, %peer, source_identity = %peer_id, "HBONE connection accepted");
    let limits = ServerLimits {
        handshake_timeout: tunnel.handshake_timeout,
        max_streams: tunnel.max_streams_per_connection,
        idle_timeout: tunnel.hbone_idle_timeout,
    };
    let who = ServedConnection {
        workload: id,
        peer,
        source: &peer_id,
    };
    server::serve(
        tls,
        limits,
        &certificates,
        &tunnel.trust,
        ctx.drain_started(),
        who,
        |request, respond| {
            // Each stream is a captured connection and counts against the workload's limit.
            let Some(permit) = workload.connection_permit() else {
                ctx.metrics.hbone_stream_refused("max_connections");
                warn!(workload = %id, %peer, source_identity = %peer_id, close = "max_connections", "HBONE stream refused: workload at its connection limit");
                refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
                return;
            };
            let (workload, ctx) = (workload.clone(), ctx.clone());
            let identities = Identities {
                source: Some(peer_id.clone()),
                destination: local_id.clone(),
            };
            let answer_hold = tunnel.answer_hold;
            let work = handle_connect(request, respond, peer, workload, identities, answer_hold, ctx);
            tokio::spawn(holding(work, permit));
        },
    )
    .await;
}

fn refuse(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    let _ = respond.send_response(response, true);
}

/// Why a CONNECT stream is refused before anything is dialled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    #[error("not a CONNECT ({0})")]
    NotConnect(Method),
    #[error("CONNECT without an ip:port authority")]
    NoAuthority,
    #[error("CONNECT to {0}, an address this pod does not serve")]
    NotThisPod(SocketAddr),
}

impl ConnectRefusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotConnect(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::NoAuthority => StatusCode::BAD_REQUEST,
            Self::NotThisPod(_) => StatusCode::FORBIDDEN,
        }
    }

    /// The label of `zt_hbone_streams_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotConnect(_) => "not_connect",
            Self::NoAuthority => "no_authority",
            Self::NotThisPod(_) => "not_this_pod",
        }
    }
}

/// Where a CONNECT may go: one of the pod's own addresses, never one of the agent's ports (the
/// agent is never an open proxy). Everything here comes from the peer; it is fuzzed.
pub fn connect_target<B>(
    request: &Request<B>,
    pod_addresses: &[IpAddr],
) -> Result<SocketAddr, ConnectRefusal> {
    if request.method() != Method::CONNECT {
        return Err(ConnectRefusal::NotConnect(request.method().clone()));
    }
    let dst: SocketAddr = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse().ok())
        .ok_or(ConnectRefusal::NoAuthority)?;
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    if !pod_addresses.contains(&dst.ip()) || AGENT_PORTS.contains(&dst.port()) {
        return Err(ConnectRefusal::NotThisPod(dst));
    }
    Ok(dst)
}

/// One CONNECT stream: check where it may go, connect to the app, relay. The answer may wait
/// up to `answer_hold` for the app's reply, to leave with it ([`H2Stream::answering`]).
async fn handle_connect(
    request: Request<h2::RecvStream>,
    respond: SendResponse<Bytes>,
    peer: SocketAddr,
    workload: Arc<LocalWorkload>,
    identities: Identities,
    answer_hold: Duration,
    ctx: Arc<ProxyContext>,
) {
    let (workload, ctx) = (&*workload, &*ctx);
    let started = Instant::now();
    let id = &workload.id;
    let source = identities
        .source
        .as_ref()
        .map(SpiffeId::to_string)
        .unwrap_or_default();
    let dst = match connect_target(&request, &workload.addresses) {
        Ok(dst) => dst,
        Err(refusal) => {
            ctx.metrics.hbone_stream_refused(refusal.reason());
            warn!(workload = %id, %peer, source_identity = %source, uri = %request.uri(), method = %request.method(), "HBONE: {refusal}; refused");
            return refuse(respond, refusal.status());
        }
    };
    let peer_workload = identities
        .source
        .as_ref()
        .and_then(|verified| hbone::peer_workload(request.headers(), verified));
    // The request's head is read: only its body is kept while the stream lives.
    let body = request.into_body();
    let (record, denied_later) =
        authorize(ctx, workload, peer, dst, identities, peer_workload, started);
    if !record.is_allowed() {
        log_access(&record, &RelayOutcome::refused(CloseReason::Policy));
        return refuse(respond, StatusCode::FORBIDDEN);
    }
    let app = match workload.connect(dst, ctx.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            ctx.metrics.hbone_stream_refused("application_unreachable");
            warn!(workload = %id, %peer, original_dst = %dst, error = %e, "HBONE: application unreachable");
            return refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let mut ok = Response::new(());
    ok.headers_mut()
        .insert("baggage", hbone::baggage(&workload.id));
    let tunnel = match H2Stream::answering(respond, ok, body, answer_hold) {
        Ok(s) => s,
        Err(e) => {
            debug!(workload = %id, %peer, error = %e, "HBONE: stream gone before the reply");
            return;
        }
    };
    relay_and_log(&record, tunnel, app, ctx, pin!(denied_later)).await;
}
