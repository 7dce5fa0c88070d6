//! Workloads on this node: enrollment into capture, and un-enrollment that leaves no trace.
//!
//! Enrolling a pod creates the agent's listeners inside its netns first, then attaches inbound
//! steering, and only then marks the netns as captured, so there is never a moment where captured
//! traffic has no listener to go to (except while the agent itself is down: fail-closed).
pub mod netns;

use std::{fs::File, net::IpAddr, net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};
use zt_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

pub use crate::config::{Workload, WorkloadId};
use crate::{
    ebpf::{Capture, CaptureError},
    identity::{rotation::WorkloadIdentity, tls::SvidSlot},
    proxy,
    proxy::ProxyContext,
    workload::netns::{NetnsError, NetnsWorker},
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

/// What the proxy needs to act for one enrolled workload.
pub struct LocalWorkload {
    pub workload: Workload,
    pub netns_cookie: u64,
    pub addresses: Vec<IpAddr>,
    pub netns: NetnsWorker,
    /// The workload's current SVID, when the node has an identity provider.
    pub svid: Option<SvidSlot>,
    /// One permit per open captured connection (`limits.max_connections_per_workload`).
    connection_permits: Arc<tokio::sync::Semaphore>,
    /// A second handle on the inbound plaintext listener, to re-steer inbound capture to it
    /// when the kernel's maps drift.
    inbound_listener: std::net::TcpListener,
}

impl LocalWorkload {
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

fn create_listeners() -> Result<PodListeners, (&'static str, std::io::Error)> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let v4 = |ip: Ipv4Addr, port| SocketAddr::from((ip, port));
    let v6 = |ip: Ipv6Addr, port| SocketAddr::from((ip, port));
    let outbound_v4 = netns::agent_listener(v4(Ipv4Addr::LOCALHOST, OUTBOUND_PORT), false)
        .map_err(|e| ("listen on 127.0.0.1:15001", e))?;
    // A pod without IPv6 has no ::1; IPv4 capture still works.
    let outbound_v6 = netns::agent_listener(v6(Ipv6Addr::LOCALHOST, OUTBOUND_PORT), false).ok();
    // Dual-stack wildcards: sk_lookup may hand them IPv4 or IPv6 connections.
    let inbound = netns::agent_listener(v6(Ipv6Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT), true)
        .map_err(|e| ("listen on [::]:15006", e))?;
    let hbone = netns::agent_listener(v6(Ipv6Addr::UNSPECIFIED, HBONE_PORT), true)
        .map_err(|e| ("listen on [::]:15008", e))?;
    Ok(PodListeners {
        outbound_v4,
        outbound_v6,
        inbound,
        hbone,
    })
}

impl Enrollment {
    /// Enrolls `workload`: listeners, inbound steering, then capture.
    pub async fn enroll(
        capture: &mut Capture,
        ctx: Arc<ProxyContext>,
        workload: Workload,
        identity: Option<WorkloadIdentity>,
    ) -> Result<Self, EnrollError> {
        let id = workload.id.clone();
        let netns_label = workload.netns.display().to_string();
        let socket_err = |what, source| EnrollError::Socket {
            workload: id.clone(),
            netns: netns_label.clone(),
            what,
            source,
        };
        let worker = NetnsWorker::spawn(&workload.netns).map_err(|source| EnrollError::Netns {
            workload: id.clone(),
            source,
        })?;
        let inside = worker
            .run(|| {
                let cookie = netns::current_netns_cookie().map_err(|e| ("SO_NETNS_COOKIE", e))?;
                netns::migrate_queued_connections_on_close();
                let addrs = netns::current_pod_addresses().map_err(|e| ("listing addresses", e))?;
                let listeners = create_listeners()?;
                Ok::<_, (&'static str, std::io::Error)>((cookie, addrs, listeners))
            })
            .await
            .map_err(|source| EnrollError::Netns {
                workload: id.clone(),
                source,
            })?;
        let (cookie, addresses, listeners) = inside.map_err(|(what, e)| socket_err(what, e))?;

        let capture_err = |source| EnrollError::Capture {
            workload: id.clone(),
            source: Box::new(source),
        };
        let netns_file = File::open(&workload.netns).map_err(|e| socket_err("opening netns", e))?;
        let steer = |capture: &mut Capture| -> Result<bool, CaptureError> {
            let adopted = capture.attach_sk_lookup(cookie, &netns_file)?;
            for ip in &addresses {
                capture
                    .maps
                    .steer_inbound(*ip, cookie, &listeners.inbound)?;
            }
            capture.maps.enroll(cookie)?;
            Ok(adopted)
        };
        let adopted = match steer(capture) {
            Ok(adopted) => adopted,
            Err(e) => {
                if let Err(undo) = capture.forget_pod(cookie) {
                    warn!(workload = %id, error = %undo, "cleanup after failed enrollment");
                }
                return Err(capture_err(e));
            }
        };

        let inbound_listener = listeners
            .inbound
            .try_clone()
            .map_err(|e| socket_err("duplicating the inbound listener", e))?;
        let local = Arc::new(LocalWorkload {
            workload,
            netns_cookie: cookie,
            addresses,
            netns: worker,
            svid: identity.as_ref().map(|i| i.slot.clone()),
            connection_permits: Arc::new(tokio::sync::Semaphore::new(
                ctx.max_connections_per_workload,
            )),
            inbound_listener,
        });
        let tokio_listener = |l: std::net::TcpListener, what| {
            TcpListener::from_std(l).map_err(|e| socket_err(what, e))
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
            netns = %local.netns.path().display(),
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

    /// Makes the kernel hold this workload's capture state again, if it drifted (an entry
    /// deleted behind the agent's back); returns whether it had.
    pub fn repair_capture(&self, capture: &mut Capture) -> Result<bool, CaptureError> {
        let local = &self.local;
        if capture
            .maps
            .pod_in_sync(local.netns_cookie, &local.addresses)
        {
            return Ok(false);
        }
        for ip in &local.addresses {
            capture
                .maps
                .steer_inbound(*ip, local.netns_cookie, &local.inbound_listener)?;
        }
        capture.maps.enroll(local.netns_cookie)?;
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
