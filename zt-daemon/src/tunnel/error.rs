//! Why opening a tunnel stream failed.
use std::io;

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
    #[error("CONNECT {0}: no answer within {1:?}")]
    AnswerTimeout(std::net::SocketAddr, std::time::Duration),
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
    /// Whether the peer said it did not process the stream (its GOAWAY came before it,
    /// REFUSED_STREAM), so it may be opened again elsewhere without anything arriving twice. A
    /// GOAWAY of our own (a protocol error seen here) ends streams the peer may have processed.
    pub fn unprocessed(&self) -> bool {
        matches!(self, Self::H2(e) if (e.is_go_away() && e.is_remote()) || e.reason() == Some(h2::Reason::REFUSED_STREAM))
    }

    /// Whether the destination's agent reset the stream as a relay it had begun
    /// (CONNECT_ERROR: its application reset, or a policy update closed it). Before the answer,
    /// this is a relay that ended before its held answer could go (the reset drops it).
    pub fn relay_reset_by_destination(&self) -> bool {
        matches!(self, Self::H2(e) if e.is_reset() && e.is_remote() && e.reason() == Some(h2::Reason::CONNECT_ERROR))
    }

    /// The `zt_tls_handshake_failures_total` reason, when this is a failed handshake.
    pub fn handshake_failure(&self) -> Option<&'static str> {
        match self {
            Self::HandshakeTimeout => Some("timeout"),
            Self::Handshake(e) => Some(crate::identity::tls::handshake_failure_reason(e)),
            _ => None,
        }
    }
}
