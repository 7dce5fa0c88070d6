//! Services and EndpointSlices as the Service table keeps them: ClusterIPs and TCP ports, and
//! each slice's ready endpoints.
use std::net::IpAddr;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::report::skipped;
use crate::{
    metrics::Metrics,
    services::{ServiceFacts, ServiceName, ServicePort, SliceFacts},
};

pub(super) fn service_name(svc: &Service) -> Option<ServiceName> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
