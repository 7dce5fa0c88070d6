//! SPIRE as the issuer (`[identity] provider = "spire"`). The agent is an authorized delegate of
//! its node's spire-agent and speaks its Delegated Identity API on the admin socket: one
//! `SubscribeToX509SVIDs` stream per enrolled workload, asked for by the workload's selectors
//! (`[identity] selectors`, by default `k8s:ns:<namespace>` and `k8s:sa:<service account>`), and
//! one `SubscribeToX509Bundles` stream for the trust bundles, federated ones included. No CA key
//! is on the node: spire-agent hands out only the SVIDs of entries its node may have.
//!
//! SPIRE pushes; nothing here runs a renewal timer. What arrives is checked before use: the
//! SVID must be the workload's own SPIFFE ID (`spiffe://<td>/ns/<ns>/sa/<sa>`, what its peers
//! will require), pass the leaf rules and chain to the current bundle of its trust domain.
//!
//! Failures: a broken stream or a spire-agent that is down leaves the SVIDs and bundles in use
//! (valid until they expire) and reconnects with capped backoff. An update without the
//! workload's SVID (its entry deleted, or its selectors no longer matching) withdraws it: the
//! workload's slot is emptied, so handshakes for it fail, and its identity is treated as revoked
//! by this node, which closes the open HBONE connections that carry it. An SVID for it later
//! lifts that again.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, RwLock, atomic::Ordering},
    time::Duration,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spire_api::pb::spire::api::{
    agent::delegatedidentity::v1::{
        SubscribeToX509BundlesRequest, SubscribeToX509sviDsRequest, SubscribeToX509sviDsResponse,
        delegated_identity_client::DelegatedIdentityClient,
    },
    types::Selector,
};
use tokio_stream::StreamExt;
use tracing::{info, warn};

