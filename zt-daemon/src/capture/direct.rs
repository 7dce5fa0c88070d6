//! The kernel side of `mtls.same_node = "direct"` (zt-ebpf's `direct` module): grants that let a
//! pod connect to a destination pod of this node without the agent, the open direct connections
//! the programs record, the epoch that voids both at once, and the programs' reports of each
//! connection's open and close. The decisions are the proxy's (`proxy::direct`).
use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, RingBuf},
};
use tokio::io::{Interest, unix::AsyncFd};
use zt_common::{
    DIRECT_FLOWS_MAX, DirectEvent, DirectFlow, DirectGrantKey, FlowKey, SockAddr, direct_events,
    map_names,
};

use super::{CaptureError, kernel_addr, open_map, socket_addr};

/// Entries of DIRECT_FLOWS kept free for connections the agent has not yet seen open.
const FLOWS_SLACK: usize = 16384;

type Grants = HashMap<MapData, DirectGrantKey, DirectFlow>;
type Flows = HashMap<MapData, FlowKey, DirectFlow>;

/// Each map behind its own lock: walking the records (off the runtime) never holds up a grant
/// (on a connection's task).
struct Shared {
    grants: Mutex<Grants>,
    flows: Mutex<Flows>,
    /// Read at each grant, not cached: during an upgrade two agents share it.
    epoch: Mutex<Array<MapData, u64>>,
    /// Set by [`DirectPaths::disable`]: no grants any more.
    disabled: AtomicBool,
    workloads_changed: tokio::sync::Notify,
    /// Cleared while the flow map is near full: no grants (see [`DirectPaths::check_room`]).
    room: AtomicBool,
    /// Taken by [`DirectPaths::reports`].
    events: Mutex<Option<RingBuf<MapData>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The keys of DIRECT_FLOWS, each once. The kernel restarts a walk whose current key was deleted
/// meanwhile, so the walk is bounded by the map's capacity; `false` if it ran into the bound.
fn flow_keys(flows: &Flows) -> (std::collections::HashSet<FlowKey>, bool) {
    let max = DIRECT_FLOWS_MAX as usize;
    let mut steps = 0;
    let keys = flows
        .keys()
        .take(max)
        .inspect(|_| steps += 1)
        .filter_map(Result::ok)
        .collect();
    (keys, steps < max)
}

fn clear_grants(grants: &mut Grants) {
    let keys: Vec<_> = grants.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _ = grants.remove(&key);
    }
}

/// Handles on the direct-connection maps. Cheap to clone.
#[derive(Clone)]
pub struct DirectPaths(Arc<Shared>);

/// One open direct connection, as the source's socket sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DirectConnection {
    /// The source application's address (local end of its socket).
    pub source: SocketAddr,
    /// The destination application's address.
    pub destination: SocketAddr,
    pub source_netns: u64,
    pub destination_netns: u64,
    /// The source socket's cookie.
    pub socket: u64,
}

/// What the programs report about a direct connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectReport {
    Opened(DirectConnection),
    /// Closed after it opened, with the source socket's counters.
    Closed {
        connection: DirectConnection,
        sent: u64,
        received: u64,
    },
    /// Closed before it opened: the destination refused or did not answer.
    Failed(DirectConnection),
}

impl DirectConnection {
    fn from_kernel(key: &FlowKey, pods: &DirectFlow) -> Option<Self> {
        let addr = |words: [u32; 4], port| {
            socket_addr(&SockAddr {
                addr: words,
                port,
                family: key.family,
            })
        };
        Some(Self {
            source: addr(key.src, key.src_port)?,
            destination: addr(key.dst, key.dst_port)?,
            source_netns: pods.src_netns_cookie,
            destination_netns: pods.dst_netns_cookie,
            socket: pods.socket_cookie,
        })
    }
}

impl DirectPaths {
    /// Opens the pinned maps and takes this agent's report ring out of its node-wide object.
    /// Starts a new epoch: what a previous agent granted is void until this one decides again.
    pub(super) fn open(pin_dir: &Path, ebpf: &mut Ebpf) -> Result<Self, CaptureError> {
        let err = |source| CaptureError::Map {
            map: map_names::DIRECT_EVENTS,
            source,
        };
        let events = ebpf.take_map(map_names::DIRECT_EVENTS).ok_or_else(|| {
            err(aya::maps::MapError::InvalidName {
                name: map_names::DIRECT_EVENTS.into(),
            })
        })?;
        let paths = Self(Arc::new(Shared {
            grants: Mutex::new(open_map(pin_dir, map_names::DIRECT_GRANTS, Map::HashMap)?),
            flows: Mutex::new(open_map(pin_dir, map_names::DIRECT_FLOWS, Map::HashMap)?),
            epoch: Mutex::new(open_map(pin_dir, map_names::DIRECT_EPOCH, Map::Array)?),
            events: Mutex::new(Some(RingBuf::try_from(events).map_err(err)?)),
            room: AtomicBool::new(true),
            disabled: AtomicBool::new(false),
            workloads_changed: tokio::sync::Notify::new(),
        }));
        paths.new_epoch().map_err(|source| CaptureError::Io {
            path: pin_dir.join("maps").join(map_names::DIRECT_EPOCH),
            action: "starting a new epoch of direct grants",
            source,
        })?;
        Ok(paths)
    }

