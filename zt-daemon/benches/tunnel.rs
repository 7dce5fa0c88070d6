//! Micro-benchmarks of the tunnel's parts (issue 8), with the agent's own code and real
//! cryptography (rustls with zt's provider), in one process:
//! - a mutual TLS 1.3 handshake, both sides, with SPIFFE verification, over loopback TCP;
//! - one HBONE stream opened on a warm HTTP/2 connection (CONNECT, 200);
//! - the byte copy loop relaying 4 MiB between two loopback TCP connections.
use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};
use zt_daemon::{
    copy,
    identity::{
        ca::CertificateAuthority,
        revocation::RevocationList,
        spiffe::SpiffeId,
        tls::{SvidSlot, client_config, server_config},
        verify::{TrustState, TrustStore},
    },
    tunnel::hbone,
};

struct Tls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

fn tls() -> Tls {
    let ca = CertificateAuthority::generate("cluster.local".parse().unwrap()).unwrap();
    let trust = TrustStore::new(
        TrustState::new(
            HashMap::from([(ca.trust_domain().clone(), vec![ca.root().clone()])]),
            RevocationList::default(),
        )
        .unwrap(),
    );
    let svid = |id: &str| {
        SvidSlot::new(
            ca.issue(&id.parse::<SpiffeId>().unwrap(), Duration::from_secs(3600))
                .unwrap(),
        )
    };
    let server_id: SpiffeId = "spiffe://cluster.local/ns/default/sa/server"
        .parse()
        .unwrap();
    Tls {
        client: Arc::new(
            client_config(
                svid("spiffe://cluster.local/ns/default/sa/client"),
                trust.clone(),
                Some(server_id.clone()),
            )
            .unwrap(),
        ),
        server: Arc::new(server_config(svid(&server_id.to_string()), trust).unwrap()),
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

fn handshake(c: &mut Criterion) {
    let rt = runtime();
    let tls = tls();
    let (listener, addr) = rt.block_on(listener());
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    rt.spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut stream = acceptor.accept(tcp).await.unwrap();
                // The client's first read sees the server's verdict on its certificate.
                let _ = stream.write_all(b"k").await;
            });
        }
    });
    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
    let name = ServerName::IpAddress(addr.ip().into());
    c.bench_function("mtls_handshake_both_sides", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let mut stream = connector.connect(name.clone(), tcp).await.unwrap();
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await.unwrap();
            })
        })
    });
}

fn stream_open(c: &mut Criterion) {
    let rt = runtime();
    let tls = tls();
    let (listener, addr) = rt.block_on(listener());
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    rt.spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let stream = acceptor.accept(tcp).await.unwrap();
        let mut connection = hbone::server_builder()
            .handshake::<_, Bytes>(stream)
            .await
            .unwrap();
        while let Some(Ok((_request, mut respond))) = connection.accept().await {
            let _ = respond.send_response(http::Response::new(()), true);
        }
    });
    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
    let send = rt.block_on(async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let stream = connector
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .unwrap();
        let (send, connection) = hbone::client_builder().handshake(stream).await.unwrap();
        tokio::spawn(connection);
        send
    });
    c.bench_function("hbone_stream_open_warm", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut send: h2::client::SendRequest<Bytes> = send.clone().ready().await.unwrap();
                let request = http::Request::builder()
                    .method(http::Method::CONNECT)
                    .uri("10.200.2.11:9000")
                    .body(())
                    .unwrap();
                let (response, _body) = send.send_request(request, true).unwrap();
                assert_eq!(response.await.unwrap().status(), 200);
            })
        })
    });
}

fn copy_loop(c: &mut Criterion) {
    const BYTES: usize = 4 << 20;
    let rt = runtime();
    let mut group = c.benchmark_group("copy_loop");
    group.throughput(Throughput::Bytes(BYTES as u64));
    group.bench_function("relay_4MiB_loopback", |b| {
        b.iter(|| {
            rt.block_on(async {
                // client -> [downstream | relay | upstream] -> sink
                let (front, front_addr) = listener().await;
                let (back, back_addr) = listener().await;
                let client = TcpStream::connect(front_addr).await.unwrap();
                let (downstream, _) = front.accept().await.unwrap();
                let upstream = TcpStream::connect(back_addr).await.unwrap();
                let (mut sink, _) = back.accept().await.unwrap();
                let relay = tokio::spawn(async move {
                    let interrupt = std::pin::pin!(std::future::pending());
                    copy::relay(downstream, upstream, Duration::from_secs(10), interrupt).await
                });
                let writer = tokio::spawn(async move {
                    let mut client = client;
                    let chunk = vec![0x5au8; 64 * 1024];
                    for _ in 0..BYTES / chunk.len() {
                        client.write_all(&chunk).await.unwrap();
                    }
                    client.shutdown().await.unwrap();
                    let mut rest = Vec::new();
                    let _ = client.read_to_end(&mut rest).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = 0;
                loop {
                    let n = sink.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                assert_eq!(got, BYTES);
                sink.shutdown().await.unwrap();
                writer.await.unwrap();
                relay.await.unwrap();
            })
        })
    });
    group.finish();
}

criterion_group!(benches, handshake, stream_open, copy_loop);
criterion_main!(benches);
