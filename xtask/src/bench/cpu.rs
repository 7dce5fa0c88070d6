//! `cargo xtask bench cpu`: what the proxies spend per byte on zt cross-node against the HAProxy
//! mTLS pair (issue 20): CPU seconds per GiB over rounds of iperf3 (1 and 8 streams, as the data
//! path bench counts it), then the system calls each proxy makes per MiB during one more stream,
//! counted by `perf stat` on syscall tracepoints. Each round also times new connections on zt
//! cross-node against direct TCP's in the same round. Only these paths run, so a data path change
//! is measured in minutes; `--compare DIR` measures another build (e.g. main's) in the same run,
//! in turn with this one. Compare ratios to HAProxy from one run, never the seconds.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Context as _;
use zt_tests::{Agent, wait_until};

use super::{
    ensure_measured,
    load::{Route, connection_rate, iperf},
    machine,
    topology::Topology,
    use_release_binaries,
};

/// The syscalls counted, in the report's groups: reads (TCP and TLS), writes, waits for
/// readiness, thread wake-ups.
const READS: &[&str] = &["read", "readv", "recvfrom", "recvmsg"];
const WRITES: &[&str] = &["write", "writev", "sendto", "sendmsg"];
const WAITS: &[&str] = &["epoll_wait", "epoll_pwait"];
const WAKES: &[&str] = &["futex"];

pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    /// Other builds' zt-daemon and zt-probe (e.g. main's), measured in the same run: each round
    /// restarts the agents with each build in turn, beside the same HAProxy pair. A zt-daemon
    /// there may be a script that sets the environment and `exec`s a binary (same PID).
    pub compare: Vec<PathBuf>,
}

/// Syscalls one proxy made while `bytes` crossed it.
struct Syscalls {
    total: f64,
    reads: f64,
    writes: f64,
    waits: f64,
    wakes: f64,
    /// Page faults and context switches (software events) in the same run.
    faults: f64,
    switches: f64,
    /// What the counts are per: bytes relayed, or connections made.
    units: f64,
}

/// Sequential new connections per round and path, as many as the data path bench makes.
const NEW_CONNECTIONS: usize = super::paths::FULL.new_connections;

/// What one path measured: CPU s/GiB, 1-stream Gbit/s and new connections/s per round, syscalls
/// once.
#[derive(Default)]
struct Measured {
    per_gib: Vec<f64>,
    gbit: Vec<f64>,
    conns: Vec<f64>,
    /// The proxies' CPU µs per new connection, per round.
    conn_cpu_us: Vec<f64>,
    syscalls: Vec<Syscalls>,
    connection_syscalls: Vec<Syscalls>,
}

/// Proxy CPU seconds per GiB over iperf3 with 1 then 8 streams, and the 1-stream Gbit/s.
fn cpu_per_gib(bed: &zt_tests::Testbed, route: &Route, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let before = route.proxies_cpu()?;
    let (bps_1, bytes_1) = iperf(bed, route, 1, seconds)?;
    let (_, bytes_8) = iperf(bed, route, 8, seconds)?;
    let cpu = route.proxies_cpu()? - before;
    let value = cpu / ((bytes_1 + bytes_8) / (1u64 << 30) as f64);
    ensure_measured(route.name, "proxy CPU s/GiB", value)?;
    Ok((value, bps_1 / 1e9))
}

