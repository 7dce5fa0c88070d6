//! `cargo xtask bench profile`: where zt cross-node's time goes, from system-wide `perf record`
//! call graphs on the data path bench's topology.
use std::time::Duration;

use anyhow::Context as _;

use super::{
    load::{connection_rate, iperf, round_trips},
    topology::Topology,
    use_release_binaries,
};

/// `cargo xtask bench profile`: system-wide `perf record` (call graphs) of zt cross-node during
/// one iperf3 stream, 1 KiB round trips and new connections; prints where the agents' time goes
/// and leaves the recordings in target/ for `perf report -i`.
pub fn profile() -> anyhow::Result<()> {
    use_release_binaries()?;
    let topology = Topology::start()?;
    let route = topology.cross_node();
    let target = super::target_dir(&crate::workspace_root());
    let pids = topology
        .agents
        .iter()
        .map(|a| a.pid.to_string())
        .collect::<Vec<_>>()
        .join(",");
    type Workload<'a> = Box<dyn Fn() -> anyhow::Result<()> + 'a>;
    let bed = &topology.bed;
    let workloads: [(&str, Workload); 3] = [
        (
            "throughput",
            Box::new(|| iperf(bed, route, 1, 10).map(|_| ())),
        ),
        (
            "rr",
            Box::new(|| round_trips(bed, route, 1024, 50_000).map(|_| ())),
        ),
        (
            "connections",
            Box::new(|| connection_rate(bed, route, 3000).map(|_| ())),
        ),
    ];
    for (name, workload) in workloads {
        let data = target.join(format!("profile-{name}.data"));
        let mut perf = std::process::Command::new("perf")
            .args(["record", "-a", "-g", "-e", "cpu-clock", "-o"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("running perf (Debian: linux-perf)")?;
        std::thread::sleep(Duration::from_millis(500));
        let outcome = workload();
        // SIGINT: perf writes the recording and exits.
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
        perf.wait()?;
        outcome?;
        for sort in ["comm,dso", "sym"] {
            let report = std::process::Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "--percent-limit",
                    "1.5",
                ])
                .args(["--sort", sort, "-g", "none", "-i"])
                .arg(&data)
                .args(if sort == "sym" {
                    vec!["--pid", &pids]
                } else {
                    vec![]
                })
                .output()?;
            println!(
                "== {name}: by {sort}{} ==\n{}",
                if sort == "sym" { " (agents only)" } else { "" },
                String::from_utf8_lossy(&report.stdout)
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        println!("(recording: {})\n", data.display());
    }
    Ok(())
}
