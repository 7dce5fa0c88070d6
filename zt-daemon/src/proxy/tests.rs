//! The data path in one process, without root: the real outbound, tunnel, inbound and copy code
//! over real sockets, real mutual TLS 1.3 (a test CA) and real HTTP/2. What the kernel does in a
//! cluster is stood in for at the two seams the proxy has: original destinations come from a
//! table the test fills (`OriginalDstLookup`), and a workload's upstream sockets are bound to its
//! own loopback address (`UpstreamSockets`). Each test bed has its own 127.77.<bed>.0/24, so pods
//! can listen on the real HBONE port side by side; the root suite covers capture itself.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};
use zt_common::HBONE_PORT;

use super::*;
use crate::{
    config::{MtlsMode, PolicyConfig, PolicyDefault},
    directory::NodeWorkloads,
    egress::EgressDefault,
    enrollment::{LocalWorkload, PodConnection, UpstreamSockets},
    identity::{
        ca::CertificateAuthority,
        revocation::RevocationList,
        spiffe::SpiffeId,
        tls::{SvidSlot, client_config},
        verify::{TrustState, TrustStore},
    },
    services::{ServiceFacts, ServiceName, ServicePort, SliceFacts},
    source_limit::SourceLimit,
    tunnel::{
        hbone::{self, EARLY_BYTES},
        pool::Pool,
        stream::ANSWER_HOLD,
    },
    workload::{Workload, WorkloadId},
};

const TRUST_DOMAIN: &str = "cluster.local";
const APP_PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(10);
/// Namespace `shop` refuses the `batch` service account of namespace `jobs`.
const DENY_BATCH: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-batch, namespace: shop}
spec:
  action: DENY
  rules:
  - from:
    - source: {principals: [cluster.local/ns/jobs/sa/batch]}
";

/// Sockets of a pod: bound to the pod's address, so its peers see where it connects from.
struct PodAddress(IpAddr);

impl UpstreamSockets for PodAddress {
    fn upstream_socket(&self, dst: SocketAddr) -> std::io::Result<TcpSocket> {
        let socket = if dst.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(self.0, 0))?;
        Ok(socket)
    }

    fn abort_connection(&self, connection: &PodConnection) -> std::io::Result<()> {
        crate::enrollment::sock_diag::abort_connection(connection)
    }

    fn idle_for(
        &self,
        connections: &[PodConnection],
    ) -> std::io::Result<Vec<Option<std::time::Duration>>> {
        connections
            .iter()
            .map(crate::enrollment::sock_diag::idle_for)
            .collect()
    }
}

/// What the kernel's sockops program records: (pod, source port) to original destination.
type DstTable = Arc<Mutex<HashMap<(u64, u16), SocketAddr>>>;

struct RecordedDsts(DstTable);

impl OriginalDstLookup for RecordedDsts {
    fn original_dst(&self, netns_cookie: u64, source_port: u16) -> Option<SocketAddr> {
        self.0
            .lock()
            .unwrap()
            .get(&(netns_cookie, source_port))
            .copied()
    }
}

struct Pod {
    local: Arc<LocalWorkload>,
    ip: IpAddr,
    /// Its 15001: where capture would send its connects.
    outbound: SocketAddr,
}

/// A bed's timeouts and limits.
struct Tuning {
    answer_hold: Duration,
    connect_timeout: Duration,
    max_connections_per_workload: usize,
    hbone_connections_per_source: usize,
    handshakes_per_source: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            answer_hold: ANSWER_HOLD,
            connect_timeout: WAIT,
            max_connections_per_workload: 100,
            hbone_connections_per_source: 512,
            handshakes_per_source: 16,
        }
    }
}

struct Bed {
    net: u8,
    ca: CertificateAuthority,
    ctx: Arc<ProxyContext>,
    dsts: DstTable,
    mesh: Mutex<HashMap<IpAddr, SpiffeId>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    _policy_dir: tempfile::TempDir,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().iter() {
            task.abort();
        }
    }
}

fn spiffe_id(namespace: &str, service_account: &str) -> SpiffeId {
    format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}")
        .parse()
        .unwrap()
}

impl Bed {
    /// A node with the given Istio policies (YAML, default allow), `mtls.mode` and egress.
    fn new(policies: &str, mtls: MtlsMode, egress: EgressPolicy) -> Self {
        Self::holding_answers(policies, mtls, egress, ANSWER_HOLD)
    }

    /// The same, with its CONNECT answers held up to `answer_hold` for the application's reply.
    fn holding_answers(
        policies: &str,
        mtls: MtlsMode,
        egress: EgressPolicy,
        answer_hold: Duration,
    ) -> Self {
        Self::tuned(
            policies,
            mtls,
            egress,
            Tuning {
                answer_hold,
                ..Tuning::default()
            },
        )
    }

