//! Root end-to-end tests of eBPF capture (issue 2), in real network namespaces with the real
//! agent binary. They need root and a kernel that loads the programs; without either they fail
//! with the reason, they never skip.
use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use zt_tests::{
    Agent, Testbed,
    agent::node_config,
    maps,
    node_config::{Limits, Workload},
    probe::{Server, connect, try_bind},
};

const MIB: u64 = 1024 * 1024;
const APP_PORT: u16 = 9000;
const TIMEOUT: Duration = Duration::from_secs(3);

/// Node 1 runs pods n1p1 (enrolled) and n1p2 (not enrolled); node 2 runs n2p1 (enrolled, with
/// the server) and n2p2 (not enrolled). Each node has its own agent.
struct TwoNodes {
    agent1: Agent,
    agent2: Agent,
    server: Server,
    bed: Testbed,
}

fn two_nodes() -> anyhow::Result<TwoNodes> {
    let mut bed = Testbed::new(2)?;
    let (p11, p21) = (bed.pod(1, 1).clone(), bed.pod(2, 1).clone());
    let agent1 = Agent::start(&mut bed, 1, &[&p11])?;
    let agent2 = Agent::start(&mut bed, 2, &[&p21])?;
    // Dual-stack listener: serves the IPv4 and the IPv6 tests.
    let server = Server::start(&mut bed, &p21, SocketAddr::from(([0u16; 8], APP_PORT)))?;
    Ok(TwoNodes {
        agent1,
        agent2,
        server,
        bed,
    })
}

