//! Root end-to-end tests that attack capture from pod network namespaces the way a compromised
//! pod would (issue 15): each tries one class of way around the agent and checks on the wire
//! that it gets nowhere. Every agent here has an identity provider and `mtls.mode = "strict"`,
//! so anything that reaches an app in plaintext, or leaves a meshed pod for outside the mesh,
//! went around zt.
use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use zt_tests::{
    Agent, Pod, Testbed,
    agent::{ca_init, meshed_config},
    attack::{CONNECT_AND_SEND, Privilege, UDP_RECEIVER, attack, python_command},
    node_config::{Egress, MtlsMode, NodeConfigBuilder},
    probe::{Server, connect},
    read_json_lines, sh, wait_until,
};

const APP_PORT: u16 = 9000;
const TIMEOUT: Duration = Duration::from_secs(3);

/// A bed of two nodes with two pods each, and the agent of node `n` enrolling `enrolled` with
/// the built-in CA, strict; `edit` adjusts the config.
fn strict_agent(
    bed: &mut Testbed,
    n: usize,
    enrolled: &[&Pod],
    edit: impl FnOnce(NodeConfigBuilder) -> NodeConfigBuilder,
) -> Agent {
    let ca = bed.dir.join("ca");
    if !ca.exists() {
        ca_init(&ca).unwrap();
    }
    let config = edit(meshed_config(
        bed.node(n),
        enrolled,
        &[],
        &ca,
        MtlsMode::Strict,
    ));
    Agent::start_with_config(bed, n, config).unwrap()
}

fn connect_attack(bed: &Testbed, from: &Pod, privilege: Privilege, host: &str, port: u16) -> Value {
    attack(
        bed,
        from,
        privilege,
        CONNECT_AND_SEND,
        &[host.to_owned(), port.to_string()],
    )
    .unwrap()
}

/// An unprivileged process of `from` connects to `to`'s IPv4 address on `port`.
fn unprivileged_connect(bed: &Testbed, from: &Pod, to: &Pod, port: u16) -> Value {
    connect_attack(
        bed,
        from,
        Privilege::Unprivileged,
        &to.ipv4.to_string(),
        port,
    )
}

/// Inbound connections the agent denied as plaintext under strict.
fn plaintext_denials(agent: &Agent) -> Vec<Value> {
    agent
        .events()
        .unwrap()
        .into_iter()
        .filter(|e| {
            e["reason"] == "mtls_required"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("connection denied"))
        })
        .collect()
}

/// The app's reply: what only a connection that reached it gets.
fn reached_app(outcome: &Value) -> bool {
    outcome["reply"]
        .as_str()
        .is_some_and(|r| r.contains("\"bytes\""))
}

#[test]
fn a_root_pod_forging_the_old_agent_mark_is_still_captured() {
    let mut bed = Testbed::new(2).unwrap();
    let (p11, p12, p22) = (
        bed.pod(1, 1).clone(),
        bed.pod(1, 2).clone(),
        bed.pod(2, 2).clone(),
    );
    let agent = strict_agent(&mut bed, 1, &[&p11], |c| c.egress(Egress::deny()));
    // Outside the mesh: with egress locked down, a meshed pod may not reach it.
    let server = Server::start(&mut bed, &p22, SocketAddr::from(([0u16; 8], APP_PORT))).unwrap();

    const FORGE: &str = r#"
import json, socket, sys
out = {}
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x5a7)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.sendall(b"x" * 1024)
    s.shutdown(socket.SHUT_WR)
    out["reply"] = s.recv(65536).decode(errors="replace")
except OSError as e:
    out["connect"] = str(e)
b = socket.socket()
b.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x5a7)
try:
    b.bind(("0.0.0.0", 15006))
    out["bind"] = "ok"
except OSError as e:
    out["bind"] = str(e)
