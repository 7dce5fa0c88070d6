//! The node file's shape as operators write it: every key optional where it has a default,
//! unknown keys refused. Values that validation can refuse keep their place in the file
//! (`Spanned`), so the error names their line.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use serde::Deserialize;
use toml::Spanned;

use super::{FailMode, LogFormat, MtlsMode, PolicyDefault, SameNode};
use crate::egress::EgressDefault;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) node_name: Option<Spanned<String>>,
    pub(super) trust_domain: Option<Spanned<String>>,
    pub(super) identity: Option<RawIdentity>,
    #[serde(default)]
    pub(super) capture: RawCapture,
    #[serde(default)]
    pub(super) mtls: RawMtls,
    #[serde(default)]
    pub(super) policy: RawPolicy,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default, rename = "endpoint")]
    pub(super) endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) runtime: RawRuntime,
    #[serde(default, rename = "workload")]
    pub(super) workloads: Vec<RawWorkload>,
    #[serde(default)]
    pub(super) discovery: RawDiscovery,
    #[serde(default)]
    pub(super) egress: RawEgress,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgress {
    pub(super) default: Option<EgressDefault>,
    #[serde(default)]
    pub(super) deny_namespaces: Vec<String>,
    #[serde(default)]
    pub(super) allow: Vec<RawEgressAllow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgressAllow {
    pub(super) cidrs: Spanned<Vec<Spanned<String>>>,
    pub(super) ports: Option<Spanned<Vec<u16>>>,
    #[serde(default)]
    pub(super) namespaces: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    pub(super) kubernetes: Option<RawKubernetes>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    pub(super) enabled: bool,
    pub(super) kubeconfig: Option<Spanned<PathBuf>>,
    /// Removed: a bare URL carried no CA and no credentials. Named here to say so.
    pub(super) api_server: Option<Spanned<String>>,
    pub(super) netns_dir: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCapture {
    pub(super) cgroup: Option<PathBuf>,
    pub(super) bpffs_dir: Option<Spanned<PathBuf>>,
    pub(super) fail_mode: Option<FailMode>,
    pub(super) probe_source: Option<Ipv4Addr>,
    pub(super) udp_inbound_ports: Option<Spanned<Vec<u16>>>,
    pub(super) udp_outbound_ports: Option<Spanned<Vec<u16>>>,
    pub(super) reconcile_interval_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    pub(super) provider: Spanned<RawProvider>,
    pub(super) ca_dir: Option<PathBuf>,
    pub(super) files_dir: Option<PathBuf>,
    pub(super) admin_socket: Option<Spanned<PathBuf>>,
    pub(super) selectors: Option<Spanned<Vec<String>>>,
    pub(super) svid_ttl_seconds: Option<Spanned<u64>>,
    pub(super) revocation_file: Option<PathBuf>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawProvider {
    Builtin,
    Files,
    Spire,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMtls {
    pub(super) mode: Option<MtlsMode>,
    pub(super) pool_idle_seconds: Option<u64>,
    pub(super) same_node: Option<SameNode>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) dir: Option<Spanned<PathBuf>>,
    pub(super) default: Option<PolicyDefault>,
    pub(super) root_namespace: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) handshake_timeout_ms: Option<u64>,
    pub(super) connect_timeout_ms: Option<Spanned<u64>>,
    pub(super) idle_timeout_seconds: Option<Spanned<u64>>,
    pub(super) max_connections_per_workload: Option<usize>,
    pub(super) drain_seconds: Option<u64>,
    pub(super) max_handshakes_per_source: Option<Spanned<usize>>,
    pub(super) max_hbone_connections_per_source: Option<Spanned<usize>>,
    pub(super) max_streams_per_connection: Option<Spanned<u32>>,
    pub(super) hbone_idle_timeout_seconds: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoint {
    pub(super) ip: IpAddr,
    pub(super) identity: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) readiness_addr: Option<SocketAddr>,
    pub(super) metrics_addr: Option<SocketAddr>,
    pub(super) admin_addr: Option<SocketAddr>,
    pub(super) header_read_timeout_ms: Option<Spanned<u64>>,
    pub(super) write_timeout_ms: Option<Spanned<u64>>,
    pub(super) max_connections_per_source: Option<Spanned<usize>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<LogFormat>,
    pub(super) level: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) worker_threads: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkload {
    pub(super) name: Spanned<String>,
    pub(super) namespace: Spanned<String>,
    /// `None`: "default".
    pub(super) service_account: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
    pub(super) netns: Spanned<PathBuf>,
    pub(super) probe_ports: Option<Spanned<Vec<u16>>>,
}
