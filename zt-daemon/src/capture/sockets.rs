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
pub(super) fn socket_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    socket_option_u64(socket, libc::SO_COOKIE)
}

/// SO_NETNS_COOKIE of the calling thread's namespace.
pub fn current_netns_cookie() -> io::Result<u64> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), None)?;
    socket_option_u64(&socket, libc::SO_NETNS_COOKIE)
}

/// A 64-bit `SOL_SOCKET` option of `socket` (the kernel's cookies).
fn socket_option_u64(socket: &impl AsRawFd, option: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for a u64 option.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
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
