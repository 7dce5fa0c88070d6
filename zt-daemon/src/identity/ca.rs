//! The `builtin` issuer: a P-256 root CA kept in two files (ca.pem, ca-key.pem), which issues
//! X.509-SVIDs for the workloads enrolled on this node. For demos and single clusters; larger
//! meshes bring their own issuer through the `files` provider.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData as _, SanType,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};

use super::{
    spiffe::{SpiffeId, TrustDomain},
    svid::{Svid, SvidError},
};

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Root validity: long, because rotating it means a bundle overlap (documented in README).
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issued certificates start slightly in the past to tolerate clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("cannot issue for {id}: this CA serves trust domain {trust_domain}")]
    WrongTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(transparent)]
    Svid(#[from] SvidError),
}

pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// The root that signs.
    root: CertificateDer<'static>,
    /// Every root of ca.pem, the signing one included: during a root rotation the old and the
    /// new are both trusted while the nodes move from one key to the other.
    bundle: Vec<CertificateDer<'static>>,
}

fn file_err(path: &Path, message: impl ToString) -> CaError {
    CaError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .expect("system randomness");
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

impl CertificateAuthority {
    /// A new self-signed root for `trust_domain`.
    pub fn generate(trust_domain: TrustDomain) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "zt");
        dn.push(DnType::CommonName, format!("zt root CA for {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_TTL).into();
        params.serial_number = Some(random_serial());
        let root = params.self_signed(&key)?.der().clone();
        Ok(Self {
            trust_domain,
            issuer: Issuer::new(params, key),
            bundle: vec![root.clone()],
            root,
        })
    }

    /// Writes ca.pem and ca-key.pem (mode 0600) into `dir`; never overwrites.
    pub fn write(&self, dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(file_err(p, "already exists; refusing to overwrite a CA"));
            }
        }
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut key_file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(|e| file_err(&key_path, e))?;
        key_file
            .write_all(self.issuer.key().serialize_pem().as_bytes())
            .map_err(|e| file_err(&key_path, e))?;
        std::fs::write(&cert_path, self.bundle_pem()).map_err(|e| file_err(&cert_path, e))
    }

    /// Loads a CA written by [`Self::write`] (or any P-256 CA cert and PKCS#8 key). ca.pem may
    /// hold several roots of the trust domain (a root rotation): all are trusted, and the one
    /// whose key is ca-key.pem signs.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = std::fs::read(&cert_path).map_err(|e| file_err(&cert_path, e))?;
        let bundle = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err(&cert_path, format!("malformed PEM: {e}")))?;
        if bundle.is_empty() {
            return Err(file_err(&cert_path, "holds no certificate"));
        }
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| file_err(&key_path, e))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| file_err(&key_path, format!("not a usable private key: {e}")))?;
        let mut trust_domain: Option<TrustDomain> = None;
        let mut signer = None;
        for (i, root) in bundle.iter().enumerate() {
            let at =
                |message: &str| file_err(&cert_path, format!("certificate {}: {message}", i + 1));
            let (_, parsed) = x509_parser::parse_x509_certificate(root)
                .map_err(|e| at(&format!("not a certificate: {e}")))?;
            if !parsed.is_ca() {
                return Err(at("not a CA certificate"));
            }
            let domain: TrustDomain = parsed
                .subject_alternative_name()
                .ok()
                .flatten()
                .and_then(|san| {
                    san.value.general_names.iter().find_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => u.parse().ok(),
                        _ => None,
                    })
                })
                .ok_or_else(|| at("carries no spiffe://<trust domain> URI SAN"))?;
            match &trust_domain {
                Some(first) if *first != domain => {
                    return Err(at(&format!(
                        "serves trust domain {domain}, the first serves {first}"
                    )));
                }
                _ => trust_domain = Some(domain),
            }
            if signer.is_none()
                && parsed.public_key().raw == key.subject_public_key_info().as_slice()
            {
                signer = Some(root.clone());
            }
        }
        let (Some(trust_domain), Some(root)) = (trust_domain, signer) else {
            return Err(file_err(
                &key_path,
                format!(
                    "private key matches none of the {} CA certificates of {}",
                    bundle.len(),
                    cert_path.display()
                ),
            ));
        };
        let issuer = Issuer::from_ca_cert_der(&root, key)
            .map_err(|e| file_err(&cert_path, format!("unusable CA certificate: {e}")))?;
        Ok(Self {
            trust_domain,
            issuer,
            root,
            bundle,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root that signs.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Every root this CA's trust domain trusts (the signing one among them).
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The trust bundle for this CA's trust domain, as PEM.
    pub fn bundle_pem(&self) -> String {
        self.bundle
            .iter()
            .map(|root| super::svid::pem("CERTIFICATE", root))
            .collect()
    }

    /// Signs arbitrary certificate parameters with this CA (tests craft bad certificates with it).
    pub fn sign(
        &self,
        params: &CertificateParams,
        key: &KeyPair,
    ) -> Result<CertificateDer<'static>, CaError> {
        Ok(params.signed_by(key, &self.issuer)?.der().clone())
    }

    /// Issues an X.509-SVID for `id`, valid for `ttl` (SPIFFE X.509-SVID rules: one URI SAN,
    /// cA=false, keyUsage digitalSignature critical, EKU serverAuth + clientAuth, P-256).
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, CaError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(CaError::WrongTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE.min(ttl / 2)).into();
        params.not_after = (now + ttl).into();
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(Svid::from_der(
            vec![cert.der().clone()],
            key_der,
            Path::new("<issued in memory>"),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, roots: &[&CertificateAuthority], key_of: &CertificateAuthority) {
        std::fs::create_dir_all(dir).unwrap();
        let pem: String = roots.iter().map(|ca| ca.bundle_pem()).collect();
        std::fs::write(dir.join(CA_CERT_FILE), pem).unwrap();
        std::fs::write(dir.join(CA_KEY_FILE), key_of.issuer.key().serialize_pem()).unwrap();
    }

    #[test]
    fn a_bundle_of_several_roots_trusts_them_all_and_signs_with_the_keys_own() {
        let td: TrustDomain = "td".parse().unwrap();
        let (old, new) = (
            CertificateAuthority::generate(td.clone()).unwrap(),
            CertificateAuthority::generate(td.clone()).unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        // Mid-rotation: both roots, the new key.
        write(dir.path(), &[&old, &new], &new);
        let ca = CertificateAuthority::load(dir.path()).unwrap();
        assert_eq!(ca.root(), new.root());
        assert_eq!(ca.bundle(), [old.root().clone(), new.root().clone()]);
        assert_eq!(ca.bundle_pem(), old.bundle_pem() + &new.bundle_pem());
        let id: SpiffeId = "spiffe://td/ns/shop/sa/web".parse().unwrap();
        let svid = ca.issue(&id, Duration::from_secs(60)).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&svid.chain()[0]).unwrap();
        let (_, signer) = x509_parser::parse_x509_certificate(new.root()).unwrap();
        assert_eq!(leaf.issuer(), signer.subject());
        assert!(leaf.verify_signature(Some(signer.public_key())).is_ok());

        // A key that matches no root, and roots of two trust domains, are refused by name.
        let stranger = CertificateAuthority::generate(td).unwrap();
        write(dir.path(), &[&old, &new], &stranger);
        let err = CertificateAuthority::load(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("private key matches none of the 2 CA certificates"),
            "{err}"
        );
        let other = CertificateAuthority::generate("other.org".parse().unwrap()).unwrap();
        write(dir.path(), &[&old, &other], &old);
        let err = CertificateAuthority::load(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("ca.pem: certificate 2: serves trust domain other.org"),
            "{err}"
        );
    }
}
