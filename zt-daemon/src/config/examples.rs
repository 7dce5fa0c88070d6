//! Node files the unit tests of `config` share: one with every documented key, the keys it
//! cannot hold at once, and README's table of keys.
use std::path::Path;

use super::{ConfigError, NodeConfig};

pub(super) fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
    NodeConfig::parse(Path::new("/etc/zt/node.toml"), text)
}

/// Every key README documents, with a non-default value.
pub(super) const EVERY_KEY: &str = r#"
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
same_node = "splice"

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
connect_timeout_ms = 3000
idle_timeout_seconds = 60
drain_seconds = 5
max_connections_per_workload = 100
max_handshakes_per_source = 4
max_hbone_connections_per_source = 64
max_streams_per_connection = 50
hbone_idle_timeout_seconds = 120

[admin]
readiness_addr = "0.0.0.0:25021"
metrics_addr = "0.0.0.0:25020"
admin_addr = "127.0.0.1:25000"
header_read_timeout_ms = 2000
write_timeout_ms = 3000
max_connections_per_source = 4

[log]
format = "json"
level = "debug"

[runtime]
worker_threads = 2

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
pub(super) const FILES_PROVIDER: &str =
    "node_name = \"n1\"\n[identity]\nprovider = \"files\"\nfiles_dir = \"/etc/zt/files\"\n";
pub(super) const SPIRE_PROVIDER: &str = "node_name = \"n1\"\n[identity]\nprovider = \"spire\"\nadmin_socket = \"/run/spire/admin/admin.sock\"\nselectors = [\"k8s:ns:{namespace}\", \"k8s:sa:{service_account}\", \"k8s:pod-name:{name}\"]\n";

/// One row's key of README's node config table.
pub(super) struct DocumentedKey {
    /// `""` for a top-level key, else the table, as `discovery.kubernetes` or `egress.allow`.
    pub(super) section: String,
    pub(super) key: String,
    /// The row says "(restart)": a reload does not apply it.
    pub(super) restart: bool,
}

/// Every key of README's node config table.
pub(super) fn documented_keys() -> Vec<DocumentedKey> {
    let readme = include_str!("../../../README.md");
    let table = readme
        .split("## Node config")
        .nth(1)
        .and_then(|t| t.split("\n## ").next())
        .expect("README has the node config table");
    let mut keys = Vec::new();
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let cell = row.split('|').nth(1).unwrap_or_default();
        let restart = row
            .trim_end()
            .trim_end_matches('|')
            .trim_end()
            .ends_with("(restart)");
        let names: Vec<&str> = cell.split('`').skip(1).step_by(2).collect();
        let (section, first) = match names[0].split_once(' ') {
            Some((section, first)) => (section.trim_matches(['[', ']']), first),
            None => ("", names[0]),
        };
        for key in std::iter::once(first).chain(names[1..].iter().copied()) {
            keys.push(DocumentedKey {
                section: section.to_owned(),
                key: key.to_owned(),
                restart,
            });
        }
    }
    keys
}

/// The table `section` of `root` (a parsed node file); of an array of tables, the first.
pub(super) fn table_of<'a>(
    root: &'a mut toml::Table,
    section: &str,
) -> Option<&'a mut toml::Table> {
    let mut table = root;
    for part in section.split('.').filter(|p| !p.is_empty()) {
        table = match table.get_mut(part)? {
            toml::Value::Array(items) => items.first_mut()?.as_table_mut()?,
            v => v.as_table_mut()?,
        };
    }
    Some(table)
}
