//! Workload discovery from Kubernetes (`[discovery.kubernetes]`): kube-rs watches the pods of this
//! node (`spec.nodeName`) and all namespaces, and publishes the set of meshed pods as workloads;
//! the agent reconciles its enrollments against it, together with the static `[[workload]]`s.
//!
//! - Membership: a pod is meshed when its annotation `zt.io/mesh` is `enabled`, or its
//!   namespace's label `zt.io/mesh` is `enabled` and the pod does not say `disabled`. Host-network
//!   pods are never enrolled (they share the node's namespace).
//! - Network namespace: the one under `netns_dir` (where the container runtime pins pod
//!   namespaces, `/run/netns` for containerd and CRI-O) whose interfaces hold the pod's IP.
//! - The watcher relists after a `410 Gone` and backs off on errors (kube-runtime); a broken
//!   stream never clears the published set, so enrolled pods stay enrolled until the API says
//!   they are gone.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    config::{KubernetesDiscovery, Workload, WorkloadId},
    workload::netns,
};

/// The label (namespace) or annotation (pod) that opts into the mesh.
pub const MESH_KEY: &str = "zt.io/mesh";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
}

/// Starts watching; the receiver holds the meshed pods of `node_name` as workloads, or `None`
/// until the first lists of pods and namespaces are complete.
pub async fn start(
    config: &KubernetesDiscovery,
    node_name: &str,
) -> Result<watch::Receiver<Option<Vec<Workload>>>, DiscoveryError> {
    let client = match &config.api_server {
        Some(url) => {
            let uri = url
                .parse()
                .map_err(|e| DiscoveryError::Config(format!("api_server {url:?}: {e}")))?;
            Client::try_from(kube::Config::new(uri))
                .map_err(|e| DiscoveryError::Config(e.to_string()))?
        }
        None => Client::try_default()
            .await
            .map_err(|e| DiscoveryError::Config(e.to_string()))?,
    };
    let pods = watcher::watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
    )
    .default_backoff();
    let namespaces = watcher::watcher(Api::<Namespace>::all(client), watcher::Config::default())
        .default_backoff();
    let (tx, rx) = watch::channel(None);
    let netns_dir = config.netns_dir.clone();
    tokio::spawn(async move {
        run(pods, namespaces, netns_dir, tx).await;
    });
    Ok(rx)
}

/// A watched collection: the live objects by key, and the ones a relist is gathering.
struct Store<K> {
    live: BTreeMap<String, K>,
    relisting: Option<BTreeMap<String, K>>,
    /// A first complete list has arrived.
    synced: bool,
}

impl<K> Default for Store<K> {
    fn default() -> Self {
        Self {
            live: BTreeMap::new(),
            relisting: None,
            synced: false,
        }
    }
}

impl<K: kube::Resource> Store<K> {
    fn key(k: &K) -> String {
        let meta = k.meta();
        format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        )
    }

    /// Applies one watch event; returns whether the live set changed.
    fn apply(&mut self, event: Event<K>) -> bool {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(k) => {
                if let Some(buffer) = &mut self.relisting {
                    buffer.insert(Self::key(&k), k);
                }
                false
            }
            Event::InitDone => {
                if let Some(buffer) = self.relisting.take() {
                    self.live = buffer;
                }
                self.synced = true;
                true
            }
            Event::Apply(k) => {
                self.live.insert(Self::key(&k), k);
                true
            }
            Event::Delete(k) => {
                self.live.remove(&Self::key(&k));
                true
            }
        }
    }
}

