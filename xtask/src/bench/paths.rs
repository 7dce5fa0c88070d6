//! `cargo xtask bench`: the data path benchmark. One run on the test bed's topology measures
//! direct TCP, zt same-node, zt cross-node and an HAProxy mutual TLS pair, in interleaved rounds
//! (medians), then the agents' memory with idle connections, and rewrites BENCHMARKS.md.
//! Beside zt cross-node, the same new-connections measurement to a Service ClusterIP whose one
//! endpoint is that path's server: the agents resolve it themselves, from a real API server
//! (etcd and kube-apiserver of the test harness) their Kubernetes discovery watches.
//! The machine is shared and noisy: the ratios, from one run, are what to compare.
use std::{fmt::Write as _, net::IpAddr, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::Value;
use zt_tests::{
    Agent, Pod, Testbed,
    agent::{ca_init, meshed_config},
    kube::{
        AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, Cluster, EndpointSliceSpec, ServiceSpec,
        SliceEndpoint,
    },
    node_config::MtlsMode,
    probe::{Server, Tally},
    read_json_lines, wait_until,
};

use super::{cpu_seconds, haproxy::HaproxyPair, open_fds, quiet, rss_kib, use_release_binaries};

const IPERF_PORT: u16 = 5201;
const CHURN_PORT: u16 = 9100;
const ECHO_PORT: u16 = 9200;
const IDLE_PORT: u16 = 9300;

/// How long and how much; `--quick` only proves the bench still produces figures.
struct Budget {
    rounds: usize,
    iperf_seconds: u64,
    round_trips: usize,
    new_connections: usize,
    idle: [usize; 2],
}

const FULL: Budget = Budget {
    rounds: 3,
    iperf_seconds: 3,
    round_trips: 20_000,
    new_connections: 1000,
    idle: [1_000, 10_000],
};

const QUICK: Budget = Budget {
    rounds: 1,
    iperf_seconds: 1,
    round_trips: 1000,
    new_connections: 50,
    idle: [100, 200],
};

#[derive(Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
}

#[derive(Clone, Copy)]
struct Figures {
    /// Gbit/s received, one stream and eight.
    gbit_1: f64,
    gbit_8: f64,
    rr_64: Latency,
    rr_1k: Latency,
    conns_per_s: f64,
    /// CPU seconds the path's proxies (agents or HAProxy) spent per GiB of the iperf3 runs.
    proxy_cpu_s_per_gib: Option<f64>,
}

/// One way from the client pod to the server, and the processes carrying it.
struct Route {
    name: &'static str,
    from: Pod,
    /// The address the client dials (the server pod, or HAProxy for the reference pair).
    to: IpAddr,
    proxies: Vec<u32>,
    /// The agents (indices into `Topology::agents`) whose relayed-connection counter must rise
    /// while the route is measured: a path that was silently not captured cannot pass as zt.
    agents: Vec<usize>,
}

/// New connections to a Service: `to` is its ClusterIP and port, and its one endpoint is the
/// server of the route it is compared with.
struct ServiceRoute {
    name: &'static str,
    from: Pod,
    to: SocketAddr,
    /// As [`Route::agents`].
    agents: Vec<usize>,
}

/// The Service's namespace and name, and its port's name.
const SERVICE_NAMESPACE: &str = "bench";
const SERVICE_NAME: &str = "churn";
const SERVICE_PORT_NAME: &str = "churn";
const SERVICE_PORT: u16 = 80;

/// iperf3 from `route.from`; (bits per second received, bytes received).
fn iperf(bed: &Testbed, route: &Route, streams: usize, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let out = bed
        .pod_command(&route.from, "iperf3")?
        .args(["-c", &route.to.to_string(), "-p", &IPERF_PORT.to_string()])
        .args(["-t", &seconds.to_string(), "-P", &streams.to_string()])
        .args(["--connect-timeout", "3000", "-J"])
        .output()
        .context("running iperf3 (scripts/bootstrap.sh installs it)")?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{}: iperf3 printed no JSON report", route.name))?;
    if let Some(e) = report["error"].as_str() {
        bail!("{}: iperf3 -P {streams}: {e}", route.name);
    }
    let sum = &report["end"]["sum_received"];
    Ok((
        sum["bits_per_second"]
            .as_f64()
            .context("no bits_per_second")?,
        sum["bytes"].as_f64().context("no bytes")?,
    ))
}

