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
        let (pid, log) = spawn_listening(bed, pod, "serve", listen, extra)?;
        Ok(Server { pid, log })
    }

    /// Waits until the server has recorded exactly `n` finished connections (it records each
    /// before replying, but a client that did not wait for the reply can be done first).
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
/// Starts `zt-probe <what> --listen <listen>` in `pod` and waits until it listens.
fn spawn_listening(
    bed: &mut Testbed,
    pod: &Pod,
    what: &str,
    listen: SocketAddr,
    extra: &[&str],
) -> anyhow::Result<(u32, PathBuf)> {
    let log_name = format!("{what}-{}-{}.log", pod.name, listen.port());
    let mut cmd = bed.pod_command(pod, bin_path("zt-probe")?)?;
    cmd.args([what, "--listen", &listen.to_string()])
        .args(extra);
    let pid = bed.spawn(cmd, &log_name)?;
    let log = bed.log_path(&log_name);
    wait_until(Duration::from_secs(5), || {
        Ok(read_json_lines(&log)?
            .iter()
            .any(|e| e["event"] == "listening"))
    })
    .with_context(|| format!("{what} in {} did not start listening on {listen}", pod.name))?;
    Ok((pid, log))
}

/// Starts `zt-probe echo` in `pod` (every byte received is sent back); waits until it listens.
pub fn start_echo(bed: &mut Testbed, pod: &Pod, listen: SocketAddr) -> anyhow::Result<u32> {
    Ok(spawn_listening(bed, pod, "echo", listen, &[])?.0)
}

/// `zt-probe steady` in a pod: one long-lived connection to an echo server carrying a checked
/// echo every 200 ms until the file `until` exists.
pub struct Steady {
    pub log: PathBuf,
}

impl Steady {
    pub fn start(
        bed: &mut Testbed,
        pod: &Pod,
        to: SocketAddr,
        until: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let log_name = format!("steady-{}-{}.log", pod.name, to.port());
        let mut cmd = bed.pod_command(pod, bin_path("zt-probe")?)?;
        cmd.args(["steady", "--to", &to.to_string(), "--until"])
            .arg(until);
        bed.spawn(cmd, &log_name)?;
        Ok(Steady {
            log: bed.log_path(&log_name),
        })
    }

    /// Echoes checked so far (0 before the first), or the `done` event's error.
    pub fn round_trips(&self) -> anyhow::Result<u64> {
        let events = read_json_lines(&self.log)?;
        if let Some(done) = events.iter().find(|e| e["event"] == "done") {
            anyhow::ensure!(done["ok"] == true, "the steady connection failed: {done}");
        }
        Ok(events
            .iter()
            .filter(|e| e["event"] == "round_trip")
            .filter_map(|e| e["n"].as_u64())
            .max()
            .unwrap_or(0))
    }

    /// The local addresses of its connection, one per echo (a single one: it never reconnected).
    pub fn locals(&self) -> anyhow::Result<std::collections::BTreeSet<String>> {
        Ok(read_json_lines(&self.log)?
            .iter()
            .filter_map(|e| e["local"].as_str().map(str::to_owned))
            .collect())
    }

    /// Waits for its `done` event (after `until` was created).
    pub fn wait_done(&self) -> anyhow::Result<Value> {
        let mut done = None;
        wait_until(Duration::from_secs(30), || {
            done = read_json_lines(&self.log)?
                .into_iter()
                .find(|e| e["event"] == "done");
            Ok(done.is_some())
        })
        .context("zt-probe steady never finished")?;
        Ok(done.unwrap_or_default())
    }
}

/// `zt-probe tally` in a pod: every byte received, counted as it arrives, with timestamps.
pub struct Tally {
    pub log: PathBuf,
}

impl Tally {
    pub fn start(bed: &mut Testbed, pod: &Pod, listen: SocketAddr) -> anyhow::Result<Self> {
        let (_, log) = spawn_listening(bed, pod, "tally", listen, &[])?;
        Ok(Self { log })
    }

    /// (Unix time in ms, bytes received so far), oldest first.
    pub fn samples(&self) -> anyhow::Result<Vec<(u64, u64)>> {
        Ok(read_json_lines(&self.log)?
            .iter()
            .filter(|e| e["event"] == "tally")
            .filter_map(|e| Some((e["at_ms"].as_u64()?, e["bytes"].as_u64()?)))
            .collect())
    }
}

/// `zt-probe flood` in a pod, run as an attacker would: unprivileged. `count` connections to
/// `to` that never send a byte, held for `hold` unless the peer closes them.
pub struct Flood {
    pub pid: u32,
    pub log: PathBuf,
}

impl Flood {
    pub fn start(
        bed: &mut Testbed,
        pod: &Pod,
        to: SocketAddr,
        count: usize,
        hold: Duration,
    ) -> anyhow::Result<Self> {
        let log_name = format!("flood-{}-{}.log", pod.name, to.port());
        let mut cmd = bed.unprivileged_pod_command(pod, &bin_path("zt-probe")?)?;
        cmd.args(["flood", "--to", &to.to_string()])
            .args(["--count", &count.to_string()])
            .args(["--hold-ms", &hold.as_millis().to_string()]);
        let pid = bed.spawn(cmd, &log_name)?;
        Ok(Self {
            pid,
            log: bed.log_path(&log_name),
        })
    }