print(json.dumps(out))
"#;
    // SO_MARK needs CAP_NET_RAW, which a default container has.
    let forged = attack(
        &bed,
        &p11,
        Privilege::DefaultContainer,
        FORGE,
        &[p22.ipv4.to_string(), APP_PORT.to_string()],
    )
    .unwrap();
    assert!(
        !reached_app(&forged),
        "the forged mark went around capture: {forged}"
    );
    assert!(
        forged["bind"]
            .as_str()
            .unwrap()
            .contains("Operation not permitted"),
        "the forged mark took an agent port: {forged}"
    );
    agent
        .wait_access("the forged connect, refused", |r| {
            r["direction"] == "outbound" && r["close"] == "egress_denied"
        })
        .unwrap();
    // A pod outside the mesh reaches the server: its connection is the only one recorded.
    connect(
        &bed,
        &p12,
        SocketAddr::new(p22.ip(false), APP_PORT),
        64,
        TIMEOUT,
    )
    .unwrap()
    .expect("an uncaptured pod reaches the server");
    let seen = server.expect_connections(1).unwrap();
    assert!(
        seen[0]["peer"]
            .as_str()
            .unwrap()
            .contains(&p12.ipv4.to_string()),
        "{seen:?}"
    );
}

/// The IPv6 link-local address of `pod`'s eth0, once duplicate address detection is done.
fn link_local(pod: &Pod) -> String {
    let ns = pod.netns.file_name().unwrap().to_str().unwrap().to_owned();
    let mut found = None;
    wait_until(Duration::from_secs(10), || {
        let out = sh(
            "ip",
            &[
                "-n", &ns, "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
            ],
        )?;
        found = out
            .split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)
            .filter(|_| !out.contains("tentative"))
            .map(|a| a.split('/').next().unwrap_or_default().to_owned());
        Ok(found.is_some())
    })
    .unwrap();
    found.unwrap()
}

#[test]
fn every_address_of_an_enrolled_pod_is_captured_link_local_and_added_later_included() {
    let mut bed = Testbed::new(2).unwrap();
    let (p21, p22) = (bed.pod(2, 1).clone(), bed.pod(2, 2).clone());
    let agent = strict_agent(&mut bed, 2, &[&p21], |c| c);
    let server = Server::start(&mut bed, &p21, SocketAddr::from(([0u16; 8], APP_PORT))).unwrap();
    // Addresses the agent did not see at enrollment: a second address of each family (a CNI
    // change, SLAAC) and the link-local one.
    let ns = p21.netns.file_name().unwrap().to_str().unwrap().to_owned();
    sh(
        "ip",
        &["-n", &ns, "addr", "add", "10.200.2.99/24", "dev", "eth0"],
    )
    .unwrap();
    sh(
        "ip",
        &[
            "-n",
            &ns,
            "addr",
            "add",
            "fd00:200:2::99/64",
            "dev",
            "eth0",
            "nodad",
        ],
    )
    .unwrap();
    link_local(&p22);
    let targets = [
        "10.200.2.99".to_owned(),
        "fd00:200:2::99".to_owned(),
        format!("{}%eth0", link_local(&p21)),
        p21.ipv4.to_string(),
    ];
    for target in &targets {
        let outcome = connect_attack(&bed, &p22, Privilege::Unprivileged, target, APP_PORT);
        assert!(
            !reached_app(&outcome),
            "plaintext reached the app through {target}: {outcome}"
        );
    }
    // Each attempt reached the agent, which refused it as plaintext under strict.
    let mut refused = Vec::new();
    wait_until(Duration::from_secs(10), || {
        refused = plaintext_denials(&agent);
        Ok(refused.len() >= targets.len())
    })
    .unwrap_or_else(|e| panic!("{e}: {refused:?}\n{}", agent.log_tail()));
    assert!(server.connections().unwrap().is_empty());
}

