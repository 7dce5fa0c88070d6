//! The data path: accept captured connections in the pod, find where they were going, and carry
//! the bytes. `listener` runs the accept loops, `outbound` serves the pod's 15001 listener and
//! `route` decides where its connections go, `inbound` serves 15006 and 15008 and `authorize`
//! asks policy, `same_node` splices connections between this node's pods and `direct` follows the ones that skip the agent, `copy` moves bytes, and `access` records each connection (access log and TCP
//! metrics). The tunnel's protocol, client and pool are `crate::tunnel`'s.
mod access;
mod authorize;
mod direct;
pub mod inbound;
mod listener;
pub mod outbound;
pub mod route;
mod same_node;
#[cfg(test)]
mod tests;

pub(crate) use access::{AccessRecord, Identities, NodeLocal, log_access, relay_and_log};
pub(crate) use authorize::authorize;
pub use direct::follow_direct_connections;
pub use listener::Direction;
pub use listener::serve_workload;
pub(crate) use listener::{Admission, accept_loop, holding};

use std::{net::SocketAddr, sync::Arc, time::Duration};

pub use crate::directory::MeshDirectory;
pub use crate::tunnel::Tunnel;
use crate::{capture::OriginalDsts, egress::EgressPolicy, policy::PolicyStore};

/// Shared by every listener of every workload on the node.
pub struct ProxyContext {
    pub dsts: Box<dyn OriginalDstLookup>,
    /// Who is where: meshed pods and Services.
    pub directory: MeshDirectory,
    /// Replaced on config reload.
    pub egress: std::sync::RwLock<Arc<EgressPolicy>>,
    pub tunnel: Option<Tunnel>,
    /// With `mtls.same_node = "splice"` (and a tunnel): joins same-node connections in the kernel.
    pub splicer: Option<crate::capture::Splicer>,
    /// With `mtls.same_node = "direct"` (and a tunnel): grants same-node connections the path
    /// past the agent once policy allowed one (`direct`).
    pub direct: Option<crate::capture::DirectPaths>,
    pub policy: PolicyStore,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub idle_timeout: Duration,
    /// Every TCP connect the agent makes for a workload must be answered within this.
    pub connect_timeout: Duration,
    pub max_connections_per_workload: usize,
    /// How long open connections may finish once draining starts.
    pub drain_timeout: Duration,
    /// Set once, on SIGTERM: listeners stop accepting and open connections drain.
    pub draining: tokio::sync::watch::Sender<bool>,
}

impl ProxyContext {
    pub fn egress(&self) -> Arc<EgressPolicy> {
        self.egress
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts draining every listener of every workload.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Resolves once draining has started.
    pub async fn drain_started(&self) {
        let mut draining = self.draining.subscribe();
        let _ = draining.wait_for(|d| *d).await;
    }
}

/// Where a captured outbound connection was going, as the kernel recorded it: the capture maps
/// (`capture::OriginalDsts`); the proxy's unit tests use a table of their own.
pub trait OriginalDstLookup: Send + Sync {
    /// The destination the application in pod `netns_cookie` asked for on its socket with
    /// source port `source_port`.
    fn original_dst(&self, netns_cookie: u64, source_port: u16) -> Option<SocketAddr>;
}

impl OriginalDstLookup for OriginalDsts {
    fn original_dst(&self, netns_cookie: u64, source_port: u16) -> Option<SocketAddr> {
        self.get(netns_cookie, source_port)
    }
}

/// Closes `stream` with a RST, so the peer sees a failure rather than an empty success.
pub(crate) fn reset(mut stream: tokio::net::TcpStream) {
    crate::copy::Abort::abort(&mut stream);
}
