//! Node configs for the tests' agents, built as typed values and rendered to TOML by serde: a
//! test says which section it varies instead of patching text. (Tests of malformed files write
//! their text themselves.)
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{Node, Pod, agent::spiffe_id};

/// A node config file; `Display` renders it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeConfigBuilder {
    pub node_name: String,
    pub capture: Capture,
    pub log: Log,
    pub policy: Policy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery: Option<Discovery>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    #[serde(rename = "endpoint", skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    #[serde(rename = "workload", skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<Workload>,
}

/// `[capture]`: the node's cgroup and pin directory, and what tests tune.
#[derive(Debug, Clone, Serialize)]
pub struct Capture {
    pub cgroup: PathBuf,
    pub bpffs_dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_source: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_inbound_ports: Option<Vec<u16>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconcile_interval_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Log {
    pub format: &'static str,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyDefault {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    pub default: PolicyDefault,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

/// `[identity]`: which provider issues the workloads' SVIDs.
#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    #[serde(flatten)]
    pub provider: Provider,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svid_ttl_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revocation_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "provider", rename_all = "lowercase")]
pub enum Provider {
    /// The built-in CA made by `zt-daemon ca init` (`agent::ca_init`).
    Builtin { ca_dir: PathBuf },
    /// SVIDs an issuer writes into `files_dir`.
    Files { files_dir: PathBuf },
    /// The node's spire-agent.
    Spire {
        admin_socket: PathBuf,
        selectors: Vec<String>,
    },
}

impl Identity {
    pub fn builtin(ca_dir: &Path) -> Self {
        Self::from(Provider::Builtin {
            ca_dir: ca_dir.to_owned(),
        })
    }

    pub fn files(files_dir: &Path) -> Self {
        Self::from(Provider::Files {
            files_dir: files_dir.to_owned(),
        })
    }

    /// SPIRE, asked for each workload by its namespace and service account.
    pub fn spire(admin_socket: &Path) -> Self {
        Self::from(Provider::Spire {
            admin_socket: admin_socket.to_owned(),
            selectors: vec![
                "k8s:ns:{namespace}".into(),
                "k8s:sa:{service_account}".into(),
            ],
        })
    }
}

