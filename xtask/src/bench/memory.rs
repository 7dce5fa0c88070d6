//! `cargo xtask bench memory`: the agent's allocator. Builds zt-daemon twice, with glibc's malloc
//! (the default build) and with jemalloc (`--features jemalloc`), and measures both in one
//! run, in interleaved rounds (medians), on zt cross-node between two nodes: the agents' RSS at
//! start, one stream's throughput and the agents' CPU per GiB, new connections per second, RSS
//! per idle connection with 10 000 open, and how much of that RSS the agents still hold a few
//! seconds after those connections closed.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use zt_tests::{Agent, Pod, Testbed, agent::ca_init, probe::Tally};

use super::{
    ensure_measured,
    load::{IDLE_PORT, IdleMemory, Route, connection_rate, idle_memory, iperf, start_servers},
    machine, mesh_config, placement, rss_kib,
};

/// How long and how much; `--quick` only proves the bench still produces figures.
struct Budget {
    rounds: usize,
    iperf_seconds: u64,
    new_connections: usize,
    idle_connections: usize,
    /// How long RSS is followed after the idle connections closed.
    return_seconds: u64,
}

const FULL: Budget = Budget {
    rounds: 3,
    iperf_seconds: 5,
    new_connections: 1000,
    idle_connections: 10_000,
    return_seconds: 20,
};

const QUICK: Budget = Budget {
    rounds: 1,
    iperf_seconds: 1,
    new_connections: 50,
    idle_connections: 200,
    return_seconds: 6,
};

/// How long the agents rest before the idle connections' baseline.
const SETTLE: Duration = Duration::from_secs(6);

/// RSS is also reported this long after the idle connections closed.
const EARLY_RETURN: Duration = Duration::from_secs(5);

/// One build of the agent.
struct Allocator {
    name: &'static str,
    /// The cargo command that builds it into target/release.
    cargo_build: &'static [&'static str],
    /// Where its zt-daemon (and a zt-probe) are copied.
    bin_dir: PathBuf,
}

/// One round's figures for one allocator.
#[derive(Clone, Copy)]
struct Figures {
    start_kib: [u64; 2],
    gbit: f64,
    cpu_s_per_gib: f64,
    conns_per_s: f64,
    kib_per_idle_connection: [f64; 2],
    /// RSS above the agent's just before the idle connections opened, [`EARLY_RETURN`] and
    /// `return_seconds` after they closed (negative: below it).
    kept_early_kib: [i64; 2],
    kept_late_kib: [i64; 2],
}

/// Builds both allocators' agents, each into a directory of its own.
fn build(target: &Path) -> anyhow::Result<[Allocator; 2]> {
    let bench_dir = target.join("bench-memory");
    let allocators = [
        Allocator {
            name: "glibc malloc",
            cargo_build: &["build", "--release", "-p", "zt-daemon", "-p", "zt-tests"],
            bin_dir: bench_dir.join("glibc"),
        },
        Allocator {
            name: "jemalloc",
            cargo_build: &[
                "build",
                "--release",
                "-p",
                "zt-daemon",
                "--features",
                "jemalloc",
            ],
            bin_dir: bench_dir.join("jemalloc"),
        },
    ];
    let release = target.join("release");
    // jemalloc's first, so that target/release is left with the default build.
    for allocator in allocators.iter().rev() {
        crate::cargo(allocator.cargo_build)?;
        std::fs::create_dir_all(&allocator.bin_dir)?;
        copy(&release, &allocator.bin_dir, "zt-daemon")?;
    }
    for allocator in &allocators {
        copy(&release, &allocator.bin_dir, "zt-probe")?;
    }
    Ok(allocators)
}

fn copy(from: &Path, to: &Path, name: &str) -> anyhow::Result<()> {
    std::fs::copy(from.join(name), to.join(name))
        .with_context(|| format!("copying {name} to {}", to.display()))?;
    Ok(())
}

/// Makes the test bed start `allocator`'s binaries.
fn use_binaries(allocator: &Allocator) {
    // SAFETY: xtask runs on one thread; the test bed reads it when it starts a binary.
    unsafe { std::env::set_var("ZT_BIN_DIR", &allocator.bin_dir) };
}

/// Starts both agents with `allocator`'s build, measures, and stops them.
fn measure(
    bed: &mut Testbed,
    configs: &[String; 2],
    (client, server): (&Pod, &Pod),
    allocator: &Allocator,
    budget: &Budget,
) -> anyhow::Result<Figures> {
    use_binaries(allocator);
    let agents = [
        Agent::start_with_config(bed, 1, &configs[0])?,
        Agent::start_with_config(bed, 2, &configs[1])?,
    ];
    let pids = [agents[0].pid, agents[1].pid];
    let outcome = measure_agents(bed, &agents, (client, server), allocator, budget);
    for pid in pids {
        bed.kill(pid);
    }
    outcome
}

