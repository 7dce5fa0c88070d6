//! The client side of the tunnel: an HBONE stream to a destination pod as one of this node's
//! workloads, on a pooled connection of that pod when one is usable, else on a new mutual-TLS
//! HTTP/2 connection dialled from inside the pod (one dial per pool key, `pool`).
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tracing::debug;
use zt_common::HBONE_PORT;

use super::{
    Tunnel,
    error::TunnelError,
    hbone::{self, EARLY_BYTES},
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

/// What the application sends while its CONNECT waits for the answer. It goes on the stream at
/// once (HTTP/2 lets a request's body precede its response), so a client that speaks first does
/// not wait a mesh round trip; the destination's agent delivers it only once it has authorized
/// the stream, like every byte after it. It is kept until the answer, to be sent again if the
/// stream has to be opened on another connection.
pub struct EarlyBytes<'a> {
    app: &'a TcpStream,
    chunks: Vec<Bytes>,
    /// The application half-closed: END_STREAM follows its bytes, so that a server waiting
    /// for the end (a request, then a half-close) need not wait for the CONNECT's answer.
    ended: bool,
    /// The stream takes no more: read nothing more here.
    halted: bool,
    /// The application's socket failed: the connection must end as a reset.
    pub failed: Option<io::Error>,
}

/// A read's size: most clients send a short request first.
const EARLY_READ: usize = 4 << 10;

impl<'a> EarlyBytes<'a> {
    pub fn new(app: &'a TcpStream) -> Self {
        Self {
            app,
            chunks: Vec::new(),
            ended: false,
            halted: false,
            failed: None,
        }
    }

    /// Bytes sent ahead of the answer.
    pub fn sent(&self) -> u64 {
        self.len() as u64
    }

    fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    fn wanted(&self) -> bool {
        !self.ended && !self.halted && self.failed.is_none() && self.len() < EARLY_BYTES
    }

