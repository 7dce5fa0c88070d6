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
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ::kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::GroupVersionKind,
    discovery::{Scope, pinned_kind},
};
use anyhow::{Context as _, bail};
use base64::Engine as _;
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Pod as KubePod, ServiceAccount},
};
use serde_json::{Value, json};

use crate::{Node, Pod, Testbed, in_cgroup_and_netns, wait_until};

pub mod bed;

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

/// A pod as the test declares it to the API server.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`: the bed node's name (`node1`, `node2`).
    pub node: String,
    pub service_account: String,
    /// The IPs written to `status.podIPs`; `None` for a pod that has none yet (Pending).
    pub ips: Option<(Ipv4Addr, Ipv6Addr)>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl PodSpec {
    /// The bed pod `pod` on `node` as Kubernetes pod `namespace/name`, running as
    /// `service_account`, with the bed pod's IPv4 and IPv6 addresses.
    pub fn new(namespace: &str, name: &str, node: &Node, pod: &Pod, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            node: node.name.clone(),
            service_account: service_account.into(),
            ips: Some((pod.ipv4, pod.ipv6)),
            labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
            annotations: BTreeMap::new(),
        }
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// No IP yet: the pod stays Pending, as before its sandbox is up.
    pub fn without_ip(mut self) -> Self {
        self.ips = None;
        self
    }
}

/// A Service as the test declares it: ClusterIPs allocated by the API server.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// `RequireDualStack` (an IPv4 and an IPv6 ClusterIP), else IPv4 only.
    pub dual_stack: bool,
    pub ports: Vec<ServicePortSpec>,
}

#[derive(Debug, Clone)]
pub struct ServicePortSpec {
    pub name: String,
    pub port: u16,
    /// A port number, or the name of a container port.
    pub target_port: String,
    /// `TCP`, `UDP`, `SCTP`.
    pub protocol: String,
}

impl ServiceSpec {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            dual_stack: false,
            ports: Vec::new(),
        }
    }

    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    /// A TCP port `name`, `port` to `target_port` (a number or a container port's name).
    pub fn port(self, name: &str, port: u16, target_port: &str) -> Self {
        self.port_of(name, port, target_port, "TCP")
    }

    pub fn port_of(mut self, name: &str, port: u16, target_port: &str, protocol: &str) -> Self {
        self.ports.push(ServicePortSpec {
            name: name.into(),
            port,
            target_port: target_port.into(),
            protocol: protocol.into(),
        });
        self
    }
}

/// An EndpointSlice as the EndpointSlice controller would write it for a Service.
#[derive(Debug, Clone)]
pub struct EndpointSliceSpec {
    pub namespace: String,
    pub name: String,
    /// The Service (label `kubernetes.io/service-name`).
    pub service: String,
    /// `addressType` IPv6, else IPv4.
    pub ipv6: bool,
    /// (Service port name, the number the endpoints listen on, protocol).
    pub ports: Vec<(String, u16, String)>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// One endpoint of a slice: an address, its conditions, and the pod it is (if any).
#[derive(Debug, Clone)]
pub struct SliceEndpoint {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// (node, pod name) for `nodeName` and `targetRef`.
    pub pod: Option<(String, String)>,
}

impl SliceEndpoint {
    /// Ready and serving, not terminating.
    pub fn ready(address: IpAddr) -> Self {
        Self {
            address,
            ready: true,
            serving: true,
            terminating: false,
            pod: None,
        }
    }

    /// Failing its readiness probe: neither ready nor serving.
    pub fn not_ready(address: IpAddr) -> Self {
        Self {
            ready: false,
            serving: false,
            ..Self::ready(address)
        }
    }

    /// Terminating with `ready` as given (true: as the controller writes it for a Service that
    /// publishes not-ready addresses).
    pub fn terminating(address: IpAddr, ready: bool) -> Self {
        Self {
            ready,
            terminating: true,
            ..Self::ready(address)
        }
    }

