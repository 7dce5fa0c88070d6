//! The data path bench's topology: two nodes with an agent each, pods meshed same-node and
//! cross-node, two pods left out for direct TCP, an HAProxy mutual TLS pair between those, the
//! servers every load dials, and a Service ClusterIP in front of the cross-node server, which the
//! agents resolve themselves from a real API server (etcd and kube-apiserver of the test harness)
//! their Kubernetes discovery watches.
use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use serde_json::Value;
use zt_tests::{
    Agent, Pod, Testbed,
    agent::ca_init,
    kube::{
        AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, Cluster, EndpointSliceSpec, ServiceSpec,
        SliceEndpoint,
    },
    probe::Tally,
    wait_until,
};

use super::{
    haproxy::HaproxyPair,
    load::{CHURN_PORT, ECHO_PORT, IDLE_PORT, IPERF_PORT, Route, start_servers},
    mesh_config, placement,
};

/// New connections to a Service: `to` is its ClusterIP and port, and its one endpoint is the
/// server of the route it is compared with.
pub struct ServiceRoute {
    pub name: &'static str,
    pub from: Pod,
    pub to: SocketAddr,
    /// As [`Route::agents`].
    pub agents: Vec<usize>,
}

/// The Service's namespace and name, and its port's name.
pub const SERVICE_NAMESPACE: &str = "bench";
pub const SERVICE_NAME: &str = "churn";
const SERVICE_PORT_NAME: &str = "churn";
const SERVICE_PORT: u16 = 80;

/// The bench topology with its agents, HAProxy pair and servers running; dropping it removes
/// everything.
pub struct Topology {
    pub bed: Testbed,
    /// Agents of node 1 and node 2.
    pub agents: [Agent; 2],
    /// In the order [`CROSS_NODE_ROUTE`] names.
    pub routes: [Route; 6],
    /// zt cross-node's server behind a Service ClusterIP.
    pub service: ServiceRoute,
    /// etcd and kube-apiserver, the Service's source (the agents watch it).
    pub cluster: Cluster,
}

/// Where zt cross-node is in `Topology::routes`, whose order (measured and reported) is: direct
/// TCP, direct TCP same-node, zt same-node over HBONE, zt same-node direct, zt cross-node,
/// HAProxy pair.
const DIRECT_ROUTE: usize = 0;
pub const CROSS_NODE_ROUTE: usize = 4;
/// Where the HAProxy pair is in `Topology::routes`.
pub const HAPROXY_ROUTE: usize = 5;

impl Topology {
    pub fn start() -> anyhow::Result<Self> {
        let mut bed = Testbed::new(4)?;
        let pod = |n, p| bed.pod(n, p).clone();
        // n1p1 -> n1p3 (same node, HBONE: node 1 keeps TLS for same-node connections),
        // n2p3 -> n2p1 (same node, direct: node 2 lets them connect pod to pod once allowed) and
        // n1p1 -> n2p1 (cross-node)
        // are meshed; n1p2 -> n2p2 and n2p2 -> n2p4 are direct TCP across and within a node, and
        // n1p2 -> HAProxy pair -> n2p2 the reference.
        let (n1p1, n1p2, n1p3, n2p1, n2p2, n2p3, n2p4) = (
            pod(1, 1),
            pod(1, 2),
            pod(1, 3),
            pod(2, 1),
            pod(2, 2),
            pod(2, 3),
            pod(2, 4),
        );
        let ca = bed.dir.join("ca");
        ca_init(&ca)?;
        let (cluster, service_vip) = start_cluster(&mut bed, &n2p1)?;
        let creds = cluster.agent_kubeconfig(AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT)?;
        // Discovery finds no pod to enroll there: the static entries stay the mesh.
        let no_netns = bed.dir.join("netns-none");
        std::fs::create_dir_all(&no_netns)?;
        let discovery = format!(
            "[discovery.kubernetes]\nenabled = true\nkubeconfig = \"{}\"\nnetns_dir = \"{}\"\n",
            creds.kubeconfig.display(),
            no_netns.display()
        );
        let config = |n, enrolled: &[&Pod], remote: &[&Pod], same_node| {
            mesh_config(&bed, n, enrolled, remote, &ca, same_node) + &discovery
        };
        let (c1, c2) = (
            config(1, &[&n1p1, &n1p3], &[&n2p1, &n2p3], "tunnel"),
            config(2, &[&n2p1, &n2p3], &[&n1p1, &n1p3], "direct"),
        );
        let a1 = Agent::start_with_config(&mut bed, 1, &c1)?;
        let a2 = Agent::start_with_config(&mut bed, 2, &c2)?;
        let haproxy =
            HaproxyPair::start(&mut bed, &ca, &[IPERF_PORT, CHURN_PORT, ECHO_PORT], &n2p2)?;
        for server in [&n1p3, &n2p1, &n2p2, &n2p4] {
            start_servers(&mut bed, server)?;
        }
        placement::as_server(|| {
            Tally::start(&mut bed, &n2p1, SocketAddr::from(([0, 0, 0, 0], IDLE_PORT)))
        })?;
        std::thread::sleep(Duration::from_millis(300));
        let service = ServiceRoute {
            name: "zt cross-node via Service ClusterIP",
            from: n1p1.clone(),
            to: service_vip,
            agents: vec![0, 1],
        };
        wait_resolved(&bed, &a1, &service)?;
        let routes = [
            Route {
                name: "direct TCP",
                from: n1p2.clone(),
                to: n2p2.ipv4.into(),
                proxies: vec![],
                agents: vec![],
            },
            Route {
                name: "direct TCP same-node",
                from: n2p2.clone(),
                to: n2p4.ipv4.into(),
                proxies: vec![],
                agents: vec![],
            },
            Route {
                name: "zt same-node, HBONE",
                from: n1p1.clone(),
                to: n1p3.ipv4.into(),
                proxies: vec![a1.pid],
                agents: vec![0],
            },
            // The kernel moves the bytes pod to pod, not a proxy process: no proxy CPU figure.
            Route {
                name: "zt same-node, direct",
                from: n2p3,
                to: n2p1.ipv4.into(),
                proxies: vec![],
                agents: vec![1],
            },
            Route {
                name: "zt cross-node",
                from: n1p1,
                to: n2p1.ipv4.into(),
                proxies: vec![a1.pid, a2.pid],
                agents: vec![0, 1],
            },
            Route {
                name: "HAProxy mTLS pair",
                from: n1p2,
                to: super::haproxy::OUTBOUND_ADDR,
                proxies: haproxy.pids.to_vec(),
                agents: vec![],
            },
        ];
        Ok(Self {
            bed,
            agents: [a1, a2],
            routes,
            service,
            cluster,
        })
    }

