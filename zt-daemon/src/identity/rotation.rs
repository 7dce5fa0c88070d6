//! Keeping each workload's SVID fresh. A task per workload renews at half the certificate's
//! lifetime plus jitter (so a node's workloads do not all renew at once), or at once when the
//! source says something changed (the files provider's watcher). When the source fails, the valid
//! certificate stays in use and the task retries with capped exponential backoff; every failure
//! is counted for the metrics endpoint.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use super::{
    ca::{CaError, CertificateAuthority},
    spiffe::SpiffeId,
    svid::Svid,
    tls::SvidSlot,
    verify::TrustStore,
};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("issuing {id}: {message}")]
    Failed { id: SpiffeId, message: String },
}

/// Where a workload's SVIDs come from.
pub trait SvidSource: Send + Sync + 'static {
    fn fetch(&self, id: &SpiffeId) -> Result<Svid, IssueError>;
}

/// The built-in CA issuing short-lived SVIDs.
pub struct BuiltinIssuer {
    pub ca: CertificateAuthority,
    pub ttl: Duration,
}

impl SvidSource for BuiltinIssuer {
    fn fetch(&self, id: &SpiffeId) -> Result<Svid, IssueError> {
        self.ca
            .issue(id, self.ttl)
            .map_err(|e: CaError| IssueError::Failed {
                id: id.clone(),
                message: e.to_string(),
            })
    }
}

/// A source whose SVIDs are taken only once they chain to the trust bundle and are valid now:
/// an issuer that writes a certificate from a new root before the bundle that trusts it, or one
/// not yet valid, must not replace the certificate the peers accept.
pub struct Checked {
    pub source: Arc<dyn SvidSource>,
    pub trust: TrustStore,
}

impl SvidSource for Checked {
    fn fetch(&self, id: &SpiffeId) -> Result<Svid, IssueError> {
        let svid = self.source.fetch(id)?;
        self.trust
            .verify_own(&svid)
            .map_err(|e| IssueError::Failed {
                id: id.clone(),
                message: format!("refused: {e}"),
            })?;
        Ok(svid)
    }
}

/// Shared by every workload's renewal task.
#[derive(Clone, Default)]
pub struct Renewal {
    /// Wakes every task for an immediate refresh (files changed on disk): a counter each task
    /// watches, so a change while a task is busy fetching is still seen when it is done.
    pub wake: Arc<watch::Sender<u64>>,
    /// Issuance failures so far (`zt_identity_issue_failures_total`).
    pub failures: Arc<AtomicU64>,
    /// SVIDs the issuer took back so far (`zt_identity_withdrawals_total`; SPIRE).
    pub withdrawals: Arc<AtomicU64>,
}

/// A workload's identity while it is enrolled: its current SVID and the task renewing it.
/// Dropping it stops renewal and drops the key.
pub struct WorkloadIdentity {
    pub id: SpiffeId,
    pub slot: SvidSlot,
    task: JoinHandle<()>,
}

impl Drop for WorkloadIdentity {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WorkloadIdentity {
    /// Fetches the first SVID now and keeps it renewed. If the source fails, the workload has
    /// no certificate (not ready) and the task retries with backoff until it gets one.
    pub fn start(id: SpiffeId, source: Arc<dyn SvidSource>, renewal: &Renewal) -> Self {
        let slot = SvidSlot::default();
        // Watching from before the first fetch: a change during it is not missed.
        let woken = renewal.wake.subscribe();
        match source.fetch(&id) {
            Ok(svid) => {
                info!(identity = %id, serial = %svid.leaf.serial, expires = ?svid.leaf.not_after, "identity issued");
                slot.replace(svid);
            }
            Err(e) => {
                renewal.failures.fetch_add(1, Ordering::Relaxed);
                warn!(identity = %id, error = %e, "identity issuance failed; retrying");
            }
        }
        let task = tokio::spawn(renew_forever(
            id.clone(),
            slot.clone(),
            source,
            renewal.clone(),
            woken,
        ));
        Self { id, slot, task }
    }

    /// An identity whose SVIDs an outside issuer pushes into `slot` from `task`.
    pub fn pushed(id: SpiffeId, slot: SvidSlot, task: JoinHandle<()>) -> Self {
        Self { id, slot, task }
    }

    /// Whether the workload holds a certificate that is valid now (readiness).
    pub fn is_valid(&self) -> bool {
        let now = SystemTime::now();
        self.slot
            .get()
            .is_some_and(|s| s.leaf.not_before <= now && now < s.leaf.not_after)
    }
}

/// Half the lifetime plus up to a tenth of it, at random.
fn renewal_delay(svid: &Svid) -> Duration {
    let life = svid
        .leaf
        .not_after
        .duration_since(svid.leaf.not_before)
        .unwrap_or_default();
    let mut byte = [0u8; 1];
    let _ = rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut byte);
    let jitter = life / 10 * u32::from(byte[0]) / 255;
    let at = svid.renew_at() + jitter;
    at.duration_since(SystemTime::now()).unwrap_or_default()
}

async fn renew_forever(
    id: SpiffeId,
    slot: SvidSlot,
    source: Arc<dyn SvidSource>,
    renewal: Renewal,
    mut woken: watch::Receiver<u64>,
) {
    // Without a certificate, start in backoff.
    let mut backoff = slot.get().is_none().then_some(FIRST_BACKOFF);
    loop {
        let wait = match (backoff, slot.get()) {
            (Some(b), _) => b,
            (None, Some(svid)) => renewal_delay(&svid),
            (None, None) => FIRST_BACKOFF,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = woken.changed() => {}
        }
        let source = source.clone();
        let fetch_id = id.clone();
        let fetched = tokio::task::spawn_blocking(move || source.fetch(&fetch_id))
            .await
            .unwrap_or_else(|e| {
                Err(IssueError::Failed {
                    id: id.clone(),
                    message: e.to_string(),
                })
            });
        match fetched {
            // The source still hands out the certificate it should have replaced by now: its
            // issuer is late or gone. Keep the certificate, count it, and ask again with backoff
            // (without it, an overdue certificate would be re-read in a tight loop).
            Ok(svid)
                if slot.serial().as_ref() == Some(&svid.leaf.serial)
                    && SystemTime::now() >= svid.renew_at() =>
            {
                renewal.failures.fetch_add(1, Ordering::Relaxed);
                let next = backoff.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                warn!(identity = %id, expires = ?svid.leaf.not_after, retry_in = ?next, "renewal overdue: the issuer has not renewed the certificate; keeping it until it expires");
                backoff = Some(next);
            }
            Ok(svid) => {
                backoff = None;
                if slot.serial().as_ref() != Some(&svid.leaf.serial) {
                    info!(identity = %id, serial = %svid.leaf.serial, expires = ?svid.leaf.not_after, "identity renewed");
                    slot.replace(svid);
                }
            }
            Err(e) => {
                renewal.failures.fetch_add(1, Ordering::Relaxed);
                let next = backoff.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                warn!(identity = %id, error = %e, retry_in = ?next, "renewal failed; keeping the current certificate");
                backoff = Some(next);
            }
        }
    }
}
