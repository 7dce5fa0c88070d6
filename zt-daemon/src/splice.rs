//! The relay of a spliced connection (the same-node fast path): the kernel moves the bytes
//! (`capture::Splice`); this watches both sockets for each direction's end and passes it on, and
//! ends the connection on a reset, an idle timeout or an interrupt, like `copy::relay` does for
//! the connections it copies.
//!
//! A direction's end (FIN) reaches the agent's socket after every byte before it was handed to
//! the other socket's send path, which may not have sent it yet: the half-close waits until the
//! other socket has taken all the bytes the kernel counted, so it cannot overtake them.
use std::{
    future::Future,
    io,
    net::Shutdown,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use crate::{
    capture::Splice,
    copy::{Abort, CloseReason, RelayOutcome},
};

/// How often a half-close waiting for the send path looks again; over loopback it rarely waits.
const SEND_PATH_POLL: Duration = Duration::from_millis(1);

/// Relays `downstream` (the source's side) and `upstream` until both directions ended, one side
/// reset, nothing moved for `idle_timeout`, or `interrupt` resolves; anything but a clean end
/// resets both. `splice` must join the two (downstream first).
pub async fn relay(
    mut downstream: TcpStream,
    mut upstream: TcpStream,
    splice: Splice,
    idle_timeout: Duration,
    interrupt: impl Future<Output = CloseReason>,
) -> RelayOutcome {
    let close = {
        let up = direction(&downstream, &upstream, &splice, 0);
        let down = direction(&upstream, &downstream, &splice, 1);
        tokio::pin!(up, down, interrupt);
        let (mut up_done, mut down_done) = (false, false);
        let mut last = (splice.forwarded(), Instant::now());
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
                reason = &mut interrupt => break reason,
                _ = tokio::time::sleep_until((last.1 + idle_timeout).into()) => {
                    // The kernel's counts say whether anything moved since the last look.
                    let now = splice.forwarded();
                    if now == last.0 {
                        break CloseReason::IdleTimeout;
                    }
                    last = (now, Instant::now());
                }
            }
            if up_done && down_done {
                break CloseReason::Eof;
            }
        }
    };
    let [sent, received] = splice.forwarded();
    drop(splice);
    if close != CloseReason::Eof {
        downstream.abort();
        upstream.abort();
    }
    RelayOutcome {
        sent,
        received,
        close,
    }
}

/// Which socket of a direction failed.
enum Side {
    Reader,
    Writer,
}

/// Waits for the end of what `from` receives (the kernel forwards it to `to`), then half-closes
/// `to` once its send path has taken every byte forwarded (`splice.forwarded()[index]`).
async fn direction(
    from: &TcpStream,
    to: &TcpStream,
    splice: &Splice,
    index: usize,
) -> Result<(), Side> {
    loop {
        from.readable().await.map_err(|_| Side::Reader)?;
        match from.try_read(&mut [0u8; 1]) {
            Ok(0) => break,
            // The program forwards every byte of a spliced socket; one here means the splice
            // is gone (the agent is tearing it down): a clean relay is no longer possible.
            Ok(_) => return Err(Side::Reader),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(Side::Reader),
        }
    }
    let forwarded = splice.forwarded()[index];
    loop {
        match taken_by_send_path(to) {
            Ok(taken) if taken >= forwarded => break,
            Ok(_) => tokio::time::sleep(SEND_PATH_POLL).await,
            Err(_) => return Err(Side::Writer),
        }
    }
    socket2::SockRef::from(to)
        .shutdown(Shutdown::Write)
        .map_err(|_| Side::Writer)
}

/// Bytes `socket` has taken to send since it connected: those acknowledged plus those still in
/// its send queue. Read in that order, a byte acknowledged in between is missed, never counted
/// twice, so the figure never runs ahead.
fn taken_by_send_path(socket: &TcpStream) -> io::Result<u64> {
    let fd = socket.as_raw_fd();
    // SAFETY: zeroed tcp_info is valid; the kernel fills at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd, pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: valid fd; TIOCOUTQ (SIOCOUTQ) writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + queued.max(0) as u64)
}
