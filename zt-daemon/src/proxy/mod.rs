//! The data path: accept captured connections in the pod, find where they were going, and carry
//! the bytes. `listener` runs the accept loops, `outbound` serves the pod's 15001 listener and
//! `route` decides where its connections go, `inbound` serves 15006 and 15008 and `authorize`
//! asks policy, `copy` moves bytes, and `access` records each connection (access log and TCP
//! metrics). The tunnel's protocol, client and pool are `crate::tunnel`'s.
mod access;
mod authorize;
pub mod copy;
pub mod inbound;
mod listener;
pub mod outbound;
pub mod route;

pub(crate) use access::{AccessRecord, Identities, log_access, relay_and_log};
pub(crate) use authorize::authorize;
pub use listener::Direction;
pub use listener::serve_workload;
pub(crate) use listener::{Admission, accept_loop};

use std::{net::SocketAddr, sync::Arc, time::Duration};

pub use crate::directory::MeshDirectory;
pub use crate::tunnel::Tunnel;
use crate::{
    capture::OriginalDsts, egress::EgressPolicy, enrollment::LocalWorkload, policy::PolicyStore,
};

/// Shared by every listener of every workload on the node.
pub struct ProxyContext {
    pub dsts: OriginalDsts,
    /// Who is where: meshed pods and Services.
    pub directory: MeshDirectory,
    /// Replaced on config reload.
    pub egress: std::sync::RwLock<Arc<EgressPolicy>>,
    pub tunnel: Option<Tunnel>,
    pub policy: PolicyStore,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub idle_timeout: Duration,
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
