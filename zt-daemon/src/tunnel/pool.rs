//! Pooled HBONE connections: a mutual-TLS HTTP/2 connection per (source pod, source identity,
//! destination pod address, expected destination identity) carries the streams between them, so
//! only the first captured connection pays for a TLS handshake.
//!
//! - The source pod (its netns), not only its identity, is in the key: a connection is dialled
//!   from inside one pod and carries its address, so replicas sharing a service account must not
//!   share one (the destination judges `ipBlocks` by that address).
//! - Streams that find no usable connection wait for one dial per key rather than each dialling
//!   (and overwriting one another's connection); if that dial fails, they fail with it.
//! - A connection takes a new stream while it has room under the peer's
//!   SETTINGS_MAX_CONCURRENT_STREAMS (beyond, another one is dialled) and while both certificates
//!   it was authenticated with are valid and not revoked: checked at every reuse, and watched, so
//!   an expired connection is retired (closed once its streams end) and a revoked one is closed
//!   at once. It also closes after `idle_timeout` without streams, and a broken one is replaced.
use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    error::TunnelError,
    session::{self, Retired, SessionCertificates},
};
use crate::{identity::spiffe::SpiffeId, identity::verify::TrustStore, workload::WorkloadId};

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct PoolKey {
    /// The source pod's network namespace cookie: where the connection is dialled from.
    pub source_netns: u64,
    pub source_workload: WorkloadId,
    pub source: SpiffeId,
    pub destination: IpAddr,
    pub expected: SpiffeId,
}

/// A freshly dialled connection, for the pool to drive and share.
pub struct Dialled {
    pub send: SendRequest<Bytes>,
    /// The HTTP/2 connection's I/O; dropping it closes the connection and fails its streams.
    pub connection: Pin<Box<dyn Future<Output = Result<(), h2::Error>> + Send>>,
    pub certificates: SessionCertificates,
    /// The peer's HBONE address, for logs.
    pub peer: SocketAddr,
}

/// One pooled connection. `active` counts streams (leased, not only open ones) so neither the
/// idle reaper nor the capacity check miscounts.
#[derive(Clone)]
struct PooledConnection {
    id: u64,
    send: SendRequest<Bytes>,
    certificates: SessionCertificates,
    active: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
    /// Takes no new streams (a certificate expired); closes once `active` is 0.
    retired: Arc<AtomicBool>,
}

impl PooledConnection {
    fn has_room(&self) -> bool {
        self.active.load(Ordering::Relaxed) < self.send.current_max_send_streams()
    }

    fn lease(&self, fresh: bool) -> Lease {
        self.active.fetch_add(1, Ordering::Relaxed);
        Lease {
            send: self.send.clone(),
            connection: self.id,
            fresh,
            guard: StreamGuard {
                active: self.active.clone(),
                last_used: self.last_used.clone(),
            },
        }
    }
}

/// Held while a stream is open (or being opened) on a pooled connection.
pub struct StreamGuard {
    active: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream's claim on a pooled connection.
pub struct Lease {
    pub send: SendRequest<Bytes>,
    pub guard: StreamGuard,
    /// The connection's id (to evict it if it turns out broken).
    pub connection: u64,
    /// Dialled for this claim rather than reused.
    pub fresh: bool,
}

/// A dial in progress: `None` until it is done, then its outcome (an error as text, for every
/// waiter).
type DialOutcome = Option<Result<(), String>>;

#[derive(Default)]
struct Slot {
    connections: Vec<PooledConnection>,
    dialing: Option<(u64, watch::Receiver<DialOutcome>)>,
}

/// One row of `/config_dump`.
pub struct PooledView {
    pub key: PoolKey,
    pub connection: u64,
    pub active_streams: usize,
    pub expires: SystemTime,
}

pub struct Pool {
    slots: Mutex<HashMap<PoolKey, Slot>>,
    next_id: AtomicU64,
    trust: TrustStore,
    idle_timeout: Duration,
}

/// Clears the pool's record of a dial when the dialling task ends, also when it is cancelled
/// (the workload un-enrolled), so waiters dial themselves instead of waiting forever.
struct DialGuard<'a> {
    pool: &'a Pool,
    key: &'a PoolKey,
    dial: u64,
}

impl Drop for DialGuard<'_> {
    fn drop(&mut self) {
        let mut slots = self.pool.lock();
        if let Some(slot) = slots.get_mut(self.key)
            && slot
                .dialing
                .as_ref()
                .is_some_and(|(id, _)| *id == self.dial)
        {
            slot.dialing = None;
            if slot.connections.is_empty() {
                slots.remove(self.key);
            }
        }
    }
}

