//! What a workload is, whatever found it (the node config, Kubernetes discovery): a pod by
//! namespace and name, with the service account its identity is made of, its labels (policy
//! selectors), its network namespace and its probe ports; and the naming rules they follow.
use std::{collections::BTreeMap, fmt, path::PathBuf};

/// A workload (pod) this node runs, identified by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub id: WorkloadId,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// The pod's network namespace, e.g. `/run/netns/x` or `/proc/PID/ns/net`.
    pub netns: PathBuf,
    /// Ports kubelet probes reach in plaintext from `capture.probe_source`.
    pub probe_ports: Vec<u16>,
}

impl Workload {
    /// The same pod with other labels: what an enrolled workload takes in place. Written field
    /// by field, so that a field added later has to be placed on one side or the other.
    pub fn differs_only_in_labels(&self, other: &Workload) -> bool {
        let Workload {
            id,
            service_account,
            labels: _,
            netns,
            probe_ports,
        } = self;
        *id == other.id
            && *service_account == other.service_account
            && *netns == other.netns
            && *probe_ports == other.probe_ports
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// RFC 1123 label: what Kubernetes allows for namespaces and most names.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
