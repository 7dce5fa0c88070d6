//! The agent's ports (15001, 15006, 15008) belong to the agent in every pod network namespace
//! on the node, enrolled or not: `zt_bind4/6` refuse a pod's bind of one, and `zt_post_bind4/6`
//! undo a bind to port 0 for which the kernel picked one. Refusals are counted per pod
//! (`ZT_DENIED_BINDS`) for the agent's metric and log.
use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::warn;
use zt_common::{is_agent_port, settings};

use crate::{ALLOW, DENIED_BINDS, DENY, SOCK_STREAM, is_agent_cookie, setting};

/// Whether a TCP socket in `netns` may hold `port`: the agent's ports belong to the agent in
/// every network namespace but the node's own.
#[inline(always)]
fn port_guard(netns: u64, socket_cookie: u64, socket_type: u32, port: u16) -> bool {
    if socket_type != SOCK_STREAM || !is_agent_port(port) {
        return true;
    }
    if netns == setting(settings::HOST_NETNS) || is_agent_cookie(socket_cookie) {
        return true;
    }
    // Counted per pod for the agent's metric and log; a lost increment under a race only
    // undercounts, the bind is refused either way.
    match DENIED_BINDS.get_ptr_mut(&netns) {
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = DENIED_BINDS.insert(&netns, &1, 0);
        }
    }
    false
}

#[inline(always)]
fn guard_bind(ctx: &SockAddrContext) -> i32 {
    // SAFETY: valid context pointer from the kernel.
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if port_guard(netns, cookie, sa.type_, port) {
        return ALLOW;
    }
    warn!(
        ctx,
        "zt: refused bind of the agent's port {} in a pod", port
    );
    DENY
}

#[cgroup_sock_addr(bind4)]
pub fn zt_bind4(ctx: SockAddrContext) -> i32 {
    guard_bind(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn zt_bind6(ctx: SockAddrContext) -> i32 {
    guard_bind(&ctx)
}

/// After the kernel picked the port (`bind` to port 0 with a narrowed ip_local_port_range): the
/// same guard on the port actually taken. Refusing undoes the bind.
#[inline(always)]
fn guard_post_bind(ctx: &SockContext) -> i32 {
    // SAFETY: valid context pointer from the kernel.
    let sk = unsafe { &*ctx.sock };
    let port = sk.src_port as u16;
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if port_guard(netns, cookie, sk.type_, port) {
        return ALLOW;
    }
    warn!(
        ctx,
        "zt: refused an automatic bind to the agent's port {} in a pod", port
    );
    DENY
}

#[cgroup_sock(post_bind4)]
pub fn zt_post_bind4(ctx: SockContext) -> i32 {
    guard_post_bind(&ctx)
}

#[cgroup_sock(post_bind6)]
pub fn zt_post_bind6(ctx: SockContext) -> i32 {
    guard_post_bind(&ctx)
}
