//! The node config file: parsed and validated once into typed structs, so nothing
//! downstream re-parses strings. Every error names the file, and where it can the line and key.
use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use ipnet::IpNet;

pub use crate::workload::is_dns_label;
use crate::{
    egress::{EgressAllow, EgressDefault, EgressPolicy},
    identity::spiffe::{SpiffeId, TrustDomain},
    workload::{Workload, WorkloadId},
};

pub const DEFAULT_PATH: &str = "/etc/zt/node.toml";
const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/zt";
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
const DEFAULT_SVID_TTL_SECONDS: u64 = 3600;
const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 5000;
const DEFAULT_POOL_IDLE_SECONDS: u64 = 60;
const DEFAULT_IDLE_TIMEOUT_SECONDS: u64 = 3600;
const DEFAULT_MAX_CONNECTIONS: usize = 16384;
const DEFAULT_RECONCILE_INTERVAL_MS: u64 = 5000;
const DEFAULT_DRAIN_SECONDS: u64 = 30;
const DEFAULT_HANDSHAKES_PER_SOURCE: usize = 16;
/// As ztunnel's pool (`pool_max_streams_per_conn`); the pool opens another connection beyond.
const DEFAULT_STREAMS_PER_CONNECTION: u32 = 100;
/// Longer than the client pools' default idle timeout (60 s), so clients close first.
const DEFAULT_HBONE_IDLE_TIMEOUT_SECONDS: u64 = 300;
const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 5000;
const DEFAULT_ADMIN_CONNECTIONS_PER_SOURCE: usize = 8;
const DEFAULT_NETNS_DIR: &str = "/run/netns";
/// Policies in this namespace apply mesh-wide (Istio's root namespace).
pub const DEFAULT_ROOT_NAMESPACE: &str = "zt-system";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        /// Where the offending key is (1 when the file does not say, e.g. a missing key).
        line: usize,
        message: String,
    },
}

/// The validated node configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub node_name: String,
    pub trust_domain: TrustDomain,
    /// `None`: capture only, no workload identities (no `[identity]` section).
    pub identity: Option<IdentityConfig>,
    pub capture: CaptureConfig,
    pub mtls: MtlsConfig,
    pub policy: PolicyConfig,
    pub limits: LimitsConfig,
    /// Meshed workloads on other nodes (until discovery provides them): address -> identity.
    pub endpoints: Vec<MeshEndpoint>,
    pub admin: AdminConfig,
    pub log: LogConfig,
    /// Static workloads (`[[workload]]`).
    pub workloads: Vec<Workload>,
    /// `None`: no Kubernetes discovery (static workloads only).
    pub kubernetes: Option<KubernetesDiscovery>,
    /// What meshed pods may reach outside the mesh (`[egress]`); reloadable.
    pub egress: EgressPolicy,
}

