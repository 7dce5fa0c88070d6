//! A synthetic cluster for the mesh directory benchmarks: pods shaped like a real cluster's
//! (Deployments, StatefulSets, Jobs, a node agent on the host network, pods waiting for a node),
//! serialized as the API server sends them, and the agent's handling of each event as
//! `discovery` does it (JSON → `Pod` → `pod_view` → the directory under its write lock).
//!
//! Layout: `NAMESPACES` namespaces of `PODS_PER_NAMESPACE` slots each, on `NODES` nodes.
//! Per namespace: 6 Deployments × 6 replicas over 3 service accounts, 3 StatefulSets × 3
//! replicas (one service account, a label set per pod), 3 Job pods (one finished), 2 pods
//! Pending without a node or an address. Two namespaces in three are meshed by label; in the
//! others the first Deployment opts in by annotation, and in meshed ones the last opts out. In
//! one namespace in ten, the last StatefulSet pod is a host-network pod. Every address is unique
//! (IPv4 and IPv6, a /20 and a /112 per node), so lookups hit exactly one pod.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    core::{ObjectList, WatchEvent},
    runtime::watcher::Event,
};
use serde_json::{Value, json};
use zt_daemon::{
    directory::{ClusterPods, LocalChange, MeshDirectory},
    discovery::namespace_mesh,
    metrics::Metrics,
};

pub const NAMESPACES: usize = 2_000;
pub const PODS_PER_NAMESPACE: usize = 50;
pub const PODS: usize = NAMESPACES * PODS_PER_NAMESPACE;
pub const NODES: usize = 150;
/// The agent's own node.
pub const LOCAL_NODE: &str = "node-000";
/// Pods per page of the initial list (kube's watcher asks for 500).
pub const PAGE: usize = 500;
/// Address generations: 0 the initial cluster, 1 pods added by the latency run, 2 by the
/// add-and-delete benchmark, 3 never held by a pod.
pub const UNUSED_GENERATION: usize = 3;

