//! A pod's own TCP sockets, as the kernel's socket diagnostics (NETLINK_SOCK_DIAG, what `ss`
//! uses) show them in the calling thread's namespace: aborting one (`ss -K`), and how long each
//! has been idle. The agent holds no socket of a direct same-node connection; these are how it
//! still closes one on a policy change, at a limit, or once it has been idle too long.
use std::{collections::HashMap, io, net::SocketAddr, time::Duration};

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, SockDiagDestroy, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

/// Aborts the TCP connection from `local` to `remote` in the calling thread's namespace, as
/// `ss -K` does (SOCK_DESTROY): the socket's owner sees a reset, and so does its peer. The kernel
/// finds the socket by its 4-tuple, and destroys it only if its cookie is `cookie`: a lookup
/// whose connection is gone can fall back to a listener on the same port, which must not be
/// touched. `NotFound` or `ESTALE` when it is already gone.
pub fn abort_connection(local: SocketAddr, remote: SocketAddr, cookie: u64) -> io::Result<()> {
    let (local_ip, remote_ip) = (local.ip().to_canonical(), remote.ip().to_canonical());
    let request = InetRequest {
        family: if local_ip.is_ipv4() {
            AF_INET
        } else {
            AF_INET6
        },
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: SocketId {
            source_port: local.port(),
            destination_port: remote.port(),
            source_address: local_ip,
            destination_address: remote_ip,
            interface_id: 0,
            cookie: cookie_bytes(cookie),
        },
    };
    let request = SockDiagDestroy::new(SockDiagMessage::InetRequest(request));
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

/// Whether [`abort_connection`] works here: aborts one end of a loopback connection the agent
/// makes for the purpose, in its own namespace, and checks the other end saw the reset.
pub fn check_abort_works() -> io::Result<()> {
    use std::io::Read as _;
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    let cookie = crate::capture::socket_cookie(&client)?;
    abort_connection(client.local_addr()?, client.peer_addr()?, cookie)?;
    server.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    match server.read(&mut [0u8; 1]) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
        other => Err(io::Error::other(format!(
            "SOCK_DESTROY answered, but the peer saw {other:?} rather than a reset"
        ))),
    }
}

/// How long each open TCP connection in the calling thread's namespace has carried no data in
/// either direction (the kernel's `tcpi_last_data_sent` and `tcpi_last_data_recv`; a connection
/// that never carried any counts from its connect), by socket cookie.
pub fn idle_connections() -> io::Result<HashMap<u64, Duration>> {
    let mut idle = HashMap::new();
    for (family, any) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            // Connections that may still carry data: not listeners, not TIME_WAIT.
            states: StateFlags::ESTABLISHED
                | StateFlags::FIN_WAIT1
                | StateFlags::FIN_WAIT2
                | StateFlags::CLOSE_WAIT
                | StateFlags::SYN_SENT,
            socket_id: any,
        });
        super::netlink::exchange(NETLINK_SOCK_DIAG, request, NLM_F_DUMP, |reply| {
            let SockDiagMessage::InetResponse(response) = reply else {
                return;
            };
            let info = response.nlas.iter().find_map(|nla| match nla {
                Nla::TcpInfo(info) => Some(info),
                _ => None,
            });
            if let Some(info) = info {
                let quiet = info.last_data_sent.min(info.last_data_recv);
                idle.insert(
                    cookie_of(&response.header.socket_id.cookie),
                    Duration::from_millis(u64::from(quiet)),
                );
            }
        })?;
    }
    Ok(idle)
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
