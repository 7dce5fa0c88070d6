//! Workload discovery from Kubernetes (`[discovery.kubernetes]`): kube-rs watches the pods of this
//! node (`spec.nodeName`) and all namespaces, and publishes the set of meshed pods as workloads;
//! the agent reconciles its enrollments against it, together with the static `[[workload]]`s.
//!
//! - Membership: a pod is meshed when its annotation `zt.io/mesh` is `enabled`, or its
//!   namespace's label `zt.io/mesh` is `enabled` and the pod does not say `disabled`. Host-network
//!   pods are never enrolled (they share the node's namespace).
//! - Network namespace: the one under `netns_dir` (where the container runtime pins pod
//!   namespaces, `/run/netns` for containerd and CRI-O) whose interfaces hold the pod's IP. It is
//!   remembered per pod UID, never per IP: a pod that reuses a dead pod's IP gets a fresh lookup,
//!   and an IP two namespaces hold at once (a pod still dying) is not guessed at.
//! - Probe ports: the ports of the pod's liveness, readiness and startup probes (httpGet,
//!   tcpSocket, grpc; named ports resolved in the container), which kubelet reaches in plaintext.
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
use k8s_openapi::{
    api::core::v1::{Container, Namespace, Pod, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
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
    let mut netns_by_uid: HashMap<String, PathBuf> = HashMap::new();
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
        let meshed: Vec<(WorkloadId, &Pod, String, IpAddr)> = pod_store
            .live
            .values()
            .filter(|p| is_meshed(p, &ns_store.live))
            .filter_map(|p| Some((workload_id(p)?, p, p.metadata.uid.clone()?, pod_ip(p)?)))
            .collect();
        // Forget pods that are gone and namespaces that died; look up only what is unknown.
        netns_by_uid.retain(|uid, path| path.exists() && meshed.iter().any(|m| &m.2 == uid));
        if meshed
            .iter()
            .any(|(_, _, uid, _)| !netns_by_uid.contains_key(uid))
        {
            let dir = netns_dir.clone();
            if let Ok(found) = tokio::task::spawn_blocking(move || scan_netns(&dir)).await {
                for (id, _, uid, ip) in &meshed {
                    if netns_by_uid.contains_key(uid) {
                        continue;
                    }
                    match found.get(ip).map(Vec::as_slice) {
                        Some([path]) => {
                            netns_by_uid.insert(uid.clone(), path.clone());
                        }
                        Some(paths) if paths.len() > 1 => {
                            warn!(workload = %id, %ip, namespaces = ?paths, "several network namespaces hold the pod's IP (one still dying?); waiting")
                        }
                        _ => {}
                    }
                }
            }
        }
        let mut workloads = Vec::with_capacity(meshed.len());
        for (id, pod, uid, ip) in meshed {
            let Some(netns) = netns_by_uid.get(&uid) else {
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
                probe_ports: probe_ports(pod),
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

/// The ports kubelet probes the pod on, sorted and without duplicates. A named port that no
/// container port carries cannot be probed, so it adds nothing.
pub fn probe_ports(pod: &Pod) -> Vec<u16> {
    let containers = pod.spec.iter().flat_map(|s| &s.containers);
    let mut ports: Vec<u16> = containers
        .flat_map(|c| {
            [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
                .into_iter()
                .flatten()
                .flat_map(move |probe| probe_targets(probe).filter_map(move |p| resolve(c, p)))
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn probe_targets(probe: &Probe) -> impl Iterator<Item = IntOrString> + '_ {
    let http = probe.http_get.as_ref().map(|h| h.port.clone());
    let tcp = probe.tcp_socket.as_ref().map(|t| t.port.clone());
    let grpc = probe.grpc.as_ref().map(|g| IntOrString::Int(g.port));
    [http, tcp, grpc].into_iter().flatten()
}

fn resolve(container: &Container, port: IntOrString) -> Option<u16> {
    let number = match port {
        IntOrString::Int(n) => n,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))?
                .container_port
        }
    };
    u16::try_from(number).ok().filter(|p| *p != 0)
}

/// Every pinned network namespace under `dir`, by the addresses it holds (an address held by
/// several namespaces lists each).
fn scan_netns(dir: &Path) -> HashMap<IpAddr, Vec<PathBuf>> {
    let mut found: HashMap<IpAddr, Vec<PathBuf>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for path in entries.flatten().map(|e| e.path()) {
        match netns::addresses_in(&path) {
            Ok(addrs) => {
                for ip in addrs {
                    found.entry(ip).or_default().push(path.clone());
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
    fn probe_ports_come_from_every_probe_and_resolve_names() {
        use k8s_openapi::api::core::v1::{
            ContainerPort, GRPCAction, HTTPGetAction, PodSpec, TCPSocketAction,
        };
        let probe = |http: Option<IntOrString>, tcp: Option<IntOrString>, grpc: Option<i32>| {
            Some(Probe {
                http_get: http.map(|port| HTTPGetAction {
                    port,
                    ..Default::default()
                }),
                tcp_socket: tcp.map(|port| TCPSocketAction {
                    port,
                    ..Default::default()
                }),
                grpc: grpc.map(|port| GRPCAction {
                    port,
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
        let web = Container {
            name: "web".into(),
            ports: Some(vec![ContainerPort {
                name: Some("health".into()),
                container_port: 8081,
                ..Default::default()
            }]),
            liveness_probe: probe(Some(IntOrString::String("health".into())), None, None),
            readiness_probe: probe(Some(IntOrString::Int(8080)), None, None),
            // A name no port of this container carries: nothing to let through.
            startup_probe: probe(None, Some(IntOrString::String("other".into())), None),
            ..Default::default()
        };
        let sidecar = Container {
            name: "grpc".into(),
            liveness_probe: probe(None, Some(IntOrString::Int(9000)), Some(9001)),
            // Out of range: ignored rather than truncated.
            readiness_probe: probe(None, Some(IntOrString::Int(70000)), None),
            ..Default::default()
        };
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![web, sidecar],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(probe_ports(&pod), vec![8080, 8081, 9000, 9001]);
        assert!(probe_ports(&Pod::default()).is_empty());
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
