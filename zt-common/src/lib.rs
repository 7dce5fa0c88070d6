//! Types shared by the kernel programs (zt-ebpf) and the agent (zt-daemon).
//!
//! Everything here is `#[repr(C)]` with explicit padding, because the same bytes are read by the
//! BPF verifier-checked programs and by user space through the maps.
#![no_std]

/// In-pod listener ports.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;

/// Whether `port` is one of the agent's in-pod ports, which no pod may hold.
pub const fn is_agent_port(port: u16) -> bool {
    port == OUTBOUND_PORT || port == INBOUND_PLAINTEXT_PORT || port == HBONE_PORT
}

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Map names, as pinned under the agent's bpffs directory.
pub mod map_names {
    pub const ENROLLED: &str = "ZT_ENROLLED";
    pub const ORIG_DST_BY_COOKIE: &str = "ZT_ORIG_DST_BY_COOKIE";
    pub const ORIG_DST_BY_PORT: &str = "ZT_ORIG_DST_BY_PORT";
    /// The agent's inbound plaintext listener of each pod, by netns cookie.
    pub const POD_LISTENERS: &str = "ZT_POD_LISTENERS";
    /// Cookies of the sockets the agent created: the programs leave them alone.
    pub const AGENT_SOCKETS: &str = "ZT_AGENT_SOCKETS";
    /// Ports let past capture: probe ports per pod, non-TCP ports per pod or node-wide.
    pub const POD_PORTS: &str = "ZT_POD_PORTS";
    pub const SETTINGS: &str = "ZT_SETTINGS_V2";
    /// Refused binds of the agent's ports, per pod netns cookie; the agent reads and clears it.
    pub const DENIED_BINDS: &str = "ZT_DENIED_BINDS";
    /// When each pod last sent a DNS query from each of its UDP ports (`DnsQueryKey` to
    /// `bpf_ktime_get_ns`).
    pub const DNS_QUERIES: &str = "ZT_DNS_QUERIES";
    /// Same-node splicing (not pinned: spliced connections belong to the agent that made
    /// them). The sockets whose received bytes `zt_splice` redirects, by socket cookie.
    pub const SPLICE_SOURCES: &str = "ZT_SPLICE_SOURCES";
    /// The same sockets as redirect targets (no program attached; see `zt_splice`).
    pub const SPLICE_TARGETS: &str = "ZT_SPLICE_TARGETS";
    /// `SpliceLink` of each spliced socket, by socket cookie.
    pub const SPLICE_LINKS: &str = "ZT_SPLICE_LINKS";
    /// Ring buffer of socket cookies (u64): a spliced socket forwarded another
    /// `SPLICE_PRESSURE_STEP` bytes, time for the agent to check how far its peer lags.
    pub const SPLICE_PRESSURE: &str = "ZT_SPLICE_PRESSURE";
    /// `mtls.same_node = "direct"` (pinned: every program and sk_lookup instance shares them).
    /// `DirectGrant` by `DirectGrantKey`: a pod may connect to a destination pod to pod.
    pub const DIRECT_GRANTS: &str = "ZT_DIRECT_GRANTS";
    /// `DirectFlow` by socket cookie, from a granted connect until sockops sees its 4-tuple.
    pub const DIRECT_PENDING: &str = "ZT_DIRECT_PENDING";
    /// `DirectFlow` by `FlowKey`: the open direct connections, which the destination's
    /// sk_lookup lets past the agent.
    pub const DIRECT_FLOWS: &str = "ZT_DIRECT_FLOWS";
    /// One u64, the grants' current epoch: a grant or flow of another epoch is void.
    pub const DIRECT_EPOCH: &str = "ZT_DIRECT_EPOCH";
    /// Ring buffer of `DirectEvent` (not pinned: it belongs to the agent that reads it).
    pub const DIRECT_EVENTS: &str = "ZT_DIRECT_EVENTS";
}

/// Key of the DIRECT_GRANTS map: a pod (its netns cookie) and a destination, as the pod dialed
/// it, that it may reach without the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DirectGrantKey {
    pub netns_cookie: u64,
    pub dst: SockAddr,
    pub _pad: [u8; 4],
}

