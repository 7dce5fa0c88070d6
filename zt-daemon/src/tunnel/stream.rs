//! One HBONE stream as one side of a relayed connection: `H2Stream` splits into a reader of the
//! DATA frames HTTP/2 received and a writer that sends within the peer's flow-control window, so
//! the same copy loop serves plain TCP and tunnelled connections. Received data is released as
//! soon as it has been handed to the writer, and writes wait for send capacity: a slow peer
//! stalls its writer instead of buffering without bound.
use std::io;

use bytes::Bytes;
use h2::{RecvStream, SendStream};

use super::pool::StreamGuard;
use crate::copy;

/// One HBONE stream: a CONNECT's request and response bodies, relayed as one side of a
/// connection.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Keeps a pooled connection counted as busy while this stream lives.
    busy: Option<StreamGuard>,
    /// END_STREAM already went (with the CONNECT's early bytes).
    send_ended: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            busy: None,
            send_ended: false,
        }
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
pub struct H2Reader(RecvStream);

impl copy::ChunkRead for H2Reader {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            match std::future::poll_fn(|cx| self.0.poll_data(cx)).await {
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => {
                    // The writer holds this chunk until it is written: backpressure enough.
                    let _ = self.0.flow_control().release_capacity(data.len());
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
    send: SendStream<Bytes>,
    _busy: Option<StreamGuard>,
    ended: bool,
}

impl copy::ChunkWrite for H2Writer {
    async fn write_chunk(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            self.send.reserve_capacity(data.len());
            let granted = match std::future::poll_fn(|cx| self.send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(h2_io(e)),
                None => return Err(io::ErrorKind::BrokenPipe.into()),
            };
            let frame = data.split_to(granted.min(data.len()));
            self.send.send_data(frame, false).map_err(h2_io)?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        if std::mem::replace(&mut self.ended, true) {
            return Ok(());
        }
        // END_STREAM: the tunnel's half-close.
        self.send.send_data(Bytes::new(), true).map_err(h2_io)
    }
}

impl copy::RelaySide for H2Stream {
    type Read = H2Reader;
    type Write = H2Writer;

    fn into_halves(self) -> (H2Reader, H2Writer) {
        (
            H2Reader(self.recv),
            H2Writer {
                send: self.send,
                _busy: self.busy,
                ended: self.send_ended,
            },
        )
    }

    /// RST_STREAM, the tunnel's equivalent of a TCP reset: CONNECT_ERROR, as RFC 9113 (8.5)
    /// asks of a CONNECT tunnel (some peers read CANCEL as a clean end).
    fn abort_halves(_read: H2Reader, mut write: H2Writer) {
        write.send.send_reset(h2::Reason::CONNECT_ERROR);
    }
}
