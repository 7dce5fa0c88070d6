//! The agent's own sockets and the kernel's cookies. Every socket the agent creates is
//! registered in `ZT_AGENT_SOCKETS` by its socket cookie before it is bound or connected, and
//! the programs leave registered sockets alone; pods are known by their netns cookie.
use std::{
    io,
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap, Map, MapData};
use socket2::{Domain, Socket, Type};
use zt_common::map_names;

use super::{CaptureError, open_map};

/// The registry of the agent's own sockets (`ZT_AGENT_SOCKETS`): the programs leave a socket
/// alone when its cookie is registered, so the agent registers each socket it creates before it
/// binds or connects it. Cheap to clone; shared by every pod's netns.
#[derive(Clone)]
pub struct AgentSockets(Arc<Mutex<HashMap<MapData, u64, u8>>>);

impl AgentSockets {
    pub fn open(pin_dir: &Path) -> Result<Self, CaptureError> {
        let map = open_map(pin_dir, map_names::AGENT_SOCKETS, Map::LruHashMap)?;
        Ok(Self(Arc::new(Mutex::new(map))))
    }

    /// Registers `socket` as the agent's.
    pub fn register(&self, socket: &impl AsRawFd) -> io::Result<()> {
        let cookie = socket_cookie(socket)?;
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(&cookie, &1, 0)
            .map_err(|e| io::Error::other(format!("{}: {e}", map_names::AGENT_SOCKETS)))
    }
}

/// SO_COOKIE: the kernel's unique, never reused identifier of a socket.
pub fn socket_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    socket_option(socket, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// SO_NETNS_COOKIE of the calling thread's namespace.
pub fn current_netns_cookie() -> io::Result<u64> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), None)?;
    socket_option(&socket, libc::SOL_SOCKET, libc::SO_NETNS_COOKIE)
}

/// A C value the kernel fills as a socket option.
///
/// # Safety
/// Every bit pattern, zero included, must be a valid value (plain integers and C structs of them).
pub unsafe trait SocketOptionValue: Copy {}
// SAFETY: integers, and a C struct of integers.
unsafe impl SocketOptionValue for u64 {}
unsafe impl SocketOptionValue for libc::c_int {}
unsafe impl SocketOptionValue for libc::tcp_info {}

/// The option `option` at `level` of `socket` (a struct the kernel fills only in part keeps
/// zeros in the rest).
pub fn socket_option<T: SocketOptionValue>(
    socket: &impl AsRawFd,
    level: libc::c_int,
    option: libc::c_int,
) -> io::Result<T> {
    // SAFETY: `SocketOptionValue` types are valid when zeroed.
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: valid fd, and an out-pointer and length for a `T`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}