fn addr(ip: std::net::IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// Sends `bytes` from `from` to `to` and checks that they arrived intact.
fn exchange(bed: &Testbed, from: &zt_tests::Pod, to: SocketAddr, bytes: u64) -> Value {
    let report = connect(bed, from, to, bytes, TIMEOUT)
        .expect("probe ran")
        .unwrap_or_else(|e| panic!("{} -> {to} failed: {e}", from.name));
    assert_eq!(
        report["reply"]["bytes"].as_u64(),
        Some(bytes),
        "server byte count: {report}"
    );
    assert_eq!(
        report["reply"]["sha256"], report["sent_sha256"],
        "payload checksum: {report}"
    );
    report
}

fn outbound_crosses_nodes(v6: bool) {
    let t = two_nodes().unwrap();
    let (client, server_pod) = (t.bed.pod(1, 1), t.bed.pod(2, 1));
    let dst = addr(server_pod.ip(v6), APP_PORT);
    let report = exchange(&t.bed, client, dst, 16 * MIB);

    // The application still sees its original peer, not the agent's listener.
    assert_eq!(report["peer"], dst.to_string(), "getpeername(): {report}");

    // The source agent captured it and knew where it was going.
    let out = t
        .agent1
        .wait_access("outbound flow", |r| r["direction"] == "outbound")
        .unwrap();
    assert_eq!(out["original_dst"], dst.to_string(), "{out}");
    assert_eq!(out["workload"], "default/n1p1");
    assert_eq!(out["bytes_sent"].as_u64(), Some(16 * MIB), "{out}");
    assert_eq!(out["close"], "eof");

    // The destination agent received it through sk_lookup and its inbound listener.
    let inb = t
        .agent2
        .wait_access("inbound flow", |r| r["direction"] == "inbound")
        .unwrap();
    assert_eq!(inb["original_dst"], dst.to_string(), "{inb}");
    assert_eq!(inb["bytes_sent"].as_u64(), Some(16 * MIB), "{inb}");
    t.server.expect_connections(1).unwrap();
}

#[test]
fn outbound_ipv4_crosses_nodes_through_both_agents() {
    outbound_crosses_nodes(false);
}

#[test]
fn outbound_ipv6_crosses_nodes_through_both_agents() {
    outbound_crosses_nodes(true);
}

#[test]
fn inbound_reaches_app_via_sk_lookup_and_uncaptured_pod_is_left_alone() {
    let t = two_nodes().unwrap();
    let (client, server_pod) = (t.bed.pod(1, 2), t.bed.pod(2, 1));
    let dst = addr(server_pod.ipv4.into(), APP_PORT);
    let report = exchange(&t.bed, client, dst, MIB);
    assert_eq!(report["peer"], dst.to_string());

    // Inbound: steered to the agent, which saw the original destination port.
    let inb = t
        .agent2
        .wait_access("inbound flow", |r| r["direction"] == "inbound")
        .unwrap();
    assert_eq!(inb["original_dst"], dst.to_string(), "{inb}");
    let peer: SocketAddr = inb["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(peer.ip().to_canonical(), client.ip(false), "{inb}");

    // Outbound: n1p2 is not enrolled, so node 1's agent saw nothing. Its connection closed
    // before the enrolled pod's below opened, so had it been captured, its record would come
    // first.
    exchange(&t.bed, t.bed.pod(1, 1), dst, 1024);
    t.agent1
        .wait_access("the enrolled pod's flow", |r| r["direction"] == "outbound")
        .unwrap();
    let records = t.agent1.access_records().unwrap();
    assert_eq!(
        records.len(),
        1,
        "non-enrolled pod was captured: {records:?}"
    );
}

#[test]
fn killed_agent_fails_closed_and_restarted_agent_readopts_pins() {
    let mut t = two_nodes().unwrap();
    let (p11, p12, p21) = (
        t.bed.pod(1, 1).clone(),
        t.bed.pod(1, 2).clone(),
        t.bed.pod(2, 1).clone(),
    );
    let dst = addr(p21.ipv4.into(), APP_PORT);

    t.bed.kill(t.agent1.pid);
    t.bed.kill(t.agent2.pid);
    for node in [t.bed.node(1), t.bed.node(2)] {
        assert!(
            node.pin_dir.join("links/zt_connect4").exists(),
            "pins must survive the agent"
        );
    }

    // Outbound from an enrolled pod: refused, not sent around the agent.
    let refused = connect(&t.bed, &p11, dst, MIB, TIMEOUT).unwrap();
    let err = refused.expect_err("enrolled pod reached the server with its agent dead");
    assert_eq!(err["kind"], "ConnectionRefused", "{err}");

    // Inbound to an enrolled pod: dropped, not delivered to the app.
    let dropped = connect(&t.bed, &p12, dst, MIB, Duration::from_secs(1)).unwrap();
    assert!(
        dropped.is_err(),
        "captured inbound was delivered with the agent dead: {dropped:?}"
    );
    assert!(
        t.server.connections().unwrap().is_empty(),
        "server received data while fail-closed"
    );

    // A new agent re-adopts the pinned links and maps; the pods are not re-created.
    let agent1 = Agent::start(&mut t.bed, 1, &[&p11]).unwrap();
    let agent2 = Agent::start(&mut t.bed, 2, &[&p21]).unwrap();
    for a in [&agent1, &agent2] {
        let events = a.events().unwrap();
        let adopted = events
            .iter()
            .filter(|e| e["message"] == "capture program attached" && e["adopted"] == true)
            .count();
        assert_eq!(
            adopted,
            12,
            "all node-wide links re-adopted:\n{}",
            a.log_tail()
        );
        assert!(
            events
                .iter()
                .any(|e| e["message"] == "workload enrolled" && e["adopted"] == true)
        );
    }
    exchange(&t.bed, &p11, dst, MIB);
    agent1
        .wait_access("outbound after restart", |r| r["direction"] == "outbound")
        .unwrap();
    agent2
        .wait_access("inbound after restart", |r| r["direction"] == "inbound")
        .unwrap();
}

#[test]
fn enrolled_pod_cannot_bind_agent_ports() {
    let t = two_nodes().unwrap();
    for port in [15001, 15006, 15008] {
        let r = try_bind(&t.bed, t.bed.pod(1, 1), port).unwrap();
        for family in ["v4", "v6"] {
            let outcome = r[family].as_str().unwrap();
            assert!(
                outcome.contains("Operation not permitted"),
                "bind {port} {family}: {r}"
            );
        }
    }
    // The ports are reserved in pods that are not (yet) enrolled too: a pod holding one would
    // make its later enrollment fail.
    let r = try_bind(&t.bed, t.bed.pod(1, 2), 15006).unwrap();
    assert!(
        r["v4"]
            .as_str()
            .unwrap()
            .contains("Operation not permitted"),
        "{r}"
    );
    // Each refused attempt (3 ports, 2 families in the enrolled pod, 2 in the other) is counted,
    // and logged with the workload when the pod is one.
    zt_tests::wait_until(Duration::from_secs(5), || {
        Ok(t.agent1.metric_lines("zt_capture_denied_binds_total")?
            == vec!["zt_capture_denied_binds_total 8".to_owned()])
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}",
            t.agent1.metric_lines("zt_capture_denied_binds_total")
        )
    });
    let logged: u64 = t
        .agent1
        .events()
        .unwrap()
        .iter()
        .filter(|e| {
            e["message"] == "refused: a pod tried to bind one of the agent's ports"
                && e["workload"] == "default/n1p1"
        })
        .filter_map(|e| e["attempts"].as_u64())
        .sum();
    assert_eq!(logged, 6);
}

