//! Workloads on this node: enrollment into capture, and un-enrollment that leaves no trace.
//! Enrollment makes the in-pod listeners and the pod's capture state; who serves the listeners
//! is the caller's choice (the agent hands them to the proxy).
//!
//! Enrolling a pod creates the agent's listeners inside its netns first, then marks the netns as
//! captured, and only then attaches inbound steering, so there is never a moment where captured
//! traffic has no listener to go to (except while the agent itself is down: fail-closed).
//!
//! An enrollment that fails once the pod's netns is known (a pod squatting an agent port, say)
//! leaves the pod fail-closed: marked `ENROLLMENT_FAILED`, its connects are refused and its
//! inbound dropped by the programs until a later attempt succeeds.
mod netlink;
pub mod netns;
pub mod sock_diag;

pub use sock_diag::PodConnection;

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};
use tracing::{info, warn};
use zt_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use crate::{
    capture::{AgentSockets, Capture, CaptureError, CapturedPod, current_netns_cookie},
    enrollment::netns::{NetnsError, PodNetns},
    identity::{rotation::WorkloadIdentity, tls::SvidSlot},
    workload::{Workload, WorkloadId},
};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("workload {workload}: {source}")]
    Netns {
        workload: WorkloadId,
        source: NetnsError,
    },
    #[error("workload {workload} ({netns}): {what}: {source}")]
    Socket {
        workload: WorkloadId,
        netns: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("workload {workload}: {source}")]
    Capture {
        workload: WorkloadId,
        source: Box<CaptureError>,
    },
}

/// A failed enrollment, and whether the pod could be left fail-closed.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct EnrollFailure {
    pub error: EnrollError,
    /// The pod's netns cookie when it is now fail-closed (`ENROLLMENT_FAILED`); `None` when its
    /// namespace could not even be entered (then there is nothing to capture).
    pub fail_closed: Option<u64>,
}

/// Where the agent makes a workload's upstream sockets: inside the pod's network namespace
/// (`PodNetns`), so its traffic leaves with the pod's address. The proxy's unit tests make
/// them on loopback instead, without root.
pub trait UpstreamSockets: Send + Sync {
    /// A TCP socket, registered as the agent's, ready to connect to `dst`.
    fn upstream_socket(&self, dst: SocketAddr) -> io::Result<TcpSocket>;
    /// Aborts one of the pod's TCP connections: both ends see a reset.
    fn abort_connection(&self, connection: &PodConnection) -> io::Result<()>;
    /// How long each of the pod's `connections` has carried no data (`None`: gone, or not
    /// established). Blocking.
    fn idle_for(&self, connections: &[PodConnection]) -> io::Result<Vec<Option<Duration>>>;
}

impl UpstreamSockets for PodNetns {
    fn upstream_socket(&self, dst: SocketAddr) -> io::Result<TcpSocket> {
        PodNetns::upstream_socket(self, dst)
    }

    fn abort_connection(&self, connection: &PodConnection) -> io::Result<()> {
        PodNetns::abort_connection(self, connection)
    }

    fn idle_for(&self, connections: &[PodConnection]) -> io::Result<Vec<Option<Duration>>> {
        PodNetns::idle_for(self, connections)
    }
}

/// What the proxy needs to act for one enrolled workload.
pub struct LocalWorkload {
    /// Fixed for the enrollment's life: a pod in another netns is enrolled anew.
    pub id: WorkloadId,
    pub netns: PathBuf,
    /// The pod as discovery or the config describes it now. Only its labels change in place
    /// ([`Self::relabel`]): its connections stay, and policy decides them again.
    current: tokio::sync::watch::Sender<Arc<Workload>>,
    pub netns_cookie: u64,
    pub addresses: Vec<IpAddr>,
    sockets: Box<dyn UpstreamSockets>,
    /// The workload's current SVID, when the node has an identity provider.
    pub svid: Option<SvidSlot>,
    /// One permit per open captured connection (`limits.max_connections_per_workload`).
    connection_permits: Arc<tokio::sync::Semaphore>,
    /// Set when the workload is removed: connections served outside its own tasks (spliced
    /// same-node connections, which the source's task serves) close.
    removed: tokio::sync::watch::Sender<bool>,
}

