//! Developer commands, run as `cargo xtask <command>` (normally through scripts/dev.sh, which
//! first installs the toolchain): `test` runs every check CI runs, `demo` shows capture at work,
//! `bench` measures, `fuzz` fuzzes, `soak` runs a long load.
mod bench;
mod demo;
mod fuzz;
mod soak;
mod unprivileged;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Format and lint checks, unit tests, the root end-to-end tests, the fuzz smoke and the
    /// benchmark smoke.
    Test,
    /// zt-daemon's unit tests as `nobody` without capabilities (part of `test`; needs root to
    /// drop to nobody).
    Unprivileged,
    /// Two nodes, four pods, two agents: run a few flows and show what was captured.
    Demo,
    /// Benchmarks; without a subcommand, the data path: direct TCP, zt same-node and
    /// cross-node, an HAProxy mTLS pair. Writes BENCHMARKS.md.
    Bench {
        /// A short run proving the bench works (writes target/bench-quick.md, or
        /// target/bench-memory-quick.md for `bench memory`).
        #[arg(long, global = true)]
        quick: bool,
        /// The test suite's run of the data path bench: `--quick`'s budget on the debug
        /// binaries (writes target/bench-quick.md).
        #[arg(long, conflicts_with = "quick")]
        smoke: bool,
        #[command(subcommand)]
        what: Option<BenchCmd>,
    },
    /// 10 000 connections with churn for a bounded time; samples the agents into SOAK.csv.
    Soak {
        /// Total minutes, load and recovery (at most 10).
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
    },
    /// Runs every fuzz target in fuzz/ for a bounded time; fails on a crash.
    Fuzz {
        /// 30 s per target (the test suite's run).
        #[arg(long)]
        smoke: bool,
        /// Seconds per target (default 600).
        #[arg(long, conflicts_with = "smoke")]
        seconds: Option<u64>,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Criterion: one authorization decision with 10 and with 10 000 policies.
    Policy,
    /// Criterion: mTLS handshake, HBONE stream open on a warm connection, the copy loop.
    Micro,
    /// Criterion: rustls with aws-lc-rs against ring (handshake, bulk encryption).
    Crypto,
    /// Criterion and a counting allocator: the mesh directory at 100 000 pods (initial list,
    /// watch events, lookups, memory per pod, event-to-lookup latency).
    Directory,
    /// Proxy CPU per GiB and syscalls per MiB, zt cross-node against the HAProxy pair only; new
    /// connections/s against direct TCP, with the agents' CPU and syscalls per connection.
    Cpu {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// iperf3 seconds per run.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Other builds' zt-daemon and zt-probe (directories), measured in the same run.
        #[arg(long)]
        compare: Vec<std::path::PathBuf>,
    },
    /// perf profiles of zt cross-node: one iperf3 stream, 1 KiB round trips, new connections.
    Profile,
    /// The agent's allocator, jemalloc against glibc's malloc: idle RSS per connection, RSS
    /// returned after they close, throughput, new connections (builds zt-daemon both ways).
    Memory,
}

/// Runs `cargo <args>` from the workspace root and fails if it fails.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    cargo_in(".", args)
}