impl Pool {
    pub fn new(trust: TrustStore, idle_timeout: Duration) -> Self {
        Self {
            slots: Mutex::default(),
            next_id: AtomicU64::new(0),
            trust,
            idle_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A lease on a usable connection for `key`: a pooled one with room, else the one a dial in
    /// progress brings, else one `dial` makes.
    pub async fn checkout<F, Fut>(
        self: &Arc<Self>,
        key: &PoolKey,
        dial: F,
    ) -> Result<Lease, TunnelError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Dialled, TunnelError>>,
    {
        let (dial_id, done) = loop {
            let mut waiting = {
                let mut slots = self.lock();
                let slot = slots.entry(key.clone()).or_default();
                if let Some(lease) = self.reuse(key, slot) {
                    return Ok(lease);
                }
                match &slot.dialing {
                    Some((_, dialing)) => dialing.clone(),
                    None => {
                        let (done, dialing) = watch::channel(None);
                        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                        slot.dialing = Some((id, dialing));
                        break (id, done);
                    }
                }
            };
            match waiting.wait_for(Option::is_some).await {
                Ok(outcome) => {
                    if let Some(Err(reason)) = &*outcome {
                        return Err(TunnelError::SharedDial {
                            destination: key.destination,
                            reason: reason.clone(),
                        });
                    }
                }
                // The dialling task was cancelled: look again (and dial, if nobody else does).
                Err(_) => continue,
            }
        };
        let guard = DialGuard {
            pool: self,
            key,
            dial: dial_id,
        };
        match dial().await {
            Ok(dialled) => {
                let lease = self.insert(key, dialled);
                drop(guard);
                done.send_replace(Some(Ok(())));
                Ok(lease)
            }
            Err(e) => {
                drop(guard);
                done.send_replace(Some(Err(e.to_string())));
                Err(e)
            }
        }
    }

    /// A lease on a pooled connection of `slot` that may take a stream now; connections whose
    /// certificates no longer allow it are retired on the way.
    fn reuse(&self, key: &PoolKey, slot: &mut Slot) -> Option<Lease> {
        let trust = self.trust.current();
        let now = SystemTime::now();
        slot.connections
            .retain(|c| match c.certificates.check(&trust, now) {
                Ok(()) => !c.retired.load(Ordering::Relaxed),
                Err(why) => {
                    retire(c, key, &why);
                    false
                }
            });
        slot.connections
            .iter()
            .find(|c| c.has_room())
            .map(|c| c.lease(false))
    }

    /// Pools a dialled connection, leases it to the dialler and drives it until it fails, idles
    /// out, or a certificate it was authenticated with is revoked.
    fn insert(self: &Arc<Self>, key: &PoolKey, dialled: Dialled) -> Lease {
        let Dialled {
            send,
            connection,
            certificates,
            peer,
        } = dialled;
        let pooled = PooledConnection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            send,
            certificates,
            active: Arc::default(),
            last_used: Arc::new(Mutex::new(Instant::now())),
            retired: Arc::default(),
        };
        let lease = pooled.lease(true);
        self.lock()
            .entry(key.clone())
            .or_default()
            .connections
            .push(pooled.clone());
        let (pool, key) = (self.clone(), key.clone());
        tokio::spawn(async move {
            let reason = pool.drive(&key, &pooled, connection).await;
            pool.evict(&key, pooled.id);
            debug!(%peer, source = %key.source, source_workload = %key.source_workload, reason, "pooled HBONE connection closed");
        });
        lease
    }

    /// Runs one pooled connection; returns why it ended.
    async fn drive(
        &self,
        key: &PoolKey,
        pooled: &PooledConnection,
        mut connection: Pin<Box<dyn Future<Output = Result<(), h2::Error>> + Send>>,
    ) -> String {
        let tick = (self.idle_timeout / 4).max(Duration::from_millis(100));
        let expired = tokio::time::sleep_until(session::deadline(pooled.certificates.expiry()));
        tokio::pin!(expired);
        let mut trust_changes = self.trust.subscribe();
        let mut watching = true;
        loop {
            tokio::select! {
                r = &mut connection => return match r {
                    Ok(()) => "closed by peer".to_owned(),
                    Err(e) => e.to_string(),
                },
                () = &mut expired, if !pooled.retired.load(Ordering::Relaxed) => {
                    self.evict(key, pooled.id);
                    let why = pooled.certificates.first_to_expire();
                    retire(pooled, key, &why);
                    if pooled.active.load(Ordering::Relaxed) == 0 {
                        return why.to_string();
                    }
                }
                changed = trust_changes.changed(), if watching => {
                    watching = changed.is_ok();
                    let trust = trust_changes.borrow_and_update().clone();
                    if let Err(why) = pooled.certificates.check(&trust, SystemTime::now()) && why.closes_now() {
                        warn!(source_workload = %key.source_workload, destination = %key.destination, destination_identity = %key.expected, close = "revoked", "pooled HBONE connection closed: {why}");
                        return why.to_string();
                    }
                }
                () = tokio::time::sleep(tick) => {
                    let idle = pooled.active.load(Ordering::Relaxed) == 0
                        && (pooled.retired.load(Ordering::Relaxed)
                            || pooled.last_used.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= self.idle_timeout);
                    if idle {
                        return "idle".to_owned();
                    }
                }
            }
        }
    }

    /// Forgets a connection (broken, or closed), unless it is gone already.
    pub fn evict(&self, key: &PoolKey, id: u64) {
        let mut slots = self.lock();
        if let Some(slot) = slots.get_mut(key) {
            slot.connections.retain(|c| c.id != id);
            if slot.connections.is_empty() && slot.dialing.is_none() {
                slots.remove(key);
            }
        }
    }

    /// Every pooled connection and its streams (for `/config_dump`).
    pub fn snapshot(&self) -> Vec<PooledView> {
        self.lock()
            .iter()
            .flat_map(|(key, slot)| {
                slot.connections.iter().map(|c| PooledView {
                    key: key.clone(),
                    connection: c.id,
                    active_streams: c.active.load(Ordering::Relaxed),
                    expires: c.certificates.expiry(),
                })
            })
            .collect()
    }
}

/// Marks a connection as taking no new streams; it closes once its streams end.
fn retire(c: &PooledConnection, key: &PoolKey, why: &Retired) {
    if !c.retired.swap(true, Ordering::Relaxed) {
        info!(source_workload = %key.source_workload, destination = %key.destination, destination_identity = %key.expected, "pooled HBONE connection takes no new streams: {why}");
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, sync::atomic::AtomicUsize};

    use super::*;
    use crate::{
        identity::{
            revocation::RevocationList,
            svid::LeafFacts,
            verify::{TrustState, TrustStore},
        },
        tunnel::session::SessionCertificate,
    };

    fn key(netns: u64) -> PoolKey {
        PoolKey {
            source_netns: netns,
            source_workload: WorkloadId {
                namespace: "shop".into(),
                name: "web".into(),
            },
            source: "spiffe://td/ns/shop/sa/web".parse().unwrap(),
            destination: "10.0.0.2".parse().unwrap(),
            expected: "spiffe://td/ns/shop/sa/db".parse().unwrap(),
        }
    }

    fn certificates(lifetime: Duration) -> SessionCertificates {
        let cert = |id: &str| {
            SessionCertificate::from(&LeafFacts {
                id: id.parse().unwrap(),
                serial: "01".into(),
                not_before: SystemTime::now(),
                not_after: SystemTime::now() + lifetime,
                self_issued: false,
            })
        };
        SessionCertificates {
            local: cert("spiffe://td/ns/shop/sa/web"),
            peer: cert("spiffe://td/ns/shop/sa/db"),
        }
    }

    /// A real HTTP/2 connection over an in-memory pipe to a server allowing `max_streams`
    /// concurrent streams that answers every request 200.
    async fn dial(
        dials: &AtomicUsize,
        lifetime: Duration,
        max_streams: u32,
    ) -> Result<Dialled, TunnelError> {
        dials.fetch_add(1, Ordering::SeqCst);
        // Lets the other checkouts of a test arrive while this dial is in progress.
        tokio::task::yield_now().await;
        let (client, server) = tokio::io::duplex(64 << 10);
        tokio::spawn(async move {
            let mut connection = h2::server::Builder::new()
                .max_concurrent_streams(max_streams)
                .handshake::<_, Bytes>(server)
                .await
                .unwrap();
            while let Some(Ok((_, mut respond))) = connection.accept().await {
                let _ = respond.send_response(http::Response::new(()), false);
            }
        });
        let (send, connection) = h2::client::handshake(client).await?;
        Ok(Dialled {
            send,
            connection: Box::pin(connection),
            certificates: certificates(lifetime),
            peer: "10.0.0.2:15008".parse().unwrap(),
        })
    }

    fn pool(trust: TrustStore) -> Arc<Pool> {
        Arc::new(Pool::new(trust, Duration::from_secs(60)))
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn concurrent_first_streams_share_one_dial() {
        let pool = pool(TrustStore::default());
        let dials = AtomicUsize::new(0);
        let k = key(1);
        let leases = futures_util::future::join_all(
            (0..16).map(|_| pool.checkout(&k, || dial(&dials, HOUR, 100))),
        )
        .await;
        assert_eq!(dials.load(Ordering::SeqCst), 1);
        let ids: Vec<u64> = leases
            .iter()
            .map(|l| l.as_ref().unwrap().connection)
            .collect();
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        assert_eq!(
            leases.iter().filter(|l| l.as_ref().unwrap().fresh).count(),
            1
        );
    }

    #[tokio::test]
    async fn each_source_pod_has_its_own_connection() {
        let pool = pool(TrustStore::default());
        let dials = AtomicUsize::new(0);
        // Same identity, destination and expected identity; two pods.
        let a = pool
            .checkout(&key(1), || dial(&dials, HOUR, 100))
            .await
            .unwrap();
        let b = pool
            .checkout(&key(2), || dial(&dials, HOUR, 100))
            .await
            .unwrap();
        let a2 = pool
            .checkout(&key(1), || dial(&dials, HOUR, 100))
            .await
            .unwrap();
        assert_eq!(dials.load(Ordering::SeqCst), 2);
        assert_ne!(a.connection, b.connection);
        assert_eq!(a.connection, a2.connection);
        assert_eq!(pool.snapshot().len(), 2);
    }

    #[tokio::test]
    async fn a_failed_dial_fails_its_waiters_without_more_dials() {
        let pool = pool(TrustStore::default());
        let dials = AtomicUsize::new(0);
        let k = key(1);
        let failing = || async {
            dials.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Err::<Dialled, _>(TunnelError::HandshakeTimeout)
        };
        let outcomes =
            futures_util::future::join_all((0..8).map(|_| pool.checkout(&k, failing))).await;
        assert_eq!(dials.load(Ordering::SeqCst), 1);
        assert!(outcomes.iter().all(Result::is_err));
        // Nothing is left behind; the next stream dials again.
        assert!(pool.lock().is_empty());
        let _ = pool.checkout(&k, failing).await;
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_expired_or_revoked_connection_is_not_reused() {
        let dials = AtomicUsize::new(0);
        // Certificates that expired a moment after the handshake.
        let pool_a = pool(TrustStore::default());
        let expired = pool_a
            .checkout(&key(1), || dial(&dials, Duration::ZERO, 100))
            .await
            .unwrap();
        drop(expired);
        let again = pool_a
            .checkout(&key(1), || dial(&dials, HOUR, 100))
            .await
            .unwrap();
        assert!(again.fresh, "an expired connection was reused");

        // The peer's identity revoked after the handshake.
        let trust = TrustStore::default();
        let pool_b = pool(trust.clone());
        let first = pool_b
            .checkout(&key(1), || dial(&dials, HOUR, 100))
            .await
            .unwrap();
        let revoked =
            RevocationList::parse(Path::new("revoked"), "spiffe://td/ns/shop/sa/db\n").unwrap();
        trust.replace(TrustState::new(HashMap::new(), revoked).unwrap());
        let second = pool_b
            .checkout(&key(1), || dial(&dials, HOUR, 100))
            .await
            .unwrap();
        assert!(second.fresh, "a revoked peer's connection was reused");
        assert_ne!(first.connection, second.connection);
    }

    #[tokio::test]
    async fn a_full_connection_gets_a_sibling() {
        let pool = pool(TrustStore::default());
        let dials = AtomicUsize::new(0);
        let k = key(1);
        let first = pool.checkout(&k, || dial(&dials, HOUR, 1)).await.unwrap();
        // A round trip: the server's SETTINGS (one stream at a time) have arrived after it.
        let mut send = first.send.clone().ready().await.unwrap();
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.2:80")
            .body(())
            .unwrap();
        let (response, _body) = send.send_request(request, false).unwrap();
        response.await.unwrap();
        let second = pool.checkout(&k, || dial(&dials, HOUR, 1)).await.unwrap();
        assert_eq!(dials.load(Ordering::SeqCst), 2);
        assert_ne!(first.connection, second.connection);
        // Once the first stream is done, its connection has room again.
        drop(first);
        let third = pool.checkout(&k, || dial(&dials, HOUR, 1)).await.unwrap();
        assert!(!third.fresh);
    }
}