impl LocalWorkload {
    pub fn new(
        workload: Workload,
        netns_cookie: u64,
        addresses: Vec<IpAddr>,
        sockets: Box<dyn UpstreamSockets>,
        svid: Option<SvidSlot>,
        max_connections: usize,
    ) -> Self {
        Self {
            id: workload.id.clone(),
            netns: workload.netns.clone(),
            current: tokio::sync::watch::channel(Arc::new(workload)).0,
            netns_cookie,
            addresses,
            sockets,
            svid,
            connection_permits: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            removed: tokio::sync::watch::channel(false).0,
        }
    }

    /// The pod as it is now (its labels, for policy).
    pub fn current(&self) -> Arc<Workload> {
        self.current.borrow().clone()
    }

    /// The pod as it is now, and as it changes.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<Arc<Workload>> {
        self.current.subscribe()
    }

    /// Takes `new` when it differs from the pod as enrolled in its labels only, and says
    /// whether it did; anything else (a netns, a probe port) needs the pod enrolled again.
    pub fn relabel(&self, new: &Workload) -> bool {
        self.current.send_if_modified(|current| {
            if **current == *new || !current.differs_only_in_labels(new) {
                return false;
            }
            *current = Arc::new(new.clone());
            true
        })
    }

    /// Resolves once the workload is removed.
    pub async fn removed(&self) {
        let mut removed = self.removed.subscribe();
        let _ = removed.wait_for(|r| *r).await;
    }

    /// Connects to `dst` from inside the workload's pod, as the agent, within `timeout`: a
    /// destination that drops SYNs would otherwise hold the connection for the kernel's two
    /// minutes of retries.
    pub async fn connect(&self, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        let socket = self.sockets.upstream_socket(dst)?;
        tokio::time::timeout(timeout, socket.connect(dst))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                ))
            })
    }

    /// Aborts one of the pod's own TCP connections (one the agent does not hold: a direct
    /// same-node connection).
    pub fn abort_connection(&self, connection: &PodConnection) -> io::Result<()> {
        self.sockets.abort_connection(connection)
    }

    /// How long each of the pod's own `connections` has carried no data (blocking).
    pub fn idle_for(&self, connections: &[PodConnection]) -> io::Result<Vec<Option<Duration>>> {
        self.sockets.idle_for(connections)
    }

    /// A permit for one more connection, or `None` at the limit.
    pub fn connection_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.connection_permits.clone().try_acquire_owned().ok()
    }
}

/// An enrolled workload: its listeners are served by `tasks` until it is removed; its identity
/// (and private key) lives exactly as long.
pub struct Enrollment {
    pub local: Arc<LocalWorkload>,
    pub identity: Option<WorkloadIdentity>,
    /// What the kernel holds for the pod, checked for drift.
    pub captured: CapturedPod,
    tasks: Vec<JoinHandle<()>>,
}

/// A workload's in-pod listeners, listening, for the proxy to serve.
pub struct PodListeners {
    /// 127.0.0.1:15001, and [::1]:15001 when the pod has IPv6.
    pub outbound: Vec<TcpListener>,
    /// [::]:15006, where inbound capture steers plaintext connections.
    pub inbound: TcpListener,
    /// [::]:15008, HBONE.
    pub hbone: TcpListener,
}

/// The in-pod listeners as created inside the pod's netns.
struct BoundListeners {
    outbound_v4: std::net::TcpListener,
    outbound_v6: Option<std::net::TcpListener>,
    inbound: std::net::TcpListener,
    hbone: std::net::TcpListener,
}

