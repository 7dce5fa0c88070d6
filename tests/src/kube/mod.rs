//! A real Kubernetes control plane in the test bed: etcd and kube-apiserver (built by
//! scripts/kube-apiserver.sh), run inside node 1's network namespace, for the tests of
//! Kubernetes discovery.
//!
//! - etcd listens on 127.0.0.1:2379 in node 1's netns (each bed has its own netns, so the fixed
//!   ports never clash); its data lives in the bed's directory.
//! - kube-apiserver serves https://10.200.0.1:6443 (node 1's end of the link between the
//!   nodes), which both nodes' agents reach. For changes made while the agents must not see the
//!   API, it can instead be started bound to 127.0.0.1 in node 1's netns only.
//! - The test process stays in the host netns and talks to the API through a relay: a listener
//!   on 127.0.0.1 in the host netns whose upstream sockets are made inside node 1's netns.
//! - Authentication: a static token for the test's admin (group system:masters); agents get
//!   service-account tokens from the TokenRequest API, in a kubeconfig with `tokenFile`.
//! - Both processes are the bed's children (logs in the bed's directory, killed by PID on drop)
//!   and stay in the test process's cgroup, outside the node cgroups the eBPF programs watch.
//!
//! No controller-manager, scheduler or kubelet runs: pods are created with `spec.nodeName` set
//! and their status (phase, IPs) is written by the test; a deleted namespace stays Terminating.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ::kube::Client;
use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{Testbed, in_cgroup_and_netns, wait_until};

mod apply;
pub mod bed;
mod credentials;
mod objects;
mod relay;

pub use apply::{render_kustomization, strategic_merge};
pub use credentials::AgentCredentials;
use credentials::{client_from_kubeconfig, kubeconfig_text};
pub use objects::{EndpointSliceSpec, PodSpec, ServicePortSpec, ServiceSpec, SliceEndpoint};
use relay::{Relay, connect_in_netns};

/// The API server's address on the link between the nodes (node 1's end), as agents see it.
pub const API_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)), 6443);
/// Where the API server listens when started private: loopback of node 1's netns only.
const PRIVATE_API_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 6443);
/// etcd's client port on node 1's loopback.
const ETCD_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 2379);
/// The namespace and service account of deploy/ (the agent's identity).
pub const AGENT_NAMESPACE: &str = "zt-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "zt-agent";
/// A service account bound to a role that may watch pods but not list them.
pub const RESTRICTED_SERVICE_ACCOUNT: &str = "zt-agent-no-pod-list";
/// The image of every test pod: nothing runs it (no kubelet).
const IMAGE: &str = "zt.io/test:none";
const FIELD_MANAGER: &str = "zt-tests";
/// How long the API server may take to become ready on a busy machine.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The directory holding `kube-apiserver` and `etcd` (see [`crate::GoComponent`]).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    crate::GoComponent {
        dir_env: "ZT_KUBE_BIN_DIR",
        script: "kube-apiserver.sh",
        pin: "K8S_VERSION",
        cache_dir: "k8s",
        binaries: ["kube-apiserver", "etcd"],
        needed_by: "the Kubernetes tests need a real kube-apiserver and etcd",
    }
    .dir()
}

/// etcd and kube-apiserver in a test bed, and an admin client for the test.
pub struct Cluster {
    rt: tokio::runtime::Runtime,
    client: Client,
    pub dir: PathBuf,
    node1_netns: PathBuf,
    bins: PathBuf,
    ca_pem: String,
    etcd_pid: u32,
    apiserver_pid: Option<u32>,
    apiserver_log: Option<PathBuf>,
    apiserver_starts: usize,
    relay: Relay,
}

