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
    let mut going_away = false;
    loop {
        tokio::select! {
            () = &mut drain_started, if !going_away => {
                going_away = true;
                connection.graceful_shutdown();
            }
            () = &mut expired, if !going_away => {
                going_away = true;
                connection.graceful_shutdown();
                let why = certificates.first_to_expire();
                warn!(%workload, %peer, source_identity = %source, close = "certificate_expired", "HBONE connection sent GOAWAY, no new streams: {why}");
            }
            _ = idle_check.tick(), if !going_away => {
                if connection.has_streams() {
                    busy_at = tokio::time::Instant::now();
                } else if busy_at.elapsed() >= limits.idle_timeout {
                    going_away = true;
                    connection.graceful_shutdown();
                    debug!(%workload, %peer, source_identity = %source, close = "idle_timeout", "idle HBONE connection sent GOAWAY");
                }
            }
            next = connection.accept() => {
                match next {
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