    pub fn direct(&self) -> &Route {
        let route = &self.routes[DIRECT_ROUTE];
        assert_eq!(route.name, "direct TCP", "DIRECT_ROUTE is stale");
        route
    }

    pub fn cross_node(&self) -> &Route {
        let route = &self.routes[CROSS_NODE_ROUTE];
        assert_eq!(route.name, "zt cross-node", "CROSS_NODE_ROUTE is stale");
        route
    }

    pub fn haproxy(&self) -> &Route {
        let route = &self.routes[HAPROXY_ROUTE];
        assert_eq!(route.name, "HAProxy mTLS pair", "HAPROXY_ROUTE is stale");
        route
    }

    /// After the agents restarted: each zt route whose agents are its proxies counts the new
    /// processes' CPU.
    pub fn agents_restarted(&mut self) {
        for route in &mut self.routes {
            if !route.proxies.is_empty() && !route.agents.is_empty() {
                route.proxies = route.agents.iter().map(|&i| self.agents[i].pid).collect();
            }
        }
    }
}

/// Starts etcd and kube-apiserver with deploy/ applied (the agents' RBAC), and a Service
/// (ClusterIP from the API server's range) whose EndpointSlice holds `server`'s churn port, as
/// the EndpointSlice controller would write it. Returns the cluster and the ClusterIP and port.
fn start_cluster(bed: &mut Testbed, server: &Pod) -> anyhow::Result<(Cluster, SocketAddr)> {
    let started = std::time::Instant::now();
    let cluster = Cluster::start(bed)?;
    cluster.apply_deploy()?;
    cluster.create_namespace(SERVICE_NAMESPACE, &[])?;
    let vip = cluster.apply_service(&ServiceSpec::new(SERVICE_NAMESPACE, SERVICE_NAME).port(
        SERVICE_PORT_NAME,
        SERVICE_PORT,
        &CHURN_PORT.to_string(),
    ))?[0];
    cluster.apply_endpoint_slice(
        &EndpointSliceSpec::new(
            SERVICE_NAMESPACE,
            &format!("{SERVICE_NAME}-x7k2p"),
            SERVICE_NAME,
            false,
        )
        .port(SERVICE_PORT_NAME, CHURN_PORT)
        .endpoint(SliceEndpoint::ready(server.ipv4.into())),
    )?;
    println!(
        "API server up, Service {SERVICE_NAMESPACE}/{SERVICE_NAME} at {vip}:{SERVICE_PORT} -> {}:{CHURN_PORT} ({:.1} s)",
        server.ipv4,
        started.elapsed().as_secs_f64()
    );
    Ok((cluster, SocketAddr::new(vip, SERVICE_PORT)))
}

/// Waits until the client's agent knows the Service and a connection to it goes through.
fn wait_resolved(bed: &Testbed, client_agent: &Agent, route: &ServiceRoute) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    wait_until(Duration::from_secs(60), || {
        let (status, body) = client_agent.admin("GET", "/config_dump")?;
        let dump: Value = serde_json::from_str(&body).unwrap_or_default();
        Ok(status == 200 && dump["mesh_directory"]["services"].as_u64() >= Some(1))
    })
    .with_context(|| {
        format!(
            "the agent never learned of the Service\n{}",
            client_agent.log_tail()
        )
    })?;
    // Its EndpointSlice may come a moment later.
    wait_until(Duration::from_secs(60), || {
        Ok(zt_tests::probe::churn(bed, &route.from, route.to, 1, 100).unwrap_or(0) == 1)
    })
    .with_context(|| format!("{}: no connection went through", route.name))?;
    println!(
        "{} resolved by the agent ({:.1} s)",
        route.name,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
