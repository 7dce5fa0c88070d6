//! The node config file: parsed and validated once into typed structs, so nothing
//! downstream re-parses strings. Every error names the file, and where it can the line and key.
//!
//! This file holds the typed config; `file` is the file's shape as operators write it, `parse`
//! validates one into the other, and `reload` says which changed keys need a restart.
use std::{
    net::{Ipv4Addr, SocketAddr},
    num::NonZeroUsize,
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use crate::identity::settings::{IdentityConfig, IdentityProvider, SelectorTemplate};

use crate::{
    egress::EgressPolicy,
    identity::spiffe::{SpiffeId, TrustDomain},
    workload::Workload,
};

#[cfg(test)]
mod examples;
mod file;
mod parse;
mod reload;
mod sections;
mod source;

pub const DEFAULT_PATH: &str = "/etc/zt/node.toml";
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
///
/// It serializes to the settings only a restart applies, named as the file names them: a field
/// the agent applies on reload is `#[serde(skip)]`, every other one is compared by `reload`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeConfig {
    pub node_name: String,
    #[serde(serialize_with = "reload::as_text")]
    pub trust_domain: TrustDomain,
    /// `None`: capture only, no workload identities (no `[identity]` section).
    pub identity: Option<IdentityConfig>,
    /// Applied in part on reload, so its restart-only keys are named one by one.
    #[serde(flatten)]
    pub capture: CaptureConfig,
    pub mtls: MtlsConfig,
    /// Reloaded (and the policy files are watched).
    #[serde(skip)]
    pub policy: PolicyConfig,
    pub limits: LimitsConfig,
    /// Meshed workloads on other nodes (until discovery provides them): address -> identity.
    /// Reloaded.
    #[serde(skip)]
    pub endpoints: Vec<MeshEndpoint>,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    /// Static workloads (`[[workload]]`). Reloaded.
    #[serde(skip)]
    pub workloads: Vec<Workload>,
    /// `None`: no Kubernetes discovery (static workloads only).
    #[serde(rename = "discovery.kubernetes")]
    pub kubernetes: Option<KubernetesDiscovery>,
    /// What meshed pods may reach outside the mesh (`[egress]`). Reloaded.
    #[serde(skip)]
    pub egress: EgressPolicy,
}

/// `[discovery.kubernetes]`: watch this node's pods and enroll the meshed ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KubernetesDiscovery {
    /// A kubeconfig file (server, CA, credentials); `None` = the in-cluster service account,
    /// else `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// Where the pods' network namespaces are pinned by the container runtime.
    pub netns_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MtlsConfig {
    pub mode: MtlsMode,
    /// A pooled HBONE connection without streams closes after this long.
    pub pool_idle_timeout: Duration,
    pub same_node: SameNode,
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitsConfig {
    /// A TLS handshake on the tunnel must finish within this.
    pub handshake_timeout: Duration,
    /// A TCP connect the agent makes (to a pod, an HBONE port, a destination outside the mesh)
    /// must be answered within this; a CONNECT on the tunnel within twice this.
    pub connect_timeout: Duration,
    /// A connection with no bytes in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Captured connections (outbound, inbound and tunnel streams) one workload may have open.
    pub max_connections_per_workload: usize,
    /// On SIGTERM, open connections get this long to finish before they are closed.
    pub drain: Duration,
    /// TLS handshakes one source address may have pending at once on this node's HBONE
    /// listeners (unauthenticated work, bounded apart from the workloads' connections).
    pub max_handshakes_per_source: usize,
    /// Authenticated HBONE connections one source address may hold open at once on this node's
    /// listeners (they take none of a workload's connections: their streams do).
    pub max_hbone_connections_per_source: usize,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS on the HBONE listeners.
    pub max_streams_per_connection: u32,
    /// An inbound HBONE connection without streams for this long is sent GOAWAY.
    pub hbone_idle_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Inbound plaintext (from outside the mesh) is refused; PeerAuthentication may override it.
    Strict,
    /// ... or accepted.
    Permissive,
}

/// How a connection between two meshed pods of this node travels, once policy allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SameNode {
    /// Over HBONE with mutual TLS, like a connection to another node.
    Tunnel,
    /// The agent's two sockets spliced in the kernel: no TLS, no copy through user space. Both
    /// ends, their identities and the kernel are this node's; see docs/architecture.md.
    Splice,
    /// As `Splice` for the first connection from a pod to a destination pod's address and port;
    /// once policy allowed it, the next ones go pod to pod in the kernel, past the agent, until
    /// a policy or trust change (which also aborts the open ones it denies).
    Direct,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshEndpoint {
    pub ip: std::net::IpAddr,
    pub identity: SpiffeId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    /// A response its client takes no bytes of for this long is reset.
    pub write_timeout: Duration,
    /// Connections one source address may hold open on each endpoint.
    pub max_connections_per_source: usize,
}

/// `[capture]`. The keys applied on reload (the kernel's settings map) are `#[serde(skip)]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureConfig {
    /// cgroup v2 directory the cgroup programs attach to; `None` = the cgroup v2 root.
    #[serde(rename = "capture.cgroup")]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory holding this agent's pins.
    #[serde(rename = "capture.bpffs_dir")]
    pub bpffs_dir: PathBuf,
    #[serde(skip)]
    pub fail_mode: FailMode,
    /// Source address of kubelet probes, let through inbound capture to each pod's probe ports.
    #[serde(skip)]
    pub probe_source: Option<Ipv4Addr>,
    /// UDP ports every meshed pod may receive on while its inbound is STRICT.
    #[serde(skip)]
    pub udp_inbound_ports: Vec<u16>,
    /// UDP ports every meshed pod may send to while egress outside the mesh is refused
    /// (default: 53, DNS), and receive the replies from.
    #[serde(skip)]
    pub udp_outbound_ports: Vec<u16>,
    /// How often the kernel's capture state is compared with the enrolled workloads and repaired.
    #[serde(skip)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing EnvFilter directive, e.g. `info` or `zt_daemon=debug`.
    pub level: String,
}

/// `[runtime]`: the agent's async runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeConfig {
    /// Threads that run connections; `None`: one per CPU the agent may use.
    pub worker_threads: Option<NonZeroUsize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}
