//! zt's kernel programs.
//!
//! - `zt_connect4/6` (cgroup): a TCP connect from an enrolled pod is rewritten to the agent's
//!   in-pod outbound listener; the original destination is kept by socket cookie. A UDP connect
//!   is checked against the pod's non-TCP rules.
//! - `zt_sendmsg4/6` (cgroup): unconnected UDP from an enrolled pod, checked the same way.
//! - `zt_sock_create` (cgroup): a pod whose non-TCP egress is refused may not open raw sockets
//!   or sockets of other protocols (SCTP, ...), which would carry traffic past every other hook.
//! - `zt_sockops` (cgroup): once the source port is known, re-keys that entry by
//!   (netns cookie, source port) so the agent finds it after accept(), and forgets it on close.
//! - `zt_getpeername4/6` (cgroup): the application sees its original peer.
//! - `zt_bind4/6`, `zt_post_bind4/6` (cgroup, `ports`): the agent's ports are reserved in every
//!   pod network namespace on the node, enrolled or not, including ports the kernel picks for
//!   `bind(port 0)`.
//! - `zt_sk_lookup` (one instance per pod netns, which knows its pod's netns cookie): every
//!   inbound TCP connection arriving in the pod goes to the agent, whatever its destination
//!   address; inbound UDP follows the pod's non-TCP rules.
//!
//! - `direct`: under `mtls.same_node = "direct"`, the connect, sockops and sk_lookup programs
//!   let connections the agent already authorized between two pods of this node go pod to pod.
//! - `zt_splice` (stream verdict on `ZT_SPLICE_SOURCES`): the same-node fast path. When both
//!   ends of a connection are enrolled on this node and policy allows it, the agent puts its two
//!   sockets of the connection in the map, and what each receives is sent out of the other by the
//!   kernel, without entering user space.
//!
//! The agent's own sockets are recognised by their socket cookie, which the agent registers in
//! `ZT_AGENT_SOCKETS` before it binds or connects them: a pod cannot write that map, whereas it
//! could set any SO_MARK with CAP_NET_RAW.
// Built for the BPF target by zt-daemon's build.rs. A host build (`cargo build --workspace`)
// links std, whose panic handler replaces ours, and gets an empty `main`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod direct;
mod ports;
mod splice;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock_tuple,
        sk_action,
    },
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_lookup_tcp,
        bpf_sk_release,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use zt_common::{
    AF_INET, AF_INET6, ConnKey, DNS_REPLY_WINDOW_NS, DnsQueryKey, EnrolledPod, HBONE_PORT,
    OUTBOUND_PORT, PodPortKey, SockAddr, pod_flags, port_kinds, settings,
};

pub(crate) const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const LOOPBACK_IFINDEX: u32 = 1;
const DNS_PORT: u16 = 53;
/// cgroup program verdicts.
pub(crate) const ALLOW: i32 = 1;
pub(crate) const DENY: i32 = 0;
const ENOENT: i32 = 2;

/// Set per loaded instance of `zt_sk_lookup`: the netns cookie of the pod it is attached to
/// (an sk_lookup program cannot ask the kernel for its netns). Not zero, so that it lives in
/// `.rodata`, where the loader can set it.
#[unsafe(no_mangle)]
static POD_NETNS_COOKIE: u64 = u64::MAX;

#[map(name = "ZT_ENROLLED")]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(4096, 0);

#[map(name = "ZT_ORIG_DST_BY_COOKIE")]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, SockAddr> = LruHashMap::pinned(65536, 0);

#[map(name = "ZT_ORIG_DST_BY_PORT")]
static ORIG_DST_BY_PORT: LruHashMap<ConnKey, SockAddr> = LruHashMap::pinned(65536, 0);

/// Pod netns cookie -> the agent's inbound plaintext listener inside that pod.
#[map(name = "ZT_POD_LISTENERS")]
static POD_LISTENERS: SockHash<u64> = SockHash::pinned(4096, 0);

