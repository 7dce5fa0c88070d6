//! HBONE, as Istio ambient speaks it: an HTTP/2 CONNECT stream over mutual TLS 1.3 to the
//! destination pod's port 15008, `:authority` = the original destination `ip:port`, one stream per
//! captured TCP connection. This file holds the protocol's settings and headers; `session`,
//! `stream`, `client`, `server` and `pool` build on it.
use crate::{
    identity::spiffe::SpiffeId,
    workload::{WorkloadId, is_dns_label},
};

/// HTTP/2 flow-control windows and frame size for the tunnel (ztunnel's). The defaults (64 KiB
/// windows, 16 KiB frames) stall a single bulk stream every few segments; these let one stream
/// keep the path full, and a bulk read (`copy::BULK_BUFFER`) go as one frame, while still
/// bounding what a stalled reader can pin in memory.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 1 << 20;
/// A CONNECT's headers are an authority and a baggage line; anything near this is not HBONE.
const MAX_HEADER_LIST: u32 = 16 << 10;
/// What a zt client sends of its application's bytes ahead of a CONNECT's answer, at most; the
/// rest waits for the relay. A server that received this much answers at once, and one that
/// held its answer sends it once it has read this much (`stream`).
pub const EARLY_BYTES: usize = 16 << 10;

pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    // HBONE has no server push. h2 would otherwise take every PUSH_PROMISE a destination sends
    // and hold it (zt never reads them): with push off, one is a connection error.
    b.enable_push(false)
        .initial_window_size(STREAM_WINDOW)
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
