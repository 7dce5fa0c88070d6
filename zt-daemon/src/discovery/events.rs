//! The watch loop: each event of the pod, namespace, Service and EndpointSlice watchers applied
//! to the mesh directory, API refusals reported to readiness, and this node's meshed pods (with
//! the network namespaces that hold their addresses) published as workloads to enroll.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    pods::{PodView, namespace_mesh, pod_view},
    report::{DiscoveryReport, skipped},
    services::{service_facts, service_name, slice_facts},
};
use crate::{
    directory::{ClusterPods, LocalChange, LocalPod, MeshDirectory, PodFacts, PodUid},
    enrollment::netns,
    metrics::Metrics,
    services::{ServiceName, SliceFacts},
    workload::Workload,
};

pub(super) struct Watch {
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
    pub(super) fn new(
        directory: MeshDirectory,
        report: DiscoveryReport,
        netns_dir: PathBuf,
    ) -> Self {
        Self {
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
    }

    pub(super) async fn run(
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

fn api_status(error: &kube::Error) -> Option<&kube::core::ErrorResponse> {
    match error {
        kube::Error::Api(status) => Some(status),
        _ => None,
    }
}
