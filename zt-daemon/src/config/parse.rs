//! Validation of the file's shape (`file`) into the typed config: defaults filled in, values
//! checked and put in one canonical form. An error names the file and the line of the value it
//! is about, from the span toml recorded for it.
use std::{net::SocketAddr, num::NonZeroUsize, path::Path, time::Duration};

use toml::Spanned;

use super::{
    AdminConfig, CaptureConfig, ConfigError, DEFAULT_ROOT_NAMESPACE, FailMode, LimitsConfig,
    LogConfig, LogFormat, MeshEndpoint, MtlsConfig, MtlsMode, NodeConfig, PolicyConfig,
    PolicyDefault, RuntimeConfig, SameNode,
    file::RawConfig,
    sections::{egress, identity, kubernetes, workloads},
    source::{Source, line_column},
};
use crate::{
    identity::spiffe::{SpiffeId, TrustDomain},
    workload::is_dns_label,
};

const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/zt";
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 5000;
/// Well short of the kernel's SYN retries (about two minutes), as ztunnel's.
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_POOL_IDLE_SECONDS: u64 = 60;
const DEFAULT_IDLE_TIMEOUT_SECONDS: u64 = 3600;
const DEFAULT_MAX_CONNECTIONS: usize = 16384;
const DEFAULT_RECONCILE_INTERVAL_MS: u64 = 5000;
const DEFAULT_DRAIN_SECONDS: u64 = 30;
const DEFAULT_HANDSHAKES_PER_SOURCE: usize = 16;
/// A source pod's pool holds one connection per destination pod (another per 100 streams): a
/// node of about 100 pods needs a few hundred at most.
const DEFAULT_HBONE_CONNECTIONS_PER_SOURCE: usize = 512;
/// As ztunnel's pool (`pool_max_streams_per_conn`); the pool opens another connection beyond.
const DEFAULT_STREAMS_PER_CONNECTION: u32 = 100;
/// Longer than the client pools' default idle timeout (60 s), so clients close first.
const DEFAULT_HBONE_IDLE_TIMEOUT_SECONDS: u64 = 300;
const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 5000;
/// Prometheus' default scrape timeout: a scraper reading slower than that has given up anyway.
const DEFAULT_ADMIN_WRITE_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_ADMIN_CONNECTIONS_PER_SOURCE: usize = 8;
/// More is a typo: the runtime would fail to start them all.
const MAX_WORKER_THREADS: usize = 1024;
const DNS_PORT: u16 = 53;

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
        let source = Source { path, text };
        // One ConfigMap serves every node: without node_name, the DaemonSet's NODE_NAME (downward
        // API) names the node.
        let (node_name, node_name_span) = match raw.node_name {
            Some(name) => (name.get_ref().clone(), Some(name.span())),
            None => (std::env::var("NODE_NAME").unwrap_or_default(), None),
        };
        if node_name.trim().is_empty() {
            return Err(source.invalid(
                node_name_span,
                "node_name: must not be empty (set it, or $NODE_NAME)".into(),
            ));
        }
        let workloads = workloads(&source, raw.workloads)?;
        for (key, ports) in [
            ("udp_inbound_ports", &raw.capture.udp_inbound_ports),
            ("udp_outbound_ports", &raw.capture.udp_outbound_ports),
        ] {
            if let Some(ports) = ports
                && ports.get_ref().contains(&0)
            {
                return Err(source.invalid_at(ports, format!("capture.{key}: 0 is not a port")));
            }
        }
        let bpffs_dir = match raw.capture.bpffs_dir {
            Some(dir) if !dir.get_ref().is_absolute() => {
                return Err(source.invalid_at(
                    &dir,
                    format!(
                        "capture.bpffs_dir: {} is not an absolute path",
                        dir.get_ref().display()
                    ),
                ));
            }
            Some(dir) => dir.into_inner(),
            None => DEFAULT_BPFFS_DIR.into(),
        };
        let trust_domain: TrustDomain = match &raw.trust_domain {
            Some(text) => text
                .get_ref()
                .parse()
                .map_err(|e| source.invalid_at(text, format!("trust_domain: {e}")))?,
            None => DEFAULT_TRUST_DOMAIN
                .parse()
                .map_err(|e| source.invalid(None, format!("trust_domain: {e}")))?,
        };
        let identity = raw.identity.map(|i| identity(&source, i)).transpose()?;
        let endpoints = raw
            .endpoints
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let identity: SpiffeId = e.identity.get_ref().parse().map_err(|err| {
                    source.invalid_at(&e.identity, format!("endpoint[{i}].identity: {err}"))
                })?;
                // No SVID names a bare trust domain: every handshake to it would fail.
                if identity.path().is_empty() {
                    return Err(source.invalid_at(
                        &e.identity,
                        format!("endpoint[{i}].identity: {identity} has no path; a workload's is spiffe://<trust domain>/<path>"),
                    ));
                }
                // Peers' and destinations' addresses are looked up canonical (IPv4 as IPv4): an
                // endpoint written IPv4-mapped (`::ffff:10.0.0.1`) must be found by them.
                Ok(MeshEndpoint {
                    ip: e.ip.to_canonical(),
                    identity,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let egress = egress(&source, raw.egress)?;
        let root_namespace = match raw.policy.root_namespace {
            Some(ns) if !is_dns_label(ns.get_ref()) => {
                return Err(source.invalid_at(
                    &ns,
                    format!(
                        "policy.root_namespace: {:?} is not a DNS label",
                        ns.get_ref()
                    ),
                ));
            }
            Some(ns) => ns.into_inner(),
            None => DEFAULT_ROOT_NAMESPACE.to_owned(),
        };
        if let Some(dir) = &raw.policy.dir
            && !dir.get_ref().is_absolute()
        {
            return Err(source.invalid_at(
                dir,
                format!(
                    "policy.dir: {} is not an absolute path",
                    dir.get_ref().display()
                ),
            ));
        }
        // Zero would refuse everything (or, for a timeout, everyone at once).
        let as_u64 = |v: &Option<Spanned<usize>>| {
            v.as_ref()
                .map(|v| Spanned::new(v.span(), *v.get_ref() as u64))
        };
        for (key, value) in [
            (
                "limits.max_handshakes_per_source",
                as_u64(&raw.limits.max_handshakes_per_source),
            ),
            (
                "limits.max_hbone_connections_per_source",
                as_u64(&raw.limits.max_hbone_connections_per_source),
            ),
            (
                "limits.max_streams_per_connection",
                raw.limits
                    .max_streams_per_connection
                    .as_ref()
                    .map(|v| Spanned::new(v.span(), u64::from(*v.get_ref()))),
            ),
            (
                "limits.idle_timeout_seconds",
                raw.limits.idle_timeout_seconds.clone(),
            ),
            (
                "limits.connect_timeout_ms",
                raw.limits.connect_timeout_ms.clone(),
            ),
            (
                "limits.hbone_idle_timeout_seconds",
                raw.limits.hbone_idle_timeout_seconds.clone(),
            ),
            (
                "admin.header_read_timeout_ms",
                raw.admin.header_read_timeout_ms.clone(),
            ),
            ("admin.write_timeout_ms", raw.admin.write_timeout_ms.clone()),
            (
                "admin.max_connections_per_source",
                as_u64(&raw.admin.max_connections_per_source),
            ),
            (
                "runtime.worker_threads",
                as_u64(&raw.runtime.worker_threads),
            ),
        ] {
            if let Some(value) = value
                && *value.get_ref() == 0
            {
                return Err(source.invalid_at(&value, format!("{key}: must be at least 1")));
            }
        }
        if let Some(threads) = &raw.runtime.worker_threads
            && *threads.get_ref() > MAX_WORKER_THREADS
        {
            return Err(source.invalid_at(
                threads,
                format!("runtime.worker_threads: at most {MAX_WORKER_THREADS}"),
            ));
        }
        let kubernetes = match raw.discovery.kubernetes {
            Some(k) if k.enabled => Some(kubernetes(&source, k)?),
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
                udp_inbound_ports: raw
                    .capture
                    .udp_inbound_ports
                    .map(Spanned::into_inner)
                    .unwrap_or_default(),
                udp_outbound_ports: raw
                    .capture
                    .udp_outbound_ports
                    .map(Spanned::into_inner)
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
                same_node: raw.mtls.same_node.unwrap_or(SameNode::Tunnel),
            },
            policy: PolicyConfig {
                dir: raw.policy.dir.map(Spanned::into_inner),
                default: raw.policy.default.unwrap_or(PolicyDefault::Deny),
                root_namespace,
            },
            limits: LimitsConfig {
                handshake_timeout: Duration::from_millis(
                    raw.limits
                        .handshake_timeout_ms
                        .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_MS),
                ),
                connect_timeout: Duration::from_millis(
                    raw.limits
                        .connect_timeout_ms
                        .map(Spanned::into_inner)
                        .unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS),
                ),
                idle_timeout: Duration::from_secs(
                    raw.limits
                        .idle_timeout_seconds
                        .map(Spanned::into_inner)
                        .unwrap_or(DEFAULT_IDLE_TIMEOUT_SECONDS),
                ),
                max_connections_per_workload: raw
                    .limits
                    .max_connections_per_workload
                    .unwrap_or(DEFAULT_MAX_CONNECTIONS),
                drain: Duration::from_secs(
                    raw.limits.drain_seconds.unwrap_or(DEFAULT_DRAIN_SECONDS),
                ),
                max_hbone_connections_per_source: raw
                    .limits
                    .max_hbone_connections_per_source
                    .map(Spanned::into_inner)
                    .unwrap_or(DEFAULT_HBONE_CONNECTIONS_PER_SOURCE),
                max_handshakes_per_source: raw
                    .limits
                    .max_handshakes_per_source
                    .map(Spanned::into_inner)
                    .unwrap_or(DEFAULT_HANDSHAKES_PER_SOURCE),
                max_streams_per_connection: raw
                    .limits
                    .max_streams_per_connection
                    .map(Spanned::into_inner)
                    .unwrap_or(DEFAULT_STREAMS_PER_CONNECTION),
                hbone_idle_timeout: Duration::from_secs(
                    raw.limits
                        .hbone_idle_timeout_seconds
                        .map(Spanned::into_inner)
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
                        .map(Spanned::into_inner)
                        .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT_MS),
                ),
                write_timeout: Duration::from_millis(
                    raw.admin
                        .write_timeout_ms
                        .map(Spanned::into_inner)
                        .unwrap_or(DEFAULT_ADMIN_WRITE_TIMEOUT_MS),
                ),
                max_connections_per_source: raw
                    .admin
                    .max_connections_per_source
                    .map(Spanned::into_inner)
                    .unwrap_or(DEFAULT_ADMIN_CONNECTIONS_PER_SOURCE),
            },
            log: LogConfig {
                format: raw.log.format.unwrap_or(LogFormat::Text),
                level: raw.log.level.unwrap_or_else(|| "info".to_owned()),
            },
            runtime: RuntimeConfig {
                worker_threads: raw
                    .runtime
                    .worker_threads
                    .and_then(|n| NonZeroUsize::new(n.into_inner())),
            },
            workloads,
            kubernetes,
            egress,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::PathBuf, time::Duration};

    use super::{
        super::{IdentityProvider, examples::*},
        *,
    };
    use crate::workload::{Workload, WorkloadId};

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
    fn same_node_takes_three_values_and_names_a_wrong_one() {
        for (text, want) in [
            ("tunnel", SameNode::Tunnel),
            ("splice", SameNode::Splice),
            ("direct", SameNode::Direct),
        ] {
            let c = parse(
                &EVERY_KEY.replace("same_node = \"splice\"", &format!("same_node = \"{text}\"")),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.mtls.same_node, want);
        }
        let err = parse(&EVERY_KEY.replace("same_node = \"splice\"", "same_node = \"kernel\""))
            .unwrap_err()
            .to_string();
        // The file, line and column, then the key.
        assert!(
            err.starts_with("/etc/zt/node.toml:14:") && err.contains("same_node: unknown variant"),
            "{err}"
        );
    }

    #[test]
    fn every_documented_key_parses() {
        parse(FILES_PROVIDER).unwrap_or_else(|e| panic!("{e}"));
        let c = parse(EVERY_KEY).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.mtls.mode, MtlsMode::Permissive);
        assert_eq!(c.mtls.same_node, SameNode::Splice);
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
        assert_eq!(c.runtime.worker_threads, NonZeroUsize::new(2));
        assert_eq!(c.limits.hbone_idle_timeout, Duration::from_secs(120));
        assert_eq!(c.admin.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.admin.write_timeout, Duration::from_secs(3));
        assert_eq!(c.admin.max_connections_per_source, 4);
        assert_eq!(c.admin.admin_addr.port(), 25000);
        assert_eq!(
            c.kubernetes.as_ref().map(|k| k.netns_dir.clone()),
            Some(PathBuf::from("/var/run/netns"))
        );
        assert_eq!(c.workloads[0].labels["app"], "web");
        assert_eq!(c.endpoints.len(), 1);

        // Every key in README's table is in the file above.
        let mut docs: Vec<toml::Table> = [EVERY_KEY, FILES_PROVIDER, SPIRE_PROVIDER]
            .iter()
            .map(|text| toml::from_str(text).unwrap())
            .collect();
        let mut checked = 0;
        for DocumentedKey { section, key, .. } in documented_keys() {
            assert!(
                docs.iter_mut()
                    .any(|doc| table_of(doc, &section).is_some_and(|t| t.contains_key(&key))),
                "README documents [{section}] {key}, not in EVERY_KEY"
            );
            checked += 1;
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
                "[limits]\nconnect_timeout_ms = 0\n",
                3,
                "limits.connect_timeout_ms: must be at least 1",
            ),
            (
                "[limits]\nidle_timeout_seconds = 0\n",
                3,
                "limits.idle_timeout_seconds: must be at least 1",
            ),
            (
                "[runtime]\nworker_threads = 0\n",
                3,
                "runtime.worker_threads: must be at least 1",
            ),
            ("[runtime]\nworker_threads = -2\n", 3, "worker_threads"),
            (
                "[runtime]\nworker_threads = 1025\n",
                3,
                "runtime.worker_threads: at most 1024",
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
                "[[endpoint]]\nip = \"10.0.0.1\"\nidentity = \"spiffe://cluster.local\"\n",
                4,
                "endpoint[0].identity: spiffe://cluster.local has no path",
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
            (
                "[[workload]]\nname = \"a\"\nnamespace = \"d\"\nnetns = \"/run/netns/a\"\n[[workload]]\nname = \"a\"\nnamespace = \"d\"\nnetns = \"/run/netns/b\"\n",
                7,
                "workload[1]: d/a is listed twice",
            ),
            // A missing key: the section's provider.
            (
                "[identity]\nprovider = \"spire\"\n",
                3,
                "identity: provider \"spire\" takes admin_socket",
            ),
            // The very element of a list.
            (
                "[[egress.allow]]\ncidrs = [\n  \"10.0.0.0/8\",\n  \"nonsense\",\n]\n",
                5,
                "egress.allow[0].cidrs: \"nonsense\"",
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
        assert_eq!(c.runtime.worker_threads, None);
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
}