/// Socket cookies of the agent's sockets. Cookies are never reused, so an entry that outlives
/// its socket is harmless; the LRU bounds the map.
#[map(name = "ZT_AGENT_SOCKETS")]
static AGENT_SOCKETS: LruHashMap<u64, u8> = LruHashMap::pinned(65536, 0);

#[map(name = "ZT_POD_PORTS")]
static POD_PORTS: HashMap<PodPortKey, u8> = HashMap::pinned(16384, 0);

#[map(name = "ZT_SETTINGS_V2")]
static SETTINGS: Array<u64> = Array::pinned(settings::LEN, 0);

#[map(name = "ZT_DENIED_BINDS")]
pub(crate) static DENIED_BINDS: HashMap<u64, u64> = HashMap::pinned(4096, 0);

/// When enrolled pods last sent a DNS query from each UDP port (`DnsQueryKey`).
#[map(name = "ZT_DNS_QUERIES")]
static DNS_QUERIES: LruHashMap<DnsQueryKey, u64> = LruHashMap::pinned(65536, 0);

#[inline(always)]
pub(crate) fn setting(index: u32) -> u64 {
    SETTINGS.get(index).copied().unwrap_or(0)
}

/// The pod's capture flags, if the netns is enrolled.
#[inline(always)]
pub(crate) fn enrolled_flags(netns_cookie: u64) -> Option<u64> {
    // SAFETY: pointer from a successful lookup; EnrolledPod is Copy.
    ENROLLED
        .get_ptr(&netns_cookie)
        .map(|p| unsafe { (*p).flags })
}

#[inline(always)]
pub(crate) fn is_agent_cookie(socket_cookie: u64) -> bool {
    AGENT_SOCKETS.get_ptr(&socket_cookie).is_some()
}

/// Whether `port` of `kind` is let through for the pod, by a per-pod or a node-wide entry.
#[inline(always)]
fn port_allowed(netns_cookie: u64, port: u16, kind: u16) -> bool {
    let mut key = PodPortKey {
        netns_cookie,
        port,
        kind,
        _pad: [0; 4],
    };
    if POD_PORTS.get_ptr(&key).is_some() {
        return true;
    }
    key.netns_cookie = 0;
    POD_PORTS.get_ptr(&key).is_some()
}