    pub fn of_pod(mut self, node: &str, pod: &str) -> Self {
        self.pod = Some((node.into(), pod.into()));
        self
    }
}

impl EndpointSliceSpec {
    pub fn new(namespace: &str, name: &str, service: &str, ipv6: bool) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            service: service.into(),
            ipv6,
            ports: Vec::new(),
            endpoints: Vec::new(),
        }
    }

    /// A TCP port: the Service port `name` is `number` on this slice's endpoints.
    pub fn port(self, name: &str, number: u16) -> Self {
        self.port_of(name, number, "TCP")
    }

    pub fn port_of(mut self, name: &str, number: u16, protocol: &str) -> Self {
        self.ports.push((name.into(), number, protocol.into()));
        self
    }

    pub fn endpoint(mut self, endpoint: SliceEndpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// The same slice with `endpoints` instead.
    pub fn with_endpoints(mut self, endpoints: Vec<SliceEndpoint>) -> Self {
        self.endpoints = endpoints;
        self
    }
}

/// An agent's credentials: a service-account token file and a kubeconfig that reads it.
#[derive(Debug, Clone)]
pub struct AgentCredentials {
    pub namespace: String,
    pub service_account: String,
    pub kubeconfig: PathBuf,
    pub token_file: PathBuf,
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

    /// Server-side applies every manifest of deploy/ as `kubectl apply -k deploy/` would (its
    /// `resources`, and the ConfigMaps its `configMapGenerator` makes), with strict field
    /// validation: a field the API does not know fails. DaemonSets are stored (no controller
    /// acts on them).
    pub fn apply_deploy(&self) -> anyhow::Result<()> {
        self.apply_kustomization(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy"))
    }

    /// Server-side applies what [`render_kustomization`] makes of `dir`, in order, with strict
    /// field validation.
    pub fn apply_kustomization(&self, dir: &Path) -> anyhow::Result<()> {
        for object in render_kustomization(dir)? {
            let what = format!(
                "{} {}/{}",
                object["kind"].as_str().unwrap_or("?"),
                object["metadata"]["namespace"].as_str().unwrap_or(""),
                object["metadata"]["name"].as_str().unwrap_or("?")
            );
            self.apply_object(object, None)
                .with_context(|| format!("applying {what} of {}", dir.display()))?;
        }
        Ok(())
    }

    /// Server-side applies each document of `yaml` with strict field validation; namespaced
    /// objects without a namespace go to `namespace` (else `default`).
    pub fn apply_yaml(&self, yaml: &str, namespace: Option<&str>) -> anyhow::Result<()> {
        use serde::Deserialize as _;
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_yaml::Value::deserialize(document)?;
            if value.is_null() {
                continue;
            }
            self.apply_object(serde_json::to_value(value)?, namespace)?;
        }
        Ok(())
    }

    fn apply_object(&self, object: Value, namespace: Option<&str>) -> anyhow::Result<()> {
        self.apply(object, namespace).map(drop)
    }

