//! Network namespaces of pods: each enrolled pod gets one thread that lives inside its netns and
//! creates sockets there on request. A socket keeps the netns it was created in, so the tokio
//! runtime can use it from any thread afterwards. Every socket the agent creates is registered
//! as the agent's (`AgentSockets`) before it is bound or connected, so capture leaves it alone.
use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::mpsc,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::sync::oneshot;
use zt_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use crate::capture::AgentSockets;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("netns {path}: cannot open: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("netns {path}: cannot enter: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("netns {path}: worker thread has stopped")]
    WorkerGone { path: PathBuf },
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread inside one pod's network namespace.
pub struct NetnsWorker {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    sockets: AgentSockets,
}

impl NetnsWorker {
    /// Opens `path` and starts a thread inside that namespace.
    pub fn spawn(path: &Path, sockets: AgentSockets) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (entered_tx, entered_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("zt-netns".into())
            .spawn(move || {
                let entered = setns(file.as_fd(), CloneFlags::CLONE_NEWNET);
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered.map_err(io::Error::from));
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })
            .map_err(|source| NetnsError::Enter {
                path: path.to_owned(),
                source,
            })?;
        let entered = entered_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("netns thread exited before entering")));
        entered.map_err(|source| NetnsError::Enter {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            jobs,
            sockets,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the thread inside the namespace.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, NetnsError> {
        let (tx, rx) = oneshot::channel();
        let gone = || NetnsError::WorkerGone {
            path: self.path.clone(),
        };
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// A TCP socket in the pod's namespace, marked as the agent's, ready to connect to `dst`.
    pub async fn upstream_socket(
        &self,
        dst: SocketAddr,
    ) -> Result<tokio::net::TcpSocket, io::Error> {
        let sockets = self.sockets.clone();
        let socket = self
            .run(move || agent_socket(Domain::for_address(dst), &sockets))
            .await
            .map_err(io::Error::other)??;
        let std: std::net::TcpStream = socket.into();
        Ok(tokio::net::TcpSocket::from_std_stream(std))
    }
}

/// A non-blocking TCP socket registered as the agent's, in the calling thread's namespace.
pub fn agent_socket(domain: Domain, sockets: &AgentSockets) -> io::Result<Socket> {
    let socket = Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    sockets.register(&socket)?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket)
}

/// A listening agent socket on `addr`. `dual_stack` makes an IPv6 wildcard accept IPv4 too.
pub fn agent_listener(
    addr: SocketAddr,
    dual_stack: bool,
    sockets: &AgentSockets,
) -> io::Result<std::net::TcpListener> {
    let socket = agent_socket(Domain::for_address(addr), sockets)?;
    if addr.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_reuse_address(true)?;
    // A successor agent binds the same ports while this one drains (upgrade handover); the bind
    // guard program keeps pods themselves off these ports.
    socket.set_reuse_port(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Sets `net.ipv4.tcp_migrate_req` in the calling thread's namespace, so that connections still
/// queued on a listener that closes move to another listener of its SO_REUSEPORT group: a
/// draining agent hands its backlog to its successor instead of resetting it. Best effort
/// (kernels before 5.14 lack it).
pub fn migrate_queued_connections_on_close() {
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1") {
        tracing::debug!(error = %e, "net.ipv4.tcp_migrate_req not set");
    }
}

/// Adds the agent's ports to `net.ipv4.ip_local_reserved_ports` of the calling thread's
/// namespace, so that the kernel never hands one of them to a pod's socket through an automatic
/// bind (a `connect` or `listen` without `bind`), which the bind programs cannot see. The value
/// the pod had is kept.
pub fn reserve_agent_ports() -> io::Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let current = std::fs::read_to_string(PATH)?;
    let mut ranges: Vec<String> = current
        .trim()
        .split(',')
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect();
    for port in [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT] {
        ranges.push(port.to_string());
    }
    std::fs::write(PATH, ranges.join(","))
}

/// The addresses of the network namespace at `path` (blocking: enters it on a short-lived thread).
pub fn addresses_in(path: &Path) -> io::Result<Vec<IpAddr>> {
    let file = File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            current_pod_addresses()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
    })
}

/// The pod's own addresses in the calling thread's namespace (no loopback, no IPv6 link-local),
/// read from the kernel over rtnetlink: an RTM_GETADDR dump on a NETLINK_ROUTE socket, which
/// belongs to the namespace of the thread that opens it.
pub fn current_pod_addresses() -> io::Result<Vec<IpAddr>> {
    use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::{
        RouteNetlinkMessage,
        address::{AddressAttribute, AddressMessage},
    };
    use netlink_sys::{
        Socket as NetlinkSocket, SocketAddr as NetlinkAddr, protocols::NETLINK_ROUTE,
    };

    let mut socket = NetlinkSocket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut request =
        NetlinkMessage::from(RouteNetlinkMessage::GetAddress(AddressMessage::default()));
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let bad = |e: netlink_packet_core::DecodeError| {
        io::Error::new(io::ErrorKind::InvalidData, e.to_string())
    };
    let mut out = Vec::new();
    loop {
        let (data, _) = socket.recv_from_full()?;
        if data.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "rtnetlink dump ended early",
            ));
        }
        let mut offset = 0;
        while offset < data.len() {
            let message =
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..]).map_err(bad)?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                // An error message without a code is an acknowledgement.
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(address)) => {
                    for attribute in address.attributes {
                        let AddressAttribute::Address(ip) = attribute else {
                            continue;
                        };
                        let link_local_v6 =
                            matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
                        if !ip.is_loopback() && !link_local_v6 && !out.contains(&ip) {
                            out.push(ip);
                        }
                    }
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}
