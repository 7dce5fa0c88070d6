//! Driving zt-probe inside pods: a server that records every connection it receives, and a client
//! that reports what its socket saw.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use serde_json::Value;

use crate::{Pod, Testbed, bin_path, read_json_lines, wait_until};

pub struct Server {
    pub pid: u32,
    pub log: PathBuf,
}

impl Server {
    /// Starts `zt-probe serve` in `pod` and waits until it listens.
    pub fn start(bed: &mut Testbed, pod: &Pod, listen: SocketAddr) -> anyhow::Result<Self> {
        Self::start_sending(bed, pod, listen, 0)
    }

    /// As [`Self::start`], the server also sending `send` random bytes to every client.
    pub fn start_sending(
        bed: &mut Testbed,
        pod: &Pod,
        listen: SocketAddr,
        send: u64,
    ) -> anyhow::Result<Self> {
        Self::start_with(bed, pod, listen, &["--send", &send.to_string()])
    }

    /// As [`Self::start`], counting without hashing (benchmarks).
    pub fn start_discarding(
        bed: &mut Testbed,
        pod: &Pod,
        listen: SocketAddr,
    ) -> anyhow::Result<Self> {
        Self::start_with(bed, pod, listen, &["--discard"])
    }

    fn start_with(
        bed: &mut Testbed,
        pod: &Pod,
        listen: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let log_name = format!("server-{}-{}.log", pod.name, listen.port());
        let mut cmd = bed.pod_command(pod, bin_path("zt-probe")?)?;
        cmd.args(["serve", "--listen", &listen.to_string()])
            .args(extra);
        let pid = bed.spawn(cmd, &log_name)?;
        let server = Server {
            pid,
            log: bed.log_path(&log_name),
        };
        wait_until(Duration::from_secs(5), || {
            Ok(read_json_lines(&server.log)?
                .iter()
                .any(|e| e["event"] == "listening"))
        })
        .with_context(|| format!("server in {} did not start listening on {listen}", pod.name))?;
        Ok(server)
    }

    /// Waits until the server has recorded exactly `n` finished connections (it records each
    /// just after replying, so a client can be done a moment before the record appears).
    pub fn expect_connections(&self, n: usize) -> anyhow::Result<Vec<Value>> {
        let mut seen = Vec::new();
        let waited = wait_until(Duration::from_secs(5), || {
            seen = self.connections()?;
            Ok(seen.len() >= n)
        });
        if waited.is_err() || seen.len() != n {
            anyhow::bail!("server recorded {} connections, expected {n}", seen.len());
        }
        Ok(seen)
    }

    /// Every connection the server has finished, in order.
    pub fn connections(&self) -> anyhow::Result<Vec<Value>> {
        Ok(read_json_lines(&self.log)?
            .into_iter()
            .filter(|e| e["event"] == "connection")
            .collect())
    }
}

/// Runs `zt-probe connect` in `pod`; Ok carries the report of a completed exchange, Err the
/// probe's error report (refused, timed out, ...).
pub fn connect(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    bytes: u64,
    timeout: Duration,
) -> anyhow::Result<Result<Value, Value>> {
    connect_with_pattern(bed, pod, to, bytes, timeout, None)
}

/// Full duplex: sends `bytes` while receiving the `expect` bytes a sending server sends.
pub fn connect_duplex(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    bytes: u64,
    expect: u64,
    timeout: Duration,
) -> anyhow::Result<Result<Value, Value>> {
    run_connect(
        bed,
        pod,
        to,
        bytes,
        timeout,
        &["--expect", &expect.to_string()],
    )
}

/// Sends `bytes`, then resets the connection (RST) instead of closing it.
pub fn connect_and_reset(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    bytes: u64,
) -> anyhow::Result<Result<Value, Value>> {
    run_connect(bed, pod, to, bytes, Duration::from_secs(3), &["--reset"])
}

/// As [`connect`], staying silent for `idle` after connecting.
pub fn connect_after_idle(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    idle: Duration,
) -> anyhow::Result<Result<Value, Value>> {
    run_connect(
        bed,
        pod,
        to,
        1024,
        Duration::from_secs(3),
        &["--idle-ms", &idle.as_millis().to_string()],
    )
}

/// As [`connect`], sending `pattern` repeated instead of random bytes.
pub fn connect_with_pattern(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    bytes: u64,
    timeout: Duration,
    pattern: Option<&str>,
) -> anyhow::Result<Result<Value, Value>> {
    let pattern_args: Vec<&str> = pattern.map(|p| vec!["--pattern", p]).unwrap_or_default();
    run_connect(bed, pod, to, bytes, timeout, &pattern_args)
}

fn run_connect(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    bytes: u64,
    timeout: Duration,
    extra: &[&str],
) -> anyhow::Result<Result<Value, Value>> {
    let mut cmd = bed.pod_command(pod, bin_path("zt-probe")?)?;
    let (to, bytes, timeout) = (
        to.to_string(),
        bytes.to_string(),
        timeout.as_millis().to_string(),
    );
    cmd.args([
        "connect",
        "--to",
        &to,
        "--bytes",
        &bytes,
        "--timeout-ms",
        &timeout,
    ]);
    cmd.args(extra);
    let out = cmd.output().context("running zt-probe connect")?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "zt-probe connect printed no report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok(if out.status.success() {
        Ok(report)
    } else {
        Err(report)
    })
}

/// Runs `zt-probe bind` in `pod`.
pub fn try_bind(bed: &Testbed, pod: &Pod, port: u16) -> anyhow::Result<Value> {
    let mut cmd = bed.pod_command(pod, bin_path("zt-probe")?)?;
    cmd.args(["bind", "--port", &port.to_string()]);
    let out = cmd.output().context("running zt-probe bind")?;
    serde_json::from_slice(&out.stdout).context("zt-probe bind printed no report")
}

/// `count` sequential connections from `pod` to `to`, each sending `bytes`; how many completed.
pub fn churn(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    count: usize,
    bytes: usize,
) -> anyhow::Result<u64> {
    let mut cmd = bed.pod_command(pod, bin_path("zt-probe")?)?;
    cmd.args([
        "churn",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
        "--bytes",
        &bytes.to_string(),
    ]);
    let out = cmd.output().context("running zt-probe churn")?;
    let report: Value =
        serde_json::from_slice(&out.stdout).context("zt-probe churn printed no report")?;
    report["completed"].as_u64().context("no completed count")
}
