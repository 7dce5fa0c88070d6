//! The accept loop every in-pod listener runs: admission, a task per connection, and draining.
use std::{future::Future, net::SocketAddr, sync::Arc};

use futures_util::FutureExt as _;
use tokio::{
    net::TcpListener,
    task::{JoinHandle, JoinSet},
};
use tracing::{info, warn};

use super::{ProxyContext, reset};
use crate::enrollment::{LocalWorkload, PodListeners};

/// Which side of the agent a connection was captured on.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// Serves an enrolled workload's in-pod listeners, one task each: 15001 outbound, 15006 inbound
/// plaintext, 15008 HBONE. The tasks end when draining closes the listeners or un-enrollment
/// aborts them.
pub fn serve_workload(
    ctx: &Arc<ProxyContext>,
    workload: &Arc<LocalWorkload>,
    listeners: PodListeners,
) -> Vec<JoinHandle<()>> {
    let mut tasks: Vec<JoinHandle<()>> = listeners
        .outbound
        .into_iter()
        .map(|l| tokio::spawn(super::outbound::serve(l, workload.clone(), ctx.clone())))
        .collect();
    tasks.push(tokio::spawn(super::inbound::serve_plaintext(
        listeners.inbound,
        workload.clone(),
        ctx.clone(),
    )));
    tasks.push(tokio::spawn(super::inbound::serve_hbone(
        listeners.hbone,
        workload.clone(),
        ctx.clone(),
    )));
    tasks
}

/// How a listener admits the connections it accepts.
pub(crate) enum Admission {
    /// Each holds one of the workload's permits (`limits.max_connections_per_workload`) from
    /// accept to close; beyond them, refused.
    WorkloadPermit,
    /// The handler admits it (HBONE: a client that has not authenticated yet must not take
    /// what the workload's own traffic needs).
    ByHandler,
}

/// Accepts on `listener` until the task is aborted or draining starts; each connection runs
/// `handle` in a task that is aborted together with this loop (un-enrollment closes the pod's
/// connections), once `admission` admits it. When draining starts, the listener closes (a
/// successor's listener takes the queued connections) and open connections get
/// `drain_timeout` to finish before they are closed.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    admission: Admission,
    workload: Arc<LocalWorkload>,
    ctx: Arc<ProxyContext>,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, Arc<LocalWorkload>, Arc<ProxyContext>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    let drain_started = ctx.drain_started();
    tokio::pin!(drain_started);
    loop {
        tokio::select! {
            () = &mut drain_started => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    // Dual-stack listeners see IPv4 peers as v4-mapped IPv6; logs and policy
                    // want the address the peer has.
                    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                    let permit = match admission {
                        Admission::WorkloadPermit => match workload.connection_permit() {
                            Some(permit) => Some(permit),
                            None => {
                                warn!(workload = %workload.id, listener = what, %peer, close = "max_connections", "connection refused: workload at its connection limit");
                                reset(stream);
                                continue;
                            }
                        },
                        Admission::ByHandler => None,
                    };
                    let work = handle(stream, peer, workload.clone(), ctx.clone());
                    connections.spawn(holding(work, permit));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let open = connections.len();
    let finished = tokio::time::timeout(ctx.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        warn!(workload = %workload.id, listener = what, open = connections.len(), close = "drain_timeout", "drain time over; closing open connections");
    } else if open > 0 {
        info!(workload = %workload.id, listener = what, connections = open, "listener drained");
    }
}

/// `work`, holding `permit` until it ends. Not `async move { work.await; .. }`: that block keeps
/// `work` twice (as captured, and moved out to be polled), which doubled every open connection's
/// task (idle memory). Also each inbound HBONE stream's task.
pub(crate) fn holding<T: Send>(
    work: impl Future<Output = ()>,
    permit: T,
) -> impl Future<Output = ()> {
    work.map(move |()| drop(permit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_task_holds_its_work_once() {
        let work = async {
            let state = [7u8; 4096];
            tokio::task::yield_now().await;
            assert_eq!(state.iter().map(|b| *b as usize).sum::<usize>(), 7 * 4096);
        };
        let work_size = std::mem::size_of_val(&work);
        let task = holding(work, Arc::new(()));
        assert!(
            std::mem::size_of_val(&task) < work_size + 64,
            "{} bytes to run {work_size} bytes of work",
            std::mem::size_of_val(&task)
        );
        task.await;
    }
}