/// `[discovery.kubernetes]`: watch this node's pods and enroll the meshed ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesDiscovery {
    /// A kubeconfig file (server, CA, credentials); `None` = the in-cluster service account,
    /// else `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// Where the pods' network namespaces are pinned by the container runtime.
    pub netns_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsConfig {
    pub mode: MtlsMode,
    /// A pooled HBONE connection without streams closes after this long.
    pub pool_idle_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// A YAML file or a directory of them (AuthorizationPolicy, PeerAuthentication); watched.
    pub dir: Option<PathBuf>,
    /// The decision for a workload that no ALLOW policy selects.
    pub default: PolicyDefault,
    /// Policies in this namespace apply to every namespace.
    pub root_namespace: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyDefault {
    /// Zero trust: nothing is reachable until an ALLOW policy says so.
    Deny,
    /// Istio's behaviour: a workload without ALLOW policies accepts everyone.
    Allow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// A TLS handshake on the tunnel must finish within this.
    pub handshake_timeout: Duration,
    /// A connection with no bytes in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Captured connections (outbound, inbound and tunnel streams) one workload may have open.
    pub max_connections_per_workload: usize,
    /// On SIGTERM, open connections get this long to finish before they are closed.
    pub drain: Duration,
    /// TLS handshakes one source address may have pending at once on this node's HBONE
    /// listeners (unauthenticated work, bounded apart from the workloads' connections).
    pub max_handshakes_per_source: usize,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS on the HBONE listeners.
    pub max_streams_per_connection: u32,
    /// An inbound HBONE connection without streams for this long is sent GOAWAY.
    pub hbone_idle_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// A captured connection to a destination outside the mesh is refused.
    Strict,
    /// ... or sent in plain TCP.
    Permissive,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshEndpoint {
    pub ip: std::net::IpAddr,
    pub identity: SpiffeId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where `/healthz/ready` is served.
    pub readiness_addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    /// Where `/config_dump` and `/logging` are served; loopback by default.
    pub admin_addr: SocketAddr,
    /// A client of these endpoints must send a request's headers within this (also while its
    /// connection idles between requests).
    pub header_read_timeout: Duration,
    /// Connections one source address may hold open on each endpoint.
    pub max_connections_per_source: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// cgroup v2 directory the cgroup programs attach to; `None` = the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    /// bpffs directory holding this agent's pins.
    pub bpffs_dir: PathBuf,
    pub fail_mode: FailMode,
    /// Source address of kubelet probes, let through inbound capture to each pod's probe ports.
    pub probe_source: Option<Ipv4Addr>,
    /// UDP ports every meshed pod may receive on while its inbound is STRICT.
    pub udp_inbound_ports: Vec<u16>,
    /// UDP ports every meshed pod may send to while egress outside the mesh is refused
    /// (default: 53, DNS), and receive the replies from.
    pub udp_outbound_ports: Vec<u16>,
    /// How often the kernel's capture state is compared with the enrolled workloads and repaired.
    pub reconcile_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// While no agent listener exists, captured connections are refused or dropped.
    Closed,
    /// While no agent listener exists, traffic goes around the agent.
    Open,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    pub provider: IdentityProvider,
    pub svid_ttl: Duration,
    pub revocation_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityProvider {
    /// The built-in CA in `ca_dir` (made by `zt-daemon ca init`).
    Builtin { ca_dir: PathBuf },
    /// SVIDs and bundles written by another issuer (layout in identity::files).
    Files { dir: PathBuf },
    /// The node's spire-agent, through its Delegated Identity API (identity::spire).
    Spire {
        admin_socket: PathBuf,
        /// The selectors each workload is asked for by, with its fields filled in.
        selectors: Vec<SelectorTemplate>,
    },
}

/// One `type:value` selector of `[identity] selectors`, whose value may name the workload's
/// `{namespace}`, `{service_account}` or `{name}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorTemplate {
    pub kind: String,
    pub value: String,
}

impl SelectorTemplate {
    const FIELDS: [&str; 3] = ["{namespace}", "{service_account}", "{name}"];

    fn parse(text: &str) -> Result<Self, String> {
        let (kind, value) = text
            .split_once(':')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .ok_or_else(|| format!("{text:?} is not type:value"))?;
        // Every `{...}` must be a known field.
        let mut rest = value;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("{text:?}: unclosed {{"))?;
            let field = &rest[open..open + close + 1];
            if !Self::FIELDS.contains(&field) {
                return Err(format!(
                    "{text:?}: unknown field {field} (known: {})",
                    Self::FIELDS.join(", ")
                ));
            }
            rest = &rest[open + close + 1..];
        }
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    /// The selector value for `workload`.
    pub fn value_for(&self, workload: &Workload) -> String {
        self.value
            .replace("{namespace}", &workload.id.namespace)
            .replace("{service_account}", &workload.service_account)
            .replace("{name}", &workload.id.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing EnvFilter directive, e.g. `info` or `zt_daemon=debug`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

// ---- file shape, as written by operators -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node_name: Option<String>,
    trust_domain: Option<String>,
    identity: Option<RawIdentity>,
    #[serde(default)]
    capture: RawCapture,
    #[serde(default)]
    mtls: RawMtls,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default, rename = "endpoint")]
    endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    log: RawLog,
    #[serde(default, rename = "workload")]
    workloads: Vec<RawWorkload>,
    #[serde(default)]
    discovery: RawDiscovery,
    #[serde(default)]
    egress: RawEgress,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    default: Option<EgressDefault>,
    #[serde(default)]
    deny_namespaces: Vec<String>,
    #[serde(default)]
    allow: Vec<RawEgressAllow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgressAllow {
    cidrs: Vec<String>,
    #[serde(default)]
    ports: Vec<u16>,
    #[serde(default)]
    namespaces: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    kubernetes: Option<RawKubernetes>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    enabled: bool,
    kubeconfig: Option<PathBuf>,
    /// Removed: a bare URL carried no CA and no credentials. Named here to say so.
    api_server: Option<String>,
    netns_dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCapture {
    cgroup: Option<PathBuf>,
    bpffs_dir: Option<PathBuf>,
    fail_mode: Option<FailMode>,
    probe_source: Option<Ipv4Addr>,
    udp_inbound_ports: Option<Vec<u16>>,
    udp_outbound_ports: Option<Vec<u16>>,
    reconcile_interval_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    provider: RawProvider,
    ca_dir: Option<PathBuf>,
    files_dir: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
    selectors: Option<Vec<String>>,
    svid_ttl_seconds: Option<u64>,
    revocation_file: Option<PathBuf>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawProvider {
    Builtin,
    Files,
    Spire,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMtls {
    mode: Option<MtlsMode>,
    pool_idle_seconds: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    dir: Option<PathBuf>,
    default: Option<PolicyDefault>,
    root_namespace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    handshake_timeout_ms: Option<u64>,
    idle_timeout_seconds: Option<u64>,
    max_connections_per_workload: Option<usize>,
    drain_seconds: Option<u64>,
    max_handshakes_per_source: Option<usize>,
    max_streams_per_connection: Option<u32>,
    hbone_idle_timeout_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    ip: std::net::IpAddr,
    identity: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    readiness_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    header_read_timeout_ms: Option<u64>,
    max_connections_per_source: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    level: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: String,
    namespace: String,
    #[serde(default = "default_service_account")]
    service_account: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    netns: PathBuf,
    #[serde(default)]
    probe_ports: Vec<u16>,
}

const DNS_PORT: u16 = 53;

fn default_service_account() -> String {
    "default".to_owned()
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_column(text, span.start))
                .unwrap_or((0, 0));
            // toml names the problem; the key is on the line it points at.
            let key = text
                .lines()
                .nth(line.saturating_sub(1))
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim().to_owned())
                .filter(|k| !k.is_empty() && !k.starts_with('['));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: match key {
                    Some(key) if !e.message().contains(&key) => {
                        format!("{key}: {}", e.message())
                    }
                    _ => e.message().to_owned(),
                },
            }
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: message
                .split_once(':')
                .and_then(|(key, _)| line_of_key(text, key))
                .unwrap_or(1),
            message,
        };
        // One ConfigMap serves every node: without node_name, the DaemonSet's NODE_NAME (downward
        // API) names the node.
        let node_name = match raw.node_name {
            Some(name) => name,
            None => std::env::var("NODE_NAME").unwrap_or_default(),
        };
        if node_name.trim().is_empty() {
            return Err(invalid(
                "node_name: must not be empty (set it, or $NODE_NAME)".into(),
            ));
        }
        let mut ids = HashSet::new();
        let mut netns_paths: BTreeMap<PathBuf, WorkloadId> = BTreeMap::new();
        let mut workloads = Vec::with_capacity(raw.workloads.len());
        for (i, w) in raw.workloads.into_iter().enumerate() {
            for (field, value) in [
                ("name", &w.name),
                ("namespace", &w.namespace),
                ("service_account", &w.service_account),
            ] {
                if !is_dns_label(value) {
                    return Err(invalid(format!(
                        "workload[{i}].{field}: {value:?} is not a DNS label (lowercase letters, digits, '-')"
                    )));
                }
            }
            let id = WorkloadId {
                namespace: w.namespace,
                name: w.name,
            };
            if !ids.insert(id.clone()) {
                return Err(invalid(format!("workload[{i}]: {id} is listed twice")));
            }
            if !w.netns.is_absolute() {
                return Err(invalid(format!(
                    "workload[{i}].netns: {} is not an absolute path",
                    w.netns.display()
                )));
            }
            if let Some(other) = netns_paths.insert(w.netns.clone(), id.clone()) {
                return Err(invalid(format!(
                    "workload[{i}].netns: {} is already enrolled as {other}",
                    w.netns.display()
                )));
            }
            if w.probe_ports.contains(&0) {
                return Err(invalid(format!(
                    "workload[{i}].probe_ports: 0 is not a port"
                )));
            }
            // One form, as discovery produces it, so the kernel's state compares equal.
            let mut probe_ports = w.probe_ports;
            probe_ports.sort_unstable();
            probe_ports.dedup();
            workloads.push(Workload {
                id,
                service_account: w.service_account,
                labels: w.labels,
                netns: w.netns,
                probe_ports,
            });
        }
        for (key, ports) in [
            ("udp_inbound_ports", &raw.capture.udp_inbound_ports),
            ("udp_outbound_ports", &raw.capture.udp_outbound_ports),
        ] {
            if ports.iter().flatten().any(|p| *p == 0) {
                return Err(invalid(format!("capture.{key}: 0 is not a port")));
            }
        }
        let bpffs_dir = raw
            .capture
            .bpffs_dir
            .unwrap_or_else(|| DEFAULT_BPFFS_DIR.into());
        if !bpffs_dir.is_absolute() {
            return Err(invalid(format!(
                "capture.bpffs_dir: {} is not an absolute path",
                bpffs_dir.display()
            )));
        }
        let trust_domain: TrustDomain = raw
            .trust_domain
            .as_deref()
            .unwrap_or(DEFAULT_TRUST_DOMAIN)
            .parse()
            .map_err(|e| invalid(format!("trust_domain: {e}")))?;
        let identity = raw
            .identity
            .map(|i| identity_config(i, &invalid))
            .transpose()?;
        let endpoints = raw
            .endpoints
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let identity: SpiffeId = e
                    .identity
                    .parse()
                    .map_err(|err| invalid(format!("endpoint[{i}].identity: {err}")))?;
                // Peers' and destinations' addresses are looked up canonical (IPv4 as IPv4): an
                // endpoint written IPv4-mapped (`::ffff:10.0.0.1`) must be found by them.
                Ok(MeshEndpoint {
                    ip: e.ip.to_canonical(),
                    identity,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let egress = EgressPolicy {
            default: raw.egress.default.unwrap_or(EgressDefault::Allow),
            deny_namespaces: raw.egress.deny_namespaces.into_iter().collect(),
            allow: raw
                .egress
                .allow
                .into_iter()
                .enumerate()
                .map(|(i, a)| {
                    if a.cidrs.is_empty() {
                        return Err(invalid(format!(
                            "egress.allow[{i}].cidrs: list at least one CIDR (0.0.0.0/0 and ::/0 for any address)"
                        )));
                    }
                    if a.ports.contains(&0) {
                        return Err(invalid(format!("egress.allow[{i}].ports: 0 is not a port")));
                    }
                    let cidrs = a
                        .cidrs
                        .iter()
                        .map(|c| {
                            c.parse::<IpNet>()
                                .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
                                .map(|n| match n {
                                    // Destinations are compared canonical (IPv4 as IPv4).
                                    IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
                                        Some(v4) if v6.prefix_len() >= 96 => IpNet::new(
                                            IpAddr::V4(v4),
                                            v6.prefix_len() - 96,
                                        )
                                        .unwrap_or(n),
                                        _ => n,
                                    },
                                    n => n,
                                })
                                .map_err(|_| {
                                    invalid(format!(
                                        "egress.allow[{i}].cidrs: {c:?} is not a CIDR or an address"
                                    ))
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(EgressAllow {
                        cidrs,
                        ports: a.ports,
                        namespaces: a.namespaces.into_iter().collect(),
                    })
                })
                .collect::<Result<Vec<_>, ConfigError>>()?,
        };
        let root_namespace = raw
            .policy
            .root_namespace
            .unwrap_or_else(|| DEFAULT_ROOT_NAMESPACE.to_owned());
        if !is_dns_label(&root_namespace) {
            return Err(invalid(format!(
                "policy.root_namespace: {root_namespace:?} is not a DNS label"
            )));
        }
        if let Some(dir) = &raw.policy.dir
            && !dir.is_absolute()
        {
            return Err(invalid(format!(
                "policy.dir: {} is not an absolute path",
                dir.display()
            )));
        }
        // Zero would refuse everything (or, for a timeout, everyone at once).
        for (key, value) in [
            (
                "limits.max_handshakes_per_source",
                raw.limits.max_handshakes_per_source.map(|v| v as u64),
            ),
            (
                "limits.max_streams_per_connection",
                raw.limits.max_streams_per_connection.map(u64::from),
            ),
            (
                "limits.hbone_idle_timeout_seconds",
                raw.limits.hbone_idle_timeout_seconds,
            ),
            (
                "admin.header_read_timeout_ms",
                raw.admin.header_read_timeout_ms,
            ),
            (
                "admin.max_connections_per_source",
                raw.admin.max_connections_per_source.map(|v| v as u64),
            ),
        ] {
            if value == Some(0) {
                return Err(invalid(format!("{key}: must be at least 1")));
            }
        }
        let kubernetes = match raw.discovery.kubernetes {
            Some(k) if k.enabled => {
                let netns_dir = k.netns_dir.unwrap_or_else(|| DEFAULT_NETNS_DIR.into());
                if !netns_dir.is_absolute() {
                    return Err(invalid(format!(
                        "discovery.kubernetes.netns_dir: {} is not an absolute path",
                        netns_dir.display()
                    )));
                }
                if k.api_server.is_some() {
                    return Err(invalid(
                        "discovery.kubernetes.api_server: no longer supported (a URL alone carries no CA and no credentials); set kubeconfig = \"/path/to/kubeconfig\", or leave it out to use the pod's service account".into(),
                    ));
                }
                if let Some(path) = &k.kubeconfig
                    && !path.is_absolute()
                {
                    return Err(invalid(format!(
                        "discovery.kubernetes.kubeconfig: {} is not an absolute path",
                        path.display()
                    )));
                }
                Some(KubernetesDiscovery {
                    kubeconfig: k.kubeconfig,
                    netns_dir,
                })
            }
            _ => None,
        };
        Ok(NodeConfig {
            node_name,
            trust_domain,
            identity,
            capture: CaptureConfig {
                cgroup: raw.capture.cgroup,
                bpffs_dir,
                fail_mode: raw.capture.fail_mode.unwrap_or(FailMode::Closed),
                probe_source: raw.capture.probe_source,
                udp_inbound_ports: raw.capture.udp_inbound_ports.unwrap_or_default(),
                udp_outbound_ports: raw
                    .capture
                    .udp_outbound_ports
                    .unwrap_or_else(|| vec![DNS_PORT]),
                reconcile_interval: Duration::from_millis(
                    raw.capture
                        .reconcile_interval_ms
                        .unwrap_or(DEFAULT_RECONCILE_INTERVAL_MS)
                        .max(100),
                ),
            },
            mtls: MtlsConfig {
                mode: raw.mtls.mode.unwrap_or(MtlsMode::Strict),
                pool_idle_timeout: Duration::from_secs(
                    raw.mtls
                        .pool_idle_seconds
                        .unwrap_or(DEFAULT_POOL_IDLE_SECONDS),
                ),
            },
            policy: PolicyConfig {
                dir: raw.policy.dir,
                default: raw.policy.default.unwrap_or(PolicyDefault::Deny),
                root_namespace,
            },
            limits: LimitsConfig {
                handshake_timeout: Duration::from_millis(
                    raw.limits
                        .handshake_timeout_ms
                        .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_MS),
                ),
                idle_timeout: Duration::from_secs(
                    raw.limits
                        .idle_timeout_seconds
                        .unwrap_or(DEFAULT_IDLE_TIMEOUT_SECONDS),
                ),
                max_connections_per_workload: raw
                    .limits
                    .max_connections_per_workload
                    .unwrap_or(DEFAULT_MAX_CONNECTIONS),
                drain: Duration::from_secs(
                    raw.limits.drain_seconds.unwrap_or(DEFAULT_DRAIN_SECONDS),
                ),
                max_handshakes_per_source: raw
                    .limits
                    .max_handshakes_per_source
                    .unwrap_or(DEFAULT_HANDSHAKES_PER_SOURCE),
                max_streams_per_connection: raw
                    .limits
                    .max_streams_per_connection
                    .unwrap_or(DEFAULT_STREAMS_PER_CONNECTION),
                hbone_idle_timeout: Duration::from_secs(
                    raw.limits
                        .hbone_idle_timeout_seconds
                        .unwrap_or(DEFAULT_HBONE_IDLE_TIMEOUT_SECONDS),
                ),
            },
            endpoints,
            admin: AdminConfig {
                readiness_addr: raw
                    .admin
                    .readiness_addr
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 15021))),
                metrics_addr: raw
                    .admin
                    .metrics_addr
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 15020))),
                admin_addr: raw
                    .admin
                    .admin_addr
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 15000))),
                header_read_timeout: Duration::from_millis(
                    raw.admin
                        .header_read_timeout_ms
                        .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT_MS),
                ),
                max_connections_per_source: raw
                    .admin
                    .max_connections_per_source
                    .unwrap_or(DEFAULT_ADMIN_CONNECTIONS_PER_SOURCE),
            },
            log: LogConfig {
                format: raw.log.format.unwrap_or(LogFormat::Text),
                level: raw.log.level.unwrap_or_else(|| "info".to_owned()),
            },
            workloads,
            kubernetes,
            egress,
        })
    }

    /// Settings that only take effect at start; a reload that changes them says so.
    pub fn restart_only_changes(&self, new: &NodeConfig) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.node_name != new.node_name {
            changed.push("node_name");
        }
        if self.trust_domain != new.trust_domain {
            changed.push("trust_domain");
        }
        if self.identity != new.identity {
            changed.push("identity");
        }
        if self.mtls != new.mtls {
            changed.push("mtls");
        }
        if self.limits != new.limits {
            changed.push("limits");
        }
        if self.capture.cgroup != new.capture.cgroup {
            changed.push("capture.cgroup");
        }
        if self.capture.bpffs_dir != new.capture.bpffs_dir {
            changed.push("capture.bpffs_dir");
        }
        if self.admin != new.admin {
            changed.push("admin");
        }
        if self.log != new.log {
            changed.push("log");
        }
        if self.kubernetes != new.kubernetes {
            changed.push("discovery.kubernetes");
        }
        changed
    }
}

