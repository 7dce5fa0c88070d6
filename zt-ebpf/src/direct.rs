//! `mtls.same_node = "direct"`: connections between two pods of this node that the agent has
//! already authorized go pod to pod, without the agent (see zt-daemon's `capture::direct`).
//!
//! - connect: a pod's connect to a destination it holds a grant for, of the current epoch, is
//!   left alone and its socket remembered (`DIRECT_PENDING`);
//! - sockops: once the kernel picked the source port, the connection is recorded by its 4-tuple
//!   (`DIRECT_FLOWS`); it is reported to the agent when it opens and when it closes, with the
//!   source socket's byte counters;
//! - sk_lookup: the destination pod's instance lets a recorded connection of the current epoch
//!   reach the application's own listener. Anything else still goes to the agent.
//!
//! The source is known by its socket's netns cookie, and a connection is recorded only from the
//! source pod's own address (the grant carries it) and never over another socket's record, so
//! a pod can neither claim another pod's grant nor speak in another pod's name over its own.
//! A policy change bumps the epoch before the agent re-checks the open connections: from then
//! on, stale grants and records let nothing new past the agent.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_TCP_SYN_SENT},
    helpers::generated::bpf_get_socket_cookie,
    macros::map,
    maps::{Array, HashMap, LruHashMap, RingBuf},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use zt_common::{
    AF_INET, AF_INET6, DIRECT_FLOWS_MAX, DIRECT_GRANTS_MAX, DirectEvent, DirectFlow,
    DirectGrantKey, FlowKey, SockAddr, direct_events, pod_flags,
};

/// Allocated as used: grants and flows are few on most nodes.
const NO_PREALLOC: u32 = BPF_F_NO_PREALLOC;

#[map(name = "ZT_DIRECT_GRANTS")]
static GRANTS: HashMap<DirectGrantKey, DirectFlow> =
    HashMap::pinned(DIRECT_GRANTS_MAX, NO_PREALLOC);
#[map(name = "ZT_DIRECT_PENDING")]
/// Holds a socket only from its connect to its sockops callback, microseconds; the LRU drops what
/// a connect that failed in between left.
static PENDING: LruHashMap<u64, DirectFlow> = LruHashMap::pinned(16384, 0);
#[map(name = "ZT_DIRECT_FLOWS")]
static FLOWS: HashMap<FlowKey, DirectFlow> = HashMap::pinned(DIRECT_FLOWS_MAX, NO_PREALLOC);
#[map(name = "ZT_DIRECT_EPOCH")]
static EPOCH: Array<u64> = Array::pinned(1, 0);
#[map(name = "ZT_DIRECT_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

#[inline(always)]
fn current_epoch() -> u64 {
    EPOCH.get(0).copied().unwrap_or(0)
}

/// Whether the connect of the socket behind `ctx` (pod `netns`) to `dst` may go pod to pod; if
/// so, its socket is remembered for sockops. Epoch 0 is never current: no agent set it.
#[inline(always)]
pub fn granted(ctx: &SockAddrContext, netns: u64, dst: SockAddr) -> bool {
    let key = DirectGrantKey {
        netns_cookie: netns,
        dst,
        _pad: [0; 4],
    };
    // SAFETY: pointer from a successful lookup; DirectFlow is Copy.
    let Some(grant) = GRANTS.get_ptr(&key).map(|p| unsafe { *p }) else {
        return false;
    };
    let epoch = current_epoch();
    if epoch == 0 || grant.epoch != epoch {
        return false;
    }
    // The destination pod must still be the enrolled one the agent decided for: its address
    // may since belong to a pod that is not.
    match crate::enrolled_flags(grant.dst_netns_cookie) {
        Some(flags) if flags & pod_flags::ENROLLMENT_FAILED == 0 => {}
        _ => return false,
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Without the record the destination would not let it in: take the agent's path instead.
    PENDING.insert(&cookie, &grant, 0).is_ok()
}

/// The 4-tuple of the socket behind `ctx`, from its own side (source = local).
#[inline(always)]
fn own_tuple(ctx: &SockOpsContext) -> FlowKey {
    // bpf_sock_ops.remote_port holds the network-order port as a network-order u32 (in the
    // upper half on a little-endian machine): ntohl gives it on either.
    let src_port = ctx.local_port() as u16;
    let dst_port = u32::from_be(ctx.remote_port()) as u16;
    if ctx.family() == AF_INET as u32 {
        return FlowKey {
            src: [ctx.local_ip4(), 0, 0, 0],
            dst: [ctx.remote_ip4(), 0, 0, 0],
            src_port,
            dst_port,
            family: AF_INET,
            _pad: 0,
        };
    }
    // Field by field: the verifier refuses a copy through an offset context pointer.
    let local = |i: usize| unsafe { core::ptr::read_volatile(&(*ctx.ops).local_ip6[i]) };
    let remote = |i: usize| unsafe { core::ptr::read_volatile(&(*ctx.ops).remote_ip6[i]) };
    let src = [local(0), local(1), local(2), local(3)];
    let dst = [remote(0), remote(1), remote(2), remote(3)];
    let mapped = |a: [u32; 4]| a[0] == 0 && a[1] == 0 && a[2] == 0xffffu32.to_be();
    if mapped(dst) {
        // The packets are IPv4: so is the destination's sk_lookup.
        return FlowKey {
            src: [src[3], 0, 0, 0],
            dst: [dst[3], 0, 0, 0],
            src_port,
            dst_port,
            family: AF_INET,
            _pad: 0,
        };
    }
    FlowKey {
        src,
        dst,
        src_port,
        dst_port,
        family: AF_INET6,
        _pad: 0,
    }
}

/// TCP_CONNECT_CB: records a granted connection by its 4-tuple. Returns whether it is one.
#[inline(always)]
pub fn connecting(ctx: &SockOpsContext) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: pointer from a successful lookup; DirectFlow is Copy.
    let Some(mut flow) = PENDING.get_ptr(&cookie).map(|p| unsafe { *p }) else {
        return false;
    };
    let _ = PENDING.remove(&cookie);
    let key = own_tuple(ctx);
    if key.src != flow.src_addr {
        // Not from the pod's own address: left unrecorded, so the destination sends it to the
        // agent, which refuses it as plaintext.
        return false;
    }
    flow.socket_cookie = cookie;
    // Never over another socket's record of the same 4-tuple: that one stays, and this
    // connection is left to the destination's sk_lookup, which sends it to the agent. So does a
    // full map: refused as plaintext there, never let through unrecorded.
    FLOWS.insert(&key, &flow, u64::from(BPF_NOEXIST)).is_ok()
}