#[test]
fn an_enrolled_pod_has_no_channel_to_change_its_own_enrollment() {
    let t = two_nodes().unwrap();
    let (p11, p21, node) = (t.bed.pod(1, 1), t.bed.pod(2, 1), t.bed.node(1));
    let cookie = t.agent1.netns_cookie(p11).unwrap();
    let level = t.agent1.admin("GET", "/logging").unwrap().1;

    // A pod process as a restricted pod runs one: not root, no capabilities. (A pod never sees
    // the node's bpffs; here it shares the node's mount namespace, so file modes are what
    // guard the pins.) The probe is copied where that user can run it.
    let mut cmd = t
        .bed
        .unprivileged_pod_command(p11, &zt_tests::bin_path("zt-probe").unwrap())
        .unwrap();
    cmd.args(["tamper", "--node", "10.200.1.1", "--pin-dir"])
        .arg(&node.pin_dir);
    let out = cmd.output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let outcome = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
    // The admin API listens on the node's loopback only; the pod's loopback has no agent. (To
    // the node's address the connection is captured like any other: the agent finds nothing
    // listening there and resets it.)
    let admin = outcome("admin_on_node");
    assert!(admin.contains("refused") || admin.contains("reset"), "{r}");
    assert!(outcome("admin_on_pod_loopback").contains("refused"), "{r}");
    // What the pod can reach on the node is read-only.
    for k in ["metrics_post", "metrics_config_dump", "readiness_post"] {
        assert_eq!(outcome(k), "404", "{k}: {r}");
    }
    // The in-pod listeners take only captured connections and no commands.
    for k in ["outbound_listener", "inbound_listener"] {
        assert!(outcome(k).starts_with("closed"), "{k}: {r}");
    }
    // The kernel state is out of reach.
    let map = outcome("open_pinned_map");
    assert!(
        map.contains("Permission denied") || map.contains("Operation not permitted"),
        "{r}"
    );

    // Nothing changed: still enrolled, still captured, the log level as it was.
    assert!(maps::enrolled(&node.pin_dir).unwrap().contains(&cookie));
    assert_eq!(t.agent1.admin("GET", "/logging").unwrap().1, level);
    exchange(&t.bed, p11, addr(p21.ipv4.into(), APP_PORT), 1024);
    t.agent1
        .wait_access("outbound after the attempts", |r| {
            r["direction"] == "outbound"
        })
        .unwrap();
}

