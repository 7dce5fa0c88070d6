//! Benchmarks, run as `cargo xtask bench [micro|policy|crypto|directory|cpu]` with release
//! builds; each writes its own section of BENCHMARKS.md (`cpu` only prints). `paths` is the data
//! path benchmark (the default), `haproxy` its reference proxy, `cpu` the proxies' per-byte cost
//! on two of its paths; micro, policy and directory run benchmarks in
//! zt-daemon/benches, crypto the provider comparison in crypto-bench/.
pub mod cpu;
pub mod directory;
mod haproxy;
mod load;
pub mod memory;
pub mod paths;
mod placement;
mod profile;
mod report;
mod topology;

pub use profile::profile;

use std::fmt::Write as _;

use anyhow::Context as _;
use serde_json::Value;
use zt_tests::node_config::{Limits, MtlsMode};

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

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

pub fn open_fds(pid: u32) -> anyhow::Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// The machine the figures come from, for the reports.
pub fn machine() -> String {
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

/// A target's verdict in the reports.
pub fn holds(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

/// Builds zt-daemon and zt-probe in release mode and points the test bed at them.
pub fn use_release_binaries() -> anyhow::Result<()> {
    let root = crate::workspace_root();
    crate::cargo(&["build", "--release", "-p", "zt-daemon", "-p", "zt-tests"])?;
    // SAFETY: single-threaded at this point; the test bed reads it to find release binaries.
    unsafe { std::env::set_var("ZT_BIN_DIR", target_dir(&root).join("release")) };
    Ok(())
}

/// Fails unless `value`, the figure `what` of `path`, is a measurement: finite and above zero.
pub fn ensure_measured(path: &str, what: &str, value: f64) -> anyhow::Result<()> {
    anyhow::ensure!(
        value.is_finite() && value > 0.0,
        "{path}: {what} is {value}, not a measurement"
    );
    Ok(())
}

/// The config of node `n`'s agent in the benchmarks: `enrolled` pods meshed with `remote` ones
/// (strict mTLS, the built-in CA in `ca`, same-node connections as `same_node` says), quiet logs,
/// and room for 10 000 idle connections.
pub fn mesh_config(
    bed: &zt_tests::Testbed,
    n: usize,
    enrolled: &[&zt_tests::Pod],
    remote: &[&zt_tests::Pod],
    ca: &std::path::Path,
    same_node: &'static str,
) -> String {
    zt_tests::agent::meshed_config(bed.node(n), enrolled, remote, ca, MtlsMode::Strict)
        .same_node(same_node)
        // 10 000 idle connections fill 100 pooled HBONE connections: they close 5 s after the
        // burst rather than 60 s, so descriptors and memory come back within the bench's wait.
        .pool_idle_seconds(5)
        .limits(Limits {
            max_connections_per_workload: Some(25_000),
            ..Limits::default()
        })
        .log_level(QUIET_LOG)
        .to_string()
}

/// Only warnings and lifecycle events (no access log): the agent's logging must not be what is
/// measured.
pub const QUIET_LOG: &str = "warn,zt_daemon::agent=info,zt_daemon::enrollment=info";

/// A report's destination: its `name` section of BENCHMARKS.md, or with `quick` (a smoke run,
/// not a measurement) `quick_file` in the target directory.
fn publish(
    root: &std::path::Path,
    name: &str,
    quick_file: &str,
    quick: bool,
    md: &str,
) -> anyhow::Result<()> {
    if quick {
        let out = target_dir(root).join(quick_file);
        std::fs::write(&out, md)?;
        println!(
            "\n{md}\n(--quick: written to {}, not BENCHMARKS.md)",
            out.display()
        );
    } else {
        write_section(root, name, md)?;
        println!("\n{md}");
    }
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

/// Where cargo builds for `workspace`: `CARGO_TARGET_DIR` when set (relative to the workspace),
/// else its `target`.
fn target_dir(workspace: &std::path::Path) -> std::path::PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}

/// The median time criterion measured for benchmark `id` (`group/name` or `name`), in ns.
/// `workspace` is the root of the workspace criterion ran in.
fn criterion_median_ns(workspace: &std::path::Path, id: &str) -> anyhow::Result<f64> {
    let path = target_dir(workspace).join(format!("criterion/{id}/new/estimates.json"));
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
        "TLS, HTTP/2 and copy code with rustls and zt's provider (aws-lc-rs handshake, ring records), one process, loopback TCP. Medians.\n"
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

/// `cargo xtask bench crypto`: the rustls crypto providers, aws-lc-rs (the agent's) against ring,
/// on this CPU (crypto-bench/, a workspace of its own); records medians in BENCHMARKS.md.
pub fn crypto() -> anyhow::Result<()> {
    let dir = crate::workspace_root().join("crypto-bench");
    crate::cargo(&[
        "bench",
        "--manifest-path",
        "crypto-bench/Cargo.toml",
        "--bench",
        "providers",
    ])?;
    let mut md = String::new();
    writeln!(md, "## Crypto provider (issue 8)\n")?;
    writeln!(
        md,
        "Produced by `bash scripts/dev.sh bench crypto` (criterion, `crypto-bench/benches/providers.rs`):\n\
         rustls with each provider, in memory, X25519 and ECDSA P-256 for all. Medians.\n"
    )?;
    writeln!(
        md,
        "| provider | mutual TLS 1.3 handshake, both sides | 1 MiB sealed and opened (AES-256-GCM) |"
    )?;
    writeln!(md, "| --- | ---: | ---: |")?;
    let mut figures = Vec::new();
    for provider in ["aws-lc-rs", "ring", "aws-lc-rs+ring-aead"] {
        let handshake = criterion_median_ns(&dir, &format!("provider_handshake/{provider}"))?;
        let bulk = criterion_median_ns(&dir, &format!("provider_bulk_1MiB/{provider}"))?;
        let gib_s = (1u64 << 20) as f64 / (bulk / 1e9) / (1u64 << 30) as f64;
        writeln!(
            md,
            "| {provider} | {:.0} µs | {:.0} µs ({gib_s:.2} GiB/s) |",
            handshake / 1e3,
            bulk / 1e3
        )?;
        figures.push((handshake, bulk));
    }
    let [(aws_hs, aws_bulk), (ring_hs, ring_bulk), _] = figures[..] else {
        anyhow::bail!("three providers expected");
    };
    writeln!(
        md,
        "\nring ÷ aws-lc-rs: handshake {:.2}×, bulk {:.2}× (above 1: aws-lc-rs is faster). \
         The agent uses `aws-lc-rs+ring-aead`: aws-lc-rs for key exchange and signatures, ring's \
         cipher suites for the records (zt-daemon/src/identity/tls.rs).",
        ring_hs / aws_hs,
        ring_bulk / aws_bulk
    )?;
    write_section(&crate::workspace_root(), "crypto", &md)?;
    println!("\n{md}");
    Ok(())
}
