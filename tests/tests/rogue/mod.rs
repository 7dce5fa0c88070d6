//! A rogue HBONE client for the root e2e tests: it talks to an agent's 15008 directly with the
//! agent's own TLS code and any certificate a test hands it. Shared by several test crates, each
//! using a part of it.
#![allow(dead_code)]
use std::{collections::HashMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use zt_daemon::identity::{
    ca::CertificateAuthority,
    revocation::RevocationList,
    spiffe::SpiffeId,
    svid::Svid,
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
