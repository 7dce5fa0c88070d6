//! Outbound: the pod's 127.0.0.1:15001 and [::1]:15001 listeners receive every TCP connect the
//! pod's applications make (rewritten by connect4/6). The original destination comes from the
//! map that sockops keyed by (netns cookie, source port); the agent connects to it from inside
//! the pod's netns, so the traffic leaves with the pod's address.
//!
//! Until the mTLS tunnel lands, every destination is reached in plain TCP.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use crate::{
    ebpf::OriginalDsts,
    proxy::{Direction, accept_loop, connect_in_pod, copy, log_access, reset},
    workload::LocalWorkload,
};

pub async fn serve(listener: TcpListener, workload: Arc<LocalWorkload>, dsts: Arc<OriginalDsts>) {
    accept_loop(listener, "outbound", move |stream, peer| {
        let (workload, dsts) = (workload.clone(), dsts.clone());
        async move { handle(stream, peer, &workload, &dsts).await }
    })
    .await
}

async fn handle(app: TcpStream, peer: SocketAddr, workload: &LocalWorkload, dsts: &OriginalDsts) {
    let started = Instant::now();
    let Some(dst) = dsts.get(workload.netns_cookie, peer.port()) else {
        // Not captured by us (e.g. something connected to 15001 directly): refuse.
        warn!(workload = %workload.workload.id, %peer, "outbound connection without an original destination; closing");
        return;
    };
    let upstream = match connect_in_pod(workload, dst).await {
        Ok(s) => s,
        Err(e) => {
            warn!(workload = %workload.workload.id, original_dst = %dst, error = %e, "outbound connect failed");
            reset(app);
            return;
        }
    };
    let outcome = copy::relay(app, upstream).await;
    log_access(Direction::Outbound, workload, peer, dst, started, &outcome);
}