#[test]
fn unenrollment_leaves_no_trace() {
    let mut bed = Testbed::new(2).unwrap();
    let (p11, p12, p22) = (
        bed.pod(1, 1).clone(),
        bed.pod(1, 2).clone(),
        bed.pod(2, 2).clone(),
    );
    let node = bed.node(1).clone();
    let agent = Agent::start(&mut bed, 1, &[&p11, &p12]).unwrap();
    let server = Server::start(&mut bed, &p11, SocketAddr::from(([0, 0, 0, 0], APP_PORT))).unwrap();
    let gone = agent.netns_cookie(&p11).unwrap();
    let kept = agent.netns_cookie(&p12).unwrap();

    // Before: the kernel holds p11's state (so the checks below can fail).
    exchange(&bed, &p22, addr(p11.ipv4.into(), APP_PORT), 1024);
    agent
        .wait_access("inbound before", |r| r["direction"] == "inbound")
        .unwrap();
    assert!(maps::enrolled(&node.pin_dir).unwrap().contains(&gone));
    assert!(maps::steered_pods(&node.pin_dir).unwrap().contains(&gone));
    let pod_pins = node.pin_dir.join("pods").join(gone.to_string());
    assert!(pod_pins.join("sk_lookup").exists());

    agent.reload(node_config(&node, &[&p12])).unwrap();

    let enrolled = maps::enrolled(&node.pin_dir).unwrap();
    assert!(
        !enrolled.contains(&gone) && enrolled.contains(&kept),
        "ZT_ENROLLED: {enrolled:?}"
    );
    assert!(!maps::steered_pods(&node.pin_dir).unwrap().contains(&gone));
    assert!(
        !maps::connection_owners(&node.pin_dir)
            .unwrap()
            .contains(&gone)
    );
    assert!(
        !pod_pins.exists(),
        "sk_lookup link pin left at {}",
        pod_pins.display()
    );

    // No listener: the HBONE port of the pod refuses.
    let r = connect(&bed, &p22, addr(p11.ipv4.into(), 15008), 0, TIMEOUT).unwrap();
    assert_eq!(
        r.expect_err("15008 still listening")["kind"],
        "ConnectionRefused"
    );
    // No sk_lookup: traffic reaches the app directly, from the client's own address (the agent
    // would deliver it from inside the pod, from the pod's address).
    exchange(&bed, &p22, addr(p11.ipv4.into(), APP_PORT), 1024);
    let seen = server.expect_connections(2).unwrap();
    let peer: SocketAddr = seen[1]["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        peer.ip().to_canonical(),
        p22.ip(false),
        "un-enrolled pod still captured: {seen:?}"
    );
}

#[test]
fn bad_workload_and_bad_reload_keep_the_agent_running() {
    let mut bed = Testbed::new(1).unwrap();
    let (p11, node) = (bed.pod(1, 1).clone(), bed.node(1).clone());
    let missing = "/run/netns/zt-does-not-exist";
    let mut config = node_config(&node, &[&p11]);
    config.workloads.push(Workload {
        name: "ghost".into(),
        service_account: "default".into(),
        netns: missing.into(),
        ..Workload::of(&p11)
    });
    let agent = Agent::start_with_config(&mut bed, 1, &config).unwrap();
    let failure = agent
        .events()
        .unwrap()
        .into_iter()
        .find(|e| e["message"] == "enrollment failed")
        .expect("enrollment failure logged");
    let error = failure["error"].as_str().unwrap();
    assert!(
        error.contains(missing) && error.contains("default/ghost"),
        "{failure}"
    );
    assert!(
        agent.netns_cookie(&p11).is_ok(),
        "the good workload is enrolled"
    );

    // A config that does not parse is rejected with file and line; the old one keeps running.
    std::fs::write(&agent.config, "node_name = \"x\"\nbogus = 1\n").unwrap();
    let rejected = agent.expect_rejected_reload().unwrap();
    let why = rejected["error"].as_str().unwrap();
    assert!(
        why.contains(&format!("{}:2:", agent.config.display())) && why.contains("bogus"),
        "{why}"
    );
    assert!(!bed.exited(agent.pid));
    let cookie = agent.netns_cookie(&p11).unwrap();
    assert!(maps::enrolled(&node.pin_dir).unwrap().contains(&cookie));
}

