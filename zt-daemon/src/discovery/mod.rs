//! Workload discovery from Kubernetes (`[discovery.kubernetes]`): kube-rs watches every pod,
//! namespace, Service and EndpointSlice of the cluster, feeds them into the mesh directory
//! ([`crate::directory::ClusterPods`], [`crate::services::ServiceTable`]), and publishes this
//! node's meshed pods as workloads to enroll. One source for both: the pod a peer is tunneled to
//! is the pod its node enrolled. `client` makes the Kubernetes client, `events` runs the watch
//! loop, and `pods` and `services` turn API objects into what the directory keeps.
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
mod client;
mod events;
mod pods;
mod report;
mod services;

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;

use self::events::Watch;
pub use self::{
    client::{DiscoveryError, client},
    events::apply_pod_event,
    pods::{MESH_KEY, PodView, namespace_mesh, pod_view, probe_ports},
    report::DiscoveryReport,
    services::{service_facts, slice_facts},
};
use crate::{
    config::KubernetesDiscovery,
    directory::{ClusterPods, MeshDirectory},
    identity::spiffe::TrustDomain,
    workload::Workload,
};

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
        Watch::new(directory, report, netns_dir)
            .run(pods, namespaces, (services, slices), tx)
            .await;
    });
    Ok(rx)
}