    /// The same, with the timeouts and limits of `tuning`.
    fn tuned(policies: &str, mtls: MtlsMode, egress: EgressPolicy, tuning: Tuning) -> Self {
        let Tuning {
            answer_hold,
            connect_timeout,
            max_connections_per_workload,
            hbone_connections_per_source,
            handshakes_per_source,
        } = tuning;
        static BEDS: AtomicU8 = AtomicU8::new(1);
        let net = BEDS.fetch_add(1, Ordering::Relaxed);
        let ca = CertificateAuthority::generate(TRUST_DOMAIN.parse().unwrap()).unwrap();
        let trust = TrustStore::new(
            TrustState::new(
                HashMap::from([(TRUST_DOMAIN.parse().unwrap(), vec![ca.root().clone()])]),
                RevocationList::default(),
            )
            .unwrap(),
        );
        let policy_dir = tempfile::tempdir().unwrap();
        let policy_file = policy_dir.path().join("policies.yaml");
        std::fs::write(&policy_file, policies).unwrap();
        // An empty file is refused as half-written: no policies is no file.
        let policy_file = (!policies.is_empty()).then_some(policy_file);
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let policy = PolicyStore::start(
            &PolicyConfig {
                dir: policy_file,
                default: PolicyDefault::Allow,
                root_namespace: "zt-system".into(),
            },
            mtls,
            metrics.policy_load_health(),
        );
        if let Some(failure) = policy.status().failure() {
            panic!("the test's policies do not load: {failure}");
        }
        let dsts = DstTable::default();
        let ctx = Arc::new(ProxyContext {
            dsts: Box::new(RecordedDsts(dsts.clone())),
            directory: MeshDirectory::default(),
            egress: std::sync::RwLock::new(Arc::new(egress)),
            splicer: None,
            direct: None,
            tunnel: Some(Tunnel {
                trust: trust.clone(),
                handshake_timeout: WAIT,
                connect_timeout,
                pool: Arc::new(Pool::new(trust, Duration::from_secs(60))),
                handshakes: SourceLimit::new(handshakes_per_source),
                established: SourceLimit::new(hbone_connections_per_source),
                max_streams_per_connection: 100,
                hbone_idle_timeout: Duration::from_secs(60),
                answer_hold,
            }),
            policy,
            metrics,
            idle_timeout: Duration::from_secs(60),
            connect_timeout,
            max_connections_per_workload,
            drain_timeout: Duration::from_secs(1),
            draining: tokio::sync::watch::channel(false).0,
        });
        Self {
            net,
            ca,
            ctx,
            dsts,
            mesh: Mutex::default(),
            tasks: Mutex::default(),
            _policy_dir: policy_dir,
        }
    }

    fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 77, self.net, host))
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.lock().unwrap().push(tokio::spawn(task));
    }

    /// Enrolls pod `name` of `namespace` (service account `service_account`) at 127.77.<bed>.<host>,
    /// with a fresh SVID, its 15001 and 15008 listeners served, and publishes it in the mesh.
    async fn pod(&self, host: u8, namespace: &str, name: &str, service_account: &str) -> Pod {
        let ip = self.ip(host);
        let id = spiffe_id(namespace, service_account);
        let svid = self.ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let workload = Workload {
            id: WorkloadId {
                namespace: namespace.into(),
                name: name.into(),
            },
            service_account: service_account.into(),
            labels: Default::default(),
            netns: PathBuf::from(format!("/test/{name}")),
            probe_ports: vec![],
        };
        let local = Arc::new(LocalWorkload::new(
            workload,
            u64::from(host),
            vec![ip],
            Box::new(PodAddress(ip)),
            Some(SvidSlot::new(svid)),
            self.ctx.max_connections_per_workload,
        ));
        let outbound = TcpListener::bind((ip, 0)).await.unwrap();
        let outbound_addr = outbound.local_addr().unwrap();
        let hbone = TcpListener::bind((ip, HBONE_PORT)).await.unwrap();
        self.spawn(outbound::serve(outbound, local.clone(), self.ctx.clone()));
        self.spawn(inbound::serve_hbone(hbone, local.clone(), self.ctx.clone()));
        let mut mesh = self.mesh.lock().unwrap();
        mesh.insert(ip, id);
        self.ctx
            .directory
            .publish_node(mesh.clone(), NodeWorkloads::default());
        Pod {
            local,
            ip,
            outbound: outbound_addr,
        }
    }

    /// An application at `addr` that echoes what it reads; counts the connections it accepted.
    async fn echo(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        let listener = TcpListener::bind(addr).await.unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        self.spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        accepted
    }

    /// What an application in `pod` gets from `connect(dst)`: a connection to its 15001, with
    /// `dst` recorded as its original destination.
    async fn connect(&self, pod: &Pod, dst: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(pod.ip, 0)).unwrap();
        let port = socket.local_addr().unwrap().port();
        self.dsts
            .lock()
            .unwrap()
            .insert((pod.local.netns_cookie, port), dst);
        socket.connect(pod.outbound).await.unwrap()
    }

    /// The sum of the samples of `name` whose labels contain every one of `labels`.
    fn metric(&self, name: &str, labels: &[&str]) -> u64 {
        self.ctx
            .metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|m| l.contains(m)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Waits until `metric` reaches `at_least`.
    async fn wait_metric(&self, name: &str, labels: &[&str], at_least: u64) {
        let waited = tokio::time::timeout(WAIT, async {
            while self.metric(name, labels) < at_least {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "{name}{labels:?} stayed below {at_least}:\n{}",
            self.ctx.metrics.encode()
        );
    }
}

/// Writes `payload`, half-closes, and returns everything read back until EOF.
async fn round_trip(mut stream: TcpStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(payload).await?;
    stream.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut back))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    Ok(back)
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[tokio::test]
async fn a_connection_to_a_meshed_pod_crosses_the_tunnel_intact_as_both_identities() {
    let bed = Bed::new("", MtlsMode::Strict, EgressPolicy::default());
    let web = bed.pod(1, "shop", "web-1", "web").await;
    let db = bed.pod(2, "shop", "db-1", "db").await;
    let app = SocketAddr::new(db.ip, APP_PORT);
    bed.echo(app).await;

    let data = payload(1 << 20);
    let back = round_trip(bed.connect(&web, app).await, &data)
        .await
        .unwrap();
    assert!(
        back == data,
        "{} bytes came back, not the 1 MiB sent",
        back.len()
    );

    // Both sides saw the other's verified identity, and the destination counted what arrived.
    let both = [
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/web\"",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/db\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    for reporter in ["reporter=\"source\"", "reporter=\"destination\""] {
        let labels = [&both[..], &[reporter]].concat();
        bed.wait_metric("zt_tcp_connections_closed_total", &labels, 1)
            .await;
    }
    // Each byte counted once on each side, whether it went with the CONNECT or after it.
    for reporter in ["reporter=\"source\"", "reporter=\"destination\""] {
        for metric in ["zt_tcp_received_bytes_total", "zt_tcp_sent_bytes_total"] {
            assert_eq!(
                bed.metric(metric, &[reporter]),
                data.len() as u64,
                "{metric}{{{reporter}}}"
            );
        }
    }
}

#[tokio::test]
async fn bytes_sent_before_the_tunnel_opened_reach_an_allowed_peer_once_and_a_denied_one_never() {
    let bed = Bed::new(DENY_BATCH, MtlsMode::Strict, EgressPolicy::default());
    let web = bed.pod(1, "shop", "web-1", "web").await;
    let batch = bed.pod(2, "jobs", "batch-1", "batch").await;
    let db = bed.pod(3, "shop", "db-1", "db").await;
    let app = SocketAddr::new(db.ip, APP_PORT);
    let accepted = bed.echo(app).await;
    // A client that speaks first: on this single-threaded runtime its request is in the socket
    // before the agent's accept runs, so it goes with the CONNECT.
    let request = b"GET / HTTP/1.1\r\n\r\n";
    for (pod, allowed) in [(&web, true), (&batch, false), (&web, true)] {
        let before = accepted.load(Ordering::SeqCst);
        let mut stream = bed.connect(pod, app).await;
        stream.write_all(request).await.unwrap();
        let back = round_trip(stream, b"").await;
        if allowed {
            assert_eq!(back.unwrap(), request);
        } else {
            assert!(back.is_err(), "denied, yet answered {back:?}");
            // Refused before anything was dialled: the application never saw the bytes.
            assert_eq!(accepted.load(Ordering::SeqCst), before);
        }
    }
}

/// A destination whose HBONE side (real TLS and HTTP/2, with an SVID of `namespace`/`sa`) says
/// when a CONNECT's headers arrived, and answers it only once `wanted` bytes of its body have
/// (`None`: once the body ended), echoing them: a client whose bytes (or end) wait for the
/// answer is never answered.
async fn answering_after_the_body(
    bed: &Bed,
    host: u8,
    namespace: &str,
    sa: &str,
    wanted: Option<usize>,
) -> (IpAddr, tokio::sync::oneshot::Receiver<()>) {
    let ip = bed.ip(host);
    let id = spiffe_id(namespace, sa);
    let svid = bed.ca.issue(&id, Duration::from_secs(3600)).unwrap();
    let trust = bed.ctx.tunnel.as_ref().unwrap().trust.clone();
    let config = crate::identity::tls::server_config(SvidSlot::new(svid), trust).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((ip, HBONE_PORT)).await.unwrap();
    let (headers_arrived, arrived) = tokio::sync::oneshot::channel();
    bed.spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut connection = hbone::server_builder().handshake(tls).await.unwrap();
        let (request, mut respond) = connection.accept().await.unwrap().unwrap();
        let _ = headers_arrived.send(());
        tokio::spawn(async move {
            let mut body = request.into_body();
            let mut got = Vec::new();
            while wanted.is_none_or(|wanted| got.len() < wanted) {
                let Some(data) = body.data().await else { break };
                let data = data.unwrap();
                let _ = body.flow_control().release_capacity(data.len());
                got.extend_from_slice(&data);
            }
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            send.send_data(Bytes::from(got), true).unwrap();
            // Kept open until the client is done.
            let _ = body.data().await;
        });
        while connection.accept().await.is_some() {}
    });
    let mut mesh = bed.mesh.lock().unwrap();
    mesh.insert(ip, id);
    bed.ctx
        .directory
        .publish_node(mesh.clone(), NodeWorkloads::default());
    (ip, arrived)
}

/// `from`'s connection to an [`answering_after_the_body`] destination (`shop`/`db` on `host`),
/// once its CONNECT arrived there: what the client does next happens while the CONNECT waits.
async fn connected_awaiting_the_answer(
    bed: &Bed,
    from: &Pod,
    host: u8,
    wanted: Option<usize>,
) -> TcpStream {
    let (db, connect_arrived) = answering_after_the_body(bed, host, "shop", "db", wanted).await;
    let stream = bed.connect(from, SocketAddr::new(db, APP_PORT)).await;
    tokio::time::timeout(WAIT, connect_arrived)
        .await
        .expect("the CONNECT never arrived")
        .unwrap();
    stream
}

#[tokio::test]
async fn bytes_sent_after_the_connect_go_out_before_its_answer() {
    let bed = Bed::new("", MtlsMode::Strict, EgressPolicy::default());
    let web = bed.pod(1, "shop", "web-1", "web").await;
    let request = b"HELO after the CONNECT";
    let mut stream = connected_awaiting_the_answer(&bed, &web, 2, Some(request.len())).await;
    // The CONNECT is out, without the client's bytes: they follow it, unanswered.
    stream.write_all(request).await.unwrap();
    let mut back = vec![0; request.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut back))
        .await
        .expect("the client's bytes waited for the answer, which waited for them")
        .unwrap();
    assert_eq!(back, request);
}