fn create_listeners(
    sockets: &AgentSockets,
) -> Result<BoundListeners, (&'static str, std::io::Error)> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let v4 = |ip: Ipv4Addr, port| SocketAddr::from((ip, port));
    let v6 = |ip: Ipv6Addr, port| SocketAddr::from((ip, port));
    let outbound_v4 = netns::agent_listener(v4(Ipv4Addr::LOCALHOST, OUTBOUND_PORT), false, sockets)
        .map_err(|e| ("listen on 127.0.0.1:15001", e))?;
    // A pod without IPv6 has no ::1; IPv4 capture still works.
    let outbound_v6 =
        netns::agent_listener(v6(Ipv6Addr::LOCALHOST, OUTBOUND_PORT), false, sockets).ok();
    // Dual-stack wildcards: sk_lookup may hand them IPv4 or IPv6 connections.
    let inbound = netns::agent_listener(
        v6(Ipv6Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT),
        true,
        sockets,
    )
    .map_err(|e| ("listen on [::]:15006", e))?;
    let hbone = netns::agent_listener(v6(Ipv6Addr::UNSPECIFIED, HBONE_PORT), true, sockets)
        .map_err(|e| ("listen on [::]:15008", e))?;
    Ok(BoundListeners {
        outbound_v4,
        outbound_v6,
        inbound,
        hbone,
    })
}

/// What an enrollment does with the TCP connections the pod already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlierConnections {
    /// The pod is captured for the first time: what it holds, capture never saw; reset it.
    Reset,
    /// The pod was captured all along (enrolled again after a change): keep them.
    Keep,
}

