//! HBONE, as Istio ambient speaks it: an HTTP/2 CONNECT stream over mutual TLS 1.3 to the
//! destination pod's port 15008, `:authority` = the original destination `ip:port`, one stream per
//! captured TCP connection.
//!
//! `H2Stream` makes one CONNECT stream look like a byte stream (AsyncRead + AsyncWrite), so the
//! same copy loop serves plain TCP and tunnelled connections. Flow control: received data is
//! released as soon as it has been handed to the reader, and writes wait for send capacity, so a
//! slow peer stalls its writer instead of buffering without bound.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::StreamGuard;
use crate::{
    config::{WorkloadId, is_dns_label},
    identity::spiffe::SpiffeId,
};

/// HTTP/2 flow-control windows and frame size for the tunnel. The defaults (64 KiB windows,
/// 16 KiB frames) stall a single bulk stream every few segments; these let one stream keep the
/// path full while still bounding what a stalled reader can pin in memory.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 256 << 10;

pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME);
    b
}

pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME);
    b
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the workload has no certificate")]
    NoCertificate,
    #[error("connecting to {0}: {1}")]
    Connect(std::net::SocketAddr, io::Error),
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("TLS handshake: {0}")]
    Handshake(io::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("building the CONNECT request: {0}")]
    Http(#[from] http::Error),
    #[error("CONNECT {0} answered {1}")]
    Refused(std::net::SocketAddr, http::StatusCode),
}

impl TunnelError {
    /// The `zt_tls_handshake_failures_total` reason, when this is a failed handshake.
    pub fn handshake_failure(&self) -> Option<&'static str> {
        match self {
            Self::HandshakeTimeout => Some("timeout"),
            Self::Handshake(e) => Some(crate::identity::tls::handshake_failure_reason(e)),
            _ => None,
        }
    }
}

pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Data received but not yet read.
    pending: Bytes,
    /// Keeps a pooled connection counted as busy while this stream lives.
    _busy: Option<StreamGuard>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            _busy: None,
        }
    }

    pub fn on_pooled(mut self, guard: StreamGuard) -> Self {
        self._busy = Some(guard);
        self
    }

    /// Aborts the stream (RST_STREAM), the tunnel's equivalent of a TCP reset.
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_reset() {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let n = data.len();
                    let _ = self.recv.flow_control().release_capacity(n);
                    self.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        let granted = match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
            None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        };
        let n = granted.min(buf.len());
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // END_STREAM: the tunnel's half-close.
        self.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        Poll::Ready(Ok(()))
    }
}

/// W3C `baggage` on CONNECT requests and responses tells the other agent which workload it
/// speaks with (for metrics and logs), as Istio ambient's peers do. Keys zt sends:
/// `k8s.namespace.name` and `k8s.workload.name`.
const NAMESPACE_KEY: &str = "k8s.namespace.name";
const WORKLOAD_KEY: &str = "k8s.workload.name";

pub fn baggage(workload: &WorkloadId) -> http::HeaderValue {
    let value = format!(
        "{NAMESPACE_KEY}={},{WORKLOAD_KEY}={}",
        workload.namespace, workload.name
    );
    // Namespaces and names are DNS labels (validated with the config), so this cannot fail.
    http::HeaderValue::from_str(&value).unwrap_or_else(|_| http::HeaderValue::from_static(""))
}

/// The peer's workload from its `baggage`, believed only if its namespace is the one in the
/// peer's verified identity and both parts are DNS labels: a peer cannot claim another
/// namespace's workload, nor blow up label cardinality with arbitrary strings.
pub fn peer_workload(headers: &http::HeaderMap, verified: &SpiffeId) -> Option<WorkloadId> {
    let value = headers.get("baggage")?.to_str().ok()?;
    let (mut namespace, mut name) = (None, None);
    for member in value.split(',') {
        let (k, v) = member.split_once('=')?;
        match k.trim() {
            NAMESPACE_KEY => namespace = Some(v.trim()),
            WORKLOAD_KEY => name = Some(v.trim()),
            _ => {}
        }
    }
    let (namespace, name) = (namespace?, name?);
    (Some(namespace) == verified.kubernetes_namespace()
        && is_dns_label(namespace)
        && is_dns_label(name))
    .then(|| WorkloadId {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}
