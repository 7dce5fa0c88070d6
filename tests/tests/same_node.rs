//! Root end-to-end tests of the same-node fast path (issue 20): with `mtls.same_node = "splice"`
//! a connection between two meshed pods of one node is authorized like any other and then
//! spliced in the kernel. Bytes arrive intact both ways, in order, with half-closes and resets
//! passed on; the agent does not copy them (its read syscalls say so); policy still refuses and
//! still closes; both sides are logged and counted as `node_local`.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use zt_tests::{
    Agent, Pod, Testbed,
    agent::{meshed_config, spiffe_id},
    node_config::{MtlsMode, PolicyDefault},
    probe::{Server, connect, connect_duplex, connect_idle_until, intact},
};

const MIB: u64 = 1024 * 1024;
const PORT: u16 = 9000;
const TIMEOUT: Duration = Duration::from_secs(3);

/// n1p1 and n1p2 meshed on node 1, splicing; with `policies`, policies from the directory
/// `policies` (default deny, none yet), else none (allow). A server on n1p2.
struct Node {
    bed: Testbed,
    agent: Agent,
    server: Server,
    policies: PathBuf,
}

impl Node {
    /// The client pod, and the server's IPv4 address in the other pod.
    fn client_and_server(&self) -> (&Pod, SocketAddr) {
        let server = self.bed.pod(1, 2);
        (self.bed.pod(1, 1), SocketAddr::new(server.ip(false), PORT))
    }
}

/// The access records of `direction`, once there are at least `count`: a client has its last
/// byte before the agent logs the connection's end.
fn logged(agent: &Agent, direction: &str, count: usize) -> Vec<serde_json::Value> {
    let records = || -> anyhow::Result<Vec<serde_json::Value>> {
        Ok(agent
            .access_records()?
            .into_iter()
            .filter(|r| r["direction"] == direction)
            .collect())
    };
    zt_tests::wait_until(Duration::from_secs(10), || Ok(records()?.len() >= count)).unwrap_or_else(
        |e| {
            panic!(
                "{direction}: not every connection was logged: {e}\n{}",
                agent.log_tail()
            )
        },
    );
    records().unwrap()
}

fn node(policies: bool) -> Node {
    let mut bed = Testbed::new(2).unwrap();
    let ca = bed.dir.join("ca");
    zt_tests::agent::ca_init(&ca).unwrap();
    let pods = [bed.pod(1, 1).clone(), bed.pod(1, 2).clone()];
    let mut config = meshed_config(
        bed.node(1),
        &[&pods[0], &pods[1]],
        &[],
        &ca,
        MtlsMode::Strict,
    )
    .same_node("splice");
    let dir = bed.dir.join("policies");
    if policies {
        std::fs::create_dir_all(&dir).unwrap();
        config = config.policies(PolicyDefault::Deny, Some(&dir));
    }
    let agent = Agent::start_with_config(&mut bed, 1, &config).unwrap();
    let server = Server::start(&mut bed, &pods[1], SocketAddr::from(([0u16; 8], PORT))).unwrap();
    Node {
        bed,
        agent,
        server,
        policies: dir,
    }
}

/// Bytes the agent process read through syscalls so far (`rchar` of /proc/PID/io).
fn agent_read_bytes(agent: &Agent) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{}/io", agent.pid)).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("rchar in /proc/PID/io")
}

