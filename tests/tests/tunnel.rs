//! Root end-to-end tests of the HBONE mTLS tunnel (issue 4): captured connections between meshed
//! pods cross nodes as HTTP/2 CONNECT streams over TLS 1.3 on port 15008, each side presenting
//! its own workload's SVID.
use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use zt_tests::{
    Agent, Testbed,
    agent::{meshed_config, mutual_tls_records, spiffe_id},
    in_cgroup_and_netns,
    node_config::{Egress, Endpoint, MtlsMode, NodeConfigBuilder, PolicyDefault},
    probe::{Server, burst, connect, connect_duplex, connect_with_pattern, intact},
};

mod rogue;

const MIB: u64 = 1024 * 1024;
const PORT: u16 = 9000;
const TIMEOUT: Duration = Duration::from_secs(3);

struct Mesh {
    bed: Testbed,
    agent1: Agent,
    agent2: Agent,
    server: Server,
}

/// n1p1 and n2p1 are meshed (one per node), n1p2 is meshed on node 1 too, n2p2 is outside.
fn mesh(mode: MtlsMode) -> Mesh {
    mesh_with(mode, |c1, c2| (c1, c2))
}

/// As [`mesh`], with the agents' configs (node 1's, node 2's) changed by `tune`.
fn mesh_with(
    mode: MtlsMode,
    tune: impl FnOnce(NodeConfigBuilder, NodeConfigBuilder) -> (NodeConfigBuilder, NodeConfigBuilder),
) -> Mesh {
    let mut bed = Testbed::new(2).unwrap();
    let ca = bed.dir.join("ca");
    zt_tests::agent::ca_init(&ca).unwrap();
    let (p11, p12, p21) = (
        bed.pod(1, 1).clone(),
        bed.pod(1, 2).clone(),
        bed.pod(2, 1).clone(),
    );
    let (c1, c2) = tune(
        meshed_config(bed.node(1), &[&p11, &p12], &[&p21], &ca, mode),
        meshed_config(bed.node(2), &[&p21], &[&p11, &p12], &ca, mode),
    );
    let agent1 = Agent::start_with_config(&mut bed, 1, &c1).unwrap();
    let agent2 = Agent::start_with_config(&mut bed, 2, &c2).unwrap();
    let server = Server::start(&mut bed, &p21, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    Mesh {
        bed,
        agent1,
        agent2,
        server,
    }
}

#[test]
fn cross_node_connection_travels_over_mutual_tls_with_both_identities() {
    let m = mesh(MtlsMode::Strict);
    let (p11, p21) = (m.bed.pod(1, 1), m.bed.pod(2, 1));
    for v6 in [false, true] {
        let dst = SocketAddr::new(p21.ip(v6), PORT);
        let report = connect(&m.bed, p11, dst, 16 * MIB, TIMEOUT)
            .unwrap()
            .expect("transfer");
        intact(&report, 16 * MIB);
        assert_eq!(report["peer"], dst.to_string());
        let (out, _) =
            mutual_tls_records(&m.agent1, &m.agent2, dst, &spiffe_id(p11), &spiffe_id(p21))
                .unwrap();
        assert_eq!(out["bytes_sent"].as_u64(), Some(16 * MIB), "{out}");
    }
    m.server.expect_connections(2).unwrap();
}

#[test]
fn same_node_connection_uses_the_tunnel_too() {
    let mut m = mesh(MtlsMode::Strict);
    let (p11, p12) = (m.bed.pod(1, 1).clone(), m.bed.pod(1, 2).clone());
    Server::start(&mut m.bed, &p12, SocketAddr::from(([0, 0, 0, 0], PORT))).unwrap();
    let dst = SocketAddr::new(p12.ip(false), PORT);
    let report = connect(&m.bed, &p11, dst, 4 * MIB, TIMEOUT)
        .unwrap()
        .expect("transfer");
    intact(&report, 4 * MIB);
    let inb = m
        .agent1
        .wait_access("same-node inbound", |r| r["direction"] == "inbound")
        .unwrap();
    assert_eq!(inb["connection_security_policy"], "mutual_tls", "{inb}");
    assert_eq!(inb["source_identity"], spiffe_id(&p11).as_str(), "{inb}");
    assert_eq!(
        inb["destination_identity"],
        spiffe_id(&p12).as_str(),
        "{inb}"
    );
}

#[test]
fn strict_refuses_plaintext_inbound_and_egress_follows_its_own_policy() {
    let mut strict = mesh(MtlsMode::Strict);
    let (p11, p21, p22) = (
        strict.bed.pod(1, 1).clone(),
        strict.bed.pod(2, 1).clone(),
        strict.bed.pod(2, 2).clone(),
    );
    Server::start(
        &mut strict.bed,
        &p22,
        SocketAddr::from(([0, 0, 0, 0], PORT)),
    )
    .unwrap();
    Server::start(
        &mut strict.bed,
        &p22,
        SocketAddr::from(([0, 0, 0, 0], PORT + 1)),
    )
    .unwrap();
    // Outbound to a destination outside the mesh: `mtls.mode` decides inbound only; egress is
    // allowed by default, in plaintext, and logged as such.
    let outside = SocketAddr::new(p22.ip(false), PORT);
    intact(
        &connect(&strict.bed, &p11, outside, 1024, TIMEOUT)
            .unwrap()
            .unwrap(),
        1024,
    );
    let out = strict
        .agent1
        .wait_access("plaintext egress", |r| r["direction"] == "outbound")
        .unwrap();
    assert_eq!(out["connection_security_policy"], "none", "{out}");
    assert_eq!(out["close"], "eof", "{out}");

    // Locked down: only the allowed address and port leave.
    let ca = strict.bed.dir.join("ca");
    let p12 = strict.bed.pod(1, 2).clone();
    let locked = meshed_config(
        strict.bed.node(1),
        &[&p11, &p12],
        &[&p21],
        &ca,
        MtlsMode::Strict,
    )
    .egress(Egress::deny().allow(format!("{}/32", p22.ipv4), &[PORT]));
    strict.agent1.reload(&locked).unwrap();
    intact(
        &connect(&strict.bed, &p11, outside, 1024, TIMEOUT)
            .unwrap()
            .unwrap(),
        1024,
    );
    let other_port = SocketAddr::new(p22.ip(false), PORT + 1);
    let other_address = SocketAddr::new(p22.ip(true), PORT);
    for denied in [other_port, other_address] {
        assert!(
            connect(&strict.bed, &p11, denied, 1024, TIMEOUT)
                .unwrap()
                .is_err(),
            "{denied} is not allowed"
        );
        let refused = strict
            .agent1
            .wait_access("refused egress", |r| {
                r["direction"] == "outbound" && r["original_dst"] == denied.to_string()
            })
            .unwrap();
        assert_eq!(refused["close"], "egress_denied", "{refused}");
        assert_eq!(refused["bytes_sent"], 0, "{refused}");
    }
    let refusals = strict
        .agent1
        .metric_lines("zt_outbound_refusals_total")
        .unwrap();
    assert!(
        refusals
            .iter()
            .any(|l| l == "zt_outbound_refusals_total{reason=\"egress_denied\"} 2"),
        "{refusals:?}"
    );
    // Plaintext inbound to a meshed pod from outside the mesh.
    let meshed = SocketAddr::new(p21.ip(false), PORT);
    assert!(
        connect(&strict.bed, &p22, meshed, 1024, TIMEOUT)
            .unwrap()
            .is_err()
    );
    assert!(
        strict.server.connections().unwrap().is_empty(),
        "strict let plaintext through"
    );
    drop(strict);

    let mut permissive = mesh(MtlsMode::Permissive);
    let (p11, p21, p22) = (
        permissive.bed.pod(1, 1).clone(),
        permissive.bed.pod(2, 1).clone(),
        permissive.bed.pod(2, 2).clone(),
    );
    Server::start(
        &mut permissive.bed,
        &p22,
        SocketAddr::from(([0, 0, 0, 0], PORT)),
    )
    .unwrap();
    intact(
        &connect(
            &permissive.bed,
            &p11,
            SocketAddr::new(p22.ip(false), PORT),
            1024,
            TIMEOUT,
        )
        .unwrap()
        .unwrap(),
        1024,
    );
    intact(
        &connect(
            &permissive.bed,
            &p22,
            SocketAddr::new(p21.ip(false), PORT),
            1024,
            TIMEOUT,
        )
        .unwrap()
        .unwrap(),
        1024,
    );
    let out = permissive
        .agent1
        .wait_access("plain outbound", |r| r["direction"] == "outbound")
        .unwrap();
    assert_eq!(out["connection_security_policy"], "none", "{out}");
}

#[test]
fn wire_between_nodes_carries_only_tls_on_15008() {
    let mut m = mesh(MtlsMode::Strict);
    let marker = "ZT-WIRE-MARKER-a1b2c3d4e5";
    let (p11, p21) = (m.bed.pod(1, 1).clone(), m.bed.pod(2, 1).clone());
    let node1 = m.bed.node(1).clone();
    let pcap = m.bed.dir.join("wire.pcap");
    let link = format!("{}-x1", m.bed.id);
    let mut tcpdump = in_cgroup_and_netns("tcpdump", None, &node1.netns).unwrap();
    tcpdump
        .args(["-i", &link, "-U", "-w"])
        .arg(&pcap)
        .args(["tcp"]);
    let pid = m.bed.spawn(tcpdump, "tcpdump.log").unwrap();
    // tcpdump says so once its capture is open.
    let tcpdump_log = m.bed.log_path("tcpdump.log");
    zt_tests::wait_until(Duration::from_secs(10), || {
        Ok(std::fs::read_to_string(&tcpdump_log).is_ok_and(|l| l.contains("listening on")))
    })
    .unwrap();

    let dst = SocketAddr::new(p21.ip(false), PORT);
    let report = connect_with_pattern(&m.bed, &p11, dst, MIB, TIMEOUT, Some(marker))
        .unwrap()
        .expect("transfer");
    // Pattern mode is not hashed by the client; the byte count proves delivery.
    assert_eq!(report["reply"]["bytes"].as_u64(), Some(MIB), "{report}");
    // -U writes each packet as it is captured: once the transfer's volume is in, it is all in.
    zt_tests::wait_until(Duration::from_secs(10), || {
        Ok(std::fs::metadata(&pcap)?.len() > MIB)
    })
    .unwrap();
    m.bed.kill(pid);

    let captured = std::fs::read(&pcap).unwrap();
    assert!(
        captured.len() > (MIB / 2) as usize,
        "capture too small ({} bytes): not on the data path?",
        captured.len()
    );
    let found = captured
        .windows(marker.len())
        .any(|w| w == marker.as_bytes());
    assert!(!found, "the marker crossed the wire in clear text");
    let summary = std::process::Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(&pcap)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&summary.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(" IP ")).collect();
    assert!(!lines.is_empty(), "no packets captured");
    for l in &lines {
        assert!(
            l.contains(".15008 ") || l.contains(".15008:"),
            "traffic not on 15008: {l}"
        );
    }
    let _ = m.agent2;
}