    /// Server-side applies `object` (strict field validation); namespaced objects without a
    /// namespace go to `namespace` (else `default`). Returns the object as the API stored it.
    pub fn apply(&self, mut object: Value, namespace: Option<&str>) -> anyhow::Result<Value> {
        let api_version = object["apiVersion"]
            .as_str()
            .context("no apiVersion")?
            .to_owned();
        let kind = object["kind"].as_str().context("no kind")?.to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .context("no metadata.name")?
            .to_owned();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
        let gvk = GroupVersionKind::gvk(group, version, &kind);
        self.rt.block_on(async {
            let (resource, capabilities) = pinned_kind(&self.client, &gvk)
                .await
                .with_context(|| format!("the API does not serve {api_version} {kind}"))?;
            let api: Api<DynamicObject> = if capabilities.scope == Scope::Namespaced {
                let ns = match namespace {
                    Some(ns) => ns.to_owned(),
                    None => object["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_owned(),
                };
                object["metadata"]["namespace"] = ns.clone().into();
                Api::namespaced_with(self.client.clone(), &ns, &resource)
            } else {
                Api::all_with(self.client.clone(), &resource)
            };
            let params = PatchParams::apply(FIELD_MANAGER).validation_strict();
            let stored = api
                .patch(&name, &params, &Patch::Apply(&object))
                .await
                .with_context(|| format!("server-side apply of {kind} {name}"))?;
            anyhow::Ok(serde_json::to_value(stored)?)
        })
    }

    /// Creates (or updates) the Service; returns its ClusterIPs, IPv4 first.
    pub fn apply_service(&self, spec: &ServiceSpec) -> anyhow::Result<Vec<IpAddr>> {
        let ports: Vec<Value> = spec
            .ports
            .iter()
            .map(|p| {
                let target = match p.target_port.parse::<u16>() {
                    Ok(n) => json!(n),
                    Err(_) => json!(p.target_port),
                };
                json!({"name": p.name, "port": p.port, "targetPort": target, "protocol": p.protocol})
            })
            .collect();
        let mut service = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": spec.name, "namespace": spec.namespace},
            "spec": {"type": "ClusterIP", "ports": ports}});
        if spec.dual_stack {
            service["spec"]["ipFamilyPolicy"] = "RequireDualStack".into();
            service["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
        }
        let stored = self
            .apply(service, None)
            .with_context(|| format!("applying Service {}/{}", spec.namespace, spec.name))?;
        let mut ips: Vec<IpAddr> = stored["spec"]["clusterIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.as_str()?.parse().ok())
            .collect();
        ips.sort_by_key(IpAddr::is_ipv6);
        if ips.is_empty() {
            bail!(
                "Service {}/{} got no ClusterIP: {stored}",
                spec.namespace,
                spec.name
            );
        }
        Ok(ips)
    }

    /// Creates the EndpointSlice, or replaces its ports and endpoints.
    pub fn apply_endpoint_slice(&self, spec: &EndpointSliceSpec) -> anyhow::Result<()> {
        let ports: Vec<Value> = spec
            .ports
            .iter()
            .map(|(name, port, protocol)| json!({"name": name, "port": port, "protocol": protocol}))
            .collect();
        let endpoints: Vec<Value> = spec
            .endpoints
            .iter()
            .map(|e| {
                let mut endpoint = json!({"addresses": [e.address.to_string()],
                    "conditions": {"ready": e.ready, "serving": e.serving,
                                   "terminating": e.terminating}});
                if let Some((node, pod)) = &e.pod {
                    endpoint["nodeName"] = node.as_str().into();
                    endpoint["targetRef"] =
                        json!({"kind": "Pod", "namespace": spec.namespace, "name": pod});
                }
                endpoint
            })
            .collect();
        self.apply_object(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": spec.name, "namespace": spec.namespace,
                    "labels": {"kubernetes.io/service-name": spec.service,
                               "endpointslice.kubernetes.io/managed-by": "zt-tests"}},
                "addressType": if spec.ipv6 { "IPv6" } else { "IPv4" },
                "ports": ports, "endpoints": endpoints}),
            None,
        )
        .with_context(|| format!("applying EndpointSlice {}/{}", spec.namespace, spec.name))
    }

    /// Mints a token for service account `namespace/name` (TokenRequest, valid one hour) and
    /// writes it and a kubeconfig for an agent: server https://10.200.0.1:6443, the cluster CA,
    /// `tokenFile` pointing at the token.
    pub fn agent_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<AgentCredentials> {
        let base = format!("{namespace}-{name}");
        let creds = AgentCredentials {
            namespace: namespace.into(),
            service_account: name.into(),
            kubeconfig: self.dir.join(format!("{base}.kubeconfig")),
            token_file: self.dir.join(format!("{base}.token")),
        };
        self.rotate_token(&creds)?;
        let user = format!("tokenFile: {}", creds.token_file.display());
        std::fs::write(
            &creds.kubeconfig,
            kubeconfig_text(&format!("https://{API_ADDR}"), &self.ca_pem, &user),
        )?;
        Ok(creds)
    }

    /// Mints a fresh token for `creds` and replaces its token file (write, then rename).
    pub fn rotate_token(&self, creds: &AgentCredentials) -> anyhow::Result<()> {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &creds.namespace);
        let minted: TokenRequest = self
            .rt
            .block_on(api.create_subresource(
                "token",
                &creds.service_account,
                &PostParams::default(),
                serde_json::to_vec(&request)?,
            ))
            .with_context(|| {
                format!(
                    "TokenRequest for {}/{}",
                    creds.namespace, creds.service_account
                )
            })?;
        let token = minted.status.context("TokenRequest without status")?.token;
        let tmp = creds.token_file.with_extension("token.tmp");
        std::fs::write(&tmp, token)?;
        std::fs::rename(&tmp, &creds.token_file)?;
        Ok(())
    }

    /// Credentials of an agent whose role may get and watch pods and namespaces but not list
    /// pods (deploy/ must have been applied: the service account lives in zt-system).
    pub fn restricted_agent_kubeconfig(&self) -> anyhow::Result<AgentCredentials> {
        let name = RESTRICTED_SERVICE_ACCOUNT;
        self.create_service_account(AGENT_NAMESPACE, name)?;
        self.apply_yaml(
            &format!(
                "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {name}\nrules:\n\
                 - apiGroups: [\"\"]\n  resources: [\"namespaces\"]\n  verbs: [\"get\", \"list\", \"watch\"]\n\
                 - apiGroups: [\"\"]\n  resources: [\"pods\"]\n  verbs: [\"get\", \"watch\"]\n---\n\
                 apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {name}\n\
                 roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {name}\n\
                 subjects:\n- kind: ServiceAccount\n  name: {name}\n  namespace: {AGENT_NAMESPACE}\n"
            ),
            None,
        )?;
        self.agent_kubeconfig(AGENT_NAMESPACE, name)
    }

    pub fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        self.apply_object(
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": name, "labels": labels}}),
            None,
        )
        .with_context(|| format!("creating namespace {name}"))
    }

    /// Merges `labels` into namespace `name`'s; a `None` value removes the label.
    pub fn set_namespace_labels(
        &self,
        name: &str,
        labels: &[(&str, Option<&str>)],
    ) -> anyhow::Result<()> {
        let labels: BTreeMap<&str, Option<&str>> = labels.iter().copied().collect();
        let api: Api<Namespace> = Api::all(self.client.clone());
        self.rt
            .block_on(api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            ))
            .with_context(|| format!("labelling namespace {name}"))?;
        Ok(())
    }

    /// Deletes namespace `name`. With no controller-manager to empty it, it stays Terminating
    /// and its pods stay.
    pub fn delete_namespace(&self, name: &str) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        self.rt
            .block_on(api.delete(name, &DeleteParams::default()))
            .with_context(|| format!("deleting namespace {name}"))?;
        Ok(())
    }

    pub fn create_service_account(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        self.apply_object(
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": name, "namespace": namespace}}),
            None,
        )
        .with_context(|| format!("creating service account {namespace}/{name}"))
    }

    /// Creates the pod (bound to its node, one container) and writes its status as a kubelet
    /// would once it runs: phase Running and its IPs (or Pending without IPs).
    pub fn create_pod(&self, spec: &PodSpec) -> anyhow::Result<()> {
        let pod: KubePod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": spec.name, "namespace": spec.namespace,
                         "labels": spec.labels, "annotations": spec.annotations},
            "spec": {"nodeName": spec.node, "serviceAccountName": spec.service_account,
                     "automountServiceAccountToken": false,
                     "containers": [{"name": "app", "image": IMAGE}]},
        }))?;
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), &spec.namespace);
        self.rt
            .block_on(api.create(&PostParams::default(), &pod))
            .with_context(|| format!("creating pod {}/{}", spec.namespace, spec.name))?;
        self.set_pod_status(spec)
    }

    /// Writes the pod's status from `spec` as a kubelet would: Running with its IPs, or Pending
    /// without IPs.
    pub fn set_pod_status(&self, spec: &PodSpec) -> anyhow::Result<()> {
        let status = match spec.ips {
            Some((v4, v6)) => json!({"phase": "Running", "podIP": v4.to_string(),
                "podIPs": [{"ip": v4.to_string()}, {"ip": v6.to_string()}],
                "hostIP": node_ip(&spec.node), "hostIPs": [{"ip": node_ip(&spec.node)}]}),
            None => json!({"phase": "Pending"}),
        };
        self.patch_pod_status(&spec.namespace, &spec.name, status)
    }

    /// Sets the pod's `status.phase` (Pending, Running, Succeeded, Failed).
    pub fn set_pod_phase(&self, namespace: &str, name: &str, phase: &str) -> anyhow::Result<()> {
        self.patch_pod_status(namespace, name, json!({"phase": phase}))
    }

    fn patch_pod_status(&self, namespace: &str, name: &str, status: Value) -> anyhow::Result<()> {
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), namespace);
        self.rt
            .block_on(api.patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            ))
            .with_context(|| format!("writing the status of pod {namespace}/{name}"))?;
        Ok(())
    }

    /// Merges `annotations` into the pod's; a `None` value removes one.
    pub fn set_pod_annotations(
        &self,
        namespace: &str,
        name: &str,
        annotations: &[(&str, Option<&str>)],
    ) -> anyhow::Result<()> {
        let annotations: BTreeMap<&str, Option<&str>> = annotations.iter().copied().collect();
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), namespace);
        self.rt
            .block_on(api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
            ))
            .with_context(|| format!("annotating pod {namespace}/{name}"))?;
        Ok(())
    }

    /// Deletes the pod at once (grace period 0: no kubelet would confirm a graceful end) and
    /// waits until the API no longer has it.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), namespace);
        self.rt.block_on(async {
            api.delete(
                name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("deleting pod {namespace}/{name}"))?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while api.get_opt(name).await?.is_some() {
                if tokio::time::Instant::now() > deadline {
                    bail!("pod {namespace}/{name} still there 30 s after its deletion");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        })
    }

    /// The pod as the API has it, if it exists.
    pub fn get_pod(&self, namespace: &str, name: &str) -> anyhow::Result<Option<KubePod>> {
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), namespace);
        Ok(self.rt.block_on(api.get_opt(name))?)
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