#[test]
fn the_probe_source_reaches_only_the_pods_probe_ports() {
    let mut bed = Testbed::new(2).unwrap();
    let (p21, p22) = (bed.pod(2, 1).clone(), bed.pod(2, 2).clone());
    let node2 = bed.node(2).clone();
    const PROBE_PORT: u16 = 8080;
    let agent = strict_agent(&mut bed, 2, &[&p21], |c| {
        let mut c = c.probe_source(std::net::Ipv4Addr::new(10, 200, 2, 1));
        c.workload(&p21).probe_ports = vec![PROBE_PORT];
        c
    });
    let app = Server::start(&mut bed, &p21, SocketAddr::from(([0u16; 8], APP_PORT))).unwrap();
    let health = Server::start(&mut bed, &p21, SocketAddr::from(([0u16; 8], PROBE_PORT))).unwrap();

    // The node's address (kubelet; also what NodePort traffic is masqueraded to) on the probe
    // port: plaintext to the app, as kubelet needs.
    let kubelet = |port: u16| {
        let mut cmd =
            zt_tests::in_cgroup_and_netns(zt_tests::attack::PYTHON, None, &node2.netns).unwrap();
        cmd.args([
            "-c",
            CONNECT_AND_SEND,
            &p21.ipv4.to_string(),
            &port.to_string(),
        ]);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str::<Value>(text.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    let probe = kubelet(PROBE_PORT);
    assert!(
        reached_app(&probe),
        "the probe did not reach its port: {probe}"
    );
    health.expect_connections(1).unwrap();
    // The same address on any other port: captured, and refused as plaintext.
    let other = kubelet(APP_PORT);
    assert!(
        !reached_app(&other),
        "the probe source reached a non-probe port: {other}"
    );
    // Another pod on the probe port: captured too.
    let neighbour = unprivileged_connect(&bed, &p22, &p21, PROBE_PORT);
    assert!(
        !reached_app(&neighbour),
        "a pod used the probe exemption: {neighbour}"
    );
    wait_until(Duration::from_secs(10), || {
        Ok(plaintext_denials(&agent).len() >= 2)
    })
    .unwrap();
    assert!(app.connections().unwrap().is_empty());
    assert_eq!(health.connections().unwrap().len(), 1);
}

#[test]
fn a_pod_squatting_an_agent_port_before_enrollment_is_held_fail_closed() {
    let mut bed = Testbed::new(2).unwrap();
    let (p11, p12) = (bed.pod(1, 1).clone(), bed.pod(1, 2).clone());
    let upstream = Server::start(&mut bed, &p12, SocketAddr::from(([0u16; 8], APP_PORT))).unwrap();
    let app = Server::start(&mut bed, &p11, SocketAddr::from(([0u16; 8], 9001))).unwrap();

    // Before the pod is enrolled, its root process narrows the ephemeral range (a safe sysctl a
    // pod spec may set) so that an ordinary connect takes 15008, and holds that connection.
    const SQUAT: &str = r#"
import json, socket, sys, time
open("/proc/sys/net/ipv4/ip_local_port_range", "w").write("15008 15008")
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print(json.dumps({"event": "squatting", "local": s.getsockname()[1]}), flush=True)
time.sleep(3600)
"#;
    let squat = python_command(
        &bed,
        &p11,
        Privilege::DefaultContainer,
        SQUAT,
        &[p12.ipv4.to_string(), APP_PORT.to_string()],
    )
    .unwrap();
    let squatter = bed.spawn(squat, "squatter.log").unwrap();
    let squatter_log = bed.log_path("squatter.log");
    wait_until(Duration::from_secs(10), || {
        Ok(read_json_lines(&squatter_log)?
            .iter()
            .any(|e| e["event"] == "squatting" && e["local"] == 15008))
    })
    .unwrap();

    let agent = strict_agent(&mut bed, 1, &[&p11], |c| c.reconcile_interval_ms(200));
    // Visible: unready, naming the pod; counted.
    let (status, body) = agent.readiness().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("default/n1p1") && body.contains("fail-closed"),
        "{body}"
    );
    let failed = || {
        agent
            .metric_lines("zt_workloads_enrollment_failed")
            .unwrap()
    };
    assert_eq!(
        failed(),
        vec!["zt_workloads_enrollment_failed 1".to_owned()]
    );
    // Fail-closed: its connects are refused, and nothing reaches it.
    let out = unprivileged_connect(&bed, &p11, &p12, APP_PORT);
    assert!(
        out["connect"]
            .as_str()
            .unwrap()
            .contains("Operation not permitted"),
        "a pod whose enrollment failed connected out: {out}"
    );
    let inbound = unprivileged_connect(&bed, &p12, &p11, 9001);
    assert!(
        !reached_app(&inbound),
        "a fail-closed pod was reached: {inbound}"
    );

    // Once the port is free again, the agent enrolls the pod by itself.
    bed.kill(squatter);
    wait_until(Duration::from_secs(20), || Ok(agent.readiness()?.0 == 200))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    assert_eq!(
        failed(),
        vec!["zt_workloads_enrollment_failed 0".to_owned()]
    );
    let inbound = unprivileged_connect(&bed, &p12, &p11, 9001);
    assert!(
        !reached_app(&inbound),
        "plaintext reached an enrolled pod: {inbound}"
    );
    wait_until(Duration::from_secs(10), || {
        Ok(!plaintext_denials(&agent).is_empty())
    })
    .unwrap();
    assert!(app.connections().unwrap().is_empty());
    drop(upstream);
}

#[test]
fn the_kernel_never_hands_a_pod_an_agent_port_through_bind_port_zero() {
    let mut bed = Testbed::new(2).unwrap();
    let (p11, p12) = (bed.pod(1, 1).clone(), bed.pod(1, 2).clone());
    let _agent = strict_agent(&mut bed, 1, &[&p11], |c| c);
    const AUTOBIND: &str = r#"
import json, socket
open("/proc/sys/net/ipv4/ip_local_port_range", "w").write("15006 15006")
s = socket.socket()
try:
    s.bind(("0.0.0.0", 0))
    s.listen()
    out = {"bound": s.getsockname()[1]}
except OSError as e:
    out = {"error": str(e)}
print(json.dumps(out))
"#;
    // Enrolled or not yet: neither may end up holding the port.
    for pod in [&p11, &p12] {
        let out = attack(&bed, pod, Privilege::DefaultContainer, AUTOBIND, &[]).unwrap();
        assert!(
            out["error"].is_string(),
            "{} got an agent port: {out}",
            pod.name
        );
    }
}

#[test]
fn non_tcp_traffic_is_dropped_inbound_under_strict_and_refused_outbound_under_locked_egress() {
    let mut bed = Testbed::new(2).unwrap();
    let (p21, p22) = (bed.pod(2, 1).clone(), bed.pod(2, 2).clone());
    let _agent = strict_agent(&mut bed, 2, &[&p21], |c| {
        c.udp_inbound_ports(&[5354]).egress(Egress::deny())
    });
    let receiver = |bed: &mut Testbed, pod: &Pod, ports: &[&str], log: &str| {
        let args: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        let cmd =
            python_command(bed, pod, Privilege::DefaultContainer, UDP_RECEIVER, &args).unwrap();
        bed.spawn(cmd, log).unwrap();
        let path = bed.log_path(log);
        wait_until(Duration::from_secs(10), || {
            Ok(read_json_lines(&path)?
                .iter()
                .any(|e| e["event"] == "listening"))
        })
        .unwrap();
        path
    };
    let meshed_log = receiver(&mut bed, &p21, &["5353", "5354"], "udp-meshed.log");
    let outside_log = receiver(&mut bed, &p22, &["53", "5353"], "udp-outside.log");
    let datagrams = |path: &std::path::Path| -> Vec<Value> {
        read_json_lines(path)
            .unwrap()
            .into_iter()
            .filter(|e| e["event"] == "datagram")
            .collect()
    };

    // Inbound: a QUIC-like server on 5353 is out of reach; the allowed 5354 is not. The allowed
    // datagram is sent last, so once it is in, the other would have been too.
    const SEND: &str = r#"
import json, socket, sys
out = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(("to-" + port).encode(), (host, int(port)))
        out[target] = "sent"
    except OSError as e:
        out[target] = str(e)
print(json.dumps(out))
"#;
    // A datagram from source port 53 is not a DNS reply: p21 never asked p12. Sent first, so it
    // would be in before the allowed one below.
    const FROM_53: &str = r#"
import json, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
s.sendto(sys.argv[2].encode(), (host, int(port)))
print(json.dumps({"sent": True}))
"#;
    let ip21 = p21.ipv4.to_string();
    let (p11, p12) = (bed.pod(1, 1).clone(), bed.pod(1, 2).clone());
    let from_53 = |bed: &Testbed, from: &Pod, payload: &str| {
        attack(
            bed,
            from,
            Privilege::DefaultContainer,
            FROM_53,
            &[format!("{ip21}:5353"), payload.to_owned()],
        )
        .unwrap();
    };
    from_53(&bed, &p12, "unasked-53");
    let sent = attack(
        &bed,
        &p22,
        Privilege::Unprivileged,
        SEND,
        &[format!("{ip21}:5353"), format!("{ip21}:5354")],
    )
    .unwrap();
    assert_eq!(sent[format!("{ip21}:5353")], "sent", "{sent}");
    wait_until(Duration::from_secs(10), || {
        Ok(!datagrams(&meshed_log).is_empty())
    })
    .unwrap();
    let got = datagrams(&meshed_log);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["port"], 5354, "{got:?}");

    // Outbound: UDP out of the mesh is refused except DNS; raw, ping and SCTP sockets, which would
    // carry anything past the hooks, cannot be opened.
    const EGRESS: &str = r#"
import json, socket, sys
host = sys.argv[1]
out = {}
def attempt(name, f):
    try:
        f()
        out[name] = "ok"
    except OSError as e:
        out[name] = str(e)
def connected():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, 5353))
    s.send(b"connected")
