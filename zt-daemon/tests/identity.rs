//! Identity layer, end to end: real TLS 1.3 handshakes over real TCP sockets (tokio-rustls) with
//! certificates made by the built-in CA (or crafted bad ones), and Debian's openssl reading what
//! we issue.
use std::{collections::HashMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use rcgen::{CertificateParams, DistinguishedName, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use zt_daemon::identity::{
    ca::CertificateAuthority,
    revocation::RevocationList,
    rotation::{BuiltinIssuer, IssueError, Renewal, SvidSource, WorkloadIdentity},
    spiffe::{SpiffeId, TrustDomain},
    svid::Svid,
    tls::{SvidSlot, client_config, server_config},
    verify::{SpiffeServerVerifier, TrustState, TrustStore},
};

const TTL: Duration = Duration::from_secs(3600);

fn td(s: &str) -> TrustDomain {
    s.parse().unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn trust(cas: &[&CertificateAuthority], revoked: RevocationList) -> TrustStore {
    let mut bundles: HashMap<TrustDomain, Vec<CertificateDer<'static>>> = HashMap::new();
    for ca in cas {
        bundles
            .entry(ca.trust_domain().clone())
            .or_default()
            .push(ca.root().clone());
    }
    TrustStore::new(TrustState::new(bundles, revoked).unwrap())
}

/// A leaf shaped like an SVID with `edit` applied, signed by `ca` (or self-signed): the
/// certificate and its key. These are meant to be bad, so they never pass through `Svid`.
fn crafted(
    ca: Option<&CertificateAuthority>,
    edit: impl FnOnce(&mut CertificateParams),
) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        "spiffe://cluster.local/ns/a/sa/client".try_into().unwrap(),
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::hours(1);
    edit(&mut params);
    let der = match ca {
        Some(ca) => ca.sign(&params, &key).unwrap(),
        None => params.self_signed(&key).unwrap().der().clone(),
    };
    (der, key)
}

/// A client presenting a crafted certificate, verifying the server with our verifier.
fn crafted_client(cert: (CertificateDer<'static>, KeyPair), t: TrustStore) -> ClientConfig {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.1.serialize_der()));
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(t, None))
        .with_client_auth_cert(vec![cert.0], key)
        .unwrap()
}

fn svid_client(svid: &Svid, t: TrustStore, expected: Option<SpiffeId>) -> ClientConfig {
    client_config(SvidSlot::new(svid.clone()), t, expected).unwrap()
}

/// One handshake of `client` with a server presenting `server`'s SVID and verifying with
/// `server_trust`. Returns (server side, client side) outcomes; on success five bytes go through
/// the tunnel and back.
async fn handshake(
    server: &SvidSlot,
    server_trust: TrustStore,
    client: ClientConfig,
) -> (Result<(), String>, Result<(), String>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        server_config(server.clone(), server_trust).unwrap(),
    ));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())
    });
    let client_side = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("zt.invalid").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"hello");
        Ok(())
    }
    .await;
    let server_side = server_side.await.unwrap();
    (server_side, client_side)
}

struct Mesh {
    ca: CertificateAuthority,
    server: SvidSlot,
}

fn mesh() -> Mesh {
    let ca = CertificateAuthority::generate(td("cluster.local")).unwrap();
    let server = SvidSlot::new(
        ca.issue(&id("spiffe://cluster.local/ns/b/sa/server"), TTL)
            .unwrap(),
    );
    Mesh { ca, server }
}

#[tokio::test]
async fn valid_pair_handshakes_and_carries_bytes() {
    let m = mesh();
    let client =
        m.ca.issue(&id("spiffe://cluster.local/ns/a/sa/client"), TTL)
            .unwrap();
    let t = trust(&[&m.ca], RevocationList::default());
    let expected = Some(m.server.get().unwrap().id().clone());
    let (s, c) = handshake(&m.server, t.clone(), svid_client(&client, t, expected)).await;
    assert_eq!(s, Ok(()));
    assert_eq!(c, Ok(()));
}

