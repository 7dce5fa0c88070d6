//! Types shared by the kernel programs (zt-ebpf) and the agent (zt-daemon).
//!
//! Everything here is `#[repr(C)]` with explicit padding, because the same bytes are read by the
//! BPF verifier-checked programs and by user space through the maps.
#![no_std]

/// SO_MARK carried by every socket the agent creates, so the programs never capture the agent.
pub const AGENT_MARK: u32 = 0x5a7;

/// In-pod listener ports (DESIGN.md §8).
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Map names, as pinned under the agent's bpffs directory.
pub mod map_names {
    pub const ENROLLED: &str = "ZT_ENROLLED";
    pub const ORIG_DST_BY_COOKIE: &str = "ZT_ORIG_DST_BY_COOKIE";
    pub const ORIG_DST_BY_PORT: &str = "ZT_ORIG_DST_BY_PORT";
    pub const POD_ADDRS: &str = "ZT_POD_ADDRS";
    pub const INBOUND_LISTENERS: &str = "ZT_INBOUND_LISTENERS";
    pub const SETTINGS: &str = "ZT_SETTINGS";
    /// Refused binds of the agent's ports, per pod netns cookie; the agent reads and clears it.
    pub const DENIED_BINDS: &str = "ZT_DENIED_BINDS";
}

/// A TCP endpoint as the programs store it. Addresses are in network byte order exactly as the
/// kernel hands them over (`user_ip4`, `user_ip6`); IPv4 uses `addr[0]` only. `port` is in host
/// byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockAddr {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
}

/// Key of the per-connection original destination once sockops has seen the source port:
/// the agent knows the pod (its netns cookie) and the peer port of the accepted socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnKey {
    pub netns_cookie: u64,
    /// Source port of the application's socket, host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Value of the ENROLLED map, keyed by netns cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EnrolledPod {
    /// Reserved for per-pod capture flags; zero today.
    pub flags: u64,
}

/// Key of the INBOUND_LISTENERS sockhash: the pod address the listener serves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ListenerKey {
    pub addr: [u32; 4],
    pub family: u16,
    pub _pad: [u8; 2],
}

/// Index of each slot in the SETTINGS array map.
pub mod settings {
    /// 0 = fail closed (default), 1 = fail open.
    pub const FAIL_OPEN: u32 = 0;
    /// Source IPv4 address (network order) of kubelet probes that bypass inbound capture; 0 = none.
    pub const PROBE_SOURCE_V4: u32 = 1;
    pub const LEN: u32 = 2;
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all types are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::EnrolledPod {}
    unsafe impl aya::Pod for super::ListenerKey {}
}
