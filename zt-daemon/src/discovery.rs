//! Workload discovery from Kubernetes (`[discovery.kubernetes]`): kube-rs watches every pod,
//! namespace, Service and EndpointSlice of the cluster, feeds them into the mesh directory
//! ([`crate::directory::ClusterPods`], [`crate::services::ServiceTable`]), and publishes this
//! node's meshed pods as workloads to enroll. One source for both: the pod a peer is tunneled to
//! is the pod its node enrolled.
//!
//! - Membership: a pod is meshed when its annotation `zt.io/mesh` is `enabled`, or its
//!   namespace's label `zt.io/mesh` is `enabled` and the pod does not say `disabled`. Host-network
//!   pods are never meshed (they share the node's namespace), and finished or terminating pods
//!   leave the directory at once (their addresses are about to be reused).
//! - The client: the file `kubeconfig` names, else the in-cluster service account (its token is
//!   re-read every minute, so kubelet's rotation is followed), else `KUBECONFIG`.
//! - Network namespace of a local pod: the one under `netns_dir` (where the container runtime
//!   pins pod namespaces, `/run/netns` for containerd and CRI-O) whose interfaces hold the pod's
//!   IP. It is remembered per pod UID, never per IP: a pod that reuses a dead pod's IP gets a
//!   fresh lookup, and an IP two namespaces hold at once (a pod still dying) is not guessed at.
//! - Probe ports: the ports of the pod's liveness, readiness and startup probes (httpGet,
//!   tcpSocket, grpc; named ports resolved in the container), which kubelet reaches in plaintext.
//! - The watchers relist after a `410 Gone` and back off on errors (kube-runtime). A broken
//!   stream never clears the directory: pods stay until the API says they are gone, and a relist
//!   removes only what it no longer lists. A refusal (401/403) makes the agent unready, naming
//!   the verb and resource it was refused, until the API lets it list again.
//! - Objects the directory cannot use (no UID, an unparsable address, an unknown `zt.io/mesh`
//!   value, a pod with no address yet) are logged and counted in
//!   `zt_discovery_skipped_objects_total{kind,reason}`; they never remove a healthy pod.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use k8s_openapi::{
    api::{
        core::v1::{Container, Namespace, Pod, Probe, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    admin::Readiness,
    config::KubernetesDiscovery,
    directory::{ClusterPods, LocalChange, LocalPod, MeshDirectory, MeshOptIn, PodFacts, PodUid},
    identity::spiffe::TrustDomain,
    metrics::Metrics,
    services::{ServiceFacts, ServiceName, ServicePort, SliceFacts},
    workload::{Workload, netns},
};

/// The label (namespace) or annotation (pod) that opts into the mesh.
pub const MESH_KEY: &str = "zt.io/mesh";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("kubeconfig {path}: {error}")]
    Kubeconfig { path: PathBuf, error: String },
    #[error(
        "no Kubernetes client configuration: not in a pod ({in_cluster}), and KUBECONFIG: {kubeconfig}"
    )]
    NoConfig {
        in_cluster: String,
        kubeconfig: String,
    },
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// What discovery reports to the rest of the agent.
pub struct DiscoveryReport {
    pub readiness: Readiness,
    pub metrics: Arc<Metrics>,
}

/// The client `config` describes: its kubeconfig file, else in-cluster, else `KUBECONFIG`.
pub async fn client(config: &KubernetesDiscovery) -> Result<Client, DiscoveryError> {
    let options = KubeConfigOptions::default();
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let named = |error: String| DiscoveryError::Kubeconfig {
                path: path.clone(),
                error,
            };
            let file = Kubeconfig::read_from(path).map_err(|e| named(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| named(e.to_string()))?
        }
        None => match kube::Config::incluster() {
            Ok(c) => c,
            Err(in_cluster) => kube::Config::from_kubeconfig(&options).await.map_err(|e| {
                DiscoveryError::NoConfig {
                    in_cluster: in_cluster.to_string(),
                    kubeconfig: e.to_string(),
                }
            })?,
        },
    };
    Client::try_from(kube_config).map_err(|e| DiscoveryError::Client(e.to_string()))
}