/// Kinds that live outside namespaces (a kustomization's `namespace` leaves them alone).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
    "StorageClass",
    "CustomResourceDefinition",
];

/// The objects `kustomize build dir` makes, for the features deploy/ and its variants use:
/// `resources` (manifest files, or directories holding a kustomization), `namespace`,
/// `configMapGenerator` (`files`; `behavior` create or replace; `namespace`) with
/// `generatorOptions` (`disableNameSuffixHash: true` required, `labels`), and `patches` given by
/// `path` (strategic-merge patches, matched by kind, name and namespace). Any other field fails,
/// so that a kustomization this cannot render faithfully is never half-applied.
pub fn render_kustomization(dir: &Path) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize as _;
    let file = dir.join("kustomization.yaml");
    let k: Value = serde_yaml::from_str(
        &std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?,
    )
    .with_context(|| format!("parsing {}", file.display()))?;
    let known = [
        "apiVersion",
        "kind",
        "resources",
        "namespace",
        "configMapGenerator",
        "generatorOptions",
        "patches",
    ];
    for key in k.as_object().context("a kustomization is a map")?.keys() {
        if !known.contains(&key.as_str()) {
            bail!("{}: {key} is not rendered by the tests", file.display());
        }
    }
    let list = |key: &str| -> Vec<Value> { k[key].as_array().cloned().unwrap_or_default() };
    let mut own = Vec::new();
    let mut objects = Vec::new();
    for resource in list("resources") {
        let name = resource.as_str().context("a resource that is not a path")?;
        let path = dir.join(name);
        if path.is_dir() {
            objects.extend(render_kustomization(&path)?);
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)?;
            if !value.is_null() {
                own.push(serde_json::to_value(value)?);
            }
        }
    }
    let options = &k["generatorOptions"];
    let mut generated = Vec::new();
    let mut replacements = Vec::new();
    for generator in list("configMapGenerator") {
        if options["disableNameSuffixHash"] != true {
            bail!(
                "{}: generated names with a hash suffix are not rendered by the tests",
                file.display()
            );
        }
        let name = generator["name"]
            .as_str()
            .context("a ConfigMap without a name")?;
        let mut data = serde_json::Map::new();
        for f in generator["files"].as_array().into_iter().flatten() {
            let f = f.as_str().context("a ConfigMap file that is not a path")?;
            let key = Path::new(f).file_name().context("empty file name")?;
            data.insert(
                key.to_string_lossy().into_owned(),
                std::fs::read_to_string(dir.join(f))
                    .with_context(|| format!("reading {}", dir.join(f).display()))?
                    .into(),
            );
        }
        let mut config_map = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name}, "data": data});
        if let Some(ns) = generator["namespace"].as_str() {
            config_map["metadata"]["namespace"] = ns.into();
        }
        if !options["labels"].is_null() {
            config_map["metadata"]["labels"] = options["labels"].clone();
        }
        match generator["behavior"].as_str().unwrap_or("create") {
            "create" => generated.push(config_map),
            "replace" => replacements.push(config_map),
            other => bail!("{}: behavior {other} is not rendered", file.display()),
        }
    }
    own.extend(generated);
    if let Some(ns) = k["namespace"].as_str() {
        for object in &mut own {
            if !CLUSTER_SCOPED.contains(&object["kind"].as_str().unwrap_or_default()) {
                object["metadata"]["namespace"] = ns.into();
            }
        }
    }
    objects.extend(own);
    let same = |a: &Value, b: &Value| {
        a["kind"] == b["kind"]
            && a["metadata"]["name"] == b["metadata"]["name"]
            && (b["metadata"]["namespace"].is_null()
                || a["metadata"]["namespace"] == b["metadata"]["namespace"])
    };
    for replacement in replacements {
        let target = objects
            .iter_mut()
            .find(|o| same(o, &replacement))
            .with_context(|| {
                format!(
                    "{}: no ConfigMap {} to replace",
                    file.display(),
                    replacement["metadata"]["name"]
                )
            })?;
        let namespace = target["metadata"]["namespace"].clone();
        *target = replacement;
        target["metadata"]["namespace"] = namespace;
    }
    for patch in list("patches") {
        let name = patch["path"]
            .as_str()
            .context("only patches given by path are rendered")?;
        let patch: Value = serde_yaml::from_str(&std::fs::read_to_string(dir.join(name))?)?;
        let target = objects
            .iter_mut()
            .find(|o| same(o, &patch))
            .with_context(|| format!("{}: patch {name} matches nothing", file.display()))?;
        strategic_merge(target, &patch);
    }
    Ok(objects)
}