    /// Waits for the event `event` (`opened`: every connection is open; `done`: the summary).
    pub fn wait(&self, event: &str, timeout: Duration) -> anyhow::Result<Value> {
        let mut found = None;
        wait_until(timeout, || {
            found = read_json_lines(&self.log)?
                .into_iter()
                .find(|e| e["event"] == event);
            Ok(found.is_some())
        })
        .with_context(|| format!("flood {}: no {event:?} event", self.log.display()))?;
        Ok(found.expect("found"))
    }
}

/// Bytes received by `at_ms`, from tally samples.
pub fn received_by(samples: &[(u64, u64)], at_ms: u64) -> u64 {
    samples
        .iter()
        .take_while(|(t, _)| *t <= at_ms)
        .last()
        .map_or(0, |(_, b)| *b)
}

/// Starts `zt-probe load` in `pod` against `to` for `duration`; returns its PID and log.
pub fn start_load(
    bed: &mut Testbed,
    pod: &Pod,
    to: SocketAddr,
    workers: usize,
    duration: Duration,
) -> anyhow::Result<(u32, PathBuf)> {
    let log_name = format!("load-{}-{}.log", pod.name, to.port());
    let mut cmd = bed.pod_command(pod, bin_path("zt-probe")?)?;
    cmd.args(["load", "--to", &to.to_string()])
        .args(["--workers", &workers.to_string()])
        .args(["--duration-ms", &duration.as_millis().to_string()]);
    let pid = bed.spawn(cmd, &log_name)?;
    Ok((pid, bed.log_path(&log_name)))
}

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

/// As [`connect`], staying silent after connecting until the file `go` exists (the test creates
/// it once what it waits for has happened), then sending 1024 bytes.
pub fn connect_idle_until(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    go: &std::path::Path,
) -> anyhow::Result<Result<Value, Value>> {
    connect_waiting(bed, pod, to, go, None)
}

/// As [`connect_idle_until`], sending one byte every `every` while it waits for `go`: quiet,
/// never idle. Its report's `sent` counts those bytes too.
pub fn connect_chatty_until(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    go: &std::path::Path,
    every: Duration,
) -> anyhow::Result<Result<Value, Value>> {
    connect_waiting(bed, pod, to, go, Some(every))
}

/// As [`connect_idle_until`], neither sending nor reading until `go` exists; then full duplex
/// as [`connect_duplex`]: sends `bytes` and half-closes while receiving the `expect` bytes a
/// sending server sends.
pub fn connect_duplex_after(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    go: &std::path::Path,
    bytes: u64,
    expect: u64,
) -> anyhow::Result<Result<Value, Value>> {
    let expect = expect.to_string();
    let go = go.display().to_string();
    let args = ["--idle-until", go.as_str(), "--expect", expect.as_str()];
    run_connect(bed, pod, to, bytes, Duration::from_secs(3), &args)
}

fn connect_waiting(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    go: &std::path::Path,
    chatter: Option<Duration>,
) -> anyhow::Result<Result<Value, Value>> {
    let mut args = vec!["--idle-until".to_owned(), go.display().to_string()];
    if let Some(every) = chatter {
        args.extend(["--chatter-ms".to_owned(), every.as_millis().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_connect(bed, pod, to, 1024, Duration::from_secs(3), &args)
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

/// `count` connections from `pod` to `to` opened at the same instant, each sending `bytes`; the
/// probe's report (`completed`, `error`).
pub fn burst(bed: &Testbed, pod: &Pod, to: SocketAddr, count: usize) -> anyhow::Result<Value> {
    let mut cmd = bed.pod_command(pod, bin_path("zt-probe")?)?;
    cmd.args([
        "burst",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    let out = cmd.output().context("running zt-probe burst")?;
    serde_json::from_slice(&out.stdout).context("zt-probe burst printed no report")
}

/// `count` sequential connections from `pod` to `to`, each sending `bytes`; how many completed.
pub fn churn(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    count: usize,
    bytes: usize,
) -> anyhow::Result<u64> {
    let report = run_churn(bed, pod, to, count, bytes, false)?;
    report["completed"].as_u64().context("no completed count")
}

/// As [`churn`], to a `serve` server, each connection checked whole: the server's bytes, then its
/// report counting the `bytes` it received. The report: `completed`, `corrupt` (ended cleanly
/// with other bytes), and the first `error`.
pub fn churn_whole(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    count: usize,
    bytes: usize,
) -> anyhow::Result<Value> {
    run_churn(bed, pod, to, count, bytes, true)
}

fn run_churn(
    bed: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    count: usize,
    bytes: usize,
    whole_reply: bool,
) -> anyhow::Result<Value> {
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
    if whole_reply {
        cmd.arg("--whole-reply");
    }
    let out = cmd.output().context("running zt-probe churn")?;
    serde_json::from_slice(&out.stdout).context("zt-probe churn printed no report")
}

/// Asserts that the echo of a `connect` report came back whole: `bytes` bytes with the digest
/// of what was sent.
pub fn intact(report: &Value, bytes: u64) {
    assert_eq!(report["reply"]["bytes"].as_u64(), Some(bytes), "{report}");
    assert_eq!(report["reply"]["sha256"], report["sent_sha256"], "{report}");
}