#[test]
fn sequential_connections_share_one_pooled_tls_session() {
    let m = mesh(MtlsMode::Strict);
    let (p11, p21) = (m.bed.pod(1, 1), m.bed.pod(2, 1));
    let dst = SocketAddr::new(p21.ip(false), PORT);
    for _ in 0..100 {
        intact(
            &connect(&m.bed, p11, dst, 1024, TIMEOUT)
                .unwrap()
                .expect("transfer"),
            1024,
        );
    }
    m.server.expect_connections(100).unwrap();
    let handshakes = m.agent2.count("HBONE connection accepted").unwrap();
    assert_eq!(
        handshakes, 1,
        "100 connections took {handshakes} TLS handshakes"
    );
}

/// 256 MiB each way at once through the tunnel, from n1p1 to n2p1 or (same node) n1p2; both
/// ends compare checksums. Node 1's agent runs one worker thread (`[runtime] worker_threads`):
/// it alone polls both directions of the client's connection, the HTTP/2 connection and,
/// same-node, the inbound side too, so a task that blocked its thread would stall the transfer.
/// Node 2's runs three, more than this machine's CPUs.
fn duplex(cross_node: bool) {
    let mut m = mesh_with(MtlsMode::Strict, |c1, c2| {
        (c1.worker_threads(1), c2.worker_threads(3))
    });
    for (agent, threads) in [(&m.agent1, 1), (&m.agent2, 3)] {
        let ready = agent.events().unwrap();
        let ready = ready
            .iter()
            .find(|e| e["message"] == "agent ready")
            .unwrap();
        // The runtime's own count.
        assert_eq!(ready["worker_threads"], threads, "{ready}");
    }
    let client = m.bed.pod(1, 1).clone();
    let target = if cross_node {
        m.bed.pod(2, 1).clone()
    } else {
        m.bed.pod(1, 2).clone()
    };
    let port = PORT + 1;
    Server::start_sending(
        &mut m.bed,
        &target,
        SocketAddr::from(([0, 0, 0, 0], port)),
        256 * MIB,
    )
    .unwrap();
    let dst = SocketAddr::new(target.ip(false), port);
    let r = connect_duplex(
        &m.bed,
        &client,
        dst,
        256 * MIB,
        256 * MIB,
        Duration::from_secs(30),
    )
    .unwrap()
    .unwrap_or_else(|e| panic!("duplex transfer failed: {e}"));
    intact(&r, 256 * MIB);
    assert_eq!(r["received"].as_u64(), Some(256 * MIB), "{r}");
    assert_eq!(
        r["received_sha256"], r["reply"]["sent_sha256"],
        "server -> client checksum: {r}"
    );
    let agent = if cross_node { &m.agent2 } else { &m.agent1 };
    let inb = agent
        .wait_access("duplex inbound", |r| r["direction"] == "inbound")
        .unwrap();
    assert_eq!(inb["connection_security_policy"], "mutual_tls");
    assert_eq!(inb["bytes_sent"].as_u64(), Some(256 * MIB), "{inb}");
    assert!(
        inb["bytes_received"].as_u64().unwrap() >= 256 * MIB,
        "{inb}"
    );
}