    /// The current epoch; a decision made after reading it may be granted under it.
    pub fn epoch(&self) -> u64 {
        lock(&self.0.epoch).get(&0, 0).unwrap_or(0)
    }

    /// Voids every grant and every open connection's record (new connections no longer get
    /// past the agent on them; those already open are not affected), and returns the new epoch.
    pub fn new_epoch(&self) -> io::Result<u64> {
        let epoch = {
            let mut map = lock(&self.0.epoch);
            let epoch = map.get(&0, 0).unwrap_or(0) + 1;
            map.set(0, &epoch, 0).map_err(io::Error::other)?;
            epoch
        };
        clear_grants(&mut lock(&self.0.grants));
        Ok(epoch)
    }

    /// Stops granting for good (the agent can no longer follow direct connections) and voids
    /// every grant.
    pub fn disable(&self) {
        self.0.disabled.store(true, Ordering::Relaxed);
        if let Err(e) = self.new_epoch() {
            tracing::error!(error = %e, "direct connections: cannot void the grants");
        }
    }

    /// Asks the agent's watcher to decide the open direct connections again (the node's
    /// workloads changed).
    pub fn workloads_changed(&self) {
        self.0.workloads_changed.notify_one();
    }

    /// Resolves after [`Self::workloads_changed`].
    pub async fn workloads_change(&self) {
        self.0.workloads_changed.notified().await;
    }

    /// Lets pod `source_netns`, from its address `source`, connect to `destination` (pod
    /// `destination_netns`) without the agent, under `epoch` (void if it is no longer current).
    pub fn grant(
        &self,
        source_netns: u64,
        source: IpAddr,
        destination: SocketAddr,
        destination_netns: u64,
        epoch: u64,
    ) -> io::Result<()> {
        if !self.0.room.load(Ordering::Relaxed) || self.0.disabled.load(Ordering::Relaxed) {
            return Ok(());
        }
        let key = DirectGrantKey {
            netns_cookie: source_netns,
            dst: kernel_addr(destination),
            _pad: [0; 4],
        };
        let value = DirectFlow {
            src_netns_cookie: source_netns,
            dst_netns_cookie: destination_netns,
            epoch,
            src_addr: kernel_addr(SocketAddr::new(source, 0)).addr,
            ..DirectFlow::default()
        };
        lock(&self.0.grants)
            .insert(&key, &value, 0)
            .map_err(io::Error::other)
    }

    /// Counts the kernel's direct connection records and stops granting (and voids the grants)
    /// while fewer than `FLOWS_SLACK` entries are free, until under twice that many are used
    /// again. Returns the count.
    pub fn check_room(&self) -> usize {
        let used = flow_keys(&lock(&self.0.flows)).0.len();
        let max = DIRECT_FLOWS_MAX as usize;
        let room = &self.0.room;
        if used >= max - FLOWS_SLACK && room.swap(false, Ordering::Relaxed) {
            clear_grants(&mut lock(&self.0.grants));
            tracing::warn!(
                used,
                max,
                "direct connections: the kernel's record map is nearly full; new connections take the agent's path"
            );
        } else if used < max - 2 * FLOWS_SLACK && !room.swap(true, Ordering::Relaxed) {
            tracing::info!(
                used,
                max,
                "direct connections: room again in the kernel's record map"
            );
        }
        used
    }

    /// The open direct connections; `false` if the walk of the kernel's records was cut short
    /// (they changed faster than it could walk them).
    pub fn connections(&self) -> (Vec<DirectConnection>, bool) {
        let flows = lock(&self.0.flows);
        let (keys, complete) = flow_keys(&flows);
        let connections = keys
            .into_iter()
            .filter_map(|k| Some((k, flows.get(&k, 0).ok()?)))
            .filter_map(|(k, v)| DirectConnection::from_kernel(&k, &v))
            .collect();
        (connections, complete)
    }

