//! Verifying peers' X.509-SVIDs in TLS handshakes, on both sides (rustls custom verifiers).
//!
//! A peer certificate passes when: it is an SVID leaf (exactly one spiffe:// URI SAN, not a CA,
//! no keyCertSign/cRLSign); it is within its validity period; it chains to the trust bundle of
//! its own trust domain (bundles are never merged); it is not revoked; and, where the caller
//! knows whom it is calling, it is that identity. Each failure has its own readable reason.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::sync::watch;

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, aws_lc_rs},
    pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

use super::{
    revocation::{RevocationList, Revoked},
    spiffe::{SpiffeId, TrustDomain},
    svid::{LeafError, LeafFacts},
};

/// Why a peer's certificate was refused.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Leaf(#[from] LeafError),
    #[error("certificate expired at {0}")]
    Expired(String),
    #[error("certificate not yet valid (from {0})")]
    NotYetValid(String),
    #[error("self-signed certificate for {0}")]
    SelfSigned(SpiffeId),
    #[error("no trust bundle for trust domain {0}")]
    UnknownTrustDomain(TrustDomain),
    #[error("not issued by the trust bundle of {trust_domain}: {detail}")]
    UntrustedIssuer {
        trust_domain: TrustDomain,
        detail: String,
    },
    #[error("identity {0} is revoked")]
    RevokedIdentity(SpiffeId),
    #[error("certificate serial {serial} of {id} is revoked")]
    RevokedSerial { id: SpiffeId, serial: String },
    #[error("server is {got}, expected {expected}")]
    UnexpectedIdentity { expected: SpiffeId, got: SpiffeId },
}

/// rustls shows a custom verifier error with `{:?}`; make that the readable message.
impl std::fmt::Debug for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl VerifyError {
    /// A short, stable label for metrics (`zt_tls_handshake_failures_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Leaf(_) => "not_an_svid",
            Self::Expired(_) => "expired",
            Self::NotYetValid(_) => "not_yet_valid",
            Self::SelfSigned(_) => "self_signed",
            Self::UnknownTrustDomain(_) => "unknown_trust_domain",
            Self::UntrustedIssuer { .. } => "untrusted_issuer",
            Self::RevokedIdentity(_) | Self::RevokedSerial { .. } => "revoked",
            Self::UnexpectedIdentity { .. } => "unexpected_identity",
        }
    }
}

/// Trust bundles per trust domain, and the revocation list. Replaced as a whole on reload, so a
/// handshake always sees one consistent state.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TrustState {
    bundles: HashMap<TrustDomain, Vec<TrustAnchor<'static>>>,
    revoked: RevocationList,
}

impl TrustState {
    /// `bundles` maps each trust domain to its root certificates.
    pub fn new(
        bundles: HashMap<TrustDomain, Vec<CertificateDer<'static>>>,
        revoked: RevocationList,
    ) -> Result<Self, String> {
        let mut anchors = HashMap::new();
        for (td, roots) in bundles {
            let mut list = Vec::new();
            for root in roots {
                let anchor = webpki::anchor_from_trusted_cert(&root)
                    .map_err(|e| format!("trust bundle of {td}: unusable root: {e}"))?
                    .to_owned();
                list.push(anchor);
            }
            anchors.insert(td, list);
        }
        Ok(Self {
            bundles: anchors,
            revoked,
        })
    }
}

impl TrustState {
    /// Whether a peer already connected is now revoked (used to close live connections).
    pub fn revoked(&self, id: &SpiffeId, serial: &str) -> Option<Revoked> {
        self.revoked.check(id, serial)
    }
}

/// Shared, hot-swappable trust state used by every verifier. Subscribers are told of every
/// replacement, so the tunnel can close live connections of a newly revoked identity.
#[derive(Debug, Clone)]
pub struct TrustStore(Arc<watch::Sender<Arc<TrustState>>>);

impl Default for TrustStore {
    fn default() -> Self {
        Self::new(TrustState::default())
    }
}

impl TrustStore {
    pub fn new(state: TrustState) -> Self {
        Self(Arc::new(watch::Sender::new(Arc::new(state))))
    }

    pub fn replace(&self, state: TrustState) {
        self.0.send_replace(Arc::new(state));
    }

    /// The current state, then every replacement.
    pub fn subscribe(&self) -> watch::Receiver<Arc<TrustState>> {
        self.0.subscribe()
    }

    pub fn current(&self) -> Arc<TrustState> {
        self.0.borrow().clone()
    }

    /// Whether one of our own SVIDs (from an outside issuer) chains to its trust domain's bundle
    /// and is within validity. Revocation is not asked: it is for the peers to apply.
    pub fn verify_own(&self, svid: &super::svid::Svid) -> Result<(), VerifyError> {
        let chain = svid.chain();
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| VerifyError::Leaf(LeafError::Unparsable("empty chain".into())))?;
        match self.verify(
            leaf,
            intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        ) {
            Ok(_) | Err(VerifyError::RevokedIdentity(_) | VerifyError::RevokedSerial { .. }) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Verifies a peer's chain for `usage`; returns the peer's SPIFFE ID.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, VerifyError> {
        let leaf = LeafFacts::parse(end_entity)?;
        let now_t = UNIX_EPOCH + Duration::from_secs(now.as_secs());
        if now_t < leaf.not_before {
            return Err(VerifyError::NotYetValid(rfc3339(leaf.not_before)));
        }
        if now_t > leaf.not_after {
            return Err(VerifyError::Expired(rfc3339(leaf.not_after)));
        }
        if leaf.self_issued {
            return Err(VerifyError::SelfSigned(leaf.id));
        }
        let state = self.current();
        let td = leaf.id.trust_domain();
        let anchors = state
            .bundles
            .get(td)
            .ok_or_else(|| VerifyError::UnknownTrustDomain(td.clone()))?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| VerifyError::Leaf(LeafError::Unparsable(e.to_string())))?;
        cert.verify_for_usage(
            algorithms().all,
            anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| VerifyError::UntrustedIssuer {
            trust_domain: td.clone(),
            detail: format!("{e:?}"),
        })?;
        match state.revoked.check(&leaf.id, &leaf.serial) {
            Some(Revoked::Identity(id)) => Err(VerifyError::RevokedIdentity(id)),
            Some(Revoked::Serial(serial)) => Err(VerifyError::RevokedSerial {
                id: leaf.id,
                serial,
            }),
            None => Ok(leaf.id),
        }
    }
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    aws_lc_rs::default_provider().signature_verification_algorithms
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

fn to_rustls(e: VerifyError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

/// The inbound side: requires a client SVID and verifies it.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    trust: TrustStore,
}

impl SpiffeClientVerifier {
    pub fn new(trust: TrustStore) -> Arc<Self> {
        Arc::new(Self { trust })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust
            .verify(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
            )
            .map(|_| ClientCertVerified::assertion())
            .map_err(to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// The outbound side: verifies the server's SVID and, when known, that it is `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: TrustStore,
    expected: Option<SpiffeId>,
}

impl SpiffeServerVerifier {
    pub fn new(trust: TrustStore, expected: Option<SpiffeId>) -> Arc<Self> {
        Arc::new(Self { trust, expected })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = self
            .trust
            .verify(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
            )
            .map_err(to_rustls)?;
        match &self.expected {
            Some(expected) if *expected != got => Err(to_rustls(VerifyError::UnexpectedIdentity {
                expected: expected.clone(),
                got,
            })),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
