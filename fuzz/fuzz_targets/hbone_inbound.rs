//! The inbound HBONE listener after TLS: arbitrary bytes from a verified peer go into the agent's
//! own server loop (`tunnel::server::serve`, with its HTTP/2 settings, GOAWAY and idle handling)
//! and each request through the checks the agent applies (CONNECT only, an ip:port authority of
//! this pod, never an agent port; baggage parsing). The input follows the client connection
//! preface, which the target sends itself.
#![no_main]
use std::{
    net::{IpAddr, SocketAddr},
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use http::{Response, StatusCode};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zt_daemon::{
    identity::{spiffe::SpiffeId, svid::LeafFacts, verify::TrustStore},
    proxy::inbound::connect_target,
    tunnel::{
        hbone,
        server::{self, ServedConnection, ServerLimits},
        session::{SessionCertificate, SessionCertificates},
    },
    workload::WorkloadId,
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const POD: [IpAddr; 2] = [
    IpAddr::V4(std::net::Ipv4Addr::new(10, 200, 2, 11)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x200, 0, 2, 0, 0, 0, 0x11)),
];

const PEER: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 200, 1, 11)), 40000);
const LIMITS: ServerLimits = ServerLimits {
    handshake_timeout: Duration::from_millis(200),
    max_streams: 100,
    idle_timeout: Duration::from_secs(60),
};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let peer: SpiffeId = "spiffe://cluster.local/ns/default/sa/client"
        .parse()
        .unwrap();
    let input = [PREFACE, data].concat();
    let workload = WorkloadId {
        namespace: "default".into(),
        name: "server".into(),
    };
    let certificate = |id: &SpiffeId| {
        SessionCertificate::from(&LeafFacts {
            id: id.clone(),
            serial: "01".into(),
            not_before: SystemTime::now(),
            not_after: SystemTime::now() + Duration::from_secs(3600),
            self_issued: false,
        })
    };
    let certificates = SessionCertificates {
        local: certificate(
            &"spiffe://cluster.local/ns/default/sa/server"
                .parse()
                .unwrap(),
        ),
        peer: certificate(&peer),
    };
    let trust = TrustStore::default();
    runtime().block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut from_agent, mut to_agent) = tokio::io::split(client);
        let write = async move {
            let _ = to_agent.write_all(&input).await;
            let _ = to_agent.shutdown().await;
        };
        // Whatever the agent answers is read and dropped, so it never blocks on a full pipe.
        let read = async move {
            let mut sink = vec![0u8; 16 * 1024];
            while matches!(from_agent.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let serve = server::serve(
            server,
            LIMITS,
            &certificates,
            &trust,
            std::future::pending(),
            ServedConnection {
                workload: &workload,
                peer: PEER,
                source: &peer,
            },
            |request, mut respond| {
                let status = match connect_target(&request, &POD) {
                    Ok(_) => {
                        let _ = hbone::peer_workload(request.headers(), &peer);
                        StatusCode::OK
                    }
                    Err(refusal) => refusal.status(),
                };
                let mut response = Response::new(());
                *response.status_mut() = status;
                let _ = respond.send_response(response, true);
            },
        );
        // Nothing outlives the input (no spawned task), and a stalled exchange is bounded: it is
        // not a finding.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            tokio::join!(write, read, serve)
        })
        .await;
    });
});