#[test]
fn check_config_rejects_a_pod_enrolled_twice() {
    let dir = std::env::temp_dir().join(format!("zt-check-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("node.toml");
    std::fs::write(
        &file,
        "node_name = \"n\"\n[[workload]]\nname = \"a\"\nnamespace = \"d\"\nnetns = \"/run/netns/p\"\n\
         [[workload]]\nname = \"b\"\nnamespace = \"d\"\nnetns = \"/run/netns/p\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(zt_tests::bin_path("zt-daemon").unwrap())
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("node.toml") && stderr.contains("already enrolled as d/a"),
        "{stderr}"
    );
}

#[test]
fn idle_and_connection_limits_close_with_their_reasons() {
    let mut bed = Testbed::new(2).unwrap();
    let (p11, p12, node) = (
        bed.pod(1, 1).clone(),
        bed.pod(1, 2).clone(),
        bed.node(1).clone(),
    );
    let limits = |limits: Limits| node_config(&node, &[&p11]).limits(limits);
    let agent = Agent::start_with_config(
        &mut bed,
        1,
        limits(Limits {
            idle_timeout_seconds: Some(1),
            ..Limits::default()
        }),
    )
    .unwrap();
    Server::start(&mut bed, &p12, SocketAddr::from(([0, 0, 0, 0], APP_PORT))).unwrap();
    let dst = addr(p12.ipv4.into(), APP_PORT);

    // Silent until the agent has closed it for idleness: then its bytes go nowhere.
    let go = bed.dir.join("idle-go");
    let idle = std::thread::scope(|s| {
        let client = s.spawn(|| zt_tests::probe::connect_idle_until(&bed, &p11, dst, &go));
        let closed = agent
            .wait_access("idle close", |r| r["close"] == "idle_timeout")
            .unwrap();
        assert_eq!(closed["original_dst"], dst.to_string());
        std::fs::write(&go, "").unwrap();
        client.join().unwrap().unwrap()
    });
    assert!(idle.is_err(), "idle connection survived: {idle:?}");

    // Two connections held open fill the workload's quota; a third is refused meanwhile. (The
    // limits need a restart; the successor re-adopts capture.)
    bed.kill(agent.pid);
    let agent = Agent::start_with_config(
        &mut bed,
        1,
        limits(Limits {
            max_connections_per_workload: Some(2),
            ..Limits::default()
        }),
    )
    .unwrap();
    let bed = &bed;
    let release = bed.dir.join("held-go");
    let outcomes: Vec<bool> = std::thread::scope(|s| {
        let held: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    zt_tests::probe::connect_idle_until(bed, &p11, dst, &release)
                        .unwrap()
                        .is_ok()
                })
            })
            .collect();
        zt_tests::wait_until(Duration::from_secs(10), || {
            Ok(agent.opened_connections()? >= 2)
        })
        .unwrap();
        let third = connect(bed, &p11, dst, 1024, TIMEOUT).unwrap().is_ok();
        std::fs::write(&release, "").unwrap();
        let mut all: Vec<bool> = held.into_iter().map(|h| h.join().unwrap()).collect();
        all.push(third);
        all
    });
    assert_eq!(outcomes, vec![true, true, false], "held, held, third");
    let refused = agent
        .events()
        .unwrap()
        .into_iter()
        .find(|e| e["close"] == "max_connections")
        .unwrap_or_else(|| panic!("no max_connections refusal logged\n{}", agent.log_tail()));
    assert_eq!(refused["workload"], "default/n1p1");
}

#[test]
fn capture_drift_is_repaired_and_counted() {
    let mut bed = Testbed::new(2).unwrap();
    let (p11, p12) = (bed.pod(1, 1).clone(), bed.pod(1, 2).clone());
    // Started with a drift check too rare to repair anything during the test; a reload sets
    // the interval the repair below needs.
    let rare = node_config(bed.node(1), &[&p11]).reconcile_interval_ms(3_600_000);
    let agent = Agent::start_with_config(&mut bed, 1, &rare).unwrap();
    // SIGHUP, not only the file: the agent watches the file only after it says it is ready.
    agent
        .reload(node_config(bed.node(1), &[&p11]).reconcile_interval_ms(200))
        .unwrap();
    Server::start(&mut bed, &p12, SocketAddr::from(([0u16; 8], APP_PORT))).unwrap();
    let dst = SocketAddr::new(p12.ip(false), APP_PORT);
    let captured = |n: usize| {
        agent
            .wait_access("a captured connection", |_| true)
            .unwrap();
        zt_tests::wait_until(Duration::from_secs(5), || {
            Ok(agent
                .access_records()?
                .iter()
                .filter(|r| r["direction"] == "outbound")
                .count()
                == n)
        })
        .unwrap();
    };
    connect(&bed, &p11, dst, 1024, TIMEOUT)
        .unwrap()
        .expect("connect");
    captured(1);

    let cookie = agent.netns_cookie(&p11).unwrap();
    let pins = &bed.node(1).pin_dir;
    maps::delete_pod_entries(pins, cookie).unwrap();
    assert!(!maps::enrolled(pins).unwrap().contains(&cookie));
    zt_tests::wait_until(Duration::from_secs(5), || {
        Ok(maps::enrolled(pins)?.contains(&cookie) && maps::steered_pods(pins)?.contains(&cookie))
    })
    .unwrap_or_else(|e| panic!("drift not repaired: {e}\n{}", agent.log_tail()));
    // The agent logs the repair after it wrote the maps.
    zt_tests::wait_until(Duration::from_secs(5), || {
        Ok(agent.count("capture drift repaired: the pod's map entries were restored")? >= 1)
    })
    .unwrap_or_else(|e| panic!("repair not logged: {e}\n{}", agent.log_tail()));
    // Captured again, and the gauge is back to 0 once the repair has been seen.
    connect(&bed, &p11, dst, 1024, TIMEOUT)
        .unwrap()
        .expect("connect");
    captured(2);
    zt_tests::wait_until(Duration::from_secs(5), || {
        Ok(agent
            .metric_lines("zt_capture_drift")?
            .iter()
            .any(|l| l == "zt_capture_drift 0"))
    })
    .unwrap();
}

