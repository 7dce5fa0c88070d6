//! Which rustls crypto provider zt should use (issue 8): aws-lc-rs against ring on this CPU, and
//! zt's mix of the two (aws-lc-rs handshake, ring records), in memory so that only cryptography
//! and rustls are measured. For each:
//! - a mutual TLS 1.3 handshake, both sides (X25519, ECDSA P-256 certificates, chain checks);
//! - 1 MiB of application data sealed by one side and opened by the other (AES-256-GCM).
use std::{
    io::{Read, Write},
    sync::Arc,
};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    server::WebPkiClientVerifier,
};

/// Moves every pending TLS record from one side to the other; returns the plaintext the
/// receiver got, read as it arrives (rustls holds only so much unread).
fn pump(from: &mut Connection, to: &mut Connection, plain: &mut [u8]) -> usize {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).unwrap();
    }
    let (mut rest, mut got) = (&wire[..], 0);
    while !rest.is_empty() {
        to.read_tls(&mut rest).unwrap();
        to.process_new_packets().unwrap();
        loop {
            match to.reader().read(plain) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
    }
    got
}

struct Pair {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

fn with_x25519(mut provider: CryptoProvider) -> Arc<CryptoProvider> {
    // The same key exchange for both, so that the comparison is of implementations.
    provider
        .kx_groups
        .retain(|g| g.name() == rustls::NamedGroup::X25519);
    Arc::new(provider)
}

fn configs(provider: Arc<CryptoProvider>) -> Pair {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (
            vec![cert.der().clone(), ca.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    };
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der().to_vec())).unwrap();
    let roots = Arc::new(roots);
    let (server_chain, server_key) = leaf("server.bench");
    let (client_chain, client_key) = leaf("client.bench");
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .unwrap();
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(server_chain, server_key)
        .unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(client_chain, client_key)
        .unwrap();
    Pair {
        client: Arc::new(client),
        server: Arc::new(server),
    }
}

fn connected(pair: &Pair) -> (Connection, Connection) {
    let name = ServerName::try_from("server.bench").unwrap();
    let mut client: Connection = ClientConnection::new(pair.client.clone(), name)
        .unwrap()
        .into();
    let mut server: Connection = ServerConnection::new(pair.server.clone()).unwrap().into();
    let mut plain = [0u8; 1024];
    while client.is_handshaking() || server.is_handshaking() {
        pump(&mut client, &mut server, &mut plain);
        pump(&mut server, &mut client, &mut plain);
    }
    (client, server)
}

/// zt's choice (zt-daemon/src/identity/tls.rs): aws-lc-rs with ring's record encryption.
fn mixed() -> CryptoProvider {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec();
    provider
}

fn providers() -> [(&'static str, Arc<CryptoProvider>); 3] {
    [
        (
            "aws-lc-rs",
            with_x25519(rustls::crypto::aws_lc_rs::default_provider()),
        ),
        (
            "ring",
            with_x25519(rustls::crypto::ring::default_provider()),
        ),
        ("aws-lc-rs+ring-aead", with_x25519(mixed())),
    ]
}

fn handshake(c: &mut Criterion) {
    let mut group = c.benchmark_group("provider_handshake");
    for (name, provider) in providers() {
        let pair = configs(provider);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| connected(&pair))
        });
    }
    group.finish();
}

fn bulk(c: &mut Criterion) {
    const CHUNK: usize = 64 * 1024;
    const BYTES: usize = 1 << 20;
    let mut group = c.benchmark_group("provider_bulk_1MiB");
    group.throughput(Throughput::Bytes(BYTES as u64));
    for (name, provider) in providers() {
        let pair = configs(provider);
        let (mut client, mut server) = connected(&pair);
        let chunk = vec![0x5au8; CHUNK];
        let mut plain = vec![0u8; CHUNK];
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                for _ in 0..BYTES / CHUNK {
                    client.writer().write_all(&chunk).unwrap();
                    assert_eq!(pump(&mut client, &mut server, &mut plain), CHUNK);
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, handshake, bulk);
criterion_main!(benches);
