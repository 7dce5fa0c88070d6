//! HBONE, as Istio ambient speaks it: an HTTP/2 CONNECT stream over mutual TLS 1.3 to the
//! destination pod's port 15008, `:authority` = the original destination `ip:port`, one stream per
//! captured TCP connection.
//!
//! `H2Stream` makes one CONNECT stream look like a byte stream (AsyncRead + AsyncWrite), so the
//! same copy loop serves plain TCP and tunnelled connections. Flow control: received data is
//! released as soon as it has been handed to the reader, and writes wait for send capacity, so a
//! slow peer stalls its writer instead of buffering without bound.
//!
//! `SessionCertificates` are what a connection was authenticated with, on both sides: it takes new
//! streams only while both are valid and neither is revoked (each side checks; `inbound` sends
//! GOAWAY, `pool` stops reusing).
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use std::{io, time::SystemTime};

use bytes::Bytes;
use h2::{RecvStream, SendStream};

use super::pool::StreamGuard;
use crate::proxy::copy;
use crate::{
    identity::{
        spiffe::SpiffeId,
        svid::{LeafFacts, Svid},
        verify::TrustState,
    },
    workload::{WorkloadId, is_dns_label},
};

/// HTTP/2 flow-control windows and frame size for the tunnel. The defaults (64 KiB windows,
/// 16 KiB frames) stall a single bulk stream every few segments; these let one stream keep the
/// path full while still bounding what a stalled reader can pin in memory.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 256 << 10;
/// A CONNECT's headers are an authority and a baggage line; anything near this is not HBONE.
const MAX_HEADER_LIST: u32 = 16 << 10;

pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST);
    b
}

pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST);
    b
}

/// One certificate of an established connection.
#[derive(Debug, Clone)]
pub struct SessionCertificate {
    pub id: SpiffeId,
    pub serial: String,
    pub not_after: SystemTime,
    /// The peer's chain as it presented it (leaf first), re-checked when trust bundles change;
    /// empty for our own side.
    pub chain: Arc<[CertificateDer<'static>]>,
}

impl From<&LeafFacts> for SessionCertificate {
    fn from(leaf: &LeafFacts) -> Self {
        Self {
            id: leaf.id.clone(),
            serial: leaf.serial.clone(),
            not_after: leaf.not_after,
            chain: Arc::new([]),
        }
    }
}

impl SessionCertificate {
    /// The peer's side: its leaf, and the chain it presented.
    pub fn peer(leaf: &LeafFacts, chain: &[CertificateDer<'_>]) -> Self {
        Self {
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            ..Self::from(leaf)
        }
    }
}

impl From<&Svid> for SessionCertificate {
    fn from(svid: &Svid) -> Self {
        Self::from(&svid.leaf)
    }
}

/// Why a connection must take no new streams.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Retired {
    #[error("the {side} certificate ({id}) expired")]
    Expired { side: &'static str, id: SpiffeId },
    #[error("the {side} certificate ({id}) is revoked")]
    Revoked { side: &'static str, id: SpiffeId },
    #[error("the {side} certificate ({id}) no longer chains to its trust bundle")]
    Untrusted { side: &'static str, id: SpiffeId },
}

impl Retired {
    /// Whether the connection must close now (not just take no new streams).
    pub fn closes_now(&self) -> bool {
        matches!(self, Self::Revoked { .. } | Self::Untrusted { .. })
    }
}

/// Both certificates a connection was authenticated with.
#[derive(Debug, Clone)]
pub struct SessionCertificates {
    /// What this agent presented for its workload (read before the handshake: a rotation during
    /// it only makes the real one live longer than this says).
    pub local: SessionCertificate,
    pub peer: SessionCertificate,
}

impl SessionCertificates {
    fn sides(&self) -> [(&'static str, &SessionCertificate); 2] {
        [("peer", &self.peer), ("local", &self.local)]
    }

    /// When the first of the two expires.
    pub fn expiry(&self) -> SystemTime {
        self.local.not_after.min(self.peer.not_after)
    }

    /// The expiry of the first of the two to expire.
    pub fn first_to_expire(&self) -> Retired {
        let (side, cert) = self
            .sides()
            .into_iter()
            .min_by_key(|(_, c)| c.not_after)
            .unwrap_or(("peer", &self.peer));
        Retired::Expired {
            side,
            id: cert.id.clone(),
        }
    }

    /// Whether the connection may still take new streams at `now` under `trust`.
    pub fn check(&self, trust: &TrustState, now: SystemTime) -> Result<(), Retired> {
        for (side, cert) in self.sides() {
            if trust.revoked(&cert.id, &cert.serial).is_some() {
                return Err(Retired::Revoked {
                    side,
                    id: cert.id.clone(),
                });
            }
        }
        for (side, cert) in self.sides() {
            if now >= cert.not_after {
                return Err(Retired::Expired {
                    side,
                    id: cert.id.clone(),
                });
            }
        }
        for (side, cert) in self.sides() {
            if !trust.still_trusts(&cert.id, &cert.chain) {
                return Err(Retired::Untrusted {
                    side,
                    id: cert.id.clone(),
                });
            }
        }
        Ok(())
    }
}

/// A tokio deadline for a wall-clock time (now, if it has passed).
pub fn deadline(at: SystemTime) -> tokio::time::Instant {
    tokio::time::Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default()
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
    #[error("the server at {0} presented no SVID")]
    NoServerSvid(std::net::SocketAddr),
    /// Another stream's dial, which this one waited for, failed.
    #[error("dialling {destination} (for several streams at once) failed: {reason}")]
    SharedDial {
        destination: std::net::IpAddr,
        reason: String,
    },
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

/// One HBONE stream: a CONNECT's request and response bodies, relayed as one side of a
/// connection.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Keeps a pooled connection counted as busy while this stream lives.
    busy: Option<StreamGuard>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            busy: None,
        }
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
            },
        )
    }

    /// RST_STREAM, the tunnel's equivalent of a TCP reset.
    fn abort_halves(_read: H2Reader, mut write: H2Writer) {
        write.send.send_reset(h2::Reason::CANCEL);
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
