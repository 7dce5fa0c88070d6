//! Where the benchmarks' clients and servers run. A round trip between two processes on one vCPU
//! costs about a quarter of one between two vCPUs here, so leaving placement to the scheduler
//! makes "added latency" compare unlike things. Every client (iperf3, zt-probe) runs on vCPU 0
//! and every server on vCPU 1, for the zt paths and the baselines alike, as client and server
//! on two machines would; the proxies (agents, HAProxy) run wherever the scheduler puts them.
//! A process started from a pinned thread inherits its CPU set, which is how the pods' programs
//! are placed without changing how they are started.
use anyhow::Context as _;
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

/// Whether the machine has the two vCPUs the placement needs.
pub fn pinned() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() > SERVER_CPU)
}

/// What the reports say about placement.
pub fn describe() -> &'static str {
    if pinned() {
        "clients on vCPU 0, servers on vCPU 1 (taskset-style affinity), proxies unpinned"
    } else {
        "one vCPU: clients, servers and proxies share it"
    }
}

/// Runs `start` with the calling thread on the clients' vCPU: what it starts runs there.
pub fn as_client<T>(start: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    on_cpu(CLIENT_CPU, start)
}

/// Runs `start` with the calling thread on the servers' vCPU: what it starts runs there.
pub fn as_server<T>(start: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    on_cpu(SERVER_CPU, start)
}

fn on_cpu<T>(cpu: usize, start: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    if !pinned() {
        return start();
    }
    let this_thread = Pid::from_raw(0);
    let all = sched_getaffinity(this_thread).context("reading this thread's CPU set")?;
    let mut one = CpuSet::new();
    one.set(cpu).context("CPU set")?;
    sched_setaffinity(this_thread, &one).with_context(|| format!("pinning to vCPU {cpu}"))?;
    let outcome = start();
    sched_setaffinity(this_thread, &all).context("restoring this thread's CPU set")?;
    outcome
}