use super::settings::SelectorTemplate;
use super::{
    rotation::Renewal,
    spiffe::{SpiffeId, TrustDomain},
    svid::{LeafFacts, Svid},
    tls::SvidSlot,
    verify::TrustStore,
};
use crate::workload::Workload;

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SpireError {
    #[error("spire-agent admin socket {path}: {message}")]
    Connect { path: PathBuf, message: String },
    #[error("spire-agent: {0}")]
    Api(#[from] tonic::Status),
    #[error("SVID for {id} from spire-agent: {message}")]
    Svid { id: SpiffeId, message: String },
    #[error("trust bundle of {domain:?} from spire-agent: {message}")]
    Bundle { domain: String, message: String },
}

/// The node's spire-agent and what it has handed out: shared by the bundle task, every
/// workload's task and the trust state they feed.
pub struct SpireAgent {
    admin_socket: PathBuf,
    selectors: Vec<SelectorTemplate>,
    /// The bundles of the last update, by trust domain (`None` before the first).
    bundles: RwLock<Option<HashMap<TrustDomain, Vec<CertificateDer<'static>>>>>,
    /// Identities whose SVID SPIRE took back; refused as revoked while they stay withdrawn.
    withdrawn: RwLock<HashSet<SpiffeId>>,
    /// Counts withdrawals and rejected updates for the metrics.
    renewal: Renewal,
}

impl SpireAgent {
    pub fn new(
        admin_socket: PathBuf,
        selectors: Vec<SelectorTemplate>,
        renewal: Renewal,
    ) -> Arc<Self> {
        Arc::new(Self {
            admin_socket,
            selectors,
            bundles: RwLock::new(None),
            withdrawn: RwLock::new(HashSet::new()),
            renewal,
        })
    }

    /// A failed or rejected update (`zt_identity_issue_failures_total`).
    fn failed(&self) {
        self.renewal.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn bundles(&self) -> HashMap<TrustDomain, Vec<CertificateDer<'static>>> {
        read(&self.bundles).clone().unwrap_or_default()
    }

    pub fn withdrawn(&self) -> HashSet<SpiffeId> {
        read(&self.withdrawn).clone()
    }

    async fn client(
        &self,
    ) -> Result<DelegatedIdentityClient<tonic::transport::Channel>, SpireError> {
        let named = |message: String| SpireError::Connect {
            path: self.admin_socket.clone(),
            message,
        };
        let endpoint = ::spiffe::transport::Endpoint::parse(&format!(
            "unix://{}",
            self.admin_socket.display()
        ))
        .map_err(|e| named(e.to_string()))?;
        let channel = ::spiffe::transport::connector::connect(&endpoint)
            .await
            .map_err(|e| named(e.to_string()))?;
        Ok(DelegatedIdentityClient::new(channel))
    }

    /// The selectors `workload` is asked for by.
    fn selectors_of(&self, workload: &Workload) -> Vec<Selector> {
        self.selectors
            .iter()
            .map(|t| Selector {
                r#type: t.kind.clone(),
                value: t.value_for(workload),
            })
            .collect()
    }

    /// Follows the trust bundles for as long as the agent runs; `reload` rebuilds the trust
    /// state from them (with the revocation list) after each update.
    pub async fn follow_bundles(self: Arc<Self>, reload: impl Fn() + Send + 'static) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.bundle_stream(&reload, &mut backoff).await {
                Ok(()) => {
                    warn!(socket = %self.admin_socket.display(), "spire-agent ended the bundle stream; reconnecting")
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "trust bundles from spire-agent unavailable; keeping the current ones")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn bundle_stream(
        &self,
        reload: &impl Fn(),
        backoff: &mut Duration,
    ) -> Result<(), SpireError> {
        let mut stream = self
            .client()
            .await?
            .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest::default())
            .await?
            .into_inner();
        while let Some(update) = stream.next().await {
            let update = update?;
            *backoff = FIRST_BACKOFF;
            match parse_bundles(&update.ca_certificates) {
                Ok(bundles) => {
                    let domains: Vec<String> = bundles.keys().map(ToString::to_string).collect();
                    *write(&self.bundles) = Some(bundles);
                    info!(trust_domains = ?domains, "trust bundles from spire-agent");
                    reload();
                }
                // One bad bundle rejects the update: half a set would drop a trust domain.
                Err(e) => {
                    warn!(error = %e, "trust bundle update from spire-agent rejected; keeping the current bundles")
                }
            }
        }
        Ok(())
    }

    /// Keeps `slot` holding `id`'s SVID as SPIRE pushes it, for as long as the task runs.
    pub async fn follow_svid(
        self: Arc<Self>,
        id: SpiffeId,
        workload: Workload,
        slot: SvidSlot,
        trust: TrustStore,
        reload: impl Fn() + Send + Sync + 'static,
    ) {
        let selectors = self.selectors_of(&workload);
        // Un-enrolled (this task aborted): what it withdrew is no longer this node's to refuse.
        let _forget = Forget {
            spire: self.clone(),
            id: id.clone(),
            reload: Box::new(reload),
        };
        let reload = &*_forget.reload;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let result = self
                .svid_stream(&id, &selectors, &slot, &trust, reload, &mut backoff)
                .await;
            match result {
                Ok(()) => warn!(identity = %id, "spire-agent ended the SVID stream; reconnecting"),
                Err(e) => {
                    warn!(identity = %id, error = %e, retry_in = ?backoff, "SVID from spire-agent unavailable; keeping the current one")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn svid_stream(
        &self,
        id: &SpiffeId,
        selectors: &[Selector],
        slot: &SvidSlot,
        trust: &TrustStore,
        reload: &(dyn Fn() + Sync),
        backoff: &mut Duration,
    ) -> Result<(), SpireError> {
        let request = SubscribeToX509sviDsRequest {
            selectors: selectors.to_vec(),
            pid: 0,
        };
        let mut stream = self
            .client()
            .await?
            .subscribe_to_x509svi_ds(request)
            .await?
            .into_inner();
        // spire-agent may answer before its cache has the entries: an empty first update
        // withdraws nothing the workload never had.
        let mut first = true;
        while let Some(update) = stream.next().await {
            let update = update?;
            *backoff = FIRST_BACKOFF;
            match svid_of(&update, id) {
                Ok(Some(svid)) => {
                    if let Err(e) = chains(trust, &svid).await {
                        self.failed();
                        warn!(identity = %id, error = %e, "SVID from spire-agent does not chain to its trust bundle; not used");
                        continue;
                    }
                    if slot.serial().as_ref() != Some(&svid.leaf.serial) {
                        info!(identity = %id, serial = %svid.leaf.serial, expires = ?svid.leaf.not_after, "identity from spire-agent");
                        slot.replace(svid);
                    }
                    if write(&self.withdrawn).remove(id) {
                        info!(identity = %id, "identity issued again by spire-agent");
                        reload();
                    }
                }
                Ok(None) if first && slot.get().is_none() => {}
                Ok(None) => {
                    if slot.take().is_some() || !read(&self.withdrawn).contains(id) {
                        self.renewal.withdrawals.fetch_add(1, Ordering::Relaxed);
                        warn!(identity = %id, "spire-agent withdrew the workload's SVID (entry deleted or selectors no longer match): handshakes for it fail and its connections close");
                        write(&self.withdrawn).insert(id.clone());
                        reload();
                    }
                }
                Err(e) => {
                    warn!(error = %e, "SVID update from spire-agent rejected; keeping the current SVID")
                }
            }
            first = false;
        }
        Ok(())
    }
}

/// Lifts a withdrawal when the workload's task ends.
struct Forget {
    spire: Arc<SpireAgent>,
    id: SpiffeId,
    reload: Box<dyn Fn() + Send + Sync>,
}

impl Drop for Forget {
    fn drop(&mut self) {
        if write(&self.spire.withdrawn).remove(&self.id) {
            (self.reload)();
        }
    }
}

/// Whether `svid` chains to the current bundle of its trust domain. The bundle stream is
/// separate and may be a moment behind (the first SVID can come before the first bundle, or a
/// rotated CA's SVID before its new root): a failure waits for the next trust update, a few
/// times, before it counts.
async fn chains(trust: &TrustStore, svid: &Svid) -> Result<(), super::verify::VerifyError> {
    let mut changes = trust.subscribe();
    let mut attempts = 3;
    loop {
        match trust.verify_own(svid) {
            Ok(()) => return Ok(()),
            Err(e) if attempts == 0 => return Err(e),
            Err(_) => {
                attempts -= 1;
                let _ = tokio::time::timeout(Duration::from_secs(5), changes.changed()).await;
            }
        }
    }
}

/// The SVID for `id` in an update; `None` when the update has none for it.
fn svid_of(
    update: &SubscribeToX509sviDsResponse,
    id: &SpiffeId,
) -> Result<Option<Svid>, SpireError> {
    let origin = PathBuf::from("spire-agent");
    let bad = |message: String| SpireError::Svid {
        id: id.clone(),
        message,
    };
    // Another entry's SVID (the selectors matched several) is not this workload's business,
    // even a broken one; an unparsable leaf might have been this one's, so it is an error.
    let mut unreadable = None;
    for with_key in &update.x509_svids {
        let Some(x509) = &with_key.x509_svid else {
            continue;
        };
        let Some(first) = x509.cert_chain.first() else {
            continue;
        };
        match LeafFacts::parse(first) {
            Ok(leaf) if &leaf.id == id => {}
            Ok(_) => continue,
            Err(e) => {
                unreadable = Some(e.to_string());
                continue;
            }
        }
        let chain: Vec<CertificateDer<'static>> = x509
            .cert_chain
            .iter()
            .map(|c| CertificateDer::from(c.to_vec()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(with_key.x509_svid_key.to_vec()));
        return Svid::from_der(chain, key, &origin)
            .map(Some)
            .map_err(|e| bad(e.to_string()));
    }
    match unreadable {
        Some(message) => Err(bad(message)),
        None => Ok(None),
    }
}

/// Bundles keyed by trust domain (`spiffe://td` or `td`), each a run of DER certificates.
fn parse_bundles(
    raw: &HashMap<String, prost::bytes::Bytes>,
) -> Result<HashMap<TrustDomain, Vec<CertificateDer<'static>>>, SpireError> {
    let mut out = HashMap::new();
    for (domain, der) in raw {
        let bad = |message: String| SpireError::Bundle {
            domain: domain.clone(),
            message,
        };
        let td: TrustDomain = domain.parse().map_err(|e| bad(format!("{e}")))?;
        let mut roots = Vec::new();
        let mut rest: &[u8] = der;
        while !rest.is_empty() {
            let (after, _) = x509_parser::parse_x509_certificate(rest)
                .map_err(|e| bad(format!("certificate {}: {e}", roots.len() + 1)))?;
            let used = rest.len() - after.len();
            roots.push(CertificateDer::from(rest[..used].to_vec()));
            rest = after;
        }
        if roots.is_empty() {
            return Err(bad("no certificate".into()));
        }
        out.insert(td, roots);
    }
    Ok(out)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_are_runs_of_der_certificates_by_trust_domain() {
        let ca = |name: &str| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = rcgen::KeyPair::generate().unwrap();
            params.self_signed(&key).unwrap().der().to_vec()
        };
        let (a, b) = (ca("a"), ca("b"));
        let raw = HashMap::from([
            (
                "spiffe://cluster.local".to_owned(),
                prost::bytes::Bytes::from([a.clone(), b.clone()].concat()),
            ),
            ("other.org".to_owned(), prost::bytes::Bytes::from(a.clone())),
        ]);
        let bundles = parse_bundles(&raw).unwrap();
        let local: TrustDomain = "cluster.local".parse().unwrap();
        assert_eq!(bundles[&local].len(), 2);
        assert_eq!(bundles[&local][1].as_ref(), b.as_slice());
        assert_eq!(bundles.len(), 2);
        let broken = HashMap::from([(
            "cluster.local".to_owned(),
            prost::bytes::Bytes::from(a[..a.len() - 3].to_vec()),
        )]);
        let err = parse_bundles(&broken).unwrap_err().to_string();
        assert!(
            err.contains("cluster.local") && err.contains("certificate 1"),
            "{err}"
        );
    }

    /// A leaf for `id` and its PKCS#8 key, signed by a throwaway CA.
    fn leaf(id: &str) -> (Vec<u8>, Vec<u8>) {
        use rcgen::{CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = Issuer::new(ca, KeyPair::generate().unwrap());
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }

    fn update(svids: &[(Vec<u8>, Vec<u8>)]) -> SubscribeToX509sviDsResponse {
        use spire_api::pb::spire::api::{
            agent::delegatedidentity::v1::X509svidWithKey, types::X509svid,
        };
        SubscribeToX509sviDsResponse {
            x509_svids: svids
                .iter()
                .map(|(cert, key)| X509svidWithKey {
                    x509_svid: Some(X509svid {
                        cert_chain: vec![prost::bytes::Bytes::from(cert.clone())],
                        ..Default::default()
                    }),
                    x509_svid_key: prost::bytes::Bytes::from(key.clone()),
                })
                .collect(),
            federates_with: vec![],
        }
    }

    #[test]
    fn an_update_yields_the_workloads_own_svid_or_none_and_rejects_bad_ones() {
        let web: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let (web_cert, web_key) = leaf("spiffe://cluster.local/ns/shop/sa/web");
        let (db_cert, db_key) = leaf("spiffe://cluster.local/ns/shop/sa/db");
        // The selectors matched two entries: the workload's own SVID is the one taken (the
        // other's, broken here, is not this workload's concern).
        let both = update(&[
            (db_cert.clone(), db_key.clone()),
            (web_cert.clone(), web_key.clone()),
        ]);
        let svid = svid_of(&both, &web).unwrap().expect("web's SVID");
        assert_eq!(svid.id(), &web);
        // Only another identity's, or none at all: nothing for this workload (a withdrawal).
        assert!(
            svid_of(&update(&[(db_cert, db_key.clone())]), &web)
                .unwrap()
                .is_none()
        );
        assert!(svid_of(&update(&[]), &web).unwrap().is_none());
        // A key that is not the certificate's, or a certificate that does not parse: refused,
        // naming the identity.
        let mismatched = update(&[(web_cert.clone(), db_key)]);
        let err = svid_of(&mismatched, &web).unwrap_err().to_string();
        assert!(err.contains("ns/shop/sa/web"), "{err}");
        let garbled = update(&[(web_cert[..web_cert.len() / 2].to_vec(), web_key)]);
        assert!(svid_of(&garbled, &web).is_err());
    }
}