/// Fail-open mode needs to know whether the agent's outbound listener is alive in this netns.
#[inline(always)]
fn outbound_listener_alive(ctx: &SockAddrContext) -> bool {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.daddr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
    tuple.__bindgen_anon_1.ipv4.dport = OUTBOUND_PORT.to_be();
    let size = core::mem::size_of_val(unsafe { &tuple.__bindgen_anon_1.ipv4 }) as u32;
    // SAFETY: helper call with a valid tuple; a found socket is released right away.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// What a connect or sendmsg hook does with the socket behind `ctx`.
enum Verdict {
    /// Not ours to touch (not an enrolled pod, the agent's own socket, loopback).
    Pass,
    /// TCP from the enrolled pod with this netns cookie: rewrite to the agent (unless the pod
    /// holds a direct grant for the destination).
    Capture(u64),
    Refuse,
}

/// The common decision of the connect and sendmsg hooks for a non-loopback destination port.
#[inline(always)]
fn classify(ctx: &SockAddrContext, port: u16) -> Verdict {
    // SAFETY: valid context pointer from the kernel.
    let sa = unsafe { &*ctx.sock_addr };
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(flags) = enrolled_flags(netns) else {
        return Verdict::Pass;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if is_agent_cookie(cookie) {
        return Verdict::Pass;
    }
    if flags & pod_flags::ENROLLMENT_FAILED != 0 {
        return Verdict::Refuse;
    }
    if sa.type_ == SOCK_STREAM {
        return Verdict::Capture(netns);
    }
    if flags & pod_flags::REFUSE_OUTBOUND_NON_TCP != 0
        && !port_allowed(netns, port, port_kinds::UDP_OUTBOUND)
    {
        return Verdict::Refuse;
    }
    Verdict::Pass
}

/// Records `dst` for this socket and decides whether to rewrite; false leaves the connect alone.
#[inline(always)]
fn capture(ctx: &SockAddrContext, dst: SockAddr) -> bool {
    if setting(settings::FAIL_OPEN) != 0 && !outbound_listener_alive(ctx) {
        return false;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_DST_BY_COOKIE.insert(&cookie, &dst, 0).is_err() {
        // Still rewrite: the agent closes a connection it has no destination for, which is
        // fail-closed, whereas leaving it alone would bypass the agent.
        warn!(ctx, "zt: cannot record original destination");
    }
    true
}

#[inline(always)]
fn is_loopback_v4(addr_be: u32) -> bool {
    u32::from_be(addr_be) >> 24 == 127
}

/// An IPv6 destination as the programs store it (IPv4-mapped becomes IPv4), and whether it is
/// loopback.
#[inline(always)]
fn ipv6_destination(ip: [u32; 4], port: u16) -> (SockAddr, bool) {
    let v4_mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == 0xffffu32.to_be();
    if v4_mapped {
        let dst = SockAddr {
            addr: [ip[3], 0, 0, 0],
            port,
            family: AF_INET,
        };
        (dst, is_loopback_v4(ip[3]))
    } else {
        let loopback = ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 1u32.to_be();
        let dst = SockAddr {
            addr: ip,
            port,
            family: AF_INET6,
        };
        (dst, loopback)
    }
}

#[cgroup_sock_addr(connect4)]
pub fn zt_connect4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if is_loopback_v4(sa.user_ip4) {
        return ALLOW;
    }
    let port = u16::from_be(sa.user_port as u16);
    match classify(&ctx, port) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => DENY,
        Verdict::Capture(netns) => {
            let dst = SockAddr {
                addr: [sa.user_ip4, 0, 0, 0],
                port,
                family: AF_INET,
            };
            if direct::granted(&ctx, netns, dst) {
                return ALLOW;
            }
            if capture(&ctx, dst) {
                debug!(&ctx, "zt: captured connect4 to port {}", port);
                sa.user_ip4 = u32::from_be_bytes([127, 0, 0, 1]).to_be();
                sa.user_port = OUTBOUND_PORT.to_be() as u32;
            }
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn zt_connect6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = sa.user_ip6;
    let port = u16::from_be(sa.user_port as u16);
    let (dst, loopback) = ipv6_destination(ip, port);
    if loopback {
        return ALLOW;
    }
    match classify(&ctx, port) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => DENY,
        Verdict::Capture(netns) => {
            if direct::granted(&ctx, netns, dst) {
                return ALLOW;
            }
            if capture(&ctx, dst) {
                debug!(&ctx, "zt: captured connect6 to port {}", port);
                sa.user_ip6 = if dst.family == AF_INET {
                    [
                        0,
                        0,
                        0xffffu32.to_be(),
                        u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                    ]
                } else {
                    [0, 0, 0, 1u32.to_be()]
                };
                sa.user_port = OUTBOUND_PORT.to_be() as u32;
            }
            ALLOW
        }
    }
}

/// Unconnected UDP (`sendto`/`sendmsg` with an address): TCP never comes here.
#[inline(always)]
fn guard_sendmsg(ctx: &SockAddrContext, dst: SockAddr, loopback: bool) -> i32 {
    if loopback {
        return ALLOW;
    }
    match classify(ctx, dst.port) {
        Verdict::Refuse => DENY,
        Verdict::Pass | Verdict::Capture(_) => {
            if dst.port == DNS_PORT {
                remember_dns_query(ctx);
            }
            ALLOW
        }
    }
}

/// Records that an enrolled pod sent a DNS query from its socket's port, so that the reply
/// passes inbound. The socket is bound by now (`sendmsg` binds before this hook runs).
#[inline(always)]
fn remember_dns_query(ctx: &SockAddrContext) {
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if enrolled_flags(netns_cookie).is_none() {
        return;
    }
    // SAFETY: a sock_addr context always carries its socket.
    let port = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).src_port } as u16;
    let key = DnsQueryKey {
        netns_cookie,
        port,
        _pad: [0; 6],
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if DNS_QUERIES.insert(&key, &now, 0).is_err() {
        warn!(
            ctx,
            "zt: cannot record a DNS query; its reply will be dropped"
        );
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn zt_sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    let dst = SockAddr {
        addr: [sa.user_ip4, 0, 0, 0],
        port: u16::from_be(sa.user_port as u16),
        family: AF_INET,
    };
    guard_sendmsg(&ctx, dst, is_loopback_v4(sa.user_ip4))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn zt_sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    let (dst, loopback) = ipv6_destination(sa.user_ip6, port);
    guard_sendmsg(&ctx, dst, loopback)
}

#[cgroup_sock(sock_create)]
pub fn zt_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: valid context pointer from the kernel.
    let sk = unsafe { &*ctx.sock };
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(flags) = enrolled_flags(netns) else {
        return ALLOW;
    };
    if flags & pod_flags::REFUSE_OUTBOUND_NON_TCP == 0 {
        return ALLOW;
    }
    // TCP and UDP are covered by the other hooks. Raw sockets and other protocols would go
    // around capture, and so would ping sockets: their sendto reaches no cgroup hook, and ICMP
    // echo payloads carry any data to any host.
    let allowed = matches!(
        (sk.type_, sk.protocol),
        (SOCK_STREAM, 0 | IPPROTO_TCP) | (SOCK_DGRAM, 0 | IPPROTO_UDP)
    );
    if allowed {
        ALLOW
    } else {
        warn!(
            &ctx,
            "zt: refused a socket of type {} protocol {} in a pod whose non-TCP egress is refused",
            sk.type_,
            sk.protocol
        );
        DENY
    }
}

#[sock_ops]
pub fn zt_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            if rekey_original_dst(&ctx) || direct::connecting(&ctx) {
                // Ask for state callbacks so the entries go away with the socket.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        // Only sockets we asked state callbacks for can be direct connections.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB if ctx.cb_flags() & BPF_SOCK_OPS_STATE_CB_FLAG != 0 => {
            direct::report(&ctx, None);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) != BPF_TCP_CLOSE => direct::entered(&ctx, ctx.arg(1)),
        BPF_SOCK_OPS_STATE_CB => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
            let key = ConnKey {
                netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
                port: ctx.local_port() as u16,
                _pad: [0; 6],
            };
            let _ = ORIG_DST_BY_PORT.remove(&key);
            direct::report(&ctx, Some(ctx.arg(0)));
        }
        _ => {}
    }
    0
}