attempt("sendto_5353", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"sendto", (host, 5353)))
attempt("connect_5353", connected)
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))
attempt("raw6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP))
attempt("sctp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132))
attempt("ping", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).sendto(b"\x08\0\0\0\0\0\0\0tunnelled", (host, 0)))
attempt("ping6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6))
attempt("dns", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"dns", (host, 53)))
print(json.dumps(out))
"#;
    // Ping sockets as containerd allows them: any group may open one.
    let ping_range = bed
        .pod_command(&p21, "sh")
        .unwrap()
        .args([
            "-c",
            "echo 0 2147483647 > /proc/sys/net/ipv4/ping_group_range",
        ])
        .status()
        .unwrap();
    assert!(ping_range.success(), "ping_group_range: {ping_range}");
    let out = attack(
        &bed,
        &p21,
        Privilege::DefaultContainer,
        EGRESS,
        &[p22.ipv4.to_string()],
    )
    .unwrap();
    for refused in [
        "sendto_5353",
        "connect_5353",
        "raw",
        "raw6",
        "sctp",
        "ping",
        "ping6",
    ] {
        let outcome = out[refused].as_str().unwrap();
        assert!(
            outcome.contains("Operation not permitted")
                || (refused == "sctp" && outcome.contains("not supported")),
            "{refused}: {out}"
        );
    }
    assert_eq!(out["dns"], "ok", "{out}");
    wait_until(Duration::from_secs(10), || {
        Ok(!datagrams(&outside_log).is_empty())
    })
    .unwrap();
    let got = datagrams(&outside_log);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["port"], 53, "{got:?}");

    // An unconnected resolver in p21 asks p12 (as musl's does: its own socket, sendto, then
    // recvfrom): the answer from port 53 comes back to the port it asked from. p11, which p21
    // never asked, still cannot use port 53 to reach another of p21's ports; an allowed
    // datagram it sends next marks when that one would have arrived.
    const RESPOND: &str = r#"