#[test]
fn cross_node_256_mib_both_ways_at_once() {
    duplex(true);
}

#[test]
fn same_node_256_mib_both_ways_at_once() {
    duplex(false);
}

/// A client that half-closes at once, with a request or with nothing, before its CONNECT is
/// answered: END_STREAM follows the early bytes, and the server (which answers at the end)
/// sees every byte, then the end; the client gets the whole answer.
#[test]
fn a_client_that_half_closes_before_the_answer_gets_its_reply() {
    let m = mesh(MtlsMode::Strict);
    let (p11, p21) = (m.bed.pod(1, 1), m.bed.pod(2, 1));
    let dst = SocketAddr::new(p21.ip(false), PORT);
    let mut seen = 0;
    for bytes in [100, 0] {
        let report = zt_tests::probe::churn_whole(&m.bed, p11, dst, 20, bytes).unwrap();
        assert_eq!(report["completed"].as_u64(), Some(20), "{report}");
        seen += 20;
        for c in m.server.expect_connections(seen).unwrap() {
            assert_eq!(c["end"], "eof", "{c}");
        }
    }
    // Both agents saw each connection end cleanly, with the client's bytes.
    for (agent, direction) in [(&m.agent1, "outbound"), (&m.agent2, "inbound")] {
        let records = agent.wait_records(direction, 40).unwrap();
        for r in &records {
            assert_eq!(r["close"], "eof", "{r}");
        }
        let sent: Vec<u64> = records
            .iter()
            .filter_map(|r| r["bytes_sent"].as_u64())
            .collect();
        assert_eq!(sent.iter().filter(|&&b| b == 100).count(), 20, "{sent:?}");
        assert_eq!(sent.iter().filter(|&&b| b == 0).count(), 20, "{sent:?}");
    }
}

