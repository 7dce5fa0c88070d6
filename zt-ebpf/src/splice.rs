//! `zt_splice`, the same-node fast path: the agent's two sockets of a connection between two
//! pods of this node, spliced so that what each receives is sent out of the other by the kernel
//! (see zt-daemon's `capture::splice` for the agent's side).
use aya_ebpf::{
    EbpfContext,
    bindings::sk_action,
    helpers::generated::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use zt_common::{SPLICE_PRESSURE_STEP, SpliceLink};

/// Spliced sockets (same-node fast path). Two maps because a socket must be a redirect target
/// before its peer's program may run, yet must not have its own program attached before the
/// agent can order what it already received: the agent inserts both sockets into TARGETS (no
/// program, data still queues normally), then into SOURCES (the verdict takes over, queued bytes
/// first). Not pinned: they belong to the agent process that spliced the connections.
#[map(name = "ZT_SPLICE_SOURCES")]
static SPLICE_SOURCES: SockHash<u64> = SockHash::with_max_entries(65536, 0);
#[map(name = "ZT_SPLICE_TARGETS")]
static SPLICE_TARGETS: SockHash<u64> = SockHash::with_max_entries(65536, 0);
#[map(name = "ZT_SPLICE_LINKS")]
static SPLICE_LINKS: HashMap<u64, SpliceLink> = HashMap::with_max_entries(65536, 0);
/// Socket cookies, each time one forwarded another `SPLICE_PRESSURE_STEP` bytes: the redirect
/// queue has no bound of its own, so the agent checks the peer keeps up (`capture::splice`).
#[map(name = "ZT_SPLICE_PRESSURE")]
static SPLICE_PRESSURE: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Sends what a spliced socket received out of its peer socket, and counts it. A socket without
/// a link (the agent is tearing the connection down) keeps its bytes for the agent to read.
#[stream_verdict]
pub fn zt_splice(ctx: SkBuffContext) -> u32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(link) = SPLICE_LINKS.get_ptr_mut(&cookie) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: pointer from a successful lookup. One socket's verdicts run one at a time (under
    // the socket's lock), and only they write its link.
    let link = unsafe { &mut *link };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN stays with its socket, where the agent reads the end. Sent out of the peer
        // as an empty segment it would be an error that breaks the peer's redirect queue.
        return sk_action::SK_PASS;
    }
    let mut peer = link.peer;
    // Egress of the peer socket; SK_DROP if the peer left the map (it closed).
    let verdict = SPLICE_TARGETS.redirect_skb(&ctx, &mut peer, 0) as u32;
    if verdict != sk_action::SK_PASS {
        link.dropped += len;
        return verdict;
    }
    let before = link.bytes;
    link.bytes = before + len;
    if before / SPLICE_PRESSURE_STEP != link.bytes / SPLICE_PRESSURE_STEP {
        // A full ring only delays the check to the next step.
        let _ = SPLICE_PRESSURE.output(&cookie, 0);
    }
    verdict
}
