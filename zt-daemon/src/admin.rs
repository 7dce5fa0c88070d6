//! The agent's HTTP endpoints. Today: readiness on `admin.readiness_addr` (default 0.0.0.0:15021),
//! `GET /healthz/ready`: 200 when the capture programs are attached and every configured workload
//! is enrolled and, with an identity provider, holds a valid certificate; 503 with the reason
//! otherwise.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::SystemTime,
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{config::WorkloadId, identity::tls::SvidSlot};

/// What readiness is decided from; the agent replaces it after every reconcile.
#[derive(Default)]
pub struct ReadyInputs {
    pub capture_started: bool,
    /// Every configured workload, with its SVID slot when it is enrolled (`None` = not enrolled),
    /// and whether the node issues identities at all.
    pub workloads: Vec<(WorkloadId, Option<Option<SvidSlot>>)>,
    pub identity_required: bool,
}

#[derive(Default, Clone)]
pub struct Readiness(Arc<RwLock<ReadyInputs>>);

impl Readiness {
    pub fn set(&self, inputs: ReadyInputs) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = inputs;
    }

    /// `Ok` when ready, else the first reason it is not.
    pub fn check(&self) -> Result<(), String> {
        let inputs = self.0.read().unwrap_or_else(|p| p.into_inner());
        if !inputs.capture_started {
            return Err("capture programs not attached".into());
        }
        let now = SystemTime::now();
        for (id, enrolled) in &inputs.workloads {
            let Some(slot) = enrolled else {
                return Err(format!("workload {id} is not enrolled"));
            };
            if !inputs.identity_required {
                continue;
            }
            let valid = slot
                .as_ref()
                .and_then(SvidSlot::get)
                .is_some_and(|s| s.leaf.not_before <= now && now < s.leaf.not_after);
            if !valid {
                return Err(format!("workload {id} has no valid certificate"));
            }
        }
        Ok(())
    }
}

/// Serves readiness until the task is dropped.
pub async fn serve_readiness(addr: SocketAddr, readiness: Readiness) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "readiness accept failed");
                continue;
            }
        };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let readiness = readiness.clone();
                async move { Ok::<_, Infallible>(respond(&req, &readiness)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "readiness connection ended");
            }
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, readiness: &Readiness) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/healthz/ready" => match readiness.check() {
            Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