/// The key by which a strategic-merge patch merges the items of a list field (Kubernetes'
/// `patchMergeKey`), for the lists the deploy patches touch; other lists are replaced.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "volumes" | "env" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" => Some("containerPort"),
        _ => None,
    }
}

/// Applies a strategic-merge patch: maps merge, `null` deletes, keyed lists merge item by item
/// (`$patch: delete` removes one), other values are replaced.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    let (Some(t), Some(p)) = (target.as_object_mut(), patch.as_object()) else {
        *target = patch.clone();
        return;
    };
    for (key, value) in p {
        if key.starts_with('$') {
            continue;
        }
        if value.is_null() {
            t.remove(key);
            continue;
        }
        match (t.get_mut(key), merge_key(key), value) {
            (Some(existing @ Value::Object(_)), _, Value::Object(_)) => {
                strategic_merge(existing, value)
            }
            (Some(Value::Array(items)), Some(mk), Value::Array(patches)) => {
                for item in patches {
                    let id = &item[mk];
                    if item["$patch"] == "delete" {
                        items.retain(|x| &x[mk] != id);
                    } else if let Some(x) = items.iter_mut().find(|x| &x[mk] == id) {
                        strategic_merge(x, item);
                    } else {
                        let mut added = json!({});
                        strategic_merge(&mut added, item);
                        items.push(added);
                    }
                }
            }
            _ => {
                let mut v = value.clone();
                if v.is_object() {
                    let mut clean = json!({});
                    strategic_merge(&mut clean, &v);
                    v = clean;
                }
                t.insert(key.clone(), v);
            }
        }
    }
}