/// The selectors SPIRE's Kubernetes workload attestor would give a pod: its namespace and
/// service account.
const DEFAULT_SPIRE_SELECTORS: [&str; 2] = ["k8s:ns:{namespace}", "k8s:sa:{service_account}"];

fn identity_config(
    raw: RawIdentity,
    invalid: &dyn Fn(String) -> ConfigError,
) -> Result<IdentityConfig, ConfigError> {
    let ttl = raw.svid_ttl_seconds.unwrap_or(DEFAULT_SVID_TTL_SECONDS);
    if ttl < 2 {
        return Err(invalid(format!(
            "identity.svid_ttl_seconds: {ttl} is too short (at least 2)"
        )));
    }
    if !matches!(raw.provider, RawProvider::Spire)
        && (raw.admin_socket.is_some() || raw.selectors.is_some())
    {
        return Err(invalid(
            "identity: admin_socket and selectors belong to provider \"spire\"".into(),
        ));
    }
    let provider = match (raw.provider, raw.ca_dir, raw.files_dir) {
        (RawProvider::Builtin, Some(ca_dir), None) => IdentityProvider::Builtin { ca_dir },
        (RawProvider::Files, None, Some(dir)) => IdentityProvider::Files { dir },
        (RawProvider::Spire, None, None) => {
            let admin_socket = raw.admin_socket.ok_or_else(|| {
                invalid("identity: provider \"spire\" takes admin_socket (the spire-agent's admin socket)".into())
            })?;
            if !admin_socket.is_absolute() {
                return Err(invalid(format!(
                    "identity.admin_socket: {} is not an absolute path",
                    admin_socket.display()
                )));
            }
            let texts = raw.selectors.unwrap_or_else(|| {
                DEFAULT_SPIRE_SELECTORS
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            });
            if texts.is_empty() {
                return Err(invalid(
                    "identity.selectors: empty (every workload would match the same entries)"
                        .into(),
                ));
            }
            let selectors = texts
                .iter()
                .map(|t| {
                    SelectorTemplate::parse(t)
                        .map_err(|e| invalid(format!("identity.selectors: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            IdentityProvider::Spire {
                admin_socket,
                selectors,
            }
        }
        (RawProvider::Spire, _, _) => {
            return Err(invalid(
                "identity: provider \"spire\" takes admin_socket (and no ca_dir or files_dir)"
                    .into(),
            ));
        }
        (RawProvider::Builtin, _, _) => {
            return Err(invalid(
                "identity: provider \"builtin\" takes ca_dir (and no files_dir)".into(),
            ));
        }
        (RawProvider::Files, _, _) => {
            return Err(invalid(
                "identity: provider \"files\" takes files_dir (and no ca_dir)".into(),
            ));
        }
    };
    Ok(IdentityConfig {
        provider,
        svid_ttl: Duration::from_secs(ttl),
        revocation_file: raw.revocation_file,
    })
}

/// The line of `key` in `text`, for keys as validation messages name them: `node_name`,
/// `capture.bpffs_dir`, `discovery.kubernetes.netns_dir`, `workload[2].netns`, `endpoint[0]`.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let (table, field) = match key.rsplit_once('.') {
        Some((table, field)) => (table, Some(field)),
        None if key.ends_with(']') => (key, None),
        None => ("", Some(key)),
    };
    let (table, index) = match table.split_once('[') {
        Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
        None => (table, None),
    };
    let mut current = String::new();
    let mut seen = 0usize;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(header) = trimmed.strip_prefix("[[").and_then(|h| h.split_once("]]")) {
            current = header.0.trim().to_owned();
            if current == table {
                seen += 1;
                if field.is_none() && index.is_some_and(|i| i + 1 == seen) {
                    return Some(n + 1);
                }
            }
            continue;
        }
        if let Some(header) = trimmed.strip_prefix('[').and_then(|h| h.split_once(']')) {
            current = header.0.trim().to_owned();
            continue;
        }
        let right_table = current == table && index.is_none_or(|i| i + 1 == seen);
        if let Some(field) = field
            && right_table
            && trimmed
                .strip_prefix(field)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return Some(n + 1);
        }
    }
    None
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(Path::new("/etc/zt/node.toml"), text)
    }

    /// Every key README documents, with a non-default value.
    const EVERY_KEY: &str = r#"
