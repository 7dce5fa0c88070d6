//! A pod's own TCP sockets, as the kernel's socket diagnostics (NETLINK_SOCK_DIAG, what `ss`
//! uses) show them in the calling thread's namespace: aborting one (`ss -K`), and how long each
//! has been idle. The agent holds no socket of a direct same-node connection; these are how it
//! still closes one on a policy change, at a limit, or once it has been idle too long.
use std::{io, net::SocketAddr, time::Duration};

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, SockDiagDestroy, SockDiagMessage, TCP_CLOSE_WAIT, TCP_CLOSING,
    TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_LAST_ACK,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

/// One of a pod's TCP connections as the kernel finds it: the 4-tuple of the pod's own socket
/// and that socket's cookie (which a later connection on the same 4-tuple does not share).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodConnection {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub cookie: u64,
}

impl PodConnection {
    /// The kernel's request for exactly this socket: a lookup by 4-tuple whose answer is
    /// refused unless the cookie matches (a lookup whose connection is gone can fall back to a
    /// listener on the same port, which must not be touched).
    fn request(&self, extensions: ExtensionFlags) -> InetRequest {
        let (local_ip, remote_ip) = (
            self.local.ip().to_canonical(),
            self.remote.ip().to_canonical(),
        );
        InetRequest {
            family: if local_ip.is_ipv4() {
                AF_INET
            } else {
                AF_INET6
            },
            protocol: IPPROTO_TCP,
            extensions,
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: self.local.port(),
                destination_port: self.remote.port(),
                source_address: local_ip,
                destination_address: remote_ip,
                interface_id: 0,
                cookie: cookie_bytes(self.cookie),
            },
        }
    }
}

/// Resets every TCP connection of the calling thread's namespace that capture cannot have seen,
/// for a pod being captured for the first time: a connection it opened (or accepted) before
/// would otherwise go on around the agent for as long as it lives. Spared: listeners, sockets
/// already closing down in TIME_WAIT, anything on one of the agent's ports (connections capture
/// already sent to the agent), and sockets no process holds yet (an accept queue's, the agent's
/// own steered connections among them). Returns how many were reset.
pub fn reset_uncaptured() -> io::Result<usize> {
    let states = StateFlags::all() - StateFlags::LISTEN - StateFlags::TIME_WAIT - StateFlags::CLOSE;
    let mut found = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let mut attempts = 3;
        loop {
            let mut connections = Vec::new();
            let request = SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: states.clone(),
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            });
            let dumped =
                super::netlink::exchange(NETLINK_SOCK_DIAG, request, NLM_F_DUMP, |reply| {
                    let SockDiagMessage::InetResponse(response) = reply else {
                        return;
                    };
                    let (header, id) = (&response.header, &response.header.socket_id);
                    let on_agent_port = zt_common::is_agent_port(id.source_port)
                        || zt_common::is_agent_port(id.destination_port);
                    if header.inode == 0 || on_agent_port {
                        return;
                    }
                    connections.push(PodConnection {
                        local: SocketAddr::new(id.source_address, id.source_port),
                        remote: SocketAddr::new(id.destination_address, id.destination_port),
                        cookie: cookie_of(&id.cookie),
                    });
                });
            match dumped {
                Ok(()) => {
                    found.extend(connections);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted && attempts > 1 => attempts -= 1,
                Err(e) => return Err(e),
            }
        }
    }
    let mut reset = 0;
    for connection in &found {
        match abort_connection(connection) {
            Ok(()) => reset += 1,
            // Gone meanwhile.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ESTALE) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(reset)
}

/// Aborts `connection` in the calling thread's namespace, as `ss -K` does (SOCK_DESTROY): the
/// socket's owner sees a reset, and so does its peer. `NotFound` or `ESTALE` when it is already
/// gone.
pub fn abort_connection(connection: &PodConnection) -> io::Result<()> {
    let request = SockDiagDestroy::new(SockDiagMessage::InetRequest(
        connection.request(ExtensionFlags::empty()),
    ));
    let mut unexpected = None;
    super::netlink::exchange(
        NETLINK_SOCK_DIAG,
        request,
        NLM_F_ACK,
        |reply: SockDiagMessage| {
            unexpected = Some(reply);
        },
    )?;
    match unexpected {
        None => Ok(()),
        Some(other) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SOCK_DESTROY: unexpected reply {other:?}"),
        )),
    }
}

/// How long `connection` (in the calling thread's namespace) has carried no data in either
/// direction: the kernel's `tcpi_last_data_sent` and `tcpi_last_data_recv`, which an
/// established connection that never carried any counts from its connect. `None` while it is
/// not established or closing down (a connect still waiting for its SYN-ACK has no such time
/// yet), and once it is gone.
pub fn idle_for(connection: &PodConnection) -> io::Result<Option<Duration>> {
    const CARRYING: [u8; 6] = [
        TCP_ESTABLISHED,
        TCP_FIN_WAIT1,
        TCP_FIN_WAIT2,
        TCP_CLOSE_WAIT,
        TCP_LAST_ACK,
        TCP_CLOSING,
    ];
    let request = SockDiagMessage::InetRequest(connection.request(ExtensionFlags::INFO));
    let mut idle = None;
    let asked = super::netlink::exchange(NETLINK_SOCK_DIAG, request, NLM_F_ACK, |reply| {
        let SockDiagMessage::InetResponse(response) = reply else {
            return;
        };
        // The kernel matched the cookie already; an answer about another socket is none.
        if !CARRYING.contains(&response.header.state)
            || cookie_of(&response.header.socket_id.cookie) != connection.cookie
        {
            return;
        }
        idle = response.nlas.iter().find_map(|nla| match nla {
            Nla::TcpInfo(info) => Some(Duration::from_millis(u64::from(
                info.last_data_sent.min(info.last_data_recv),
            ))),
            _ => None,
        });
    });
    match asked {
        Ok(()) => Ok(idle),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESTALE) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Whether [`abort_connection`] works here: aborts one end of a loopback connection the agent
/// makes for the purpose, in its own namespace, and checks the other end saw the reset.
pub fn check_abort_works() -> io::Result<()> {
    use std::io::Read as _;
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    let cookie = crate::capture::socket_cookie(&client)?;
    abort_connection(&PodConnection {
        local: client.local_addr()?,
        remote: client.peer_addr()?,
        cookie,
    })?;
    server.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    match server.read(&mut [0u8; 1]) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
        other => Err(io::Error::other(format!(
            "SOCK_DESTROY answered, but the peer saw {other:?} rather than a reset"
        ))),
    }
}

/// The kernel's socket cookie as `inet_diag_sockid` carries it: two native-endian u32 halves,
/// low first.
fn cookie_bytes(cookie: u64) -> [u8; 8] {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
    bytes[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    bytes
}

fn cookie_of(bytes: &[u8; 8]) -> u64 {
    let half = |b: &[u8]| u64::from(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    half(&bytes[..4]) | (half(&bytes[4..]) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_survives_the_kernels_two_halves() {
        for cookie in [0, 1, 0xdead_beef, 0x1234_5678_9abc_def0, u64::MAX] {
            assert_eq!(cookie_of(&cookie_bytes(cookie)), cookie);
        }
    }
}