/// The server, verifying with `t`, refuses `client` with a message containing `reason`.
async fn refused_client(m: &Mesh, client: ClientConfig, t: TrustStore, reason: &str) {
    let (s, c) = handshake(&m.server, t, client).await;
    let err = s.expect_err("server accepted a bad client certificate");
    assert!(err.contains(reason), "expected {reason:?} in {err:?}");
    assert!(c.is_err(), "client believed the handshake succeeded");
}

#[tokio::test]
async fn each_bad_client_certificate_fails_with_its_own_reason() {
    let m = mesh();
    let t = trust(&[&m.ca], RevocationList::default());
    let now = time::OffsetDateTime::now_utc();
    let cases: Vec<(&str, (CertificateDer<'static>, KeyPair))> = vec![
        (
            "certificate expired at",
            crafted(Some(&m.ca), |p| {
                p.not_before = now - time::Duration::hours(2);
                p.not_after = now - time::Duration::hours(1);
            }),
        ),
        (
            "not yet valid",
            crafted(Some(&m.ca), |p| {
                p.not_before = now + time::Duration::hours(1);
                p.not_after = now + time::Duration::hours(2);
            }),
        ),
        (
            "a CA certificate used as a leaf",
            crafted(Some(&m.ca), |p| {
                p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            }),
        ),
        (
            "2 URI SANs",
            crafted(Some(&m.ca), |p| {
                p.subject_alt_names.push(SanType::URI(
                    "spiffe://cluster.local/ns/a/sa/other".try_into().unwrap(),
                ));
            }),
        ),
        (
            "no URI SAN",
            crafted(Some(&m.ca), |p| p.subject_alt_names.clear()),
        ),
        (
            "DNS SAN only",
            crafted(Some(&m.ca), |p| {
                p.subject_alt_names = vec![SanType::DnsName("client.example".try_into().unwrap())];
            }),
        ),
        ("self-signed certificate", crafted(None, |_| {})),
        (
            "keyCertSign",
            crafted(Some(&m.ca), |p| {
                p.key_usages.push(KeyUsagePurpose::KeyCertSign);
            }),
        ),
    ];
    let client_trust = trust(&[&m.ca], RevocationList::default());
    for (reason, cert) in cases {
        refused_client(
            &m,
            crafted_client(cert, client_trust.clone()),
            t.clone(),
            reason,
        )
        .await;
    }
}

#[tokio::test]
async fn another_trust_domain_is_refused() {
    let m = mesh();
    let t = trust(&[&m.ca], RevocationList::default());
    // A foreign trust domain we hold no bundle for.
    let other = CertificateAuthority::generate(td("other.org")).unwrap();
    let foreign = other
        .issue(&id("spiffe://other.org/ns/a/sa/client"), TTL)
        .unwrap();
    let ours = trust(&[&m.ca], RevocationList::default());
    refused_client(
        &m,
        svid_client(&foreign, ours.clone(), None),
        t.clone(),
        "no trust bundle for trust domain other.org",
    )
    .await;
    // A certificate that claims our trust domain but chains to another domain's root: bundles
    // are never merged, so other.org's root cannot vouch for cluster.local.
    let impostor_ca = CertificateAuthority::generate(td("cluster.local")).unwrap();
    let impostor = impostor_ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/client"), TTL)
        .unwrap();
    let both = trust(&[&m.ca, &other], RevocationList::default());
    refused_client(
        &m,
        svid_client(&impostor, ours.clone(), None),
        both.clone(),
        "not issued by the trust bundle of cluster.local",
    )
    .await;
    let claims_ours = crafted(Some(&other), |_| {});
    refused_client(
        &m,
        crafted_client(claims_ours, ours),
        both,
        "not issued by the trust bundle of cluster.local",
    )
    .await;
}

#[tokio::test]
async fn revoked_identity_and_serial_are_refused() {
    let m = mesh();
    let client =
        m.ca.issue(&id("spiffe://cluster.local/ns/a/sa/client"), TTL)
            .unwrap();
    let by_id = RevocationList::parse(
        Path::new("revoked"),
        "spiffe://cluster.local/ns/a/sa/client\n",
    )
    .unwrap();
    let ours = trust(&[&m.ca], RevocationList::default());
    refused_client(
        &m,
        svid_client(&client, ours.clone(), None),
        trust(&[&m.ca], by_id),
        "identity spiffe://cluster.local/ns/a/sa/client is revoked",
    )
    .await;
    let line = format!("serial:{}\n", client.leaf.serial);
    let by_serial = RevocationList::parse(Path::new("revoked"), &line).unwrap();
    let reason = format!(
        "certificate serial {} of spiffe://cluster.local/ns/a/sa/client is revoked",
        client.leaf.serial
    );
    refused_client(
        &m,
        svid_client(&client, ours, None),
        trust(&[&m.ca], by_serial),
        &reason,
    )
    .await;
}

#[tokio::test]
async fn client_refuses_a_server_that_is_not_the_expected_identity() {
    let m = mesh();
    let client =
        m.ca.issue(&id("spiffe://cluster.local/ns/a/sa/client"), TTL)
            .unwrap();
    let t = trust(&[&m.ca], RevocationList::default());
    let expected = id("spiffe://cluster.local/ns/b/sa/database");
    let (s, c) = handshake(
        &m.server,
        t.clone(),
        svid_client(&client, t, Some(expected)),
    )
    .await;
    let err = c.expect_err("client accepted the wrong server");
    assert!(
        err.contains("server is spiffe://cluster.local/ns/b/sa/server, expected spiffe://cluster.local/ns/b/sa/database"),
        "{err}"
    );
    assert!(s.is_err());
}

#[test]
fn openssl_accepts_and_describes_an_issued_svid() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate(td("cluster.local")).unwrap();
    ca.write(dir.path()).unwrap();
    let mode = std::fs::metadata(dir.path().join("ca-key.pem")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let svid = ca
        .issue(&id("spiffe://cluster.local/ns/default/sa/web"), TTL)
        .unwrap();
    std::fs::write(dir.path().join("svid.pem"), svid.chain_pem()).unwrap();

    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("openssl (Debian's) is installed");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = openssl(&["verify", "-CAfile", "ca.pem", "svid.pem"]);
    assert!(ok && text.contains("svid.pem: OK"), "{text}");

    let (ok, text) = openssl(&["x509", "-in", "svid.pem", "-noout", "-text"]);
    assert!(ok, "{text}");
    assert_eq!(text.matches("URI:").count(), 1, "{text}");
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/default/sa/web"),
        "{text}"
    );
    assert!(!text.contains("DNS:"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    let ku = text
        .split("X509v3 Key Usage: critical")
        .nth(1)
        .expect("key usage is critical");
    assert!(ku.trim_start().starts_with("Digital Signature\n"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("ASN1 OID: prime256v1"), "{text}");

    // The CA reloads from what it wrote, and issues chains openssl accepts.
    let reloaded = CertificateAuthority::load(dir.path()).unwrap();
    assert_eq!(reloaded.trust_domain(), ca.trust_domain());
    let again = reloaded
        .issue(&id("spiffe://cluster.local/ns/default/sa/api"), TTL)
        .unwrap();
    std::fs::write(dir.path().join("svid2.pem"), again.chain_pem()).unwrap();
    let (ok, text) = openssl(&["verify", "-CAfile", "ca.pem", "svid2.pem"]);
    assert!(ok, "{text}");
}

#[test]
fn svid_files_with_bad_input_are_rejected_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate(td("cluster.local")).unwrap();
    let (a, a_key) = crafted(Some(&ca), |_| {});
    let (_, b_key) = crafted(Some(&ca), |_| {});
    let p = |n: &str| dir.path().join(n);
    std::fs::write(
        p("a.pem"),
        pem::encode(&pem::Pem::new("CERTIFICATE", a.to_vec())),
    )
    .unwrap();
    std::fs::write(p("a-key.pem"), a_key.serialize_pem()).unwrap();
    std::fs::write(p("b-key.pem"), b_key.serialize_pem()).unwrap();
    std::fs::write(
        p("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let key = a_key.serialize_pem();
    std::fs::write(p("truncated-key.pem"), &key[..key.len() / 2]).unwrap();

    let svid = Svid::from_pem_files(&p("a.pem"), &p("a-key.pem")).unwrap();
    assert_eq!(
        svid.id().to_string(),
        "spiffe://cluster.local/ns/a/sa/client"
    );
    for (cert, key, named) in [
        ("garbage.pem", "a-key.pem", "garbage.pem"),
        ("a.pem", "truncated-key.pem", "truncated-key.pem"),
        ("a.pem", "b-key.pem", "b-key.pem"),
        ("missing.pem", "a-key.pem", "missing.pem"),
        ("b-key.pem", "a-key.pem", "b-key.pem"),
    ] {
        let err = Svid::from_pem_files(&p(cert), &p(key))
            .unwrap_err()
            .to_string();
        assert!(err.contains(named), "{cert}+{key}: {err}");
    }
}

/// Serves TLS echo on a loopback port until the test ends.
async fn echo_server(slot: SvidSlot, t: TrustStore) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(slot, t).unwrap()));
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn dial(addr: SocketAddr, client: ClientConfig) -> Result<Tls, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let mut tls = connector
        .connect(ServerName::try_from("zt.invalid").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    ping(&mut tls).await?;
    Ok(tls)
}

async fn ping(tls: &mut Tls) -> Result<(), String> {
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    (&buf == b"ping")
        .then_some(())
        .ok_or_else(|| "echo mismatch".to_owned())
}

fn server_serial(tls: &Tls) -> String {
    let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
    zt_daemon::identity::svid::LeafFacts::parse(leaf)
        .unwrap()
        .serial
}

#[tokio::test]
async fn rotation_serves_new_handshakes_and_keeps_open_connections() {
    let ca = CertificateAuthority::generate(td("cluster.local")).unwrap();
    let t = trust(&[&ca], RevocationList::default());
    let client = ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/client"), TTL)
        .unwrap();
    // The issuer owns the CA from here on; the trust store already holds its root.
    let issuer: Arc<dyn SvidSource> = Arc::new(BuiltinIssuer {
        ca,
        ttl: Duration::from_secs(4),
    });
    let renewal = Renewal::default();
    let server = WorkloadIdentity::start(
        id("spiffe://cluster.local/ns/b/sa/server"),
        issuer,
        &renewal,
    );
    let addr = echo_server(server.slot.clone(), t.clone()).await;

    let mut before = dial(addr, svid_client(&client, t.clone(), None))
        .await
        .unwrap();
    let first = server_serial(&before);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while server.slot.serial().unwrap() == first {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rotation within 8 s of a 4 s TTL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection opened before rotation still works.
    ping(&mut before).await.unwrap();
    // A new handshake gets the new certificate.
    let after = dial(addr, svid_client(&client, t, None)).await.unwrap();
    assert_ne!(server_serial(&after), first);
    assert_eq!(server_serial(&after), server.slot.serial().unwrap());
    assert_eq!(
        renewal.failures.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(server.is_valid());
}

/// Fails its first `failures` fetches, then issues.
struct Flaky {
    inner: BuiltinIssuer,
    failures: std::sync::atomic::AtomicUsize,
}

impl SvidSource for Flaky {
    fn fetch(&self, id: &SpiffeId) -> Result<Svid, IssueError> {
        use std::sync::atomic::Ordering::SeqCst;
        let calls = self.failures.fetch_sub(1, SeqCst);
        if calls > 0 && calls <= 2 {
            return Err(IssueError::Failed {
                id: id.clone(),
                message: "CA unavailable".into(),
            });
        }
        self.inner.fetch(id)
    }
}

#[tokio::test]
async fn issuer_failure_keeps_the_valid_certificate_and_retries() {
    let ca = CertificateAuthority::generate(td("cluster.local")).unwrap();
    // The first fetch succeeds (counter starts past the failing window), the next two fail.
    let flaky = Arc::new(Flaky {
        // Renewal at 5-6 s, retries after 1 s and 2 s more: recovered before the 10 s expiry.
        inner: BuiltinIssuer {
            ca,
            ttl: Duration::from_secs(10),
        },
        failures: std::sync::atomic::AtomicUsize::new(3),
    });
    let renewal = Renewal::default();
    let w = WorkloadIdentity::start(id("spiffe://cluster.local/ns/a/sa/w"), flaky, &renewal);
    let first = w.slot.serial().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    while w.slot.serial().unwrap() == first {
        assert!(
            w.is_valid(),
            "lost the certificate while the issuer was failing"
        );
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        renewal.failures.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn trust_bundle_rotation_with_overlap_drops_no_handshake() {
    let old = CertificateAuthority::generate(td("cluster.local")).unwrap();
    let new = CertificateAuthority::generate(td("cluster.local")).unwrap();
    let t = trust(&[&old], RevocationList::default());
    let server = SvidSlot::new(
        old.issue(&id("spiffe://cluster.local/ns/b/sa/server"), TTL)
            .unwrap(),
    );
    let addr = echo_server(server.clone(), t.clone()).await;
    let client_old = old
        .issue(&id("spiffe://cluster.local/ns/a/sa/client"), TTL)
        .unwrap();
    let client_new = new
        .issue(&id("spiffe://cluster.local/ns/a/sa/client"), TTL)
        .unwrap();

    // Overlap: both roots trusted, workloads move to the new CA one by one.
    let both = trust(&[&old, &new], RevocationList::default());
    t.replace(
        TrustState::new(
            HashMap::from([(
                td("cluster.local"),
                vec![old.root().clone(), new.root().clone()],
            )]),
            RevocationList::default(),
        )
        .unwrap(),
    );
    let mut failed = 0;
    for round in 0..20 {
        if round == 10 {
            server.replace(
                new.issue(&id("spiffe://cluster.local/ns/b/sa/server"), TTL)
                    .unwrap(),
            );
        }
        let client = if round % 2 == 0 {
            &client_old
        } else {
            &client_new
        };
        if dial(addr, svid_client(client, both.clone(), None))
            .await
            .is_err()
        {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "handshakes failed during the bundle overlap");

    // Old root removed: its certificates are refused, the new ones pass.
    t.replace(
        TrustState::new(
            HashMap::from([(td("cluster.local"), vec![new.root().clone()])]),
            RevocationList::default(),
        )
        .unwrap(),
    );
    assert!(
        dial(addr, svid_client(&client_old, both.clone(), None))
            .await
            .is_err()
    );
    dial(addr, svid_client(&client_new, both, None))
        .await
        .unwrap();
}

/// Writes `contents` to `path` the way issuers do: a temporary file renamed into place.
fn put(path: &Path, contents: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

fn write_svid(dir: &Path, ca: &CertificateAuthority, sa: &str) -> String {
    let (cert, key) = crafted(Some(ca), |p| {
        p.subject_alt_names = vec![SanType::URI(
            format!("spiffe://cluster.local/ns/default/sa/{sa}")
                .try_into()
                .unwrap(),
        )];
    });
    let serial = zt_daemon::identity::svid::LeafFacts::parse(&cert)
        .unwrap()
        .serial;
    put(
        &dir.join("default").join(sa).join("tls.key"),
        key.serialize_pem(),
    );
    put(
        &dir.join("default").join(sa).join("tls.crt"),
        pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec())),
    );
    serial
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn files_provider_hot_reloads_and_keeps_the_last_good_state() {
    use zt_daemon::{
        config::{IdentityConfig, IdentityProvider},
        identity::node::NodeIdentity,
    };
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("identities");
    let revocations = dir.path().join("revocations").join("revoked.txt");
    put(&revocations, "# nothing revoked yet\n");
    let ca = CertificateAuthority::generate(td("cluster.local")).unwrap();
    put(&files.join("bundles/cluster.local.pem"), ca.bundle_pem());
    let first = write_svid(&files, &ca, "web");
    write_svid(&files, &ca, "client");

    let node = NodeIdentity::start(
        td("cluster.local"),
        IdentityConfig {
            provider: IdentityProvider::Files { dir: files.clone() },
            svid_ttl: TTL,
            revocation_file: Some(revocations.clone()),
        },
    )
    .unwrap();
    let workload = |sa: &str| zt_daemon::workload::Workload {
        id: zt_daemon::workload::WorkloadId {
            namespace: "default".into(),
            name: sa.into(),
        },
        service_account: sa.into(),
        labels: Default::default(),
        netns: "/proc/self/ns/net".into(),
        probe_ports: vec![],
    };
    let web = node.issue(
        id("spiffe://cluster.local/ns/default/sa/web"),
        &workload("web"),
    );
    assert_eq!(web.slot.serial().unwrap(), first);
    let client = node.issue(
        id("spiffe://cluster.local/ns/default/sa/client"),
        &workload("client"),
    );
    let addr = echo_server(web.slot.clone(), node.trust.clone()).await;
    let dial_client = || {
        dial(
            addr,
            client_config(client.slot.clone(), node.trust.clone(), None).unwrap(),
        )
    };
    dial_client().await.unwrap();

    // A new certificate on disk is picked up without a restart.
    let second = write_svid(&files, &ca, "web");
    eventually("the new SVID", || web.slot.serial().unwrap() == second).await;

    // A broken certificate is refused; the previous one stays in use.
    let failures = node
        .renewal
        .failures
        .load(std::sync::atomic::Ordering::Relaxed);
    put(
        &files.join("default/web/tls.crt"),
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    );
    eventually("the failure to be counted", || {
        node.renewal
            .failures
            .load(std::sync::atomic::Ordering::Relaxed)
            > failures
    })
    .await;
    assert_eq!(web.slot.serial().unwrap(), second);
    assert!(web.is_valid());
    dial_client().await.unwrap();

    // A broken bundle keeps the previous trust state.
    let before = node.trust.current();
    put(&files.join("bundles/cluster.local.pem"), "not pem at all");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        Arc::ptr_eq(&before, &node.trust.current()),
        "broken bundle replaced the trust state"
    );
    dial_client().await.unwrap();

    // Revoking the client takes effect for new handshakes, and subscribers are told.
    // (A reload is all or nothing, so the bundle is repaired first; that restores the bundle in
    // force, which is then not replaced: only content changes wake subscribers.)
    let mut events = node.trust.subscribe();
    events.borrow_and_update();
    put(&files.join("bundles/cluster.local.pem"), ca.bundle_pem());
    put(
        &revocations,
        "spiffe://cluster.local/ns/default/sa/client\n",
    );
    tokio::time::timeout(Duration::from_secs(10), events.changed())
        .await
        .unwrap()
        .unwrap();
    let client_leaf = client.slot.get().unwrap().leaf;
    assert!(
        events
            .borrow()
            .revoked(&client_leaf.id, &client_leaf.serial)
            .is_some()
    );
    let err = dial_client()
        .await
        .expect_err("revoked client still accepted");
    assert!(!err.is_empty());
}

#[test]
fn a_bundle_without_the_issuing_root_no_longer_trusts_a_connected_peer() {
    let m = mesh();
    let svid =
        m.ca.issue(&id("spiffe://cluster.local/ns/a/sa/server"), TTL)
            .unwrap();
    let other = CertificateAuthority::generate(td("cluster.local")).unwrap();
    let chain = svid.chain().to_vec();
    // The root that issued it is in the bundle (alone, or next to a new one during a rotation).
    assert!(
        trust(&[&m.ca], RevocationList::default())
            .current()
            .still_trusts(svid.id(), &chain)
    );
    assert!(
        trust(&[&other, &m.ca], RevocationList::default())
            .current()
            .still_trusts(svid.id(), &chain)
    );
    // The bundle moved on without it: connections made with it must close.
    assert!(
        !trust(&[&other], RevocationList::default())
            .current()
            .still_trusts(svid.id(), &chain)
    );
}