fn round_trips(bed: &Testbed, route: &Route, size: usize, count: usize) -> anyhow::Result<Latency> {
    let out = bed
        .pod_command(&route.from, zt_tests::bin_path("zt-probe")?)?
        .args([
            "rr",
            "--to",
            &SocketAddr::new(route.to, ECHO_PORT).to_string(),
        ])
        .args(["--size", &size.to_string(), "--count", &count.to_string()])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{}: zt-probe rr printed no report: {}",
            route.name,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let q = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("rr report has no {k}"))
    };
    Ok(Latency {
        p50: q("p50_us")?,
        p99: q("p99_us")?,
        p999: q("p999_us")?,
    })
}

/// New connections per second, each one sending 100 bytes and reading the reply.
fn connection_rate(bed: &Testbed, route: &Route, count: usize) -> anyhow::Result<f64> {
    churn_rate(
        bed,
        route.name,
        &route.from,
        SocketAddr::new(route.to, CHURN_PORT),
        count,
    )
}

fn churn_rate(
    bed: &Testbed,
    name: &str,
    from: &Pod,
    to: SocketAddr,
    count: usize,
) -> anyhow::Result<f64> {
    let started = std::time::Instant::now();
    let done = zt_tests::probe::churn(bed, from, to, count, 100)?;
    anyhow::ensure!(
        done == count as u64,
        "{name}: {done} of {count} connections completed"
    );
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// New connections per second through the Service, every agent of the route relaying them.
fn service_rate_checked(
    bed: &Testbed,
    agents: &[Agent; 2],
    route: &ServiceRoute,
    count: usize,
) -> anyhow::Result<f64> {
    let counters = || -> anyhow::Result<Vec<u64>> {
        route
            .agents
            .iter()
            .map(|&a| agents[a].opened_connections())
            .collect()
    };
    // The client's agent labels what it resolved with the Service: proof the connections went
    // through the Service, not around it.
    let through_service = || -> anyhow::Result<u64> {
        let label =
            format!("destination_service=\"{SERVICE_NAME}.{SERVICE_NAMESPACE}.svc.cluster.local\"");
        Ok(agents[route.agents[0]]
            .metric_lines("zt_tcp_connections_opened_total")?
            .iter()
            .filter(|l| l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum())
    };
    let (before, resolved_before) = (counters()?, through_service()?);
    let rate = churn_rate(bed, route.name, &route.from, route.to, count)?;
    let resolved = through_service()? - resolved_before;
    anyhow::ensure!(
        resolved >= count as u64,
        "{}: the client's agent resolved {resolved} of {count} connections to the Service",
        route.name
    );
    for (agent, (before, after)) in route.agents.iter().zip(before.iter().zip(counters()?)) {
        anyhow::ensure!(
            after >= before + count as u64,
            "{}: the agent of node {} relayed {} of {count} connections while it was measured",
            route.name,
            agent + 1,
            after - before
        );
    }
    anyhow::ensure!(
        rate.is_finite() && rate > 0.0,
        "{}: new connections/s is {rate}",
        route.name
    );
    Ok(rate)
}

fn proxies_cpu(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|pid| cpu_seconds(*pid)).sum()
}

/// Connections relayed so far by each of the route's agents.
fn relayed(agents: &[Agent; 2], route: &Route) -> anyhow::Result<Vec<u64>> {
    route
        .agents
        .iter()
        .map(|&a| agents[a].opened_connections())
        .collect()
}

/// Measures `route` and checks that what was measured is what the figures claim: every figure
/// finite and above zero, and every agent of the route relaying the connections.
fn measure_checked(
    bed: &Testbed,
    agents: &[Agent; 2],
    route: &Route,
    budget: &Budget,
) -> anyhow::Result<Figures> {
    let before = relayed(agents, route)?;
    let figures = measure(bed, route, budget)?;
    for (agent, (before, after)) in route
        .agents
        .iter()
        .zip(before.iter().zip(relayed(agents, route)?))
    {
        anyhow::ensure!(
            after > *before,
            "{}: the agent of node {} relayed no connection while it was measured (not captured?)",
            route.name,
            agent + 1
        );
    }
    let latencies = [figures.rr_64, figures.rr_1k];
    let mut values = vec![
        ("Gbit/s, 1 stream", figures.gbit_1),
        ("Gbit/s, 8 streams", figures.gbit_8),
        ("new connections/s", figures.conns_per_s),
    ];
    for (size, l) in ["64 B", "1 KiB"].into_iter().zip(latencies) {
        values.extend([(size, l.p50), (size, l.p99), (size, l.p999)]);
    }
    values.extend(figures.proxy_cpu_s_per_gib.map(|c| ("proxy CPU s/GiB", c)));
    for (what, value) in values {
        anyhow::ensure!(
            value.is_finite() && value > 0.0,
            "{}: {what} is {value}, not a measurement",
            route.name
        );
    }
    Ok(figures)
}

fn measure(bed: &Testbed, route: &Route, budget: &Budget) -> anyhow::Result<Figures> {
    let cpu_before = proxies_cpu(&route.proxies)?;
    let (bps_1, bytes_1) = iperf(bed, route, 1, budget.iperf_seconds)?;
    let (bps_8, bytes_8) = iperf(bed, route, 8, budget.iperf_seconds)?;
    let cpu = proxies_cpu(&route.proxies)? - cpu_before;
    let gib = (bytes_1 + bytes_8) / (1u64 << 30) as f64;
    Ok(Figures {
        gbit_1: bps_1 / 1e9,
        gbit_8: bps_8 / 1e9,
        rr_64: round_trips(bed, route, 64, budget.round_trips)?,
        rr_1k: round_trips(bed, route, 1024, budget.round_trips)?,
        conns_per_s: connection_rate(bed, route, budget.new_connections)?,
        proxy_cpu_s_per_gib: (!route.proxies.is_empty()).then_some(cpu / gib),
    })
}

/// Per-figure median over rounds.
fn median(rounds: &[Figures]) -> Figures {
    let mid = |f: &dyn Fn(&Figures) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let lat = |l: fn(&Figures) -> Latency| Latency {
        p50: mid(&|f| l(f).p50),
        p99: mid(&|f| l(f).p99),
        p999: mid(&|f| l(f).p999),
    };
    Figures {
        gbit_1: mid(&|f| f.gbit_1),
        gbit_8: mid(&|f| f.gbit_8),
        rr_64: lat(|f| f.rr_64),
        rr_1k: lat(|f| f.rr_1k),
        conns_per_s: mid(&|f| f.conns_per_s),
        proxy_cpu_s_per_gib: rounds[0]
            .proxy_cpu_s_per_gib
            .map(|_| mid(&|f| f.proxy_cpu_s_per_gib.unwrap_or(0.0))),
    }
}

/// Agent RSS growth per idle captured connection, for each agent.
struct IdleMemory {
    connections: usize,
    baseline_kib: [u64; 2],
    held_kib: [u64; 2],
}

impl IdleMemory {
    fn kib_per_connection(&self, agent: usize) -> f64 {
        self.held_kib[agent].saturating_sub(self.baseline_kib[agent]) as f64
            / self.connections as f64
    }
}

/// Opens `connections` connections from `from` to `to` through the mesh, each sending 16
/// bytes, and samples both agents while all of them are open and idle.
fn idle_memory(
    bed: &mut Testbed,
    agents: [u32; 2],
    from: &Pod,
    to: SocketAddr,
    connections: usize,
) -> anyhow::Result<IdleMemory> {
    let fds_before = [open_fds(agents[0])?, open_fds(agents[1])?];
    let baseline_kib = [rss_kib(agents[0])?, rss_kib(agents[1])?];
    let mut hold = bed.pod_command(from, zt_tests::bin_path("zt-probe")?)?;
    hold.args(["hold", "--to", &to.to_string()])
        .args(["--connections", &connections.to_string()])
        .args(["--churn-per-sec", "0", "--duration-ms", "300000"]);
    let log_name = format!("hold-{connections}.log");
    let pid = bed.spawn(hold, &log_name)?;
    let log = bed.log_path(&log_name);
    wait_until(Duration::from_secs(120), || {
        Ok(read_json_lines(&log)?.iter().any(|e| e["event"] == "held"))
    })
    .context("zt-probe hold never had its connections open")?;
    let held = read_json_lines(&log)?
        .into_iter()
        .find(|e| e["event"] == "held")
        .context("no held event")?;
    anyhow::ensure!(
        held["open"].as_u64() == Some(connections as u64),
        "only {held} of {connections} idle connections opened"
    );
    // The agents finish setting up the last streams.
    std::thread::sleep(Duration::from_secs(2));
    let held_kib = [rss_kib(agents[0])?, rss_kib(agents[1])?];
    bed.kill(pid);
    // Both agents close their side before the next measurement.
    wait_until(Duration::from_secs(60), || {
        Ok(
            open_fds(agents[0])? <= fds_before[0] + 10
                && open_fds(agents[1])? <= fds_before[1] + 10,
        )
    })
    .context("the agents kept the idle connections' descriptors")?;
    // The agents return freed memory every 5 s: the next baseline starts from a trimmed heap.
    std::thread::sleep(Duration::from_secs(6));
    Ok(IdleMemory {
        connections,
        baseline_kib,
        held_kib,
    })
}

/// The bench topology with its agents, HAProxy pair and servers running; dropping it removes
/// everything.
struct Topology {
    bed: Testbed,
    /// Agents of node 1 and node 2.
    agents: [Agent; 2],
    /// Direct TCP, zt same-node, zt cross-node, HAProxy pair.
    routes: [Route; 4],
    /// zt cross-node's server behind a Service ClusterIP.
    service: ServiceRoute,
    /// etcd and kube-apiserver, the Service's source (the agents watch it).
    _cluster: Cluster,
}

impl Topology {
    fn start() -> anyhow::Result<Self> {
        let mut bed = Testbed::new(3)?;
        let pod = |n, p| bed.pod(n, p).clone();
        // n1p1 -> n1p3 (same node) and n1p1 -> n2p1 (cross-node) are meshed; n1p2 -> n2p2 is
        // direct TCP, and n1p2 -> HAProxy pair -> n2p2 the reference.
        let (n1p1, n1p2, n1p3, n2p1, n2p2) =
            (pod(1, 1), pod(1, 2), pod(1, 3), pod(2, 1), pod(2, 2));
        let ca = bed.dir.join("ca");
        ca_init(&ca)?;
        let (cluster, service_vip) = start_cluster(&mut bed, &n2p1)?;
        let creds = cluster.agent_kubeconfig(AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT)?;
        // Discovery finds no pod to enroll there: the static entries stay the mesh.
        let no_netns = bed.dir.join("netns-none");
        std::fs::create_dir_all(&no_netns)?;
        let limits = format!(
            "[limits]\nmax_connections_per_workload = 25000\n\
             [discovery.kubernetes]\nenabled = true\nkubeconfig = \"{}\"\nnetns_dir = \"{}\"\n",
            creds.kubeconfig.display(),
            no_netns.display()
        );
        let config = |n, enrolled: &[&Pod], remote: &[&Pod]| {
            let config = meshed_config(bed.node(n), enrolled, remote, &ca, MtlsMode::Strict);
            quiet(&config.to_string()) + &limits
        };
        let (c1, c2) = (
            config(1, &[&n1p1, &n1p3], &[&n2p1]),
            config(2, &[&n2p1], &[&n1p1, &n1p3]),
        );
        let a1 = Agent::start_with_config(&mut bed, 1, &c1)?;
        let a2 = Agent::start_with_config(&mut bed, 2, &c2)?;
        let haproxy =
            HaproxyPair::start(&mut bed, &ca, &[IPERF_PORT, CHURN_PORT, ECHO_PORT], &n2p2)?;
        for server in [&n1p3, &n2p1, &n2p2] {
            Server::start_discarding(
                &mut bed,
                server,
                SocketAddr::from(([0, 0, 0, 0], CHURN_PORT)),
            )?;
            let mut echo = bed.pod_command(server, zt_tests::bin_path("zt-probe")?)?;
            echo.args(["echo", "--listen", &format!("0.0.0.0:{ECHO_PORT}")]);
            bed.spawn(echo, &format!("echo-{}.log", server.name))?;
            let mut iperf = bed.pod_command(server, "iperf3")?;
            iperf.args(["-s", "-p", &IPERF_PORT.to_string()]);
            bed.spawn(iperf, &format!("iperf3-{}.log", server.name))?;
        }
        Tally::start(&mut bed, &n2p1, SocketAddr::from(([0, 0, 0, 0], IDLE_PORT)))?;
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
                name: "zt same-node",
                from: n1p1.clone(),
                to: n1p3.ipv4.into(),
                proxies: vec![a1.pid],
                agents: vec![0],
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
            _cluster: cluster,
        })
    }

    fn cross_node(&self) -> &Route {
        &self.routes[2]
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

pub fn run(quick: bool) -> anyhow::Result<()> {
    let budget = if quick { &QUICK } else { &FULL };
    let started = std::time::Instant::now();
    use_release_binaries()?;
    let mut topology = Topology::start()?;

    // Interleaved rounds, medians: one round of any path can be off by a factor of two here.
    let mut rounds: Vec<Vec<Figures>> = vec![Vec::new(); topology.routes.len()];
    let mut service_rounds = Vec::new();
    for round in 1..=budget.rounds {
        for (i, (route, figures)) in topology.routes.iter().zip(&mut rounds).enumerate() {
            println!("round {round}/{}: {}", budget.rounds, route.name);
            figures.push(measure_checked(
                &topology.bed,
                &topology.agents,
                route,
                budget,
            )?);
            // Right after zt cross-node, whose last figure is its own new connections.
            if i == 2 {
                let service = &topology.service;
                println!("round {round}/{}: {}", budget.rounds, service.name);
                service_rounds.push(service_rate_checked(
                    &topology.bed,
                    &topology.agents,
                    service,
                    budget.new_connections,
                )?);
            }
        }
    }
    let results: Vec<Figures> = rounds.iter().map(|r| median(r)).collect();
    service_rounds.sort_by(|a, b| a.total_cmp(b));
    let service_rate = service_rounds[service_rounds.len() / 2];
    let mut idle = Vec::new();
    let (from, to) = (
        topology.cross_node().from.clone(),
        SocketAddr::new(topology.cross_node().to, IDLE_PORT),
    );
    for n in budget.idle {
        println!("idle: {n} connections {} -> {to}", from.name);
        idle.push(idle_memory(
            &mut topology.bed,
            [topology.agents[0].pid, topology.agents[1].pid],
            &from,
            to,
            n,
        )?);
    }
    let Topology {
        bed,
        routes,
        service,
        _cluster,
        ..
    } = topology;
    drop(_cluster);
    drop(bed);

    let md = report(
        &routes,
        &results,
        (&service, service_rate),
        &idle,
        budget,
        started.elapsed(),
    )?;
    let root = crate::workspace_root();
    if quick {
        let out = super::target_dir(&root).join("bench-quick.md");
        std::fs::write(&out, &md)?;
        println!(
            "\n{md}\n(--quick: written to {}, not BENCHMARKS.md)",
            out.display()
        );
    } else {
        super::write_section(&root, "paths", &md)?;
        println!("\n{md}");
    }
    Ok(())
}

/// `cargo xtask bench profile`: system-wide `perf record` (call graphs) of zt cross-node during
/// one iperf3 stream, 1 KiB round trips and new connections; prints where the agents' time goes
/// and leaves the recordings in target/ for `perf report -i`.
pub fn profile() -> anyhow::Result<()> {
    use_release_binaries()?;
    let topology = Topology::start()?;
    let route = topology.cross_node();
    let target = crate::workspace_root().join("target");
    let pids = topology
        .agents
        .iter()
        .map(|a| a.pid.to_string())
        .collect::<Vec<_>>()
        .join(",");
    type Workload<'a> = Box<dyn Fn() -> anyhow::Result<()> + 'a>;
    let bed = &topology.bed;
    let workloads: [(&str, Workload); 3] = [
        (
            "throughput",
            Box::new(|| iperf(bed, route, 1, 10).map(|_| ())),
        ),
        (
            "rr",
            Box::new(|| round_trips(bed, route, 1024, 50_000).map(|_| ())),
        ),
        (
            "connections",
            Box::new(|| connection_rate(bed, route, 3000).map(|_| ())),
        ),
    ];
    for (name, workload) in workloads {
        let data = target.join(format!("profile-{name}.data"));
        let mut perf = std::process::Command::new("perf")
            .args(["record", "-a", "-g", "-e", "cpu-clock", "-o"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("running perf (Debian: linux-perf)")?;
        std::thread::sleep(Duration::from_millis(500));
        let outcome = workload();
        // SIGINT: perf writes the recording and exits.
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
        perf.wait()?;
        outcome?;
        for sort in ["comm,dso", "sym"] {
            let report = std::process::Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "--percent-limit",
                    "1.5",
                ])
                .args(["--sort", sort, "-g", "none", "-i"])
                .arg(&data)
                .args(if sort == "sym" {
                    vec!["--pid", &pids]
                } else {
                    vec![]
                })
                .output()?;
            println!(
                "== {name}: by {sort}{} ==\n{}",
                if sort == "sym" { " (agents only)" } else { "" },
                String::from_utf8_lossy(&report.stdout)
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        println!("(recording: {})\n", data.display());
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{} vCPUs ({cpu}), kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    )
}

fn holds(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

fn report(
    routes: &[Route],
    results: &[Figures],
    (service, service_rate): (&ServiceRoute, f64),
    idle: &[IdleMemory],
    budget: &Budget,
    took: Duration,
) -> anyhow::Result<String> {
    let [direct, _same_node, cross, haproxy] = results else {
        bail!("four paths expected");
    };
    let mut md = String::new();
    writeln!(md, "## Data path (issue 8)\n")?;
    writeln!(
        md,
        "Produced by `bash scripts/dev.sh bench` (that is, `cargo xtask bench`, as root, release \
         builds) in {:.1} minutes.  \nMachine: {}; shared and noisy, so compare the ratios, which \
         come from one run ({} interleaved rounds, medians).\n",
        took.as_secs_f64() / 60.0,
        machine(),
        budget.rounds
    )?;
    writeln!(
        md,
        "Topology: two node namespaces joined by a veth pair, pods on bridges.\n\
         - direct TCP: pod n1p2 to pod n2p2, neither enrolled;\n\
         - zt same-node: n1p1 to n1p3, both enrolled on node 1 (one agent);\n\
         - zt cross-node: n1p1 to n2p1, captured by eBPF on both nodes and carried over a pooled \
         HBONE connection (HTTP/2 CONNECT over mutual TLS 1.3, rustls with aws-lc-rs, P-256);\n\
         - HAProxy mTLS pair: n1p2 dials node 1's HAProxy (TCP mode), which opens mutual TLS 1.3 \
         (OpenSSL, P-256 certificates from the zt CA, TLS session reuse on) to HAProxy on node 2, \
         which forwards to n2p2: the same three TCP hops as zt cross-node, one TLS connection per \
         client connection.\n"
    )?;
    writeln!(
        md,
        "Tools: iperf3 for throughput ({} s per run, 1 and 8 streams); `zt-probe rr` for request/\
         response on one warm connection ({} round trips per size); `zt-probe churn` for new \
         connections ({} sequential connections, each sending 100 bytes and reading the reply); \
         CPU from /proc/PID/stat of the path's proxies during the iperf3 runs.\n",
        budget.iperf_seconds, budget.round_trips, budget.new_connections
    )?;
    writeln!(
        md,
        "| path | 1 stream Gbit/s | 8 streams Gbit/s | 64 B RR p50 / p99 / p99.9 µs | 1 KiB RR p50 / p99 / p99.9 µs | new connections/s | proxy CPU s per GiB |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    let lat = |l: &Latency| format!("{:.0} / {:.0} / {:.0}", l.p50, l.p99, l.p999);
    for (route, f) in routes.iter().zip(results) {
        writeln!(
            md,
            "| {} | {:.2} | {:.2} | {} | {} | {:.0} | {} |",
            route.name,
            f.gbit_1,
            f.gbit_8,
            lat(&f.rr_64),
            lat(&f.rr_1k),
            f.conns_per_s,
            f.proxy_cpu_s_per_gib
                .map_or("-".to_owned(), |c| format!("{c:.2}"))
        )?;
    }
    writeln!(
        md,
        "\n| path | 1 stream ÷ direct | 1 stream ÷ HAProxy | 8 streams ÷ direct | added 1 KiB p50 / p99 µs | new conns ÷ direct | new conns ÷ HAProxy |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    for (route, f) in routes.iter().zip(results).skip(1) {
        writeln!(
            md,
            "| {} | {:.2}× | {:.2}× | {:.2}× | {:+.0} / {:+.0} | {:.2}× | {:.2}× |",
            route.name,
            f.gbit_1 / direct.gbit_1,
            f.gbit_1 / haproxy.gbit_1,
            f.gbit_8 / direct.gbit_8,
            f.rr_1k.p50 - direct.rr_1k.p50,
            f.rr_1k.p99 - direct.rr_1k.p99,
            f.conns_per_s / direct.conns_per_s,
            f.conns_per_s / haproxy.conns_per_s,
        )?;
    }
    writeln!(
        md,
        "\nThrough a Service: {} (n1p1 dials {}, a ClusterIP whose EndpointSlice holds n2p1; \
         the agents resolve it from the API server they watch), the same {} sequential new \
         connections, measured right after zt cross-node's in each round:\n",
        service.name, service.to, budget.new_connections
    )?;
    writeln!(
        md,
        "| path | new connections/s | ÷ zt cross-node to the pod IP |"
    )?;
    writeln!(md, "| --- | ---: | ---: |")?;
    writeln!(
        md,
        "| {} | {service_rate:.0} | {:.2}× |",
        service.name,
        service_rate / cross.conns_per_s
    )?;
    writeln!(
        md,
        "\nAgent memory with idle captured connections (n1p1 to n2p1, each connection sent 16 \
         bytes and stays open; RSS from /proc, growth over the agent's RSS just before):\n"
    )?;
    writeln!(
        md,
        "| idle connections | node 1 agent RSS MiB | per connection KiB | node 2 agent RSS MiB | per connection KiB |"
    )?;
    writeln!(md, "| ---: | ---: | ---: | ---: | ---: |")?;
    for m in idle {
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            m.connections,
            m.held_kib[0] as f64 / 1024.0,
            m.kib_per_connection(0),
            m.held_kib[1] as f64 / 1024.0,
            m.kib_per_connection(1)
        )?;
    }
    let largest = idle.last().context("no idle measurement")?;
    let per_conn = largest
        .kib_per_connection(0)
        .max(largest.kib_per_connection(1));
    let (thr_direct, thr_haproxy) = (cross.gbit_1 / direct.gbit_1, cross.gbit_1 / haproxy.gbit_1);
    let added_p50 = cross.rr_1k.p50 - direct.rr_1k.p50;
    let added_p99 = cross.rr_1k.p99 - direct.rr_1k.p99;
    let conns = cross.conns_per_s / direct.conns_per_s;
    let via_service = service_rate / cross.conns_per_s;
    writeln!(
        md,
        "\n| target (issue 8, zt cross-node, same run) | value | holds |"
    )?;
    writeln!(md, "| --- | ---: | --- |")?;
    writeln!(
        md,
        "| single stream ≥ 0.45× direct TCP | {thr_direct:.2}× | {} |",
        holds(thr_direct >= 0.45)
    )?;
    writeln!(
        md,
        "| single stream ≥ 1.0× HAProxy pair | {thr_haproxy:.2}× | {} |",
        holds(thr_haproxy >= 1.0)
    )?;
    writeln!(
        md,
        "| added 1 KiB p50 ≤ 70 µs (warm pool) | {added_p50:.0} µs | {} |",
        holds(added_p50 <= 70.0)
    )?;
    writeln!(
        md,
        "| added 1 KiB p99 ≤ 2 × added p50 | {added_p99:.0} µs | {} |",
        holds(added_p99 <= 2.0 * added_p50.max(0.0))
    )?;
    writeln!(
        md,
        "| new connections/s ≥ 0.5× direct | {conns:.2}× | {} |",
        holds(conns >= 0.5)
    )?;
    writeln!(
        md,
        "| new connections/s through a Service ≥ 0.95× to the pod IP (issue 17) | {via_service:.2}× | {} |",
        holds(via_service >= 0.95)
    )?;
    writeln!(
        md,
        "| RSS ≤ 20 KiB per idle connection at {} | {per_conn:.1} KiB | {} |",
        largest.connections,
        holds(per_conn <= 20.0)
    )?;
    Ok(md)
}