#[test]
fn spliced_connection_carries_both_directions_intact_without_the_agent_copying() {
    let mut n = node(false);
    let (p11, p12) = (n.bed.pod(1, 1).clone(), n.bed.pod(1, 2).clone());
    let port = PORT + 1;
    // The server sends first and at once: its bytes reach the agent's socket before the splice.
    Server::start_sending(
        &mut n.bed,
        &p12,
        SocketAddr::from(([0u16; 8], port)),
        128 * MIB,
    )
    .unwrap();
    let read_before = agent_read_bytes(&n.agent);
    for v6 in [false, true] {
        let dst = SocketAddr::new(p12.ip(v6), port);
        let r = connect_duplex(
            &n.bed,
            &p11,
            dst,
            128 * MIB,
            128 * MIB,
            Duration::from_secs(30),
        )
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "duplex transfer over {dst} failed: {e}\n{}",
                n.agent.log_tail()
            )
        });
        intact(&r, 128 * MIB);
        assert_eq!(r["received"].as_u64(), Some(128 * MIB), "{r}");
        assert_eq!(
            r["received_sha256"], r["reply"]["sent_sha256"],
            "server -> client checksum: {r}"
        );
    }
    // 512 MiB crossed the agent's sockets; a user-space relay would have read all of it.
    let read = agent_read_bytes(&n.agent) - read_before;
    assert!(
        read < 16 * MIB,
        "the agent read {read} bytes: the connection was not spliced"
    );
    for direction in ["outbound", "inbound"] {
        let spliced = logged(&n.agent, direction, 2);
        assert_eq!(spliced.len(), 2, "{direction}: {spliced:?}");
        for r in &spliced {
            assert_eq!(r["connection_security_policy"], "node_local", "{r}");
            assert_eq!(r["source_identity"], spiffe_id(&p11).as_str(), "{r}");
            assert_eq!(r["destination_identity"], spiffe_id(&p12).as_str(), "{r}");
            assert_eq!(r["bytes_sent"].as_u64(), Some(128 * MIB), "{r}");
            assert!(r["bytes_received"].as_u64().unwrap() >= 128 * MIB, "{r}");
            assert_eq!(r["close"], "eof", "{r}");
        }
    }
    // Counted on both sides, and no TLS handshake happened on the node.
    let opened = n
        .agent
        .metric_lines("zt_tcp_connections_opened_total")
        .unwrap();
    assert_eq!(opened.len(), 2, "{opened:?}");
    assert!(
        opened
            .iter()
            .all(|l| l.contains("connection_security_policy=\"node_local\"") && l.ends_with(" 2")),
        "{opened:?}"
    );
    let metrics = n.agent.metrics().unwrap();
    assert!(
        !metrics.contains("mutual_tls"),
        "a same-node connection went through the tunnel: {metrics}"
    );
}

#[test]
fn a_reset_on_one_side_of_a_splice_is_a_reset_on_the_other() {
    let n = node(false);
    let (p11, dst) = n.client_and_server();
    zt_tests::probe::connect_and_reset(&n.bed, p11, dst, 64 * 1024)
        .unwrap()
        .expect("probe ran");
    let seen = n.server.expect_connections(1).unwrap();
    assert_eq!(seen[0]["end"], "reset", "the server saw: {}", seen[0]);
    let out = n
        .agent
        .wait_access("reset outbound", |r| r["direction"] == "outbound")
        .unwrap();
    assert_eq!(out["close"], "downstream_reset", "{out}");
    assert_eq!(out["connection_security_policy"], "node_local", "{out}");
}

fn allow_only(principal: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-one\n  namespace: default\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"{principal}\"]\n"
    )
}

#[test]
fn policy_refuses_and_closes_spliced_connections() {
    let p11_principal = |bed: &Testbed| {
        spiffe_id(bed.pod(1, 1))
            .trim_start_matches("spiffe://")
            .to_owned()
    };
    // Nothing allowed yet: p11's connection to p12 is refused before any byte reaches the app.
    let n = node(true);
    let (p11, dst) = n.client_and_server();
    let refused = connect(&n.bed, p11, dst, 1024, TIMEOUT).unwrap();
    assert!(refused.is_err(), "denied, yet connected: {refused:?}");
    let denial = n
        .agent
        .wait_access("the denial", |r| r["direction"] == "inbound")
        .unwrap();
    assert_eq!(denial["policy_decision"], "DENY", "{denial}");
    assert_eq!(denial["close"], "policy", "{denial}");
    let out = n
        .agent
        .wait_access("the refused source", |r| r["direction"] == "outbound")
        .unwrap();
    assert_eq!(out["close"], "tunnel_refused", "{out}");
    assert_eq!(n.server.connections().unwrap().len(), 0);

    // Allowed once the policy is in force: it connects and stays open, spliced; a policy
    // update then closes it.
    zt_tests::agent::write_policy(
        &n.policies,
        "allow.yaml",
        &allow_only(&p11_principal(&n.bed)),
    )
    .unwrap();
    zt_tests::wait_until(Duration::from_secs(10), || {
        Ok(connect(&n.bed, p11, dst, 1024, TIMEOUT)?.is_ok())
    })
    .unwrap();
    let go = n.bed.dir.join("go");
    let closed = std::thread::scope(|s| {
        let conn = s.spawn(|| connect_idle_until(&n.bed, p11, dst, &go));
        // Open on both sides: the probe's connection (2 records) and this one.
        zt_tests::wait_until(Duration::from_secs(10), || {
            Ok(n.agent.opened_connections()? >= 4)
        })
        .unwrap();
        zt_tests::agent::write_policy(&n.policies, "allow.yaml", &allow_only("nobody/ns/x/sa/y"))
            .unwrap();
        let record = n
            .agent
            .wait_access("the connection the update denies", |r| {
                r["close"] == "policy"
                    && r["direction"] == "inbound"
                    && r["policy_decision"] == "ALLOW"
            })
            .unwrap();
        assert_eq!(
            record["connection_security_policy"], "node_local",
            "{record}"
        );
        std::fs::write(&go, "").unwrap();
        conn.join().unwrap().unwrap()
    });
    assert!(
        closed.is_err(),
        "the closed connection still got a reply: {closed:?}"
    );
}

