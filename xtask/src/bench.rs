//! `cargo xtask bench tunnel`: direct TCP against zt cross-node, in one run on the same topology,
//! with release builds. Writes BENCHMARKS.md. Figures are ratios to direct TCP measured minutes
//! apart at most, because this machine is shared and noisy; absolute numbers are indicative.
use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::Value;
use zt_tests::{
    Agent, Pod, Testbed,
    agent::{ca_init, meshed_config},
    in_cgroup_and_netns,
    probe::{Server, connect_with_pattern},
};

const MIB: u64 = 1024 * 1024;
const THROUGHPUT_PORT: u16 = 9100;
const ECHO_PORT: u16 = 9200;

struct Figures {
    throughput_mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// New connections per second, each one request/response (`zt-probe churn`).
    conns_per_s: f64,
    /// CPU seconds both agents spent per GiB of the throughput runs (0 for direct TCP).
    agent_cpu_s_per_gib: f64,
}

/// CPU seconds (user + system) a process has used so far, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime and stime are 14th and 15th.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / per_second)
}

fn agents_cpu(agents: &[u32]) -> anyhow::Result<f64> {
    agents.iter().map(|pid| cpu_seconds(*pid)).sum()
}

const CHURN: usize = 500;

/// New connections per second from `from` to `to`, each sending 100 bytes and reading the reply.
fn connection_rate(bed: &Testbed, from: &Pod, to: SocketAddr) -> anyhow::Result<f64> {
    let started = std::time::Instant::now();
    let done = zt_tests::probe::churn(bed, from, to, CHURN, 100)?;
    anyhow::ensure!(
        done == CHURN as u64,
        "{done} of {CHURN} connections completed"
    );
    Ok(CHURN as f64 / started.elapsed().as_secs_f64())
}

fn throughput(
    bed: &Testbed,
    from: &Pod,
    to: SocketAddr,
    bytes: u64,
    runs: usize,
) -> anyhow::Result<f64> {
    let mut best = 0f64;
    for _ in 0..runs {
        let r = connect_with_pattern(bed, from, to, bytes, Duration::from_secs(30), Some("zt"))?
            .map_err(|e| anyhow::anyhow!("throughput run failed: {e}"))?;
        let us = r["elapsed_us"].as_u64().context("no elapsed_us")? as f64;
        best = best.max(bytes as f64 / MIB as f64 / (us / 1e6));
    }
    Ok(best)
}

fn round_trips(bed: &Testbed, from: &Pod, to: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let mut cmd = in_cgroup_and_netns(
        zt_tests::bin_path("zt-probe")?,
        Some(&from.cgroup),
        &from.netns,
    )?;
    cmd.args([
        "rr",
        "--to",
        &to.to_string(),
        "--size",
        "1024",
        "--count",
        "5000",
    ]);
    let out = cmd.output()?;
    let v: Value = serde_json::from_slice(&out.stdout).context("rr printed no report")?;
    let _ = bed;
    Ok((
        v["p50_us"].as_f64().context("p50")?,
        v["p99_us"].as_f64().context("p99")?,
    ))
}

const ROUNDS: usize = 3;

/// Per-figure median over rounds.
fn median(rounds: &[Figures]) -> Figures {
    let mid = |f: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    Figures {
        throughput_mib_s: mid(|f| f.throughput_mib_s),
        p50_us: mid(|f| f.p50_us),
        p99_us: mid(|f| f.p99_us),
        conns_per_s: mid(|f| f.conns_per_s),
        agent_cpu_s_per_gib: mid(|f| f.agent_cpu_s_per_gib),
    }
}