    /// The application's next bytes, once it sends some; `None` when nothing more is read here.
    /// Cancel-safe: bytes are read only once the socket is readable, without waiting.
    async fn next(&mut self) -> Option<Bytes> {
        while self.wanted() {
            if let Err(e) = self.app.readable().await {
                self.failed = Some(e);
                break;
            }
            let mut buf = BytesMut::with_capacity((EARLY_BYTES - self.len()).min(EARLY_READ));
            match self.app.try_read_buf(&mut buf) {
                Ok(0) => self.ended = true,
                Ok(_) => {
                    let chunk = buf.freeze();
                    self.chunks.push(chunk.clone());
                    return Some(chunk);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => self.failed = Some(e),
            }
        }
        None
    }
}

/// Opens an HBONE stream to `dst` as `workload`, requiring `expected`: on a pooled connection of
/// this pod to that destination if one is usable, else on a new one. What the application sends
/// meanwhile goes with the CONNECT (`early`). Returns the stream, the source identity it speaks
/// for, and the destination workload if its agent said.
pub async fn open_tunnel(
    workload: &LocalWorkload,
    tunnel: &Tunnel,
    dst: SocketAddr,
    expected: &SpiffeId,
    early: &mut EarlyBytes<'_>,
) -> Result<(H2Stream, SpiffeId, Option<WorkloadId>), TunnelError> {
    let slot = workload.svid.clone().ok_or(TunnelError::NoCertificate)?;
    let source = slot
        .get()
        .map(|s| s.id().clone())
        .ok_or(TunnelError::NoCertificate)?;
    let key = PoolKey {
        source_netns: workload.netns_cookie,
        source_workload: workload.id.clone(),
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
        // A destination that takes the stream and never answers (a stuck or hostile agent)
        // must not hold the application's connection for ever, nor get more streams.
        let answer_timeout = tunnel.connect_timeout * 2;
        let Ok(opened) = tokio::time::timeout(
            answer_timeout,
            open_stream(lease, workload, dst, expected, early),
        )
        .await
        else {
            tunnel.pool.evict(&key, connection);
            return Err(TunnelError::AnswerTimeout(dst, answer_timeout));
        };
        match opened {
            Ok((stream, peer)) => return Ok((stream, source, peer)),
            // The peer answered: the connection is fine and asking again would get the same.
            Err(e @ TunnelError::Refused(..)) => return Err(e),
            // The peer relayed the stream and its application reset it: delivered once already.
            Err(e) if e.relay_reset_by_destination() => return Err(e),
            // Once early bytes (or the application's end) have gone out, only a stream the peer
            // cannot have processed is tried again: the application must not see them twice.
            Err(e)
                if !fresh
                    && attempts > 0
                    && ((early.chunks.is_empty() && !early.ended) || e.unprocessed()) =>
            {
                debug!(workload = %workload.id, original_dst = %dst, error = %e, "pooled HBONE connection unusable; replacing it");
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
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let hbone = SocketAddr::new(dst.ip(), HBONE_PORT);
    // A destination's agent that closes a handshake without a word refused it before looking at
    // any certificate: this pod had `limits.max_handshakes_per_source` pending on its node (a
    // fan-out to many of its pods at once), or the agent was restarting. Nothing was sent, so
    // it is tried again, with backoff, within `connect_timeout`.
    let give_up = tokio::time::Instant::now() + tunnel.connect_timeout;
    let mut pause = FIRST_HANDSHAKE_RETRY;
    let tls = loop {
        let tcp = workload
            .connect(hbone, tunnel.connect_timeout)
            .await
            .map_err(|e| TunnelError::Connect(hbone, e))?;
        let server_name = rustls::pki_types::ServerName::IpAddress(dst.ip().into());
        let handshake = tokio::time::timeout(
            tunnel.handshake_timeout,
            connector.connect(server_name, tcp),
        )
        .await
        .map_err(|_| TunnelError::HandshakeTimeout)?;
        match handshake {
            Ok(tls) => break tls,
            Err(e) if is_unheard_close(&e) && tokio::time::Instant::now() + pause < give_up => {
                debug!(workload = %workload.id, peer = %hbone, error = %e, "HBONE handshake closed by the destination before a word; trying again");
                // Jittered, so that a burst refused together does not come back together.
                tokio::time::sleep(pause / 2 + pause.mul_f64(fastrand::f64())).await;
                pause = (pause * 2).min(MAX_HANDSHAKE_RETRY);
            }
            Err(e) => return Err(TunnelError::Handshake(e)),
        }
    };
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

/// The first pause before a refused handshake is tried again; it doubles up to the last.
const FIRST_HANDSHAKE_RETRY: Duration = Duration::from_millis(10);
const MAX_HANDSHAKE_RETRY: Duration = Duration::from_millis(320);

/// A handshake the peer ended by closing or resetting its connection, with no TLS alert: it
/// refused before it read our certificate.
fn is_unheard_close(e: &io::Error) -> bool {
    let from_tls = e
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
    !from_tls
        && matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe
        )
}

/// One CONNECT stream to `dst` on a leased pooled connection, with the application's early
/// bytes right behind its headers, and the destination workload if its agent said.
async fn open_stream(
    lease: Lease,
    workload: &LocalWorkload,
    dst: SocketAddr,
    expected: &SpiffeId,
    early: &mut EarlyBytes<'_>,
) -> Result<(H2Stream, Option<WorkloadId>), TunnelError> {
    let mut send_request = lease.send.ready().await?;
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(dst.to_string())
        .header("baggage", hbone::baggage(&workload.id))
        .body(())?;
    let (response, mut send) = send_request.send_request(request, false)?;
    // Within the stream's initial window (megabytes), so they go out with the headers. A retry
    // sends again what the first attempt did.
    early.halted = false;
    for chunk in &early.chunks {
        send.send_data(chunk.clone(), false)?;
    }
    if early.ended {
        send.send_data(Bytes::new(), true)?;
    }
    tokio::pin!(response);
    let response = loop {
        tokio::select! {
            biased;
            response = &mut response => break response?,
            next = early.next(), if early.wanted() => {
                let sent = match next {
                    Some(chunk) => send.send_data(chunk, false),
                    None if early.ended => send.send_data(Bytes::new(), true),
                    None => continue,
                };
                // The stream ended under us (a refusal racing these bytes, say): its answer
                // says why.
                if sent.is_err() {
                    early.halted = true;
                }
            }
        }
    };
    if response.status() != http::StatusCode::OK {
        return Err(TunnelError::Refused(dst, response.status()));
    }
    let peer = hbone::peer_workload(response.headers(), expected);
    let stream = H2Stream::new(send, response.into_body()).on_pooled(lease.guard);
    Ok((
        if early.ended {
            stream.request_ended()
        } else {
            stream
        },
        peer,
    ))
}