/// Value of the DIRECT_GRANTS map, and of DIRECT_PENDING and DIRECT_FLOWS: the two pods of a
/// direct connection and the epoch of the decision that allowed it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DirectFlow {
    pub src_netns_cookie: u64,
    pub dst_netns_cookie: u64,
    pub epoch: u64,
    /// In DIRECT_FLOWS: bit `n` set once the source socket entered TCP state `n` (the kernel's
    /// numbering), which tells whether its byte counters include a FIN.
    pub states: u64,
    /// In DIRECT_FLOWS: the source socket's cookie. Only that socket updates or removes the
    /// record, and the agent aborts the connection by it.
    pub socket_cookie: u64,
    /// In a grant: the source pod's own address (as `FlowKey::src`), the only source a granted
    /// connection is recorded from (a pod may bind others: IP_TRANSPARENT with CAP_NET_RAW).
    pub src_addr: [u32; 4],
}

/// A direct connection by its 4-tuple, as the source's sockops and the destination's sk_lookup
/// both see it. Addresses in network byte order (IPv4 in `[0]`, IPv4-mapped IPv6 as IPv4),
/// ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub family: u16,
    pub _pad: u16,
}

/// An entry of the DIRECT_EVENTS ring buffer: a direct connection opened or closed (on the
/// source's socket, whose counters are the connection's).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DirectEvent {
    pub flow: FlowKey,
    pub pods: DirectFlow,
    /// `direct_events::*`.
    pub kind: u32,
    /// For a close: the TCP state the socket left.
    pub closed_from: u32,
    /// The source socket's `bytes_acked` (sequence space: the SYN, and a FIN once acknowledged,
    /// count one each).
    pub bytes_acked: u64,
    /// Its `bytes_received` (a received FIN counts one).
    pub bytes_received: u64,
    /// `snd_nxt - snd_una`: sent but not acknowledged.
    pub unacked: u32,
    pub _pad: u32,
}

/// Capacity of DIRECT_GRANTS; a grant that does not fit leaves its pair on the agent's path.
pub const DIRECT_GRANTS_MAX: u32 = 65536;
/// Capacity of DIRECT_FLOWS: open direct connections on the node. The agent stops granting
/// well before it is full (a connect already on its way to the destination without a record
/// would be refused there).
pub const DIRECT_FLOWS_MAX: u32 = 1 << 18;

/// `DirectEvent::kind`.
pub mod direct_events {
    /// The handshake completed.
    pub const OPENED: u32 = 1;
    /// The connection closed after it opened.
    pub const CLOSED: u32 = 2;
    /// The connection closed before it opened (refused, unreachable).
    pub const FAILED: u32 = 3;
}

/// See `map_names::SPLICE_PRESSURE`: a power of two.
pub const SPLICE_PRESSURE_STEP: u64 = 1 << 20;

/// Value of the SPLICE_LINKS map: where a spliced socket's received bytes go, and how many went.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SpliceLink {
    /// Socket cookie of the other socket of the connection.
    pub peer: u64,
    /// Bytes redirected to `peer` so far (written by the program only).
    pub bytes: u64,
    /// Bytes the program could not redirect (the peer left the map): the connection is broken.
    pub dropped: u64,
    /// Bytes the program cut from the front of received segments, or dropped, because the
    /// socket had already delivered them (see `KernelLayout`).
    pub trimmed: u64,
    /// How far the socket's read position runs ahead of what it delivered, after cuts that fell
    /// short (the kernel moves it by what the program let through). Program-private.
    pub ahead: u64,
}

/// Where `zt_splice` finds, in this kernel's own structs, a received segment's first sequence
/// number and its socket's read position (`copied_seq`). The kernel's sockmap receive path hands
/// the program whole segments, also one that overlaps bytes the socket already delivered (a
/// retransmission's, or one the agent read part of); TCP's own reader skips the overlap, the
/// program has to cut it. Byte offsets from the kernel's BTF, found by the agent when it loads
/// the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    /// `sk_buff.sk`.
    pub skb_sk: u32,
    /// `sk_buff.cb` plus `tcp_skb_cb.seq`.
    pub skb_seq: u32,
    /// `tcp_sock.copied_seq`.
    pub tcp_copied_seq: u32,
    pub _pad: u32,
}

