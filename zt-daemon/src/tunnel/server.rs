//! The server side of one authenticated tunnel connection: the HTTP/2 handshake, then each CONNECT
//! stream handed to the caller (`proxy::inbound` decides what a stream may reach), for as long as
//! the connection may live. It is sent GOAWAY (streams in flight finish, the peer's pool dials
//! again) when the agent starts draining, when either certificate expires and when it idles; it
//! is closed at once, with every stream it carries, when either certificate is revoked or no
//! longer trusted.
use std::{future::Future, net::SocketAddr, time::Duration};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::Request;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use super::{hbone, session::SessionCertificates};
use crate::{
    identity::{spiffe::SpiffeId, verify::TrustStore},
    workload::WorkloadId,
};

/// How long a peer sent GOAWAY has to acknowledge it. h2 sends its final GOAWAY, which stops new
/// streams, only once the peer answers the PING that goes with the first; a peer that never does
/// would keep a connection meant to end taking streams, past a certificate's expiry.
const GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// How long a server connection may take and hold.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub handshake_timeout: Duration,
    pub max_streams: u32,
    /// A connection without streams this long is sent GOAWAY.
    pub idle_timeout: Duration,
}

/// Who a served connection is between, for its log lines.
#[derive(Debug, Clone, Copy)]
pub struct ServedConnection<'a> {
    pub workload: &'a WorkloadId,
    pub peer: SocketAddr,
    pub source: &'a SpiffeId,
}

