//! One HBONE stream as one side of a relayed connection: `H2Stream` splits into a reader of the
//! DATA frames HTTP/2 received and a writer that sends within the peer's flow-control window, so
//! the same copy loop serves plain TCP and tunnelled connections. Received data is released as
//! soon as it has been handed to the writer, and writes wait for send capacity: a slow peer
//! stalls its writer instead of buffering without bound.
//!
//! A server's stream may hold its CONNECT's answer back for the application's first bytes (see
//! [`H2Stream::answering`]): the answer and the reply then leave in one TLS record, and the
//! client's agent wakes once for both.
use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, server::SendResponse};
use http::Response;
use tokio::sync::Notify;

use super::{hbone::EARLY_BYTES, pool::StreamGuard};
use crate::copy;

/// One HBONE stream: a CONNECT's request and response bodies, relayed as one side of a
/// connection.
pub struct H2Stream {
    send: Sending,
    recv: RecvStream,
    /// Keeps a pooled connection counted as busy while this stream lives.
    busy: Option<StreamGuard>,
    /// END_STREAM already went (with the CONNECT's early bytes).
    send_ended: bool,
}

/// How long a server holds a CONNECT's answer for the application's reply: long enough for an
/// application to answer a request it already has. Only a client that sent its request with
/// the CONNECT is held (one that waits for the answer before sending never is), and it relays
/// its application's bytes meanwhile; past this, the answer goes alone.
pub const ANSWER_HOLD: Duration = Duration::from_millis(2);

/// The sending side of a stream: open, or a server's answer still held back.
enum Sending {
    Open(SendStream<Bytes>),
    Held(Box<HeldAnswer>),
}

/// A CONNECT's answer not sent yet: it goes with the first bytes, the end, a reset, at `until`,
/// or once the client has sent all it sends ahead of an answer (`client_waits`).
struct HeldAnswer {
    respond: SendResponse<Bytes>,
    answer: Response<()>,
    until: Instant,
    client_waits: Arc<ClientWaits>,
}

/// Shared by a held stream's halves: the reader counts what the client sent and tells the
/// writer once it is all a zt client sends ahead of an answer. Shared rather than counted in
/// the reader, so that every stream's reader grows by one pointer only.
#[derive(Default)]
struct ClientWaits {
    read: AtomicUsize,
    told: Notify,
}

impl Sending {
    /// Sends a held answer, ending the stream with it when `end`.
    fn release(&mut self, end: bool) -> io::Result<()> {
        if let Self::Held(held) = self {
            let HeldAnswer {
                respond, answer, ..
            } = &mut **held;
            let send = respond
                .send_response(std::mem::take(answer), end)
                .map_err(h2_io)?;
            *self = Self::Open(send);
        }
        Ok(())
    }

    /// The open stream, sending a held answer first.
    fn open(&mut self) -> io::Result<&mut SendStream<Bytes>> {
        self.release(false)?;
        match self {
            Self::Open(send) => Ok(send),
            Self::Held(_) => unreachable!("release sent the answer"),
        }
    }
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send: Sending::Open(send),
            recv,
            busy: None,
            send_ended: false,
        }
    }

    /// A server's stream that answers a CONNECT with `answer`. When the request's first bytes
    /// came with it (zt sends them right behind the headers), the answer is held for the
    /// application's reply, for at most `hold` ([`ANSWER_HOLD`]); otherwise it goes at once.
    /// The answer also goes once the stream has read [`EARLY_BYTES`]: a zt client sends no more
    /// before it.
    pub fn answering(
        mut respond: SendResponse<Bytes>,
        answer: Response<()>,
        mut recv: RecvStream,
        hold: Duration,
    ) -> Result<Self, h2::Error> {
        // Received and not yet released: bytes that came with the request (nothing is released
        // before the relay starts). A zt client that has sent all it may ahead of the answer
        // waits for it: answered at once.
        let came_with_bytes = recv.flow_control().used_capacity();
        let send = if (1..EARLY_BYTES).contains(&came_with_bytes) {
            Sending::Held(Box::new(HeldAnswer {
                respond,
                answer,
                until: Instant::now() + hold,
                client_waits: Arc::default(),
            }))
        } else {
            Sending::Open(respond.send_response(answer, false)?)
        };
        Ok(Self {
            send,
            recv,
            busy: None,
            send_ended: false,
        })
    }

    /// The sending side already ended: the relay's half-close has nothing left to send.
    pub fn request_ended(mut self) -> Self {
        self.send_ended = true;
        self
    }

    pub fn on_pooled(mut self, guard: StreamGuard) -> Self {
        self.busy = Some(guard);
        self
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_reset() {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    } else {
        io::Error::other(e)
    }
}

