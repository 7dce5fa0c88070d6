//! zt's kernel programs (DESIGN.md §3).
//!
//! - `zt_connect4/6` (cgroup): a TCP connect from an enrolled pod is rewritten to the agent's
//!   in-pod outbound listener; the original destination is kept by socket cookie.
//! - `zt_sockops` (cgroup): once the source port is known, re-keys that entry by
//!   (netns cookie, source port) so the agent finds it after accept(), and forgets it on close.
//! - `zt_getpeername4/6` (cgroup): the application sees its original peer.
//! - `zt_bind4/6` (cgroup): only the agent may bind the agent's ports inside an enrolled pod.
//! - `zt_sk_lookup` (per pod netns): inbound TCP for the pod address goes to the agent.
//!
//! Every program lets the agent's own sockets (SO_MARK = AGENT_MARK) through untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock_tuple, sk_action,
    },
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release,
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use zt_common::{
    AF_INET, AF_INET6, AGENT_MARK, ConnKey, EnrolledPod, HBONE_PORT, INBOUND_PLAINTEXT_PORT,
    ListenerKey, OUTBOUND_PORT, SockAddr, settings,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const LOOPBACK_IFINDEX: u32 = 1;
/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ENOENT: i32 = 2;

#[map(name = "ZT_ENROLLED")]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(4096, 0);

#[map(name = "ZT_ORIG_DST_BY_COOKIE")]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, SockAddr> = LruHashMap::pinned(65536, 0);

#[map(name = "ZT_ORIG_DST_BY_PORT")]
static ORIG_DST_BY_PORT: LruHashMap<ConnKey, SockAddr> = LruHashMap::pinned(65536, 0);

/// Pod address -> netns cookie of the pod that owns it.
#[map(name = "ZT_POD_ADDRS")]
static POD_ADDRS: HashMap<ListenerKey, u64> = HashMap::pinned(8192, 0);

/// Pod address -> the agent's inbound plaintext listener inside that pod.
#[map(name = "ZT_INBOUND_LISTENERS")]
static INBOUND_LISTENERS: SockHash<ListenerKey> = SockHash::pinned(8192, 0);

#[map(name = "ZT_SETTINGS")]
static SETTINGS: Array<u32> = Array::pinned(settings::LEN, 0);

#[map(name = "ZT_DENIED_BINDS")]
static DENIED_BINDS: HashMap<u64, u64> = HashMap::pinned(4096, 0);

#[inline(always)]
fn setting(index: u32) -> u32 {
    SETTINGS.get(index).copied().unwrap_or(0)
}

#[inline(always)]
fn is_enrolled(netns_cookie: u64) -> bool {
    ENROLLED.get_ptr(&netns_cookie).is_some()
}

/// True when the socket behind a sock_addr hook is the agent's own.
#[inline(always)]
fn is_agent_socket(ctx: &SockAddrContext) -> bool {
    // SAFETY: the kernel hands a valid context; `sk` is always set for these attach types.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: checked non-null; the verifier rewrites this to a safe read of sk->sk_mark.
    unsafe { (*sk).mark == AGENT_MARK }
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

/// Common checks of the connect and bind hooks: TCP, from an enrolled pod, not the agent.
#[inline(always)]
fn applies_to(ctx: &SockAddrContext) -> bool {
    // SAFETY: valid context pointer from the kernel.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return false;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    is_enrolled(netns) && !is_agent_socket(ctx)
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

#[cgroup_sock_addr(connect4)]
pub fn zt_connect4(ctx: SockAddrContext) -> i32 {
    if !applies_to(&ctx) {
        return ALLOW;
    }
    let sa = unsafe { &mut *ctx.sock_addr };
    if is_loopback_v4(sa.user_ip4) {
        return ALLOW;
    }
    let dst = SockAddr {
        addr: [sa.user_ip4, 0, 0, 0],
        port: u16::from_be(sa.user_port as u16),
        family: AF_INET,
    };
    if capture(&ctx, dst) {
        debug!(&ctx, "zt: captured connect4 to port {}", dst.port);
        sa.user_ip4 = u32::from_be_bytes([127, 0, 0, 1]).to_be();
        sa.user_port = OUTBOUND_PORT.to_be() as u32;
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn zt_connect6(ctx: SockAddrContext) -> i32 {
    if !applies_to(&ctx) {
        return ALLOW;
    }
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = sa.user_ip6;
    let port = u16::from_be(sa.user_port as u16);
    let v4_mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == 0xffffu32.to_be();
    let loopback = if v4_mapped {
        is_loopback_v4(ip[3])
    } else {
        ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 1u32.to_be()
    };
    if loopback {
        return ALLOW;
    }
    let dst = if v4_mapped {
        SockAddr {
            addr: [ip[3], 0, 0, 0],
            port,
            family: AF_INET,
        }
    } else {
        SockAddr {
            addr: ip,
            port,
            family: AF_INET6,
        }
    };
    if capture(&ctx, dst) {
        debug!(&ctx, "zt: captured connect6 to port {}", port);
        sa.user_ip6 = if v4_mapped {
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

#[sock_ops]
pub fn zt_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let Some(dst) = ORIG_DST_BY_COOKIE.get_ptr(&cookie) else {
                return 0;
            };
            // SAFETY: pointer from a successful lookup; SockAddr is Copy.
            let dst = unsafe { *dst };
            let key = ConnKey {
                netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
                port: ctx.local_port() as u16,
                _pad: [0; 6],
            };
            if ORIG_DST_BY_PORT.insert(&key, &dst, 0).is_err() {
                warn!(&ctx, "zt: cannot re-key original destination");
            }
            // Ask for state callbacks so both entries go away with the socket.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
            let key = ConnKey {
                netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
                port: ctx.local_port() as u16,
                _pad: [0; 6],
            };
            let _ = ORIG_DST_BY_PORT.remove(&key);
        }
        _ => {}
    }
    0
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

#[inline(always)]
fn guard_bind(ctx: &SockAddrContext) -> i32 {
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    let reserved = port == OUTBOUND_PORT || port == INBOUND_PLAINTEXT_PORT || port == HBONE_PORT;
    if reserved && applies_to(ctx) {
        warn!(
            ctx,
            "zt: refused bind of reserved port {} in an enrolled pod", port
        );
        // Counted per pod for the agent's metric and log; a lost increment under a race only
        // undercounts, the bind is refused either way.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        match DENIED_BINDS.get_ptr_mut(&netns) {
            Some(count) => unsafe { *count += 1 },
            None => {
                let _ = DENIED_BINDS.insert(&netns, &1, 0);
            }
        }
        return DENY;
    }
    ALLOW
}

#[cgroup_sock_addr(bind4)]
pub fn zt_bind4(ctx: SockAddrContext) -> i32 {
    guard_bind(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn zt_bind6(ctx: SockAddrContext) -> i32 {
    guard_bind(&ctx)
}

#[sk_lookup]
pub fn zt_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: valid context pointer from the kernel.
    let lk = unsafe { &*ctx.lookup };
    if lk.protocol != IPPROTO_TCP
        || lk.local_port == HBONE_PORT as u32
        || lk.ingress_ifindex == LOOPBACK_IFINDEX
    {
        return sk_action::SK_PASS;
    }
    let probe_source = setting(settings::PROBE_SOURCE_V4);
    if probe_source != 0 && lk.family == AF_INET as u32 && lk.remote_ip4 == probe_source {
        return sk_action::SK_PASS;
    }
    let key = if lk.family == AF_INET as u32 {
        ListenerKey {
            addr: [lk.local_ip4, 0, 0, 0],
            family: AF_INET,
            _pad: [0; 2],
        }
    } else {
        // Field by field: the verifier refuses a copy through an offset context pointer.
        let ip6 = |i: usize| unsafe { core::ptr::read_volatile(&(*ctx.lookup).local_ip6[i]) };
        ListenerKey {
            addr: [ip6(0), ip6(1), ip6(2), ip6(3)],
            family: AF_INET6,
            _pad: [0; 2],
        }
    };
    // Traffic the pod sends to its own address (the agent delivering to the app, or the app
    // calling itself) arrives with the pod's address as source; the kernel drops such a source
    // on any other interface as martian, so it cannot be spoofed from outside.
    let from_self = if lk.family == AF_INET as u32 {
        lk.remote_ip4 == lk.local_ip4
    } else {
        let r6 = |i: usize| unsafe { core::ptr::read_volatile(&(*ctx.lookup).remote_ip6[i]) };
        r6(0) == key.addr[0] && r6(1) == key.addr[1] && r6(2) == key.addr[2] && r6(3) == key.addr[3]
    };
    if from_self {
        return sk_action::SK_PASS;
    }
    if POD_ADDRS.get_ptr(&key).is_none() {
        // Not a pod address this agent enrolled: not ours to steer.
        return sk_action::SK_PASS;
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, &key, 0) {
        Ok(()) => sk_action::SK_PASS,
        // No live agent listener: drop unless the operator chose fail-open.
        Err(e) if e == -ENOENT && setting(settings::FAIL_OPEN) != 0 => sk_action::SK_PASS,
        Err(_) => sk_action::SK_DROP,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