#[test]
fn a_reset_on_one_side_is_a_reset_on_the_other() {
    let m = mesh(MtlsMode::Strict);
    let (p11, p21) = (m.bed.pod(1, 1), m.bed.pod(2, 1));
    let dst = SocketAddr::new(p21.ip(false), PORT);
    zt_tests::probe::connect_and_reset(&m.bed, p11, dst, 64 * 1024)
        .unwrap()
        .expect("probe ran");
    let seen = m.server.expect_connections(1).unwrap();
    assert_eq!(
        seen[0]["end"], "reset",
        "the server saw a clean close: {}",
        seen[0]
    );
    let out = m
        .agent1
        .wait_access("reset outbound", |r| r["direction"] == "outbound")
        .unwrap();
    assert_eq!(out["close"], "downstream_reset", "{out}");
    let inb = m
        .agent2
        .wait_access("reset inbound", |r| r["direction"] == "inbound")
        .unwrap();
    assert_eq!(inb["close"], "downstream_reset", "{inb}");
}

#[test]
fn revoking_a_peer_closes_its_live_connections() {
    let dir = std::env::temp_dir().join(format!("zt-revocations-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let list = dir.join("revoked.txt");
    std::fs::write(&list, "# nothing revoked\n").unwrap();
    let m = mesh_with(MtlsMode::Strict, |c1, c2| (c1, c2.revocation_file(&list)));
    let (p11, p21) = (m.bed.pod(1, 1).clone(), m.bed.pod(2, 1).clone());
    let dst = SocketAddr::new(p21.ip(false), PORT);
    // Before: the identity is fine.
    intact(
        &connect(&m.bed, &p11, dst, 1024, TIMEOUT).unwrap().unwrap(),
        1024,
    );

    let bed = &m.bed;
    let go = bed.dir.join("go");
    let held = std::thread::scope(|s| {
        // Held open and silent until the revocation has closed it (or failed to).
        let held = s.spawn(|| zt_tests::probe::connect_idle_until(bed, &p11, dst, &go).unwrap());
        let open = |name: &str| m.agent2.metric_sum(name);
        zt_tests::wait_until(Duration::from_secs(10), || {
            Ok(open("zt_tcp_connections_opened_total")? > open("zt_tcp_connections_closed_total")?)
        })
        .unwrap();
        let tmp = dir.join("revoked.tmp");
        std::fs::write(&tmp, format!("{}\n", spiffe_id(&p11))).unwrap();
        std::fs::rename(&tmp, &list).unwrap();
        zt_tests::wait_until(Duration::from_secs(10), || {
            Ok(m.agent2.events()?.iter().any(|e| e["close"] == "revoked"))
        })
        .unwrap();
        std::fs::write(&go, "").unwrap();
        held.join().unwrap()
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        held.is_err(),
        "the revoked identity's open connection survived: {held:?}"
    );
    let events = m.agent2.events().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["close"] == "revoked" && e["source_identity"] == spiffe_id(&p11).as_str()),
        "no revoked close logged\n{}",
        m.agent2.log_tail()
    );
    // And new connections from it are refused.
    assert!(connect(&m.bed, &p11, dst, 1024, TIMEOUT).unwrap().is_err());
}

/// A pod sends to the policy-protected n2p1 from each of two pods that run under one service
/// account (replicas of a Deployment); node 2 admits only the second pod's address.
#[test]
fn replicas_with_one_service_account_each_leave_from_their_own_address() {
    let mut bed = Testbed::new(2).unwrap();
    let ca = bed.dir.join("ca");
    zt_tests::agent::ca_init(&ca).unwrap();
    let (p11, p12, p21) = (
        bed.pod(1, 1).clone(),
        bed.pod(1, 2).clone(),
        bed.pod(2, 1).clone(),
    );
    let policies = bed.dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    zt_tests::agent::write_policy(
        &policies,
        "allow.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: second-replica-only\n  namespace: default\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{}/32\"]\n",
            p12.ipv4
        ),
    )
    .unwrap();
    // Both replicas run as service account "web".
    let mut c1 = meshed_config(bed.node(1), &[&p11, &p12], &[&p21], &ca, MtlsMode::Strict);
    for pod in [&p11, &p12] {
        c1.workload(pod).service_account = "web".into();
    }
    let mut c2 = meshed_config(bed.node(2), &[&p21], &[&p11, &p12], &ca, MtlsMode::Strict)
        .policies(PolicyDefault::Deny, Some(&policies));
    for endpoint in &mut c2.endpoints {
        endpoint.identity = "spiffe://cluster.local/ns/default/sa/web".into();
    }
    let _agent1 = Agent::start_with_config(&mut bed, 1, &c1).unwrap();
    let agent2 = Agent::start_with_config(&mut bed, 2, &c2).unwrap();
    let server = Server::start(&mut bed, &p21, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    let dst = SocketAddr::new(p21.ip(false), PORT);

    let first = connect(&bed, &p11, dst, 1024, TIMEOUT).unwrap();
    assert!(first.is_err(), "the first replica was admitted: {first:?}");
    let second = connect(&bed, &p12, dst, 1024, TIMEOUT)
        .unwrap()
        .unwrap_or_else(|e| panic!("the second replica was refused: {e}\n{}", agent2.log_tail()));
    intact(&second, 1024);
    let again = connect(&bed, &p11, dst, 1024, TIMEOUT).unwrap();
    assert!(again.is_err(), "the first replica was admitted: {again:?}");
    server.expect_connections(1).unwrap();
    // Where node 2 saw each tunnel come from: each replica's own address.
    zt_tests::wait_until(Duration::from_secs(10), || {
        Ok(agent2.access_records()?.len() == 3)
    })
    .unwrap();
    let mut came_from: Vec<(String, std::net::IpAddr)> = agent2
        .access_records()
        .unwrap()
        .iter()
        .map(|r| {
            let peer: SocketAddr = r["peer"].as_str().unwrap().parse().unwrap();
            (r["policy_decision"].as_str().unwrap().to_owned(), peer.ip())
        })
        .collect();
    came_from.sort();
    let (ip11, ip12) = (p11.ipv4.into(), p12.ipv4.into());
    assert_eq!(
        came_from,
        vec![
            ("ALLOW".to_owned(), ip12),
            ("DENY".to_owned(), ip11),
            ("DENY".to_owned(), ip11)
        ]
    );
}

#[test]
fn concurrent_first_connections_dial_the_destination_once() {
    const CONCURRENT: usize = 32;
    let mut m = mesh(MtlsMode::Strict);
    let (p11, p21) = (m.bed.pod(1, 1).clone(), m.bed.pod(2, 1).clone());
    // Count the TCP connections to 15008 on the wire between the nodes: one SYN each.
    let pcap = m.bed.dir.join("dials.pcap");
    let mut tcpdump = in_cgroup_and_netns("tcpdump", None, &m.bed.node(1).netns).unwrap();
    tcpdump
        .args([
            "-i",
            &format!("{}-x1", m.bed.id),
            "--immediate-mode",
            "-U",
            "-w",
        ])
        .arg(&pcap)
        .args(["tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0 and dst port 15008"]);
    let pid = m.bed.spawn(tcpdump, "dials.log").unwrap();
    let tcpdump_log = m.bed.log_path("dials.log");
    zt_tests::wait_until(Duration::from_secs(5), || {
        Ok(std::fs::read_to_string(&tcpdump_log)?.contains("listening on"))
    })
    .unwrap();

    let report = burst(
        &m.bed,
        &p11,
        SocketAddr::new(p21.ip(false), PORT),
        CONCURRENT,
    )
    .unwrap();
    assert_eq!(
        report["completed"].as_u64(),
        Some(CONCURRENT as u64),
        "{report}"
    );
    m.server.expect_connections(CONCURRENT).unwrap();
    // SIGTERM: tcpdump writes out what it captured before it exits.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    zt_tests::wait_until(Duration::from_secs(5), || Ok(m.bed.exited(pid))).unwrap();

    let read = std::process::Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(&pcap)
        .output()
        .unwrap();
    let dials = String::from_utf8_lossy(&read.stdout).lines().count();
    assert_eq!(
        dials, 1,
        "{CONCURRENT} concurrent first connections dialled {dials} times"
    );
    assert_eq!(m.agent2.count("HBONE connection accepted").unwrap(), 1);
    // The source's pool holds that one connection, for the source pod.
    let (_, body) = m.agent1.admin("GET", "/config_dump").unwrap();
    let dump: Value = serde_json::from_str(&body).unwrap();
    let pool = dump["pool"].as_array().unwrap();
    assert_eq!(pool.len(), 1, "{dump}");
}

/// A destination on node 2 that speaks HBONE itself (no agent there), presenting certificates
/// the test picks; node 1's pool must stop using a connection to it once its certificate
/// expires or is revoked.
#[test]
fn the_pool_never_reuses_a_connection_to_an_expired_or_revoked_peer() {
    let mut bed = Testbed::new(2).unwrap();
    let ca_dir = bed.dir.join("ca");
    zt_tests::agent::ca_init(&ca_dir).unwrap();
    let ca = zt_daemon::identity::ca::CertificateAuthority::load(&ca_dir).unwrap();
    let (p11, p22) = (bed.pod(1, 1).clone(), bed.pod(2, 2).clone());
    let rogue_id = "spiffe://cluster.local/ns/default/sa/rogue-server";
    // In a directory of its own: the agent watches the list's directory, and the bed's holds
    // the agent's log.
    let revocations = bed.dir.join("revocations").join("revoked.txt");
    std::fs::create_dir_all(revocations.parent().unwrap()).unwrap();
    std::fs::write(&revocations, "# nothing revoked\n").unwrap();
    let mut config = meshed_config(bed.node(1), &[&p11], &[], &ca_dir, MtlsMode::Strict)
        .revocation_file(&revocations);
    config.endpoints.push(Endpoint {
        ip: p22.ipv4.into(),
        identity: rogue_id.into(),
    });
    let agent1 = Agent::start_with_config(&mut bed, 1, &config).unwrap();
    let expiring = rogue::forge(&ca, rogue_id, |p| {
        p.not_after = (std::time::SystemTime::now() + Duration::from_secs(3)).into();
    });
    let expiry = zt_daemon::identity::svid::LeafFacts::parse(&expiring.0)
        .unwrap()
        .not_after;
    let rogue = rogue::RogueServer::start(
        &p22.netns,
        SocketAddr::from(([0, 0, 0, 0], 15008)),
        expiring,
    );
    let dst = SocketAddr::new(p22.ip(false), PORT);
    let streams = || -> Vec<usize> { rogue.connections().iter().map(|c| c.streams).collect() };

    // Before expiry: one connection carries the stream.
    connect(&bed, &p11, dst, 1024, TIMEOUT)
        .unwrap()
        .expect("to the destination before its certificate expires");
    assert_eq!(streams(), vec![1]);

    // After expiry the connection is not used again: a new dial meets the expired certificate
    // and is refused; the old connection is closed. (Verifiers compare whole seconds, and
    // notAfter is inclusive: the certificate is refused from the second after it.)
    zt_tests::wait_until(Duration::from_secs(10), || {
        Ok(std::time::SystemTime::now() >= expiry + Duration::from_secs(1))
    })
    .unwrap();
    let after_expiry = connect(&bed, &p11, dst, 1024, TIMEOUT).unwrap();
    assert!(
        after_expiry.is_err(),
        "a stream went to a peer whose certificate expired: {after_expiry:?}, streams {:?}",
        streams()
    );
    assert_eq!(streams(), vec![1]);
    zt_tests::wait_until(
        Duration::from_secs(10),
        || Ok(rogue.connections()[0].closed),
    )
    .unwrap_or_else(|e| panic!("the expired peer's connection stays open: {e}"));

    // A valid certificate again: a new connection.
    let valid = rogue::forge(&ca, rogue_id, |_| {});
    let serial = zt_daemon::identity::svid::LeafFacts::parse(&valid.0)
        .unwrap()
        .serial;
    rogue.present(valid);
    connect(&bed, &p11, dst, 1024, TIMEOUT)
        .unwrap()
        .expect("to the destination with a valid certificate");
    assert_eq!(streams(), vec![1, 1]);

    // Revoked: the connection is closed and not used again.
    let reloads = agent1
        .count("trust bundles and revocation list reloaded")
        .unwrap();
    let tmp = revocations.with_extension("tmp");
    std::fs::write(&tmp, format!("serial:{serial}\n")).unwrap();
    std::fs::rename(&tmp, &revocations).unwrap();
    zt_tests::wait_until(Duration::from_secs(10), || {
        Ok(agent1.count("trust bundles and revocation list reloaded")? > reloads)
    })
    .unwrap();
    let after_revocation = connect(&bed, &p11, dst, 1024, TIMEOUT).unwrap();
    assert!(
        after_revocation.is_err(),
        "a stream went to a revoked peer: {after_revocation:?}"
    );
    assert_eq!(streams(), vec![1, 1]);
    zt_tests::wait_until(
        Duration::from_secs(10),
        || Ok(rogue.connections()[1].closed),
    )
    .unwrap_or_else(|e| panic!("the revoked peer's connection stays open: {e}"));
}
