//! The mTLS tunnel between agents (HBONE: HTTP/2 CONNECT over mutual TLS 1.3 to a pod's port
//! 15008). `hbone` holds the protocol's settings and headers, `session` the certificates a
//! connection was authenticated with, `stream` one CONNECT stream as a relay side; `client` opens
//! streams on connections that `pool` keeps per source pod and destination (one dial per key), and
//! `server` serves one accepted connection. What a stream may reach is `proxy::inbound`'s call.
pub mod client;
pub mod error;
pub mod hbone;
pub mod pool;
pub mod server;
pub mod session;
pub mod stream;

use std::{sync::Arc, time::Duration};

use crate::{identity::verify::TrustStore, source_limit::SourceLimit};

/// What the mTLS tunnel needs; absent when the node has no identity provider (capture only).
pub struct Tunnel {
    pub trust: TrustStore,
    pub handshake_timeout: Duration,
    /// The TCP connect to a destination's HBONE port must be answered within this, and a
    /// CONNECT within twice this (the destination's agent connects to its application within
    /// it first).
    pub connect_timeout: Duration,
    pub pool: Arc<pool::Pool>,
    /// TLS handshakes pending on this node's HBONE listeners, per source address.
    pub handshakes: SourceLimit,
    /// Authenticated connections open on this node's HBONE listeners, per source address.
    pub established: SourceLimit,
    pub max_streams_per_connection: u32,
    /// An inbound HBONE connection without streams this long is sent GOAWAY.
    pub hbone_idle_timeout: Duration,
    /// How long a CONNECT's answer waits for the application's reply ([`stream::ANSWER_HOLD`]).
    pub answer_hold: Duration,
}
