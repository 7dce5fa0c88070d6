//! Validation of the file's sections that are more than defaults: static workloads, egress,
//! Kubernetes discovery and the identity provider.
use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;
use toml::Spanned;

use super::{
    ConfigError, IdentityConfig, IdentityProvider, KubernetesDiscovery, SelectorTemplate,
    file::{RawEgress, RawIdentity, RawKubernetes, RawProvider, RawWorkload},
    source::Source,
};
use crate::{
    egress::{EgressAllow, EgressDefault, EgressPolicy},
    workload::{Workload, WorkloadId, is_dns_label},
};

const DEFAULT_SVID_TTL_SECONDS: u64 = 3600;
const DEFAULT_NETNS_DIR: &str = "/run/netns";
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// The selectors SPIRE's Kubernetes workload attestor would give a pod: its namespace and
/// service account.
const DEFAULT_SPIRE_SELECTORS: [&str; 2] = ["k8s:ns:{namespace}", "k8s:sa:{service_account}"];

/// The static `[[workload]]`s: DNS-label names, each once, each in its own network namespace.
pub(super) fn workloads(
    source: &Source,
    raw: Vec<RawWorkload>,
) -> Result<Vec<Workload>, ConfigError> {
    let mut ids = HashSet::new();
    let mut netns_paths: BTreeMap<PathBuf, WorkloadId> = BTreeMap::new();
    let mut workloads = Vec::with_capacity(raw.len());
    for (i, w) in raw.into_iter().enumerate() {
        let service_account = w
            .service_account
            .unwrap_or_else(|| Spanned::new(w.name.span(), DEFAULT_SERVICE_ACCOUNT.to_owned()));
        for (field, value) in [
            ("name", &w.name),
            ("namespace", &w.namespace),
            ("service_account", &service_account),
        ] {
            if !is_dns_label(value.get_ref()) {
                return Err(source.invalid_at(
                    value,
                    format!(
                        "workload[{i}].{field}: {:?} is not a DNS label (lowercase letters, digits, '-')",
                        value.get_ref()
                    ),
                ));
            }
        }
        let name_span = w.name.span();
        let id = WorkloadId {
            namespace: w.namespace.into_inner(),
            name: w.name.into_inner(),
        };
        if !ids.insert(id.clone()) {
            return Err(source.invalid(
                Some(name_span),
                format!("workload[{i}]: {id} is listed twice"),
            ));
        }
        let netns = w.netns.get_ref();
        if !netns.is_absolute() {
            return Err(source.invalid_at(
                &w.netns,
                format!(
                    "workload[{i}].netns: {} is not an absolute path",
                    netns.display()
                ),
            ));
        }
        if let Some(other) = netns_paths.insert(netns.clone(), id.clone()) {
            return Err(source.invalid_at(
                &w.netns,
                format!(
                    "workload[{i}].netns: {} is already enrolled as {other}",
                    netns.display()
                ),
            ));
        }
        // One form, as discovery produces it, so the kernel's state compares equal.
        let mut probe_ports = match w.probe_ports {
            Some(ports) if ports.get_ref().contains(&0) => {
                return Err(source.invalid_at(
                    &ports,
                    format!("workload[{i}].probe_ports: 0 is not a port"),
                ));
            }
            Some(ports) => ports.into_inner(),
            None => Vec::new(),
        };
        probe_ports.sort_unstable();
        probe_ports.dedup();
        workloads.push(Workload {
            id,
            service_account: service_account.into_inner(),
            labels: w.labels,
            netns: w.netns.into_inner(),
            probe_ports,
        });
    }
    Ok(workloads)
}