node_name = "n1"
trust_domain = "example.org"

[identity]
provider = "builtin"
ca_dir = "/etc/zt/ca"
svid_ttl_seconds = 600
revocation_file = "/etc/zt/revoked"

[mtls]
mode = "permissive"
pool_idle_seconds = 30

[policy]
dir = "/etc/zt/policies"
default = "allow"
root_namespace = "mesh-root"

[capture]
cgroup = "/sys/fs/cgroup/kubepods"
bpffs_dir = "/sys/fs/bpf/zt2"
fail_mode = "open"
probe_source = "169.254.1.1"
udp_inbound_ports = [5353]
udp_outbound_ports = [53, 123]
reconcile_interval_ms = 1000

[discovery.kubernetes]
enabled = true
kubeconfig = "/etc/zt/kubeconfig"
netns_dir = "/var/run/netns"

[egress]
default = "deny"
deny_namespaces = ["payments"]

[[egress.allow]]
cidrs = ["10.0.9.0/24", "fd00:9::/64"]
ports = [5432]
namespaces = ["shop"]

[limits]
handshake_timeout_ms = 1000
idle_timeout_seconds = 60
drain_seconds = 5
max_connections_per_workload = 100
max_handshakes_per_source = 4
max_streams_per_connection = 50
hbone_idle_timeout_seconds = 120