/// TCP_CONNECT_CB of a captured socket: re-keys its original destination by (netns cookie,
/// source port), now that the port is known. Returns whether the socket was captured.
#[inline(always)]
fn rekey_original_dst(ctx: &SockOpsContext) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(dst) = ORIG_DST_BY_COOKIE.get_ptr(&cookie) else {
        return false;
    };
    // SAFETY: pointer from a successful lookup; SockAddr is Copy.
    let dst = unsafe { *dst };
    let key = ConnKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        port: ctx.local_port() as u16,
        _pad: [0; 6],
    };
    if ORIG_DST_BY_PORT.insert(&key, &dst, 0).is_err() {
        warn!(ctx, "zt: cannot re-key original destination");
    }
    true
}

#[inline(always)]
fn original_peer(ctx: &SockAddrContext) -> Option<SockAddr> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: pointer from a successful lookup; SockAddr is Copy.
    ORIG_DST_BY_COOKIE.get_ptr(&cookie).map(|p| unsafe { *p })
}

#[cgroup_sock_addr(getpeername4)]
pub fn zt_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(dst) = original_peer(&ctx)
        && dst.family == AF_INET
    {
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = dst.addr[0];
        sa.user_port = dst.port.to_be() as u32;
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn zt_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(dst) = original_peer(&ctx) {
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6 = if dst.family == AF_INET {
            [0, 0, 0xffffu32.to_be(), dst.addr[0]]
        } else {
            dst.addr
        };
        sa.user_port = dst.port.to_be() as u32;
    }
    ALLOW
}