/// Stops both agents and starts them again, with the same configs, from the binaries in `dir`.
fn restart_agents(topology: &mut Topology, dir: &Path) -> anyhow::Result<()> {
    // SAFETY: single-threaded; the test bed reads it when it starts an agent.
    unsafe { std::env::set_var("ZT_BIN_DIR", dir) };
    for agent in &topology.agents {
        agent.signal(nix::sys::signal::Signal::SIGTERM)?;
    }
    for agent in &topology.agents {
        wait_until(Duration::from_secs(30), || {
            Ok(topology.bed.exited(agent.pid))
        })
        .with_context(|| format!("agent of {} did not exit", agent.node.name))?;
    }
    for n in 0..2 {
        let config = std::fs::read_to_string(&topology.agents[n].config)?;
        topology.agents[n] = Agent::start_with_config(&mut topology.bed, n + 1, config)?;
    }
    topology.agents_restarted();
    Ok(())
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    use_release_binaries()?;
    let this_build = PathBuf::from(std::env::var_os("ZT_BIN_DIR").context("no ZT_BIN_DIR")?);
    let mut builds = vec![("this build".to_owned(), this_build)];
    builds.extend(
        options
            .compare
            .iter()
            .map(|dir| (dir.display().to_string(), dir.clone())),
    );
    let mut topology = Topology::start()?;
    let mut running = 0;
    let mut zt: Vec<Measured> = builds.iter().map(|_| Measured::default()).collect();
    let mut haproxy = Measured::default();
    let mut direct = Measured::default();
    for round in 1..=options.rounds {
        println!("round {round}/{}: direct TCP", options.rounds);
        direct.conns.push(connection_rate(
            &topology.bed,
            topology.direct(),
            NEW_CONNECTIONS,
        )?);
        // Rotate which build goes first, so none always follows HAProxy.
        let mut order: Vec<usize> = (0..builds.len()).collect();
        order.rotate_left(round % builds.len());
        for b in order {
            if b != running {
                restart_agents(&mut topology, &builds[b].1)?;
                running = b;
            }
            println!(
                "round {round}/{}: zt cross-node, {}",
                options.rounds, builds[b].0
            );
            let route = topology.cross_node();
            let (per_gib, gbit) = cpu_per_gib(&topology.bed, route, options.seconds)?;
            zt[b].per_gib.push(per_gib);
            zt[b].gbit.push(gbit);
            let before = route.proxies_cpu()?;
            zt[b]
                .conns
                .push(connection_rate(&topology.bed, route, NEW_CONNECTIONS)?);
            let cpu = route.proxies_cpu()? - before;
            zt[b].conn_cpu_us.push(cpu * 1e6 / NEW_CONNECTIONS as f64);
        }
        let route = topology.haproxy();
        println!("round {round}/{}: {}", options.rounds, route.name);
        let (per_gib, gbit) = cpu_per_gib(&topology.bed, route, options.seconds)?;
        haproxy.per_gib.push(per_gib);
        haproxy.gbit.push(gbit);
    }
    for b in (0..builds.len()).rev() {
        if b != running {
            restart_agents(&mut topology, &builds[b].1)?;
            running = b;
        }
        println!("syscalls: zt cross-node, {}", builds[b].0);
        zt[b].syscalls = count_syscalls(&topology.bed, topology.cross_node(), options.seconds)?;
        zt[b].connection_syscalls =
            count_connection_syscalls(&topology.bed, topology.cross_node())?;
    }
    println!("syscalls: HAProxy");
    haproxy.syscalls = count_syscalls(&topology.bed, topology.haproxy(), options.seconds)?;
    let md = report(options, &builds, &zt, &haproxy, &direct, started)?;
    println!("\n{md}");
    Ok(())
}

/// One iperf3 stream over `route` with `perf stat` counting each proxy's syscalls.
fn count_syscalls(
    bed: &zt_tests::Testbed,
    route: &Route,
    seconds: u64,
) -> anyhow::Result<Vec<Syscalls>> {
    count_syscalls_during(route, || Ok(iperf(bed, route, 1, seconds)?.1))
}

/// `NEW_CONNECTIONS` sequential new connections over `route`, each proxy's syscalls counted;
/// `units` is then the count of connections, not bytes.
fn count_connection_syscalls(
    bed: &zt_tests::Testbed,
    route: &Route,
) -> anyhow::Result<Vec<Syscalls>> {
    count_syscalls_during(route, || {
        connection_rate(bed, route, NEW_CONNECTIONS)?;
        Ok(NEW_CONNECTIONS as f64)
    })
}

