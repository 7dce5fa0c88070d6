//! Bidirectional byte copy between two sides of a relayed connection: TCP streams and HBONE
//! streams.
//!
//! Each direction moves one chunk at a time and writes all of it before reading again, so a slow
//! reader stalls its writer (backpressure) and no byte is lost or reordered. EOF on one side is
//! passed on as a half-close (FIN, END_STREAM) while the other direction keeps flowing. A reset or
//! error on either side resets both, so a peer that resets is seen as a reset, not as a clean
//! close. Chunks are reference-counted `Bytes`: what a TCP read fills goes to HTTP/2 as is, and
//! what HTTP/2 received is written to TCP as is, with no copy in between.
use std::{
    fmt,
    future::{Future, pending},
    io,
    pin::{Pin, pin},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// A TCP side's read size, at first. Most captured connections carry requests and responses
/// and sit idle most of their life: small reads, and no buffer held between them, keep an idle
/// connection cheap (the soak holds 10 000 of them).
const INITIAL_BUFFER: usize = 4 * 1024;
/// A read that fills the buffer means bulk data: reads grow to this, which holds several TCP
/// segments at loopback/veth MTUs, so one read/write pair moves a whole socket buffer's worth with
/// few syscalls, and one HTTP/2 DATA frame carries it (a fourth of the syscalls and frames of
/// 64 KiB reads, and 0.9x their CPU per byte in BENCHMARKS.md's sixth round).
const BULK_BUFFER: usize = 256 * 1024;
/// A bulk connection quiet this long gives its buffer back.
const BULK_IDLE: Duration = Duration::from_secs(1);

/// The receiving half of one side.
pub trait ChunkRead: Send {
    /// The next bytes received, or None at EOF.
    fn read_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
}

/// The sending half of one side.
pub trait ChunkWrite: Send {
    /// Sends all of `data`, waiting while the peer does not take more (backpressure).
    fn write_chunk(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// The half-close: FIN, END_STREAM.
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Resolves when the writer has something to send of its own before any data comes (a held
    /// CONNECT answer whose time is up, or whose client waits for it), and has sent it. Most
    /// writers never do.
    fn unprompted(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        pending()
    }
}

/// One side of a relay: split into halves that move concurrently, and put back together to be
/// aborted.
pub trait RelaySide: Sized {
    type Read: ChunkRead;
    type Write: ChunkWrite;
    fn into_halves(self) -> (Self::Read, Self::Write);
    /// Aborts the side so that its peer sees a reset.
    fn abort_halves(read: Self::Read, write: Self::Write);
}

/// A TCP side's receiving half: reads into spare capacity and hands out what was filled.
pub struct TcpReader {
    stream: OwnedReadHalf,
    buf: BytesMut,
    /// The next read's size: grows to [`BULK_BUFFER`] after a read that filled it.
    want: usize,
}

impl ChunkRead for TcpReader {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            // Without a buffer, wait for bytes before taking memory for them.
            if self.buf.capacity() == 0 {
                self.stream.readable().await?;
            }
            // Reclaims the previous chunk's memory in place once its writer dropped it.
            self.buf.reserve(self.want);
            match self.stream.try_read_buf(&mut self.buf) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    if n >= self.want {
                        self.want = BULK_BUFFER;
                    }
                    return Ok(Some(self.buf.split().freeze()));
                }
                // Nothing queued: a connection of small reads holds no buffer while it waits
                // (most of its life, and most of an idle one's memory). A bulk one keeps its
                // buffer between bursts (a fresh 256 KiB each time costs page faults) until it
                // has been quiet for `BULK_IDLE`, then starts small again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.want == BULK_BUFFER
                        && tokio::time::timeout(BULK_IDLE, self.stream.readable())
                            .await
                            .is_ok()
                    {
                        continue;
                    }
                    self.buf = BytesMut::new();
                    self.want = INITIAL_BUFFER;
                    self.stream.readable().await?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl ChunkWrite for OwnedWriteHalf {
    async fn write_chunk(&mut self, data: Bytes) -> io::Result<()> {
        self.write_all(&data).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.shutdown().await
    }
}

impl RelaySide for TcpStream {
    type Read = TcpReader;
    type Write = OwnedWriteHalf;

    fn into_halves(self) -> (TcpReader, OwnedWriteHalf) {
        let (stream, write) = self.into_split();
        let reader = TcpReader {
            stream,
            // Allocated by the first read, not while the connection waits for one.
            buf: BytesMut::new(),
            want: INITIAL_BUFFER,
        };
        (reader, write)
    }

    fn abort_halves(read: TcpReader, write: OwnedWriteHalf) {
        if let Ok(mut stream) = read.stream.reunite(write) {
            stream.abort();
        }
    }
}

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
    /// A same-node connection beyond a pod's `limits.max_connections_per_workload`: refused by
    /// the agent, or (a direct one, which the kernel let open) aborted as it opened.
    MaxConnections,
    /// Never relayed: the tunnel could not be set up (connect, TLS handshake, HTTP/2).
    TunnelFailed,
    /// Never relayed: the destination is a Service with no ready endpoint for the port.
    NoEndpoints,
    /// Never relayed: the destination is outside the mesh and the egress policy refuses it.
    EgressDenied,
    /// Never relayed: the destination did not accept the connection.
    ConnectFailed,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl CloseReason {
    /// The name in the access log and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Eof => "eof",
            Self::DownstreamReset => "downstream_reset",
            Self::UpstreamReset => "upstream_reset",
            Self::IdleTimeout => "idle_timeout",
            Self::Policy => "policy",
            Self::TunnelRefused => "tunnel_refused",
            Self::MaxConnections => "max_connections",
            Self::TunnelFailed => "tunnel_failed",
            Self::NoEndpoints => "no_endpoints",
            Self::EgressDenied => "egress_denied",
            Self::ConnectFailed => "connect_failed",
        }
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

/// Which socket of a relay's direction failed: the one it receives from, or the one it sends to.
pub enum Failure {
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

/// Moves `from` into `to` until EOF, then half-closes `to`; notes every transfer in `activity`.
async fn pump(
    from: &mut impl ChunkRead,
    to: &mut impl ChunkWrite,
    copied: &mut u64,
    activity: &Activity,
) -> Result<(), Failure> {
    loop {
        // Reads are cancel-safe: one given up for the writer's own send loses nothing.
        let chunk = tokio::select! {
            biased;
            chunk = from.read_chunk() => chunk.map_err(|_| Failure::Read)?,
            sent = to.unprompted() => {
                sent.map_err(|_| Failure::Write)?;
                continue;
            }
        };
        activity.touch();
        let Some(chunk) = chunk else {
            return to.finish().await.map_err(|_| Failure::Write);
        };
        let n = chunk.len() as u64;
        to.write_chunk(chunk).await.map_err(|_| Failure::Write)?;
        *copied += n;
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

/// Relays between `downstream` and `upstream` until both directions are done, one side fails,
/// nothing moved for `idle_timeout`, or `interrupt` resolves (with the reason to close); anything
/// but a clean end aborts both sides.
///
/// Futures are passed down pinned, here and in [`drive`]: an async fn keeps a future it is given
/// by value twice (as its argument and as the local it polls), and every layer of a connection's
/// relay would add both copies to what each idle connection holds.
pub async fn relay<D, U>(
    downstream: D,
    upstream: U,
    idle_timeout: Duration,
    interrupt: Pin<&mut impl Future<Output = CloseReason>>,
) -> RelayOutcome
where
    D: RelaySide,
    U: RelaySide,
{
    let (mut sent, mut received) = (0u64, 0u64);
    let (mut dr, mut dw) = downstream.into_halves();
    let (mut ur, mut uw) = upstream.into_halves();
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let close = drive(
        pin!(pump(&mut dr, &mut uw, &mut sent, &activity)),
        pin!(pump(&mut ur, &mut dw, &mut received, &activity)),
        interrupt,
        idle_timeout,
        || activity.last(),
        |_| pending(),
    )
    .await;
    if close != CloseReason::Eof {
        D::abort_halves(dr, dw);
        U::abort_halves(ur, uw);
    }
    RelayOutcome {
        sent,
        received,
        close,
    }
}

/// Runs a relay's two directions, `up` (downstream to upstream) and `down`, until both have
/// ended (EOF), one fails (a reset), nothing moved for `idle_timeout` since `last_moved`, or
/// `interrupt` resolves. `watch`, given which directions have ended, watches whatever else may
/// end the relay; its future is made anew at each turn of the loop (a direction ending, an idle
/// check), so it always knows which have. Shared by the copying relay and the splice's, which
/// differ only in how a direction moves its bytes.
pub async fn drive<W, Watched>(
    mut up: Pin<&mut impl Future<Output = Result<(), Failure>>>,
    mut down: Pin<&mut impl Future<Output = Result<(), Failure>>>,
    mut interrupt: Pin<&mut impl Future<Output = CloseReason>>,
    idle_timeout: Duration,
    mut last_moved: impl FnMut() -> Instant,
    mut watch: W,
) -> CloseReason
where
    W: FnMut([bool; 2]) -> Watched,
    Watched: Future<Output = CloseReason>,
{
    let mut ended = [false; 2];
    loop {
        tokio::select! {
            // An interrupt first: a side that failed before the relay began must not be taken for
            // one that ended (its failed read now reads as an end).
            biased;
            reason = &mut interrupt => return reason,
            r = &mut up, if !ended[0] => match r {
                Ok(()) => ended[0] = true,
                Err(Failure::Read) => return CloseReason::DownstreamReset,
                Err(Failure::Write) => return CloseReason::UpstreamReset,
            },
            r = &mut down, if !ended[1] => match r {
                Ok(()) => ended[1] = true,
                Err(Failure::Read) => return CloseReason::UpstreamReset,
                Err(Failure::Write) => return CloseReason::DownstreamReset,
            },
            reason = watch(ended) => return reason,
            _ = tokio::time::sleep_until((last_moved() + idle_timeout).into()) => {
                if last_moved().elapsed() >= idle_timeout {
                    return CloseReason::IdleTimeout;
                }
            }
        }
        if ended == [true, true] {
            return CloseReason::Eof;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::AsyncWriteExt,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A reader of the accepted side of a loopback connection, and the connecting side.
    async fn pair() -> (TcpReader, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (accepted.into_halves().0, client)
    }

    /// Reads `n` bytes, then waits for one more read that never comes (the reader is then
    /// waiting, as an idle connection's is).
    async fn read_then_wait(reader: &mut TcpReader, n: usize) {
        let mut total = 0;
        while total < n {
            total += reader.read_chunk().await.unwrap().unwrap().len();
        }
        assert_eq!(total, n);
        let waited = tokio::time::timeout(Duration::from_millis(20), reader.read_chunk()).await;
        assert!(waited.is_err(), "a read with nothing sent: {waited:?}");
    }

    #[tokio::test]
    async fn a_quiet_connection_holds_no_read_buffer_and_a_bulk_one_keeps_its_own_between_bursts() {
        let (mut reader, mut client) = pair().await;
        assert_eq!(reader.buf.capacity(), 0, "a buffer before any byte");
        client.write_all(&[7; 16]).await.unwrap();
        read_then_wait(&mut reader, 16).await;
        assert_eq!(
            reader.buf.capacity(),
            0,
            "a request's buffer held while idle"
        );

        // Bulk: reads grow, and the buffer stays between bursts.
        let writer = tokio::spawn(async move {
            client.write_all(&vec![9u8; 1 << 20]).await.unwrap();
            client
        });
        read_then_wait(&mut reader, 1 << 20).await;
        let mut client = writer.await.unwrap();
        assert_eq!(reader.want, BULK_BUFFER);
        assert!(reader.buf.capacity() > 0);
        // Quiet for longer than that, it gives the buffer back.
        let waited = tokio::time::timeout(BULK_IDLE * 3 / 2, reader.read_chunk()).await;
        assert!(waited.is_err(), "a read with nothing sent: {waited:?}");
        assert_eq!(reader.buf.capacity(), 0, "a bulk buffer held while idle");
        assert_eq!(reader.want, INITIAL_BUFFER);

        // The end still arrives after a wait without a buffer.
        let (mut reader, mut client2) = pair().await;
        client2.write_all(&[1; 10]).await.unwrap();
        read_then_wait(&mut reader, 10).await;
        client2.shutdown().await.unwrap();
        assert_eq!(reader.read_chunk().await.unwrap(), None);
        client.shutdown().await.unwrap();
    }
}
