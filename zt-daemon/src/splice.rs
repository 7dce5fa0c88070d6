//! The relay of a spliced connection (the same-node fast path): the kernel moves the bytes
//! (`capture::Splice`); this watches both sockets for each direction's end and passes it on,
//! keeps the kernel's queues bounded, and ends the connection on a reset, an idle timeout or an
//! interrupt, like `copy::relay` does for the connections it copies.
//!
//! A direction's end (FIN) reaches the agent's socket while bytes before it may still be on their
//! way to the other socket's send path (in the kernel's redirect queue): the half-close waits
//! until the other socket has taken every byte its peer received, so it cannot overtake them. The
//! sockets are never read, only peeked: a byte in a receive queue is on its way through the
//! program (or held while its direction is paused), not an end.
use std::{
    future::Future,
    io,
    net::Shutdown,
    pin::{Pin, pin},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use tokio::{io::Interest, net::TcpStream};
use tracing::{debug, warn};

use crate::{
    capture::Splice,
    copy::{self, Abort, CloseReason, Failure, RelayOutcome},
};

/// How long a half-close waiting for the send path, or a paused direction, waits before looking
/// again, at first and at most.
const RECHECK_FIRST: Duration = Duration::from_millis(1);
const RECHECK_MAX: Duration = Duration::from_millis(50);
/// A paused direction is looked at again at most this far apart: it resumes within that of its
/// peer catching up.
const PAUSED_RECHECK_MAX: Duration = Duration::from_millis(8);
/// How often a direction whose opposite ended looks for its own end without a wake-up.
const HALF_CLOSED_RECHECK: Duration = Duration::from_millis(100);

/// Relays `downstream` (the source's side, side 0 of `splice`) and `upstream` (side 1) until
/// both directions ended, one side reset, nothing moved for `idle_timeout`, or `interrupt`
/// resolves; anything but a clean end resets both, also when the relay is dropped.
pub async fn relay(
    mut downstream: TcpStream,
    mut upstream: TcpStream,
    splice: Splice,
    idle_timeout: Duration,
    interrupt: Pin<&mut impl Future<Output = CloseReason>>,
) -> RelayOutcome {
    // Closing resets until the relay ends cleanly.
    downstream.abort();
    upstream.abort();
    let ended = [AtomicBool::new(false), AtomicBool::new(false)];
    // The kernel's counts say whether anything moved since the last look.
    let mut moved = (splice.forwarded(), Instant::now());
    let close = copy::drive(
        pin!(direction(&downstream, &upstream, &splice, 0, &ended)),
        pin!(direction(&upstream, &downstream, &splice, 1, &ended)),
        interrupt,
        idle_timeout,
        || {
            let forwarded = splice.forwarded();
            if forwarded != moved.0 {
                moved = (forwarded, Instant::now());
            }
            moved.1
        },
        |ended| watch(&splice, [&downstream, &upstream], ended),
    )
    .await;
    let [sent, received] = splice.forwarded();
    let [cut_down, cut_up] = splice.trimmed();
    if cut_down + cut_up > 0 {
        debug!(
            downstream = cut_down,
            upstream = cut_up,
            "spliced: left out bytes the socket had already delivered"
        );
    }
    drop(splice);
    if close == CloseReason::Eof {
        for socket in [&downstream, &upstream] {
            let _ = socket2::SockRef::from(socket).set_linger(None);
        }
    }
    RelayOutcome {
        sent,
        received,
        close,
    }
}

/// What else ends a spliced connection: the kernel's queues (kept bounded, `regulate`), and a
/// reset of a side whose direction has `ended` (the other may still be flowing).
async fn watch(splice: &Splice, sides: [&TcpStream; 2], ended: [bool; 2]) -> CloseReason {
    let half_closed_reset = async {
        tokio::select! {
            () = reset(sides[0]), if ended[0] => {
                debug!("spliced: the downstream reset after its half-close");
                CloseReason::DownstreamReset
            }
            () = reset(sides[1]), if ended[1] => {
                debug!("spliced: the upstream reset after its half-close");
                CloseReason::UpstreamReset
            }
            else => std::future::pending().await,
        }
    };
    let queues = async {
        let mut recheck = RECHECK_FIRST;
        loop {
            tokio::select! {
                () = splice.pressure() => recheck = RECHECK_FIRST,
                () = tokio::time::sleep(recheck), if splice.any_paused() => {
                    recheck = (recheck * 2).min(PAUSED_RECHECK_MAX);
                }
            }
            if let Some(close) = regulate(splice) {
                return close;
            }
        }
    };
    tokio::select! {
        close = half_closed_reset => close,
        close = queues => close,
    }
}

/// Keeps the kernel's queues bounded; a closing reason if the connection broke.
fn regulate(splice: &Splice) -> Option<CloseReason> {
    // Bytes dropped on their way to a side that closed: that side reset.
    if let Some(direction) = splice.dropped() {
        debug!(
            direction,
            "spliced: bytes dropped on their way to a closed side"
        );
        return Some(if direction == 0 {
            CloseReason::UpstreamReset
        } else {
            CloseReason::DownstreamReset
        });
    }
    if let Some(side) = splice.failed() {
        debug!(side, "spliced: a side failed as it joined the splice");
        return Some(if side == 0 {
            CloseReason::DownstreamReset
        } else {
            CloseReason::UpstreamReset
        });
    }
    if let Some(direction) = (0..2).find(|&i| sent_twice(splice, i, false)) {
        return Some(if direction == 0 {
            CloseReason::UpstreamReset
        } else {
            CloseReason::DownstreamReset
        });
    }
    match splice.regulate() {
        Ok(()) => None,
        Err(e) => {
            warn!(error = %e, "same-node splice: cannot regulate its queues; closing it");
            Some(CloseReason::UpstreamReset)
        }
    }
}

/// Whether the kernel sent bytes of direction `index` twice ([`Splice::sent_twice`]). The
/// stream is then not the one its source sent: the connection must end with resets, never
/// cleanly, so that neither application takes it for whole.
fn sent_twice(splice: &Splice, index: usize, at_end: bool) -> bool {
    match splice.sent_twice(index, at_end) {
        Ok(0) | Err(_) => false,
        Ok(bytes) => {
            warn!(
                direction = index,
                bytes,
                trimmed = splice.trimmed()[index],
                "same-node splice: the kernel sent bytes twice; resetting the connection"
            );
            true
        }
    }
}

/// Waits for the end of what `from` receives (the kernel forwards it to `to`), then half-closes
/// `to` once its send path has taken every byte `from` received. A direction the splice hands
/// over is copied here instead, after the kernel's bytes.
async fn direction(
    from: &TcpStream,
    to: &TcpStream,
    splice: &Splice,
    index: usize,
    ended: &[AtomicBool; 2],
) -> Result<(), Failure> {
    let (mut handed_over, mut end_seen) = (false, false);
    loop {
        if handed_over {
            // The rest is still queued in `from`: only the program's bytes go first. Once its
            // end was seen nothing is queued, and every byte it received goes first.
            if end_seen {
                bytes_sent(index, || splice.unsent_at_end(index)).await?;
            } else {
                bytes_sent(index, || splice.lag(index)).await?;
            }
            copy_rest(from, to, splice, index).await?;
            if sent_twice(splice, index, true) {
                return Err(Failure::Write);
            }
            break;
        }
        // Once the other direction ended, this one's end usually follows at once; its wake-up
        // can race with the socket leaving the map as it closes, so look again now and then.
        let other_ended = ended[1 - index].load(Ordering::Relaxed);
        let mut read_closed = false;
        tokio::select! {
            r = from.ready(Interest::READABLE) => {
                read_closed = r.map_err(|_| Failure::Read)?.is_read_closed();
            }
            () = splice.handed_over(index), if !handed_over => handed_over = true,
            () = tokio::time::sleep(HALF_CLOSED_RECHECK), if other_ended => {}
        }
        if handed_over {
            continue;
        }
        if splice.failed() == Some(index) {
            return Err(Failure::Read);
        }
        match from.try_io(Interest::READABLE, || peek(from)) {
            Ok(()) => {
                end_seen = true;
                debug!(index, kernel_lag = ?splice.lag(index).ok(), unsent = ?splice.unsent_at_end(index).ok(), "spliced: end seen");
                // Counted from what `from` received, not from what the program counted: a
                // segment on its way between the two must not be overtaken. Should the
                // direction be handed over meanwhile, what is left is copied.
                tokio::select! {
                    sent = bytes_sent(index, || splice.unsent_at_end(index)) => {
                        sent?;
                        if sent_twice(splice, index, true) {
                            return Err(Failure::Write);
                        }
                        break;
                    }
                    () = splice.handed_over(index) => handed_over = true,
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Tokio keeps "read closed" ready for good: with bytes still queued ahead of
                // the end (a paused direction), wait rather than spin.
                if read_closed {
                    tokio::time::sleep(RECHECK_MAX).await;
                }
            }
            Err(e) => {
                debug!(error = %e, "spliced: the receiving side failed");
                return Err(Failure::Read);
            }
        }
    }
    socket2::SockRef::from(to)
        .shutdown(Shutdown::Write)
        .map_err(|_| Failure::Write)?;
    ended[index].store(true, Ordering::Relaxed);
    Ok(())
}

/// Waits until the send path of direction `index` took the bytes `unsent` still counts.
async fn bytes_sent(
    index: usize,
    mut unsent: impl FnMut() -> io::Result<u64>,
) -> Result<(), Failure> {
    let mut recheck = RECHECK_FIRST;
    loop {
        match unsent() {
            Ok(0) => return Ok(()),
            Ok(lag) => {
                if recheck == RECHECK_MAX {
                    debug!(index, lag, "spliced: waiting for the send path");
                }
                tokio::time::sleep(recheck).await;
                recheck = (recheck * 2).min(RECHECK_MAX);
            }
            Err(_) => return Err(Failure::Write),
        }
    }
}

/// Copies what `from` still receives to `to` until its end, counting it in the splice.
async fn copy_rest(
    from: &TcpStream,
    to: &TcpStream,
    splice: &Splice,
    index: usize,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        from.readable().await.map_err(|_| Failure::Read)?;
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(Failure::Read),
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            to.writable().await.map_err(|_| Failure::Write)?;
            match to.try_write(rest) {
                Ok(k) => rest = &rest[k..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(Failure::Write),
            }
        }
        splice.copied(index, n as u64);
    }
}

/// Ok at the end of what `socket` receives (FIN): nothing queued, and a peek finds the end.
/// Queued bytes, or none yet, are WouldBlock: wait for the next wake-up.
fn peek(socket: &TcpStream) -> io::Result<()> {
    // The socket is non-blocking: nothing to read yet is WouldBlock.
    match socket2::SockRef::from(socket).peek(&mut [std::mem::MaybeUninit::uninit()])? {
        0 => Ok(()),
        _ => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// Resolves when `socket`, whose receiving direction ended, is reset. Its readiness says
/// nothing more (tokio keeps "read closed" ready), so this looks now and then.
async fn reset(socket: &TcpStream) {
    loop {
        tokio::time::sleep(HALF_CLOSED_RECHECK).await;
        match socket.take_error() {
            Ok(None) => {}
            other => {
                debug!(error = ?other, "spliced: a half-closed side failed");
                return;
            }
        }
    }
}
