//! X.509-SVIDs: a workload's certificate chain and key, and what its leaf says. The leaf rules of
//! the SPIFFE X.509-SVID specification are checked in one place (`LeafFacts`), for the
//! certificates we load and for the peers we verify alike.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use x509_parser::{extensions::GeneralName, prelude::*};

use super::spiffe::{SpiffeId, SpiffeIdError};

/// Why a certificate is not a usable X.509-SVID leaf.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeafError {
    #[error("not a parsable X.509 certificate: {0}")]
    Unparsable(String),
    #[error("no URI SAN: an SVID carries exactly one spiffe:// URI")]
    NoUriSan,
    #[error("DNS SAN only: an SVID carries exactly one spiffe:// URI")]
    DnsSanOnly,
    #[error("{0} URI SANs: an SVID carries exactly one")]
    MultipleUriSans(usize),
    #[error("URI SAN {uri:?} is not a SPIFFE ID: {error}")]
    NotSpiffe { uri: String, error: SpiffeIdError },
    #[error("SPIFFE ID {0} has no path: a leaf SVID names a workload, not its trust domain")]
    TrustDomainId(SpiffeId),
    #[error("a CA certificate used as a leaf")]
    CaAsLeaf,
    #[error("leaf may sign certificates or CRLs (keyCertSign/cRLSign)")]
    LeafCanSign,
}

/// What the verifier and the loaders need to know about a leaf.
#[derive(Debug, Clone)]
pub struct LeafFacts {
    pub id: SpiffeId,
    /// Serial number, lowercase hex without leading zeros.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Issuer and subject are the same name.
    pub self_issued: bool,
}

impl LeafFacts {
    pub fn parse(der: &[u8]) -> Result<Self, LeafError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| LeafError::Unparsable(e.to_string()))?;
        let mut uris = Vec::new();
        let mut dns = 0;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    GeneralName::DNSName(_) => dns += 1,
                    _ => {}
                }
            }
        }
        let uri = match uris.len() {
            0 if dns > 0 => return Err(LeafError::DnsSanOnly),
            0 => return Err(LeafError::NoUriSan),
            1 => uris.remove(0),
            n => return Err(LeafError::MultipleUriSans(n)),
        };
        let id = uri
            .parse::<SpiffeId>()
            .map_err(|error| LeafError::NotSpiffe { uri, error })?;
        if cert.is_ca() {
            return Err(LeafError::CaAsLeaf);
        }
        if let Ok(Some(ku)) = cert.key_usage()
            && (ku.value.key_cert_sign() || ku.value.crl_sign())
        {
            return Err(LeafError::LeafCanSign);
        }
        // X.509-SVID 5.2: a leaf's ID has a non-root path (a CA's is the bare trust domain).
        if id.path().is_empty() {
            return Err(LeafError::TrustDomainId(id));
        }
        Ok(Self {
            id,
            serial: normalize_serial(&cert.raw_serial_as_string()),
            not_before: to_time(cert.validity().not_before),
            not_after: to_time(cert.validity().not_after),
            self_issued: cert.issuer() == cert.subject(),
        })
    }
}

/// When any certificate (a chain's intermediate, say) stops being valid; `None` if unreadable.
pub fn not_after(der: &[u8]) -> Option<SystemTime> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, cert)| to_time(cert.validity().not_after))
}

fn to_time(t: ASN1Time) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
}

/// Serial numbers compare as lowercase hex without separators or leading zeros.
pub fn normalize_serial(s: &str) -> String {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Leaf { path: PathBuf, source: LeafError },
    #[error("{path}: private key does not match the certificate: {message}")]
    KeyMismatch { path: PathBuf, message: String },
}

/// A workload's X.509-SVID: chain (leaf first) and private key, ready for rustls.
#[derive(Debug, Clone)]
pub struct Svid {
    pub leaf: LeafFacts,
    certified: Arc<CertifiedKey>,
}

impl Svid {
    /// Builds an SVID from DER; `origin` names where it came from in errors.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        origin: &Path,
    ) -> Result<Self, SvidError> {
        let first = chain.first().ok_or_else(|| SvidError::Pem {
            path: origin.to_owned(),
            message: "no certificate".into(),
        })?;
        let leaf = LeafFacts::parse(first).map_err(|source| SvidError::Leaf {
            path: origin.to_owned(),
            source,
        })?;
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let certified =
            CertifiedKey::from_der(chain, key, &provider).map_err(|e| SvidError::KeyMismatch {
                path: origin.to_owned(),
                message: e.to_string(),
            })?;
        Ok(Self {
            leaf,
            certified: Arc::new(certified),
        })
    }

    /// Loads a PEM chain and a PEM key, naming the offending file in every error.
    pub fn from_pem_files(cert_path: &Path, key_path: &Path) -> Result<Self, SvidError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| SvidError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let pem_err = |path: &Path, e: rustls::pki_types::pem::Error| SvidError::Pem {
            path: path.to_owned(),
            message: format!("malformed PEM: {e}"),
        };
        let cert_pem = read(cert_path)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert_path, e))?;
        let key_pem = read(key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_err(key_path, e))?;
        Self::from_der(chain, key, cert_path).map_err(|e| match e {
            SvidError::KeyMismatch { message, .. } => SvidError::KeyMismatch {
                path: key_path.to_owned(),
                message,
            },
            other => other,
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.leaf.id
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// What rustls presents for this workload.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// When to renew: half way through the lifetime (jitter is added by the caller).
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .leaf
            .not_after
            .duration_since(self.leaf.not_before)
            .unwrap_or_default();
        self.leaf.not_before + life / 2
    }

    pub fn chain_pem(&self) -> String {
        self.chain().iter().map(|c| pem("CERTIFICATE", c)).collect()
    }
}

/// PEM-encodes one DER object.
pub fn pem(label: &str, der: &[u8]) -> String {
    ::pem::encode(&::pem::Pem::new(label, der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_normalize() {
        assert_eq!(normalize_serial("00:1A:2b"), "1a2b");
        assert_eq!(normalize_serial("0"), "0");
        assert_eq!(normalize_serial("00"), "0");
    }

    #[test]
    fn pem_round_trips() {
        let der: Vec<u8> = (0..=255).collect();
        let text = pem("CERTIFICATE", &der);
        let back = CertificateDer::from_pem_slice(text.as_bytes()).unwrap();
        assert_eq!(back.as_ref(), der.as_slice());
    }
}