/// One round on one path; `agents` are the agent processes on the path (none for direct TCP).
fn measure(bed: &Testbed, from: &Pod, to: &Pod, agents: &[u32]) -> anyhow::Result<Figures> {
    const RUNS: usize = 2;
    const BYTES: u64 = 256 * MIB;
    let t = SocketAddr::new(to.ip(false), THROUGHPUT_PORT);
    let e = SocketAddr::new(to.ip(false), ECHO_PORT);
    let cpu_before = agents_cpu(agents)?;
    let throughput_mib_s = throughput(bed, from, t, BYTES, RUNS)?;
    let cpu = agents_cpu(agents)? - cpu_before;
    let (p50_us, p99_us) = round_trips(bed, from, e)?;
    let conns_per_s = connection_rate(bed, from, t)?;
    Ok(Figures {
        throughput_mib_s,
        p50_us,
        p99_us,
        conns_per_s,
        agent_cpu_s_per_gib: cpu / ((RUNS as u64 * BYTES) as f64 / (1u64 << 30) as f64),
    })
}

/// Builds zt-daemon and zt-probe in release mode and points the test bed at them.
pub fn use_release_binaries() -> anyhow::Result<()> {
    let root = crate::workspace_root();
    crate::cargo(&["build", "--release", "-p", "zt-daemon", "-p", "zt-tests"])?;
    // SAFETY: single-threaded at this point; the test bed reads it to find release binaries.
    unsafe { std::env::set_var("ZT_BIN_DIR", root.join("target/release")) };
    Ok(())
}

/// A test config logging only warnings and lifecycle events (no access log): the agent's
/// logging must not be what is measured.
pub fn quiet(config: &str) -> String {
    config.replace(
        "level = \"info,zt=debug\"",
        "level = \"warn,zt_daemon::agent=info,zt_daemon::workload=info\"",
    )
}

