//! Pods and namespaces as the mesh directory keeps them: a pod's facts (addresses, service
//! account, opt-in, probe ports) or its leaving, and a namespace's `zt.io/mesh` label.
use std::net::IpAddr;

use k8s_openapi::{
    api::core::v1::{Container, Namespace, Pod, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::report::skipped;
use crate::{
    directory::{MeshOptIn, PodFacts, PodUid},
    metrics::Metrics,
};

/// The label (namespace) or annotation (pod) that opts into the mesh.
pub const MESH_KEY: &str = "zt.io/mesh";

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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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
}