/// A client that half-closes while its CONNECT waits for the answer, with bytes or without:
/// the end follows them on the stream, so a destination that answers only at the end answers.
#[tokio::test]
async fn a_half_close_before_the_answer_goes_out_with_the_early_bytes() {
    let bed = Bed::new("", MtlsMode::Strict, EgressPolicy::default());
    let web = bed.pod(1, "shop", "web-1", "web").await;
    for (host, request) in [(2, b"HELO, then the end".as_slice()), (3, b"".as_slice())] {
        let mut stream = connected_awaiting_the_answer(&bed, &web, host, None).await;
        stream.write_all(request).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut back))
            .await
            .expect("the client's end waited for the answer, which waited for it")
            .unwrap();
        assert_eq!(back, request);
    }
}

#[tokio::test]
async fn replicas_sharing_a_service_account_each_get_their_own_pooled_connection() {
    let bed = Bed::new("", MtlsMode::Strict, EgressPolicy::default());
    let web1 = bed.pod(1, "shop", "web-1", "web").await;
    let web2 = bed.pod(2, "shop", "web-2", "web").await;
    let db = bed.pod(3, "shop", "db-1", "db").await;
    let app = SocketAddr::new(db.ip, APP_PORT);
    bed.echo(app).await;
    for pod in [&web1, &web1, &web2, &web2, &web1] {
        let back = round_trip(bed.connect(pod, app).await, b"ping")
            .await
            .unwrap();
        assert_eq!(back, b"ping");
    }
    let pool = bed.ctx.tunnel.as_ref().unwrap().pool.snapshot();
    assert_eq!(
        pool.len(),
        2,
        "five connections from two pods of one service account: one pooled connection per pod"
    );
}

#[tokio::test]
async fn a_policy_denial_and_an_unreachable_app_are_refused_and_counted() {
    let bed = Bed::new(DENY_BATCH, MtlsMode::Strict, EgressPolicy::default());
    let batch = bed.pod(1, "jobs", "batch-1", "batch").await;
    let web = bed.pod(2, "shop", "web-1", "web").await;
    let db = bed.pod(3, "shop", "db-1", "db").await;
    let app = SocketAddr::new(db.ip, APP_PORT);
    bed.echo(app).await;

    // Denied: the application sees its connection reset, with nothing relayed.
    assert!(
        round_trip(bed.connect(&batch, app).await, b"x")
            .await
            .is_err()
    );
    bed.wait_metric(
        "zt_policy_decisions_total",
        &["action=\"deny\"", "reason=\"policy\""],
        1,
    )
    .await;
    // Allowed, but nothing listens on the port: the destination answers 503.
    let closed = SocketAddr::new(db.ip, APP_PORT + 1);
    assert!(
        round_trip(bed.connect(&web, closed).await, b"x")
            .await
            .is_err()
    );
    bed.wait_metric(
        "zt_hbone_streams_refused_total",
        &["reason=\"application_unreachable\""],
        1,
    )
    .await;
    // And the allowed peer still gets through.
    let back = round_trip(bed.connect(&web, app).await, b"ok")
        .await
        .unwrap();
    assert_eq!(back, b"ok");
}

