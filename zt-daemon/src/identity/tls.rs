//! rustls configurations for the tunnel: TLS 1.3 only, mutual, SPIFFE-verified on both sides,
//! presenting whatever SVID a workload's `SvidSlot` holds at handshake time, so rotation takes
//! effect on the next handshake without touching established connections.
use std::sync::{Arc, RwLock};

use rustls::{
    ClientConfig, ServerConfig, SignatureScheme,
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::{
    spiffe::SpiffeId,
    svid::Svid,
    verify::{SpiffeClientVerifier, SpiffeServerVerifier, TrustStore},
};

/// ALPN of the HBONE tunnel.
pub const ALPN_H2: &[u8] = b"h2";

/// The current SVID of one workload; replaced on rotation. Empty until the first issuance
/// succeeds, and then handshakes for the workload fail rather than present nothing valid.
#[derive(Debug, Clone, Default)]
pub struct SvidSlot(Arc<RwLock<Option<Svid>>>);

impl SvidSlot {
    pub fn new(svid: Svid) -> Self {
        Self(Arc::new(RwLock::new(Some(svid))))
    }

    pub fn get(&self) -> Option<Svid> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Serial of the current certificate.
    pub fn serial(&self) -> Option<String> {
        self.get().map(|s| s.leaf.serial)
    }

    /// Empties the slot (the issuer withdrew the SVID); returns what it held.
    pub fn take(&self) -> Option<Svid> {
        self.0.write().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn replace(&self, svid: Svid) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(svid);
    }

    fn certified(&self) -> Option<Arc<CertifiedKey>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Svid::certified_key)
    }
}

impl ResolvesServerCert for SvidSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certified()
    }
}

impl ResolvesClientCert for SvidSlot {
    fn resolve(
        &self,
        _issuers: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.certified()
    }

    fn has_certs(&self) -> bool {
        self.certified().is_some()
    }
}

/// aws-lc-rs for the handshake (key exchange and signatures, 1.1× faster than ring here) with
/// ring's AES-GCM and ChaCha20 for the records, which move every byte (1.5× faster than
/// aws-lc-rs's on this CPU): `cargo xtask bench crypto`, BENCHMARKS.md.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec();
    Arc::new(provider)
}

/// Makes [`provider`] the process default, for libraries that build their own TLS configs (the
/// Kubernetes client): with two providers compiled in, rustls would not pick one itself.
pub fn install_process_default() {
    let _ = Arc::unwrap_or_clone(provider()).install_default();
}

/// The inbound (15008) side for the workload whose SVID `slot` holds.
pub fn server_config(slot: SvidSlot, trust: TrustStore) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(SpiffeClientVerifier::new(trust))
        .with_cert_resolver(Arc::new(slot));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The outbound side for the workload whose SVID `slot` holds, calling `expected` if known.
pub fn client_config(
    slot: SvidSlot,
    trust: TrustStore,
    expected: Option<SpiffeId>,
) -> Result<ClientConfig, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(trust, expected))
        .with_client_cert_resolver(Arc::new(slot));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A short, stable reason for a failed tunnel handshake (`zt_tls_handshake_failures_total`):
/// the verifier's own reason when it refused the peer, else a class of the TLS error.
pub fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        return "connection_closed";
    };
    match tls {
        Error::InvalidCertificate(CertificateError::Other(other)) => other
            .0
            .downcast_ref::<super::verify::VerifyError>()
            .map_or("bad_certificate", super::verify::VerifyError::reason),
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::AlertReceived(_) => "peer_refused",
        Error::NoApplicationProtocol => "no_alpn",
        Error::PeerIncompatible(_) => "incompatible_peer",
        _ => "protocol_error",
    }
}
