//! A rogue HBONE client for the root e2e tests: it talks to an agent's 15008 directly with the
//! agent's own TLS code and any certificate a test hands it. Shared by several test crates, each
//! using a part of it.
#![allow(dead_code)]
use std::{collections::HashMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
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
    svid::{LeafFacts, Svid},
    tls::ALPN_H2,
    verify::SpiffeServerVerifier,
    verify::{TrustState, TrustStore},
};
use zt_tests::{
    Agent, Testbed,
    agent::node_config,
    node_config::{Identity, NodeConfigBuilder},
    probe::Server,
};

/// The application port of the pods `hbone_target` serves.
pub const APP_PORT: u16 = 9000;

/// Node 2 with n2p1 enrolled (builtin CA, its config adjusted by `edit`) and a server on it on
/// `APP_PORT`; the tests talk to its 15008 from n2p2, outside the mesh.
pub fn hbone_target(
    edit: impl FnOnce(&Testbed, NodeConfigBuilder) -> NodeConfigBuilder,
) -> (Testbed, Agent, Server, CertificateAuthority) {
    let mut bed = Testbed::new(2).unwrap();
    let ca_dir = bed.dir.join("ca");
    zt_tests::agent::ca_init(&ca_dir).unwrap();
    let p21 = bed.pod(2, 1).clone();
    let config = edit(
        &bed,
        node_config(bed.node(2), &[&p21]).identity(Identity::builtin(&ca_dir)),
    );
    let agent = Agent::start_with_config(&mut bed, 2, &config).unwrap();
    let server = Server::start(&mut bed, &p21, SocketAddr::from(([0, 0, 0, 0], APP_PORT))).unwrap();
    let ca = CertificateAuthority::load(&ca_dir).unwrap();
    (bed, agent, server, ca)
}

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
    open(addr, config).await?.request(method, uri, None).await
}

/// An HBONE connection the test holds open, and the certificate the server presented on it.
pub struct HboneConnection {
    send: h2::client::SendRequest<Bytes>,
    pub server_leaf: LeafFacts,
}

/// TLS and HTTP/2 to `addr`, driven in the background until the peer closes it.
pub async fn open(addr: SocketAddr, config: ClientConfig) -> Result<HboneConnection, String> {
    let stream = tls(addr, config).await?;
    let server_leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or("the server presented no certificate")
        .and_then(|leaf| LeafFacts::parse(leaf).map_err(|_| "the server's leaf is no SVID"))?;
    let (send, connection) = h2::client::handshake(stream)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(HboneConnection { send, server_leaf })
}

impl HboneConnection {
    /// One stream on this connection (`baggage` as the header when given); the status code, or
    /// the error (a refused stream, GOAWAY, a closed connection).
    pub async fn request(
        &self,
        method: http::Method,
        uri: &str,
        baggage: Option<&str>,
    ) -> Result<u16, String> {
        let mut send = self.send.clone().ready().await.map_err(|e| e.to_string())?;
        let mut req = http::Request::builder().method(method).uri(uri);
        if let Some(b) = baggage {
            req = req.header("baggage", b);
        }
        let req = req.body(()).map_err(|e| e.to_string())?;
        let (response, _body) = send.send_request(req, false).map_err(|e| e.to_string())?;
        let response = response.await.map_err(|e| e.to_string())?;
        Ok(response.status().as_u16())
    }
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

/// What a rogue HBONE server saw on one TLS connection it completed.
#[derive(Debug, Clone, Default)]
pub struct SeenConnection {
    pub streams: usize,
    /// The client closed it.
    pub closed: bool,
}

type Presented = (CertificateDer<'static>, Vec<u8>);

/// An HBONE server in a pod outside the mesh, presenting whatever certificate the test hands it
/// and never closing a connection on its own (an agent's peer that does not mind its certificate
/// expiring). Every CONNECT is answered 200; the request body is read to its end and answered
/// with `{"bytes": N}`, as `zt-probe serve` answers. Serves until dropped.
pub struct RogueServer {
    presented: Arc<std::sync::Mutex<Presented>>,
    seen: Arc<std::sync::Mutex<Vec<SeenConnection>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RogueServer {
    pub fn start(
        netns: &Path,
        listen: SocketAddr,
        cert: (CertificateDer<'static>, KeyPair),
    ) -> Self {
        let presented = Arc::new(std::sync::Mutex::new((cert.0, cert.1.serialize_der())));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (bound, is_bound) = std::sync::mpsc::channel();
        let ns = std::fs::File::open(netns).unwrap();
        let (p, s) = (presented.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
                    bound.send(()).unwrap();
                    tokio::select! {
                        _ = stopped => {}
                        () = async {
                            loop {
                                let Ok((tcp, _)) = listener.accept().await else { continue };
                                tokio::spawn(serve_rogue(tcp, p.clone(), s.clone()));
                            }
                        } => {}
                    }
                });
        });
        is_bound.recv().expect("rogue server bound");
        Self {
            presented,
            seen,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The certificate presented from the next connection on.
    pub fn present(&self, cert: (CertificateDer<'static>, KeyPair)) {
        *self.presented.lock().unwrap() = (cert.0, cert.1.serialize_der());
    }

    /// Every TLS connection completed so far, oldest first.
    pub fn connections(&self) -> Vec<SeenConnection> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for RogueServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve_rogue(
    tcp: TcpStream,
    presented: Arc<std::sync::Mutex<Presented>>,
    seen: Arc<std::sync::Mutex<Vec<SeenConnection>>>,
) {
    let (cert, key) = presented.lock().unwrap().clone();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], PrivateKeyDer::Pkcs8(key.into()))
    .unwrap();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let Ok(tls) = tokio_rustls::TlsAcceptor::from(Arc::new(config))
        .accept(tcp)
        .await
    else {
        return;
    };
    let Ok(mut connection) = h2::server::handshake(tls).await else {
        return;
    };
    let index = {
        let mut seen = seen.lock().unwrap();
        seen.push(SeenConnection::default());
        seen.len() - 1
    };
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        seen.lock().unwrap()[index].streams += 1;
        tokio::spawn(async move {
            let Ok(mut send) = respond.send_response(http::Response::new(()), false) else {
                return;
            };
            let mut body = request.into_body();
            let mut bytes = 0;
            while let Some(Ok(chunk)) = body.data().await {
                bytes += chunk.len();
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            let _ = send.send_data(Bytes::from(format!("{{\"bytes\":{bytes}}}\n")), true);
        });
    }
    seen.lock().unwrap()[index].closed = true;
}
