//! The relay of a spliced connection (the same-node fast path): the kernel moves the bytes
//! (`capture::Splice`); this watches both sockets for each direction's end and passes it on,
//! keeps the kernel's queues bounded, and ends the connection on a reset, an idle timeout or an
//! interrupt, like `copy::relay` does for the connections it copies.
//!
//! A direction's end (FIN) reaches the agent's socket after every byte before it was handed to
//! the other socket's send path, which may not have sent it yet: the half-close waits until the
//! other socket has taken all the bytes the kernel forwarded, so it cannot overtake them. The
//! sockets are never read, only peeked: a byte in a receive queue is on its way through the
//! program (or held while its direction is paused), not an end.
use std::{
    future::Future,
    io,
    net::Shutdown,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use tokio::{io::Interest, net::TcpStream};
use tracing::{debug, warn};

use crate::{
    capture::Splice,
    copy::{Abort, CloseReason, RelayOutcome},
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
    interrupt: impl Future<Output = CloseReason>,
) -> RelayOutcome {
    // Closing resets until the relay ends cleanly.
    downstream.abort();
    upstream.abort();
    let close = {
        let ended = [AtomicBool::new(false), AtomicBool::new(false)];
        let up = direction(&downstream, &upstream, &splice, 0, &ended);
        let down = direction(&upstream, &downstream, &splice, 1, &ended);
        tokio::pin!(up, down, interrupt);
        let (mut up_done, mut down_done) = (false, false);
        let mut idle_mark = (splice.forwarded(), Instant::now());
        let mut recheck = RECHECK_FIRST;
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(Side::Reader) => break CloseReason::DownstreamReset,
                    Err(Side::Writer) => break CloseReason::UpstreamReset,
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(Side::Reader) => break CloseReason::UpstreamReset,
                    Err(Side::Writer) => break CloseReason::DownstreamReset,
                },
                // A side whose direction ended may still reset (the other may still be flowing).
                () = reset(&downstream), if up_done => {
                    debug!("spliced: the downstream reset after its half-close");
                    break CloseReason::DownstreamReset
                }
                () = reset(&upstream), if down_done => {
                    debug!("spliced: the upstream reset after its half-close");
                    break CloseReason::UpstreamReset
                }
                reason = &mut interrupt => break reason,
                () = splice.pressure() => {
                    recheck = RECHECK_FIRST;
                    if let Some(close) = regulate(&splice) {
                        break close;
                    }
                }
                () = tokio::time::sleep(recheck), if splice.any_paused() => {
                    recheck = (recheck * 2).min(PAUSED_RECHECK_MAX);
                    if let Some(close) = regulate(&splice) {
                        break close;
                    }
                }
                () = tokio::time::sleep_until((idle_mark.1 + idle_timeout).into()) => {
                    // The kernel's counts say whether anything moved since the last look.
                    let now = splice.forwarded();
                    if now == idle_mark.0 {
                        break CloseReason::IdleTimeout;
                    }
                    idle_mark = (now, Instant::now());
                }
            }
            if up_done && down_done {
                break CloseReason::Eof;
            }
        }
    };
    let [sent, received] = splice.forwarded();
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
    match splice.regulate() {
        Ok(()) => None,
        Err(e) => {
            warn!(error = %e, "same-node splice: cannot regulate its queues; closing it");
            Some(CloseReason::UpstreamReset)
        }
    }
}

/// Which socket of a direction failed.
enum Side {
    Reader,
    Writer,
}

/// Waits for the end of what `from` receives (the kernel forwards it to `to`), then half-closes
/// `to` once its send path has taken every byte forwarded in direction `index`. A direction the
/// splice hands over is copied here instead, after the kernel's bytes.
async fn direction(
    from: &TcpStream,
    to: &TcpStream,
    splice: &Splice,
    index: usize,
    ended: &[AtomicBool; 2],
) -> Result<(), Side> {
    let mut handed_over = false;
    loop {
        // Once the other direction ended, this one's end usually follows at once; its wake-up
        // can race with the socket leaving the map as it closes, so look again now and then.
        let other_ended = ended[1 - index].load(Ordering::Relaxed);
        let mut read_closed = false;
        tokio::select! {
            r = from.ready(Interest::READABLE) => {
                read_closed = r.map_err(|_| Side::Reader)?.is_read_closed();
            }
            () = splice.handed_over(index), if !handed_over => handed_over = true,
            () = tokio::time::sleep(HALF_CLOSED_RECHECK), if other_ended => {}
        }
        if handed_over {
            kernel_bytes_sent(splice, index).await?;
            copy_rest(from, to, splice, index).await?;
            break;
        }
        match from.try_io(Interest::READABLE, || peek(from)) {
            Ok(()) => {
                debug!(index, "spliced: end seen");
                kernel_bytes_sent(splice, index).await?;
                break;
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
                return Err(Side::Reader);
            }
        }
    }
    socket2::SockRef::from(to)
        .shutdown(Shutdown::Write)
        .map_err(|_| Side::Writer)?;
    ended[index].store(true, Ordering::Relaxed);
    Ok(())
}

/// Waits until `to`'s send path took every byte the kernel forwarded in direction `index`.
async fn kernel_bytes_sent(splice: &Splice, index: usize) -> Result<(), Side> {
    let mut recheck = RECHECK_FIRST;
    loop {
        match splice.lag(index) {
            Ok(0) => return Ok(()),
            Ok(lag) => {
                if recheck == RECHECK_MAX {
                    debug!(index, lag, "spliced: waiting for the send path");
                }
                tokio::time::sleep(recheck).await;
                recheck = (recheck * 2).min(RECHECK_MAX);
            }
            Err(_) => return Err(Side::Writer),
        }
    }
}

/// Copies what `from` still receives to `to` until its end, counting it in the splice.
async fn copy_rest(
    from: &TcpStream,
    to: &TcpStream,
    splice: &Splice,
    index: usize,
) -> Result<(), Side> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        from.readable().await.map_err(|_| Side::Reader)?;
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(Side::Reader),
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            to.writable().await.map_err(|_| Side::Writer)?;
            match to.try_write(rest) {
                Ok(k) => rest = &rest[k..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(Side::Writer),
            }
        }
        splice.copied(index, n as u64);
    }
}

/// Ok at the end of what `socket` receives (FIN): nothing queued, and a peek finds the end.
/// Queued bytes, or none yet, are WouldBlock: wait for the next wake-up.
fn peek(socket: &TcpStream) -> io::Result<()> {
    let mut byte = 0u8;
    // SAFETY: valid fd and a one-byte buffer.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Ok(()),
        n if n > 0 => Err(io::ErrorKind::WouldBlock.into()),
        _ => Err(io::Error::last_os_error()),
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