/// Runs `cargo <args>` in `dir` (relative to the workspace root) and fails if it fails.
fn cargo_in(dir: &str, args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("[xtask] ({dir}) cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root().join(dir))
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn test() -> anyhow::Result<()> {
    zt_tests::require_root()?;
    cargo(&["fmt", "--all", "--check"])?;
    // --workspace: the eBPF crate too (its host build, which lints the same source).
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The fuzz targets and the crypto comparison are workspaces of their own: linted too.
    for dir in ["fuzz", "crypto-bench"] {
        cargo_in(dir, &["clippy", "--all-targets", "--", "-D", "warnings"])?;
    }
    build_for_tests()?;
    cargo_test()?;
    unprivileged::run()?;
    fuzz::run(SMOKE_SECONDS, &[])?;
    // Proves the data path benchmark still runs and produces every figure; measures nothing.
    bench::paths::smoke()
}

const SMOKE_SECONDS: u64 = 30;

/// Builds zt-daemon (and through it the eBPF object) and zt-probe, which the e2e tests and the
/// bench smoke run. --all-targets: the test binaries too, with the features `cargo test`
/// resolves, so that it finds everything built (a plain `cargo build` resolves some crates'
/// features otherwise, and `cargo test` would build them again).
pub fn build_for_tests() -> anyhow::Result<()> {
    cargo(&["build", "--all-targets"])
}

/// The directory with the kube-apiserver and etcd the Kubernetes tests run: what
/// scripts/kube-apiserver.sh prints (it builds them once, then only checks the cache).
fn kube_bin_dir() -> anyhow::Result<String> {
    script_bin_dir(
        "kube-apiserver.sh",
        "kube-apiserver",
        "the Kubernetes tests need its kube-apiserver and etcd",
    )
}

/// The directory with the spire-server and spire-agent the SPIRE tests run: what
/// scripts/spire.sh prints (it builds them once, then only checks the cache).
fn spire_bin_dir() -> anyhow::Result<String> {
    script_bin_dir(
        "spire.sh",
        "spire-server",
        "the SPIRE tests need its spire-server and spire-agent",
    )
}

/// Runs scripts/`script`, which prints a directory holding `bin` (among others).
fn script_bin_dir(script: &str, bin: &str, why: &str) -> anyhow::Result<String> {
    let script = workspace_root().join("scripts").join(script);
    eprintln!("[xtask] {}", script.display());
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({}): {why}", script.display(), out.status);
    }
    let dir = String::from_utf8(out.stdout)?.trim().to_owned();
    anyhow::ensure!(
        std::path::Path::new(&dir).join(bin).is_file(),
        "{} printed {dir:?}, which holds no {bin}",
        script.display()
    );
    Ok(dir)
}

/// `cargo test` with its output passed through, closing with one summary line over all test
/// binaries (unit and end-to-end).
fn cargo_test() -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let kube_bin_dir = kube_bin_dir()?;
    let spire_bin_dir = spire_bin_dir()?;
    eprintln!(
        "[xtask] ZT_KUBE_BIN_DIR={kube_bin_dir} ZT_SPIRE_BIN_DIR={spire_bin_dir} cargo test --all-targets"
    );
    let mut child = Command::new(&cargo)
        .args(["test", "--all-targets"])
        .env("ZT_KUBE_BIN_DIR", &kube_bin_dir)
        .env("ZT_SPIRE_BIN_DIR", &spire_bin_dir)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    println!("summary: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Test => test(),
        Cmd::Unprivileged => unprivileged::run(),
        Cmd::Bench {
            smoke: true,
            what: None,
            ..
        } => {
            zt_tests::require_root()?;
            bench::paths::smoke()
        }
        Cmd::Bench {
            smoke: true,
            what: Some(_),
            ..
        } => bail!("--smoke runs the data path bench only: `cargo xtask bench --smoke`"),
        Cmd::Bench {
            quick, what: None, ..
        } => {
            zt_tests::require_root()?;
            bench::paths::run(quick)
        }
        Cmd::Bench {
            what: Some(BenchCmd::Policy),
            ..
        } => bench::policy(),
        Cmd::Bench {
            what: Some(BenchCmd::Micro),
            ..
        } => bench::micro(),
        Cmd::Bench {
            what: Some(BenchCmd::Crypto),
            ..
        } => bench::crypto(),
        Cmd::Bench {
            what: Some(BenchCmd::Directory),
            ..
        } => bench::directory::run(),
        Cmd::Bench {
            what:
                Some(BenchCmd::Cpu {
                    rounds,
                    seconds,
                    compare,
                }),
            ..
        } => {
            zt_tests::require_root()?;
            bench::cpu::run(&bench::cpu::Options {
                rounds,
                seconds,
                compare,
            })
        }
        Cmd::Bench {
            what: Some(BenchCmd::Profile),
            ..
        } => {
            zt_tests::require_root()?;
            bench::profile()
        }
        Cmd::Bench {
            quick,
            what: Some(BenchCmd::Memory),
            ..
        } => {
            zt_tests::require_root()?;
            bench::memory::run(quick)
        }
        Cmd::Soak {
            minutes,
            connections,
        } => soak::run(minutes, connections),
        Cmd::Fuzz {
            smoke,
            seconds,
            targets,
        } => {
            let seconds = if smoke {
                SMOKE_SECONDS
            } else {
                seconds.unwrap_or(600)
            };
            fuzz::run(seconds, &targets)
        }
        Cmd::Demo => {
            zt_tests::require_root()?;
            cargo(&["build"])?;
            demo::run()
        }
    }
}