pub fn tunnel() -> anyhow::Result<()> {
    use_release_binaries()?;

    let mut bed = Testbed::new(2)?;
    let (n1p1, n1p2) = (bed.pod(1, 1).clone(), bed.pod(1, 2).clone());
    let (n2p1, n2p2) = (bed.pod(2, 1).clone(), bed.pod(2, 2).clone());
    let ca = bed.dir.join("ca");
    ca_init(&ca)?;
    let c1 = meshed_config(bed.node(1), &[&n1p1], &[&n2p1], &ca, "strict");
    let c2 = meshed_config(bed.node(2), &[&n2p1], &[&n1p1], &ca, "strict");
    let a1 = Agent::start_with_config(&mut bed, 1, &quiet(&c1))?;
    let a2 = Agent::start_with_config(&mut bed, 2, &quiet(&c2))?;
    let agents = [a1.pid, a2.pid];
    for pod in [&n2p1, &n2p2] {
        Server::start(
            &mut bed,
            pod,
            SocketAddr::from(([0, 0, 0, 0], THROUGHPUT_PORT)),
        )?;
        let mut echo = bed.pod_command(pod, zt_tests::bin_path("zt-probe")?)?;
        echo.args([
            "echo",
            "--listen",
            &SocketAddr::from(([0, 0, 0, 0], ECHO_PORT)).to_string(),
        ]);
        bed.spawn(echo, &format!("echo-{}.log", pod.name))?;
    }
    std::thread::sleep(Duration::from_millis(300));

    // Interleaved rounds, medians: this machine is shared, and one round of either path can be
    // off by a factor of three.
    let (mut direct_rounds, mut zt_rounds) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        println!("round {round}/{ROUNDS}: direct TCP n1p2 -> n2p2 (neither enrolled)");
        direct_rounds.push(measure(&bed, &n1p2, &n2p2, &[])?);
        println!("round {round}/{ROUNDS}: zt cross-node n1p1 -> n2p1 (HBONE, mutual TLS 1.3)");
        zt_rounds.push(measure(&bed, &n1p1, &n2p1, &agents)?);
    }
    let (direct, zt) = (median(&direct_rounds), median(&zt_rounds));
    if zt.throughput_mib_s <= 0.0 || direct.throughput_mib_s <= 0.0 {
        bail!("no throughput measured");
    }
    drop(bed);

    let ratio = zt.throughput_mib_s / direct.throughput_mib_s;
    let added_p50 = zt.p50_us - direct.p50_us;
    let added_p99 = zt.p99_us - direct.p99_us;
    let machine = format!(
        "{} cores, kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let mut md = String::new();
    writeln!(md, "## Tunnel (issue 4)\n")?;
    writeln!(
        md,
        "Produced by `bash scripts/dev.sh bench tunnel` (that is, `cargo xtask bench tunnel`), as root, release builds."
    )?;
    writeln!(
        md,
        "Machine: {machine}; shared and noisy, so compare the ratios, which come from one run.\n"
    )?;
    writeln!(
        md,
        "Topology (DESIGN.md §9): two node namespaces joined by a veth pair, pods on bridges. Direct = two"
    )?;
    writeln!(
        md,
        "pods outside the mesh; zt = the same path captured by eBPF on both nodes and carried over a"
    )?;
    writeln!(
        md,
        "pooled HBONE connection (HTTP/2 CONNECT over mutual TLS 1.3, aws-lc-rs).\n"
    )?;
    writeln!(
        md,
        "| path | single-stream throughput (MiB/s, best of 2 × 256 MiB per round) | 1 KiB RR p50 (µs, 5000 RTTs) | 1 KiB RR p99 (µs) | new connections/s ({CHURN} with one exchange each) | agents' CPU s per GiB |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: |")?;
    for (name, f) in [("direct TCP", &direct), ("zt cross-node", &zt)] {
        writeln!(
            md,
            "| {name} | {:.0} | {:.1} | {:.1} | {:.0} | {} |",
            f.throughput_mib_s,
            f.p50_us,
            f.p99_us,
            f.conns_per_s,
            if name == "direct TCP" {
                "-".to_owned()
            } else {
                format!("{:.2}", f.agent_cpu_s_per_gib)
            }
        )?;
    }
    writeln!(md, "\n| ratio / delta | value | target (issue 4) | holds |")?;
    writeln!(md, "| --- | ---: | ---: | --- |")?;
    writeln!(
        md,
        "| throughput zt / direct | {ratio:.2}× | ≥ 0.45× | {} |",
        if ratio >= 0.45 { "yes" } else { "no" }
    )?;
    writeln!(
        md,
        "| added p50 (1 KiB, warm pool) | {added_p50:.1} µs | ≤ 70 µs | {} |",
        if added_p50 <= 70.0 { "yes" } else { "no" }
    )?;
    let conn_ratio = zt.conns_per_s / direct.conns_per_s;
    writeln!(
        md,
        "| new connections/s zt / direct | {conn_ratio:.2}× | ≥ 0.5× (issue 8) | {} |",
        if conn_ratio >= 0.5 { "yes" } else { "no" }
    )?;
    writeln!(
        md,
        "| added p99 | {added_p99:.1} µs | ≤ 2 × added p50 | {} |",
        if added_p99 <= 2.0 * added_p50.max(0.0) {
            "yes"
        } else {
            "no"
        }
    )?;
    write_section(&crate::workspace_root(), "tunnel", &md)?;
    println!("\n{md}");
    Ok(())
}

/// Replaces the section `name` of BENCHMARKS.md (between `<!-- name -->` and `<!-- /name -->`),
/// or appends it, so that each benchmark command rewrites only its own figures.
fn write_section(root: &std::path::Path, name: &str, content: &str) -> anyhow::Result<()> {
    let path = root.join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
    let (open, close) = (format!("<!-- {name} -->"), format!("<!-- /{name} -->"));
    let section = format!("{open}\n{}\n{close}", content.trim_end());
    let updated = match (text.find(&open), text.find(&close)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{section}{}", &text[..a], &text[b + close.len()..])
        }
        _ => format!("{}\n{section}\n", text.trim_end()),
    };
    std::fs::write(&path, updated)?;
    Ok(())
}

