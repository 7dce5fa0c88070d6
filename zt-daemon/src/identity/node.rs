//! The node's identity service: where SVIDs come from (built-in CA, files or SPIRE), the trust
//! store every verifier shares, and the watcher that reloads bundles, revocations and SVID files
//! when they change on disk. Bad new files are logged with their path; the last good state stays.
use std::{collections::HashMap, path::PathBuf, sync::Arc};

use notify::RecommendedWatcher;
use rustls::pki_types::CertificateDer;
use tracing::{debug, error, info};

use super::settings::{IdentityConfig, IdentityProvider};
use super::{
    ca::{CaError, CertificateAuthority},
    files::{self, BundleError, FilesSource},
    revocation::{RevocationError, RevocationList},
    rotation::{BuiltinIssuer, Checked, Renewal, SvidSource, WorkloadIdentity},
    spiffe::{SpiffeId, TrustDomain},
    spire::SpireAgent,
    tls::SvidSlot,
    verify::{TrustState, TrustStore},
};
use crate::workload::Workload;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Revocation(#[from] RevocationError),
    #[error("trust bundle: {0}")]
    Trust(String),
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
}

/// Everything the trust state is built from; cloned into the watcher task.
#[derive(Clone)]
struct TrustSources {
    trust_domain: TrustDomain,
    /// Roots of the built-in CA; the files provider reads its bundles from disk instead.
    builtin_roots: Option<Vec<CertificateDer<'static>>>,
    /// The node's spire-agent: its bundles, and the identities it withdrew.
    spire: Option<Arc<SpireAgent>>,
    config: IdentityConfig,
}

impl TrustSources {
    fn load(&self) -> Result<TrustState, IdentityError> {
        let bundles = match (&self.builtin_roots, &self.config.provider) {
            (Some(roots), _) => HashMap::from([(self.trust_domain.clone(), roots.clone())]),
            (None, IdentityProvider::Files { dir }) => {
                files::load_bundles(&dir.join(files::BUNDLES_DIR))?
            }
            (None, IdentityProvider::Spire { .. }) => {
                self.spire.as_ref().map(|s| s.bundles()).unwrap_or_default()
            }
            (None, IdentityProvider::Builtin { .. }) => HashMap::new(),
        };
        let revoked = match &self.config.revocation_file {
            Some(path) => RevocationList::load(path)?,
            None => RevocationList::default(),
        };
        let revoked = match &self.spire {
            Some(spire) => revoked.with_identities(spire.withdrawn()),
            None => revoked,
        };
        TrustState::new(bundles, revoked).map_err(IdentityError::Trust)
    }

    /// Paths whose changes reload identity material.
    fn watched_paths(&self) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        if let IdentityProvider::Files { dir } = &self.config.provider {
            paths.push(dir.clone());
        }
        if let Some(f) = &self.config.revocation_file {
            paths.push(f.clone());
        }
        paths
    }
}

/// Where workloads' SVIDs come from.
enum Issuer {
    /// Fetched, and renewed on a timer (built-in CA, files).
    Renewed(Arc<dyn SvidSource>),
    /// Pushed by the node's spire-agent.
    Spire(Arc<SpireAgent>),
}

pub struct NodeIdentity {
    pub trust: TrustStore,
    pub renewal: Renewal,
    issuer: Issuer,
    sources: TrustSources,
    _watcher: Option<RecommendedWatcher>,
}

