//! `cargo xtask fuzz`: runs every cargo-fuzz target in fuzz/ (libFuzzer, AddressSanitizer) for a
//! bounded time and prints executions per target. `--smoke` (30 s each) is part of the test suite.
//!
//! The pinned stable toolchain builds the targets: RUSTC_BOOTSTRAP=1 lets it take the -Z flags
//! cargo fuzz passes (a nightly would bring LLVM 23; docs/architecture.md, "Toolchain"). New inputs go to
//! fuzz/corpus/<target> (not committed); the committed seeds in fuzz/seeds/<target> are read too.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::workspace_root;

/// cargo fuzz with the flags every call shares (the same flags, so one build serves all).
fn cargo_fuzz(args: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("fuzz")
        .args(args)
        .args(["--fuzz-dir", "fuzz", "--release", "--debug-assertions"])
        .env("RUSTC_BOOTSTRAP", "1")
        .current_dir(workspace_root());
    cmd
}

fn targets() -> anyhow::Result<Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["fuzz", "list", "--fuzz-dir", "fuzz"])
        .current_dir(workspace_root())
        .output()
        .context("running cargo fuzz list (scripts/bootstrap.sh installs cargo-fuzz)")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(str::to_owned)
        .collect())
}

/// What one run reported (libFuzzer's -print_final_stats).
struct RunStats {
    executions: u64,
    corpus: u64,
}

fn stat(stderr: &str, name: &str) -> u64 {
    stderr
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix(name))
        .find_map(|rest| rest.trim_start_matches(':').trim().parse().ok())
        .unwrap_or(0)
}

fn run_one(target: &str, seconds: u64) -> anyhow::Result<RunStats> {
    let root = workspace_root();
    let corpus = root.join("fuzz/corpus").join(target);
    let seeds = root.join("fuzz/seeds").join(target);
    std::fs::create_dir_all(&corpus)?;
    eprintln!("[xtask] fuzz {target} for {seconds} s");
    let out = cargo_fuzz(&["run"])
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-print_final_stats=1",
            "-timeout=10",
            "-rss_limit_mb=4096",
            // Two cores: one fuzzing process, no forks.
            "-jobs=0",
        ])
        .output()
        .with_context(|| format!("running cargo fuzz run {target}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {target} failed ({}); the input is under fuzz/artifacts/{target}/\n{}",
            out.status,
            tail.join("\n")
        );
    }
    Ok(RunStats {
        executions: stat(&stderr, "stat::number_of_executed_units"),
        corpus: stat(&stderr, "stat::new_units_added"),
    })
}

/// Builds every target, runs each for `seconds`, prints a table, fails on the first finding.
pub fn run(seconds: u64, only: &[String]) -> anyhow::Result<()> {
    let status = cargo_fuzz(&["build"])
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    let all = targets()?;
    let chosen: Vec<&String> = all
        .iter()
        .filter(|t| only.is_empty() || only.contains(t))
        .collect();
    if chosen.is_empty() {
        bail!("no fuzz target matches {only:?}; there are {all:?}");
    }
    let mut rows = Vec::new();
    for target in chosen {
        let stats = run_one(target, seconds)?;
        if stats.executions == 0 {
            bail!("fuzz target {target} executed nothing");
        }
        rows.push((target.clone(), stats));
    }
    println!("fuzz: {seconds} s per target, no crash");
    println!("{:<20} {:>14} {:>12}", "target", "executions", "new inputs");
    for (target, stats) in rows {
        println!("{target:<20} {:>14} {:>12}", stats.executions, stats.corpus);
    }
    Ok(())
}