/// A reproducible 64-bit mix (splitmix64) of `n`.
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` lowercase letters and digits from `seed`, as Kubernetes' generated name suffixes.
fn suffix(seed: u64, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = mix(seed);
    (0..len)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
            x = mix(x);
            c
        })
        .collect()
}

fn uuid(seed: u64) -> String {
    let (a, b) = (mix(seed), mix(seed ^ 0x5555_5555));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

pub fn namespace_name(n: usize) -> String {
    format!("team-{n:04}")
}

fn node_name(node: usize) -> String {
    format!("node-{node:03}")
}

pub fn namespace_meshed_by_label(n: usize) -> bool {
    n % 3 != 2
}

/// What a pod slot holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Deployment { deployment: usize },
    StatefulSet { set: usize, ordinal: usize },
    Job { finished: bool },
    HostNetwork,
    Pending,
}

pub fn kind(pod: usize) -> Kind {
    let (n, slot) = (pod / PODS_PER_NAMESPACE, pod % PODS_PER_NAMESPACE);
    match slot {
        0..36 => Kind::Deployment {
            deployment: slot / 6,
        },
        44 if n % 10 == 0 => Kind::HostNetwork,
        36..45 => Kind::StatefulSet {
            set: (slot - 36) / 3,
            ordinal: (slot - 36) % 3,
        },
        45..48 => Kind::Job {
            finished: slot == 47,
        },
        _ => Kind::Pending,
    }
}

/// The node of pod `pod` (pods of one Deployment spread over many nodes).
pub fn node_of(pod: usize) -> usize {
    pod % NODES
}

/// Pod `pod`'s addresses: a /20 of IPv4 and a /112 of IPv6 per node. `generation` > 0 gives
/// addresses no pod of the initial cluster has (for pods added later; at most 4).
pub fn pod_ips(pod: usize, generation: usize) -> (Ipv4Addr, Ipv6Addr) {
    let node = node_of(pod) as u32;
    let index = (pod / NODES) as u32 + 2 + 700 * generation as u32;
    let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + node * 4096 + index);
    let v6 = Ipv6Addr::from(
        u128::from("fd00:10:64::".parse::<Ipv6Addr>().unwrap())
            + ((node as u128) << 16)
            + index as u128,
    );
    (v4, v6)
}

/// Whether pod `pod` of the initial cluster has an address and is in the mesh.
pub fn meshed(pod: usize) -> bool {
    let n = pod / PODS_PER_NAMESPACE;
    match kind(pod) {
        Kind::HostNetwork | Kind::Pending | Kind::Job { finished: true } => false,
        Kind::Deployment { deployment: 0 } => true,
        Kind::Deployment { deployment: 5 } => false,
        _ => namespace_meshed_by_label(n),
    }
}

/// The service account pod `pod` runs as: three per namespace shared by its Deployments, one
/// for its StatefulSets, the default one for Jobs.
pub fn service_account(pod: usize) -> String {
    match kind(pod) {
        Kind::Deployment { .. } | Kind::Pending => format!("svc-{}", deployment_of(pod) % 3),
        Kind::StatefulSet { .. } | Kind::HostNetwork => "database".into(),
        Kind::Job { .. } => "default".into(),
    }
}

/// The Deployment a Deployment or Pending pod belongs to.
fn deployment_of(pod: usize) -> usize {
    match kind(pod) {
        Kind::Deployment { deployment } => deployment,
        _ => pod % 6,
    }
}

/// Pod `pod` as the API server serializes it. `generation` > 0 makes it a new pod (new UID,
/// name and addresses) of the same shape; `resource_version` distinguishes updates.
pub fn pod_json(pod: usize, generation: usize, resource_version: u64) -> Value {
    let n = pod / PODS_PER_NAMESPACE;
    let namespace = namespace_name(n);
    let seed = (pod as u64) << 8 | generation as u64;
    let kind = kind(pod);
    let team = format!("team-{}", n % 40);
    let node = node_of(pod);
    let (v4, v6) = pod_ips(pod, generation);
    let host_ip = Ipv4Addr::new(172, 16, (node / 200) as u8, (node % 200 + 10) as u8);
    let mut annotations = serde_json::Map::new();
    annotations.insert("prometheus.io/scrape".into(), json!("true"));
    annotations.insert("prometheus.io/port".into(), json!("9090"));
    let (name, labels, owner_kind, owner_name, app) = match kind {
        Kind::Deployment { .. } | Kind::Pending => {
            let d = deployment_of(pod);
            let app = format!("app{d}");
            let hash = suffix((n * 16 + d) as u64, 10);
            let rs = format!("{app}-{hash}");
            annotations.insert(
                "kubectl.kubernetes.io/restartedAt".into(),
                json!("2025-06-01T10:00:00Z"),
            );
            if d == 0 && !namespace_meshed_by_label(n) {
                annotations.insert("zt.io/mesh".into(), json!("enabled"));
            }
            if d == 5 && namespace_meshed_by_label(n) {
                annotations.insert("zt.io/mesh".into(), json!("disabled"));
            }
            let labels = json!({
                "app": app,
                "app.kubernetes.io/name": app,
                "app.kubernetes.io/part-of": format!("shop-{}", n % 7),
                "app.kubernetes.io/version": format!("1.{}.{}", d, n % 5),
                "pod-template-hash": hash,
                "team": team,
            });
            (
                format!("{rs}-{}", suffix(seed, 5)),
                labels,
                "ReplicaSet",
                rs,
                app,
            )
        }
        Kind::StatefulSet { set, ordinal } => {
            let app = format!("db{set}");
            let name = format!("{app}-{ordinal}");
            let labels = json!({
                "app": app,
                "app.kubernetes.io/name": app,
                "apps.kubernetes.io/pod-index": ordinal.to_string(),
                "controller-revision-hash": format!("{app}-{}", suffix(n as u64 * 3 + set as u64, 10)),
                "statefulset.kubernetes.io/pod-name": name,
                "team": team,
            });
            (name, labels, "StatefulSet", app.clone(), app)
        }
        Kind::HostNetwork => {
            let app = "node-exporter".to_owned();
            let labels = json!({
                "app": app,
                "controller-revision-hash": "6c9d7f5b8",
                "pod-template-generation": "3",
            });
            let name = format!("{app}-{}", suffix(seed, 5));
            (name, labels, "DaemonSet", app.clone(), app)
        }
        Kind::Job { .. } => {
            let job = format!("report-{}", 28_000_000 + pod);
            let job_uid = uuid(seed ^ 0xabcd);
            let labels = json!({
                "batch.kubernetes.io/controller-uid": job_uid,
                "batch.kubernetes.io/job-name": job,
                "controller-uid": job_uid,
                "job-name": job,
            });
            (
                format!("{job}-{}", suffix(seed, 5)),
                labels,
                "Job",
                job.clone(),
                job,
            )
        }
    };
    let image = format!("registry.example.com/{team}/{app}:1.{}.0", n % 5);
    let mut containers = vec![json!({
        "name": app,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [
            {"name": "http", "containerPort": 8080, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}
        ],
        "env": [
            {"name": "LOG_LEVEL", "value": "info"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
            {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "db-credentials", "key": "url"}}}
        ],
        "resources": {
            "limits": {"memory": "512Mi"},
            "requests": {"cpu": "100m", "memory": "256Mi"}
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
            "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 1,
            "successThreshold": 1, "failureThreshold": 3
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
            "periodSeconds": 5, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3
        },
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/app"},
            {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File"
    })];
    if pod.is_multiple_of(3) {
        containers.push(json!({
            "name": "log-shipper",
            "image": "registry.example.com/platform/log-shipper:3.1.4",
            "ports": [{"name": "shipper", "containerPort": 2020, "protocol": "TCP"}],
            "livenessProbe": {"tcpSocket": {"port": 2020}, "periodSeconds": 20},
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
            "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]
        }));
    }
    let uid = uuid(seed);
    let mut spec = json!({
        "containers": containers,
        "serviceAccountName": service_account(pod),
        "serviceAccount": service_account(pod),
        "restartPolicy": if matches!(kind, Kind::Job { .. }) { "Never" } else { "Always" },
        "dnsPolicy": "ClusterFirst",
        "schedulerName": "default-scheduler",
        "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 30,
        "enableServiceLinks": true,
        "preemptionPolicy": "PreemptLowerPriority",
        "priority": 0,
        "tolerations": [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": format!("{app}-config"), "defaultMode": 420}},
            {"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
            ]}}
        ]
    });
    let started = "2025-06-01T10:00:05Z";
    let condition = |kind: &str, status: &str| json!({"type": kind, "status": status, "lastProbeTime": null, "lastTransitionTime": started});
    let status = if kind == Kind::Pending {
        json!({
            "phase": "Pending",
            "qosClass": "Burstable",
            "conditions": [{
                "type": "PodScheduled", "status": "False", "lastProbeTime": null,
                "lastTransitionTime": started, "reason": "Unschedulable",
                "message": "0/150 nodes are available: 150 Insufficient cpu. preemption: 0/150 nodes are available: 150 No preemption victims found for incoming pod."
            }]
        })
    } else {
        spec["nodeName"] = json!(node_name(node));
        let finished = kind == (Kind::Job { finished: true });
        let host_network = kind == Kind::HostNetwork;
        if host_network {
            spec["hostNetwork"] = json!(true);
        }
        let (pod_ip, pod_ips) = if host_network {
            (host_ip.to_string(), json!([{"ip": host_ip.to_string()}]))
        } else {
            (
                v4.to_string(),
                json!([{"ip": v4.to_string()}, {"ip": v6.to_string()}]),
            )
        };
        let ready = if finished { "False" } else { "True" };
        let container_statuses: Vec<Value> = spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                json!({
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": format!("{}@sha256:{:016x}{:016x}{:016x}{:016x}", c["image"].as_str().unwrap(), mix(1), mix(2), mix(3), mix(4)),
                    "containerID": format!("containerd://{:016x}{:016x}{:016x}{:016x}", mix(seed), mix(seed + 1), mix(seed + 2), mix(seed + 3)),
                    "ready": !finished,
                    "restartCount": (seed % 3),
                    "started": !finished,
                    "state": if finished {
                        json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": started, "finishedAt": "2025-06-01T10:01:00Z", "containerID": "containerd://0"}})
                    } else {
                        json!({"running": {"startedAt": started}})
                    }
                })
            })
            .collect();
        json!({
            "phase": if finished { "Succeeded" } else { "Running" },
            "conditions": [
                condition("PodReadyToStartContainers", ready),
                condition("Initialized", "True"),
                condition("Ready", ready),
                condition("ContainersReady", ready),
                condition("PodScheduled", "True")
            ],
            "hostIP": host_ip.to_string(),
            "hostIPs": [{"ip": host_ip.to_string()}],
            "podIP": pod_ip,
            "podIPs": pod_ips,
            "startTime": started,
            "containerStatuses": container_statuses,
            "qosClass": "Burstable"
        })
    };
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "generateName": format!("{owner_name}-"),
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": resource_version.to_string(),
            "creationTimestamp": "2025-06-01T10:00:00Z",
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": if owner_kind == "Job" { "batch/v1" } else { "apps/v1" },
                "kind": owner_kind,
                "name": owner_name,
                "uid": uuid(seed ^ 0x1234),
                "controller": true,
                "blockOwnerDeletion": true
            }],
            "managedFields": [
                {
                    "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                    "time": "2025-06-01T10:00:00Z", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}}, "f:ownerReferences": {".": {}}},
                                 "f:spec": {"f:containers": {}, "f:serviceAccountName": {}, "f:volumes": {}}}
                },
                {
                    "manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                    "time": started, "fieldsType": "FieldsV1", "subresource": "status",
                    "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {}, "f:podIP": {}, "f:podIPs": {}, "f:startTime": {}}}
                }
            ]
        },
        "spec": spec,
        "status": status
    })
}

pub fn namespace_json(n: usize) -> Value {
    let mut labels = json!({
        "kubernetes.io/metadata.name": namespace_name(n),
        "team": format!("team-{}", n % 40),
    });
    if namespace_meshed_by_label(n) {
        labels["zt.io/mesh"] = json!("enabled");
    }
    json!({
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {"name": namespace_name(n), "uid": uuid(n as u64 ^ 0xfeed), "resourceVersion": "10", "labels": labels},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    })
}

/// The initial list of pods as pages of a PodList (items carry no kind, as the API sends them).
pub fn list_pages(pods: usize) -> Vec<Vec<u8>> {
    (0..pods)
        .step_by(PAGE)
        .map(|first| list_page(first..(first + PAGE).min(pods)))
        .collect()
}

/// One page of the initial list: the pods `pods`.
pub fn list_page(pods: std::ops::Range<usize>) -> Vec<u8> {
    let items: Vec<Value> = pods
        .map(|p| {
            let mut pod = pod_json(p, 0, 1000 + p as u64);
            let object = pod.as_object_mut().unwrap();
            object.remove("kind");
            object.remove("apiVersion");
            pod
        })
        .collect();
    serde_json::to_vec(&json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "200000", "continue": "token"},
        "items": items
    }))
    .unwrap()
}

/// One line of a watch stream.
pub fn watch_event(kind: &str, pod: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"type": kind, "object": pod})).unwrap()
}

/// A directory that holds every namespace of the cluster and no pod.
pub fn empty_directory(metrics: &Metrics) -> MeshDirectory {
    let directory = MeshDirectory::default();
    directory.attach_cluster(ClusterPods::new(
        "cluster.local".parse().unwrap(),
        LOCAL_NODE,
    ));
    directory.update_cluster(|c| c.begin_namespace_relist());
    for n in 0..NAMESPACES {
        let ns: Namespace = serde_json::from_value(namespace_json(n)).unwrap();
        let mesh = namespace_mesh(&ns, metrics);
        directory
            .update_cluster(|c| c.upsert_namespace(ns.metadata.name.as_deref().unwrap(), mesh));
    }
    directory.update_cluster(|c| c.end_namespace_relist());
    directory
}

/// What discovery does with one pod event (its own function, not a copy).
pub fn apply(directory: &MeshDirectory, metrics: &Metrics, event: Event<Pod>) -> LocalChange {
    zt_daemon::discovery::apply_pod_event(directory, metrics, event)
}

/// Applies pages of the initial list, each pod an event of its own, as the watcher hands them.
pub fn apply_list(
    directory: &MeshDirectory,
    metrics: &Metrics,
    pages: impl IntoIterator<Item = impl AsRef<[u8]>>,
) {
    let _ = apply(directory, metrics, Event::Init);
    for page in pages {
        let list: ObjectList<Pod> = serde_json::from_slice(page.as_ref()).expect("a PodList page");
        for pod in list.items {
            let _ = apply(directory, metrics, Event::InitApply(pod));
        }
    }
    let _ = apply(directory, metrics, Event::InitDone);
}

/// Decodes one watch stream line and applies it.
pub fn apply_watch_line(directory: &MeshDirectory, metrics: &Metrics, line: &[u8]) -> LocalChange {
    let event = match serde_json::from_slice::<WatchEvent<Pod>>(line).expect("a watch event") {
        WatchEvent::Added(pod) | WatchEvent::Modified(pod) => Event::Apply(pod),
        WatchEvent::Deleted(pod) => Event::Delete(pod),
        WatchEvent::Bookmark(_) | WatchEvent::Error(_) => return LocalChange(false),
    };
    apply(directory, metrics, event)
}

/// Addresses of meshed pods of the initial cluster, spread over it.
pub fn meshed_addresses(count: usize) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let pods = (0..PODS)
        .map(|i| (mix(i as u64) % PODS as u64) as usize)
        .filter(|p| meshed(*p))
        .take(count);
    pods.map(|p| {
        let (v4, v6) = pod_ips(p, 0);
        (IpAddr::V4(v4), IpAddr::V6(v6))
    })
    .unzip()
}

/// Addresses no pod holds (in the pod ranges, so as a peer's would be).
pub fn unknown_addresses(count: usize) -> (Vec<IpAddr>, Vec<IpAddr>) {
    (0..count)
        .map(|i| {
            let (v4, v6) = pod_ips(i * 7 % PODS, UNUSED_GENERATION);
            (IpAddr::V4(v4), IpAddr::V6(v6))
        })
        .unzip()
}
