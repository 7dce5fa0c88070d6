//! The outbound routing decision, as one function of the mesh directory (pods and Services),
//! the egress policy and whether this node has identities: where a captured connection to
//! `dst` goes. No I/O, so every case is unit-tested without root.
//!
//! 1. A ClusterIP and port of a Service resolves to one of its ready endpoints (power of two
//!    choices on open connections, `services::ServiceTarget::pick`), or is refused at once when it has
//!    none (`no_endpoints`). Any other destination is its own endpoint.
//! 2. An endpoint that is a meshed pod is reached over HBONE, requiring that pod's identity.
//! 3. Anything else is outside the mesh: passed through in plaintext where the egress policy
//!    allows it for the source's namespace, refused (`egress_denied`) where it does not.
use std::{net::SocketAddr, sync::Arc};

use crate::{
    directory::MeshDirectory,
    egress::EgressPolicy,
    identity::spiffe::SpiffeId,
    services::{EndpointLease, ServiceName},
};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    /// HBONE to the endpoint, requiring `identity`.
    Tunnel {
        endpoint: SocketAddr,
        identity: SpiffeId,
    },
    /// Plain TCP to the endpoint, outside the mesh.
    Passthrough {
        endpoint: SocketAddr,
    },
    Refuse(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A Service with no ready endpoint for the port.
    NoEndpoints,
    /// Outside the mesh, and the egress policy does not allow it.
    EgressDenied,
}

/// A routing decision, the Service it went through, the endpoint it judged (also when it
/// refused it), and the open-connection count it holds on that endpoint (released when the
/// plan is dropped with the connection).
pub struct RoutePlan {
    pub route: Route,
    pub service: Option<Arc<ServiceName>>,
    pub endpoint: Option<SocketAddr>,
    pub lease: Option<EndpointLease>,
}

/// What the decision reads besides the destination.
pub struct RouteInputs<'a> {
    pub directory: &'a MeshDirectory,
    pub egress: &'a EgressPolicy,
    /// The node has an identity provider (else it only captures: nothing is tunneled).
    pub tunnel: bool,
}