/// `[egress]`: addresses in canonical form (IPv4 as IPv4), so destinations compare equal.
pub(super) fn egress(source: &Source, raw: RawEgress) -> Result<EgressPolicy, ConfigError> {
    let allow = raw
        .allow
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            if a.cidrs.get_ref().is_empty() {
                return Err(source.invalid_at(
                    &a.cidrs,
                    format!(
                        "egress.allow[{i}].cidrs: list at least one CIDR (0.0.0.0/0 and ::/0 for any address)"
                    ),
                ));
            }
            let ports = match a.ports {
                Some(ports) if ports.get_ref().contains(&0) => {
                    return Err(source.invalid_at(
                        &ports,
                        format!("egress.allow[{i}].ports: 0 is not a port"),
                    ));
                }
                Some(ports) => ports.into_inner(),
                None => Vec::new(),
            };
            let cidrs = a
                .cidrs
                .get_ref()
                .iter()
                .map(|c| {
                    let text = c.get_ref();
                    text.parse::<IpNet>()
                        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                        .map(|n| match n {
                            // Destinations are compared canonical (IPv4 as IPv4).
                            IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
                                Some(v4) if v6.prefix_len() >= 96 => {
                                    IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(n)
                                }
                                _ => n,
                            },
                            n => n,
                        })
                        .map_err(|_| {
                            source.invalid_at(
                                c,
                                format!(
                                    "egress.allow[{i}].cidrs: {text:?} is not a CIDR or an address"
                                ),
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(EgressAllow {
                cidrs,
                ports,
                namespaces: a.namespaces.into_iter().collect(),
            })
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    Ok(EgressPolicy {
        default: raw.default.unwrap_or(EgressDefault::Allow),
        deny_namespaces: raw.deny_namespaces.into_iter().collect(),
        allow,
    })
}

/// An enabled `[discovery.kubernetes]`.
pub(super) fn kubernetes(
    source: &Source,
    raw: RawKubernetes,
) -> Result<KubernetesDiscovery, ConfigError> {
    let netns_dir = match raw.netns_dir {
        Some(dir) if !dir.get_ref().is_absolute() => {
            return Err(source.invalid_at(
                &dir,
                format!(
                    "discovery.kubernetes.netns_dir: {} is not an absolute path",
                    dir.get_ref().display()
                ),
            ));
        }
        Some(dir) => dir.into_inner(),
        None => DEFAULT_NETNS_DIR.into(),
    };
    if let Some(url) = &raw.api_server {
        return Err(source.invalid_at(
            url,
            "discovery.kubernetes.api_server: no longer supported (a URL alone carries no CA and no credentials); set kubeconfig = \"/path/to/kubeconfig\", or leave it out to use the pod's service account".into(),
        ));
    }
    if let Some(path) = &raw.kubeconfig
        && !path.get_ref().is_absolute()
    {
        return Err(source.invalid_at(
            path,
            format!(
                "discovery.kubernetes.kubeconfig: {} is not an absolute path",
                path.get_ref().display()
            ),
        ));
    }
    Ok(KubernetesDiscovery {
        kubeconfig: raw.kubeconfig.map(Spanned::into_inner),
        netns_dir,
    })
}

/// `[identity]`: the provider and the keys it takes.
pub(super) fn identity(source: &Source, raw: RawIdentity) -> Result<IdentityConfig, ConfigError> {
    let ttl = raw
        .svid_ttl_seconds
        .unwrap_or_else(|| Spanned::new(raw.provider.span(), DEFAULT_SVID_TTL_SECONDS));
    if *ttl.get_ref() < 2 {
        return Err(source.invalid_at(
            &ttl,
            format!(
                "identity.svid_ttl_seconds: {} is too short (at least 2)",
                ttl.get_ref()
            ),
        ));
    }
    // Errors about the section as a whole point at its provider.
    let provider_span = Some(raw.provider.span());
    let provider = *raw.provider.get_ref();
    if !matches!(provider, RawProvider::Spire)
        && (raw.admin_socket.is_some() || raw.selectors.is_some())
    {
        return Err(source.invalid(
            provider_span,
            "identity: admin_socket and selectors belong to provider \"spire\"".into(),
        ));
    }
    let provider = match (provider, raw.ca_dir, raw.files_dir) {
        (RawProvider::Builtin, Some(ca_dir), None) => IdentityProvider::Builtin { ca_dir },
        (RawProvider::Files, None, Some(dir)) => IdentityProvider::Files { dir },
        (RawProvider::Spire, None, None) => {
            let admin_socket = raw.admin_socket.ok_or_else(|| {
                source.invalid(
                    provider_span.clone(),
                    "identity: provider \"spire\" takes admin_socket (the spire-agent's admin socket)"
                        .into(),
                )
            })?;
            if !admin_socket.get_ref().is_absolute() {
                return Err(source.invalid_at(
                    &admin_socket,
                    format!(
                        "identity.admin_socket: {} is not an absolute path",
                        admin_socket.get_ref().display()
                    ),
                ));
            }
            let (texts, selectors_span) = match raw.selectors {
                Some(texts) => (texts.get_ref().clone(), Some(texts.span())),
                None => (
                    DEFAULT_SPIRE_SELECTORS
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                    provider_span,
                ),
            };
            if texts.is_empty() {
                return Err(source.invalid(
                    selectors_span,
                    "identity.selectors: empty (every workload would match the same entries)"
                        .into(),
                ));
            }
            let selectors = texts
                .iter()
                .map(|t| {
                    SelectorTemplate::parse(t).map_err(|e| {
                        source.invalid(selectors_span.clone(), format!("identity.selectors: {e}"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            IdentityProvider::Spire {
                admin_socket: admin_socket.into_inner(),
                selectors,
            }
        }
        (RawProvider::Spire, _, _) => {
            return Err(source.invalid(
                provider_span,
                "identity: provider \"spire\" takes admin_socket (and no ca_dir or files_dir)"
                    .into(),
            ));
        }
        (RawProvider::Builtin, _, _) => {
            return Err(source.invalid(
                provider_span,
                "identity: provider \"builtin\" takes ca_dir (and no files_dir)".into(),
            ));
        }
        (RawProvider::Files, _, _) => {
            return Err(source.invalid(
                provider_span,
                "identity: provider \"files\" takes files_dir (and no ca_dir)".into(),
            ));
        }
    };
    Ok(IdentityConfig {
        provider,
        svid_ttl: Duration::from_secs(*ttl.get_ref()),
        revocation_file: raw.revocation_file,
    })
}
