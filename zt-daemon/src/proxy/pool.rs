//! Pooled HBONE connections: one mutual-TLS HTTP/2 connection per (source identity, destination
//! pod address, expected destination identity) carries every stream between them, so only the
//! first captured connection pays for a TLS handshake. A connection closes after `idle_timeout`
//! without streams, and a broken one is replaced on the next use.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use tracing::debug;

use super::hbone::TunnelError;
use crate::identity::spiffe::SpiffeId;

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct PoolKey {
    pub source: SpiffeId,
    pub destination: IpAddr,
    pub expected: SpiffeId,
}

/// One pooled connection; `active` counts open streams so the idle reaper leaves busy ones alone.
#[derive(Clone)]
pub struct PooledConnection {
    pub id: u64,
    send: SendRequest<Bytes>,
    active: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
}

/// Held while a stream is open on a pooled connection.
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

impl PooledConnection {
    /// A handle to open one stream, counted as active until the guard drops.
    pub async fn stream(&self) -> Result<(SendRequest<Bytes>, StreamGuard), TunnelError> {
        let send = self.send.clone().ready().await?;
        self.active.fetch_add(1, Ordering::Relaxed);
        let guard = StreamGuard {
            active: self.active.clone(),
            last_used: self.last_used.clone(),
        };
        Ok((send, guard))
    }
}

#[derive(Default)]
pub struct Pool {
    connections: Mutex<HashMap<PoolKey, PooledConnection>>,
    next_id: AtomicU64,
}

impl Pool {
    pub fn get(&self, key: &PoolKey) -> Option<PooledConnection> {
        self.lock().get(key).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, PooledConnection>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every pooled connection and its open streams (for `/config_dump`).
    pub fn snapshot(&self) -> Vec<(PoolKey, usize)> {
        self.lock()
            .iter()
            .map(|(k, c)| (k.clone(), c.active.load(Ordering::Relaxed)))
            .collect()
    }

    /// Forgets a connection that failed, unless it was already replaced.
    pub fn evict(&self, key: &PoolKey, id: u64) {
        let mut map = self.lock();
        if map.get(key).is_some_and(|c| c.id == id) {
            map.remove(key);
        }
    }

    /// Adds a fresh HTTP/2 connection and drives it until it fails or idles out.
    pub fn insert<T>(
        self: &Arc<Self>,
        key: PoolKey,
        send: SendRequest<Bytes>,
        connection: h2::client::Connection<T, Bytes>,
        idle_timeout: Duration,
        peer: SocketAddr,
    ) -> PooledConnection
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let pooled = PooledConnection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            send,
            active: Arc::new(AtomicUsize::new(0)),
            last_used: Arc::new(Mutex::new(Instant::now())),
        };
        self.lock().insert(key.clone(), pooled.clone());
        let (pool, watched) = (self.clone(), pooled.clone());
        tokio::spawn(async move {
            tokio::pin!(connection);
            let tick = (idle_timeout / 4).max(Duration::from_millis(100));
            let reason = loop {
                tokio::select! {
                    r = &mut connection => break match r {
                        Ok(()) => "closed by peer".to_owned(),
                        Err(e) => e.to_string(),
                    },
                    _ = tokio::time::sleep(tick) => {
                        let idle = watched.active.load(Ordering::Relaxed) == 0
                            && watched.last_used.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= idle_timeout;
                        if idle {
                            break "idle".to_owned();
                        }
                    }
                }
            };
            pool.evict(&key, watched.id);
            debug!(%peer, source = %key.source, reason, "pooled HBONE connection closed");
        });
        pooled
    }
}
