//! `cargo xtask soak`: two nodes, 10 000 concurrent meshed connections with continuous churn for
//! a bounded time, then idle. Every 10 s it samples each agent's RSS and open descriptors, the
//! node's connection map entries and the pooled HBONE connections, writes them to SOAK.csv, and
//! checks that the agents come back: RSS within 10% of the start, descriptors and map entries at
//! their baseline. Not part of the test suite (it takes minutes).
use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::Value;
use zt_tests::{
    Agent, Testbed,
    agent::{ca_init, meshed_config},
    maps,
    node_config::{Limits, MtlsMode},
    probe::Tally,
    read_json_lines,
};

use crate::bench::{QUIET_LOG, open_fds, rss_kib, use_release_binaries};

const PORT: u16 = 9300;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Pooled HBONE connections close after this idle time; the baseline and the end both wait it out.
const POOL_IDLE: Duration = Duration::from_secs(10);

struct Sample {
    t_s: u64,
    phase: &'static str,
    rss_kib: [u64; 2],
    fds: [u64; 2],
    map_entries: u64,
    pooled: u64,
}

/// Pooled HBONE connections of an agent, from its /config_dump.
fn pooled(agent: &Agent) -> anyhow::Result<u64> {
    let (_, body) = agent.admin("GET", "/config_dump")?;
    let dump: Value = serde_json::from_str(&body)?;
    Ok(dump["pool"].as_array().map_or(0, |p| p.len() as u64))
}

fn sample(
    started: std::time::Instant,
    phase: &'static str,
    agents: &[&Agent; 2],
    bed: &Testbed,
) -> anyhow::Result<Sample> {
    Ok(Sample {
        t_s: started.elapsed().as_secs(),
        phase,
        rss_kib: [rss_kib(agents[0].pid)?, rss_kib(agents[1].pid)?],
        fds: [open_fds(agents[0].pid)?, open_fds(agents[1].pid)?],
        map_entries: maps::connection_owners(&bed.node(1).pin_dir)?.len() as u64,
        pooled: pooled(agents[0])?,
    })
}

