//! The objects the tests declare to the API server: namespaces, service accounts, pods (with
//! the status a kubelet would write), Services and EndpointSlices.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ::kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod as KubePod};
use serde_json::{Value, json};

use super::{Cluster, IMAGE};
use crate::{Node, Pod};

/// A pod as the test declares it to the API server.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`: the bed node's name (`node1`, `node2`).
    pub node: String,
    pub service_account: String,
    /// The IPs written to `status.podIPs`; `None` for a pod that has none yet (Pending).
    pub ips: Option<(Ipv4Addr, Ipv6Addr)>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl PodSpec {
    /// The bed pod `pod` on `node` as Kubernetes pod `namespace/name`, running as
    /// `service_account`, with the bed pod's IPv4 and IPv6 addresses.
    pub fn new(namespace: &str, name: &str, node: &Node, pod: &Pod, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            node: node.name.clone(),
            service_account: service_account.into(),
            ips: Some((pod.ipv4, pod.ipv6)),
            labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
            annotations: BTreeMap::new(),
        }
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// No IP yet: the pod stays Pending, as before its sandbox is up.
    pub fn without_ip(mut self) -> Self {
        self.ips = None;
        self
    }
}

/// A Service as the test declares it: ClusterIPs allocated by the API server.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// `RequireDualStack` (an IPv4 and an IPv6 ClusterIP), else IPv4 only.
    pub dual_stack: bool,
    pub ports: Vec<ServicePortSpec>,
}

#[derive(Debug, Clone)]
pub struct ServicePortSpec {
    pub name: String,
    pub port: u16,
    /// A port number, or the name of a container port.
    pub target_port: String,
    /// `TCP`, `UDP`, `SCTP`.
    pub protocol: String,
}

impl ServiceSpec {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            dual_stack: false,
            ports: Vec::new(),
        }
    }

    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    /// A TCP port `name`, `port` to `target_port` (a number or a container port's name).
    pub fn port(self, name: &str, port: u16, target_port: &str) -> Self {
        self.port_of(name, port, target_port, "TCP")
    }

    pub fn port_of(mut self, name: &str, port: u16, target_port: &str, protocol: &str) -> Self {
        self.ports.push(ServicePortSpec {
            name: name.into(),
            port,
            target_port: target_port.into(),
            protocol: protocol.into(),
        });
        self
    }
}

/// An EndpointSlice as the EndpointSlice controller would write it for a Service.
#[derive(Debug, Clone)]
pub struct EndpointSliceSpec {
    pub namespace: String,
    pub name: String,
    /// The Service (label `kubernetes.io/service-name`).
    pub service: String,
    /// `addressType` IPv6, else IPv4.
    pub ipv6: bool,
    /// (Service port name, the number the endpoints listen on, protocol).
    pub ports: Vec<(String, u16, String)>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// One endpoint of a slice: an address, its conditions, and the pod it is (if any).
#[derive(Debug, Clone)]
pub struct SliceEndpoint {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// (node, pod name) for `nodeName` and `targetRef`.
    pub pod: Option<(String, String)>,
}

impl SliceEndpoint {
    /// Ready and serving, not terminating.
    pub fn ready(address: IpAddr) -> Self {
        Self {
            address,
            ready: true,
            serving: true,
            terminating: false,
            pod: None,
        }
    }

    /// Failing its readiness probe: neither ready nor serving.
    pub fn not_ready(address: IpAddr) -> Self {
        Self {
            ready: false,
            serving: false,
            ..Self::ready(address)
        }
    }

    /// Terminating with `ready` as given (true: as the controller writes it for a Service that
    /// publishes not-ready addresses).
    pub fn terminating(address: IpAddr, ready: bool) -> Self {
        Self {
            ready,
            terminating: true,
            ..Self::ready(address)
        }
    }

