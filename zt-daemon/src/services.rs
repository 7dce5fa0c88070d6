//! Kubernetes Services as the outbound proxy needs them: a ClusterIP and port lead to the
//! endpoints that may take a new connection now.
//!
//! Fed by discovery from Services and EndpointSlices (`discovery.k8s.io/v1`). The EndpointSlice
//! controller already resolved named `targetPort`s: a slice carries, under the Service port's
//! name, the port number its endpoints listen on, so resolution is per slice and a slice without
//! that port contributes nothing to it. Only TCP ports are kept (the agent captures TCP), only
//! endpoints whose `ready` condition holds (unset means ready; terminating endpoints are not
//! ready), and only slices of the ClusterIP's address family.
//!
//! Each (ClusterIP, port) keeps its current list of endpoint addresses, rebuilt when its Service
//! or one of its slices changes, so resolving a connection is one hash lookup.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

/// A Service, as Istio's `destination_service` names it: `<name>.<namespace>.svc.cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

/// A TCP port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    /// The port's name; unnamed only when the Service has one port.
    pub name: String,
}

/// A Service with a ClusterIP (headless and ExternalName Services have none, and are not kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFacts {
    pub name: ServiceName,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

/// One EndpointSlice of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceFacts {
    pub service: ServiceName,
    /// The slice's own name (a Service has several).
    pub name: String,
    pub ipv6: bool,
    /// TCP ports by Service port name (`""` for an unnamed one).
    pub ports: Vec<(String, u16)>,
    /// Addresses of the endpoints that are ready.
    pub ready: Vec<IpAddr>,
}

/// One ready endpoint (address, target port) and the connections this agent has open to it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Shared by every ClusterIP and port that leads here, and kept across updates of the
    /// Service's slices while connections are open.
    open: Arc<AtomicU32>,
}

/// What a connect to a ClusterIP and port resolves to.
#[derive(Debug, Clone)]
pub struct ServiceTarget {
    pub service: Arc<ServiceName>,
    /// Empty when the Service has no ready endpoint for the port.
    pub endpoints: Arc<[Endpoint]>,
}

impl ServiceTarget {
    /// Picks an endpoint for a new connection, and counts it open until the lease is dropped.
    ///
    /// Power of two choices: two endpoints drawn at random, the one with fewer open connections
    /// taken. Every agent decides alone, with no view of the others' connections; random draws
    /// keep agents from herding onto one endpoint, and comparing two keeps a slow endpoint
    /// (whose connections pile up) from getting its full share, at a cost that does not grow
    /// with the number of endpoints. Two racing picks may both see the same counts; the
    /// spread stays even all the same.
    pub fn pick(&self) -> Option<(SocketAddr, EndpointLease)> {
        let endpoints = &self.endpoints;
        let chosen = match endpoints.len() {
            0 => return None,
            1 => &endpoints[0],
            n => {
                let a = fastrand::usize(..n);
                // A second draw among the others.
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let open = |i: usize| endpoints[i].open.load(Ordering::Relaxed);
                if open(b) < open(a) {
                    &endpoints[b]
                } else {
                    &endpoints[a]
                }
            }
        };
        chosen.open.fetch_add(1, Ordering::Relaxed);
        Some((
            chosen.addr,
            EndpointLease {
                open: chosen.open.clone(),
            },
        ))
    }

    /// The endpoints' addresses.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.endpoints.iter().map(|e| e.addr)
    }
}

/// An open connection to an endpoint; dropping it releases its count.
pub struct EndpointLease {
    open: Arc<AtomicU32>,
}

impl Drop for EndpointLease {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct ServiceTable {
    services: HashMap<ServiceName, ServiceFacts>,
    slices: HashMap<ServiceName, BTreeMap<String, SliceFacts>>,
    by_vip: HashMap<SocketAddr, ServiceTarget>,
    /// Each endpoint's open-connection counter, by address (the same pod can back several
    /// Services; its connections count once).
    open: HashMap<SocketAddr, Arc<AtomicU32>>,
}

impl ServiceTable {
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn upsert_service(&mut self, service: ServiceFacts) {
        let name = service.name.clone();
        self.unindex(&name);
        self.services.insert(name.clone(), service);
        self.index(&name);
    }

    pub fn remove_service(&mut self, name: &ServiceName) {
        self.unindex(name);
        self.services.remove(name);
    }

    pub fn upsert_slice(&mut self, slice: SliceFacts) {
        let service = slice.service.clone();
        self.slices
            .entry(service.clone())
            .or_default()
            .insert(slice.name.clone(), slice);
        self.reindex(&service);
    }

    pub fn remove_slice(&mut self, service: &ServiceName, name: &str) {
        if let Some(slices) = self.slices.get_mut(service) {
            slices.remove(name);
            if slices.is_empty() {
                self.slices.remove(service);
            }
        }
        self.reindex(service);
    }