pub fn run(minutes: u64, connections: usize) -> anyhow::Result<()> {
    if !(1..=10).contains(&minutes) {
        bail!("--minutes must be 1..=10 (the soak is bounded)");
    }
    zt_tests::require_root()?;
    use_release_binaries()?;
    let mut bed = Testbed::new(1)?;
    let (p11, p21) = (bed.pod(1, 1).clone(), bed.pod(2, 1).clone());
    let ca = bed.dir.join("ca");
    ca_init(&ca)?;
    let config = |n: usize, enrolled, remote| {
        let config = meshed_config(bed.node(n), &[enrolled], &[remote], &ca, MtlsMode::Strict)
            .pool_idle_seconds(POOL_IDLE.as_secs())
            .limits(Limits {
                max_connections_per_workload: Some(connections * 2),
                ..Limits::default()
            })
            .log_level(QUIET_LOG);
        config.to_string()
    };
    let (c1, c2) = (config(1, &p11, &p21), config(2, &p21, &p11));
    let a1 = Agent::start_with_config(&mut bed, 1, &c1)?;
    let a2 = Agent::start_with_config(&mut bed, 2, &c2)?;
    let tally = Tally::start(&mut bed, &p21, SocketAddr::from(([0, 0, 0, 0], PORT)))?;
    let dst = SocketAddr::new(p21.ip(false), PORT);
    let started = std::time::Instant::now();
    let mut samples = Vec::new();

    // Warm up (TLS, pool, allocator), let the pool idle out, then take the baseline.
    let warm = zt_tests::probe::churn(&bed, &p11, dst, 200, 100)?;
    anyhow::ensure!(warm == 200, "warm-up: {warm} of 200 connections");
    std::thread::sleep(POOL_IDLE + Duration::from_secs(3));
    let agents = [&a1, &a2];
    samples.push(sample(started, "baseline", &agents, &bed)?);

    let cooldown = POOL_IDLE + Duration::from_secs(20);
    let load_for = Duration::from_secs(minutes * 60)
        .saturating_sub(started.elapsed() + cooldown)
        .max(Duration::from_secs(30));
    println!(
        "soak: {connections} connections n1p1 -> n2p1 (HBONE, mutual TLS), churn 100/s, for {} s",
        load_for.as_secs()
    );
    let mut hold = bed.pod_command(&p11, zt_tests::bin_path("zt-probe")?)?;
    hold.args(["hold", "--to", &dst.to_string()])
        .args(["--connections", &connections.to_string()])
        .args(["--duration-ms", &load_for.as_millis().to_string()]);
    let hold_pid = bed.spawn(hold, "hold.log")?;
    let hold_log = bed.log_path("hold.log");
    while !bed.exited(hold_pid) {
        std::thread::sleep(SAMPLE_EVERY);
        let s = sample(started, "load", &agents, &bed)?;
        println!(
            "t={:>4}s rss {} / {} KiB, fds {} / {}, map {}, pooled {}",
            s.t_s, s.rss_kib[0], s.rss_kib[1], s.fds[0], s.fds[1], s.map_entries, s.pooled
        );
        samples.push(s);
    }
    let events = read_json_lines(&hold_log)?;
    let done = events
        .iter()
        .find(|e| e["event"] == "done")
        .context("zt-probe hold printed no summary")?
        .clone();
    let held = events
        .iter()
        .find(|e| e["event"] == "held")
        .context("zt-probe hold never had all its connections open")?;
    println!("load: {held} / {done}");

    let load_ended = std::time::Instant::now();
    while load_ended.elapsed() < cooldown {
        std::thread::sleep(SAMPLE_EVERY);
        samples.push(sample(started, "after", &agents, &bed)?);
    }
    let received = tally.samples()?.last().map_or(0, |s| s.1);
    drop(bed);

    let mut csv = String::from(
        "t_s,phase,agent1_rss_kib,agent2_rss_kib,agent1_fds,agent2_fds,node1_conn_map_entries,node1_pooled\n",
    );
    for s in &samples {
        writeln!(
            csv,
            "{},{},{},{},{},{},{},{}",
            s.t_s, s.phase, s.rss_kib[0], s.rss_kib[1], s.fds[0], s.fds[1], s.map_entries, s.pooled
        )?;
    }
    std::fs::write(crate::workspace_root().join("SOAK.csv"), &csv)?;
    println!("{csv}");

    let (first, last) = (&samples[0], samples.last().context("no samples")?);
    let peak_rss = samples
        .iter()
        .map(|s| s.rss_kib[0].max(s.rss_kib[1]))
        .max()
        .unwrap_or(0);
    let mut failures = Vec::new();
    for i in 0..2 {
        let limit = first.rss_kib[i] + first.rss_kib[i] / 10;
        if last.rss_kib[i] > limit {
            failures.push(format!(
                "agent{} RSS {} KiB after the load, over 110% of its start ({} KiB)",
                i + 1,
                last.rss_kib[i],
                first.rss_kib[i]
            ));
        }
        if last.fds[i] > first.fds[i] {
            failures.push(format!(
                "agent{} holds {} descriptors after the load, {} at the start",
                i + 1,
                last.fds[i],
                first.fds[i]
            ));
        }
    }
    if last.map_entries > first.map_entries {
        failures.push(format!(
            "{} connection map entries after the load, {} at the start",
            last.map_entries, first.map_entries
        ));
    }
    println!(
        "soak: peak RSS {peak_rss} KiB; {received} bytes received; SOAK.csv written ({} samples)",
        samples.len()
    );
    if done["failed"].as_u64() != Some(0) {
        failures.push(format!("connections failed during the load: {done}"));
    }
    if !failures.is_empty() {
        bail!("soak failed:\n  {}", failures.join("\n  "));
    }
    println!("soak: agents back to their baseline");
    Ok(())
}
