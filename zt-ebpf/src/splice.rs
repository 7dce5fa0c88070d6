//! `zt_splice`, the same-node fast path: the agent's two sockets of a connection between two
//! pods of this node, spliced so that what each receives is sent out of the other by the kernel
//! (see zt-daemon's `capture::splice` for the agent's side).
use aya_ebpf::{
    EbpfContext,
    bindings::sk_action,
    helpers::{bpf_probe_read_kernel, generated::bpf_get_socket_cookie},
    macros::{map, stream_verdict},
    maps::{HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use zt_common::{KernelLayout, SPLICE_PRESSURE_STEP, SpliceLink};

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

/// Set by the loader (`KernelLayout`).
#[unsafe(no_mangle)]
static ZT_KERNEL_LAYOUT: KernelLayout = KernelLayout::UNKNOWN;

/// `bpf_skb_adjust_room` removes at most this many bytes per call (sk_skb's limit).
const TRIM_STEP: u32 = 0xfff;
/// Bounds the cut, at 256 KiB less 64 bytes: the bytes to cut are first made linear in one
/// allocation the kernel makes atomically, which a larger size would often fail. An overlap
/// above it is not cut; the agent sees it sent twice and resets the connection.
const TRIM_STEPS: u32 = 64;

/// Sends what a spliced socket received out of its peer socket, and counts it. A socket without
/// a link keeps its bytes: a link goes in before its socket joins SOURCES and comes out after it
/// left, so that happens only in a race as the agent tears the connection down.
#[stream_verdict]
pub fn zt_splice(ctx: SkBuffContext) -> u32 {
    let received = u64::from(ctx.len());
    if received == 0 {
        // A bare FIN: TCP has already marked the socket's end, which is where the agent sees it.
        // The empty segment must go nowhere. Redirected, it would break the peer's redirect
        // queue; passed, it would join this socket's own queue whenever bytes redirected
        // towards this socket wait there, and break it the same way (the kernel's queue runner
        // takes a segment that yields no bytes for a broken pipe, and stops sending).
        return sk_action::SK_DROP;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(link) = SPLICE_LINKS.get_ptr_mut(&cookie) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: pointer from a successful lookup. One socket's verdicts run one at a time (under
    // the socket's lock), and only they write its link.
    let link = unsafe { &mut *link };
    // The socket's read position runs `ahead` of what it delivered after a cut that fell short
    // (the kernel moves it by what the program let through): less that, this segment's overlap.
    let overlap = u64::from(received_before(&ctx)).saturating_sub(link.ahead);
    if overlap >= received {
        // Old bytes only, queued for a FIN TCP has already taken: nothing to send. The kernel
        // still moves the read position by the segment's length.
        link.trimmed += received;
        link.ahead += received;
        return sk_action::SK_DROP;
    }
    if overlap > 0 {
        let cut = u64::from(trim_front(&ctx, overlap as u32));
        link.trimmed += cut;
        // What was not cut goes out twice: the agent sees more sent than received and resets
        // the connection.
        link.ahead += overlap - cut;
    }
    let len = u64::from(ctx.len());
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

/// How many bytes at the front of the segment the socket already received: its sequence number
/// is behind the socket's read position. 0 when the layout is unknown or a read fails.
fn received_before(ctx: &SkBuffContext) -> u32 {
    // SAFETY: a plain read of the loader's constant.
    let layout = unsafe { core::ptr::read_volatile(&ZT_KERNEL_LAYOUT) };
    if !layout.is_known() {
        return 0;
    }
    let skb = ctx.as_ptr() as *const u8;
    // SAFETY: bpf_probe_read_kernel checks its address; a failed read leaves the segment whole.
    let read = || unsafe {
        let sk = bpf_probe_read_kernel(skb.wrapping_add(layout.skb_sk as usize) as *const u64)?;
        let seq = bpf_probe_read_kernel(skb.wrapping_add(layout.skb_seq as usize) as *const u32)?;
        let copied = bpf_probe_read_kernel(
            (sk as *const u8).wrapping_add(layout.tcp_copied_seq as usize) as *const u32,
        )?;
        Ok::<_, i32>(copied.wrapping_sub(seq) as i32)
    };
    match read() {
        Ok(behind) if behind > 0 => behind as u32,
        _ => 0,
    }
}

/// Removes `n` bytes from the front of the segment, or none; returns how many it removed.
fn trim_front(ctx: &SkBuffContext, n: u32) -> u32 {
    if n > TRIM_STEP * TRIM_STEPS || ctx.skb.pull_data(n).is_err() {
        return 0;
    }
    let mut done = 0;
    for _ in 0..TRIM_STEPS {
        let step = n - done;
        let step = if step < TRIM_STEP { step } else { TRIM_STEP };
        // Cannot fail on linear bytes; were it to, the rest counts as not cut.
        if step == 0 || ctx.skb.adjust_room(-(step as i32), 0, 0).is_err() {
            break;
        }
        done += step;
    }
    done
}