    pub fn of_pod(mut self, node: &str, pod: &str) -> Self {
        self.pod = Some((node.into(), pod.into()));
        self
    }
}

impl EndpointSliceSpec {
    pub fn new(namespace: &str, name: &str, service: &str, ipv6: bool) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            service: service.into(),
            ipv6,
            ports: Vec::new(),
            endpoints: Vec::new(),
        }
    }

    /// A TCP port: the Service port `name` is `number` on this slice's endpoints.
    pub fn port(self, name: &str, number: u16) -> Self {
        self.port_of(name, number, "TCP")
    }

    pub fn port_of(mut self, name: &str, number: u16, protocol: &str) -> Self {
        self.ports.push((name.into(), number, protocol.into()));
        self
    }

    pub fn endpoint(mut self, endpoint: SliceEndpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// The same slice with `endpoints` instead.
    pub fn with_endpoints(mut self, endpoints: Vec<SliceEndpoint>) -> Self {
        self.endpoints = endpoints;
        self
    }
}

/// The node's address on the link between the nodes (its `status.hostIP`).
fn node_ip(node: &str) -> String {
    let n = node.trim_start_matches("node");
    format!("10.200.0.{n}")
}

impl Cluster {
    /// Creates (or updates) the Service; returns its ClusterIPs, IPv4 first.
    pub fn apply_service(&self, spec: &ServiceSpec) -> anyhow::Result<Vec<IpAddr>> {
        let ports: Vec<Value> = spec
            .ports
            .iter()
            .map(|p| {
                let target = match p.target_port.parse::<u16>() {
                    Ok(n) => json!(n),
                    Err(_) => json!(p.target_port),
                };
                json!({"name": p.name, "port": p.port, "targetPort": target, "protocol": p.protocol})
            })
            .collect();
        let mut service = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": spec.name, "namespace": spec.namespace},
            "spec": {"type": "ClusterIP", "ports": ports}});
        if spec.dual_stack {
            service["spec"]["ipFamilyPolicy"] = "RequireDualStack".into();
            service["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
        }
        let stored = self
            .apply(service, None)
            .with_context(|| format!("applying Service {}/{}", spec.namespace, spec.name))?;
        let mut ips: Vec<IpAddr> = stored["spec"]["clusterIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.as_str()?.parse().ok())
            .collect();
        ips.sort_by_key(IpAddr::is_ipv6);
        if ips.is_empty() {
            bail!(
                "Service {}/{} got no ClusterIP: {stored}",
                spec.namespace,
                spec.name
            );
        }
        Ok(ips)
    }

    /// Creates the EndpointSlice, or replaces its ports and endpoints.
    pub fn apply_endpoint_slice(&self, spec: &EndpointSliceSpec) -> anyhow::Result<()> {
        let ports: Vec<Value> = spec
            .ports
            .iter()
            .map(|(name, port, protocol)| json!({"name": name, "port": port, "protocol": protocol}))
            .collect();
        let endpoints: Vec<Value> = spec
            .endpoints
            .iter()
            .map(|e| {
                let mut endpoint = json!({"addresses": [e.address.to_string()],
                    "conditions": {"ready": e.ready, "serving": e.serving,
                                   "terminating": e.terminating}});
                if let Some((node, pod)) = &e.pod {
                    endpoint["nodeName"] = node.as_str().into();
                    endpoint["targetRef"] =
                        json!({"kind": "Pod", "namespace": spec.namespace, "name": pod});
                }
                endpoint
            })
            .collect();
        self.apply_object(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": spec.name, "namespace": spec.namespace,
                    "labels": {"kubernetes.io/service-name": spec.service,
                               "endpointslice.kubernetes.io/managed-by": "zt-tests"}},
                "addressType": if spec.ipv6 { "IPv6" } else { "IPv4" },
                "ports": ports, "endpoints": endpoints}),
            None,
        )
        .with_context(|| format!("applying EndpointSlice {}/{}", spec.namespace, spec.name))
    }

    pub fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        self.apply_object(
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": name, "labels": labels}}),
            None,
        )
        .with_context(|| format!("creating namespace {name}"))
    }

    /// Merges `labels` into namespace `name`'s; a `None` value removes the label.
    pub fn set_namespace_labels(
        &self,
        name: &str,
        labels: &[(&str, Option<&str>)],
    ) -> anyhow::Result<()> {
        let labels: BTreeMap<&str, Option<&str>> = labels.iter().copied().collect();
        let api: Api<Namespace> = Api::all(self.client.clone());
        self.rt
            .block_on(api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            ))
            .with_context(|| format!("labelling namespace {name}"))?;
        Ok(())
    }

    /// Deletes namespace `name`. With no controller-manager to empty it, it stays Terminating
    /// and its pods stay.
    pub fn delete_namespace(&self, name: &str) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        self.rt
            .block_on(api.delete(name, &DeleteParams::default()))
            .with_context(|| format!("deleting namespace {name}"))?;
        Ok(())
    }

    pub fn create_service_account(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        self.apply_object(
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": name, "namespace": namespace}}),
            None,
        )
        .with_context(|| format!("creating service account {namespace}/{name}"))
    }

    /// Creates the pod (bound to its node, one container) and writes its status as a kubelet
    /// would once it runs: phase Running and its IPs (or Pending without IPs).
    pub fn create_pod(&self, spec: &PodSpec) -> anyhow::Result<()> {
        let pod: KubePod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": spec.name, "namespace": spec.namespace,
                         "labels": spec.labels, "annotations": spec.annotations},
            "spec": {"nodeName": spec.node, "serviceAccountName": spec.service_account,
                     "automountServiceAccountToken": false,
                     "containers": [{"name": "app", "image": IMAGE}]},
        }))?;
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), &spec.namespace);
        self.rt
            .block_on(api.create(&PostParams::default(), &pod))
            .with_context(|| format!("creating pod {}/{}", spec.namespace, spec.name))?;
        self.set_pod_status(spec)
    }

    /// Writes the pod's status from `spec` as a kubelet would: Running with its IPs, or Pending
    /// without IPs.
    pub fn set_pod_status(&self, spec: &PodSpec) -> anyhow::Result<()> {
        let status = match spec.ips {
            Some((v4, v6)) => json!({"phase": "Running", "podIP": v4.to_string(),
                "podIPs": [{"ip": v4.to_string()}, {"ip": v6.to_string()}],
                "hostIP": node_ip(&spec.node), "hostIPs": [{"ip": node_ip(&spec.node)}]}),
            None => json!({"phase": "Pending"}),
        };
        self.patch_pod_status(&spec.namespace, &spec.name, status)
    }

    /// Sets the pod's `status.phase` (Pending, Running, Succeeded, Failed).
    pub fn set_pod_phase(&self, namespace: &str, name: &str, phase: &str) -> anyhow::Result<()> {
        self.patch_pod_status(namespace, name, json!({"phase": phase}))
    }

    fn patch_pod_status(&self, namespace: &str, name: &str, status: Value) -> anyhow::Result<()> {
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), namespace);
        self.rt
            .block_on(api.patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            ))
            .with_context(|| format!("writing the status of pod {namespace}/{name}"))?;
        Ok(())
    }

    /// Merges `annotations` into the pod's; a `None` value removes one.
    pub fn set_pod_annotations(
        &self,
        namespace: &str,
        name: &str,
        annotations: &[(&str, Option<&str>)],
    ) -> anyhow::Result<()> {
        self.merge_pod_metadata(namespace, name, "annotations", annotations)
    }

    /// Merges `labels` into the pod's; a `None` value removes one.
    pub fn set_pod_labels(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, Option<&str>)],
    ) -> anyhow::Result<()> {
        self.merge_pod_metadata(namespace, name, "labels", labels)
    }

    /// Merges `entries` into the map `field` (labels, annotations) of the pod's metadata.
    fn merge_pod_metadata(
        &self,
        namespace: &str,
        name: &str,
        field: &str,
        entries: &[(&str, Option<&str>)],
    ) -> anyhow::Result<()> {
        let entries: BTreeMap<&str, Option<&str>> = entries.iter().copied().collect();
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), namespace);
        self.rt
            .block_on(api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {field: entries}})),
            ))
            .with_context(|| format!("setting {field} of pod {namespace}/{name}"))?;
        Ok(())
    }

    /// Deletes the pod at once (grace period 0: no kubelet would confirm a graceful end) and
    /// waits until the API no longer has it.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), namespace);
        self.rt.block_on(async {
            api.delete(
                name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("deleting pod {namespace}/{name}"))?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while api.get_opt(name).await?.is_some() {
                if tokio::time::Instant::now() > deadline {
                    bail!("pod {namespace}/{name} still there 30 s after its deletion");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        })
    }

    /// The pod as the API has it, if it exists.
    pub fn get_pod(&self, namespace: &str, name: &str) -> anyhow::Result<Option<KubePod>> {
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), namespace);
        Ok(self.rt.block_on(api.get_opt(name))?)
    }
}