/// Starts watching; every pod of the cluster goes into `directory`, and the receiver holds the
/// meshed pods of `node_name` as workloads, or `None` until the first lists of pods and
/// namespaces are complete.
pub async fn start(
    config: &KubernetesDiscovery,
    node_name: &str,
    trust_domain: TrustDomain,
    directory: MeshDirectory,
    report: DiscoveryReport,
) -> Result<watch::Receiver<Option<Vec<Workload>>>, DiscoveryError> {
    let client = client(config).await?;
    // Every pod of the cluster: the directory needs the other nodes' pods too.
    let pods = watcher::watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff();
    let namespaces = watcher::watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let services = watcher::watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let slices = watcher::watcher(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default(),
    )
    .default_backoff();
    directory.attach_cluster(ClusterPods::new(trust_domain, node_name));
    let (tx, rx) = watch::channel(None);
    let netns_dir = config.netns_dir.clone();
    tokio::spawn(async move {
        Watch {
            directory,
            report,
            netns_dir,
            netns_by_uid: HashMap::new(),
            refused: BTreeMap::new(),
            pods_synced: false,
            namespaces_synced: false,
            services_relisted: None,
            slices_relisted: None,
        }
        .run(pods, namespaces, (services, slices), tx)
        .await;
    });
    Ok(rx)
}

struct Watch {
    directory: MeshDirectory,
    report: DiscoveryReport,
    netns_dir: PathBuf,
    netns_by_uid: HashMap<PodUid, PathBuf>,
    /// Per resource, the API's refusal of the last attempt to list or watch it.
    refused: BTreeMap<&'static str, String>,
    pods_synced: bool,
    namespaces_synced: bool,
    /// During a relist of Services or EndpointSlices: what it listed so far.
    services_relisted: Option<HashSet<ServiceName>>,
    slices_relisted: Option<HashSet<(ServiceName, String)>>,
}