#[test]
fn config_file_changes_apply_bad_ones_are_refused_and_no_connection_drops() {
    let mut bed = Testbed::new(2).unwrap();
    let (p11, p12, p21) = (
        bed.pod(1, 1).clone(),
        bed.pod(1, 2).clone(),
        bed.pod(2, 1).clone(),
    );
    let node = bed.node(1).clone();
    let agent = Agent::start(&mut bed, 1, &[&p11]).unwrap();
    Server::start(&mut bed, &p21, SocketAddr::from(([0u16; 8], APP_PORT))).unwrap();
    let dst = addr(p21.ipv4.into(), APP_PORT);
    let go = bed.dir.join("long-go");
    std::thread::scope(|s| {
        // Open across both reloads: connects now, sends once they are done.
        let long = s.spawn(|| zt_tests::probe::connect_idle_until(&bed, &p11, dst, &go));
        zt_tests::wait_until(Duration::from_secs(10), || {
            Ok(agent.opened_connections()? >= 1)
        })
        .unwrap();

        // A valid change, by editing the file only (no signal): p12 is enrolled.
        agent
            .write_config(node_config(&node, &[&p11, &p12]))
            .unwrap();
        zt_tests::wait_until(Duration::from_secs(5), || {
            Ok(agent.netns_cookie(&p12).is_ok())
        })
        .unwrap_or_else(|e| panic!("file change not applied: {e}\n{}", agent.log_tail()));
        let added = agent.netns_cookie(&p12).unwrap();
        assert!(maps::enrolled(&node.pin_dir).unwrap().contains(&added));

        // An invalid file, then SIGHUP: rejected with the key named, the old config stays.
        agent
            .write_config(
                node_config(&node, &[&p11])
                    .to_string()
                    .replace("[log]", "[log]\nlevle = 1"),
            )
            .unwrap();
        let rejected = agent.expect_rejected_reload().unwrap();
        assert!(
            rejected["error"].as_str().unwrap().contains("levle"),
            "{rejected}"
        );
        assert!(
            maps::enrolled(&node.pin_dir).unwrap().contains(&added),
            "p12 kept"
        );

        std::fs::write(&go, "").unwrap();
        let report = long
            .join()
            .unwrap()
            .unwrap()
            .expect("the long connection survived");
        assert_eq!(report["reply"]["bytes"].as_u64(), Some(1024), "{report}");
    });
}

/// A network namespace file's identity: its device and inode.
fn netns_inode(netns: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(netns).unwrap();
    (meta.dev(), meta.ino())
}