#[tokio::test]
async fn outbound_refusals_reset_the_application_and_are_counted_by_reason() {
    let locked = EgressPolicy {
        default: EgressDefault::Deny,
        ..EgressPolicy::default()
    };
    let bed = Bed::new("", MtlsMode::Strict, locked);
    let web = bed.pod(1, "shop", "web-1", "web").await;
    // Outside the mesh, with egress locked down.
    let outside = SocketAddr::new(bed.ip(200), APP_PORT);
    bed.echo(outside).await;
    assert!(
        round_trip(bed.connect(&web, outside).await, b"x")
            .await
            .is_err()
    );
    bed.wait_metric(
        "zt_outbound_refusals_total",
        &["reason=\"egress_denied\""],
        1,
    )
    .await;

    // A Service whose endpoints are all gone.
    let service = ServiceName {
        namespace: "shop".into(),
        name: "empty".into(),
    };
    let cluster_ip = bed.ip(100);
    bed.ctx.directory.update_services(|table| {
        table.upsert_service(ServiceFacts {
            name: service.clone(),
            cluster_ips: vec![cluster_ip],
            ports: vec![ServicePort {
                port: 80,
                name: String::new(),
            }],
        });
        table.upsert_slice(SliceFacts {
            service,
            name: "empty-1".into(),
            ipv6: false,
            ports: vec![(String::new(), APP_PORT)],
            ready: vec![],
        });
    });
    let to_service = bed.connect(&web, SocketAddr::new(cluster_ip, 80)).await;
    assert!(round_trip(to_service, b"x").await.is_err());
    bed.wait_metric(
        "zt_outbound_refusals_total",
        &["reason=\"no_endpoints\""],
        1,
    )
    .await;

    // A connection the kernel did not capture (no original destination) is closed unserved.
    let mut uncaptured = TcpStream::connect(web.outbound).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(WAIT, uncaptured.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
}

/// A client of the destination's 15008 that holds a valid SVID of the mesh, connects from
/// `from` and sends whatever request it likes: the adversary of the CONNECT checks. Returns the
/// status, or where the exchange broke.
async fn raw_stream(
    bed: &Bed,
    from: IpAddr,
    to: &Pod,
    id: &SpiffeId,
    request: http::Request<()>,
) -> Result<http::StatusCode, String> {
    let send = hbone_client(bed, from, to, id).await?;
    let exchange = async {
        let mut send = send.ready().await?;
        let (response, _) = send.send_request(request, true)?;
        Ok::<_, h2::Error>(response.await?.status())
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| format!("stream: {e}"))
}

/// An HTTP/2 connection to `to`'s 15008 from `from`, presenting a fresh SVID of `id`.
async fn hbone_client(
    bed: &Bed,
    from: IpAddr,
    to: &Pod,
    id: &SpiffeId,
) -> Result<h2::client::SendRequest<Bytes>, String> {
    let slot = SvidSlot::new(bed.ca.issue(id, Duration::from_secs(600)).unwrap());
    let trust = bed.ctx.tunnel.as_ref().unwrap().trust.clone();
    let config = client_config(slot, trust, None).unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let tcp = socket
        .connect(SocketAddr::new(to.ip, HBONE_PORT))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(to.ip.into(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (send, connection) = hbone::client_builder()
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(send)
}

/// An application at `addr` that, for each connection, reads what comes, tells the test, and
/// replies with `reply` once the test says (`None`: hangs up without a word).
async fn replying_when_told(
    bed: &Bed,
    addr: SocketAddr,
) -> (
    tokio::sync::mpsc::Receiver<Vec<u8>>,
    tokio::sync::mpsc::Sender<Option<&'static [u8]>>,
) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let (got_tx, got) = tokio::sync::mpsc::channel(4);
    let (reply, mut reply_rx) = tokio::sync::mpsc::channel::<Option<&'static [u8]>>(4);
    bed.spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = vec![0; 1024];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let _ = got_tx.send(buf[..n].to_vec()).await;
            match reply_rx.recv().await.flatten() {
                Some(reply) => {
                    stream.write_all(reply).await.unwrap();
                    // Kept open: the answer must not wait for the end.
                    let _ = stream.read(&mut buf).await;
                }
                None => drop(stream),
            }
        }
    });
    (got, reply)
}

/// Pods `shop/web-1` and `shop/db-1` on a node that holds CONNECT answers up to `hold`, and
/// db's application address.
async fn holding_answers(hold: Duration) -> (Bed, Pod, Pod, SocketAddr) {
    let bed = Bed::holding_answers("", MtlsMode::Strict, EgressPolicy::default(), hold);
    let web = bed.pod(1, "shop", "web-1", "web").await;
    let db = bed.pod(2, "shop", "db-1", "db").await;
    let app = SocketAddr::new(db.ip, APP_PORT);
    (bed, web, db, app)
}

/// A CONNECT to `app`.
fn connect_request(app: SocketAddr) -> http::Request<()> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(app.to_string())
        .body(())
        .unwrap()
}

/// A CONNECT sent with its request's bytes: its answer waits for the application's reply and
/// arrives with it (one write for both, so the client's agent wakes once); one without bytes is
/// answered at once, whatever the hold; an application that hangs up is answered with the end.
#[tokio::test]
async fn a_connects_answer_waits_for_the_applications_reply_and_arrives_with_it() {
    let (bed, web, db, app) = holding_answers(Duration::from_secs(3600)).await;
    let (mut got, reply) = replying_when_told(&bed, app).await;
    let mut client = hbone_client(&bed, web.ip, &db, &spiffe_id("shop", "web"))
        .await
        .unwrap();
    let connect = || connect_request(app);

    // With the request: held until the application replies, then with the reply.
    client = client.ready().await.unwrap();
    let (response, mut send) = client.send_request(connect(), false).unwrap();
    send.send_data(Bytes::from_static(b"GET /"), false).unwrap();
    let request = tokio::time::timeout(WAIT, got.recv()).await.unwrap();
    assert_eq!(request.as_deref(), Some(b"GET /".as_slice()));
    tokio::pin!(response);
    // The application has the request and has not replied: no answer yet (an answer sent at
    // once would be here well within this).
    let early = tokio::time::timeout(Duration::from_millis(200), &mut response).await;
    assert!(early.is_err(), "answered before the reply: {early:?}");
    reply.send(Some(b"200 OK")).await.unwrap();
    let answer = tokio::time::timeout(WAIT, response).await.unwrap().unwrap();
    assert_eq!(answer.status(), http::StatusCode::OK);
    let mut body = answer.into_body();
    let with_answer = body.poll_data(&mut std::task::Context::from_waker(std::task::Waker::noop()));
    assert!(
        matches!(&with_answer, std::task::Poll::Ready(Some(Ok(data))) if data == "200 OK"),
        "the reply did not arrive with the answer: {with_answer:?}"
    );
    // Done: the application takes the end and its next connection.
    send.send_data(Bytes::new(), true).unwrap();

    // Without the request's bytes (a client that waits for the answer): answered at once.
    client = client.ready().await.unwrap();
    let (response, mut send) = client.send_request(connect(), false).unwrap();
    let answer = tokio::time::timeout(WAIT, response).await;
    assert_eq!(answer.unwrap().unwrap().status(), http::StatusCode::OK);
    send.send_data(Bytes::new(), true).unwrap();
    let request = tokio::time::timeout(WAIT, got.recv()).await.unwrap();
    assert_eq!(request.as_deref(), Some(b"".as_slice()));
    reply.send(None).await.unwrap();

    // An application that reads the request and hangs up: the answer ends the stream.
    client = client.ready().await.unwrap();
    let (response, mut send) = client.send_request(connect(), false).unwrap();
    send.send_data(Bytes::from_static(b"bye"), false).unwrap();
    let request = tokio::time::timeout(WAIT, got.recv()).await.unwrap();
    assert_eq!(request.as_deref(), Some(b"bye".as_slice()));
    reply.send(None).await.unwrap();
    let answer = tokio::time::timeout(WAIT, response).await.unwrap().unwrap();
    assert_eq!(answer.status(), http::StatusCode::OK);
    let mut body = answer.into_body();
    let end = tokio::time::timeout(WAIT, body.data()).await.unwrap();
    assert!(end.is_none(), "{end:?}");

    // As much as a zt client sends ahead, after which it waits for the answer: answered at once.
    client = client.ready().await.unwrap();
    let (response, mut send) = client.send_request(connect(), false).unwrap();
    send.send_data(Bytes::from(vec![7; EARLY_BYTES]), false)
        .unwrap();
    let answer = tokio::time::timeout(WAIT, response).await;
    assert_eq!(answer.unwrap().unwrap().status(), http::StatusCode::OK);
    let request = tokio::time::timeout(WAIT, got.recv()).await.unwrap();
    assert!(request.is_some_and(|r| !r.is_empty()));
    reply.send(None).await.unwrap();
}