    /// Reports of direct connections opening and closing, for as long as the agent runs;
    /// `None` after the first call (one reader).
    pub fn reports(&self) -> Option<DirectReports> {
        let ring = self
            .0
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        // SAFETY: the ring buffer map owns its fd, which stays open and the same while the
        // AsyncFd owns the map.
        match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
            Ok(ring) => Some(DirectReports(ring)),
            Err(e) => {
                tracing::error!(error = %e, "direct connections: the kernel's reports cannot be read; they are neither logged nor counted");
                None
            }
        }
    }
}

/// The programs' reports, in order.
pub struct DirectReports(AsyncFd<RingBuf<MapData>>);

impl DirectReports {
    /// Every report available now, waiting for at least one; `None` if the ring failed.
    pub async fn next_batch(&mut self) -> Option<Vec<DirectReport>> {
        loop {
            let mut ready = self.0.readable_mut().await.ok()?;
            let ring = ready.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(item) = ring.next() {
                if let Some(report) = decode(&item) {
                    batch.push(report);
                }
            }
            ready.clear_ready();
            if !batch.is_empty() {
                return Some(batch);
            }
        }
    }
}

fn decode(bytes: &[u8]) -> Option<DirectReport> {
    if bytes.len() < size_of::<DirectEvent>() {
        return None;
    }
    // SAFETY: length checked; DirectEvent is plain old data, read unaligned.
    let event: DirectEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let connection = DirectConnection::from_kernel(&event.flow, &event.pods)?;
    Some(match event.kind {
        direct_events::OPENED => DirectReport::Opened(connection),
        direct_events::CLOSED => {
            let (sent, received) = payload(&event);
            DirectReport::Closed {
                connection,
                sent,
                received,
            }
        }
        direct_events::FAILED => DirectReport::Failed(connection),
        _ => return None,
    })
}

/// TCP states as the kernel numbers them.
mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const CLOSING: u32 = 11;
}

/// The payload a closed direct connection carried each way, from its source socket's
/// sequence-space counters: without the SYN, and without each FIN they include.
fn payload(event: &DirectEvent) -> (u64, u64) {
    use tcp_state::*;
    let entered = |state: u32| event.pods.states & (1 << state) != 0;
    let syn = u64::from(entered(ESTABLISHED));
    let fin_sent = entered(FIN_WAIT1) || entered(LAST_ACK);
    let fin_acked = u64::from(fin_sent && event.unacked == 0);
    // Leaving FIN_WAIT1/2 for CLOSE is the peer's FIN (the socket went to TIME_WAIT), or, rarely,
    // a reset there: then one byte too few is counted.
    let fin_received = u64::from(
        entered(CLOSE_WAIT)
            || entered(CLOSING)
            || matches!(event.closed_from, FIN_WAIT1 | FIN_WAIT2),
    );
    (
        event.bytes_acked.saturating_sub(syn + fin_acked),
        event.bytes_received.saturating_sub(fin_received),
    )
}

#[cfg(test)]
mod tests {
    use super::{tcp_state::*, *};

    fn closed(
        states: &[u32],
        closed_from: u32,
        acked: u64,
        received: u64,
        unacked: u32,
    ) -> (u64, u64) {
        let mut event = DirectEvent {
            kind: direct_events::CLOSED,
            closed_from,
            bytes_acked: acked,
            bytes_received: received,
            unacked,
            ..Default::default()
        };
        for s in states {
            event.pods.states |= 1 << s;
        }
        payload(&event)
    }

    #[test]
    fn the_payload_leaves_out_the_syn_and_the_fins_the_counters_include() {
        // The source closed first, both FINs exchanged.
        let active = [ESTABLISHED, FIN_WAIT1, FIN_WAIT2];
        assert_eq!(closed(&active, FIN_WAIT2, 1002, 51, 0), (1000, 50));
        // The destination closed first.
        let passive = [ESTABLISHED, CLOSE_WAIT, LAST_ACK];
        assert_eq!(closed(&passive, LAST_ACK, 1002, 51, 0), (1000, 50));
        // Reset while established: no FIN either way.
        assert_eq!(closed(&[ESTABLISHED], ESTABLISHED, 1001, 50, 0), (1000, 50));
        // Reset after the source's FIN went out unacknowledged.
        assert_eq!(
            closed(
                &[ESTABLISHED, FIN_WAIT1, CLOSE_WAIT],
                CLOSE_WAIT,
                1001,
                51,
                1
            ),
            (1000, 50)
        );
        // Never opened.
        assert_eq!(closed(&[], 2, 0, 0, 1), (0, 0));
    }
}