impl Watch {
    async fn run(
        mut self,
        pods: impl Stream<Item = Result<Event<Pod>, watcher::Error>>,
        namespaces: impl Stream<Item = Result<Event<Namespace>, watcher::Error>>,
        (services, slices): (
            impl Stream<Item = Result<Event<Service>, watcher::Error>>,
            impl Stream<Item = Result<Event<EndpointSlice>, watcher::Error>>,
        ),
        tx: watch::Sender<Option<Vec<Workload>>>,
    ) {
        tokio::pin!(pods, namespaces, services, slices);
        // Pods whose namespace is not pinned yet (sandbox starting) are looked for again.
        let mut retry = tokio::time::interval(Duration::from_secs(2));
        loop {
            let change = tokio::select! {
                Some(event) = pods.next() => match event {
                    Ok(e) => {
                        self.accepted("pods");
                        self.on_pod(e)
                    }
                    Err(e) => {
                        self.failed("pods", &e);
                        LocalChange(false)
                    }
                },
                Some(event) = namespaces.next() => match event {
                    Ok(e) => {
                        self.accepted("namespaces");
                        self.on_namespace(e)
                    }
                    Err(e) => {
                        self.failed("namespaces", &e);
                        LocalChange(false)
                    }
                },
                Some(event) = services.next() => {
                    match event {
                        Ok(e) => {
                            self.accepted("services");
                            self.on_service(e);
                        }
                        Err(e) => self.failed("services", &e),
                    }
                    LocalChange(false)
                }
                Some(event) = slices.next() => {
                    match event {
                        Ok(e) => {
                            self.accepted("endpointslices");
                            self.on_slice(e);
                        }
                        Err(e) => self.failed("endpointslices", &e),
                    }
                    LocalChange(false)
                }
                _ = retry.tick() => LocalChange(true),
                else => break,
            };
            if !change.0 || !(self.pods_synced && self.namespaces_synced) {
                continue;
            }
            let local = self
                .directory
                .read_cluster(ClusterPods::local_pods)
                .unwrap_or_default();
            let workloads = self.with_netns(local).await;
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

    fn on_pod(&mut self, event: Event<Pod>) -> LocalChange {
        let metrics = self.report.metrics.clone();
        let synced = matches!(event, Event::InitDone);
        let change = apply_pod_event(&self.directory, &metrics, event);
        if synced && !self.pods_synced {
            self.pods_synced = true;
            // The slices listed before the pods are checked now.
            let slices: Vec<SliceFacts> = self
                .directory
                .read_services(|t| t.slices().cloned().collect());
            for slice in &slices {
                self.note_strangers(slice);
            }
        }
        change
    }

    fn on_namespace(&mut self, event: Event<Namespace>) -> LocalChange {
        let metrics = self.report.metrics.clone();
        let synced = matches!(event, Event::InitDone);
        let change = self.directory.update_cluster(|pods| match event {
            Event::Init => {
                pods.begin_namespace_relist();
                LocalChange(false)
            }
            Event::InitApply(ns) | Event::Apply(ns) => {
                let Some(name) = ns.metadata.name.as_deref() else {
                    skipped(&metrics, "namespace", "missing_name", "", "");
                    return LocalChange(false);
                };
                pods.upsert_namespace(name, namespace_mesh(&ns, &metrics))
            }
            Event::Delete(ns) => {
                let name = ns.metadata.name.as_deref().unwrap_or_default();
                pods.remove_namespace(name).unwrap_or_else(|_| {
                    // Without a namespace controller its pods outlive it; they keep its label.
                    skipped(&metrics, "namespace", "deleted_with_pods", "", name);
                    LocalChange(false)
                })
            }
            Event::InitDone => LocalChange(true).or(pods.end_namespace_relist()),
        });
        if synced {
            self.namespaces_synced = true;
        }
        change.unwrap_or(LocalChange(false))
    }

    fn on_service(&mut self, event: Event<Service>) {
        let metrics = self.report.metrics.clone();
        match event {
            Event::Init => self.services_relisted = Some(HashSet::new()),
            Event::InitApply(svc) | Event::Apply(svc) => {
                let Some(name) = service_name(&svc) else {
                    skipped(&metrics, "service", "missing_name", "", "");
                    return;
                };
                if let Some(seen) = &mut self.services_relisted {
                    seen.insert(name.clone());
                }
                match service_facts(&svc, name.clone(), &metrics) {
                    Some(facts) => self.directory.update_services(|t| t.upsert_service(facts)),
                    // Headless or ExternalName (now): not a ClusterIP.
                    None => self.directory.update_services(|t| t.remove_service(&name)),
                }
                self.report_unresolved(&name);
            }
            Event::Delete(svc) => {
                if let Some(name) = service_name(&svc) {
                    self.directory.update_services(|t| t.remove_service(&name));
                }
            }
            Event::InitDone => {
                if let Some(seen) = self.services_relisted.take() {
                    self.directory
                        .update_services(|t| t.retain_services(|n| seen.contains(n)));
                }
            }
        }
    }

    fn on_slice(&mut self, event: Event<EndpointSlice>) {
        let metrics = self.report.metrics.clone();
        match event {
            Event::Init => self.slices_relisted = Some(HashSet::new()),
            Event::InitApply(slice) | Event::Apply(slice) => {
                let Some(facts) = slice_facts(&slice, &metrics) else {
                    return;
                };
                if let Some(seen) = &mut self.slices_relisted {
                    seen.insert((facts.service.clone(), facts.name.clone()));
                }
                if self.pods_synced {
                    self.note_strangers(&facts);
                }
                let service = facts.service.clone();
                self.directory.update_services(|t| t.upsert_slice(facts));
                self.report_unresolved(&service);
            }
            Event::Delete(slice) => {
                if let Some(facts) = slice_facts(&slice, &metrics) {
                    self.directory
                        .update_services(|t| t.remove_slice(&facts.service, &facts.name));
                }
            }
            Event::InitDone => {
                if let Some(seen) = self.slices_relisted.take() {
                    self.directory.update_services(|t| {
                        t.retain_slices(|s, n| seen.contains(&(s.clone(), n.to_owned())))
                    });
                }
            }
        }
    }

    /// Endpoints that are no pod (an address outside the cluster) are reached in plaintext, as
    /// egress: worth a note. Only once the pods are listed: before, every pod is unknown.
    fn note_strangers(&self, slice: &SliceFacts) {
        let strangers = self
            .directory
            .read_cluster(|pods| {
                slice
                    .ready
                    .iter()
                    .filter(|ip| !pods.has_pod_at(**ip))
                    .count()
            })
            .unwrap_or(0);
        if strangers > 0 {
            skipped(
                &self.report.metrics,
                "endpointslice",
                "address_not_a_pod",
                &slice.service.namespace,
                &slice.name,
            );
        }
    }

    /// A Service port no slice carries (a named `targetPort` no endpoint has) is noted once per
    /// update of the Service or its slices.
    fn report_unresolved(&self, service: &ServiceName) {
        let unresolved = self
            .directory
            .read_services(|t| t.unresolved_ports(service));
        for port in unresolved {
            debug!(service = %service, port, "no endpoint carries this Service port yet");
        }
    }

    /// A list or watch of `resource` worked: a refusal it had is over.
    fn accepted(&mut self, resource: &'static str) {
        if self.refused.remove(resource).is_some() {
            info!(resource, "the Kubernetes API serves the agent again");
            self.publish_refusals();
        }
    }

    fn failed(&mut self, resource: &'static str, error: &watcher::Error) {
        let (verb, api_error) = match error {
            watcher::Error::InitialListFailed(e) => ("list", api_status(e)),
            watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
                ("watch", api_status(e))
            }
            watcher::Error::WatchError(status) => ("watch", Some(status)),
            watcher::Error::NoResourceVersion => ("watch", None),
        };
        self.report
            .metrics
            .discovery_api_errors
            .with_label_values(&[resource, verb])
            .inc();
        match api_error {
            Some(status) if status.code == 401 || status.code == 403 => {
                warn!(
                    verb,
                    resource,
                    status = status.code,
                    message = %status.message,
                    "Kubernetes API refused the agent: it cannot {verb} {resource} cluster-wide (grant get, list and watch on pods and namespaces, deploy/rbac.yaml)"
                );
                self.refused.insert(
                    resource,
                    format!(
                        "the Kubernetes API refused to {verb} {resource} (HTTP {}): {}",
                        status.code, status.message
                    ),
                );
                self.publish_refusals();
            }
            _ => {
                warn!(verb, resource, error = %error, "Kubernetes watch failed; retrying (the mesh directory is kept)")
            }
        }
    }

    fn publish_refusals(&self) {
        let reason = (!self.refused.is_empty()).then(|| {
            self.refused
                .values()
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        });
        self.report.readiness.set_discovery_failure(reason);
    }

    /// This node's meshed pods with their network namespaces; those whose namespace is not
    /// found yet wait for the next look.
    async fn with_netns(&mut self, local: Vec<LocalPod>) -> Vec<Workload> {
        // Forget pods that are gone and namespaces that died; look up only what is unknown.
        self.netns_by_uid
            .retain(|uid, path| path.exists() && local.iter().any(|p| &p.uid == uid));
        if local
            .iter()
            .any(|p| !self.netns_by_uid.contains_key(&p.uid))
        {
            let dir = self.netns_dir.clone();
            if let Ok(found) = tokio::task::spawn_blocking(move || scan_netns(&dir)).await {
                for pod in &local {
                    if self.netns_by_uid.contains_key(&pod.uid) {
                        continue;
                    }
                    let mut holders = pod.ips.iter().filter_map(|ip| found.get(ip));
                    match holders.next().map(Vec::as_slice) {
                        Some([path]) => {
                            self.netns_by_uid.insert(pod.uid, path.clone());
                        }
                        Some(paths) if paths.len() > 1 => {
                            warn!(workload = %pod.id, ips = ?pod.ips, namespaces = ?paths, "several network namespaces hold the pod's IP (one still dying?); waiting")
                        }
                        _ => {}
                    }
                }
            }
        }
        local
            .into_iter()
            .filter_map(|pod| {
                let Some(netns) = self.netns_by_uid.get(&pod.uid) else {
                    debug!(workload = %pod.id, ips = ?pod.ips, "no network namespace holds the pod's IP yet");
                    return None;
                };
                Some(Workload {
                    id: pod.id,
                    service_account: pod.service_account,
                    labels: pod.labels,
                    netns: netns.clone(),
                    probe_ports: pod.probe_ports,
                })
            })
            .collect()
    }
}

/// What one pod event does to the directory (under its write lock), and the pod count after.
pub fn apply_pod_event(
    directory: &MeshDirectory,
    metrics: &Metrics,
    event: Event<Pod>,
) -> LocalChange {
    let change = directory.update_cluster(|pods| match event {
        Event::Init => {
            pods.begin_pod_relist();
            LocalChange(false)
        }
        Event::InitApply(pod) | Event::Apply(pod) => match pod_view(&pod, metrics) {
            Some(PodView::Live(facts)) => pods.upsert_pod(facts),
            Some(PodView::Gone(uid)) => pods.remove_pod(uid),
            None => LocalChange(false),
        },
        Event::Delete(pod) => match pod_view(&pod, metrics) {
            Some(PodView::Live(PodFacts { uid, .. }) | PodView::Gone(uid)) => pods.remove_pod(uid),
            None => LocalChange(false),
        },
        Event::InitDone => {
            let change = pods.end_pod_relist();
            info!(
                pods = pods.pod_count(),
                "listed the cluster's pods into the mesh directory"
            );
            // Whether or not a local pod changed, the first list is news.
            LocalChange(true).or(change)
        }
    });
    if let Some(pods) = directory.read_cluster(ClusterPods::pod_count) {
        metrics.directory_pods.set(pods as i64);
    }
    change.unwrap_or(LocalChange(false))
}

impl LocalChange {
    fn or(self, other: LocalChange) -> LocalChange {
        LocalChange(self.0 || other.0)
    }
}

fn service_name(svc: &Service) -> Option<ServiceName> {
    Some(ServiceName {
        namespace: svc.metadata.namespace.clone()?,
        name: svc.metadata.name.clone()?,
    })
}

/// The ClusterIPs and TCP ports of `svc`; `None` for a Service with no ClusterIP (headless,
/// ExternalName).
pub fn service_facts(svc: &Service, name: ServiceName, metrics: &Metrics) -> Option<ServiceFacts> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let texts = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .chain(spec.cluster_ip.as_deref());
    let mut cluster_ips = Vec::new();
    for text in texts.filter(|t| !t.is_empty() && *t != "None") {
        match text.parse::<IpAddr>() {
            Ok(ip) if !cluster_ips.contains(&ip.to_canonical()) => {
                cluster_ips.push(ip.to_canonical())
            }
            Ok(_) => {}
            Err(_) => skipped(
                metrics,
                "service",
                "invalid_ip",
                &name.namespace,
                &name.name,
            ),
        }
    }
    if cluster_ips.is_empty() {
        return None;
    }
    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        let tcp = port.protocol.as_deref().is_none_or(|p| p == "TCP");
        let number = u16::try_from(port.port).ok().filter(|p| *p != 0);
        match (tcp, number) {
            (true, Some(number)) => ports.push(ServicePort {
                port: number,
                name: port.name.clone().unwrap_or_default(),
            }),
            (false, _) => skipped(
                metrics,
                "service",
                "non_tcp_port",
                &name.namespace,
                &name.name,
            ),
            (true, None) => skipped(
                metrics,
                "service",
                "invalid_port",
                &name.namespace,
                &name.name,
            ),
        }
    }
    Some(ServiceFacts {
        name,
        cluster_ips,
        ports,
    })
}

