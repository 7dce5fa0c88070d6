//! Inbound: sk_lookup steers every TCP connection for the pod's address (except 15008 and
//! loopback) to the pod's 15006 listener. The accepted socket's local address is the original
//! destination; the agent connects to it from inside the pod over loopback, which sk_lookup
//! lets through, so the application receives it.
//!
//! 15008 is reserved for the HBONE tunnel; until it lands its connections are refused.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};
use zt_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use crate::{
    proxy::{Direction, accept_loop, connect_in_pod, copy, log_access, reset},
    workload::LocalWorkload,
};

pub async fn serve_plaintext(listener: TcpListener, workload: Arc<LocalWorkload>) {
    accept_loop(listener, "inbound", move |stream, peer| {
        let workload = workload.clone();
        async move { handle_plaintext(stream, peer, &workload).await }
    })
    .await
}

pub async fn serve_hbone(listener: TcpListener, workload: Arc<LocalWorkload>) {
    accept_loop(listener, "hbone", move |_stream, peer| {
        let id = workload.workload.id.clone();
        async move { debug!(workload = %id, %peer, "HBONE not available yet; closing") }
    })
    .await
}

async fn handle_plaintext(client: TcpStream, peer: SocketAddr, workload: &LocalWorkload) {
    let started = Instant::now();
    let dst = match client.local_addr() {
        Ok(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
        Err(e) => {
            warn!(workload = %workload.workload.id, %peer, error = %e, "inbound: no local address");
            return;
        }
    };
    if [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT].contains(&dst.port()) {
        // Forwarding to our own ports would loop.
        warn!(workload = %workload.workload.id, %peer, original_dst = %dst, "inbound to an agent port; closing");
        return;
    }
    let app = match connect_in_pod(workload, dst).await {
        Ok(s) => s,
        Err(e) => {
            warn!(workload = %workload.workload.id, %peer, original_dst = %dst, error = %e, "inbound: application unreachable");
            reset(client);
            return;
        }
    };
    let outcome = copy::relay(client, app).await;
    log_access(Direction::Inbound, workload, peer, dst, started, &outcome);
}
