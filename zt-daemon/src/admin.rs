//! The agent's HTTP endpoints: readiness on `admin.readiness_addr` (default 0.0.0.0:15021),
//! `GET /healthz/ready`: 200 when the capture programs are attached and every configured workload
//! is enrolled and, with an identity provider, holds a valid certificate; 503 with the reason
//! otherwise. Metrics on `admin.metrics_addr` (default 0.0.0.0:15020), `GET /metrics`.
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

use crate::{config::WorkloadId, identity::tls::SvidSlot, metrics::Metrics};

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

/// What an endpoint answers for a path: status, content type and body.
pub type Reply = (StatusCode, &'static str, String);

/// Serves `route` over HTTP/1 on `addr` until the task is dropped; `what` names it in logs.
pub async fn serve<R>(addr: SocketAddr, what: &'static str, route: R) -> std::io::Result<()>
where
    R: Fn(&str) -> Reply + Clone + Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(endpoint = what, error = %e, "accept failed");
                continue;
            }
        };
        let route = route.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, content_type, body) = route(req.uri().path());
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
                    response
                        .headers_mut()
                        .insert(hyper::header::CONTENT_TYPE, v);
                }
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(endpoint = what, %peer, error = %e, "connection ended");
            }
        });
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

fn not_found() -> Reply {
    (StatusCode::NOT_FOUND, TEXT, "not found\n".to_owned())
}

/// `GET /healthz/ready`.
pub fn readiness_route(readiness: Readiness) -> impl Fn(&str) -> Reply + Clone + Send + Sync {
    move |path| match path {
        "/healthz/ready" => match readiness.check() {
            Ok(()) => (StatusCode::OK, TEXT, "ready\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        _ => not_found(),
    }
}

/// `GET /metrics`, the Prometheus text format.
pub fn metrics_route(metrics: Arc<Metrics>) -> impl Fn(&str) -> Reply + Clone + Send + Sync {
    move |path| match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.encode(),
        ),
        _ => not_found(),
    }
}
