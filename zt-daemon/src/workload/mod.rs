//! Workloads on this node: enrollment into capture, and un-enrollment that leaves no trace.
//!
//! Enrolling a pod creates the agent's listeners inside its netns first, then marks the netns as
//! captured, and only then attaches inbound steering, so there is never a moment where captured
//! traffic has no listener to go to (except while the agent itself is down: fail-closed).
//!
//! An enrollment that fails once the pod's netns is known (a pod squatting an agent port, say)
//! leaves the pod fail-closed: marked `ENROLLMENT_FAILED`, its connects are refused and its
//! inbound dropped by the programs until a later attempt succeeds.
pub mod netns;
pub mod spec;

use std::{
    fs::File,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};
use tracing::{info, warn};
use zt_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, pod_flags, port_kinds};

use crate::{
    ebpf::{AgentSockets, Capture, CaptureError, CaptureSnapshot},
    identity::{rotation::WorkloadIdentity, tls::SvidSlot},
    proxy,
    proxy::ProxyContext,
    workload::netns::{NetnsError, NetnsWorker},
};
pub use spec::{Workload, WorkloadId};

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
/// (`NetnsWorker`), so its traffic leaves with the pod's address. The proxy's unit tests make
/// them on loopback instead, without root.
pub trait UpstreamSockets: Send + Sync {
    /// A TCP socket, registered as the agent's, ready to connect to `dst`.
    fn upstream_socket(
        &self,
        dst: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpSocket>> + Send + '_>>;
}

impl UpstreamSockets for NetnsWorker {
    fn upstream_socket(
        &self,
        dst: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpSocket>> + Send + '_>> {
        Box::pin(NetnsWorker::upstream_socket(self, dst))
    }
}

/// What the proxy needs to act for one enrolled workload.
pub struct LocalWorkload {
    pub workload: Workload,
    pub netns_cookie: u64,
    pub addresses: Vec<IpAddr>,
    sockets: Box<dyn UpstreamSockets>,
    /// The workload's current SVID, when the node has an identity provider.
    pub svid: Option<SvidSlot>,
    /// One permit per open captured connection (`limits.max_connections_per_workload`).
    connection_permits: Arc<tokio::sync::Semaphore>,
    /// A second handle on the inbound plaintext listener, to re-steer inbound capture to it
    /// when the kernel's maps drift.
    inbound_listener: std::net::TcpListener,
}

impl LocalWorkload {
    /// `inbound_listener` is a second handle on the workload's inbound plaintext listener.
    pub fn new(
        workload: Workload,
        netns_cookie: u64,
        addresses: Vec<IpAddr>,
        sockets: Box<dyn UpstreamSockets>,
        svid: Option<SvidSlot>,
        max_connections: usize,
        inbound_listener: std::net::TcpListener,
    ) -> Self {
        Self {
            workload,
            netns_cookie,
            addresses,
            sockets,
            svid,
            connection_permits: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            inbound_listener,
        }
    }

