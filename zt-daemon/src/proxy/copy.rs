//! Bidirectional byte copy between two TCP streams.
//!
//! Each direction reads into its own buffer and writes everything before reading again, so a slow
//! reader stalls its writer (backpressure) and no byte is lost or reordered. EOF on one side is
//! passed on as a half-close (FIN) while the other direction keeps flowing. A reset or error on
//! either side resets both, so a peer that resets is seen as a reset, not as a clean close.
use std::{
    fmt,
    future::Future,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// Per-direction buffer, at first. Most captured connections carry requests and responses and
/// sit idle most of their life: a small buffer keeps an idle connection cheap (the soak holds
/// 10 000 of them).
const INITIAL_BUFFER: usize = 4 * 1024;
/// A read that fills the buffer means bulk data: the buffer grows to this, which holds several
/// TCP segments at loopback/veth MTUs, so one read/write pair moves a whole socket buffer's
/// worth with few syscalls.
const BULK_BUFFER: usize = 64 * 1024;

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides finished with FIN.
    Eof,
    /// The downstream (the side that connected to the agent) reset or failed.
    DownstreamReset,
    /// The upstream (the side the agent connected to) reset or failed.
    UpstreamReset,
    /// No byte in either direction for `limits.idle_timeout`.
    IdleTimeout,
    /// A policy update denied the open connection, or policy refused it.
    Policy,
    /// Never relayed: the destination's agent refused the HBONE stream (403, 503).
    TunnelRefused,
    /// Never relayed: the tunnel could not be set up (connect, TLS handshake, HTTP/2).
    TunnelFailed,
    /// Never relayed: the destination is outside the mesh and `mtls.mode` is strict.
    MtlsRequired,
    /// Never relayed: the destination did not accept the connection.
    ConnectFailed,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Eof => "eof",
            Self::DownstreamReset => "downstream_reset",
            Self::UpstreamReset => "upstream_reset",
            Self::IdleTimeout => "idle_timeout",
            Self::Policy => "policy",
            Self::TunnelRefused => "tunnel_refused",
            Self::TunnelFailed => "tunnel_failed",
            Self::MtlsRequired => "mtls_required",
            Self::ConnectFailed => "connect_failed",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayOutcome {
    /// Bytes copied downstream -> upstream.
    pub sent: u64,
    /// Bytes copied upstream -> downstream.
    pub received: u64,
    pub close: CloseReason,
}

impl RelayOutcome {
    /// A connection closed before any byte was relayed.
    pub fn refused(close: CloseReason) -> Self {
        Self {
            sent: 0,
            received: 0,
            close,
        }
    }
}

/// Which side of a copy failed.
enum Failure {
    Read,
    Write,
}

/// When a relay last moved a byte, in milliseconds since it started (shared by both directions).
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Copies `from` into `to` until EOF, then half-closes `to`; notes every transfer in `activity`.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    copied: &mut u64,
    activity: &Activity,
) -> Result<(), Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; INITIAL_BUFFER];
    loop {
        let n = from.read(&mut buf).await.map_err(|_| Failure::Read)?;
        activity.touch();
        if n == 0 {
            return to.shutdown().await.map_err(|_| Failure::Write);
        }
        to.write_all(&buf[..n]).await.map_err(|_| Failure::Write)?;
        *copied += n as u64;
        if n == buf.len() && buf.len() < BULK_BUFFER {
            buf.resize(BULK_BUFFER, 0);
        }
    }
}

/// A stream that can be aborted so that its peer sees a reset rather than a clean close.
pub trait Abort {
    fn abort(&mut self);
}

impl Abort for TcpStream {
    fn abort(&mut self) {
        // Linger 0 turns the coming close into a RST.
        let _ = socket2::SockRef::from(&*self).set_linger(Some(Duration::ZERO));
    }
}

impl Abort for super::hbone::H2Stream {
    fn abort(&mut self) {
        self.reset();
    }
}

/// Relays between `downstream` and `upstream` until both directions are done, one side fails,
/// nothing moved for `idle_timeout`, or `interrupt` resolves (with the reason to close); anything
/// but a clean end aborts both sides.
pub async fn relay<D, U>(
    downstream: D,
    upstream: U,
    idle_timeout: Duration,
    interrupt: impl Future<Output = CloseReason>,
) -> RelayOutcome
where
    D: AsyncRead + AsyncWrite + Abort + Unpin,
    U: AsyncRead + AsyncWrite + Abort + Unpin,
{
    let (mut sent, mut received) = (0u64, 0u64);
    let (mut dr, mut dw) = tokio::io::split(downstream);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let close = {
        let up = pump(&mut dr, &mut uw, &mut sent, &activity);
        let down = pump(&mut ur, &mut dw, &mut received, &activity);
        tokio::pin!(up, down, interrupt);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(Failure::Read) => break CloseReason::DownstreamReset,
                    Err(Failure::Write) => break CloseReason::UpstreamReset,
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(Failure::Read) => break CloseReason::UpstreamReset,
                    Err(Failure::Write) => break CloseReason::DownstreamReset,
                },
                reason = &mut interrupt => break reason,
                _ = tokio::time::sleep_until((activity.last() + idle_timeout).into()) => {
                    if activity.last().elapsed() >= idle_timeout {
                        break CloseReason::IdleTimeout;
                    }
                }
            }
            if up_done && down_done {
                break CloseReason::Eof;
            }
        }
    };
    if close != CloseReason::Eof {
        dr.unsplit(dw).abort();
        ur.unsplit(uw).abort();
    }
    RelayOutcome {
        sent,
        received,
        close,
    }
}
