//! The demo: the test bed's topology (docs/architecture.md) with two nodes and two pods each, an agent per node, a few
//! flows, and a summary of what the agents captured. Everything is removed at the end, also on
//! Ctrl-C.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use serde_json::Value;
use zt_tests::{
    Agent, Testbed,
    agent::{ca_init, meshed_config},
    node_config::MtlsMode,
    probe::{Server, connect},
};

const PORT: u16 = 8080;

pub fn run() -> anyhow::Result<()> {
    let shared: Arc<Mutex<Option<Testbed>>> = Arc::new(Mutex::new(None));
    let on_interrupt = shared.clone();
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: cleaning up");
        // Dropping the bed kills its processes and removes namespaces, cgroups and pins.
        if let Ok(mut bed) = on_interrupt.lock() {
            bed.take();
        }
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;

    println!("building two nodes with two pods each (10.200.0.0/16, fd00:200::/48)...");
    *shared.lock().expect("lock") = Some(Testbed::new(2)?);
    let result = scenario(&shared);
    shared.lock().expect("lock").take();
    println!("cleaned up: namespaces, veths, cgroups, pins and processes removed");
    result
}

fn scenario(shared: &Mutex<Option<Testbed>>) -> anyhow::Result<()> {
    let mut guard = shared.lock().expect("lock");
    let bed = guard.as_mut().context("test bed gone")?;
    let (n1p1, n1p2) = (bed.pod(1, 1).clone(), bed.pod(1, 2).clone());
    let (n2p1, n2p2) = (bed.pod(2, 1).clone(), bed.pod(2, 2).clone());
    println!("creating the mesh CA (zt-daemon ca init, trust domain cluster.local)");
    let ca = bed.dir.join("ca");
    ca_init(&ca)?;
    println!(
        "starting agents: node1 enrolls n1p1 n1p2; node2 enrolls n2p1 (n2p2 stays outside the mesh)"
    );
    println!("mtls.mode = permissive, so the mesh still talks to n2p2 in plain TCP");
    let c1 = meshed_config(
        bed.node(1),
        &[&n1p1, &n1p2],
        &[&n2p1],
        &ca,
        MtlsMode::Permissive,
    );
    let c2 = meshed_config(
        bed.node(2),
        &[&n2p1],
        &[&n1p1, &n1p2],
        &ca,
        MtlsMode::Permissive,
    );
    let agent1 = Agent::start_with_config(bed, 1, &c1)?;
    let agent2 = Agent::start_with_config(bed, 2, &c2)?;
    for pod in [&n1p2, &n2p1, &n2p2] {
        Server::start(bed, pod, SocketAddr::from(([0u16; 8], PORT)))?;
    }

    let flows = [
        (
            &n1p1,
            SocketAddr::new(n2p1.ipv4.into(), PORT),
            4 << 20,
            "mesh -> mesh, cross-node, IPv4",
        ),
        (
            &n1p2,
            SocketAddr::new(n2p1.ipv6.into(), PORT),
            1 << 20,
            "mesh -> mesh, cross-node, IPv6",
        ),
        (
            &n1p1,
            SocketAddr::new(n1p2.ipv4.into(), PORT),
            1 << 20,
            "mesh -> mesh, same node",
        ),
        (
            &n1p1,
            SocketAddr::new(n2p2.ipv4.into(), PORT),
            64 << 10,
            "mesh -> outside the mesh",
        ),
        (
            &n2p2,
            SocketAddr::new(n1p2.ipv4.into(), PORT),
            16 << 10,
            "outside the mesh -> mesh",
        ),
    ];
    println!("\nflows:");
    for (from, to, bytes, what) in flows {
        let outcome = match connect(bed, from, to, bytes, Duration::from_secs(3))? {
            Ok(r) if r["reply"]["sha256"] == r["sent_sha256"] => {
                format!(
                    "ok, {} intact, app saw peer {}",
                    human(bytes),
                    r["peer"].as_str().unwrap_or("?")
                )
            }
            Ok(r) => format!("CORRUPTED: {r}"),
            Err(e) => format!("failed: {}", e["error"]),
        };
        println!(
            "  {:<5} -> {:<22} {:<32} {outcome}",
            from.name,
            to.to_string(),
            what
        );
    }
    std::thread::sleep(Duration::from_millis(300));

    println!("\nwhat the agents saw (their access logs):");
    println!(
        "  {:<6} {:<9} {:<23} {:<10} {:>9}  {:<45} -> destination identity",
        "agent", "direction", "original dst", "security", "sent", "source identity"
    );
    for (name, agent) in [("node1", &agent1), ("node2", &agent2)] {
        for r in agent.access_records()? {
            println!(
                "  {:<6} {:<9} {:<23} {:<10} {:>9}  {:<45} -> {}",
                name,
                field(&r, "direction"),
                field(&r, "original_dst"),
                field(&r, "connection_security_policy"),
                human(r["bytes_sent"].as_u64().unwrap_or(0)),
                field(&r, "source_identity"),
                field(&r, "destination_identity"),
            );
        }
    }
    println!(
        "\n(n2p2 is not enrolled: its own connects are not captured, so node2 shows no outbound row)"
    );
    Ok(())
}

fn field<'a>(r: &'a Value, key: &str) -> &'a str {
    r[key].as_str().unwrap_or("-")
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