/// The Service, TCP ports and ready endpoints of `slice`; `None` (counted) when it names no
/// Service or holds FQDNs.
pub fn slice_facts(slice: &EndpointSlice, metrics: &Metrics) -> Option<SliceFacts> {
    let namespace = slice.metadata.namespace.clone().unwrap_or_default();
    let name = slice.metadata.name.clone().unwrap_or_default();
    let skip = |reason| skipped(metrics, "endpointslice", reason, &namespace, &name);
    let Some(service) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
    else {
        skip("no_service_label");
        return None;
    };
    let ipv6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        _ => {
            skip("unsupported_address_type");
            return None;
        }
    };
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| {
            let number = p
                .port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)?;
            Some((p.name.clone().unwrap_or_default(), number))
        })
        .collect();
    let mut ready = Vec::new();
    for endpoint in &slice.endpoints {
        let conditions = endpoint.conditions.as_ref();
        // Unset means ready; a terminating endpoint is not ready.
        let is_ready = conditions.and_then(|c| c.ready).unwrap_or(true)
            && !conditions.and_then(|c| c.terminating).unwrap_or(false);
        if !is_ready {
            continue;
        }
        for text in &endpoint.addresses {
            match text.parse::<IpAddr>().map(|ip| ip.to_canonical()) {
                Ok(ip) if ip.is_ipv6() == ipv6 => ready.push(ip),
                _ => skip("invalid_ip"),
            }
        }
    }
    Some(SliceFacts {
        service: ServiceName {
            namespace: namespace.clone(),
            name: service.clone(),
        },
        name: name.clone(),
        ipv6,
        ports,
        ready,
    })
}