    /// Everything a relist did not see goes: services and slices not in `keep`.
    pub fn retain_services(&mut self, keep: impl Fn(&ServiceName) -> bool) {
        let gone: Vec<ServiceName> = self.services.keys().filter(|n| !keep(n)).cloned().collect();
        for name in gone {
            self.remove_service(&name);
        }
    }

    /// As [`Self::retain_services`], for slices (by service and slice name).
    pub fn retain_slices(&mut self, keep: impl Fn(&ServiceName, &str) -> bool) {
        let gone: Vec<(ServiceName, String)> = self
            .slices
            .iter()
            .flat_map(|(s, slices)| slices.keys().map(move |n| (s.clone(), n.clone())))
            .filter(|(s, n)| !keep(s, n))
            .collect();
        for (service, name) in gone {
            self.remove_slice(&service, &name);
        }
    }

    /// Every slice, for checks over all of them.
    pub fn slices(&self) -> impl Iterator<Item = &SliceFacts> {
        self.slices.values().flat_map(BTreeMap::values)
    }

    /// The Service behind `dst`, if it is a ClusterIP and TCP port of one.
    pub fn resolve(&self, dst: SocketAddr) -> Option<&ServiceTarget> {
        self.by_vip
            .get(&SocketAddr::new(dst.ip().to_canonical(), dst.port()))
    }

    /// Ports of `service` that none of its slices carry (a named `targetPort` no endpoint has).
    pub fn unresolved_ports(&self, service: &ServiceName) -> Vec<String> {
        let Some(s) = self.services.get(service) else {
            return Vec::new();
        };
        let slices = self.slices.get(service);
        s.ports
            .iter()
            .filter(|p| {
                !slices
                    .into_iter()
                    .flat_map(BTreeMap::values)
                    .any(|slice| slice.ports.iter().any(|(n, _)| *n == p.name))
            })
            .map(|p| p.name.clone())
            .collect()
    }

    fn reindex(&mut self, name: &ServiceName) {
        self.unindex(name);
        self.index(name);
    }

    fn unindex(&mut self, name: &ServiceName) {
        let mut dropped = Vec::new();
        if let Some(s) = self.services.get(name) {
            for ip in &s.cluster_ips {
                for p in &s.ports {
                    if let Some(target) = self.by_vip.remove(&SocketAddr::new(*ip, p.port)) {
                        dropped.extend(target.addrs());
                    }
                }
            }
        }
        // A counter nothing refers to any more (no target, no open connection) goes.
        for addr in dropped {
            if self
                .open
                .get(&addr)
                .is_some_and(|c| Arc::strong_count(c) == 1)
            {
                self.open.remove(&addr);
            }
        }
    }