/// The receiving half: DATA frames as HTTP/2 received them.
pub struct H2Reader {
    recv: RecvStream,
    /// With the answer held: told once [`EARLY_BYTES`] have been read (the client then waits
    /// for the answer). Let go once the answer has gone.
    waiting: Option<Arc<ClientWaits>>,
}

impl copy::ChunkRead for H2Reader {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            match std::future::poll_fn(|cx| self.recv.poll_data(cx)).await {
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => {
                    // The writer holds this chunk until it is written: backpressure enough.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if let Some(waits) = &self.waiting {
                        // Only this half counts: the writer just waits for the word.
                        let read = waits.read.fetch_add(data.len(), Ordering::Relaxed) + data.len();
                        if Arc::strong_count(waits) == 1 {
                            // The answer went: nobody to tell.
                            self.waiting = None;
                        } else if read >= EARLY_BYTES {
                            // Leaves a permit: the writer may not be waiting at this moment.
                            waits.told.notify_one();
                            self.waiting = None;
                        }
                    }
                    return Ok(Some(data));
                }
                Some(Err(e)) => return Err(h2_io(e)),
                None => return Ok(None),
            }
        }
    }
}

/// The sending half: DATA frames within the peer's flow-control window.
pub struct H2Writer {
    send: Sending,
    _busy: Option<StreamGuard>,
    ended: bool,
}

impl copy::ChunkWrite for H2Writer {
    async fn write_chunk(&mut self, mut data: Bytes) -> io::Result<()> {
        let send = self.send.open()?;
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(h2_io(e)),
                None => return Err(io::ErrorKind::BrokenPipe.into()),
            };
            let frame = data.split_to(granted.min(data.len()));
            send.send_data(frame, false).map_err(h2_io)?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        if std::mem::replace(&mut self.ended, true) {
            return Ok(());
        }
        // END_STREAM: the tunnel's half-close (with a held answer, in its HEADERS frame).
        match &mut self.send {
            Sending::Open(send) => send.send_data(Bytes::new(), true).map_err(h2_io),
            Sending::Held(_) => self.send.release(true),
        }
    }

    async fn unprompted(&mut self) -> io::Result<()> {
        match &self.send {
            // Boxed: a timer in place would grow every relay's state, held or not, for good.
            Sending::Held(held) => {
                let (until, told) = (held.until.into(), &held.client_waits.told);
                // Told or timed out, the answer goes now.
                let _ = Box::pin(tokio::time::timeout_at(until, told.notified())).await;
            }
            Sending::Open(_) => std::future::pending().await,
        }
        self.send.open().map(drop)
    }
}

impl copy::RelaySide for H2Stream {
    type Read = H2Reader;
    type Write = H2Writer;

    fn into_halves(self) -> (H2Reader, H2Writer) {
        (
            H2Reader {
                recv: self.recv,
                waiting: match &self.send {
                    Sending::Held(held) => Some(held.client_waits.clone()),
                    Sending::Open(_) => None,
                },
            },
            H2Writer {
                send: self.send,
                _busy: self.busy,
                ended: self.send_ended,
            },
        )
    }

    /// RST_STREAM, the tunnel's equivalent of a TCP reset: CONNECT_ERROR, as RFC 9113 (8.5)
    /// asks of a CONNECT tunnel (some peers read CANCEL as a clean end).
    /// With the answer still held, the reset goes alone (HTTP/2 would drop an answer queued
    /// before it): the client takes CONNECT_ERROR before an answer as a relay that was reset
    /// (`TunnelError::relay_reset_by_destination`).
    fn abort_halves(_read: H2Reader, write: H2Writer) {
        match write.send {
            Sending::Open(mut send) => send.send_reset(h2::Reason::CONNECT_ERROR),
            Sending::Held(mut held) => held.respond.send_reset(h2::Reason::CONNECT_ERROR),
        }
    }
}