[admin]
readiness_addr = "0.0.0.0:25021"
metrics_addr = "0.0.0.0:25020"
admin_addr = "127.0.0.1:25000"
header_read_timeout_ms = 2000
max_connections_per_source = 4

[log]
format = "json"
level = "debug"

[[endpoint]]
ip = "10.200.2.11"
identity = "spiffe://example.org/ns/a/sa/b"

[[workload]]
name = "web"
namespace = "shop"
service_account = "web-sa"
labels = { app = "web" }
netns = "/run/netns/web"
probe_ports = [8081, 8080, 8081]
"#;

    /// The keys EVERY_KEY cannot hold at once (the other identity provider).
    const FILES_PROVIDER: &str =
        "node_name = \"n1\"\n[identity]\nprovider = \"files\"\nfiles_dir = \"/etc/zt/files\"\n";
    const SPIRE_PROVIDER: &str = "node_name = \"n1\"\n[identity]\nprovider = \"spire\"\nadmin_socket = \"/run/spire/admin/admin.sock\"\nselectors = [\"k8s:ns:{namespace}\", \"k8s:sa:{service_account}\", \"k8s:pod-name:{name}\"]\n";

    #[test]
    fn spire_provider_takes_an_admin_socket_and_selector_templates() {
        let c = parse(SPIRE_PROVIDER).unwrap_or_else(|e| panic!("{e}"));
        let Some(IdentityProvider::Spire {
            admin_socket,
            selectors,
        }) = c.identity.map(|i| i.provider)
        else {
            panic!("spire provider");
        };
        assert_eq!(admin_socket, PathBuf::from("/run/spire/admin/admin.sock"));
        let workload = Workload {
            id: WorkloadId {
                namespace: "shop".into(),
                name: "web-0".into(),
            },
            service_account: "web".into(),
            labels: BTreeMap::new(),
            netns: "/run/netns/x".into(),
            probe_ports: vec![],
        };
        let filled: Vec<String> = selectors
            .iter()
            .map(|t| format!("{}:{}", t.kind, t.value_for(&workload)))
            .collect();
        assert_eq!(filled, ["k8s:ns:shop", "k8s:sa:web", "k8s:pod-name:web-0"]);
        // The default: namespace and service account.
        let c = parse(
            "node_name = \"n\"\n[identity]\nprovider = \"spire\"\nadmin_socket = \"/a.sock\"\n",
        )
        .unwrap();
        let Some(IdentityProvider::Spire { selectors, .. }) = c.identity.map(|i| i.provider) else {
            panic!("spire provider");
        };
        assert_eq!(selectors.len(), 2);
        for (body, needle) in [
            ("admin_socket = \"a.sock\"\n", "not an absolute path"),
            ("", "takes admin_socket"),
            ("admin_socket = \"/a\"\nca_dir = \"/ca\"\n", "no ca_dir"),
            (
                "admin_socket = \"/a\"\nselectors = [\"k8s\"]\n",
                "not type:value",
            ),
            (
                "admin_socket = \"/a\"\nselectors = [\"k8s:ns:{nmespace}\"]\n",
                "unknown field {nmespace}",
            ),
            ("admin_socket = \"/a\"\nselectors = []\n", "empty"),
        ] {
            let text = format!("node_name = \"n\"\n[identity]\nprovider = \"spire\"\n{body}");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{body}: {err}");
        }
        let err = parse("node_name = \"n\"\n[identity]\nprovider = \"builtin\"\nca_dir = \"/ca\"\nadmin_socket = \"/a\"\n").unwrap_err();
        assert!(err.to_string().contains("belong to provider"), "{err}");
    }

    #[test]
    fn every_documented_key_parses() {
        parse(FILES_PROVIDER).unwrap_or_else(|e| panic!("{e}"));
        let c = parse(EVERY_KEY).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.mtls.mode, MtlsMode::Permissive);
        assert_eq!(c.policy.default, PolicyDefault::Allow);
        assert_eq!(c.policy.root_namespace, "mesh-root");
        assert_eq!(c.capture.fail_mode, FailMode::Open);
        assert_eq!(c.capture.udp_inbound_ports, vec![5353]);
        assert_eq!(c.capture.udp_outbound_ports, vec![53, 123]);
        assert_eq!(c.workloads[0].probe_ports, vec![8080, 8081]);
        assert_eq!(c.capture.reconcile_interval, Duration::from_secs(1));
        assert_eq!(c.limits.drain, Duration::from_secs(5));
        assert_eq!(c.limits.max_handshakes_per_source, 4);
        assert_eq!(c.limits.max_streams_per_connection, 50);
        assert_eq!(c.limits.hbone_idle_timeout, Duration::from_secs(120));
        assert_eq!(c.admin.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.admin.max_connections_per_source, 4);
        assert_eq!(c.admin.admin_addr.port(), 25000);
        assert_eq!(
            c.kubernetes.as_ref().map(|k| k.netns_dir.clone()),
            Some(PathBuf::from("/var/run/netns"))
        );
        assert_eq!(c.workloads[0].labels["app"], "web");
        assert_eq!(c.endpoints.len(), 1);

        // Every key in README's table is in the file above.
        let readme = include_str!("../../README.md");
        let table = readme
            .split("## Node config")
            .nth(1)
            .and_then(|t| t.split("\n## ").next())
            .expect("README has the node config table");
        let parsed: toml::Table = toml::from_str(EVERY_KEY).unwrap();
        let alternative: toml::Table = toml::from_str(FILES_PROVIDER).unwrap();
        let spire: toml::Table = toml::from_str(SPIRE_PROVIDER).unwrap();
        let mut checked = 0;
        for row in table.lines().filter(|l| l.starts_with("| `")) {
            let cell = row.split('|').nth(1).unwrap_or_default();
            let names: Vec<&str> = cell.split('`').skip(1).step_by(2).collect();
            let (section, keys) = match names[0].split_once(' ') {
                Some((section, first)) => (
                    section.trim_matches(['[', ']']),
                    std::iter::once(first)
                        .chain(names[1..].iter().copied())
                        .collect::<Vec<_>>(),
                ),
                None => ("", names.clone()),
            };
            let lookup = |root: &toml::Table, key: &str| {
                let mut table = root;
                for part in section.split('.').filter(|p| !p.is_empty()) {
                    table = match table.get(part) {
                        Some(toml::Value::Array(items)) => items[0].as_table().unwrap(),
                        Some(v) => v.as_table().unwrap(),
                        None => return false,
                    };
                }
                table.contains_key(key)
            };
            for key in keys {
                assert!(
                    lookup(&parsed, key) || lookup(&alternative, key) || lookup(&spire, key),
                    "README documents [{section}] {key}, not in EVERY_KEY"
                );
                checked += 1;
            }
        }
        assert!(checked >= 35, "only {checked} keys found in README");
    }

    #[test]
    fn bad_forms_name_file_line_and_key() {
        let base = "node_name = \"n1\"\n";
        for (body, line, needle) in [
            ("[capture]\nfail_mode = 3\n", 3, "fail_mode: "),
            (
                "[limits]\nidle_timeout_seconds = \"soon\"\n",
                3,
                "idle_timeout_seconds: ",
            ),
            ("[mtls]\nmod = \"strict\"\n", 3, "unknown field `mod`"),
            (
                "[policy]\ndefault = \"maybe\"\n",
                3,
                "unknown variant `maybe`",
            ),
            (
                "[policy]\nroot_namespace = \"Root NS\"\n",
                3,
                "policy.root_namespace",
            ),
            ("[policy]\ndir = \"relative/dir\"\n", 3, "policy.dir"),
            ("[capture]\nbpffs_dir = \"pins\"\n", 3, "capture.bpffs_dir"),
            (
                "[limits]\ndrain_seconds = 1\nmax_handshakes_per_source = 0\n",
                4,
                "limits.max_handshakes_per_source: must be at least 1",
            ),
            (
                "[limits]\nmax_streams_per_connection = 0\n",
                3,
                "limits.max_streams_per_connection",
            ),
            (
                "[limits]\nhbone_idle_timeout_seconds = 0\n",
                3,
                "limits.hbone_idle_timeout_seconds",
            ),
            (
                "[admin]\nheader_read_timeout_ms = 0\n",
                3,
                "admin.header_read_timeout_ms",
            ),
            (
                "[admin]\nmax_connections_per_source = 0\n",
                3,
                "admin.max_connections_per_source",
            ),
            ("[admin]\nmetrics_addr = \"nowhere\"\n", 3, "metrics_addr"),
            (
                "[discovery.kubernetes]\nenabled = true\nnetns_dir = \"netns\"\n",
                4,
                "discovery.kubernetes.netns_dir",
            ),
            (
                "[discovery.kubernetes]\nenabled = true\napi_server = \"https://10.0.0.1\"\n",
                4,
                "discovery.kubernetes.api_server",
            ),
            (
                "[discovery.kubernetes]\nenabled = true\nkubeconfig = \"kubeconfig\"\n",
                4,
                "discovery.kubernetes.kubeconfig",
            ),
            (
                "[[endpoint]]\nip = \"10.0.0.1\"\nidentity = \"not-spiffe\"\n",
                4,
                "endpoint[0].identity",
            ),
            (
                "[[workload]]\nname = \"a\"\nnamespace = \"d\"\nnetns = \"/run/netns/a\"\n[[workload]]\nname = \"B\"\nnamespace = \"d\"\nnetns = \"/run/netns/b\"\n",
                7,
                "workload[1].name",
            ),
            (
                "[[workload]]\nname = \"a\"\nnamespace = \"d\"\nnetns = \"rel\"\n",
                5,
                "workload[0].netns",
            ),
        ] {
            let text = format!("{base}{body}");
            let err = parse(&text).expect_err(body).to_string();
            let at = format!("/etc/zt/node.toml:{line}:");
            assert!(err.starts_with(&at), "{body:?}: {err} (want line {line})");
            assert!(err.contains(needle), "{body:?}: {err} (want {needle:?})");
        }
    }

    #[test]
    fn an_endpoint_written_ipv4_mapped_is_its_ipv4_address() {
        let c = parse("node_name = \"n1\"\n[[endpoint]]\nip = \"::ffff:10.0.0.1\"\nidentity = \"spiffe://cluster.local/ns/a/sa/b\"\n").unwrap();
        assert_eq!(
            c.endpoints[0].ip,
            "10.0.0.1".parse::<std::net::IpAddr>().unwrap()
        );
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = parse("node_name = \"n1\"\n").unwrap();
        assert_eq!(c.capture.bpffs_dir, PathBuf::from("/sys/fs/bpf/zt"));
        assert_eq!(c.capture.fail_mode, FailMode::Closed);
        assert_eq!(c.log.format, LogFormat::Text);
        assert!(c.workloads.is_empty());
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("node_name = \"n1\"\n[capture]\nfail_mod = \"open\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/zt/node.toml:3:1:"), "{err}");
        assert!(err.contains("fail_mod"), "{err}");
    }

    #[test]
    fn bad_value_is_rejected() {
        let err = parse("node_name = \"n1\"\n[capture]\nfail_mode = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains(":3:"), "{err}");
        assert!(err.contains("sometimes"), "{err}");
    }

    #[test]
    fn same_netns_twice_is_rejected() {
        let text = r#"
node_name = "n1"
[[workload]]
name = "a"
namespace = "default"
netns = "/run/netns/p"
[[workload]]
name = "b"
namespace = "default"
netns = "/run/netns/p"
"#;
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("already enrolled as default/a"), "{err}");
    }

    #[test]
    fn workload_names_must_be_dns_labels() {
        let text =
            "node_name = \"n1\"\n[[workload]]\nname = \"A_b\"\nnamespace = \"x\"\nnetns = \"/n\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("workload[0].name"), "{err}");
    }

    #[test]
    fn port_zero_is_refused_where_ports_are_listed() {
        for (text, key) in [
            (
                "node_name = \"n1\"\n[capture]\nudp_inbound_ports = [0]\n",
                "capture.udp_inbound_ports",
            ),
            (
                "node_name = \"n1\"\n[capture]\nudp_outbound_ports = [53, 0]\n",
                "capture.udp_outbound_ports",
            ),
            (
                "node_name = \"n1\"\n[[workload]]\nname = \"a\"\nnamespace = \"x\"\nnetns = \"/n\"\nprobe_ports = [0]\n",
                "workload[0].probe_ports",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("0 is not a port"),
                "{err}"
            );
        }
        let err = parse("node_name = \"n1\"\n[capture]\nudp_inbound_ports = [70000]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("udp_inbound_ports"), "{err}");
    }

    #[test]
    fn identity_section_is_typed() {
        let c = parse("node_name = \"n\"\ntrust_domain = \"Example.ORG\"\n[identity]\nprovider = \"builtin\"\nca_dir = \"/etc/zt/ca\"\n").unwrap();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        let id = c.identity.unwrap();
        assert_eq!(
            id.provider,
            IdentityProvider::Builtin {
                ca_dir: "/etc/zt/ca".into()
            }
        );
        assert_eq!(id.svid_ttl, Duration::from_secs(3600));
        let err = parse("node_name = \"n\"\n[identity]\nprovider = \"files\"\nca_dir = \"/x\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("takes files_dir"), "{err}");
        let err = parse("node_name = \"n\"\ntrust_domain = \"a:b\"\n").unwrap_err();
        assert!(err.to_string().contains("trust_domain"), "{err}");
    }

    #[test]
    fn line_column_is_one_based() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
    }
}