import json, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
print(json.dumps({"event": "listening"}), flush=True)
data, peer = s.recvfrom(512)
s.sendto(b"answer to " + data, peer)
print(json.dumps({"event": "answered", "port": peer[1]}), flush=True)
"#;
    const RESOLVE: &str = r#"
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
out = {}
try:
    s.sendto(b"query", (sys.argv[1], 53))
    data, peer = s.recvfrom(512)
    out["answer"] = data.decode(errors="replace")
except OSError as e:
    out["error"] = str(e)
print(json.dumps(out))
"#;
    let responder = python_command(&bed, &p12, Privilege::DefaultContainer, RESPOND, &[]).unwrap();
    bed.spawn(responder, "dns-responder.log").unwrap();
    let responder_log = bed.log_path("dns-responder.log");
    wait_until(Duration::from_secs(10), || {
        Ok(read_json_lines(&responder_log)?
            .iter()
            .any(|e| e["event"] == "listening"))
    })
    .unwrap();
    let resolved = attack(
        &bed,
        &p21,
        Privilege::Unprivileged,
        RESOLVE,
        &[p12.ipv4.to_string()],
    )
    .unwrap();
    assert_eq!(resolved["answer"], "answer to query", "{resolved}");
    // The marker leaves the same pod right after, on the same path, so it cannot overtake.
    from_53(&bed, &p11, "unasked-53-again");
    attack(
        &bed,
        &p11,
        Privilege::Unprivileged,
        SEND,
        &[format!("{ip21}:5354")],
    )
    .unwrap();
    wait_until(Duration::from_secs(10), || {
        Ok(datagrams(&meshed_log).len() >= 2)
    })
    .unwrap();
    let got = datagrams(&meshed_log);
    let data: Vec<&str> = got.iter().filter_map(|d| d["data"].as_str()).collect();
    assert_eq!(data, ["to-5354", "to-5354"], "{got:?}");
}

