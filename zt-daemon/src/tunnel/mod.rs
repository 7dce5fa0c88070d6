//! The mTLS tunnel between agents (HBONE: HTTP/2 CONNECT over mutual TLS 1.3 to a pod's port
//! 15008): `hbone` holds the protocol (HTTP/2 settings, streams, the certificates a connection
//! was made with), `client` opens streams, `pool` keeps client connections per source pod and
//! destination with one dial per key. The server side is `proxy::inbound`'s 15008 listener.
pub mod client;
pub mod hbone;
pub mod pool;

use std::{sync::Arc, time::Duration};

use crate::{identity::verify::TrustStore, source_limit::SourceLimit};

/// What the mTLS tunnel needs; absent when the node has no identity provider (capture only).
pub struct Tunnel {
    pub trust: TrustStore,
    pub handshake_timeout: Duration,
    pub pool: Arc<pool::Pool>,
    /// TLS handshakes pending on this node's HBONE listeners, per source address.
    pub handshakes: SourceLimit,
    pub max_streams_per_connection: u32,
    /// An inbound HBONE connection without streams this long is sent GOAWAY.
    pub hbone_idle_timeout: Duration,
}