impl KernelLayout {
    /// The kernel has no BTF to read offsets from: the program cuts nothing (the agent still
    /// detects bytes sent twice and resets the connection). Not zero, so that the program's
    /// global lives in `.rodata`, where the loader can set it.
    pub const UNKNOWN: Self = Self {
        skb_sk: u32::MAX,
        skb_seq: u32::MAX,
        tcp_copied_seq: u32::MAX,
        _pad: 0,
    };

    pub fn is_known(&self) -> bool {
        *self != Self::UNKNOWN
    }
}

/// Name of `zt_splice`'s `KernelLayout` global.
pub const KERNEL_LAYOUT_GLOBAL: &str = "ZT_KERNEL_LAYOUT";

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

/// Key of the DNS_QUERIES map: a pod (its netns cookie) and the local port of a UDP socket it
/// sent a DNS query from (host byte order). A STRICT pod's inbound UDP from port 53 passes only
/// to such a port, shortly after the query: the reply to an unconnected query, not any datagram
/// a sender gave source port 53. The port, not the server's address, because a load balancer in
/// the path (a Service, a socket-level one) may answer from another address than was asked.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DnsQueryKey {
    pub netns_cookie: u64,
    pub port: u16,
    pub _pad: [u8; 6],
}

/// How long after a query its replies pass (resolvers give up well before).
pub const DNS_REPLY_WINDOW_NS: u64 = 30_000_000_000;

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
    /// `pod_flags::*`.
    pub flags: u64,
}

/// Bits of `EnrolledPod::flags`.
pub mod pod_flags {
    /// The agent could not enroll the pod (its listeners could not be created): every connect
    /// from it is refused and every inbound connection to it dropped, until enrollment succeeds.
    pub const ENROLLMENT_FAILED: u64 = 1;
    /// Inbound non-TCP traffic (UDP) is dropped except on the allowed ports (the pod is STRICT).
    pub const DROP_INBOUND_NON_TCP: u64 = 2;
    /// Outbound non-TCP traffic is refused except to the allowed ports, and the pod may not
    /// create raw or non-TCP/UDP sockets (egress outside the mesh is refused).
    pub const REFUSE_OUTBOUND_NON_TCP: u64 = 4;
}

/// Key of the POD_PORTS map: a port let past capture for one pod (or, with `netns_cookie` 0,
/// for every pod on the node).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodPortKey {
    pub netns_cookie: u64,
    /// Host byte order.
    pub port: u16,
    /// `port_kinds::*`.
    pub kind: u16,
    pub _pad: [u8; 4],
}

/// What a POD_PORTS entry lets through.
pub mod port_kinds {
    /// Inbound TCP from the probe source to this port of the pod (kubelet probes).
    pub const PROBE: u16 = 1;
    /// Inbound UDP to this port.
    pub const UDP_INBOUND: u16 = 2;
    /// Outbound UDP to this port (and the replies from it).
    pub const UDP_OUTBOUND: u16 = 3;
}

/// Index of each slot in the SETTINGS array map (u64 values).
pub mod settings {
    /// 0 = fail closed (default), 1 = fail open.
    pub const FAIL_OPEN: u32 = 0;
    /// Source IPv4 address (network order) of kubelet probes; 0 = none.
    pub const PROBE_SOURCE_V4: u32 = 1;
    /// Netns cookie of the node's own (host) network namespace: the one place where the agent's
    /// ports are not reserved.
    pub const HOST_NETNS: u32 = 2;
    pub const LEN: u32 = 3;
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all types are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::DnsQueryKey {}
    unsafe impl aya::Pod for super::EnrolledPod {}
    unsafe impl aya::Pod for super::PodPortKey {}
    unsafe impl aya::Pod for super::SpliceLink {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::DirectGrantKey {}
    unsafe impl aya::Pod for super::DirectFlow {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::DirectEvent {}
}
