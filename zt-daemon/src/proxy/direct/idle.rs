//! `limits.idle_timeout` for direct connections. The agent holds no socket of theirs, so it
//! asks the kernel instead: now and then it reads how long each followed connection's source
//! socket has carried no data either way (socket diagnostics in the source pod's namespace, one
//! exact lookup per connection, so the cost grows with the connections followed, not with the
//! pod's other sockets), and aborts those idle for the timeout, as its own copy closes an idle
//! connection (`close = "idle_timeout"`).
use std::{collections::HashMap, sync::Arc, time::Duration};

use tracing::{info, warn};

use super::{
    abort,
    followed::{Followed, at_source, mark_aborted},
};
use crate::{capture::DirectConnection, copy::CloseReason, enrollment::LocalWorkload};

/// How often the idle times are read: a connection is aborted between `idle_timeout` and a
/// quarter of it later (at least 1 s, at most a minute, plus the time the reading takes).
pub(super) fn check_every(idle_timeout: Duration) -> Duration {
    (idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Aborts the followed direct connections idle for `idle_timeout` (off the runtime). One whose
/// abort failed stays unmarked, for the next check.
pub(super) async fn abort_idle(followed: &mut Followed, idle_timeout: Duration) {
    let mut by_source: HashMap<u64, (Arc<LocalWorkload>, Vec<DirectConnection>)> = HashMap::new();
    for o in followed.open.values().filter(|o| o.aborted.is_none()) {
        by_source
            .entry(o.source.netns_cookie)
            .or_insert_with(|| (o.source.clone(), Vec::new()))
            .1
            .push(o.connection);
    }
    if by_source.is_empty() {
        return;
    }
    let task = tokio::task::spawn_blocking(move || {
        let mut aborted = Vec::new();
        for (source, connections) in by_source.into_values() {
            let asked: Vec<_> = connections.iter().map(at_source).collect();
            let idle = match source.idle_for(&asked) {
                Ok(idle) => idle,
                Err(e) => {
                    warn!(workload = %source.id, error = %e, "direct connections: cannot read how long the pod's connections have been idle");
                    continue;
                }
            };
            for (c, quiet) in connections.iter().zip(idle) {
                if quiet.is_some_and(|quiet| quiet >= idle_timeout) && abort(c, &source) {
                    info!(workload = %source.id, source = %c.source, destination = %c.destination, close = "idle_timeout", "direct connection aborted: idle for limits.idle_timeout");
                    aborted.push(*c);
                }
            }
        }
        aborted
    });
    for c in task.await.unwrap_or_default() {
        mark_aborted(followed, &c, CloseReason::IdleTimeout);
    }
}