/// The node's address on the link between the nodes (its `status.hostIP`).
fn node_ip(node: &str) -> String {
    let n = node.trim_start_matches("node");
    format!("10.200.0.{n}")
}

/// A kubeconfig for `server`, trusting the cluster CA, with the user's `credential` line
/// (`token: ...` or `tokenFile: ...`).
fn kubeconfig_text(server: &str, ca_pem: &str, credential: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: zt-test\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: zt-test\n  user:\n    {credential}\n\
         contexts:\n- name: zt-test\n  context:\n    cluster: zt-test\n    user: zt-test\n\
         current-context: zt-test\n"
    )
}

/// A client from kubeconfig text, its server replaced by `server` if given.
async fn client_from_kubeconfig(text: &str, server: Option<&str>) -> anyhow::Result<Client> {
    let mut kubeconfig = Kubeconfig::from_yaml(text)?;
    if let Some(server) = server {
        for cluster in &mut kubeconfig.clusters {
            if let Some(c) = &mut cluster.cluster {
                c.server = Some(server.to_owned());
            }
        }
    }
    let config =
        ::kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
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

/// A TCP connection to `to` from a socket made inside `netns` (by a thread that entered it).
fn connect_in_netns(netns: &Path, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let ns = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    std::thread::spawn(move || -> anyhow::Result<TcpStream> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(TcpStream::connect_timeout(&to, Duration::from_secs(5))?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connecting thread panicked"))?
    .with_context(|| format!("connecting to {to} in {}", netns.display()))
}

/// Listens on 127.0.0.1 in the host netns and forwards each connection to `target`, reached
/// from node 1's netns.
struct Relay {
    port: u16,
    target: Arc<Mutex<SocketAddr>>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(netns: &Path, target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let target = Arc::new(Mutex::new(target));
        let stopping = Arc::new(AtomicBool::new(false));
        let (netns, t, s) = (netns.to_owned(), target.clone(), stopping.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let to = *t.lock().expect("relay target");
                let netns = netns.clone();
                std::thread::spawn(move || {
                    if let Ok(upstream) = connect_in_netns(&netns, to) {
                        splice(conn, upstream);
                    }
                });
            }
        });
        Ok(Self {
            port,
            target,
            stopping,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // Wakes the accepting thread so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies both ways until each side has closed.
fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let forward = std::thread::spawn(move || copy_then_close(a, b2));
    copy_then_close(b, a2);
    let _ = forward.join();
}

fn copy_then_close(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
    let _ = from.shutdown(std::net::Shutdown::Read);
}