#[test]
fn connections_that_half_close_before_the_splice_are_copied_intact() {
    let n = node(false);
    let (p11, dst) = n.client_and_server();
    // Each sends 100 bytes and half-closes at once: usually before the agent splices, when the
    // kernel no longer takes the socket. Each still gets the server's reply.
    let count = 50;
    let completed = zt_tests::probe::churn(&n.bed, p11, dst, count, 100).unwrap();
    assert_eq!(completed, count as u64);
    n.server.expect_connections(count).unwrap();
    let inbound = logged(&n.agent, "inbound", count);
    assert_eq!(inbound.len(), count, "{inbound:?}");
    for r in &inbound {
        assert_eq!(r["bytes_sent"].as_u64(), Some(100), "{r}");
        assert_eq!(r["close"], "eof", "{r}");
        assert_eq!(r["connection_security_policy"], "node_local", "{r}");
    }
}

/// `(Send-Q, bytes_acked)` of `pod`'s connection to its agent's outbound listener, from `ss`.
fn client_send_state(bed: &Testbed, pod: &Pod) -> anyhow::Result<Option<(u64, u64)>> {
    let out = bed
        .pod_command(pod, "ss")?
        .args(["-tniH", "state", "established", "dport", "= :15001"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let Some(socket) = lines.next() else {
        return Ok(None);
    };
    let send_q = socket
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok());
    let acked = lines
        .next()
        .into_iter()
        .flat_map(str::split_whitespace)
        .find_map(|f| f.strip_prefix("bytes_acked:"))
        .and_then(|v| v.parse().ok());
    Ok(send_q.zip(acked.or(Some(0))))
}

#[test]
fn a_destination_that_does_not_read_holds_its_source_back() {
    let mut n = node(false);
    let (p11, p12) = (n.bed.pod(1, 1).clone(), n.bed.pod(1, 2).clone());
    let port = PORT + 2;
    let mut stall = n
        .bed
        .pod_command(&p12, zt_tests::bin_path("zt-probe").unwrap())
        .unwrap();
    stall.args(["stall", "--listen", &format!("0.0.0.0:{port}")]);
    n.bed.spawn(stall, "stall.log").unwrap();
    // Listening before the client dials (a refused connect would leave nothing to stall).
    zt_tests::wait_until(Duration::from_secs(10), || {
        let out = n
            .bed
            .pod_command(&p12, "ss")?
            .args(["-tlnH", "sport", &format!("= :{port}")])
            .output()?;
        Ok(!out.stdout.is_empty())
    })
    .unwrap();
    // 1 GiB at a server that never reads: without a bound the kernel's redirect queue would take
    // it all. The client runs until the test bed stops it.
    let mut client = n
        .bed
        .pod_command(&p11, zt_tests::bin_path("zt-probe").unwrap())
        .unwrap();
    let dst = SocketAddr::new(p12.ip(false), port);
    client.args([
        "connect",
        "--to",
        &dst.to_string(),
        "--bytes",
        &(1024 * MIB).to_string(),
    ]);
    n.bed.spawn(client, "client.log").unwrap();
    // The client's sends back up (its send queue holds bytes) and what the agent's socket took
    // stops growing.
    let mut last = None;
    zt_tests::wait_until(Duration::from_secs(30), || {
        let state = client_send_state(&n.bed, &p11)?;
        let still = matches!((last, state), (Some((_, a)), Some((q, b))) if q > 0 && a == b);
        last = state;
        Ok(still)
    })
    .unwrap_or_else(|e| {
        let client = std::fs::read_to_string(n.bed.dir.join("client.log")).unwrap_or_default();
        panic!(
            "the client never stalled ({last:?}): {e}\nclient: {client}\n{}",
            n.agent.log_tail()
        )
    });
    let (_, acked) = last.unwrap();
    assert!(
        acked < 96 * MIB,
        "the splice absorbed {acked} bytes for a destination that reads nothing"
    );
    let read = agent_read_bytes(&n.agent);
    assert!(read < 16 * MIB, "the agent copied ({read} bytes read)");
}