impl From<Provider> for Identity {
    fn from(provider: Provider) -> Self {
        Self {
            provider,
            svid_ttl_seconds: None,
            revocation_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    Strict,
    Permissive,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mtls {
    pub mode: MtlsMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_idle_seconds: Option<u64>,
    /// `"tunnel"` or `"splice"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub same_node: Option<&'static str>,
}

/// `[limits]`: only the keys a test sets are written.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Limits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_workload: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_handshakes_per_source: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_streams_per_connection: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hbone_idle_timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_seconds: Option<u64>,
}

/// `[egress]`: `default = "deny"` and what locked-down pods may still reach.
#[derive(Debug, Clone, Serialize)]
pub struct Egress {
    pub default: EgressDefault,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<EgressAllow>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressDefault {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Serialize)]
pub struct EgressAllow {
    pub cidrs: Vec<String>,
    pub ports: Vec<u16>,
}

impl Egress {
    /// Nothing outside the mesh.
    pub fn deny() -> Self {
        Self {
            default: EgressDefault::Deny,
            allow: Vec::new(),
        }
    }

    /// ... except `cidr` on `ports`.
    pub fn allow(mut self, cidr: impl ToString, ports: &[u16]) -> Self {
        self.allow.push(EgressAllow {
            cidrs: vec![cidr.to_string()],
            ports: ports.to_vec(),
        });
        self
    }
}

/// `[admin]`: where the node's endpoints listen (a second agent on a node needs others).
#[derive(Debug, Clone, Serialize)]
pub struct Admin {
    pub readiness_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

#[derive(Debug, Clone, Serialize)]
pub struct Discovery {
    pub kubernetes: Kubernetes,
}

#[derive(Debug, Clone, Serialize)]
pub struct Kubernetes {
    pub enabled: bool,
    pub kubeconfig: PathBuf,
    pub netns_dir: PathBuf,
}

/// `[runtime]`: the agent's async runtime.
#[derive(Debug, Clone, Serialize)]
pub struct Runtime {
    pub worker_threads: usize,
}

/// `[[endpoint]]`: a meshed address on another node and its SPIFFE ID.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub identity: String,
}

/// `[[workload]]`: a pod of the bed, in namespace "default".
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub netns: PathBuf,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub probe_ports: Vec<u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Workload {
    /// `pod`, with service account `sa-<pod>`.
    pub fn of(pod: &Pod) -> Self {
        Self {
            name: pod.name.clone(),
            namespace: "default".into(),
            service_account: format!("sa-{}", pod.name),
            netns: pod.netns.clone(),
            probe_ports: Vec::new(),
            labels: BTreeMap::new(),
        }
    }
}

impl NodeConfigBuilder {
    /// `node`'s agent: its cgroup and pins, a JSON debug log, and no policy (tests that are not
    /// about policy admit everyone); no workloads, no identities.
    pub fn new(node: &Node) -> Self {
        Self {
            node_name: node.name.clone(),
            capture: Capture {
                cgroup: node.cgroup.clone(),
                bpffs_dir: node.pin_dir.clone(),
                probe_source: None,
                udp_inbound_ports: None,
                reconcile_interval_ms: None,
            },
            log: Log {
                format: "json",
                level: "info,zt=debug".into(),
            },
            policy: Policy {
                default: PolicyDefault::Allow,
                dir: None,
            },
            identity: None,
            mtls: None,
            limits: None,
            egress: None,
            admin: None,
            discovery: None,
            runtime: None,
            endpoints: Vec::new(),
            workloads: Vec::new(),
        }
    }

    /// Enrolls `pods` (namespace "default", service account `sa-<pod>`).
    pub fn workloads(mut self, pods: &[&Pod]) -> Self {
        self.workloads.extend(pods.iter().map(|p| Workload::of(p)));
        self
    }

    /// The enrolled `pod`'s entry.
    pub fn workload(&mut self, pod: &Pod) -> &mut Workload {
        self.workloads
            .iter_mut()
            .find(|w| w.name == pod.name)
            .unwrap_or_else(|| panic!("{} is not enrolled", pod.name))
    }

    /// `remote` pods (on other nodes), both their addresses, as meshed endpoints, as discovery
    /// would provide them.
    pub fn endpoints(mut self, remote: &[&Pod]) -> Self {
        for pod in remote {
            for ip in [pod.ip(false), pod.ip(true)] {
                self.endpoints.push(Endpoint {
                    ip,
                    identity: spiffe_id(pod),
                });
            }
        }
        self
    }

    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// A revocation list beside the identity provider.
    pub fn revocation_file(mut self, path: &Path) -> Self {
        self.identity_mut().revocation_file = Some(path.to_owned());
        self
    }

    /// The lifetime of the SVIDs the built-in CA issues.
    pub fn svid_ttl_seconds(mut self, seconds: u64) -> Self {
        self.identity_mut().svid_ttl_seconds = Some(seconds);
        self
    }

    fn identity_mut(&mut self) -> &mut Identity {
        self.identity.as_mut().expect("[identity] is set first")
    }

    pub fn mtls(mut self, mode: MtlsMode) -> Self {
        self.mtls = Some(Mtls {
            mode,
            pool_idle_seconds: None,
            same_node: None,
        });
        self
    }

    /// `[mtls] same_node`: how connections between this node's meshed pods travel.
    pub fn same_node(mut self, how: &'static str) -> Self {
        self.mtls.as_mut().expect("[mtls] is set first").same_node = Some(how);
        self
    }

    pub fn pool_idle_seconds(mut self, seconds: u64) -> Self {
        self.mtls
            .as_mut()
            .expect("[mtls] is set first")
            .pool_idle_seconds = Some(seconds);
        self
    }

    /// The policies in `dir` (a file or directory) decide, `default` for workloads no ALLOW
    /// policy selects.
    pub fn policies(mut self, default: PolicyDefault, dir: Option<&Path>) -> Self {
        self.policy = Policy {
            default,
            dir: dir.map(Path::to_owned),
        };
        self
    }

    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }

    pub fn egress(mut self, egress: Egress) -> Self {
        self.egress = Some(egress);
        self
    }

    pub fn admin(mut self, admin: Admin) -> Self {
        self.admin = Some(admin);
        self
    }

    pub fn probe_source(mut self, source: Ipv4Addr) -> Self {
        self.capture.probe_source = Some(source);
        self
    }

    pub fn udp_inbound_ports(mut self, ports: &[u16]) -> Self {
        self.capture.udp_inbound_ports = Some(ports.to_vec());
        self
    }

    pub fn reconcile_interval_ms(mut self, ms: u64) -> Self {
        self.capture.reconcile_interval_ms = Some(ms);
        self
    }

    /// Kubernetes discovery with `kubeconfig`, pods' network namespaces pinned in `netns_dir`.
    pub fn kubernetes(mut self, kubeconfig: &Path, netns_dir: &Path) -> Self {
        self.discovery = Some(Discovery {
            kubernetes: Kubernetes {
                enabled: true,
                kubeconfig: kubeconfig.to_owned(),
                netns_dir: netns_dir.to_owned(),
            },
        });
        self
    }

    /// `[runtime] worker_threads`.
    pub fn worker_threads(mut self, threads: usize) -> Self {
        self.runtime = Some(Runtime {
            worker_threads: threads,
        });
        self
    }

    pub fn log_level(mut self, level: &str) -> Self {
        self.log.level = level.to_owned();
        self
    }
}

impl fmt::Display for NodeConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = toml::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node {
            name: "n1".into(),
            netns: "/run/netns/n1".into(),
            cgroup: "/sys/fs/cgroup/zt-n1".into(),
            pin_dir: "/sys/fs/bpf/zt-n1".into(),
            pods: Vec::new(),
        }
    }

    #[test]
    fn renders_every_section_it_sets() {
        let text = NodeConfigBuilder::new(&node())
            .identity(Identity::builtin(Path::new("/ca")))
            .revocation_file(Path::new("/revoked"))
            .mtls(MtlsMode::Strict)
            .pool_idle_seconds(2)
            .limits(Limits {
                handshake_timeout_ms: Some(1000),
                ..Limits::default()
            })
            .egress(Egress::deny().allow("10.0.0.1/32", &[5432]))
            .probe_source(Ipv4Addr::new(10, 200, 2, 1))
            .to_string();
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(parsed["node_name"].as_str(), Some("n1"));
        assert_eq!(parsed["identity"]["provider"].as_str(), Some("builtin"));
        assert_eq!(parsed["identity"]["ca_dir"].as_str(), Some("/ca"));
        assert_eq!(
            parsed["identity"]["revocation_file"].as_str(),
            Some("/revoked")
        );
        assert_eq!(parsed["mtls"]["mode"].as_str(), Some("strict"));
        assert_eq!(parsed["mtls"]["pool_idle_seconds"].as_integer(), Some(2));
        assert_eq!(parsed["limits"].as_table().map(|t| t.len()), Some(1));
        assert_eq!(parsed["egress"]["default"].as_str(), Some("deny"));
        assert_eq!(
            parsed["egress"]["allow"][0]["ports"][0].as_integer(),
            Some(5432)
        );
        assert_eq!(
            parsed["capture"]["probe_source"].as_str(),
            Some("10.200.2.1")
        );
        assert_eq!(parsed["policy"]["default"].as_str(), Some("allow"));
        assert!(!parsed.contains_key("discovery"), "{text}");
        // What bench's `quiet` rewrites.
        assert!(text.contains("level = \"info,zt=debug\""), "{text}");
    }
}