fn measure_agents(
    bed: &mut Testbed,
    agents: &[Agent; 2],
    (client, server): (&Pod, &Pod),
    allocator: &Allocator,
    budget: &Budget,
) -> anyhow::Result<Figures> {
    let pids = [agents[0].pid, agents[1].pid];
    let rss = || -> anyhow::Result<[u64; 2]> { Ok([rss_kib(pids[0])?, rss_kib(pids[1])?]) };
    std::thread::sleep(Duration::from_secs(2));
    let start_kib = rss()?;
    let route = Route {
        name: allocator.name,
        from: client.clone(),
        to: server.ipv4.into(),
        proxies: pids.to_vec(),
        agents: vec![0, 1],
    };
    let before = route.relayed(agents)?;
    let cpu_before = route.proxies_cpu()?;
    let (bps, bytes) = iperf(bed, &route, 1, budget.iperf_seconds)?;
    let cpu_s_per_gib = (route.proxies_cpu()? - cpu_before) / (bytes / (1u64 << 30) as f64);
    let conns_per_s = connection_rate(bed, &route, budget.new_connections)?;
    route.ensure_relayed(agents, &before, budget.new_connections as u64)?;
    // What the new connections freed goes back first: the idle connections' baseline is the
    // agents at rest (glibc trims every 5 s, jemalloc returns pages unused for 5 s).
    std::thread::sleep(SETTLE);

    let idle: IdleMemory = idle_memory(
        bed,
        pids,
        client,
        SocketAddr::new(server.ipv4.into(), IDLE_PORT),
        budget.idle_connections,
    )?;
    let closed = std::time::Instant::now();
    let kept = |now: [u64; 2]| [0, 1].map(|a| now[a] as i64 - idle.baseline_kib[a] as i64);
    std::thread::sleep(EARLY_RETURN.saturating_sub(closed.elapsed()));
    let kept_early_kib = kept(rss()?);
    std::thread::sleep(Duration::from_secs(budget.return_seconds).saturating_sub(closed.elapsed()));
    let kept_late_kib = kept(rss()?);
    let figures = Figures {
        start_kib,
        gbit: bps / 1e9,
        cpu_s_per_gib,
        conns_per_s,
        kib_per_idle_connection: [idle.kib_per_connection(0), idle.kib_per_connection(1)],
        kept_early_kib,
        kept_late_kib,
    };
    for (what, value) in [
        ("Gbit/s, 1 stream", figures.gbit),
        ("agents' CPU s/GiB", figures.cpu_s_per_gib),
        ("new connections/s", figures.conns_per_s),
        (
            "node 1 KiB per idle connection",
            figures.kib_per_idle_connection[0],
        ),
        (
            "node 2 KiB per idle connection",
            figures.kib_per_idle_connection[1],
        ),
    ] {
        ensure_measured(allocator.name, what, value)?;
    }
    Ok(figures)
}

/// Per-figure median over rounds.
fn median(rounds: &[Figures]) -> Figures {
    fn mid<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2]
    }
    let each = |f: fn(&Figures) -> f64| mid(rounds.iter().map(f).collect());
    let pair_u =
        |f: fn(&Figures) -> [u64; 2]| [0, 1].map(|a| mid(rounds.iter().map(|r| f(r)[a]).collect()));
    let pair_i =
        |f: fn(&Figures) -> [i64; 2]| [0, 1].map(|a| mid(rounds.iter().map(|r| f(r)[a]).collect()));
    let pair_f =
        |f: fn(&Figures) -> [f64; 2]| [0, 1].map(|a| mid(rounds.iter().map(|r| f(r)[a]).collect()));
    Figures {
        start_kib: pair_u(|f| f.start_kib),
        gbit: each(|f| f.gbit),
        cpu_s_per_gib: each(|f| f.cpu_s_per_gib),
        conns_per_s: each(|f| f.conns_per_s),
        kib_per_idle_connection: pair_f(|f| f.kib_per_idle_connection),
        kept_early_kib: pair_i(|f| f.kept_early_kib),
        kept_late_kib: pair_i(|f| f.kept_late_kib),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    let budget = if quick { &QUICK } else { &FULL };
    let root = crate::workspace_root();
    let target = super::target_dir(&root);
    let allocators = build(&target)?;
    let started = std::time::Instant::now();
    let load_before = load_average();
    let mut bed = Testbed::new(1)?;
    let (client, server) = (bed.pod(1, 1).clone(), bed.pod(2, 1).clone());
    // The CA and the servers: either build's binaries do.
    use_binaries(&allocators[1]);
    let ca = bed.dir.join("ca");
    ca_init(&ca)?;
    let configs = [
        mesh_config(&bed, 1, &[&client], &[&server], &ca, "tunnel"),
        mesh_config(&bed, 2, &[&server], &[&client], &ca, "tunnel"),
    ];
    start_servers(&mut bed, &server)?;
    placement::as_server(|| {
        Tally::start(
            &mut bed,
            &server,
            SocketAddr::from(([0, 0, 0, 0], IDLE_PORT)),
        )
    })?;
    let mut rounds: [Vec<Figures>; 2] = Default::default();
    for round in 0..budget.rounds {
        // Alternate which allocator goes first: neither always measures a warmer machine.
        for i in [round % 2, 1 - round % 2] {
            println!(
                "round {}/{}: {}",
                round + 1,
                budget.rounds,
                allocators[i].name
            );
            let figures = measure(
                &mut bed,
                &configs,
                (&client, &server),
                &allocators[i],
                budget,
            )?;
            rounds[i].push(figures);
        }
    }
    drop(bed);
    let results = rounds.map(|r| median(&r));
    let md = report(
        &allocators,
        &results,
        budget,
        (&load_before, &load_average()),
        started.elapsed(),
    )?;
    super::publish(&root, "memory", "bench-memory-quick.md", quick, &md)
}