/// A request longer than a zt client sends ahead, whose first bytes alone came with the CONNECT
/// and whose application replies only once it has all of it: once the stream has carried
/// [`EARLY_BYTES`] the client sends no more before the answer, so the answer goes then, not
/// when the hold runs out.
#[tokio::test]
async fn a_held_answer_goes_once_the_client_has_sent_all_it_sends_ahead() {
    let (bed, web, db, app) = holding_answers(Duration::from_secs(3600)).await;
    // What comes with the CONNECT, and what the request has beyond what goes ahead.
    const FIRST: usize = 4096;
    const REQUEST: usize = EARLY_BYTES + 4096;
    let listener = TcpListener::bind(app).await.unwrap();
    let (received_tx, mut received) = tokio::sync::watch::channel(0);
    bed.spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = vec![0; REQUEST];
        let mut got = 0;
        while got < REQUEST {
            match stream.read(&mut buf[got..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
            let _ = received_tx.send(got);
        }
        stream.write_all(b"all of it").await.unwrap();
        let _ = stream.read(&mut buf).await;
    });
    let client = hbone_client(&bed, web.ip, &db, &spiffe_id("shop", "web"))
        .await
        .unwrap();
    let mut client = client.ready().await.unwrap();
    let (response, mut send) = client.send_request(connect_request(app), false).unwrap();
    // Relayed, and still held: the answer was held on the first bytes, and holds until the
    // stream has carried all a zt client sends ahead (an answer sent earlier would be here well
    // within the wait).
    tokio::pin!(response);
    for (fill, upto) in [(1, FIRST), (2, EARLY_BYTES - 1)] {
        let sent = *received.borrow();
        send.send_data(Bytes::from(vec![fill; upto - sent]), false)
            .unwrap();
        tokio::time::timeout(WAIT, received.wait_for(|n| *n >= upto))
            .await
            .unwrap()
            .unwrap();
        let early = tokio::time::timeout(Duration::from_millis(200), &mut response).await;
        assert!(early.is_err(), "answered at {upto} bytes: {early:?}");
    }
    // Its last byte: then the client waits, and so the answer goes.
    send.send_data(Bytes::from_static(&[3]), false).unwrap();
    let answer = tokio::time::timeout(WAIT, response)
        .await
        .expect("the answer waited for the hold while the client waited for it")
        .unwrap();
    assert_eq!(answer.status(), http::StatusCode::OK);
    send.send_data(Bytes::from(vec![4; REQUEST - EARLY_BYTES]), false)
        .unwrap();
    let mut body = answer.into_body();
    let reply = tokio::time::timeout(WAIT, body.data()).await.unwrap();
    assert_eq!(reply.unwrap().unwrap(), "all of it");
}

/// An application that resets on reading the request while the answer waits for its reply (the
/// reset goes alone, HTTP/2 drops a queued answer): the source's application sees a reset, and
/// its agent counts a relayed connection that the upstream reset, not a tunnel that failed.
#[tokio::test]
async fn a_reset_before_the_held_answer_is_counted_as_the_upstreams_reset() {
    let (bed, web, _db, app) = holding_answers(Duration::from_secs(3600)).await;
    let listener = TcpListener::bind(app).await.unwrap();
    bed.spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.read(&mut [0; 64]).await;
            crate::copy::Abort::abort(&mut stream);
        }
    });
    // Written while the pool dials: it goes with the CONNECT, so the answer is held.
    let mut stream = bed.connect(&web, app).await;
    stream.write_all(b"GET /").await.unwrap();
    let read = tokio::time::timeout(WAIT, stream.read(&mut [0; 8])).await;
    assert_eq!(
        read.unwrap().map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    let source = "reporter=\"source\"";
    bed.wait_metric("zt_tcp_connections_closed_total", &[source], 1)
        .await;
    assert_eq!(bed.metric("zt_tcp_received_bytes_total", &[source]), 5);
    assert_eq!(bed.metric("zt_outbound_refusals_total", &[]), 0);
}