impl NodeIdentity {
    pub fn start(trust_domain: TrustDomain, config: IdentityConfig) -> Result<Self, IdentityError> {
        let renewal = Renewal::default();
        let (issuer, builtin_roots) = match &config.provider {
            IdentityProvider::Builtin { ca_dir } => {
                let ca = CertificateAuthority::load(ca_dir)?;
                if ca.trust_domain() != &trust_domain {
                    return Err(IdentityError::Trust(format!(
                        "{}: CA serves {}, node config says {trust_domain}",
                        ca_dir.display(),
                        ca.trust_domain()
                    )));
                }
                let root = ca.bundle().to_vec();
                let ttl = config.svid_ttl;
                (
                    Issuer::Renewed(Arc::new(BuiltinIssuer { ca, ttl })),
                    Some(root),
                )
            }
            IdentityProvider::Files { dir } => (
                Issuer::Renewed(Arc::new(FilesSource { dir: dir.clone() })),
                None,
            ),
            IdentityProvider::Spire {
                admin_socket,
                selectors,
            } => (
                Issuer::Spire(SpireAgent::new(
                    admin_socket.clone(),
                    selectors.clone(),
                    renewal.clone(),
                )),
                None,
            ),
        };
        let sources = TrustSources {
            trust_domain,
            builtin_roots,
            spire: match &issuer {
                Issuer::Spire(s) => Some(s.clone()),
                Issuer::Renewed(_) => None,
            },
            config,
        };
        let trust = TrustStore::new(sources.load()?);
        let watcher = watch(&sources, &trust, &renewal)?;
        if let Issuer::Spire(spire) = &issuer {
            tokio::spawn(spire.clone().follow_bundles(reloader(&sources, &trust)));
        }
        Ok(Self {
            trust,
            renewal,
            issuer,
            sources,
            _watcher: watcher,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.sources.trust_domain
    }

    /// Issues the first SVID of an enrolled workload and keeps it renewed (SPIRE: follows what
    /// spire-agent pushes for the workload's selectors).
    pub fn issue(&self, id: SpiffeId, workload: &Workload) -> WorkloadIdentity {
        match &self.issuer {
            Issuer::Renewed(source) => {
                let checked = Arc::new(Checked {
                    source: source.clone(),
                    trust: self.trust.clone(),
                });
                WorkloadIdentity::start(id, checked, &self.renewal)
            }
            Issuer::Spire(spire) => {
                let slot = SvidSlot::default();
                let task = tokio::spawn(spire.clone().follow_svid(
                    id.clone(),
                    workload.clone(),
                    slot.clone(),
                    self.trust.clone(),
                    reloader(&self.sources, &self.trust),
                ));
                WorkloadIdentity::pushed(id, slot, task)
            }
        }
    }
}

/// Rebuilds the trust state from its sources (after a SPIRE update); a failure keeps the last.
fn reloader(sources: &TrustSources, trust: &TrustStore) -> impl Fn() + Send + Sync + 'static {
    let (sources, trust) = (sources.clone(), trust.clone());
    move || match sources.load() {
        Ok(state) if *trust.current() == state => {}
        Ok(state) => trust.replace(state),
        Err(e) => error!(error = %e, "trust state not rebuilt; keeping the previous one"),
    }
}

/// Reloads trust and wakes SVID renewal whenever a watched path changes.
fn watch(
    sources: &TrustSources,
    trust: &TrustStore,
    renewal: &Renewal,
) -> Result<Option<RecommendedWatcher>, IdentityError> {
    let paths = sources.watched_paths();
    if paths.is_empty() {
        return Ok(None);
    }
    let (sources, trust, renewal) = (sources.clone(), trust.clone(), renewal.clone());
    let svids_are_files = matches!(sources.config.provider, IdentityProvider::Files { .. });
    let watcher = crate::watch::on_change(&paths, move || {
        match sources.load() {
            // The same bundles and revocations: replacing them would only wake every open
            // connection to re-check its peer.
            Ok(state) if *trust.current() == state => {
                debug!("trust bundles and revocation list unchanged");
            }
            Ok(state) => {
                trust.replace(state);
                info!("trust bundles and revocation list reloaded");
            }
            Err(e) => {
                error!(error = %e, "identity reload rejected; keeping the previous trust state")
            }
        }
        // SVID files may have changed too: every workload re-reads its own. The built-in CA's
        // SVIDs are not files, and waking it would mint new certificates for nothing.
        if svids_are_files {
            renewal.wake.send_modify(|changes| *changes += 1);
        }
    })?;
    Ok(Some(watcher))
}