/// Descriptors of `pid` open on the network namespace `netns` (each keeps it alive).
fn descriptors_on(pid: u32, netns: (u64, u64)) -> usize {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter(|fd| {
                    std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == netns)
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_pod_whose_network_namespace_disappears_is_unenrolled_cleanly() {
    let mut bed = Testbed::new(2).unwrap();
    let (p11, p12, node) = (
        bed.pod(1, 1).clone(),
        bed.pod(1, 2).clone(),
        bed.node(1).clone(),
    );
    let config = node_config(&node, &[&p11, &p12]).reconcile_interval_ms(200);
    let agent = Agent::start_with_config(&mut bed, 1, &config).unwrap();
    let (dead, alive) = (
        agent.netns_cookie(&p11).unwrap(),
        agent.netns_cookie(&p12).unwrap(),
    );
    // The agent holds each pod's namespace open (to make its upstream sockets there).
    let (dead_netns, alive_netns) = (netns_inode(&p11.netns), netns_inode(&p12.netns));
    assert!(descriptors_on(agent.pid, dead_netns) >= 1);
    assert!(descriptors_on(agent.pid, alive_netns) >= 1);

    // The pod dies: its namespace is deleted behind the agent's back.
    let name = p11.netns.file_name().unwrap().to_str().unwrap();
    zt_tests::sh("ip", &["netns", "del", name]).unwrap();
    zt_tests::wait_until(Duration::from_secs(5), || {
        Ok(agent.count(
            "network namespace gone or replaced (the pod died or restarted?): un-enrolling",
        )? == 1
            && agent.count("workload un-enrolled")? == 1)
    })
    .unwrap_or_else(|e| panic!("not un-enrolled: {e}\n{}", agent.log_tail()));
    let enrolled = maps::enrolled(&node.pin_dir).unwrap();
    assert!(
        !enrolled.contains(&dead) && enrolled.contains(&alive),
        "{enrolled:?}"
    );
    assert!(!maps::steered_pods(&node.pin_dir).unwrap().contains(&dead));
    // The agent let go of its namespace (a descriptor would have kept it alive); the other
    // pod's stays open.
    zt_tests::wait_until(Duration::from_secs(5), || {
        Ok(descriptors_on(agent.pid, dead_netns) == 0)
    })
    .unwrap();
    assert!(descriptors_on(agent.pid, alive_netns) >= 1);
    assert!(!bed.exited(agent.pid));
}

#[test]
fn a_pod_whose_network_namespace_is_replaced_under_the_same_name_is_captured_in_the_new_one() {
    let mut bed = Testbed::new(1).unwrap();
    let (p11, node) = (bed.pod(1, 1).clone(), bed.node(1).clone());
    let config = node_config(&node, &[&p11]).reconcile_interval_ms(200);
    let agent = Agent::start_with_config(&mut bed, 1, &config).unwrap();
    let old = agent.netns_cookie(&p11).unwrap();

    // The pod restarts: a new namespace under its old name (the config's netns path).
    let name = p11.netns.file_name().unwrap().to_str().unwrap();
    zt_tests::sh("ip", &["netns", "del", name]).unwrap();
    zt_tests::sh("ip", &["netns", "add", name]).unwrap();
    zt_tests::sh("ip", &["-n", name, "link", "set", "lo", "up"]).unwrap();
    zt_tests::wait_until(Duration::from_secs(10), || {
        Ok(agent.count("workload enrolled")? == 2)
    })
    .unwrap_or_else(|e| {
        panic!(
            "not enrolled in the new namespace: {e}\n{}",
            agent.log_tail()
        )
    });
    let new = agent.netns_cookie(&p11).unwrap();
    assert_ne!(new, old);
    // The new namespace is the one captured, and the old one is forgotten.
    let enrolled = maps::enrolled(&node.pin_dir).unwrap();
    assert!(
        enrolled.contains(&new) && !enrolled.contains(&old),
        "{enrolled:?}"
    );
    assert!(maps::steered_pods(&node.pin_dir).unwrap().contains(&new));
    // Its connects go to the agent: one to nowhere is still seen (and logged) by the agent.
    let dst = SocketAddr::new(std::net::IpAddr::from([10, 200, 2, 11]), APP_PORT);
    let _ = connect(&bed, &p11, dst, 16, TIMEOUT).unwrap();
    agent
        .wait_access("the new namespace's connection", |r| {
            r["direction"] == "outbound" && r["original_dst"] == dst.to_string()
        })
        .unwrap();
    assert_eq!(agent.readiness().unwrap().0, 200);
}
