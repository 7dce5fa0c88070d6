//! Root end-to-end test of an upgrade (issue 6): a new agent starts on a node while the old one
//! still serves it, takes over the pinned programs and, through SO_REUSEPORT, the in-pod
//! listeners; the old one drains on SIGTERM. A client opening connections in a loop through the
//! node sees no failure, and a connection opened before the handover completes.
use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use zt_tests::{
    Agent, Testbed,
    agent::{ca_init, meshed_config},
    bin_path,
    node_config::{Admin, Limits, MtlsMode},
    probe::Server,
};

const PORT: u16 = 9000;
const CHURN: usize = 4000;

/// Runs a prepared `zt-probe` command and parses its JSON report.
fn report(mut cmd: Command) -> Value {
    let out = cmd.output().unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn an_agent_hands_over_to_its_successor_without_dropping_a_connection() {
    let mut bed = Testbed::new(1).unwrap();
    let ca = bed.dir.join("ca");
    ca_init(&ca).unwrap();
    let (p11, p21) = (bed.pod(1, 1).clone(), bed.pod(2, 1).clone());
    let c1 = meshed_config(bed.node(1), &[&p11], &[&p21], &ca, MtlsMode::Strict);
    let c2 = meshed_config(bed.node(2), &[&p21], &[&p11], &ca, MtlsMode::Strict).limits(Limits {
        drain_seconds: Some(20),
        ..Limits::default()
    });
    // The successor runs beside the old agent in the same node namespace: other admin ports.
    let successor = c2.clone().admin(Admin {
        readiness_addr: SocketAddr::from(([127, 0, 0, 1], 15121)),
        metrics_addr: SocketAddr::from(([127, 0, 0, 1], 15120)),
        admin_addr: SocketAddr::from(([127, 0, 0, 1], 15100)),
    });
    let _agent1 = Agent::start_with_config(&mut bed, 1, &c1).unwrap();
    let old = Agent::start_with_config(&mut bed, 2, &c2).unwrap();
    let server = Server::start(&mut bed, &p21, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    let dst = SocketAddr::new(p21.ip(false), PORT);

    // Prepared before the threads borrow nothing of the bed, which starting the successor needs.
    let mut long = bed
        .pod_command(&p11, bin_path("zt-probe").unwrap())
        .unwrap();
    long.args([
        "connect",
        "--to",
        &dst.to_string(),
        "--bytes",
        "65536",
        "--idle-ms",
        "4000",
        "--timeout-ms",
        "10000",
    ]);
    let mut churn = bed
        .pod_command(&p11, bin_path("zt-probe").unwrap())
        .unwrap();
    churn.args([
        "churn",
        "--to",
        &dst.to_string(),
        "--count",
        &CHURN.to_string(),
        "--bytes",
        "100",
    ]);
    let long = std::thread::spawn(move || report(long));
    let started = Instant::now();
    let churn = std::thread::spawn(move || (report(churn), started.elapsed()));
    // The handover starts with traffic under way through the old agent.
    zt_tests::wait_until(Duration::from_secs(10), || {
        Ok(old.opened_connections()? >= 2)
    })
    .unwrap_or_else(|e| panic!("no traffic through the old agent: {e}\n{}", old.log_tail()));

    let new = Agent::start_with_config(&mut bed, 2, &successor).unwrap();
    old.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    zt_tests::wait_until(Duration::from_secs(25), || Ok(bed.exited(old.pid)))
        .unwrap_or_else(|e| panic!("old agent did not finish draining: {e}\n{}", old.log_tail()));
    let handover_done = started.elapsed();

    let (churned, churn_ended) = churn.join().unwrap();
    let long = long.join().unwrap();
    assert!(
        churn_ended > handover_done,
        "the client loop ({churn_ended:?}) ended before the handover ({handover_done:?})"
    );
    assert_eq!(
        churned["completed"].as_u64(),
        Some(CHURN as u64),
        "connections failed during the handover: {churned}\n--- old ---\n{}\n--- new ---\n{}",
        old.log_tail(),
        new.log_tail()
    );
    assert_eq!(long["reply"]["bytes"].as_u64(), Some(65536), "{long}");
    assert_eq!(long["reply"]["sha256"], long["sent_sha256"], "{long}");

    // The old agent drained and said so; the new one carries the traffic now.
    assert_eq!(
        old.count("draining: no longer ready, listeners closing")
            .unwrap(),
        1
    );
    assert_eq!(
        old.count("drain complete").unwrap(),
        1,
        "{}",
        old.log_tail()
    );
    let taken_over = new
        .access_records()
        .unwrap()
        .iter()
        .filter(|r| r["direction"] == "inbound")
        .count();
    assert!(taken_over > 0, "the successor carried no connection");
    server.expect_connections(CHURN + 1).unwrap();
}