/// An application that does not reply within the hold: the answer goes alone, and the reply
/// follows whenever it comes.
#[tokio::test]
async fn an_answer_held_past_its_time_goes_alone() {
    let (bed, web, db, app) = holding_answers(Duration::from_millis(20)).await;
    let (mut got, reply) = replying_when_told(&bed, app).await;
    let client = hbone_client(&bed, web.ip, &db, &spiffe_id("shop", "web"))
        .await
        .unwrap();
    let mut client = client.ready().await.unwrap();
    let (response, mut send) = client.send_request(connect_request(app), false).unwrap();
    send.send_data(Bytes::from_static(b"slow?"), false).unwrap();
    let answer = tokio::time::timeout(WAIT, response).await.unwrap().unwrap();
    assert_eq!(answer.status(), http::StatusCode::OK);
    let request = tokio::time::timeout(WAIT, got.recv()).await.unwrap();
    assert_eq!(request.as_deref(), Some(b"slow?".as_slice()));
    reply.send(Some(b"yes")).await.unwrap();
    let mut body = answer.into_body();
    let data = tokio::time::timeout(WAIT, body.data()).await.unwrap();
    assert_eq!(data.unwrap().unwrap(), "yes");
}

#[tokio::test]
async fn connect_streams_that_are_not_for_this_pod_are_refused_with_their_status() {
    let bed = Bed::new("", MtlsMode::Strict, EgressPolicy::default());
    let web = bed.pod(1, "shop", "web-1", "web").await;
    let db = bed.pod(2, "shop", "db-1", "db").await;
    let web_id = spiffe_id("shop", "web");
    let connect = |authority: &str| {
        http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .body(())
            .unwrap()
    };
    let cases = [
        // Another pod's address: the agent is not an open proxy.
        (connect(&format!("{}:80", web.ip)), 403, "not_this_pod"),
        // One of the agent's own ports: would loop.
        (connect(&format!("{}:15001", db.ip)), 403, "not_this_pod"),
        (
            http::Request::get(format!("http://{}:80/", db.ip))
                .body(())
                .unwrap(),
            405,
            "not_connect",
        ),
    ];
    for (request, status, reason) in cases {
        let label = format!("reason=\"{reason}\"");
        let before = bed.metric("zt_hbone_streams_refused_total", &[&label]);
        let got = raw_stream(&bed, web.ip, &db, &web_id, request).await;
        assert_eq!(got.map(|s| s.as_u16()), Ok(status), "{reason}");
        bed.wait_metric("zt_hbone_streams_refused_total", &[&label], before + 1)
            .await;
    }
}

#[tokio::test]
async fn a_certificate_presented_from_another_pods_address_is_refused() {
    let bed = Bed::new("", MtlsMode::Strict, EgressPolicy::default());
    let web = bed.pod(1, "shop", "web-1", "web").await;
    let db = bed.pod(2, "shop", "db-1", "db").await;
    let request = |dst: IpAddr| {
        http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("{dst}:{APP_PORT}"))
            .body(())
            .unwrap()
    };
    // `batch`'s key, used from web-1's address: the connection is closed before any stream.
    let stolen = spiffe_id("jobs", "batch");
    let refused = raw_stream(&bed, web.ip, &db, &stolen, request(db.ip)).await;
    assert!(refused.is_err(), "answered {refused:?}");
    bed.wait_metric(
        "zt_tls_handshake_failures_total",
        &["reason=\"source_address_mismatch\""],
        1,
    )
    .await;
    // The same request with web's own identity is served (the app is not there: 503).
    let own = raw_stream(&bed, web.ip, &db, &spiffe_id("shop", "web"), request(db.ip)).await;
    assert_eq!(own, Ok(http::StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test]
async fn plaintext_into_a_strict_pod_is_refused_and_counted() {
    let bed = Bed::new("", MtlsMode::Strict, EgressPolicy::default());
    let db = bed.pod(1, "shop", "db-1", "db").await;
    // What sk_lookup hands the pod's 15006 listener: a connection whose local address is the
    // one the client dialled (here the listener's own, as nothing steers on loopback).
    let plaintext = TcpListener::bind((db.ip, APP_PORT)).await.unwrap();
    let addr = plaintext.local_addr().unwrap();
    bed.spawn(inbound::serve_plaintext(
        plaintext,
        db.local.clone(),
        bed.ctx.clone(),
    ));
    let client = TcpStream::connect(addr).await.unwrap();
    assert!(round_trip(client, b"x").await.is_err());
    bed.wait_metric(
        "zt_policy_decisions_total",
        &["action=\"deny\"", "reason=\"mtls_required\""],
        1,
    )
    .await;
}

/// A destination agent that completes mutual TLS and HTTP/2 as `id` and then takes every
/// CONNECT without ever answering (stuck, or hostile): the source's agent gives the stream up
/// after twice its connect timeout and resets the application, rather than holding it for ever.
#[tokio::test]
async fn a_connect_the_destination_never_answers_is_given_up_and_the_application_reset() {
    let bed = Bed::tuned(
        "",
        MtlsMode::Strict,
        EgressPolicy::default(),
        Tuning {
            connect_timeout: Duration::from_millis(300),
            ..Tuning::default()
        },
    );
    let web = bed.pod(1, "shop", "web-1", "web").await;
    let mute = bed.ip(9);
    let id = spiffe_id("shop", "db");
    let slot = SvidSlot::new(bed.ca.issue(&id, Duration::from_secs(600)).unwrap());
    let trust = bed.ctx.tunnel.as_ref().unwrap().trust.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        crate::identity::tls::server_config(slot, trust).unwrap(),
    ));
    let listener = TcpListener::bind((mute, HBONE_PORT)).await.unwrap();
    let (taken, dials) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (count, dialled) = (taken.clone(), dials.clone());
    bed.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            dialled.fetch_add(1, Ordering::SeqCst);
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut connection) = hbone::server_builder().handshake::<_, Bytes>(tls).await
                else {
                    return;
                };
                let mut held = Vec::new();
                while let Some(Ok(stream)) = connection.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    held.push(stream);
                }
            });
        }
    });
    {
        let mut mesh = bed.mesh.lock().unwrap();
        mesh.insert(mute, id);
        bed.ctx
            .directory
            .publish_node(mesh.clone(), NodeWorkloads::default());
    }
    let dst = SocketAddr::new(mute, APP_PORT);
    for attempt in 1..=2 {
        let answer = round_trip(bed.connect(&web, dst).await, b"hello").await;
        let e = answer.expect_err("the mute destination answered");
        assert_ne!(
            e.kind(),
            std::io::ErrorKind::TimedOut,
            "attempt {attempt}: the application was left waiting"
        );
        assert_eq!(
            taken.load(Ordering::SeqCst),
            attempt,
            "the stream went there"
        );
        // The connection that never answered was given up too: each stream dialled anew.
        assert_eq!(dials.load(Ordering::SeqCst), attempt);
    }
    assert_eq!(bed.metric("zt_outbound_refusals_total", &[]), 2);
}

