//! The inbound HBONE listener after TLS: arbitrary bytes from a verified peer go into the agent's
//! HTTP/2 server (its settings) and each request through the same checks the agent applies
//! (CONNECT only, an ip:port authority of this pod, never an agent port; baggage parsing).
//! The input follows the client connection preface, which the target sends itself.
#![no_main]
use std::{net::IpAddr, sync::OnceLock, time::Duration};

use http::{Response, StatusCode};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zt_daemon::{
    identity::spiffe::SpiffeId,
    proxy::inbound::connect_target,
    tunnel::hbone,
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const POD: [IpAddr; 2] = [
    IpAddr::V4(std::net::Ipv4Addr::new(10, 200, 2, 11)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x200, 0, 2, 0, 0, 0, 0x11)),
];

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
        let serve = async {
            let Ok(mut connection) = hbone::server_builder()
                .handshake::<_, bytes::Bytes>(server)
                .await
            else {
                return;
            };
            while let Some(Ok((request, mut respond))) = connection.accept().await {
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
            }
        };
        // Nothing outlives the input (no spawned task), and a stalled exchange is bounded: it is
        // not a finding.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            tokio::join!(write, read, serve)
        })
        .await;
    });
});
