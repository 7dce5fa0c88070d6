//! The agent's HTTP endpoints, each on its own address:
//! - readiness, `admin.readiness_addr` (0.0.0.0:15021): `GET /healthz/ready`, 200 when the capture
//!   programs are attached and every configured workload is enrolled and, with an identity
//!   provider, holds a valid certificate; 503 with the reason otherwise;
//! - metrics, `admin.metrics_addr` (0.0.0.0:15020): `GET /metrics`, Prometheus text;
//! - admin, `admin.admin_addr` (127.0.0.1:15000): `GET /config_dump` (JSON), `GET /logging`
//!   (the log filter) and `POST /logging?level=FILTER` (change it at runtime).
//!
//! Pods reach the first two: each endpoint bounds the connections one source address may hold,
//! closes a connection that does not send a request's headers in time and resets one that stops
//! taking its response, so neither idle nor stalled connections pile up in the agent.
use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock, atomic::Ordering},
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info, warn};

use crate::{
    config::AdminConfig, directory::MeshDirectory, enrollment::LocalWorkload,
    identity::tls::SvidSlot, metrics::Metrics, proxy::ProxyContext, source_limit::SourceLimit,
};

#[derive(Default, Clone)]
pub struct Readiness {
    /// This node's workloads, as the agent last published them.
    directory: MeshDirectory,
    /// Set on SIGTERM: a draining agent is never ready again.
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// Policy files that did not load: what is enforced is not what the operator wrote.
    policy: crate::policy::LoadStatus,
    /// Discovery cannot work: no client configuration, or the API refuses it (401/403), naming
    /// the verb and resource.
    discovery_failure: Arc<RwLock<Option<String>>>,
}

impl Readiness {
    /// Readiness of the workloads `directory` says this node has, that also requires the policy
    /// files on disk to be the ones in force.
    pub fn new(policy: crate::policy::LoadStatus, directory: MeshDirectory) -> Self {
        Self {
            policy,
            directory,
            ..Self::default()
        }
    }