/// Whether the connection's source address is its destination address.
#[inline(always)]
fn from_self(ctx: &SkLookupContext) -> bool {
    // SAFETY: valid context pointer from the kernel.
    let lk = unsafe { &*ctx.lookup };
    if lk.family == AF_INET as u32 {
        return lk.remote_ip4 == lk.local_ip4;
    }
    // Field by field: the verifier refuses a copy through an offset context pointer.
    let local = |i: usize| unsafe { core::ptr::read_volatile(&(*ctx.lookup).local_ip6[i]) };
    let remote = |i: usize| unsafe { core::ptr::read_volatile(&(*ctx.lookup).remote_ip6[i]) };
    local(0) == remote(0) && local(1) == remote(1) && local(2) == remote(2) && local(3) == remote(3)
}

#[sk_lookup]
pub fn zt_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: valid context pointer from the kernel.
    let lk = unsafe { &*ctx.lookup };
    // Traffic inside the pod (the agent delivering to the app, the app calling itself) arrives
    // on loopback, or with the destination address as its source: the kernel drops such a
    // source arriving from outside as martian.
    if lk.ingress_ifindex == LOOPBACK_IFINDEX || from_self(&ctx) {
        return sk_action::SK_PASS;
    }
    // SAFETY: a constant the agent set when it loaded this instance.
    let netns = unsafe { core::ptr::read_volatile(&POD_NETNS_COOKIE) };
    let Some(flags) = enrolled_flags(netns) else {
        // Attached but not (or no longer) enrolled: the agent is between steps; fail closed.
        return sk_action::SK_DROP;
    };
    if flags & pod_flags::ENROLLMENT_FAILED != 0 {
        return sk_action::SK_DROP;
    }
    let local_port = lk.local_port as u16;
    if lk.protocol != IPPROTO_TCP {
        // UDP (sk_lookup sees only TCP and UDP). A connected socket's replies never come here.
        if flags & pod_flags::DROP_INBOUND_NON_TCP == 0
            || port_allowed(netns, local_port, port_kinds::UDP_INBOUND)
        {
            return sk_action::SK_PASS;
        }
        // Replies to unconnected queries (a resolver that does not connect its socket): to a
        // port the pod just sent a query from, not to any port a sender of port 53 picks.
        let remote_port = u16::from_be(lk.remote_port);
        if remote_port == DNS_PORT && port_allowed(netns, DNS_PORT, port_kinds::UDP_OUTBOUND) {
            let key = DnsQueryKey {
                netns_cookie: netns,
                port: local_port,
                _pad: [0; 6],
            };
            // SAFETY: pointer from a successful lookup; u64 is Copy.
            if let Some(sent) = DNS_QUERIES.get_ptr(&key).map(|p| unsafe { *p }) {
                let now = unsafe { bpf_ktime_get_ns() };
                if now.wrapping_sub(sent) < DNS_REPLY_WINDOW_NS {
                    return sk_action::SK_PASS;
                }
            }
        }
        return sk_action::SK_DROP;
    }
    if local_port == HBONE_PORT || direct::admitted(&ctx, netns) {
        return sk_action::SK_PASS;
    }
    let probe_source = setting(settings::PROBE_SOURCE_V4) as u32;
    if probe_source != 0
        && lk.family == AF_INET as u32
        && lk.remote_ip4 == probe_source
        && port_allowed(netns, local_port, port_kinds::PROBE)
    {
        return sk_action::SK_PASS;
    }
    match POD_LISTENERS.redirect_sk_lookup(&ctx, &netns, 0) {
        Ok(()) => sk_action::SK_PASS,
        // No live agent listener: drop unless the operator chose fail-open.
        Err(e) if e == -ENOENT && setting(settings::FAIL_OPEN) != 0 => sk_action::SK_PASS,
        Err(_) => sk_action::SK_DROP,
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