/// `perf stat` counts each of `route`'s proxies' syscalls while `work` runs; `work` returns the
/// units they are per (bytes relayed, connections made).
fn count_syscalls_during(
    route: &Route,
    work: impl FnOnce() -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<Syscalls>> {
    let names: Vec<&str> = [READS, WRITES, WAITS, WAKES].concat();
    let mut events: Vec<String> = ["raw_syscalls:sys_enter", "page-faults", "context-switches"]
        .map(String::from)
        .to_vec();
    events.extend(names.iter().map(|n| format!("syscalls:sys_enter_{n}")));
    let dir = std::env::temp_dir();
    let mut perfs = Vec::new();
    for pid in &route.proxies {
        let out = dir.join(format!("zt-bench-syscalls-{pid}.csv"));
        let child = Command::new("perf")
            .args(["stat", "-x", ",", "-e", &events.join(","), "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("running perf (Debian: linux-perf)")?;
        perfs.push((child, out));
    }
    std::thread::sleep(Duration::from_millis(300));
    let outcome = work();
    let mut counted = Vec::new();
    for (mut child, out) in perfs {
        // SIGINT: perf prints its counts and exits.
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait()?;
        let text = std::fs::read_to_string(&out)?;
        let _ = std::fs::remove_file(&out);
        let count = |event: &str| -> f64 {
            text.lines()
                .filter_map(|l| {
                    let fields: Vec<&str> = l.split(',').collect();
                    (fields.get(2) == Some(&event)).then(|| fields[0].parse::<f64>().unwrap_or(0.0))
                })
                .sum()
        };
        let group = |g: &[&str]| -> f64 {
            g.iter()
                .map(|n| count(&format!("syscalls:sys_enter_{n}")))
                .sum()
        };
        counted.push(Syscalls {
            total: count("raw_syscalls:sys_enter"),
            reads: group(READS),
            writes: group(WRITES),
            waits: group(WAITS),
            wakes: group(WAKES),
            faults: count("page-faults"),
            switches: count("context-switches"),
            units: 0.0,
        });
    }
    let units = outcome?;
    for c in &mut counted {
        c.units = units;
        ensure_measured(route.name, "syscalls", c.total)?;
    }
    Ok(counted)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Each round's figure divided by the baseline's figure from the same round.
fn per_round_ratios(values: &[f64], baseline: &[f64]) -> Vec<f64> {
    values.iter().zip(baseline).map(|(v, b)| v / b).collect()
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|v| format!("{v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn report(
    options: &Options,
    builds: &[(String, PathBuf)],
    zt: &[Measured],
    haproxy: &Measured,
    direct: &Measured,
    started: std::time::Instant,
) -> anyhow::Result<String> {
    let mut md = String::new();
    writeln!(
        md,
        "`cargo xtask bench cpu --rounds {} --seconds {}{}` ({:.1} minutes; {}): {} rounds, \
         medians; CPU from /proc/PID/stat of the path's proxies during iperf3 with 1 then 8 \
         streams, {} s each.\n",
        options.rounds,
        options.seconds,
        options
            .compare
            .iter()
            .map(|d| format!(" --compare {}", d.display()))
            .collect::<String>(),
        started.elapsed().as_secs_f64() / 60.0,
        machine(),
        options.rounds,
        options.seconds,
    )?;
    writeln!(
        md,
        "| path | proxy CPU s per GiB | ÷ HAProxy (median of rounds) | 1 stream Gbit/s | per round, CPU s/GiB | per round, ÷ HAProxy |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | --- | --- |")?;
    for ((name, _), m) in builds.iter().zip(zt) {
        let ratios = per_round_ratios(&m.per_gib, &haproxy.per_gib);
        writeln!(
            md,
            "| zt cross-node ({name}) | {:.2} | {:.2}× | {:.2} | {} | {} |",
            median(&m.per_gib),
            median(&ratios),
            median(&m.gbit),
            list(&m.per_gib),
            list(&ratios),
        )?;
    }
    writeln!(
        md,
        "| HAProxy mTLS pair | {:.2} | 1.00× | {:.2} | {} | |",
        median(&haproxy.per_gib),
        median(&haproxy.gbit),
        list(&haproxy.per_gib),
    )?;
    writeln!(
        md,
        "\nNew connections/s ({NEW_CONNECTIONS} sequential per round and path, each sending 100 \
         bytes and reading the reply), zt cross-node against direct TCP in the same round, and \
         the CPU both agents spent per connection:\n"
    )?;
    writeln!(
        md,
        "| path | new connections/s | ÷ direct (median of rounds) | per round, ÷ direct | agents' CPU µs per connection |"
    )?;
    writeln!(md, "| --- | ---: | ---: | --- | ---: |")?;
    for ((name, _), m) in builds.iter().zip(zt) {
        let ratios = per_round_ratios(&m.conns, &direct.conns);
        writeln!(
            md,
            "| zt cross-node ({name}) | {:.0} | {:.2}× | {} | {:.0} |",
            median(&m.conns),
            median(&ratios),
            list(&ratios),
            median(&m.conn_cpu_us),
        )?;
    }
    writeln!(
        md,
        "| direct TCP | {:.0} | 1.00× | | - |",
        median(&direct.conns)
    )?;
    writeln!(
        md,
        "\nSyscalls (and page faults, context switches) per MiB relayed, one iperf3 stream ({} s, counted by `perf stat` on \
         syscall tracepoints; node 1's proxy, then node 2's):\n",
        options.seconds
    )?;
    writeln!(
        md,
        "| proxy | all | reads | writes | epoll waits | futex | KiB per read | KiB per write | page faults | context switches |"
    )?;
    writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    let rows = builds
        .iter()
        .zip(zt)
        .map(|((name, _), m)| (format!("zt ({name})"), m))
        .chain([("HAProxy".to_owned(), haproxy)]);
    for (name, m) in rows {
        for (n, c) in m.syscalls.iter().enumerate() {
            let mib = c.units / (1u64 << 20) as f64;
            writeln!(
                md,
                "| {name}, node {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                n + 1,
                c.total / mib,
                c.reads / mib,
                c.writes / mib,
                c.waits / mib,
                c.wakes / mib,
                c.units / c.reads.max(1.0) / 1024.0,
                c.units / c.writes.max(1.0) / 1024.0,
                c.faults / mib,
                c.switches / mib,
            )?;
        }
    }
    writeln!(
        md,
        "\nSyscalls (and context switches) per new connection, over {NEW_CONNECTIONS} sequential \
         ones (node 1's agent, then node 2's):\n"
    )?;
    writeln!(
        md,
        "| proxy | all | reads | writes | epoll waits | futex | context switches |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    for ((name, _), m) in builds.iter().zip(zt) {
        for (n, c) in m.connection_syscalls.iter().enumerate() {
            writeln!(
                md,
                "| zt ({name}), node {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                n + 1,
                c.total / c.units,
                c.reads / c.units,
                c.writes / c.units,
                c.waits / c.units,
                c.wakes / c.units,
                c.switches / c.units,
            )?;
        }
    }
    Ok(md)
}
