//! The agent's bookkeeping of the open direct connections: what it keeps of each (for its
//! records when it closes, and its places under the pods' connection limits), and how it
//! forgets those the kernel no longer has when their close report was lost.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::OwnedSemaphorePermit;

use crate::{
    capture::{DirectConnection, DirectPaths},
    copy::CloseReason,
    enrollment::{LocalWorkload, PodConnection},
    policy::PolicyDecision,
    proxy::access::Identities,
};

/// What the agent keeps of an open direct connection, for its records when it closes.
pub(super) struct Open {
    /// As the kernel recorded it: its addresses, pods and source socket.
    pub(super) connection: DirectConnection,
    pub(super) source: Arc<LocalWorkload>,
    pub(super) destination: Arc<LocalWorkload>,
    /// Both pods' identities as it opened: its records at close need no certificate, which a
    /// withdrawal (that also aborts it) may have taken.
    pub(super) identities: Identities,
    pub(super) decision: Option<PolicyDecision>,
    pub(super) started: Instant,
    /// Set when the agent aborted it: the close's reason.
    pub(super) aborted: Option<CloseReason>,
    /// Its place under both pods' `limits.max_connections_per_workload`, as a spliced
    /// connection holds one of each; given back when it closes or leaves the kernel's map.
    pub(super) permits: Option<Permits>,
}

pub(super) type Permits = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// A place under both pods' limits, if each has one free.
pub(super) fn permits(source: &LocalWorkload, destination: &LocalWorkload) -> Option<Permits> {
    source
        .connection_permit()
        .zip(destination.connection_permit())
}

/// Forgets (and frees the places of) the connections the kernel no longer has that were
/// followed before the walk began; the walk runs off the runtime.
pub(super) async fn reconcile(paths: &DirectPaths, followed: &mut Followed) -> Option<()> {
    let began = Instant::now();
    let paths = paths.clone();
    let (live, complete) = tokio::task::spawn_blocking(move || paths.connections())
        .await
        .ok()?;
    if complete {
        forget_gone(followed, &live, began);
    }
    Some(())
}

/// The open direct connections the agent saw open, and those it forgot at the last re-check
/// because the kernel no longer had them (their close report may still be on its way).
#[derive(Default)]
pub(super) struct Followed {
    pub(super) open: HashMap<Key, Open>,
    /// With the number of re-checks since; dropped (counted closed) after the second.
    pub(super) forgotten: HashMap<Key, (Open, u8)>,
    /// Set after the first re-check, which finds a previous agent's connections: those are
    /// never aborted for the limits; one a later re-check finds unreported is.
    pub(super) rechecked: bool,
}

/// How often the agent compares what it follows with the kernel's records, so that the places
/// of connections whose close report a full ring lost come back.
pub(super) const RECONCILE_EVERY: Duration = Duration::from_secs(10);

/// The source socket's cookie: unique for as long as the kernel runs, where a 4-tuple may come
/// back with a later connection (one whose predecessor's close report was lost).
pub(super) type Key = u64;

pub(super) fn key(c: &DirectConnection) -> Key {
    c.socket
}

/// The connection as its source pod's kernel finds it: by the source socket.
pub(super) fn at_source(c: &DirectConnection) -> PodConnection {
    PodConnection {
        local: c.source,
        remote: c.destination,
        cookie: c.socket,
    }
}

/// Moves a followed connection to its pods' current enrollments when either pod was enrolled
/// again (a changed spec makes a new enrollment, with its own count of places): its place moves
/// with it (the unchanged pod's place is kept as it is), or it is kept without one if the new
/// count is full, as a connection a successor agent adopts at the limit. Whether it moved.
pub(super) fn follow_enrollments(
    followed: &mut Followed,
    c: &DirectConnection,
    source: &Arc<LocalWorkload>,
    destination: &Arc<LocalWorkload>,
) -> bool {
    let Some(o) = followed.open.get_mut(&key(c)) else {
        return false;
    };
    let (same_source, same_destination) = (
        Arc::ptr_eq(&o.source, source),
        Arc::ptr_eq(&o.destination, destination),
    );
    if o.aborted.is_some() || (same_source && same_destination) {
        return false;
    }
    o.source = source.clone();
    o.destination = destination.clone();
    if let Some((old_source, old_destination)) = o.permits.take() {
        let new_source = match same_source {
            true => Some(old_source),
            false => source.connection_permit(),
        };
        let new_destination = match same_destination {
            true => Some(old_destination),
            false => destination.connection_permit(),
        };
        o.permits = new_source.zip(new_destination);
    }
    true
}

/// Records why the agent aborted a connection, for its close.
pub(super) fn mark_aborted(followed: &mut Followed, c: &DirectConnection, why: CloseReason) {
    if let Some(o) = followed.open.get_mut(&key(c)) {
        o.aborted = Some(why);
    }
}

/// Moves the connections a complete walk of the kernel's records (`live`) did not find, and
/// that were followed before it began, to `forgotten`, freeing their places: their close
/// report was lost to a full ring, or is still on its way.
pub(super) fn forget_gone(followed: &mut Followed, live: &[DirectConnection], began: Instant) {
    let live: HashSet<Key> = live.iter().map(key).collect();
    let gone: Vec<Key> = followed
        .open
        .iter()
        .filter(|(k, o)| !live.contains(k) && o.started < began)
        .map(|(k, _)| *k)
        .collect();
    for k in gone {
        if let Some(mut o) = followed.open.remove(&k) {
            o.permits = None;
            followed.forgotten.insert(k, (o, 0));
        }
    }
}