/// Serves one connection whose TLS handshake authenticated `certificates` until it ends; every
/// CONNECT request goes to `on_stream`. `drain_started` resolves when the agent starts draining.
pub async fn serve<IO>(
    io: IO,
    limits: ServerLimits,
    certificates: &SessionCertificates,
    trust: &TrustStore,
    drain_started: impl Future<Output = ()>,
    who: ServedConnection<'_>,
    mut on_stream: impl FnMut(Request<RecvStream>, SendResponse<Bytes>),
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let ServedConnection {
        workload,
        peer,
        source,
    } = who;
    let mut builder = hbone::server_builder();
    builder.max_concurrent_streams(limits.max_streams);
    let mut connection =
        match tokio::time::timeout(limits.handshake_timeout, builder.handshake(io)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!(%workload, %peer, error = %e, "HBONE: HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                warn!(%workload, %peer, "HBONE: HTTP/2 handshake timed out");
                return;
            }
        };
    let mut trust_changes = trust.subscribe();
    let mut watching = true;
    tokio::pin!(drain_started);
    let expired = tokio::time::sleep_until(super::session::deadline(certificates.expiry()));
    tokio::pin!(expired);
    let mut idle_check =
        tokio::time::interval((limits.idle_timeout / 4).max(Duration::from_millis(100)));
    let mut busy_at = tokio::time::Instant::now();
    // When GOAWAY went, and a timer that closes the connection once the peer had its grace to
    // acknowledge it and no stream is left.
    let mut going_away: Option<tokio::time::Instant> = None;
    let overdue = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(overdue);
    fn go_away<IO: AsyncRead + AsyncWrite + Unpin>(
        connection: &mut h2::server::Connection<IO, Bytes>,
        going_away: &mut Option<tokio::time::Instant>,
        overdue: std::pin::Pin<&mut tokio::time::Sleep>,
    ) {
        connection.graceful_shutdown();
        let now = tokio::time::Instant::now();
        overdue.reset(now + GOAWAY_GRACE);
        *going_away = Some(now);
    }
    loop {
        tokio::select! {
            () = &mut drain_started, if going_away.is_none() => go_away(&mut connection, &mut going_away, overdue.as_mut()),
            () = &mut expired, if going_away.is_none() => {
                go_away(&mut connection, &mut going_away, overdue.as_mut());
                let why = certificates.first_to_expire();
                warn!(%workload, %peer, source_identity = %source, close = "certificate_expired", "HBONE connection sent GOAWAY, no new streams: {why}");
            }
            _ = idle_check.tick(), if going_away.is_none() => {
                if connection.has_streams() {
                    busy_at = tokio::time::Instant::now();
                } else if busy_at.elapsed() >= limits.idle_timeout {
                    go_away(&mut connection, &mut going_away, overdue.as_mut());
                    debug!(%workload, %peer, source_identity = %source, close = "idle_timeout", "idle HBONE connection sent GOAWAY");
                }
            }
            () = &mut overdue, if going_away.is_some() => {
                if !connection.has_streams() {
                    debug!(%workload, %peer, source_identity = %source, "HBONE connection closed: no stream left, and its GOAWAY was not acknowledged");
                    break;
                }
                overdue.as_mut().reset(tokio::time::Instant::now() + GOAWAY_GRACE);
            }
            next = connection.accept() => {
                match next {
                    Some(Ok((_, mut respond))) if going_away.is_some_and(|at| at.elapsed() >= GOAWAY_GRACE) => {
                        // A peer that had its grace knows: a stream it could retry elsewhere.
                        debug!(%workload, %peer, source_identity = %source, "HBONE stream refused: the connection was sent GOAWAY");
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    }
                    Some(Ok((request, respond))) => {
                        busy_at = tokio::time::Instant::now();
                        on_stream(request, respond);
                    }
                    Some(Err(e)) => {
                        debug!(%workload, %peer, error = %e, "HBONE connection ended");
                        break;
                    }
                    None => break,
                }
            }
            changed = trust_changes.changed(), if watching => {
                watching = changed.is_ok();
                let trust = trust_changes.borrow_and_update().clone();
                if let Err(why) = certificates.check(&trust, std::time::SystemTime::now()) && why.closes_now() {
                    warn!(%workload, %peer, source_identity = %source, close = "revoked", reason = %why, "HBONE connection closed: {why}");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::SystemTime,
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::{identity::svid::LeafFacts, tunnel::session::SessionCertificate};

    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;

    async fn send_frame(io: &mut DuplexStream, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        io.write_all(&frame).await.unwrap();
    }

    /// The next frame: type, stream and payload; `None` once the server closed.
    async fn next_frame(io: &mut DuplexStream) -> Option<(u8, u32, Vec<u8>)> {
        let mut header = [0; 9];
        io.read_exact(&mut header).await.ok()?;
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & !(1 << 31);
        let mut payload = vec![0; len];
        io.read_exact(&mut payload).await.ok()?;
        Some((header[3], stream, payload))
    }

    /// A CONNECT's headers, HPACK literals on the static table's names (no Huffman).
    async fn connect(io: &mut DuplexStream, stream: u32) {
        let mut block = Vec::new();
        for (index, value) in [(2u8, "CONNECT"), (1, "10.0.0.2:80")] {
            block.push(index);
            block.push(value.len() as u8);
            block.extend(value.as_bytes());
        }
        send_frame(io, HEADERS, 0x4, stream, &block).await;
    }

    /// A peer that acknowledges SETTINGS but never the PING that goes with a GOAWAY (h2's own
    /// client always would): the server must not keep taking streams, nor stay open for ever.
    #[tokio::test]
    async fn a_peer_that_never_acknowledges_goaway_gets_no_new_streams_and_is_closed() {
        let (mut peer, server_io) = tokio::io::duplex(1 << 20);
        let leaf = |id: &str| {
            SessionCertificate::from(&LeafFacts {
                id: id.parse().unwrap(),
                serial: "01".into(),
                not_before: SystemTime::now(),
                not_after: SystemTime::now() + Duration::from_secs(86400),
                self_issued: false,
            })
        };
        let certificates = SessionCertificates {
            local: leaf("spiffe://td/ns/shop/sa/db"),
            peer: leaf("spiffe://td/ns/shop/sa/web"),
        };
        let held = Arc::new(Mutex::new(Vec::new()));
        let (drain, drain_started) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn({
            let held = held.clone();
            async move {
                let workload = WorkloadId {
                    namespace: "shop".into(),
                    name: "db".into(),
                };
                let source: SpiffeId = "spiffe://td/ns/shop/sa/web".parse().unwrap();
                let limits = ServerLimits {
                    handshake_timeout: Duration::from_secs(5),
                    max_streams: 10,
                    idle_timeout: Duration::from_secs(3600),
                };
                let who = ServedConnection {
                    workload: &workload,
                    peer: "10.0.0.1:40000".parse().unwrap(),
                    source: &source,
                };
                let drained = async {
                    let _ = drain_started.await;
                };
                serve(
                    server_io,
                    limits,
                    &certificates,
                    &TrustStore::default(),
                    drained,
                    who,
                    |request, respond| held.lock().unwrap().push((request, respond)),
                )
                .await;
            }
        });
        peer.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        send_frame(&mut peer, SETTINGS, 0, 0, &[]).await;
        connect(&mut peer, 1).await;
        let streams = || held.lock().unwrap().len();
        while streams() < 1 {
            match next_frame(&mut peer).await {
                Some((SETTINGS, _, p)) if !p.is_empty() => {
                    send_frame(&mut peer, SETTINGS, 0x1, 0, &[]).await
                }
                Some(_) => {}
                None => panic!("closed before the first stream"),
            }
        }
        // Stream 1 stays open (held); the agent drains.
        drain.send(()).unwrap();
        loop {
            match next_frame(&mut peer).await {
                Some((GOAWAY, ..)) => break,
                Some(_) => {}
                None => panic!("closed before its GOAWAY"),
            }
        }
        tokio::time::sleep(GOAWAY_GRACE + Duration::from_secs(1)).await;
        connect(&mut peer, 3).await;
        let refused = tokio::time::timeout(GOAWAY_GRACE * 2, async {
            loop {
                match next_frame(&mut peer).await {
                    Some((RST_STREAM, 3, code)) => break code,
                    Some(_) => {}
                    None => panic!("closed with stream 1 open"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("stream 3 not refused; {} streams taken", streams()));
        assert_eq!(refused, 7u32.to_be_bytes(), "not REFUSED_STREAM");
        assert_eq!(streams(), 1, "a stream was taken after the grace");
        // Once stream 1 ends, the connection closes.
        held.lock().unwrap().clear();
        tokio::time::timeout(GOAWAY_GRACE * 3, async {
            while next_frame(&mut peer).await.is_some() {}
        })
        .await
        .expect("the connection stayed open");
        server.await.unwrap();
    }
}