fn report(
    allocators: &[Allocator; 2],
    results: &[Figures; 2],
    budget: &Budget,
    (load_before, load_after): (&str, &str),
    took: Duration,
) -> anyhow::Result<String> {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let kept = |kib: i64| kib as f64 / 1024.0;
    let mut md = String::new();
    writeln!(md, "## Allocator (issue 19)\n")?;
    writeln!(
        md,
        "Produced by `bash scripts/dev.sh bench memory` (that is, `cargo xtask bench memory`, as \
         root), which builds zt-daemon twice (release): with glibc's malloc (the default: \
         per-thread caches off and trim and mmap thresholds at 4 MiB through a re-exec, \
         `malloc_trim` every 5 s; zt-daemon/src/memory.rs) \
         and with jemalloc (`--features jemalloc`: `tikv-jemallocator`, background threads, pages \
         unused for 5 s returned). Took {:.1} minutes; load average (1, 5, 15 min) {load_before} \
         before, {load_after} after.  \nMachine: {}; {} interleaved rounds, medians. Placement: \
         {}.\n",
        took.as_secs_f64() / 60.0,
        machine(),
        budget.rounds,
        placement::describe()
    )?;
    writeln!(
        md,
        "Each round starts both agents with one build, then on zt cross-node (n1p1 to n2p1): \
         iperf3, one stream for {} s (the agents' CPU from /proc/PID/stat); {} sequential new \
         connections; {} s at rest; {} idle connections opened and held (each sent 16 bytes; RSS growth over \
         the agent's RSS just before, divided by the count), then closed, and the RSS the agents \
         still hold above that baseline {} s and {} s later. Node 1 is the client's agent, node \
         2 the server's.\n",
        budget.iperf_seconds,
        budget.new_connections,
        SETTLE.as_secs(),
        budget.idle_connections,
        EARLY_RETURN.as_secs(),
        budget.return_seconds
    )?;
    writeln!(
        md,
        "| allocator | RSS at start MiB, node 1 / 2 | KiB per idle connection, node 1 / 2 | kept {} s after closing MiB | kept {} s after MiB | 1 stream Gbit/s | agents' CPU s per GiB | new connections/s |",
        EARLY_RETURN.as_secs(),
        budget.return_seconds
    )?;
    writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for (allocator, f) in allocators.iter().zip(results) {
        writeln!(
            md,
            "| {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} | {:.2} | {:.0} |",
            allocator.name,
            mib(f.start_kib[0]),
            mib(f.start_kib[1]),
            f.kib_per_idle_connection[0],
            f.kib_per_idle_connection[1],
            kept(f.kept_early_kib[0]),
            kept(f.kept_early_kib[1]),
            kept(f.kept_late_kib[0]),
            kept(f.kept_late_kib[1]),
            f.gbit,
            f.cpu_s_per_gib,
            f.conns_per_s
        )?;
    }
    let [glibc, jemalloc] = results;
    writeln!(
        md,
        "\njemalloc ÷ glibc: KiB per idle connection {:.2}× / {:.2}×, single stream {:.2}×, CPU per \
         GiB {:.2}×, new connections/s {:.2}×.",
        jemalloc.kib_per_idle_connection[0] / glibc.kib_per_idle_connection[0],
        jemalloc.kib_per_idle_connection[1] / glibc.kib_per_idle_connection[1],
        jemalloc.gbit / glibc.gbit,
        jemalloc.cpu_s_per_gib / glibc.cpu_s_per_gib,
        jemalloc.conns_per_s / glibc.conns_per_s
    )?;
    Ok(md)
}