fn api_status(error: &kube::Error) -> Option<&kube::core::ErrorResponse> {
    match error {
        kube::Error::Api(status) => Some(status),
        _ => None,
    }
}

/// Logs and counts an object the directory cannot use (or use whole).
fn skipped(metrics: &Metrics, kind: &str, reason: &str, namespace: &str, name: &str) {
    metrics
        .discovery_skipped_objects
        .with_label_values(&[kind, reason])
        .inc();
    if reason == "no_ip" {
        // Every pod is like this between scheduling and its sandbox starting.
        debug!(kind, reason, namespace, name, "object not usable yet");
    } else {
        warn!(
            kind,
            reason, namespace, name, "Kubernetes object skipped (or partly used)"
        );
    }
}

pub enum PodView {
    Live(PodFacts),
    /// Finished, terminating or host-network: never in the mesh.
    Gone(PodUid),
}

/// What the directory keeps of `pod`; `None` when it cannot be placed at all (no UID or name).
pub fn pod_view(pod: &Pod, metrics: &Metrics) -> Option<PodView> {
    let meta = &pod.metadata;
    let namespace = meta.namespace.as_deref().unwrap_or_default();
    let name = meta.name.as_deref().unwrap_or_default();
    let skip = |reason| skipped(metrics, "pod", reason, namespace, name);
    let Some(uid) = meta.uid.as_deref().and_then(|u| u.parse::<PodUid>().ok()) else {
        skip("invalid_uid");
        return None;
    };
    if namespace.is_empty() || name.is_empty() {
        skip("missing_name");
        return None;
    }
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let finished = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    if host_network || finished || meta.deletion_timestamp.is_some() {
        return Some(PodView::Gone(uid));
    }
    let texts = status
        .into_iter()
        .flat_map(|s| s.pod_ips.iter().flatten().map(|p| p.ip.as_str()))
        .chain(status.and_then(|s| s.pod_ip.as_deref()));
    let mut ips = Vec::new();
    for text in texts {
        match text.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => skip("invalid_ip"),
        }
    }
    if ips.is_empty() {
        skip("no_ip");
    }
    let opt_in = match meta.annotations.as_ref().and_then(|a| a.get(MESH_KEY)) {
        None => MeshOptIn::Unset,
        Some(v) => mesh_value(v).unwrap_or_else(|| {
            skip("invalid_mesh_value");
            MeshOptIn::Unset
        }),
    };
    Some(PodView::Live(PodFacts {
        uid,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        ips,
        opt_in,
        probe_ports: probe_ports(pod),
    }))
}

