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
    sync::Arc,
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
    /// With the answer held: how the reader tells the writer that the client is waiting for it.
    waiting: Option<Arc<Notify>>,
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
    client_waits: Arc<Notify>,
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
            waiting: None,
        }
    }

    /// A server's stream that answers a CONNECT with `answer`. When the request's first bytes
    /// came with it (zt sends them right behind the headers), the answer is held for the
    /// application's reply, for at most `hold` ([`ANSWER_HOLD`]); otherwise it goes at once.
    /// A request longer than that goes on once its first [`EARLY_BYTES`] have been relayed: the
    /// client sends no more before the answer, so the answer goes then.
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
        let (send, waiting) = if (1..EARLY_BYTES).contains(&came_with_bytes) {
            let client_waits = Arc::new(Notify::new());
            let held = HeldAnswer {
                respond,
                answer,
                until: Instant::now() + hold,
                client_waits: client_waits.clone(),
            };
            (Sending::Held(Box::new(held)), Some(client_waits))
        } else {
            (Sending::Open(respond.send_response(answer, false)?), None)
        };
        Ok(Self {
            send,
            recv,
            busy: None,
            send_ended: false,
            waiting,
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
    /// With the answer held: whom to tell once [`EARLY_BYTES`] have been read (the client then
    /// waits for the answer), and how many have been.
    waiting: Option<(Arc<Notify>, usize)>,
}

impl copy::ChunkRead for H2Reader {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            match std::future::poll_fn(|cx| self.recv.poll_data(cx)).await {
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => {
                    // The writer holds this chunk until it is written: backpressure enough.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if let Some((writer, read)) = &mut self.waiting {
                        *read += data.len();
                        if *read >= EARLY_BYTES {
                            // Leaves a permit: the writer may not be waiting at this moment.
                            writer.notify_one();
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
                let time_up = tokio::time::sleep_until(held.until.into());
                Box::pin(async {
                    tokio::select! {
                        () = time_up => {}
                        () = held.client_waits.notified() => {}
                    }
                })
                .await
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
                waiting: self.waiting.map(|w| (w, 0)),
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