impl Enrollment {
    /// Enrolls `workload`: listeners, capture (with `flags`, `zt_common::pod_flags`), then
    /// inbound steering; `serve` then gets the listeners and returns the tasks serving them.
    /// On failure the pod is left fail-closed when its netns could be entered.
    pub async fn enroll(
        capture: &mut Capture,
        workload: Workload,
        identity: Option<WorkloadIdentity>,
        flags: u64,
        earlier: EarlierConnections,
        max_connections: usize,
        serve: impl FnOnce(Arc<LocalWorkload>, PodListeners) -> Vec<JoinHandle<()>>,
    ) -> Result<Self, EnrollFailure> {
        let id = workload.id.clone();
        let netns_label = workload.netns.display().to_string();
        let socket_err = |what, source| EnrollError::Socket {
            workload: id.clone(),
            netns: netns_label.clone(),
            what,
            source,
        };
        let open = |error| EnrollFailure {
            error,
            fail_closed: None,
        };
        let netns_err = |source| EnrollError::Netns {
            workload: id.clone(),
            source,
        };
        let pod_netns = PodNetns::open(&workload.netns, capture.agent_sockets.clone())
            .map_err(|e| open(netns_err(e)))?;
        let netns_file =
            File::open(&workload.netns).map_err(|e| open(socket_err("opening netns", e)))?;
        let netns_inode = netns_file
            .metadata()
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| open(socket_err("reading the netns file's inode", e)))?;
        let cookie = pod_netns
            .run(current_netns_cookie)
            .await
            .map_err(|e| open(netns_err(e)))?
            .map_err(|e| open(socket_err("SO_NETNS_COOKIE", e)))?;
        // From here on the pod is known: a failure leaves it fail-closed.
        let fail = |capture: &mut Capture, error: EnrollError| {
            let fail_closed = match capture.fail_closed(cookie, &netns_file) {
                Ok(()) => Some(cookie),
                Err(e) => {
                    warn!(workload = %id, error = %e, "could not leave the pod fail-closed");
                    None
                }
            };
            EnrollFailure { error, fail_closed }
        };
        let sockets = capture.agent_sockets.clone();
        let inside = pod_netns
            .run(move || {
                netns::migrate_queued_connections_on_close();
                let reserved = netns::reserve_agent_ports();
                let addrs = netns::current_pod_addresses().map_err(|e| ("listing addresses", e))?;
                let listeners = create_listeners(&sockets)?;
                Ok::<_, (&'static str, std::io::Error)>((addrs, listeners, reserved))
            })
            .await;
        let (addresses, listeners, reserved) = match inside {
            Ok(Ok(inside)) => inside,
            Ok(Err((what, e))) => return Err(fail(capture, socket_err(what, e))),
            Err(e) => return Err(fail(capture, netns_err(e))),
        };
        // Defence in depth only: the bind programs refuse the ports, and the agent's listeners
        // keep automatic binds off them. A container whose /proc/sys is read-only cannot write it.
        if let Err(e) = reserved {
            warn!(workload = %id, error = %e, "the agent's ports are not in the pod's ip_local_reserved_ports");
        }

        let inbound_listener = listeners
            .inbound
            .try_clone()
            .map_err(|e| fail(capture, socket_err("duplicating the inbound listener", e)))?;
        let captured = CapturedPod {
            netns_cookie: cookie,
            netns: workload.netns.clone(),
            inbound_listener,
            probe_ports: workload.probe_ports.clone(),
            netns_inode,
        };
        let adopted = match capture.enroll_pod(&captured, flags, &netns_file) {
            Ok(adopted) => adopted,
            Err(e) => {
                let error = EnrollError::Capture {
                    workload: id.clone(),
                    source: Box::new(e),
                };
                return Err(fail(capture, error));
            }
        };

        // A pod captured for the first time may already hold connections capture never saw
        // (opened between its start and this enrollment): they are reset, not left around the
        // agent. An adopted pod was captured all along.
        if !adopted && earlier == EarlierConnections::Reset {
            let reset = match pod_netns.run(sock_diag::reset_uncaptured).await {
                Ok(reset) => reset.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match reset {
                Ok(0) => {}
                Ok(connections) => {
                    warn!(workload = %id, connections, "reset connections the pod held from before it was captured")
                }
                Err(error) => {
                    warn!(workload = %id, %error, "could not look for connections the pod held from before it was captured")
                }
            }
        }
        let local = Arc::new(LocalWorkload::new(
            workload,
            cookie,
            addresses,
            Box::new(pod_netns),
            identity.as_ref().map(|i| i.slot.clone()),
            max_connections,
        ));
        let tokio_listener = |l: std::net::TcpListener, what| {
            TcpListener::from_std(l).map_err(|e| open(socket_err(what, e)))
        };
        let mut outbound = vec![tokio_listener(listeners.outbound_v4, "outbound v4")?];
        if let Some(l) = listeners.outbound_v6 {
            outbound.push(tokio_listener(l, "outbound v6")?);
        }
        let listeners = PodListeners {
            outbound,
            inbound: tokio_listener(listeners.inbound, "inbound")?,
            hbone: tokio_listener(listeners.hbone, "hbone")?,
        };
        let tasks = serve(local.clone(), listeners);

        info!(
            workload = %local.id,
            netns = %local.netns.display(),
            netns_cookie = cookie,
            addresses = ?local.addresses,
            adopted,
            "workload enrolled"
        );
        Ok(Self {
            local,
            identity,
            captured,
            tasks,
        })
    }

    /// Waits until the workload's listeners have drained (after `ProxyContext::drain`).
    pub async fn drained(&mut self) {
        for task in &mut self.tasks {
            let _ = task.await;
        }
    }

    /// Closes the workload's listeners and connections and removes every trace from the kernel.
    pub async fn remove(self, capture: &mut Capture) -> Result<(), CaptureError> {
        self.local.removed.send_replace(true);
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
        capture.forget_pod(self.local.netns_cookie)?;
        if let Some(identity) = &self.identity {
            info!(workload = %self.local.id, identity = %identity.id, "identity released");
        }
        info!(workload = %self.local.id, "workload un-enrolled");
        Ok(())
    }
}