/// A namespace's `zt.io/mesh` label; an unknown value counts as unset, and is reported.
pub fn namespace_mesh(ns: &Namespace, metrics: &Metrics) -> MeshOptIn {
    let name = ns.metadata.name.as_deref().unwrap_or_default();
    match ns.metadata.labels.as_ref().and_then(|l| l.get(MESH_KEY)) {
        None => MeshOptIn::Unset,
        Some(v) => mesh_value(v).unwrap_or_else(|| {
            skipped(metrics, "namespace", "invalid_mesh_value", "", name);
            MeshOptIn::Unset
        }),
    }
}

fn mesh_value(value: &str) -> Option<MeshOptIn> {
    match value {
        "enabled" => Some(MeshOptIn::Enabled),
        "disabled" => Some(MeshOptIn::Disabled),
        _ => None,
    }
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

    fn pod(annotation: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("shop".into()),
                uid: Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into()),
                annotations: annotation
                    .map(|a| BTreeMap::from([(MESH_KEY.to_owned(), a.to_owned())])),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: Some("node1".into()),
                service_account_name: Some("web".into()),
                ..Default::default()
            }),
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("10.0.0.1".into()),
                pod_ips: Some(vec![
                    k8s_openapi::api::core::v1::PodIP {
                        ip: "10.0.0.1".into(),
                    },
                    k8s_openapi::api::core::v1::PodIP {
                        ip: "fd00::1".into(),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    fn skipped_count(metrics: &Metrics, reason: &str) -> u64 {
        metrics
            .discovery_skipped_objects
            .with_label_values(&["pod", reason])
            .get()
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
    fn a_pod_becomes_facts_or_leaves_and_what_is_unusable_is_counted() {
        let metrics = Metrics::new();
        let Some(PodView::Live(facts)) = pod_view(&pod(None), &metrics) else {
            panic!("a running pod is live");
        };
        assert_eq!(facts.ips.len(), 2, "podIPs, v4 and v6, once each");
        assert_eq!(
            (facts.service_account.as_str(), facts.node.as_str()),
            ("web", "node1")
        );
        assert_eq!(facts.opt_in, MeshOptIn::Unset);
        let opted = |a| match pod_view(&pod(Some(a)), &metrics) {
            Some(PodView::Live(f)) => f.opt_in,
            _ => panic!("live"),
        };
        assert_eq!(opted("enabled"), MeshOptIn::Enabled);
        assert_eq!(opted("disabled"), MeshOptIn::Disabled);
        assert_eq!(opted("yes"), MeshOptIn::Unset);
        assert_eq!(skipped_count(&metrics, "invalid_mesh_value"), 1);

        for (what, change) in [
            (
                "host network",
                &(|p: &mut Pod| p.spec.as_mut().unwrap().host_network = Some(true))
                    as &dyn Fn(&mut Pod),
            ),
            ("finished", &|p: &mut Pod| {
                p.status.as_mut().unwrap().phase = Some("Succeeded".into())
            }),
            ("terminating", &|p: &mut Pod| {
                p.metadata.deletion_timestamp =
                    serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).ok()
            }),
        ] {
            let mut p = pod(Some("enabled"));
            change(&mut p);
            assert!(
                matches!(pod_view(&p, &metrics), Some(PodView::Gone(_))),
                "{what}"
            );
        }

        let mut pending = pod(None);
        pending.status = None;
        let Some(PodView::Live(facts)) = pod_view(&pending, &metrics) else {
            panic!("a pending pod is live");
        };
        assert!(facts.ips.is_empty());
        assert_eq!(skipped_count(&metrics, "no_ip"), 1);

        let mut garbled = pod(None);
        garbled.status.as_mut().unwrap().pod_ip = Some("10.0.0.300".into());
        assert!(matches!(
            pod_view(&garbled, &metrics),
            Some(PodView::Live(_))
        ));
        assert_eq!(skipped_count(&metrics, "invalid_ip"), 1);

        let mut no_uid = pod(None);
        no_uid.metadata.uid = None;
        assert!(pod_view(&no_uid, &metrics).is_none());
        assert_eq!(skipped_count(&metrics, "invalid_uid"), 1);
    }

    #[test]
    fn services_and_slices_become_what_routing_needs_and_the_rest_is_counted() {
        let metrics = Metrics::new();
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                               {"name": "dns", "port": 53, "protocol": "UDP"}]}
        }))
        .unwrap();
        let name = service_name(&svc).unwrap();
        let facts = service_facts(&svc, name.clone(), &metrics).unwrap();
        assert_eq!(facts.cluster_ips.len(), 2);
        assert_eq!(
            facts.ports,
            [ServicePort {
                port: 80,
                name: "http".into()
            }]
        );
        let count = |kind: &str, reason: &str| {
            metrics
                .discovery_skipped_objects
                .with_label_values(&[kind, reason])
                .get()
        };
        assert_eq!(count("service", "non_tcp_port"), 1);
        for headless in [
            serde_json::json!({"metadata": {"namespace": "a", "name": "h"}, "spec": {"clusterIP": "None"}}),
            serde_json::json!({"metadata": {"namespace": "a", "name": "x"}, "spec": {"type": "ExternalName", "externalName": "db.example.com"}}),
        ] {
            let svc: Service = serde_json::from_value(headless).unwrap();
            assert!(service_facts(&svc, service_name(&svc).unwrap(), &metrics).is_none());
        }

        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web-abc",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.1.0.1"]},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.1.0.3"], "conditions": {"ready": true, "terminating": true}},
                {"addresses": ["10.1.0.4"], "conditions": {"ready": true}},
                {"addresses": ["fd00::1"], "conditions": {"ready": true}}
            ]
        }))
        .unwrap();
        let facts = slice_facts(&slice, &metrics).unwrap();
        assert_eq!(facts.service, name);
        assert_eq!(facts.ports, [("http".to_owned(), 8080)]);
        let ready: Vec<String> = facts.ready.iter().map(ToString::to_string).collect();
        assert_eq!(ready, ["10.1.0.1", "10.1.0.4"]);
        assert_eq!(
            count("endpointslice", "invalid_ip"),
            1,
            "an IPv6 address in an IPv4 slice"
        );
        let orphan: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "orphan"}, "addressType": "FQDN", "endpoints": []
        }))
        .unwrap();
        assert!(slice_facts(&orphan, &metrics).is_none());
        assert_eq!(count("endpointslice", "no_service_label"), 1);
    }
}
