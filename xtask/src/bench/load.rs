//! The loads the benchmarks put on a path, run in pods: iperf3 (throughput), `zt-probe rr`
//! (round trips on one warm connection), `zt-probe churn` (new connections) and `zt-probe hold`
//! (idle connections, the agents' RSS sampled while they are open); the servers they talk to;
//! and the check that a zt path's agents really carried what was measured.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use zt_tests::{Agent, Pod, Testbed, probe::Server, read_json_lines, wait_until};

use super::{cpu_seconds, open_fds, placement, rss_kib};

pub const IPERF_PORT: u16 = 5201;
pub const CHURN_PORT: u16 = 9100;
pub const ECHO_PORT: u16 = 9200;
pub const IDLE_PORT: u16 = 9300;

/// One way from the client pod to the server, and the processes carrying it.
pub struct Route {
    pub name: &'static str,
    pub from: Pod,
    /// The address the client dials (the server pod, or HAProxy for the reference pair).
    pub to: IpAddr,
    pub proxies: Vec<u32>,
    /// The agents (indices into the bench's agents) whose relayed-connection counter must rise
    /// while the route is measured: a path that was silently not captured cannot pass as zt.
    pub agents: Vec<usize>,
}

impl Route {
    /// Connections opened so far by each of the route's agents (their Prometheus counter).
    pub fn relayed(&self, agents: &[Agent]) -> anyhow::Result<Vec<u64>> {
        self.agents
            .iter()
            .map(|&a| agents[a].opened_connections())
            .collect()
    }

    /// Fails unless each of the route's agents opened at least `at_least` connections since
    /// `before` (what [`Self::relayed`] returned then).
    pub fn ensure_relayed(
        &self,
        agents: &[Agent],
        before: &[u64],
        at_least: u64,
    ) -> anyhow::Result<()> {
        for ((agent, before), after) in self.agents.iter().zip(before).zip(self.relayed(agents)?) {
            let relayed = after.saturating_sub(*before);
            anyhow::ensure!(
                relayed >= at_least,
                "{}: the agent of node {} relayed {relayed} connections while it was measured, \
                 at least {at_least} expected (not captured?)",
                self.name,
                agent + 1
            );
        }
        Ok(())
    }

    /// CPU seconds the route's proxies have used so far.
    pub fn proxies_cpu(&self) -> anyhow::Result<f64> {
        self.proxies.iter().map(|pid| cpu_seconds(*pid)).sum()
    }
}

/// Starts, in `server` and on the servers' vCPU, what every load dials: a churn server that
/// discards, an echo server for round trips and an iperf3 server.
pub fn start_servers(bed: &mut Testbed, server: &Pod) -> anyhow::Result<()> {
    placement::as_server(|| {
        Server::start_discarding(bed, server, SocketAddr::from(([0, 0, 0, 0], CHURN_PORT)))?;
        let mut echo = bed.pod_command(server, zt_tests::bin_path("zt-probe")?)?;
        echo.args(["echo", "--listen", &format!("0.0.0.0:{ECHO_PORT}")]);
        bed.spawn(echo, &format!("echo-{}.log", server.name))?;
        let mut iperf = bed.pod_command(server, "iperf3")?;
        iperf.args(["-s", "-p", &IPERF_PORT.to_string()]);
        bed.spawn(iperf, &format!("iperf3-{}.log", server.name))?;
        Ok(())
    })
}

/// iperf3 over `route`, on the clients' vCPU; (bits per second received, bytes received).
pub fn iperf(
    bed: &Testbed,
    route: &Route,
    streams: usize,
    seconds: u64,
) -> anyhow::Result<(f64, f64)> {
    let out = placement::as_client(|| {
        bed.pod_command(&route.from, "iperf3")?
            .args(["-c", &route.to.to_string(), "-p", &IPERF_PORT.to_string()])
            .args(["-t", &seconds.to_string(), "-P", &streams.to_string()])
            .args(["--connect-timeout", "3000", "-J"])
            .output()
            .context("running iperf3 (scripts/bootstrap.sh installs it)")
    })?;
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

/// Round-trip times in µs.
#[derive(Clone, Copy)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

/// `count` round trips of `size` bytes on one connection over `route`, on the clients' vCPU.
pub fn round_trips(
    bed: &Testbed,
    route: &Route,
    size: usize,
    count: usize,
) -> anyhow::Result<Latency> {
    let out = placement::as_client(|| {
        bed.pod_command(&route.from, zt_tests::bin_path("zt-probe")?)?
            .args([
                "rr",
                "--to",
                &SocketAddr::new(route.to, ECHO_PORT).to_string(),
            ])
            .args(["--size", &size.to_string(), "--count", &count.to_string()])
            .output()
            .context("running zt-probe rr")
    })?;
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

/// New connections per second over `route`, each one sending 100 bytes and reading the reply.
pub fn connection_rate(bed: &Testbed, route: &Route, count: usize) -> anyhow::Result<f64> {
    churn_rate(
        bed,
        route.name,
        &route.from,
        SocketAddr::new(route.to, CHURN_PORT),
        count,
    )
}

/// As [`connection_rate`], to any address (a Service's ClusterIP).
pub fn churn_rate(
    bed: &Testbed,
    name: &str,
    from: &Pod,
    to: SocketAddr,
    count: usize,
) -> anyhow::Result<f64> {
    let started = std::time::Instant::now();
    let done = placement::as_client(|| zt_tests::probe::churn(bed, from, to, count, 100))?;
    anyhow::ensure!(
        done == count as u64,
        "{name}: {done} of {count} connections completed"
    );
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Agent RSS growth per idle captured connection, for each agent.
pub struct IdleMemory {
    pub connections: usize,
    /// RSS just before the connections opened, and while all of them were open.
    pub baseline_kib: [u64; 2],
    pub held_kib: [u64; 2],
}

impl IdleMemory {
    pub fn kib_per_connection(&self, agent: usize) -> f64 {
        self.held_kib[agent].saturating_sub(self.baseline_kib[agent]) as f64
            / self.connections as f64
    }
}

/// Opens `connections` connections from `from` to `to` through the mesh, each sending 16
/// bytes, and samples both agents while all of them are open and idle. Returns once the agents
/// have closed their side of every one of them.
pub fn idle_memory(
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
    let pid = placement::as_client(|| bed.spawn(hold, &log_name))?;
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
    Ok(IdleMemory {
        connections,
        baseline_kib,
        held_kib,
    })
}