impl Cluster {
    /// Starts etcd and kube-apiserver in node 1's netns, waits until the API server is ready,
    /// and connects the test's admin client through the relay.
    pub fn start(bed: &mut Testbed) -> anyhow::Result<Self> {
        let bins = bin_dir()?;
        let dir = bed.dir.join("kube");
        std::fs::create_dir_all(&dir)?;
        let node1_netns = bed.node(1).netns.clone();
        let ca_pem = write_certificates(&dir)?;
        let admin_token = random_hex(16)?;
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{admin_token},zt-test-admin,zt-test-admin,\"system:masters\"\n"),
        )?;

        let mut etcd = in_cgroup_and_netns(bins.join("etcd"), None, &node1_netns)?;
        let peer = "http://127.0.0.1:2380";
        let client_url = format!("http://{ETCD_ADDR}");
        etcd.arg("--name=zt-test")
            .arg(format!("--data-dir={}", dir.join("etcd-data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=zt-test={peer}"))
            // A test cluster: losing it on a crash is fine, fsync on busy disks is not.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let etcd_pid = bed.spawn(etcd, "etcd.log")?;

        let relay = Relay::start(&node1_netns, API_ADDR)?;
        let server = format!("https://127.0.0.1:{}", relay.port);
        let admin = kubeconfig_text(&server, &ca_pem, &format!("token: {admin_token}"));
        let admin_path = dir.join("admin.kubeconfig");
        std::fs::write(&admin_path, &admin)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let client = rt.block_on(client_from_kubeconfig(&admin, None))?;
        let mut cluster = Self {
            rt,
            client,
            dir,
            node1_netns,
            bins,
            ca_pem,
            etcd_pid,
            apiserver_pid: None,
            apiserver_log: None,
            apiserver_starts: 0,
            relay,
        };
        cluster.start_apiserver(bed)?;
        Ok(cluster)
    }

    /// Runs `f` on the harness's runtime (for what the blocking API does not cover).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The test's admin client (group system:masters), through the relay.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A client authenticated as `creds` (its token file), through the relay.
    pub fn client_as(&self, creds: &AgentCredentials) -> anyhow::Result<Client> {
        let text = std::fs::read_to_string(&creds.kubeconfig)?;
        let server = format!("https://127.0.0.1:{}", self.relay.port);
        self.rt
            .block_on(client_from_kubeconfig(&text, Some(&server)))
    }

    /// Starts kube-apiserver serving the agents (https://10.200.0.1:6443); waits until ready.
    pub fn start_apiserver(&mut self, bed: &mut Testbed) -> anyhow::Result<()> {
        self.spawn_apiserver(bed, API_ADDR)
    }

    /// Starts kube-apiserver bound to 127.0.0.1 in node 1's netns only: the test (through the
    /// relay) can make changes, the agents cannot reach the API. Waits until ready.
    pub fn start_apiserver_private(&mut self, bed: &mut Testbed) -> anyhow::Result<()> {
        self.spawn_apiserver(bed, PRIVATE_API_ADDR)
    }

    /// Kills kube-apiserver (SIGKILL by PID; its clients see their connections reset).
    pub fn stop_apiserver(&mut self, bed: &mut Testbed) {
        if let Some(pid) = self.apiserver_pid.take() {
            bed.kill(pid);
        }
    }

    /// Kills kube-apiserver and starts it again serving the agents; waits until ready.
    pub fn restart_apiserver(&mut self, bed: &mut Testbed) -> anyhow::Result<()> {
        self.stop_apiserver(bed);
        self.start_apiserver(bed)
    }

    fn spawn_apiserver(&mut self, bed: &mut Testbed, bind: SocketAddr) -> anyhow::Result<()> {
        self.stop_apiserver(bed);
        let d = &self.dir;
        let mut cmd =
            in_cgroup_and_netns(self.bins.join("kube-apiserver"), None, &self.node1_netns)?;
        cmd.arg(format!("--etcd-servers=http://{ETCD_ADDR}"))
            .arg(format!("--bind-address={}", bind.ip()))
            .arg(format!("--secure-port={}", bind.port()))
            .arg(format!("--advertise-address={}", API_ADDR.ip()))
            .arg(format!(
                "--cert-dir={}",
                d.join("apiserver-certs").display()
            ))
            .arg(format!(
                "--tls-cert-file={}",
                d.join("apiserver.pem").display()
            ))
            .arg(format!(
                "--tls-private-key-file={}",
                d.join("apiserver-key.pem").display()
            ))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg("--anonymous-auth=false")
            .arg("--authorization-mode=Node,RBAC")
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa-key.pem").display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            // No controller creates service accounts' defaults or tokens: pods name theirs.
            .arg("--disable-admission-plugins=ServiceAccount")
            // No Endpoints for the `kubernetes` Service: nothing routes to it here.
            .arg("--endpoint-reconciler-type=none")
            // Dual-stack, so that Services can have a ClusterIP of each family.
            .arg("--service-cluster-ip-range=10.200.128.0/20,fd00:200:80::/112")
            .arg("--profiling=false");
        let log_name = format!("kube-apiserver-{}.log", self.apiserver_starts);
        self.apiserver_starts += 1;
        let pid = bed.spawn(cmd, &log_name)?;
        self.apiserver_pid = Some(pid);
        let log = bed.log_path(&log_name);
        self.apiserver_log = Some(log.clone());
        *self.relay.target.lock().expect("relay target") = bind;

        let client = self.client.clone();
        let mut last = String::new();
        let ready = wait_until(READY_TIMEOUT, || {
            if bed.exited(pid) {
                bail!("kube-apiserver exited");
            }
            if bed.exited(self.etcd_pid) {
                bail!(
                    "etcd exited\n--- etcd log ---\n{}",
                    tail(&bed.log_path("etcd.log"), 30)
                );
            }
            let request = http::Request::get("/readyz").body(Vec::new())?;
            match self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), client.request_text(request)).await
            }) {
                Ok(Ok(body)) if body.trim() == "ok" => return Ok(true),
                Ok(Ok(body)) => last = body,
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "GET /readyz timed out".into(),
            }
            std::thread::sleep(Duration::from_millis(200));
            Ok(false)
        });
        if let Err(e) = ready {
            bail!(
                "kube-apiserver not ready: {e}; last answer: {last}\n--- {} ---\n{}",
                log.display(),
                tail(&log, 40)
            );
        }
        Ok(())
    }

    /// The current API server's log.
    pub fn apiserver_log(&self) -> Option<&Path> {
        self.apiserver_log.as_deref()
    }

    /// Compacts etcd at its current revision (physically), so that every watch resuming from an
    /// older resource version gets 410 Gone and must list again. Returns that revision.
    pub fn compact_etcd(&self) -> anyhow::Result<u64> {
        // Any range answers with the store's current revision in its header.
        let range = self.etcd_post("/v3/kv/range", &json!({"key": "Lw==", "limit": 1}))?;
        let revision: u64 = range["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .with_context(|| format!("no revision in etcd's answer: {range}"))?;
        let compacted = self.etcd_post(
            "/v3/kv/compaction",
            &json!({"revision": revision.to_string(), "physical": true}),
        )?;
        if compacted.get("error").is_some() || compacted.get("code").is_some() {
            bail!("etcd refused the compaction at {revision}: {compacted}");
        }
        Ok(revision)
    }

    /// A POST to etcd's JSON gateway, over a socket made in node 1's netns.
    fn etcd_post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let mut stream = connect_in_netns(&self.node1_netns, ETCD_ADDR)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let body = body.to_string();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: {ETCD_ADDR}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        let answer = String::from_utf8_lossy(&answer);
        let (head, payload) = answer
            .split_once("\r\n\r\n")
            .with_context(|| format!("etcd's answer to {path} has no body: {answer}"))?;
        let payload = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(payload)?
        } else {
            payload.to_owned()
        };
        if !head.starts_with("HTTP/1.1 200") {
            bail!(
                "etcd {path}: {}: {payload}",
                head.lines().next().unwrap_or_default()
            );
        }
        serde_json::from_str(&payload).with_context(|| format!("etcd {path}: {payload}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.relay.stop();
        // The processes are the bed's children: killed here by PID if the bed has not reaped
        // them yet (waitid only answers for our own children, so a reused PID is never hit),
        // and reaped by the bed.
        for pid in [Some(self.etcd_pid), self.apiserver_pid]
            .into_iter()
            .flatten()
        {
            if unreaped_child(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = std::fs::remove_dir_all(self.dir.join("etcd-data"));
        let _ = std::fs::remove_dir_all(self.dir.join("apiserver-certs"));
    }
}

/// Whether `pid` is a child of this process that has not been reaped (running or a zombie).
pub(crate) fn unreaped_child(pid: u32) -> bool {
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid with WNOWAIT only inspects; `info` is a valid out-pointer.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    rc == 0
}

/// Writes the cluster CA, the API server's serving certificate and the service-account signing
/// key pair into `dir`; returns the CA's PEM.
fn write_certificates(dir: &Path) -> anyhow::Result<String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "zt test cluster CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec![
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
        "127.0.0.1".to_owned(),
        API_ADDR.ip().to_string(),
        "fd00:200::1".to_owned(),
        "10.200.128.1".to_owned(),
    ])?;
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    serving.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = serving.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("apiserver.pem"), cert.pem())?;
    std::fs::write(dir.join("apiserver-key.pem"), key.serialize_pem())?;

    let sa = KeyPair::generate()?;
    std::fs::write(dir.join("sa-key.pem"), sa.serialize_pem())?;
    std::fs::write(dir.join("sa.pub"), sa.public_key_pem())?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    Ok(ca_cert.pem())
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The body of a chunked HTTP/1.1 response.
fn dechunk(mut rest: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("truncated chunk")?;
        let size = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).context("truncated chunk")?);
        rest = after
            .get(size..)
            .context("truncated chunk")?
            .trim_start_matches("\r\n");
    }
}