async fn run(
    pods: impl Stream<Item = Result<Event<Pod>, watcher::Error>>,
    namespaces: impl Stream<Item = Result<Event<Namespace>, watcher::Error>>,
    netns_dir: PathBuf,
    tx: watch::Sender<Option<Vec<Workload>>>,
) {
    tokio::pin!(pods, namespaces);
    let (mut pod_store, mut ns_store) = (Store::<Pod>::default(), Store::<Namespace>::default());
    let mut netns_by_ip: HashMap<IpAddr, PathBuf> = HashMap::new();
    // Pods whose namespace is not pinned yet (sandbox starting) are looked for again.
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    loop {
        let changed = tokio::select! {
            Some(event) = pods.next() => match event {
                Ok(e) => pod_store.apply(e),
                Err(e) => {
                    warn!(error = %e, "pod watch failed; retrying (enrolled pods are kept)");
                    false
                }
            },
            Some(event) = namespaces.next() => match event {
                Ok(e) => ns_store.apply(e),
                Err(e) => {
                    warn!(error = %e, "namespace watch failed; retrying");
                    false
                }
            },
            _ = retry.tick() => true,
            else => break,
        };
        if !changed || !(pod_store.synced && ns_store.synced) {
            continue;
        }
        let meshed: Vec<(WorkloadId, &Pod, IpAddr)> = pod_store
            .live
            .values()
            .filter(|p| is_meshed(p, &ns_store.live))
            .filter_map(|p| Some((workload_id(p)?, p, pod_ip(p)?)))
            .collect();
        if meshed
            .iter()
            .any(|(_, _, ip)| !netns_by_ip.contains_key(ip))
        {
            let dir = netns_dir.clone();
            if let Ok(found) = tokio::task::spawn_blocking(move || scan_netns(&dir)).await {
                netns_by_ip = found;
            }
        }
        let mut workloads = Vec::with_capacity(meshed.len());
        for (id, pod, ip) in meshed {
            let Some(netns) = netns_by_ip.get(&ip) else {
                debug!(workload = %id, %ip, "no network namespace holds the pod's IP yet");
                continue;
            };
            let spec = pod.spec.as_ref();
            workloads.push(Workload {
                id,
                service_account: spec
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".to_owned()),
                labels: pod.metadata.labels.clone().unwrap_or_default(),
                netns: netns.clone(),
            });
        }
        tx.send_if_modified(|current| {
            if current.as_ref() == Some(&workloads) {
                return false;
            }
            info!(
                workloads = workloads.len(),
                "meshed pods on this node changed"
            );
            *current = Some(workloads);
            true
        });
    }
}

fn workload_id(pod: &Pod) -> Option<WorkloadId> {
    Some(WorkloadId {
        namespace: pod.metadata.namespace.clone()?,
        name: pod.metadata.name.clone()?,
    })
}

fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

/// Whether `pod` opts into the mesh, by its own annotation or its namespace's label.
pub fn is_meshed(pod: &Pod, namespaces: &BTreeMap<String, Namespace>) -> bool {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return false;
    }
    let terminal = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    if terminal || pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    match pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MESH_KEY))
        .map(String::as_str)
    {
        Some("enabled") => return true,
        Some("disabled") => return false,
        _ => {}
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    namespaces
        .get(&format!("/{namespace}"))
        .and_then(|ns| ns.metadata.labels.as_ref())
        .and_then(|l| l.get(MESH_KEY))
        .is_some_and(|v| v == "enabled")
}

/// Every pinned network namespace under `dir`, by the addresses it holds.
fn scan_netns(dir: &Path) -> HashMap<IpAddr, PathBuf> {
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for path in entries.flatten().map(|e| e.path()) {
        match netns::addresses_in(&path) {
            Ok(addrs) => {
                for ip in addrs {
                    found.insert(ip, path.clone());
                }
            }
            Err(e) => {
                debug!(netns = %path.display(), error = %e, "not a readable network namespace")
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(ns: &str, annotation: Option<&str>, host_network: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some(ns.into()),
                annotations: annotation
                    .map(|a| BTreeMap::from([(MESH_KEY.to_owned(), a.to_owned())])),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                host_network: Some(host_network),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn namespace(name: &str, label: Option<&str>) -> (String, Namespace) {
        (
            format!("/{name}"),
            Namespace {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    labels: label.map(|l| BTreeMap::from([(MESH_KEY.to_owned(), l.to_owned())])),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
    }

    #[test]
    fn membership() {
        let namespaces: BTreeMap<String, Namespace> = [
            namespace("meshed", Some("enabled")),
            namespace("plain", None),
        ]
        .into();
        for (what, p, expected) in [
            ("namespace label", pod("meshed", None, false), true),
            (
                "pod opts out",
                pod("meshed", Some("disabled"), false),
                false,
            ),
            ("pod opts in", pod("plain", Some("enabled"), false), true),
            ("neither", pod("plain", None, false), false),
            ("unknown namespace", pod("nowhere", None, false), false),
            (
                "host network never",
                pod("meshed", Some("enabled"), true),
                false,
            ),
        ] {
            assert_eq!(is_meshed(&p, &namespaces), expected, "{what}");
        }
    }
}