/// A pod that opened a connection before it was captured (its process started before the agent
/// enrolled it) would keep it around the agent for as long as it lives: enrollment resets it.
/// The adversary holds the connection open across the enrollment, then tries to use it.
#[test]
fn a_connection_opened_before_the_pod_was_captured_is_reset_when_it_is() {
    const HOLD: &str = r#"
import json, os, socket, sys, time
host, port, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=5)
print(json.dumps({"event": "connected", "local": s.getsockname()[1]}), flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
out = {"event": "after"}
try:
    s.settimeout(5)
    s.sendall(b"sent around the agent")
    s.shutdown(socket.SHUT_WR)
    out["reply"] = s.recv(65536).decode(errors="replace")
except OSError as e:
    out["error"] = str(e)
print(json.dumps(out), flush=True)
"#;
    let mut bed = Testbed::new(2).unwrap();
    let (p11, p12) = (bed.pod(1, 1).clone(), bed.pod(1, 2).clone());
    // Outside the mesh, so nothing on its side refuses bytes that come around the agent.
    let server = Server::start(&mut bed, &p12, SocketAddr::from(([0u16; 8], APP_PORT))).unwrap();
    let dst = SocketAddr::new(p12.ip(false), APP_PORT);
    let go = bed.dir.join("go");
    let cmd = python_command(
        &bed,
        &p11,
        Privilege::DefaultContainer,
        HOLD,
        &[
            p12.ipv4.to_string(),
            APP_PORT.to_string(),
            go.display().to_string(),
        ],
    )
    .unwrap();
    bed.spawn(cmd, "hold.log").unwrap();
    let log = bed.log_path("hold.log");
    let event = |name: &str| -> Option<Value> {
        read_json_lines(&log)
            .ok()?
            .into_iter()
            .find(|e| e["event"] == name)
    };
    wait_until(Duration::from_secs(10), || Ok(event("connected").is_some())).unwrap();

    let agent = strict_agent(&mut bed, 1, &[&p11], |c| c);
    let reset = agent
        .events()
        .unwrap()
        .into_iter()
        .find(|e| e["message"] == "reset connections the pod held from before it was captured")
        .unwrap_or_else(|| panic!("no reset at enrollment\n{}", agent.log_tail()));
    assert!(reset["connections"].as_u64() >= Some(1), "{reset}");
    std::fs::write(&go, "").unwrap();
    wait_until(Duration::from_secs(10), || Ok(event("after").is_some())).unwrap();
    let after = event("after").unwrap();
    assert!(
        after["error"].is_string(),
        "the connection from before capture still carried bytes: {after}"
    );
    // The server got none of them: the connection it had ended without a byte.
    wait_until(Duration::from_secs(5), || {
        Ok(!server.connections()?.is_empty())
    })
    .unwrap();
    let first = &server.connections().unwrap()[0];
    assert_eq!(first["bytes"], 0, "{first}");

    // A new connection from the pod goes through the agent.
    connect(&bed, &p11, dst, 1024, TIMEOUT)
        .unwrap()
        .expect("captured connection");
    agent
        .wait_access("captured after enrollment", |r| {
            r["direction"] == "outbound" && r["original_dst"] == dst.to_string()
        })
        .unwrap();
}