/// Where a connection from a pod of `source_namespace` to `dst` goes.
pub fn plan(dst: SocketAddr, source_namespace: &str, inputs: &RouteInputs<'_>) -> RoutePlan {
    let (endpoint, service, lease) = match inputs.directory.service(dst) {
        Some(target) => match target.pick() {
            Some((endpoint, lease)) => (endpoint, Some(target.service), Some(lease)),
            None => {
                return RoutePlan {
                    route: Route::Refuse(Refusal::NoEndpoints),
                    service: Some(target.service),
                    endpoint: None,
                    lease: None,
                };
            }
        },
        None => (dst, None, None),
    };
    let endpoint = SocketAddr::new(endpoint.ip().to_canonical(), endpoint.port());
    let meshed = inputs
        .tunnel
        .then(|| inputs.directory.lookup(endpoint.ip()))
        .flatten();
    let route = match meshed {
        Some(identity) => Route::Tunnel { endpoint, identity },
        None if inputs.egress.allows(source_namespace, endpoint) => Route::Passthrough { endpoint },
        None => Route::Refuse(Refusal::EgressDenied),
    };
    RoutePlan {
        route,
        service,
        endpoint: Some(endpoint),
        lease,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;
    use crate::{
        directory::{ClusterPods, MeshOptIn, PodFacts},
        egress::{EgressAllow, EgressDefault},
        services::{ServiceFacts, ServicePort, SliceFacts},
    };

    const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

    /// Namespace `shop` is meshed. Pods: web-1 (10.1.0.1, fd00:1::1) and web-2 (10.1.0.2) meshed;
    /// legacy (10.1.0.9) in an unmeshed namespace. Services: `web` (10.96.0.10 and fd00:96::10,
    /// port 80 named "http" to 8080 on web-1, web-2 and legacy), `empty` (10.96.0.11:80, no
    /// endpoints), `single` (10.96.0.12:80 to web-1 only).
    fn directory() -> MeshDirectory {
        let d = MeshDirectory::default();
        let mut pods = ClusterPods::new("cluster.local".parse().unwrap(), "node1");
        let _ = pods.upsert_namespace("shop", MeshOptIn::Enabled);
        for (n, ns, ips) in [
            (1u8, "shop", &["10.1.0.1", "fd00:1::1"][..]),
            (2, "shop", &["10.1.0.2"][..]),
            (9, "legacy", &["10.1.0.9"][..]),
        ] {
            let _ = pods.upsert_pod(PodFacts {
                uid: format!("{n:032x}").parse().unwrap(),
                namespace: ns.into(),
                name: format!("web-{n}"),
                service_account: "web".into(),
                node: "node2".into(),
                labels: Default::default(),
                ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
                opt_in: MeshOptIn::Unset,
                probe_ports: vec![],
            });
        }
        d.attach_cluster(pods);
        let service = |name: &str, ips: &[&str]| ServiceFacts {
            name: ServiceName {
                namespace: "shop".into(),
                name: name.into(),
            },
            cluster_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            ports: vec![ServicePort {
                port: 80,
                name: "http".into(),
            }],
        };
        let slice = |svc: &str, ipv6: bool, ready: &[&str]| SliceFacts {
            service: ServiceName {
                namespace: "shop".into(),
                name: svc.into(),
            },
            name: format!("{svc}-{ipv6}"),
            ipv6,
            ports: vec![("http".into(), 8080)],
            ready: ready.iter().map(|i| i.parse().unwrap()).collect(),
        };
        d.update_services(|t| {
            t.upsert_service(service("web", &["10.96.0.10", "fd00:96::10"]));
            t.upsert_slice(slice("web", false, &["10.1.0.1", "10.1.0.2", "10.1.0.9"]));
            t.upsert_slice(slice("web", true, &["fd00:1::1"]));
            t.upsert_service(service("empty", &["10.96.0.11"]));
            t.upsert_service(service("single", &["10.96.0.12"]));
            t.upsert_slice(slice("single", false, &["10.1.0.1"]));
        });
        d
    }

    fn locked_down() -> EgressPolicy {
        EgressPolicy {
            default: EgressDefault::Deny,
            deny_namespaces: BTreeSet::new(),
            allow: vec![EgressAllow {
                cidrs: vec!["192.0.2.0/24".parse().unwrap()],
                ports: vec![443],
                namespaces: BTreeSet::new(),
            }],
        }
    }

    #[test]
    fn a_refused_service_endpoint_is_named_in_the_plan() {
        let d = directory();
        let closed = locked_down();
        let inputs = RouteInputs {
            directory: &d,
            egress: &closed,
            tunnel: true,
        };
        // `web` has one unmeshed endpoint; refused by egress, the plan still says which.
        let refused = (0..200)
            .map(|_| plan("10.96.0.10:80".parse().unwrap(), "shop", &inputs))
            .find(|p| p.route == Route::Refuse(Refusal::EgressDenied))
            .expect("the unmeshed endpoint is picked once in 200");
        assert_eq!(refused.endpoint, Some("10.1.0.9:8080".parse().unwrap()));
    }

    fn route(d: &MeshDirectory, egress: &EgressPolicy, dst: &str) -> (Route, Option<String>) {
        let inputs = RouteInputs {
            directory: d,
            egress,
            tunnel: true,
        };
        let p = plan(dst.parse().unwrap(), "shop", &inputs);
        (p.route, p.service.map(|s| s.to_string()))
    }

    fn tunnel(endpoint: &str) -> Route {
        Route::Tunnel {
            endpoint: endpoint.parse().unwrap(),
            identity: WEB_ID.parse().unwrap(),
        }
    }

    #[test]
    fn a_meshed_pod_is_tunneled_to_as_its_identity() {
        let d = directory();
        let open = EgressPolicy::default();
        assert_eq!(route(&d, &open, "10.1.0.1:8080").0, tunnel("10.1.0.1:8080"));
        assert_eq!(
            route(&d, &open, "[fd00:1::1]:8080").0,
            tunnel("[fd00:1::1]:8080")
        );
        // IPv4-mapped: the IPv4 pod.
        assert_eq!(
            route(&d, &open, "[::ffff:10.1.0.2]:80").0,
            tunnel("10.1.0.2:80")
        );
    }

    #[test]
    fn a_service_vip_resolves_to_a_ready_endpoint_on_its_target_port() {
        let d = directory();
        let open = EgressPolicy::default();
        let (r, service) = route(&d, &open, "10.96.0.12:80");
        assert_eq!(r, tunnel("10.1.0.1:8080"));
        assert_eq!(service.as_deref(), Some("single.shop.svc.cluster.local"));
        assert_eq!(
            route(&d, &open, "[fd00:96::10]:80").0,
            tunnel("[fd00:1::1]:8080")
        );
        // Every endpoint of `web` gets picked: the meshed ones tunneled, the other passed through.
        let mut seen = HashMap::new();
        for _ in 0..200 {
            *seen.entry(route(&d, &open, "10.96.0.10:80").0).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen.contains_key(&Route::Passthrough {
            endpoint: "10.1.0.9:8080".parse().unwrap()
        }));
    }

    #[test]
    fn a_service_without_endpoints_is_refused_and_named() {
        let d = directory();
        let (r, service) = route(&d, &EgressPolicy::default(), "10.96.0.11:80");
        assert_eq!(r, Route::Refuse(Refusal::NoEndpoints));
        assert_eq!(service.as_deref(), Some("empty.shop.svc.cluster.local"));
        // Not a port of the Service: an ordinary address (outside the mesh).
        assert_eq!(
            route(&d, &EgressPolicy::default(), "10.96.0.11:81").0,
            Route::Passthrough {
                endpoint: "10.96.0.11:81".parse().unwrap()
            }
        );
    }

    #[test]
    fn outside_the_mesh_the_egress_policy_decides() {
        let d = directory();
        let open = EgressPolicy::default();
        let outside = "198.51.100.7:443";
        assert_eq!(
            route(&d, &open, outside).0,
            Route::Passthrough {
                endpoint: outside.parse().unwrap()
            }
        );
        let closed = locked_down();
        assert_eq!(
            route(&d, &closed, outside).0,
            Route::Refuse(Refusal::EgressDenied)
        );
        assert_eq!(
            route(&d, &closed, "192.0.2.7:443").0,
            Route::Passthrough {
                endpoint: "192.0.2.7:443".parse().unwrap()
            }
        );
        // A non-meshed pod is outside the mesh too; meshed pods are not egress.
        assert_eq!(
            route(&d, &closed, "10.1.0.9:8080").0,
            Route::Refuse(Refusal::EgressDenied)
        );
        assert_eq!(
            route(&d, &closed, "10.1.0.1:8080").0,
            tunnel("10.1.0.1:8080")
        );
    }

    #[test]
    fn without_identities_nothing_is_tunneled() {
        let d = directory();
        let open = EgressPolicy::default();
        let inputs = RouteInputs {
            directory: &d,
            egress: &open,
            tunnel: false,
        };
        let p = plan("10.1.0.1:8080".parse().unwrap(), "shop", &inputs);
        assert_eq!(
            p.route,
            Route::Passthrough {
                endpoint: "10.1.0.1:8080".parse().unwrap()
            }
        );
    }
}
