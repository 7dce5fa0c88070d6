//! What an established tunnel connection was authenticated with, on both sides. A connection
//! takes new streams only while both certificates are valid, unexpired and not revoked: each side
//! checks (`server` sends GOAWAY, `pool` stops reusing) and closes at once on a revocation.
use std::{sync::Arc, time::SystemTime};

use rustls::pki_types::CertificateDer;

use crate::identity::{
    spiffe::SpiffeId,
    svid::{LeafFacts, Svid},
    verify::TrustState,
};

/// One certificate of an established connection.
#[derive(Debug, Clone)]
pub struct SessionCertificate {
    pub id: SpiffeId,
    pub serial: String,
    pub not_after: SystemTime,
    /// The peer's chain as it presented it (leaf first), re-checked when trust bundles change;
    /// empty for our own side.
    pub chain: Arc<[CertificateDer<'static>]>,
}

impl From<&LeafFacts> for SessionCertificate {
    fn from(leaf: &LeafFacts) -> Self {
        Self {
            id: leaf.id.clone(),
            serial: leaf.serial.clone(),
            not_after: leaf.not_after,
            chain: Arc::new([]),
        }
    }
}

impl SessionCertificate {
    /// The peer's side: its leaf, and the chain it presented.
    pub fn peer(leaf: &LeafFacts, chain: &[CertificateDer<'_>]) -> Self {
        Self {
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            ..Self::from(leaf)
        }
    }
}

impl From<&Svid> for SessionCertificate {
    fn from(svid: &Svid) -> Self {
        Self::from(&svid.leaf)
    }
}

/// Why a connection must take no new streams.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Retired {
    #[error("the {side} certificate ({id}) expired")]
    Expired { side: &'static str, id: SpiffeId },
    #[error("the {side} certificate ({id}) is revoked")]
    Revoked { side: &'static str, id: SpiffeId },
    #[error("the {side} certificate ({id}) no longer chains to its trust bundle")]
    Untrusted { side: &'static str, id: SpiffeId },
}

impl Retired {
    /// The `zt_tls_handshake_failures_total` reason a handshake refused for this gets.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Expired { .. } => "expired",
            Self::Revoked { .. } => "revoked",
            Self::Untrusted { .. } => "untrusted_issuer",
        }
    }

    /// Whether the connection must close now (not just take no new streams).
    pub fn closes_now(&self) -> bool {
        matches!(self, Self::Revoked { .. } | Self::Untrusted { .. })
    }
}

/// Both certificates a connection was authenticated with.
#[derive(Debug, Clone)]
pub struct SessionCertificates {
    /// What this agent presented for its workload (read before the handshake: a rotation during
    /// it only makes the real one live longer than this says).
    pub local: SessionCertificate,
    pub peer: SessionCertificate,
}

impl SessionCertificates {
    fn sides(&self) -> [(&'static str, &SessionCertificate); 2] {
        [("peer", &self.peer), ("local", &self.local)]
    }

    /// When the first of the two expires.
    pub fn expiry(&self) -> SystemTime {
        self.local.not_after.min(self.peer.not_after)
    }

    /// The expiry of the first of the two to expire.
    pub fn first_to_expire(&self) -> Retired {
        let (side, cert) = self
            .sides()
            .into_iter()
            .min_by_key(|(_, c)| c.not_after)
            .unwrap_or(("peer", &self.peer));
        Retired::Expired {
            side,
            id: cert.id.clone(),
        }
    }

    /// Whether the connection may still take new streams at `now` under `trust`.
    pub fn check(&self, trust: &TrustState, now: SystemTime) -> Result<(), Retired> {
        for (side, cert) in self.sides() {
            if trust.revoked(&cert.id, &cert.serial).is_some() {
                return Err(Retired::Revoked {
                    side,
                    id: cert.id.clone(),
                });
            }
        }
        for (side, cert) in self.sides() {
            if now >= cert.not_after {
                return Err(Retired::Expired {
                    side,
                    id: cert.id.clone(),
                });
            }
        }
        for (side, cert) in self.sides() {
            if !trust.still_trusts(&cert.id, &cert.chain) {
                return Err(Retired::Untrusted {
                    side,
                    id: cert.id.clone(),
                });
            }
        }
        Ok(())
    }
}

/// A tokio deadline for a wall-clock time (now, if it has passed).
pub fn deadline(at: SystemTime) -> tokio::time::Instant {
    tokio::time::Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default()
}