/// A peer holding authenticated HBONE connections, whose every stream policy refuses, cannot use
/// up the destination's connection budget: connections take none of it (their streams do), and
/// what one source address may hold is bounded on its own.
#[tokio::test]
async fn idle_hbone_connections_take_none_of_the_workloads_connections_and_are_bounded_per_source()
{
    let bed = Bed::tuned(
        DENY_BATCH,
        MtlsMode::Strict,
        EgressPolicy::default(),
        Tuning {
            max_connections_per_workload: 3,
            hbone_connections_per_source: 4,
            ..Tuning::default()
        },
    );
    let web = bed.pod(1, "shop", "web-1", "web").await;
    let db = bed.pod(2, "shop", "db-1", "db").await;
    let app = SocketAddr::new(db.ip, APP_PORT);
    bed.echo(app).await;
    let batch = spiffe_id("jobs", "batch");
    let adversary = bed.ip(50);
    // As many connections as db may have, and one more: each authenticated, each with a
    // stream policy refuses, all held open.
    let mut held = Vec::new();
    for n in 0..4 {
        let mut send = hbone_client(&bed, adversary, &db, &batch)
            .await
            .unwrap_or_else(|e| panic!("connection {n}: {e}"));
        let (response, _) = send.send_request(connect_request(app), false).unwrap();
        let status = tokio::time::timeout(WAIT, response)
            .await
            .unwrap()
            .unwrap()
            .status();
        assert_eq!(status, http::StatusCode::FORBIDDEN, "connection {n}");
        held.push(send);
    }
    // db's own connections still go through, in and out.
    for n in 0..2 {
        let echoed = round_trip(bed.connect(&web, app).await, b"still served").await;
        assert_eq!(echoed.unwrap(), b"still served", "connection {n} from web");
    }
    // The fifth connection from the same address is closed once authenticated.
    let fifth = async {
        let mut send = hbone_client(&bed, adversary, &db, &batch).await?;
        let (response, _) = send
            .send_request(connect_request(app), false)
            .map_err(|e| e.to_string())?;
        response
            .await
            .map(|r| r.status())
            .map_err(|e| e.to_string())
    };
    let fifth = tokio::time::timeout(WAIT, fifth).await.unwrap();
    assert!(fifth.is_err(), "a fifth connection was served: {fifth:?}");
    bed.wait_metric(
        "zt_hbone_streams_refused_total",
        &["reason=\"source_connections\""],
        1,
    )
    .await;
    drop(held);
}

#[tokio::test]
async fn a_handshake_refused_while_the_pod_has_too_many_pending_is_tried_again() {
    let bed = Bed::tuned(
        "",
        MtlsMode::Strict,
        EgressPolicy::default(),
        Tuning {
            handshakes_per_source: 1,
            ..Tuning::default()
        },
    );
    let web = bed.pod(1, "shop", "web-1", "web").await;
    let db = bed.pod(2, "shop", "db-1", "db").await;
    let app = SocketAddr::new(db.ip, APP_PORT);
    bed.echo(app).await;
    // Another socket of web's pod holds the one handshake its address may have pending: it
    // connects to db's 15008 and says nothing.
    let silent = TcpSocket::new_v4().unwrap();
    silent.bind(SocketAddr::new(web.ip, 0)).unwrap();
    let silent = silent
        .connect(SocketAddr::new(db.ip, HBONE_PORT))
        .await
        .unwrap();
    let handshakes = &bed.ctx.tunnel.as_ref().unwrap().handshakes;
    tokio::time::timeout(WAIT, async {
        while handshakes.sources() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the silent connection was never accepted");
    // web's application connects to db: its agent's handshake is refused (counted by db's side)...
    let app_connection = bed.connect(&web, app).await;
    let exchange = tokio::spawn(round_trip(app_connection, b"fan-out"));
    bed.wait_metric(
        "zt_tls_handshake_failures_total",
        &["reason=\"too_many_handshakes\""],
        1,
    )
    .await;
    // ... and passes once the pending one is gone: the application never knew.
    drop(silent);
    assert_eq!(exchange.await.unwrap().unwrap(), b"fan-out");
}