/// The record of this socket's direct connection: by its 4-tuple, and only if it is this
/// socket's.
#[inline(always)]
fn own_flow(ctx: &SockOpsContext) -> Option<(FlowKey, *mut DirectFlow)> {
    let key = own_tuple(ctx);
    let flow = FLOWS.get_ptr_mut(&key)?;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: pointer from a successful lookup.
    (unsafe { (*flow).socket_cookie } == cookie).then_some((key, flow))
}

/// STATE_CB: notes that the socket entered `state` (its byte counters count a FIN only in
/// some of them).
#[inline(always)]
pub fn entered(ctx: &SockOpsContext, state: u32) {
    if let Some((_, flow)) = own_flow(ctx) {
        // SAFETY: pointer from a successful lookup; one socket's callbacks run under its lock.
        unsafe { (*flow).states |= 1u64 << (state & 63) };
    }
}

/// Reports a direct connection's open (ACTIVE_ESTABLISHED_CB) or close (STATE_CB to CLOSE,
/// `from_state` the state it left) to the agent; a closed one is forgotten.
#[inline(always)]
pub fn report(ctx: &SockOpsContext, closed_from: Option<u32>) {
    let Some((key, flow)) = own_flow(ctx) else {
        return;
    };
    // SAFETY: pointer from a successful lookup; DirectFlow is Copy.
    let pods = unsafe { *flow };
    let kind = match closed_from {
        None => direct_events::OPENED,
        Some(BPF_TCP_SYN_SENT) => direct_events::FAILED,
        Some(_) => direct_events::CLOSED,
    };
    if closed_from.is_some() {
        let _ = FLOWS.remove(&key);
    }
    // SAFETY: valid context pointer from the kernel.
    let ops = unsafe { &*ctx.ops };
    let event = DirectEvent {
        flow: key,
        pods,
        kind,
        closed_from: closed_from.unwrap_or(0),
        bytes_acked: ops.bytes_acked,
        bytes_received: ops.bytes_received,
        unacked: ops.snd_nxt.wrapping_sub(ops.snd_una),
        _pad: 0,
    };
    // A full ring loses the record, not the connection; the agent counts what it reads.
    let _ = EVENTS.output(&event, 0);
}

/// In the destination pod `netns`'s sk_lookup: whether this inbound TCP connection is a
/// recorded direct connection of the current epoch.
#[inline(always)]
pub fn admitted(ctx: &SkLookupContext, netns: u64) -> bool {
    // SAFETY: valid context pointer from the kernel.
    let lk = unsafe { &*ctx.lookup };
    let src_port = u16::from_be(lk.remote_port);
    let dst_port = lk.local_port as u16;
    let key = if lk.family == AF_INET as u32 {
        FlowKey {
            src: [lk.remote_ip4, 0, 0, 0],
            dst: [lk.local_ip4, 0, 0, 0],
            src_port,
            dst_port,
            family: AF_INET,
            _pad: 0,
        }
    } else {
        let local = |i: usize| unsafe { core::ptr::read_volatile(&(*ctx.lookup).local_ip6[i]) };
        let remote = |i: usize| unsafe { core::ptr::read_volatile(&(*ctx.lookup).remote_ip6[i]) };
        FlowKey {
            src: [remote(0), remote(1), remote(2), remote(3)],
            dst: [local(0), local(1), local(2), local(3)],
            src_port,
            dst_port,
            family: AF_INET6,
            _pad: 0,
        }
    };
    // SAFETY: pointer from a successful lookup; DirectFlow is Copy.
    let Some(flow) = FLOWS.get_ptr(&key).map(|p| unsafe { *p }) else {
        return false;
    };
    let epoch = current_epoch();
    epoch != 0 && flow.epoch == epoch && flow.dst_netns_cookie == netns
}
