//! What an established tunnel connection was authenticated with, on both sides. A connection
//! takes new streams only while both certificates are valid, unexpired and not revoked: each side
//! checks (`server` sends GOAWAY, `pool` stops reusing) and closes at once on a revocation.
use std::{
    sync::{Arc, Mutex, Weak},
    time::SystemTime,
};

use rustls::pki_types::CertificateDer;

use crate::identity::{
    spiffe::SpiffeId,
    svid::{self, LeafFacts, Svid},
    verify::TrustState,
};

/// One certificate of an established connection.
#[derive(Debug, Clone)]
pub struct SessionCertificate {
    pub id: SpiffeId,
    pub serial: String,
    pub not_after: SystemTime,
    /// The chain as it was presented (leaf first), re-checked when trust bundles change; empty
    /// only when built from a leaf's facts alone.
    pub chain: Arc<[CertificateDer<'static>]>,
    /// When the chain's first certificate expires (the leaf or an intermediate).
    chain_not_after: SystemTime,
    /// The trust state under which `chain` last verified. A pooled connection is checked at
    /// every reuse; verifying signatures again only when the bundles change keeps that cheap.
    /// Weak, so a state's address cannot be reused by a later one while this is held.
    verified_under: Arc<Mutex<Weak<TrustState>>>,
}

impl From<&LeafFacts> for SessionCertificate {
    fn from(leaf: &LeafFacts) -> Self {
        Self {
            id: leaf.id.clone(),
            serial: leaf.serial.clone(),
            not_after: leaf.not_after,
            chain: Arc::new([]),
            chain_not_after: leaf.not_after,
            verified_under: Arc::default(),
        }
    }
}

impl SessionCertificate {
    /// The peer's side: its leaf, and the chain it presented.
    pub fn peer(leaf: &LeafFacts, chain: &[CertificateDer<'_>]) -> Self {
        let chain_not_after = chain
            .iter()
            .skip(1)
            // An unreadable intermediate fails verification anyway: never cache it.
            .map(|c| svid::not_after(c).unwrap_or(SystemTime::UNIX_EPOCH))
            .fold(leaf.not_after, SystemTime::min);
        Self {
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            chain_not_after,
            ..Self::from(leaf)
        }
    }

    /// Whether the chain still leads to its trust bundle under `trust` at `now`: verified once
    /// per trust state, and again when a certificate of the chain has expired since.
    fn still_chains(&self, trust: &Arc<TrustState>, now: SystemTime) -> bool {
        let mut verified_under = self
            .verified_under
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if now < self.chain_not_after
            && verified_under
                .upgrade()
                .is_some_and(|v| Arc::ptr_eq(&v, trust))
        {
            return true;
        }
        let trusted = trust.still_trusts(&self.id, &self.chain);
        *verified_under = if trusted {
            Arc::downgrade(trust)
        } else {
            Weak::new()
        };
        trusted
    }
}

impl From<&Svid> for SessionCertificate {
    /// One of this node's workloads' certificates, with its chain: re-checked like a peer's, so
    /// that a root dropped from the bundle retires a connection whichever side it signed (a
    /// same-node connection has only such sides).
    fn from(svid: &Svid) -> Self {
        Self::peer(&svid.leaf, svid.chain())
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

    /// When the first certificate the connection rests on expires: either leaf, or an
    /// intermediate of the peer's chain (the chain then no longer verifies).
    pub fn expiry(&self) -> SystemTime {
        self.local.chain_not_after.min(self.peer.chain_not_after)
    }

    /// The expiry of the first of the two to expire (a side whose intermediate expires first
    /// counts as that side's).
    pub fn first_to_expire(&self) -> Retired {
        let (side, cert) = self
            .sides()
            .into_iter()
            .min_by_key(|(_, c)| c.chain_not_after)
            .unwrap_or(("peer", &self.peer));
        Retired::Expired {
            side,
            id: cert.id.clone(),
        }
    }

    /// Whether the connection may still take new streams at `now` under `trust`.
    pub fn check(&self, trust: &Arc<TrustState>, now: SystemTime) -> Result<(), Retired> {
        for (side, cert) in self.sides() {
            if trust.revoked(&cert.id, &cert.serial).is_some() {
                return Err(Retired::Revoked {
                    side,
                    id: cert.id.clone(),
                });
            }
        }
        // An intermediate that expired before its leaf ends the chain as the leaf would: no new
        // streams, and those in flight finish (not the abrupt close of an untrusted chain).
        for (side, cert) in self.sides() {
            if now >= cert.chain_not_after {
                return Err(Retired::Expired {
                    side,
                    id: cert.id.clone(),
                });
            }
        }
        for (side, cert) in self.sides() {
            if !cert.still_chains(trust, now) {
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

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use super::*;
    use crate::identity::{ca::CertificateAuthority, revocation::RevocationList};

    fn trusting(ca: &CertificateAuthority) -> Arc<TrustState> {
        let bundles = HashMap::from([(ca.trust_domain().clone(), vec![ca.root().clone()])]);
        Arc::new(TrustState::new(bundles, RevocationList::default()).unwrap())
    }

    #[test]
    fn a_peer_chain_is_judged_by_the_trust_state_in_force_not_by_an_earlier_verdict() {
        let ca = CertificateAuthority::generate("td".parse().unwrap()).unwrap();
        let other = CertificateAuthority::generate("td".parse().unwrap()).unwrap();
        let id: SpiffeId = "spiffe://td/ns/shop/sa/db".parse().unwrap();
        let svid = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let certificates = SessionCertificates {
            local: SessionCertificate::from(&svid),
            peer: SessionCertificate::peer(&svid.leaf, svid.chain()),
        };
        let (issuer, rotated) = (trusting(&ca), trusting(&other));
        let now = SystemTime::now();
        assert_eq!(certificates.check(&issuer, now), Ok(()));
        assert_eq!(certificates.check(&issuer, now), Ok(()));
        // A bundle without the issuer's root: the earlier verdict does not carry over.
        assert_eq!(
            certificates.check(&rotated, now),
            Err(Retired::Untrusted {
                side: "peer",
                id: id.clone()
            })
        );
        assert_eq!(certificates.check(&issuer, now), Ok(()));
        // Our own side is judged the same way: a same-node connection has two such sides.
        let own = SessionCertificates {
            local: SessionCertificate::from(&svid),
            peer: SessionCertificate::from(&svid),
        };
        assert_eq!(own.check(&issuer, now), Ok(()));
        assert_eq!(
            own.check(&rotated, now),
            Err(Retired::Untrusted {
                side: "peer",
                id: id.clone()
            })
        );
        let one_own = SessionCertificates {
            local: SessionCertificate::from(&svid),
            peer: SessionCertificate::from(&svid.leaf),
        };
        assert_eq!(
            one_own.check(&rotated, now),
            Err(Retired::Untrusted {
                side: "local",
                id: id.clone()
            })
        );
        // An equal state built anew is judged afresh, and passes.
        assert_eq!(certificates.check(&trusting(&ca), now), Ok(()));
        // Past the chain's end, the leaf's expiry decides.
        assert!(matches!(
            certificates.check(&issuer, now + Duration::from_secs(7200)),
            Err(Retired::Expired { .. })
        ));
    }

    #[test]
    fn a_connection_expires_with_the_first_certificate_of_the_peers_chain() {
        let now = SystemTime::now();
        let leaf = LeafFacts {
            id: "spiffe://td/ns/shop/sa/db".parse().unwrap(),
            serial: "01".into(),
            not_before: now,
            not_after: now + Duration::from_secs(3600),
            self_issued: false,
        };
        // An intermediate that ends before the leaf it signed.
        let mut params = rcgen::CertificateParams::default();
        params.not_after = (now + Duration::from_secs(600)).into();
        let key = rcgen::KeyPair::generate().unwrap();
        let intermediate = params.self_signed(&key).unwrap().der().clone();
        let local = SessionCertificate::from(&LeafFacts {
            not_after: now + Duration::from_secs(7200),
            ..leaf.clone()
        });
        let certificates = SessionCertificates {
            local,
            peer: SessionCertificate::peer(&leaf, &[intermediate.clone(), intermediate]),
        };
        let ends = certificates.expiry().duration_since(now).unwrap();
        assert!(ends <= Duration::from_secs(600), "{ends:?}");
        assert_eq!(
            certificates.first_to_expire(),
            Retired::Expired {
                side: "peer",
                id: leaf.id.clone()
            }
        );
    }
}
