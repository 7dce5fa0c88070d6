//! `cargo xtask bench`: the data path benchmark. One run on the bench topology (topology.rs)
//! measures direct TCP, zt same-node, zt cross-node and an HAProxy mutual TLS pair, in
//! interleaved rounds (medians), new connections through a Service ClusterIP beside zt
//! cross-node, then the agents' memory with idle connections, and rewrites BENCHMARKS.md.
//! Every figure is checked: finite and above zero, and each zt path's agents must have relayed
//! the connections measured. The machine is shared and noisy: the ratios, from one run, are what
//! to compare.
use std::{net::SocketAddr, time::Duration};

use zt_tests::Agent;

use super::{
    ensure_measured,
    load::{IDLE_PORT, Latency, Route, connection_rate, idle_memory, iperf, round_trips},
    report::report,
    topology::{CROSS_NODE_ROUTE, SERVICE_NAME, SERVICE_NAMESPACE, ServiceRoute, Topology},
    use_release_binaries,
};

/// How long and how much; `--quick` only proves the bench still produces figures.
pub struct Budget {
    pub rounds: usize,
    pub iperf_seconds: u64,
    pub round_trips: usize,
    pub new_connections: usize,
    pub idle: [usize; 2],
}

pub const FULL: Budget = Budget {
    rounds: 3,
    iperf_seconds: 3,
    round_trips: 20_000,
    new_connections: 1000,
    idle: [1_000, 10_000],
};

pub const QUICK: Budget = Budget {
    rounds: 1,
    iperf_seconds: 1,
    round_trips: 1000,
    new_connections: 50,
    // Enough that the up to 4 MiB the agents keep free at a heap's top (zt-daemon's memory.rs)
    // cannot absorb them: with 100 the server's agent once grew by nothing.
    idle: [1_000, 2_000],
};

#[derive(Clone, Copy)]
pub struct Figures {
    /// Gbit/s received, one stream and eight.
    pub gbit_1: f64,
    pub gbit_8: f64,
    pub rr_64: Latency,
    pub rr_1k: Latency,
    pub conns_per_s: f64,
    /// CPU seconds the path's proxies (agents or HAProxy) spent per GiB of the iperf3 runs.
    pub proxy_cpu_s_per_gib: Option<f64>,
}

/// New connections per second through the Service, every agent of the route relaying them.
fn service_rate_checked(
    bed: &zt_tests::Testbed,
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
    let rate = super::load::churn_rate(bed, route.name, &route.from, route.to, count)?;
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
    ensure_measured(route.name, "new connections/s", rate)?;
    Ok(rate)
}

/// Measures `route` and checks that what was measured is what the figures claim: every figure
/// finite and above zero, and every agent of the route relaying at least the new connections.
fn measure_checked(
    bed: &zt_tests::Testbed,
    agents: &[Agent; 2],
    route: &Route,
    budget: &Budget,
) -> anyhow::Result<Figures> {
    let before = route.relayed(agents)?;
    let figures = measure(bed, route, budget)?;
    route.ensure_relayed(agents, &before, budget.new_connections as u64)?;
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
        ensure_measured(route.name, what, value)?;
    }
    Ok(figures)
}

fn measure(bed: &zt_tests::Testbed, route: &Route, budget: &Budget) -> anyhow::Result<Figures> {
    let cpu_before = route.proxies_cpu()?;
    let (bps_1, bytes_1) = iperf(bed, route, 1, budget.iperf_seconds)?;
    let (bps_8, bytes_8) = iperf(bed, route, 8, budget.iperf_seconds)?;
    let cpu = route.proxies_cpu()? - cpu_before;
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

/// `cargo xtask bench [--quick]`: the release builds, measured (`--quick`: a short run that
/// writes target/bench-quick.md, not BENCHMARKS.md).
pub fn run(quick: bool) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    use_release_binaries()?;
    let budget = if quick { &QUICK } else { &FULL };
    measure_paths(
        budget,
        "`bash scripts/dev.sh bench` (that is, `cargo xtask bench`, as root, release builds)",
        quick,
        started,
    )
}

/// The test suite's smoke: the quick budget on the debug binaries its `cargo build` made. It
/// proves that every path is captured and every figure produced, not what the figures are, so a
/// release build of its own (about ten minutes on two CPUs) would buy it nothing.
pub fn smoke() -> anyhow::Result<()> {
    // Nothing to do when the test suite runs it.
    crate::build_for_tests()?;
    measure_paths(
        &QUICK,
        "the test suite's bench smoke (`cargo xtask test`, as root, debug builds)",
        true,
        std::time::Instant::now(),
    )
}

fn measure_paths(
    budget: &Budget,
    build: &str,
    quick: bool,
    started: std::time::Instant,
) -> anyhow::Result<()> {
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
            if i == CROSS_NODE_ROUTE {
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
        let memory = idle_memory(
            &mut topology.bed,
            [topology.agents[0].pid, topology.agents[1].pid],
            &from,
            to,
            n,
        )?;
        for agent in 0..2 {
            ensure_measured(
                "zt cross-node",
                &format!("node {} agent KiB per idle connection", agent + 1),
                memory.kib_per_connection(agent),
            )?;
        }
        idle.push(memory);
        // The next baseline starts once the agents' allocator gave the freed memory back.
        std::thread::sleep(Duration::from_secs(6));
    }
    let Topology {
        bed,
        routes,
        service,
        cluster,
        ..
    } = topology;
    drop(cluster);
    drop(bed);

    let md = report(
        &routes,
        &results,
        (&service, service_rate),
        &idle,
        budget,
        build,
        started.elapsed(),
    )?;
    let root = crate::workspace_root();
    super::publish(&root, "paths", "bench-quick.md", quick, &md)
}
