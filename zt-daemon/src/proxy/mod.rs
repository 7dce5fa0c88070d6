//! The data path: accept captured connections in the pod, find where they were going, and carry
//! the bytes. `outbound` serves the pod's 15001 listener, `inbound` its 15006 and 15008
//! listeners, and `copy` moves bytes.
pub mod copy;
pub mod inbound;
pub mod outbound;

use std::{future::Future, net::SocketAddr, time::Instant};

use tokio::{net::TcpListener, task::JoinSet};
use tracing::{info, warn};

use crate::{proxy::copy::RelayOutcome, workload::LocalWorkload};

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

/// Accepts on `listener` until the task is aborted; each connection runs `handle` in a task that
/// is aborted together with this loop (un-enrollment closes the pod's connections).
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, what: &'static str, handle: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(handle(stream, peer));
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
pub(crate) fn reset(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
}

/// One access-log line per closed connection (target `zt::access`).
pub(crate) fn log_access(
    direction: Direction,
    workload: &LocalWorkload,
    peer: SocketAddr,
    original_dst: SocketAddr,
    started: Instant,
    outcome: &RelayOutcome,
) {
    info!(
        target: "zt::access",
        direction = direction.as_str(),
        workload = %workload.workload.id,
        peer = %peer,
        original_dst = %original_dst,
        bytes_sent = outcome.sent,
        bytes_received = outcome.received,
        duration_ms = started.elapsed().as_millis() as u64,
        close = %outcome.close,
        "connection closed"
    );
}
