//! Network namespaces of pods. A socket keeps the netns it was created in, so the agent makes a
//! pod's sockets by entering the pod's netns on the calling thread (setns affects that thread
//! only), creating them, and returning to its own netns at once; the tokio runtime then uses
//! them from any thread. An upstream connect thus costs two setns calls on the thread that asks,
//! not a hand-off to another thread and back. Every socket the agent creates is registered as the
//! agent's (`AgentSockets`) before it is bound or connected, so capture leaves it alone.
use std::{
    cell::Cell,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::Duration,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use zt_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use super::sock_diag::{self, PodConnection};
use crate::capture::AgentSockets;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("netns {path}: cannot open: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("netns {path}: cannot enter: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("netns {path}: the blocking task stopped: {source}")]
    TaskGone {
        path: PathBuf,
        source: tokio::task::JoinError,
    },
}

/// One pod's network namespace, held open.
pub struct PodNetns {
    path: PathBuf,
    file: Arc<File>,
    sockets: AgentSockets,
}

impl PodNetns {
    /// Opens `path` and checks that the agent can enter it.
    pub fn open(path: &Path, sockets: AgentSockets) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let netns = Self {
            path: path.to_owned(),
            file: Arc::new(file),
            sockets,
        };
        drop(netns.enter()?);
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts the calling thread into the pod's namespace until the guard drops. Only for short,
    /// non-blocking work with no `.await` inside: the thread is a runtime worker.
    fn enter(&self) -> Result<Inside, NetnsError> {
        enter_pod(&self.file, &self.path)
    }

    /// Runs `f` inside the namespace on a blocking-pool thread: for work that may block
    /// (sysctls, netlink), which a runtime worker must not do.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, NetnsError> {
        let (file, path) = (self.file.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            let inside = enter_pod(&file, &path)?;
            let out = f();
            drop(inside);
            Ok(out)
        })
        .await
        .map_err(|source| NetnsError::TaskGone {
            path: self.path.clone(),
            source,
        })?
    }

    /// Aborts one of the pod's TCP connections; see [`sock_diag::abort_connection`]. Blocking:
    /// one netlink round trip, which may wait up to the netlink receive timeout.
    pub fn abort_connection(&self, connection: &PodConnection) -> io::Result<()> {
        let _inside = self.enter().map_err(io::Error::other)?;
        sock_diag::abort_connection(connection)
    }

    /// How long each of the pod's `connections` has carried no data; see
    /// [`sock_diag::idle_for`]. Blocking: one netlink round trip each.
    pub fn idle_for(&self, connections: &[PodConnection]) -> io::Result<Vec<Option<Duration>>> {
        let _inside = self.enter().map_err(io::Error::other)?;
        connections.iter().map(sock_diag::idle_for).collect()
    }

    /// A TCP socket in the pod's namespace, marked as the agent's, ready to connect to `dst`.
    pub fn upstream_socket(&self, dst: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
        let socket = {
            let _inside = self.enter().map_err(io::Error::other)?;
            agent_socket(Domain::for_address(dst), &self.sockets)?
        };
        let std: std::net::TcpStream = socket.into();
        Ok(tokio::net::TcpSocket::from_std_stream(std))
    }
}

/// The calling thread is inside another network namespace while this lives; dropping it
/// returns the thread to the agent's own. Not `Send`: held across an `.await`, it would return
/// another thread and strand this one.
struct Inside(std::marker::PhantomData<*const ()>);

/// [`enter`], naming the pod's namespace in the error.
fn enter_pod(netns: &File, path: &Path) -> Result<Inside, NetnsError> {
    enter(netns).map_err(|source| NetnsError::Enter {
        path: path.to_owned(),
        source,
    })
}

thread_local! {
    /// This thread holds an [`Inside`]: a second one would return it to the agent's namespace,
    /// not to the pod's, when it drops.
    static ENTERED: Cell<bool> = const { Cell::new(false) };
}

fn enter(netns: &File) -> io::Result<Inside> {
    if ENTERED.get() {
        return Err(io::Error::other(
            "this thread is already inside a pod's network namespace",
        ));
    }
    // Opened before the first entry, while the thread is still at home.
    home_netns()?;
    setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    ENTERED.set(true);
    Ok(Inside(std::marker::PhantomData))
}

impl Drop for Inside {
    fn drop(&mut self) {
        let home = home_netns().expect("opened before entering");
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A runtime thread stranded in a pod's namespace would make every later socket of
            // any pod there: stopping is the only safe outcome (the DaemonSet restarts us).
            tracing::error!(error = %e, "cannot return to the agent's network namespace; aborting");
            std::process::abort();
        }
        ENTERED.set(false);
    }
}

/// The agent's own network namespace, opened once from a thread that is in it.
fn home_netns() -> io::Result<&'static File> {
    static HOME: OnceLock<File> = OnceLock::new();
    if let Some(home) = HOME.get() {
        return Ok(home);
    }
    let file = File::open("/proc/thread-self/ns/net")?;
    Ok(HOME.get_or_init(|| file))
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

/// The addresses of the network namespace at `path` (blocking: it enters the namespace on the
/// calling thread for the netlink dump).
pub fn addresses_in(path: &Path) -> io::Result<Vec<IpAddr>> {
    let file = File::open(path)?;
    let _inside = enter(&file)?;
    current_pod_addresses()
}

/// The pod's own addresses in the calling thread's namespace (no loopback, no IPv6 link-local),
/// read from the kernel over rtnetlink: an RTM_GETADDR dump on a NETLINK_ROUTE socket, which
/// belongs to the namespace of the thread that opens it.
pub fn current_pod_addresses() -> io::Result<Vec<IpAddr>> {
    use netlink_packet_core::NLM_F_DUMP;
    use netlink_packet_route::{
        RouteNetlinkMessage,
        address::{AddressAttribute, AddressMessage},
    };
    use netlink_sys::protocols::NETLINK_ROUTE;

    // An address added or removed during the dump makes it inconsistent: asked again.
    let mut attempts = 0;
    loop {
        let mut out = Vec::new();
        let request = RouteNetlinkMessage::GetAddress(AddressMessage::default());
        let dumped = super::netlink::exchange(NETLINK_ROUTE, request, NLM_F_DUMP, |reply| {
            let RouteNetlinkMessage::NewAddress(address) = reply else {
                return;
            };
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
        });
        match dumped {
            Err(e) if e.kind() == io::ErrorKind::Interrupted && attempts < 3 => attempts += 1,
            Err(e) => return Err(e),
            Ok(()) => return Ok(out),
        }
    }
}