    pub fn set_discovery_failure(&self, reason: Option<String>) {
        *self
            .discovery_failure
            .write()
            .unwrap_or_else(|p| p.into_inner()) = reason;
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// `Ok` when ready, else the first reason it is not.
    pub fn check(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining (shutting down)".into());
        }
        let inputs = self.directory.node();
        if !inputs.capture_started {
            return Err("capture programs not attached".into());
        }
        if let Some(reason) = &*self
            .discovery_failure
            .read()
            .unwrap_or_else(|p| p.into_inner())
        {
            return Err(format!("Kubernetes discovery: {reason}"));
        }
        if inputs.discovery_pending {
            return Err(
                "waiting for the first list of the cluster's pods and namespaces from Kubernetes"
                    .into(),
            );
        }
        if let Some(e) = self.policy.failure() {
            return Err(format!("policy files not in force: {e}"));
        }
        let now = SystemTime::now();
        for (id, enrolled) in &inputs.wanted {
            let Some(slot) = enrolled else {
                return Err(match inputs.failures.get(id) {
                    Some(reason) => {
                        format!("workload {id} is not enrolled (held fail-closed): {reason}")
                    }
                    None => format!("workload {id} is not enrolled"),
                });
            };
            if !inputs.identity_required {
                continue;
            }
            match slot.as_ref().and_then(SvidSlot::get) {
                None => return Err(format!("workload {id} has no valid certificate")),
                // Its issuer did not renew it in time (an outage, or a provider that stopped).
                Some(svid) if now >= svid.leaf.not_after => {
                    return Err(format!(
                        "workload {id} has no valid certificate: {} expired {} s ago and was not renewed",
                        svid.id(),
                        now.duration_since(svid.leaf.not_after)
                            .unwrap_or_default()
                            .as_secs()
                    ));
                }
                Some(svid) if now < svid.leaf.not_before => {
                    return Err(format!(
                        "workload {id} has no valid certificate: {} is not valid yet",
                        svid.id()
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Installs a new log filter, or says why it cannot.
type ApplyFilter = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// Changes the log filter at runtime; the binary wires it to its tracing subscriber.
#[derive(Clone)]
pub struct LogControl {
    current: Arc<RwLock<String>>,
    apply: Arc<ApplyFilter>,
}

impl LogControl {
    pub fn new(
        initial: &str,
        apply: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            current: Arc::new(RwLock::new(initial.to_owned())),
            apply: Arc::new(apply),
        }
    }

    pub fn current(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies `filter` (tracing's EnvFilter syntax); a bad one changes nothing. A bare word must
    /// be a level: tracing would read `verbose` as a target name and quietly log nothing.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        for directive in filter.split(',').map(str::trim) {
            if !directive.contains('=')
                && !LEVELS.contains(&directive.to_ascii_lowercase().as_str())
            {
                return Err(format!(
                    "{directive:?} is not a level ({}); a target needs TARGET=LEVEL",
                    LEVELS.join(", ")
                ));
            }
        }
        (self.apply)(filter)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = filter.to_owned();
        Ok(())
    }
}

/// The node's state as the admin and metrics endpoints see it; the agent republishes the
/// workload list after every reconcile.
#[derive(Clone)]
pub struct AdminState {
    pub node_name: String,
    pub readiness: Readiness,
    pub proxy: Arc<ProxyContext>,
    pub pin_dir: PathBuf,
    /// Who is where, this node's workloads included.
    pub directory: MeshDirectory,
    /// Issuance failures the identity provider counted (none without a provider).
    pub issuance: Option<crate::identity::rotation::Renewal>,
    pub log: LogControl,
}

impl AdminState {
    fn workloads(&self) -> Vec<Arc<LocalWorkload>> {
        self.directory.node().enrolled.clone()
    }

    /// Sets the gauges that are read off live state rather than counted as things happen.
    fn refresh_metrics(&self) {
        let metrics: &Metrics = &self.proxy.metrics;
        let workloads = self.workloads();
        metrics.workloads_enrolled.set(workloads.len() as i64);
        metrics.certificate_expiry.reset();
        for svid in workloads.iter().filter_map(|w| w.svid.as_ref()?.get()) {
            metrics
                .certificate_expiry
                .with_label_values(&[&svid.id().to_string()])
                .set(unix_seconds(svid.leaf.not_after) as i64);
        }
        if let Some(issuance) = &self.issuance {
            for (total, counter) in [
                (&issuance.failures, &metrics.identity_issue_failures),
                (&issuance.withdrawals, &metrics.identity_withdrawals),
            ] {
                let total = total.load(Ordering::Relaxed);
                counter.inc_by(total.saturating_sub(counter.get()));
            }
        }
    }

    /// `/config_dump`: workloads and their enrollment, identities with expiry, policies, eBPF
    /// pins, listeners and pooled connections.
    fn config_dump(&self) -> Value {
        let now = SystemTime::now();
        let workloads: Vec<Value> = self
            .workloads()
            .iter()
            .map(|w| {
                let svid = w.svid.as_ref().and_then(SvidSlot::get);
                let current = w.current();
                json!({
                    "workload": w.id.to_string(),
                    "service_account": current.service_account,
                    "labels": current.labels,
                    "netns": w.netns,
                    "netns_cookie": w.netns_cookie,
                    "addresses": w.addresses,
                    "enrolled": true,
                    "listeners": [
                        format!("[::]:{} (outbound)", zt_common::OUTBOUND_PORT),
                        format!("[::]:{} (inbound plaintext)", zt_common::INBOUND_PLAINTEXT_PORT),
                        format!("[::]:{} (HBONE)", zt_common::HBONE_PORT),
                    ],
                    "identity": svid.as_ref().map(|s| json!({
                        "spiffe_id": s.id().to_string(),
                        "serial": s.leaf.serial,
                        "not_before": unix_seconds(s.leaf.not_before),
                        "not_after": unix_seconds(s.leaf.not_after),
                        "expires_in_seconds": s.leaf.not_after.duration_since(now).map_or(0, |d| d.as_secs()),
                    })),
                })
            })
            .collect();
        let policies = self.proxy.policy.current();
        let pool: Vec<Value> = self
            .proxy
            .tunnel
            .as_ref()
            .map(|t| {
                t.pool
                    .snapshot()
                    .into_iter()
                    .map(|c| {
                        json!({
                            "source": c.key.source.to_string(),
                            "source_workload": c.key.source_workload.to_string(),
                            "source_netns_cookie": c.key.source_netns,
                            "destination": c.key.destination,
                            "expected_identity": c.key.expected.to_string(),
                            "connection": c.connection,
                            "active_streams": c.active_streams,
                            "expires": unix_seconds(c.expires),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        json!({
            "node": self.node_name,
            "workloads": workloads,
            "policies": {
                "count": policies.len(),
                "authorization_policies": policies.authorization_names(),
                "peer_authentications": policies.peer_authentication_names(),
            },
            "capture": {
                "pin_dir": self.pin_dir,
                "pins": pins(&self.pin_dir),
            },
            "pool": pool,
            "mesh_directory": self.directory.summary(),
            "log_level": self.log.current(),
        })
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Every pinned object under `dir` (programs, links, maps, per-pod sk_lookup links).
fn pins(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                out.push(rel.display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// What an endpoint answers: status, content type and body.
pub type Reply = (StatusCode, &'static str, String);

const TEXT: &str = "text/plain; charset=utf-8";

fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    (status, TEXT, body.into())
}

/// What one client may hold of an endpoint.
#[derive(Clone, Debug)]
pub struct EndpointLimits {
    /// A request's headers must arrive within this, counted from the connection's start or the
    /// previous response.
    pub header_read_timeout: Duration,
    /// A response that makes no progress this long (its client stopped reading) is reset.
    pub write_timeout: Duration,
    /// Connections each source address may have open; one per endpoint, so a flood of one does
    /// not block the others.
    pub per_source: SourceLimit,
}

impl EndpointLimits {
    pub fn new(config: &AdminConfig) -> Self {
        Self {
            header_read_timeout: config.header_read_timeout,
            write_timeout: config.write_timeout,
            per_source: SourceLimit::new(config.max_connections_per_source),
        }
    }
}

/// A client's connection whose writes must make progress: one that stops taking a response
/// (its receive window shut) would otherwise hold the response's memory and its source's slot
/// for as long as it likes. Past `limit` without progress the connection is reset.
struct WriteDeadline {
    stream: TcpStream,
    limit: Duration,
    /// Armed when a write could not proceed; disarmed by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteDeadline {
    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                // Linger 0: the close is a reset, and the kernel drops what it still queues.
                let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client took no bytes of the response for {limit:?}"),
                )))
            }
        }
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.progress(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.progress(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.progress(cx, polled)
    }
}

/// Serves `route` (method, path, query) over HTTP/1 on `addr` until the task is dropped; `what`
/// names the endpoint in logs.
pub async fn serve<R>(
    addr: SocketAddr,
    what: &'static str,
    limits: EndpointLimits,
    route: R,
) -> std::io::Result<()>
where
    R: Fn(&Method, &str, Option<&str>) -> Reply + Clone + Send + Sync + 'static,
{
    serve_on(TcpListener::bind(addr).await?, what, limits, route).await;
    Ok(())
}

/// [`serve`] on a listener already bound.
async fn serve_on<R>(listener: TcpListener, what: &'static str, limits: EndpointLimits, route: R)
where
    R: Fn(&Method, &str, Option<&str>) -> Reply + Clone + Send + Sync + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(endpoint = what, error = %e, "accept failed");
                // EMFILE and friends: back off briefly instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Per connection, not logged above debug: a flood must not flood the log too.
        let Some(slot) = limits.per_source.try_acquire(peer.ip()) else {
            debug!(endpoint = what, %peer, "connection refused: source at its connection limit");
            continue;
        };
        let route = route.clone();
        let header_read_timeout = limits.header_read_timeout;
        let stream = WriteDeadline {
            stream,
            limit: limits.write_timeout,
            stalled: None,
        };
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, content_type, body) =
                    route(req.method(), req.uri().path(), req.uri().query());
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(content_type),
                );
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(endpoint = what, %peer, error = %e, "connection ended");
            }
        });
    }
}

fn not_found() -> Reply {
    text(StatusCode::NOT_FOUND, "not found\n")
}

/// `GET /healthz/ready`.
pub fn readiness_route(
    readiness: Readiness,
) -> impl Fn(&Method, &str, Option<&str>) -> Reply + Clone + Send + Sync {
    move |_, path, _| match path {
        "/healthz/ready" => match readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => not_found(),
    }
}

/// `GET /metrics`, the Prometheus text format.
pub fn metrics_route(
    state: AdminState,
) -> impl Fn(&Method, &str, Option<&str>) -> Reply + Clone + Send + Sync {
    // One scrape at a time: refreshing adds the issuer's counts since the last scrape, so two at
    // once (two Prometheus replicas) would both add them, and one could encode while the other
    // had emptied the certificate gauges.
    let scraping = Arc::new(std::sync::Mutex::new(()));
    move |_, path, _| match path {
        "/metrics" => {
            let _one = scraping.lock().unwrap_or_else(|e| e.into_inner());
            state.refresh_metrics();
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                state.proxy.metrics.encode(),
            )
        }
        _ => not_found(),
    }
}

/// `/config_dump` and `/logging`, on the loopback admin address.
pub fn admin_route(
    state: AdminState,
) -> impl Fn(&Method, &str, Option<&str>) -> Reply + Clone + Send + Sync {
    move |method, path, query| match (path, method) {
        ("/config_dump", &Method::GET) => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&state.config_dump()).unwrap_or_default() + "\n",
        ),
        ("/logging", &Method::GET) => text(StatusCode::OK, format!("{}\n", state.log.current())),
        ("/logging", &Method::POST) => {
            let level = query.and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "level")
                    .map(|(_, v)| v.into_owned())
            });
            let Some(level) = level else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "missing ?level=FILTER (e.g. info,zt_daemon=debug)\n",
                );
            };
            match state.log.set(&level) {
                Ok(()) => {
                    info!(level, "log filter changed");
                    text(StatusCode::OK, format!("{level}\n"))
                }
                Err(why) => text(
                    StatusCode::BAD_REQUEST,
                    format!("level {level:?} refused: {why}\n"),
                ),
            }
        }
        ("/config_dump" | "/logging", _) => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Connects (with a receive buffer of `receive_buffer` bytes) and asks for `/metrics`, to
    /// be closed after the answer.
    fn request(addr: SocketAddr, receive_buffer: Option<usize>) -> std::net::TcpStream {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        if let Some(size) = receive_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        socket.connect(&addr.into()).expect("connect");
        let mut stream = std::net::TcpStream::from(socket);
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n")
            .expect("request");
        stream
    }

    /// The bytes read until the connection ended, and how it ended.
    fn read_all(stream: &mut std::net::TcpStream) -> (usize, io::Result<()>) {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return (total, Ok(())),
                Ok(n) => total += n,
                Err(e) => return (total, Err(e)),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_reading_its_response_is_reset_and_frees_its_place() {
        const BODY: usize = 16 << 20;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = EndpointLimits {
            header_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_millis(300),
            per_source: SourceLimit::new(1),
        };
        let server = tokio::spawn(serve_on(
            listener,
            "test",
            limits,
            |_: &Method, _: &str, _: Option<&str>| text(StatusCode::OK, "x".repeat(BODY)),
        ));
        let (stalled, refused, served) = tokio::task::spawn_blocking(move || {
            // Asks, and takes nothing of the answer: its window shuts after a few KiB.
            let mut stalled = request(addr, Some(4096));
            // While it holds the source's one place, the next connection is closed at once.
            let refused = read_all(&mut request(addr, None));
            // Once it is reset, the place is free again.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let served = loop {
                let answer = read_all(&mut request(addr, None));
                if answer.0 > BODY || std::time::Instant::now() > deadline {
                    break answer;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            (read_all(&mut stalled), refused, served)
        })
        .await
        .unwrap();
        server.abort();
        assert_eq!(refused.0, 0, "answered beyond the source's limit");
        assert!(served.0 > BODY, "the place never came back: {served:?}");
        assert!(stalled.0 < BODY, "the stalled client got the whole answer");
        assert_eq!(
            stalled.1.as_ref().map_err(io::Error::kind).err(),
            Some(io::ErrorKind::ConnectionReset),
            "{stalled:?}"
        );
    }
}