    fn index(&mut self, name: &ServiceName) {
        let Some(s) = self.services.get(name) else {
            return;
        };
        let slices = self.slices.get(name);
        let service = Arc::new(name.clone());
        for ip in &s.cluster_ips {
            for port in &s.ports {
                let mut endpoints: Vec<SocketAddr> = slices
                    .into_iter()
                    .flat_map(BTreeMap::values)
                    .filter(|slice| slice.ipv6 == ip.is_ipv6())
                    .filter_map(|slice| {
                        let (_, target) = slice.ports.iter().find(|(n, _)| *n == port.name)?;
                        Some(slice.ready.iter().map(|a| SocketAddr::new(*a, *target)))
                    })
                    .flatten()
                    .collect();
                endpoints.sort_unstable();
                endpoints.dedup();
                let endpoints: Arc<[Endpoint]> = endpoints
                    .into_iter()
                    .map(|addr| Endpoint {
                        addr,
                        open: self.open.entry(addr).or_default().clone(),
                    })
                    .collect();
                self.by_vip.insert(
                    SocketAddr::new(*ip, port.port),
                    ServiceTarget {
                        service: service.clone(),
                        endpoints,
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> ServiceName {
        ServiceName {
            namespace: "shop".into(),
            name: n.into(),
        }
    }

    fn web() -> ServiceFacts {
        ServiceFacts {
            name: name("web"),
            cluster_ips: vec![
                "10.96.0.10".parse().unwrap(),
                "fd00:96::10".parse().unwrap(),
            ],
            ports: vec![
                ServicePort {
                    port: 80,
                    name: "http".into(),
                },
                ServicePort {
                    port: 9090,
                    name: "metrics".into(),
                },
            ],
        }
    }

    fn slice(n: &str, ipv6: bool, ports: &[(&str, u16)], ready: &[&str]) -> SliceFacts {
        SliceFacts {
            service: name("web"),
            name: n.into(),
            ipv6,
            ports: ports.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
            ready: ready.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn endpoints(t: &ServiceTable, dst: &str) -> Option<Vec<String>> {
        t.resolve(dst.parse().unwrap())
            .map(|r| r.addrs().map(|a| a.to_string()).collect())
    }

    #[test]
    fn a_cluster_ip_resolves_to_the_ready_endpoints_of_its_family_and_port() {
        let mut t = ServiceTable::default();
        t.upsert_service(web());
        assert_eq!(
            endpoints(&t, "10.96.0.10:80"),
            Some(vec![]),
            "no slices yet"
        );
        // Two slices whose pods listen on different numbers for the named port "http".
        t.upsert_slice(slice(
            "web-a",
            false,
            &[("http", 8080)],
            &["10.1.0.1", "10.1.0.2"],
        ));
        t.upsert_slice(slice("web-b", false, &[("http", 8081)], &["10.1.0.3"]));
        t.upsert_slice(slice("web-c", true, &[("http", 8080)], &["fd00:1::1"]));
        assert_eq!(
            endpoints(&t, "10.96.0.10:80").unwrap(),
            ["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8081"]
        );
        assert_eq!(
            endpoints(&t, "[fd00:96::10]:80").unwrap(),
            ["[fd00:1::1]:8080"]
        );
        // An IPv4-mapped IPv6 destination is the IPv4 ClusterIP.
        assert_eq!(endpoints(&t, "[::ffff:10.96.0.10]:80").unwrap().len(), 3);
        // Not a port of the Service, or not a ClusterIP.
        assert_eq!(endpoints(&t, "10.96.0.10:81"), None);
        assert_eq!(endpoints(&t, "10.96.0.11:80"), None);
        // "metrics" is carried by no slice: no endpoints for it, and reported.
        assert_eq!(endpoints(&t, "10.96.0.10:9090"), Some(vec![]));
        assert_eq!(t.unresolved_ports(&name("web")), ["metrics"]);
    }

    #[test]
    fn endpoints_follow_their_slices_and_the_service() {
        let mut t = ServiceTable::default();
        // A slice seen before its Service counts once the Service arrives.
        t.upsert_slice(slice(
            "web-a",
            false,
            &[("http", 8080)],
            &["10.1.0.1", "10.1.0.2"],
        ));
        t.upsert_service(web());
        assert_eq!(endpoints(&t, "10.96.0.10:80").unwrap().len(), 2);
        // An endpoint no longer ready.
        t.upsert_slice(slice("web-a", false, &[("http", 8080)], &["10.1.0.2"]));
        assert_eq!(endpoints(&t, "10.96.0.10:80").unwrap(), ["10.1.0.2:8080"]);
        t.remove_slice(&name("web"), "web-a");
        assert_eq!(endpoints(&t, "10.96.0.10:80"), Some(vec![]));
        // The ClusterIP moves (a Service recreated): the old one is free.
        let mut moved = web();
        moved.cluster_ips = vec!["10.96.0.20".parse().unwrap()];
        t.upsert_service(moved);
        assert_eq!(endpoints(&t, "10.96.0.10:80"), None);
        assert!(endpoints(&t, "10.96.0.20:80").is_some());
        t.retain_services(|_| false);
        assert_eq!(endpoints(&t, "10.96.0.20:80"), None);
        assert_eq!(t.service_count(), 0);
    }

    #[test]
    fn two_choices_spread_connections_and_prefer_the_less_loaded() {
        let mut t = ServiceTable::default();
        t.upsert_service(web());
        let ready = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"];
        t.upsert_slice(slice("web-a", false, &[("http", 8080)], &ready));
        let target = t.resolve("10.96.0.10:80".parse().unwrap()).unwrap().clone();
        let open = |t: &ServiceTable, addr: &str| {
            let addr: SocketAddr = format!("{addr}:8080").parse().unwrap();
            t.open.get(&addr).map_or(0, |c| c.load(Ordering::Relaxed))
        };
        let leases: Vec<_> = (0..400).map(|_| target.pick().unwrap()).collect();
        for ep in ready {
            // Open connections stay even: two choices never let one run far ahead.
            let n = open(&t, ep);
            assert!((90..=110).contains(&n), "{ep}: {n}");
        }
        // A slice update keeps the counts of the endpoints that stay.
        t.upsert_slice(slice("web-a", false, &[("http", 8080)], &ready[1..]));
        assert!(open(&t, "10.1.0.2") >= 90);
        drop(leases);
        drop(target);
        assert!(ready.iter().all(|e| open(&t, e) == 0));
        // An endpoint that leaves with no connection open is forgotten with it.
        t.upsert_slice(slice("web-a", false, &[("http", 8080)], &ready[1..3]));
        assert!(!t.open.contains_key(&"10.1.0.4:8080".parse().unwrap()));

        // With two endpoints, the busier one is never chosen.
        t.upsert_slice(slice("web-a", false, &[("http", 8080)], &ready[..2]));
        let target = t.resolve("10.96.0.10:80".parse().unwrap()).unwrap().clone();
        let held = loop {
            let (addr, lease) = target.pick().unwrap();
            if addr.ip().to_string() == "10.1.0.1" {
                break lease;
            }
        };
        for _ in 0..20 {
            let (chosen, _lease) = target.pick().unwrap();
            assert_eq!(chosen.ip().to_string(), "10.1.0.2");
        }
        drop(held);
        let empty = ServiceTarget {
            service: target.service.clone(),
            endpoints: Arc::new([]),
        };
        assert!(empty.pick().is_none());
    }
}
