//! A rogue HBONE client for the root e2e tests: it talks to an agent's 15008 directly with the
//! agent's own TLS code and any certificate a test hands it. Shared by several test crates, each
//! using a part of it.
#![allow(dead_code)]
use std::{collections::HashMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::{
    ClientConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName},
};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use zt_daemon::identity::{
    ca::CertificateAuthority,
    revocation::RevocationList,
    spiffe::SpiffeId,
    svid::Svid,
    tls::ALPN_H2,
    verify::SpiffeServerVerifier,
    verify::{TrustState, TrustStore},
};

/// Runs `f` on a current-thread runtime in a thread inside `netns`.
pub fn in_netns<R: Send>(netns: &Path, f: impl AsyncFnOnce() -> R + Send) -> R {
    let ns = std::fs::File::open(netns).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .unwrap()
    })
}

pub fn trust_of(ca: &CertificateAuthority) -> TrustStore {
    TrustStore::new(
        TrustState::new(
            HashMap::from([(ca.trust_domain().clone(), vec![ca.root().clone()])]),
            RevocationList::default(),
        )
        .unwrap(),
    )
}

pub fn svid(ca: &CertificateAuthority, id: &str) -> Svid {
    ca.issue(&id.parse::<SpiffeId>().unwrap(), Duration::from_secs(600))
        .unwrap()
}

/// TLS to `addr`; Err carries the handshake error.
pub async fn tls(
    addr: SocketAddr,
    config: ClientConfig,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut stream = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3 client auth failures surface on the first read.
    stream.write_all(b"").await.map_err(|e| e.to_string())?;
    Ok(stream)
}

/// One HTTP/2 request on a fresh HBONE connection; returns the status code, or the error.
pub async fn request(
    addr: SocketAddr,
    config: ClientConfig,
    method: http::Method,
    uri: &str,
) -> Result<u16, String> {
    let stream = tls(addr, config).await?;
    let (send, connection) = h2::client::handshake(stream)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut send = send.ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, _body) = send.send_request(req, false).map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

/// A certificate for `id` signed by `ca`, shaped as an SVID and then by `shape`, which forges
/// what a real issuer never would (expired, two URI SANs, a CA as leaf, ...).
pub fn forge(
    ca: &CertificateAuthority,
    id: &str,
    shape: impl FnOnce(&mut CertificateParams),
) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = std::time::SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + Duration::from_secs(600)).into();
    shape(&mut params);
    let cert = ca.sign(&params, &key).unwrap();
    (cert, key)
}

/// A TLS 1.3 client that verifies the server as the agents do; the caller picks what it presents.
fn rogue_client(
    trust: TrustStore,
) -> rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert> {
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(trust, None))
}

fn offering_h2(mut config: ClientConfig) -> ClientConfig {
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config
}

/// A client (ALPN h2) with no certificate at all.
pub fn no_cert_client(trust: TrustStore) -> ClientConfig {
    offering_h2(rogue_client(trust).with_no_client_auth())
}

/// A client (ALPN h2) presenting `cert` as is: no local checks on what it presents.
pub fn client_presenting(
    cert: CertificateDer<'static>,
    key: &KeyPair,
    trust: TrustStore,
) -> ClientConfig {
    offering_h2(
        rogue_client(trust)
            .with_client_auth_cert(vec![cert], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
            .unwrap(),
    )
}
