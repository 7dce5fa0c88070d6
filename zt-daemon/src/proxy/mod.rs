//! The data path: accept captured connections in the pod, find where they were going, and carry
//! the bytes. `outbound` serves the pod's 15001 listener, `inbound` its 15006 and 15008
//! listeners, and `copy` moves bytes.
pub mod copy;
pub mod hbone;
pub mod inbound;
pub mod outbound;
pub mod pool;

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use crate::{
    config::MtlsMode,
    ebpf::OriginalDsts,
    identity::{spiffe::SpiffeId, verify::TrustStore},
};

/// Which addresses belong to meshed workloads, and who they are. The agent fills it from its
/// enrolled workloads and the configured endpoints (later: discovery).
#[derive(Default, Clone)]
pub struct MeshDirectory(Arc<RwLock<HashMap<IpAddr, SpiffeId>>>);

impl MeshDirectory {
    pub fn replace(&self, entries: HashMap<IpAddr, SpiffeId>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = entries;
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<SpiffeId> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip.to_canonical())
            .cloned()
    }
}

/// What the mTLS tunnel needs; absent when the node has no identity provider (capture only).
pub struct Tunnel {
    pub trust: TrustStore,
    pub mode: MtlsMode,
    pub directory: MeshDirectory,
    pub handshake_timeout: Duration,
    pub pool: Arc<pool::Pool>,
    pub pool_idle_timeout: Duration,
}

/// Shared by every listener of every workload on the node.
pub struct ProxyContext {
    pub dsts: OriginalDsts,
    pub tunnel: Option<Tunnel>,
    pub idle_timeout: Duration,
    pub max_connections_per_workload: usize,
}

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    task::JoinSet,
};
use tracing::{info, warn};

use crate::workload::LocalWorkload;

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
/// is aborted together with this loop (un-enrollment closes the pod's connections). A connection
/// beyond the workload's `limits.max_connections_per_workload` is refused.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    workload: Arc<LocalWorkload>,
    ctx: Arc<ProxyContext>,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, Arc<LocalWorkload>, Arc<ProxyContext>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let Some(permit) = workload.connection_permit() else {
                        warn!(workload = %workload.workload.id, listener = what, %peer, close = "max_connections", "connection refused: workload at its connection limit");
                        reset(stream);
                        continue;
                    };
                    let work = handle(stream, peer, workload.clone(), ctx.clone());
                    connections.spawn(async move {
                        work.await;
                        drop(permit);
                    });
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
pub(crate) fn reset(mut stream: tokio::net::TcpStream) {
    copy::Abort::abort(&mut stream);
}

/// The identities on both ends of a connection, when it went through the tunnel.
pub(crate) struct Identities {
    pub source: Option<SpiffeId>,
    pub destination: Option<SpiffeId>,
}

impl Identities {
    pub const NONE: Identities = Identities {
        source: None,
        destination: None,
    };
}

/// Who and where a relayed connection is, for its access-log line.
pub(crate) struct AccessRecord<'a> {
    pub direction: Direction,
    pub workload: &'a LocalWorkload,
    pub peer: SocketAddr,
    pub original_dst: SocketAddr,
    pub identities: Identities,
    pub started: Instant,
}

/// Relays until the connection ends, then writes its one access-log line (target `zt::access`).
pub(crate) async fn relay_and_log<D, U>(
    record: AccessRecord<'_>,
    downstream: D,
    upstream: U,
    idle_timeout: Duration,
) where
    D: AsyncRead + AsyncWrite + copy::Abort + Unpin,
    U: AsyncRead + AsyncWrite + copy::Abort + Unpin,
{
    let outcome = copy::relay(downstream, upstream, idle_timeout).await;
    let name = |id: &Option<SpiffeId>| {
        id.as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string)
    };
    let ids = &record.identities;
    let mtls = ids.source.is_some() && ids.destination.is_some();
    info!(
        target: "zt::access",
        direction = record.direction.as_str(),
        workload = %record.workload.workload.id,
        source_identity = %name(&ids.source),
        destination_identity = %name(&ids.destination),
        connection_security_policy = if mtls { "mutual_tls" } else { "none" },
        peer = %record.peer,
        original_dst = %record.original_dst,
        bytes_sent = outcome.sent,
        bytes_received = outcome.received,
        duration_ms = record.started.elapsed().as_millis() as u64,
        close = %outcome.close,
        "connection closed"
    );
}