/// `cargo xtask bench policy`: the criterion benchmark of authorization decisions; records the
/// median time per decision with 10 and with 10 000 policies.
pub fn policy() -> anyhow::Result<()> {
    let root = crate::workspace_root();
    crate::cargo(&["bench", "-p", "zt-daemon", "--bench", "policy"])?;
    let (few, many) = (
        criterion_median_ns(&root, "policy_decision/10_policies")?,
        criterion_median_ns(&root, "policy_decision/10000_policies")?,
    );
    let ratio = many / few;
    let mut md = String::new();
    writeln!(md, "## Policy decisions (issue 5)\n")?;
    writeln!(
        md,
        "Produced by `bash scripts/dev.sh bench policy` (criterion, `zt-daemon/benches/policy.rs`): one"
    )?;
    writeln!(
        md,
        "decision for a workload selected by 10 policies, in a set of 10 policies and in a set of 10 000"
    )?;
    writeln!(
        md,
        "policies over 1 000 namespaces. Median time per decision.\n"
    )?;
    writeln!(md, "| policies loaded | ns per decision |")?;
    writeln!(md, "| ---: | ---: |")?;
    writeln!(md, "| 10 | {few:.0} |")?;
    writeln!(md, "| 10 000 | {many:.0} |")?;
    writeln!(md, "\n| target | value | holds |")?;
    writeln!(md, "| --- | ---: | --- |")?;
    writeln!(
        md,
        "| under 1 µs per decision (10 000 policies) | {many:.0} ns | {} |",
        if many < 1000.0 { "yes" } else { "no" }
    )?;
    writeln!(
        md,
        "| at most 2× the cost with 10 policies | {ratio:.2}× | {} |",
        if ratio <= 2.0 { "yes" } else { "no" }
    )?;
    write_section(&root, "policy", &md)?;
    println!("\n{md}");
    Ok(())
}

/// The median time criterion measured for benchmark `id` (`group/name` or `name`), in ns.
fn criterion_median_ns(root: &std::path::Path, id: &str) -> anyhow::Result<f64> {
    let path = root.join(format!("target/criterion/{id}/new/estimates.json"));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{}", path.display()))?;
    v["median"]["point_estimate"]
        .as_f64()
        .with_context(|| format!("{}: no median", path.display()))
}

/// `cargo xtask bench micro`: criterion benchmarks of the tunnel's parts with real
/// cryptography; records medians in BENCHMARKS.md.
pub fn micro() -> anyhow::Result<()> {
    let root = crate::workspace_root();
    crate::cargo(&["bench", "-p", "zt-daemon", "--bench", "tunnel"])?;
    let handshake = criterion_median_ns(&root, "mtls_handshake_both_sides")?;
    let stream = criterion_median_ns(&root, "hbone_stream_open_warm")?;
    let copy = criterion_median_ns(&root, "copy_loop/relay_4MiB_loopback")?;
    let gib_s = (4u64 << 20) as f64 / (copy / 1e9) / (1u64 << 30) as f64;
    let mut md = String::new();
    writeln!(md, "## Tunnel parts (criterion)\n")?;
    writeln!(
        md,
        "Produced by `bash scripts/dev.sh bench micro` (`zt-daemon/benches/tunnel.rs`): the agent's own"
    )?;
    writeln!(
        md,
        "TLS, HTTP/2 and copy code with rustls + aws-lc-rs, one process, loopback TCP. Medians.\n"
    )?;
    writeln!(md, "| benchmark | median |")?;
    writeln!(md, "| --- | ---: |")?;
    writeln!(
        md,
        "| mutual TLS 1.3 handshake, both sides, SPIFFE verification (P-256) | {:.0} µs |",
        handshake / 1e3
    )?;
    writeln!(
        md,
        "| HBONE stream open on a warm connection (CONNECT → 200) | {:.1} µs |",
        stream / 1e3
    )?;
    writeln!(
        md,
        "| copy loop: 4 MiB relayed between two loopback connections | {:.2} ms ({gib_s:.2} GiB/s) |",
        copy / 1e6
    )?;
    write_section(&root, "micro", &md)?;
    println!("\n{md}");
    Ok(())
}