    /// Connects to `dst` from inside the workload's pod, as the agent.
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        self.sockets.upstream_socket(dst).await?.connect(dst).await
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
    tasks: Vec<JoinHandle<()>>,
}

/// The in-pod listeners, created on the pod's netns thread.
struct PodListeners {
    outbound_v4: std::net::TcpListener,
    outbound_v6: Option<std::net::TcpListener>,
    inbound: std::net::TcpListener,
    hbone: std::net::TcpListener,
}

fn create_listeners(
    sockets: &AgentSockets,
) -> Result<PodListeners, (&'static str, std::io::Error)> {
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
    Ok(PodListeners {
        outbound_v4,
        outbound_v6,
        inbound,
        hbone,
    })
}

impl Enrollment {
    /// Enrolls `workload`: listeners, capture (with `flags`, `zt_common::pod_flags`), then
    /// inbound steering. On failure the pod is left fail-closed when its netns could be entered.
    pub async fn enroll(
        capture: &mut Capture,
        ctx: Arc<ProxyContext>,
        workload: Workload,
        identity: Option<WorkloadIdentity>,
        flags: u64,
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
        let worker = NetnsWorker::spawn(&workload.netns, capture.agent_sockets.clone())
            .map_err(|e| open(netns_err(e)))?;
        let netns_file =
            File::open(&workload.netns).map_err(|e| open(socket_err("opening netns", e)))?;
        let cookie = worker
            .run(netns::current_netns_cookie)
            .await
            .map_err(|e| open(netns_err(e)))?
            .map_err(|e| open(socket_err("SO_NETNS_COOKIE", e)))?;
        // From here on the pod is known: a failure leaves it fail-closed.
        let fail = |capture: &mut Capture, error: EnrollError| {
            let fail_closed = match fail_closed(capture, cookie, &netns_file) {
                Ok(()) => Some(cookie),
                Err(e) => {
                    warn!(workload = %id, error = %e, "could not leave the pod fail-closed");
                    None
                }
            };
            EnrollFailure { error, fail_closed }
        };
        let sockets = capture.agent_sockets.clone();
        let inside = worker
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

        let capture_err = |source| EnrollError::Capture {
            workload: id.clone(),
            source: Box::new(source),
        };
        let steer = |capture: &mut Capture| -> Result<bool, CaptureError> {
            capture.maps.steer_inbound(cookie, &listeners.inbound)?;
            capture
                .maps
                .replace_ports(cookie, port_kinds::PROBE, &workload.probe_ports)?;
            capture.maps.enroll(cookie, flags)?;
            capture.attach_sk_lookup(cookie, &netns_file)
        };
        let adopted = match steer(capture) {
            Ok(adopted) => adopted,
            Err(e) => return Err(fail(capture, capture_err(e))),
        };

        let inbound_listener = listeners
            .inbound
            .try_clone()
            .map_err(|e| fail(capture, socket_err("duplicating the inbound listener", e)))?;
        let local = Arc::new(LocalWorkload::new(
            workload,
            cookie,
            addresses,
            Box::new(worker),
            identity.as_ref().map(|i| i.slot.clone()),
            ctx.max_connections_per_workload,
            inbound_listener,
        ));
        let tokio_listener = |l: std::net::TcpListener, what| {
            TcpListener::from_std(l).map_err(|e| open(socket_err(what, e)))
        };
        let mut tasks = Vec::new();
        let mut outbound = vec![tokio_listener(listeners.outbound_v4, "outbound v4")?];
        if let Some(l) = listeners.outbound_v6 {
            outbound.push(tokio_listener(l, "outbound v6")?);
        }
        for l in outbound {
            tasks.push(tokio::spawn(proxy::outbound::serve(
                l,
                local.clone(),
                ctx.clone(),
            )));
        }
        let inbound = tokio_listener(listeners.inbound, "inbound")?;
        tasks.push(tokio::spawn(proxy::inbound::serve_plaintext(
            inbound,
            local.clone(),
            ctx.clone(),
        )));
        let hbone = tokio_listener(listeners.hbone, "hbone")?;
        tasks.push(tokio::spawn(proxy::inbound::serve_hbone(
            hbone,
            local.clone(),
            ctx,
        )));

        info!(
            workload = %local.workload.id,
            netns = %local.workload.netns.display(),
            netns_cookie = cookie,
            addresses = ?local.addresses,
            adopted,
            "workload enrolled"
        );
        Ok(Self {
            local,
            identity,
            tasks,
        })
    }

    /// Waits until the workload's listeners have drained (after `ProxyContext::drain`).
    pub async fn drained(&mut self) {
        for task in &mut self.tasks {
            let _ = task.await;
        }
    }

    /// Makes the kernel hold this workload's capture state again, with `flags`, if it drifted
    /// (an entry deleted behind the agent's back, or flags that a policy change altered);
    /// returns whether it had. `kernel` is what the kernel held at the start of the check.
    pub fn repair_capture(
        &self,
        capture: &mut Capture,
        flags: u64,
        kernel: &CaptureSnapshot,
    ) -> Result<bool, CaptureError> {
        let local = &self.local;
        let cookie = local.netns_cookie;
        let in_sync = capture.maps.enrolled_flags(cookie) == Some(flags)
            && kernel.steered.contains(&cookie)
            && capture.has_sk_lookup(cookie)
            && kernel
                .probe_ports
                .get(&cookie)
                .map_or(&[][..], Vec::as_slice)
                == local.workload.probe_ports.as_slice();
        if in_sync {
            return Ok(false);
        }
        capture
            .maps
            .steer_inbound(cookie, &local.inbound_listener)?;
        capture
            .maps
            .replace_ports(cookie, port_kinds::PROBE, &local.workload.probe_ports)?;
        capture.maps.enroll(cookie, flags)?;
        if !capture.has_sk_lookup(cookie) {
            let netns = File::open(&local.workload.netns).map_err(|source| CaptureError::Io {
                path: local.workload.netns.clone(),
                action: "opening netns",
                source,
            })?;
            capture.attach_sk_lookup(cookie, &netns)?;
        }
        Ok(true)
    }

    /// Closes the workload's listeners and connections and removes every trace from the kernel.
    pub async fn remove(self, capture: &mut Capture) -> Result<(), CaptureError> {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
        capture.forget_pod(self.local.netns_cookie)?;
        if let Some(identity) = &self.identity {
            info!(workload = %self.local.workload.id, identity = %identity.id, "identity released");
        }
        info!(workload = %self.local.workload.id, "workload un-enrolled");
        Ok(())
    }
}

/// Leaves a pod whose enrollment failed closed: no connect leaves it and no connection reaches
/// it, and it is still known to the kernel as enrolled (so nothing else treats it as stale).
pub fn fail_closed(capture: &mut Capture, cookie: u64, netns: &File) -> Result<(), CaptureError> {
    capture.maps.enroll(cookie, pod_flags::ENROLLMENT_FAILED)?;
    capture.attach_sk_lookup(cookie, netns)?;
    Ok(())
}
